"""Operator use cases: status, schedule, ramp, list, retry, cancel, prune, show, history.
Each owns its transactions."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, TypeVar

from flagsched import repository
from flagsched.approval import ApprovalPolicy
from flagsched.db import Conn, Database, begin, connection, transaction
from flagsched.errors import DatabaseError, FlagschedError, StatementFailed
from flagsched.logs import get_logger
from flagsched.model import (
    InvalidUpdates,
    OnConflict,
    ScheduleId,
    Status,
    Updates,
    clip,
)
from flagsched.rows import (
    ChangeRow,
    FailedRow,
    LockedSchedule,
    RecurrenceRow,
    ScheduleRow,
    ShownSchedule,
    StatusReport,
)
from flagsched.sql import current

PRUNE_BATCH = 5000


@dataclass(frozen=True, slots=True)
class Added:
    """A schedule or recurrence added: its id, and whether its flag exists yet."""

    id: ScheduleId
    flag_exists: bool


@dataclass(frozen=True, slots=True)
class AddedRecurrence(Added):
    """A recurrence added, with its first occurrence."""

    next_at: datetime


@dataclass(frozen=True, slots=True)
class RampStep:
    """One schedule of a ramp."""

    id: ScheduleId
    scheduled_at: datetime


@dataclass(frozen=True, slots=True)
class AddedRamp:
    """A ramp added: its group, its steps in order, whether its flag exists yet."""

    group_id: int
    steps: tuple[RampStep, ...]
    flag_exists: bool


@dataclass(frozen=True, slots=True)
class Pruned:
    """What `prune` deleted (with `dry_run`: would delete), and the batches it ran."""

    applied: int = 0
    cancelled: int = 0
    history: int = 0
    batches: int = 0


def status(database: Database, *, counts: bool = True) -> StatusReport:
    """The due count, the oldest due schedule's age and the next due time (index scans
    only); with `counts`, also the schedules per state (a pass over the whole table)."""
    with begin(database) as conn:
        repository.ensure_schema(conn)
        now = repository.db_now(conn)
        due = repository.backlog(conn, now=now)
        per_state = repository.state_counts(conn, now=now) if counts else None
    age = due.oldest_due_age_seconds
    return StatusReport(
        due=int(due.due),
        oldest_due_at=due.oldest_due_at,
        oldest_due_age_seconds=float(age) if age is not None else None,
        next_due_at=due.next_due_at,
        now=now,
        counts=per_state,
    )


@contextmanager
def _adding(database: Database, flag_key: str) -> Iterator[tuple[Conn, bool]]:
    """One transaction that adds something for `flag_key`, and whether that flag exists."""
    with begin(database) as conn:
        repository.ensure_schema(conn)
        exists = flag_key in repository.existing_flags(conn, [flag_key])
        if not exists and current().app_schedules is not None:
            # an application's schedules table references its flags: a schedule of a flag
            # that does not exist cannot be written there (on flagsched's own table it can,
            # and fails for good at its tick unless the flag appears first)
            raise FlagschedError(
                f"flag {clip(flag_key, 80)!r} does not exist in this deployment's flags: "
                "your schedules table refers to flags that exist; add the flag first"
            )
        yield conn, exists


def add_schedule(
    database: Database,
    *,
    flag_key: str,
    at: datetime | None,
    updates: Updates,
    max_retries: int | None,
    expires_after: timedelta | None = None,
    on_conflict: OnConflict = OnConflict.FAIL,
    needs_approval: bool = False,
) -> Added:
    """Insert a pending schedule."""
    with _adding(database, flag_key) as (conn, exists):
        new_id = repository.insert_schedule(
            conn,
            flag_key=flag_key,
            at=at,
            updates=updates,
            max_retries=max_retries,
            expires_after=expires_after,
            on_conflict=on_conflict,
            needs_approval=needs_approval,
        )
    get_logger().info(
        "schedule_added",
        schedule_id=new_id,
        flag_key=flag_key,
        updates=updates.as_json(),
        flag_exists=exists,
    )
    return Added(new_id, exists)


@dataclass(frozen=True, slots=True)
class Handled:
    """What an operator command did with one id."""

    id: ScheduleId
    ok: bool
    message: str
    subject: str | None = None  # what the line is about when not schedule `id`


def _each_locked(database: Database, ids: list[ScheduleId], act: Any) -> list[Handled]:
    """Run `act(conn, row)` per id, each in its own savepoint under the row's lock; a row a
    running tick holds is waited for (up to lock_timeout), so the tick's outcome is seen."""
    results: list[Handled] = []
    with connection(database) as conn:
        with transaction(database, conn):
            repository.ensure_schema(conn)
            # an application's rows no trigger noted, as the tick notes them first
            repository.note_unseen_schedules(conn, ids)
        for schedule_id in dict.fromkeys(ids):
            with transaction(database, conn):
                try:
                    with repository.savepoint(conn):
                        row = repository.lock_schedule(conn, schedule_id)
                        result = (
                            Handled(schedule_id, False, "refused: no such schedule")
                            if row is None
                            else act(conn, row)
                        )
                except StatementFailed as exc:
                    result = _busy(schedule_id, exc, f"schedule {schedule_id}")
            results.append(result)
    return results


def _busy(item: ScheduleId, exc: StatementFailed, what: str, subject: str | None = None) -> Handled:
    """A lock not granted in time is a refusal worth repeating; any other failed statement
    (a read-only database, a missing privilege) stops the command: it could not run."""
    if not exc.busy:
        raise DatabaseError(f"database error on {what}: {exc.message}") from exc
    return Handled(item, False, f"refused: busy, try again ({exc.message})", subject)


def retry(database: Database, ids: list[ScheduleId], *, force: bool = False) -> list[Handled]:
    """Failed schedules become pending again with retry_count 0."""
    log = get_logger()

    def act(conn: Any, row: LockedSchedule) -> Handled:
        if row.status != Status.FAILED:
            return Handled(row.id, False, f"refused: it is {row.status}, not failed")
        if not force and repository.newer_applied_exists(conn, row.id):
            return Handled(
                row.id,
                False,
                "refused: a later schedule of this flag was already applied, so retrying "
                "would undo newer state (use --force to retry anyway)",
            )
        repository.reset_for_retry(conn, row.id)
        log.info(
            "schedule_retried",
            schedule_id=row.id,
            flag_key=clip(row.flag_key),
            previous_status=row.status,
            previous_retry_count=row.retry_count,
            previous_next_retry_at=row.next_retry_at,
            forced=force,
        )
        return Handled(
            row.id, True, f"pending again (was failed, {row.retry_count} failed attempt(s))"
        )

    return _each_locked(database, ids, act)


def cancel(database: Database, ids: list[ScheduleId]) -> list[Handled]:
    """Pending or failed schedules become cancelled."""
    return _each_locked(database, ids, _cancel_act())


def _cancel_act() -> Callable[[Any, LockedSchedule], Handled]:
    log = get_logger()

    def act(conn: Any, row: LockedSchedule) -> Handled:
        if row.status not in (Status.PENDING, Status.FAILED):
            return Handled(row.id, False, f"refused: it is already {row.status}")
        repository.mark_cancelled(conn, row.id)
        log.info(
            "schedule_cancelled",
            schedule_id=row.id,
            flag_key=clip(row.flag_key),
            previous_status=row.status,
            previous_retry_count=row.retry_count,
        )
        return Handled(row.id, True, f"cancelled (was {row.status})")

    return act


def cancel_group(database: Database, group_id: int) -> list[Handled]:
    """Cancel every schedule of a group not yet applied (a ramp stops where it is)."""
    return _each_of_group(database, group_id, _cancel_act())


def _each_of_group(
    database: Database, group_id: int, act_on_one: Callable[[Any, LockedSchedule], Handled]
) -> list[Handled]:
    """`act_on_one` on every schedule of a group still open, each under its row lock; those
    already applied or cancelled are left as they are."""
    with begin(database) as conn:
        repository.ensure_schema(conn)
        members = repository.group_schedules(conn, group_id)
    if not members:
        return [Handled(group_id, False, "refused: no such group", subject=f"group {group_id}")]

    def act(conn: Any, row: LockedSchedule) -> Handled:
        if row.status in (Status.APPLIED, Status.CANCELLED):
            return Handled(row.id, True, f"left as it is: already {row.status}")
        return act_on_one(conn, row)

    return _each_locked(database, members, act)


CHECK_VIOLATION = "23514"  # the database refused an approval by the creator


def _open_or_refused(row: LockedSchedule) -> Handled | None:
    """A verdict is given on an open schedule (pending, or failed waiting for a retry)."""
    if row.status == Status.PENDING or (row.status == Status.FAILED and row.waiting):
        return None
    if row.status == Status.FAILED:
        return Handled(row.id, False, "refused: it failed for good")
    return Handled(row.id, False, f"refused: it is {row.status}")


def _approve_act(note: str | None) -> Callable[[Any, LockedSchedule], Handled]:
    log = get_logger()

    def act(conn: Any, row: LockedSchedule) -> Handled:
        refused = _open_or_refused(row)
        if refused is not None:
            return refused
        subject = repository.approval_subject(conn, row.id)
        if subject.rejected is not None:
            # the claim never applies a schedule with a rejection: an approval would not
            # make it apply (set back to pending by hand, or an id the application re-used)
            return Handled(
                row.id,
                False,
                f"refused: rejected by {subject.rejected}, which vetoes it: schedule the "
                "change again",
            )
        release = subject.awaiting and subject.created_by != subject.me
        if subject.approved is not None and not release:
            return Handled(row.id, False, f"refused: already approved by {subject.approved}")
        if subject.approved is not None:
            # Approved (a verdict inserted in psql) but still marked awaiting, which the claim
            # passes over: without this it would wait, approved, until it expired.
            repository.clear_awaiting(conn, row.id)
            return Handled(
                row.id,
                True,
                f"already approved by {subject.approved}; released: it applies at the next tick",
            )
        if subject.created_by == subject.me:
            return Handled(
                row.id,
                False,
                f"refused: four eyes: {subject.me} created it, so another login must approve it",
            )
        try:
            with repository.savepoint(conn):
                by = repository.add_verdict(conn, row.id, "approved", note)
        except StatementFailed as exc:
            if exc.sqlstate != CHECK_VIOLATION:
                raise
            return Handled(row.id, False, f"refused: {exc.message}")
        repository.clear_awaiting(conn, row.id)
        log.info(
            "schedule_approved",
            schedule_id=row.id,
            flag_key=clip(row.flag_key),
            approved_by=by,
            created_by=subject.created_by,
            was_awaiting=subject.awaiting,
        )
        then = "it applies at the next tick" if subject.awaiting else "it applies when due"
        return Handled(row.id, True, f"approved by {by}; {then}")

    return act


def approve(database: Database, ids: list[ScheduleId], *, note: str | None = None) -> list[Handled]:
    """Approve schedules as this login (never one it created): each applies when due."""
    return _each_locked(database, ids, _approve_act(note))


def approve_group(database: Database, group_id: int, *, note: str | None = None) -> list[Handled]:
    """Approve every open schedule of a group (a ramp is approved as a whole). A ramp is one
    flag's, made by one login: a group holding more (an operator may INSERT any group_id)
    is refused whole, so nothing slipped into it is approved unseen; approve those by id."""
    mixed = _mixed_group(database, group_id)
    if mixed is not None:
        return [Handled(group_id, False, f"refused: {mixed}", subject=f"group {group_id}")]
    return _each_of_group(database, group_id, _approve_act(note))


def _mixed_group(database: Database, group_id: int) -> str | None:
    """Why a group is not one ramp (None: its schedules share one flag and one creator)."""
    with begin(database) as conn:
        repository.ensure_schema(conn)
        shown = [
            s
            for s in (
                repository.show_schedule(conn, i)
                for i in repository.group_schedules(conn, group_id)
            )
            if s is not None
        ]
    kinds: dict[tuple[str, str | None], list[ScheduleId]] = {}
    for s in shown:
        kinds.setdefault((s.flag_key, s.created_by), []).append(s.id)
    if len(kinds) <= 1:
        return None
    parts = "; ".join(
        f"{clip(key, 100)} by {by or 'unknown'}: {', '.join(map(str, ids))}"
        for (key, by), ids in kinds.items()
    )
    return clip(
        f"it is not one ramp, its schedules are of more than one flag or creator ({parts}): "
        "approve them by id"
    )


def reject(database: Database, ids: list[ScheduleId], *, note: str) -> list[Handled]:
    """Reject schedules: each is cancelled, the verdict says who (this login) and why."""
    log = get_logger()

    def act(conn: Any, row: LockedSchedule) -> Handled:
        refused = _open_or_refused(row)
        if refused is not None:
            return refused
        by = repository.add_verdict(conn, row.id, "rejected", note)
        repository.mark_rejected(conn, row.id)
        log.info(
            "schedule_rejected",
            schedule_id=row.id,
            flag_key=clip(row.flag_key),
            rejected_by=by,
            note=clip(note),
        )
        return Handled(row.id, True, f"rejected by {by}: cancelled")

    return _each_locked(database, ids, act)


def cancel_recurrence(database: Database, recurrence_id: int) -> list[Handled]:
    """Stop a recurrence (it makes no more schedules) and cancel the schedules it made that
    are not yet applied."""
    subject = f"recurrence {recurrence_id}"
    with connection(database) as conn, transaction(database, conn):
        repository.ensure_schema(conn)
        try:
            with repository.savepoint(conn):
                row = repository.lock_recurrence(conn, recurrence_id)
                if row is None:
                    return [Handled(recurrence_id, False, "refused: no such recurrence", subject)]
                if row.cancelled_at is not None:
                    return [Handled(recurrence_id, False, "refused: already cancelled", subject)]
                cancelled = repository.cancel_recurrence(conn, recurrence_id)
        except StatementFailed as exc:
            return [_busy(recurrence_id, exc, subject, subject)]
    get_logger().info(
        "recurrence_cancelled",
        recurrence_id=recurrence_id,
        flag_key=row.flag_key,
        cancelled_schedule_ids=cancelled,
    )
    return [Handled(recurrence_id, True, "stopped: it makes no more schedules", subject)] + [
        Handled(i, True, f"cancelled (made by recurrence {recurrence_id})") for i in cancelled
    ]


def add_ramp(
    database: Database,
    *,
    flag_key: str,
    steps: list[Updates],
    start: datetime | None,
    every: timedelta,
    expires_after: timedelta | None,
    on_conflict: OnConflict,
    needs_approval: bool = False,
) -> AddedRamp:
    """All steps of a ramp in one transaction with one new group_id."""
    with _adding(database, flag_key) as (conn, exists):
        group_id, made = repository.insert_ramp(
            conn,
            flag_key=flag_key,
            start=start,
            every=every,
            steps=steps,
            expires_after=expires_after,
            on_conflict=on_conflict,
            needs_approval=needs_approval,
        )
    get_logger().info(
        "ramp_added",
        group_id=group_id,
        flag_key=flag_key,
        schedule_ids=[i for i, _ in made],
        flag_exists=exists,
    )
    return AddedRamp(group_id, tuple(RampStep(i, at) for i, at in made), exists)


def add_recurrence(
    database: Database,
    *,
    flag_key: str,
    cron: str,
    zone: str,
    updates: Updates,
    expires_after: timedelta | None,
    on_conflict: OnConflict,
    needs_approval: bool = False,
) -> AddedRecurrence:
    """A new recurrence whose next_at is its first occurrence after the database's now.
    `cron` and `zone` are valid."""
    from flagsched import recurring
    from flagsched.times import parse_zone

    with _adding(database, flag_key) as (conn, exists):
        next_at = recurring.next_after(cron, parse_zone(zone), repository.db_now(conn))
        new_id = repository.insert_recurrence(
            conn,
            flag_key=flag_key,
            cron=cron,
            timezone=zone,
            updates=updates,
            next_at=next_at,
            expires_after=expires_after,
            on_conflict=on_conflict,
            needs_approval=needs_approval,
        )
    get_logger().info(
        "recurrence_added",
        recurrence_id=new_id,
        flag_key=flag_key,
        cron=cron,
        timezone=zone,
        next_at=next_at,
        flag_exists=exists,
    )
    return AddedRecurrence(new_id, exists, next_at)


def list_failed(
    database: Database, *, permanent: bool | None, flag_key: str | None, limit: int
) -> list[FailedRow]:
    """Failed schedules, most recently failed first (`permanent`: only those failed for
    good, False: only those waiting for a retry, None: both)."""
    with begin(database) as conn:
        repository.ensure_schema(conn)
        return repository.list_failed(conn, permanent=permanent, flag_key=flag_key, limit=limit)


def list_schedules(
    database: Database, *, policy: ApprovalPolicy | None = None, **filters: Any
) -> list[ScheduleRow]:
    """`flagsched list`: see repository.list_schedules for the filters; each row with its
    verdicts and whether it needs approval (`policy` judged against the flags as they are)."""
    with begin(database) as conn:
        repository.ensure_schema(conn)
        rows = repository.list_schedules(conn, **filters)
        return _with_approvals(conn, rows, policy or ApprovalPolicy())


_Row = TypeVar("_Row", bound=ScheduleRow)


def _with_approvals(conn: Conn, rows: list[_Row], policy: ApprovalPolicy) -> list[_Row]:
    """Rows with `needs_approval` (asked for, or the policy judged now against each flag as
    it is) and `approvals` (the verdicts, oldest first)."""
    if not rows:
        return rows
    from flagsched import approval

    verdicts = repository.approvals_of(conn, [r.id for r in rows])
    # The flags are read only when the policy reads their values (a reader login may not
    # read them: `list` and `show` need no grant on feature_flags otherwise).
    keys = sorted({r.flag_key for r in rows}) if approval.depends_on_state(policy) else []
    flags = {
        f.key: approval.FlagState(f.enabled, f.rollout_percentage)
        for f in (repository.flags_now(conn, keys=keys) if keys else [])
    }
    judged = []
    members = repository.members()
    for row in rows:
        try:
            change = Updates.parse(row.updates, members)
        except InvalidUpdates:  # it fails for good when due: no approval can matter
            needs = row.approval_asked
        else:
            needs = (
                approval.reason(
                    policy,
                    row.flag_key,
                    flags.get(row.flag_key),
                    change,
                    explicit=row.approval_asked,
                )
                is not None
            )
        judged.append(replace(row, needs_approval=needs, approvals=verdicts.get(row.id, ())))
    return judged


def recurrences(database: Database) -> list[RecurrenceRow]:
    """Active recurrences with their next occurrence."""
    with begin(database) as conn:
        repository.ensure_schema(conn)
        return repository.list_recurrences(conn)


def prune(
    database: Database,
    *,
    older_than_days: float,
    dry_run: bool,
    history: bool = False,
    batch: int = PRUNE_BATCH,
) -> Pruned:
    """Delete old applied and cancelled schedules (with their attempts) and, with `history`,
    old feature_flag_changes rows, in batches, one transaction each (with dry_run: only
    count what would go)."""
    seconds = older_than_days * 86400
    total: Counter[str] = Counter()
    batches = 0
    with connection(database) as conn:
        with transaction(database, conn):
            repository.ensure_schema(conn)
            if dry_run:
                counts = Counter(repository.count_prunable(conn, older_than_seconds=seconds))
                if history:
                    counts["history"] = repository.count_prunable_history(
                        conn, older_than_seconds=seconds
                    )
                return Pruned(counts["applied"], counts["cancelled"], counts["history"])
        referenced: list[ScheduleId] = []  # kept: an application's foreign key refers to them
        while True:
            with transaction(database, conn):
                deleted, kept = repository.prune_batch(
                    conn, older_than_seconds=seconds, limit=batch, skip=referenced
                )
            if not deleted and not kept:
                break
            batches += 1
            total.update(deleted)
            referenced += kept
        while history:
            with transaction(database, conn):
                n = repository.prune_history_batch(conn, older_than_seconds=seconds, limit=batch)
            if not n:
                break
            batches += 1
            total["history"] += n
    get_logger().info(
        "prune_finished",
        deleted=total["applied"] + total["cancelled"],
        applied=total["applied"],
        cancelled=total["cancelled"],
        history=total["history"],
        kept_referenced=len(referenced),
        batches=batches,
        older_than_days=older_than_days,
    )
    return Pruned(total["applied"], total["cancelled"], total["history"], batches)


def show(
    database: Database, schedule_id: ScheduleId, *, policy: ApprovalPolicy | None = None
) -> ShownSchedule | None:
    """One schedule, its attempts, its verdicts and the history entries that applied it
    (None: unknown)."""
    with begin(database) as conn:
        repository.ensure_schema(conn)
        row = repository.show_schedule(conn, schedule_id)
        if row is None:
            return None
        changes = repository.changes_of(conn, schedule_id, row.flag_key)
        (row,) = _with_approvals(conn, [row], policy or ApprovalPolicy())
    return replace(row, changes=tuple(changes))


def history(
    database: Database,
    *,
    flag_key: str | None,
    since: datetime | None,
    limit: int,
    since_now: bool = False,
) -> list[ChangeRow]:
    """Changes of flags, newest first; `since_now`: from the database's now()."""
    with begin(database) as conn:
        repository.ensure_schema(conn)
        return repository.history(
            conn, flag_key=flag_key, since=since, since_now=since_now, limit=limit
        )


def _later(start: datetime, span: timedelta) -> datetime:
    """`start + span`, at most the latest time flagsched reads back (no overflow)."""
    from flagsched.times import LATEST

    try:
        return min(start + span, LATEST)
    except OverflowError:
        return LATEST


@dataclass(frozen=True, slots=True)
class Outlook:
    """What `plan` and `agenda` show: the projection from the database's now to `until`,
    and (for the page) the schedules failed for good that were due in the window."""

    now: datetime
    start: datetime
    until: datetime
    flags: list[Any]  # projection.FlagAhead, one per flag, by key
    failed: list[Any]  # rows.OpenSchedule
    # More open schedules were due by `until` than are read: (how many were read, the
    # scheduled_at of the last one); changes of schedules due after it are left out.
    cut: tuple[int, datetime] | None = None


def outlook(
    database: Database,
    *,
    until: datetime | None,
    until_now: bool = False,
    span: timedelta | None = None,
    start: datetime | None = None,
    flag_key: str | None = None,
    every_flag: bool = False,
    with_failed: bool = False,
    max_lateness_seconds: float | None = None,
    policy: ApprovalPolicy | None = None,
) -> Outlook:
    """One read-only transaction: the flags, their open schedules and recurrences, folded by
    `projection.project` up to `until` (None: `start` + `span`, or the database's now with
    `until_now`; `start` None: the database's now).
    `every_flag`: also flags that nothing is scheduled for."""
    from flagsched import projection

    with begin(database) as conn:
        repository.read_only(conn)
        repository.ensure_schema(conn)
        now = repository.db_now(conn)
        begins = start if start is not None else now
        if until is not None:
            end = until
        elif until_now:
            end = now
        else:
            end = _later(begins, span or timedelta(0))
        most = repository.AHEAD_LIMIT  # one more is read to know whether any was left out
        schedules = repository.schedules_ahead(conn, until=end, flag_key=flag_key, limit=most + 1)
        recurrences = repository.recurrences_ahead(conn, flag_key=flag_key)
        if every_flag and flag_key is None:
            flags = repository.flags_now(conn)
        else:
            keys = {s.flag_key for s in schedules} | {r.flag_key for r in recurrences}
            flags = repository.flags_now(conn, keys=[flag_key] if flag_key else sorted(keys))
        failed = (
            repository.failed_between(conn, start=begins, end=end, flag_key=flag_key)
            if with_failed
            else []
        )
    cut = None
    if len(schedules) > most:
        schedules = schedules[:most]
        cut = (most, schedules[-1].scheduled_at)
    lateness = None if max_lateness_seconds is None else timedelta(seconds=max_lateness_seconds)
    ahead = projection.project(
        flags,
        schedules,
        recurrences,
        max_lateness=lateness,
        now=now,
        until=end,
        start=begins,
        policy=policy,
        members=repository.members(),
    )
    if flag_key is not None:
        ahead = [a for a in ahead if a.flag_key == flag_key] or [
            projection.FlagAhead(flag_key, None, None, ())
        ]
    return Outlook(now=now, start=begins, until=end, flags=ahead, failed=failed, cut=cut)
