"""Settings: defaults, validation and URL handling."""

from __future__ import annotations

import pytest

from flagsched.db import libpq_url
from flagsched.errors import ConfigError
from flagsched.settings import load_settings, parse_max_retries


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    s = load_settings()
    assert s.database_url is None
    assert (s.batch_size, s.retry_max_delay, s.lock_timeout, s.statement_timeout) == (
        100,
        3600,
        5,
        30,
    )
    assert (s.log_format, s.log_level) == ("auto", "info")
    assert s.max_retries_override is None and s.warnings == []


def test_every_variable_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "FLAGSCHED_DATABASE_URL": "postgresql://u@h/d",
        "FLAG_SCHEDULE_MAX_RETRIES": "5",
        "FLAGSCHED_BATCH_SIZE": "250",
        "FLAGSCHED_RETRY_MAX_DELAY": "600",
        "FLAGSCHED_LOCK_TIMEOUT": "2.5",
        "FLAGSCHED_STATEMENT_TIMEOUT": "10",
        "FLAGSCHED_LOG_FORMAT": "JSON",
        "FLAGSCHED_LOG_LEVEL": "debug",
    }.items():
        monkeypatch.setenv(name, value)
    s = load_settings()
    assert s.database_url == "postgresql://u@h/d"
    assert s.max_retries_override == 5
    assert (s.batch_size, s.retry_max_delay, s.lock_timeout, s.statement_timeout) == (
        250,
        600,
        2.5,
        10,
    )
    assert (s.log_format, s.log_level) == ("json", "debug")


def test_flagsched_database_url_beats_database_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://fallback@h/d")
    assert load_settings().database_url == "postgresql://fallback@h/d"
    monkeypatch.setenv("FLAGSCHED_DATABASE_URL", "postgresql://primary@h/d")
    assert load_settings().database_url == "postgresql://primary@h/d"


def test_missing_url_is_one_line_naming_the_variable() -> None:
    with pytest.raises(ConfigError, match="FLAGSCHED_DATABASE_URL is not set"):
        load_settings().require_database_url()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("FLAGSCHED_BATCH_SIZE", "0"),
        ("FLAGSCHED_BATCH_SIZE", "1001"),
        ("FLAGSCHED_BATCH_SIZE", "many"),
        ("FLAGSCHED_RETRY_MAX_DELAY", "-1"),
        ("FLAGSCHED_LOCK_TIMEOUT", "0"),
        ("FLAGSCHED_STATEMENT_TIMEOUT", "soon"),
        ("FLAGSCHED_LOG_FORMAT", "xml"),
        ("FLAGSCHED_LOG_LEVEL", "loud"),
    ],
)
def test_bad_values_name_their_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert caught.value.message.startswith(f"{name}: ")
    assert "\n" not in caught.value.message
    assert caught.value.exit_code == 2


def test_a_bad_url_scheme_is_refused_without_echoing_the_url(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FLAGSCHED_DATABASE_URL", "mysql://root:hunter2@db/x")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "FLAGSCHED_DATABASE_URL" in caught.value.message
    assert "hunter2" not in caught.value.message


@pytest.mark.parametrize(
    ("raw", "value", "warns"),
    [
        (None, None, False),
        ("", None, False),
        ("0", 0, False),
        ("10", 10, False),
        ("11", None, True),
        ("-1", None, True),
        ("three", None, True),
        ("2.5", None, True),
    ],
)
def test_flag_schedule_max_retries(raw: str | None, value: int | None, warns: bool) -> None:
    parsed, warning = parse_max_retries(raw)
    assert parsed == value
    assert (warning is not None) == warns
    if warning:
        assert "FLAG_SCHEDULE_MAX_RETRIES" in warning


def test_a_bad_max_retries_is_a_warning_not_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLAG_SCHEDULE_MAX_RETRIES", "eleven")
    s = load_settings()
    assert s.max_retries_override is None
    assert s.warnings and "FLAG_SCHEDULE_MAX_RETRIES" in s.warnings[0]


@pytest.mark.parametrize(
    "raw",
    ["postgresql://u:p@h:5432/d", "postgres://u:p@h:5432/d", "postgresql+psycopg://u:p@h:5432/d"],
)
def test_all_accepted_schemes_reach_libpq_as_postgresql(raw: str) -> None:
    from psycopg.conninfo import conninfo_to_dict

    url = libpq_url(raw)
    assert url == "postgresql://u:p@h:5432/d"
    assert conninfo_to_dict(url) == {
        "user": "u",
        "password": "p",
        "host": "h",
        "port": "5432",
        "dbname": "d",
    }


def test_database_repr_hides_the_url() -> None:
    from flagsched.db import Database

    shown = repr(Database("postgresql://bob:s3cret@db/app"))
    assert "s3cret" not in shown and "lock_timeout" in shown
