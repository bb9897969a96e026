-- The shape-3 claim's guard (issue 18): fragments that replace, in the claim rendered for
-- an application's schedules table only (stored.py `_APP_SCHEDULES_FRAGMENTS`), the frozen
-- `earlier_open` and `earlier_open_not_due` of stored/fragments.sql (and, in its one-pass
-- statement, `earlier_open_head` too). There the per-row probe of a flag's earlier open
-- schedules reads the application's table, where flagsched adds no index. The claim decides
-- first, from the catalog and its newest due rows, how it reads (`v_map`):
-- - The table has an index led by its flag reference and one led by scheduled_at (the first
--   application's `idx_schedules_flag_id` and `idx_schedules_scheduled_at`), and the newest
--   due rows are of many flags: the claim walks the due rows in order and stops at its
--   limit, and the probe reads the flag's rows through the index (its history too: no
--   partial index of open rows exists there), so a flag with many due schedules behind one
--   that cannot move read its rows once for each of them: 100 due behind a waiting retry on
--   each of 300 flags took the claim past the statement timeout. So the claim first maps
--   each flag that has an open schedule which cannot move now (a retry waiting for its
--   time, a schedule awaiting approval) to the first such schedule (`v_blockers`, computed
--   once per claim on the application's `next_retry_at` index and flagsched's own state
--   indexes), and a due row behind its flag's entry is held back without the probe. The
--   probe still decides every other row. The map is read in the statement before the
--   claim's (its own snapshot): a schedule that stopped holding its flag meanwhile (a retry
--   an operator made due, a cancel) can only keep a row out of this claim, never let one
--   in; the next claim sees it.
-- - It lacks either, or the newest due rows are of few flags (`few_leaders`): the claim
--   would probe every due row before it sorts them, each probe reading the whole table
--   (without the first index) or the flag's rows (3,000 due on 300 flags, no index: 0.7 s a
--   claim, and 30,000 would pass the statement timeout); or, with both, walk and probe the
--   due rows held back behind the first of each flag until it found a batch's worth of
--   flags (30,000 due and 30,000 applied on 200 flags, each flag's in a run: past the
--   statement timeout). So no probe decides a candidate: the claim's statement maps each
--   flag to its first open schedule and its first that is not due (`firsts_map`, an
--   InitPlan of the claim's own statement: the snapshot the probe it replaces reads;
--   computed only when a row asks, once for each place that asks: two or three reads of the
--   open rows a claim). The probe of `blocked` runs only for a claimed row behind its
--   flag's first open schedule.
-- Either way what is claimed is exactly what the frozen claim claims
-- (tests/integration/test_claim_guard.py: with and without the two indexes, few leaders).

-- name: claim_start
-- the claim's declarations and first steps (stored.py `_APP_SCHEDULES_CLAIM_START`): how it
-- reads (`v_map`), and with the probes, the map of flags held by a schedule that cannot move
DECLARE
    v_blockers jsonb;
    v_map boolean;
BEGIN
    v_map := ({probes_unindexed()});
    IF NOT v_map THEN
        v_map := ({few_leaders()});
    END IF;
    IF NOT v_map THEN
        v_blockers := ({blockers_map()});
    END IF;

-- name: probes_unindexed
-- the application's schedules table lacks a valid index led by its flag reference, or one
-- led by scheduled_at: then the frozen claim probes every due row, and each probe reads the
-- whole table (without the first) or the flag's rows (without the second: the probes run
-- before the sort, for every due row)
NOT (SELECT count(DISTINCT a.attname) = 2 FROM pg_catalog.pg_index i
         JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
         WHERE i.indrelid = to_regclass({app_schedules_literal()}) AND i.indisvalid
           AND a.attname IN ({flag_ref_literal()}, 'scheduled_at'))

-- name: few_leaders
-- the newest 200 due pending rows (of this scope; newest first: in the scheduled_at index
-- they come before the applied history, which is older) are of fewer flags than the batch
-- holds (up to 100): the due rows are runs of few flags, and the probes would walk every row
-- held back behind each flag's first before they found a batch's worth of flags, so the
-- claim maps instead (fewer due rows than that: the walk is short, probes). A constant
-- limit: the claim's plan is generic, and a limit of a parameter there sorted every
-- pending row (30,000: +33 ms a claim)
(SELECT count(*) = 200 AND count(DISTINCT d.flag_key) < least(p_limit, 100)
        FROM (SELECT e.flag_key FROM {schedules} e
              WHERE e.status = 'pending' AND e.scheduled_at <= now() AND {scope_of(e)}
              ORDER BY e.scheduled_at DESC
              LIMIT 200) d)

-- name: firsts_map
-- flag key -> {"f": [epoch of scheduled_at, id as text] of its first open schedule (of this
-- scope), "w": of its first open schedule that is not due}
(SELECT jsonb_object_agg(d.flag_key, d.firsts)
        FROM (SELECT f.flag_key,
                     jsonb_build_object('f', (array_agg(f.entry ORDER BY f.scheduled_at, f.id))[1],
                                        'w', (array_agg(f.entry) FILTER (WHERE f.waits))[1]) AS firsts
              FROM (SELECT DISTINCT ON (e.flag_key, waits)
                           e.flag_key, coalesce(NOT ({due()}), false) AS waits, e.scheduled_at, e.id,
                           jsonb_build_array(CAST(extract(epoch FROM e.scheduled_at) AS text), CAST(e.id AS text)) AS entry
                    FROM {schedules} e
                    WHERE e.status IN ('pending', 'failed') AND {open(e)} AND {scope_of(e)}
                      AND e.flag_key IS NOT NULL AND e.scheduled_at IS NOT NULL
                    ORDER BY e.flag_key, waits, e.scheduled_at, e.id) f
              GROUP BY f.flag_key) d)

-- name: after_first
-- schedule {arg} comes after the map's entry `x.f` (an absent entry: it does not)
coalesce((extract(epoch FROM {arg}.scheduled_at), {arg}.id) > (CAST(x.f ->> 0 AS numeric), CAST(x.f ->> 1 AS {id_domain()})), false)

-- name: after_firsts
-- by the map, an earlier open schedule of {arg}'s flag exists (OFFSET 0: the map read once)
(SELECT {after_first({arg})} FROM (SELECT {firsts_map()} -> {arg}.flag_key -> 'f' AS f OFFSET 0) x)

-- name: after_first_waiting
-- by the map, an earlier open schedule of {arg}'s flag exists that is not due
(SELECT {after_first({arg})} FROM (SELECT {firsts_map()} -> {arg}.flag_key -> 'w' AS f OFFSET 0) x)

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

-- name: mapped_claim
-- the claim's statement where it reads by one pass (`v_map`): stored.py `mapped_claim_query`
-- is stored/fragments.sql's claim_query with the three fragments below in place of
-- `earlier_open`, `earlier_open_not_due` and `earlier_open_head`. A statement of its own,
-- not a CASE in the probes' statement: the map's estimated cost there made the planner
-- choose other joins for the probes (case 13's drain took 1.7x as long)
IF p_lock THEN
            RETURN QUERY {mapped_claim_query(FOR NO KEY UPDATE OF s SKIP LOCKED)};
        ELSE
            RETURN QUERY {mapped_claim_query()};
        END IF;

-- name: mapped_earlier_open
-- by the map, an earlier open schedule of {arg}'s flag exists
{after_firsts({arg})}

-- name: mapped_earlier_open_not_due
-- by the map, an earlier open schedule of {arg}'s flag exists that is not due
{after_first_waiting({arg})}

-- name: mapped_earlier_open_head
-- stored/fragments.sql's `earlier_open_head`, read only for a row behind its flag's first
-- open schedule by the map (what `blocked` probes)
SELECT 1 FROM {schedules} e
            WHERE {after_firsts({arg})}
              AND e.flag_key = {arg}.flag_key AND {scope_of(e)} AND e.status IN ('pending', 'failed')
              AND (e.scheduled_at, e.id) < ({arg}.scheduled_at, {arg}.id)
              AND {open(e)}
