"""Operator commands racing a tick that holds a schedule in an open transaction."""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from flagsched import operators
from flagsched.db import Database
from flagsched.model import Outcome
from flagsched.sql import statement as real_statement

Sql = Callable[..., list[Any]]


def hold(engine: Engine, schedule_id: int) -> tuple[Any, Any]:
    """An open 'tick' transaction that has claimed the schedule."""
    conn = engine.connect()
    tx = conn.begin()
    conn.execute(
        sa.text("SELECT 1 FROM feature_flag_schedules WHERE id = :i FOR UPDATE"), {"i": schedule_id}
    )
    return conn, tx


def wait_for_a_blocked_backend(sql: Sql) -> None:
    """Return once a session of this database waits for a lock that another holds (the
    command queued behind the tick); fail if none ever does: a command that never waits
    would otherwise pass unseen."""
    for _ in range(500):
        blocked = sql(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND cardinality(pg_blocking_pids(pid)) > 0"
        )[0][0]
        if blocked:
            return
        time.sleep(0.02)
    raise AssertionError("the command never waited for the tick's row lock")


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
    worker = threading.Thread(
        target=contextvars.copy_context().run,
        args=(lambda: results.extend(command(database, [sid])),),
    )
    worker.start()
    wait_for_a_blocked_backend(sql)  # the command is waiting for the tick's row lock
    conn.execute(
        sa.text("UPDATE feature_flag_schedules SET status = 'applied' WHERE id = :i"), {"i": sid}
    )
    tx.commit()
    conn.close()
    worker.join()
    assert not results[0].ok and refusal in results[0].message
    assert sql("SELECT status FROM feature_flag_schedules")[0][0] == "applied"


def _retry_during_a_slow_tick(
    database: Database,
    add_flag: Any,
    add_schedule: Any,
    sql: Sql,
    failing: Callable[..., None],
    run_tick: Callable[..., Any],
    *,
    lock_timeout: float,
) -> tuple[int, Any]:
    """s1 failed for good (rollout 10), s2 later and due (rollout 20); the tick is slow to
    write the flag, and `flagsched retry s1` runs while it holds s2 claimed."""
    add_flag("x")
    s1 = add_schedule(
        "x", {"rollout_percentage": 10}, status="failed", retry_count=4, at="now() - interval '2 h'"
    )
    add_schedule("x", {"rollout_percentage": 20}, at="now() - interval '1 hour'")
    failing("x", sleep=2)
    ticking = threading.Thread(target=contextvars.copy_context().run, args=(run_tick,))
    ticking.start()
    for _ in range(200):
        if sql("SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'")[0][0]:
            break
        time.sleep(0.02)
    else:
        raise AssertionError("the tick never reached the slow flag")
    waiting = Database(database.url, lock_timeout=lock_timeout)
    result = operators.retry(waiting, [s1])[0]
    ticking.join()
    return s1, result


@pytest.mark.parametrize(
    ("lock_timeout", "refusal"),
    [(10, "would undo newer state"), (0.2, "busy")],  # waited for the tick, or not long enough
)
def test_retry_counts_a_later_schedule_a_running_tick_has_claimed(
    database: Database,
    add_flag: Any,
    add_schedule: Any,
    sql: Sql,
    failing: Callable[..., None],
    run_tick: Callable[..., Any],
    lock_timeout: float,
    refusal: str,
) -> None:
    s1, result = _retry_during_a_slow_tick(
        database, add_flag, add_schedule, sql, failing, run_tick, lock_timeout=lock_timeout
    )
    assert not result.ok and refusal in result.message
    assert sql("SELECT status FROM feature_flag_schedules WHERE id = :i", i=s1)[0][0] == "failed"
    run_tick()  # the old value never lands on top of the newer one
    assert sql("SELECT rollout_percentage FROM feature_flags")[0][0] == 20


def test_a_schedule_made_open_while_the_claim_ran_holds_the_later_one_back(
    database: Database,
    add_flag: Any,
    add_schedule: Any,
    sql: Sql,
    run_tick: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`flagsched retry s1` committed after the claim's snapshot was taken but before the
    claim locked s2 (the retry had locked s2 itself, and released it at commit): the claim
    takes s2 as first of its flag, and s2 then s1 landed, the older change on top (an
    adversarial pass saw it in about 1 round in 40). The interleaving is made exact here: s1
    becomes pending (what the retry writes) right after the claim's statement, before the
    tick's next one. The tick holds s2 back; the next applies s1, then s2."""
    add_flag("x")
    s1 = add_schedule(
        "x", {"rollout_percentage": 10}, status="failed", retry_count=4, at="now() - interval '2 h'"
    )
    s2 = add_schedule("x", {"rollout_percentage": 20}, at="now() - interval '1 hour'")
    retried: list[str] = []

    def statement(name: str, **slots: Any) -> str:
        if name == "earlier_open_outside" and not retried:
            retried.append(name)
            sql("UPDATE feature_flag_schedules SET status = 'pending', retry_count = 0 "
                "WHERE id = :i", i=s1)  # fmt: skip
        return real_statement(name, **slots)

    monkeypatch.setattr("flagsched.repository.statement", statement)
    first = run_tick()
    assert retried, "the tick never asked again after its claim"
    assert (first.count(Outcome.APPLIED), first.count(Outcome.HELD_BACK)) == (0, 1)
    assert sql("SELECT status FROM feature_flag_schedules WHERE id = :i", i=s2)[0][0] == "pending"
    second = run_tick()
    assert second.count(Outcome.APPLIED) == 2
    assert sql("SELECT rollout_percentage FROM feature_flags")[0][0] == 20
    order = sql(
        "SELECT id FROM feature_flag_schedules WHERE status = 'applied' ORDER BY applied_at, id"
    )
    assert [r[0] for r in order] == [s1, s2]


def test_a_connection_ended_by_the_server_is_could_not_connect_and_names_no_url(
    database: Database, sql: Sql
) -> None:
    from flagsched.db import connection, connection_lost
    from flagsched.errors import DatabaseUnavailable

    with pytest.raises(DatabaseUnavailable) as caught, connection(database) as conn:
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()
        sql("SELECT pg_terminate_backend(:p)", p=pid[0] if pid else 0)
        conn.execute("SELECT 1")
    assert caught.value.message.startswith("could not connect to database ")
    assert "postgresql://" not in caught.value.message
    # Recognised by SQLSTATE and the connection's state: a statement that fails on a live
    # connection is not a lost connection, one the server ended is.
    raw = database.connect()
    try:
        with pytest.raises(psycopg.Error) as failed:
            raw.execute("SELECT 1/0")
        assert not connection_lost(failed.value, raw)
        sql("SELECT pg_terminate_backend(:p)", p=raw.info.backend_pid)
        with pytest.raises(psycopg.Error) as ended:
            raw.execute("SELECT 1")
        assert connection_lost(ended.value) and connection_lost(ended.value, raw)
    finally:
        raw.close()


def test_a_url_libpq_would_misread_never_reaches_a_connect_message() -> None:
    from flagsched.errors import DatabaseUnavailable

    with pytest.raises(DatabaseUnavailable) as caught:
        Database("postgresql://u:Pq/Zx@127.0.0.1:1/db").connect()
    assert "Pq" not in caught.value.message and "Zx" not in caught.value.message


@pytest.fixture
def database_url(shaped_database_url: str) -> str:
    """Every test here on the built-in tables and on your own flags table (issue 18)."""
    return shaped_database_url
