"""Pure cron arithmetic for recurring schedules: occurrences of a 5-field cron expression in
a time zone, DST-correct, with `now` passed in. croniter is imported only when needed, so a
tick with no due recurrence never loads it (cold start).

Occurrences are found on the wall clock of the zone, then turned into instants: a wall-clock
time in a gap fires once at the first instant after the gap, a time in a fold fires once, at
its first occurrence (`times.instant`). Several wall-clock times that land on the same
instant (every 15 minutes inside a gap) are one occurrence."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo
from typing import Any

from flagsched.times import InvalidTime, instant

# More than any DST shift: wall-clock times within this of `now` may map either side of it.
_MARGIN = timedelta(hours=3)


class InvalidCron(ValueError):
    """Not a standard 5-field cron expression that ever fires."""


def _iterator(expr: str, start: datetime) -> Any:
    from croniter import croniter

    return croniter(expr, start)


def validate(expr: str) -> str:
    """The expression, normalised to single spaces, or InvalidCron saying why."""
    from croniter import croniter

    fields = expr.split()
    if len(fields) != 5:
        raise InvalidCron(
            f"{expr!r} is not a 5-field cron expression (minute hour day month weekday, "
            "e.g. '0 2 * * *')"
        )
    normal = " ".join(fields)
    if not croniter.is_valid(normal):
        raise InvalidCron(f"{expr!r} is not a valid cron expression")
    try:
        _iterator(normal, datetime(2000, 1, 1)).get_next(datetime)
    except (ValueError, OverflowError):
        raise InvalidCron(f"{expr!r} never fires") from None
    return normal


def _wall(value: datetime, zone: tzinfo) -> datetime:
    return value.astimezone(zone).replace(tzinfo=None)


def _margin(zone: tzinfo, now: datetime) -> timedelta:
    """No offset change near `now`: wall clock and instants agree, no margin is needed."""
    before = (now - _MARGIN).astimezone(zone).utcoffset()
    after = (now + _MARGIN).astimezone(zone).utcoffset()
    return timedelta(0) if before == after else _MARGIN


def next_after(expr: str, zone: tzinfo, now: datetime) -> datetime:
    """The first occurrence strictly after `now` (UTC)."""
    it = _iterator(expr, _wall(now, zone) - _margin(zone, now))
    while True:
        at = instant(it.get_next(datetime), zone)
        if at > now:
            return at


def latest_not_after(expr: str, zone: tzinfo, now: datetime) -> datetime | None:
    """The latest occurrence at or before `now` (UTC), None when it never fired."""
    start = _wall(now, zone) + _margin(zone, now) + timedelta(microseconds=1)
    it = _iterator(expr, start)
    while True:
        try:
            at = instant(it.get_prev(datetime), zone)
        except (ValueError, OverflowError):
            return None
        if at <= now:
            return at


@dataclass(frozen=True, slots=True)
class Occurrence:
    """What a tick does with a due recurrence: make a schedule at `fire_at` (None: none,
    it has not fired since next_at), then wait for `next_at` (None: it never fires again,
    `error` says why)."""

    fire_at: datetime | None
    next_at: datetime | None
    error: str | None = None


def due(expr: str, zone_name: str, next_at: datetime | None, now: datetime) -> Occurrence:
    """The materialisation of one due recurrence (its `next_at <= now`; None: earlier than
    any time Python holds): missed occurrences collapse into the latest one not after now;
    next_at moves to the first after now."""
    around = _around(expr, zone_name, now)
    if around.error is not None:
        return around
    latest = around.fire_at
    fire = latest if latest is not None and (next_at is None or latest >= next_at) else None
    return Occurrence(fire, around.next_at)


@functools.lru_cache(maxsize=4096)
def _around(expr: str, zone_name: str, now: datetime) -> Occurrence:
    """The latest occurrence not after `now` and the first after it. The same for every
    recurrence of one (cron, zone) at one `now`: a tick of 50,000 due recurrences computes
    it once per distinct pair, not once per row (croniter is the cost)."""
    from flagsched.times import parse_zone

    try:
        zone = parse_zone(zone_name)
        normal = validate(expr)
        return Occurrence(latest_not_after(normal, zone, now), next_after(normal, zone, now))
    except (InvalidTime, InvalidCron) as exc:
        return Occurrence(None, None, str(exc))
    except (ValueError, OverflowError) as exc:  # croniter's own errors, years past 9999
        return Occurrence(None, None, f"{expr!r} in {zone_name}: {exc}")


def occurrences(expr: str, zone: tzinfo, after: datetime, until: datetime) -> Iterator[datetime]:
    """Every occurrence strictly after `after` up to `until` (UTC), in order: the instants
    `next_after` gives one by one, from one cron iterator."""
    it = _iterator(expr, _wall(after, zone) - _margin(zone, after))
    last = after
    while True:
        try:
            at = instant(it.get_next(datetime), zone)
        except (ValueError, OverflowError):  # past year 9999
            return
        if at > until:
            return
        if at > last:  # wall-clock times in one gap land on one instant: once
            last = at
            yield at
