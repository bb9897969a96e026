"""The command line's own process handling: signals, and what an internal error shows."""

from __future__ import annotations

import json
import os
import signal

import pytest

from flagsched import operators
from flagsched.cli.tick import signals_stop
from flagsched.tick import StopFlag
from tests.conftest import invoke


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_the_first_signal_asks_to_stop_and_restores_the_default_for_the_second(
    signum: int,
) -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    stop = StopFlag()
    with signals_stop(stop):
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        os.kill(os.getpid(), signum)  # handled before the next line runs
        assert stop.signum == signum
        # A second one now ends the process at once, whatever the tick is doing.
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL
    assert {s: signal.getsignal(s) for s in before} == before


def _boom(*_: object, **__: object) -> None:
    raise RuntimeError("boom")


@pytest.mark.parametrize("level", ["info", "debug"])
def test_an_internal_error_is_one_line_and_its_traceback_is_logged_at_debug(
    monkeypatch: pytest.MonkeyPatch, level: str
) -> None:
    monkeypatch.setattr(operators, "status", _boom)  # an unforeseen bug, not the database
    ran = invoke("status", url="postgresql://u@127.0.0.1:1/x", env={"FLAGSCHED_LOG_LEVEL": level})
    assert ran.code == 3
    lines = ran.stderr.splitlines()
    assert lines[-1] == "flagsched: internal error: RuntimeError: boom"
    logged = [json.loads(line) for line in lines[:-1]]
    if level == "info":
        assert logged == []
    else:
        assert [e["event"] for e in logged] == ["internal_error"]
        assert "Traceback" in logged[0]["exception"] and "_boom" in logged[0]["exception"]


@pytest.fixture
def database_url(shaped_database_url: str) -> str:
    """Every test here on the built-in tables and on your own flags table (issue 18)."""
    return shaped_database_url
