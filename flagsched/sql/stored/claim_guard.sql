-- The shape-3 claim's guard (issue 18): fragments that replace, in the claim rendered for an
-- application's schedules table only (stored.py `_APP_SCHEDULES_FRAGMENTS`), the frozen
-- `earlier_open` and `earlier_open_not_due` of stored/fragments.sql. There the per-row probe
-- of a flag's earlier open schedules reads the flag's rows through the application's
-- `flag_id` index (its history too: no partial index of open rows exists there, and
-- flagsched adds none), so a flag with many due schedules behind one that cannot move read
-- its rows once for each of them: 100 due behind a waiting retry on each of 300 flags took
-- the claim past the statement timeout. The claim now first maps each flag that has an open
-- schedule which cannot move now (a retry waiting for its time, a schedule awaiting
-- approval) to the first such schedule (`v_blockers`, computed once per claim on the
-- application's `next_retry_at` index and flagsched's own state indexes), and a due row
-- behind its flag's entry is held back without the probe. The probe still decides every
-- other row, so what is claimed is exactly what the frozen claim claims. The map is read in
-- the statement before the claim's (its own snapshot): a schedule that stopped holding its
-- flag meanwhile (a retry an operator made due, a cancel) can only keep a row out of this
-- claim, never let one in; the next claim sees it.

-- name: blockers_map
-- flag key -> [epoch of scheduled_at, id as text] of its first open schedule (of this scope)
-- that waits for a retry (timed, not yet due) or awaits approval (not yet past its lateness)
SELECT jsonb_object_agg(b.flag_key, jsonb_build_array(CAST(extract(epoch FROM b.scheduled_at) AS text), CAST(b.id AS text)))
        FROM (SELECT DISTINCT ON (u.flag_key) u.flag_key, u.scheduled_at, u.id
              FROM ((SELECT e.flag_key, e.scheduled_at, e.id FROM {schedules} e
                     WHERE e.status = 'failed' AND e.next_retry_at > now()
                       AND e.next_retry_at <= {time_max()}
                       AND e.retry_count <= e.max_retries AND {scope_of(e)})
                    UNION ALL
                    (SELECT e.flag_key, e.scheduled_at, e.id FROM {schedules} e
                     WHERE e.awaiting_approval_since IS NOT NULL AND {open(e)}
                       AND {awaiting_stuck(e)} AND {scope_of(e)})) u
              WHERE u.flag_key IS NOT NULL AND u.scheduled_at IS NOT NULL
              ORDER BY u.flag_key, u.scheduled_at, u.id) b

-- name: behind_blocker
-- schedule {arg} is behind its flag's entry in v_blockers (an earlier open schedule that is
-- not due): then both probes below would find one
CASE WHEN v_blockers ? {arg}.flag_key THEN coalesce((extract(epoch FROM {arg}.scheduled_at), {arg}.id) > (CAST(v_blockers -> {arg}.flag_key ->> 0 AS numeric), CAST(v_blockers -> {arg}.flag_key ->> 1 AS {id_domain()})), false) ELSE false END

-- name: earlier_open
-- an earlier open schedule of {arg}'s flag exists, whatever it is (the map first)
({behind_blocker({arg})} OR EXISTS (
            {earlier_open_head({arg})}
            OFFSET 0))

-- name: earlier_open_not_due
-- an earlier open schedule of {arg}'s flag exists that is not due (the map first)
({behind_blocker({arg})} OR EXISTS (
            {earlier_open_head({arg})} AND NOT ({due()})
            OFFSET 0))
