"""The safety check's window never starts before PostgreSQL's time (stored.DERIVED).

flagsched_check_v4(bigint, interval) decides what 0009's flagsched_check_v3 decides, except
for a schedule created in PostgreSQL's first hour (4714-11-24 BC) and judged by its
snapshot: v3 also looks at the hour before the window's start, which is before the earliest
timestamp there ("timestamp out of range"), so the check failed, and with it the write that
calls it (flagsched_apply_v5), retry after retry. v4 looks back to the beginning of time
instead. flagsched_apply_v6 is flagsched_apply_v5 calling it. Both are derived from 0009's
frozen templates (stored/check.sql, stored/apply.sql) by exact substitutions; the tick of
this release calls them, and flagsched_check_v3 and flagsched_apply_v5 stay for the previous
release. The text rendered here is frozen with this revision (tests/migration/test_frozen.py
pins its digest).

Revision ID: 0011
Revises: 0010
"""

from alembic import op

from flagsched.sql import TableMap, Tables, stored

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

# The names this revision creates, fixed here (a later release's names are its own).
NAMES = (("check_clamped", "flagsched_check_v4"), ("apply_clamped", "flagsched_apply_v6"))
BUILT_IN = Tables(fn=TableMap("", NAMES))
ROUTINES = ("check_clamped", "apply_clamped")


def upgrade() -> None:
    for _, create in stored.creates(BUILT_IN, ROUTINES):
        op.execute(create)


def downgrade() -> None:
    for signature, _ in reversed(stored.creates(BUILT_IN, ROUTINES)):
        op.execute(f"DROP FUNCTION IF EXISTS {signature}")
