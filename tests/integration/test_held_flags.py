"""A tick never waits for a flag while it holds schedules (found by the adversarial pass: "an
application transaction that locks a flag and then that flag's schedules can deadlock with
a tick that holds the schedules and waits for the flag"). On the first application's tables
(tests/fixtures/upstream-schema.sql: its schedules reference a flag with ON DELETE CASCADE,
its overrides reference flags too), with real connections and the interleavings run in a
fixed order (each side waits until the other is waiting for a lock).

What deadlocked: the claim locks a flag's due schedules; the write skips a flag another
transaction holds (busy) and then, in the fallback, waited for it (stored apply with
p_wait, FOR NO KEY UPDATE) with the schedules still locked. An application transaction that
held the flag (an UPDATE of it, SELECT ... FOR UPDATE, a DELETE cascading to its schedules)
and then wrote those schedules waited for the tick: PostgreSQL ended one of the two after
deadlock_timeout, the tick's change (a retry, `deadlock detected`) or the application's
transaction. Now a flag found held is left out of the batch (untouched, still due) and
waited for before the next claim, as the application takes them: the flag, then the
schedules. Rows locked FOR KEY SHARE (an override inserted) never block the tick."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from flagsched import repository, tick
from flagsched import sql as statements
from flagsched import tables as configuration
from flagsched.db import Database, connection, transaction
from flagsched.model import Change, Claimed, Updates, Verdict
from tests.cli.test_adopted_flags_cli import (
    UPSTREAM_SCHEDULES,
    Deployment,
    _api_schedule,
    _deploy,
)
from tests.conftest import run_process

# What the application's transaction does: first it holds the flag, then it writes the
# flag's schedules (each statement with the flag's id as %(f)s).
PATTERNS: dict[str, tuple[list[str], list[str]]] = {
    "updates-the-flag-then-its-schedules": (
        ["UPDATE public.feature_flags SET description = 'edited' WHERE id = %(f)s"],
        ["UPDATE public.feature_flag_schedules SET created_by = 'admin-api' WHERE flag_id = %(f)s"],
    ),
    "locks-the-flag-for-update-then-updates-its-schedules": (
        ["SELECT 1 FROM public.feature_flags WHERE id = %(f)s FOR UPDATE"],
        ["UPDATE public.feature_flag_schedules SET created_by = 'admin-api' WHERE flag_id = %(f)s"],
    ),
    "adds-an-override-edits-the-flag-then-its-schedules": (
        [
            "INSERT INTO public.feature_flag_user_overrides (flag_id, user_id, override_type) "
            "VALUES (%(f)s, 'user-1', 'include')",
            "UPDATE public.feature_flags SET description = 'edited' WHERE id = %(f)s",
        ],
        ["UPDATE public.feature_flag_schedules SET created_by = 'admin-api' WHERE flag_id = %(f)s"],
    ),
    "deletes-the-flag-cascading-to-its-schedules": (
        ["SELECT 1 FROM public.feature_flags WHERE id = %(f)s FOR UPDATE"],
        ["DELETE FROM public.feature_flags WHERE id = %(f)s"],
    ),
}
patterns = pytest.mark.parametrize("pattern", list(PATTERNS))
# The application's deadlock_timeout: the server's (1 s), or shorter (a superuser may set
# it for a role), so that its transaction, not the tick's, is the one PostgreSQL would end.
deadlock_timeouts = pytest.mark.parametrize("deadlock_timeout", [None, "100ms"])


def _deployed(url: str, tmp_path: Path) -> tuple[Deployment, str]:
    """The production deployment on the application's tables: a due schedule of `x` and one
    of `free`, written by the application. Returns it and the flag x's id."""
    d = _deploy(UPSTREAM_SCHEDULES, url, tmp_path)
    for key in ("x", "free"):
        d.add_flag(key)
        _api_schedule(
            d, key, {"enabled": True}, at="now() - interval '1 minute'", scope="production"
        )
    ((flag,),) = d.sql(
        "SELECT id FROM public.feature_flags WHERE flag_key = 'x' AND environment = 'production'"
    )
    return d, str(flag)


class Application:
    """The application's transaction on a connection of its own: `hold` runs at once, `then`
    in a thread (it may wait for a lock); whether it failed, and how long `then` took."""

    def __init__(self, url: str, flag: str, deadlock_timeout: str | None) -> None:
        self.conn = psycopg.connect(url)
        if deadlock_timeout is not None:
            self.conn.execute(f"SET deadlock_timeout = '{deadlock_timeout}'")
        self.flag = flag
        self.pid = self.conn.info.backend_pid
        self.error: str | None = None
        self.took = 0.0
        self._thread: threading.Thread | None = None

    def hold(self, sql: list[str]) -> None:
        for statement in sql:
            self.conn.execute(statement, {"f": self.flag})

    def then(self, sql: list[str]) -> None:
        def run() -> None:
            started = time.monotonic()
            try:
                for statement in sql:
                    self.conn.execute(statement, {"f": self.flag})
                self.conn.commit()
            except psycopg.Error as exc:
                self.error = f"{exc.sqlstate}: {exc}"
                self.conn.rollback()
            self.took = time.monotonic() - started

        self._thread = threading.Thread(target=run)
        self._thread.start()

    def join(self) -> None:
        assert self._thread is not None
        self._thread.join(timeout=60)

    def close(self) -> None:
        self.conn.close()


def _waiting_for_a_lock(url: str, *, pid: int | None = None, timeout: float = 20) -> None:
    """Until the backend `pid` (else any flagsched session) waits for a lock."""
    who = "pid = %(pid)s" if pid is not None else "application_name = 'flagsched'"
    deadline = time.monotonic() + timeout
    with psycopg.connect(url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            found = conn.execute(
                f"SELECT count(*) FROM pg_stat_activity WHERE {who} AND wait_event_type = 'Lock'",
                {"pid": pid},
            ).fetchone()
            if found and found[0]:
                return
            time.sleep(0.01)
    raise AssertionError("nobody waited for a lock")


@pytest.fixture
def app_mapping(empty_database_url: str, tmp_path: Path) -> Iterator[tuple[Deployment, str]]:
    """The deployment, and its mapping for the statements run in this process."""
    d, flag = _deployed(empty_database_url, tmp_path)
    token = statements.use(configuration.load(d.config).tables())
    try:
        yield d, flag
    finally:
        statements._current.reset(token)


def _changes(claimed: list[Claimed]) -> list[Change]:
    return [Change(c, Updates.parse(c.updates), True) for c in claimed]


@patterns
@deadlock_timeouts
def test_a_batch_holding_a_flags_schedules_never_waits_for_the_flag(
    app_mapping: tuple[Deployment, str], pattern: str, deadlock_timeout: str | None
) -> None:
    """The order that ended the application's transaction: the tick's batch claims x's
    schedule; the application then holds x and writes x's schedules, waiting for the
    batch; the batch's write finds x held. It does not wait for it (the write returns at
    once, x's change deferred, untouched); the batch commits, and the application's
    transaction goes on and commits: no deadlock on either side."""
    d, flag = app_mapping
    hold, then = PATTERNS[pattern]
    app = Application(d.url, flag, deadlock_timeout)
    database = Database(d.url, lock_timeout=5)
    try:
        with connection(database) as conn, transaction(database, conn):
            _, claimed = repository.claim(conn, limit=10)
            assert sorted(c.flag_key for c in claimed) == ["free", "x"]
            app.hold(hold)
            app.then(then)
            _waiting_for_a_lock(d.url, pid=app.pid)  # for x's schedule, the batch's
            held = tick.HeldFlags()
            started = time.monotonic()
            changes = _changes(claimed)
            verdicts = tick._write(conn, changes, tick.StopFlag(), None, held)
            took = time.monotonic() - started
        app.join()  # the batch committed: the application's statement went on
    finally:
        app.close()
    assert took < 2, took
    assert {changes[i].schedule.flag_key: v for i, (v, _) in verdicts.items()} == {
        "x": Verdict.DEFERRED
    }
    assert list(held.deferred) == ["x"] and held.waited == {}
    assert app.error is None, app.error


def _events(ran: Any) -> list[dict[str, Any]]:
    return [json.loads(line) for line in ran.stderr.splitlines() if line.startswith("{")]


@patterns
@deadlock_timeouts
def test_a_tick_waits_for_a_held_flag_before_its_claim_and_nobody_deadlocks(
    app_mapping: tuple[Deployment, str], pattern: str, deadlock_timeout: str | None
) -> None:
    """The whole tick (`flagsched process`, a process of its own) while the application holds
    x: the tick's batch applies `free` and leaves x's change, then one more batch waits for x
    before it claims anything. Meanwhile the application writes x's schedules without
    waiting for the tick, and commits; the tick then gets x and applies its change (or, the
    flag deleted with its schedules, finds nothing left). No deadlock error on either side."""
    d, flag = app_mapping
    hold, then = PATTERNS[pattern]
    app = Application(d.url, flag, deadlock_timeout)
    result: dict[str, Any] = {}
    try:
        app.hold(hold)
        ticking = threading.Thread(
            target=lambda: result.update(
                ran=run_process(
                    "--config", d.config, "process", url=d.url,
                    env={"FLAGSCHED_LOCK_TIMEOUT": "20"},
                )
            )
        )  # fmt: skip
        ticking.start()
        _waiting_for_a_lock(d.url)  # the tick, for x, holding no schedule
        app.then(then)
        app.join()
        ticking.join(timeout=60)
    finally:
        app.close()
    ran = result["ran"]
    assert app.error is None, app.error
    assert app.took < 0.9, app.took  # below deadlock_timeout: the tick held none of x's schedules
    assert ran.code == 0, ran.stderr
    assert "deadlock" not in ran.stderr
    events = _events(ran)
    applied = [e["flag_key"] for e in events if e["event"] == "schedule_applied"]
    finished = events[-1]
    assert finished["event"] == "tick_finished" and finished["batches"] == 2
    if pattern.startswith("deletes"):
        assert applied == ["free"] and d.sql(
            "SELECT count(*) FROM public.feature_flag_schedules WHERE flag_id = %(f)s",
            {"f": flag},
        ) == [(0,)]
    else:
        assert sorted(applied) == ["free", "x"]
        assert d.flag("x") == (True, 0)


def test_a_flag_held_past_the_lock_timeout_is_a_retry_as_before(
    app_mapping: tuple[Deployment, str],
) -> None:
    """The application holds x for longer than FLAGSCHED_LOCK_TIMEOUT: the tick waits for it
    once (before the claim of its last batch, holding no schedule), then x's change is a
    retry saying so; the rest of the tick applies."""
    d, flag = app_mapping
    app = Application(d.url, flag, None)
    try:
        app.hold(PATTERNS["updates-the-flag-then-its-schedules"][0])
        started = time.monotonic()
        ran = run_process(
            "--config", d.config, "process", url=d.url, env={"FLAGSCHED_LOCK_TIMEOUT": "1"}
        )
        took = time.monotonic() - started
    finally:
        app.close()
    assert ran.code == 0, ran.stderr
    retried = [e for e in _events(ran) if e["event"] == "schedule_retry_scheduled"]
    assert [e["flag_key"] for e in retried] == ["x"]
    assert "lock timeout" in retried[0]["error"]
    assert 1 <= took < 15, took
    assert d.flag("free") == (True, 0) and d.flag("x") == (False, 0)
