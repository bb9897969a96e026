-- Every runtime statement flagsched sends, by name (flagsched/sql/__init__.py reads this
-- file; flagsched/repository.py has one function per statement). `{schedules}` and
-- `{flags.key}` are tables and columns of the table mapping, `{MAX_TEXT}` a constant,
-- `{waiting_row}` a fragment below, `{where}` a slot the caller fills with fragments.
-- Stored logic (the claim, the write, the checks) lives in the templates of stored/,
-- created by migration 0009 (built-in tables) or `flagsched migrate` (your own tables) and
-- called by name: `{fn.claim}` is the mapping's name for it.
-- A line starting with "-- " directly inside a statement is dropped with the comments.

-- ==================== rules: one spelling each ==========================================

-- name: waiting_row
-- A failed schedule still waiting for a retry (SPEC's one definition), status aside.
(next_retry_at IS NOT NULL AND retry_count <= max_retries)

-- name: waiting
(status = 'failed' AND {waiting_row})

-- name: counted_verdict
-- Four eyes, the one rule of which verdicts `a` on schedule {arg} count: a rejection,
-- whenever given (it vetoes); an approval given by another login than the schedule's
-- creator after the row was inserted (a verdict left by a deleted row of the same id does
-- not carry over to a row inserted later). The claim (flagsched/sql/stored/fragments.sql,
-- claim_query) counts them the same way; `list`, `show`, `plan`, `agenda` and `approve`
-- through this fragment.
(a.verdict = 'rejected'
 OR (a.decided_by IS DISTINCT FROM {arg}.created_by AND a.decided_at >= {arg}.created_at))

-- name: approved
-- Four eyes: schedule {arg} is approved: an approval counts, and no rejection.
(EXISTS (SELECT 1 FROM {approvals} a
         WHERE a.schedule_id = {arg}.id AND a.verdict = 'approved' AND {counted_verdict({arg})})
 AND NOT EXISTS (SELECT 1 FROM {approvals} a
                 WHERE a.schedule_id = {arg}.id AND a.verdict = 'rejected'))

-- name: open_schedule
-- Open: pending, or failed and waiting for a retry. Spelled so that only the indexes of
-- open rows (status IN ('pending', 'failed')) match it, so idx_schedules_open serves it in
-- (scheduled_at, id) order (with `status = 'pending' OR ...` the planner ORs two bitmap
-- scans and sorts every open row: 2x slower beside 200,000 applied rows).
status IN ('pending', 'failed') AND (status <> 'failed' OR {waiting_row})

-- name: awaiting_approval
-- Four eyes: open, due, and waiting for an approval it has not got (a tick marked it).
(awaiting_approval_since IS NOT NULL AND {open_schedule})

-- name: time_min
-- The readable time range: years 1..9999, what Python holds (the claim,
-- stored/claim.sql, clamps to the same).
TIMESTAMPTZ '0001-01-01 00:00:00+00'

-- name: time_max
TIMESTAMPTZ '9999-12-31 23:59:59.999999+00'

-- name: clamped_time
-- {arg} moved into the readable range (NULL stays NULL).
(CASE WHEN {arg} < {time_min} THEN {time_min}
      WHEN {arg} > {time_max} THEN {time_max}
      ELSE {arg} END)

-- name: readable_time
({arg} BETWEEN {time_min} AND {time_max})

-- name: unreadable_time
'{arg} ' || CAST({arg} AS text) || ' is outside the years 1..9999 flagsched can read'

-- name: updates_size
octet_length(CAST({arg} AS text))

-- name: shown_updates
-- `updates` as commands show it: one too large to ship is a note of its size.
CASE WHEN {updates_size(updates)} <= {UPDATES_MAX_BYTES} THEN updates
     ELSE to_jsonb('(' || {updates_size(updates)} || ' bytes: not shown)') END
AS updates

-- name: schedule_fields
-- A schedule as every read command shows it (`list`, `show`): list-failed's keys plus the
-- authoring columns. `permanent`: failed for good.
id, flag_key, scheduled_at, {shown_updates}, status, retry_count, max_retries,
next_retry_at, left(last_error, {MAX_TEXT}) AS last_error, applied_at, created_at,
updated_at, (status = 'failed' AND NOT {waiting}) AS permanent,
group_id, expires_at, on_conflict, recurrence_id, reviewed_at,
needs_approval AS approval_asked, created_by, {awaiting_approval} AS awaiting_approval,
{approved({schedules_all})} AS approved

-- ==================== filters the callers choose ========================================

-- name: of_flag
flag_key = %(flag_key)s

-- name: with_status
status = %(status)s

-- name: from_start
scheduled_at >= CAST(%(start)s AS timestamptz)

-- name: before_end
scheduled_at < CAST(%(end)s AS timestamptz)

-- name: failed
status = 'failed'

-- name: for_good
NOT {waiting_row}

-- name: open_due_until
{open_schedule} AND scheduled_at <= %(until)s

-- name: retry_due_until_scheduled_after
-- A retry due by `until` whose own scheduled_at is later (an application may store one).
{waiting} AND next_retry_at <= %(until)s AND scheduled_at > %(until)s

-- name: open_of_key_after_until
-- The first open schedule of a flag after `until` that is not itself a retry due by then
-- (those are read anyway): what holds back such retries behind it.
{open_schedule} AND flag_key = %(key)s AND scheduled_at > %(until)s
AND NOT ({waiting} AND next_retry_at <= %(until)s)

-- name: failed_for_good_between
status = 'failed' AND NOT {waiting_row} AND scheduled_at BETWEEN %(start)s AND %(end)s

-- name: changed_since
changed_at >= coalesce(%(since)s::timestamptz, now())

-- name: newest_of_flag
-- Newest first: by flag, the (flag_key, changed_at, id) index.
changed_at DESC, id DESC

-- name: newest
-- Newest first without a flag: by id, which follows commit order closely enough and is
-- the primary key.
id DESC

-- name: active_recurrence
cancelled_at IS NULL

-- name: flag_in_keys
{flags.key} = ANY(%(keys)s)

-- ==================== sessions and the schema ===========================================

-- name: session_settings
-- Every session setting a flagsched transaction runs with. Per transaction (SET LOCAL), not
-- per session: behind a transaction-mode pooler each transaction may run on another server
-- connection, and a startup parameter (`options`) is refused or dropped there.
{set_lock_timeout}; {set_statement_timeout}; {set_idle_timeout}; {set_timezone}; {set_jit}

-- name: set_lock_timeout
-- The timeouts are whole milliseconds, literals of the caller's `Database`.
SET LOCAL lock_timeout = {lock_timeout_ms}

-- name: set_statement_timeout
SET LOCAL statement_timeout = {statement_timeout_ms}

-- name: set_idle_timeout
-- A crashed or stuck tick must never keep its claimed rows locked for long.
SET LOCAL idle_in_transaction_session_timeout = 60000

-- name: set_timezone
SET LOCAL timezone = 'UTC'

-- name: set_jit
-- JIT compiles the claim (its cost estimate is high) for ~30 ms: never worth it.
SET LOCAL jit = off

-- name: start_transaction
BEGIN

-- name: begin
-- A transaction and its settings as one simple-protocol query: one round trip.
{start_transaction}; {session_settings}

-- name: savepoint
-- One name is enough: a savepoint of the same name inside another hides it until released.
SAVEPOINT flagsched_write

-- name: release_savepoint
RELEASE SAVEPOINT flagsched_write

-- name: rollback_to_savepoint
ROLLBACK TO SAVEPOINT flagsched_write

-- name: read_only
SET TRANSACTION READ ONLY

-- name: encoding_and_migrated
SELECT current_setting('server_encoding'), to_regclass('alembic_version') IS NOT NULL

-- name: schema_revision
SELECT version_num FROM alembic_version LIMIT 1

-- name: missing_objects
-- Which of the required objects are missing, as their positions in the list (from 1):
-- catalog lookups only (no table is read), one round trip at the start of every command.
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
        -- `relation`: a type of its arguments to look up first (to_regprocedure fails
        -- on one that does not exist)
        WHEN 'function' THEN CASE WHEN r.relation <> '' AND to_regtype(r.relation) IS NULL
                                  THEN false ELSE to_regprocedure(r.name) IS NOT NULL END
        WHEN 'column' THEN (r.relation, r.name) IN (SELECT relation, name FROM columns)
        ELSE EXISTS (
            SELECT FROM pg_trigger t
            -- a trigger by its family: `flagsched_record_update` is served by a later
            -- release's `flagsched_record_update_v3` that replaced it
            WHERE t.tgrelid = to_regclass(r.relation)
              AND (t.tgname = r.name OR left(t.tgname, length(r.name) + 1) = r.name || '_'))
    END
    ORDER BY r.n)

-- name: catalog_table
-- A configured table (issue 18) as the search_path resolves it: no quoting in the
-- configuration, each part quoted here; NULL when there is no such relation.
SELECT c.oid AS oid, CAST(c.relkind AS text) AS kind,
       n.nspname || '.' || c.relname AS shown, CAST(n.nspname AS text) AS schema
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.oid = to_regclass(
    CASE WHEN CAST(%(schema)s AS text) IS NULL THEN quote_ident(%(name)s)
         ELSE quote_ident(%(schema)s) || '.' || quote_ident(%(name)s) END)

-- name: catalog_columns
-- Its columns with their types (a domain as its base type), and an enum's labels.
SELECT a.attname AS name, b.typname AS base_type,
       format_type(a.atttypid, a.atttypmod) AS shown_type,
       (a.attnotnull OR t.typnotnull) AS not_null,
       CASE WHEN b.typtype = 'e' THEN ARRAY(
           SELECT CAST(e.enumlabel AS text) FROM pg_enum e
           WHERE e.enumtypid = b.oid ORDER BY e.enumsortorder) END AS labels
FROM pg_attribute a
JOIN pg_type t ON t.oid = a.atttypid
JOIN pg_type b ON b.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END
WHERE a.attrelid = CAST(%(oid)s AS oid) AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum

-- name: catalog_unique_indexes
-- The key columns of each valid unique index without predicate or expression (a primary
-- key and a unique constraint have one): what proves a column set unique for every row,
-- also those inserted later. INCLUDE columns are not key columns.
SELECT array_agg(CAST(a.attname AS text) ORDER BY k.n) AS columns
FROM pg_index i
CROSS JOIN LATERAL unnest(CAST(i.indkey AS int2[])) WITH ORDINALITY AS k(attnum, n)
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
WHERE i.indrelid = CAST(%(oid)s AS oid) AND i.indisunique AND i.indisvalid
  AND i.indpred IS NULL AND i.indexprs IS NULL AND k.n <= i.indnkeyatts
GROUP BY i.indexrelid

-- name: schedules_relation
-- What flagsched's schedules relation in its schema is (r: its own table, v: its view over an
-- application's schedules table), and the mapping noted on it.
SELECT c.relkind::text AS kind, obj_description(c.oid, 'pg_class') AS mapping
FROM pg_class c WHERE c.oid = to_regclass(%(relation)s)

-- name: lacking_privileges
-- What the tick's login may not do of what every tick does (catalog lookups only): EXECUTE
-- on each routine it calls, UPDATE on some column of each table it writes. A grant missing
-- (an upgrade's migrate not followed by the grants) would otherwise fail each schedule's
-- write in turn and spend its retries; an object that is missing is ensure_schema's to name.
SELECT ARRAY(
    SELECT 'EXECUTE on function ' || f.signature
    FROM unnest(CAST(%(functions)s AS text[])) AS f(signature)
    WHERE to_regprocedure(f.signature) IS NOT NULL
      AND NOT has_function_privilege(to_regprocedure(f.signature), 'EXECUTE')
    UNION ALL
    SELECT 'UPDATE on table ' || t.relation
    FROM unnest(CAST(%(tables)s AS text[])) AS t(relation)
    WHERE to_regclass(t.relation) IS NOT NULL
      AND NOT has_any_column_privilege(to_regclass(t.relation), 'UPDATE')
)

-- name: login
-- The role privileges are checked for (lacking_privileges), for a message.
SELECT CAST(current_user AS text)

-- name: open_rows_indexed
-- Has an application's schedules table an index of its open rows by flag: a valid partial
-- index whose first column is the flag reference? Without one a deep due backlog on few
-- flags makes each claim read every due row (docs/own-tables.md, "Known limit").
SELECT EXISTS (
    SELECT FROM pg_index i
    JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
    WHERE i.indrelid = to_regclass(%(relation)s) AND i.indisvalid AND i.indpred IS NOT NULL
      AND a.attname = %(column)s)

-- name: routine_missing
SELECT to_regprocedure(%(signature)s) IS NULL

-- name: trigger_missing
SELECT NOT EXISTS (
    SELECT FROM pg_trigger
    WHERE tgrelid = to_regclass(%(relation)s) AND tgname = %(name)s)

-- name: note_unseen_schedules
-- On an application's schedules table, the rows no trigger noted (stored/
-- unseen_once.sql): the open ones, and those of the ids an operator gave.
SELECT {fn.note_unseen_once}(CAST(%(ids)s AS text[]))

-- name: note_every_schedule
-- `flagsched migrate` on an application's schedules table (shape 3): a state row for each
-- row the table held before (and any its trigger did not note), as stored/
-- own_schedules.sql's trigger would have made it but without a creator or a snapshot (its
-- conflict window starts at its created_at).
INSERT INTO {state} (id, created_xact, created_snapshot)
SELECT s.{app_schedules.id}, NULL, NULL FROM {app_schedules} s
WHERE NOT EXISTS (SELECT 1 FROM {state} x WHERE x.id = s.{app_schedules.id})
ON CONFLICT (id) DO NOTHING

-- name: own_objects_note
-- What `flagsched migrate` noted on the ramp groups' sequence in flagsched's schema (issue
-- 18): the digest of the text of flagsched's own objects it last ran there (stored.py
-- `objects_note`); NULL when none. A catalog read: it locks no table.
SELECT obj_description(to_regclass({group_seq()}), 'pg_class')

-- name: note_own_objects
COMMENT ON SEQUENCE {group_seq_relation()} IS {note}

-- name: flag_of_columns
-- Shape 3: the columns flagsched's function giving a schedule's flag returns in schema
-- %(schema)s (stored/own_schedules.sql `flagsched_flag_of_v1`: the key, then the scope's
-- columns), of the one taking the type flags are referred to by (the id column %(id)s of
-- %(flags)s, or a key: text); NULL when there is none. Catalog only.
SELECT ARRAY(
    SELECT CAST(a.name AS text)
    FROM unnest(p.proargnames, p.proargmodes) WITH ORDINALITY AS a(name, mode, n)
    WHERE a.mode = 't' ORDER BY a.n)
FROM pg_proc p
JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname = %(schema)s AND p.proname = 'flagsched_flag_of_v1' AND p.pronargs = 1
  AND p.proargtypes[0] = coalesce(
      (SELECT a.atttypid FROM pg_attribute a
       WHERE a.attrelid = to_regclass(%(flags)s) AND a.attname = %(id)s AND a.attnum > 0),
      CAST('text' AS regtype))

-- name: record_triggers_in_schema
-- Triggers whose functions live in flagsched's schema %(schema)s, on whichever table, and
-- whether that table is this configuration's flags table (%(relation)s).
SELECT CAST(tn.nspname || '.' || c.relname AS text) AS relation,
       CAST(t.tgname AS text) AS name, t.tgrelid = to_regclass(%(relation)s) AS here
FROM pg_trigger t
JOIN pg_class c ON c.oid = t.tgrelid
JOIN pg_namespace tn ON tn.oid = c.relnamespace
JOIN pg_proc p ON p.oid = t.tgfoid
JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname = %(schema)s AND NOT t.tgisinternal
ORDER BY 1, 2

-- name: flagsched_triggers_of_other_schemas
-- flagsched's triggers (named flagsched_...) on the application's tables %(flags)s and
-- %(schedules)s (NULL: none) whose functions live in another schema than %(schema)s: that
-- schema serves the table already.
SELECT CAST(tn.nspname || '.' || c.relname AS text) AS relation,
       CAST(n.nspname AS text) AS schema
FROM pg_trigger t
JOIN pg_class c ON c.oid = t.tgrelid
JOIN pg_namespace tn ON tn.oid = c.relnamespace
JOIN pg_proc p ON p.oid = t.tgfoid
JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE t.tgrelid IN (to_regclass(%(flags)s), to_regclass(%(schedules)s))
  AND n.nspname <> %(schema)s AND t.tgname LIKE 'flagsched%%' AND NOT t.tgisinternal
ORDER BY 1, 2
LIMIT 1

-- name: migration_lock
SELECT pg_advisory_xact_lock(%(key)s)

-- name: db_now
SELECT now()

-- ==================== the tick ==========================================================

-- name: claim
-- stored/claim.sql (0006's flagsched_claim_v2 plus the scope and approvals): a stored
-- function, so its plan is cached per server connection even behind a pooler (no
-- client-side prepared statements). It claims only schedules that can move: none held back
-- behind an open one not due, none awaiting approval (unless past its lateness).
-- `scope`: the deployment's scope values; `lateness`: the maximum lateness, in seconds.
SELECT * FROM {fn.claim}(%(limit)s, %(lock)s, CAST(%(scope)s AS jsonb),
                         make_interval(secs => %(lateness)s))

-- name: held_back
-- stored/held_back_once.sql (migration 0010): in one pass over the open rows of the flags
-- something holds back.
SELECT * FROM {fn.held_back_once}(%(limit)s, CAST(%(scope)s AS jsonb),
                             make_interval(secs => %(lateness)s))

-- name: lock_flags
-- Four eyes: the flags whose changes the tick judges, locked as stored/apply.sql locks
-- them (the same order, the same strength), so the policy is judged against the flag as
-- it is when the change is written; the flags another session holds are left out.
SELECT {flags.key} AS key, {flags.enabled} AS enabled,
       {flags.rollout_percentage} AS rollout_percentage
FROM {flags} WHERE {flags.key} = ANY(%(keys)s) AND {flag_in_scope()}
ORDER BY {flags.key}
FOR NO KEY UPDATE SKIP LOCKED

-- name: lock_flag_waiting
-- The same for one flag another session held: waited for (up to lock_timeout).
SELECT {flags.key} AS key, {flags.enabled} AS enabled,
       {flags.rollout_percentage} AS rollout_percentage
FROM {flags} WHERE {flags.key} = %(key)s AND {flag_in_scope()}
FOR NO KEY UPDATE

-- name: mark_awaiting
-- Due, needing an approval it has not got: the claim passes it over from now on.
UPDATE {schedules} SET awaiting_approval_since = %(now)s
WHERE id = ANY(CAST(%(ids)s AS {schedule_id_type()}[])) AND awaiting_approval_since IS NULL

-- name: apply
-- stored/apply.sql (migration 0011's, calling its check): lock, decide, write set-based; a
-- failed write fails the statement (the tick's one fallback takes over).
SELECT item, outcome, message FROM {fn.apply_clamped}(
    CAST(%(ids)b AS {schedule_id_type()}[]), CAST(%(keys)b AS text[]),
    CAST(%(enabled)b AS boolean[]), CAST(%(rollout)b AS integer[]),
    make_interval(secs => %(lateness)s), %(wait)s, CAST(%(scope)s AS jsonb))

-- name: safety_checks
SELECT i.id, k.outcome, k.message
FROM unnest(CAST(%(ids)b AS {schedule_id_type()}[])) AS i(id)
CROSS JOIN LATERAL {fn.check_clamped}(i.id, make_interval(secs => %(lateness)s)) k

-- name: record_new
-- Each schedule's outcome: its new values, computed once (`new`), then written by `record`
-- (flagsched's own schedules table) or `record_app` (an application's, where flagsched's
-- view cannot take a set-based UPDATE).
WITH v AS (
    SELECT a.id, 'applied' AS outcome, NULL::timestamptz AS next_retry_at,
           NULL::text AS last_error, NULL::integer AS max_retries, a.made
    FROM unnest(CAST(%(applied)b AS {schedule_id_type()}[]), CAST(%(applied_made)b AS integer[]))
         AS a(id, made)
    UNION ALL
    SELECT f.id, f.outcome, f.next_retry_at, f.last_error, f.max_retries, f.made
    FROM unnest(CAST(%(failed)b AS {schedule_id_type()}[]), CAST(%(outcomes)b AS text[]),
                CAST(%(next)b AS timestamptz[]), CAST(%(errors)b AS text[]),
                CAST(%(max)b AS integer[]), CAST(%(failed_made)b AS integer[]))
         AS f(id, outcome, next_retry_at, last_error, max_retries, made)
), new AS (
    SELECT s.id,
           CASE WHEN v.outcome = 'applied' THEN 'applied' ELSE 'failed' END AS status,
           CASE WHEN v.outcome = 'applied' THEN CAST(%(now)s AS timestamptz) END AS applied_at,
           -- saturates: a retry_count at the integer limit stays there (no overflow)
           s.retry_count + CASE
               WHEN v.outcome = 'applied' OR s.retry_count = {INT_MAX} THEN 0 ELSE 1 END
               AS retry_count,
           coalesce(v.max_retries, s.max_retries) AS max_retries,
           v.next_retry_at,
           CASE WHEN v.outcome = 'applied' THEN NULL ELSE v.last_error END AS last_error,
           CAST(%(now)s AS timestamptz) AS updated_at,
           -- the claim numbered the attempts kept, and the row stayed locked since:
           -- none kept means start again from []; otherwise the last few are kept
           -- (stored/kept_attempts.sql, bounded: it reads no TOAST of a value too
           -- large to keep), so a row's cost is bounded whatever it held
           CASE WHEN v.made = 0 THEN '[]'::jsonb
                ELSE {fn.kept_attempts}(s.attempts) END
               || jsonb_build_array(jsonb_build_object(
               'attempt', v.made + 1, 'at', %(at)s::text,
               'outcome', v.outcome, 'error', v.last_error)) AS attempts
    FROM {schedules} AS s JOIN v ON s.id = v.id
)

-- name: record
{record_new}, recorded AS (
    UPDATE {schedules} AS s
    SET status = n.status, applied_at = n.applied_at, retry_count = n.retry_count,
        max_retries = n.max_retries, next_retry_at = n.next_retry_at,
        last_error = n.last_error, updated_at = n.updated_at, attempts = n.attempts
    FROM new AS n
    WHERE s.id = n.id
)
SELECT pg_notify({NOTIFY_CHANNEL}, %(notice)s::text) WHERE %(notice)s::text IS NOT NULL

-- name: record_app
-- stored/own_schedules.sql: both rows of each schedule, set-based, and the notice; returns
-- the rows the application's table refused to take (logged by the tick).
{record_new}
SELECT r.refused, r.message
FROM (SELECT array_agg(n.id) AS ids, array_agg(n.status) AS status,
             array_agg(n.applied_at) AS applied_at, array_agg(n.retry_count) AS retry_count,
             array_agg(n.max_retries) AS max_retries,
             array_agg(n.next_retry_at) AS next_retry_at,
             array_agg(n.last_error) AS last_error, array_agg(n.updated_at) AS updated_at,
             array_agg(n.attempts) AS attempts
      FROM new AS n) AS a
CROSS JOIN LATERAL {fn.record_app}(
    a.ids, a.status, a.applied_at, a.retry_count, a.max_retries, a.next_retry_at,
    a.last_error, a.updated_at, a.attempts, %(notice)s::text) AS r

-- name: backlog
-- Index scans only (idx_schedules_pending_due, idx_schedules_next_retry_at): it runs at
-- the end of every tick and for `status --max-lag`, every minute, on tables of millions
-- of rows. A schedule awaiting approval counts as due but not towards the oldest due
-- age: a person, not the tick, is what it waits for (flagsched_awaiting_approval says so).
WITH pending AS (
    SELECT count(*) AS n,
           min(scheduled_at) FILTER (WHERE awaiting_approval_since IS NULL) AS oldest
    FROM {schedules_all}
    WHERE status = 'pending' AND scheduled_at <= %(now)s AND {scope_match()}
), retries AS (
    SELECT count(*) AS n,
           min(next_retry_at) FILTER (WHERE awaiting_approval_since IS NULL) AS oldest
    FROM {schedules_all}
    WHERE next_retry_at <= %(now)s AND {waiting} AND {scope_match()}
)
SELECT pending.n + retries.n AS due,
       LEAST(pending.oldest, retries.oldest) AS oldest_due_at,
       EXTRACT(EPOCH FROM CAST(%(now)s AS timestamptz)
           - {clamped_time(LEAST(pending.oldest, retries.oldest))}
       ) AS oldest_due_age_seconds,
       LEAST(
           (SELECT min(scheduled_at) FROM {schedules_all}
            WHERE status = 'pending' AND scheduled_at > %(now)s AND {scope_match()}),
           (SELECT min(next_retry_at) FROM {schedules_all}
            WHERE next_retry_at > %(now)s AND {waiting} AND {scope_match()})
       ) AS next_due_at
FROM pending, retries

-- name: awaiting_backlog
-- The due schedules awaiting approval, and since when the oldest waits: a tick marks them
-- only when due, so the due indexes find them (idx_schedules_pending_due,
-- idx_schedules_next_retry_at), as `backlog` reads them.
-- The oldest wait's age in seconds counts as `backlog`'s does: a time before year 1 (a
-- value someone stored: -infinity, BC) from year 1, the longest wait there is, never none.
SELECT count(*) AS n,
       EXTRACT(EPOCH FROM CAST(%(now)s AS timestamptz)
           - {clamped_time(min(awaiting_approval_since))}) AS oldest_age_seconds
FROM (
    SELECT awaiting_approval_since FROM {schedules_all}
    WHERE status = 'pending' AND scheduled_at <= %(now)s
      AND awaiting_approval_since IS NOT NULL AND {scope_match()}
    UNION ALL
    SELECT awaiting_approval_since FROM {schedules_all}
    WHERE next_retry_at <= %(now)s AND {waiting} AND awaiting_approval_since IS NOT NULL
      AND {scope_match()}
) AS a

-- ==================== recurrences: materialise ==========================================

-- name: due_recurrences
-- next_at may be -infinity or BC: read leniently (a text, never a crash).
SELECT now() AS now, id, flag_key, cron, timezone, next_at
FROM {recurrences}
WHERE cancelled_at IS NULL AND next_at <= now() AND {scope_match()}
ORDER BY next_at, id
LIMIT %(limit)s
FOR NO KEY UPDATE SKIP LOCKED  -- a row referencing it (FOR KEY SHARE) never hides it

-- name: due_recurrences_preview
-- --dry-run: the recurrences a tick would materialise now, read without a lock (the
-- preview changes nothing and holds back no tick); next_at read leniently as above.
SELECT now() AS now, {recurrence_fields}
FROM {recurrences}
WHERE cancelled_at IS NULL AND next_at <= now() AND {scope_match()}
ORDER BY next_at, id
LIMIT %(limit)s

-- name: materialise
-- a schedule of a recurrence is in the recurrence's scope
INSERT INTO {schedules}
    (flag_key, scheduled_at, updates, expires_at, on_conflict, recurrence_id{scope_columns()})
SELECT r.flag_key, f.at, r.updates, f.at + r.expires_after, r.on_conflict, r.id{scope_columns(r)}
FROM unnest(CAST(%(ids)s AS bigint[]), CAST(%(ats)s AS timestamptz[])) AS f(id, at)
JOIN {recurrences} r ON r.id = f.id
{recurrence_unique()}
RETURNING id, recurrence_id, flag_key, scheduled_at

-- name: advance_recurrences
UPDATE {recurrences} r SET next_at = v.next_at
FROM unnest(CAST(%(ids)s AS bigint[]), CAST(%(nexts)s AS timestamptz[]))
     AS v(id, next_at)
WHERE r.id = v.id

-- ==================== reading ===========================================================

-- name: list_failed
SELECT id, flag_key, scheduled_at,
       {shown_updates},
       status, retry_count, max_retries,
       next_retry_at, left(last_error, {MAX_TEXT}) AS last_error, applied_at, created_at,
       updated_at, NOT {waiting_row} AS permanent
FROM {schedules_all}
WHERE ({where}) AND {scope_match()}
ORDER BY updated_at DESC, id DESC
LIMIT %(limit)s

-- name: state_counts
-- Schedules per state (one pass over the table: for `status`, not for the tick).
SELECT
  count(*) FILTER (WHERE status = 'pending' AND scheduled_at > %(now)s) AS scheduled,
  count(*) FILTER (WHERE {waiting} AND next_retry_at > %(now)s) AS waiting_retry,
  count(*) FILTER (WHERE status = 'failed' AND NOT {waiting}) AS failed,
  count(*) FILTER (WHERE status = 'applied') AS applied,
  count(*) FILTER (WHERE status = 'cancelled') AS cancelled,
  count(*) FILTER (WHERE status NOT IN ('pending', 'failed', 'applied', 'cancelled'))
    AS unknown,
  count(*) FILTER (WHERE {awaiting_approval}) AS awaiting_approval
FROM {schedules_all}
WHERE {scope_match()}

-- name: existing_flags
SELECT {flags.key} FROM {flags} WHERE {flags.key} = ANY(%(keys)s) AND {flag_in_scope()}

-- name: list_schedules
SELECT {schedule_fields} FROM {schedules_all}
WHERE ({where}) AND {scope_match()}
ORDER BY scheduled_at, id
LIMIT %(limit)s

-- name: show_schedule
SELECT {schedule_fields},
       CASE WHEN jsonb_typeof(attempts) = 'array' THEN attempts ELSE '[]' END
           AS attempts
FROM {schedules_all} WHERE id = %(i)s AND {scope_match()}

-- name: change_columns
-- old NULL: the flag was made; new NULL: it was deleted. An application's nullable column
-- may hold NULL in a flag that exists: a side with either value set is shown.
id, flag_key, changed_at, actor,
CASE WHEN old_enabled IS NULL AND old_rollout_percentage IS NULL THEN NULL
     ELSE jsonb_build_object('enabled', old_enabled,
                             'rollout_percentage', old_rollout_percentage) END AS old,
CASE WHEN new_enabled IS NULL AND new_rollout_percentage IS NULL THEN NULL
     ELSE jsonb_build_object('enabled', new_enabled,
                             'rollout_percentage', new_rollout_percentage) END AS new,
-- as JSON: numbers for integer ids, strings for uuid and text ones (an application's ids
-- are of a domain whose array type the driver does not know)
to_jsonb(schedule_ids) AS schedule_ids

-- name: history
-- Changes of flags, newest first (index scans on idx_changes_flag / _changed_at).
SELECT {change_columns} FROM {changes}
WHERE ({where}) AND {scope_match()} ORDER BY {order} LIMIT %(limit)s

-- name: changes_of
SELECT {change_columns} FROM {changes}
WHERE flag_key = %(k)s AND schedule_ids @> ARRAY[CAST(%(i)s AS {schedule_id_type()})]
  AND {scope_match()}
ORDER BY changed_at, id

-- name: recurrence_fields
id, flag_key, cron, timezone, updates, next_at, expires_after, on_conflict,
cancelled_at, created_at

-- name: list_recurrences
SELECT {recurrence_fields} FROM {recurrences} WHERE ({where}) AND {scope_match()}
ORDER BY next_at NULLS LAST, id

-- name: flags_now
SELECT {flags.key} AS key, {flags.enabled} AS enabled,
       {flag_rollout()} AS rollout_percentage
FROM {flags} WHERE ({where}) AND {flag_in_scope()} ORDER BY {flags.key}

-- name: ahead_fields
id, flag_key, {clamped_time(scheduled_at)} AS scheduled_at, {shown_updates}, status,
{clamped_time(next_retry_at)} AS next_retry_at,
{clamped_time(expires_at)} AS expires_at, {clamped_time(reviewed_at)} AS reviewed_at,
group_id, recurrence_id, (status = 'failed' AND {waiting_row}) AS waiting,
left(last_error, {MAX_TEXT}) AS last_error,
CASE WHEN NOT {readable_time(scheduled_at)} THEN {unreadable_time(scheduled_at)}
     WHEN status = 'failed' AND NOT {readable_time(next_retry_at)}
          THEN {unreadable_time(next_retry_at)}
     WHEN {updates_size(updates)} > {UPDATES_MAX_BYTES}
          THEN 'updates is ' || {updates_size(updates)}
               || ' bytes, more than the ' || {UPDATES_MAX_BYTES} || ' flagsched reads'
END AS defect,
-- a conflict that has already happened (the tick will fail it with `conflict:`)
CASE WHEN status IN ('pending', 'failed') AND on_conflict = 'fail' THEN
    (SELECT left(k.message, {MAX_TEXT}) FROM {fn.check_clamped}(id, CAST(NULL AS interval)) k
     WHERE k.outcome = 'conflict')
END AS conflict,
-- four eyes: asked for, a tick found it awaiting, approved (idx_approvals_schedule)
needs_approval, awaiting_approval_since IS NOT NULL AS awaiting,
{approved({schedules_all})} AS approved

-- name: schedules_ahead
-- a range of idx_schedules_open (idx_schedules_flag_open with a flag), never the applied
-- history
SELECT {ahead_fields} FROM {schedules_all}
WHERE ({where}) AND {scope_match()}
ORDER BY scheduled_at, id
LIMIT %(limit)s

-- name: recurrences_ahead
-- an index range of idx_recurrences_due
SELECT id, flag_key, cron, timezone, {shown_updates},
       {clamped_time(next_at)} AS next_at, expires_after, needs_approval
FROM {recurrences}
WHERE ({where}) AND {scope_match()}
ORDER BY next_at NULLS LAST, id

-- ==================== operators =========================================================

-- name: insert_schedule
INSERT INTO {schedules}
    (flag_key, scheduled_at, updates, max_retries, expires_at, on_conflict, needs_approval
     {scope_columns()})
SELECT %(k)s, t.at, CAST(%(u)s AS jsonb), coalesce(CAST(%(m)s AS integer), 3),
       t.at + CAST(%(e)s AS interval), %(c)s, %(approval)s{scope_values()}
FROM (SELECT coalesce(CAST(%(at)s AS timestamptz), now()) AS at) AS t
RETURNING id

-- name: lock_schedule
-- Waits for a tick that holds it to commit.
SELECT id, flag_key, scheduled_at, status, retry_count, max_retries, next_retry_at,
       {waiting} AS waiting
FROM {schedules} WHERE id = %(i)s AND {scope_match()} FOR UPDATE

-- name: earlier_open_outside
-- Of the schedules `ids` a tick has just claimed, those behind an earlier open schedule of
-- their flag that is not among them, read in a snapshot newer than the claim's: the claim's
-- own snapshot misses a schedule made open while it ran. `flagsched retry` of an earlier
-- one locks the later open ones (lock_later_open) and releases them at its commit; a claim
-- whose snapshot predates that commit could lock a later one right after it and take it as
-- first of its flag, and the older change then landed on top of the newer. Held back, like
-- the claim's own `blocked` rows (the same rule, stored/fragments.sql `earlier_open_head`).
SELECT s.id FROM {schedules} s
WHERE s.id = ANY(CAST(%(ids)s AS {schedule_id_type()}[]))
  AND EXISTS (SELECT 1 FROM {schedules} e
              WHERE e.flag_key = s.flag_key AND {scope_match(e)}
                AND (e.scheduled_at, e.id) < (s.scheduled_at, s.id)
                AND e.id <> ALL(CAST(%(ids)s AS {schedule_id_type()}[]))
                AND {open_schedule})  -- its columns: e's, the innermost

-- name: lock_later_open
-- The open schedules after this one of its flag, in (scheduled_at, id) order: their row
-- locks are waited for (a tick holding them commits first).
SELECT l.id FROM {schedules} l JOIN {schedules} s
  ON l.flag_key = s.flag_key AND (l.scheduled_at, l.id) > (s.scheduled_at, s.id)
WHERE s.id = %(i)s AND l.status IN ('pending', 'failed') AND {scope_match(l)}
FOR UPDATE OF l

-- name: later_applied_exists
SELECT EXISTS (
    SELECT 1 FROM {schedules} l JOIN {schedules} s
      ON l.flag_key = s.flag_key AND (l.scheduled_at, l.id) > (s.scheduled_at, s.id)
    WHERE s.id = %(i)s AND l.status = 'applied' AND {scope_match(l)})

-- name: reset_for_retry
UPDATE {schedules}
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

-- name: approvals_of
-- The verdicts that count on these schedules (`counted_verdict`: not those a deleted row of
-- the same id left), oldest first (idx_approvals_schedule).
SELECT a.schedule_id, a.verdict, a.decided_by AS by, a.decided_at AS at,
       left(a.note, {MAX_TEXT}) AS note
FROM {approvals} a JOIN {schedules_all} s ON s.id = a.schedule_id
WHERE a.schedule_id = ANY(CAST(%(ids)s AS {schedule_id_type()}[])) AND {scope_match(s)}
  AND {counted_verdict(s)}
ORDER BY a.schedule_id, a.id

-- name: add_verdict
-- Who and when are the database's (the trigger flagsched_check_approval_v1 sets
-- session_user and now(), and refuses an approval by the schedule's creator).
INSERT INTO {approvals} (schedule_id, verdict, decided_by, note)
VALUES (%(i)s, %(verdict)s, session_user, %(note)s)
RETURNING decided_by, decided_at

-- name: approval_subject
-- What `approve` needs to know of a locked schedule: its creator, whether it needs
-- approval by itself, and an earlier approval and rejection that count (`counted_verdict`).
SELECT s.created_by, s.needs_approval, s.awaiting_approval_since IS NOT NULL AS awaiting,
       session_user AS me,
       (SELECT a.decided_by || ' at ' || CAST(a.decided_at AS text) FROM {approvals} a
        WHERE a.schedule_id = s.id AND a.verdict = 'approved' AND {counted_verdict(s)}
        ORDER BY a.id LIMIT 1)
           AS approved,
       (SELECT a.decided_by || ' at ' || CAST(a.decided_at AS text) FROM {approvals} a
        WHERE a.schedule_id = s.id AND a.verdict = 'rejected' AND {counted_verdict(s)}
        ORDER BY a.id LIMIT 1)
           AS rejected
FROM {schedules} s WHERE s.id = %(i)s

-- name: clear_awaiting
-- Approved: the next tick claims it (and applies it, its flag's turn permitting).
UPDATE {schedules} SET awaiting_approval_since = NULL, updated_at = now()
WHERE id = %(i)s

-- name: mark_rejected
UPDATE {schedules} SET status = 'cancelled', next_retry_at = NULL,
    awaiting_approval_since = NULL, updated_at = now()
WHERE id = %(i)s

-- name: mark_cancelled
UPDATE {schedules} SET status = 'cancelled', next_retry_at = NULL, updated_at = now()
WHERE id = %(i)s

-- name: prunable_change
-- A history row prune --history may delete: older than the cut-off, and not in the
-- conflict window (stored/check.sql) of any open schedule of its flag, under its key (an
-- index probe of idx_schedules_flag_open each): for a schedule that knows the snapshot its
-- INSERT saw, a change that snapshot did not see; otherwise one written after the window
-- start. Inside the EXISTS the unqualified columns of the rules are the schedule's.
c.changed_at < now() - make_interval(secs => %(seconds)s)
AND NOT EXISTS (
    SELECT 1 FROM {schedules} s
    WHERE s.flag_key = c.flag_key AND {scope_match(s)}
      AND s.status IN ('pending', 'failed') AND (s.status <> 'failed' OR {waiting_row})
      AND CASE WHEN s.created_snapshot IS NOT NULL AND c.xact IS NOT NULL
                    AND NOT coalesce(s.reviewed_at <= now(), false)
                    AND pg_snapshot_xmax(s.created_snapshot)
                        <= pg_snapshot_xmax(pg_current_snapshot())
               THEN c.xact IS DISTINCT FROM s.created_xact
                    AND NOT pg_visible_in_snapshot(c.xact, s.created_snapshot)
               ELSE c.written_at > greatest(
                   CASE WHEN s.created_at <= now() THEN s.created_at
                        ELSE '-infinity'::timestamptz END,
                   CASE WHEN s.reviewed_at <= now() THEN s.reviewed_at END) END)

-- name: prune_history_batch
WITH doomed AS (
    SELECT c.id FROM {changes} c
    WHERE {prunable_change} AND {scope_match(c)}
    ORDER BY c.changed_at LIMIT %(limit)s
)
DELETE FROM {changes} c USING doomed d WHERE c.id = d.id RETURNING 1

-- name: count_prunable_history
SELECT count(*) FROM {changes} c WHERE {prunable_change} AND {scope_match(c)}

-- name: prunable
(status = 'applied' AND applied_at < now() - make_interval(secs => %(seconds)s))
OR (status = 'cancelled' AND updated_at < now() - make_interval(secs => %(seconds)s))

-- name: count_prunable
-- (on an application's schedules table, its rows no trigger noted too: `prune` notes them)
SELECT status, count(*) FROM {schedules_all} WHERE ({prunable}) AND {scope_match()}
GROUP BY status

-- name: unseen_prunable
-- On an application's schedules table: old applied and cancelled rows no trigger noted (a
-- restore's history; the tick notes open rows only), up to %(limit)s, which `prune` notes
-- once it has deleted the noted ones (so the view's noted rows it reads here are only
-- those it keeps): the rows flagsched's view does not have (the operator reads no state
-- table).
SELECT CAST(id AS text) FROM {schedules_all}
WHERE ({prunable}) AND {scope_match()}
  AND NOT EXISTS (SELECT 1 FROM {schedules} n WHERE n.id = {schedules_all}.id)
LIMIT %(limit)s

-- name: prunable_batch
-- Rows a tick holds are skipped; rows an application's foreign key keeps are passed over.
SELECT id, status FROM {schedules}
WHERE ({prunable}) AND {scope_match()} AND id <> ALL (CAST(%(skip)s AS {schedule_id_type()}[]))
LIMIT %(limit)s FOR UPDATE SKIP LOCKED

-- name: delete_schedules
-- A schedule's verdicts (four eyes) go with it.
WITH verdicts AS (DELETE FROM {approvals}
                  WHERE schedule_id = ANY (CAST(%(ids)s AS {schedule_id_type()}[])))
DELETE FROM {schedules} WHERE id = ANY (CAST(%(ids)s AS {schedule_id_type()}[]))

-- ==================== authoring =========================================================

-- name: insert_ramp
WITH g AS (
    SELECT nextval({group_seq()}) AS id,
           coalesce(CAST(%(start)s AS timestamptz), now()) AS t0
)
INSERT INTO {schedules}
    (flag_key, scheduled_at, updates, group_id, expires_at, on_conflict, needs_approval
     {scope_columns()})
SELECT %(k)s, g.t0 + (u.n - 1) * CAST(%(every)s AS interval), CAST(u.updates AS jsonb),
       g.id, g.t0 + (u.n - 1) * CAST(%(every)s AS interval)
             + CAST(%(expires)s AS interval), %(c)s, %(approval)s{scope_values()}
FROM g, unnest(CAST(%(updates)s AS text[])) WITH ORDINALITY AS u(updates, n)
ORDER BY u.n
RETURNING group_id, id, scheduled_at

-- name: group_schedules
SELECT id FROM {schedules} WHERE group_id = %(g)s AND {scope_match()}
ORDER BY scheduled_at, id

-- name: insert_recurrence
INSERT INTO {recurrences}
    (flag_key, cron, timezone, updates, next_at, expires_after, on_conflict, needs_approval
     {scope_columns()})
VALUES (%(k)s, %(cron)s, %(tz)s, CAST(%(u)s AS jsonb), %(next)s,
        CAST(%(e)s AS interval), %(c)s, %(approval)s{scope_values()})
RETURNING id

-- name: lock_recurrence
-- Waits for a tick materialising it.
SELECT {recurrence_fields} FROM {recurrences} WHERE id = %(i)s AND {scope_match()}
FOR UPDATE

-- name: stop_recurrence
UPDATE {recurrences} SET cancelled_at = now() WHERE id = %(i)s

-- name: cancel_recurrence_schedules
UPDATE {schedules} SET status = 'cancelled', next_retry_at = NULL, updated_at = now()
WHERE recurrence_id = %(i)s AND status IN ('pending', 'failed')
RETURNING id

-- ==================== the application's side: used by make bench and make demo =========
-- Never sent by flagsched itself: test data, the checks the benchmark makes on what a run
-- left, and the application's own writers (its flag UPDATEs, its schedule INSERTs, a
-- trigger standing in for an outage). Named here so that bench/ and scripts/demo.py read
-- their SQL through the same loader as flagsched does; the figures' reference drain
-- (bench/reference.py) keeps its own statements on purpose: it is the yardstick, spelled
-- apart from what it measures. `{hostile_rows}`-style names are literals the caller gives.

-- name: bench_seed_flags
-- One backlog shape for every drain: schedule g belongs to flag g % flags and is that
-- flag's (g // flags)-th change, due in (scheduled_at, id) order. Every schedule sets both
-- fields and rollout_percentage grows with the ordinal, so the last applied schedule of a
-- flag is its final state and any out-of-order write shows as a rollout going down.
INSERT INTO feature_flags (key)
SELECT 'flag-' || lpad(g::text, 5, '0') FROM generate_series(0, %(flags)s - 1) AS g

-- name: bench_seed_schedules
INSERT INTO feature_flag_schedules
    (flag_key, scheduled_at, updates, status, applied_at)
SELECT 'flag-' || lpad((g %% %(flags)s)::text, 5, '0'),
       %(since)s::timestamptz + g * interval '1 millisecond',
       jsonb_build_object('enabled', (g / %(flags)s) %% 2 = 0,
                          'rollout_percentage', least(g / %(flags)s + 1, 100)),
       %(status)s,
       CASE WHEN %(status)s = 'applied' THEN %(since)s::timestamptz + g * interval '1 ms' END
FROM generate_series(0, %(count)s - 1) AS g

-- name: bench_seed_changes
-- Flag history by another actor, all in the past (year 2000 on).
INSERT INTO feature_flag_changes (flag_key, changed_at, actor, old_enabled,
    old_rollout_percentage, new_enabled, new_rollout_percentage)
SELECT 'flag-' || lpad((g %% %(flags)s)::text, 5, '0'), timestamptz '2000-01-01'
       + make_interval(secs => g), 'app_rw (seed)', false, 0, true, g %% 101
FROM generate_series(1, %(count)s) g

-- name: bench_seed_open
-- Open schedules in the future, one in ten a failed one waiting for its retry.
INSERT INTO feature_flag_schedules (flag_key, scheduled_at, updates, status, retry_count,
                                    next_retry_at)
SELECT 'flag-' || lpad((g %% 10000)::text, 5, '0'),
       now() + g * interval '1 second',
       '{"rollout_percentage": 50}',
       CASE WHEN g %% 10 = 0 THEN 'failed' ELSE 'pending' END,
       CASE WHEN g %% 10 = 0 THEN 1 ELSE 0 END,
       CASE WHEN g %% 10 = 0 THEN now() + interval '5 minutes' END
FROM generate_series(1, %(count)s) AS g

-- name: bench_seed_hostile
-- {hostile_rows} due schedules whose `updates` hold a string of {hostile_size} characters.
INSERT INTO feature_flags (key) VALUES ('hostile'), ('fine');
INSERT INTO feature_flag_schedules (flag_key, scheduled_at, updates)
SELECT 'hostile', now() - interval '1 minute' + g * interval '1 ms',
       jsonb_build_object('enabled', repeat(chr(97 + g % 26), {hostile_size}))
FROM generate_series(1, {hostile_rows}) g

-- name: bench_record_off
-- The drain with the record's triggers off: what feature_flag_changes costs (0006: update_*).
ALTER TABLE feature_flags DISABLE TRIGGER flagsched_record_insert;
ALTER TABLE feature_flags DISABLE TRIGGER flagsched_record_update_v2;
ALTER TABLE feature_flags DISABLE TRIGGER flagsched_record_update_moved;
ALTER TABLE feature_flags DISABLE TRIGGER flagsched_record_delete

-- name: bench_failing_trigger
-- Transient failures from the database side: every flag whose number ends in 0 (10 %)
-- refuses to be updated, as a trigger raising an error would.
CREATE FUNCTION bench_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'bench: injected transient failure for %', NEW.key;
END $$;
CREATE TRIGGER bench_refuse BEFORE UPDATE ON feature_flags
    FOR EACH ROW WHEN (right(NEW.key, 1) = '0') EXECUTE FUNCTION bench_refuse()

-- name: bench_audit_triggers
-- Proof of exactly-once from inside the database: every write of status 'applied' to a
-- schedule, and every write to a flag in commit order (a flag row stays locked until
-- commit).
CREATE TABLE bench_applications (schedule_id bigint NOT NULL);
CREATE TABLE bench_flag_writes (
    seq bigserial PRIMARY KEY, flag_key text NOT NULL, rollout integer NOT NULL);
CREATE FUNCTION bench_audit_schedules() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO bench_applications SELECT id FROM new_rows WHERE status = 'applied';
    RETURN NULL;
END $$;
CREATE FUNCTION bench_audit_flags() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO bench_flag_writes (flag_key, rollout)
        SELECT key, rollout_percentage FROM new_rows ORDER BY key;
    RETURN NULL;
END $$;
CREATE TRIGGER bench_audit_schedules AFTER UPDATE ON feature_flag_schedules
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT
    EXECUTE FUNCTION bench_audit_schedules();
CREATE TRIGGER bench_audit_flags AFTER UPDATE ON feature_flags
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION bench_audit_flags()

-- name: bench_statuses
SELECT status, count(*) FROM feature_flag_schedules GROUP BY status

-- name: bench_final_state_errors
-- Flags whose state is not the one their last applied schedule set.
SELECT count(*) FROM feature_flags f
JOIN (SELECT DISTINCT ON (flag_key) flag_key, updates
      FROM feature_flag_schedules WHERE status = 'applied'
      ORDER BY flag_key, scheduled_at DESC, id DESC) AS last
  ON last.flag_key = f.key
WHERE f.enabled IS DISTINCT FROM (last.updates->>'enabled')::boolean
   OR f.rollout_percentage
      IS DISTINCT FROM (last.updates->>'rollout_percentage')::integer

-- name: bench_injected_waiting
SELECT count(*) FROM feature_flag_schedules WHERE status = 'failed'
AND retry_count = 1 AND next_retry_at > now() AND last_error LIKE '%injected%'

-- name: bench_refusing_flags_enabled
SELECT count(*) FROM feature_flags WHERE right(key, 1) = '0' AND enabled

-- name: bench_applications
SELECT count(*), count(DISTINCT schedule_id) FROM bench_applications

-- name: bench_order_violations
SELECT count(*) FROM (
    SELECT rollout, lag(rollout) OVER (PARTITION BY flag_key ORDER BY seq) AS prev
    FROM bench_flag_writes) AS w
WHERE prev >= rollout

-- name: bench_smallest_updates
SELECT min(octet_length(CAST(updates AS text))) FROM feature_flag_schedules

-- name: bench_longest_error
SELECT max(length(last_error)) FROM feature_flag_schedules

-- name: bench_bare_begin
-- What a transaction's start cost when the settings travelled once per connection.
BEGIN

-- name: bench_no_statement_timeout
SET statement_timeout = 0

-- name: bench_attempts_flags
-- `python -m bench.attempts`: one flag per schedule.
INSERT INTO feature_flags (key) SELECT 'f' || n FROM generate_series(1, %(n)s) n

-- name: bench_attempts_schedules
-- Due schedules whose `attempts` arrays are near the 1 MB limit.
INSERT INTO feature_flag_schedules (flag_key, scheduled_at, updates, attempts)
SELECT 'f' || n, now() - interval '1 minute', '{"enabled": true}', a.v
FROM generate_series(1, %(n)s) n,
     (SELECT jsonb_agg(jsonb_build_object(
         'attempt', i, 'at', '2026-01-01T00:00:00Z', 'outcome', 'retry',
         'error', (SELECT string_agg(md5(random()::text || i || m), '')
                   FROM generate_series(1, 28) m)) ORDER BY i) AS v
      FROM generate_series(1, 1000) i) a

-- name: bench_attempts_size
SELECT avg(pg_column_size(attempts))::int FROM feature_flag_schedules

-- name: bench_old_claim
-- The claim as it was before migration 0006 (the "before" bench.attempts measures).
SELECT * FROM flagsched_claim_v1(%(n)s, true)

-- name: bench_old_record
-- The record as it was before 0006 (the applied branch: what every row of the batch
-- takes): a copy on purpose, the "before"; "after" is the statement `record` above.
UPDATE feature_flag_schedules AS s
SET status = 'applied', applied_at = %(now)s, next_retry_at = NULL, last_error = NULL,
    updated_at = %(now)s,
    attempts = CASE WHEN a.made = 0 THEN '[]'::jsonb ELSE s.attempts END
        || jsonb_build_array(jsonb_build_object(
        'attempt', a.made + 1, 'at', %(at)s::text, 'outcome', 'applied', 'error', NULL))
FROM unnest(CAST(%(ids)s AS bigint[]), CAST(%(made)s AS integer[])) AS a(id, made)
WHERE s.id = a.id

-- name: bench_upstream_flags
-- The first application's flags (tests/fixtures/upstream-schema.sql), each key in both of
-- its environments.
INSERT INTO public.feature_flags (flag_key, environment)
SELECT 'flag-' || lpad(g::text, 5, '0'), e
FROM generate_series(0, %(flags)s - 1) g, unnest(ARRAY['production', 'staging']) e

-- name: bench_own_schedules
-- bench_seed_schedules' backlog in flagsched's own schedules table beside the first
-- application's flags table (shape 2), of production's scope.
INSERT INTO flagsched.feature_flag_schedules
    (flag_key, scheduled_at, updates, status, environment)
SELECT 'flag-' || lpad((g %% %(flags)s)::text, 5, '0'),
       '2020-01-01T00:00:00Z'::timestamptz + g * interval '1 millisecond',
       jsonb_build_object('enabled', (g / %(flags)s) %% 2 = 0,
                          'rollout_percentage', least(g / %(flags)s + 1, 100)),
       'pending', 'production'
FROM generate_series(0, %(count)s - 1) AS g

-- name: bench_upstream_schedules
-- bench_seed_schedules' backlog as the first application's admin API writes it: into its
-- own schedules table, a flag by its uuid, camelCase members, production's flags.
INSERT INTO public.feature_flag_schedules (flag_id, scheduled_at, updates, status, created_by)
SELECT f.id, '2020-01-01T00:00:00Z'::timestamptz + g * interval '1 millisecond',
       jsonb_build_object('enabled', (g / %(flags)s) %% 2 = 0,
                          'rolloutPercentage', least(g / %(flags)s + 1, 100)),
       'pending', 'admin-api'
FROM generate_series(0, %(count)s - 1) AS g
JOIN public.feature_flags f
  ON f.flag_key = 'flag-' || lpad((g %% %(flags)s)::text, 5, '0')
 AND f.environment = 'production'

-- name: bench_upstream_open_indexes
-- What an application may add to its schedules table (flagsched never adds an index to an
-- application's table): the built-in tables' two partial indexes of open rows.
CREATE INDEX upstream_schedules_pending_due ON public.feature_flag_schedules (scheduled_at, id)
    WHERE status = 'pending';
CREATE INDEX upstream_schedules_flag_open
    ON public.feature_flag_schedules (flag_id, scheduled_at, id)
    WHERE status IN ('pending', 'failed')

-- name: bench_upstream_deep_backlog
-- A deep held-back backlog as the first application's admin API writes it: on each of
-- %(flags)s production flags, %(applied)s applied schedules, then one whose retry waits an
-- hour, then %(due)s due ones behind it (held back: the flag's order).
INSERT INTO public.feature_flag_schedules
    (flag_id, scheduled_at, updates, status, applied_at, retry_count, next_retry_at,
     last_error, created_by)
SELECT f.id, now() - interval '10 days' + g * interval '1 second', '{"enabled": true}',
       CASE WHEN g <= %(applied)s THEN 'applied'
            WHEN g = %(applied)s + 1 THEN 'failed' ELSE 'pending' END,
       CASE WHEN g <= %(applied)s THEN now() END,
       CASE WHEN g = %(applied)s + 1 THEN 1 ELSE 0 END,
       CASE WHEN g = %(applied)s + 1 THEN now() + interval '1 hour' END,
       CASE WHEN g = %(applied)s + 1 THEN 'refused' END, 'admin-api'
FROM public.feature_flags f, generate_series(1, %(applied)s + 1 + %(due)s) AS g
WHERE f.environment = 'production' AND f.flag_key <= 'flag-' || lpad((%(flags)s - 1)::text, 5, '0')

-- name: bench_upstream_runs
-- A deep due backlog on few flags, each flag's schedules in one run of time as an
-- application's ramp writes them: on each of %(flags)s production flags %(applied)s applied
-- schedules, then %(due)s due ones, the flags one after another.
INSERT INTO public.feature_flag_schedules
    (flag_id, scheduled_at, updates, status, applied_at, created_by)
SELECT f.id, now() - interval '10 days' + (f.n * (%(applied)s + %(due)s) + g) * interval '1 second',
       '{"enabled": true}', CASE WHEN g < %(applied)s THEN 'applied' ELSE 'pending' END,
       CASE WHEN g < %(applied)s THEN now() END, 'admin-api'
FROM (SELECT id, row_number() OVER (ORDER BY flag_key) AS n FROM public.feature_flags
      WHERE environment = 'production'
        AND flag_key <= 'flag-' || lpad((%(flags)s - 1)::text, 5, '0')) f,
     generate_series(0, %(applied)s + %(due)s - 1) AS g

-- name: bench_upstream_drop_claim_indexes
-- The first application's schedules table without the two indexes the claim's probes need
-- (stored/claim_guard.sql: then the claim maps each flag's first open schedule instead).
DROP INDEX public.idx_schedules_flag_id, public.idx_schedules_scheduled_at

-- name: bench_upstream_noting_off
-- A restore's way of writing the first application's schedules: flagsched's trigger on its
-- table off while the rows are inserted, so none of them is noted (on again after).
ALTER TABLE public.feature_flag_schedules DISABLE TRIGGER flagsched_note_schedule

-- name: bench_upstream_noting_on
ALTER TABLE public.feature_flag_schedules ENABLE TRIGGER flagsched_note_schedule

-- name: bench_own_statuses
SELECT status, count(*) FROM flagsched.feature_flag_schedules GROUP BY 1

-- name: bench_upstream_statuses
SELECT status, count(*) FROM public.feature_flag_schedules GROUP BY 1

-- name: bench_server_settings
-- The server's settings docs/benchmarks.md records with the figures.
SELECT name, setting || coalesce(unit, '') FROM pg_settings
WHERE name IN ('fsync', 'synchronous_commit', 'shared_buffers', 'jit', 'max_wal_size')

-- name: bench_server_version
SHOW server_version

-- name: bench_generic_plans
-- For the claim's EXPLAIN with the plan a prepared statement settles on.
SET LOCAL plan_cache_mode = force_generic_plan

-- name: app_flag_update
-- The application switching a flag (each statement on its own, in a loop).
UPDATE feature_flags SET rollout_percentage = (rollout_percentage + 1) %% 101
WHERE key = 'flag-' || lpad((%(n)s %% 1000)::text, 5, '0')

-- name: app_schedule_insert
INSERT INTO feature_flag_schedules (flag_key, scheduled_at, updates)
VALUES ('flag-00001', now() + interval '1 day', '{"enabled": true}')

-- name: demo_database
CREATE DATABASE demo

-- name: demo_seed
-- `make demo`: three flags and nine schedules, and an outage search-v2's updates run into.
INSERT INTO feature_flags (key, enabled, rollout_percentage) VALUES
    ('new-checkout', false, 0), ('dark-mode', false, 0), ('search-v2', false, 0);

-- A rollout ramp that is overdue: all four steps land in one tick, in order.
INSERT INTO feature_flag_schedules (flag_key, scheduled_at, updates) VALUES
    ('new-checkout', now() - interval '40 minutes', '{"enabled": true, "rollout_percentage": 10}'),
    ('new-checkout', now() - interval '30 minutes', '{"rollout_percentage": 25}'),
    ('new-checkout', now() - interval '20 minutes', '{"rollout_percentage": 50}'),
    ('new-checkout', now() - interval '10 minutes', '{"rollout_percentage": 100}'),
    ('dark-mode',    now() - interval '5 minutes',  '{"enabled": true}'),
    -- due tomorrow: left alone
    ('dark-mode',    now() + interval '1 day',      '{"enabled": false}'),
    -- a flag that was deleted: fails for good at once
    ('legacy-banner', now() - interval '1 minute',  '{"enabled": false}'),
    -- a typo an application made: fails for good, touches no flag
    ('dark-mode',    now() - interval '1 minute',   '{"rollout_percentage": "fifty"}'),
    -- search-v2's database trigger fails for now (an outage): retried with backoff
    ('search-v2',    now() - interval '2 minutes',  '{"enabled": true, "rollout_percentage": 5}');

-- Simulate a transient failure from the database side for search-v2.
CREATE TABLE demo_outage (key text PRIMARY KEY);
INSERT INTO demo_outage VALUES ('search-v2');
CREATE FUNCTION demo_outage() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM demo_outage WHERE key = NEW.key) THEN
        RAISE EXCEPTION 'search backend unavailable (simulated outage)';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER demo_outage BEFORE UPDATE ON feature_flags
    FOR EACH ROW EXECUTE FUNCTION demo_outage()

-- name: demo_seeded
SELECT id, flag_key, scheduled_at, updates FROM feature_flag_schedules ORDER BY id

-- name: demo_outage_ends
DELETE FROM demo_outage

-- name: demo_outage_again
INSERT INTO demo_outage VALUES ('search-v2')

-- name: demo_retries_due_now
-- Time moved forward: the retries waiting are due.
UPDATE feature_flag_schedules SET next_retry_at = now()
WHERE status = 'failed' AND next_retry_at IS NOT NULL

-- name: demo_add_maintenance_flag
INSERT INTO feature_flags (key) VALUES ('maintenance-mode')

-- name: demo_last_group
SELECT max(group_id) FROM feature_flag_schedules

-- name: demo_two_people
-- Four eyes: two people, one login each, both may operate and approve (docs/deploy.md).
CREATE ROLE alice LOGIN IN ROLE flagsched_operator, flagsched_approver;
CREATE ROLE bob LOGIN IN ROLE flagsched_operator, flagsched_approver

-- name: demo_add_payments_flag
INSERT INTO feature_flags (key) VALUES ('payments-v2')

-- name: demo_last_schedule
SELECT max(id) FROM feature_flag_schedules

-- name: demo_cron_was_down
-- Cron was down for three weeks.
UPDATE feature_flag_recurrences SET next_at = next_at - interval '21 days'

-- name: demo_switch_off_in_psql
UPDATE feature_flags SET enabled = false WHERE key = 'search-v2'

-- name: demo_late_change
-- A change that expired an hour ago.
INSERT INTO feature_flag_schedules (flag_key, scheduled_at, updates, expires_at)
VALUES ('dark-mode', now() - interval '2 hours', '{"rollout_percentage": 50}',
        now() - interval '1 hour')

-- name: demo_conflicted
SELECT id FROM feature_flag_schedules WHERE last_error LIKE 'conflict:%'

-- name: demo_app_database
CREATE DATABASE demo_app

-- name: demo_app_seed
-- The first application's flags in its two environments, and a schedule its admin API
-- wrote (a flag by its uuid, camelCase members), due a minute ago, in production.
INSERT INTO feature_flags (flag_key, environment, description)
VALUES ('new-checkout', 'production', 'the new checkout flow'),
       ('new-checkout', 'staging', 'the new checkout flow');
INSERT INTO feature_flag_schedules (flag_id, scheduled_at, updates, created_by)
SELECT id, now() - interval '1 minute', '{"enabled": true, "rolloutPercentage": 25}',
       'admin-api'
FROM feature_flags WHERE flag_key = 'new-checkout' AND environment = 'production'

-- name: demo_app_flags
SELECT flag_key, environment, enabled, rollout_percentage FROM feature_flags
ORDER BY flag_key, environment

-- name: demo_app_schedules
SELECT left(CAST(s.id AS text), 8) || '...' AS id, f.environment, s.status, s.updates,
       s.created_by, s.cancelled_by, s.applied_at IS NOT NULL AS applied
FROM feature_flag_schedules s JOIN feature_flags f ON f.id = s.flag_id
ORDER BY s.created_at, s.id

-- name: demo_flags
SELECT key, enabled, rollout_percentage, updated_at FROM feature_flags ORDER BY key

-- name: demo_schedules
SELECT id, flag_key, status, retry_count, applied_at, last_error
FROM feature_flag_schedules ORDER BY id
