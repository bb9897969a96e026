"""A tick's first step: turn every due recurrence into one pending schedule (the latest
occurrence not after the database's now; missed ones collapse), then move its next_at past
now. Exactly once however many ticks overlap: recurrences are locked SKIP LOCKED, and the
unique index on (recurrence_id, scheduled_at) refuses a second schedule for an occurrence.
Nothing here may stop the tick: a recurrence that cannot be read stops on its own, one that
another transaction is in the way of stays due for the next tick."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from flagsched import repository
from flagsched.db import Conn, Database, one_line, transaction
from flagsched.errors import DatabaseError, StatementFailed
from flagsched.logs import get_logger
from flagsched.model import DueRecurrence, clip

BATCH = 500


def due_recurrences(
    database: Database, conn: Conn, *, stopped: Callable[[], bool] = lambda: False
) -> int:
    """Materialise every recurrence due now, a batch per transaction; returns the number of
    schedules made. `stopped()` is asked between batches (a signal): the batches committed
    stay, the rest is due for the next tick. A batch whose statement the stop cancelled
    rolls back whole."""
    made = 0
    while not stopped():
        try:
            with transaction(database, conn):
                now, due = repository.due_recurrences(conn, limit=BATCH)
                if not due:
                    return made
                made += _batch(conn, now, due, stopped)
        except DatabaseError:
            if stopped():  # our own cancel: the batch rolled back, stays due
                return made
            raise
        if len(due) < BATCH:
            return made
    return made


def _batch(conn: Conn, now: Any, due: list[DueRecurrence], stopped: Callable[[], bool]) -> int:
    from flagsched import recurring  # croniter only when something is due (cold start)

    log = get_logger()
    fired: list[tuple[int, Any]] = []
    advanced: list[tuple[int, Any]] = []
    for row in due:
        since = row.next_at if isinstance(row.next_at, datetime) else None
        occurrence = recurring.due(row.cron, row.timezone, since, now)
        if occurrence.fire_at is not None:
            fired.append((row.id, occurrence.fire_at))
        advanced.append((row.id, occurrence.next_at))
        if occurrence.next_at is None:
            log.warning(
                "recurrence_stopped",
                recurrence_id=row.id,
                flag_key=clip(row.flag_key),
                error=one_line(occurrence.error or "no next occurrence", [])[:1000],
            )
    try:
        with repository.savepoint(conn):
            made = repository.materialise(conn, fired, advanced)
    except StatementFailed as exc:
        if stopped():  # the stop cancelled it (it is set before the cancel): abort the batch
            raise DatabaseError(exc.message) from exc
        # A row the database refuses (an expires_after that overflows): redo them one by
        # one, so only that recurrence stops.
        keys = {row.id: row.flag_key for row in due}
        made = []
        nexts = dict(advanced)
        for rec_id, at in fired:
            try:
                with repository.savepoint(conn):
                    made += repository.materialise(conn, [(rec_id, at)], [(rec_id, nexts[rec_id])])
            except StatementFailed as exc:
                if stopped():  # our own cancel, not the row: never stop it for that
                    raise DatabaseError(exc.message) from exc
                if exc.transient:
                    # Another transaction was in the way (an application holding the flag
                    # its schedules table refers to: the foreign key check waits for it):
                    # nothing about the recurrence is wrong, so it stays due, as it is, for
                    # the next tick (missed occurrences collapse into the latest).
                    log.warning(
                        "recurrence_deferred",
                        recurrence_id=rec_id,
                        flag_key=clip(keys[rec_id]),
                        error=exc.message,
                    )
                else:
                    repository.materialise(conn, [], [(rec_id, None)])
                    log.warning(
                        "recurrence_stopped",
                        recurrence_id=rec_id,
                        flag_key=clip(keys[rec_id]),
                        error=exc.message,
                    )
            del nexts[rec_id]
        repository.materialise(conn, [], list(nexts.items()))
    for schedule in made:
        log.info(
            "recurrence_materialised",
            recurrence_id=schedule.recurrence_id,
            schedule_id=schedule.id,
            flag_key=schedule.flag_key,
            scheduled_at=schedule.scheduled_at,
        )
    return len(made)
