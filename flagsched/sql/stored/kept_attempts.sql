-- The attempts a schedule keeps (migration 0006's flagsched_kept_attempts_v2, as a
-- template): the last 19 (the record appends one). What is not an array, or is larger than
-- 65536 bytes as stored (pg_column_size: no TOAST is read to decide) or as text once cut
-- to those, is not kept; OFFSET 0 keeps the slice from being inlined into each use.
CREATE FUNCTION {fn.kept_attempts}(p_attempts jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN pg_column_size(p_attempts) > 65536 THEN '[]'::jsonb
                WHEN jsonb_typeof(p_attempts) <> 'array' THEN '[]'::jsonb
                ELSE (SELECT CASE WHEN octet_length(CAST(t.kept AS text)) <= 65536
                                  THEN t.kept ELSE '[]'::jsonb END
                      FROM (SELECT jsonb_path_query_array(
                              p_attempts, 'lax $[last - 18 to last]') AS kept
                            OFFSET 0) t) END
$$
