"""Behind PgBouncer in transaction mode (a pool of 2 server connections, default settings):
every command works, the session settings hold, overlapping ticks stay exactly once."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import psycopg
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from flagsched import repository
from flagsched.db import Database, connection, transaction
from flagsched.schema import make_engine
from tests.cli.test_process_cli import AUDIT, events, spawn
from tests.conftest import Ran

Sql = Callable[..., list[Any]]

SETTINGS = ("lock_timeout", "statement_timeout", "idle_in_transaction_session_timeout")


def _shown(conn: Any) -> dict[str, str]:
    names = (*SETTINGS, "TimeZone", "jit")
    return {n: conn.execute(f"SHOW {n}").fetchone()[0] for n in names}


def test_settings_hold_for_each_transaction_and_no_longer(database_url: str) -> None:
    database = Database(database_url, lock_timeout=1.5, statement_timeout=7)
    with connection(database) as conn:
        for _ in range(2):  # every transaction, not only the first
            with transaction(database, conn):
                assert _shown(conn) == {
                    "lock_timeout": "1500ms",
                    "statement_timeout": "7s",
                    "idle_in_transaction_session_timeout": "1min",
                    "TimeZone": "UTC",
                    "jit": "off",
                }
        # Outside a transaction the session is as the server made it: nothing is left
        # behind for the next client of a pooled server connection.
        assert _shown(conn)["lock_timeout"] == "0"
        assert _shown(conn)["statement_timeout"] == "0"


def test_a_transaction_inside_a_transaction_is_a_savepoint(database_url: str) -> None:
    database = Database(database_url)
    with connection(database) as conn:
        with transaction(database, conn):
            conn.execute("CREATE TABLE t (n int)")
            with transaction(database, conn, rollback=True):
                conn.execute("INSERT INTO t VALUES (1)")
            conn.execute("INSERT INTO t VALUES (2)")
        with transaction(database, conn):
            assert conn.execute("SELECT array_agg(n) FROM t").fetchone() == ([2],)


def test_alembic_engine_transactions_get_the_settings_too(database_url: str) -> None:
    engine = make_engine(database_url, lock_timeout=2, statement_timeout=None)
    with engine.begin() as conn:
        driver = conn.connection.driver_connection
        assert _shown(driver)["lock_timeout"] == "2s"
        assert _shown(driver)["statement_timeout"] == "0"  # migrate: DDL is not time-boxed
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))
        assert conn.execute(sa.text("SHOW lock_timeout")).scalar() == "2s"


def test_the_pooler_refuses_other_startup_parameters(pooled_url: str) -> None:
    """The pooler under test really runs with the default ignore_startup_parameters: the
    `options` that flagsched used to send is refused, so the tests below prove something."""
    try:
        psycopg.connect(pooled_url, options="-c lock_timeout=1000").close()
    except psycopg.OperationalError as exc:
        assert "unsupported startup parameter" in str(exc)
    else:
        raise AssertionError("pgbouncer accepted a startup parameter it should refuse")
    with psycopg.connect(pooled_url, application_name="flagsched") as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_settings_hold_through_the_pooler(pooled_url: str) -> None:
    database = Database(pooled_url, lock_timeout=1.5, statement_timeout=7)
    with connection(database) as conn, transaction(database, conn):
        assert _shown(conn)["lock_timeout"] == "1500ms"
        name = "SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()"
        assert conn.execute(name).fetchone() == ("flagsched",)


def test_no_statement_is_prepared_on_a_server_connection(pooled_url: str) -> None:
    """One client's transactions move between the 2 server connections (another client holds
    one of them every other time); a statement prepared on one would be missing on the other."""
    database = Database(pooled_url)
    servers = set()
    with connection(database) as conn, connection(database) as other:
        for i in range(12):  # well past psycopg's default prepare threshold (5)
            # Every other time `other` holds a server connection for the duration.
            held = transaction(database, other) if i % 2 else nullcontext()
            with held, transaction(database, conn):
                repository.existing_flags(conn, ["x"])  # parameters: extended protocol
                servers.add(_scalar(conn, "pg_backend_pid()"))
                assert _scalar(conn, "count(*) FROM pg_prepared_statements") == 0
    assert len(servers) == 2


def _scalar(conn: Any, expression: str) -> Any:
    return conn.execute(f"SELECT {expression}").fetchone()[0]


def test_migrate_through_the_pooler(flagsched: Callable[..., Ran], pooled_empty_url: str) -> None:
    assert flagsched("migrate", "--check", url=pooled_empty_url).code == 1
    # Two at once (two pods starting together), each holding one of the 2 server connections.
    procs = [
        subprocess.Popen(
            [*_command(), "migrate"],
            env=_env(pooled_empty_url),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outputs]
    check = flagsched("migrate", "--check", url=pooled_empty_url)
    assert (check.code, "latest revision" in check.stdout) == (0, True), check.stderr
    assert flagsched("migrate", url=pooled_empty_url).code == 0


def _command() -> list[str]:
    import sys

    return [sys.executable, "-m", "flagsched"]


def _env(url: str, **settings: str) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLAGSCHED_", "FLAG_"))}
    env.update(FLAGSCHED_DATABASE_URL=url, FLAGSCHED_LOG_FORMAT="json", **settings)
    return env


def test_every_operator_command_through_the_pooler(
    flagsched: Callable[..., Ran], pooled_url: str, add_flag: Any, add_schedule: Any, sql: Sql
) -> None:
    def run(*args: str) -> Ran:
        return flagsched(*args, url=pooled_url)

    add_flag("a")
    added = run("schedule", "a", "--at", "now", "--rollout", "40")
    assert added.code == 0, added.stderr
    ghost = run("schedule", "ghost", "--at", "now", "--enable")
    assert ghost.code == 0, ghost.stderr
    dry = run("process", "--dry-run")
    assert (dry.code, "apply: rollout 40%" in dry.stdout) == (0, True), dry.stderr
    ticked = run("process")
    assert ticked.code == 1, ticked.stderr  # the ghost flag's schedule failed for good
    assert sql("SELECT rollout_percentage FROM feature_flags WHERE key = 'a'")[0][0] == 40
    status = run("status", "--format", "json")
    assert status.code == 0, status.stderr
    assert run("status", "--max-lag", "3600").code == 0
    assert '"failed": 1' in status.stdout and '"applied": 1' in status.stdout
    failed = run("list-failed", "--permanent", "--format", "json")
    assert failed.code == 0 and f'"id": {ghost.stdout.strip()}' in failed.stdout
    assert run("list-failed").code == 0
    add_flag("ghost")
    retried = run("retry", ghost.stdout.strip())
    assert retried.code == 0, retried.stdout + retried.stderr
    later = run("schedule", "a", "--at", "2999-01-01T00:00:00+00:00", "--enable")
    cancelled = run("cancel", later.stdout.strip(), added.stdout.strip())
    assert cancelled.code == 1  # the applied one is refused, the later one cancelled
    assert "cancelled (was pending)" in cancelled.stdout
    assert run("process").code == 0
    sql("UPDATE feature_flag_schedules SET applied_at = now() - interval '3 days'")
    assert "would delete 2 schedules" in run("prune", "--older-than", "1", "--dry-run").stdout
    pruned = run("prune", "--older-than", "1")
    assert (pruned.code, pruned.stdout.startswith("deleted 2")) == (0, True), pruned.stderr


def test_a_held_flag_is_waited_for_only_lock_timeout_through_the_pooler(
    flagsched_process: Callable[..., Ran],
    pooled_url: str,
    engine: Engine,
    add_flag: Any,
    add_schedule: Any,
    sql: Sql,
) -> None:
    add_flag("held")
    held = add_schedule("held", {"enabled": True})
    holder = engine.connect()  # the application, directly on the server
    tx = holder.begin()
    holder.execute(sa.text("SELECT * FROM feature_flags WHERE key = 'held' FOR UPDATE"))
    try:
        # Were the settings dropped, the tick would wait for the holder, here forever (the
        # statement timeout is 120 s): the subprocess timeout would fail the test.
        ran = flagsched_process(
            "process",
            url=pooled_url,
            env={"FLAGSCHED_LOCK_TIMEOUT": "1", "FLAGSCHED_STATEMENT_TIMEOUT": "120"},
            timeout=60,
        )
    finally:
        tx.rollback()
        holder.close()
    assert ran.code == 0, ran.stderr
    retry = [e for e in events(ran.stderr) if e["event"] == "schedule_retry_scheduled"]
    assert [e["schedule_id"] for e in retry] == [held]
    assert "lock timeout" in retry[0]["error"] and "55P03" in retry[0]["error"]
    row = sql("SELECT status, retry_count FROM feature_flag_schedules WHERE id = :i", i=held)
    assert tuple(row[0]) == ("failed", 1)


def test_eight_overlapping_ticks_through_a_pool_of_two(pooled_url: str, sql: Sql) -> None:
    flags, steps = 600, 10
    sql(AUDIT)
    sql(f"INSERT INTO feature_flags (key) SELECT 'k' || g FROM generate_series(1, {flags}) g")
    sql(f"""INSERT INTO feature_flag_schedules (flag_key, scheduled_at, updates)
           SELECT 'k' || (g % {flags} + 1),
                  now() - interval '1 hour' + (g / {flags}) * interval '1 s',
                  jsonb_build_object('rollout_percentage', g / {flags})
           FROM generate_series(0, {flags * steps - 1}) g""")
    procs = [spawn(pooled_url, "--max-batches", "50") for _ in range(8)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, [err[-500:] for _, err in outputs]
    logged = [e for _, err in outputs for e in events(err)]
    assert [e for e in logged if e.get("level") in ("warning", "error")] == []
    applied = sum(e["applied"] for e in logged if e["event"] == "tick_finished")
    assert applied == flags * steps
    assert sql("SELECT count(*), count(DISTINCT schedule_id) FROM test_applied_log")[0] == (
        flags * steps,
        flags * steps,
    )
    assert sql("SELECT count(*) FROM feature_flag_schedules WHERE status <> 'applied'")[0][0] == 0
    # Per flag, the values written only ever go up: no schedule applied out of order.
    regressions = sql("""SELECT count(*) FROM (
        SELECT rollout < lag(rollout) OVER (PARTITION BY key ORDER BY n) AS back
        FROM test_flag_audit) t WHERE back""")
    assert regressions[0][0] == 0
    last = steps - 1
    assert sql(f"SELECT count(*) FROM feature_flags WHERE rollout_percentage = {last}")[0][0] == (
        flags
    )
