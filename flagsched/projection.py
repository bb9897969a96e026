"""Seeing ahead, pure: what every flag will be at a later time if what is scheduled happens as
scheduled. One function, `project`, folds the open schedules and the recurrences' coming
occurrences onto the flags as they are now, following the tick's rules: per flag in
(scheduled_at, id) order, a change held back while an earlier one of its flag is still open,
a retry at its `next_retry_at`, lateness and expiry judged when the change could apply.
`plan` and `agenda` are two readings of its result. No I/O, no clock: `now` is passed in.

A change whose moment cannot be foreseen is `held`, and holds every change of its flag
behind it: a change awaiting approval (four eyes: asked for with --approval, or the
`[approval]` policy judged, as the tick judges it, against the state the flag has when the
change comes due) that has none. It waits until someone approves it, or until it expires
(its expires_at, or FLAGSCHED_MAX_LATENESS): then it `expires` and frees its flag."""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum

from flagsched import approval, recurring
from flagsched.approval import ApprovalPolicy
from flagsched.model import (
    BUILT_IN_MEMBERS,
    InvalidUpdates,
    Members,
    ScheduleId,
    Updates,
    clip,
    id_order,
)
from flagsched.rows import (
    ActiveRecurrence,
    FlagRow,
    OpenSchedule,
)
from flagsched.times import InvalidTime, parse_zone

# The error of a held change that waits for a second person (agenda's status says so too).
AWAITING_APPROVAL = "awaiting approval"

# A recurrence firing every minute makes 10,080 occurrences a week; past this many per
# recurrence and projection the rest are left out (each sets the same values again).
MAX_OCCURRENCES = 2000
# ... and all recurrences of one projection share this many (200 recurrences every minute
# would otherwise list 400,000: half a minute of cron arithmetic and over 500 MB).
MAX_TOTAL_OCCURRENCES = 20_000
_ERROR_TEXT = 200
# The repository clamps stored times into what Python holds; a retry at the upper clamp was
# stored after year 9999 (or as infinity).
_UNTIMED = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)
_EARLIEST = datetime(1, 1, 1, tzinfo=UTC)
_TICK = timedelta(microseconds=1)  # the finest step of a stored time
# PostgreSQL's timestamptz range (4713 BC .. 294276 AD) in days from 0001-01-01: a
# recurrence whose expiry lands outside it is stopped by the tick (timestamp out of range).
_PG_FIRST_DAY = -4713 * 365.2425
_PG_LAST_DAY = 294275 * 365.2425


class Outcome(StrEnum):
    """What a coming change will do when its turn comes."""

    APPLIES = "applies"
    EXPIRES = "expires"  # past its expires_at / FLAGSCHED_MAX_LATENESS: fails, flag untouched
    HELD = "held"  # still held back at the horizon behind an earlier change of its flag
    FAILS = "fails"  # fails for good: the flag does not exist, or `updates` is invalid


class Kind(StrEnum):
    """Where a coming change comes from (agenda's `status`)."""

    PENDING = "pending"
    RETRYING = "retrying"
    RECURRING = "recurring"  # an occurrence of a recurrence not yet turned into a schedule


@dataclass(frozen=True, slots=True)
class State:
    enabled: bool | None  # None: unset (see FlagRow)
    rollout_percentage: int | None

    def folded(self, change: Updates) -> State:
        return State(
            self.enabled if change.enabled is None else change.enabled,
            (
                self.rollout_percentage
                if change.rollout_percentage is None
                else change.rollout_percentage
            ),
        )

    def as_json(self) -> dict[str, object]:
        return {"enabled": self.enabled, "rollout_percentage": self.rollout_percentage}


@dataclass(frozen=True, slots=True)
class Step:
    """One coming change of a flag and what it does. `at`: when it applies (or fails, or
    expires); for a held change, when it comes due. `scheduled_at`: the schedule's, or the
    occurrence's time. `after`: the flag's state once it did (None: the flag does not
    exist)."""

    at: datetime
    scheduled_at: datetime
    flag_key: str
    kind: Kind
    schedule_id: ScheduleId | None
    recurrence_id: int | None
    group_id: int | None
    stored: object  # `updates` as stored (for a valid one, the values it sets)
    change: Updates | None  # None: invalid, `error` says why
    outcome: Outcome
    error: str | None
    after: State | None


@dataclass(frozen=True, slots=True)
class FlagAhead:
    """A flag's state now, at the horizon, and the changes between, in the order they come."""

    flag_key: str
    now: State | None  # None: no such flag (its changes fail)
    at: State | None
    steps: tuple[Step, ...]


@dataclass(frozen=True, slots=True)
class _Item:
    """A change in its flag's queue before it is judged."""

    # (scheduled_at, 0, id) or (occurrence, 1, recurrence), ids as model.id_order sorts them
    order: tuple[datetime, int, tuple[int, str]]
    ready_at: datetime | None  # when it is due on its own; None: cannot be foreseen
    kind: Kind
    schedule_id: ScheduleId | None
    recurrence_id: int | None
    group_id: int | None
    stored: object
    change: Updates | None  # `stored` read as a change (None: it is not one)
    invalid: str | None  # why it is not (its members named as the schedules table has them)
    expires_at: datetime | None
    late_from: datetime  # lateness counts from here (scheduled_at, or the last retry)
    defect: str | None
    conflict: str | None = None  # already in conflict: the tick fails it for good
    # Four eyes: asked for with --approval, a tick already found it awaiting, approved.
    needs_approval: bool = False
    awaiting: bool = False
    approved: bool = False


def _parsed(stored: object, members: Members) -> tuple[Updates | None, str | None]:
    try:
        return Updates.parse(stored, members), None
    except InvalidUpdates as exc:
        return None, clip(str(exc), _ERROR_TEXT)


def _change(item: _Item) -> tuple[Updates | None, str | None]:
    return item.change, item.invalid


def _schedule_item(row: OpenSchedule, members: Members) -> _Item:
    late_from = max(row.scheduled_at, row.reviewed_at or row.scheduled_at)
    retrying = row.status == "failed" and row.waiting
    ready = row.next_retry_at if retrying else row.scheduled_at
    if retrying and ready is not None and ready >= _UNTIMED:
        # a retry timed after year 9999 cannot be timed: the next tick claims it and fails
        # it for good (it would otherwise hold its flag back for ever)
        ready = _EARLIEST
    change, invalid = _parsed(row.updates, members)
    return _Item(
        order=(row.scheduled_at, 0, id_order(row.id)),
        ready_at=ready,
        kind=Kind.RETRYING if retrying else Kind.PENDING,
        schedule_id=row.id,
        recurrence_id=row.recurrence_id,
        group_id=row.group_id,
        stored=row.updates,
        change=change,
        invalid=invalid,
        expires_at=row.expires_at,
        late_from=late_from,
        defect=row.defect,
        conflict=row.conflict,
        needs_approval=row.needs_approval,
        awaiting=row.awaiting,
        approved=row.approved,
    )


def occurrence_times(
    r: ActiveRecurrence,
    *,
    now: datetime,
    until: datetime,
    start: datetime | None = None,
    anchors: Iterable[datetime] = (),
    cap: int = MAX_OCCURRENCES,
) -> list[datetime]:
    """The occurrences of a recurrence the ticks will turn into schedules up to `until`,
    with the tick's own arithmetic: a `next_at` already passed fires once, at the latest
    occurrence not after now; a `next_at` still to come fires at the first occurrence not
    before it (a tick finds no occurrence between next_at and the one before it); then
    every occurrence after that. An expression or zone the tick cannot use never fires.

    Every occurrence sets the same values, so only some are listed: from `start` (the window
    shown, default now) at most `cap`; before `start` and past the cap, only the
    latest occurrence before each of `anchors` (the times of the flag's other changes), before
    `start`, and up to `until`: the flag's state at every change and at the horizon is as
    if every occurrence were listed."""
    try:
        zone = parse_zone(r.timezone)
        expr = recurring.validate(r.cron)
    except (InvalidTime, recurring.InvalidCron):
        return []
    if r.next_at is None:
        return []
    first: datetime | None = None
    if r.next_at > now:
        after = r.next_at - _TICK  # the first occurrence at or after next_at fires
    else:
        due = recurring.due(expr, r.timezone, r.next_at, now)
        if due.next_at is None:
            return []
        first, after = due.fire_at, now
    if first is not None and first > until:
        return []

    def latest(moment: datetime) -> datetime | None:
        try:
            found = recurring.latest_not_after(expr, zone, moment)
        except (ValueError, OverflowError):
            return None
        return found if found is not None and after < found <= until else None

    def latest_before(moments: Iterable[datetime]) -> set[datetime]:
        found: set[datetime] = set()
        following: datetime | None = None  # the occurrence after the last one found
        for moment in sorted(set(moments)):
            if following is not None and moment < following:
                continue  # the same latest occurrence as the moment before
            t = latest(moment)
            if t is None:
                continue
            found.add(t)
            try:
                following = recurring.next_after(expr, zone, t)
            except (ValueError, OverflowError):
                break
        return found

    times: set[datetime] = set() if first is None else {first}
    begin = max(after, (start or now) - _TICK)
    if begin > after:  # before the window: the latest occurrence before each change
        times |= latest_before(a for a in (*anchors, begin) if after < a <= begin)
    shown = 0
    try:
        for at in recurring.occurrences(expr, zone, begin, until):
            if shown >= cap:
                # past the cap: only what decides the state at each later change
                times |= latest_before((*(a for a in anchors if a > at), until))
                break
            times.add(at)
            shown += 1
    except (ValueError, OverflowError):  # croniter's own errors, years past 9999
        pass
    return sorted(times)


def _recurrence_items(
    r: ActiveRecurrence,
    *,
    now: datetime,
    until: datetime,
    start: datetime | None = None,
    anchors: Iterable[datetime] = (),
    cap: int = MAX_OCCURRENCES,
    members: Members = BUILT_IN_MEMBERS,
) -> list[_Item]:
    expires_after = r.expires_after
    change, invalid = _parsed(r.updates, members)
    if expires_after is not None and not isinstance(expires_after, timedelta):
        return []  # an interval Python cannot hold moves any time out of PostgreSQL's range
    items = []
    times = occurrence_times(r, now=now, until=until, start=start, anchors=anchors, cap=cap)
    for at in times:
        expires_at: datetime | None = None
        if expires_after is not None:
            days = (at - _EARLIEST) / timedelta(days=1) + expires_after / timedelta(days=1)
            if not _PG_FIRST_DAY <= days <= _PG_LAST_DAY:
                break  # the tick's `at + expires_after` is out of range: it stops the recurrence
            try:
                expires_at = at + expires_after
            except OverflowError:  # within PostgreSQL, not Python: before year 1 or after 9999
                expires_at = _EARLIEST if expires_after < timedelta(0) else None
        items.append(
            _Item(
                order=(at, 1, id_order(r.id)),
                ready_at=at,
                kind=Kind.RECURRING,
                schedule_id=None,
                recurrence_id=r.id,
                group_id=None,
                stored=r.updates,
                change=change,
                invalid=invalid,
                expires_at=expires_at,
                late_from=at,
                defect=None,
                needs_approval=r.needs_approval,
            )
        )
    return items


def _expired(item: _Item, at: datetime, max_lateness: timedelta | None) -> str | None:
    if item.expires_at is not None:
        if at > item.expires_at:
            return "past its expires_at"
        return None
    if max_lateness is not None and at - item.late_from > max_lateness:
        return "later than FLAGSCHED_MAX_LATENESS"
    return None


def _walk(
    key: str,
    now_state: State | None,
    items: Iterable[_Item],
    *,
    max_lateness: timedelta | None,
    now: datetime,
    until: datetime,
    policy: ApprovalPolicy | None = None,
) -> FlagAhead:
    """The tick's per-flag order, replayed in time: at each moment the first open change of
    the flag (by (scheduled_at, id)) is the only one that may apply; a recurrence's
    occurrence joins the queue only when the tick makes it a schedule (at its time), so it
    never holds back a change that was already free to apply before it existed."""
    state = now_state
    arrivals = sorted(items, key=lambda i: (_exists(i, now), i.order))
    queue: list[tuple[tuple[datetime, int, tuple[int, str]], int, _Item]] = []
    admitted, t = 0, now

    def admit(upto: datetime) -> None:
        nonlocal admitted
        while admitted < len(arrivals) and _exists(arrivals[admitted], now) <= upto:
            item = arrivals[admitted]
            heapq.heappush(queue, (item.order, admitted, item))
            admitted += 1

    steps: list[Step] = []
    pushed = len(arrivals)  # heap tie-breakers of changes put back (awaiting, then expiring)
    admit(t)
    while queue or admitted < len(arrivals):
        arriving = _exists(arrivals[admitted], now) if admitted < len(arrivals) else None
        head = queue[0][2] if queue else None
        ready = None if head is None or head.ready_at is None else max(head.ready_at, t)
        if arriving is not None and (ready is None or arriving < ready):
            t = max(t, arriving)  # something may join ahead of the head before it is ready
            admit(t)
            continue
        if head is None or ready is None or ready > until:
            break  # the head cannot be foreseen, or comes after the horizon
        heapq.heappop(queue)
        t = ready
        why = _awaits(policy, key, head, state)
        if why is not None:  # not applied: it waits for a person, or until it expires
            expiry = _expiry(head, max_lateness)
            if expiry is not None and max(expiry + _TICK, t) <= until:
                late = replace(head, ready_at=max(expiry + _TICK, t), approved=True)
                heapq.heappush(queue, (head.order, pushed, late))
                pushed += 1
                continue
            steps.append(_held(key, head, t, state, f"{AWAITING_APPROVAL}: {why}"))
            break
        step, state = _judge(key, head, ready, state, max_lateness)
        steps.append(step)
    for _, _, item in sorted(queue, key=lambda q: q[0]):  # still open at the horizon
        own = item.ready_at
        if own is not None and own <= until:
            steps.append(_held(key, item, max(own, now), state))
    return FlagAhead(key, now_state, state, tuple(steps))


def _awaits(
    policy: ApprovalPolicy | None, key: str, item: _Item, state: State | None
) -> str | None:
    """Why the change, its turn come, waits for an approval it has not got (None: it does
    not), judged as the tick judges it: against the flag's state then. A change that fails
    for good anyway (invalid, a stored defect) is not judged."""
    change, _ = _change(item)
    if item.approved or change is None or item.defect is not None:
        return None
    before = None if state is None else approval.FlagState(state.enabled, state.rollout_percentage)
    why = approval.reason(
        policy or ApprovalPolicy(), key, before, change, explicit=item.needs_approval
    )
    if why is None and item.awaiting:  # the policy no longer asks, but the tick's mark holds
        return "a tick found it needing approval when it was due"
    return why


def _expiry(item: _Item, max_lateness: timedelta | None) -> datetime | None:
    """The last moment the change may still apply (None: it never expires)."""
    if item.expires_at is not None:
        return item.expires_at
    if max_lateness is None:
        return None
    try:
        return item.late_from + max_lateness
    except OverflowError:
        return None


def _exists(item: _Item, now: datetime) -> datetime:
    """When the change is in its flag's queue: a schedule now, an occurrence at its time."""
    return max(item.order[0], now) if item.kind is Kind.RECURRING else now


def _judge(
    key: str,
    item: _Item,
    at: datetime,
    state: State | None,
    max_lateness: timedelta | None,
) -> tuple[Step, State | None]:
    """What the change does when its turn comes at `at`, and the flag's state after it."""
    change, error = _change(item)
    outcome = Outcome.APPLIES
    if item.defect is not None:
        outcome, error = Outcome.FAILS, clip(item.defect, _ERROR_TEXT)
    elif change is None:
        outcome = Outcome.FAILS
    elif state is None:
        outcome, error = Outcome.FAILS, "the flag does not exist"
    elif (late := _expired(item, at, max_lateness)) is not None:
        outcome, error = Outcome.EXPIRES, late
    elif item.conflict is not None:  # checked after lateness, as the tick does
        outcome, error = Outcome.FAILS, clip(item.conflict, _ERROR_TEXT)
    else:
        state = state.folded(change)
    return _step(key, item, at, change, outcome, error, state), state


def _held(key: str, item: _Item, at: datetime, state: State | None, why: str | None = None) -> Step:
    change, _ = _change(item)
    return _step(key, item, at, change, Outcome.HELD, why, state)


def _step(
    key: str,
    item: _Item,
    at: datetime,
    change: Updates | None,
    outcome: Outcome,
    error: str | None,
    after: State | None,
) -> Step:
    return Step(
        at=at,
        scheduled_at=item.order[0],
        flag_key=key,
        kind=item.kind,
        schedule_id=item.schedule_id,
        recurrence_id=item.recurrence_id,
        group_id=item.group_id,
        stored=item.stored if change is None else change.as_json(),
        change=change,
        outcome=outcome,
        error=error,
        after=after,
    )


def project(
    flags: Sequence[FlagRow],
    schedules: Sequence[OpenSchedule],
    recurrences: Sequence[ActiveRecurrence],
    *,
    max_lateness: timedelta | None,
    now: datetime,
    until: datetime,
    start: datetime | None = None,
    policy: ApprovalPolicy | None = None,
    members: Members = BUILT_IN_MEMBERS,
) -> list[FlagAhead]:
    """Every flag named by `flags`, a schedule or a recurrence, by key: its state now, at
    `until`, and the changes that come after `now` up to `until`. A change already due
    comes right after now: the projection at `now` itself is the flags as they are. Why a
    change is invalid names the members of `updates` as `members` has them."""
    now, until = now.astimezone(UTC), until.astimezone(UTC)
    states = {f.key: State(f.enabled, f.rollout_percentage) for f in flags}
    queues: dict[str, list[_Item]] = {key: [] for key in states}
    ahead = until > now  # at now itself nothing has happened yet
    for row in schedules:
        queue = queues.setdefault(row.flag_key, [])
        if ahead and (row.status == "pending" or (row.status == "failed" and row.waiting)):
            queue.append(_schedule_item(row, members))
    # the times of each flag's schedules: a recurrence's occurrences that are not all listed
    # keep the latest before each of them, so the state each schedule meets stays right
    anchors = {
        key: [t for i in queue for t in (i.order[0], i.ready_at) if t is not None]
        for key, queue in queues.items()
    }
    begin = None if start is None else start.astimezone(UTC)
    cap = max(1, min(MAX_OCCURRENCES, MAX_TOTAL_OCCURRENCES // max(len(recurrences), 1)))
    for r in recurrences:
        queue = queues.setdefault(r.flag_key, [])
        if ahead:
            queue.extend(
                _recurrence_items(
                    r,
                    now=now,
                    until=until,
                    start=begin,
                    anchors=anchors.get(r.flag_key, ()),
                    cap=cap,
                    members=members,
                )
            )
    return [
        _walk(
            key,
            states.get(key),
            queue,
            max_lateness=max_lateness,
            now=now,
            until=until,
            policy=policy,
        )
        for key, queue in sorted(queues.items())
    ]


def agenda(ahead: Sequence[FlagAhead], *, start: datetime) -> list[Step]:
    """The changes of a projection from `start` on, across flags, in time order; changes of
    one flag at one moment in the order they apply (the walk's: a stable sort)."""
    steps = [s for f in ahead for s in f.steps if s.at >= start]
    return sorted(steps, key=lambda s: (s.at, s.flag_key))
