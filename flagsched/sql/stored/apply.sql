-- One write mechanism with one fallback (migration 0007's flagsched_apply_v4, as a
-- template, with the flags table's own names and the scope): lock the flags (FOR NO KEY
-- UPDATE, SKIP LOCKED unless p_wait), decide each change (missing, busy, expired,
-- conflict) and write the rest set-based, each flag's changes folded; when that write
-- fails, each half of the flags again, down to the flags that fail on their own, returned
-- as 'flag_failed' with the error. p_scope: the flags of this deployment's scope.
CREATE FUNCTION {fn.apply}(
    p_ids bigint[], p_keys text[], p_enabled boolean[], p_rollout integer[],
    p_max_lateness interval, p_wait boolean, p_scope jsonb)
RETURNS TABLE (item integer, outcome text, message text)
LANGUAGE plpgsql SECURITY INVOKER AS $$
DECLARE
    locked text[];
    held text[] := '{}';
    decided_n integer[];
    decided_outcome text[];
    decided_message text[];
    todo integer[];
    keys text[];
    part integer[];
    lows integer[];
    highs integer[];
    lo integer;
    hi integer;
    mid integer;
BEGIN
    -- FOR NO KEY UPDATE: the weakest lock that serialises writes of the flag's values; a
    -- row referencing the flag (FOR KEY SHARE) never blocks it.
    IF p_wait THEN
        locked := ARRAY(SELECT f.{flags.key} FROM {flags} f
                        WHERE f.{flags.key} = ANY (p_keys) AND {flag_scope(f)}
                        ORDER BY f.{flags.key} FOR NO KEY UPDATE);
    ELSE
        locked := ARRAY(SELECT f.{flags.key} FROM {flags} f
                        WHERE f.{flags.key} = ANY (p_keys) AND {flag_scope(f)}
                        ORDER BY f.{flags.key} FOR NO KEY UPDATE SKIP LOCKED);
    END IF;
    IF cardinality(locked) < cardinality(p_keys) THEN
        held := ARRAY(SELECT f.{flags.key} FROM {flags} f
                      WHERE f.{flags.key} = ANY (p_keys) AND {flag_scope(f)}
                        AND f.{flags.key} <> ALL (locked));
    END IF;
    -- Every change's verdict under the locks, in one pass: the decided ones are returned,
    -- the rest (todo) written below.
    SELECT coalesce(array_agg(c.n::integer ORDER BY c.n)
                        FILTER (WHERE d.outcome IS NOT NULL), '{}'),
           coalesce(array_agg(d.outcome ORDER BY c.n)
                        FILTER (WHERE d.outcome IS NOT NULL), '{}'),
           coalesce(array_agg(d.message ORDER BY c.n)
                        FILTER (WHERE d.outcome IS NOT NULL), '{}'),
           coalesce(array_agg(c.n::integer ORDER BY c.n)
                        FILTER (WHERE d.outcome IS NULL), '{}')
      INTO decided_n, decided_outcome, decided_message, todo
    FROM unnest(p_ids, p_keys) WITH ORDINALITY AS c(id, key, n)
    CROSS JOIN LATERAL (
        SELECT CASE WHEN c.key = ANY (locked) THEN NULL
                    WHEN c.key = ANY (held) THEN 'busy' ELSE 'missing' END AS outcome
    ) l
    LEFT JOIN LATERAL {fn.check}(c.id, p_max_lateness) k ON l.outcome IS NULL
    CROSS JOIN LATERAL (SELECT coalesce(l.outcome, k.outcome) AS outcome, k.message) d;
    RETURN QUERY SELECT * FROM unnest(decided_n, decided_outcome, decided_message);
    IF cardinality(todo) = 0 THEN
        RETURN;
    END IF;
    -- The writes, set-based: all the flags at once, and when that fails each half of the
    -- flags again (a subtransaction each), down to the flags that fail on their own.
    keys := ARRAY(SELECT DISTINCT p_keys[t] FROM unnest(todo) AS t ORDER BY 1);
    lows := ARRAY[1];
    highs := ARRAY[cardinality(keys)];
    WHILE cardinality(lows) > 0 LOOP
        lo := lows[cardinality(lows)];
        hi := highs[cardinality(highs)];
        lows := lows[1:cardinality(lows) - 1];
        highs := highs[1:cardinality(highs) - 1];
        part := ARRAY(SELECT t FROM unnest(todo) AS t
                      WHERE p_keys[t] = ANY (keys[lo:hi]) ORDER BY t);
        BEGIN
            -- The history trigger names the schedules each flag's write applied.
            PERFORM set_config('flagsched.applying', (
                SELECT jsonb_object_agg(key, ids)::text FROM (
                    SELECT p_keys[t] AS key, jsonb_agg(p_ids[t] ORDER BY t) AS ids
                    FROM unnest(part) AS t GROUP BY 1) x), true);
            UPDATE {flags} AS f
            SET {flags.enabled} = coalesce(v.enabled, f.{flags.enabled}){set_rollout()}{set_updated_at()}
            FROM (
                SELECT p_keys[t] AS key,
                       (array_agg(p_enabled[t] ORDER BY t DESC)
                            FILTER (WHERE p_enabled[t] IS NOT NULL))[1] AS enabled,
                       (array_agg(p_rollout[t] ORDER BY t DESC)
                            FILTER (WHERE p_rollout[t] IS NOT NULL))[1] AS rollout
                FROM unnest(part) AS t GROUP BY 1
            ) AS v
            WHERE f.{flags.key} = v.key AND f.{flags.key} = ANY (locked) AND {flag_scope(f)};
        EXCEPTION
            WHEN query_canceled THEN
                RAISE;  -- a statement timeout or a cancel ends the statement
            WHEN OTHERS THEN
                IF lo = hi THEN
                    RETURN QUERY SELECT t, 'flag_failed'::text,
                                        SQLERRM || ' (SQLSTATE ' || SQLSTATE || ')'
                                 FROM unnest(part) AS t;
                ELSE
                    mid := (lo + hi) / 2;
                    lows := lows || (mid + 1) || lo;
                    highs := highs || hi || mid;
                END IF;
        END;
    END LOOP;
END
$$
