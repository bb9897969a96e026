-- flagsched beside an application's flags AND schedules tables (issue 18, shape 3), in
-- flagsched's schema, idempotent (`flagsched migrate` runs it under the migration lock):
-- - a domain naming the type of the application's schedule ids, so no statement and no
--   stored function depends on which type that is;
-- - `{state}`: what flagsched keeps of each schedule row the application's table cannot
--   hold (attempts, conflict policy, expiry, ramp group, recurrence, review time, the
--   creator and the inserting transaction's snapshot, approval state, and the built-in
--   columns the application's table lacks), keyed by the row's id;
-- - `{schedules}`: a view with exactly the built-in schedules table's columns over the
--   application's table, its flag (the flag's key and scope) and the state row; every
--   statement and stored function of flagsched reads, locks and writes schedules through
--   it (INSTEAD OF triggers below write the application's row and the state row);
-- - the trigger function that notes each row the application inserts (its creator, the
--   inserting transaction and snapshot): the one trigger flagsched puts on that table;
-- - flagsched's history, recurrences and verdicts tables, as stored/own_tables.sql has
--   them with schedule ids of the domain's type (own_tables.sql is frozen as shipped).
-- Never alters the application's tables but for that trigger (created by the caller).
CREATE SCHEMA IF NOT EXISTS {schema_name()};

DO $domain$ BEGIN
    CREATE DOMAIN {id_domain()} AS {id_base_type()};
EXCEPTION WHEN duplicate_object THEN NULL;
END $domain$;

CREATE SEQUENCE IF NOT EXISTS {schedules_schema()}.feature_flag_schedule_group_seq AS bigint;

CREATE TABLE IF NOT EXISTS {state} (
    id {id_domain()} PRIMARY KEY,
    on_conflict text NOT NULL DEFAULT 'fail',
    expires_at timestamptz NULL,
    group_id bigint NULL,
    reviewed_at timestamptz NULL,
    attempts jsonb NOT NULL DEFAULT '[]',
    recurrence_id bigint NULL,
    recurrence_at timestamptz NULL,  -- the occurrence it was materialised for
    created_xact xid8 NULL DEFAULT pg_current_xact_id(),
    created_snapshot pg_snapshot NULL DEFAULT pg_current_snapshot(),
    needs_approval boolean NOT NULL DEFAULT false,
    created_by text NULL,
    awaiting_approval_since timestamptz NULL,
    -- the built-in columns an application's table may lack: used only where it does
    retry_count integer NOT NULL DEFAULT 0,
    max_retries integer NOT NULL DEFAULT 3,
    next_retry_at timestamptz NULL,
    last_error text NULL,
    applied_at timestamptz NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT state_on_conflict_check CHECK (on_conflict IN ('fail', 'apply')),
    CONSTRAINT state_max_retries_check CHECK (max_retries >= 0 AND max_retries <= 10)
);
CREATE INDEX IF NOT EXISTS idx_state_group ON {state} (group_id) WHERE group_id IS NOT NULL;
CREATE UNIQUE INDEX IF NOT EXISTS idx_state_recurrence ON {state}
    (recurrence_id, recurrence_at) WHERE recurrence_id IS NOT NULL;

-- The members of an application's `updates` under the built-in names (enabled,
-- rollout_percentage), and back. A member that has a built-in name without being the
-- application's member of it is kept under a name no change has (so it stays unknown).
CREATE OR REPLACE FUNCTION {schedules_schema()}.flagsched_updates_in_v1(
    p_updates jsonb, p_enabled text, p_rollout text) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN jsonb_typeof(p_updates) IS DISTINCT FROM 'object' THEN p_updates
                ELSE coalesce((
                    SELECT jsonb_object_agg(
                        CASE WHEN e.key = p_enabled THEN 'enabled'
                             WHEN e.key = p_rollout THEN 'rollout_percentage'
                             WHEN e.key IN ('enabled', 'rollout_percentage')
                             THEN e.key || ' (not a member this application uses)'
                             ELSE e.key END, e.value)
                    FROM jsonb_each(p_updates) e), '{}'::jsonb) END
$$;

CREATE OR REPLACE FUNCTION {schedules_schema()}.flagsched_updates_out_v1(
    p_updates jsonb, p_enabled text, p_rollout text) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN jsonb_typeof(p_updates) IS DISTINCT FROM 'object' THEN p_updates
                ELSE coalesce((
                    SELECT jsonb_object_agg(
                        CASE e.key WHEN 'enabled' THEN p_enabled
                                   WHEN 'rollout_percentage' THEN p_rollout
                                   ELSE e.key END, e.value)
                    FROM jsonb_each(p_updates) e), '{}'::jsonb) END
$$;

-- A schedule's flag: its key and scope (as text). A function, inlined by the planner (a
-- join on the flags' indexes), so that a lock taken through the view (the claim's FOR NO
-- KEY UPDATE, an operator's FOR UPDATE) locks the schedule's row and its state row, never
-- the flag's: the application's writers of its flags are not held up by flagsched's.
CREATE OR REPLACE FUNCTION {schedules_schema()}.flagsched_flag_of_v1(p_ref {flag_ref_type()})
RETURNS TABLE (key text{flag_of_scope_columns()})
LANGUAGE sql STABLE AS $$
    SELECT CAST(f.{flags.key} AS text){flag_of_scope_values()}
    FROM {flags} f WHERE {flag_of_match()}
$$;

CREATE OR REPLACE VIEW {schedules} AS
SELECT CAST(s.{app_schedules.id} AS {id_domain()}) AS id,
       f.key AS flag_key,
       CAST(s.scheduled_at AS timestamptz) AS scheduled_at,
       {schedules_schema()}.flagsched_updates_in_v1(
           s.{app_schedules.updates}, {member_enabled()}, {member_rollout()}) AS updates,
       CAST(s.status AS text) AS status,
       {view_column(retry_count)} AS retry_count,
       {view_column(max_retries)} AS max_retries,
       {view_column(next_retry_at)} AS next_retry_at,
       {view_column(last_error)} AS last_error,
       {view_column(applied_at)} AS applied_at,
       {view_column(created_at)} AS created_at,
       {view_column(updated_at)} AS updated_at,
       x.on_conflict, x.expires_at, x.group_id, x.reviewed_at, x.attempts, x.recurrence_id,
       x.created_xact, x.created_snapshot, x.needs_approval, x.created_by,
       x.awaiting_approval_since{view_scope_columns()}
FROM {app_schedules} s
JOIN {state} x ON x.id = s.{app_schedules.id}
CROSS JOIN LATERAL {schedules_schema()}.flagsched_flag_of_v1(s.{flag_ref()}) f;

-- The mapping it was rendered from (stored.py `mapping_digest`): `flagsched migrate` with
-- another refuses, rather than rewrite the view another deployment reads.
COMMENT ON VIEW {schedules} IS {mapping_comment()};

-- What an INSERT that names none of them gets, as the built-in table's defaults.
ALTER VIEW {schedules} ALTER COLUMN status SET DEFAULT 'pending';
ALTER VIEW {schedules} ALTER COLUMN retry_count SET DEFAULT 0;
ALTER VIEW {schedules} ALTER COLUMN max_retries SET DEFAULT 3;
ALTER VIEW {schedules} ALTER COLUMN on_conflict SET DEFAULT 'fail';
ALTER VIEW {schedules} ALTER COLUMN attempts SET DEFAULT '[]';
ALTER VIEW {schedules} ALTER COLUMN needs_approval SET DEFAULT false;
ALTER VIEW {schedules} ALTER COLUMN created_at SET DEFAULT now();
ALTER VIEW {schedules} ALTER COLUMN updated_at SET DEFAULT now();

-- Writes through the view. INSERT: the flag is found by key within the row's scope; the
-- application's row is inserted with its own names (`updates` with its members, its
-- `created_by` as the login), the trigger below notes it, and the rest goes to the state
-- row. An occurrence of a recurrence materialised already makes no row (the built-in
-- table's unique index; the caller holds the recurrence's row lock). UPDATE: each column of
-- the application's row is written only when the statement changed it (a value flagsched
-- did not change stays exactly as the application wrote it); its `error` follows
-- `last_error`, and `cancelled_by`/`cancelled_at` are set when the row becomes cancelled.
-- DELETE: both rows.
-- SECURITY DEFINER: the view is the gate (a role's grants on its columns, as on flagsched's
-- own schedules table); flagsched's roles need no privilege on the application's table.
CREATE OR REPLACE FUNCTION {schedules_schema()}.flagsched_schedules_write_v1()
RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    made {id_domain()};
    flag {flags}.{flags.id}%TYPE;
    creator text;
    approval boolean;
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF NEW.recurrence_id IS NOT NULL AND EXISTS (
            SELECT 1 FROM {state} x
            WHERE x.recurrence_id = NEW.recurrence_id AND x.recurrence_at = NEW.scheduled_at)
        THEN
            RETURN NULL;
        END IF;
        SELECT f.{flags.id} INTO flag FROM {flags} f
        WHERE f.{flags.key} = NEW.flag_key AND {new_in_scope()};
        IF NOT FOUND AND NEW.recurrence_id IS NOT NULL THEN
            -- an occurrence of a recurrence whose flag is gone makes no schedule (it could
            -- not refer to the flag); the recurrence goes on to its next occurrence
            RETURN NULL;
        ELSIF NOT FOUND THEN
            RAISE EXCEPTION 'flag % is not among this deployment''s flags', NEW.flag_key
                USING ERRCODE = 'foreign_key_violation';
        END IF;
        IF NEW.id IS NULL THEN
            INSERT INTO {app_schedules} ({insert_columns()})
            VALUES ({insert_values()})
            RETURNING {app_schedules.id} INTO made;
        ELSE
            INSERT INTO {app_schedules} ({app_schedules.id}, {insert_columns()})
            VALUES (NEW.id, {insert_values()})
            RETURNING {app_schedules.id} INTO made;
        END IF;
        -- four eyes, as the built-in tables' creator trigger: an occurrence of a recurrence
        -- (of this scope) was created by the recurrence's creator, and needs approval when
        -- the recurrence does; the creator is otherwise the login (noted by the trigger on
        -- the application's table), and nothing awaits approval yet
        IF NEW.recurrence_id IS NOT NULL THEN
            SELECT r.created_by, r.needs_approval INTO creator, approval
            FROM {recurrences} r WHERE r.id = NEW.recurrence_id AND {recurrence_in_scope()};
        END IF;
        UPDATE {state} x
        SET created_by = coalesce(creator, x.created_by),
            needs_approval = coalesce(NEW.needs_approval, false) OR coalesce(approval, false),
            awaiting_approval_since = NULL,
            on_conflict = coalesce(NEW.on_conflict, 'fail'), expires_at = NEW.expires_at,
            group_id = NEW.group_id, reviewed_at = NEW.reviewed_at,
            attempts = coalesce(NEW.attempts, '[]'), recurrence_id = NEW.recurrence_id,
            recurrence_at = CASE WHEN NEW.recurrence_id IS NOT NULL THEN NEW.scheduled_at END,
            retry_count = coalesce(NEW.retry_count, 0),
            max_retries = coalesce(NEW.max_retries, 3), next_retry_at = NEW.next_retry_at,
            last_error = NEW.last_error, applied_at = NEW.applied_at,
            created_at = coalesce(NEW.created_at, now()),
            updated_at = coalesce(NEW.updated_at, now())
        WHERE x.id = made;
        NEW.id := made;
        RETURN NEW;
    ELSIF TG_OP = 'UPDATE' THEN
        IF (NEW.status, NEW.scheduled_at, NEW.updates, NEW.retry_count, NEW.max_retries,
            NEW.next_retry_at, NEW.last_error, NEW.applied_at, NEW.created_at,
            NEW.updated_at)
           IS DISTINCT FROM
           (OLD.status, OLD.scheduled_at, OLD.updates, OLD.retry_count, OLD.max_retries,
            OLD.next_retry_at, OLD.last_error, OLD.applied_at, OLD.created_at,
            OLD.updated_at)
        THEN
            UPDATE {app_schedules} s
            SET status = CASE WHEN NEW.status IS DISTINCT FROM OLD.status
                              THEN NEW.status ELSE s.status END,
                scheduled_at = CASE WHEN NEW.scheduled_at IS DISTINCT FROM OLD.scheduled_at
                                    THEN NEW.scheduled_at ELSE s.scheduled_at END,
                {app_schedules.updates} = CASE WHEN NEW.updates IS DISTINCT FROM OLD.updates
                    THEN {schedules_schema()}.flagsched_updates_out_v1(
                        NEW.updates, {member_enabled()}, {member_rollout()})
                    ELSE s.{app_schedules.updates} END{app_set()}
            WHERE s.{app_schedules.id} = OLD.id;
        END IF;
        UPDATE {state} x
        SET on_conflict = NEW.on_conflict, expires_at = NEW.expires_at,
            group_id = NEW.group_id, reviewed_at = NEW.reviewed_at, attempts = NEW.attempts,
            recurrence_id = NEW.recurrence_id, needs_approval = NEW.needs_approval,
            created_by = NEW.created_by,
            awaiting_approval_since = NEW.awaiting_approval_since,
            retry_count = NEW.retry_count, max_retries = NEW.max_retries,
            next_retry_at = NEW.next_retry_at, last_error = NEW.last_error,
            applied_at = NEW.applied_at, created_at = NEW.created_at,
            updated_at = NEW.updated_at
        WHERE x.id = OLD.id;
        RETURN NEW;
    ELSE
        DELETE FROM {app_schedules} s WHERE s.{app_schedules.id} = OLD.id;
        DELETE FROM {state} x WHERE x.id = OLD.id;
        RETURN OLD;
    END IF;
END
$$;

DROP TRIGGER IF EXISTS flagsched_schedules_write ON {schedules};
CREATE TRIGGER flagsched_schedules_write INSTEAD OF INSERT OR UPDATE OR DELETE
    ON {schedules} FOR EACH ROW EXECUTE FUNCTION
    {schedules_schema()}.flagsched_schedules_write_v1();

-- The record of a tick's batch (queries.sql `record_app`; the trigger above writes one row
-- at a time): each schedule's outcome into the application's row (the built-in columns it
-- has, its `error`) and the state row, set-based, and the batch's notice (delivered at
-- commit). SECURITY DEFINER, as the trigger above: what it writes is what the tick's
-- grants on the view's columns allow it to write there. Returns the rows the application's
-- table refused (their outcome is kept in the state row only).
CREATE OR REPLACE FUNCTION {fn.record_app}(
    p_ids {id_domain()}[], p_status text[], p_applied_at timestamptz[],
    p_retry_count integer[], p_max_retries integer[], p_next_retry_at timestamptz[],
    p_last_error text[], p_updated_at timestamptz[], p_attempts jsonb[], p_notice text)
RETURNS TABLE (refused {id_domain()}, message text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    i integer;
BEGIN
    BEGIN
        UPDATE {app_schedules} s
        SET status = v.status{record_app_set()}
        FROM unnest(p_ids, p_status, p_applied_at, p_retry_count, p_max_retries,
                    p_next_retry_at, p_last_error, p_updated_at)
             AS v(id, status, applied_at, retry_count, max_retries, next_retry_at, last_error,
                  updated_at)
        WHERE s.{app_schedules.id} = v.id;
    EXCEPTION
        WHEN query_canceled THEN
            RAISE;  -- a statement timeout or a cancel ends the statement
        WHEN OTHERS THEN
            -- the application's table refused a row (its CHECK, its trigger, a length):
            -- each row on its own, so one row never stops the others' outcomes; a row
            -- refused stays as the application's table has it (returned, for the log)
            FOR i IN 1 .. coalesce(cardinality(p_ids), 0) LOOP
                BEGIN
                    UPDATE {app_schedules} s
                    SET status = v.status{record_app_set()}
                    FROM (SELECT p_ids[i], p_status[i], p_applied_at[i], p_retry_count[i],
                                 p_max_retries[i], p_next_retry_at[i], p_last_error[i],
                                 p_updated_at[i])
                         AS v(id, status, applied_at, retry_count, max_retries, next_retry_at,
                              last_error, updated_at)
                    WHERE s.{app_schedules.id} = v.id;
                EXCEPTION
                    WHEN query_canceled THEN
                        RAISE;
                    WHEN OTHERS THEN
                        refused := p_ids[i];
                        message := SQLERRM || ' (SQLSTATE ' || SQLSTATE || ')';
                        RETURN NEXT;
                END;
            END LOOP;
    END;
    UPDATE {state} x
    SET attempts = v.attempts, retry_count = v.retry_count, max_retries = v.max_retries,
        next_retry_at = v.next_retry_at, last_error = v.last_error,
        applied_at = v.applied_at, updated_at = v.updated_at
    FROM unnest(p_ids, p_attempts, p_retry_count, p_max_retries, p_next_retry_at,
                p_last_error, p_applied_at, p_updated_at)
         AS v(id, attempts, retry_count, max_retries, next_retry_at, last_error, applied_at,
              updated_at)
    WHERE x.id = v.id;
    IF p_notice IS NOT NULL THEN
        PERFORM pg_notify({NOTIFY_CHANNEL}, p_notice);
    END IF;
END
$$;

-- Each row the application's table gets, however it got it: a state row with its creator
-- (the login, `session_user`) and the inserting transaction and snapshot (the conflict
-- window of stored/check.sql), as the built-in table's defaults and its creator trigger
-- note them. A state row left by a deleted row of the same id starts again. SECURITY
-- DEFINER: the application's logins need no grant on flagsched's schema to insert.
CREATE OR REPLACE FUNCTION {schedules_schema()}.flagsched_schedule_noted_v1()
RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO {state} AS x (id, created_by)
    SELECT n.{app_schedules.id}, session_user FROM new_rows n
    ON CONFLICT (id) DO UPDATE
    SET on_conflict = 'fail', expires_at = NULL, group_id = NULL, reviewed_at = NULL,
        attempts = '[]', recurrence_id = NULL, recurrence_at = NULL,
        created_xact = pg_current_xact_id(), created_snapshot = pg_current_snapshot(),
        needs_approval = false, created_by = EXCLUDED.created_by,
        awaiting_approval_since = NULL, retry_count = 0, max_retries = 3,
        next_retry_at = NULL, last_error = NULL, applied_at = NULL, created_at = now(),
        updated_at = now();
    RETURN NULL;
END
$$;

CREATE TABLE IF NOT EXISTS {changes} (
    id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    flag_key text NOT NULL,
    changed_at timestamptz NOT NULL DEFAULT now(),
    actor text NOT NULL,
    old_enabled boolean NULL,
    old_rollout_percentage integer NULL,
    new_enabled boolean NULL,
    new_rollout_percentage integer NULL,
    schedule_ids {id_domain()}[] NOT NULL DEFAULT '{}',
    written_at timestamptz NOT NULL DEFAULT statement_timestamp(),
    xact xid8 NULL DEFAULT pg_current_xact_id(),
    old_flag_key text NULL{scope_column_definitions()}
);
CREATE INDEX IF NOT EXISTS idx_changes_flag ON {changes} (flag_key, changed_at, id);
CREATE INDEX IF NOT EXISTS idx_changes_changed_at ON {changes} USING brin (changed_at);
CREATE INDEX IF NOT EXISTS idx_changes_foreign ON {changes} (flag_key, written_at)
    WHERE schedule_ids = '{}';

CREATE TABLE IF NOT EXISTS {recurrences} (
    id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    flag_key text NOT NULL,
    cron text NOT NULL,
    timezone text NOT NULL,
    updates jsonb NOT NULL,
    next_at timestamptz NULL,
    expires_after interval NULL,
    on_conflict text NOT NULL DEFAULT 'fail',
    cancelled_at timestamptz NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    needs_approval boolean NOT NULL DEFAULT false,
    created_by text NULL{scope_column_definitions()},
    CONSTRAINT recurrence_on_conflict_check CHECK (on_conflict IN ('fail', 'apply'))
);
CREATE INDEX IF NOT EXISTS idx_recurrences_due ON {recurrences} (next_at)
    WHERE cancelled_at IS NULL;

CREATE TABLE IF NOT EXISTS {approvals} (
    id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    schedule_id {id_domain()} NOT NULL,
    verdict text NOT NULL CONSTRAINT verdict_check CHECK (verdict IN ('approved', 'rejected')),
    decided_by text NOT NULL,
    decided_at timestamptz NOT NULL DEFAULT now(),
    note text NULL
);
CREATE INDEX IF NOT EXISTS idx_approvals_schedule ON {approvals} (schedule_id, id);
