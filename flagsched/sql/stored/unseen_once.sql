-- `flagsched_note_unseen_v2` (after stored/unseen_schedules.sql, idempotent: `flagsched
-- migrate`): notes the rows of an application's schedules table that no trigger noted, as
-- that file's `flagsched_note_unseen_v1` does (which the previous release calls), in two
-- statements: first a read of the open rows that have no state row, then one insert of
-- theirs. v1's single INSERT ... SELECT read the state table it was writing: planned for a
-- state table that was empty (a restore's first tick), its anti join scanned the rows the
-- same statement had inserted so far once for each row it inserted, so 60,000 rows a
-- restore left took 30 s (the statement timeout: every tick exit 3, nothing noted). The
-- read sees the state table as it was; the insert reads nothing of it.
CREATE OR REPLACE FUNCTION {fn.note_unseen_once}(p_ids text[])
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    unseen {id_base_type()}[];
    given text;
BEGIN
    SELECT array_agg(s.{app_schedules.id}) INTO unseen FROM {app_schedules} s
    WHERE s.status IN ('pending', 'failed')
      AND NOT EXISTS (SELECT 1 FROM {state} x WHERE x.id = s.{app_schedules.id});
    IF unseen IS NOT NULL THEN
        INSERT INTO {state} (id, created_xact, created_snapshot)
        SELECT u, NULL, NULL FROM unnest(unseen) AS u
        ON CONFLICT (id) DO NOTHING;
    END IF;
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
$$
