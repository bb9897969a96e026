-- Fragments of the stored templates (flagsched/sql/stored.py): `{name(arg)}` in a template
-- is the fragment `name` with `{arg}` replaced. Shipped with revision 0009: frozen like a
-- migration (tests/migration/shipped.sha256); a change is a new file and new object names.

-- name: time_min
TIMESTAMPTZ '0001-01-01 00:00:00+00'

-- name: time_max
TIMESTAMPTZ '9999-12-31 23:59:59.999999+00'

-- name: clamped
CASE WHEN {arg} < {time_min()} THEN {time_min()} WHEN {arg} > {time_max()} THEN {time_max()} ELSE {arg} END

-- name: open
-- schedule {arg} is open: pending, or failed and waiting for a retry
{arg}.status IN ('pending', 'failed') AND ({arg}.status = 'pending' OR ({arg}.next_retry_at IS NOT NULL AND {arg}.retry_count <= {arg}.max_retries))

-- name: due
-- open schedule e is due now (approval (0008): and not stuck awaiting one)
(CASE WHEN e.status = 'pending' THEN e.scheduled_at <= now() ELSE e.next_retry_at <= now() OR e.next_retry_at > {time_max()} END AND NOT {awaiting_stuck(e)})

-- name: earlier_open_head
-- the start of "an earlier open schedule of {arg}'s flag exists" ({arg} is a row of this
-- deployment's scope, and so is e); OFFSET 0 (in the callers) keeps it a per-row probe of
-- idx_schedules_flag_open, never an anti join
SELECT 1 FROM {schedules} e
            WHERE e.flag_key = {arg}.flag_key AND {scope_of(e)} AND e.status IN ('pending', 'failed')
              AND (e.scheduled_at, e.id) < ({arg}.scheduled_at, {arg}.id)
              AND {open(e)}

-- name: earlier_open
-- an earlier open schedule of {arg}'s flag exists, whatever it is
EXISTS (
            {earlier_open_head({arg})}
            OFFSET 0)

-- name: earlier_open_not_due
-- an earlier open schedule of {arg}'s flag exists that is not due
EXISTS (
            {earlier_open_head({arg})} AND NOT ({due()})
            OFFSET 0)

-- name: iso
CASE WHEN isfinite({arg}) THEN to_char({arg} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"') ELSE {arg}::text END

-- name: late
CASE WHEN isfinite({arg}) THEN justify_interval(date_trunc('second', now() - {arg}))::text ELSE 'forever' END

-- name: reviewed
CASE WHEN {arg}.reviewed_at <= now() THEN {arg}.reviewed_at END

-- name: due_since
greatest({arg}.scheduled_at, {reviewed({arg})})

-- name: expired_by_date
-- schedule {arg} is past its expires_at (the check's `expired`, first rule)
{arg}.expires_at < now()

-- name: expired_by_lateness
-- schedule {arg} has no expires_at and is due since longer than the maximum lateness
-- (p_max_lateness; the check's `expired`, second rule)
{arg}.expires_at IS NULL AND {due_since({arg})} < now() - p_max_lateness

-- name: past_lateness
-- schedule {arg} is past its lateness: exactly when the check says `expired`
(coalesce({expired_by_date({arg})}, false) OR coalesce({expired_by_lateness({arg})}, false))

-- name: awaiting_stuck
-- approval (0008), the one rule: open schedule {arg} awaits approval and is not yet past
-- its lateness, so it cannot move (never due, never claimed; it holds its flag's later
-- schedules back); past its lateness it is claimed like any due row, and the check fails
-- it for good as `expired:`
({arg}.awaiting_approval_since IS NOT NULL AND NOT {past_lateness({arg})})

-- name: window_start
greatest(CASE WHEN s.created_at <= now() THEN s.created_at ELSE '-infinity'::timestamptz END, {reviewed(s)})

-- name: by_snapshot
(s.created_snapshot IS NOT NULL AND NOT coalesce(s.reviewed_at <= now(), false) AND pg_snapshot_xmax(s.created_snapshot) <= pg_snapshot_xmax(pg_current_snapshot()))

-- name: counts
CASE WHEN {by_snapshot()} AND c.xact IS NOT NULL
                   THEN c.xact IS DISTINCT FROM s.created_xact
                        AND NOT pg_visible_in_snapshot(c.xact, s.created_snapshot)
                   ELSE c.written_at > {window_start()}
                        AND (s.created_xact IS NULL OR c.xact IS NULL
                             OR c.xact <> s.created_xact) END

-- name: writer
coalesce(nullif(current_setting('role'), 'none'), session_user) || coalesce(' (' || nullif(current_setting('application_name', true), '') || ')', '')

-- name: claimed_columns
-- approval (0008): the last four
s.id, s.flag_key, s.scheduled_at, s.updates, s.status, s.retry_count, s.max_retries, s.next_retry_at, s.attempts, s.awaiting_approval_since, s.needs_approval, s.created_by, s.created_at

-- name: claim_query
-- the claim's statement, locking with {arg} (empty: the same read locking nothing)
    WITH untimed AS (  -- waiting for a retry after year 9999: it can never be timed
        SELECT {claimed_columns()} FROM {schedules} s
        WHERE s.status = 'failed' AND s.next_retry_at > {time_max()}
          AND s.retry_count <= s.max_retries AND {scope_of(s)}
        ORDER BY s.next_retry_at, s.id
        LIMIT p_limit
        {arg}
    ), retries AS (  -- due retries that lead their flag
        SELECT {claimed_columns()} FROM {schedules} s
        WHERE s.status = 'failed' AND s.next_retry_at <= now()
          AND s.retry_count <= s.max_retries AND {scope_of(s)}
          AND NOT {awaiting_stuck(s)}  -- approval (0008)
          AND NOT {earlier_open(s)}
        ORDER BY s.next_retry_at, s.id
        LIMIT p_limit - (SELECT count(*) FROM untimed)
        {arg}
    ), leaders AS (  -- due pending schedules first in their flag: one place per flag first
        SELECT {claimed_columns()} FROM {schedules} s
        WHERE s.status = 'pending' AND s.scheduled_at <= now() AND {scope_of(s)}
          AND NOT {awaiting_stuck(s)}  -- approval (0008)
          AND NOT {earlier_open(s)}
        ORDER BY s.scheduled_at, s.id
        LIMIT p_limit - (SELECT count(*) FROM untimed) - (SELECT count(*) FROM retries)
        {arg}
    ), behind_ids AS (  -- due schedules behind due ones of their flag, pending and retries
        -- in one (scheduled_at, id) order: the limit never takes a later step of a flag
        -- while leaving out an earlier one
        SELECT u.id FROM (
            (SELECT s.id, s.scheduled_at FROM {schedules} s
             WHERE s.status = 'pending' AND s.scheduled_at <= now() AND {scope_of(s)}
               AND s.id NOT IN (SELECT id FROM leaders)
               AND NOT {awaiting_stuck(s)}  -- approval (0008)
               AND NOT {earlier_open_not_due(s)}
             ORDER BY s.scheduled_at, s.id
             LIMIT p_limit - (SELECT count(*) FROM untimed) - (SELECT count(*) FROM retries)
              - (SELECT count(*) FROM leaders))
            UNION ALL
            (SELECT s.id, s.scheduled_at FROM {schedules} s
             WHERE s.status = 'failed' AND s.next_retry_at <= now()
               AND s.retry_count <= s.max_retries AND {scope_of(s)}
               AND s.id NOT IN (SELECT id FROM retries)
               AND NOT {awaiting_stuck(s)}  -- approval (0008)
               AND NOT {earlier_open_not_due(s)}
             ORDER BY s.scheduled_at, s.id
             LIMIT p_limit - (SELECT count(*) FROM untimed) - (SELECT count(*) FROM retries)
              - (SELECT count(*) FROM leaders))
        ) u
        ORDER BY u.scheduled_at, u.id
        LIMIT p_limit - (SELECT count(*) FROM untimed) - (SELECT count(*) FROM retries)
              - (SELECT count(*) FROM leaders)
    ), behind AS (  -- locked here, re-checked on the row's latest version
        SELECT {claimed_columns()} FROM {schedules} s
        WHERE s.id IN (SELECT id FROM behind_ids)
          AND CASE WHEN s.status = 'pending' THEN s.scheduled_at <= now()
                   ELSE s.status = 'failed' AND s.next_retry_at <= now()
                        AND s.retry_count <= s.max_retries END
          AND NOT {awaiting_stuck(s)}  -- approval (0008)
        {arg}
    ), claimed AS (
        SELECT * FROM untimed UNION ALL SELECT * FROM retries UNION ALL SELECT * FROM leaders
        UNION ALL SELECT * FROM behind
    )
    SELECT now(), c.id, c.flag_key, {clamped(c.scheduled_at)},
           CASE WHEN z.size <= 8192 THEN c.updates END,
           c.status, c.retry_count, c.max_retries, {clamped(c.next_retry_at)},
           b.blocked,
           -- a pending row's next_retry_at means nothing (applying it clears it)
           CASE WHEN NOT (c.scheduled_at BETWEEN {time_min()} AND {time_max()})
                     THEN 'scheduled_at ' || CAST(c.scheduled_at AS text)
                          || ' is outside the years 1..9999 flagsched can read'
                WHEN c.status = 'failed'
                     AND NOT (c.next_retry_at BETWEEN {time_min()} AND {time_max()})
                     THEN 'next_retry_at ' || CAST(c.next_retry_at AS text)
                          || ' is outside the years 1..9999 flagsched can read'
                WHEN z.size > 8192 THEN 'updates is ' || z.size
                     || ' bytes, more than the 8192 flagsched reads'
           END,
           -- the number of the last attempt kept (0 when none is kept); OFFSET 0: computed
           -- once a row
           (SELECT CASE WHEN jsonb_typeof(k.kept -> -1 -> 'attempt') = 'number'
                             AND CAST(k.kept -> -1 -> 'attempt' AS numeric)
                                 BETWEEN 0 AND 1000000000
                        THEN greatest(jsonb_array_length(k.kept),
                                      CAST(CAST(k.kept -> -1 -> 'attempt' AS numeric)
                                           AS integer))
                        ELSE jsonb_array_length(k.kept) END
            FROM (SELECT {fn.kept_attempts}(c.attempts) AS kept OFFSET 0) k),
           -- approval (0008): what the tick judges approval by
           c.awaiting_approval_since IS NOT NULL, c.needs_approval, ap.approved
    FROM claimed c
    CROSS JOIN LATERAL (SELECT octet_length(CAST(c.updates AS text)) AS size) z
    CROSS JOIN LATERAL (
        -- an earlier open schedule outside this claim (another tick holds it)
        SELECT EXISTS (
            {earlier_open_head(c)} AND NOT (e.id IN (SELECT id FROM claimed))
            OFFSET 0) AS blocked
    ) b
    CROSS JOIN LATERAL (
        -- approval (0008): an approved verdict exists; a per-row probe of
        -- idx_approvals_schedule (OFFSET 0: as a hashed subplan in the select list it made
        -- the kept attempts above decompress ~3x as often)
        -- counted as queries.sql's fragment `approved` counts it: an approval by another
        -- login than the creator, given after the row was inserted (a verdict left by a
        -- deleted row of the same id does not carry over), and no rejection
        SELECT EXISTS (
            SELECT 1 FROM {approvals} a
            WHERE a.schedule_id = c.id AND a.verdict = 'approved'
              AND a.decided_by IS DISTINCT FROM c.created_by AND a.decided_at >= c.created_at
            OFFSET 0)
           AND NOT EXISTS (
            SELECT 1 FROM {approvals} a
            WHERE a.schedule_id = c.id AND a.verdict = 'rejected'
            OFFSET 0) AS approved
    ) ap
    ORDER BY c.flag_key, c.scheduled_at, c.id

-- name: due_s
(CASE WHEN s.status = 'pending' THEN s.scheduled_at <= now() ELSE s.next_retry_at <= now() OR s.next_retry_at > {time_max()} END AND NOT {awaiting_stuck(s)})
