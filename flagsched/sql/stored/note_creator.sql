-- Four eyes on an application's flags table (issue 20 on issue 18's second shape; migration
-- 0008's flagsched_note_creator_v1, as a template): the login that inserted a schedule into
-- flagsched's own schedules table (session_user: a SET ROLE does not change who is at the
-- keyboard), whatever the INSERT said; a schedule a tick made from a recurrence of its scope
-- is the recurrence creator's, and needs approval when it does (the owner's rights: the
-- inserting role need not read recurrences). Rendered for adopted mappings only, by
-- `flagsched migrate`, behind the trigger flagsched_note_creator_<hex>. Frozen once shipped
-- (tests/migration/shipped.sha256): a change is a new file and new object names.
CREATE FUNCTION {fn.note_creator}() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    creator text;
    approval boolean;
BEGIN
    NEW.created_by := session_user;
    IF NEW.recurrence_id IS NOT NULL THEN
        SELECT r.created_by, r.needs_approval INTO creator, approval
        FROM {recurrences} r WHERE r.id = NEW.recurrence_id AND {same_scope(r, NEW)};
        IF FOUND THEN
            NEW.created_by := coalesce(creator, NEW.created_by);
            NEW.needs_approval := NEW.needs_approval OR approval;
        END IF;
    END IF;
    NEW.awaiting_approval_since := NULL;
    RETURN NEW;
END
$$
