-- The claim (migration 0006's flagsched_claim_v2, as a template, with the scope): only
-- schedules that can move, FOR NO KEY UPDATE SKIP LOCKED (a row referencing a schedule by
-- foreign key never hides it). Retries that lead their flag first, then pending schedules
-- that lead their flag, then due schedules behind due ones of their flag in one
-- (scheduled_at, id) order and one limit; a row whose earlier one is outside the claim is
-- `blocked`. p_scope: this deployment's scope values ({} for every row), a parameter so
-- that deployments of different scopes share the function. jit off: the planner's estimate
-- crosses jit_above_cost, and compiling cost ~60 ms of a ~2 ms claim.
CREATE FUNCTION {fn.claim}(p_limit integer, p_lock boolean, p_scope jsonb)
RETURNS TABLE (now timestamptz, id bigint, flag_key text, scheduled_at timestamptz,
               updates jsonb, status text, retry_count integer, max_retries integer,
               next_retry_at timestamptz, blocked boolean, defect text,
               attempts_made integer)
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
