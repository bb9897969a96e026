"""Dead-man's-switch pings for cron monitors (the healthchecks convention): `GET URL/start`
when a tick starts, `GET URL/<exit code>` when it ends. A ping never changes what the tick
does or its exit code, and all pings together hold the process up at most BUDGET_SECONDS.
No credential in the URL is ever shown: messages name the scheme, host and port only."""

from __future__ import annotations

import base64
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit, urlunsplit

from flagsched.urls import credentials

BUDGET_SECONDS = 5.0
SCHEMES = ("http", "https")


def check_url(raw: str) -> str:
    """A ping URL as given, or ValueError saying what is wrong (without quoting it)."""
    try:
        parts = urlsplit(raw.strip())
        _ = parts.port  # ValueError for a port that is not a number
    except ValueError:
        raise ValueError("not a valid URL") from None
    if parts.scheme.lower() not in SCHEMES or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    return raw.strip()


def where(raw: str) -> str:
    """What a message may show of a ping URL: scheme, host and port."""
    parts = urlsplit(raw)
    host = parts.hostname or "?"
    if ":" in host:  # IPv6
        host = f"[{host}]"
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")


def _secrets(raw: str) -> list[str]:
    """Parts of the URL that may be credentials: userinfo, password, path (a monitor's
    token often is the path), query."""
    parts = urlsplit(raw)
    found = [parts.netloc.rpartition("@")[0], parts.password or "", parts.path, parts.query]
    found += [unquote(s) for s in found]
    return sorted({s for s in found if len(s) > 1}, key=len, reverse=True)


@dataclass(frozen=True, slots=True)
class PingFailed:
    """One ping that did not get through; `reason` is safe to show."""

    ping: str  # "start" or the exit code
    host: str
    reason: str


class _Request:
    """One GET in a daemon thread: a ping that hangs is abandoned, never waited for."""

    def __init__(self, raw: str, suffix: str, timeout: float) -> None:
        self.suffix = suffix
        self.error: str | None = None
        self.timed_out = False  # its own socket timeout (the budget) ran out first
        self._raw = raw
        self._timeout = timeout
        self._thread = threading.Thread(target=self._send, name=f"ping-{suffix}", daemon=True)
        self._thread.start()

    def _send(self) -> None:
        bare, login = credentials(self._raw)
        parts = urlsplit(bare)
        headers = {"User-Agent": "flagsched"}
        if login is not None:
            pair = ":".join(login)
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        path = parts.path.rstrip("/") + "/" + self.suffix
        target = urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))
        try:
            request = urllib.request.Request(target, headers=headers, method="GET")
            with urllib.request.urlopen(request, timeout=self._timeout) as response:
                response.read(4096)
        except urllib.error.HTTPError as exc:
            self.error = f"HTTP {exc.code}"
        except urllib.error.URLError as exc:
            self.timed_out = isinstance(exc.reason, TimeoutError)
            self.error = str(exc.reason)
        except TimeoutError as exc:
            self.timed_out, self.error = True, str(exc)
        except Exception as exc:  # a ping must never break the tick
            self.error = f"{type(exc).__name__}: {exc}"

    def wait(self, seconds: float) -> bool:
        """Wait up to `seconds`; True when the request has finished."""
        self._thread.join(max(seconds, 0))
        return not self._thread.is_alive()


class Pinger:
    """`start()` when the tick starts (sent in the background: the tick does not wait for
    it), `finish(code)` when it ends: waits for /start, then sends /<code>, together within
    the budget; returns the pings that failed."""

    def __init__(
        self,
        url: str,
        *,
        budget: float = BUDGET_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._url = url
        self._budget = budget
        self._left = budget
        self._clock = clock
        self._start: _Request | None = None

    def start(self) -> None:
        self._start = _Request(self._url, "start", self._left)

    def finish(self, code: int) -> list[PingFailed]:
        failed: list[PingFailed] = []
        if self._start is not None:
            failed += self._await(self._start)
        if self._left <= 0:
            return [*failed, self._failure(str(code), "no time left of the ping budget")]
        return failed + self._await(_Request(self._url, str(code), self._left))

    def _await(self, request: _Request) -> list[PingFailed]:
        began = self._clock()
        done = request.wait(self._left)
        self._left -= self._clock() - began
        if not done or request.timed_out:  # whichever of the two clocks ran out first
            self._left = 0
            reason = f"no answer within the {self._budget:g} s budget"
            return [self._failure(request.suffix, reason)]
        if request.error is not None:
            return [self._failure(request.suffix, request.error)]
        return []

    def _failure(self, ping: str, reason: str) -> PingFailed:
        shown = " ".join(reason.split())[:300]
        for secret in _secrets(self._url):
            shown = shown.replace(secret, "***")
        return PingFailed(ping, where(self._url), shown)
