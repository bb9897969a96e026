"""Every SQL statement flagsched runs, on a psycopg connection. Callers own the transaction;
the tick passes the database's `now` in."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import psycopg
from psycopg.abc import Buffer
from psycopg.rows import class_row, dict_row
from psycopg.types.datetime import IntervalLoader, TimestamptzLoader

from flagsched.db import Conn, one_line
from flagsched.errors import SchemaNotCurrent, StatementFailed, UnsupportedDatabase
from flagsched.model import (
    MAX_TEXT,
    NOTIFY_CHANNEL,
    ActiveRecurrence,
    Change,
    Claimed,
    FlagRow,
    OnConflict,
    OpenSchedule,
    Outcome,
    Result,
    Status,
    Updates,
    Verdict,
)
from flagsched.required import REQUIRED, Function, Required, Table

_Row = TypeVar("_Row")

# pg_advisory_xact_lock key for `flagsched migrate` ("flagsch" in ASCII).
MIGRATION_LOCK_KEY = 0x666C6167736368


class _LenientTimestamptz(TimestamptzLoader):
    """A timestamptz Python cannot hold (infinity, BC, past 9999) as PostgreSQL's text,
    so one such row never stops a read command."""

    def load(self, data: Buffer) -> datetime | str:  # type: ignore[override]
        try:
            return super().load(data)
        except psycopg.DataError:
            return bytes(data).decode()


class _LenientInterval(IntervalLoader):
    def load(self, data: Buffer) -> timedelta | str:  # type: ignore[override]
        try:
            return super().load(data)
        except psycopg.DataError:
            return bytes(data).decode()


def _dicts(conn: Conn, sql: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Rows as dicts; a stored time or interval Python cannot hold (infinity, BC, past year
    9999) comes back as PostgreSQL's text, so a command that shows rows reads any row."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.adapters.register_loader("timestamptz", _LenientTimestamptz)
        cur.adapters.register_loader("interval", _LenientInterval)
        return cur.execute(sql, params).fetchall()


def _scalar(conn: Conn, sql: str, params: Mapping[str, Any] | None = None) -> Any:
    row = conn.execute(sql, params).fetchone()
    return None if row is None else row[0]


def _refuse_sql_ascii(encoding: str | bytes) -> None:
    """A SQL_ASCII database is refused: its text has no encoding, so neither can ours."""
    if isinstance(encoding, bytes):  # psycopg returns text undecoded from SQL_ASCII
        encoding = encoding.decode("ascii", "replace")
    if encoding == "SQL_ASCII":
        raise UnsupportedDatabase(
            "the database's encoding is SQL_ASCII (text without an encoding); flagsched "
            "needs UTF8: create the database with ENCODING 'UTF8'"
        )


def schema_revision(conn: Conn) -> str | None:
    """The alembic revision the database is at, or None when it was never migrated (for
    `migrate`; other commands check the objects they use, see `ensure_schema`)."""
    row = conn.execute(
        "SELECT current_setting('server_encoding'), to_regclass('alembic_version') IS NOT NULL"
    ).fetchone()
    encoding, migrated = row if row is not None else ("", False)
    _refuse_sql_ascii(encoding)
    if not migrated:
        return None
    value = _scalar(conn, "SELECT version_num FROM alembic_version LIMIT 1")
    return str(value) if value is not None else None


# Which of the required objects are missing, as their positions in the list (from 1): catalog
# lookups only (no table is read), one round trip at the start of every command.
_MISSING_OBJECTS = """
    WITH r AS (
        SELECT * FROM unnest(CAST(%(kinds)s AS text[]), CAST(%(relations)s AS text[]),
                             CAST(%(names)s AS text[])) WITH ORDINALITY
                      AS r(kind, relation, name, n)
    ), columns AS MATERIALIZED (  -- each table's columns read once, not once per column
        SELECT t.relation, a.attname::text AS name
        FROM (SELECT DISTINCT relation FROM r WHERE kind = 'column') AS t
        JOIN pg_attribute a ON a.attrelid = to_regclass(t.relation)
        WHERE a.attnum > 0 AND NOT a.attisdropped
    )
    SELECT current_setting('server_encoding'), ARRAY(
        SELECT r.n FROM r
        WHERE NOT CASE r.kind
            WHEN 'relation' THEN to_regclass(r.relation) IS NOT NULL
            WHEN 'function' THEN to_regprocedure(r.name) IS NOT NULL
            WHEN 'column' THEN (r.relation, r.name) IN (SELECT relation, name FROM columns)
            ELSE EXISTS (
                SELECT FROM pg_trigger t
                WHERE t.tgrelid = to_regclass(r.relation)
                  AND (t.tgname = r.name
                       OR left(t.tgname, length(r.name) + 1) = r.name || '_'))
        END
        ORDER BY r.n)
"""


def _lookups(objects: Sequence[Required]) -> list[tuple[str, str, str, str]]:
    """Each object as catalog lookups: (kind, relation, name, how a message names it)."""
    found: list[tuple[str, str, str, str]] = []
    for o in objects:
        if isinstance(o, Table):
            kind = "table" if o.columns else "sequence"
            found.append(("relation", o.name, "", f"{kind} {o.name}"))
            found += [("column", o.name, c, f"column {o.name}.{c}") for c in o.columns]
        elif isinstance(o, Function):
            found.append(("function", "", o.signature, f"function {o.signature}"))
        else:
            found.append(("trigger", o.table, o.name, f"trigger {o.name} on {o.table}"))
    return found


def missing_objects(conn: Conn, objects: Sequence[Required] = REQUIRED) -> list[str]:
    """The objects of `objects` the database lacks, named for a message (a missing table
    stands for its columns). A SQL_ASCII database is refused."""
    lookups = _lookups(objects)
    row = conn.execute(
        _MISSING_OBJECTS,
        {
            "kinds": [k for k, _, _, _ in lookups],
            "relations": [r for _, r, _, _ in lookups],
            "names": [n for _, _, n, _ in lookups],
        },
    ).fetchone()
    encoding, positions = row if row is not None else ("", [])
    _refuse_sql_ascii(encoding)
    missing = [lookups[n - 1] for n in positions]
    gone = {relation for kind, relation, _, _ in missing if kind == "relation"}
    return [s for kind, relation, _, s in missing if kind != "column" or relation not in gone]


_SHOWN_MISSING = 5  # a message names at most this many, then says how many more


def ensure_schema(conn: Conn) -> None:
    """Refuse to work on a database that lacks an object this release uses. A schema that
    a later release migrated further is fine: only what is missing counts."""
    missing = missing_objects(conn)
    if not missing:
        return
    if all(f"table {o.name}" in missing for o in REQUIRED if isinstance(o, Table) and o.columns):
        raise SchemaNotCurrent("the database is not migrated: run `flagsched migrate`")
    shown = ", ".join(missing[:_SHOWN_MISSING])
    more = len(missing) - _SHOWN_MISSING
    raise SchemaNotCurrent(
        f"the database schema lacks {shown}{f' and {more} more' if more > 0 else ''}, which "
        "this flagsched uses: run `flagsched migrate`"
    )


def take_migration_lock(conn: Conn) -> None:
    """Serialise concurrent `flagsched migrate` runs until this transaction ends."""
    conn.execute("SELECT pg_advisory_xact_lock(%(key)s)", {"key": MIGRATION_LOCK_KEY})


def db_now(conn: Conn) -> datetime:
    """The database's clock (the transaction's start), the only clock a tick uses."""
    value: datetime = _scalar(conn, "SELECT now()")
    return value


def _waiting_row(p: str = "") -> str:
    """A failed schedule (alias prefix `p`) still waiting for a retry: SPEC's one definition."""
    return f"({p}next_retry_at IS NOT NULL AND {p}retry_count <= {p}max_retries)"


_WAITING_ROW = _waiting_row()
_WAITING = f"(status = 'failed' AND {_WAITING_ROW})"

# Stored values that commands show but Python cannot hold: times outside years 1..9999 are
# clamped (the claim, flagsched_claim_v2 of migration 0006, does the same) and `updates`
# larger than this is shown as a note of its size.
UPDATES_MAX_BYTES = 8192
_TIME_MIN, _TIME_MAX = "'0001-01-01 00:00:00+00'", "'9999-12-31 23:59:59.999999+00'"


def _clamped_time(column: str) -> str:
    """SQL: `column` moved into the range Python can hold (NULL stays NULL)."""
    return (
        f"CASE WHEN {column} < TIMESTAMPTZ {_TIME_MIN} THEN TIMESTAMPTZ {_TIME_MIN}"
        f" WHEN {column} > TIMESTAMPTZ {_TIME_MAX} THEN TIMESTAMPTZ {_TIME_MAX}"
        f" ELSE {column} END"
    )


def _updates_size(column: str) -> str:
    return f"octet_length(CAST({column} AS text))"


# `updates` as commands show it: one too large to ship is a note of its size.
_SHOWN_UPDATES = f"""
    CASE WHEN {_updates_size("updates")} <= {UPDATES_MAX_BYTES} THEN updates
         ELSE to_jsonb('(' || {_updates_size("updates")} || ' bytes: not shown)') END
    AS updates"""


def claim(conn: Conn, *, limit: int, lock: bool = True) -> tuple[datetime | None, list[Claimed]]:
    """Lock and return up to `limit` schedules due at the database's now(), ordered by flag
    then (scheduled_at, id), with that now() (None when nothing was claimed). Without
    `lock`, the same rows read in a read-only transaction, locking none (a preview)."""
    if not lock:
        conn.execute("SET TRANSACTION READ ONLY")
    # flagsched_claim_v2 (migration 0006): a stored function, so its plan is cached per
    # server connection even behind a pooler (no client-side prepared statements). It
    # claims only schedules that can move: none held back behind an open one not due.
    rows = conn.execute(
        "SELECT * FROM flagsched_claim_v2(%(limit)s, %(lock)s)", {"limit": limit, "lock": lock}
    ).fetchall()
    now = rows[0][0] if rows else None
    return now, [Claimed(*row[1:]) for row in rows]  # columns in Claimed's field order


def held_back(conn: Conn, *, limit: int) -> list[Claimed]:
    """Up to `limit` due schedules held back behind an earlier open schedule of their flag
    that is not due (flagsched_held_back_v1, migration 0006): never claimed, locked by
    nothing, only reported. Ordered by flag, then (scheduled_at, id)."""
    rows = conn.execute(
        "SELECT * FROM flagsched_held_back_v1(%(limit)s)", {"limit": limit}
    ).fetchall()
    return [
        Claimed(
            id=int(i),
            flag_key=str(key),
            scheduled_at=at,
            updates=None,
            status=str(status),
            retry_count=int(retry_count),
            max_retries=int(max_retries),
            next_retry_at=None,
            blocked=True,
        )
        for i, key, at, status, retry_count, max_retries in rows
    ]


def apply(
    conn: Conn,
    changes: Sequence[Change],
    *,
    wait: bool,
    max_lateness_seconds: float | None,
) -> dict[int, tuple[Verdict, str | None]]:
    """Write `changes` (in order: flag, then scheduled_at, id) with flagsched_apply_v3
    (migration 0006): under the flags' FOR NO KEY UPDATE row locks (SKIP LOCKED, or waited
    for with `wait`; a row referencing a flag by foreign key never blocks them)
    each change is decided (missing, busy, expired, conflict) and the rest written
    set-based, change by change only when that fails. Returns {index: (verdict, error)} for
    the changes that did not apply."""
    rows = conn.execute(
        """
        SELECT item, outcome, message FROM flagsched_apply_v3(
            CAST(%(ids)b AS bigint[]), CAST(%(keys)b AS text[]),
            CAST(%(enabled)b AS boolean[]), CAST(%(rollout)b AS integer[]),
            CAST(%(stop)b AS boolean[]), make_interval(secs => %(lateness)s), %(wait)s)
        """,
        {
            "ids": [c.schedule.id for c in changes],
            "keys": [c.schedule.flag_key for c in changes],
            "enabled": [c.updates.enabled for c in changes],
            "rollout": [c.updates.rollout_percentage for c in changes],
            "stop": [c.stop_on_failure for c in changes],
            "lateness": max_lateness_seconds,
            "wait": wait,
        },
    ).fetchall()
    return {int(item) - 1: (Verdict(outcome), message) for item, outcome, message in rows}


def safety_checks(
    conn: Conn, ids: Sequence[int], *, max_lateness_seconds: float | None
) -> dict[int, tuple[Verdict, str]]:
    """The expired / conflict verdicts the write would reach now (for --dry-run; no lock)."""
    rows = conn.execute(
        """
        SELECT i.id, k.outcome, k.message
        FROM unnest(CAST(%(ids)b AS bigint[])) AS i(id)
        CROSS JOIN LATERAL flagsched_check_v2(i.id, make_interval(secs => %(lateness)s)) k
        """,
        {"ids": list(ids), "lateness": max_lateness_seconds},
    ).fetchall()
    return {int(i): (Verdict(outcome), str(message)) for i, outcome, message in rows}


@contextmanager
def savepoint(conn: Conn) -> Iterator[None]:
    """A savepoint; a driver error inside rolls back to it and becomes a StatementFailed."""
    try:
        with conn.transaction():
            yield
    except psycopg.Error as exc:
        raise StatementFailed(reason(exc), exc.sqlstate) from exc


def reason(exc: psycopg.Error) -> str:
    """The server's primary message and SQLSTATE, one line (no CONTEXT or driver noise)."""
    primary = exc.diag.message_primary
    if primary:
        return one_line(f"{primary} (SQLSTATE {exc.sqlstate or '?'})", [])
    return one_line(str(exc), [])


def cancel_running_statement(conn: Conn) -> None:
    """Ask the server to cancel what this connection is running (safe from a signal handler)."""
    conn.cancel_safe(timeout=1.0)




def record(
    conn: Conn, results: Sequence[Result], *, now: datetime, notice: str | None = None
) -> None:
    """Write every applied / retry / failed outcome of a batch, and its attempt, in one
    UPDATE (applied ids travel as one array: the common case carries little); `notice`,
    when given, is NOTIFYed in the same statement (delivered at commit)."""
    applied = [r.schedule for r in results if r.outcome is Outcome.APPLIED]
    failed = [r for r in results if r.outcome in (Outcome.RETRY, Outcome.FAILED)]
    if not applied and not failed:
        return
    conn.execute(
        f"""
        WITH recorded AS (
            UPDATE feature_flag_schedules AS s
            SET status = CASE WHEN v.outcome = 'applied' THEN 'applied' ELSE 'failed' END,
                applied_at = CASE WHEN v.outcome = 'applied' THEN %(now)s::timestamptz END,
                -- saturates: a retry_count at the integer limit stays there (no overflow)
                retry_count = s.retry_count + CASE
                    WHEN v.outcome = 'applied' OR s.retry_count = 2147483647 THEN 0 ELSE 1 END,
                max_retries = coalesce(v.max_retries, s.max_retries),
                next_retry_at = v.next_retry_at,
                last_error = CASE WHEN v.outcome = 'applied' THEN NULL ELSE v.last_error END,
                updated_at = %(now)s,
                -- the claim numbered the attempts kept, and the row stayed locked since:
                -- none kept means start again from []; otherwise the last few are kept
                -- (flagsched_kept_attempts_v2, bounded: it reads no TOAST of a value too
                -- large to keep), so a row's cost is bounded whatever it held
                attempts = CASE WHEN v.made = 0 THEN '[]'::jsonb
                                ELSE flagsched_kept_attempts_v2(s.attempts) END
                    || jsonb_build_array(jsonb_build_object(
                    'attempt', v.made + 1, 'at', %(at)s::text,
                    'outcome', v.outcome, 'error', v.last_error))
            FROM (
                SELECT a.id, 'applied' AS outcome, NULL::timestamptz AS next_retry_at,
                       NULL::text AS last_error, NULL::integer AS max_retries, a.made
                FROM unnest(CAST(%(applied)b AS bigint[]), CAST(%(applied_made)b AS integer[]))
                     AS a(id, made)
                UNION ALL
                SELECT f.id, f.outcome, f.next_retry_at, f.last_error, f.max_retries, f.made
                FROM unnest(CAST(%(failed)b AS bigint[]), CAST(%(outcomes)b AS text[]),
                            CAST(%(next)b AS timestamptz[]), CAST(%(errors)b AS text[]),
                            CAST(%(max)b AS integer[]), CAST(%(failed_made)b AS integer[]))
                     AS f(id, outcome, next_retry_at, last_error, max_retries, made)
            ) AS v
            WHERE s.id = v.id
        )
        SELECT pg_notify('{NOTIFY_CHANNEL}', %(notice)s::text) WHERE %(notice)s::text IS NOT NULL
        """,
        {
            "applied": [c.id for c in applied],
            "applied_made": [c.attempts_made for c in applied],
            "failed": [r.schedule.id for r in failed],
            "failed_made": [r.schedule.attempts_made for r in failed],
            "outcomes": [r.outcome.value for r in failed],
            "next": [r.next_retry_at for r in failed],
            "errors": [r.error for r in failed],
            "max": [r.max_retries for r in failed],
            "now": now,
            "at": now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),  # once, not per row
            "notice": notice,
        },
    )


def list_failed(
    conn: Conn,
    *,
    permanent: bool | None,
    flag_key: str | None,
    limit: int,
) -> list[dict[str, Any]]:
    """Failed schedules, most recently failed first; `permanent` filters by waiting/for good."""
    waiting = _WAITING_ROW
    where = ["status = 'failed'"]
    if permanent is True:
        where.append(f"NOT {waiting}")
    elif permanent is False:
        where.append(waiting)
    if flag_key is not None:
        where.append("flag_key = %(flag_key)s")
    return _dicts(
        conn,
        f"""
        SELECT id, flag_key, scheduled_at,
               {_SHOWN_UPDATES},
               status, retry_count, max_retries,
               next_retry_at, left(last_error, {MAX_TEXT}) AS last_error, applied_at, created_at,
               updated_at, NOT {waiting} AS permanent
        FROM feature_flag_schedules
        WHERE {" AND ".join(where)}
        ORDER BY updated_at DESC, id DESC
        LIMIT %(limit)s
        """,
        {"flag_key": flag_key, "limit": limit},
    )


# --- operators -------------------------------------------------------------------------



# Index scans only (idx_schedules_pending_due, idx_schedules_next_retry_at): it runs at the
# end of every tick and for `status --max-lag`, every minute, on tables of millions of rows.
BACKLOG = f"""
        WITH pending AS (
            SELECT count(*) AS n, min(scheduled_at) AS oldest FROM feature_flag_schedules
            WHERE status = 'pending' AND scheduled_at <= %(now)s
        ), retries AS (
            SELECT count(*) AS n, min(next_retry_at) AS oldest FROM feature_flag_schedules
            WHERE next_retry_at <= %(now)s AND {_WAITING}
        )
        SELECT pending.n + retries.n AS due,
               LEAST(pending.oldest, retries.oldest) AS oldest_due_at,
               EXTRACT(EPOCH FROM CAST(%(now)s AS timestamptz)
                   - {_clamped_time("LEAST(pending.oldest, retries.oldest)")}
               ) AS oldest_due_age_seconds,
               LEAST(
                   (SELECT min(scheduled_at) FROM feature_flag_schedules
                    WHERE status = 'pending' AND scheduled_at > %(now)s),
                   (SELECT min(next_retry_at) FROM feature_flag_schedules
                    WHERE next_retry_at > %(now)s AND {_WAITING})
               ) AS next_due_at
        FROM pending, retries
"""


def backlog(conn: Conn, *, now: datetime) -> dict[str, Any]:
    """Due count, oldest due time (and its age in seconds, a time before year 1 counted from
    year 1), next due time; index scans only (runs every tick and for `status --max-lag`)."""
    return _dicts(conn, BACKLOG, {"now": now})[0]


def state_counts(conn: Conn, *, now: datetime) -> dict[str, int]:
    """Schedules per state (one pass over the table: for `status`, not for the tick)."""
    row = _dicts(
        conn,
        f"""
        SELECT
          count(*) FILTER (WHERE status = 'pending' AND scheduled_at > %(now)s) AS scheduled,
          count(*) FILTER (WHERE {_WAITING} AND next_retry_at > %(now)s) AS waiting_retry,
          count(*) FILTER (WHERE status = 'failed' AND NOT {_WAITING}) AS failed,
          count(*) FILTER (WHERE status = 'applied') AS applied,
          count(*) FILTER (WHERE status = 'cancelled') AS cancelled,
          count(*) FILTER (WHERE status NOT IN ('pending', 'failed', 'applied', 'cancelled'))
            AS unknown
        FROM feature_flag_schedules
        """,
        {"now": now},
    )[0]
    return {k: int(v) for k, v in row.items()}


def existing_flags(conn: Conn, keys: Sequence[str]) -> set[str]:
    """Which of `keys` name a flag that exists."""
    rows = conn.execute(
        "SELECT key FROM feature_flags WHERE key = ANY(%(keys)s)", {"keys": list(keys)}
    ).fetchall()
    return {row[0] for row in rows}


def insert_schedule(
    conn: Conn,
    *,
    flag_key: str,
    at: datetime | None,
    updates: Updates,
    max_retries: int | None,
    expires_after: timedelta | None = None,
    on_conflict: OnConflict = OnConflict.FAIL,
) -> int:
    """A new pending schedule; `at` None means the database's now(); expires_at is
    scheduled_at + expires_after."""
    new_id = _scalar(
        conn,
        """
        INSERT INTO feature_flag_schedules
            (flag_key, scheduled_at, updates, max_retries, expires_at, on_conflict)
        SELECT %(k)s, t.at, CAST(%(u)s AS jsonb), coalesce(CAST(%(m)s AS integer), 3),
               t.at + CAST(%(e)s AS interval), %(c)s
        FROM (SELECT coalesce(CAST(%(at)s AS timestamptz), now()) AS at) AS t
        RETURNING id
        """,
        {
            "k": flag_key,
            "at": at,
            "u": json.dumps(updates.as_json()),
            "m": max_retries,
            "e": expires_after,
            "c": on_conflict.value,
        },
    )
    return int(new_id)


def lock_schedule(conn: Conn, schedule_id: int) -> dict[str, Any] | None:
    """Lock one schedule (waiting for a tick that holds it to commit) and return it."""
    rows = _dicts(
        conn,
        f"""
        SELECT id, flag_key, scheduled_at, status, retry_count, max_retries, next_retry_at,
               {_WAITING} AS waiting
        FROM feature_flag_schedules WHERE id = %(i)s FOR UPDATE
        """,
        {"i": schedule_id},
    )
    return rows[0] if rows else None


def newer_applied_exists(conn: Conn, schedule_id: int) -> bool:
    """Has a later schedule of the same flag, in (scheduled_at, id) order, been applied?
    Later schedules a tick has claimed but not committed count: their row locks are waited
    for first (up to lock_timeout; past it the statement fails and the caller says busy),
    and the check then reads what the tick committed (a new statement, a new snapshot)."""
    conn.execute(
        """
        SELECT l.id FROM feature_flag_schedules l JOIN feature_flag_schedules s
          ON l.flag_key = s.flag_key AND (l.scheduled_at, l.id) > (s.scheduled_at, s.id)
        WHERE s.id = %(i)s AND l.status IN ('pending', 'failed')
        FOR UPDATE OF l
        """,
        {"i": schedule_id},
    )
    found = _scalar(
        conn,
        """
        SELECT EXISTS (
            SELECT 1 FROM feature_flag_schedules l JOIN feature_flag_schedules s
              ON l.flag_key = s.flag_key AND (l.scheduled_at, l.id) > (s.scheduled_at, s.id)
            WHERE s.id = %(i)s AND l.status = 'applied')
        """,
        {"i": schedule_id},
    )
    return found is True


def reset_for_retry(conn: Conn, schedule_id: int) -> None:
    """failed -> pending with retry_count 0; last_error stays until it applies. A retry is a
    review: conflicts count from now on, and lateness (and an expires_at, shifted by as much
    as the schedule was late) restarts here."""
    conn.execute(
        """
        UPDATE feature_flag_schedules
        SET status = 'pending', retry_count = 0, next_retry_at = NULL, updated_at = now(),
            reviewed_at = now(),
            -- only times in years 1..9999 move (an application's extreme value stays, and
            -- can never overflow the sum)
            expires_at = CASE
                WHEN expires_at BETWEEN '0001-01-01' AND '9999-12-31'
                     AND greatest(scheduled_at, reviewed_at) BETWEEN '0001-01-01' AND now()
                THEN expires_at + (now() - greatest(scheduled_at, reviewed_at))
                ELSE expires_at END
        WHERE id = %(i)s
        """,
        {"i": schedule_id},
    )


def mark_cancelled(conn: Conn, schedule_id: int) -> None:
    conn.execute(
        "UPDATE feature_flag_schedules SET status = 'cancelled', next_retry_at = NULL, "
        "updated_at = now() WHERE id = %(i)s",
        {"i": schedule_id},
    )


# --- the record ------------------------------------------------------------------------

_CHANGE_COLUMNS = """
    id, flag_key, changed_at, actor,
    CASE WHEN old_enabled IS NULL THEN NULL ELSE jsonb_build_object(
        'enabled', old_enabled, 'rollout_percentage', old_rollout_percentage) END AS old,
    CASE WHEN new_enabled IS NULL THEN NULL ELSE jsonb_build_object(
        'enabled', new_enabled, 'rollout_percentage', new_rollout_percentage) END AS new,
    schedule_ids
"""


def history(
    conn: Conn,
    *,
    flag_key: str | None,
    since: datetime | None,
    limit: int,
    since_now: bool = False,
) -> list[dict[str, Any]]:
    """Changes of flags, newest first (index scans on idx_changes_flag / _changed_at);
    `since_now`: changes from the database's now() on."""
    where = ["true"]
    if flag_key is not None:
        where.append("flag_key = %(flag_key)s")
    if since is not None or since_now:
        where.append("changed_at >= coalesce(%(since)s::timestamptz, now())")
    # Newest first: by flag, the (flag_key, changed_at, id) index; otherwise by id, which
    # follows commit order closely enough and is the primary key.
    order = "changed_at DESC, id DESC" if flag_key is not None else "id DESC"
    return _dicts(
        conn,
        f"""
        SELECT {_CHANGE_COLUMNS} FROM feature_flag_changes
        WHERE {" AND ".join(where)} ORDER BY {order} LIMIT %(limit)s
        """,
        {"flag_key": flag_key, "since": since, "limit": limit},
    )


def changes_of(conn: Conn, schedule_id: int, flag_key: str) -> list[dict[str, Any]]:
    """The history entries that applied this schedule, oldest first."""
    return _dicts(
        conn,
        f"""
        SELECT {_CHANGE_COLUMNS} FROM feature_flag_changes
        WHERE flag_key = %(k)s AND schedule_ids @> ARRAY[%(i)s::bigint]
        ORDER BY changed_at, id
        """,
        {"k": flag_key, "i": schedule_id},
    )


def show_schedule(conn: Conn, schedule_id: int) -> dict[str, Any] | None:
    """One schedule with everything `show` prints but its changes."""
    rows = _dicts(
        conn,
        f"""
        SELECT {SCHEDULE_FIELDS},
               CASE WHEN jsonb_typeof(attempts) = 'array' THEN attempts ELSE '[]' END
                   AS attempts
        FROM feature_flag_schedules WHERE id = %(i)s
        """,
        {"i": schedule_id},
    )
    return rows[0] if rows else None


# A history row prune --history may delete: older than the cut-off, and not newer than
# the conflict window (flagsched_check_v2) of any open schedule of its flag, under
# its key (an index probe of idx_schedules_flag_open each).
_PRUNABLE_CHANGE = f"""
    c.changed_at < now() - make_interval(secs => %(seconds)s)
    AND NOT EXISTS (
        SELECT 1 FROM feature_flag_schedules s
        WHERE s.flag_key = c.flag_key
          AND s.status IN ('pending', 'failed') AND (s.status <> 'failed' OR {_waiting_row("s.")})
          AND CASE WHEN s.created_snapshot IS NOT NULL AND c.xact IS NOT NULL
                        AND NOT coalesce(s.reviewed_at <= now(), false)
                        AND pg_snapshot_xmax(s.created_snapshot)
                            <= pg_snapshot_xmax(pg_current_snapshot())
                   -- judged by the snapshot its INSERT saw (flagsched_check_v2)
                   THEN c.xact IS DISTINCT FROM s.created_xact
                        AND NOT pg_visible_in_snapshot(c.xact, s.created_snapshot)
                   ELSE c.written_at > greatest(
                       CASE WHEN s.created_at <= now() THEN s.created_at
                            ELSE '-infinity'::timestamptz END,
                       CASE WHEN s.reviewed_at <= now() THEN s.reviewed_at END) END)
"""


def prune_history_batch(conn: Conn, *, older_than_seconds: float, limit: int) -> int:
    """Delete up to `limit` history rows older than that that no open schedule's conflict
    check still needs; returns how many."""
    rows = conn.execute(
        f"""
        WITH doomed AS (
            SELECT c.id FROM feature_flag_changes c
            WHERE {_PRUNABLE_CHANGE}
            ORDER BY c.changed_at LIMIT %(limit)s
        )
        DELETE FROM feature_flag_changes c USING doomed d WHERE c.id = d.id RETURNING 1
        """,
        {"seconds": older_than_seconds, "limit": limit},
    ).fetchall()
    return len(rows)


def count_prunable_history(conn: Conn, *, older_than_seconds: float) -> int:
    return int(
        _scalar(
            conn,
            f"SELECT count(*) FROM feature_flag_changes c WHERE {_PRUNABLE_CHANGE}",
            {"seconds": older_than_seconds},
        )
    )


_PRUNABLE = """
    (status = 'applied' AND applied_at < now() - make_interval(secs => %(seconds)s))
    OR (status = 'cancelled' AND updated_at < now() - make_interval(secs => %(seconds)s))
"""


def count_prunable(conn: Conn, *, older_than_seconds: float) -> dict[str, int]:
    rows = conn.execute(
        f"SELECT status, count(*) FROM feature_flag_schedules WHERE {_PRUNABLE} GROUP BY status",
        {"seconds": older_than_seconds},
    ).fetchall()
    return {str(status): int(n) for status, n in rows}


def prune_batch(
    conn: Conn, *, older_than_seconds: float, limit: int, skip: Sequence[int] = ()
) -> tuple[dict[str, int], list[int]]:
    """Delete up to `limit` old applied/cancelled schedules (not those in `skip`); rows a
    tick holds are skipped. Returns the counts per status, and the ids an application's
    foreign key still references (kept: deleting them fails, and would roll the whole batch
    back, so that prune never got past them)."""
    rows = conn.execute(
        f"""
        SELECT id, status FROM feature_flag_schedules
        WHERE ({_PRUNABLE}) AND id <> ALL (%(skip)s)
        LIMIT %(limit)s FOR UPDATE SKIP LOCKED
        """,
        {"seconds": older_than_seconds, "limit": limit, "skip": list(skip)},
    ).fetchall()
    counts: dict[str, int] = {}
    referenced: list[int] = []
    if not rows:
        return counts, referenced
    try:
        with conn.transaction():  # a savepoint: the batch at once, the common case
            conn.execute(
                "DELETE FROM feature_flag_schedules WHERE id = ANY (%(ids)s)",
                {"ids": [r[0] for r in rows]},
            )
        deleted = rows
    except psycopg.errors.ForeignKeyViolation:
        deleted = []
        for schedule_id, status in rows:  # one by one, keeping the referenced ones
            try:
                with conn.transaction():
                    conn.execute(
                        "DELETE FROM feature_flag_schedules WHERE id = %(i)s", {"i": schedule_id}
                    )
                deleted.append((schedule_id, status))
            except psycopg.errors.ForeignKeyViolation:
                referenced.append(int(schedule_id))
    for _, status in deleted:
        counts[str(status)] = counts.get(str(status), 0) + 1
    return counts, referenced


# --- authoring: list, ramps, recurrences -----------------------------------------------

# A schedule as every read command shows it (`list`, `show`): list-failed's keys plus the
# authoring columns. `permanent`: failed for good.
SCHEDULE_FIELDS = f"""
    id, flag_key, scheduled_at, {_SHOWN_UPDATES}, status, retry_count, max_retries,
    next_retry_at, left(last_error, {MAX_TEXT}) AS last_error, applied_at, created_at,
    updated_at, (status = 'failed' AND NOT {_WAITING}) AS permanent,
    group_id, expires_at, on_conflict, recurrence_id, reviewed_at
"""
# Open: pending, or failed and waiting for a retry. Spelled so that only the indexes of
# open rows (status IN ('pending', 'failed')) match it, so idx_schedules_open serves it in
# (scheduled_at, id) order (with `status = 'pending' OR ...` the planner ORs two bitmap
# scans and sorts every open row: 2x slower beside 200,000 applied rows, docs/benchmarks.md).
_OPEN_SCHEDULE = f"status IN ('pending', 'failed') AND (status <> 'failed' OR {_WAITING_ROW})"


# A bound of `list --from/--to now`: PostgreSQL reads the string 'now' cast to timestamptz
# as the transaction's now(), so the database's clock decides.
DB_NOW = "now"


def list_schedules(
    conn: Conn,
    *,
    flag_key: str | None = None,
    status: Status | None = None,
    start: datetime | str | None = None,
    end: datetime | str | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """Schedules in (scheduled_at, id) order: the open ones unless `status` is given;
    `start` <= scheduled_at < `end`."""
    where = [_OPEN_SCHEDULE if status is None else "status = %(status)s"]
    if flag_key is not None:
        where.append("flag_key = %(flag_key)s")
    if start is not None:
        where.append("scheduled_at >= CAST(%(start)s AS timestamptz)")
    if end is not None:
        where.append("scheduled_at < CAST(%(end)s AS timestamptz)")
    return _dicts(
        conn,
        f"""
        SELECT {SCHEDULE_FIELDS} FROM feature_flag_schedules
        WHERE {" AND ".join(where)}
        ORDER BY scheduled_at, id
        LIMIT %(limit)s
        """,
        {
            "status": None if status is None else status.value,
            "flag_key": flag_key,
            "start": start,
            "end": end,
            "limit": limit,
        },
    )


def insert_ramp(
    conn: Conn,
    *,
    flag_key: str,
    start: datetime | None,
    every: timedelta,
    steps: Sequence[Updates],
    expires_after: timedelta | None,
    on_conflict: OnConflict,
) -> tuple[int, list[tuple[int, datetime]]]:
    """One pending schedule per step, every `every` from `start` (None: now()), sharing one
    new group_id; returns (group_id, [(id, scheduled_at)] in step order)."""
    rows = conn.execute(
        """
        WITH g AS (
            SELECT nextval('feature_flag_schedule_group_seq') AS id,
                   coalesce(CAST(%(start)s AS timestamptz), now()) AS t0
        )
        INSERT INTO feature_flag_schedules
            (flag_key, scheduled_at, updates, group_id, expires_at, on_conflict)
        SELECT %(k)s, g.t0 + (u.n - 1) * CAST(%(every)s AS interval), CAST(u.updates AS jsonb),
               g.id, g.t0 + (u.n - 1) * CAST(%(every)s AS interval)
                     + CAST(%(expires)s AS interval), %(c)s
        FROM g, unnest(CAST(%(updates)s AS text[])) WITH ORDINALITY AS u(updates, n)
        ORDER BY u.n
        RETURNING group_id, id, scheduled_at
        """,
        {
            "k": flag_key,
            "start": start,
            "every": every,
            "updates": [json.dumps(u.as_json()) for u in steps],
            "expires": expires_after,
            "c": on_conflict.value,
        },
    ).fetchall()
    made = sorted(((int(i), at) for _, i, at in rows), key=lambda r: (r[1], r[0]))
    return int(rows[0][0]), made


def group_schedules(conn: Conn, group_id: int) -> list[tuple[int, str]]:
    """(id, status) of every schedule of a group, in (scheduled_at, id) order."""
    rows = conn.execute(
        "SELECT id, status FROM feature_flag_schedules WHERE group_id = %(g)s "
        "ORDER BY scheduled_at, id",
        {"g": group_id},
    ).fetchall()
    return [(int(i), str(status)) for i, status in rows]


def insert_recurrence(
    conn: Conn,
    *,
    flag_key: str,
    cron: str,
    timezone: str,
    updates: Updates,
    next_at: datetime,
    expires_after: timedelta | None,
    on_conflict: OnConflict,
) -> int:
    new_id = _scalar(
        conn,
        """
        INSERT INTO feature_flag_recurrences
            (flag_key, cron, timezone, updates, next_at, expires_after, on_conflict)
        VALUES (%(k)s, %(cron)s, %(tz)s, CAST(%(u)s AS jsonb), %(next)s,
                CAST(%(e)s AS interval), %(c)s)
        RETURNING id
        """,
        {
            "k": flag_key,
            "cron": cron,
            "tz": timezone,
            "u": json.dumps(updates.as_json()),
            "next": next_at,
            "e": expires_after,
            "c": on_conflict.value,
        },
    )
    return int(new_id)


_RECURRENCE_FIELDS = (
    "id, flag_key, cron, timezone, updates, next_at, expires_after, on_conflict, "
    "cancelled_at, created_at"
)


def list_recurrences(conn: Conn, *, include_cancelled: bool = False) -> list[dict[str, Any]]:
    """Recurrences, next occurrence first (stopped ones, next_at NULL, last)."""
    where = "" if include_cancelled else "WHERE cancelled_at IS NULL"
    return _dicts(
        conn,
        f"SELECT {_RECURRENCE_FIELDS} FROM feature_flag_recurrences {where} "
        "ORDER BY next_at NULLS LAST, id",
    )


def lock_recurrence(conn: Conn, recurrence_id: int) -> dict[str, Any] | None:
    """Lock one recurrence (waiting for a tick materialising it) and return it."""
    rows = _dicts(
        conn,
        f"SELECT {_RECURRENCE_FIELDS} FROM feature_flag_recurrences WHERE id = %(i)s "
        "FOR UPDATE",
        {"i": recurrence_id},
    )
    return rows[0] if rows else None


def cancel_recurrence(conn: Conn, recurrence_id: int) -> list[int]:
    """Stop a recurrence and cancel its schedules not yet applied; returns their ids."""
    conn.execute(
        "UPDATE feature_flag_recurrences SET cancelled_at = now() WHERE id = %(i)s",
        {"i": recurrence_id},
    )
    rows = conn.execute(
        """
        UPDATE feature_flag_schedules SET status = 'cancelled', next_retry_at = NULL,
               updated_at = now()
        WHERE recurrence_id = %(i)s AND status IN ('pending', 'failed')
        RETURNING id
        """,
        {"i": recurrence_id},
    ).fetchall()
    return sorted(int(r[0]) for r in rows)


def due_recurrences(conn: Conn, *, limit: int) -> tuple[datetime, list[dict[str, Any]]]:
    """Lock up to `limit` active recurrences whose next_at <= now() (skipping those another
    tick holds) with that now(). An index probe: nothing due costs one short statement."""
    rows = _dicts(  # next_at may be -infinity or BC: a text, never a crash
        conn,
        """
        SELECT now() AS now, id, flag_key, cron, timezone, next_at
        FROM feature_flag_recurrences
        WHERE cancelled_at IS NULL AND next_at <= now()
        ORDER BY next_at, id
        LIMIT %(limit)s
        FOR NO KEY UPDATE SKIP LOCKED  -- a row referencing it (FOR KEY SHARE) never hides it
        """,
        {"limit": limit},
    )
    now = rows[0]["now"] if rows else db_now(conn)
    return now, rows


def materialise(
    conn: Conn,
    fired: Sequence[tuple[int, datetime]],
    advanced: Sequence[tuple[int, datetime | None]],
) -> list[dict[str, Any]]:
    """Turn each (recurrence id, occurrence) of `fired` into one pending schedule carrying
    the recurrence's updates, expires_after and on_conflict (at most one per occurrence,
    whoever else tries: the unique index), then set each recurrence's next_at; returns the
    schedules made (id, recurrence_id, flag_key, scheduled_at)."""
    made = _dicts(
        conn,
        """
        INSERT INTO feature_flag_schedules
            (flag_key, scheduled_at, updates, expires_at, on_conflict, recurrence_id)
        SELECT r.flag_key, f.at, r.updates, f.at + r.expires_after, r.on_conflict, r.id
        FROM unnest(CAST(%(ids)s AS bigint[]), CAST(%(ats)s AS timestamptz[])) AS f(id, at)
        JOIN feature_flag_recurrences r ON r.id = f.id
        ON CONFLICT (recurrence_id, scheduled_at) WHERE recurrence_id IS NOT NULL DO NOTHING
        RETURNING id, recurrence_id, flag_key, scheduled_at
        """,
        {"ids": [i for i, _ in fired], "ats": [at for _, at in fired]},
    )
    conn.execute(
        """
        UPDATE feature_flag_recurrences r SET next_at = v.next_at
        FROM unnest(CAST(%(ids)s AS bigint[]), CAST(%(nexts)s AS timestamptz[]))
             AS v(id, next_at)
        WHERE r.id = v.id
        """,
        {"ids": [i for i, _ in advanced], "nexts": [at for _, at in advanced]},
    )
    return made


# --- seeing ahead: plan, agenda ---------------------------------------------------------


def _typed(
    conn: Conn, cls: type[_Row], sql: str, params: Mapping[str, Any] | None = None
) -> list[_Row]:
    """Rows as `cls` (psycopg class_row), read as leniently as `_dicts` reads them."""
    with conn.cursor(row_factory=class_row(cls)) as cur:
        cur.adapters.register_loader("timestamptz", _LenientTimestamptz)
        cur.adapters.register_loader("interval", _LenientInterval)
        return cur.execute(sql, params).fetchall()


def flags_now(conn: Conn, *, keys: Sequence[str] | None = None) -> list[FlagRow]:
    """Flags as they are: every one, or those of `keys` (by the unique index on key)."""
    where = "" if keys is None else "WHERE key = ANY(%(keys)s)"
    return _typed(
        conn,
        FlagRow,
        f"SELECT key, enabled, rollout_percentage FROM feature_flags {where} ORDER BY key",
        {"keys": None if keys is None else list(keys)},
    )


def _ahead_defect(column: str, when: str = "true") -> str:
    return (
        f"WHEN {when} AND NOT ({column} BETWEEN TIMESTAMPTZ {_TIME_MIN} AND TIMESTAMPTZ "
        f"{_TIME_MAX}) THEN '{column} ' || CAST({column} AS text)"
        " || ' is outside the years 1..9999 flagsched can read'"
    )


_AHEAD_FIELDS = f"""
    id, flag_key, {_clamped_time("scheduled_at")} AS scheduled_at, {_SHOWN_UPDATES}, status,
    {_clamped_time("next_retry_at")} AS next_retry_at,
    {_clamped_time("expires_at")} AS expires_at, {_clamped_time("reviewed_at")} AS reviewed_at,
    group_id, recurrence_id, (status = 'failed' AND {_WAITING_ROW}) AS waiting,
    left(last_error, {MAX_TEXT}) AS last_error,
    CASE {_ahead_defect("scheduled_at")}
         {_ahead_defect("next_retry_at", when="status = 'failed'")}
         WHEN {_updates_size("updates")} > {UPDATES_MAX_BYTES}
              THEN 'updates is ' || {_updates_size("updates")}
                   || ' bytes, more than the {UPDATES_MAX_BYTES} flagsched reads'
    END AS defect
"""


def _ahead(conn: Conn, where: str, params: Mapping[str, Any]) -> list[OpenSchedule]:
    flag = "" if params.get("flag_key") is None else "AND flag_key = %(flag_key)s"
    return _typed(
        conn,
        OpenSchedule,
        f"""
        SELECT {_AHEAD_FIELDS} FROM feature_flag_schedules
        WHERE {where} {flag}
        ORDER BY scheduled_at, id
        LIMIT %(limit)s
        """,
        params,
    )


def schedules_ahead(
    conn: Conn, *, until: datetime, flag_key: str | None = None, limit: int = 100_000
) -> list[OpenSchedule]:
    """Open schedules (pending, failed waiting for a retry) due by `until`, in (scheduled_at,
    id) order: a range of idx_schedules_open (idx_schedules_flag_open with a flag), never
    the applied history."""
    return _ahead(
        conn,
        f"{_OPEN_SCHEDULE} AND scheduled_at <= %(until)s",
        {"until": until, "flag_key": flag_key, "limit": limit},
    )


def failed_between(
    conn: Conn, *, start: datetime, end: datetime, flag_key: str | None = None, limit: int = 1000
) -> list[OpenSchedule]:
    """Schedules failed for good that were due between `start` and `end` (the page marks
    them); the same index ranges as `schedules_ahead`."""
    return _ahead(
        conn,
        f"status = 'failed' AND NOT {_WAITING_ROW} AND scheduled_at BETWEEN %(start)s AND %(end)s",
        {"start": start, "end": end, "flag_key": flag_key, "limit": limit},
    )


def recurrences_ahead(conn: Conn, *, flag_key: str | None = None) -> list[ActiveRecurrence]:
    """Active recurrences (an index range of idx_recurrences_due), next occurrence first."""
    flag = "" if flag_key is None else "AND flag_key = %(flag_key)s"
    return _typed(
        conn,
        ActiveRecurrence,
        f"""
        SELECT id, flag_key, cron, timezone, {_SHOWN_UPDATES},
               {_clamped_time("next_at")} AS next_at, expires_after
        FROM feature_flag_recurrences
        WHERE cancelled_at IS NULL {flag}
        ORDER BY next_at NULLS LAST, id
        """,
        {"flag_key": flag_key},
    )
