"""The claim on an application's schedules table (issue 18, shape 3, stored/claim_guard.sql):
where that table has an index led by its flag reference and one led by scheduled_at, and the
newest due rows are of many flags, it maps first the flags held by a schedule that cannot
move, so a due row behind one is held back without reading its flag's rows again; where it
lacks either index, or the newest due rows are of few flags, a statement of its own maps
every flag's first open schedule and no probe decides a candidate. Either way it claims
exactly what the frozen claim (the same template without the maps) claims, row for row, on
the same rows as test_held_back's report."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import psycopg
import pytest
from hypothesis import example
from psycopg import sql as pgsql

from flagsched import sql as statements
from flagsched.sql import TableMap, stored
from tests.integration.test_held_back import Row, Sql, _seed, over_rows

FROZEN = "flagsched_claim_frozen_for_test"


@pytest.fixture
def database_url(shaped_database_url: str) -> str:
    return shaped_database_url


# The application's indexes the claim reads by: none (the tests' shape 3), or the two the first
# application has (the flag reference's and scheduled_at's).
INDEXES = {
    "no index": (),
    "two indexes": (
        "CREATE INDEX app_flag ON public.app_schedules (flag_id)",
        "CREATE INDEX app_at ON public.app_schedules (scheduled_at)",
    ),
}


@pytest.fixture(params=list(INDEXES))
def frozen_claim(request: pytest.FixtureRequest, database_url: str) -> Iterator[str]:
    """The claim as the frozen template has it (no map), beside the deployment's own."""
    tables = statements.current()
    names = tuple((k, FROZEN if k == "claim" else v) for k, v in tables.fn.columns)
    frozen = replace(tables, fn=TableMap("", names, tables.fn.schema))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stored, "_APP_SCHEDULES_FRAGMENTS", {})
        text = stored.render("claim", frozen)
    assert "v_blockers" not in text and "v_map" not in text
    assert "v_blockers" in stored.render("claim", tables)
    assert "v_map" in stored.render("claim", tables)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(text.encode())
        for index in INDEXES[request.param]:
            conn.execute(index.encode())
    yield FROZEN


def _claims(database_url: str, limit: int, lateness: float | None) -> tuple[Any, Any]:
    """What the deployment's claim and the frozen one return, in one transaction (one now())."""
    tables = statements.current()
    schema = tables.fn.schema
    assert schema is not None
    query = (
        "SELECT * FROM {}(%(limit)s, false, CAST(%(scope)s AS jsonb), make_interval(secs => %(l)s))"
    )
    params = {"limit": limit, "scope": tables.scope_parameter(), "l": lateness}
    with psycopg.connect(database_url) as conn:
        found = [
            conn.execute(pgsql.SQL(query).format(pgsql.Identifier(schema, name)), params).fetchall()
            for name in (tables.fn.column("claim"), FROZEN)
        ]
    return found[0], found[1]


@over_rows
@example(flags=[[("waiting", -5), ("due", -3), ("retry", -1)]], limit=1000, lateness=None)
@example(flags=[[("due", -5), ("waiting", -3), ("due", -1)]], limit=1000, lateness=None)
@example(flags=[[("awaiting", -3), ("due", -3), ("due", -3)]], limit=2, lateness=None)
@example(flags=[[("future", 2), ("late_retry", 3)]], limit=1000, lateness=None)
@example(flags=[[("dead", -5), ("expired", -4), ("due", -1)]], limit=1000, lateness=60.0)
# four due pending rows of one flag first in line, a batch of two: few leaders, the map
@example(flags=[[("due", -5), ("due", -4), ("due", -3), ("due", -2), ("retry", -1)]], limit=2,
         lateness=None)  # fmt: skip
@pytest.mark.parametrize("shaped_database_url", ["app-schedules"], indirect=True)
def test_the_guarded_claim_claims_what_the_frozen_claim_claims(
    database_url: str,
    sql: Sql,
    frozen_claim: str,
    flags: list[list[Row]],
    limit: int,
    lateness: float | None,
) -> None:
    _seed(sql, flags)
    guarded, frozen = _claims(database_url, limit, lateness)
    assert guarded == frozen


@pytest.mark.parametrize("shaped_database_url", ["app-schedules"], indirect=True)
def test_the_guarded_claim_orders_the_ends_of_time_and_ties_as_the_frozen_claim(
    database_url: str, sql: Sql, frozen_claim: str
) -> None:
    """Rows at -infinity and +infinity, and rows of one flag at one instant (their ids decide):
    the map's epochs order them as the probe's timestamps do."""
    sql("INSERT INTO feature_flags (key) VALUES ('a'), ('b'), ('c')")
    sql("""INSERT INTO feature_flag_schedules (flag_key, scheduled_at, updates, status,
                                               retry_count, next_retry_at)
           VALUES ('a', '-infinity', '{"enabled": true}', 'pending', 0, NULL),
                  ('a', '-infinity', '{"enabled": false}', 'pending', 0, NULL),
                  ('a', now() - interval '1 minute', '{"enabled": true}', 'pending', 0, NULL),
                  ('b', '-infinity', '{"enabled": true}', 'failed', 1, now() + interval '1 hour'),
                  ('b', '-infinity', '{"enabled": true}', 'pending', 0, NULL),
                  ('b', now() - interval '1 minute', '{"enabled": true}', 'failed', 1, now()),
                  ('c', now() - interval '1 minute', '{"enabled": true}', 'failed', 1, 'infinity'),
                  ('c', now() - interval '1 minute', '{"enabled": true}', 'pending', 0, NULL),
                  ('c', 'infinity', '{"enabled": true}', 'failed', 1, now())""")
    for limit in (1, 2, 3, 1000):
        guarded, frozen = _claims(database_url, limit, None)
        assert guarded == frozen
    # a's three in order; b's behind its first (a retry to come, first of the two at
    # -infinity by id); c's untimed retry and the two due behind it
    assert [row[2] for row in _claims(database_url, 1000, None)[0]] == ["a"] * 3 + ["c"] * 3
