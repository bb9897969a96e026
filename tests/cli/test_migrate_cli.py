"""`flagsched migrate` and the configuration errors, through the real entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import psycopg
import sqlalchemy as sa

from flagsched.migrate import head
from flagsched.schema import make_engine, metadata
from tests.conftest import Ran, invoke, run_process


def tables(url: str) -> set[str]:
    with make_engine(url).connect() as conn:
        return set(
            conn.execute(
                sa.text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
            ).scalars()
        )


def test_migrate_then_check_then_again(empty_database_url: str) -> None:
    assert invoke("migrate", "--check", url=empty_database_url).code == 1
    first = invoke("migrate", url=empty_database_url)
    assert first.code == 0, first.stderr
    assert json.loads(first.stderr)["to_revision"] == head()
    assert tables(empty_database_url) == {"alembic_version", *metadata.tables}
    again = invoke("migrate", url=empty_database_url)
    assert again.code == 0 and json.loads(again.stderr)["changed"] is False
    check = invoke("migrate", "--check", url=empty_database_url)
    assert check.code == 0 and head() in check.stdout


def test_migrate_sql_prints_ddl_and_touches_nothing(empty_database_url: str) -> None:
    ran = invoke("migrate", "--sql", url=empty_database_url)
    assert ran.code == 0, ran.stderr
    assert "CREATE TABLE feature_flags" in ran.stdout
    assert "CREATE INDEX idx_schedules_next_retry_at" in ran.stdout
    assert "max_retries_check" in ran.stdout
    assert tables(empty_database_url) == set()
    assert invoke("migrate", "--sql", url=None).code == 0  # needs no database at all


def test_two_migrates_started_together_both_succeed(empty_database_url: str) -> None:
    env = {
        **os.environ,
        "FLAGSCHED_DATABASE_URL": empty_database_url,
        "FLAGSCHED_LOG_FORMAT": "json",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "flagsched", "migrate"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert "feature_flag_schedules" in tables(empty_database_url)


def test_migrate_check_exits_3_when_the_database_is_unreachable() -> None:
    ran = invoke("migrate", "--check", url="postgresql://bob:hunter2@127.0.0.1:1/nope")
    assert ran.code == 3
    assert "hunter2" not in ran.stderr + ran.stdout


def test_no_database_url_is_exit_2_naming_the_variable() -> None:
    for command in (["process"], ["migrate"], ["list-failed"]):
        ran = invoke(*command, url=None)
        assert ran.code == 2
        assert ran.stderr.strip().count("\n") == 0
        assert "FLAGSCHED_DATABASE_URL" in ran.stderr
        assert "Traceback" not in ran.stderr


def test_unreachable_database_is_exit_3_one_line_no_password() -> None:
    for command in (["process"], ["migrate"], ["list-failed"]):  # real processes: exit codes
        ran = run_process(*command, url="postgres://bob:hunter2@127.0.0.1:1/app")
        assert ran.code == 3, ran.stderr
        assert ran.stderr.strip().count("\n") == 0, ran.stderr
        assert "hunter2" not in ran.stderr + ran.stdout
        assert "database app at 127.0.0.1:1 as bob" in ran.stderr
        assert "Traceback" not in ran.stderr


def test_refused_login_is_exit_3_without_the_password(
    flagsched: Callable[..., Ran], sql: Any, database_url: str
) -> None:
    url = database_url.replace("postgres@", "nobody:s3cret-pw@")
    ran = flagsched("process", url=url)
    assert ran.code == 3
    assert "s3cret-pw" not in ran.stderr + ran.stdout
    assert "nobody" in ran.stderr


def test_unmigrated_database_is_exit_3_saying_run_migrate(empty_database_url: str) -> None:
    for command in (["process"], ["list-failed"], ["process", "--dry-run"]):
        ran = invoke(*command, url=empty_database_url)
        assert ran.code == 3
        assert "run `flagsched migrate`" in ran.stderr


def test_bad_setting_is_exit_2_one_line() -> None:
    ran = invoke("process", env={"FLAGSCHED_BATCH_SIZE": "lots"})
    assert ran.code == 2
    assert ran.stderr.startswith("flagsched: error: FLAGSCHED_BATCH_SIZE")
    assert ran.stderr.strip().count("\n") == 0


def test_usage_errors_are_exit_2() -> None:
    assert invoke("process", "--batch-size", "0").code == 2
    assert invoke("process", "--batch-size", "1001").code == 2
    assert invoke("process", "--max-batches", "0").code == 2
    assert invoke("no-such-command").code == 2
    assert invoke("migrate", "--sql", "--check").code == 2
    # a word where a number belongs is "not a valid integer" (click's IntRange said
    # "integer range", as if a range were asked for)
    for argv in (["process", "--batch-size", "lots"], ["list", "--limit", "nan"]):
        ran = invoke(*argv)
        assert ran.code == 2 and "is not a valid integer." in ran.stderr, ran.stderr


def test_help_needs_no_settings() -> None:
    ran = invoke("process", "--help", url=None, env={"FLAGSCHED_BATCH_SIZE": "bad"})
    assert ran.code == 0 and "--batch-size" in ran.stdout


def test_a_password_in_the_query_string_is_not_shown() -> None:
    ran = invoke("process", url="postgresql://127.0.0.1:1/app?user=bob&password=qs-secret")
    assert ran.code == 3
    assert "qs-secret" not in ran.stderr + ran.stdout


def test_migrate_at_an_unknown_revision_is_one_line_exit_3_and_the_tick_runs(
    flagsched: Callable[..., Ran], database_url: str, sql: Any
) -> None:
    sql("UPDATE alembic_version SET version_num = 'f00d\x1b[2J'")  # written by a newer flagsched?
    for command in (["migrate"], ["migrate", "--check"]):
        ran = flagsched(*command)
        assert ran.code == 3, (command, ran.stderr)
        assert ran.stderr.count("\n") == 1 and "internal error" not in ran.stderr
        assert "f00d\\x1b[2J" in ran.stderr and "\x1b" not in ran.stderr + ran.stdout
    # The schema holds every object this release uses: the tick works (rolling upgrades).
    assert flagsched("process").code == 0
    assert sql("SELECT version_num FROM alembic_version")[0][0] == "f00d\x1b[2J"


def test_a_sql_ascii_database_is_refused_in_one_line_exit_3(
    flagsched: Callable[..., Ran], pg: Any, empty_database_url: str
) -> None:
    from tests.conftest import _admin, _drop_database

    name = empty_database_url.rsplit("/", 1)[1] + "_ascii"
    with _admin(pg).connect() as conn:
        conn.execute(
            sa.text(
                f"CREATE DATABASE {name} TEMPLATE template0 ENCODING 'SQL_ASCII' "
                "LC_COLLATE 'C' LC_CTYPE 'C'"
            )
        )
    url = empty_database_url.rsplit("/", 1)[0] + "/" + name
    try:
        for command in (["migrate"], ["migrate", "--check"], ["process"]):
            ran = flagsched(*command, url=url)
            assert ran.code == 3, (command, ran.stderr)
            assert ran.stderr.count("\n") == 1 and "internal error" not in ran.stderr
            assert "SQL_ASCII" in ran.stderr and "UTF8" in ran.stderr
        with psycopg.connect(url) as conn:  # SQLAlchemy itself cannot read a SQL_ASCII one
            assert conn.execute(
                "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
            ).fetchone() == (0,)
    finally:
        _drop_database(pg, url)
