-- The history of an application's flags table (issue 18; migrations 0004 and 0006's
-- record triggers, as a template): every INSERT, UPDATE and DELETE, set-based, into
-- flagsched's history table with the row's scope. An UPDATE pairs old and new rows on the
-- id for rows whose id it did not change (ids are unique at every moment); rows whose id
-- changed were recorded by the row-level record_moved function (their new ids, as text, are in
-- flagsched.moved_ids). flagsched's writes are named in flagsched.applying by key.
-- SECURITY DEFINER: roles that write flags need no grant on the history.
CREATE FUNCTION {fn.record_change}() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    applying jsonb := nullif(current_setting('flagsched.applying', true), '')::jsonb;
    writer text := {writer()};
    moved text[] := CAST(coalesce(nullif(
        current_setting('flagsched.moved_ids', true), ''), '{}') AS text[]);
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO {changes} (flag_key, actor, new_enabled, new_rollout_percentage,
            schedule_ids{scope_columns()})
        SELECT n.{flags.key}, writer, n.{flags.enabled}, {rollout(n)}, '{}'{scope_values(n)}
        FROM new_rows n;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO {changes} (flag_key, old_flag_key, actor, old_enabled,
            old_rollout_percentage, new_enabled, new_rollout_percentage,
            schedule_ids{scope_columns()})
        SELECT n.{flags.key}, CASE WHEN o.{flags.key} <> n.{flags.key} THEN o.{flags.key} END,
               CASE WHEN a.ids IS NULL OR o.{flags.key} <> n.{flags.key}
                    THEN writer ELSE 'flagsched' END,
               o.{flags.enabled}, {rollout(o)}, n.{flags.enabled}, {rollout(n)},
               CASE WHEN a.ids IS NULL OR o.{flags.key} <> n.{flags.key}
                    THEN '{}'::bigint[] ELSE a.ids END{scope_values(n)}
        FROM old_rows o JOIN new_rows n ON n.{flags.id} = o.{flags.id}
        LEFT JOIN (SELECT e.key, ARRAY(SELECT jsonb_array_elements_text(e.value)::bigint)
                   FROM jsonb_each(applying) e) AS a(key, ids) ON a.key = n.{flags.key}
        WHERE CAST(n.{flags.id} AS text) <> ALL (moved)
          AND (o.{flags.enabled}, {rollout(o)}, o.{flags.key})
              IS DISTINCT FROM (n.{flags.enabled}, {rollout(n)}, n.{flags.key});
        IF cardinality(moved) > 0 THEN
            PERFORM set_config('flagsched.moved_ids', '', true);
        END IF;
    ELSE
        INSERT INTO {changes} (flag_key, actor, old_enabled, old_rollout_percentage,
            schedule_ids{scope_columns()})
        SELECT o.{flags.key}, writer, o.{flags.enabled}, {rollout(o)}, '{}'{scope_values(o)}
        FROM old_rows o;
    END IF;
    RETURN NULL;
END
$$
