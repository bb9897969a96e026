"""Logging that fails (stderr full or closed) never changes what a tick does or its exit code.
Real processes: what matters is the interpreter's own stderr, down to its exit."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import Ran, run_process

Sql = Callable[..., list[Any]]


@pytest.fixture
def backlog(add_flag: Any, add_schedule: Any) -> None:
    """20 due schedules, two per flag: ten batches of two (the ghost is not due yet)."""
    for i in range(10):
        add_flag(f"f{i}")
        add_schedule(f"f{i}", {"enabled": True}, at="now() - interval '2 minutes'")
        add_schedule(f"f{i}", {"rollout_percentage": 50})
    add_flag("ghost")  # its flag exists (an application's schedules table refers to it)
    add_schedule("ghost", {"enabled": True}, at="now() + interval '1 hour'")


def applied(sql: Sql) -> int:
    rows = sql("SELECT count(*) FROM feature_flag_schedules WHERE status = 'applied'")
    return int(rows[0][0])


@pytest.mark.parametrize("broken", ["full", "closed"])
def test_a_tick_with_unwritable_stderr_runs_every_batch_and_exits_as_without_logging(
    flagsched_process: Callable[..., Ran], backlog: None, sql: Sql, broken: str
) -> None:
    args = ("process", "--batch-size", "2", "--max-batches", "10")
    if broken == "full":
        with open("/dev/full", "w") as full:
            ran = flagsched_process(*args, stderr=full)
    else:
        ran = flagsched_process(*args, close_stderr=True)
    assert ran.code == 0
    assert applied(sql) == 20


@pytest.mark.not_app_schedules(
    "a schedule of a missing flag: an application's foreign key keeps it out"
)
def test_a_failing_tick_with_stderr_full_still_exits_1(
    flagsched_process: Callable[..., Ran], add_schedule: Any
) -> None:
    add_schedule("ghost", {"enabled": True})
    with open("/dev/full", "w") as full:
        assert flagsched_process("process", stderr=full).code == 1


def test_a_refused_command_with_stderr_full_or_closed_keeps_its_exit_code() -> None:
    closed_port = "postgresql://u@127.0.0.1:1/x"
    with open("/dev/full", "w") as full:
        assert run_process("process", url=closed_port, stderr=full).code == 3
        assert run_process("status", "--max-lag", "nan", url=closed_port, stderr=full).code == 2
    assert run_process("process", url=closed_port, close_stderr=True).code == 3


@pytest.fixture
def database_url(shaped_database_url: str) -> str:
    """Every test here on the built-in tables and on your own flags table (issue 18)."""
    return shaped_database_url
