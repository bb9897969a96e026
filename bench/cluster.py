"""The benchmark's PostgreSQL, its databases and data, and flagsched run as a real process.

The SQL that makes and inspects test data, or plays the application's own writers, is named
in flagsched/sql/queries.sql (its section "the application's side"), read by the same loader
as flagsched's own statements; what is left here is the harness's upkeep of whole databases
(CREATE / DROP DATABASE from a template, CHECKPOINT, VACUUM ANALYZE). bench/reference.py
keeps its own statements on purpose: it is the yardstick."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from flagsched.sql import statement

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = "bench_migrated"
DRAIN_TEMPLATE = "bench_drain"


class Cluster:
    """Databases on one server: cloned from a template, seeded with set-based SQL."""

    def __init__(self, url_for: Callable[[str], str]) -> None:
        self.url_for = url_for
        self._names = itertools.count(1)

    def admin(self, *statements: str) -> list[tuple[Any, ...]]:
        """Run statements on the maintenance database (autocommit); the last one's rows."""
        rows: list[tuple[Any, ...]] = []
        with psycopg.connect(self.url_for("postgres"), autocommit=True) as conn:
            for statement in statements:
                cursor = conn.execute(statement)
                rows = cursor.fetchall() if cursor.description else []
        return rows

    def clone(self, template: str, prefix: str = "run") -> str:
        """A fresh database copied from `template`; returns its name."""
        name = f"{prefix}_{next(self._names)}"
        self.admin(f"CREATE DATABASE {name} TEMPLATE {template}")
        return name

    def drop(self, name: str) -> None:
        self.admin(f"DROP DATABASE IF EXISTS {name}")

    def quiesce(self) -> None:
        """Flush dirty pages now, so a checkpoint does not land inside a timed run."""
        self.admin("CHECKPOINT")

    def sql(self, database: str, statement: str, params: dict[str, Any] | None = None) -> None:
        with psycopg.connect(self.url_for(database)) as conn:
            conn.execute(statement, params)

    def rows(
        self, database: str, statement: str, params: dict[str, Any] | None = None
    ) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.url_for(database)) as conn:
            return conn.execute(statement, params).fetchall()

    def value(self, database: str, statement: str, params: dict[str, Any] | None = None) -> Any:
        return self.rows(database, statement, params)[0][0]

    def vacuum(self, database: str) -> None:
        """VACUUM ANALYZE: the statistics and visibility map of a database that has settled."""
        with psycopg.connect(self.url_for(database), autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE")

    def seed(
        self,
        database: str,
        *,
        flags: int = 0,
        schedules: int = 0,
        history: int = 0,
        flag_span: int = 10_000,
    ) -> None:
        """`flags` flags; `history` applied schedules, then `schedules` due ones, all past."""
        with psycopg.connect(self.url_for(database)) as conn:
            if flags:
                conn.execute(statement("bench_seed_flags"), {"flags": flags})
            if history:
                conn.execute(
                    statement("bench_seed_schedules"),
                    {
                        "flags": flag_span,
                        "count": history,
                        "status": "applied",
                        "since": "2000-01-01T00:00:00Z",
                    },
                )
            if schedules:
                conn.execute(
                    statement("bench_seed_schedules"),
                    {
                        "flags": flag_span,
                        "count": schedules,
                        "status": "pending",
                        "since": "2020-01-01T00:00:00Z",
                    },
                )

    def seed_changes(self, database: str, count: int, flag_span: int = 10_000) -> None:
        """`count` rows of flag history by another actor, all in the past (year 2000 on)."""
        if count:
            self.sql(
                database,
                statement("bench_seed_changes"),
                {"flags": flag_span, "count": count},
            )

    def final_state_errors(self, database: str) -> int:
        """Flags whose state is not the one their last applied schedule set."""
        return int(self.value(database, statement("bench_final_state_errors")))

    def statuses(self, database: str) -> dict[str, int]:
        rows = self.rows(database, statement("bench_statuses"))
        return {str(status): int(count) for status, count in rows}


@dataclass(frozen=True, slots=True)
class Ran:
    """One finished process: exit code, wall time, peak resident memory, its output, and the
    CPU time it used itself (user + system), which other load on the machine disturbs less."""

    code: int
    seconds: float
    max_rss_mb: float
    log: Path
    cpu_seconds: float = 0.0

    def log_lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()


def flagsched_command(*args: str) -> list[str]:
    """The installed console script (what cron runs), else `python -m flagsched`."""
    script = Path(sys.executable).with_name("flagsched")
    base = [str(script)] if script.exists() else [sys.executable, "-m", "flagsched"]
    return [*base, *args]


def reference_command(url: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "bench.reference", url, *args]


# Variables a developer's shell or a sandbox may set that cron does not, and that change
# what is measured: unbuffered stdio (two writes per log line), no bytecode cache.
_NOT_UNDER_CRON = (
    "FLAGSCHED_",
    "FLAG_SCHEDULE_",
    "DATABASE_URL",
    "PYTHONUNBUFFERED",
    "PYTHONDONTWRITEBYTECODE",
    "PYTHONPROFILEIMPORTTIME",
    "PYTHONDEVMODE",
    "PYTHONTRACEMALLOC",
)


def environment(url: str, **extra: str) -> dict[str, str]:
    """The environment of a tick under cron: the database URL, JSON logs, nothing else of ours."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_NOT_UNDER_CRON)}
    env.update(FLAGSCHED_DATABASE_URL=url, FLAGSCHED_LOG_FORMAT="json", **extra)
    return env


def compile_bytecode() -> None:
    """Cache flagsched's bytecode, as installing a wheel does: an editable checkout run with
    PYTHONDONTWRITEBYTECODE would otherwise compile every module on every start."""
    import compileall
    import importlib.util

    for package in ("flagsched", "flagsched.migrations"):
        spec = importlib.util.find_spec(package)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            compileall.compile_dir(folder, quiet=1)


class Process:
    """A started subprocess whose output goes to a file (never a pipe nobody reads)."""

    def __init__(
        self, argv: Sequence[str], env: dict[str, str], log: Path, timeout: float = 300
    ) -> None:
        self.log = log
        with log.open("wb") as stderr:
            self.started = time.perf_counter()
            self.popen = subprocess.Popen(
                list(argv),
                env=env,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
            )
        self._timer = threading.Timer(timeout, self.popen.kill)
        self._timer.start()

    def wait(self) -> Ran:
        """Reap this very child with wait4, so its rusage is its own."""
        try:
            _, status, usage = os.wait4(self.popen.pid, 0)
        finally:
            self._timer.cancel()
        seconds = time.perf_counter() - self.started
        code = os.waitstatus_to_exitcode(status)
        self.popen.returncode = code
        # ru_maxrss is in kilobytes on Linux; see run_measuring_memory for what it includes.
        cpu = usage.ru_utime + usage.ru_stime
        return Ran(code, seconds, usage.ru_maxrss / 1024, self.log, cpu)


def run(argv: Sequence[str], env: dict[str, str], log: Path, timeout: float = 300) -> Ran:
    return Process(argv, env, log, timeout).wait()


# On Linux a process's peak RSS starts from that of the process it was forked from (the
# high-water mark survives exec), and the bench process is large: a child of the bench
# reports the bench's size whenever its own is smaller. So memory is measured through this
# small launcher (python -S, a few MB), whose child starts from the launcher's size instead.
_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(f"bench-max-rss-kb {usage.ru_maxrss}", file=sys.stderr)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_measuring_memory(
    argv: Sequence[str], env: dict[str, str], log: Path, timeout: float = 300
) -> Ran:
    """Like `run`, with `max_rss_mb` the process's own peak, not inherited from the bench."""
    ran = run([sys.executable, "-S", "-c", _LAUNCHER, *argv], env, log, timeout)
    for line in reversed(ran.log_lines()):
        if line.startswith("bench-max-rss-kb "):
            return Ran(ran.code, ran.seconds, int(line.split()[1]) / 1024, ran.log, ran.cpu_seconds)
    raise RuntimeError(f"no memory figure from {argv[0]} (exit {ran.code})")
