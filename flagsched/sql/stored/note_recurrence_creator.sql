-- Four eyes on an application's flags table (issue 20 on issue 18's second shape; migration
-- 0008's flagsched_note_recurrence_creator_v1, as a template): the login that inserted a
-- recurrence into flagsched's own recurrences table, whatever the INSERT said. Rendered for
-- adopted mappings only, by `flagsched migrate`, behind the trigger
-- flagsched_note_creator_<hex>. Frozen once shipped (tests/migration/shipped.sha256): a
-- change is a new file and new object names.
CREATE FUNCTION {fn.note_recurrence_creator}() RETURNS trigger
LANGUAGE plpgsql SECURITY INVOKER AS $$
BEGIN
    NEW.created_by := session_user;
    RETURN NEW;
END
$$
