"""The reads of `plan` and `agenda` on PostgreSQL: they walk the open schedules through the
partial indexes, never the applied history."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

from flagsched import operators, repository
from flagsched.db import Conn, Database, begin

Sql = Callable[..., list[Any]]


def _plans(conn: Conn, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The plans of every statement `outlook` sends through repository._rows."""
    plans: list[dict[str, Any]] = []

    def explain(c: Conn, factory: Any, sql: str, params: Any = None, **_: Any) -> list[Any]:
        row = c.execute("EXPLAIN (FORMAT JSON) " + sql, params).fetchone()
        assert row is not None
        plan = row[0] if not isinstance(row[0], str) else json.loads(row[0])
        plans.append(plan[0]["Plan"])
        return []

    monkeypatch.setattr(repository, "_rows", explain)
    return plans


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    found, stack = [], [plan]
    while stack:
        node = stack.pop()
        found.append(node)
        stack.extend(node.get("Plans", []))
    return found


@pytest.mark.not_app_schedules("it checks the plans against the built-in tables' own indexes")
def test_the_reads_use_the_open_indexes_beside_many_applied_schedules(
    database: Database, sql: Sql, monkeypatch: pytest.MonkeyPatch
) -> None:
    sql("INSERT INTO feature_flags (key) SELECT 'flag-' || g FROM generate_series(1, 200) g")
    sql(
        """
        INSERT INTO feature_flag_schedules (flag_key, scheduled_at, updates, status, applied_at)
        SELECT 'flag-' || (g % 200), now() - g * interval '1 minute', '{"enabled": true}',
               'applied', now()
        FROM generate_series(1, 50000) g
        """
    )
    sql(
        """
        INSERT INTO feature_flag_schedules (flag_key, scheduled_at, updates)
        SELECT 'flag-' || (g % 200), now() + g * interval '1 minute', '{"enabled": true}'
        FROM generate_series(1, 100) g
        """
    )
    sql("ANALYZE feature_flag_schedules")
    with begin(database) as conn:
        plans = _plans(conn, monkeypatch)
        now = repository.db_now(conn)
        until = now + timedelta(days=7)
        repository.schedules_ahead(conn, until=until)
        repository.schedules_ahead(conn, until=until, flag_key="flag-7")
        repository.failed_between(conn, start=now, end=until)
    assert len(plans) == 5  # schedules_ahead reads in two ranges
    for plan in plans:
        scans = [n for n in _nodes(plan) if n.get("Relation Name") == "feature_flag_schedules"]
        assert scans, plan
        assert all(n["Node Type"] in ("Index Scan", "Index Only Scan") for n in scans), plan
        assert {n["Index Name"] for n in scans} <= {
            "idx_schedules_open",
            "idx_schedules_flag_open",
            "idx_schedules_next_retry_at",
            # the conflict check (flagsched_check_v2) finds each open row again by its id
            "feature_flag_schedules_pkey",
        }
        history = [n for n in _nodes(plan) if n.get("Relation Name") == "feature_flag_changes"]
        assert all("Index" in n["Node Type"] for n in history), plan


def test_outlook_reads_in_one_read_only_transaction(
    database: Database, sql: Sql, add_flag: Callable[..., None], add_schedule: Callable[..., int]
) -> None:
    add_flag("f", enabled=True, rollout=10)
    sid = add_schedule("f", {"rollout_percentage": 60}, at="now() + interval '1 hour'")
    seen = operators.outlook(database, until=None, span=timedelta(hours=2), with_failed=True)
    assert seen.until - seen.now == timedelta(hours=2)
    [flag] = seen.flags
    assert [s.schedule_id for s in flag.steps] == [sid]
    assert flag.at.rollout_percentage == 60


@pytest.fixture
def database_url(shaped_database_url: str) -> str:
    """Every test here on the built-in tables and on your own flags table (issue 18)."""
    return shaped_database_url
