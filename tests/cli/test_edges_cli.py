"""Every numeric option and setting: nan, inf, huge or negative is exit 2 with one line,
before any database is touched; so is an empty flag key."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import Ran, invoke

CLOSED = "postgresql://u@127.0.0.1:1/db"  # were a value accepted, the command would exit 3

# (arguments before the option, the option) for every numeric option
OPTIONS = [
    (["process"], "--batch-size"),
    (["process"], "--max-batches"),
    (["status"], "--max-lag"),
    (["list-failed"], "--limit"),
    (["prune"], "--older-than"),
    (["schedule", "a", "--at", "now"], "--rollout"),
    (["schedule", "a", "--at", "now", "--enable"], "--max-retries"),
    (["history"], "--limit"),
    (["list"], "--limit"),
]
SETTINGS = [
    "FLAGSCHED_BATCH_SIZE",
    "FLAGSCHED_RETRY_MAX_DELAY",
    "FLAGSCHED_LOCK_TIMEOUT",
    "FLAGSCHED_STATEMENT_TIMEOUT",
    "FLAGSCHED_MAX_LATENESS",
]

# Values no numeric option or setting accepts: not finite, beyond every bound, or negative.
bad_numbers = st.one_of(
    st.sampled_from(["nan", "NaN", "inf", "-inf", "Infinity", "1e308", "1e400", "-1e308"]),
    st.integers(min_value=2**63).map(str),
    st.integers(max_value=-1).map(str),
    st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=False).map(repr),
    st.floats(min_value=1e19, allow_nan=False, allow_infinity=False).map(repr),
)


def assert_refused(ran: Ran) -> None:
    assert ran.code == 2, ran.stderr
    assert ran.stderr.count("\n") == 1 and ran.stderr.startswith("flagsched: error: ")
    assert "Traceback" not in ran.stderr and ran.stdout == ""


@settings(max_examples=120, deadline=None)
@given(where=st.sampled_from(OPTIONS), value=bad_numbers)
def test_every_numeric_option_refuses_nan_inf_huge_and_negative(
    where: tuple[list[str], str], value: str
) -> None:
    before, option = where
    ran = invoke(*before, f"{option}={value}", url=CLOSED)
    assert_refused(ran)
    assert option in ran.stderr


@settings(max_examples=80, deadline=None)
@given(variable=st.sampled_from(SETTINGS), value=bad_numbers)
def test_every_numeric_setting_refuses_nan_inf_huge_and_negative(variable: str, value: str) -> None:
    ran = invoke("process", env={variable: value}, url=CLOSED)
    assert_refused(ran)
    assert ran.stderr.startswith(f"flagsched: error: {variable}: ")


def test_timeouts_beyond_what_postgresql_accepts_are_settings_errors() -> None:
    for variable in ("FLAGSCHED_LOCK_TIMEOUT", "FLAGSCHED_STATEMENT_TIMEOUT"):
        assert_refused(invoke("process", env={variable: "2147484"}, url=CLOSED))
        ran = invoke("process", env={variable: "2147483"}, url=CLOSED)
        assert ran.code == 3 and "could not connect" in ran.stderr  # accepted: it got that far


def test_ids_beyond_bigint_are_usage_errors() -> None:
    for command in ("retry", "cancel"):
        ran = invoke(command, "99999999999999999999", url=CLOSED)
        assert_refused(ran)
        assert_refused(invoke(command, "0", url=CLOSED))


def test_an_empty_or_blank_flag_key_is_refused() -> None:
    for key in ("", " ", "\t"):
        ran = invoke("schedule", key, "--at", "now", "--enable", url=CLOSED)
        assert_refused(ran)
        assert "FLAG_KEY" in ran.stderr


def test_usage_errors_are_one_line_naming_the_help() -> None:
    ran = invoke("status", "--max-lag", "nan", url=CLOSED)
    assert_refused(ran)
    assert "not a finite number" in ran.stderr and "`flagsched status --help`" in ran.stderr
    assert_refused(invoke("no-such-command", url=CLOSED))


@pytest.fixture
def database_url(shaped_database_url: str) -> str:
    """Every test here on the built-in tables and on your own flags table (issue 18)."""
    return shaped_database_url
