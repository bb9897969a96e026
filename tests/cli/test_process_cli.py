"""`flagsched process` and `list-failed` as real processes: overlap, signals, crashes, output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from tests.conftest import Ran, _command_env
from tests.integration.conftest import FAILURE_TRIGGER

Sql = Callable[..., list[Any]]

AUDIT = """
CREATE TABLE public.test_flag_audit (n bigserial PRIMARY KEY, key text, rollout integer);
CREATE TABLE public.test_applied_log (schedule_id bigint);
CREATE FUNCTION test_audit_flag() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO public.test_flag_audit (key, rollout)
    VALUES (NEW.key, NEW.rollout_percentage);
RETURN NEW; END $$;
CREATE TRIGGER test_audit_flag AFTER UPDATE ON feature_flags
    FOR EACH ROW EXECUTE FUNCTION test_audit_flag();
CREATE FUNCTION test_log_applied() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN IF NEW.status = 'applied' AND OLD.status <> 'applied' THEN
    INSERT INTO public.test_applied_log VALUES (NEW.id); END IF;
RETURN NEW; END $$;
-- on the table that holds the rows (an application's, behind flagsched's view, on shape 3)
DO $do$ BEGIN EXECUTE format(
    'CREATE TRIGGER test_log_applied AFTER UPDATE ON %s FOR EACH ROW '
    'EXECUTE FUNCTION test_log_applied()',
    coalesce(to_regclass('public.app_schedules'), 'feature_flag_schedules'::regclass));
END $do$;
"""


def spawn(url: str, *args: str, **settings: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLAGSCHED_")}
    env.update(_command_env(url, settings))  # with the configuration of the test's shape
    return subprocess.Popen(
        [sys.executable, "-m", "flagsched", "process", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def events(stderr: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stderr.split("\n") if line.startswith("{")]


@pytest.mark.not_app_schedules(
    "a schedule of a missing flag: an application's foreign key keeps it out"
)
def test_exit_codes_and_one_event_per_outcome(
    flagsched: Callable[..., Ran], add_flag: Any, add_schedule: Any
) -> None:
    add_flag("a")
    ok = add_schedule("a", {"enabled": True})
    ran = flagsched("process")
    assert ran.code == 0, ran.stderr
    names = [e["event"] for e in events(ran.stderr)]
    assert names == ["schedule_applied", "tick_finished"]
    assert events(ran.stderr)[0]["schedule_id"] == ok
    bad = add_schedule("ghost", {"enabled": True})
    ran = flagsched("process")
    assert ran.code == 1
    failed = events(ran.stderr)[0]
    assert (failed["event"], failed["schedule_id"], failed["level"]) == (
        "schedule_failed",
        bad,
        "error",
    )
    assert flagsched("process").code == 0  # nothing failed for good in this tick


def test_batch_size_flag_beats_the_variable(
    flagsched: Callable[..., Ran], add_flag: Any, add_schedule: Any
) -> None:
    add_flag("a")
    for _ in range(5):
        add_schedule("a", {"enabled": True})
    ran = flagsched("process", "--batch-size", "2", env={"FLAGSCHED_BATCH_SIZE": "4"})
    assert events(ran.stderr)[-1]["applied"] == 2
    ran = flagsched("process", env={"FLAGSCHED_BATCH_SIZE": "2"})
    assert events(ran.stderr)[-1]["applied"] == 2


@pytest.mark.not_app_schedules(
    "a schedule of a missing flag: an application's foreign key keeps it out"
)
def test_dry_run_shows_and_changes_nothing(
    flagsched: Callable[..., Ran], add_flag: Any, add_schedule: Any, sql: Sql
) -> None:
    add_flag("a")
    add_schedule("a", {"rollout_percentage": 30})
    add_schedule("ghost", {"enabled": True})
    before = sql("SELECT * FROM feature_flag_schedules ORDER BY id")
    ran = flagsched("process", "--dry-run")
    assert ran.code == 0
    assert "apply: rollout 30%" in ran.stdout
    assert "fail for good: flag 'ghost' does not exist" in ran.stdout
    assert sql("SELECT * FROM feature_flag_schedules ORDER BY id") == before
    empty = flagsched("process", "--dry-run", "--batch-size", "1")
    assert empty.code == 0


def test_bad_max_retries_variable_warns_and_is_ignored(flagsched: Callable[..., Ran]) -> None:
    ran = flagsched("process", env={"FLAG_SCHEDULE_MAX_RETRIES": "99"})
    assert ran.code == 0
    warning = events(ran.stderr)[0]
    assert (
        warning["event"] == "setting_ignored" and "FLAG_SCHEDULE_MAX_RETRIES" in warning["message"]
    )


def test_four_overlapping_processes_apply_each_schedule_once_in_order(
    database_url: str, sql: Sql
) -> None:
    sql(AUDIT)
    sql("INSERT INTO feature_flags (key) SELECT 'k' || g FROM generate_series(1, 300) g")
    sql("""INSERT INTO feature_flag_schedules (flag_key, scheduled_at, updates)
           SELECT 'k' || (g % 300 + 1), now() - interval '1 hour' + (g / 300) * interval '1 s',
                  jsonb_build_object('rollout_percentage', g / 300)
           FROM generate_series(0, 2999) g""")
    procs = [spawn(database_url, "--batch-size", "25", "--max-batches", "1000") for _ in range(4)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], [o[1][-500:] for o in outputs]
    applied = [
        sum(e.get("applied", 0) for e in events(err) if e["event"] == "tick_finished")
        for _, err in outputs
    ]
    assert sum(applied) == 3000
    assert sql("SELECT count(*), count(DISTINCT schedule_id) FROM test_applied_log")[0] == (
        3000,
        3000,
    )
    assert sql("SELECT count(*) FROM feature_flag_schedules WHERE status <> 'applied'")[0][0] == 0
    # Per flag, the values written only ever go up: no schedule applied out of order.
    regressions = sql("""SELECT count(*) FROM (
        SELECT rollout < lag(rollout) OVER (PARTITION BY key ORDER BY n) AS back
        FROM test_flag_audit) t WHERE back""")
    assert regressions[0][0] == 0
    assert sql("SELECT count(*) FROM feature_flags WHERE rollout_percentage = 9")[0][0] == 300


def _slow_setup(sql: Sql, add_flag: Any, add_schedule: Any) -> tuple[list[int], int]:
    """Fast flags due first, then one whose update sleeps 30 s inside the database."""
    sql(FAILURE_TRIGGER)
    fast = []
    for i in range(3):
        add_flag(f"fast{i}")
        fast.append(add_schedule(f"fast{i}", {"enabled": True}, at="now() - interval '2 hours'"))
    add_flag("slow")
    slow = add_schedule("slow", {"enabled": True}, at="now() - interval '1 hour'")
    sql("INSERT INTO test_failing_flags VALUES ('slow', 30)")
    return fast, slow


def _wait_until_sleeping(sql: Sql) -> None:
    for _ in range(200):
        if sql("SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'")[0][0]:
            return
        time.sleep(0.05)
    raise AssertionError("the tick never reached the slow flag")


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_stops_at_a_safe_point_and_commits_what_finished(
    database_url: str, sql: Sql, add_flag: Any, add_schedule: Any, signum: int, code: int
) -> None:
    fast, slow = _slow_setup(sql, add_flag, add_schedule)
    proc = spawn(database_url, "--batch-size", "3", "--max-batches", "10")
    _wait_until_sleeping(sql)
    sent = time.monotonic()
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=20)
    took = time.monotonic() - sent
    assert proc.returncode == code, err
    assert took < 5, f"stopping took {took:.1f}s while the database slept 30 s"
    statuses = dict(sql("SELECT id, status FROM feature_flag_schedules"))
    assert [statuses[i] for i in fast] == ["applied"] * 3
    assert statuses[slow] == "pending"  # untouched, no retry spent: due for the next tick
    assert sql("SELECT retry_count FROM feature_flag_schedules WHERE id = :i", i=slow)[0][0] == 0
    assert events(err)[-1]["event"] == "tick_finished" and events(err)[-1]["interrupted"] is True


def test_signal_while_waiting_for_a_held_flag_keeps_the_rest_of_its_batch(
    database_url: str, engine: Engine, sql: Sql, add_flag: Any, add_schedule: Any
) -> None:
    for key in ("held", "free1", "free2"):
        add_flag(key)
    held = add_schedule("held", {"enabled": True})
    free = [add_schedule(k, {"enabled": True}) for k in ("free1", "free2")]
    holder = engine.connect()
    tx = holder.begin()
    holder.execute(sa.text("SELECT * FROM feature_flags WHERE key = 'held' FOR UPDATE"))
    try:
        proc = spawn(database_url, FLAGSCHED_LOCK_TIMEOUT="30", FLAGSCHED_STATEMENT_TIMEOUT="120")
        waiting = (
            "FROM pg_stat_activity "
            "WHERE application_name = 'flagsched' AND wait_event_type = 'Lock'"
        )
        for _ in range(200):
            if sql(f"SELECT count(*) {waiting}")[0][0]:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the tick never waited for the held flag")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        tx.rollback()
        holder.close()
    assert proc.returncode == 143, err
    statuses = dict(sql("SELECT id, status FROM feature_flag_schedules"))
    assert [statuses[i] for i in free] == ["applied", "applied"]
    assert statuses[held] == "pending"  # not attempted: no retry spent
    assert sql("SELECT retry_count FROM feature_flag_schedules WHERE id = :i", i=held)[0][0] == 0
    finished = events(err)[-1]
    assert finished["event"] == "tick_finished" and finished["applied"] == 2


def test_sigkill_mid_tick_loses_nothing_and_applies_nothing_twice(
    database_url: str, sql: Sql, add_flag: Any, add_schedule: Any
) -> None:
    sql(AUDIT)
    fast, _slow = _slow_setup(sql, add_flag, add_schedule)
    for i in fast:  # all in one batch with the slow flag: the whole batch is in flight
        sql(
            "UPDATE feature_flag_schedules SET scheduled_at = now() - interval '1 hour' "
            "WHERE id = :i",
            i=i,
        )
    proc = spawn(database_url, "--batch-size", "10")
    _wait_until_sleeping(sql)
    proc.kill()
    proc.communicate(timeout=10)
    # The killed client's backend goes on sleeping; end it as a server restart would.
    others = "FROM pg_stat_activity WHERE wait_event = 'PgSleep' AND pid <> pg_backend_pid()"
    sql(f"SELECT pg_terminate_backend(pid) {others}")
    for _ in range(100):
        if not sql(f"SELECT count(*) {others}")[0][0]:
            break
        time.sleep(0.05)
    assert sql("SELECT count(*) FROM feature_flag_schedules WHERE status <> 'pending'")[0][0] == 0
    assert sql("SELECT count(*) FROM test_flag_audit")[0][0] == 0
    sql("DELETE FROM test_failing_flags")
    again = spawn(database_url)
    again.communicate(timeout=30)
    assert again.returncode == 0
    assert sql("SELECT count(*), count(DISTINCT schedule_id) FROM test_applied_log")[0] == (4, 4)


@pytest.mark.not_app_schedules(
    "a schedule of a missing flag: an application's foreign key keeps it out"
)
def test_list_failed_table_json_and_filters(
    flagsched: Callable[..., Ran], add_flag: Any, add_schedule: Any, sql: Sql
) -> None:
    empty = flagsched("list-failed")
    assert (empty.code, empty.stdout.strip()) == (0, "no failed schedules")
    assert json.loads(flagsched("list-failed", "--format", "json").stdout) == []
    add_flag("a")
    gone = add_schedule("ghost", {"enabled": True})
    waiting = add_schedule(
        "a",
        {"enabled": True},
        status="failed",
        retry_count=1,
        next_retry_at="now() + interval '5 minutes'",
    )
    sql(
        "UPDATE feature_flag_schedules SET last_error = 'boom', updated_at = now() + "
        "interval '1 second' WHERE id = :i",
        i=waiting,
    )
    assert flagsched("process").code == 1

    table = flagsched("list-failed")
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["ID", "FLAG", "SCHEDULED_AT", "ATTEMPTS", "RETRY", "LAST_ERROR"]
    assert lines[1].startswith(str(waiting)) and "retrying at 20" in lines[1] and "boom" in lines[1]
    assert lines[2].startswith(str(gone)) and "permanent" in lines[2]
    assert "flag 'ghost' does not exist" in lines[2]

    rows = json.loads(flagsched("list-failed", "--format", "json").stdout)
    assert [r["id"] for r in rows] == [waiting, gone]  # most recently failed first
    assert rows[0]["permanent"] is False and rows[1]["permanent"] is True
    assert rows[0]["next_retry_at"].endswith("Z") and rows[1]["next_retry_at"] is None
    assert rows[1]["updates"] == {"enabled": True} and rows[1]["retry_count"] == 1
    assert {
        "id",
        "flag_key",
        "scheduled_at",
        "updates",
        "status",
        "retry_count",
        "max_retries",
        "next_retry_at",
        "last_error",
        "permanent",
    } <= set(rows[0])

    def ids(*args: str) -> list[int]:
        return [
            r["id"] for r in json.loads(flagsched("list-failed", "--format", "json", *args).stdout)
        ]

    assert ids("--permanent") == [gone]
    assert ids("--retrying") == [waiting]
    assert ids("--flag", "a") == [waiting]
    assert ids("--limit", "1") == [waiting]
    both = flagsched("list-failed", "--permanent", "--retrying")
    assert both.code == 2 and "exclude each other" in both.stderr


STUCK_TRIGGER = """
CREATE FUNCTION test_stuck_flag() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.key = 'stuck' THEN
        LOOP  -- deaf to cancels (and to statement_timeout): only the end of its session stops it
            BEGIN PERFORM pg_sleep(0.2); EXCEPTION WHEN query_canceled THEN NULL; END;
        END LOOP;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER test_stuck_flag BEFORE UPDATE ON feature_flags
    FOR EACH ROW EXECUTE FUNCTION test_stuck_flag();
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_ends_a_stuck_tick_at_once_and_its_batch_rolls_back(
    database_url: str, sql: Sql, add_flag: Any, add_schedule: Any, signum: int
) -> None:
    sql(STUCK_TRIGGER)
    add_flag("stuck")
    stuck = add_schedule("stuck", {"enabled": True})
    proc = spawn(database_url)
    _wait_until_sleeping(sql)
    proc.send_signal(signum)
    time.sleep(1.5)
    assert proc.poll() is None, proc.communicate()  # the first signal asked; no safe point comes
    sent = time.monotonic()
    proc.send_signal(signum)
    proc.communicate(timeout=10)
    assert proc.returncode == -signum  # ended by the signal itself, as without a handler
    assert time.monotonic() - sent < 2
    others = (
        "FROM pg_stat_activity WHERE application_name = 'flagsched' AND pid <> pg_backend_pid()"
    )
    sql(f"SELECT pg_terminate_backend(pid) {others}")  # as the server does when the client is gone
    for _ in range(100):
        if not sql(f"SELECT count(*) {others}")[0][0]:
            break
        time.sleep(0.05)
    row = sql("SELECT status, retry_count FROM feature_flag_schedules WHERE id = :i", i=stuck)[0]
    assert tuple(row) == ("pending", 0)  # rolled back: due again, no retry spent
    assert sql("SELECT enabled FROM feature_flags")[0][0] is False


def test_every_command_is_found_by_its_name_and_a_tick_imports_only_its_own() -> None:
    """The group imports a command's module only when that command runs (cold start); every
    name it lists resolves to the command of that name."""
    import click

    from flagsched.cli import COMMANDS, cli

    ctx = click.Context(cli)
    assert cli.list_commands(ctx) == sorted(COMMANDS)
    for name in COMMANDS:
        command = cli.get_command(ctx, name)
        assert command is not None and command.name == name
    assert cli.get_command(ctx, "no-such-command") is None
    probe = (
        "import sys\n"
        "from flagsched.cli import run\n"
        "run(['process', '--help'])\n"
        "print(sorted(m for m in sys.modules if m.startswith(('flagsched.cli.', 'flagsched.rows',"
        " 'flagsched.tables', 'flagsched.ping', 'urllib.request'))))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLAGSCHED_")}
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True
    )
    loaded = done.stdout.strip().splitlines()[-1]
    assert loaded == "['flagsched.cli.app', 'flagsched.cli.params', 'flagsched.cli.tick']"


@pytest.fixture
def database_url(shaped_database_url: str) -> str:
    """Every test here on the built-in tables and on your own flags table (issue 18)."""
    return shaped_database_url
