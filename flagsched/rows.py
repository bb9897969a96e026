"""The rows the reading and operator commands show (list-failed, list, show, history,
status, recurrences, plan, agenda, retry, cancel), typed, read with psycopg's class_row. No
I/O. Apart from flagsched.model (what a tick needs) so that a cron run of `process` does
not build them: each dataclass costs its import about half a millisecond."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from flagsched.model import ScheduleId, Time


@dataclass(frozen=True, slots=True)
class FailedRow:
    """A schedule as `list-failed` shows it. `permanent`: failed for good."""

    id: ScheduleId
    flag_key: str
    scheduled_at: Time
    updates: object
    status: str
    retry_count: int
    max_retries: int
    next_retry_at: Time | None
    last_error: str | None
    applied_at: Time | None
    created_at: Time
    updated_at: Time
    permanent: bool


@dataclass(frozen=True, slots=True)
class ScheduleRow(FailedRow):
    """A schedule as `list` and `show` show it: list-failed's fields and the authoring ones."""

    group_id: int | None
    expires_at: Time | None
    on_conflict: str
    recurrence_id: int | None
    reviewed_at: Time | None
    approval_asked: bool  # scheduled with --approval (or made by a recurrence that was)
    created_by: str | None  # the login that inserted it (NULL: inserted before approvals)
    awaiting_approval: bool  # open, due, and a tick found it waiting for an approval
    approved: bool  # as the claim judges it (queries.sql `approved`: verdicts that count)
    # Judged by the command (the policy against the flag as it is now), and the verdicts.
    needs_approval: bool = False
    approvals: tuple[ApprovalRow, ...] = ()


@dataclass(frozen=True, slots=True)
class ApprovalRow:
    """One verdict on a schedule (feature_flag_approvals): who (a database login), when."""

    schedule_id: ScheduleId
    verdict: str  # approved, rejected
    by: str
    at: Time
    note: str | None

    def shown(self) -> dict[str, Any]:
        """As `show` and `list` print it: {verdict, by, at, note}."""
        return {"verdict": self.verdict, "by": self.by, "at": self.at, "note": self.note}


@dataclass(frozen=True, slots=True)
class ApprovalSubject:
    """What `approve` checks of a schedule it holds the lock of."""

    created_by: str | None
    needs_approval: bool  # scheduled with --approval
    awaiting: bool
    me: str  # this session's login
    approved: str | None  # "who at when" of an earlier approval
    rejected: str | None  # "who at when" of a rejection (it vetoes whenever given)


@dataclass(frozen=True, slots=True)
class ChangeRow:
    """One entry of the record (feature_flag_changes) as `history` and `show` show it."""

    id: int
    flag_key: str
    changed_at: Time
    actor: str | None
    old: object  # {"enabled", "rollout_percentage"} before, or None (the flag was made)
    new: object
    schedule_ids: list[ScheduleId]


@dataclass(frozen=True, slots=True)
class ShownSchedule(ScheduleRow):
    """`show ID`: the schedule, the attempts kept with it, the changes it made."""

    attempts: object = None
    changes: tuple[ChangeRow, ...] = ()


@dataclass(frozen=True, slots=True)
class LockedSchedule:
    """A schedule an operator command holds the row lock of."""

    id: ScheduleId
    flag_key: str
    scheduled_at: Time
    status: str
    retry_count: int
    max_retries: int
    next_retry_at: Time | None
    waiting: bool  # failed and waiting for a retry


@dataclass(frozen=True, slots=True)
class RecurrenceRow:
    """A recurrence as `recurrences` shows it."""

    id: int
    flag_key: str
    cron: str
    timezone: str
    updates: object
    next_at: Time | None
    expires_after: timedelta | str | None  # or PostgreSQL's text of one Python cannot hold
    on_conflict: str
    cancelled_at: Time | None
    created_at: Time


@dataclass(frozen=True, slots=True)
class StateCounts:
    """Schedules per state, as `status` counts them (a pass over the whole table)."""

    scheduled: int
    waiting_retry: int
    failed: int
    applied: int
    cancelled: int
    unknown: int  # a status outside the four
    awaiting_approval: int  # due, counted in due too: waiting for a second person


@dataclass(frozen=True, slots=True)
class StatusReport:
    """What `status` reports: the backlog at the database's `now` and, unless it ran as the
    health check (`--max-lag`), the counts per state."""

    due: int
    oldest_due_at: Time | None
    oldest_due_age_seconds: float | None
    next_due_at: Time | None
    now: datetime
    counts: StateCounts | None = None


# --- seeing ahead: the rows `plan` and `agenda` read (repository, class_row) -------------


@dataclass(frozen=True, slots=True)
class FlagRow:
    """A flag as it is now. None: unset (a nullable column of an application's flags
    table), or a flags table without a rollout column."""

    key: str
    enabled: bool | None
    rollout_percentage: int | None


@dataclass(frozen=True, slots=True)
class OpenSchedule:
    """A schedule `plan` and `agenda` fold: open (pending, or failed waiting for a retry), or
    failed for good (shown on the page, never folded). Times are clamped into years
    1..9999; `defect` says why the stored row cannot be read as it is (the tick fails such
    a row for good, unattempted)."""

    id: ScheduleId
    flag_key: str
    scheduled_at: datetime
    updates: object
    status: str
    next_retry_at: datetime | None
    expires_at: datetime | None
    reviewed_at: datetime | None
    group_id: int | None
    recurrence_id: int | None
    waiting: bool  # failed and waiting for a retry
    last_error: str | None
    defect: str | None
    # a change of its flag by another writer already recorded in its window: the tick will
    # fail it for good (on_conflict fail); the message the tick would write
    conflict: str | None = None
    # Four eyes: asked for with --approval; a tick found it awaiting approval; approved.
    needs_approval: bool = False
    awaiting: bool = False
    approved: bool = False


@dataclass(frozen=True, slots=True)
class ActiveRecurrence:
    """A recurrence not cancelled; `next_at` clamped into years 1..9999 (None: stopped)."""

    id: int
    flag_key: str
    cron: str
    timezone: str
    updates: object
    next_at: datetime | None
    expires_after: object  # a timedelta, or PostgreSQL's text of one Python cannot hold
    needs_approval: bool = False  # each schedule it makes needs approval
