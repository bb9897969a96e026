"""Rolling upgrades: a release works on any schema that holds the objects it uses (a later
release may have migrated it further), and refuses, naming what is missing, only when one
of them is not there (SPEC "Upgrades")."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import flagsched
from flagsched import migrate, repository
from flagsched.db import Database, begin
from flagsched.required import REQUIRED, Function, Table
from flagsched.schema import make_engine
from flagsched.sql import BUILT_IN
from flagsched.sql.stored import SUPERSEDED
from tests.conftest import Ran

Sql = Callable[..., list[Any]]

# What a later release might have done to the schema: objects this one does not know.
LATER_RELEASE = """
ALTER TABLE feature_flag_schedules ADD COLUMN priority integer NOT NULL DEFAULT 0;
ALTER TABLE feature_flags ADD COLUMN description text;
CREATE TABLE flagsched_later_things (id bigint PRIMARY KEY);
CREATE FUNCTION flagsched_claim_v2(p_limit integer, p_lock boolean, p_lane text)
    RETURNS integer LANGUAGE sql AS $$ SELECT 1 $$;
CREATE FUNCTION flagsched_check_v1(p_id bigint) RETURNS integer LANGUAGE sql AS $$ SELECT 1 $$;
UPDATE alembic_version SET version_num = '0099';
"""


def _due(sql: Sql, add_flag: Callable[..., None], add_schedule: Callable[..., int]) -> int:
    add_flag("checkout")
    return add_schedule("checkout", {"enabled": True, "rollout_percentage": 40})


def test_a_schema_a_later_release_migrated_further_serves_this_release(
    flagsched: Callable[..., Ran],
    sql: Sql,
    add_flag: Callable[..., None],
    add_schedule: Callable[..., int],
) -> None:
    sql(LATER_RELEASE)
    schedule_id = _due(sql, add_flag, add_schedule)
    for command in (["process", "--dry-run"], ["status"], ["list"], ["list-failed"]):
        ran = flagsched(*command)
        assert ran.code == 0, (command, ran.stderr)
    ran = flagsched("process")
    assert ran.code == 0, ran.stderr
    assert sql("SELECT enabled, rollout_percentage FROM feature_flags")[0] == (True, 40)
    assert sql("SELECT status FROM feature_flag_schedules WHERE id = :i", i=schedule_id)[0] == (
        "applied",
    )
    assert flagsched("show", str(schedule_id)).code == 0
    assert flagsched("history", "checkout").code == 0
    # This release's migrate knows nothing of revision 0099: it changes nothing (exit 3).
    assert flagsched("migrate").code == 3
    assert flagsched("migrate", "--check").code == 3
    assert sql("SELECT version_num FROM alembic_version")[0] == ("0099",)


# A later release that changes how history is recorded replaces the trigger (two history
# triggers would record each change twice), as 0006 replaced 0004's flagsched_record_update.
LATER_HISTORY_TRIGGER = """
DROP TRIGGER flagsched_record_update_v2 ON feature_flags;
DROP TRIGGER flagsched_record_update_moved ON feature_flags;
CREATE TRIGGER flagsched_record_update_v3 AFTER UPDATE ON feature_flags
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION flagsched_record_change_v2();
UPDATE alembic_version SET version_num = '0099';
"""


def test_a_later_release_that_replaces_the_history_trigger_serves_this_release(
    flagsched: Callable[..., Ran],
    sql: Sql,
    add_flag: Callable[..., None],
    add_schedule: Callable[..., int],
) -> None:
    sql(LATER_HISTORY_TRIGGER)
    schedule_id = _due(sql, add_flag, add_schedule)
    ran = flagsched("process")
    assert ran.code == 0, ran.stderr
    assert sql("SELECT status FROM feature_flag_schedules WHERE id = :i", i=schedule_id)[0] == (
        "applied",
    )
    assert sql(
        "SELECT actor, schedule_ids FROM feature_flag_changes WHERE old_enabled IS NOT NULL"
    ) == [("flagsched", [schedule_id])]


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (
            "ALTER TABLE feature_flag_schedules DROP COLUMN reviewed_at",
            "column feature_flag_schedules.reviewed_at",
        ),
        (
            "DROP FUNCTION flagsched_check_v4(bigint, interval)",
            "function flagsched_check_v4(bigint, interval)",
        ),
        (
            "DROP FUNCTION flagsched_apply_v6(bigint[], text[], boolean[], integer[], interval, "
            "boolean, jsonb)",
            "function flagsched_apply_v6(bigint[], text[], boolean[], integer[], interval, "
            "boolean, jsonb)",
        ),
        (  # the same name with another signature is not the function this release calls
            "DROP FUNCTION flagsched_claim_v3(integer, boolean, jsonb, interval); "
            "CREATE FUNCTION flagsched_claim_v3(p_limit integer) RETURNS integer "
            "LANGUAGE sql AS $$ SELECT 1 $$",
            "function flagsched_claim_v3(integer, boolean, jsonb, interval)",
        ),
        (  # no history trigger for UPDATEs at all (of any release)
            "DROP TRIGGER flagsched_record_update_v2 ON feature_flags; "
            "DROP TRIGGER flagsched_record_update_moved ON feature_flags",
            "trigger flagsched_record_update on feature_flags",
        ),
        (
            "DROP TABLE feature_flag_recurrences",
            "table feature_flag_recurrences",
        ),
    ],
)
def test_a_schema_lacking_a_needed_object_is_exit_3_naming_it(
    flagsched: Callable[..., Ran],
    sql: Sql,
    add_flag: Callable[..., None],
    add_schedule: Callable[..., int],
    damage: str,
    named: str,
) -> None:
    _due(sql, add_flag, add_schedule)
    sql(damage)  # alembic_version still says the latest revision
    for command in (["process"], ["process", "--dry-run"], ["status"], ["list-failed"]):
        ran = flagsched(*command)
        assert ran.code == 3, (command, ran.stderr)
        assert named in ran.stderr and "run `flagsched migrate`" in ran.stderr
        assert ran.stderr.count("\n") == 1 and "internal error" not in ran.stderr
    assert sql("SELECT enabled FROM feature_flags")[0] == (False,)
    # migrate has no revision left to run: --check says it was changed by hand, exit 1
    checked = flagsched("migrate", "--check")
    assert checked.code == 1, checked
    assert "at the latest revision" in checked.stdout and named in checked.stdout
    assert "outside flagsched" in checked.stdout


def test_a_missing_table_stands_for_its_columns(database_url: str, sql: Sql) -> None:
    sql("DROP TABLE feature_flag_recurrences")
    with begin(Database(database_url)) as conn:
        assert repository.missing_objects(conn) == ["table feature_flag_recurrences"]


@pytest.mark.parametrize(
    ("revision", "named"),
    [
        ("0004", ["table feature_flag_recurrences", "column feature_flag_schedules.recurrence_id"]),
        # the previous release's: the check and the write this one calls are 0011's
        (
            "0010",
            [
                "function flagsched_check_v4(bigint, interval)",
                "function flagsched_apply_v6(bigint[], text[], boolean[], integer[], interval, "
                "boolean, jsonb)",
            ],
        ),
    ],
)
def test_a_schema_an_earlier_release_left_is_exit_3_until_migrated(
    empty_database_url: str, flagsched: Callable[..., Ran], revision: str, named: list[str]
) -> None:
    migrate.upgrade(make_engine(empty_database_url), revision)
    ran = flagsched("process", url=empty_database_url)
    assert ran.code == 3
    assert all(name in ran.stderr for name in named), ran.stderr
    assert "run `flagsched migrate`" in ran.stderr
    assert flagsched("migrate", url=empty_database_url).code == 0
    assert flagsched("process", url=empty_database_url).code == 0


def test_a_database_never_migrated_is_called_so(
    empty_database_url: str, flagsched: Callable[..., Ran]
) -> None:
    ran = flagsched("process", url=empty_database_url)
    assert ran.code == 3
    assert "not migrated: run `flagsched migrate`" in ran.stderr


def test_the_required_objects_are_what_the_head_revision_creates(database_url: str) -> None:
    with begin(Database(database_url)) as conn:
        assert repository.missing_objects(conn) == []
    tables = [o for o in REQUIRED if isinstance(o, Table) and o.columns]
    assert {t.name for t in tables} <= set(_metadata_tables())


def _metadata_tables() -> dict[str, Any]:
    from flagsched.schema import metadata

    return dict(metadata.tables)


def test_every_stored_function_the_code_names_is_required() -> None:
    """A statement that starts calling flagsched_x_v3 must list it in flagsched.required:
    the names the code spells, and those the statements call through the mapping
    (`{fn.claim}`)."""
    package = Path(flagsched.__file__).parent
    named = {
        name
        for path in package.rglob("*.py")
        # stored.py names the base names of objects only your own tables get (with a digest)
        if path.name not in ("required.py", "stored.py")
        for name in re.findall(r"\bflagsched_[a-z_]+_v\d+\b", path.read_text())
    }
    called = set(re.findall(r"\{fn\.(\w+)\}", (package / "sql" / "queries.sql").read_text()))
    # (`record_app` and `note_unseen`/`note_unseen_once` are an application's schedules
    # table's only: required there, `required._app_schedules`)
    app_only = ("record_app", "note_unseen", "note_unseen_once")
    named |= {BUILT_IN.fn.column(routine) for routine in called if routine not in app_only}
    # a routine a later one replaced is still created for the previous release, not called
    superseded = {BUILT_IN.fn.column(routine) for routine in SUPERSEDED}
    assert not superseded & {BUILT_IN.fn.column(routine) for routine in called}
    required = {o.name for o in REQUIRED if isinstance(o, Function)}
    assert named and named - superseded <= required, sorted(named - superseded - required)
    assert not superseded & required


def test_every_required_column_is_in_the_schema_description() -> None:
    tables = _metadata_tables()
    for o in REQUIRED:
        if isinstance(o, Table) and o.columns:
            assert set(o.columns) <= set(tables[o.name].columns.keys()), o.name
