"""The claim on an application's schedules table (issue 18, shape 3) maps first the flags held
by a schedule that cannot move (stored/claim_guard.sql), so a due row behind one is held back
without reading its flag's rows again: it claims exactly what the frozen claim (the same
template without the map) claims, row for row, on the same rows as test_held_back's report."""

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


@pytest.fixture
def frozen_claim(database_url: str) -> Iterator[str]:
    """The claim as the frozen template has it (no map), beside the deployment's own."""
    tables = statements.current()
    names = tuple((k, FROZEN if k == "claim" else v) for k, v in tables.fn.columns)
    frozen = replace(tables, fn=TableMap("", names, tables.fn.schema))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stored, "_APP_SCHEDULES_FRAGMENTS", {})
        text = stored.render("claim", frozen)
    assert "v_blockers" not in text
    assert "v_blockers" in stored.render("claim", tables)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(text.encode())
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
