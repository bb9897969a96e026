-- A row whose id an UPDATE changes: OLD and NEW paired here, by PostgreSQL (the
-- statement-level record trigger leaves it out). Rare: row-level.
CREATE FUNCTION {fn.record_moved}() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    PERFORM set_config('flagsched.moved_ids', CAST(
        CAST(coalesce(nullif(current_setting('flagsched.moved_ids', true), ''), '{}')
             AS text[]) || CAST(NEW.{flags.id} AS text) AS text), true);
    IF (OLD.{flags.enabled}, {rollout(OLD)}, OLD.{flags.key})
       IS DISTINCT FROM (NEW.{flags.enabled}, {rollout(NEW)}, NEW.{flags.key}) THEN
        INSERT INTO {changes} (flag_key, old_flag_key, actor, old_enabled,
            old_rollout_percentage, new_enabled, new_rollout_percentage{scope_columns()})
        VALUES (NEW.{flags.key}, CASE WHEN OLD.{flags.key} <> NEW.{flags.key} THEN OLD.{flags.key} END,
                {writer()}, OLD.{flags.enabled}, {rollout(OLD)}, NEW.{flags.enabled},
                {rollout(NEW)}{scope_values(NEW)});
    END IF;
    RETURN NULL;
END
$$
