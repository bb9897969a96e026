"""A tick against a real PostgreSQL: outcomes, retries, order, hold-back, locks, options."""

from __future__ import annotations

import contextvars
import random
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from structlog.testing import capture_logs

from flagsched import tick
from flagsched.db import Database
from flagsched.model import Outcome, TickReport
from flagsched.sql import current

Sql = Callable[..., list[Any]]
Tick = Callable[..., TickReport]


@pytest.fixture
def database_url(shaped_database_url: str) -> str:
    """Every tick test on the built-in tables and on your own flags table (issue 18)."""
    return shaped_database_url


def wait_for_lock_wait(engine: Engine, timeout: float = 30) -> None:
    """Until a flagsched session waits for a lock (instead of guessing how long that takes)."""
    import time

    deadline = time.monotonic() + timeout
    with engine.connect() as conn:
        while time.monotonic() < deadline:
            waiting = conn.execute(
                sa.text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE application_name = 'flagsched' AND wait_event_type = 'Lock'"
                )
            ).scalar()
            conn.rollback()  # a fresh snapshot of pg_stat_activity next time
            if waiting:
                return
            time.sleep(0.01)
    raise AssertionError("no flagsched session waited for a lock")


def make_due(sql: Sql, schedule_id: int) -> None:
    """Move time: the retry is due now."""
    sql(
        "UPDATE feature_flag_schedules SET next_retry_at = now() - interval '1 second' "
        "WHERE id = :i",
        i=schedule_id,
    )


def test_first_attempt_success(
    run_tick: Tick, add_flag: Any, add_schedule: Any, schedule: Any, flag: Any
) -> None:
    add_flag("checkout")
    sid = add_schedule("checkout", {"enabled": True, "rollout_percentage": 25})
    with capture_logs() as logs:
        report = run_tick()
    assert report.count(Outcome.APPLIED) == 1
    assert flag("checkout") == (True, 25)
    row = schedule(sid)
    assert row["status"] == "applied" and row["applied_at"] is not None
    assert row["retry_count"] == 0 and row["next_retry_at"] is None and row["last_error"] is None
    applied = [e for e in logs if e["event"] == "schedule_applied"]
    assert applied == [
        {
            "event": "schedule_applied",
            "log_level": "info",
            "schedule_id": sid,
            "flag_key": "checkout",
            "retry_count": 0,
            "attempt": 1,
            "first_attempt": True,
        }
    ]
    finished = [e for e in logs if e["event"] == "tick_finished"]
    assert finished[0]["applied"] == 1 and "duration_seconds" in finished[0]


def test_flag_updated_at_moves(run_tick: Tick, add_flag: Any, add_schedule: Any, sql: Sql) -> None:
    add_flag("a")
    sql("UPDATE feature_flags SET updated_at = now() - interval '1 day'")
    add_schedule("a", {"enabled": True})
    run_tick()
    assert sql("SELECT updated_at > now() - interval '1 minute' FROM feature_flags")[0][0]


def test_transient_failure_then_success_on_retry(
    run_tick: Tick,
    add_flag: Any,
    add_schedule: Any,
    failing: Any,
    schedule: Any,
    flag: Any,
    sql: Sql,
) -> None:
    add_flag("f")
    sid = add_schedule("f", {"enabled": True})
    failing("f")
    with capture_logs() as logs:
        report = run_tick()
    assert report.count(Outcome.RETRY) == 1
    row = schedule(sid)
    assert row["status"] == "failed" and row["retry_count"] == 1
    assert "injected failure for f" in row["last_error"]
    assert timedelta(minutes=2) <= row["delay"] <= timedelta(minutes=2, seconds=30)
    event = next(e for e in logs if e["event"] == "schedule_retry_scheduled")
    assert event["retry_count"] == 1 and event["max_retries"] == 3
    assert event["next_retry_at"] == row["next_retry_at"] and "injected" in event["error"]
    assert flag("f") == (False, 0)

    assert run_tick().count(Outcome.APPLIED) == 0  # not due yet: left alone
    assert schedule(sid)["retry_count"] == 1

    failing("f", on=False)
    make_due(sql, sid)
    with capture_logs() as logs:
        assert run_tick().count(Outcome.APPLIED) == 1
    row = schedule(sid)
    assert row["status"] == "applied" and row["retry_count"] == 1
    assert row["next_retry_at"] is None and row["last_error"] is None
    event = next(e for e in logs if e["event"] == "schedule_applied")
    assert event["first_attempt"] is False and event["attempt"] == 2
    assert flag("f") == (True, 0)


def test_retries_exhausted_fail_for_good(
    run_tick: Tick, add_flag: Any, add_schedule: Any, failing: Any, schedule: Any, sql: Sql
) -> None:
    add_flag("f")
    sid = add_schedule("f", {"enabled": True}, max_retries=2)
    failing("f")
    delays = []
    for attempt in range(1, 4):
        report = run_tick()
        row = schedule(sid)
        assert row["retry_count"] == attempt
        if attempt < 3:
            assert report.count(Outcome.RETRY) == 1
            delays.append(row["delay"])
            make_due(sql, sid)
        else:
            assert report.count(Outcome.FAILED) == 1
            assert row["status"] == "failed" and row["next_retry_at"] is None
            assert "gave up after 3 attempts" in row["last_error"]
    assert timedelta(minutes=2) <= delays[0] <= timedelta(minutes=2, seconds=30)
    assert timedelta(minutes=4) <= delays[1] <= timedelta(minutes=4, seconds=30)
    assert run_tick().count(Outcome.APPLIED) == 0  # failed for good is never claimed
    assert schedule(sid)["retry_count"] == 3


def test_max_retries_zero_fails_for_good_at_once(
    run_tick: Tick, add_flag: Any, add_schedule: Any, failing: Any, schedule: Any
) -> None:
    add_flag("f")
    sid = add_schedule("f", {"enabled": True}, max_retries=0)
    failing("f")
    assert run_tick().count(Outcome.FAILED) == 1
    assert schedule(sid)["next_retry_at"] is None


@pytest.mark.not_app_schedules(
    "a schedule of a missing flag: an application's foreign key keeps it out"
)
def test_missing_flag_and_invalid_updates_fail_for_good_at_once(
    run_tick: Tick, add_flag: Any, add_schedule: Any, schedule: Any, flag: Any
) -> None:
    add_flag("real", rollout=10)
    missing = add_schedule("ghost", {"enabled": True})
    bad = [
        add_schedule("real", u)
        for u in ({"enabled": "yes"}, {"rollout_percentage": 12.5}, {}, {"colour": 1}, [1], "x")
    ]
    with capture_logs() as logs:
        report = run_tick()
    assert report.count(Outcome.FAILED) == 7
    assert schedule(missing)["last_error"] == "flag 'ghost' does not exist"
    for sid in [missing, *bad]:
        row = schedule(sid)
        assert (row["status"], row["retry_count"], row["next_retry_at"]) == ("failed", 1, None)
    assert "enabled must be true or false" in schedule(bad[0])["last_error"]
    assert "integer 0..100, got 12.5" in schedule(bad[1])["last_error"]
    assert flag("real") == (False, 10)
    failed = [e for e in logs if e["event"] == "schedule_failed"]
    assert {e["schedule_id"] for e in failed} == {missing, *bad}


def test_numbers_json_parsers_refuse_are_validated_not_fatal(
    run_tick: Tick, add_flag: Any, sql: Sql, schedule: Any, flag: Any
) -> None:
    """jsonb holds numbers a fast JSON parser refuses (1e400): the tick still runs."""
    add_flag("real", rollout=10)
    ids = [
        sql(
            "INSERT INTO feature_flag_schedules (flag_key, scheduled_at, updates) "
            "VALUES ('real', now() - interval '1 minute', CAST(:u AS jsonb)) RETURNING id",
            u=text,
        )[0][0]
        for text in ('{"rollout_percentage": 1e400}', '{"rollout_percentage": 1' + "0" * 30 + "}")
    ]
    assert run_tick().count(Outcome.FAILED) == 2
    for sid in ids:
        row = schedule(sid)
        assert row["status"] == "failed" and row["next_retry_at"] is None
        # named as the schedules table writes it (shape 3: the configuration's member)
        assert f"{current().members[1]} must be an integer 0..100" in row["last_error"]
    assert flag("real") == (False, 10)


def test_json_nested_too_deep_to_read_fails_its_row_not_the_tick(
    run_tick: Tick, database: Database, add_flag: Any, add_schedule: Any, sql: Sql, schedule: Any
) -> None:
    from flagsched import render, repository
    from flagsched.db import begin

    add_flag("real")
    deep = "[" * 3000 + "]" * 3000
    sid = sql(
        "INSERT INTO feature_flag_schedules (flag_key, scheduled_at, updates) "
        "VALUES ('real', now() - interval '2 minutes', CAST(:u AS jsonb)) RETURNING id",
        u='{"enabled": ' + deep + "}",
    )[0][0]
    fine = add_schedule("real", {"rollout_percentage": 40})
    report = run_tick()
    assert report.count(Outcome.FAILED) == 1 and report.count(Outcome.APPLIED) == 1
    assert schedule(fine)["status"] == "applied"
    assert "could not be read: nested too deeply" in schedule(sid)["last_error"]
    with begin(database) as conn:  # list-failed still shows it
        rows = repository.list_failed(conn, permanent=True, flag_key=None, limit=10)
    assert '"updates": "(unreadable JSON: nested too deeply)"' in render.to_json(rows)


def test_four_overdue_rollout_steps_land_in_one_run_in_order(
    run_tick: Tick, add_flag: Any, add_schedule: Any, flag: Any, sql: Sql, schedule: Any
) -> None:
    add_flag("ramp")
    ids = [
        add_schedule("ramp", {"rollout_percentage": pct}, at=f"now() - interval '{50 - i} minutes'")
        for i, pct in enumerate((10, 25, 50, 100))
    ]
    report = run_tick()
    assert report.count(Outcome.APPLIED) == 4 and report.batches == 1
    assert flag("ramp") == (False, 100)
    assert all(schedule(i)["status"] == "applied" for i in ids)


def test_order_is_scheduled_at_then_id_not_insertion(
    run_tick: Tick, add_flag: Any, add_schedule: Any, flag: Any
) -> None:
    add_flag("x")
    add_schedule("x", {"rollout_percentage": 90}, at="now() - interval '1 minute'")
    add_schedule("x", {"rollout_percentage": 10}, at="now() - interval '2 minutes'")
    run_tick()
    assert flag("x") == (False, 90)


def test_a_waiting_retry_holds_back_later_schedules_of_its_flag(
    run_tick: Tick,
    add_flag: Any,
    add_schedule: Any,
    failing: Any,
    schedule: Any,
    flag: Any,
    sql: Sql,
) -> None:
    add_flag("f")
    add_flag("other")
    first = add_schedule("f", {"rollout_percentage": 10}, at="now() - interval '3 minutes'")
    second = add_schedule("f", {"rollout_percentage": 20}, at="now() - interval '2 minutes'")
    third = add_schedule("f", {"rollout_percentage": 30}, at="now() - interval '1 minute'")
    other = add_schedule("other", {"enabled": True})
    failing("f")
    with capture_logs() as logs:
        report = run_tick()
    assert report.count(Outcome.RETRY) == 1 and report.count(Outcome.HELD_BACK) == 2
    assert schedule(other)["status"] == "applied"  # another flag is not held back
    for sid in (second, third):  # held back: left as they were, no retry spent
        row = schedule(sid)
        assert (row["status"], row["retry_count"], row["last_error"]) == ("pending", 0, None)
    held = [e["schedule_id"] for e in logs if e["event"] == "schedule_held_back"]
    assert sorted(held) == [second, third]

    # Later ticks do not claim them while the retry waits (a late retry must never undo
    # newer state), and do not spend their retries; they still report them held back.
    again = run_tick()
    assert again.count(Outcome.APPLIED) == 0 and again.count(Outcome.HELD_BACK) == 2
    assert flag("f") == (False, 0)
    for sid in (second, third):
        row = schedule(sid)
        assert (row["status"], row["retry_count"], row["last_error"]) == ("pending", 0, None)

    failing("f", on=False)
    make_due(sql, first)
    assert run_tick().count(Outcome.APPLIED) == 3  # retry first, then the rest in order
    assert flag("f") == (False, 30)


def test_a_schedule_failed_for_good_does_not_hold_back_later_ones(
    run_tick: Tick, add_flag: Any, add_schedule: Any, flag: Any, schedule: Any
) -> None:
    add_flag("f")
    bad = add_schedule("f", {"rollout_percentage": "ten"}, at="now() - interval '2 minutes'")
    add_schedule("f", {"rollout_percentage": 20})
    report = run_tick()
    assert report.count(Outcome.FAILED) == 1 and report.count(Outcome.APPLIED) == 1
    assert schedule(bad)["status"] == "failed" and flag("f") == (False, 20)


def test_exhausted_retry_lets_later_schedules_apply_in_the_same_tick(
    run_tick: Tick,
    add_flag: Any,
    add_schedule: Any,
    failing: Any,
    flag: Any,
    schedule: Any,
    sql: Sql,
) -> None:
    add_flag("f")
    first = add_schedule("f", {"enabled": True}, at="now() - interval '2 minutes'", max_retries=0)
    failing("f")
    run_tick()
    assert schedule(first)["status"] == "failed" and schedule(first)["next_retry_at"] is None
    failing("f", on=False)
    add_schedule("f", {"rollout_percentage": 40})
    assert run_tick().count(Outcome.APPLIED) == 1
    assert flag("f") == (False, 40)


def test_failure_isolation_one_failing_flag_among_many(
    run_tick: Tick, add_flag: Any, add_schedule: Any, failing: Any, schedule: Any, sql: Sql
) -> None:
    for i in range(20):
        add_flag(f"flag{i}")
        add_schedule(f"flag{i}", {"rollout_percentage": i})
    failing("flag7")
    report = run_tick()
    assert report.count(Outcome.APPLIED) == 19 and report.count(Outcome.RETRY) == 1
    rows = sql("SELECT key, rollout_percentage FROM feature_flags ORDER BY key")
    assert {k: r for k, r in rows} == {f"flag{i}": (0 if i == 7 else i) for i in range(20)}
    failed = sql(
        "SELECT retry_count, last_error FROM feature_flag_schedules WHERE flag_key = 'flag7'"
    )
    assert failed[0][0] == 1 and "injected failure for flag7" in failed[0][1]


def test_retries_are_claimed_before_new_schedules(
    database: Database,
    add_flag: Any,
    add_schedule: Any,
    failing: Any,
    sql: Sql,
    schedule: Any,
) -> None:
    add_flag("r")
    add_flag("n")
    retry = add_schedule("r", {"enabled": True}, at="now()")
    failing("r")
    tick.run(database, tick.TickOptions(batch_size=1), rng=random.Random(1))
    failing("r", on=False)
    add_schedule("n", {"enabled": True}, at="now() - interval '1 hour'")  # older, but new
    make_due(sql, retry)
    report = tick.run(database, tick.TickOptions(batch_size=1), rng=random.Random(1))
    assert report.count(Outcome.APPLIED) == 1
    assert schedule(retry)["status"] == "applied"


def test_flag_schedule_max_retries_overrides_and_is_written(
    database: Database,
    add_flag: Any,
    add_schedule: Any,
    failing: Any,
    schedule: Any,
    sql: Sql,
) -> None:
    add_flag("f")
    sid = add_schedule("f", {"enabled": True}, max_retries=5)
    failing("f")
    options = tick.TickOptions(max_retries_override=1)
    tick.run(database, options, rng=random.Random(1))
    assert schedule(sid)["max_retries"] == 1 and schedule(sid)["status"] == "failed"
    make_due(sql, sid)
    report = tick.run(database, options, rng=random.Random(1))
    assert report.count(Outcome.FAILED) == 1
    assert schedule(sid)["next_retry_at"] is None


def test_backoff_cap_comes_from_options(
    database: Database,
    add_flag: Any,
    add_schedule: Any,
    failing: Any,
    schedule: Any,
) -> None:
    add_flag("f")
    sid = add_schedule(
        "f",
        {"enabled": True},
        retry_count=6,
        max_retries=10,
        status="failed",
        next_retry_at="now() - interval '1 second'",
    )
    failing("f")
    tick.run(database, tick.TickOptions(retry_max_delay=60), rng=random.Random(1))
    assert timedelta(seconds=60) <= schedule(sid)["delay"] <= timedelta(seconds=90)


def test_a_flag_locked_by_the_application_retries_only_that_schedule(
    engine: Engine,
    run_tick: Tick,
    add_flag: Any,
    add_schedule: Any,
    schedule: Any,
    flag: Any,
    database_url: str,
) -> None:
    for key in ("locked", "free1", "free2"):
        add_flag(key)
    locked = add_schedule("locked", {"enabled": True})
    later = add_schedule("locked", {"rollout_percentage": 5}, at="now()")
    free = [add_schedule("free1", {"enabled": True}), add_schedule("free2", {"enabled": True})]
    holder = engine.connect()
    tx = holder.begin()
    holder.execute(sa.text("SELECT * FROM feature_flags WHERE key = 'locked' FOR UPDATE"))
    try:
        report = run_tick()  # the engine's lock_timeout is 1 s
    finally:
        tx.rollback()
        holder.close()
    assert report.count(Outcome.APPLIED) == 2 and report.count(Outcome.RETRY) == 1
    assert all(schedule(s)["status"] == "applied" for s in free)
    row = schedule(locked)
    assert row["status"] == "failed" and "lock" in row["last_error"]
    assert schedule(later)["status"] == "pending"
    assert flag("locked") == (False, 0)


@pytest.mark.parametrize("lock_timeout", [1.2, 5])
def test_each_held_flag_is_waited_for_in_its_own_statement(
    engine: Engine,
    database_url: str,
    add_flag: Any,
    add_schedule: Any,
    schedule: Any,
    flag: Any,
    lock_timeout: float,
) -> None:
    """A lock timeout, or a statement timeout while waiting (lock_timeout 5 s, statement
    timeout 2 s), fails only that flag's schedule (a retry); the rest of the batch commits."""
    for key in ("a", "b", "free"):
        add_flag(key)
    held = [add_schedule("a", {"enabled": True}), add_schedule("b", {"enabled": True})]
    free = add_schedule("free", {"enabled": True})
    holder = engine.connect()
    tx = holder.begin()
    holder.execute(sa.text("SELECT * FROM feature_flags WHERE key IN ('a', 'b') FOR UPDATE"))
    database = Database(database_url, lock_timeout=lock_timeout, statement_timeout=2)
    try:
        report = tick.run(database, tick.TickOptions(), rng=random.Random(1))
    finally:
        tx.rollback()
        holder.close()
    assert report.count(Outcome.APPLIED) == 1 and report.count(Outcome.RETRY) == 2
    assert schedule(free)["status"] == "applied" and flag("free") == (True, 0)
    which = "lock timeout" if lock_timeout < 2 else "statement timeout"
    for row in (schedule(s) for s in held):
        assert row["status"] == "failed" and row["retry_count"] == 1
        assert which in row["last_error"]


def test_a_free_flag_whose_write_outlasts_the_statement_timeout_is_a_retry(
    database_url: str,
    add_flag: Any,
    add_schedule: Any,
    failing: Any,
    schedule: Any,
    flag: Any,
    sql: Sql,
) -> None:
    """The batch's one statement fails as a whole: the tick redoes the batch flag by flag,
    and only the slow flag's schedule fails; the next tick is not stuck on it either."""
    add_flag("slow")
    add_flag("fine")
    slow = add_schedule("slow", {"enabled": True})
    fine = add_schedule("fine", {"enabled": True})
    failing("slow", sleep=5)
    database = Database(database_url, statement_timeout=1)
    report = tick.run(database, tick.TickOptions(), rng=random.Random(1))
    assert report.count(Outcome.APPLIED) == 1 and report.count(Outcome.RETRY) == 1
    assert schedule(fine)["status"] == "applied" and flag("fine") == (True, 0)
    row = schedule(slow)
    assert row["status"] == "failed" and "statement timeout" in row["last_error"]
    make_due(sql, slow)
    assert tick.run(database, tick.TickOptions(), rng=random.Random(1)).count(Outcome.RETRY) == 1
    assert schedule(slow)["retry_count"] == 2


def test_a_held_flag_whose_write_outlasts_the_statement_timeout_is_a_retry(
    engine: Engine,
    database_url: str,
    add_flag: Any,
    add_schedule: Any,
    failing: Any,
    schedule: Any,
    flag: Any,
) -> None:
    """A held flag's statement fails as a whole (its trigger sleeps past statement_timeout):
    its first change fails, its later one is held back, the other held flags (waited for
    in statements of their own) and the rest of the batch commit."""
    import threading

    for key in ("a", "slow", "z", "free"):
        add_flag(key)
    first = add_schedule("slow", {"enabled": True}, at="now() - interval '2 minutes'")
    later = add_schedule("slow", {"rollout_percentage": 5})
    others = [add_schedule(k, {"enabled": True}) for k in ("a", "z", "free")]
    failing("slow", sleep=5)
    holder = engine.connect()
    tx = holder.begin()
    holder.execute(sa.text("SELECT * FROM feature_flags WHERE key <> 'free' FOR UPDATE"))

    # Held at first, then free to write (slowly): released once the tick waits for it.
    def release() -> None:
        wait_for_lock_wait(engine)
        tx.rollback()

    releaser = threading.Thread(target=release)
    releaser.start()
    try:
        report = tick.run(
            Database(database_url, lock_timeout=1, statement_timeout=2),
            tick.TickOptions(),
            rng=random.Random(1),
        )
    finally:
        releaser.join()
        holder.close()
    assert report.count(Outcome.APPLIED) == 3 and report.count(Outcome.RETRY) == 1
    assert all(schedule(s)["status"] == "applied" for s in others)  # held, then written
    row = schedule(first)
    assert row["status"] == "failed" and "statement timeout" in row["last_error"]
    assert schedule(later)["status"] == "pending" and flag("slow") == (False, 0)


@pytest.mark.not_app_schedules("the application's foreign key deletes a flag's schedules with it")
def test_a_flag_deleted_after_the_claim_fails_for_good(
    run_tick: Tick,
    add_flag: Any,
    add_schedule: Any,
    schedule: Any,
    flag: Any,
    sql: Sql,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The flag exists when its schedule is claimed and is deleted (by another session,
    committed) before the tick writes: that schedule fails for good, the rest applies."""
    from flagsched import repository

    add_flag("gone")
    add_flag("real")
    doomed = add_schedule("gone", {"enabled": True})
    fine = add_schedule("real", {"enabled": True})
    real_claim = repository.claim

    def claim_then_delete(conn: Any, **options: Any) -> Any:
        claimed = real_claim(conn, **options)
        assert [c.flag_key for c in claimed[1]] == ["gone", "real"]
        sql("DELETE FROM feature_flags WHERE key = 'gone'")
        return claimed

    monkeypatch.setattr(repository, "claim", claim_then_delete)
    report = run_tick()
    assert report.count(Outcome.FAILED) == 1 and report.count(Outcome.APPLIED) == 1
    row = schedule(doomed)
    assert row["status"] == "failed" and row["next_retry_at"] is None
    assert row["last_error"] == "flag 'gone' does not exist"
    assert schedule(fine)["status"] == "applied" and flag("real") == (True, 0)


def test_hot_flag_drains_in_batches_of_the_batch_size(
    run_tick: Tick, add_flag: Any, sql: Sql, flag: Any
) -> None:
    add_flag("hot")
    sql("""INSERT INTO feature_flag_schedules (flag_key, scheduled_at, updates)
           SELECT 'hot', now() - interval '1 hour' + g * interval '1 second',
                  jsonb_build_object('rollout_percentage', g % 101)
           FROM generate_series(1, 500) AS g""")
    report = run_tick(batch_size=100, max_batches=50)
    assert report.count(Outcome.APPLIED) == 500
    assert report.batches == 6  # five full batches, then one that finds nothing due
    assert flag("hot") == (False, 500 % 101)


def test_max_batches_one_is_one_batch(run_tick: Tick, add_flag: Any, add_schedule: Any) -> None:
    add_flag("f")
    for _ in range(5):
        add_schedule("f", {"enabled": True})
    report = run_tick(batch_size=2)
    assert report.count(Outcome.APPLIED) == 2 and report.batches == 1


def test_future_and_other_states_are_not_claimed(
    run_tick: Tick, add_flag: Any, add_schedule: Any, schedule: Any
) -> None:
    add_flag("f")
    future = add_schedule("f", {"enabled": True}, at="now() + interval '1 hour'")
    cancelled = add_schedule("f", {"enabled": True}, status="cancelled")
    applied = add_schedule("f", {"enabled": True}, status="applied")
    waiting = add_schedule(
        "f",
        {"enabled": True},
        status="failed",
        retry_count=1,
        next_retry_at="now() + interval '1 hour'",
    )
    report = run_tick()
    assert report.counts.total() == 0
    assert [schedule(s)["status"] for s in (future, cancelled, applied, waiting)] == [
        "pending",
        "cancelled",
        "applied",
        "failed",
    ]


@pytest.mark.not_app_schedules(
    "a schedule of a missing flag: an application's foreign key keeps it out"
)
def test_dry_run_changes_nothing(
    database: Database, add_flag: Any, add_schedule: Any, sql: Sql
) -> None:
    add_flag("a")
    add_schedule("a", {"enabled": True})
    add_schedule("ghost", {"enabled": True})
    add_schedule("a", {"enabled": "nope"})
    before = sql("SELECT * FROM feature_flag_schedules ORDER BY id") + sql(
        "SELECT * FROM feature_flags"
    )
    plan = tick.preview(database, tick.TickOptions())
    after = sql("SELECT * FROM feature_flag_schedules ORDER BY id") + sql(
        "SELECT * FROM feature_flags"
    )
    assert before == after
    what = sorted(p.would for p in plan)
    assert what[0] == "apply: on"
    assert any("does not exist" in w for w in what)
    assert any("enabled must be true or false" in w for w in what)


def test_concurrent_ticks_in_threads_apply_everything_once(
    database: Database, add_flag: Any, sql: Sql
) -> None:
    sql("INSERT INTO feature_flags (key) SELECT 'k' || g FROM generate_series(1, 50) g")
    sql("""INSERT INTO feature_flag_schedules (flag_key, scheduled_at, updates)
           SELECT 'k' || (g % 50 + 1), now() - interval '1 hour' + g * interval '1 ms',
                  jsonb_build_object('rollout_percentage', g / 50)
           FROM generate_series(0, 999) g""")
    reports: list[TickReport] = []

    def drain() -> None:
        reports.append(
            tick.run(
                database, tick.TickOptions(batch_size=20, max_batches=200), rng=random.Random(1)
            )
        )

    # each thread in a copy of this context: the table mapping of the test's shape
    threads = [
        threading.Thread(target=contextvars.copy_context().run, args=(drain,)) for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r.count(Outcome.APPLIED) for r in reports) == 1000
    assert sql("SELECT count(*) FROM feature_flag_schedules WHERE status = 'applied'")[0][0] == 1000
    assert sql("SELECT count(*) FROM feature_flags WHERE rollout_percentage = 19")[0][0] == 50


def test_a_schedule_held_back_in_several_batches_is_counted_and_logged_once(
    run_tick: Tick, engine: Engine, add_flag: Any, add_schedule: Any, schedule: Any
) -> None:
    """s1 is held by another session (as by a tick running at the same time), so its later
    s2 is held back in every batch of this tick, beside b's schedules that apply."""
    add_flag("a")
    add_flag("b")
    s1 = add_schedule("a", {"enabled": True}, at="now() - interval '3 hours'")
    s2 = add_schedule("a", {"rollout_percentage": 5}, at="now() - interval '2 hours'")
    for _ in range(4):
        add_schedule("b", {"enabled": True})
    with engine.connect() as holder:
        holder.execute(
            sa.text("SELECT 1 FROM feature_flag_schedules WHERE id = :i FOR UPDATE"), {"i": s1}
        )
        with capture_logs() as logs:
            report = run_tick(batch_size=2, max_batches=10)
        holder.rollback()
    assert report.batches >= 4 and report.count(Outcome.APPLIED) == 4
    assert report.count(Outcome.HELD_BACK) == 1
    held = [e for e in logs if e["event"] == "schedule_held_back"]
    assert [e["schedule_id"] for e in held] == [s2]
    finished = [e for e in logs if e["event"] == "tick_finished"]
    assert finished[0]["held_back"] == 1
    assert schedule(s2)["status"] == "pending"


@pytest.mark.not_app_schedules(
    "there every read of the schedules reads the flags table too, which it holds locked"
)
def test_dry_run_locks_nothing_a_running_tick_would_skip(
    database_url: str, engine: Engine, add_flag: Any, add_schedule: Any
) -> None:
    """While a --dry-run is in the middle of its preview, a tick's claim (FOR UPDATE SKIP
    LOCKED) still sees every due schedule, and the preview holds no row-locking lock."""
    add_flag("a")
    due = sorted(add_schedule("a", {"rollout_percentage": n}) for n in (1, 2, 3))
    database = Database(database_url, lock_timeout=30)
    holder = engine.connect()
    holder.execute(sa.text("LOCK TABLE feature_flags IN ACCESS EXCLUSIVE MODE"))
    plans: list[Any] = []
    previewing = threading.Thread(
        target=contextvars.copy_context().run,
        args=(lambda: plans.append(tick.preview(database, tick.TickOptions())),),
    )
    previewing.start()  # it claims, then waits on feature_flags (it reads which flags exist)
    try:
        wait_for_lock_wait(engine)
        with engine.connect() as other:
            locks = other.execute(
                sa.text(
                    "SELECT l.mode FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
                    "WHERE a.application_name = 'flagsched' AND l.granted "
                    "AND l.relation = 'feature_flag_schedules'::regclass"
                )
            ).scalars()
            assert set(locks) <= {"AccessShareLock"}
            seen = other.execute(
                sa.text("SELECT id FROM feature_flag_schedules ORDER BY id FOR UPDATE SKIP LOCKED")
            ).scalars()
            assert list(seen) == due
            other.rollback()
    finally:
        holder.rollback()
        holder.close()
        previewing.join()
    assert [p.id for p in plans[0]] == due
