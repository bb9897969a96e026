"""`flagsched migrate` beside the application's tables while the application holds them
(SPEC "Upgrades": it never holds a lock on an application table for longer than it takes
to add a trigger). Every deploy runs `migrate`: with nothing to do it reads the catalog
only and returns at once, whatever the application holds. When it must add a trigger it
waits in a table's lock queue (where the application's writes queue behind it) at most
0.2 s at a time, tries again after a pause, and gives up within FLAGSCHED_LOCK_TIMEOUT:
one line, exit 3, nothing changed; run again once the table is free, it succeeds. Real
connections on the first application's tables (tests/fixtures/upstream-schema.sql)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest

from tests.cli.test_adopted_flags_cli import (
    UPSTREAM_SCHEDULES,
    UPSTREAM_SHAPE,
    Deployment,
    Shape,
    _deploy,
)

SHAPES = [UPSTREAM_SHAPE, UPSTREAM_SCHEDULES]
by_shape = pytest.mark.parametrize("shape", SHAPES, ids=["own-schedules", "app-schedules"])


def _with_rows(d: Deployment) -> None:
    """A flag and one of the application's schedules of it (shape 3: its own table; shape 2:
    the application's schedules table is just another table of it)."""
    d.add_flag("held")
    d.add_flag("probe")
    d.sql(
        "INSERT INTO public.feature_flag_schedules (flag_id, scheduled_at, updates) "
        "SELECT id, now() + interval '1 day', '{\"enabled\": true}' FROM public.feature_flags"
    )


@contextmanager
def holding(url: str, table: str, how: str) -> Iterator[psycopg.Connection[object]]:
    """Another transaction of the application holding `table`: an explicit ACCESS EXCLUSIVE
    lock (its own migration, say), or an UPDATE of one row not yet committed (ROW
    EXCLUSIVE: any write in progress)."""
    conn = psycopg.connect(url)
    try:
        if how == "access exclusive":
            conn.execute(f"LOCK TABLE public.{table} IN ACCESS EXCLUSIVE MODE")
        else:
            key = "flag_id" if table == "feature_flag_schedules" else "id"
            conn.execute(
                f"UPDATE public.{table} SET {key} = {key} WHERE {key} = "
                "(SELECT id FROM public.feature_flags WHERE flag_key = 'held' "
                "AND environment = 'production')"
            )
        yield conn
    finally:
        conn.close()


def _migrate(d: Deployment, lock_timeout: float) -> tuple[int, str, float]:
    started = time.monotonic()
    ran = d.run("migrate", env={"FLAGSCHED_LOCK_TIMEOUT": f"{lock_timeout:g}"})
    return ran.code, ran.stderr, time.monotonic() - started


@by_shape
@pytest.mark.parametrize("table", ["feature_flags", "feature_flag_schedules"])
@pytest.mark.parametrize("how", ["access exclusive", "a write in progress"])
def test_migrate_with_nothing_to_do_returns_at_once_whatever_the_application_holds(
    empty_database_url: str, tmp_path: Path, shape: Shape, table: str, how: str
) -> None:
    """A migrated deployment migrated again (every deploy does) while the application holds
    its flags or schedules table: exit 0 at once, having created nothing. It never asks
    for a lock on either table, so it neither waits (FLAGSCHED_LOCK_TIMEOUT is 10 s here)
    nor holds the application's writes behind it."""
    d = _deploy(shape, empty_database_url, tmp_path)
    _with_rows(d)
    with holding(d.url, table, how):
        code, stderr, took = _migrate(d, lock_timeout=10)
        assert code == 0, stderr
        assert took < 5, took  # half the lock timeout: it never queued
        assert json.loads(stderr.splitlines()[-1])["created"] == 0
        assert d.run("migrate", "--check").code == 0


# What one migrate has to add: shape 2 one of the record triggers on the flags table, shape
# 3 the trigger noting each row of the application's schedules table.
MISSING = {
    "upstream": ("feature_flags", "flagsched_record_insert_%"),
    "upstream-schedules": ("feature_flag_schedules", "flagsched_note_schedule"),
}


def _drop_trigger(d: Deployment) -> tuple[str, str]:
    """Drop the trigger of MISSING (as if an earlier release had not made it): the next
    migrate must add it, so it needs its table's lock. Returns (table, trigger)."""
    table, pattern = MISSING[d.shape.name]
    ((name,),) = d.sql(
        "SELECT tgname FROM pg_trigger WHERE tgrelid = %(t)s::regclass AND tgname LIKE %(p)s",
        {"t": f"public.{table}", "p": pattern},
    )
    d.sql(f'DROP TRIGGER "{name}" ON public.{table}')
    return table, name


def _has_trigger(d: Deployment, table: str, name: str) -> bool:
    return bool(
        d.sql(
            "SELECT 1 FROM pg_trigger WHERE tgrelid = %(t)s::regclass AND tgname = %(n)s",
            {"t": f"public.{table}", "n": name},
        )
    )


class WriteProbe:
    """The application writing to `table` all along, one row at a time in its own
    transactions (another row than the one held): the longest any write took."""

    def __init__(self, url: str, table: str) -> None:
        self.url, self.table = url, table
        self.longest = 0.0
        self.writes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        key = "flag_id" if self.table == "feature_flag_schedules" else "id"
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self._stop.is_set():
                started = time.monotonic()
                conn.execute(
                    f"UPDATE public.{self.table} SET {key} = {key} WHERE {key} = "
                    "(SELECT id FROM public.feature_flags WHERE flag_key = 'probe' "
                    "AND environment = 'production')"
                )
                self.longest = max(self.longest, time.monotonic() - started)
                self.writes += 1
                time.sleep(0.01)

    def __enter__(self) -> WriteProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


@by_shape
def test_migrate_that_must_add_a_trigger_to_a_busy_table_gives_up_cleanly_then_succeeds(
    empty_database_url: str, tmp_path: Path, shape: Shape
) -> None:
    """A migrate that must add a trigger while a write of the application's stays open on
    that table: its lock request waits 0.2 s at a time (the application's other writes,
    going on all along, are never held longer), and after its tries within
    FLAGSCHED_LOCK_TIMEOUT (3 s: 4 tries) it fails in one line, exit 3, naming the table,
    having changed nothing (every command still says what is missing). Once the write
    commits, migrate adds the trigger (exit 0) and `--check` is content."""
    d = _deploy(shape, empty_database_url, tmp_path)
    _with_rows(d)
    table, trigger = _drop_trigger(d)
    with holding(d.url, table, "a write in progress"), WriteProbe(d.url, table) as probe:
        time.sleep(0.1)
        code, stderr, took = _migrate(d, lock_timeout=3)
    assert code == 3, stderr
    assert stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
    assert f'the table "public"."{table}" stayed locked by other transactions' in stderr
    assert "tried 4 times in 3 s" in stderr and "changed nothing" in stderr
    assert 1.5 < took < 10, took
    assert probe.writes > 20 and probe.longest < 2.0, (probe.writes, probe.longest)
    assert not _has_trigger(d, table, trigger)
    assert d.run("migrate", "--check").code == 1

    code, stderr, _ = _migrate(d, lock_timeout=3)
    assert code == 0, stderr
    assert _has_trigger(d, table, trigger), stderr
    assert d.run("migrate", "--check").code == 0


@by_shape
def test_migrate_that_waits_for_a_trigger_succeeds_when_the_table_is_released(
    empty_database_url: str, tmp_path: Path, shape: Shape
) -> None:
    """The same migrate while the application's write commits within its tries: it adds the
    trigger, exit 0."""
    d = _deploy(shape, empty_database_url, tmp_path)
    _with_rows(d)
    table, trigger = _drop_trigger(d)
    with holding(d.url, table, "a write in progress") as held:
        releaser = threading.Timer(0.5, held.commit)
        releaser.start()
        code, stderr, took = _migrate(d, lock_timeout=10)
        releaser.join()
    assert code == 0, stderr
    assert 0.4 < took < 5, took
    assert _has_trigger(d, table, trigger)


def test_migrate_that_must_rebuild_its_view_behind_an_exclusive_lock_gives_up_cleanly(
    empty_database_url: str, tmp_path: Path
) -> None:
    """Shape 3, an upgrade from a release that did not note what it made (the view and its
    functions are made again): they read the application's tables, which its own migration
    holds ACCESS EXCLUSIVE. migrate waits 0.2 s at a time, then fails in one line, exit 3,
    changing nothing; once the lock is gone it succeeds, and a migrate after it has nothing
    to do."""
    d = _deploy(UPSTREAM_SCHEDULES, empty_database_url, tmp_path)
    _with_rows(d)
    d.sql("COMMENT ON SEQUENCE flagsched.feature_flag_schedule_group_seq IS NULL")
    with holding(d.url, "feature_flag_schedules", "access exclusive"):
        code, stderr, took = _migrate(d, lock_timeout=1)
    assert code == 3, stderr
    assert stderr.count("\n") == 1 and "stayed locked by other transactions" in stderr, stderr
    assert '"public"."feature_flag_schedules"' in stderr and "changed nothing" in stderr
    assert took < 8, took
    code, stderr, _ = _migrate(d, lock_timeout=1)
    assert code == 0, stderr
    assert json.loads(stderr.splitlines()[-1])["created"] == 1  # the objects, noted
    code, stderr, _ = _migrate(d, lock_timeout=1)
    assert json.loads(stderr.splitlines()[-1])["created"] == 0
