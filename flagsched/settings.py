"""Settings from the environment: the only module that reads it."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from flagsched.errors import ConfigError
from flagsched.urls import database_url_problem

ACCEPTED_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg")
# Bounds of what PostgreSQL and the code accept, so that a bad value is a setting error
# (exit 2), not a failure later. PostgreSQL's timeouts are integers of milliseconds.
PG_INT_MAX = 2**31 - 1
MAX_TIMEOUT_SECONDS = PG_INT_MAX / 1000  # about 24.8 days
MAX_RETRY_DELAY_SECONDS = 10 * 365 * 86400  # a backoff cap beyond ten years is a typo
MAX_LATENESS_SECONDS = 100 * 365 * 86400  # beyond a century is a typo
# Variables whose value may hold a secret: never echoed in an error.
_SECRET_VARIABLES = {"FLAGSCHED_DATABASE_URL", "DATABASE_URL", "FLAGSCHED_PING_URL"}
LOG_FORMATS = ("auto", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True, slots=True)
class Settings:
    """Every FLAGSCHED_* setting, with the SPEC's defaults and bounds (`load_settings`
    reads and checks them: plain code, no validation library, so a cron tick starts fast)."""

    database_url: str | None = field(default=None, repr=False)
    # Kept raw: a bad value is a warning and is ignored, never an error (SPEC).
    max_retries_raw: str | None = None
    batch_size: int = 100
    retry_max_delay: float = 3600
    lock_timeout: float = 5
    statement_timeout: float = 30
    # Unset: no lateness limit (only a schedule's own expires_at).
    max_lateness: float | None = None
    # A cron monitor's URL: pinged at the start and end of each tick (flagsched.ping).
    ping_url: str | None = field(default=None, repr=False)
    log_format: str = "auto"
    log_level: str = "info"

    @property
    def max_retries_override(self) -> int | None:
        """FLAG_SCHEDULE_MAX_RETRIES as an int in 0..10, or None when unset or invalid."""
        return parse_max_retries(self.max_retries_raw)[0]

    @property
    def warnings(self) -> list[str]:
        """Problems that do not stop a run (logged once logging is configured)."""
        warning = parse_max_retries(self.max_retries_raw)[1]
        return [warning] if warning else []

    def require_database_url(self) -> str:
        if not self.database_url:
            raise ConfigError("FLAGSCHED_DATABASE_URL is not set (nor DATABASE_URL)")
        return self.database_url


class _Invalid(ValueError):
    """One variable's value refused: the message says why."""


def _integer(text: str, low: int, high: int) -> int:
    digits = text.strip()
    unsigned = digits.removeprefix("-").removeprefix("+")
    if not (unsigned.isascii() and unsigned.isdigit()):  # no "1_000", no "5.0"
        raise _Invalid("must be an integer")
    value = int(digits)
    if not low <= value <= high:
        raise _Invalid(f"must be an integer from {low} to {high}")
    return value


def _seconds(text: str, maximum: float) -> float:
    """A duration: finite, positive, at most `maximum` seconds."""
    try:
        value = float(text.strip()) if "_" not in text else math.nan
    except ValueError:
        raise _Invalid("must be a number of seconds") from None
    if not math.isfinite(value) or not 0 < value <= maximum:
        raise _Invalid(f"must be a finite number of seconds, more than 0 and at most {maximum:g}")
    return value


def _choice(text: str, choices: tuple[str, ...]) -> str:
    value = text.strip().lower()
    if value not in choices:
        raise _Invalid(f"must be one of {', '.join(choices)}")
    return value


def _database_url(value: str) -> str:
    scheme = urlsplit(value).scheme.lower()
    if scheme not in ACCEPTED_SCHEMES:
        raise _Invalid(
            f"unsupported scheme {scheme or '(none)'!r}; use postgresql://user:pass@host/db"
        )
    problem = database_url_problem(value)
    if problem:
        raise _Invalid(problem)
    return value


def _ping_url(value: str) -> str:
    from flagsched.ping import check_url

    try:
        return check_url(value)
    except ValueError as exc:
        raise _Invalid(str(exc)) from None


def parse_max_retries(raw: str | None) -> tuple[int | None, str | None]:
    """Pure: FLAG_SCHEDULE_MAX_RETRIES -> (value, warning)."""
    if raw is None or not raw.strip():
        return None, None
    try:
        value = int(raw.strip())
    except ValueError:
        return None, f"FLAG_SCHEDULE_MAX_RETRIES={raw!r} is not an integer; ignored"
    if not 0 <= value <= 10:
        return None, f"FLAG_SCHEDULE_MAX_RETRIES={value} is outside 0..10; ignored"
    return value, None


def raw_database_url() -> str | None:
    """The database URL as set, even when other settings are invalid (for redaction only)."""
    import os

    return os.environ.get("FLAGSCHED_DATABASE_URL") or os.environ.get("DATABASE_URL")


def _environment() -> dict[str, str]:
    """The environment by upper-case name (names are matched case-insensitively); an empty
    value counts as unset."""
    import os

    return {name.upper(): value for name, value in os.environ.items() if value != ""}


def load_settings() -> Settings:
    """Read the environment; a bad value becomes one ConfigError line naming the variable."""
    env = _environment()
    found: dict[str, Any] = {}
    url = env.get("FLAGSCHED_DATABASE_URL", env.get("DATABASE_URL"))
    url_variable = "FLAGSCHED_DATABASE_URL" if "FLAGSCHED_DATABASE_URL" in env else "DATABASE_URL"
    parsers: list[tuple[str, str, Callable[[str], Any]]] = [
        ("batch_size", "FLAGSCHED_BATCH_SIZE", lambda v: _integer(v, 1, 1000)),
        (
            "retry_max_delay",
            "FLAGSCHED_RETRY_MAX_DELAY",
            lambda v: _seconds(v, MAX_RETRY_DELAY_SECONDS),
        ),
        ("lock_timeout", "FLAGSCHED_LOCK_TIMEOUT", lambda v: _seconds(v, MAX_TIMEOUT_SECONDS)),
        (
            "statement_timeout",
            "FLAGSCHED_STATEMENT_TIMEOUT",
            lambda v: _seconds(v, MAX_TIMEOUT_SECONDS),
        ),
        ("max_lateness", "FLAGSCHED_MAX_LATENESS", lambda v: _seconds(v, MAX_LATENESS_SECONDS)),
        ("ping_url", "FLAGSCHED_PING_URL", _ping_url),
        ("log_format", "FLAGSCHED_LOG_FORMAT", lambda v: _choice(v, LOG_FORMATS)),
        ("log_level", "FLAGSCHED_LOG_LEVEL", lambda v: _choice(v, LOG_LEVELS)),
    ]
    checks = [("database_url", url_variable, _database_url)] if url is not None else []
    for name, variable, parse in checks + parsers:
        raw = url if name == "database_url" else env.get(variable)
        if raw is None:
            continue
        try:
            found[name] = parse(raw)
        except _Invalid as exc:
            shown = "" if variable in _SECRET_VARIABLES else f" (got {raw!r})"
            raise ConfigError(f"{variable}: {exc}{shown}") from None
    return Settings(max_retries_raw=env.get("FLAG_SCHEDULE_MAX_RETRIES"), **found)
