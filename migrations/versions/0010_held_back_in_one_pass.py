"""The report of held-back schedules in one pass (flagsched/sql/stored/held_back_once.sql).

flagsched_held_back_v3(integer, jsonb, interval) returns what 0009's flagsched_held_back_v2
returns, found by one window over the open rows of the flags something holds back instead
of a probe of the flag's rows per due row (k due rows of one flag cost k reads of its rows:
on an application's schedules table, which has no index of open rows, 100 due rows on each
of 300 flags took the report past the statement timeout). The tick of this release calls
it; flagsched_held_back_v2 stays for the previous release. The template is frozen with this
revision (tests/migration/shipped.sha256), and so is the text rendered here
(tests/migration/test_frozen.py pins its digest).

Revision ID: 0010
Revises: 0009
"""

from alembic import op

from flagsched.sql import TableMap, Tables, stored

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

# The names this revision creates, fixed here (a later release's names are its own).
NAMES = (("held_back_once", "flagsched_held_back_v3"),)
BUILT_IN = Tables(fn=TableMap("", NAMES))
ROUTINES = ("held_back_once",)


def upgrade() -> None:
    for _, create in stored.creates(BUILT_IN, ROUTINES):
        op.execute(create)


def downgrade() -> None:
    for signature, _ in reversed(stored.creates(BUILT_IN, ROUTINES)):
        op.execute(f"DROP FUNCTION IF EXISTS {signature}")
