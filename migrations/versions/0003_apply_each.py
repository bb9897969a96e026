"""flagsched_apply_each: per-change failure isolation done by the server.

A batch whose set-based UPDATE fails (one bad change among a hundred) is applied change by
change, each in its own BEGIN ... EXCEPTION block (a subtransaction), in one statement
instead of one savepoint round trip per schedule. SECURITY INVOKER: it runs with the
privileges of the tick's role (EXECUTE is granted to PUBLIC by default).

Revision ID: 0003
Revises: 0002
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE FUNCTION flagsched_apply_each(
            p_keys text[], p_enabled boolean[], p_rollout integer[],
            p_stop_on_failure boolean[], p_now timestamptz)
        RETURNS TABLE (item integer, outcome text, message text)
        LANGUAGE plpgsql SECURITY INVOKER AS $$
        DECLARE
            stopped text[] := '{}';  -- flags whose earlier change failed and will be retried
        BEGIN
            FOR n IN 1 .. coalesce(array_length(p_keys, 1), 0) LOOP
                item := n;
                message := NULL;
                IF p_keys[n] = ANY (stopped) THEN
                    outcome := 'held_back';
                    RETURN NEXT;
                    CONTINUE;
                END IF;
                BEGIN
                    UPDATE feature_flags AS f
                    SET enabled = coalesce(p_enabled[n], f.enabled),
                        rollout_percentage = coalesce(p_rollout[n], f.rollout_percentage),
                        updated_at = p_now
                    WHERE f.key = p_keys[n];
                    IF NOT FOUND THEN
                        outcome := 'missing';
                        RETURN NEXT;
                    END IF;
                EXCEPTION WHEN OTHERS THEN
                    -- (query_canceled is not caught by OTHERS: a cancel stops the whole call)
                    outcome := 'error';
                    message := SQLERRM || ' (SQLSTATE ' || SQLSTATE || ')';
                    RETURN NEXT;
                    IF p_stop_on_failure[n] THEN
                        stopped := stopped || p_keys[n];
                    END IF;
                END;
            END LOOP;
        END
        $$
        """
    )


def downgrade() -> None:
    op.execute(
        "DROP FUNCTION flagsched_apply_each(text[], boolean[], integer[], boolean[], timestamptz)"
    )
