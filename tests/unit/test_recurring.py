"""Cron arithmetic with an injected now: DST-correct occurrences, missed ones collapsed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flagsched.recurring import InvalidCron, due, latest_not_after, next_after, validate

BERLIN = ZoneInfo("Europe/Berlin")


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


def test_two_am_in_berlin_fires_once_a_day_across_both_transitions() -> None:
    """Each tick advances next_at from the tick's now; the instants are the SPEC's."""
    fired = []
    now = utc(2026, 3, 26, 12)
    next_at = next_after("0 2 * * *", BERLIN, now)
    while now < utc(2026, 10, 28):
        now += timedelta(minutes=7)  # ticks, not aligned with the occurrences
        if next_at <= now:
            occurrence = due("0 2 * * *", "Europe/Berlin", next_at, now)
            assert occurrence.fire_at is not None and occurrence.next_at is not None
            fired.append(occurrence.fire_at)
            next_at = occurrence.next_at
    days = [f.astimezone(BERLIN).date() for f in fired]
    assert len(days) == len(set(days)) == (datetime(2026, 10, 28) - datetime(2026, 3, 27)).days
    by_day = {f.astimezone(BERLIN).date().isoformat(): f for f in fired}
    assert by_day["2026-03-28"] == utc(2026, 3, 28, 1)  # CET
    assert by_day["2026-03-29"] == utc(2026, 3, 29, 1)  # 02:00 does not exist: 03:00 CEST
    assert by_day["2026-03-30"] == utc(2026, 3, 30, 0)  # CEST
    assert by_day["2026-10-25"] == utc(2026, 10, 25, 0)  # 02:00 twice: the first, CEST
    assert by_day["2026-10-26"] == utc(2026, 10, 26, 1)  # CET


def test_every_quarter_hour_through_the_gap_and_the_fold() -> None:
    gap = [next_after("*/15 * * * *", BERLIN, utc(2026, 3, 29, 0, 40))]
    while gap[-1] < utc(2026, 3, 29, 1, 30):
        gap.append(next_after("*/15 * * * *", BERLIN, gap[-1]))
    # 01:45 CET, then 02:00..02:45 (which do not exist) once, at 03:00 CEST, then 03:15 ...
    assert gap == [
        utc(2026, 3, 29, 0, 45),
        utc(2026, 3, 29, 1),
        utc(2026, 3, 29, 1, 15),
        utc(2026, 3, 29, 1, 30),
    ]
    fold = [next_after("*/15 * * * *", BERLIN, utc(2026, 10, 24, 23, 50))]
    while fold[-1] < utc(2026, 10, 25, 2, 15):
        fold.append(next_after("*/15 * * * *", BERLIN, fold[-1]))
    # 02:00..02:45 CEST once; the second pass through 02:xx (CET) does not fire again.
    first_pass = [utc(2026, 10, 25, 0, m) for m in (0, 15, 30, 45)]
    assert fold == [*first_pass, utc(2026, 10, 25, 2), utc(2026, 10, 25, 2, 15)]


def test_a_weekly_window_three_weeks_behind_fires_once_at_the_latest_occurrence() -> None:
    expr = "0 6 * * 1"  # Mondays 06:00
    next_at = utc(2026, 6, 1, 4)  # Monday 1 June, 06:00 CEST, three weeks ago
    now = utc(2026, 6, 24, 12)
    occurrence = due(expr, "Europe/Berlin", next_at, now)
    assert occurrence.fire_at == utc(2026, 6, 22, 4)
    assert occurrence.next_at == utc(2026, 6, 29, 4)
    assert due(expr, "Europe/Berlin", occurrence.next_at, now).fire_at is None


def test_a_recurrence_that_cannot_be_read_stops_with_a_reason() -> None:
    assert due("not cron", "UTC", utc(2026, 1, 1), utc(2026, 1, 2)).next_at is None
    stopped = due("0 2 * * *", "Nowhere/City", utc(2026, 1, 1), utc(2026, 1, 2))
    assert stopped.next_at is None and stopped.fire_at is None
    assert stopped.error is not None and "Nowhere/City" in stopped.error


@pytest.mark.parametrize(
    "expr", ["", "0 2 * *", "0 2 * * * *", "@daily", "61 * * * *", "0 0 31 2 *", "x y z a b"]
)
def test_invalid_expressions(expr: str) -> None:
    with pytest.raises(InvalidCron):
        validate(expr)


def test_validate_normalises_spacing() -> None:
    assert validate("  0   2 * *  1-5 ") == "0 2 * * 1-5"


@given(
    st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2090, 1, 1)),
    st.sampled_from(["Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "UTC"]),
    st.sampled_from(["0 2 * * *", "*/15 * * * *", "30 1 * * 0", "0 0 1 * *"]),
)
def test_latest_and_next_bracket_now(naive: datetime, name: str, expr: str) -> None:
    zone = ZoneInfo(name)
    now = naive.replace(tzinfo=UTC)
    latest, following = latest_not_after(expr, zone, now), next_after(expr, zone, now)
    assert latest is not None and latest <= now < following
    assert next_after(expr, zone, latest) >= following  # nothing between them


@given(
    st.datetimes(min_value=datetime(2001, 1, 1), max_value=datetime(2080, 1, 1)),
    st.lists(st.integers(min_value=1, max_value=3 * 24 * 60), min_size=1, max_size=25),
    st.sampled_from(["Europe/Berlin", "America/Santiago", "Asia/Kolkata", "UTC"]),
    st.sampled_from(["0 2 * * *", "*/20 * * * *", "30 2 * * 0", "0 0,12 * * 1-5"]),
)
def test_ticks_fire_the_latest_occurrence_since_the_last_tick_once(
    start: datetime, gaps: list[int], name: str, expr: str
) -> None:
    """Whatever the gaps between ticks: a tick fires iff an occurrence fell since the
    previous one, at the latest such occurrence; nothing fires twice."""
    now = start.replace(tzinfo=UTC)
    next_at = next_after(expr, ZoneInfo(name), now)
    fired: list[datetime] = []
    for gap in gaps:
        previous, now = now, now + timedelta(minutes=gap)
        if next_at > now:
            continue
        occurrence = due(expr, name, next_at, now)
        assert occurrence.error is None and occurrence.next_at is not None
        assert occurrence.fire_at is not None and previous < occurrence.fire_at <= now
        # Nothing between the fired occurrence and now: it is the latest one.
        assert next_after(expr, ZoneInfo(name), occurrence.fire_at) > now
        assert occurrence.next_at == next_after(expr, ZoneInfo(name), now)
        fired.append(occurrence.fire_at)
        next_at = occurrence.next_at
    assert fired == sorted(set(fired))
