"""The reference drain: the tick's contract, set-based, in raw psycopg 3 and nothing else.

`python -m bench.reference URL [--batch-size N] [--max-batches N]` drains due schedules the
way the database would like it done: per batch, one claim (retries first, `FOR UPDATE SKIP
LOCKED`, schedules behind an open earlier one of their flag held back), one lock of the
claimed flags in key order, one UPDATE for the flags (consecutive changes of a flag folded)
and one for the schedules, one commit. No ORM, no logging, no per-row work in SQL.

It obeys the same rules behind a connection pooler as flagsched (so the comparison is of
equals): only `application_name` at startup, the session settings as SET LOCAL in the
BEGIN round trip, no server-side prepared statements. `--prepare` lets psycopg prepare
statements as it does by default (not pooler-safe): case 7 measures what giving that up costs.

Its statements are its own, on purpose, and the only SQL in bench/ that flagsched does not
send: this is "the best plain code" flagsched is measured against, not a copy of
flagsched's statements (those are named in flagsched/sql/queries.sql, and every other case
goes through them or the repository).

It is a yardstick for the happy path, not a second product: a schedule naming a missing flag
or carrying invalid `updates` fails for good, but a failing flag UPDATE is not isolated (it
aborts the run), which the benchmark's case 1 never provokes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import psycopg

_CLAIM = """
WITH retries AS (
    SELECT id, flag_key, scheduled_at, updates FROM feature_flag_schedules
    WHERE status = 'failed' AND next_retry_at <= now() AND retry_count <= max_retries
    ORDER BY next_retry_at, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), pending AS (
    SELECT id, flag_key, scheduled_at, updates FROM feature_flag_schedules s
    WHERE s.status = 'pending' AND s.scheduled_at <= now()
      AND NOT EXISTS (
          SELECT 1 FROM feature_flag_schedules e
          WHERE e.flag_key = s.flag_key
            AND e.status = 'failed' AND e.next_retry_at > now()
            AND e.retry_count <= e.max_retries
            AND (e.scheduled_at, e.id) < (s.scheduled_at, s.id))
    ORDER BY s.scheduled_at, s.id
    LIMIT %(limit)s - (SELECT count(*) FROM retries)
    FOR UPDATE SKIP LOCKED
), claimed AS (
    SELECT * FROM retries UNION ALL SELECT * FROM pending
)
SELECT c.id, c.flag_key, c.updates,
       EXISTS (
           SELECT 1 FROM feature_flag_schedules e
           WHERE e.flag_key = c.flag_key
             AND e.status IN ('pending', 'failed')
             AND (e.status = 'pending'
                  OR (e.next_retry_at IS NOT NULL AND e.retry_count <= e.max_retries))
             AND (e.scheduled_at, e.id) < (c.scheduled_at, c.id)
             AND e.id NOT IN (SELECT id FROM claimed)
       ) AS blocked
FROM claimed c
ORDER BY c.flag_key, c.scheduled_at, c.id
"""

_LOCK_FLAGS = "SELECT key FROM feature_flags WHERE key = ANY(%s) ORDER BY key FOR UPDATE"

_SET_FLAGS = """
UPDATE feature_flags AS f
SET enabled = coalesce(v.enabled, f.enabled),
    rollout_percentage = coalesce(v.rollout, f.rollout_percentage),
    updated_at = now()
FROM unnest(%s::text[], %s::boolean[], %s::integer[]) AS v(key, enabled, rollout)
WHERE f.key = v.key
"""

_RECORD = """
UPDATE feature_flag_schedules AS s
SET status = CASE WHEN v.error IS NULL THEN 'applied' ELSE 'failed' END,
    applied_at = CASE WHEN v.error IS NULL THEN now() END,
    retry_count = s.retry_count + CASE WHEN v.error IS NULL THEN 0 ELSE 1 END,
    next_retry_at = NULL,
    last_error = v.error,
    updated_at = now()
FROM unnest(%s::bigint[], %s::text[]) AS v(id, error)
WHERE s.id = v.id
"""

_BEGIN = (
    "BEGIN; SET LOCAL lock_timeout = 5000; SET LOCAL statement_timeout = 30000; "
    "SET LOCAL idle_in_transaction_session_timeout = 60000; SET LOCAL timezone = 'UTC'; "
    "SET LOCAL jit = off"
)


def _invalid(updates: Any) -> str | None:
    """Why `updates` is not an object of enabled (bool) and/or rollout_percentage (0..100)."""
    if not isinstance(updates, dict) or not updates:
        return "updates must be a non-empty JSON object"
    if set(updates) - {"enabled", "rollout_percentage"}:
        return "updates has unknown keys"
    enabled = updates.get("enabled", False)
    rollout = updates.get("rollout_percentage", 0)
    if not isinstance(enabled, bool):
        return "enabled must be true or false"
    if isinstance(rollout, bool) or not isinstance(rollout, int) or not 0 <= rollout <= 100:
        return "rollout_percentage must be an integer 0..100"
    return None


def drain_batch(conn: psycopg.Connection[Any], batch_size: int) -> tuple[int, int]:
    """One batch in one transaction; returns (schedules claimed, schedules recorded)."""
    conn.execute(_BEGIN)  # one round trip; a failure aborts the run (and so rolls back)
    counts = _batch(conn, batch_size)
    conn.commit()
    return counts


def _batch(conn: psycopg.Connection[Any], batch_size: int) -> tuple[int, int]:
    rows = conn.execute(_CLAIM, {"limit": batch_size}).fetchall()
    folded: dict[str, tuple[bool | None, int | None]] = {}
    ids: list[int] = []
    errors: list[str | None] = []
    wanted: dict[str, list[int]] = {}
    for schedule_id, flag_key, updates, blocked in rows:
        if blocked:
            continue  # held back: left as it is, due again next batch
        error = _invalid(updates)
        if error is not None:
            ids.append(schedule_id)
            errors.append(error)
            continue
        enabled, rollout = folded.get(flag_key, (None, None))
        folded[flag_key] = (
            updates.get("enabled", enabled),
            updates.get("rollout_percentage", rollout),
        )
        wanted.setdefault(flag_key, []).append(schedule_id)
    if folded:
        found = {r[0] for r in conn.execute(_LOCK_FLAGS, (sorted(folded),))}
        keys = [k for k in folded if k in found]
        if keys:
            conn.execute(
                _SET_FLAGS,
                (keys, [folded[k][0] for k in keys], [folded[k][1] for k in keys]),
            )
        for key, schedule_ids in wanted.items():
            error = None if key in found else f"flag {key!r} does not exist"
            ids += schedule_ids
            errors += [error] * len(schedule_ids)
    if ids:
        conn.execute(_RECORD, (ids, errors))
    return len(rows), len(ids)


def drain(url: str, batch_size: int, max_batches: int, *, prepare: bool = False) -> int:
    """Run up to `max_batches` batches, stopping when a batch records nothing."""
    done = 0
    with psycopg.connect(
        url,
        autocommit=True,
        application_name="flagsched-reference",
        prepare_threshold=5 if prepare else None,  # 5: psycopg's default
    ) as conn:
        conn.execute("SELECT version_num FROM alembic_version").fetchone()
        for _ in range(max_batches):
            _, recorded = drain_batch(conn, batch_size)
            done += recorded
            if not recorded:
                break
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.reference", description=__doc__)
    parser.add_argument("url", help="postgresql://... of a migrated database")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--max-batches", type=int, default=1000)
    parser.add_argument(
        "--prepare", action="store_true", help="let psycopg prepare statements (not pooler-safe)"
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    done = drain(args.url, args.batch_size, args.max_batches, prepare=args.prepare)
    # One JSON line, like flagsched's tick_finished, so the bench can split startup from work.
    print(
        json.dumps(
            {
                "event": "reference_finished",
                "recorded": done,
                "duration_seconds": round(time.perf_counter() - started, 4),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
