"""Pure retry policy: backoff and the decision after a failure. Clock and rng are arguments."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta

JITTER_SECONDS = 30.0
BASE_SECONDS = 60.0
RETRY_COUNT_MAX = 2**31 - 1  # retry_count is an integer column


def backoff(n: int, rng: random.Random, cap_seconds: float) -> timedelta:
    """Delay after the n-th consecutive failure (n from 0): min(2^(n+1) min, cap) + U[0, 30] s."""
    exponent = max(n, 0) + 1
    # 2**64 minutes exceeds any cap a timedelta can hold; stop doubling there (no overflow).
    base = BASE_SECONDS * 2.0**exponent if exponent < 64 else float("inf")
    return timedelta(seconds=min(base, cap_seconds) + rng.uniform(0.0, JITTER_SECONDS))


@dataclass(frozen=True, slots=True)
class Retry:
    """Try again at `at`."""

    at: datetime
    error: str


@dataclass(frozen=True, slots=True)
class GiveUp:
    """Failed for good."""

    reason: str


def after_failure(
    *,
    error: str,
    permanent: bool,
    retry_count: int,
    max_retries: int,
    now: datetime,
    rng: random.Random,
    cap_seconds: float,
) -> Retry | GiveUp:
    """One failed attempt: retry while retry_count + 1 <= max_retries, else give up."""
    if permanent:
        return GiveUp(error)
    if not countable(retry_count):
        return GiveUp(f"{error} (retry_count {retry_count} cannot be counted on: no retry)")
    if retries_after_failure(retry_count, max_retries):
        return Retry(now + backoff(retry_count, rng, cap_seconds), error)
    return GiveUp(f"{error} (gave up after {retry_count + 1} attempts)")


def counted(retry_count: int) -> int:
    """retry_count after one more failed attempt: saturates at the column's limit (the
    record's SQL does the same)."""
    return retry_count + 1 if retry_count < RETRY_COUNT_MAX else retry_count


def countable(retry_count: int) -> bool:
    """Can one more failed attempt be counted? A negative count, or one at the column's
    limit, cannot: a retry that cannot be counted is final."""
    return 0 <= retry_count < RETRY_COUNT_MAX


def retries_after_failure(retry_count: int, max_retries: int) -> bool:
    """Would a transient failure now be retried (rather than be final)?"""
    return countable(retry_count) and retry_count + 1 <= max_retries


# `flagsched migrate` beside an application's tables: how long one attempt waits at most in
# the queue of a table's lock (the application's writes queue behind it meanwhile), and the
# longest pause between two attempts.
LOCK_ATTEMPT_SECONDS = 0.2
LOCK_PAUSE_MAX_SECONDS = 1.0


def lock_attempts(budget: float) -> tuple[float, list[float]]:
    """How `flagsched migrate` tries to take a lock on an application's table within
    `budget` seconds (FLAGSCHED_LOCK_TIMEOUT): each attempt's wait (0.2 s, or the budget
    when smaller), and the pause before each attempt (the first 0; then doubling from the
    wait up to a second), as many as fit in the budget, at least one."""
    wait = min(LOCK_ATTEMPT_SECONDS, budget)
    pauses, spent, pause = [0.0], wait, wait
    while spent + pause + wait <= budget + 1e-9:
        pauses.append(pause)
        spent += pause + wait
        pause = min(pause * 2, LOCK_PAUSE_MAX_SECONDS)
    return wait, pauses
