"""Fixtures: one real PostgreSQL per test session, a migrated template cloned per test."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from sqlalchemy.engine import Engine

from flagsched import cli, logs, migrate
from flagsched.db import Database
from flagsched.schema import make_engine
from scripts import pgbouncer as pgbouncer_script
from scripts import pgserver

TEMPLATE = "flagsched_template"
_numbers = itertools.count()


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("FLAGSCHED_", "FLAG_SCHEDULE_")) or name == "DATABASE_URL":
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def pg() -> Iterator[pgserver.Postgresql]:
    server = pgserver.start()
    try:
        admin = _admin(server)
        with admin.connect() as conn:
            conn.execute(sa.text(f"CREATE DATABASE {TEMPLATE}"))
        migrate.upgrade(make_engine(server.url(database=TEMPLATE)))
        yield server
    finally:
        server.stop()


def _admin(server: pgserver.Postgresql) -> Engine:
    return make_engine(server.url(database="postgres")).execution_options(
        isolation_level="AUTOCOMMIT"
    )


def _new_database(server: pgserver.Postgresql, template: str) -> str:
    name = f"t{os.getpid()}_{next(_numbers)}"
    with _admin(server).connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name} TEMPLATE {template}"))
    url: str = server.url(database=name)
    return url


def require(name: str, path: str | None) -> str:
    """A binary the tests need. Missing: under CI (CI=true) the test fails; elsewhere it is
    skipped with the reason, shown in pytest's summary. Never a silent pass."""
    if path:
        return path
    message = f"{name} is not installed (apt-get install {name}; .ci/run installs it)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def pgbouncer(pg: pgserver.Postgresql) -> Iterator[pgbouncer_script.PgBouncer]:
    """PgBouncer in transaction mode in front of the session's server: a pool of 2 server
    connections per database, default ignore_startup_parameters."""
    require("pgbouncer", pgbouncer_script.binary())
    port = sa.engine.make_url(pg.url()).port
    assert port is not None
    bouncer = pgbouncer_script.start(port)
    try:
        yield bouncer
    finally:
        bouncer.stop()


@pytest.fixture
def pooled_url(database_url: str, pgbouncer: pgbouncer_script.PgBouncer) -> str:
    """This test's database (migrated), through PgBouncer."""
    return pgbouncer.url(database_url)


@pytest.fixture
def pooled_empty_url(empty_database_url: str, pgbouncer: pgbouncer_script.PgBouncer) -> str:
    """A database with no flagsched schema, through PgBouncer."""
    return pgbouncer.url(empty_database_url)


def _drop_database(server: pgserver.Postgresql, url: str) -> None:
    """Drop a test's database when the test ends (WITH (FORCE): a connection the test left
    open, or a pooler's, does not keep it)."""
    name = sa.engine.make_url(url).database
    with _admin(server).connect() as conn:
        conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.fixture
def database_url(pg: pgserver.Postgresql) -> Iterator[str]:
    """A fresh database at the latest schema revision, dropped when the test ends."""
    url = _new_database(pg, TEMPLATE)
    yield url
    _drop_database(pg, url)


@pytest.fixture
def empty_database_url(pg: pgserver.Postgresql) -> Iterator[str]:
    """A fresh database with no flagsched schema, dropped when the test ends."""
    url = _new_database(pg, "template0")
    yield url
    _drop_database(pg, url)


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    eng = make_engine(database_url, lock_timeout=1)
    yield eng
    eng.dispose()


@pytest.fixture
def database(database_url: str) -> Database:
    """What flagsched connects with (lock_timeout 1 s, to keep lock tests short)."""
    return Database(database_url, lock_timeout=1)


@pytest.fixture
def sql(engine: Engine) -> Callable[..., list[Any]]:
    """Run one statement in its own committed transaction; returns the rows (if any)."""

    def run(statement: str, **params: Any) -> list[Any]:
        with engine.begin() as conn:
            result = conn.execute(sa.text(statement), params)
            return list(result) if result.returns_rows else []

    return run


@pytest.fixture
def add_flag(sql: Callable[..., list[Any]]) -> Callable[..., None]:
    def add(key: str, *, enabled: bool = False, rollout: int = 0) -> None:
        sql(
            "INSERT INTO feature_flags (key, enabled, rollout_percentage) VALUES (:k, :e, :r)",
            k=key,
            e=enabled,
            r=rollout,
        )

    return add


@pytest.fixture
def add_schedule(sql: Callable[..., list[Any]]) -> Callable[..., int]:
    """Insert a schedule; `at` is SQL relative to now() (e.g. "now() - interval '1 minute'")."""
    import json

    def add(
        flag_key: str,
        updates: Any,
        *,
        at: str = "now() - interval '1 minute'",
        status: str = "pending",
        retry_count: int = 0,
        max_retries: int = 3,
        next_retry_at: str | None = None,
    ) -> int:
        rows = sql(
            f"""INSERT INTO feature_flag_schedules
                (flag_key, scheduled_at, updates, status, retry_count, max_retries, next_retry_at)
                VALUES (:k, {at}, CAST(:u AS jsonb), :s, :rc, :mr, {next_retry_at or "NULL"})
                RETURNING id""",
            k=flag_key,
            u=json.dumps(updates),
            s=status,
            rc=retry_count,
            mr=max_retries,
        )
        return int(rows[0][0])

    return add


@dataclass
class Ran:
    code: int
    stdout: str
    stderr: str


def _command_env(url: str | None, env: dict[str, str] | None) -> dict[str, str]:
    """What a command sees of the environment: our variables only as the test sets them."""
    full = {"FLAGSCHED_LOG_FORMAT": "json"}
    if url is not None:
        full["FLAGSCHED_DATABASE_URL"] = url
    full.update(env or {})
    return full


def invoke(*args: str, env: dict[str, str] | None = None, url: str | None = None) -> Ran:
    """The command line in this process (click's CliRunner isolation): the same entry point
    as `flagsched`, its exit code and its captured stdout and stderr, without a new
    interpreter per call. Logging is configured by each invocation and reset after it."""
    runner = CliRunner()
    try:  # color: what a terminal would get, click strips nothing
        with runner.isolation(env=_command_env(url, env), color=True) as streams:
            code = cli.run(list(args))
            sys.stdout.flush()
            sys.stderr.flush()
            out, err = streams[0].getvalue(), streams[1].getvalue()
    finally:
        logs.reset()
    return Ran(code, out.decode(errors="replace"), err.decode(errors="replace"))


@pytest.fixture
def flagsched(database_url: str) -> Callable[..., Ran]:
    """The command line, in-process, against this test's database."""

    def run(
        *args: str,
        env: dict[str, str] | None = None,
        url: str | None = database_url,
        timeout: float | None = None,  # accepted as before; a call in-process needs none
    ) -> Ran:
        return invoke(*args, env=env, url=url)

    return run


def run_process(
    *args: str,
    env: dict[str, str] | None = None,
    url: str | None = None,
    timeout: float = 60,
    stderr: Any = subprocess.PIPE,
    close_stderr: bool = False,
) -> Ran:
    """The real command line as a subprocess (for what needs a process of its own: exit at
    interpreter level, closed or full stderr, signals)."""
    full_env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("FLAGSCHED_", "FLAG_SCHEDULE_")) and k != "DATABASE_URL"
    }
    full_env.update(_command_env(url, env))
    done = subprocess.run(
        [sys.executable, "-m", "flagsched", *args],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env=full_env,
        timeout=timeout,
        check=False,
        # Started with file descriptor 2 closed, as `2>&-` in a shell does.
        preexec_fn=(lambda: os.close(2)) if close_stderr else None,
    )
    return Ran(done.returncode, done.stdout, done.stderr or "")


@pytest.fixture
def flagsched_process(database_url: str) -> Callable[..., Ran]:
    """`run_process` against this test's database."""

    def run(*args: str, url: str | None = database_url, **options: Any) -> Ran:
        return run_process(*args, url=url, **options)

    return run
