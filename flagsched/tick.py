"""One tick: claim due schedules, apply them per flag in order, record outcomes, report."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime
from itertools import groupby
from typing import Any

from flagsched import policy, repository
from flagsched.db import Conn, Database, connection, transaction
from flagsched.errors import BatchAborted, DatabaseError, StatementFailed
from flagsched.logs import get_logger, together
from flagsched.model import (
    MAX_TEXT,
    Claimed,
    InvalidUpdates,
    Outcome,
    Result,
    TickReport,
    Updates,
    clip,
)


@dataclass(frozen=True, slots=True)
class TickOptions:
    batch_size: int = 100
    max_batches: int = 1
    retry_max_delay: float = 3600.0
    max_retries_override: int | None = None


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
        with stop.hooked(lambda: repository.cancel_running_statement(conn)):
            for _ in range(options.max_batches):
                if stop.requested:
                    break
                try:
                    try:
                        with transaction(database, conn):
                            results = _batch(conn, options, rng, stop, careful=False)
                    except BatchAborted:
                        if stop.requested:  # our own cancel: the batch rolled back
                            break
                        # The one-statement write failed as a whole (a trigger outlasting
                        # statement_timeout): do the batch again, flag by flag, so that only
                        # the slow flag's schedules fail.
                        with transaction(database, conn):
                            results = _batch(conn, options, rng, stop, careful=True)
                except DatabaseError:
                    if stop.requested:  # our own cancel: the batch rolled back, stays due
                        break
                    raise
                new = report.add(results)  # a schedule held back again is not new
                with together():  # after commit: no line claims a rolled-back outcome
                    for result in new:
                        _log_result(log, result)
                if not any(r.outcome is not Outcome.HELD_BACK for r in results):
                    break  # nothing due, or nothing that can move now
            if not stop.requested:
                try:
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
    )
    return report


def _measure_backlog(database: Database, conn: Conn, report: TickReport) -> None:
    """What is still due after the tick (for the log and the metrics); index scans only."""
    with transaction(database, conn):
        now = repository.db_now(conn)
        backlog = repository.backlog(conn, now=now)
    report.due_backlog = int(backlog["due"])
    age = backlog["oldest_due_age_seconds"]
    report.oldest_due_age_seconds = float(age) if age is not None else 0.0


def preview(database: Database, options: TickOptions) -> list[tuple[Claimed, str]]:
    """--dry-run: what the next batch would do, from a claim that is rolled back."""
    with connection(database) as conn:
        with transaction(database, conn):
            repository.ensure_schema(conn)
        with transaction(database, conn, rollback=True):  # nothing claimed is kept
            now, claimed = repository.claim(conn, limit=options.batch_size, lock=False)
            existing = repository.existing_flags(conn, sorted({c.flag_key for c in claimed}))
    if now is None:
        return []
    decided, steps = _plan(claimed, _Failures(now, options, random.Random(0)))
    plan = [(r.schedule, _describe(r)) for r in decided]
    plan += [
        (
            c,
            f"apply {u.as_json()}"
            if key in existing
            else f"fail for good: flag {key!r} does not exist",
        )
        for key, flag_steps in steps.items()
        for c, u in flag_steps
    ]
    return sorted(plan, key=lambda p: (p[0].flag_key, p[0].scheduled_at, p[0].id))


def _describe(result: Result) -> str:
    if result.outcome is Outcome.HELD_BACK:
        return "held back (an earlier schedule of this flag is still open)"
    return f"fail for good: {result.error}"


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
    claimed: Sequence[Claimed], fail: _Failures
) -> tuple[list[Result], dict[str, list[Step]]]:
    """Pure: held-back and invalid schedules are decided here; the rest are steps per flag."""
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
                updates = Updates.parse(schedule.updates)
            except InvalidUpdates as exc:
                decided.append(fail(schedule, str(exc), permanent=True))
                continue
            steps.setdefault(flag_key, []).append((schedule, updates))
    return decided, steps


def _batch(
    conn: Conn, options: TickOptions, rng: random.Random, stop: StopFlag, *, careful: bool
) -> list[Result]:
    now, claimed = repository.claim(conn, limit=options.batch_size)
    if now is None:
        return []
    fail = _Failures(now, options, rng)
    results, steps = _plan(claimed, fail)
    if steps:
        results += _apply(conn, steps, fail, stop, careful=careful)
    repository.record(conn, results, now=now)
    return results


Missed = dict[int, tuple[str, str | None]]  # change index -> (outcome, error); absent: applied
Change = tuple[str, Updates, bool]  # flag key, updates, whether a failure holds later ones back


def _apply(
    conn: Conn, steps: dict[str, list[Step]], fail: _Failures, stop: StopFlag, *, careful: bool
) -> list[Result]:
    """One statement writes the batch: free flags set-based, then what is left change by
    change, each failure isolated. It has no savepoint (a round trip saved): if it fails as
    a whole, the caller redoes the batch `careful`ly. Flags other sessions hold, and every
    flag when `careful`, then get a statement each, in a savepoint, that waits for them."""
    keys = sorted(steps)
    ordered = [step for key in keys for step in steps[key]]
    changes: list[Change] = [(s.flag_key, u, fail.would_retry(s)) for s, u in ordered]
    missed: Missed
    if careful:
        missed = {i: (repository.APPLY_BUSY, None) for i in range(len(changes))}
    else:
        folded = {key: _fold(steps[key]) for key in keys}
        with repository.unprotected():
            missed = repository.apply(conn, folded, changes, wait=False)
    busy = [i for i, (outcome, _) in missed.items() if outcome == repository.APPLY_BUSY]
    for _, group in groupby(busy, key=lambda i: changes[i][0]):
        indexes = list(group)
        waited = _wait_for_flag(conn, [changes[i] for i in indexes], stop)
        for j, i in enumerate(indexes):
            if j in waited:
                missed[i] = waited[j]
            else:
                del missed[i]
    results = []
    for index, (schedule, _) in enumerate(ordered):
        outcome, error = missed.get(index, (None, None))
        results.append(_result(schedule, outcome, error, fail))
    return results


def _wait_for_flag(conn: Conn, changes: list[Change], stop: StopFlag) -> Missed:
    """One flag's changes, waiting for its lock, in a savepoint: a signal cancelling the
    wait, or a statement timeout, undoes only these changes."""
    stopped: Missed = {
        j: (repository.APPLY_BUSY, "the tick was stopped") for j in range(len(changes))
    }
    if stop.requested:  # they stay as they are, due for the next tick
        return stopped
    try:
        with repository.savepoint(conn):
            return repository.apply(conn, {}, changes, wait=True)
    except StatementFailed as exc:
        return stopped if stop.requested else _all_failed(changes, exc)


def _all_failed(changes: list[Change], exc: StatementFailed) -> Missed:
    """Outcomes when a statement applying `changes` failed as a whole: the first change of
    each flag failed, the rest are held back behind it if it will be retried."""
    outcomes: Missed = {}
    stopped: set[str] = set()
    for index, (key, _, would_retry) in enumerate(changes):
        held = key in stopped
        outcomes[index] = (
            (repository.APPLY_HELD_BACK, None) if held else (repository.APPLY_FAILED, exc.message)
        )
        if would_retry:
            stopped.add(key)
    return outcomes


def _result(schedule: Claimed, outcome: str | None, error: str | None, fail: _Failures) -> Result:
    if outcome is None:
        return Result(schedule, Outcome.APPLIED)
    if outcome == repository.APPLY_HELD_BACK:
        return Result(schedule, Outcome.HELD_BACK)
    if outcome == repository.APPLY_BUSY:  # not attempted: left as it is, no retry spent
        reason = error or "its flag is held by another session"
        return Result(schedule, Outcome.HELD_BACK, error=reason)
    if outcome == repository.APPLY_MISSING:
        return fail(schedule, f"flag {schedule.flag_key!r} does not exist", permanent=True)
    return fail(schedule, error or "unknown error", permanent=False)


def _fold(steps: list[Step]) -> Updates:
    """Consecutive changes of one flag, written as one update (later values win)."""
    state = Updates()
    for _, updates in steps:
        state = state.then(updates)
    return state


def _log_result(log: Any, result: Result) -> None:
    schedule = result.schedule
    fields: dict[str, Any] = {"schedule_id": schedule.id, "flag_key": clip(schedule.flag_key)}
    limit = schedule.max_retries if result.max_retries is None else result.max_retries
    if result.outcome is Outcome.APPLIED:
        log.info(
            "schedule_applied",
            **fields,
            retry_count=schedule.retry_count,
            attempt=schedule.retry_count + 1,
            first_attempt=schedule.retry_count == 0,
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
    else:
        log.info(
            "schedule_held_back",
            **fields,
            retry_count=schedule.retry_count,
            max_retries=schedule.max_retries,
            reason=result.error or "an earlier schedule of this flag is still open",
        )
