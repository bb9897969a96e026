-- TRUNCATE has no transition table: every flag's deletion is recorded just before it.
CREATE FUNCTION {fn.record_truncate}() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    INSERT INTO {changes} (flag_key, actor, old_enabled, old_rollout_percentage,
        schedule_ids{scope_columns()})
    SELECT f.{flags.key}, {writer()}, f.{flags.enabled}, {rollout(f)}, '{}'{scope_values(f)}
    FROM {flags} f;
    RETURN NULL;
END
$$
