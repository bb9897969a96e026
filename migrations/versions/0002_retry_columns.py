"""Retry columns, their index and check, and the indexes that keep the claim an index scan.

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE feature_flag_schedules
            ADD COLUMN retry_count integer NOT NULL DEFAULT 0,
            ADD COLUMN max_retries integer NOT NULL DEFAULT 3,
            ADD COLUMN next_retry_at timestamptz NULL,
            ADD COLUMN last_error text NULL,
            ADD CONSTRAINT max_retries_check CHECK (max_retries >= 0 AND max_retries <= 10)
        """
    )
    op.execute("CREATE INDEX idx_schedules_next_retry_at ON feature_flag_schedules (next_retry_at)")
    # Claim of new schedules walks only pending rows, in claim order, however many
    # applied rows pile up.
    op.execute(
        "CREATE INDEX idx_schedules_pending_due ON feature_flag_schedules (scheduled_at, id) "
        "WHERE status = 'pending'"
    )
    # Per-flag order: finding an earlier open schedule of a flag is one index probe.
    op.execute(
        "CREATE INDEX idx_schedules_flag_open ON feature_flag_schedules "
        "(flag_key, scheduled_at, id) WHERE status IN ('pending', 'failed')"
    )


def downgrade() -> None:
    op.execute("DROP INDEX idx_schedules_flag_open")
    op.execute("DROP INDEX idx_schedules_pending_due")
    op.execute("DROP INDEX idx_schedules_next_retry_at")
    op.execute(
        """
        ALTER TABLE feature_flag_schedules
            DROP CONSTRAINT max_retries_check,
            DROP COLUMN last_error,
            DROP COLUMN next_retry_at,
            DROP COLUMN max_retries,
            DROP COLUMN retry_count
        """
    )
