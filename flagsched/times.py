"""Pure time helpers for every TIME and DURATION option: parse a time in a zone (refusing DST
gaps and folds), parse a duration, show a time in a zone. No I/O, no clock."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

# The latest instant every reader (Python, psycopg) can read back from timestamptz.
LATEST = datetime(9999, 12, 30, tzinfo=UTC)
EARLIEST = datetime(1, 1, 2, tzinfo=UTC)
# A DURATION beyond this is a typo, not a plan; it also keeps `now + DURATION` readable.
MAX_DURATION = timedelta(days=36500)

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"(?:(\d{1,30})([smhd]))+")  # too long: refused by MAX_DURATION
_PART = re.compile(r"(\d{1,30})([smhd])")


class InvalidTime(ValueError):
    """A TIME, zone or DURATION option that cannot be used; the message says why."""


def parse_zone(name: str) -> ZoneInfo:
    """An IANA time zone by name (Europe/Berlin, UTC)."""
    try:
        if not name or name != name.strip() or name.startswith(("/", ".")) or ".." in name:
            raise ValueError(name)
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise InvalidTime(
            f"{name!r} is not an IANA time zone (e.g. Europe/Berlin, America/New_York, UTC)"
        ) from None


def zone_name(zone: tzinfo) -> str:
    return getattr(zone, "key", None) or str(zone)


@dataclass(frozen=True, slots=True)
class Local:
    """Where a wall-clock time in a zone falls: one instant, none (a gap) or two (a fold)."""

    earlier: datetime  # UTC, with the offset in force before a transition
    later: datetime  # UTC, with the offset after it; equal to `earlier` for a plain time
    exists: bool  # False: the wall clock skips this time (a DST gap)

    @property
    def ambiguous(self) -> bool:
        return self.exists and self.earlier != self.later


def locate(naive: datetime, zone: tzinfo) -> Local:
    """Resolve a wall-clock time (no offset) in `zone`."""
    first = naive.replace(tzinfo=zone, fold=0)
    second = naive.replace(tzinfo=zone, fold=1)
    a, b = first.astimezone(UTC), second.astimezone(UTC)
    exists = a.astimezone(zone).replace(tzinfo=None) == naive
    return Local(earlier=min(a, b), later=max(a, b), exists=exists)


def first_instant_after_gap(naive: datetime, zone: tzinfo) -> datetime:
    """For a wall-clock time inside a gap: the instant the clock jumps (UTC)."""
    spot = locate(naive, zone)
    low, high = spot.earlier, spot.later  # the transition lies between them
    target = high.astimezone(zone).utcoffset()
    lo, hi = 0, int((high - low).total_seconds())
    while lo < hi:  # the first second whose offset is the one after the jump
        mid = (lo + hi) // 2
        if (low + timedelta(seconds=mid)).astimezone(zone).utcoffset() == target:
            hi = mid
        else:
            lo = mid + 1
    return low + timedelta(seconds=lo)


def instant(naive: datetime, zone: tzinfo) -> datetime:
    """The instant (UTC) a wall-clock time stands for when it must fire once: a time in a
    gap at the first instant after it, a time in a fold at its first occurrence."""
    spot = locate(naive, zone)
    if not spot.exists:
        return first_instant_after_gap(naive, zone)
    return spot.earlier


def parse_time(text: str, zone: tzinfo | None = None) -> datetime | None:
    """A TIME option: ISO 8601 with an offset, `now` (None: the database's now()), or with
    a zone a wall-clock time without offset. A DST gap or fold is refused, naming both
    candidate instants; so is a time PostgreSQL would store but no reader could read back."""
    stripped = text.strip()
    if stripped.lower() == "now":
        return None
    try:
        value = datetime.fromisoformat(stripped)
    except ValueError:
        raise InvalidTime(
            f"{text!r} is not an ISO 8601 time (e.g. 2026-12-01T09:00:00+01:00), nor now"
        ) from None
    if value.tzinfo is None or value.utcoffset() is None:
        if zone is None:
            raise InvalidTime(
                f"{text!r} has no UTC offset; add one (e.g. +00:00 or Z) or give --tz ZONE"
            )
        spot = locate(value, zone)
        name = zone_name(zone)
        if not spot.exists:
            raise InvalidTime(
                f"{stripped} does not exist in {name} (the clocks skip it, a DST gap); "
                f"it could mean {iso(spot.earlier)} or {iso(spot.later)}: give an offset"
            )
        if spot.ambiguous:
            raise InvalidTime(
                f"{stripped} happens twice in {name} (the clocks go back, a DST fold): "
                f"{iso(spot.earlier)} or {iso(spot.later)}: give an offset"
            )
        value = value.replace(tzinfo=zone)
    try:
        utc = value.astimezone(UTC)
    except OverflowError:
        utc = None
    if utc is None or not EARLIEST <= utc <= LATEST:
        raise InvalidTime(
            f"{text!r} is out of range ({EARLIEST.date().isoformat()} to "
            f"{LATEST.date().isoformat()} in UTC)"
        )
    return value


def parse_duration(text: str) -> timedelta:
    """A DURATION option: `90s`, `30m`, `2h`, `1d`, or a sum of them (`1h30m`); positive."""
    stripped = text.strip().lower()
    if not _DURATION.fullmatch(stripped):
        raise InvalidTime(f"{text!r} is not a duration (e.g. 90s, 30m, 2h, 1d, 1h30m)")
    seconds = sum(int(n) * _UNITS[unit] for n, unit in _PART.findall(stripped))
    if seconds <= 0:
        raise InvalidTime(f"{text!r} is not a positive duration")
    if seconds > MAX_DURATION.total_seconds():
        raise InvalidTime(f"{text!r} is longer than {MAX_DURATION.days} days")
    return timedelta(seconds=seconds)


def iso(value: datetime) -> str:
    """ISO 8601 in UTC with a Z."""
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def format_time(value: datetime | str | None, zone: tzinfo | None = None) -> str | None:
    """A time for a table: ISO 8601 in UTC, or in `zone` with its offset (a value Python
    cannot hold, such as infinity, comes as PostgreSQL's text and stays so)."""
    if value is None or isinstance(value, str):
        return value
    if zone is None:
        return iso(value)
    try:
        return value.astimezone(zone).isoformat()
    except OverflowError:  # near year 1 or 9999 the zone's offset does not fit
        return iso(value)


def format_duration(value: timedelta | str | None) -> str | None:
    """A stored interval back in DURATION form (1d2h, 90s); text it cannot read stays."""
    if value is None or isinstance(value, str):
        return value
    seconds = int(value.total_seconds())
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    return "".join(parts) or "0s"
