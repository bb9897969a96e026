"""`status`: the health check (--max-lag) reads index scans only; unknown statuses count."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest

from flagsched import operators, render
from flagsched.db import Database
from flagsched.sql import statement
from tests.conftest import _command_env

Sql = Callable[..., list[Any]]


def _nodes(plan: dict[str, Any]) -> list[str]:
    found = [str(plan["Node Type"])]
    for child in plan.get("Plans", []):
        found += _nodes(child)
    return found


@pytest.mark.not_app_schedules("it checks the plans against the built-in tables' own indexes")
def test_the_backlog_query_is_index_scans_only(database_url: str, sql: Sql) -> None:
    """With sequential scans priced out, the planner still finds an index path for every
    table access: the query has one (it does not need a pass over the table)."""
    sql("""INSERT INTO feature_flag_schedules (flag_key, scheduled_at, updates, status,
                                               retry_count, next_retry_at)
           SELECT 'k' || g % 10, now() - g * interval '1 minute', '{"enabled": true}',
                  (ARRAY['pending', 'failed', 'applied', 'cancelled'])[g % 4 + 1], g % 5,
                  CASE WHEN g % 4 = 1 THEN now() + (g - 500) * interval '1 minute' END
           FROM generate_series(1, 2000) g""")
    sql("ANALYZE feature_flag_schedules")
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("SET enable_seqscan = off")
        (plan,) = conn.execute(
            "EXPLAIN (FORMAT JSON) " + statement("backlog"), {"now": datetime.now(UTC)}
        ).fetchone()  # type: ignore[misc]
    nodes = _nodes(plan[0]["Plan"])
    assert "Seq Scan" not in nodes, nodes
    assert any("Index" in n for n in nodes), nodes


@pytest.mark.not_app_schedules(
    "a schedule of a missing flag: an application's foreign key keeps it out"
)
def test_max_lag_computes_only_what_the_health_check_needs(
    database: Database, add_schedule: Any
) -> None:
    add_schedule("a", {"enabled": True}, at="now() - interval '10 minutes'")
    add_schedule("a", {"enabled": True}, status="applied")
    full = operators.status(database)
    assert full.counts is not None
    assert full.counts.applied == 1 and full.counts.unknown == 0 and full.due == 1
    assert list(render.status_json(full)) == [  # the JSON keys, in the order shipped
        "due",
        "scheduled",
        "waiting_retry",
        "failed",
        "applied",
        "cancelled",
        "unknown",
        "awaiting_approval",
        "oldest_due_at",
        "oldest_due_age_seconds",
        "next_due_at",
        "now",
    ]
    check = operators.status(database, counts=False)
    assert check.counts is None
    assert set(render.status_json(check)) == {
        "due",
        "oldest_due_at",
        "oldest_due_age_seconds",
        "next_due_at",
        "now",
    }
    age = check.oldest_due_age_seconds
    assert check.due == 1 and age is not None and 590 < age < 700


@pytest.mark.not_app_schedules(
    "a schedule of a missing flag: an application's foreign key keeps it out"
)
def test_status_json_keys_with_and_without_max_lag(
    database_url: str, add_schedule: Any, monkeypatch: Any
) -> None:
    from click.testing import CliRunner

    from flagsched.cli import cli

    add_schedule("a", {"enabled": True}, status="weird")
    for name, value in _command_env(database_url, None).items():  # the shape's configuration
        monkeypatch.setenv(name, value)
    runner = CliRunner()
    full = runner.invoke(cli, ["status", "--format", "json"], standalone_mode=False)
    assert json.loads(full.output)["unknown"] == 1
    lag = runner.invoke(cli, ["status", "--format", "json", "--max-lag", "60"])
    assert lag.exit_code == 0 and "unknown" not in json.loads(lag.output)


@pytest.fixture
def database_url(shaped_database_url: str) -> str:
    """Every test here on the built-in tables and on your own flags table (issue 18)."""
    return shaped_database_url
