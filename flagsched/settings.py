"""Settings from the environment (pydantic-settings): the only module that reads it."""

from __future__ import annotations

from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

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


def _seconds(default: float | None, maximum: float, variable: str) -> Any:
    """A duration setting: finite, positive, at most `maximum` seconds."""
    return Field(default=default, gt=0, le=maximum, allow_inf_nan=False, validation_alias=variable)


class Settings(BaseSettings):
    """Every FLAGSCHED_* setting, with the SPEC's defaults and bounds."""

    model_config = SettingsConfigDict(case_sensitive=False, env_ignore_empty=True, extra="ignore")

    database_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("FLAGSCHED_DATABASE_URL", "DATABASE_URL"),
        repr=False,
    )
    # Kept raw: a bad value is a warning and is ignored, never an error (SPEC).
    max_retries_raw: str | None = Field(default=None, validation_alias="FLAG_SCHEDULE_MAX_RETRIES")
    batch_size: int = Field(default=100, ge=1, le=1000, validation_alias="FLAGSCHED_BATCH_SIZE")
    retry_max_delay: float = _seconds(3600, MAX_RETRY_DELAY_SECONDS, "FLAGSCHED_RETRY_MAX_DELAY")
    lock_timeout: float = _seconds(5, MAX_TIMEOUT_SECONDS, "FLAGSCHED_LOCK_TIMEOUT")
    statement_timeout: float = _seconds(30, MAX_TIMEOUT_SECONDS, "FLAGSCHED_STATEMENT_TIMEOUT")
    # Unset: no lateness limit (only a schedule's own expires_at).
    max_lateness: float | None = _seconds(None, MAX_LATENESS_SECONDS, "FLAGSCHED_MAX_LATENESS")
    # A cron monitor's URL: pinged at the start and end of each tick (flagsched.ping).
    ping_url: str | None = Field(default=None, validation_alias="FLAGSCHED_PING_URL", repr=False)
    log_format: Literal["auto", "json", "console"] = Field(
        default="auto", validation_alias="FLAGSCHED_LOG_FORMAT"
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", validation_alias="FLAGSCHED_LOG_LEVEL"
    )

    @field_validator("log_format", "log_level", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("database_url")
    @classmethod
    def _postgres_only(cls, value: str | None) -> str | None:
        if value is None:
            return None
        scheme = urlsplit(value).scheme.lower()
        if scheme not in ACCEPTED_SCHEMES:
            raise ValueError(
                f"unsupported scheme {scheme or '(none)'!r}; use postgresql://user:pass@host/db"
            )
        problem = database_url_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("ping_url")
    @classmethod
    def _http_only(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from flagsched.ping import check_url  # urllib.request: only when there is a ping

        return check_url(value)

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


def config_path() -> str | None:
    """FLAGSCHED_CONFIG: the configuration file's path (unset or empty: none). Read on its
    own, before the other settings: the file decides which tables every command runs on."""
    import os

    return os.environ.get("FLAGSCHED_CONFIG") or None


def load_settings() -> Settings:
    """Read the environment; a bad value becomes one ConfigError line naming the variable."""
    try:
        return Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        variable = str(first["loc"][0]).upper() if first["loc"] else "settings"
        message = first["msg"].removeprefix("Value error, ")
        shown = "" if variable in _SECRET_VARIABLES else f" (got {first.get('input')!r})"
        raise ConfigError(f"{variable}: {message}{shown}") from None
