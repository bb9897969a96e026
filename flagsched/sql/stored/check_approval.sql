-- Four eyes on an application's flags table (issue 20 on issue 18's second shape; migration
-- 0008's flagsched_check_approval_v1, as a template): a verdict in flagsched's own approvals
-- table is the login's own (session_user), at this moment (clock_timestamp: after the
-- schedule's INSERT committed, which the claim relies on); it is given on a schedule of
-- flagsched's own schedules table that exists (an approval written ahead for an id not yet
-- taken would approve whatever row gets that id); nobody approves a schedule they created,
-- however the row is inserted. Every scope's schedules share one identity, so an id names
-- one schedule whatever its scope (a verdict has no scope of its own; the commands refuse
-- an id of another scope as unknown). Rendered for adopted mappings only, by `flagsched
-- migrate`, behind the trigger flagsched_check_approval_<hex>. Frozen once shipped
-- (tests/migration/shipped.sha256): a change is a new file and new object names.
CREATE FUNCTION {fn.check_approval}() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    NEW.decided_by := session_user;
    NEW.decided_at := clock_timestamp();
    IF NOT EXISTS (SELECT 1 FROM {schedules} s WHERE s.id = NEW.schedule_id) THEN
        RAISE EXCEPTION 'four eyes: there is no schedule %', NEW.schedule_id
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    IF NEW.verdict = 'approved' AND EXISTS (
        SELECT 1 FROM {schedules} s
        WHERE s.id = NEW.schedule_id AND s.created_by = session_user) THEN
        RAISE EXCEPTION 'four eyes: % created schedule %, so % cannot approve it',
            session_user, NEW.schedule_id, session_user
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END
$$
