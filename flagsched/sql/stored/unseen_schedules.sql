-- Rows of an application's schedules table that flagsched's trigger did not note (shape 3:
-- inserted while triggers were disabled, by a restore or `session_replication_role =
-- replica`), after stored/own_schedules.sql, idempotent (`flagsched migrate`):
-- - `{schedules_all}`: flagsched's view `{schedules}` and, beside its rows, the application's
--   rows that have no state row yet, with what noting them would give them (the defaults of
--   the state table: no creator, no snapshot). The operators' reads (`list`, `show`,
--   `status`, `list-failed`, `plan`, `agenda`) read it, so such a row is shown and counted
--   before anything has noted it, also where nothing can be written (a read-only
--   transaction, a standby);
-- - `flagsched_note_unseen_v1`: notes them (a state row each, as the tick's first step did
--   in a statement of its own): the open ones, and those among `p_ids` (ids as an operator
--   gave them). The tick calls it
--   before its claim, and the commands that change schedules (`cancel`, `retry`,
--   `approve`, `reject`) before they lock theirs. SECURITY DEFINER, as the trigger that
--   notes a row inserted: no role of flagsched needs a grant on the application's table or
--   INSERT on the state table for it.
CREATE OR REPLACE VIEW {schedules_all} AS
SELECT * FROM {schedules}
UNION ALL
SELECT CAST(s.{app_schedules.id} AS {id_domain()}) AS id,
       f.key AS flag_key,
       CAST(s.scheduled_at AS timestamptz) AS scheduled_at,
       {schedules_schema()}.flagsched_updates_in_v1(
           s.{app_schedules.updates}, {member_enabled()}, {member_rollout()}) AS updates,
       CAST(s.status AS text) AS status,
       {unseen_column(retry_count)} AS retry_count,
       {unseen_column(max_retries)} AS max_retries,
       {unseen_column(next_retry_at)} AS next_retry_at,
       {unseen_column(last_error)} AS last_error,
       {unseen_column(applied_at)} AS applied_at,
       {unseen_column(created_at)} AS created_at,
       {unseen_column(updated_at)} AS updated_at,
       CAST('fail' AS text) AS on_conflict, CAST(NULL AS timestamptz) AS expires_at,
       CAST(NULL AS bigint) AS group_id, CAST(NULL AS timestamptz) AS reviewed_at,
       CAST('[]' AS jsonb) AS attempts, CAST(NULL AS bigint) AS recurrence_id,
       CAST(NULL AS xid8) AS created_xact, CAST(NULL AS pg_snapshot) AS created_snapshot,
       false AS needs_approval, CAST(NULL AS text) AS created_by,
       CAST(NULL AS timestamptz) AS awaiting_approval_since{view_scope_columns()}
FROM {app_schedules} s
CROSS JOIN LATERAL {schedules_schema()}.flagsched_flag_of_v1(s.{flag_ref()}) f
WHERE NOT EXISTS (SELECT 1 FROM {state} x WHERE x.id = s.{app_schedules.id});

CREATE OR REPLACE FUNCTION {fn.note_unseen}(p_ids text[])
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    given text;
BEGIN
    INSERT INTO {state} (id, created_xact, created_snapshot)
    SELECT s.{app_schedules.id}, NULL, NULL FROM {app_schedules} s
    WHERE s.status IN ('pending', 'failed')
      AND NOT EXISTS (SELECT 1 FROM {state} x WHERE x.id = s.{app_schedules.id})
    ON CONFLICT (id) DO NOTHING;
    -- ids as an operator gave them: one that cannot be an id of the table is none's
    FOREACH given IN ARRAY coalesce(p_ids, '{}') LOOP
        BEGIN
            INSERT INTO {state} (id, created_xact, created_snapshot)
            SELECT s.{app_schedules.id}, NULL, NULL FROM {app_schedules} s
            WHERE s.{app_schedules.id} = CAST(given AS {id_base_type()})
              AND NOT EXISTS (SELECT 1 FROM {state} x WHERE x.id = s.{app_schedules.id})
            ON CONFLICT (id) DO NOTHING;
        EXCEPTION WHEN invalid_text_representation OR numeric_value_out_of_range
                       OR string_data_right_truncation THEN
            NULL;
        END;
    END LOOP;
END
$$;
