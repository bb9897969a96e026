"""The report of held-back schedules (migration 0010's flagsched_held_back_v3, rendered from
stored/held_back_once.sql): the rows 0009's flagsched_held_back_v2 reported, found in one
pass over the open rows instead of a probe of the flag's rows per due row, on the built-in
tables and both shapes of your own tables."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from psycopg import sql as pgsql

from flagsched import sql as statements

Sql = Callable[..., list[Any]]

# A schedule of a flag: its kind and when it is scheduled (minutes from now; a few values,
# so that rows of one flag share a scheduled_at and their ids decide their order).
#   due          pending, due
#   future       pending, not due yet (holds back only a retry scheduled after it)
#   retry        failed, its retry due
#   late_retry   failed, its retry due, itself scheduled in the future
#   waiting      failed, its retry still to come: holds the later ones back
#   untimed      failed, its retry after year 9999: due (the claim takes it as it is)
#   dead         failed for good: holds nothing back
#   applied, cancelled
#   awaiting     pending, due, awaiting approval: holds the later ones back (itself never)
#   expired      pending, due, awaiting approval past its expires_at: due again
#   awaiting_retry  failed, its retry due, awaiting approval
KINDS = (
    "due",
    "future",
    "retry",
    "late_retry",
    "waiting",
    "untimed",
    "dead",
    "applied",
    "cancelled",
    "awaiting",
    "expired",
    "awaiting_retry",
)
_SCHEDULED = {"future": (1, 5), "late_retry": (1, 5)}  # else (-5, -1): in the past

Row = tuple[str, int]  # kind, minutes from now


def _rows(draw: st.DrawFn) -> list[Row]:
    kinds = draw(st.lists(st.sampled_from(KINDS), min_size=1, max_size=6))
    rows = []
    for kind in kinds:
        low, high = _SCHEDULED.get(kind, (-5, -1))
        rows.append((kind, draw(st.integers(min_value=low, max_value=high))))
    return rows


_flags = st.lists(st.composite(_rows)(), min_size=1, max_size=5)


def _seed(sql: Sql, flags: list[list[Row]]) -> None:
    """One flag per list, its rows inserted in a shuffled order (ids are not time order)."""
    sql("DELETE FROM feature_flag_schedules")
    sql("DELETE FROM feature_flags")
    for f, rows in enumerate(flags):
        sql("INSERT INTO feature_flags (key) VALUES (:k)", k=f"f{f}")
        for kind, minutes in reversed(rows) if f % 2 else rows:
            status = {
                "due": "pending",
                "future": "pending",
                "awaiting": "pending",
                "expired": "pending",
                "applied": "applied",
                "cancelled": "cancelled",
            }.get(kind, "failed")
            next_retry = {
                "retry": "now() - interval '1 minute'",
                "late_retry": "now() - interval '1 minute'",
                "awaiting_retry": "now() - interval '1 minute'",
                "waiting": "now() + interval '1 hour'",
                "untimed": "'infinity'",
            }.get(kind, "NULL")
            expires = "now() - interval '1 second'" if kind == "expired" else "NULL"
            (made,) = sql(
                f"""INSERT INTO feature_flag_schedules
                    (flag_key, scheduled_at, updates, status, retry_count, next_retry_at,
                     expires_at)
                    VALUES (:k, now() + make_interval(mins => :m), CAST(:u AS jsonb), :s,
                            :rc, {next_retry}, {expires})
                    RETURNING id""",
                k=f"f{f}",
                m=minutes,
                u=json.dumps({"rollout_percentage": 10}),
                s=status,
                rc=4 if kind == "dead" else (1 if status == "failed" else 0),
            )
            if kind in ("awaiting", "expired", "awaiting_retry"):
                sql(
                    "UPDATE feature_flag_schedules SET awaiting_approval_since = now() "
                    "WHERE id = :i",
                    i=made[0],
                )
    # rows stored in another order than their ids': a new version of every other row
    sql(
        "UPDATE feature_flag_schedules SET updated_at = now() + interval '1 second' "
        "WHERE id % 2 = 0"
    )


def _report(database_url: str, routine: str, limit: int, lateness: float | None) -> list[Any]:
    """What the stored routine `routine` (by its logical name) of this mapping returns."""
    tables = statements.current()
    name = tables.fn.column(routine)
    schema = tables.fn.schema
    function = pgsql.Identifier(schema, name) if schema else pgsql.Identifier(name)
    query = pgsql.SQL(
        "SELECT * FROM {}(%(limit)s, CAST(%(scope)s AS jsonb), make_interval(secs => %(l)s))"
    ).format(function)
    with psycopg.connect(database_url) as conn:
        return conn.execute(
            query, {"limit": limit, "scope": tables.scope_parameter(), "l": lateness}
        ).fetchall()


# The cases of a property test over `_seed`'s rows: the rows, a batch's limit, a lateness.
def over_rows(test: Callable[..., None]) -> Callable[..., None]:
    return settings(
        max_examples=40,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )(
        given(
            flags=_flags,
            limit=st.sampled_from([1, 2, 1000]),
            lateness=st.sampled_from([None, 60.0, 86400.0]),
        )(test)
    )


@over_rows
@example(flags=[[("waiting", -5), ("due", -3), ("retry", -1)]], limit=1000, lateness=None)
@example(flags=[[("due", -3), ("awaiting", -3), ("due", -3)]], limit=1000, lateness=None)
@example(flags=[[("future", 2), ("late_retry", 3)]], limit=1000, lateness=None)
@example(flags=[[("dead", -5), ("expired", -4), ("due", -1)]], limit=1000, lateness=60.0)
def test_the_one_pass_report_is_the_per_row_probes_report(
    database_url: str, sql: Sql, flags: list[list[Row]], limit: int, lateness: float | None
) -> None:
    _seed(sql, flags)
    before = _report(database_url, "held_back", limit, lateness)
    assert _report(database_url, "held_back_once", limit, lateness) == before


@pytest.fixture
def database_url(shaped_database_url: str) -> str:
    """Every test here on the built-in tables and both shapes of your own tables."""
    return shaped_database_url
