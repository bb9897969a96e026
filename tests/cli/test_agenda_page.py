"""The agenda page in a real browser: Debian's chromium, headless, driven over the DevTools
protocol (websocket-client). It must render without console errors or any network request,
show every flag and schedule, and draw exactly what `agenda --format json` says. The
screenshot is kept in tests/artifacts/ (ignored by git) for a person to look at."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Ran, require

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
HOSTILE = '<script>alert("x")</script>'


def chromium_binary() -> str:
    return require("chromium", shutil.which("chromium") or shutil.which("chromium-browser"))


class DevTools:
    """One page target of a headless chromium, over its websocket."""

    def __init__(self, url: str) -> None:
        import websocket

        self.ws = websocket.create_connection(url, timeout=30, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                result: dict[str, Any] = message.get("result", {})
                return result
            self.events.append(message)

    def wait_for(self, event: str) -> dict[str, Any]:
        """The first `event` (kept events included); the socket's timeout bounds the wait."""
        while True:
            for message in self.events:
                if message.get("method") == event:
                    return message
            self.events.append(json.loads(self.ws.recv()))

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")


@contextmanager
def headless_chromium(profile: Path) -> Iterator[DevTools]:
    """A headless chromium with an empty page, its DevTools port chosen by itself (read back
    from the profile's DevToolsActivePort), stopped afterwards."""
    binary = chromium_binary()
    process = subprocess.Popen(
        [
            binary,
            "--headless",
            "--no-sandbox",  # tests may run as root
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--remote-debugging-port=0",
            "--remote-allow-origins=*",
            f"--user-data-dir={profile}",
            "--window-size=1280,900",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        for _ in range(300):  # chromium writes it once it listens (a few seconds at most)
            if port_file.exists() and len(port_file.read_text().splitlines()) >= 2:
                break
            if process.poll() is not None:
                raise RuntimeError(f"chromium exited with {process.returncode}")
            time.sleep(0.1)
        port = int(port_file.read_text().splitlines()[0])
        from urllib.request import urlopen

        with urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
            targets = json.load(response)
        page = next(t for t in targets if t.get("type") == "page")
        devtools = DevTools(page["webSocketDebuggerUrl"])
        try:
            yield devtools
        finally:
            devtools.ws.close()
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def agenda_page(
    flagsched: Callable[..., Ran],
    add_flag: Callable[..., None],
    add_schedule: Callable[..., int],
    tmp_path: Path,
) -> tuple[Path, list[dict[str, Any]], dict[str, int]]:
    """A page of every kind of change (and the JSON agenda of the same moment)."""
    for key, on, rollout in (
        ("new-checkout", False, 0),
        ("search-v2", True, 5),
        ("maintenance-mode", False, 0),
        ("payments", True, 100),
        ("checkout-eu", False, 0),
        (HOSTILE, False, 0),
    ):
        add_flag(key, enabled=on, rollout=rollout)
    ran = flagsched(
        "ramp",
        "new-checkout",
        "--steps",
        "10,25,50,100",
        "--every",
        "1d",
        "--enable",
        "--start",
        "now",
    )
    assert ran.code == 0, ran.stderr
    ids = {"ramp": int(ran.stdout.split()[0])}
    ids["retrying"] = add_schedule(
        "search-v2",
        {"rollout_percentage": 20},
        status="failed",
        retry_count=1,
        next_retry_at="now() + interval '2 hours'",
    )
    ids["held"] = add_schedule(
        "search-v2", {"rollout_percentage": 50}, at="now() + interval '1 hour'"
    )
    # A retry after the window: the change behind it stays held back through it.
    add_schedule(
        "payments",
        {"enabled": False},
        at="now() - interval '1 hour'",
        status="failed",
        retry_count=2,
        next_retry_at="now() + interval '10 days'",
    )
    ids["behind"] = add_schedule("payments", {"enabled": True}, at="now() + interval '1 day'")
    ids["failed"] = add_schedule(
        "search-v2",
        {"enabled": False},
        at="now() + interval '3 hours'",
        status="failed",
        retry_count=4,
    )
    for cron, change in (("0 22 * * *", "--enable"), ("0 23 * * *", "--disable")):
        ran = flagsched(
            "schedule", "maintenance-mode", "--cron", cron, "--tz", "Europe/Berlin", change
        )
        assert ran.code == 0, ran.stderr
    # Four eyes: it will wait for a second person, and hold the change behind it.
    ran = flagsched(
        "schedule", "checkout-eu", "--at", "now", "--enable", "--approval", "--tz", "UTC"
    )
    assert ran.code == 0, ran.stderr
    ids["awaiting"] = int(ran.stdout.split()[0])
    ids["behind_awaiting"] = add_schedule(
        "checkout-eu", {"rollout_percentage": 30}, at="now() + interval '4 hours'"
    )
    ids["hostile"] = add_schedule(HOSTILE, {"enabled": True}, at="now() + interval '5 hours'")
    ids["huge"] = add_schedule(
        HOSTILE, {"rollout_percentage": 10**30}, at="now() + interval '6 hours'"
    )
    page = tmp_path / "agenda.html"
    ran = flagsched("agenda", "--format", "json", "--tz", "Europe/Berlin", "--html", str(page))
    assert ran.code == 0, ran.stderr
    return page, json.loads(ran.stdout), ids


def test_the_page_in_headless_chromium_draws_what_agenda_json_says(
    agenda_page: tuple[Path, list[dict[str, Any]], dict[str, int]], tmp_path: Path
) -> None:
    page, entries, ids = agenda_page
    with headless_chromium(tmp_path / "profile") as browser:
        for domain in ("Page", "Runtime", "Log", "Network"):
            browser.call(f"{domain}.enable")
        browser.call("Page.navigate", url=page.as_uri())
        browser.wait_for("Page.loadEventFired")
        drawn = browser.evaluate(
            "JSON.stringify([...document.querySelectorAll('svg [data-at]')]"
            ".map(e => Object.assign({}, e.dataset)))"
        )
        failed = browser.evaluate(
            "JSON.stringify([...document.querySelectorAll('svg [data-status=failed]')]"
            ".map(e => Object.assign({}, e.dataset)))"
        )
        flags = browser.evaluate(
            "JSON.stringify([...document.querySelectorAll('section.flag h2')]"
            ".map(e => e.textContent))"
        )
        scripts = browser.evaluate("document.scripts.length")
        text = browser.evaluate("document.body.innerText")
        shot = browser.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        browser.call(
            "Emulation.setEmulatedMedia",
            features=[{"name": "prefers-color-scheme", "value": "dark"}],
        )
        dark = browser.call("Page.captureScreenshot", format="png")
        printed = browser.call("Page.printToPDF", printBackground=False)
        events = list(browser.events)

    import base64

    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "agenda.png").write_bytes(base64.b64decode(shot["data"]))
    (ARTIFACTS / "agenda-dark.png").write_bytes(base64.b64decode(dark["data"]))
    (ARTIFACTS / "agenda.pdf").write_bytes(base64.b64decode(printed["data"]))
    assert base64.b64decode(printed["data"]).startswith(b"%PDF")

    problems = [
        e
        for e in events
        if e.get("method") == "Runtime.exceptionThrown"
        or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] == "error")
        or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")
    ]
    assert problems == []
    requests = [
        e["params"]["request"]["url"]
        for e in events
        if e.get("method") == "Network.requestWillBeSent"
    ]
    assert requests == [page.as_uri()]  # the page itself, and nothing else
    assert scripts == 0  # a flag key `<script>` is text, not a script

    keys = ["at", "flag_key", "schedule_id", "recurrence_id", "group_id", "status", "outcome"]

    def normal(entry: dict[str, Any]) -> tuple[str, ...]:
        return tuple("" if entry[k] is None else str(entry[k]) for k in keys)

    markers = [
        {k: m.get(k.replace("_", ""), m.get(_camel(k), "")) for k in keys}
        for m in json.loads(drawn)
    ]
    assert sorted(normal(m) for m in markers) == sorted(normal(e) for e in entries)
    assert len(entries) >= 4 + 2 + 14  # ramp, search-v2, two daily recurrences for 7 days
    assert {e["status"] for e in entries} == {
        "pending",
        "retrying",
        "recurring",
        "awaiting_approval",
    }
    assert {e["outcome"] for e in entries} >= {"applies", "held", "fails"}
    assert sorted(json.loads(flags)) == sorted(
        ["new-checkout", "search-v2", "maintenance-mode", "payments", "checkout-eu", HOSTILE]
    )
    assert [f["scheduleId"] for f in json.loads(failed)] == [str(ids["failed"])]
    assert [e["outcome"] for e in entries if e["schedule_id"] == ids["behind"]] == ["held"]
    waiting = [(e["status"], e["outcome"]) for e in entries if e["schedule_id"] == ids["awaiting"]]
    assert waiting == [("awaiting_approval", "held")]
    assert [e["outcome"] for e in entries if e["schedule_id"] == ids["behind_awaiting"]] == ["held"]
    for name in ("ramp", "retrying", "held", "behind", "hostile", "huge"):
        assert f"schedule {ids[name]}" in text
    assert "+01:00" in text or "+02:00" in text  # times in Europe/Berlin


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)
