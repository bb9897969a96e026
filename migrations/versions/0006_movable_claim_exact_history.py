"""Correctness of the claim and the record (issue 16): new stored functions, old ones kept.

- flagsched_claim_v2(limit, lock): claims only schedules that can move, FOR NO KEY UPDATE
  SKIP LOCKED (a row referencing a schedule by foreign key never hides it). A due schedule is
  claimed only when every earlier open schedule of its flag (pending, or waiting for a
  retry) is due and claimed with it, so held-back rows never take a place in a batch.
  Retries that lead their flag come first (by next_retry_at), then pending schedules that
  lead their flag (every free flag's next change before any flag's later steps), then
  pending schedules and retries behind due schedules of their flag (together, in one
  (scheduled_at, id) order and one limit: with room in the batch a flag's consecutive due
  schedules come together, however retries and pending ones alternate: retry, pending,
  retry, pending is one claim; a cut by the limit never leaves an earlier one out). A row
  whose earlier one did not make it into the claim (the limit, or another tick holds it)
  is `blocked` and held back: a batch of only such rows means nothing else can move.
  flagsched_held_back_v1(limit) reads, locking nothing, the due schedules held back behind
  an open schedule that is not due: the tick reports them without claiming them.
- flagsched_kept_attempts_v2(attempts): the last KEPT_ATTEMPTS attempts, and nothing at all
  of a value larger than ATTEMPTS_MAX_BYTES as stored (decided by pg_column_size, which
  reads no TOAST): the claim and the record cost the same whatever a row holds.
- feature_flag_schedules.created_xact / feature_flag_changes.xact (xid8): the inserting
  transaction of a schedule and the writing transaction of a change, and
  feature_flag_schedules.created_snapshot (pg_snapshot): what the inserting statement saw.
  The conflict check (flagsched_check_v2) never counts a change made by the transaction
  that inserted the schedule, nor one committed before the INSERT ran, and counts one the
  INSERT could not see however early it was written (rows inserted before this revision
  have NULL and keep the old rule).
- The history of UPDATEs: a statement-level trigger (flagsched_record_change_v2) pairs old
  and new rows on id only for rows whose id the statement did not change (ids are unique at
  every moment, so such a row pairs with itself), and records key changes too (a renamed
  flag's row has old_flag_key); a row-level trigger that fires only for rows whose id
  changes (flagsched_record_moved_v1) records those, OLD and NEW paired by PostgreSQL. An
  UPDATE that changes `id`, or swaps keys, or renames a flag with a value change, records
  one row per flag; the common write stays set-based.
  A flag renamed (or swapped) into a schedule's key is recorded under that key, so the
  conflict check's one probe finds it.
  flagsched_record_change_v1 stays (INSERT, DELETE, and downgrade use it).
- flagsched_apply_v3: flagsched_apply_v2 with FOR NO KEY UPDATE (a row that references a
  flag by foreign key holds FOR KEY SHARE on it, which FOR UPDATE waits for) and
  flagsched_check_v2.

Revision ID: 0006
Revises: 0005
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

CLAIM_FUNCTION = "flagsched_claim_v2(integer, boolean)"
HELD_FUNCTION = "flagsched_held_back_v1(integer)"
KEPT_FUNCTION = "flagsched_kept_attempts_v2(jsonb)"
CHECK_NAME = "flagsched_check_v2"
CHECK_FUNCTION = f"{CHECK_NAME}(bigint, interval)"
APPLY_FUNCTION = (
    "flagsched_apply_v3(bigint[], text[], boolean[], integer[], boolean[], interval, boolean)"
)
TRIGGER_FUNCTION = "flagsched_record_change_v2"
MOVED_FUNCTION = "flagsched_record_moved_v1"

# Attempts kept with a schedule: more than one retry cycle (at most 11 attempts).
KEPT_ATTEMPTS = 20
ATTEMPTS_MAX_BYTES = 65536

_MIN, _MAX = "'0001-01-01 00:00:00+00'", "'9999-12-31 23:59:59.999999+00'"
_COLS = (
    "id, flag_key, scheduled_at, updates, status, retry_count, max_retries, next_retry_at,"
    " attempts"
)
_S_COLS = ", ".join("s." + c for c in _COLS.split(", "))


def _clamped(column: str) -> str:
    return (
        f"CASE WHEN {column} < TIMESTAMPTZ {_MIN} THEN TIMESTAMPTZ {_MIN}"
        f" WHEN {column} > TIMESTAMPTZ {_MAX} THEN TIMESTAMPTZ {_MAX} ELSE {column} END"
    )


def _defect(column: str, when: str = "true") -> str:
    return (
        f"WHEN {when} AND NOT (c.{column} BETWEEN TIMESTAMPTZ {_MIN} AND TIMESTAMPTZ {_MAX})"
        f" THEN '{column} ' || CAST(c.{column} AS text)"
        " || ' is outside the years 1..9999 flagsched can read'"
    )


def _open(e: str) -> str:
    """SQL: schedule `e` is open (pending, or failed and waiting for a retry)."""
    return (
        f"{e}.status IN ('pending', 'failed') AND ({e}.status = 'pending' OR "
        f"({e}.next_retry_at IS NOT NULL AND {e}.retry_count <= {e}.max_retries))"
    )


def _due(e: str) -> str:
    """SQL: open schedule `e` is due now."""
    return (
        f"CASE WHEN {e}.status = 'pending' THEN {e}.scheduled_at <= now()"
        f" ELSE {e}.next_retry_at <= now() OR {e}.next_retry_at > TIMESTAMPTZ {_MAX} END"
    )


def _earlier_open(s: str, *, unless: str) -> str:
    """SQL: an earlier open schedule of `s`'s flag exists for which `unless` is false. OFFSET
    0 keeps it a per-row probe of idx_schedules_flag_open, never an anti join."""
    return f"""EXISTS (
            SELECT 1 FROM feature_flag_schedules e
            WHERE e.flag_key = {s}.flag_key AND e.status IN ('pending', 'failed')
              AND (e.scheduled_at, e.id) < ({s}.scheduled_at, {s}.id)
              AND {_open("e")} AND NOT ({unless})
            OFFSET 0)"""


def claim_query(*, lock: bool, limit: str = "p_limit") -> str:
    """The claim's statement; without `lock` the same read locking nothing (--dry-run)."""
    # FOR NO KEY UPDATE: excludes other ticks (and operators' FOR UPDATE) as FOR UPDATE
    # does, but not a row of another table that references the schedule (FOR KEY SHARE),
    # which FOR UPDATE SKIP LOCKED skipped silently while that transaction was open.
    skip = "FOR NO KEY UPDATE SKIP LOCKED" if lock else ""
    skip_s = skip.replace("UPDATE", "UPDATE OF s")
    return f"""
    WITH untimed AS (  -- waiting for a retry after year 9999: it can never be timed
        SELECT {_COLS} FROM feature_flag_schedules
        WHERE status = 'failed' AND next_retry_at > TIMESTAMPTZ {_MAX}
          AND retry_count <= max_retries
        ORDER BY next_retry_at, id
        LIMIT {limit}
        {skip}
    ), retries AS (  -- due retries that lead their flag
        SELECT {_S_COLS} FROM feature_flag_schedules s
        WHERE s.status = 'failed' AND s.next_retry_at <= now()
          AND s.retry_count <= s.max_retries
          AND NOT {_earlier_open("s", unless="false")}
        ORDER BY s.next_retry_at, s.id
        LIMIT {limit} - (SELECT count(*) FROM untimed)
        {skip_s}
    ), leaders AS (  -- due pending schedules first in their flag: one place per flag first
        SELECT {_S_COLS} FROM feature_flag_schedules s
        WHERE s.status = 'pending' AND s.scheduled_at <= now()
          AND NOT {_earlier_open("s", unless="false")}
        ORDER BY s.scheduled_at, s.id
        LIMIT {limit} - (SELECT count(*) FROM untimed) - (SELECT count(*) FROM retries)
        {skip_s}
    ), behind_ids AS (  -- due schedules behind due ones of their flag, pending and retries
        -- in one (scheduled_at, id) order: a flag's steps come in order whichever kind they
        -- are, and the limit never takes a later step of a flag while leaving out an
        -- earlier one (which would take a place without being able to move)
        SELECT u.id FROM (
            (SELECT s.id, s.scheduled_at FROM feature_flag_schedules s
             WHERE s.status = 'pending' AND s.scheduled_at <= now()
               AND s.id NOT IN (SELECT id FROM leaders)
               AND NOT {_earlier_open("s", unless=_due("e"))}
             ORDER BY s.scheduled_at, s.id
             LIMIT {limit} - (SELECT count(*) FROM untimed) - (SELECT count(*) FROM retries)
              - (SELECT count(*) FROM leaders))
            UNION ALL
            (SELECT s.id, s.scheduled_at FROM feature_flag_schedules s
             WHERE s.status = 'failed' AND s.next_retry_at <= now()
               AND s.retry_count <= s.max_retries
               AND s.id NOT IN (SELECT id FROM retries)
               AND NOT {_earlier_open("s", unless=_due("e"))}
             ORDER BY s.scheduled_at, s.id
             LIMIT {limit} - (SELECT count(*) FROM untimed) - (SELECT count(*) FROM retries)
              - (SELECT count(*) FROM leaders))
        ) u
        ORDER BY u.scheduled_at, u.id
        LIMIT {limit} - (SELECT count(*) FROM untimed) - (SELECT count(*) FROM retries)
              - (SELECT count(*) FROM leaders)
    ), behind AS (  -- locked here, re-checked on the row's latest version
        SELECT {_S_COLS} FROM feature_flag_schedules s
        WHERE s.id IN (SELECT id FROM behind_ids)
          AND CASE WHEN s.status = 'pending' THEN s.scheduled_at <= now()
                   ELSE s.status = 'failed' AND s.next_retry_at <= now()
                        AND s.retry_count <= s.max_retries END
        {skip_s}
    ), claimed AS (
        SELECT * FROM untimed UNION ALL SELECT * FROM retries UNION ALL SELECT * FROM leaders
        UNION ALL SELECT * FROM behind
    )
    SELECT now(), c.id, c.flag_key, {_clamped("c.scheduled_at")},
           CASE WHEN z.size <= 8192 THEN c.updates END,
           c.status, c.retry_count, c.max_retries, {_clamped("c.next_retry_at")},
           b.blocked,
           -- a pending row's next_retry_at means nothing (applying it clears it)
           CASE {_defect("scheduled_at")}
                {_defect("next_retry_at", when="c.status = 'failed'")}
                WHEN z.size > 8192 THEN 'updates is ' || z.size
                     || ' bytes, more than the 8192 flagsched reads'
           END,
           {_attempts_made("c.attempts")}
    FROM claimed c
    CROSS JOIN LATERAL (SELECT octet_length(CAST(c.updates AS text)) AS size) z
    CROSS JOIN LATERAL (
        -- an earlier open schedule outside this claim (another tick holds it)
        SELECT {_earlier_open("c", unless="e.id IN (SELECT id FROM claimed)")} AS blocked
    ) b
    ORDER BY c.flag_key, c.scheduled_at, c.id
    """


def _attempts_made(column: str) -> str:
    """SQL: the number of the last attempt kept (0 when none is kept): its `attempt`, which
    the record wrote, when readable, else how many are kept."""
    kept = f"flagsched_kept_attempts_v2({column})"
    last = "(k.kept -> -1 -> 'attempt')"
    return f"""(SELECT CASE WHEN jsonb_typeof({last}) = 'number'
                            AND CAST({last} AS numeric) BETWEEN 0 AND 1000000000
                       THEN greatest(jsonb_array_length(k.kept),
                                     CAST(CAST({last} AS numeric) AS integer))
                       ELSE jsonb_array_length(k.kept) END
                FROM (SELECT {kept} AS kept OFFSET 0) k)"""  # OFFSET 0: computed once a row


def held_back_query() -> str:
    """Due schedules behind an earlier open schedule of their flag that is not due: never
    claimed, reported. Found from what holds them back (retries waiting for a time still to
    come: few, whatever the backlog), each flag's open schedules an index probe. Locks
    nothing."""
    return f"""
    SELECT s.id, s.flag_key, {_clamped("s.scheduled_at")}, s.status, s.retry_count,
           s.max_retries
    FROM feature_flag_schedules s
    WHERE s.flag_key IN (
            SELECT w.flag_key FROM feature_flag_schedules w
            WHERE w.status = 'failed' AND w.next_retry_at > now()
              AND w.next_retry_at <= TIMESTAMPTZ {_MAX} AND w.retry_count <= w.max_retries)
      AND s.status IN ('pending', 'failed') AND {_open("s")} AND ({_due("s")})
      AND {_earlier_open("s", unless=_due("e"))}
    ORDER BY s.flag_key, s.scheduled_at, s.id
    LIMIT p_limit
    """


_WRITER = (
    "coalesce(nullif(current_setting('role'), 'none'), session_user)"
    " || coalesce(' (' || nullif(current_setting('application_name', true), '') || ')', '')"
)
# flagsched's write of this statement, {flag_key: [schedule ids]} (the transaction-local
# setting flagsched.applying), as a relation joined once rather than a lookup per row.
_APPLIED_IDS = """LEFT JOIN (SELECT e.key, ARRAY(SELECT jsonb_array_elements_text(e.value)::bigint)
                           FROM jsonb_each(applying) e) AS a(key, ids) ON a.key = n.key"""
_ISO = """CASE WHEN isfinite({0}) THEN to_char({0} AT TIME ZONE 'UTC',
    'YYYY-MM-DD"T"HH24:MI:SS"Z"') ELSE {0}::text END"""
_REVIEWED = "CASE WHEN s.reviewed_at <= now() THEN s.reviewed_at END"
_DUE_SINCE = f"greatest(s.scheduled_at, {_REVIEWED})"
_WINDOW_START = (
    "greatest(CASE WHEN s.created_at <= now() THEN s.created_at "
    f"ELSE '-infinity'::timestamptz END, {_REVIEWED})"
)
_LATE = """CASE WHEN isfinite({0})
    THEN justify_interval(date_trunc('second', now() - {0}))::text ELSE 'forever' END"""


# Whether change c falls in schedule s's conflict window. A schedule that was never
# retried and knows the snapshot its INSERT saw (created_snapshot, rows inserted from this
# revision on) is in conflict exactly with the changes that snapshot did not see: a change
# committed before the INSERT ran is known (even when the inserting transaction began
# earlier), a change written earlier but committed later is not (whatever its
# written_at). The inserting transaction's own changes never count. A retried schedule,
# an older row, or an older change keeps the time rule (written after the window start).
LATE_COMMIT_HORIZON = "1 hour"
# A snapshot is usable only in the transaction-id space it was taken in: one whose xmax is
# ahead of this cluster's (the database was dumped and restored, or moved by logical
# replication, into a cluster with lower ids) would take every new change for "seen".
_BY_SNAPSHOT = (
    "(s.created_snapshot IS NOT NULL AND NOT coalesce(s.reviewed_at <= now(), false)"
    " AND pg_snapshot_xmax(s.created_snapshot) <= pg_snapshot_xmax(pg_current_snapshot()))"
)
_COUNTS = f"""CASE WHEN {_BY_SNAPSHOT} AND c.xact IS NOT NULL
                   THEN c.xact IS DISTINCT FROM s.created_xact
                        AND NOT pg_visible_in_snapshot(c.xact, s.created_snapshot)
                   ELSE c.written_at > {_WINDOW_START}
                        AND (s.created_xact IS NULL OR c.xact IS NULL
                             OR c.xact <> s.created_xact) END"""

# The latest foreign change (not by flagsched) in s's window. A flag renamed into s's key
# (or swapped into it) is recorded under that key, so probes of idx_changes_foreign find it
# too; a flag renamed away leaves no flag under the old key, and the schedule fails as
# missing. The first probe reads what was written after the window start; the second, only
# for a schedule judged by its snapshot, what was written in the LATE_COMMIT_HORIZON before
# it by a transaction the snapshot may not have seen (xact at or past its xmin): bounded, so
# a flag with a long history costs the check an index range, not its whole history (a
# change held uncommitted for longer than that before the INSERT is judged by the time
# rule, as before this revision).
_FOREIGN_CHANGE = f"""SELECT x.actor, x.written_at FROM (
                    (SELECT c.actor, c.written_at FROM feature_flag_changes c
                     WHERE c.flag_key = s.flag_key AND c.schedule_ids = '{{}}'
                       AND c.old_enabled IS NOT NULL
                       AND c.written_at > {_WINDOW_START} AND {_COUNTS}
                     ORDER BY c.written_at DESC
                     LIMIT 1)
                    UNION ALL
                    (SELECT c.actor, c.written_at FROM feature_flag_changes c
                     WHERE {_BY_SNAPSHOT}
                       AND c.flag_key = s.flag_key AND c.schedule_ids = '{{}}'
                       AND c.old_enabled IS NOT NULL
                       AND c.written_at <= {_WINDOW_START}
                       AND c.written_at > {_WINDOW_START} - interval '{LATE_COMMIT_HORIZON}'
                       AND c.xact >= pg_snapshot_xmin(s.created_snapshot) AND {_COUNTS}
                     ORDER BY c.written_at DESC
                     LIMIT 1)) x
                    ORDER BY x.written_at DESC
                    LIMIT 1"""


def _apply_body() -> str:
    """flagsched_apply_v2's body with FOR NO KEY UPDATE and flagsched_check_v2."""
    return f"""
        DECLARE
            locked text[];
            held text[] := '{{}}';
            decided_n integer[];
            decided_outcome text[];
            decided_message text[];
            todo integer[];
            stopped text[] := '{{}}';
            written boolean := false;
            i integer;
        BEGIN
            -- FOR NO KEY UPDATE: the weakest lock that serialises writes of the flag's
            -- values; a row referencing the flag (FOR KEY SHARE) never blocks it.
            IF p_wait THEN
                locked := ARRAY(SELECT f.key FROM feature_flags f WHERE f.key = ANY (p_keys)
                                ORDER BY f.key FOR NO KEY UPDATE);
            ELSE
                locked := ARRAY(SELECT f.key FROM feature_flags f WHERE f.key = ANY (p_keys)
                                ORDER BY f.key FOR NO KEY UPDATE SKIP LOCKED);
            END IF;
            IF cardinality(locked) < cardinality(p_keys) THEN
                held := ARRAY(SELECT f.key FROM feature_flags f
                              WHERE f.key = ANY (p_keys) AND f.key <> ALL (locked));
            END IF;
            SELECT coalesce(array_agg(c.n::integer ORDER BY c.n)
                                FILTER (WHERE d.outcome IS NOT NULL), '{{}}'),
                   coalesce(array_agg(d.outcome ORDER BY c.n)
                                FILTER (WHERE d.outcome IS NOT NULL), '{{}}'),
                   coalesce(array_agg(d.message ORDER BY c.n)
                                FILTER (WHERE d.outcome IS NOT NULL), '{{}}'),
                   coalesce(array_agg(c.n::integer ORDER BY c.n)
                                FILTER (WHERE d.outcome IS NULL), '{{}}')
              INTO decided_n, decided_outcome, decided_message, todo
            FROM unnest(p_ids, p_keys) WITH ORDINALITY AS c(id, key, n)
            CROSS JOIN LATERAL (
                SELECT CASE WHEN c.key = ANY (locked) THEN NULL
                            WHEN c.key = ANY (held) THEN 'busy' ELSE 'missing' END AS outcome
            ) l
            LEFT JOIN LATERAL {CHECK_NAME}(c.id, p_max_lateness) k ON l.outcome IS NULL
            CROSS JOIN LATERAL (SELECT coalesce(l.outcome, k.outcome) AS outcome,
                                       k.message) d;
            RETURN QUERY SELECT * FROM unnest(decided_n, decided_outcome, decided_message);
            IF cardinality(todo) = 0 THEN
                RETURN;
            END IF;
            BEGIN
                PERFORM set_config('flagsched.applying', (
                    SELECT jsonb_object_agg(key, ids)::text FROM (
                        SELECT p_keys[t] AS key, jsonb_agg(p_ids[t] ORDER BY t) AS ids
                        FROM unnest(todo) AS t GROUP BY 1) x), true);
                UPDATE feature_flags AS f
                SET enabled = coalesce(v.enabled, f.enabled),
                    rollout_percentage = coalesce(v.rollout, f.rollout_percentage),
                    updated_at = now()
                FROM (
                    SELECT p_keys[t] AS key,
                           (array_agg(p_enabled[t] ORDER BY t DESC)
                                FILTER (WHERE p_enabled[t] IS NOT NULL))[1] AS enabled,
                           (array_agg(p_rollout[t] ORDER BY t DESC)
                                FILTER (WHERE p_rollout[t] IS NOT NULL))[1] AS rollout
                    FROM unnest(todo) AS t GROUP BY 1
                ) AS v
                WHERE f.key = v.key AND f.key = ANY (locked);
                written := true;
            EXCEPTION WHEN OTHERS THEN
                NULL;
            END;
            IF written THEN
                RETURN;
            END IF;
            FOREACH i IN ARRAY todo LOOP
                item := i;
                message := NULL;
                IF p_keys[i] = ANY (stopped) THEN
                    outcome := 'held_back';
                    RETURN NEXT;
                    CONTINUE;
                END IF;
                BEGIN
                    PERFORM set_config('flagsched.applying',
                        jsonb_build_object(p_keys[i], jsonb_build_array(p_ids[i]))::text, true);
                    UPDATE feature_flags AS f
                    SET enabled = coalesce(p_enabled[i], f.enabled),
                        rollout_percentage = coalesce(p_rollout[i], f.rollout_percentage),
                        updated_at = now()
                    WHERE f.key = p_keys[i];
                    CONTINUE;
                EXCEPTION
                    WHEN OTHERS THEN
                        outcome := 'error';
                        message := SQLERRM || ' (SQLSTATE ' || SQLSTATE || ')';
                END;
                RETURN NEXT;
                IF p_stop_on_failure[i] THEN
                    stopped := stopped || p_keys[i];
                END IF;
            END LOOP;
        END
    """


def upgrade() -> None:
    # Nullable without a default, then the default: no table rewrite, existing rows NULL.
    op.execute("ALTER TABLE feature_flag_schedules ADD COLUMN created_xact xid8 NULL")
    op.execute(
        "ALTER TABLE feature_flag_schedules ALTER COLUMN created_xact "
        "SET DEFAULT pg_current_xact_id()"
    )
    # The snapshot the inserting statement saw: which flag changes the schedule knew of.
    op.execute("ALTER TABLE feature_flag_schedules ADD COLUMN created_snapshot pg_snapshot NULL")
    op.execute(
        "ALTER TABLE feature_flag_schedules ALTER COLUMN created_snapshot "
        "SET DEFAULT pg_current_snapshot()"
    )
    # The locks in the order everyone else takes them (a tick: schedules, flags, then the
    # history its trigger writes; an application's flag UPDATE: flags, then history): the
    # flags table before the history table, or an application UPDATE holding the flags and
    # waiting for the history deadlocks with this transaction (seen by `make bench`, case
    # 10). The trigger swap below needs this lock anyway; it is held for the few catalog
    # changes that follow.
    op.execute("LOCK TABLE feature_flags IN ACCESS EXCLUSIVE MODE")
    op.execute(
        "ALTER TABLE feature_flag_changes ADD COLUMN xact xid8 NULL, "
        "ADD COLUMN old_flag_key text NULL"
    )
    op.execute(
        "ALTER TABLE feature_flag_changes ALTER COLUMN xact SET DEFAULT pg_current_xact_id()"
    )
    op.execute(
        f"""
        CREATE FUNCTION {CHECK_NAME}(p_id bigint, p_max_lateness interval)
        RETURNS TABLE (outcome text, message text)
        LANGUAGE sql STABLE SECURITY INVOKER AS $$
            -- flagsched_check_v1, plus: a change made by the transaction that inserted the
            -- schedule never counts, and a change recorded under the flag's old key (a
            -- rename or a key swap) counts for a schedule of either key.
            SELECT v.outcome, v.message
            FROM feature_flag_schedules s
            CROSS JOIN LATERAL (
                SELECT 1 AS rank, 'expired'::text AS outcome,
                       'expired: ' || {_LATE.format("s.expires_at")} || ' past its expires_at '
                       || {_ISO.format("s.expires_at")} AS message
                WHERE s.expires_at < now()
                UNION ALL
                SELECT 2, 'expired',
                       'expired: ' || {_LATE.format(_DUE_SINCE)}
                       || ' late, more than the maximum lateness of '
                       || justify_interval(p_max_lateness)::text || ' (due since '
                       || {_ISO.format(_DUE_SINCE)} || ')'
                WHERE s.expires_at IS NULL AND {_DUE_SINCE} < now() - p_max_lateness
                UNION ALL
                SELECT 3, 'conflict',
                       'conflict: flag ' || quote_literal(s.flag_key) || ' was changed by '
                       || c.actor || ' at ' || {_ISO.format("c.written_at")}
                       || ', after this schedule was '
                       || CASE WHEN s.reviewed_at > s.created_at AND s.reviewed_at <= now()
                               THEN 'retried' ELSE 'created' END
                       || '; `flagsched retry` it to apply it anyway'
                FROM (
                    {_FOREIGN_CHANGE}
                ) c
                WHERE s.on_conflict = 'fail'
                ORDER BY rank
                LIMIT 1
            ) v
            WHERE s.id = p_id
        $$
        """
    )
    op.execute(
        f"""
        CREATE FUNCTION flagsched_kept_attempts_v2(p_attempts jsonb) RETURNS jsonb
        LANGUAGE sql IMMUTABLE AS $$
            -- The attempts a schedule keeps: the last {KEPT_ATTEMPTS - 1} (the record appends
            -- one). What is not an array, or is larger than {ATTEMPTS_MAX_BYTES} bytes as
            -- stored (pg_column_size: no TOAST is read to decide) or as text once cut to
            -- those, is not kept. A value under the limit as stored may still be megabytes
            -- once decompressed (repetitive errors compress ~50x): it is decompressed twice
            -- (its type, then one lax slice that clamps to a shorter array), never once per
            -- use of the result (OFFSET 0 keeps the slice from being inlined into each).
            SELECT CASE WHEN pg_column_size(p_attempts) > {ATTEMPTS_MAX_BYTES} THEN '[]'::jsonb
                        WHEN jsonb_typeof(p_attempts) <> 'array' THEN '[]'::jsonb
                        ELSE (SELECT CASE WHEN octet_length(CAST(t.kept AS text))
                                               <= {ATTEMPTS_MAX_BYTES}
                                          THEN t.kept ELSE '[]'::jsonb END
                              FROM (SELECT jsonb_path_query_array(
                                      p_attempts, 'lax $[last - {KEPT_ATTEMPTS - 2} to last]')
                                      AS kept
                                    OFFSET 0) t) END
        $$
        """
    )
    op.execute(
        f"""
        CREATE FUNCTION flagsched_claim_v2(p_limit integer, p_lock boolean)
        RETURNS TABLE (now timestamptz, id bigint, flag_key text, scheduled_at timestamptz,
                       updates jsonb, status text, retry_count integer, max_retries integer,
                       next_retry_at timestamptz, blocked boolean, defect text,
                       attempts_made integer)
        -- jit off: the planner's estimate of this statement (a few CTEs over a large table)
        -- crosses jit_above_cost, and compiling it cost ~60 ms a claim that runs in ~2 ms
        LANGUAGE plpgsql SECURITY INVOKER SET jit = off AS $$
        #variable_conflict use_column
        BEGIN
            IF p_lock THEN
                RETURN QUERY {claim_query(lock=True)};
            ELSE
                RETURN QUERY {claim_query(lock=False)};
            END IF;
        END
        $$
        """
    )
    op.execute(
        f"""
        CREATE FUNCTION flagsched_held_back_v1(p_limit integer)
        RETURNS TABLE (id bigint, flag_key text, scheduled_at timestamptz, status text,
                       retry_count integer, max_retries integer)
        LANGUAGE plpgsql STABLE SECURITY INVOKER SET jit = off AS $$
        #variable_conflict use_column
        BEGIN
            RETURN QUERY {held_back_query()};
        END
        $$
        """
    )
    op.execute(
        f"""
        CREATE FUNCTION flagsched_apply_v3(
            p_ids bigint[], p_keys text[], p_enabled boolean[], p_rollout integer[],
            p_stop_on_failure boolean[], p_max_lateness interval, p_wait boolean)
        RETURNS TABLE (item integer, outcome text, message text)
        LANGUAGE plpgsql SECURITY INVOKER AS $$
        {_apply_body()}
        $$
        """
    )
    op.execute(
        f"""
        CREATE FUNCTION {MOVED_FUNCTION}() RETURNS trigger
        LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
        -- A row whose id this UPDATE changes: OLD and NEW are paired here, by PostgreSQL
        -- (the statement-level trigger, pairing on id, leaves it out). Rare: row-level.
        BEGIN
            PERFORM set_config('flagsched.moved_ids', CAST(
                CAST(coalesce(nullif(current_setting('flagsched.moved_ids', true), ''), '{{}}')
                     AS bigint[]) || NEW.id AS text), true);
            IF (OLD.enabled, OLD.rollout_percentage, OLD.key)
               IS DISTINCT FROM (NEW.enabled, NEW.rollout_percentage, NEW.key) THEN
                INSERT INTO feature_flag_changes (flag_key, old_flag_key, actor, old_enabled,
                    old_rollout_percentage, new_enabled, new_rollout_percentage)
                VALUES (NEW.key, CASE WHEN OLD.key <> NEW.key THEN OLD.key END, {_WRITER},
                        OLD.enabled, OLD.rollout_percentage, NEW.enabled,
                        NEW.rollout_percentage);
            END IF;
            RETURN NULL;
        END
        $$
        """
    )
    op.execute(
        f"""
        CREATE FUNCTION {TRIGGER_FUNCTION}() RETURNS trigger
        LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
        -- The history of an UPDATE, set-based. Keys and ids are unique at every moment
        -- (not deferrable), so a row whose id did not change is paired with itself by id;
        -- rows whose id changed were recorded by {MOVED_FUNCTION} (their new ids are in
        -- flagsched.moved_ids) and are left out. A key change is recorded (old_flag_key):
        -- the flag under the new key is not the one that was there. flagsched's writes
        -- (this release's and the previous one's) are named in flagsched.applying by key.
        DECLARE
            applying jsonb := nullif(current_setting('flagsched.applying', true), '')::jsonb;
            writer text := {_WRITER};
            moved bigint[] := CAST(coalesce(nullif(
                current_setting('flagsched.moved_ids', true), ''), '{{}}') AS bigint[]);
        BEGIN
            INSERT INTO feature_flag_changes (flag_key, old_flag_key, actor, old_enabled,
                old_rollout_percentage, new_enabled, new_rollout_percentage, schedule_ids)
            SELECT n.key, CASE WHEN o.key <> n.key THEN o.key END,
                   CASE WHEN a.ids IS NULL OR o.key <> n.key THEN writer ELSE 'flagsched' END,
                   o.enabled, o.rollout_percentage, n.enabled, n.rollout_percentage,
                   CASE WHEN a.ids IS NULL OR o.key <> n.key THEN '{{}}'::bigint[]
                        ELSE a.ids END
            FROM old_rows o JOIN new_rows n ON n.id = o.id
            {_APPLIED_IDS}
            WHERE n.id <> ALL (moved)
              AND (o.enabled, o.rollout_percentage, o.key)
                  IS DISTINCT FROM (n.enabled, n.rollout_percentage, n.key);
            IF cardinality(moved) > 0 THEN
                PERFORM set_config('flagsched.moved_ids', '', true);
            END IF;
            RETURN NULL;
        END
        $$
        """
    )
    # A trigger swap: a moment's lock on feature_flags, as adding a trigger takes. Row-level
    # AFTER triggers of a statement fire before its statement-level ones.
    op.execute("DROP TRIGGER flagsched_record_update ON feature_flags")
    op.execute(
        f"""
        CREATE TRIGGER flagsched_record_update_moved AFTER UPDATE ON feature_flags
        FOR EACH ROW WHEN (OLD.id IS DISTINCT FROM NEW.id)
        EXECUTE FUNCTION {MOVED_FUNCTION}()
        """
    )
    op.execute(
        f"""
        CREATE TRIGGER flagsched_record_update_v2 AFTER UPDATE ON feature_flags
        REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
        FOR EACH STATEMENT EXECUTE FUNCTION {TRIGGER_FUNCTION}()
        """
    )


def downgrade() -> None:
    # The three tables in the order ticks and applications take them (schedules, flags,
    # history), so no writer waiting in between can deadlock with the downgrade.
    op.execute(
        "LOCK TABLE feature_flag_schedules, feature_flags, feature_flag_changes"
        " IN ACCESS EXCLUSIVE MODE"
    )
    op.execute("DROP TRIGGER flagsched_record_update_v2 ON feature_flags")
    op.execute("DROP TRIGGER flagsched_record_update_moved ON feature_flags")
    op.execute(
        """
        CREATE TRIGGER flagsched_record_update AFTER UPDATE ON feature_flags
        REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
        FOR EACH STATEMENT EXECUTE FUNCTION flagsched_record_change_v1()
        """
    )
    op.execute(f"DROP FUNCTION {TRIGGER_FUNCTION}()")
    op.execute(f"DROP FUNCTION {MOVED_FUNCTION}()")
    op.execute(f"DROP FUNCTION {APPLY_FUNCTION}")
    op.execute(f"DROP FUNCTION {HELD_FUNCTION}")
    op.execute(f"DROP FUNCTION {CLAIM_FUNCTION}")
    op.execute(f"DROP FUNCTION {KEPT_FUNCTION}")
    op.execute(f"DROP FUNCTION {CHECK_FUNCTION}")
    op.execute("ALTER TABLE feature_flag_changes DROP COLUMN old_flag_key, DROP COLUMN xact")
    op.execute(
        "ALTER TABLE feature_flag_schedules DROP COLUMN created_xact, "
        "DROP COLUMN created_snapshot"
    )
