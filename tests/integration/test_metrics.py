"""Metrics: the textfile (atomic, last success carried over) and push-add to a gateway."""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Ran


def samples(text: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = s.name + "".join(f"{{{k}={v}}}" for k, v in sorted(s.labels.items()))
            found[key] = s.value
    return found


@pytest.mark.not_app_schedules(
    "a schedule of a missing flag: an application's foreign key keeps it out"
)
def test_metrics_file_after_a_tick_and_after_a_run_that_could_not_tick(
    flagsched: Callable[..., Ran], add_flag: Any, add_schedule: Any, tmp_path: Path
) -> None:
    path = tmp_path / "flagsched.prom"
    add_flag("a")
    add_schedule("ghost", {"enabled": True}, at="now() - interval '20 minutes'")
    add_schedule("a", {"rollout_percentage": 5}, at="now() - interval '10 minutes'")
    add_schedule("a", {"enabled": True})  # left for the next tick: the backlog
    ran = flagsched("process", "--batch-size", "2", "--metrics-file", str(path))
    assert ran.code == 1, ran.stderr
    first = samples(path.read_text())
    assert first["flagsched_tick_schedules{outcome=applied}"] == 1
    assert first["flagsched_tick_schedules{outcome=failed}"] == 1
    assert first["flagsched_tick_schedules{outcome=retry}"] == 0
    assert first["flagsched_tick_schedules{outcome=held_back}"] == 0
    assert first["flagsched_due_backlog"] == 1
    assert 50 <= first["flagsched_oldest_due_age_seconds"] <= 120
    assert first["flagsched_tick_duration_seconds"] > 0
    success = first["flagsched_last_success_timestamp_seconds"]
    assert success == first["flagsched_last_run_timestamp_seconds"]
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind

    down = flagsched("process", "--metrics-file", str(path), url="postgresql://u:pw@127.0.0.1:1/x")
    assert down.code == 3
    second = samples(path.read_text())
    assert second["flagsched_last_success_timestamp_seconds"] == success  # carried over
    assert second["flagsched_last_run_timestamp_seconds"] > success
    assert "flagsched_tick_duration_seconds" not in second


def test_an_unwritable_metrics_file_is_a_warning_not_a_failure(
    flagsched: Callable[..., Ran], tmp_path: Path
) -> None:
    ran = flagsched("process", "--metrics-file", str(tmp_path / "missing-dir" / "x.prom"))
    assert ran.code == 0
    assert "metrics_publish_failed" in ran.stderr


class _Gateway(BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[str, str, str]]] = []
    authorization: ClassVar[list[str | None]] = []

    def _handle(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
        self.received.append((self.command, self.path, body))
        self.authorization.append(self.headers.get("Authorization"))
        self.send_response(200)
        self.end_headers()

    do_POST = do_PUT = _handle

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def gateway() -> Iterator[tuple[str, list[tuple[str, str, str]]]]:
    _Gateway.received, _Gateway.authorization = [], []
    server = HTTPServer(("127.0.0.1", 0), _Gateway)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", _Gateway.received
    server.shutdown()


def test_pushgateway_gets_push_add(
    flagsched: Callable[..., Ran],
    add_flag: Any,
    add_schedule: Any,
    gateway: tuple[str, list[tuple[str, str, str]]],
) -> None:
    url, received = gateway
    add_flag("a")
    add_schedule("a", {"enabled": True})
    assert flagsched("process", "--pushgateway", url).code == 0
    method, path, body = received[0]
    assert (method, path) == ("POST", "/metrics/job/flagsched")  # push-add, not replace
    pushed = samples(body)
    assert pushed["flagsched_tick_schedules{outcome=applied}"] == 1
    assert "flagsched_last_success_timestamp_seconds" in pushed

    assert flagsched("process", "--pushgateway", url, url="postgresql://u@127.0.0.1:1/x").code == 3
    method, _, body = received[1]
    assert method == "POST"
    pushed = samples(body)
    assert "flagsched_last_run_timestamp_seconds" in pushed
    assert "flagsched_last_success_timestamp_seconds" not in pushed  # the gateway keeps its own


@pytest.mark.parametrize(
    "corrupt",
    [b"garbage here\n", b"\xff\xfe not utf-8", b"flagsched_last_success_timestamp_seconds NaN\n"],
)
def test_a_corrupt_metrics_file_is_replaced_with_one_warning(
    flagsched: Callable[..., Ran], tmp_path: Path, corrupt: bytes
) -> None:
    path = tmp_path / "flagsched.prom"
    path.write_bytes(corrupt)
    ran = flagsched("process", "--metrics-file", str(path))
    assert ran.code == 0, ran.stderr
    assert ran.stderr.count("metrics_file_replaced") == 1
    assert "metrics_publish_failed" not in ran.stderr
    fresh = samples(path.read_text())
    assert fresh["flagsched_last_success_timestamp_seconds"] > 0
    again = flagsched("process", "--metrics-file", str(path))
    assert "metrics_file_replaced" not in again.stderr  # warned once: the file reads back now


@pytest.fixture
def database_url(shaped_database_url: str) -> str:
    """Every test here on the built-in tables and on your own flags table (issue 18)."""
    return shaped_database_url


def test_pushgateway_credentials_in_its_url_are_sent_as_basic_auth(
    flagsched: Callable[..., Ran], gateway: tuple[str, list[tuple[str, str, str]]]
) -> None:
    """A Pushgateway behind basic auth: user info in --pushgateway's URL (percent-encoded or
    not) is sent as the Authorization header, the request goes to the host after it."""
    url, received = gateway
    with_login = url.replace("http://", "http://ops%40team:s3cr%2Ft@")
    ran = flagsched("process", "--pushgateway", with_login)
    assert ran.code == 0, ran.stderr
    assert "metrics_publish_failed" not in ran.stderr and "s3cr" not in ran.stderr
    assert received[0][:2] == ("POST", "/metrics/job/flagsched")
    assert _Gateway.authorization == ["Basic " + base64.b64encode(b"ops@team:s3cr/t").decode()]

    assert flagsched("process", "--pushgateway", url).code == 0
    assert _Gateway.authorization[1] is None  # no user info, no header
