"""The record and the safety checks on a real PostgreSQL: history by any writer, attempts,
conflicts, lateness, change notices."""

from __future__ import annotations

import contextvars
import json
import random
import threading
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from structlog.testing import capture_logs

from flagsched import operators, tick
from flagsched.db import Database
from flagsched.model import Outcome, TickReport

Sql = Callable[..., list[Any]]
Tick = Callable[..., TickReport]


def changes(sql: Sql, key: str, *, updates_only: bool = True) -> list[dict[str, Any]]:
    """The flag's history rows, oldest first (by default without the INSERT that made it)."""
    rows = sql(
        "SELECT actor, old_enabled, old_rollout_percentage, new_enabled, "
        "new_rollout_percentage, to_jsonb(schedule_ids) AS schedule_ids FROM feature_flag_changes "
        "WHERE flag_key = :k AND (old_enabled IS NOT NULL OR NOT :u) ORDER BY id",
        k=key,
        u=updates_only,
    )
    return [dict(r._mapping) for r in rows]


def as_app(database_url: str, statement: str, app: str = "checkout-api") -> None:
    """A write by an application: its own login session, with an application_name."""
    with psycopg.connect(database_url, autocommit=True, application_name=app) as conn:
        conn.execute(statement)


def test_history_records_insert_update_delete_by_any_writer(database_url: str, sql: Sql) -> None:
    user = sql("SELECT current_user")[0][0]
    as_app(database_url, "INSERT INTO feature_flags (key) VALUES ('x')")
    as_app(database_url, "UPDATE feature_flags SET rollout_percentage = 30 WHERE key = 'x'")
    as_app(database_url, "UPDATE feature_flags SET updated_at = now() WHERE key = 'x'")  # no change
    as_app(database_url, "UPDATE feature_flags SET key = key WHERE key = 'x'")  # no change
    as_app(database_url, "DELETE FROM feature_flags WHERE key = 'x'", app="")
    assert changes(sql, "x", updates_only=False) == [
        {
            "actor": f"{user} (checkout-api)",
            "old_enabled": None,
            "old_rollout_percentage": None,
            "new_enabled": False,
            "new_rollout_percentage": 0,
            "schedule_ids": [],
        },
        {
            "actor": f"{user} (checkout-api)",
            "old_enabled": False,
            "old_rollout_percentage": 0,
            "new_enabled": False,
            "new_rollout_percentage": 30,
            "schedule_ids": [],
        },
        {
            "actor": user,  # no application_name
            "old_enabled": False,
            "old_rollout_percentage": 30,
            "new_enabled": None,
            "new_rollout_percentage": None,
            "schedule_ids": [],
        },
    ]


def test_a_folded_tick_write_is_one_history_row_naming_its_schedules_in_order(
    run_tick: Tick, add_flag: Any, add_schedule: Any, sql: Sql
) -> None:
    add_flag("ramp")
    steps = [
        add_schedule("ramp", {"rollout_percentage": p}, at=f"now() - interval '{10 - i} minutes'")
        for i, p in enumerate((10, 25, 50, 100))
    ]
    report = run_tick()
    assert report.count(Outcome.APPLIED) == 4
    assert changes(sql, "ramp") == [
        {
            "actor": "flagsched",
            "old_enabled": False,
            "old_rollout_percentage": 0,
            "new_enabled": False,
            "new_rollout_percentage": 100,
            "schedule_ids": steps,
        }
    ]


def test_an_application_change_puts_a_later_schedule_in_conflict(
    database_url: str,
    add_flag: Any,
    add_schedule: Any,
    flagsched: Any,
    schedule: Any,
    flag: Any,
) -> None:
    add_flag("checkout")
    sid = add_schedule("checkout", {"enabled": True})
    as_app(database_url, "UPDATE feature_flags SET rollout_percentage = 5 WHERE key = 'checkout'")
    preview = flagsched("process", "--dry-run")
    assert preview.code == 0 and "fail for good: conflict:" in preview.stdout
    ran = flagsched("process")
    assert ran.code == 1, ran.stderr
    row = schedule(sid)
    assert row["status"] == "failed" and row["next_retry_at"] is None
    assert row["last_error"].startswith("conflict:") and "(checkout-api)" in row["last_error"]
    assert flag("checkout") == (False, 5)  # untouched
    # `retry` is the review: the window restarts, and now it applies.
    assert flagsched("retry", str(sid)).code == 0
    assert flagsched("process").code == 0
    assert schedule(sid)["status"] == "applied" and flag("checkout") == (True, 5)


def test_on_conflict_apply_applies_anyway(
    database_url: str, run_tick: Tick, add_flag: Any, sql: Sql, schedule: Any, flag: Any
) -> None:
    add_flag("k")
    sid = sql(
        "INSERT INTO feature_flag_schedules (flag_key, scheduled_at, updates, on_conflict) "
        "VALUES ('k', now(), '{\"enabled\": true}', 'apply') RETURNING id"
    )[0][0]
    as_app(database_url, "UPDATE feature_flags SET rollout_percentage = 7 WHERE key = 'k'")
    assert run_tick().count(Outcome.APPLIED) == 1
    assert schedule(sid)["status"] == "applied" and flag("k") == (True, 7)


def test_a_ramp_applied_over_several_ticks_never_conflicts_with_itself(
    run_tick: Tick, add_flag: Any, add_schedule: Any, sql: Sql, flag: Any
) -> None:
    add_flag("ramp")
    ids = [
        add_schedule("ramp", {"rollout_percentage": p}, at="now() + interval '1 hour'")
        for p in (10, 25, 50, 100)
    ]
    for sid in ids:  # one step per tick: each later step sees the earlier ones' writes
        sql("UPDATE feature_flag_schedules SET scheduled_at = now() WHERE id = :i", i=sid)
        assert run_tick(batch_size=1).count(Outcome.APPLIED) == 1
    assert flag("ramp") == (False, 100)
    assert [c["schedule_ids"] for c in changes(sql, "ramp")] == [[i] for i in ids]


def test_expired_by_expires_at_and_by_max_lateness(
    run_tick: Tick, add_flag: Any, add_schedule: Any, sql: Sql, schedule: Any, flag: Any
) -> None:
    add_flag("k")
    expired = add_schedule("k", {"enabled": True}, at="now() - interval '2 hours'")
    sql(
        "UPDATE feature_flag_schedules SET expires_at = now() - interval '1 hour' WHERE id = :i",
        i=expired,
    )
    late = add_schedule("k", {"rollout_percentage": 40}, at="now() - interval '90 minutes'")
    fresh = add_schedule("k", {"rollout_percentage": 60}, at="now() - interval '1 minute'")
    report = run_tick(max_lateness=3600)
    assert report.count(Outcome.FAILED) == 2 and report.count(Outcome.APPLIED) == 1
    first, second = schedule(expired), schedule(late)
    assert first["last_error"].startswith("expired: 01:00:") and "expires_at" in first["last_error"]
    assert second["last_error"].startswith("expired: 01:30:")
    assert "maximum lateness of 01:00:00" in second["last_error"]
    assert schedule(fresh)["status"] == "applied"
    assert flag("k") == (False, 60)  # expired ones never touched it, nor held it back


def test_a_retry_that_comes_too_late_expires_and_retry_restarts_the_window(
    database: Database,
    run_tick: Tick,
    add_flag: Any,
    add_schedule: Any,
    sql: Sql,
    schedule: Any,
) -> None:
    add_flag("k")
    sid = add_schedule(
        "k",
        {"enabled": True},
        at="now() - interval '2 hours'",
        status="failed",
        retry_count=1,
        next_retry_at="now() - interval '1 second'",
    )
    report = run_tick(max_lateness=600)
    assert report.count(Outcome.FAILED) == 1
    assert schedule(sid)["last_error"].startswith("expired:")
    (done,) = operators.retry(database, [sid])
    assert done.ok
    assert schedule(sid)["reviewed_at"] is not None
    assert run_tick(max_lateness=600).count(Outcome.APPLIED) == 1


def test_attempts_are_kept_retry_retry_success(
    run_tick: Tick,
    add_flag: Any,
    add_schedule: Any,
    failing: Any,
    sql: Sql,
    flagsched: Any,
) -> None:
    add_flag("k")
    sid = add_schedule("k", {"enabled": True})
    failing("k")
    for _ in range(2):
        assert run_tick().count(Outcome.RETRY) == 1
        sql(
            "UPDATE feature_flag_schedules SET next_retry_at = now() - interval '1 s' "
            "WHERE id = :i",
            i=sid,
        )
    failing("k", on=False)
    assert run_tick().count(Outcome.APPLIED) == 1
    shown = flagsched("show", str(sid), "--format", "json")
    assert shown.code == 0, shown.stderr
    data = json.loads(shown.stdout)
    assert [(a["attempt"], a["outcome"]) for a in data["attempts"]] == [
        (1, "retry"),
        (2, "retry"),
        (3, "applied"),
    ]
    assert "injected failure" in data["attempts"][0]["error"]
    assert data["attempts"][2]["error"] is None
    assert [c["schedule_ids"] for c in data["changes"]] == [[sid]]
    assert data["changes"][0]["new"] == {"enabled": True, "rollout_percentage": 0}
    for key in ("id", "flag_key", "status", "retry_count", "group_id", "expires_at"):
        assert key in data
    assert data["on_conflict"] == "fail" and data["permanent"] is False
    table = flagsched("show", str(sid))
    assert table.code == 0 and "injected failure" in table.stdout and "flagsched" in table.stdout
    missing = flagsched("show", "999999")
    assert missing.code == 1 and missing.stderr.count("\n") == 1


def test_history_command_in_both_formats(
    database_url: str, run_tick: Tick, add_flag: Any, add_schedule: Any, flagsched: Any
) -> None:
    add_flag("a")
    add_flag("b")
    sid = add_schedule("a", {"enabled": True, "rollout_percentage": 20})
    run_tick()
    as_app(database_url, "UPDATE feature_flags SET enabled = true WHERE key = 'b'")
    everything = json.loads(flagsched("history", "--format", "json").stdout)
    assert [e["flag_key"] for e in everything][:2] == ["b", "a"]  # newest first
    (a_change,) = json.loads(flagsched("history", "a", "--format", "json").stdout)[:1]
    assert a_change["actor"] == "flagsched" and a_change["schedule_ids"] == [sid]
    assert a_change["old"] == {"enabled": False, "rollout_percentage": 0}
    assert a_change["new"] == {"enabled": True, "rollout_percentage": 20}
    assert a_change["changed_at"].endswith("Z")
    inserted = json.loads(flagsched("history", "b", "--format", "json").stdout)[-1]
    assert inserted["old"] is None
    assert json.loads(flagsched("history", "--since", "now", "--format", "json").stdout) == []
    assert len(json.loads(flagsched("history", "--limit", "1", "--format", "json").stdout)) == 1
    table = flagsched("history", "a")
    assert table.code == 0 and "off 0%" in table.stdout and "on 20%" in table.stdout
    assert flagsched("history", "nothing-here").stdout.strip() == "no changes recorded"


@pytest.mark.not_app_schedules(
    "a schedule of a missing flag: an application's foreign key keeps it out"
)
def test_each_committed_batch_that_changed_flags_notifies_once(
    database_url: str, run_tick: Tick, add_flag: Any, add_schedule: Any
) -> None:
    add_flag("a")
    add_flag("b")
    add_schedule("a", {"enabled": True})
    add_schedule("b", {"enabled": True})
    add_schedule("ghost", {"enabled": True})  # fails: not in the notice
    with psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute("LISTEN flagsched_flag_changes")
        run_tick()
        run_tick()  # nothing due: no notice
        notices = list(listener.notifies(timeout=0.5))
    assert [json.loads(n.payload) for n in notices] == [{"flags": ["a", "b"]}]


def test_overlapping_ticks_write_each_change_once_in_history(
    database_url: str, add_flag: Any, sql: Sql
) -> None:
    sql("INSERT INTO feature_flags (key) SELECT 'f' || g FROM generate_series(1, 40) g")
    sql(
        "INSERT INTO feature_flag_schedules (flag_key, scheduled_at, updates) "
        "SELECT 'f' || (g % 40 + 1), now() - make_interval(secs => g), "
        "jsonb_build_object('rollout_percentage', g % 101) FROM generate_series(1, 600) g"
    )

    def drain() -> None:
        tick.run(
            Database(database_url),
            tick.TickOptions(batch_size=25, max_batches=50),
            rng=random.Random(),
        )

    # each thread in a copy of this context: the test's table mapping (its shape)
    threads = [
        threading.Thread(target=contextvars.copy_context().run, args=(drain,)) for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = [
        i for (row,) in sql("SELECT to_jsonb(schedule_ids) FROM feature_flag_changes") for i in row
    ]
    applied = sql("SELECT count(*) FROM feature_flag_schedules WHERE status = 'applied'")[0][0]
    assert applied == 600
    # Every applied schedule named once in history, or not at all when its write changed
    # nothing (the same value again); never twice.
    assert len(ids) == len(set(ids)) and set(ids) <= set(range(1, 601))


@pytest.mark.parametrize("history_too", [False, True])
def test_prune_history(
    run_tick: Tick, add_flag: Any, add_schedule: Any, sql: Sql, flagsched: Any, history_too: bool
) -> None:
    add_flag("k")
    add_schedule("k", {"enabled": True})
    run_tick()
    sql("UPDATE feature_flag_changes SET changed_at = now() - interval '40 days'")
    sql("UPDATE feature_flag_schedules SET applied_at = now() - interval '40 days'")
    args = ["prune", "--older-than", "30"] + (["--history"] if history_too else [])
    ran = flagsched(*args)
    assert ran.code == 0, ran.stderr
    left = sql("SELECT count(*) FROM feature_flag_changes")[0][0]
    assert left == (0 if history_too else 2)  # the INSERT of the flag, and the tick's write
    assert sql("SELECT count(*) FROM feature_flag_schedules")[0][0] == 0


def test_held_back_logs_say_why(run_tick: Tick, add_flag: Any, add_schedule: Any) -> None:
    add_flag("k")
    add_schedule(
        "k",
        {"enabled": True},
        status="failed",
        retry_count=1,
        next_retry_at="now() + interval '1 hour'",
    )
    with capture_logs():
        assert run_tick().count(Outcome.APPLIED) == 0


def test_a_change_whose_transaction_began_before_the_schedule_still_conflicts(
    database_url: str, add_flag: Any, add_schedule: Any, run_tick: Tick, schedule: Any
) -> None:
    """A long application transaction: it starts, the schedule is created, then it updates
    the flag and commits. By its statement's time the change came after: a conflict."""
    add_flag("k")
    with psycopg.connect(database_url, application_name="slowapp") as app:
        app.execute("SELECT 1")  # its transaction (and its now()) starts here
        sid = add_schedule("k", {"rollout_percentage": 77}, at="now()")
        app.execute("UPDATE feature_flags SET rollout_percentage = 1 WHERE key = 'k'")
        app.commit()
    assert run_tick().count(Outcome.FAILED) == 1
    assert "(slowapp)" in schedule(sid)["last_error"]


@pytest.mark.not_app_schedules("the application's foreign key deletes a flag's schedules with it")
def test_deleting_and_recreating_the_flag_is_a_conflict_and_truncate_is_recorded(
    database_url: str, add_flag: Any, add_schedule: Any, run_tick: Tick, schedule: Any, sql: Sql
) -> None:
    add_flag("k")
    sid = add_schedule("k", {"enabled": True})
    as_app(database_url, "DELETE FROM feature_flags WHERE key = 'k'")
    as_app(database_url, "INSERT INTO feature_flags (key, rollout_percentage) VALUES ('k', 9)")
    assert run_tick().count(Outcome.FAILED) == 1
    assert schedule(sid)["last_error"].startswith("conflict:")
    sql("TRUNCATE feature_flags")
    last = changes(sql, "k", updates_only=False)[-1]
    assert (last["old_rollout_percentage"], last["new_enabled"]) == (9, None)


def test_times_an_application_wrote_in_the_future_cannot_switch_the_checks_off(
    database_url: str, add_flag: Any, add_schedule: Any, run_tick: Tick, sql: Sql
) -> None:
    add_flag("a")
    add_flag("b")
    late = add_schedule("a", {"enabled": True}, at="now() - interval '2 hours'")
    conflicted = add_schedule("b", {"enabled": True})
    sql("UPDATE feature_flag_schedules SET reviewed_at = 'infinity', created_at = 'infinity'")
    as_app(database_url, "UPDATE feature_flags SET rollout_percentage = 3 WHERE key = 'b'")
    assert run_tick(max_lateness=3600).count(Outcome.FAILED) == 2
    errors = dict(sql("SELECT id, last_error FROM feature_flag_schedules"))
    assert errors[late].startswith("expired:")
    assert errors[conflicted].startswith("conflict:")


def test_an_oversized_attempts_value_an_application_wrote_stops_nothing(
    run_tick: Tick, add_flag: Any, add_schedule: Any, sql: Sql, schedule: Any
) -> None:
    add_flag("a")
    add_flag("b")
    odd = add_schedule("a", {"enabled": True})
    fine = add_schedule("b", {"enabled": True})
    sql(
        "UPDATE feature_flag_schedules SET attempts = jsonb_build_array(repeat('x', 3000000)) "
        "WHERE id = :i",
        i=odd,
    )
    assert run_tick().count(Outcome.APPLIED) == 2
    assert [a["attempt"] for a in schedule(odd)["attempts"]] == [1]  # replaced, then kept
    assert schedule(fine)["status"] == "applied"


def test_the_log_counts_attempts_across_a_retry(
    database: Database,
    run_tick: Tick,
    add_flag: Any,
    add_schedule: Any,
    failing: Any,
    schedule: Any,
) -> None:
    add_flag("k")
    sid = add_schedule("k", {"enabled": True}, max_retries=0)
    failing("k")
    assert run_tick().count(Outcome.FAILED) == 1
    failing("k", on=False)
    assert operators.retry(database, [sid])[0].ok
    with capture_logs() as logs:
        run_tick()
    (applied,) = [e for e in logs if e["event"] == "schedule_applied"]
    assert (applied["attempt"], applied["first_attempt"], applied["retry_count"]) == (2, False, 0)
    assert [a["attempt"] for a in schedule(sid)["attempts"]] == [1, 2]


def test_show_has_lists_keys_and_reads_any_stored_time(
    run_tick: Tick, add_flag: Any, add_schedule: Any, flagsched: Any, sql: Sql
) -> None:
    add_flag("k")
    sid = add_schedule("k", {"enabled": True})
    run_tick()
    shown = json.loads(flagsched("show", str(sid), "--format", "json").stdout)
    listed = json.loads(flagsched("list", "--status", "applied", "--format", "json").stdout)
    assert set(shown) == set(listed[0]) | {"attempts", "changes"}
    sql("UPDATE feature_flag_changes SET changed_at = 'infinity'")
    sql("UPDATE feature_flag_schedules SET created_at = '0044-03-15 BC', expires_at = 'infinity'")
    for args in (["history"], ["history", "--since", "now"], ["show", str(sid)]):
        ran = flagsched(*args)
        assert ran.code == 0, (args, ran.stderr)
    assert "infinity" in flagsched("history").stdout


def test_retry_of_a_row_with_extreme_times_is_not_refused_as_busy(
    database: Database, add_flag: Any, add_schedule: Any, sql: Sql
) -> None:
    add_flag("k")
    sid = add_schedule("k", {"enabled": True}, status="failed", retry_count=1)
    sql(
        "UPDATE feature_flag_schedules SET scheduled_at = '4713-01-01 BC', "
        "expires_at = '294276-12-01+00' WHERE id = :i",
        i=sid,
    )
    (done,) = operators.retry(database, [sid], force=True)
    assert done.ok, done.message
    assert sql("SELECT status FROM feature_flag_schedules WHERE id = :i", i=sid)[0][0] == "pending"


@pytest.fixture
def database_url(shaped_database_url: str) -> str:
    """Every test here on the built-in tables and on your own flags table (issue 18)."""
    return shaped_database_url
