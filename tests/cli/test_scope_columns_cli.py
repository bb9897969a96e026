"""A scope naming other columns than flagsched's schema was first migrated with (found by the
adversarial pass: a scope column added to the configuration later could never be migrated;
`migrate` failed on the server's own error every time, `column c.region does not exist`,
on shape 3 `cannot change return type of existing function`). The decision
(docs/own-tables.md, "Changing a scope's columns"): `migrate` and `migrate --check` refuse
it in one line, exit 2, changing nothing, on both shapes and on every path; the documented
steps by hand change a scope's columns, keeping the schedules and the history. On the
first application's tables (tests/fixtures/upstream-schema.sql), to which it added a
`region` column."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.cli.test_adopted_flags_cli import (
    UPSTREAM_SCHEDULES,
    UPSTREAM_SHAPE,
    Deployment,
    Shape,
    _config,
    _deploy,
)
from tests.conftest import Ran, invoke
from tests.integration.test_least_privilege import docs_sql

OWN_TABLES_DOC = Path(__file__).resolve().parents[2] / "docs" / "own-tables.md"
OLD_SCOPE = 'scope = { environment = "production" }'
NEW_SCOPE = 'scope = { environment = "production", region = "eu" }'
by_shape = pytest.mark.parametrize(
    "shape", [UPSTREAM_SHAPE, UPSTREAM_SCHEDULES], ids=["own-schedules", "app-schedules"]
)


def _deployed(shape: Shape, url: str, tmp_path: Path) -> Deployment:
    """The first application's tables, their flags now with a `region` (the application
    added the column), flagsched migrated with the production scope by environment alone;
    the flag `checkout` in both environments."""
    d = _deploy(shape, url, tmp_path)
    d.sql("ALTER TABLE public.feature_flags ADD COLUMN region text NOT NULL DEFAULT 'eu'")
    d.add_flag("checkout")
    d.add_flag("checkout", scope="staging")
    return d


def _regional(d: Deployment, tmp_path: Path) -> Deployment:
    """The same deployment's file with `region` added to its scope."""
    text = Path(d.config).read_text()
    assert OLD_SCOPE in text
    path = tmp_path / "regional.toml"
    path.write_text(text.replace(OLD_SCOPE, NEW_SCOPE))
    return Deployment(d.shape, d.url, str(path), d.scope, d.own)


def _catalog(url: str) -> list[Any]:
    """What a migrate could change in the application's schema and flagsched's: relations,
    columns, triggers, functions (with their results), the view's text, the comments."""
    queries = [
        "SELECT n.nspname, c.relname, c.relkind, obj_description(c.oid, 'pg_class') "
        "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname IN ('public', 'flagsched')",
        "SELECT attrelid::regclass::text, attname, atttypid::regtype::text FROM pg_attribute "
        "WHERE attrelid IN (SELECT oid FROM pg_class WHERE relnamespace IN "
        "('public'::regnamespace, 'flagsched'::regnamespace)) AND attnum > 0 "
        "AND NOT attisdropped",
        "SELECT tgrelid::regclass::text, tgname FROM pg_trigger WHERE NOT tgisinternal",
        "SELECT oid::regprocedure::text, pg_get_function_result(oid) FROM pg_proc "
        "WHERE pronamespace = 'flagsched'::regnamespace",
        "SELECT pg_get_viewdef(c.oid) FROM pg_class c "
        "WHERE c.relnamespace = 'flagsched'::regnamespace AND c.relkind = 'v'",
    ]
    with psycopg.connect(url) as conn:
        return [sorted(map(str, conn.execute(q).fetchall())) for q in queries]


def _refused(ran: Ran, said: str) -> None:
    assert ran.code == 2, ran
    assert ran.stderr.count("\n") == 1 and "Traceback" not in ran.stderr, ran.stderr
    assert said in ran.stderr and '"Changing a scope\'s columns"' in ran.stderr, ran.stderr


@by_shape
def test_a_scope_naming_a_column_flagscheds_tables_lack_is_refused_changing_nothing(
    empty_database_url: str, tmp_path: Path, shape: Shape
) -> None:
    """`region` added to the production deployment's scope: `migrate` and `migrate --check`
    refuse in one line, exit 2, naming the column and where to read what to do, and change
    nothing; again the same. The deployment's file as it was still migrates, and ticks."""
    d = _deployed(shape, empty_database_url, tmp_path)
    regional = _regional(d, tmp_path)
    before = _catalog(d.url)
    for command in (["migrate"], ["migrate", "--check"], ["migrate"]):
        _refused(regional.run(*command), "without the scope's column(s) region")
    assert _catalog(d.url) == before
    assert d.run("migrate").code == 0
    d.add_schedule("checkout", {"enabled": True})
    ticked = d.run("process")
    assert ticked.code == 0, ticked.stderr
    assert d.flag("checkout") == (True, 0)
    assert _catalog(d.url) == before


def test_every_path_to_the_views_function_of_another_scope_is_a_one_line_refusal(
    empty_database_url: str, tmp_path: Path
) -> None:
    """Shape 3: the function giving a schedule's flag returns the scope's columns, and CREATE
    OR REPLACE cannot change what a function returns. flagsched's tables given the new
    column by hand but its view left, then the view dropped as the message for another
    mapping used to advise (its function left): each `migrate` refuses in one line, exit 2,
    naming the columns it was made with, never the server's error. With the function
    dropped too (and the record triggers, as documented), it makes them for the new scope."""
    d = _deployed(UPSTREAM_SCHEDULES, empty_database_url, tmp_path)
    regional = _regional(d, tmp_path)
    d.sql(
        "ALTER TABLE flagsched.feature_flag_changes ADD COLUMN region text; "
        "ALTER TABLE flagsched.feature_flag_recurrences ADD COLUMN region text"
    )
    said = "made for another scope (its columns: environment; this configuration's: "
    _refused(regional.run("migrate"), said + "environment, region)")
    d.sql("DROP VIEW flagsched.feature_flag_schedules CASCADE")
    _refused(regional.run("migrate"), said + "environment, region)")
    # the scope's columns reordered are another scope too
    reordered = tmp_path / "reordered.toml"
    reordered.write_text(
        Path(d.config).read_text().replace(OLD_SCOPE, 'scope = { region = "eu", environment = '
                                           '"production" }')
    )  # fmt: skip
    ran = invoke("--config", str(reordered), "migrate", url=d.url)
    _refused(ran, said + "region, environment)")

    d.sql("DROP FUNCTION flagsched.flagsched_flag_of_v1 CASCADE")
    ran = regional.run("migrate")
    assert ran.code == 2 and ran.stderr.count("\n") == 1, ran
    assert "record triggers of another mapping" in ran.stderr
    _drop_record_triggers(d)
    migrated = regional.run("migrate")
    assert migrated.code == 0, migrated.stderr
    assert regional.run("migrate", "--check").code == 0


def _drop_record_triggers(d: Deployment) -> None:
    for (name,) in d.sql(
        "SELECT tgname FROM pg_trigger WHERE tgrelid = 'public.feature_flags'::regclass "
        "AND tgname LIKE 'flagsched\\_record\\_%'"
    ):
        d.sql(f'DROP TRIGGER "{name}" ON public.feature_flags')


@by_shape
def test_the_documented_steps_change_a_scopes_columns_keeping_schedules_and_history(
    empty_database_url: str, tmp_path: Path, shape: Shape
) -> None:
    """docs/own-tables.md's SQL for the shape, then `migrate` with the new file: a schedule
    made before applies after, in its new scope; the history made before is still seen; the
    other environment's flag is not touched; a second `migrate` has nothing to do."""
    d = _deployed(shape, empty_database_url, tmp_path)
    d.add_schedule("checkout", {"enabled": True})
    assert d.run("process").code == 0
    later = d.add_schedule("checkout", {"rollout_percentage": 30})
    regional = _regional(d, tmp_path)

    block = "scope-add-own-schedules" if shape is UPSTREAM_SHAPE else "scope-add-app-schedules"
    with psycopg.connect(d.url, autocommit=True) as conn:
        conn.execute(docs_sql(block, OWN_TABLES_DOC))
    migrated = regional.run("migrate")
    assert migrated.code == 0, migrated.stderr
    again = regional.run("migrate")
    assert json.loads(again.stderr.splitlines()[-1])["created"] == 0

    ticked = regional.run("process")
    assert ticked.code == 0, ticked.stderr
    assert d.flag("checkout") == (True, 30)
    assert d.flag("checkout", scope="staging") == (False, 0)
    assert str(d.schedule(later)["status"]) == "applied"
    history = json.loads(regional.run("history", "checkout", "--format", "json").stdout)
    news = [(h["new"]["enabled"], h["new"]["rollout_percentage"]) for h in history]
    assert news == [(True, 30), (True, 0), (False, 0)], history  # newest first: made, on, 30%
    listed = json.loads(regional.run("list", "--status", "applied", "--format", "json").stdout)
    assert [s["status"] for s in listed] == ["applied", "applied"]
    # the staging deployment's file names the same columns
    staging = _config(tmp_path, shape, "staging")
    Path(staging).write_text(
        Path(staging)
        .read_text()
        .replace(
            'scope = { environment = "staging" }',
            'scope = { environment = "staging", region = "eu" }',
        )
    )
    assert invoke("--config", staging, "migrate", url=d.url).code == 0
