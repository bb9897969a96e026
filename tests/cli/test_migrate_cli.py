"""`flagsched migrate` and the configuration errors, through the real entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

from flagsched.db import SCHEMA_REVISION
from flagsched.schema import make_engine
from tests.conftest import Ran


def tables(url: str) -> set[str]:
    with make_engine(url).connect() as conn:
        return set(
            conn.execute(
                sa.text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
            ).scalars()
        )


def test_migrate_then_check_then_again(
    flagsched: Callable[..., Ran], empty_database_url: str
) -> None:
    assert flagsched("migrate", "--check", url=empty_database_url).code == 1
    first = flagsched("migrate", url=empty_database_url)
    assert first.code == 0, first.stderr
    assert json.loads(first.stderr)["to_revision"] == SCHEMA_REVISION
    assert tables(empty_database_url) == {
        "alembic_version",
        "feature_flags",
        "feature_flag_schedules",
        "feature_flag_changes",
        "feature_flag_recurrences",
    }
    again = flagsched("migrate", url=empty_database_url)
    assert again.code == 0 and json.loads(again.stderr)["changed"] is False
    check = flagsched("migrate", "--check", url=empty_database_url)
    assert check.code == 0 and SCHEMA_REVISION in check.stdout


def test_migrate_sql_prints_ddl_and_touches_nothing(
    flagsched: Callable[..., Ran], empty_database_url: str
) -> None:
    ran = flagsched("migrate", "--sql", url=empty_database_url)
    assert ran.code == 0, ran.stderr
    assert "CREATE TABLE feature_flags" in ran.stdout
    assert "CREATE INDEX idx_schedules_next_retry_at" in ran.stdout
    assert "max_retries_check" in ran.stdout
    assert tables(empty_database_url) == set()
    assert flagsched("migrate", "--sql", url=None).code == 0  # needs no database at all


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


def test_migrate_check_exits_3_when_the_database_is_unreachable(
    flagsched: Callable[..., Ran],
) -> None:
    ran = flagsched("migrate", "--check", url="postgresql://bob:hunter2@127.0.0.1:1/nope")
    assert ran.code == 3
    assert "hunter2" not in ran.stderr + ran.stdout


def test_no_database_url_is_exit_2_naming_the_variable(flagsched: Callable[..., Ran]) -> None:
    for command in (["process"], ["migrate"], ["list-failed"]):
        ran = flagsched(*command, url=None)
        assert ran.code == 2
        assert ran.stderr.strip().count("\n") == 0
        assert "FLAGSCHED_DATABASE_URL" in ran.stderr
        assert "Traceback" not in ran.stderr


def test_unreachable_database_is_exit_3_one_line_no_password(flagsched: Callable[..., Ran]) -> None:
    for command in (["process"], ["migrate"], ["list-failed"]):
        ran = flagsched(*command, url="postgres://bob:hunter2@127.0.0.1:1/app")
        assert ran.code == 3, ran.stderr
        assert ran.stderr.strip().count("\n") == 0, ran.stderr
        assert "hunter2" not in ran.stderr + ran.stdout
        assert "bob:***@127.0.0.1" in ran.stderr
        assert "Traceback" not in ran.stderr


def test_refused_login_is_exit_3_without_the_password(
    flagsched: Callable[..., Ran], sql: Any, database_url: str
) -> None:
    url = database_url.replace("postgres@", "nobody:s3cret-pw@")
    ran = flagsched("process", url=url)
    assert ran.code == 3
    assert "s3cret-pw" not in ran.stderr + ran.stdout
    assert "nobody" in ran.stderr


def test_unmigrated_database_is_exit_3_saying_run_migrate(
    flagsched: Callable[..., Ran], empty_database_url: str
) -> None:
    for command in (["process"], ["list-failed"], ["process", "--dry-run"]):
        ran = flagsched(*command, url=empty_database_url)
        assert ran.code == 3
        assert "run `flagsched migrate`" in ran.stderr


def test_bad_setting_is_exit_2_one_line(flagsched: Callable[..., Ran]) -> None:
    ran = flagsched("process", env={"FLAGSCHED_BATCH_SIZE": "lots"})
    assert ran.code == 2
    assert ran.stderr.startswith("flagsched: error: FLAGSCHED_BATCH_SIZE")
    assert ran.stderr.strip().count("\n") == 0


def test_usage_errors_are_exit_2(flagsched: Callable[..., Ran]) -> None:
    assert flagsched("process", "--batch-size", "0").code == 2
    assert flagsched("process", "--batch-size", "1001").code == 2
    assert flagsched("process", "--max-batches", "0").code == 2
    assert flagsched("no-such-command").code == 2
    assert flagsched("migrate", "--sql", "--check").code == 2


def test_help_needs_no_settings(flagsched: Callable[..., Ran]) -> None:
    ran = flagsched("process", "--help", url=None, env={"FLAGSCHED_BATCH_SIZE": "bad"})
    assert ran.code == 0 and "--batch-size" in ran.stdout


def test_a_password_in_the_query_string_is_not_shown(flagsched: Callable[..., Ran]) -> None:
    ran = flagsched("process", url="postgresql://127.0.0.1:1/app?user=bob&password=qs-secret")
    assert ran.code == 3
    assert "qs-secret" not in ran.stderr + ran.stdout
