"""One write mechanism with one fallback (issue 17): flagsched_apply_v4.

flagsched_apply_v3 (0006) wrote a batch set-based in a subtransaction and, when that
failed, went change by change, each in a subtransaction of its own: a batch of 1,000
changes opened 1,000 subtransactions (above 64 per transaction PostgreSQL's subtransaction
cache overflows), and the rule for what a failure holds back was decided there as well as
in the tick. flagsched_apply_v4 locks the flags (FOR NO KEY UPDATE, SKIP LOCKED unless
`p_wait`), decides each change (missing, busy, expired, conflict) and writes the rest
set-based, each flag's changes folded, and nothing else: when the write fails the whole
statement fails, and the tick's one fallback (flagsched/tick.py) writes one flag at a time
in a savepoint, the same path that serves the flags another session held. So
subtransactions are bounded by the failing flags, and the hold-back rule lives in one
place. flagsched_apply_v3 stays for the previous release.

Revision ID: 0007
Revises: 0006
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

APPLY_FUNCTION = "flagsched_apply_v4(bigint[], text[], boolean[], integer[], interval, boolean)"
CHECK_NAME = "flagsched_check_v2"  # 0006's, unchanged


def upgrade() -> None:
    op.execute(
        f"""
        CREATE FUNCTION flagsched_apply_v4(
            p_ids bigint[], p_keys text[], p_enabled boolean[], p_rollout integer[],
            p_max_lateness interval, p_wait boolean)
        RETURNS TABLE (item integer, outcome text, message text)
        LANGUAGE plpgsql SECURITY INVOKER AS $$
        DECLARE
            locked text[];
            held text[] := '{{}}';
            decided_n integer[];
            decided_outcome text[];
            decided_message text[];
            todo integer[];
        BEGIN
            -- FOR NO KEY UPDATE: the weakest lock that serialises writes of the flag's
            -- values; a row referencing the flag (FOR KEY SHARE) never blocks it.
            IF p_wait THEN
                locked := ARRAY(SELECT f.key FROM feature_flags f WHERE f.key = ANY (p_keys)
                                ORDER BY f.key FOR NO KEY UPDATE);
            ELSE
                locked := ARRAY(SELECT f.key FROM feature_flags f WHERE f.key = ANY (p_keys)
                                ORDER BY f.key FOR NO KEY UPDATE SKIP LOCKED);
            END IF;
            IF cardinality(locked) < cardinality(p_keys) THEN
                held := ARRAY(SELECT f.key FROM feature_flags f
                              WHERE f.key = ANY (p_keys) AND f.key <> ALL (locked));
            END IF;
            -- Every change's verdict under the locks, in one pass: the decided ones are
            -- returned, the rest (todo) written below.
            SELECT coalesce(array_agg(c.n::integer ORDER BY c.n)
                                FILTER (WHERE d.outcome IS NOT NULL), '{{}}'),
                   coalesce(array_agg(d.outcome ORDER BY c.n)
                                FILTER (WHERE d.outcome IS NOT NULL), '{{}}'),
                   coalesce(array_agg(d.message ORDER BY c.n)
                                FILTER (WHERE d.outcome IS NOT NULL), '{{}}'),
                   coalesce(array_agg(c.n::integer ORDER BY c.n)
                                FILTER (WHERE d.outcome IS NULL), '{{}}')
              INTO decided_n, decided_outcome, decided_message, todo
            FROM unnest(p_ids, p_keys) WITH ORDINALITY AS c(id, key, n)
            CROSS JOIN LATERAL (
                SELECT CASE WHEN c.key = ANY (locked) THEN NULL
                            WHEN c.key = ANY (held) THEN 'busy' ELSE 'missing' END AS outcome
            ) l
            LEFT JOIN LATERAL {CHECK_NAME}(c.id, p_max_lateness) k ON l.outcome IS NULL
            CROSS JOIN LATERAL (SELECT coalesce(l.outcome, k.outcome) AS outcome,
                                       k.message) d;
            RETURN QUERY SELECT * FROM unnest(decided_n, decided_outcome, decided_message);
            IF cardinality(todo) = 0 THEN
                RETURN;
            END IF;
            -- The history trigger names the schedules each flag's write applied.
            PERFORM set_config('flagsched.applying', (
                SELECT jsonb_object_agg(key, ids)::text FROM (
                    SELECT p_keys[t] AS key, jsonb_agg(p_ids[t] ORDER BY t) AS ids
                    FROM unnest(todo) AS t GROUP BY 1) x), true);
            UPDATE feature_flags AS f
            SET enabled = coalesce(v.enabled, f.enabled),
                rollout_percentage = coalesce(v.rollout, f.rollout_percentage),
                updated_at = now()
            FROM (
                SELECT p_keys[t] AS key,
                       (array_agg(p_enabled[t] ORDER BY t DESC)
                            FILTER (WHERE p_enabled[t] IS NOT NULL))[1] AS enabled,
                       (array_agg(p_rollout[t] ORDER BY t DESC)
                            FILTER (WHERE p_rollout[t] IS NOT NULL))[1] AS rollout
                FROM unnest(todo) AS t GROUP BY 1
            ) AS v
            WHERE f.key = v.key AND f.key = ANY (locked);
        END
        $$
        """
    )


def downgrade() -> None:
    op.execute(f"DROP FUNCTION IF EXISTS {APPLY_FUNCTION}")
