"""Plain data: statuses, validated updates, claimed schedules, outcomes and reports. No I/O."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any

# last_error, and every log field or message quoting a stored value, holds at most this.
MAX_TEXT = 1000


def clip(text: str, limit: int = MAX_TEXT) -> str:
    """`text` cut to at most `limit` characters, saying how long it was when cut."""
    if len(text) <= limit:
        return text
    tail = f"... ({len(text)} characters)"
    if len(tail) >= limit:
        return text[: max(limit, 0)]
    return text[: limit - len(tail)] + tail


class Status(StrEnum):
    PENDING = "pending"
    APPLIED = "applied"
    FAILED = "failed"
    CANCELLED = "cancelled"


class OnConflict(StrEnum):
    """What the tick does with a schedule whose flag someone else changed since (SPEC Safety)."""

    FAIL = "fail"
    APPLY = "apply"


class InvalidUpdates(ValueError):
    """`updates` is not an object with enabled (boolean) and/or rollout_percentage (0..100)."""


ALLOWED_KEYS = ("enabled", "rollout_percentage")


@dataclass(frozen=True, slots=True)
class Members:
    """The members of `updates` on the tables flagsched runs on: how messages name them (the
    built-in names, or on an application's schedules table (shape 3) the names it writes,
    the configuration's `updates_enabled` and `updates_rollout`: flagsched reads them under
    the built-in ones), and whether a rollout can be set (a flags table may have no rollout
    column). Every message about a member is phrased with these, in `Updates.parse`."""

    enabled: str = "enabled"
    rollout: str = "rollout_percentage"
    rollout_column: bool = True

    def no_rollout_column(self) -> str:
        """Why a change asking for a rollout fails on a flags table without one."""
        return (
            f"updates sets {self.rollout}, but the flags table has no rollout column "
            f"(no `rollout` in [flags] of the configuration): only {self.enabled} can be "
            "scheduled"
        )


BUILT_IN_MEMBERS = Members()


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A stored JSON value the client could not read (e.g. nested thousands of levels deep):
    it stands in for the value, so one such row fails for good instead of stopping a tick."""

    reason: str

    def __str__(self) -> str:
        return f"(unreadable JSON: {self.reason})"


@dataclass(frozen=True, slots=True)
class Updates:
    """A validated change: None means "leave as it is"."""

    enabled: bool | None = None
    rollout_percentage: int | None = None

    @classmethod
    def parse(cls, value: object, members: Members = BUILT_IN_MEMBERS) -> Updates:
        """Strict validation of a schedule's `updates` (read under the built-in member
        names); no lax coercion ("yes", 12.5, "50"). A rollout on a flags table without one
        is refused too (it could never apply). Messages name the members as `members` has
        them."""
        if isinstance(value, Unreadable):
            raise InvalidUpdates(f"updates could not be read: {value.reason}")
        if not isinstance(value, dict):
            raise InvalidUpdates(f"updates must be a JSON object, got {_json_type(value)}")
        allowed = f"{members.enabled}, {members.rollout}"
        unknown = [k for k in value if k not in ALLOWED_KEYS]
        if unknown:
            # room for a built-in name the application's table does not use, as its view
            # shows one: `rollout_percentage (not a member this application uses)`
            shown = ", ".join(clip(str(k), 60) for k in sorted(unknown[:1000])[:5])
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            raise InvalidUpdates(f"updates has unknown key(s) {shown}{more}; allowed: {allowed}")
        if not value:
            raise InvalidUpdates(
                f"updates is empty; give {members.enabled} and/or {members.rollout}"
            )
        enabled = value.get("enabled")
        if "enabled" in value and not isinstance(enabled, bool):
            raise InvalidUpdates(f"{members.enabled} must be true or false, got {_show(enabled)}")
        rollout = None
        if "rollout_percentage" in value:
            rollout = percentage(value["rollout_percentage"])
            if rollout is None:
                raise InvalidUpdates(
                    f"{members.rollout} must be an integer 0..100, "
                    f"got {_show(value['rollout_percentage'])}"
                )
            if not members.rollout_column:
                raise InvalidUpdates(members.no_rollout_column())
        return cls(enabled=enabled, rollout_percentage=rollout)

    def as_json(self) -> dict[str, Any]:
        return {k: v for k in ALLOWED_KEYS if (v := getattr(self, k)) is not None}

    def words(self) -> str:
        """The change for a person: `on, rollout 25%`, `off`, `rollout 10%`."""
        parts = [] if self.enabled is None else ["on" if self.enabled else "off"]
        if self.rollout_percentage is not None:
            parts.append(f"rollout {self.rollout_percentage}%")
        return ", ".join(parts) or "nothing"


def percentage(value: object) -> int | None:
    """The one rule for rollout_percentage: a JSON number whose value is an integer 0..100,
    however it is spelled (50, 50.0 and 5e1 all mean 50); None for anything else (12.5,
    "50", true). Non-integral numbers arrive as Decimal (read exactly), so 50.000000000000001
    is not mistaken for 50."""
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
        return None
    if isinstance(value, float) and not value.is_integer():
        return None
    if isinstance(value, Decimal) and (not value.is_finite() or value != value.to_integral()):
        return None
    return int(value) if 0 <= value <= 100 else None


def _json_type(value: object) -> str:
    names = {
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        Decimal: "a number",
        dict: "an object",
        type(None): "null",
    }
    return names.get(type(value), type(value).__name__)


def _show(value: object) -> str:
    """A short, bounded quote of a JSON value: scalars as JSON, containers by their size
    (never walked: no depth or size of theirs can make the message long or recursive)."""
    import json

    if isinstance(value, list):
        return f"an array of {len(value)} item(s)"
    if isinstance(value, dict):
        return f"an object with {len(value)} key(s)"
    if isinstance(value, str):
        return json.dumps(clip(value, 80))
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"a number of about {int(value.bit_length() * 0.30103) + 1} digits"
    try:
        return clip(
            json.dumps(value)
            if value is None or isinstance(value, bool | int | float)
            else str(value),
            80,
        )
    except (TypeError, ValueError):
        return type(value).__name__


# A schedule's id as its table has it: an integer (flagsched's own schedules table, or an
# application's integer ids), or the text of an application's uuid or text id (read as text:
# flagsched.db), passed back to the database as it was read.
ScheduleId = int | str


def schedule_id(value: object) -> ScheduleId:
    """A schedule id as the database returned it (an integer stays one; anything else is
    its text)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else str(value)


def id_order(value: ScheduleId) -> tuple[int, str]:
    """A sort key for ids of one table: integers by value, text ids by their text."""
    return (value, "") if isinstance(value, int) else (0, value)


@dataclass(frozen=True, slots=True)
class Claimed:
    """A schedule claimed by a tick, with what the claim learned about its flag."""

    id: ScheduleId
    flag_key: str
    scheduled_at: datetime
    updates: object
    status: str
    retry_count: int
    max_retries: int
    next_retry_at: datetime | None
    blocked: bool  # an earlier schedule of the flag, outside this claim, is still open
    # Why the row cannot be read as it is stored (a time Python cannot hold, `updates` too
    # large to ship), decided by the claim's SQL; such a row fails for good, unattempted.
    defect: str | None = None
    attempts_made: int = 0  # attempts already kept with it (its retry_count resets on retry)
    # Four eyes (migration 0008): a tick already found it awaiting approval (claimed again
    # only once past its lateness), it was scheduled with --approval, it was approved.
    awaiting: bool = False
    needs_approval: bool = False
    approved: bool = False


# A stored time as read back: a datetime, or PostgreSQL's text of one Python cannot hold
# (infinity, BC, past year 9999), so a command that shows rows reads any row.
Time = datetime | str


def row_dict(row: Any) -> dict[str, Any]:
    """A typed row's fields as a dict, in column order (for JSON output)."""
    return {name: getattr(row, name) for name in row.__dataclass_fields__}


@dataclass(frozen=True, slots=True)
class DueRecurrence:
    """A recurrence a tick locked to materialise."""

    id: int
    flag_key: str
    cron: str
    timezone: str
    next_at: Time | None


@dataclass(frozen=True, slots=True)
class MadeSchedule:
    """A schedule a recurrence's occurrence became."""

    id: ScheduleId
    recurrence_id: int
    flag_key: str
    scheduled_at: datetime


@dataclass(frozen=True, slots=True)
class Backlog:
    """What is due at a time, and what is due next (index scans only)."""

    due: int
    oldest_due_at: Time | None
    oldest_due_age_seconds: Decimal | None
    next_due_at: Time | None


@dataclass(frozen=True, slots=True)
class AwaitingBacklog:
    """Due schedules awaiting approval, and how long the oldest has waited (index scans)."""

    n: int
    oldest_age_seconds: Decimal | None  # None: none awaits


class Outcome(StrEnum):
    APPLIED = "applied"
    RETRY = "retry"
    FAILED = "failed"
    HELD_BACK = "held_back"
    # Due, needing an approval it has not got: not attempted, no retry spent; it holds its
    # flag's later schedules back until approved, rejected or expired.
    AWAITING_APPROVAL = "awaiting_approval"


class Verdict(StrEnum):
    """Why one change of a batch's write did not apply (the apply statement's verdicts, and
    the tick's fallback's)."""

    MISSING = "missing"  # the flag does not exist: failed for good
    BUSY = "busy"  # another session holds the flag: waited for before the next claim
    EXPIRED = "expired"  # too late: failed for good, flag untouched
    CONFLICT = "conflict"  # someone else changed the flag since: failed for good
    ERROR = "error"  # the write failed: a retry, or failed for good when none is left
    FLAG_FAILED = "flag_failed"  # the flag's write failed on its own (the tick decides)
    HELD_BACK = "held_back"  # behind an earlier change of its flag that will be retried
    NOT_ATTEMPTED = "not_attempted"  # the tick stopped, or its flag's statement failed first
    DEFERRED = "deferred"  # its flag is held: left out of the batch, due again (tick.py)


@dataclass(frozen=True, slots=True)
class Change:
    """One claimed schedule's validated change, as the write receives it."""

    schedule: Claimed
    updates: Updates
    stop_on_failure: bool  # a failure will be retried: it holds the flag's later changes


NOTIFY_CHANNEL = "flagsched_flag_changes"
NOTIFY_LIMIT = 8000  # bytes; PostgreSQL refuses payloads of 8000 bytes or more


def change_notice(flag_keys: list[str]) -> str | None:
    """The NOTIFY payload for a batch that changed these flags; {"flags": null} when the
    keys would not fit (listeners then reload everything). None: nothing changed."""
    import json

    if not flag_keys:
        return None
    payload = json.dumps({"flags": sorted(set(flag_keys))}, ensure_ascii=False)
    if len(payload.encode()) >= NOTIFY_LIMIT:
        return '{"flags": null}'
    return payload


@dataclass(frozen=True, slots=True)
class Result:
    """What happened to one claimed schedule in this tick."""

    schedule: Claimed
    outcome: Outcome
    error: str | None = None
    next_retry_at: datetime | None = None
    max_retries: int | None = None  # the limit used when a failure was recorded


@dataclass(slots=True)
class TickReport:
    """Counts per outcome over every batch of one `flagsched process` run."""

    counts: Counter[str] = field(default_factory=Counter)
    held_back_ids: set[ScheduleId] = field(default_factory=set)
    batches: int = 0
    duration_seconds: float = 0.0
    interrupted_by: int | None = None  # signal number
    due_backlog: int | None = None  # due schedules left when the tick ended
    oldest_due_age_seconds: float | None = None
    # Four eyes: due schedules waiting for an approval when the tick ended, and how long the
    # oldest has waited (since a tick first found it so).
    awaiting_approval: int | None = None
    oldest_awaiting_approval_seconds: float | None = None

    def add(self, results: list[Result], *, batch: bool = True) -> list[Result]:
        """Count one batch (or, with `batch` false, schedules reported without a claim);
        returns the results to log. A schedule held back again in a later batch of the same
        tick is counted (and logged) once."""
        self.batches += batch
        held = Outcome.HELD_BACK
        new = [
            r for r in results if r.outcome is not held or r.schedule.id not in self.held_back_ids
        ]
        self.held_back_ids.update(r.schedule.id for r in new if r.outcome is held)
        self.counts.update(r.outcome.value for r in new)
        return new

    def count(self, outcome: Outcome) -> int:
        return self.counts.get(outcome.value, 0)
