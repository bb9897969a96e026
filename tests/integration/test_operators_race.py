"""Operator commands racing a tick that holds a schedule in an open transaction."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from flagsched import operators
from flagsched.db import Database

Sql = Callable[..., list[Any]]


def hold(engine: Engine, schedule_id: int) -> tuple[Any, Any]:
    """An open 'tick' transaction that has claimed the schedule."""
    conn = engine.connect()
    tx = conn.begin()
    conn.execute(
        sa.text("SELECT 1 FROM feature_flag_schedules WHERE id = :i FOR UPDATE"), {"i": schedule_id}
    )
    return conn, tx


def test_cancel_is_refused_while_a_tick_holds_the_schedule(
    database: Database, engine: Engine, add_flag: Any, add_schedule: Any, sql: Sql
) -> None:
    add_flag("a")
    sid = add_schedule("a", {"enabled": True})
    conn, tx = hold(engine, sid)
    try:
        result = operators.cancel(database, [sid])  # lock_timeout is 1 s here
    finally:
        tx.rollback()
        conn.close()
    assert not result[0].ok and "busy" in result[0].message
    assert sql("SELECT status FROM feature_flag_schedules")[0][0] == "pending"


@pytest.mark.parametrize(
    ("command", "status", "refusal"),
    [
        (operators.cancel, "pending", "already applied"),
        (operators.retry, "failed", "applied, not failed"),
    ],
)
def test_a_command_waits_for_the_tick_and_sees_its_outcome(
    database: Database,
    engine: Engine,
    add_flag: Any,
    add_schedule: Any,
    sql: Sql,
    command: Callable[[Database, list[int]], list[Any]],
    status: str,
    refusal: str,
) -> None:
    add_flag("a")
    sid = add_schedule(
        "a",
        {"enabled": True},
        status=status,
        retry_count=1,
        next_retry_at="now()" if status == "failed" else None,
    )
    conn, tx = hold(engine, sid)
    results: list[Any] = []
    worker = threading.Thread(target=lambda: results.extend(command(database, [sid])))
    worker.start()
    time.sleep(0.3)  # the command is now waiting for the tick's row lock
    conn.execute(
        sa.text("UPDATE feature_flag_schedules SET status = 'applied' WHERE id = :i"), {"i": sid}
    )
    tx.commit()
    conn.close()
    worker.join()
    assert not results[0].ok and refusal in results[0].message
    assert sql("SELECT status FROM feature_flag_schedules")[0][0] == "applied"
