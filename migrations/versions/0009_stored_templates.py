"""The stored logic as templates (issue 18): new versioned objects rendered from
flagsched/sql/stored/*.sql for the built-in tables.

flagsched_claim_v3, flagsched_held_back_v2, flagsched_apply_v5, flagsched_check_v3 and
flagsched_kept_attempts_v3 behave as 0006's and 0007's claim_v2, held_back_v1, apply_v4,
check_v2 and kept_attempts_v2, from the same templates an application's own tables are
served from (flagsched migrate renders them for that mapping in flagsched's schema). The
claim, held_back and apply take the deployment's scope (`p_scope jsonb`; the built-in
tables have none: `{}`). The claim and held_back also know approvals (issue 20, migration
0008's columns and table): a schedule awaiting approval is not due until it is past its
lateness (`p_max_lateness interval`, the rule `awaiting_stuck` of stored/fragments.sql),
so they are flagsched_claim_v3(integer, boolean, jsonb, interval) and
flagsched_held_back_v2(integer, jsonb, interval). The previous objects stay for the
previous release. The template
files are frozen with this revision (tests/migration/shipped.sha256), and so is the text
rendered here (tests/migration/test_frozen.py pins its digest): a later change is a new
file under a new name.

Revision ID: 0009
Revises: 0008
"""

from alembic import op

from flagsched.sql import TableMap, Tables, stored

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

# The names this revision creates, fixed here (a later release's names are its own).
NAMES = (
    ("kept_attempts", "flagsched_kept_attempts_v3"),
    ("check", "flagsched_check_v3"),
    ("claim", "flagsched_claim_v3"),
    ("held_back", "flagsched_held_back_v2"),
    ("apply", "flagsched_apply_v5"),
)
BUILT_IN = Tables(fn=TableMap("", NAMES))


def upgrade() -> None:
    for _, create in stored.creates(BUILT_IN):
        op.execute(create)


def downgrade() -> None:
    for signature, _ in reversed(stored.creates(BUILT_IN)):
        op.execute(f"DROP FUNCTION IF EXISTS {signature}")
