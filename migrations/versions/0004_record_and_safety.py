"""The record and the safety checks: flag history, attempts, conflicts, lateness, groups.

- feature_flag_changes: one row per change of a flag's enabled / rollout_percentage by any
  writer, written by statement-level triggers on feature_flags (transition tables keep it
  set-based), in the writer's own transaction, so nothing bypasses it. flagsched's own
  writes are recognised by the transaction-local setting `flagsched.applying`, a JSON
  object {flag_key: [schedule ids]} that the tick sets just before each write: those rows
  get actor 'flagsched' and the schedule ids; everything else gets current_user (and
  application_name when set) and an empty schedule_ids.
- feature_flag_schedules gains on_conflict, expires_at, group_id, reviewed_at (the last
  `flagsched retry`: conflict and lateness windows restart there) and attempts (a JSON
  array of {attempt, at, outcome, error}, kept with the schedule, so pruning a schedule
  prunes its attempts).
- flagsched_claim_v1(limit, lock): the tick's claim (and, without lock, --dry-run's read).
- flagsched_kept_attempts_v1(attempts): the attempts a schedule keeps (the claim counts them;
  the record appends to what it counted).
- flagsched_check_v1(id, max_lateness): the safety verdict of one due schedule (expired or
  in conflict, with the line for last_error), shared by the tick's write and --dry-run.
- flagsched_apply_v2: a batch's writes in one statement (flagsched_apply of 0003 is left as
  it is: landed migrations are not edited, and downgrading to 0003 needs it). Under the
  flags' row locks it decides, per change, missing / busy / expired / conflict, writes the
  rest set-based (each flag's changes folded, later values win) and, only if that fails,
  change by change, each in its own subtransaction; a failure that will be retried holds
  the flag's later changes back. Returns a row per change that did not apply.

Revision ID: 0004
Revises: 0003
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

TRIGGER_FUNCTION = "flagsched_record_change_v1"
TRUNCATE_FUNCTION = "flagsched_record_truncate_v1"
CHECK_NAME = "flagsched_check_v1"
CHECK_FUNCTION = f"{CHECK_NAME}(bigint, interval)"
APPLY_FUNCTION = (
    "flagsched_apply_v2(bigint[], text[], boolean[], integer[], boolean[], interval, boolean)"
)

CLAIM_FUNCTION = "flagsched_claim_v1(integer, boolean)"
KEPT_FUNCTION = "flagsched_kept_attempts_v1(jsonb)"

# The claim, frozen here as this revision's flagsched_claim_v1 (a stored function: its plan
# is cached per server connection, which client-side prepared statements cannot be behind
# a transaction-mode pooler; about 8 % of a backlog drain). Retries first (by
# next_retry_at), then new schedules (by scheduled_at, id), at most `limit` rows, skipping
# rows other ticks hold; a pending schedule behind a retry not due yet is not claimed at
# all. `blocked`: an earlier schedule of the flag outside this claim is still open. No row
# may stop the queue: times outside Python's years 1..9999 are clamped and `updates` over
# 8192 bytes not shipped; `defect` says why such a row cannot be read (the tick fails it
# for good, unattempted). A retry timed after year 9999 is claimed too: a retry that cannot
# be timed is final, and it would otherwise hold its flag back for ever.
_MIN, _MAX = "'0001-01-01 00:00:00+00'", "'9999-12-31 23:59:59.999999+00'"
_COLS = (
    "id, flag_key, scheduled_at, updates, status, retry_count, max_retries, next_retry_at,"
    " attempts"
)


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


def claim_query(*, lock: bool, limit: str = "p_limit") -> str:
    """The claim's statement; without `lock` the same read locking nothing (--dry-run)."""
    skip = "FOR UPDATE SKIP LOCKED" if lock else ""
    return f"""
    WITH untimed AS (  -- waiting for a retry after year 9999: it can never be timed
        SELECT {_COLS} FROM feature_flag_schedules
        WHERE status = 'failed' AND next_retry_at > TIMESTAMPTZ {_MAX}
          AND retry_count <= max_retries
        ORDER BY next_retry_at, id
        LIMIT {limit}
        {skip}
    ), retries AS (
        SELECT {_COLS} FROM feature_flag_schedules
        WHERE status = 'failed' AND next_retry_at <= now() AND retry_count <= max_retries
        ORDER BY next_retry_at, id
        LIMIT {limit} - (SELECT count(*) FROM untimed)
        {skip}
    ), pending AS (
        SELECT {", ".join("s." + c for c in _COLS.split(", "))}
        FROM feature_flag_schedules s
        WHERE s.status = 'pending' AND s.scheduled_at <= now()
          AND NOT EXISTS (
            SELECT 1 FROM feature_flag_schedules e
            WHERE e.flag_key = s.flag_key
              AND e.status IN ('pending', 'failed')
              AND e.status = 'failed' AND e.next_retry_at > now()
              AND e.retry_count <= e.max_retries
              AND (e.scheduled_at, e.id) < (s.scheduled_at, s.id)
            OFFSET 0)  -- keeps it a per-row index probe, never an anti join over all retries
        ORDER BY s.scheduled_at, s.id
        LIMIT {limit} - (SELECT count(*) FROM untimed) - (SELECT count(*) FROM retries)
        {skip.replace("UPDATE", "UPDATE OF s")}
    ), claimed AS (
        SELECT * FROM untimed UNION ALL SELECT * FROM retries UNION ALL SELECT * FROM pending
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
           jsonb_array_length(flagsched_kept_attempts_v1(c.attempts))
    FROM claimed c
    CROSS JOIN LATERAL (SELECT octet_length(CAST(c.updates AS text)) AS size) z
    CROSS JOIN LATERAL (
        SELECT EXISTS (
            SELECT 1 FROM feature_flag_schedules e
            WHERE e.flag_key = c.flag_key
              AND e.status IN ('pending', 'failed')
              AND (e.status = 'pending' OR (e.status = 'failed' AND e.next_retry_at IS NOT NULL
                                            AND e.retry_count <= e.max_retries))
              AND (e.scheduled_at, e.id) < (c.scheduled_at, c.id)
              AND e.id NOT IN (SELECT id FROM claimed)
        ) AS blocked
    ) b
    ORDER BY c.flag_key, c.scheduled_at, c.id
    """


# Who wrote, for the history: the session's role as SET ROLE left it, else its login (in a
# SECURITY DEFINER function current_user is the owner), and its application_name.
_WRITER = (
    "coalesce(nullif(current_setting('role'), 'none'), session_user)"
    " || coalesce(' (' || nullif(current_setting('application_name', true), '') || ')', '')"
)
# flagsched's write of this statement, {flag_key: [schedule ids]} (the transaction-local
# setting flagsched.applying), as a relation joined once rather than a lookup per row.
_APPLIED_IDS = """LEFT JOIN (SELECT e.key, ARRAY(SELECT jsonb_array_elements_text(e.value)::bigint)
                           FROM jsonb_each(applying) e) AS a(key, ids) ON a.key = n.key"""

# A time in last_error: ISO 8601 UTC; infinite ones as PostgreSQL spells them.
_ISO = """CASE WHEN isfinite({0}) THEN to_char({0} AT TIME ZONE 'UTC',
    'YYYY-MM-DD"T"HH24:MI:SS"Z"') ELSE {0}::text END"""
# The last `flagsched retry`, unless an application wrote a time still to come.
_REVIEWED = "CASE WHEN s.reviewed_at <= now() THEN s.reviewed_at END"
_DUE_SINCE = f"greatest(s.scheduled_at, {_REVIEWED})"
_WINDOW_START = (
    "greatest(CASE WHEN s.created_at <= now() THEN s.created_at "
    f"ELSE '-infinity'::timestamptz END, {_REVIEWED})"
)
_LATE = """CASE WHEN isfinite({0})
    THEN justify_interval(date_trunc('second', now() - {0}))::text ELSE 'forever' END"""


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE feature_flag_schedules
            ADD COLUMN on_conflict text NOT NULL DEFAULT 'fail',
            ADD COLUMN expires_at timestamptz NULL,
            ADD COLUMN group_id bigint NULL,
            ADD COLUMN reviewed_at timestamptz NULL,
            ADD COLUMN attempts jsonb NOT NULL DEFAULT '[]',
            ADD CONSTRAINT on_conflict_check CHECK (on_conflict IN ('fail', 'apply'))
        """
    )
    op.execute("CREATE SEQUENCE feature_flag_schedule_group_seq AS bigint")
    op.execute(
        "CREATE INDEX idx_schedules_group ON feature_flag_schedules (group_id) "
        "WHERE group_id IS NOT NULL"
    )
    op.execute(
        """
        CREATE TABLE feature_flag_changes (
            id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
            flag_key text NOT NULL,
            changed_at timestamptz NOT NULL DEFAULT now(),
            actor text NOT NULL,
            old_enabled boolean NULL,
            old_rollout_percentage integer NULL,
            new_enabled boolean NULL,
            new_rollout_percentage integer NULL,
            schedule_ids bigint[] NOT NULL DEFAULT '{}',
            -- When the writing statement ran. changed_at is its transaction's start, which
            -- may be long before: the conflict check orders by this.
            written_at timestamptz NOT NULL DEFAULT statement_timestamp()
        )
        """
    )
    # history FLAG_KEY (newest first) and the write that applied a schedule (show).
    op.execute(
        "CREATE INDEX idx_changes_flag ON feature_flag_changes (flag_key, changed_at, id)"
    )
    # prune --history and history --since: the table is appended to in time order, so a
    # BRIN index is enough, and costs the tick's writes next to nothing.
    op.execute(
        "CREATE INDEX idx_changes_changed_at ON feature_flag_changes USING brin (changed_at)"
    )
    # The conflict check: "did anyone but flagsched change this flag since T?" is one probe.
    op.execute(
        "CREATE INDEX idx_changes_foreign ON feature_flag_changes (flag_key, written_at) "
        "WHERE schedule_ids = '{}'"
    )
    op.execute(
        f"""
        CREATE FUNCTION {CHECK_NAME}(p_id bigint, p_max_lateness interval)
        RETURNS TABLE (outcome text, message text)
        LANGUAGE sql STABLE SECURITY INVOKER AS $$
            -- expired: its expires_at has passed, or, without one and with a maximum
            -- lateness, it is due longer than that since scheduled_at (or the last retry).
            -- conflict (on_conflict 'fail'): someone other than flagsched changed (updated or
            -- deleted) the flag since the schedule was created or last retried, by the time
            -- the writing statement ran; creating the flag does not count. Times in the
            -- future (written by an application) count as never: they cannot switch a check
            -- off. Expired wins over conflict; no row: neither.
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
                    SELECT c.actor, c.written_at FROM feature_flag_changes c
                    WHERE c.flag_key = s.flag_key AND c.schedule_ids = '{{}}'
                      AND c.old_enabled IS NOT NULL
                      AND c.written_at > {_WINDOW_START}
                    ORDER BY c.written_at DESC
                    LIMIT 1
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
        """
        CREATE FUNCTION flagsched_kept_attempts_v1(p_attempts jsonb) RETURNS jsonb
        LANGUAGE sql IMMUTABLE AS $$
            -- The attempts kept with a schedule. An application may have written anything
            -- there: what is not an array, or is too large to append to safely, is
            -- replaced (one row's value must never fail a batch's single UPDATE).
            SELECT CASE WHEN jsonb_typeof(p_attempts) = 'array'
                             AND octet_length(CAST(p_attempts AS text)) < 1000000
                        THEN p_attempts ELSE '[]'::jsonb END
        $$
        """
    )
    op.execute(
        f"""
        CREATE FUNCTION flagsched_claim_v1(p_limit integer, p_lock boolean)
        RETURNS TABLE (now timestamptz, id bigint, flag_key text, scheduled_at timestamptz,
                       updates jsonb, status text, retry_count integer, max_retries integer,
                       next_retry_at timestamptz, blocked boolean, defect text,
                       attempts_made integer)
        LANGUAGE plpgsql SECURITY INVOKER AS $$
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
        CREATE FUNCTION flagsched_apply_v2(
            p_ids bigint[], p_keys text[], p_enabled boolean[], p_rollout integer[],
            p_stop_on_failure boolean[], p_max_lateness interval, p_wait boolean)
        RETURNS TABLE (item integer, outcome text, message text)
        LANGUAGE plpgsql SECURITY INVOKER AS $$
        -- p_*: a batch's changes (schedule id, flag, updates, whether a failure will be
        -- retried), in order: flag, then scheduled_at, id. A row per change that did not
        -- apply (item: its position, from 1):
        --   missing    the flag does not exist
        --   busy       not attempted: another session holds the flag (without p_wait;
        --              with p_wait its lock is waited for, up to lock_timeout)
        --   expired, conflict   failed for good, the flag untouched ({CHECK_NAME})
        --   error      the write failed (message); with p_stop_on_failure it holds the
        --              flag's later changes back:
        --   held_back  behind such an error
        DECLARE
            locked text[];
            held text[] := '{{}}';
            decided_n integer[];
            decided_outcome text[];
            decided_message text[];
            todo integer[];       -- positions to write, in order
            stopped text[] := '{{}}';
            written boolean := false;
            i integer;
        BEGIN
            IF p_wait THEN
                locked := ARRAY(SELECT f.key FROM feature_flags f WHERE f.key = ANY (p_keys)
                                ORDER BY f.key FOR UPDATE);
            ELSE
                locked := ARRAY(SELECT f.key FROM feature_flags f WHERE f.key = ANY (p_keys)
                                ORDER BY f.key FOR UPDATE SKIP LOCKED);
            END IF;
            -- Flags not locked: held by another session (busy), or missing.
            IF cardinality(locked) < cardinality(p_keys) THEN
                held := ARRAY(SELECT f.key FROM feature_flags f
                              WHERE f.key = ANY (p_keys) AND f.key <> ALL (locked));
            END IF;
            -- Decided under the locks: a change another session committed before we got a
            -- flag's lock is visible to this statement's snapshot.
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
            BEGIN  -- the common case: every flag's changes folded into one write
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
                WHERE f.key = v.key AND f.key = ANY (locked);  -- an index scan, not a join
                                                                -- over every flag
                written := true;
            EXCEPTION WHEN OTHERS THEN
                NULL;  -- undone as a whole: every change is tried on its own below
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
                    -- (query_canceled is not caught by OTHERS: a cancel ends the call)
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
        $$
        """
    )
    op.execute(
        f"""
        CREATE FUNCTION {TRIGGER_FUNCTION}() RETURNS trigger
        LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
        -- SECURITY DEFINER: roles that write flags need no grant on the history (an
        -- upgrade must not break an application's writes).
        DECLARE
            applying jsonb := nullif(current_setting('flagsched.applying', true), '')::jsonb;
            writer text := {_WRITER};
        BEGIN
            IF TG_OP = 'INSERT' THEN
                INSERT INTO feature_flag_changes (flag_key, actor, new_enabled,
                    new_rollout_percentage, schedule_ids)
                SELECT n.key, CASE WHEN a.ids IS NULL THEN writer ELSE 'flagsched' END,
                       n.enabled, n.rollout_percentage, coalesce(a.ids, '{{}}')
                FROM new_rows n
                {_APPLIED_IDS};
            ELSIF TG_OP = 'UPDATE' THEN
                INSERT INTO feature_flag_changes (flag_key, actor, old_enabled,
                    old_rollout_percentage, new_enabled, new_rollout_percentage, schedule_ids)
                SELECT n.key, CASE WHEN a.ids IS NULL THEN writer ELSE 'flagsched' END,
                       o.enabled, o.rollout_percentage, n.enabled, n.rollout_percentage,
                       coalesce(a.ids, '{{}}')
                FROM old_rows o JOIN new_rows n ON n.id = o.id
                {_APPLIED_IDS}
                WHERE (o.enabled, o.rollout_percentage)
                      IS DISTINCT FROM (n.enabled, n.rollout_percentage);
            ELSE
                INSERT INTO feature_flag_changes (flag_key, actor, old_enabled,
                    old_rollout_percentage, schedule_ids)
                SELECT o.key, writer, o.enabled, o.rollout_percentage, '{{}}'
                FROM old_rows o;
            END IF;
            RETURN NULL;
        END
        $$
        """
    )
    # TRUNCATE has no transition table: record every flag's deletion just before it.
    op.execute(
        f"""
        CREATE FUNCTION {TRUNCATE_FUNCTION}() RETURNS trigger
        LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
        BEGIN
            INSERT INTO feature_flag_changes (flag_key, actor, old_enabled,
                old_rollout_percentage, schedule_ids)
            SELECT f.key, {_WRITER}, f.enabled, f.rollout_percentage, '{{}}'
            FROM feature_flags f;
            RETURN NULL;
        END
        $$
        """
    )
    op.execute(
        f"CREATE TRIGGER flagsched_record_truncate BEFORE TRUNCATE ON feature_flags "
        f"FOR EACH STATEMENT EXECUTE FUNCTION {TRUNCATE_FUNCTION}()"
    )
    for event, tables in (
        ("INSERT", "NEW TABLE AS new_rows"),
        ("UPDATE", "OLD TABLE AS old_rows NEW TABLE AS new_rows"),
        ("DELETE", "OLD TABLE AS old_rows"),
    ):
        op.execute(
            f"""
            CREATE TRIGGER flagsched_record_{event.lower()} AFTER {event} ON feature_flags
            REFERENCING {tables} FOR EACH STATEMENT EXECUTE FUNCTION {TRIGGER_FUNCTION}()
            """
        )


def downgrade() -> None:
    op.execute(f"DROP FUNCTION {APPLY_FUNCTION}")
    op.execute(f"DROP FUNCTION {CLAIM_FUNCTION}")
    op.execute(f"DROP FUNCTION {KEPT_FUNCTION}")
    op.execute(f"DROP FUNCTION {CHECK_FUNCTION}")
    for event in ("insert", "update", "delete", "truncate"):
        op.execute(f"DROP TRIGGER flagsched_record_{event} ON feature_flags")
    op.execute(f"DROP FUNCTION {TRIGGER_FUNCTION}()")
    op.execute(f"DROP FUNCTION {TRUNCATE_FUNCTION}()")
    op.execute("DROP TABLE feature_flag_changes")
    op.execute("DROP INDEX idx_schedules_group")
    op.execute("DROP SEQUENCE feature_flag_schedule_group_seq")
    op.execute(
        """
        ALTER TABLE feature_flag_schedules
            DROP CONSTRAINT on_conflict_check,
            DROP COLUMN attempts,
            DROP COLUMN reviewed_at,
            DROP COLUMN group_id,
            DROP COLUMN expires_at,
            DROP COLUMN on_conflict
        """
    )
