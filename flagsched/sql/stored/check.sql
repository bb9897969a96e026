-- The safety checks of one schedule under its flag's lock (migration 0006's
-- flagsched_check_v2, as a template): expired by its expires_at, by the maximum lateness,
-- or in conflict with a change of its flag by another writer in its window.
CREATE FUNCTION {fn.check}(p_id bigint, p_max_lateness interval)
RETURNS TABLE (outcome text, message text)
LANGUAGE sql STABLE SECURITY INVOKER AS $$
    SELECT v.outcome, v.message
    FROM {schedules} s
    CROSS JOIN LATERAL (
        SELECT 1 AS rank, 'expired'::text AS outcome,
               'expired: ' || {late(s.expires_at)} || ' past its expires_at '
               || {iso(s.expires_at)} AS message
        WHERE {expired_by_date(s)}
        UNION ALL
        SELECT 2, 'expired',
               'expired: ' || {late({due_since(s)})}
               || ' late, more than the maximum lateness of '
               || justify_interval(p_max_lateness)::text || ' (due since '
               || {iso({due_since(s)})} || ')'
        WHERE {expired_by_lateness(s)}
        UNION ALL
        SELECT 3, 'conflict',
               'conflict: flag ' || quote_literal(s.flag_key) || ' was changed by '
               || c.actor || ' at ' || {iso(c.written_at)}
               || ', after this schedule was '
               || CASE WHEN s.reviewed_at > s.created_at AND s.reviewed_at <= now()
                       THEN 'retried' ELSE 'created' END
               || '; `flagsched retry` it to apply it anyway'
        FROM (
            -- The latest foreign change (not by flagsched) in s's window: what was
            -- written after the window start, and, for a schedule judged by its snapshot,
            -- what was written in the hour before it by a transaction the snapshot may not
            -- have seen (migration 0006 says why).
            SELECT x.actor, x.written_at FROM (
            (SELECT c.actor, c.written_at FROM {changes} c
             WHERE c.flag_key = s.flag_key AND {same_scope(c, s)} AND c.schedule_ids = '{}'
               AND c.old_enabled IS NOT NULL
               AND c.written_at > {window_start()} AND {counts()}
             ORDER BY c.written_at DESC
             LIMIT 1)
            UNION ALL
            (SELECT c.actor, c.written_at FROM {changes} c
             WHERE {by_snapshot()}
               AND c.flag_key = s.flag_key AND {same_scope(c, s)} AND c.schedule_ids = '{}'
               AND c.old_enabled IS NOT NULL
               AND c.written_at <= {window_start()}
               AND c.written_at > {window_start()} - interval '1 hour'
               AND c.xact >= pg_snapshot_xmin(s.created_snapshot) AND {counts()}
             ORDER BY c.written_at DESC
             LIMIT 1)) x
            ORDER BY x.written_at DESC
            LIMIT 1
        ) c
        WHERE s.on_conflict = 'fail'
        ORDER BY rank
        LIMIT 1
    ) v
    WHERE s.id = p_id
$$
