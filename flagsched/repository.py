"""Every SQL statement flagsched runs. Callers own the transaction; `now` is always passed in."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from flagsched.db import one_line
from flagsched.errors import StatementFailed
from flagsched.model import Claimed, Outcome, Result, Updates

# pg_advisory_xact_lock key for `flagsched migrate` ("flagsch" in ASCII).
MIGRATION_LOCK_KEY = 0x666C6167736368


def schema_revision(conn: Connection) -> str | None:
    """The alembic revision the database is at, or None when it was never migrated."""
    if conn.execute(sa.text("SELECT to_regclass('alembic_version')")).scalar() is None:
        return None
    value = conn.execute(sa.text("SELECT version_num FROM alembic_version LIMIT 1")).scalar()
    return str(value) if value is not None else None


def take_migration_lock(conn: Connection) -> None:
    """Serialise concurrent `flagsched migrate` runs until this transaction ends."""
    conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})


def db_now(conn: Connection) -> datetime:
    """The database's clock (the transaction's start), the only clock a tick uses."""
    value: datetime = conn.execute(sa.text("SELECT now()")).scalar_one()
    return value


# The LATERAL ... LIMIT 1 subqueries are deliberate: they keep each check a per-row index
# probe (idx_schedules_flag_open, the flags' key index) whatever the planner guesses about
# the batch size, instead of a hash over every flag or every waiting retry.
# Retries first (by next_retry_at), then new schedules (by scheduled_at, id), together at
# most :limit rows, skipping rows other ticks hold. A pending schedule behind a retry that is
# not due yet is not claimed at all, so held-back rows never crowd a batch. `blocked` tells
# whether an earlier schedule of the same flag outside this claim is still open (pending or
# waiting for a retry): such a schedule is held back.
_OPEN = (
    "(e.status = 'pending' OR (e.status = 'failed' AND e.next_retry_at IS NOT NULL"
    " AND e.retry_count <= e.max_retries))"
)
_COLUMNS = "id, flag_key, scheduled_at, updates, status, retry_count, max_retries, next_retry_at"
_CLAIM = sa.text(
    f"""
    WITH retries AS (
        SELECT {_COLUMNS} FROM feature_flag_schedules
        WHERE status = 'failed' AND next_retry_at <= :now AND retry_count <= max_retries
        ORDER BY next_retry_at, id
        LIMIT :limit
        FOR UPDATE SKIP LOCKED
    ), pending AS (
        SELECT {", ".join("s." + c for c in _COLUMNS.split(", "))}
        FROM feature_flag_schedules s
        LEFT JOIN LATERAL (
            SELECT 1 AS hit FROM feature_flag_schedules e
            WHERE e.flag_key = s.flag_key
              AND e.status IN ('pending', 'failed')
              AND e.status = 'failed' AND e.next_retry_at > :now
              AND e.retry_count <= e.max_retries
              AND (e.scheduled_at, e.id) < (s.scheduled_at, s.id)
            LIMIT 1
        ) waiting ON true
        WHERE s.status = 'pending' AND s.scheduled_at <= :now AND waiting.hit IS NULL
        ORDER BY s.scheduled_at, s.id
        LIMIT :limit - (SELECT count(*) FROM retries)
        FOR UPDATE OF s SKIP LOCKED
    ), claimed AS (
        SELECT * FROM retries UNION ALL SELECT * FROM pending
    )
    SELECT c.*, f.hit IS NOT NULL AS flag_exists, b.blocked
    FROM claimed c
    LEFT JOIN LATERAL (
        SELECT 1 AS hit FROM feature_flags f WHERE f.key = c.flag_key LIMIT 1
    ) f ON true
    CROSS JOIN LATERAL (
        SELECT EXISTS (
            SELECT 1 FROM feature_flag_schedules e
            WHERE e.flag_key = c.flag_key
              AND e.status IN ('pending', 'failed') AND {_OPEN}
              AND (e.scheduled_at, e.id) < (c.scheduled_at, c.id)
              AND e.id NOT IN (SELECT id FROM claimed)
        ) AS blocked
    ) b
    ORDER BY c.flag_key, c.scheduled_at, c.id
    """
)


def claim(conn: Connection, *, now: datetime, limit: int) -> list[Claimed]:
    """Lock and return up to `limit` due schedules, ordered by flag then (scheduled_at, id)."""
    rows = conn.execute(_CLAIM, {"now": now, "limit": limit}).mappings()
    return [Claimed(**row) for row in rows]


def lock_free_flags(conn: Connection, keys: Sequence[str]) -> set[str]:
    """Lock, in key order, the flags among `keys` that nobody else holds; return their keys."""
    rows = conn.execute(
        sa.text(
            "SELECT key FROM feature_flags WHERE key = ANY(:keys) "
            "ORDER BY key FOR UPDATE SKIP LOCKED"
        ),
        {"keys": list(keys)},
    )
    return {row[0] for row in rows}


def lock_flag(conn: Connection, key: str) -> bool:
    """Lock one flag, waiting up to lock_timeout; False when it does not exist."""
    row = conn.execute(
        sa.text("SELECT 1 FROM feature_flags WHERE key = :key FOR UPDATE"), {"key": key}
    ).first()
    return row is not None


def set_flags(conn: Connection, states: Mapping[str, Updates], *, now: datetime) -> None:
    """One UPDATE for many flags; a None field keeps the flag's current value."""
    keys = list(states)
    conn.execute(
        sa.text(
            """
            UPDATE feature_flags AS f
            SET enabled = coalesce(v.enabled, f.enabled),
                rollout_percentage = coalesce(v.rollout, f.rollout_percentage),
                updated_at = :now
            FROM unnest(CAST(:keys AS text[]), CAST(:enabled AS boolean[]),
                        CAST(:rollout AS integer[])) AS v(key, enabled, rollout)
            WHERE f.key = v.key
            """
        ),
        {
            "keys": keys,
            "enabled": [states[k].enabled for k in keys],
            "rollout": [states[k].rollout_percentage for k in keys],
            "now": now,
        },
    )


@contextmanager
def savepoint(conn: Connection) -> Iterator[None]:
    """A savepoint; a driver error inside rolls back to it and becomes a StatementFailed."""
    try:
        with conn.begin_nested():
            yield
    except sa.exc.DBAPIError as exc:
        raise StatementFailed(_reason(exc)) from exc


def _reason(exc: sa.exc.DBAPIError) -> str:
    """The server's primary message and SQLSTATE, one line (no CONTEXT or driver noise)."""
    orig = exc.orig
    diag = getattr(orig, "diag", None)
    primary = getattr(diag, "message_primary", None)
    if primary:
        return one_line(f"{primary} (SQLSTATE {getattr(orig, 'sqlstate', '?')})", [])
    return one_line(str(orig) if orig is not None else str(exc), [])


def cancel_running_statement(conn: Connection) -> None:
    """Ask the server to cancel what this connection is running (safe from a signal handler)."""
    driver = conn.connection.driver_connection
    if driver is not None:
        driver.cancel()


def record(conn: Connection, results: Sequence[Result], *, now: datetime) -> None:
    """Write every applied / retry / failed outcome of a batch in one UPDATE."""
    done = [r for r in results if r.outcome is not Outcome.HELD_BACK]
    if not done:
        return
    conn.execute(
        sa.text(
            """
            UPDATE feature_flag_schedules AS s
            SET status = CASE WHEN v.applied THEN 'applied' ELSE 'failed' END,
                applied_at = CASE WHEN v.applied THEN CAST(:now AS timestamptz) END,
                retry_count = s.retry_count + CASE WHEN v.applied THEN 0 ELSE 1 END,
                max_retries = coalesce(v.max_retries, s.max_retries),
                next_retry_at = v.next_retry_at,
                last_error = v.last_error,
                updated_at = :now
            FROM unnest(CAST(:ids AS bigint[]), CAST(:applied AS boolean[]),
                        CAST(:next AS timestamptz[]), CAST(:errors AS text[]),
                        CAST(:max AS integer[]))
                 AS v(id, applied, next_retry_at, last_error, max_retries)
            WHERE s.id = v.id
            """
        ),
        {
            "ids": [r.schedule.id for r in done],
            "applied": [r.outcome is Outcome.APPLIED for r in done],
            "next": [r.next_retry_at for r in done],
            "errors": [r.error for r in done],
            "max": [r.max_retries for r in done],
            "now": now,
        },
    )


def list_failed(
    conn: Connection,
    *,
    permanent: bool | None,
    flag_key: str | None,
    limit: int,
) -> list[dict[str, Any]]:
    """Failed schedules, most recently failed first; `permanent` filters by waiting/for good."""
    waiting = "(next_retry_at IS NOT NULL AND retry_count <= max_retries)"
    where = ["status = 'failed'"]
    if permanent is True:
        where.append(f"NOT {waiting}")
    elif permanent is False:
        where.append(waiting)
    if flag_key is not None:
        where.append("flag_key = :flag_key")
    rows = conn.execute(
        sa.text(
            f"""
            SELECT id, flag_key, scheduled_at, updates, status, retry_count, max_retries,
                   next_retry_at, last_error, applied_at, created_at, updated_at,
                   NOT {waiting} AS permanent
            FROM feature_flag_schedules
            WHERE {" AND ".join(where)}
            ORDER BY updated_at DESC, id DESC
            LIMIT :limit
            """
        ),
        {"flag_key": flag_key, "limit": limit},
    ).mappings()
    return [dict(row) for row in rows]


def ensure_schema(conn: Connection) -> None:
    """Refuse to work on a database that is not at the latest revision."""
    from flagsched.db import SCHEMA_REVISION
    from flagsched.errors import SchemaNotCurrent

    found = schema_revision(conn)
    if found != SCHEMA_REVISION:
        at = f"at revision {found}" if found else "not migrated"
        raise SchemaNotCurrent(
            f"the database schema is {at} (latest: {SCHEMA_REVISION}): run `flagsched migrate`"
        )


# --- operators -------------------------------------------------------------------------

_WAITING = "(status = 'failed' AND next_retry_at IS NOT NULL AND retry_count <= max_retries)"


def backlog(conn: Connection, *, now: datetime) -> dict[str, Any]:
    """Due count, oldest due time and next due time; index scans only (runs every tick)."""
    row = conn.execute(
        sa.text(
            f"""
            WITH pending AS (
                SELECT count(*) AS n, min(scheduled_at) AS oldest FROM feature_flag_schedules
                WHERE status = 'pending' AND scheduled_at <= :now
            ), retries AS (
                SELECT count(*) AS n, min(next_retry_at) AS oldest FROM feature_flag_schedules
                WHERE next_retry_at <= :now AND {_WAITING}
            )
            SELECT pending.n + retries.n AS due,
                   LEAST(pending.oldest, retries.oldest) AS oldest_due_at,
                   LEAST(
                       (SELECT min(scheduled_at) FROM feature_flag_schedules
                        WHERE status = 'pending' AND scheduled_at > :now),
                       (SELECT min(next_retry_at) FROM feature_flag_schedules
                        WHERE next_retry_at > :now AND {_WAITING})
                   ) AS next_due_at
            FROM pending, retries
            """
        ),
        {"now": now},
    ).one()
    return dict(row._mapping)


def state_counts(conn: Connection, *, now: datetime) -> dict[str, int]:
    """Schedules per state (one pass over the table: for `status`, not for the tick)."""
    row = conn.execute(
        sa.text(
            f"""
            SELECT
              count(*) FILTER (WHERE status = 'pending' AND scheduled_at > :now) AS scheduled,
              count(*) FILTER (WHERE {_WAITING} AND next_retry_at > :now) AS waiting_retry,
              count(*) FILTER (WHERE status = 'failed' AND NOT {_WAITING}) AS failed,
              count(*) FILTER (WHERE status = 'applied') AS applied,
              count(*) FILTER (WHERE status = 'cancelled') AS cancelled
            FROM feature_flag_schedules
            """
        ),
        {"now": now},
    ).one()
    return {k: int(v) for k, v in row._mapping.items()}


def flag_exists(conn: Connection, key: str) -> bool:
    return (
        conn.execute(
            sa.text("SELECT EXISTS (SELECT 1 FROM feature_flags WHERE key = :k)"), {"k": key}
        ).scalar_one()
        is True
    )


def insert_schedule(
    conn: Connection,
    *,
    flag_key: str,
    at: datetime | None,
    updates: Updates,
    max_retries: int | None,
) -> int:
    """A new pending schedule; `at` None means the database's now()."""
    import json

    new_id = conn.execute(
        sa.text(
            """
            INSERT INTO feature_flag_schedules (flag_key, scheduled_at, updates, max_retries)
            VALUES (:k, coalesce(CAST(:at AS timestamptz), now()), CAST(:u AS jsonb),
                    coalesce(CAST(:m AS integer), 3))
            RETURNING id
            """
        ),
        {"k": flag_key, "at": at, "u": json.dumps(updates.as_json()), "m": max_retries},
    ).scalar_one()
    return int(new_id)


def lock_schedule(conn: Connection, schedule_id: int) -> dict[str, Any] | None:
    """Lock one schedule (waiting for a tick that holds it to commit) and return it."""
    row = conn.execute(
        sa.text(
            f"""
            SELECT id, flag_key, scheduled_at, status, retry_count, max_retries, next_retry_at,
                   {_WAITING} AS waiting
            FROM feature_flag_schedules WHERE id = :i FOR UPDATE
            """
        ),
        {"i": schedule_id},
    ).first()
    return dict(row._mapping) if row else None


def newer_applied_exists(conn: Connection, schedule_id: int) -> bool:
    """Has a later schedule of the same flag, in (scheduled_at, id) order, been applied?"""
    return (
        conn.execute(
            sa.text(
                """
            SELECT EXISTS (
                SELECT 1 FROM feature_flag_schedules l JOIN feature_flag_schedules s
                  ON l.flag_key = s.flag_key AND (l.scheduled_at, l.id) > (s.scheduled_at, s.id)
                WHERE s.id = :i AND l.status = 'applied')
            """
            ),
            {"i": schedule_id},
        ).scalar_one()
        is True
    )


def reset_for_retry(conn: Connection, schedule_id: int) -> None:
    """failed -> pending with retry_count 0; last_error stays until it applies."""
    conn.execute(
        sa.text(
            "UPDATE feature_flag_schedules SET status = 'pending', retry_count = 0, "
            "next_retry_at = NULL, updated_at = now() WHERE id = :i"
        ),
        {"i": schedule_id},
    )


def mark_cancelled(conn: Connection, schedule_id: int) -> None:
    conn.execute(
        sa.text(
            "UPDATE feature_flag_schedules SET status = 'cancelled', next_retry_at = NULL, "
            "updated_at = now() WHERE id = :i"
        ),
        {"i": schedule_id},
    )


_PRUNABLE = """
    (status = 'applied' AND applied_at < now() - make_interval(secs => :seconds))
    OR (status = 'cancelled' AND updated_at < now() - make_interval(secs => :seconds))
"""


def count_prunable(conn: Connection, *, older_than_seconds: float) -> dict[str, int]:
    rows = conn.execute(
        sa.text(
            f"SELECT status, count(*) FROM feature_flag_schedules WHERE {_PRUNABLE} GROUP BY status"
        ),
        {"seconds": older_than_seconds},
    )
    return {str(status): int(n) for status, n in rows}


def prune_batch(conn: Connection, *, older_than_seconds: float, limit: int) -> dict[str, int]:
    """Delete up to `limit` old applied/cancelled schedules; rows a tick holds are skipped."""
    rows = conn.execute(
        sa.text(
            f"""
            WITH doomed AS (
                SELECT id FROM feature_flag_schedules WHERE {_PRUNABLE}
                LIMIT :limit FOR UPDATE SKIP LOCKED
            )
            DELETE FROM feature_flag_schedules s USING doomed d WHERE s.id = d.id
            RETURNING s.status
            """
        ),
        {"seconds": older_than_seconds, "limit": limit},
    )
    counts: dict[str, int] = {}
    for (status,) in rows:
        counts[status] = counts.get(status, 0) + 1
    return counts
