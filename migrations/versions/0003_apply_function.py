"""flagsched_apply: a batch's flag changes in one statement, each failure isolated.

One call per batch does what used to take a round trip per step: lock the flags nobody else
holds (key order, SKIP LOCKED) and write them set-based, all or nothing, inside one
BEGIN ... EXCEPTION block (a subtransaction, as a savepoint would be); then apply every
change that is left (all of them when the set-based write failed) one by one, each in its
own block. Flags another session holds are not waited for unless p_wait: the tick makes
one more call per such flag, each in a savepoint, so that a signal cancelling a wait (or a
statement_timeout) undoes only that flag's changes. A call waits for a flag at most once.

SECURITY INVOKER: it runs with the privileges of the tick's role (EXECUTE is granted to
PUBLIC by default; docs/deploy.md grants it explicitly).

Revision ID: 0003
Revises: 0002
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

SIGNATURE = (
    "flagsched_apply(text[], boolean[], integer[], text[], boolean[], integer[], boolean[],"
    " boolean)"
)


def upgrade() -> None:
    op.execute(
        """
        CREATE FUNCTION flagsched_apply(
            p_flag_keys text[], p_flag_enabled boolean[], p_flag_rollout integer[],
            p_keys text[], p_enabled boolean[], p_rollout integer[],
            p_stop_on_failure boolean[], p_wait boolean)
        RETURNS TABLE (item integer, outcome text, message text)
        LANGUAGE plpgsql SECURITY INVOKER AS $$
        -- p_flag_*: each flag's changes folded into one, for the set-based write (may be
        -- empty); p_*: the same changes one by one, in order (flag, then scheduled_at, id).
        -- Returns a row for each change that did not apply:
        --   'error'     it failed (message says why); with p_stop_on_failure it holds the
        --               flag's later changes back,
        --   'held_back' behind such a failure,
        --   'missing'   the flag does not exist,
        --   'busy'      not attempted: the flag is held by another session (without
        --               p_wait), or it was already waited for in this call.
        DECLARE
            done text[] := '{}';     -- flags written by the set-based UPDATE
            stopped text[] := '{}';  -- flags whose change failed and will be retried
            busy text[] := '{}';     -- flags held by another session
        BEGIN
            IF cardinality(p_flag_keys) > 0 THEN
                BEGIN
                    WITH free AS MATERIALIZED (
                        SELECT f.key FROM feature_flags f
                        WHERE f.key = ANY (p_flag_keys)
                        ORDER BY f.key
                        FOR UPDATE SKIP LOCKED
                    ), written AS (
                        UPDATE feature_flags AS f
                        SET enabled = coalesce(v.enabled, f.enabled),
                            rollout_percentage = coalesce(v.rollout, f.rollout_percentage),
                            updated_at = now()
                        FROM unnest(p_flag_keys, p_flag_enabled, p_flag_rollout)
                             AS v(key, enabled, rollout)
                        WHERE f.key = v.key AND f.key IN (SELECT key FROM free)
                        RETURNING f.key
                    )
                    SELECT coalesce(array_agg(key), '{}') INTO done FROM written;
                EXCEPTION WHEN OTHERS THEN
                    done := '{}';  -- undone as a whole; every change is tried on its own
                END;
                IF cardinality(done) = cardinality(p_flag_keys) THEN
                    RETURN;  -- the common case: every flag written
                END IF;
            END IF;
            FOR n IN 1 .. coalesce(array_length(p_keys, 1), 0) LOOP
                CONTINUE WHEN p_keys[n] = ANY (done);
                item := n;
                message := NULL;
                IF p_keys[n] = ANY (stopped) THEN
                    outcome := 'held_back';
                    RETURN NEXT;
                    CONTINUE;
                END IF;
                IF p_keys[n] = ANY (busy) THEN
                    outcome := 'busy';
                    RETURN NEXT;
                    CONTINUE;
                END IF;
                BEGIN
                    IF NOT p_wait THEN
                        PERFORM 1 FROM feature_flags WHERE key = p_keys[n] FOR UPDATE NOWAIT;
                    END IF;
                    UPDATE feature_flags AS f
                    SET enabled = coalesce(p_enabled[n], f.enabled),
                        rollout_percentage = coalesce(p_rollout[n], f.rollout_percentage),
                        updated_at = now()
                    WHERE f.key = p_keys[n];
                    CONTINUE WHEN FOUND;
                    outcome := 'missing';
                EXCEPTION
                    -- (query_canceled is not caught by OTHERS: a cancel ends the call)
                    WHEN lock_not_available THEN
                        busy := busy || p_keys[n];  -- its later changes: not attempted
                        IF p_wait THEN  -- waited lock_timeout: an attempt that failed
                            outcome := 'error';
                            message := SQLERRM || ' (SQLSTATE ' || SQLSTATE || ')';
                        ELSE            -- held: not attempted
                            outcome := 'busy';
                        END IF;
                    WHEN OTHERS THEN
                        outcome := 'error';
                        message := SQLERRM || ' (SQLSTATE ' || SQLSTATE || ')';
                END;
                RETURN NEXT;
                IF outcome = 'error' AND p_stop_on_failure[n] THEN
                    stopped := stopped || p_keys[n];
                END IF;
            END LOOP;
        END
        $$
        """
    )


def downgrade() -> None:
    op.execute(f"DROP FUNCTION {SIGNATURE}")
