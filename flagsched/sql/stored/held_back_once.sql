-- Due schedules behind an earlier open schedule of their flag that is not due, as
-- stored/held_back.sql (0009's flagsched_held_back_v2) finds them, in one pass: each open
-- row of the flags that have something holding them back (a retry waiting for a time still
-- to come, a schedule awaiting approval) is read once, and a window over each flag's open
-- rows in (scheduled_at, id) order counts the ones before it that are not due. The probe
-- per due row it replaces read the flag's rows again for each of them: on an application's
-- schedules table, with no index of open rows, k due rows behind one waiting retry cost k
-- reads of every row of the flag (history included), and 100 on each of 300 flags took the
-- report past the statement timeout. A row without a scheduled_at is never behind another
-- (as the row comparison of the probe: NULL). Locks nothing.
CREATE FUNCTION {fn.held_back_once}(p_limit integer, p_scope jsonb, p_max_lateness interval)
RETURNS TABLE (id bigint, flag_key text, scheduled_at timestamptz, status text,
               retry_count integer, max_retries integer)
LANGUAGE plpgsql STABLE SECURITY INVOKER SET jit = off AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    SELECT o.id, o.flag_key, {clamped(o.scheduled_at)}, o.status, o.retry_count,
           o.max_retries
    FROM (
        SELECT d.*, count(*) FILTER (WHERE NOT d.due) OVER (
                   PARTITION BY d.flag_key ORDER BY d.scheduled_at, d.id
                   ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS not_due_before
        FROM (
            SELECT s.id, s.flag_key, s.scheduled_at, s.status, s.retry_count,
                   s.max_retries, {due_s()} AS due
            FROM {schedules} s
            WHERE s.flag_key IN (
                    SELECT w.flag_key FROM {schedules} w
                    WHERE w.status = 'failed' AND w.next_retry_at > now()
                      AND w.next_retry_at <= {time_max()} AND w.retry_count <= w.max_retries
                      AND {scope_of(w)}
                    UNION ALL
                    SELECT w.flag_key FROM {schedules} w
                    WHERE w.status = 'pending' AND w.scheduled_at <= now()
                      AND w.awaiting_approval_since IS NOT NULL AND {scope_of(w)}
                    UNION ALL
                    SELECT w.flag_key FROM {schedules} w
                    WHERE w.status = 'failed' AND w.next_retry_at <= now()
                      AND w.retry_count <= w.max_retries
                      AND w.awaiting_approval_since IS NOT NULL AND {scope_of(w)})
              AND {scope_of(s)}
              AND s.status IN ('pending', 'failed') AND {open(s)}
        ) d
    ) o
    WHERE o.due AND o.not_due_before > 0 AND o.scheduled_at IS NOT NULL
    ORDER BY o.flag_key, o.scheduled_at, o.id
    LIMIT p_limit;
END
$$
