"""Pure time helpers: TIME in a zone (DST gaps and folds refused), DURATION, display."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flagsched.times import (
    InvalidTime,
    format_duration,
    format_time,
    instant,
    parse_duration,
    parse_time,
    parse_zone,
)

BERLIN = ZoneInfo("Europe/Berlin")


def test_a_local_time_in_a_zone_is_that_instant() -> None:
    assert parse_time("2026-03-29T09:00", BERLIN) == datetime(2026, 3, 29, 7, 0, tzinfo=UTC)
    assert parse_time("2026-01-10T09:00", BERLIN) == datetime(2026, 1, 10, 8, 0, tzinfo=UTC)
    # An explicit offset wins over the zone.
    assert parse_time("2026-01-10T09:00+00:00", BERLIN) == datetime(2026, 1, 10, 9, tzinfo=UTC)
    assert parse_time("now", BERLIN) is None
    assert parse_time(" NOW ") is None


def test_the_dst_gap_is_refused_naming_the_zone_and_both_instants() -> None:
    with pytest.raises(InvalidTime) as caught:
        parse_time("2026-03-29T02:30", BERLIN)
    message = str(caught.value)
    assert "Europe/Berlin" in message and "gap" in message
    assert "2026-03-29T01:30:00Z" in message and "2026-03-29T00:30:00Z" in message


def test_the_dst_fold_is_refused_naming_the_zone_and_both_instants() -> None:
    with pytest.raises(InvalidTime) as caught:
        parse_time("2026-10-25T02:30", BERLIN)
    message = str(caught.value)
    assert "Europe/Berlin" in message and "fold" in message
    assert "2026-10-25T00:30:00Z" in message and "2026-10-25T01:30:00Z" in message


def test_a_local_time_without_a_zone_is_refused() -> None:
    with pytest.raises(InvalidTime, match="no UTC offset"):
        parse_time("2030-01-01T09:00:00")


@pytest.mark.parametrize(
    "text", ["next tuesday", "0001-01-01T00:00:00+01:00", "9999-12-31T23:00:00-05:00", ""]
)
def test_unreadable_or_out_of_range_times_are_refused(text: str) -> None:
    with pytest.raises(InvalidTime):
        parse_time(text)


def test_an_out_of_range_time_names_the_bounds_it_missed() -> None:
    """9999-12-31 is a year 9999 date: the message gives the exact bounds, not the years."""
    with pytest.raises(InvalidTime, match=r"out of range \(0001-01-02 to 9999-12-30 in UTC\)"):
        parse_time("9999-12-31T00:00Z")


@pytest.mark.parametrize("name", ["Mars/Olympus", "", "../etc/passwd", "/etc/localtime", " UTC"])
def test_unknown_zones_are_refused(name: str) -> None:
    with pytest.raises(InvalidTime, match="IANA"):
        parse_zone(name)


def test_wall_clock_instants_fire_once_in_gaps_and_folds() -> None:
    # Inside the spring gap: the first instant after it (03:00 CEST = 01:00 UTC).
    assert instant(datetime(2026, 3, 29, 2, 30), BERLIN) == datetime(2026, 3, 29, 1, tzinfo=UTC)
    assert instant(datetime(2026, 3, 29, 2, 0), BERLIN) == datetime(2026, 3, 29, 1, tzinfo=UTC)
    # Inside the autumn fold: its first occurrence (CEST).
    assert instant(datetime(2026, 10, 25, 2, 30), BERLIN) == datetime(
        2026, 10, 25, 0, 30, tzinfo=UTC
    )


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("30m", 1800), ("2h", 7200), ("1d", 86400), ("1h30m", 5400), (" 2H ", 7200)],
)
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "0s", "5", "1.5h", "-1h", "1w", "h", "36501d", "1d 2h"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(InvalidTime):
        parse_duration(text)


def test_a_duration_too_long_is_refused_as_too_long() -> None:
    """Many digits are a duration still: the message says it is too long, not malformed."""
    for text in ("1000000000d", "99999999999999999999s"):
        with pytest.raises(InvalidTime, match="longer than 36500 days"):
            parse_duration(text)


@given(st.integers(min_value=1, max_value=36500 * 86400))
def test_a_duration_shown_reads_back_the_same(seconds: int) -> None:
    shown = format_duration(timedelta(seconds=seconds))
    assert shown is not None and parse_duration(shown) == timedelta(seconds=seconds)


def test_tables_show_utc_unless_a_zone_is_given() -> None:
    at = datetime(2026, 7, 1, 7, 0, tzinfo=UTC)
    assert format_time(at) == "2026-07-01T07:00:00Z"
    assert format_time(at, BERLIN) == "2026-07-01T09:00:00+02:00"
    assert format_time(None) is None
    assert format_time(datetime(9999, 12, 31, 23, tzinfo=UTC), BERLIN) == "9999-12-31T23:00:00Z"


@given(st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2100, 1, 1)))
def test_a_local_time_that_is_accepted_means_exactly_that_wall_clock(naive: datetime) -> None:
    try:
        value = parse_time(naive.isoformat(), BERLIN)
    except InvalidTime as exc:
        assert "gap" in str(exc) or "fold" in str(exc)
        return
    assert value is not None
    assert value.astimezone(BERLIN).replace(tzinfo=None) == naive
