"""The named statements of flagsched/sql/queries.sql compose, and only from known pieces."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from flagsched import sql
from flagsched.db import Database
from flagsched.sql import BUILT_IN, TableMap, Tables, UnknownStatement, statement

ROOT = Path(__file__).resolve().parents[2]
# Statements whose filters the caller chooses: each composes with its slots filled.
_SLOTS: dict[str, dict[str, list[str] | str]] = {
    "list_failed": {"where": ["failed"]},
    "list_schedules": {"where": ["open_schedule", "of_flag"]},
    "history": {"where": [], "order": "newest"},
    "list_recurrences": {"where": []},
    "flags_now": {"where": ["flag_in_keys"]},
    "schedules_ahead": {"where": ["open_due_until"]},
    "recurrences_ahead": {"where": ["active_recurrence"]},
}
# Statements that take values as literals (no parameters: SET LOCAL takes none).
_LITERALS = {"lock_timeout_ms": 5000, "statement_timeout_ms": 30000}
_WITH_LITERALS = ("session_settings", "begin")


def statement_or_empty(name: str) -> str:
    try:
        if name in _WITH_LITERALS:
            return statement(name, literals=_LITERALS)
        return statement(name, **_SLOTS.get(name, {}))  # type: ignore[arg-type]
    except UnknownStatement:
        return ""  # a fragment taking an argument


@pytest.mark.parametrize("name", sql.names())
def test_every_name_composes_with_nothing_left_in_braces(name: str) -> None:
    text = statement_or_empty(name)
    assert not re.search(r"\{\w+(\.\w+)?(\(.*?\))?\}", text), text


def test_tables_and_columns_are_quoted_identifiers_from_the_mapping() -> None:
    mapped = Tables(flags=TableMap("App Flags", (("key", "name"), ("enabled", "on"))))
    text = statement("flags_now", tables=mapped, where=["flag_in_keys"])
    assert 'FROM "App Flags"' in text
    assert '"name" = ANY(%(keys)s)' in text
    assert '"on" AS enabled' in text
    assert '"rollout_percentage"' in text  # an unmapped column keeps its name
    assert "feature_flags" in statement("flags_now", tables=BUILT_IN, where=[])


def test_slots_join_fragments_and_an_empty_list_means_true() -> None:
    assert "WHERE (true)" in statement("list_recurrences", where=[])
    both = statement("list_schedules", where=["with_status", "of_flag"])
    assert "(status = %(status)s) AND (flag_key = %(flag_key)s)" in both


def test_an_unknown_statement_or_placeholder_is_refused() -> None:
    with pytest.raises(UnknownStatement):
        statement("no_such_statement")
    with pytest.raises(UnknownStatement):
        statement("list_schedules")  # its {where} slot left empty


def test_the_rules_are_spelled_once_in_queries_sql() -> None:
    source = (ROOT / "flagsched" / "sql" / "queries.sql").read_text()
    assert source.count("retry_count <= max_retries") == 1
    assert source.count("TIMESTAMPTZ '9999-12-31") == 1  # time_max
    assert source.count("8192") == 0  # UPDATES_MAX_BYTES comes from Python, once


def test_the_session_settings_are_literals_of_the_database() -> None:
    begin = Database("postgresql://u@h/d", lock_timeout=0.0001, statement_timeout=None)
    text = begin.begin_sql()
    assert text.startswith("BEGIN;")
    assert "SET LOCAL lock_timeout = 1;" in text  # rounded up: never 0 (none)
    assert "SET LOCAL statement_timeout = 0;" in text
    assert begin.settings_sql() in text and "BEGIN" not in begin.settings_sql()
    with pytest.raises(UnknownStatement):
        statement("begin")  # its literals left out


def test_no_other_module_of_flagsched_spells_a_statement() -> None:
    spelled = re.compile(
        r"""["'](\s*)(SELECT|INSERT INTO|UPDATE \w+ SET|DELETE FROM|BEGIN|SET LOCAL|SAVEPOINT)\b"""
    )
    offenders = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "flagsched").rglob("*.py")
        if spelled.search(path.read_text())
    ]
    assert offenders == []
