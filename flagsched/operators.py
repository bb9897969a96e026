"""Operator use cases: status, schedule, retry, cancel, prune. Each owns its transactions."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from flagsched import repository
from flagsched.db import Database, begin, connection, transaction
from flagsched.errors import StatementFailed
from flagsched.logs import get_logger
from flagsched.model import Status, Updates, clip

PRUNE_BATCH = 5000


def status(database: Database, *, counts: bool = True) -> dict[str, Any]:
    """The due count, the oldest due schedule's age and the next due time (index scans
    only); with `counts`, also the schedules per state (a pass over the whole table)."""
    with begin(database) as conn:
        repository.ensure_schema(conn)
        now = repository.db_now(conn)
        due = repository.backlog(conn, now=now)
        per_state = repository.state_counts(conn, now=now) if counts else {}
    age = due["oldest_due_age_seconds"]
    return {
        "due": int(due["due"]),
        **per_state,
        "oldest_due_at": due["oldest_due_at"],
        "oldest_due_age_seconds": float(age) if age is not None else None,
        "next_due_at": due["next_due_at"],
        "now": now,
    }


def add_schedule(
    database: Database,
    *,
    flag_key: str,
    at: datetime | None,
    updates: Updates,
    max_retries: int | None,
) -> tuple[int, bool]:
    """Insert a pending schedule; returns (id, whether the flag exists yet)."""
    with begin(database) as conn:
        repository.ensure_schema(conn)
        exists = flag_key in repository.existing_flags(conn, [flag_key])
        new_id = repository.insert_schedule(
            conn, flag_key=flag_key, at=at, updates=updates, max_retries=max_retries
        )
    get_logger().info(
        "schedule_added",
        schedule_id=new_id,
        flag_key=flag_key,
        updates=updates.as_json(),
        flag_exists=exists,
    )
    return new_id, exists


@dataclass(frozen=True, slots=True)
class Handled:
    """What an operator command did with one id."""

    id: int
    ok: bool
    message: str


def _each_locked(database: Database, ids: list[int], act: Any) -> list[Handled]:
    """Run `act(conn, row)` per id, each in its own savepoint under the row's lock; a row a
    running tick holds is waited for (up to lock_timeout), so the tick's outcome is seen."""
    results: list[Handled] = []
    with connection(database) as conn:
        with transaction(database, conn):
            repository.ensure_schema(conn)
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
                    result = Handled(
                        schedule_id, False, f"refused: busy, try again ({exc.message})"
                    )
            results.append(result)
    return results


def retry(database: Database, ids: list[int], *, force: bool = False) -> list[Handled]:
    """Failed schedules become pending again with retry_count 0."""
    log = get_logger()

    def act(conn: Any, row: dict[str, Any]) -> Handled:
        if row["status"] != Status.FAILED:
            return Handled(row["id"], False, f"refused: it is {row['status']}, not failed")
        if not force and repository.newer_applied_exists(conn, row["id"]):
            return Handled(
                row["id"],
                False,
                "refused: a later schedule of this flag was already applied, so retrying "
                "would undo newer state (use --force to retry anyway)",
            )
        repository.reset_for_retry(conn, row["id"])
        log.info(
            "schedule_retried",
            schedule_id=row["id"],
            flag_key=clip(row["flag_key"]),
            previous_status=row["status"],
            previous_retry_count=row["retry_count"],
            previous_next_retry_at=row["next_retry_at"],
            forced=force,
        )
        return Handled(
            row["id"], True, f"pending again (was failed, {row['retry_count']} failed attempt(s))"
        )

    return _each_locked(database, ids, act)


def cancel(database: Database, ids: list[int]) -> list[Handled]:
    """Pending or failed schedules become cancelled."""
    log = get_logger()

    def act(conn: Any, row: dict[str, Any]) -> Handled:
        if row["status"] not in (Status.PENDING, Status.FAILED):
            return Handled(row["id"], False, f"refused: it is already {row['status']}")
        repository.mark_cancelled(conn, row["id"])
        log.info(
            "schedule_cancelled",
            schedule_id=row["id"],
            flag_key=clip(row["flag_key"]),
            previous_status=row["status"],
            previous_retry_count=row["retry_count"],
        )
        return Handled(row["id"], True, f"cancelled (was {row['status']})")

    return _each_locked(database, ids, act)


def prune(
    database: Database, *, older_than_days: float, dry_run: bool, batch: int = PRUNE_BATCH
) -> tuple[Counter[str], int]:
    """Delete old applied and cancelled schedules in batches, one transaction each;
    returns (deleted or, with dry_run, deletable counts per status, batches run)."""
    seconds = older_than_days * 86400
    total: Counter[str] = Counter()
    batches = 0
    with connection(database) as conn:
        with transaction(database, conn):
            repository.ensure_schema(conn)
            if dry_run:
                return Counter(repository.count_prunable(conn, older_than_seconds=seconds)), 0
        while True:
            with transaction(database, conn):
                deleted = repository.prune_batch(conn, older_than_seconds=seconds, limit=batch)
            if not deleted:
                break
            batches += 1
            total.update(deleted)
    get_logger().info(
        "prune_finished",
        deleted=sum(total.values()),
        applied=total["applied"],
        cancelled=total["cancelled"],
        batches=batches,
        older_than_days=older_than_days,
    )
    return total, batches
