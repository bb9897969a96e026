"""`process --ping-url` against real HTTP servers on 127.0.0.1: one that answers, one that
hangs, one that refuses. A ping is a warning when it fails, never an exit code, and never
shows the URL's credentials."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from flagsched.ping import Pinger
from tests.cli.test_process_cli import events
from tests.conftest import Ran

SECRET, TOKEN = "s3cr3t-pass", "0f1e2d3c-token"


@pytest.fixture(autouse=True)
def _no_proxy_for_the_test_servers(monkeypatch: pytest.MonkeyPatch) -> None:
    """urllib honours http_proxy; the servers here are local (and so are the subprocesses')."""
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")


@dataclass
class Monitor:
    """A healthchecks-like server: records each request's path and Authorization header."""

    port: int
    status: int = 200
    seen: list[tuple[str, str | None]] = field(default_factory=list)

    def url(self, path: str = f"/{TOKEN}", userinfo: str = "") -> str:
        return f"http://{userinfo}127.0.0.1:{self.port}{path}"

    @property
    def paths(self) -> list[str]:
        return [path for path, _ in self.seen]


@pytest.fixture
def monitor() -> Iterator[Monitor]:
    box: list[Monitor] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            box[0].seen.append((self.path, self.headers.get("Authorization")))
            self.send_response(box[0].status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    box.append(Monitor(server.server_address[1]))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield box[0]
    server.shutdown()
    server.server_close()


@pytest.fixture
def hanging() -> Iterator[str]:
    """A server that accepts connections and never answers."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://user:{SECRET}@127.0.0.1:{listener.getsockname()[1]}/{TOKEN}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    listener.close()


@pytest.fixture
def refusing() -> str:
    """A port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://user:{SECRET}@127.0.0.1:{port}/{TOKEN}"


def _shows_no_credentials(text: str) -> None:
    assert SECRET not in text and TOKEN not in text and "user:" not in text


def test_start_then_the_exit_code(monitor: Monitor) -> None:
    pinger = Pinger(monitor.url())
    pinger.start()
    assert pinger.finish(1) == []
    assert monitor.paths == [f"/{TOKEN}/start", f"/{TOKEN}/1"]


def test_a_trailing_slash_a_query_and_basic_auth(monitor: Monitor) -> None:
    pinger = Pinger(monitor.url(f"/{TOKEN}/?rid=7", userinfo=f"me:{SECRET}@"))
    pinger.start()
    assert pinger.finish(0) == []
    assert monitor.paths == [f"/{TOKEN}/start?rid=7", f"/{TOKEN}/0?rid=7"]
    assert {auth for _, auth in monitor.seen} == {"Basic bWU6czNjcjN0LXBhc3M="}  # me:s3cr3t-pass


def test_an_error_status_is_a_failed_ping(monitor: Monitor) -> None:
    monitor.status = 500
    pinger = Pinger(monitor.url())
    pinger.start()
    failed = pinger.finish(0)
    assert [(f.ping, f.reason) for f in failed] == [("start", "HTTP 500"), ("0", "HTTP 500")]
    assert failed[0].host == f"http://127.0.0.1:{monitor.port}"


def test_a_hanging_server_costs_at_most_the_budget_in_total(hanging: str) -> None:
    pinger = Pinger(hanging, budget=0.5)
    pinger.start()
    failed = pinger.finish(0)
    assert [(f.ping, f.reason) for f in failed] == [
        ("start", "no answer within the 0.5 s budget"),
        ("0", "no time left of the ping budget"),  # the end ping is not even sent
    ]
    _shows_no_credentials(repr(failed))


def test_a_refusing_server_is_a_failed_ping_without_credentials(refusing: str) -> None:
    pinger = Pinger(refusing)
    pinger.start()
    failed = pinger.finish(3)
    assert [f.ping for f in failed] == ["start", "3"]
    assert all("refused" in f.reason.lower() for f in failed), failed
    _shows_no_credentials(repr(failed))


def test_the_budget_is_shared_by_both_pings(monitor: Monitor) -> None:
    """/start answered, but (by this clock) after the whole budget: /1 is not sent."""
    readings = iter(range(100))
    pinger = Pinger(monitor.url(), budget=5, clock=lambda: next(readings) * 6.0)
    pinger.start()
    assert [(f.ping, f.reason) for f in pinger.finish(1)] == [
        ("1", "no time left of the ping budget")
    ]
    assert monitor.paths == [f"/{TOKEN}/start"]


# --- through the command line ----------------------------------------------------------


def test_process_pings_start_and_its_exit_code(
    flagsched: Callable[..., Ran], monitor: Monitor, add_flag: Any, add_schedule: Any
) -> None:
    add_flag("a")
    add_schedule("a", {"enabled": True})
    ran = flagsched("process", "--ping-url", monitor.url())
    assert ran.code == 0, ran.stderr
    add_schedule("ghost", {"enabled": True})
    ran = flagsched("process", env={"FLAGSCHED_PING_URL": monitor.url()})
    assert ran.code == 1, ran.stderr
    assert monitor.paths == [f"/{TOKEN}/start", f"/{TOKEN}/0", f"/{TOKEN}/start", f"/{TOKEN}/1"]
    assert not [e for e in events(ran.stderr) if e["event"] == "ping_failed"]


def test_a_run_that_could_not_tick_pings_3(
    flagsched: Callable[..., Ran], monitor: Monitor, empty_database_url: str
) -> None:
    ran = flagsched("process", "--ping-url", monitor.url(), url=empty_database_url)
    assert ran.code == 3
    assert monitor.paths == [f"/{TOKEN}/start", f"/{TOKEN}/3"]


def test_a_dry_run_does_not_ping(flagsched: Callable[..., Ran], monitor: Monitor) -> None:
    assert flagsched("process", "--dry-run", "--ping-url", monitor.url()).code == 0
    assert monitor.paths == []


@pytest.mark.parametrize("server", ["hanging", "refusing"])
def test_a_failed_ping_is_a_warning_and_keeps_the_exit_code(
    flagsched_process: Callable[..., Ran],
    add_flag: Any,
    add_schedule: Any,
    sql: Callable[..., list[Any]],
    request: pytest.FixtureRequest,
    server: str,
) -> None:
    url = request.getfixturevalue(server)
    add_flag("a")
    applied = add_schedule("a", {"enabled": True})
    add_schedule("ghost", {"enabled": True})
    ran = flagsched_process("process", "--ping-url", url, timeout=30)
    assert ran.code == 1, ran.stderr  # the tick's own outcome, whatever the pings did
    warnings = [e for e in events(ran.stderr) if e["event"] == "ping_failed"]
    assert [w["ping"] for w in warnings] == ["start", "1"]
    assert {w["level"] for w in warnings} == {"warning"}
    assert warnings[0]["host"].startswith("http://127.0.0.1:")
    _shows_no_credentials(ran.stderr + ran.stdout)
    status = sql("SELECT status FROM feature_flag_schedules WHERE id = :i", i=applied)
    assert status[0][0] == "applied"


@pytest.mark.parametrize(
    "bad", ["ftp://example.com/x", "http:///no-host", f"not a url {SECRET}", "http://h:port/"]
)
def test_a_bad_ping_url_is_exit_2_without_echoing_it(
    flagsched: Callable[..., Ran], bad: str
) -> None:
    option = flagsched("process", "--ping-url", bad)
    assert option.code == 2, option.stderr
    assert option.stderr.startswith("flagsched: error: Invalid value for --ping-url: ")
    variable = flagsched("process", env={"FLAGSCHED_PING_URL": bad})
    assert variable.code == 2, variable.stderr
    assert variable.stderr.startswith("flagsched: error: FLAGSCHED_PING_URL: ")
    assert variable.stderr.strip().count("\n") == 0
    for ran in (option, variable):
        assert "Traceback" not in ran.stderr and SECRET not in ran.stderr
