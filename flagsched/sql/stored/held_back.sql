-- Due schedules behind an earlier open schedule of their flag that is not due (migration
-- 0006's flagsched_held_back_v1, as a template, with the scope): never claimed, reported.
-- Found from what holds them back (retries waiting for a time still to come, and approval
-- (0008): schedules awaiting approval, never the awaiting one itself). Locks nothing.
CREATE FUNCTION {fn.held_back}(p_limit integer, p_scope jsonb, p_max_lateness interval)
RETURNS TABLE (id bigint, flag_key text, scheduled_at timestamptz, status text,
               retry_count integer, max_retries integer)
LANGUAGE plpgsql STABLE SECURITY INVOKER SET jit = off AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    SELECT s.id, s.flag_key, {clamped(s.scheduled_at)}, s.status, s.retry_count,
           s.max_retries
    FROM {schedules} s
    WHERE s.flag_key IN (
            SELECT w.flag_key FROM {schedules} w
            WHERE w.status = 'failed' AND w.next_retry_at > now()
              AND w.next_retry_at <= {time_max()} AND w.retry_count <= w.max_retries
              AND {scope_of(w)}
            UNION ALL  -- approval (0008): awaiting rows are due (marked so when due), found
            -- by the due indexes (idx_schedules_pending_due, idx_schedules_next_retry_at)
            SELECT w.flag_key FROM {schedules} w
            WHERE w.status = 'pending' AND w.scheduled_at <= now()
              AND w.awaiting_approval_since IS NOT NULL AND {scope_of(w)}
            UNION ALL
            SELECT w.flag_key FROM {schedules} w
            WHERE w.status = 'failed' AND w.next_retry_at <= now()
              AND w.retry_count <= w.max_retries AND w.awaiting_approval_since IS NOT NULL
              AND {scope_of(w)})
      AND {scope_of(s)}
      AND s.status IN ('pending', 'failed') AND {open(s)} AND ({due_s()})
      AND {earlier_open_not_due(s)}
    ORDER BY s.flag_key, s.scheduled_at, s.id
    LIMIT p_limit;
END
$$
