"""One tick: claim due schedules, apply them per flag in order, record outcomes, report.

Read top to bottom, one schedule's path: `run` opens the batches; `_batch` claims, plans
(`_plan`, pure, with `_Failures`), writes (`_write`: one mechanism, one fallback, the
hold-back rule in `_after_failure`), maps each verdict to an outcome (`_result`) and
records them all; `_log_result` logs each after the commit. Then the side paths:
recurrences materialised before the claim, held-back schedules reported, the backlog
measured, and `preview` for --dry-run."""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime
from itertools import groupby
from typing import TYPE_CHECKING, Any

from flagsched import approval, materialise, policy, repository
from flagsched.approval import ApprovalPolicy
from flagsched.db import Conn, Database, connection, transaction
from flagsched.errors import LOCK_NOT_AVAILABLE, DatabaseError, StatementFailed
from flagsched.logs import get_logger, together
from flagsched.model import (
    BUILT_IN_MEMBERS,
    MAX_TEXT,
    Change,
    Claimed,
    InvalidUpdates,
    Members,
    Outcome,
    Result,
    ScheduleId,
    TickReport,
    Updates,
    Verdict,
    change_notice,
    clip,
    id_order,
)

if TYPE_CHECKING:
    from flagsched.rows import FlagRow, RecurrenceRow


@dataclass(frozen=True, slots=True)
class TickOptions:
    batch_size: int = 100
    max_batches: int = 1
    retry_max_delay: float = 3600.0
    max_retries_override: int | None = None
    max_lateness: float | None = None  # seconds (FLAGSCHED_MAX_LATENESS)
    approval: ApprovalPolicy = field(default_factory=ApprovalPolicy)  # [approval]


class StopFlag:
    """Set by SIGTERM/SIGINT; the tick checks it at safe points and cancels a waiting statement."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._hooks: list[Callable[[], None]] = []

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def request(self, signum: int) -> None:
        self.signum = signum
        for hook in list(self._hooks):
            # Best effort: the next safe point stops the tick anyway.
            with suppress(Exception):
                hook()

    @contextmanager
    def hooked(self, hook: Callable[[], None]) -> Iterator[None]:
        self._hooks.append(hook)
        try:
            yield
        finally:
            self._hooks.remove(hook)


Step = tuple[Claimed, Updates]


def run(
    database: Database,
    options: TickOptions,
    *,
    rng: random.Random,
    stop: StopFlag | None = None,
) -> TickReport:
    """Run up to `max_batches` batches, each its own transaction; log one event per outcome."""
    stop = stop or StopFlag()
    log = get_logger()
    report = TickReport()
    started = time.monotonic()
    with connection(database) as conn:
        with transaction(database, conn):
            repository.ensure_schema(conn)
            repository.ensure_tick_permitted(conn)
            repository.note_unseen_schedules(conn)  # an application's rows no trigger noted
        with stop.hooked(lambda: repository.cancel_running_statement(conn)):
            _materialise(database, conn, stop)  # before the claim, its own transactions
            held_flags = HeldFlags()
            batches = 0
            while not stop.requested:
                if batches < options.max_batches:
                    limit = options.batch_size
                elif held_flags.deferred:  # one more, for the changes left to the flags held
                    limit = min(options.batch_size, held_flags.count())
                else:
                    break
                batches += 1
                try:
                    with transaction(database, conn):
                        results = _batch(conn, options, rng, stop, held_flags, limit=limit)
                except DatabaseError:
                    if stop.requested:  # our own cancel: the batch rolled back, stays due
                        break
                    raise
                new = report.add(results)  # a schedule held back again is not new
                with together():  # after commit: no line claims a rolled-back outcome
                    for result in new:
                        _log_result(log, result)
                moved = any(r.outcome is not Outcome.HELD_BACK for r in results)
                if not moved and not held_flags.deferred:
                    break  # nothing due, or nothing that can move now
            if held_flags.deferred:  # the tick was stopped before it waited for them
                left = held_flags.left("the tick was stopped")
                with together():
                    for result in report.add(left, batch=False):
                        _log_result(log, result)
            if not stop.requested:
                try:
                    held = _held_back(database, conn, options)
                    with together():
                        for result in report.add(held, batch=False):
                            _log_result(log, result)
                    _measure_backlog(database, conn, report)
                except DatabaseError:
                    if not stop.requested:  # a signal may cancel it: the tick still ran
                        raise
    report.duration_seconds = time.monotonic() - started
    report.interrupted_by = stop.signum
    log.info(
        "tick_finished",
        applied=report.count(Outcome.APPLIED),
        retry=report.count(Outcome.RETRY),
        failed=report.count(Outcome.FAILED),
        held_back=report.count(Outcome.HELD_BACK),
        batches=report.batches,
        duration_seconds=round(report.duration_seconds, 4),
        interrupted=stop.requested,
        due_backlog=report.due_backlog,
        oldest_due_age_seconds=report.oldest_due_age_seconds,
        awaiting_approval=report.count(Outcome.AWAITING_APPROVAL),
    )
    return report


@dataclass
class HeldFlags:
    """The flags another transaction held when a batch of this tick came to write them.

    A tick never waits for a flag while it holds schedules: an application's transaction
    that holds a flag and then writes that flag's schedules (updating them, or deleting the
    flag: its ON DELETE CASCADE) would wait for the tick's claim while the tick waited for
    its flag, a deadlock PostgreSQL ends by failing one of them. So a flag found held is left
    out of its batch (its changes not attempted, nothing recorded: still due, no retry spent)
    and waited for at the start of the next batch, before its claim, in the order the
    application takes them: the flag, then its schedules (after the last batch, one more
    batch takes as many schedules as were left). Each flag is waited for once a tick; still
    held then (FLAGSCHED_LOCK_TIMEOUT), its first change is a retry, as after any lock
    timeout."""

    deferred: dict[str, list[Claimed]] = field(default_factory=dict)  # to wait for next
    waited: dict[str, StatementFailed | None] = field(default_factory=dict)  # None: granted

    def count(self) -> int:
        """How many claimed schedules were left for the flags to wait for."""
        return sum(len(schedules) for schedules in self.deferred.values())

    def defer(self, key: str, schedules: Sequence[Claimed]) -> None:
        self.deferred.setdefault(key, []).extend(schedules)

    def wait(self, conn: Conn, stop: StopFlag) -> None:
        """Before a batch's claim: wait for each flag left out of the last batch (in key
        order, each in a savepoint of its own, up to lock_timeout); a flag granted stays
        locked until the batch commits."""
        for key in sorted(self.deferred):
            if stop.requested:
                return
            try:
                with repository.savepoint(conn):
                    repository.lock_flags(conn, [key], wait=True)
                self.waited[key] = None
            except StatementFailed as exc:
                self.waited[key] = exc
        self.deferred.clear()

    def still_held(self, key: str) -> StatementFailed | None:
        """Why a flag waited for this tick cannot be written now (None: not waited for yet,
        so it is deferred)."""
        if key not in self.waited:
            return None
        return self.waited[key] or StatementFailed(
            "its flag is held by another transaction (SQLSTATE 55P03)", LOCK_NOT_AVAILABLE
        )

    def left(self, why: str) -> list[Result]:
        """The changes of the flags not waited for, as left (held back, still due)."""
        left = [
            Result(s, Outcome.HELD_BACK, error=f"its flag is held; not waited for: {why}")
            for schedules in self.deferred.values()
            for s in schedules
        ]
        self.deferred.clear()
        return left


def _batch(
    conn: Conn,
    options: TickOptions,
    rng: random.Random,
    stop: StopFlag,
    held: HeldFlags,
    *,
    limit: int,
) -> list[Result]:
    """Wait for the flags the last batch left, then claim, decide, write, record: one
    batch, in the caller's transaction. The changes of a flag found held are not in the
    results (`HeldFlags`)."""
    held.wait(conn, stop)
    if stop.requested:
        return []
    now, claimed = repository.claim(conn, limit=limit, max_lateness_seconds=options.max_lateness)
    if now is None:
        return []
    fail = _Failures(now, options, rng)
    results, steps = _plan(claimed, fail, repository.members())
    waiting, steps = _approvals(conn, steps, options, held=held)
    results = _held_behind(results, waiting) + waiting
    repository.mark_awaiting(
        conn,
        [
            r.schedule.id
            for r in waiting
            if r.outcome is Outcome.AWAITING_APPROVAL and not r.schedule.awaiting
        ],
        now=now,
    )
    changes = [Change(s, u, fail.would_retry(s)) for key in sorted(steps) for s, u in steps[key]]
    if changes:
        verdicts = _write(conn, changes, stop, options.max_lateness, held)
        for index, change in enumerate(changes):
            verdict, error = verdicts.get(index, (None, None))
            if verdict is Verdict.DEFERRED:
                continue  # its flag is held: waited for before the next claim
            results.append(_result(change.schedule, verdict, error, fail))
    applied = [r.schedule.flag_key for r in results if r.outcome is Outcome.APPLIED]
    refused = repository.record(conn, results, now=now, notice=change_notice(applied))
    for schedule_id, message in refused:
        # an application's schedules table refused the outcome (its CHECK or trigger): the
        # others' stand; this row stays as that table has it, and comes round again
        get_logger().error(
            "schedule_record_refused", schedule_id=schedule_id, error=clip(message, MAX_TEXT)
        )
    return results


class _Failures:
    """Turns one failed attempt into a Retry or Failed result, with the tick's clock and rng."""

    def __init__(self, now: datetime, options: TickOptions, rng: random.Random) -> None:
        self.now, self.options, self.rng = now, options, rng

    def limit(self, schedule: Claimed) -> int:
        override = self.options.max_retries_override
        return schedule.max_retries if override is None else override

    def would_retry(self, schedule: Claimed) -> bool:
        return policy.retries_after_failure(schedule.retry_count, self.limit(schedule))

    def __call__(self, schedule: Claimed, error: str, *, permanent: bool) -> Result:
        override = self.options.max_retries_override  # recorded only when set
        decision = policy.after_failure(
            error=clip(error, MAX_TEXT - 80),  # room for "(gave up after N attempts)"
            permanent=permanent,
            retry_count=schedule.retry_count,
            max_retries=self.limit(schedule),
            now=self.now,
            rng=self.rng,
            cap_seconds=self.options.retry_max_delay,
        )
        if isinstance(decision, policy.Retry):
            return Result(schedule, Outcome.RETRY, clip(decision.error), decision.at, override)
        return Result(schedule, Outcome.FAILED, clip(decision.reason), None, override)


def _plan(
    claimed: Sequence[Claimed], fail: _Failures, members: Members = BUILT_IN_MEMBERS
) -> tuple[list[Result], dict[str, list[Step]]]:
    """Pure: held-back and invalid schedules are decided here; the rest are steps per flag.
    An invalid change (`Updates.parse` with the mapping's `members`: also a rollout on a
    flags table without one, which could never apply) fails for good."""
    decided: list[Result] = []
    steps: dict[str, list[Step]] = {}
    for flag_key, group in groupby(claimed, key=lambda c: c.flag_key):
        for schedule in group:
            if schedule.defect is not None:  # never attempted, even when held back
                decided.append(fail(schedule, schedule.defect, permanent=True))
                continue
            if schedule.blocked:
                decided.append(Result(schedule, Outcome.HELD_BACK))
                continue
            try:
                updates = Updates.parse(schedule.updates, members)
            except InvalidUpdates as exc:
                decided.append(fail(schedule, str(exc), permanent=True))
                continue
            steps.setdefault(flag_key, []).append((schedule, updates))
    return decided, steps


def _approvals(
    conn: Conn,
    steps: dict[str, list[Step]],
    options: TickOptions,
    *,
    held: HeldFlags | None = None,
) -> tuple[list[Result], dict[str, list[Step]]]:
    """Four eyes, before the write: each flag whose changes may need approval is locked as
    the write locks it and read, and its changes judged in order (`approval`, pure) against
    the state the earlier ones leave. The first that needs an approval it has not got is
    not attempted and awaits it (no retry spent); the flag's later changes are held back.
    A flag another session holds is left for the next batch, which waits for it before its
    claim (`held`); still held then, its changes are held back. Returns those results, and
    the steps that go on to the write. Without `held` (--dry-run) the flags are read as they
    are, locking nothing."""
    policy_ = options.approval
    judged = {key: s for key, s in steps.items() if _may_need_approval(policy_, key, s)}
    if not judged:
        return [], steps
    found: dict[str, FlagRow] = {}
    busy: dict[str, str] = {}
    deferred: set[str] = set()
    if approval.depends_on_state(policy_) and held is None:
        found = {f.key: f for f in repository.flags_now(conn, keys=sorted(judged))}
    elif approval.depends_on_state(policy_) and held is not None:
        found = repository.lock_flags(conn, sorted(judged), wait=False)
        others = [key for key in sorted(judged) if key not in found]
        if others:  # held by another session, or missing (judged without a state)
            existing = {f.key for f in repository.flags_now(conn, keys=others)}
            for key in (k for k in others if k in existing):
                if (exc := held.still_held(key)) is not None:
                    busy[key] = f"its flag is held ({exc.message})"
                else:
                    deferred.add(key)
                    held.defer(key, [s for s, _ in steps[key]])
    judged = {key: s for key, s in judged.items() if key not in deferred}
    states = {
        key: approval.FlagState(row.enabled, row.rollout_percentage) for key, row in found.items()
    }
    # A change past its lateness never awaits: it goes on to the write, which fails it for
    # good as `expired:` (the same check, the same transaction's now()), and the flag's next
    # change is judged against the state it leaves. Only the changes that would await are
    # checked (a schedule found awaiting before is claimed again only once past it).
    expired: set[ScheduleId] = set()
    checked: set[ScheduleId] = set()
    while True:
        first = {
            key: found_first
            for key, flag_steps in judged.items()
            if key not in busy
            and (found_first := _first_awaiting(policy_, key, states.get(key), flag_steps, expired))
        }
        waiting_ids = {judged[key][index][0].id for key, (index, _) in first.items()} - checked
        if not waiting_ids:
            break
        checked |= waiting_ids
        late = repository.safety_checks(
            conn, sorted(waiting_ids), max_lateness_seconds=options.max_lateness
        )
        newly = {i for i, (verdict, _) in late.items() if verdict is Verdict.EXPIRED}
        if not newly:
            break
        expired |= newly
    decided: list[Result] = []
    kept: dict[str, list[Step]] = {}
    for key, flag_steps in steps.items():
        if key in deferred:
            continue
        if key in busy:
            decided += [Result(s, Outcome.HELD_BACK, error=busy[key]) for s, _ in flag_steps]
            continue
        if key not in first:
            kept[key] = flag_steps
            continue
        index, why = first[key]
        waiting = flag_steps[index][0]
        decided.append(Result(waiting, Outcome.AWAITING_APPROVAL, error=why))
        behind = f"held back: schedule {waiting.id} of this flag awaits approval"
        decided += [Result(s, Outcome.HELD_BACK, error=behind) for s, _ in flag_steps[index + 1 :]]
        if index:
            kept[key] = flag_steps[:index]
    return decided, kept


def _first_awaiting(
    policy_: ApprovalPolicy,
    key: str,
    state: approval.FlagState | None,
    flag_steps: list[Step],
    expired: set[ScheduleId],
) -> tuple[int, str] | None:
    """The first of a flag's changes that awaits approval (`approval.first_awaiting`); an
    expired one is let through, changing nothing."""
    return approval.first_awaiting(
        policy_,
        key,
        state,
        [
            approval.Step(
                u,
                explicit=s.needs_approval or s.awaiting,
                approved=s.approved or s.id in expired,
                applies=s.id not in expired,
            )
            for s, u in flag_steps
        ],
    )


def _held_behind(decided: list[Result], waiting: list[Result]) -> list[Result]:
    """A change that _plan failed for its invalid `updates` but that comes after one of its
    flag awaiting approval is held back instead, as behind any open schedule (a stored
    defect still fails it, unattempted, wherever it stands)."""
    first = {
        r.schedule.flag_key: (r.schedule.scheduled_at, r.schedule.id)
        for r in waiting
        if r.outcome is Outcome.AWAITING_APPROVAL
    }
    if not first:
        return decided

    def behind(r: Result) -> bool:
        s = r.schedule
        return (
            r.outcome is Outcome.FAILED
            and s.defect is None
            and s.flag_key in first
            and (s.scheduled_at, s.id) > first[s.flag_key]
        )

    return [
        Result(
            r.schedule,
            Outcome.HELD_BACK,
            error=f"held back: a schedule of this flag awaits approval ({r.error})",
        )
        if behind(r)
        else r
        for r in decided
    ]


def _may_need_approval(policy_: ApprovalPolicy, key: str, flag_steps: list[Step]) -> bool:
    """Could any of these changes need approval (a flag judged, and locked to be)?"""
    return (
        any(s.needs_approval or s.awaiting for s, _ in flag_steps)
        or approval.matching_pattern(policy_, key) is not None
        or (approval.depends_on_state(policy_) and not all(s.approved for s, _ in flag_steps))
    )


Verdicts = dict[int, tuple[Verdict, str | None]]  # change index -> why it did not apply

# A flag statement that failed on these (a lock not granted in time, a statement outlasting
# statement_timeout or cancelled) would fail the same way for each change: none is tried
# alone, and the flag's changes after the first are left as they are.
_FLAG_UNAVAILABLE = frozenset({"55P03", "57014"})


def _write(
    conn: Conn,
    changes: list[Change],
    stop: StopFlag,
    max_lateness: float | None,
    held: HeldFlags,
) -> Verdicts:
    """One mechanism, one fallback. The mechanism: one statement, in a savepoint, locks the
    flags (skipping those other sessions hold: busy), decides every change and writes the
    rest set-based; when that write fails it writes each half of the flags again, down to
    the flags that fail on their own (flag_failed), all in that one statement. The
    fallback (`_write_flag`), one flag at a time in a savepoint of its own: the failed flags
    with more than one change, and every flag when the statement itself failed (a timeout
    or a cancel). A flag another session holds is never waited for here, with the batch's
    schedules locked (`HeldFlags`): its changes are deferred (or, waited for already, as
    after a lock timeout). Subtransactions grow with the failing flags, never with the
    batch size."""
    try:
        with repository.savepoint(conn):
            verdicts = repository.apply(
                conn, changes, wait=False, max_lateness_seconds=max_lateness
            )
        later = {
            changes[i].schedule.flag_key
            for i, (v, _) in verdicts.items()
            if v in (Verdict.BUSY, Verdict.FLAG_FAILED)
        }
    except StatementFailed:
        verdicts, later = {}, {c.schedule.flag_key for c in changes}
    for key in sorted(later):
        indexes = [i for i, c in enumerate(changes) if c.schedule.flag_key == key]
        if any(verdicts.get(i, (None, None))[0] is Verdict.BUSY for i in indexes):
            stopped = stop.requested  # they stay as they are, due for the next tick
            verdicts.update(
                _not_attempted(indexes, "the tick was stopped")
                if stopped
                else _busy(changes, indexes, held)
            )
            continue
        failure = _flag_failure({i: verdicts[i] for i in indexes if i in verdicts})
        for i in indexes:
            verdicts.pop(i, None)  # decided again, flag by flag
        if failure is not None and len(indexes) == 1:  # nothing behind it: no second try
            verdicts.update(_after_failure(changes, indexes, failure, one_by_one=False))
            continue
        verdicts.update(
            _write_flag(conn, changes, indexes, stop, max_lateness, held, whole=failure is None)
        )
    return verdicts


def _busy(changes: list[Change], indexes: list[int], held: HeldFlags) -> Verdicts:
    """A flag's changes (`indexes`, in order) when another session holds the flag: deferred
    to the next batch, which waits for the flag before its claim; waited for already this
    tick, as after a lock timeout (the first a retry, the rest held back)."""
    key = changes[indexes[0]].schedule.flag_key
    failure = held.still_held(key)
    if failure is not None:
        return _after_failure(changes, indexes, failure, one_by_one=False)
    held.defer(key, [changes[i].schedule for i in indexes])
    return {i: (Verdict.DEFERRED, None) for i in indexes}


def _write_flag(
    conn: Conn,
    changes: list[Change],
    indexes: list[int],
    stop: StopFlag,
    max_lateness: float | None,
    held: HeldFlags,
    *,
    whole: bool = True,
) -> Verdicts:
    """One flag's changes in one statement (`whole`). When that fails (or the flag's write
    already failed: not `whole`), its changes go one by one, in order, each in a savepoint,
    and what a failure holds back is decided by `_after_failure` (the one place). The flag
    is not waited for: found held (its lock was let go with a statement that failed), the
    changes left are `_busy`."""
    if stop.requested:  # they stay as they are, due for the next tick
        return _not_attempted(indexes, "the tick was stopped")
    if whole:
        found, failure = _apply_some(conn, changes, indexes, max_lateness)
        if _is_busy(found):
            return _busy(changes, indexes, held)
        if failure is None:
            return found
        if stop.requested:
            return _not_attempted(indexes, "the tick was stopped")
        if len(indexes) == 1 or failure.sqlstate in _FLAG_UNAVAILABLE:
            return _after_failure(changes, indexes, failure, one_by_one=False)
    verdicts: Verdicts = {}
    for n, i in enumerate(indexes):
        if stop.requested:
            return verdicts | _not_attempted(indexes[n:], "the tick was stopped")
        found, failure = _apply_some(conn, changes, [i], max_lateness)
        if _is_busy(found):
            return verdicts | _busy(changes, indexes[n:], held)
        if failure is None:
            verdicts |= found
            continue
        if stop.requested:
            return verdicts | _not_attempted(indexes[n:], "the tick was stopped")
        decided = _after_failure(changes, indexes[n:], failure, one_by_one=True)
        verdicts |= decided
        if len(decided) > 1:  # the flag's later changes are held back
            return verdicts
    return verdicts


def _is_busy(verdicts: Verdicts) -> bool:
    return any(verdict is Verdict.BUSY for verdict, _ in verdicts.values())


def _apply_some(
    conn: Conn, changes: list[Change], indexes: list[int], max_lateness: float | None
) -> tuple[Verdicts, StatementFailed | None]:
    """Some of one flag's changes in one statement and a savepoint, skipping the flag when
    another session holds it (busy): their verdicts, or why the flag's write failed."""
    try:
        with repository.savepoint(conn):
            found = repository.apply(
                conn, [changes[i] for i in indexes], wait=False, max_lateness_seconds=max_lateness
            )
    except StatementFailed as exc:
        return {}, exc
    verdicts = {indexes[j]: verdict for j, verdict in found.items()}
    failure = _flag_failure(verdicts)
    return (verdicts, None) if failure is None else ({}, failure)


_SQLSTATE = re.compile(r"\(SQLSTATE (\w{5})\)$")


def _flag_failure(verdicts: Verdicts) -> StatementFailed | None:
    """The failure of a flag's write the apply statement reported (flag_failed), if any."""
    for verdict, message in verdicts.values():
        if verdict is Verdict.FLAG_FAILED:
            text = message or "the flag's write failed"
            found = _SQLSTATE.search(text)
            return StatementFailed(text, found.group(1) if found else None)
    return None


def _after_failure(
    changes: list[Change], indexes: list[int], exc: StatementFailed, *, one_by_one: bool
) -> Verdicts:
    """The hold-back rule, decided once: the first of `indexes` failed (`exc`). Its flag's
    later changes are held back (not attempted, no retry spent) when that failure will be
    retried (its change stays first in line) or when the flag cannot be written now (a lock
    or statement timeout); after a final failure they are tried, one by one
    (`one_by_one`: only the failed change is decided here)."""
    first, *rest = indexes
    failed: Verdicts = {first: (Verdict.ERROR, exc.message)}
    holds = changes[first].stop_on_failure or exc.sqlstate in _FLAG_UNAVAILABLE
    if one_by_one and not holds:
        return failed
    why = f"not attempted: schedule {changes[first].schedule.id} of this flag failed first"
    return failed | {i: (Verdict.NOT_ATTEMPTED, why) for i in rest}


def _not_attempted(indexes: list[int], why: str) -> Verdicts:
    return {i: (Verdict.NOT_ATTEMPTED, why) for i in indexes}


def _result(
    schedule: Claimed, verdict: Verdict | None, error: str | None, fail: _Failures
) -> Result:
    """A change's verdict as the schedule's outcome: the one place each verdict is mapped."""
    match verdict:
        case None:
            return Result(schedule, Outcome.APPLIED)
        case Verdict.HELD_BACK:
            return Result(schedule, Outcome.HELD_BACK)
        case Verdict.BUSY | Verdict.NOT_ATTEMPTED | Verdict.DEFERRED:  # left, no retry spent
            return Result(schedule, Outcome.HELD_BACK, error=error or "its flag is held")
        case Verdict.MISSING:
            return fail(schedule, f"flag {schedule.flag_key!r} does not exist", permanent=True)
        case Verdict.EXPIRED | Verdict.CONFLICT:
            return fail(schedule, error or verdict.value, permanent=True)
        case Verdict.ERROR | Verdict.FLAG_FAILED:
            return fail(schedule, error or "unknown error", permanent=False)


def _log_result(log: Any, result: Result) -> None:
    schedule = result.schedule
    fields: dict[str, Any] = {"schedule_id": schedule.id, "flag_key": clip(schedule.flag_key)}
    limit = schedule.max_retries if result.max_retries is None else result.max_retries
    if result.outcome is Outcome.APPLIED:
        log.info(
            "schedule_applied",
            **fields,
            retry_count=schedule.retry_count,
            attempt=schedule.attempts_made + 1,
            first_attempt=schedule.attempts_made == 0,
        )
    elif result.outcome is Outcome.RETRY:
        log.warning(
            "schedule_retry_scheduled",
            **fields,
            retry_count=policy.counted(schedule.retry_count),
            max_retries=limit,
            next_retry_at=result.next_retry_at,
            error=result.error,
        )
    elif result.outcome is Outcome.FAILED:
        log.error(
            "schedule_failed",
            **fields,
            retry_count=policy.counted(schedule.retry_count),
            max_retries=limit,
            error=result.error,
        )
    elif result.outcome is Outcome.AWAITING_APPROVAL:
        log.warning(
            "schedule_awaiting_approval",
            **fields,
            reason=result.error,
            hint=f"a second person approves it: flagsched approve {schedule.id}",
        )
    else:
        log.info(
            "schedule_held_back",
            **fields,
            retry_count=schedule.retry_count,
            max_retries=schedule.max_retries,
            reason=result.error or "an earlier schedule of this flag is still open",
        )


def _materialise(database: Database, conn: Conn, stop: StopFlag) -> None:
    """Due recurrences into schedules, in bounded batches that a signal stops between."""
    try:
        materialise.due_recurrences(database, conn, stopped=lambda: stop.requested)
    except DatabaseError:
        if not stop.requested:  # a signal may cancel it: the batches committed stay
            raise


def _held_back(database: Database, conn: Conn, options: TickOptions) -> list[Result]:
    """Due schedules held back behind an open schedule of their flag that is not due: the
    claim never takes them (they would take a batch's places), so they are read here,
    locking nothing, up to a batch's worth, and reported once per tick."""
    with transaction(database, conn):
        held = repository.held_back(
            conn, limit=options.batch_size, max_lateness_seconds=options.max_lateness
        )
    return [Result(schedule, Outcome.HELD_BACK) for schedule in held]


def _measure_backlog(database: Database, conn: Conn, report: TickReport) -> None:
    """What is still due after the tick (for the log and the metrics); index scans only."""
    with transaction(database, conn):
        now = repository.db_now(conn)
        backlog = repository.backlog(conn, now=now)
        awaiting = repository.awaiting_backlog(conn, now=now)
    report.awaiting_approval = awaiting.n
    waited = awaiting.oldest_age_seconds
    # a time after year 9999 (stored by someone) has not begun: no wait yet
    report.oldest_awaiting_approval_seconds = max(float(waited), 0.0) if waited else 0.0
    report.due_backlog = int(backlog.due)
    age = backlog.oldest_due_age_seconds
    report.oldest_due_age_seconds = float(age) if age is not None else 0.0


@dataclass(frozen=True, slots=True)
class Preview:
    """--dry-run: what the tick would do with one schedule, or with a due occurrence of a
    recurrence (`recurrence_id`; `id` None: no schedule made yet), in words."""

    id: ScheduleId | None
    flag_key: str
    scheduled_at: datetime
    would: str
    recurrence_id: int | None = None

    @classmethod
    def of(cls, schedule: Claimed, would: str) -> Preview:
        return cls(schedule.id, schedule.flag_key, schedule.scheduled_at, would)


def preview(database: Database, options: TickOptions) -> list[Preview]:
    """--dry-run: the due occurrences of recurrences the tick would first turn into
    schedules, then what the next batch would do, from a claim that is rolled back."""
    with connection(database) as conn:
        with transaction(database, conn):
            repository.ensure_schema(conn)
        with transaction(database, conn, rollback=True):  # nothing claimed is kept
            occurring = _occurrences(
                *repository.due_recurrences_preview(conn, limit=materialise.BATCH)
            )
            now, claimed = repository.claim(
                conn,
                limit=options.batch_size,
                lock=False,
                max_lateness_seconds=options.max_lateness,
            )
            held = repository.held_back(
                conn, limit=options.batch_size, max_lateness_seconds=options.max_lateness
            )
            existing = repository.existing_flags(conn, sorted({c.flag_key for c in claimed}))
            checks, broken = _dry_checks(
                conn, [c.id for c in claimed if c.defect is None], options.max_lateness
            )
            if now is not None:
                decided, steps = _plan(
                    claimed, _Failures(now, options, random.Random(0)), repository.members()
                )
                waiting, steps = _approvals(conn, steps, options)
                decided = _held_behind(decided, waiting) + waiting
    shown = {c.id for c in claimed}
    held_back = [Result(h, Outcome.HELD_BACK) for h in held if h.id not in shown]
    if now is None:
        return occurring + [Preview.of(r.schedule, _describe(r)) for r in held_back]
    decided += held_back
    plan = [Preview.of(r.schedule, _describe(r)) for r in decided]
    for key, flag_steps in steps.items():
        for c, u in flag_steps:
            if key not in existing:
                plan.append(Preview.of(c, f"fail for good: flag {key!r} does not exist"))
            elif c.id in checks:
                plan.append(Preview.of(c, f"fail for good: {checks[c.id][1]}"))
            elif c.id in broken:
                plan.append(Preview.of(c, f"fail (its safety check failed: {broken[c.id]})"))
            else:
                plan.append(Preview.of(c, f"apply: {u.words()}"))
    plan.sort(key=lambda p: (p.flag_key, p.scheduled_at, id_order(p.id or 0)))
    return occurring + plan


def _dry_checks(
    conn: Conn, ids: list[ScheduleId], max_lateness: float | None
) -> tuple[dict[ScheduleId, tuple[Verdict, str]], dict[ScheduleId, str]]:
    """--dry-run's safety checks of the claimed schedules (those without a defect: the tick
    fails those unattempted): the verdicts, and the schedules whose check the database
    refuses (a stored time at the edge of its range), with why. The write would fail such a
    change alone, so the plan shows it, and the other checks, rather than stop."""
    try:
        with repository.savepoint(conn):
            return repository.safety_checks(conn, ids, max_lateness_seconds=max_lateness), {}
    except StatementFailed:
        pass
    checks: dict[ScheduleId, tuple[Verdict, str]] = {}
    broken: dict[ScheduleId, str] = {}
    for one in ids:
        try:
            with repository.savepoint(conn):
                checks |= repository.safety_checks(conn, [one], max_lateness_seconds=max_lateness)
        except StatementFailed as exc:
            broken[one] = exc.message
    return checks, broken


def _occurrences(now: datetime, due: Sequence[RecurrenceRow]) -> list[Preview]:
    """What the tick's first step would make of the due recurrences (materialise.py's rule:
    the latest occurrence not after now; one that cannot be computed stops its recurrence),
    computed without writing. The schedule made is then claimed by the tick like any other,
    so its outcome is not known before it exists."""
    if not due:
        return []
    from flagsched import recurring  # croniter only when something is due

    shown: list[Preview] = []
    for row in due:
        since = row.next_at if isinstance(row.next_at, datetime) else None
        occurrence = recurring.due(row.cron, row.timezone, since, now)
        if occurrence.fire_at is not None:
            try:
                change = Updates.parse(row.updates, repository.members()).words()
            except InvalidUpdates as exc:
                change = f"updates that will fail for good: {exc}"
            would = f"materialise recurrence {row.id} into a schedule to apply: {change}"
            shown.append(Preview(None, row.flag_key, occurrence.fire_at, would, row.id))
        elif occurrence.next_at is None:
            error = occurrence.error or "no next occurrence"
            shown.append(
                Preview(None, row.flag_key, now, f"stop recurrence {row.id}: {error}", row.id)
            )
    return shown


def _describe(result: Result) -> str:
    if result.outcome is Outcome.AWAITING_APPROVAL:
        return f"await approval ({result.error})"
    if result.outcome is Outcome.HELD_BACK and result.error:
        return f"held back ({result.error})"
    if result.outcome is Outcome.HELD_BACK:
        return "held back (an earlier schedule of this flag is still open)"
    return f"fail for good: {result.error}"
