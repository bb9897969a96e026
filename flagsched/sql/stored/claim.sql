-- The claim (migration 0006's flagsched_claim_v2, as a template, with the scope): only
-- schedules that can move, FOR NO KEY UPDATE SKIP LOCKED (a row referencing a schedule by
-- foreign key never hides it). Retries that lead their flag first, then pending schedules
-- that lead their flag, then due schedules behind due ones of their flag in one
-- (scheduled_at, id) order and one limit; a row whose earlier one is outside the claim is
-- `blocked`. p_scope: this deployment's scope values ({} for every row), a parameter so
-- that deployments of different scopes share the function. jit off: the planner's estimate
-- crosses jit_above_cost, and compiling cost ~60 ms of a ~2 ms claim.
-- Approvals (issue 20, migration 0008's columns; every line marked `-- approval (0008)` in
-- fragments.sql): an open schedule awaiting approval is never due (never takes a place in
-- a batch, and holds its flag's later schedules back) until it is past its lateness
-- (`awaiting_stuck`: its expires_at, else p_max_lateness, as the check decides `expired`);
-- then it is claimed like any due row so the tick fails it for good as `expired:`. Each
-- row also says `awaiting`, `needs_approval` and `approved` (an approved verdict exists).
CREATE FUNCTION {fn.claim}(p_limit integer, p_lock boolean, p_scope jsonb,
                           p_max_lateness interval)
RETURNS TABLE (now timestamptz, id bigint, flag_key text, scheduled_at timestamptz,
               updates jsonb, status text, retry_count integer, max_retries integer,
               next_retry_at timestamptz, blocked boolean, defect text,
               attempts_made integer, awaiting boolean, needs_approval boolean,
               approved boolean)
LANGUAGE plpgsql SECURITY INVOKER SET jit = off AS $$
#variable_conflict use_column
BEGIN
    IF p_lock THEN
        RETURN QUERY {claim_query(FOR NO KEY UPDATE OF s SKIP LOCKED)};
    ELSE
        RETURN QUERY {claim_query()};
    END IF;
END
$$
