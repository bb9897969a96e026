"""The schema at the latest revision as SQLAlchemy Core tables (for alembic and the test that
compares it with the migrated database), and the SQLAlchemy engine alembic runs on."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.dialects.postgresql import base as postgresql_base
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import NullPool

from flagsched.db import Database

metadata = sa.MetaData()


class XID8(sa.types.UserDefinedType[int]):
    """PostgreSQL's 64-bit transaction id (pg_current_xact_id())."""

    cache_ok = True

    def get_col_spec(self, **kw: object) -> str:
        return "xid8"


class Snapshot(sa.types.UserDefinedType[str]):
    """PostgreSQL's snapshot (pg_current_snapshot()): which transactions a statement saw."""

    cache_ok = True

    def get_col_spec(self, **kw: object) -> str:
        return "pg_snapshot"


# So that reflection (alembic's comparison with the database) knows the types.
postgresql_base.ischema_names.setdefault("xid8", XID8)
postgresql_base.ischema_names.setdefault("pg_snapshot", Snapshot)

feature_flags = sa.Table(
    "feature_flags",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(always=False), primary_key=True),
    sa.Column("key", sa.Text, nullable=False, unique=True),
    sa.Column("enabled", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("rollout_percentage", sa.Integer, nullable=False, server_default=sa.text("0")),
    sa.Column(
        "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
    sa.Column(
        "updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
    sa.CheckConstraint(
        "rollout_percentage >= 0 AND rollout_percentage <= 100", name="rollout_percentage_check"
    ),
)

feature_flag_schedules = sa.Table(
    "feature_flag_schedules",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(always=False), primary_key=True),
    sa.Column("flag_key", sa.Text, nullable=False),
    sa.Column("scheduled_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updates", JSONB, nullable=False),
    sa.Column("status", sa.Text, nullable=False, server_default=sa.text("'pending'")),
    sa.Column("retry_count", sa.Integer, nullable=False, server_default=sa.text("0")),
    sa.Column("max_retries", sa.Integer, nullable=False, server_default=sa.text("3")),
    sa.Column("next_retry_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("applied_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column(
        "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
    sa.Column(
        "updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
    sa.Column("on_conflict", sa.Text, nullable=False, server_default=sa.text("'fail'")),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("group_id", sa.BigInteger, nullable=True),
    # The last `flagsched retry`: conflict and lateness windows restart there.
    sa.Column("reviewed_at", sa.DateTime(timezone=True), nullable=True),
    # Every attempt a tick made: [{"attempt", "at", "outcome", "error"}], oldest first.
    sa.Column("attempts", JSONB, nullable=False, server_default=sa.text("'[]'::jsonb")),
    # The recurrence this schedule was made from (migration 0005).
    sa.Column("recurrence_id", sa.BigInteger, nullable=True),
    # The transaction that inserted it (migration 0006; NULL for rows inserted before):
    # that transaction's own flag changes are never a conflict.
    sa.Column(
        "created_xact", XID8(), nullable=True, server_default=sa.text("pg_current_xact_id()")
    ),
    # The snapshot its INSERT saw (migration 0006; NULL before): the conflict window is
    # the changes it did not see.
    sa.Column(
        "created_snapshot",
        Snapshot(),
        nullable=True,
        server_default=sa.text("pg_current_snapshot()"),
    ),
    # Four eyes (migration 0008): asked for with --approval; the login that inserted it
    # (set by the trigger flagsched_note_creator); since when a tick found it due and
    # waiting for an approval it has not got.
    sa.Column("needs_approval", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("created_by", sa.Text, nullable=True),
    sa.Column("awaiting_approval_since", sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("max_retries >= 0 AND max_retries <= 10", name="max_retries_check"),
    sa.CheckConstraint("on_conflict IN ('fail', 'apply')", name="on_conflict_check"),
    sa.Index("idx_schedules_next_retry_at", "next_retry_at"),
    # The claim of new schedules: an index scan in (scheduled_at, id) order that never
    # walks applied history.
    sa.Index(
        "idx_schedules_pending_due",
        "scheduled_at",
        "id",
        postgresql_where=sa.text("status = 'pending'"),
    ),
    # Per-flag order: "is an earlier schedule of this flag still open?" stays an index
    # probe however much history the flag has.
    sa.Index(
        "idx_schedules_flag_open",
        "flag_key",
        "scheduled_at",
        "id",
        postgresql_where=sa.text("status IN ('pending', 'failed')"),
    ),
    sa.Index("idx_schedules_group", "group_id", postgresql_where=sa.text("group_id IS NOT NULL")),
    # One schedule per occurrence of a recurrence, however many ticks overlap.
    sa.Index(
        "idx_schedules_recurrence",
        "recurrence_id",
        "scheduled_at",
        unique=True,
        postgresql_where=sa.text("recurrence_id IS NOT NULL"),
    ),
    # `flagsched list`: open schedules in (scheduled_at, id) order, never walking history.
    sa.Index(
        "idx_schedules_open",
        "scheduled_at",
        "id",
        postgresql_where=sa.text("status IN ('pending', 'failed')"),
    ),
)

# Recurring schedules (migration 0005): the tick turns each occurrence into one schedule.
feature_flag_recurrences = sa.Table(
    "feature_flag_recurrences",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(always=False), primary_key=True),
    sa.Column("flag_key", sa.Text, nullable=False),
    sa.Column("cron", sa.Text, nullable=False),
    sa.Column("timezone", sa.Text, nullable=False),
    sa.Column("updates", JSONB, nullable=False),
    # The next occurrence (UTC); NULL: it will not fire again.
    sa.Column("next_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("expires_after", sa.Interval, nullable=True),
    sa.Column("on_conflict", sa.Text, nullable=False, server_default=sa.text("'fail'")),
    sa.Column("cancelled_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column(
        "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
    # Four eyes (migration 0008): each schedule it makes needs approval; who made it.
    sa.Column("needs_approval", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("created_by", sa.Text, nullable=True),
    sa.CheckConstraint("on_conflict IN ('fail', 'apply')", name="recurrence_on_conflict_check"),
    sa.Index("idx_recurrences_due", "next_at", postgresql_where=sa.text("cancelled_at IS NULL")),
)

group_seq = sa.Sequence("feature_flag_schedule_group_seq", metadata=metadata)

# Four eyes (migration 0008): every verdict on a schedule; who and when are the database's
# (session_user and now(), set by the trigger flagsched_check_approval).
feature_flag_approvals = sa.Table(
    "feature_flag_approvals",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(always=False), primary_key=True),
    # No foreign key: applications may TRUNCATE their schedules; prune deletes verdicts too.
    sa.Column("schedule_id", sa.BigInteger, nullable=False),
    sa.Column("verdict", sa.Text, nullable=False),
    sa.Column("decided_by", sa.Text, nullable=False),
    sa.Column(
        "decided_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
    sa.Column("note", sa.Text, nullable=True),
    sa.CheckConstraint("verdict IN ('approved', 'rejected')", name="verdict_check"),
    sa.Index("idx_approvals_schedule", "schedule_id", "id"),
)

# Append-only: one row per change of a flag's enabled / rollout_percentage, by any writer
# (statement-level triggers on feature_flags, migration 0004).
feature_flag_changes = sa.Table(
    "feature_flag_changes",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(always=False), primary_key=True),
    sa.Column("flag_key", sa.Text, nullable=False),
    sa.Column(
        "changed_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
    sa.Column("actor", sa.Text, nullable=False),
    sa.Column("old_enabled", sa.Boolean, nullable=True),
    sa.Column("old_rollout_percentage", sa.Integer, nullable=True),
    sa.Column("new_enabled", sa.Boolean, nullable=True),
    sa.Column("new_rollout_percentage", sa.Integer, nullable=True),
    sa.Column(
        "schedule_ids",
        ARRAY(sa.BigInteger),
        nullable=False,
        server_default=sa.text("'{}'::bigint[]"),
    ),
    # When the writing statement ran: what the conflict check orders by.
    sa.Column(
        "written_at",
        sa.DateTime(timezone=True),
        nullable=False,
        server_default=sa.func.statement_timestamp(),
    ),
    # The writing transaction (migration 0006), and the key a renamed flag had before.
    sa.Column("xact", XID8(), nullable=True, server_default=sa.text("pg_current_xact_id()")),
    sa.Column("old_flag_key", sa.Text, nullable=True),
    sa.Index("idx_changes_flag", "flag_key", "changed_at", "id"),
    sa.Index("idx_changes_changed_at", "changed_at", postgresql_using="brin"),
    sa.Index(
        "idx_changes_foreign",
        "flag_key",
        "written_at",
        postgresql_where=sa.text("schedule_ids = '{}'::bigint[]"),
    ),
)


def make_engine(
    raw_url: str, *, lock_timeout: float = 5, statement_timeout: float | None = 30
) -> Engine:
    """A SQLAlchemy engine over `Database.connect` (same settings, same error messages):
    every transaction starts with the settings as SET LOCAL, as the tick's do, so alembic
    too runs unchanged behind a transaction-mode pooler."""
    database = Database(raw_url, lock_timeout, statement_timeout)
    engine = sa.create_engine(
        "postgresql+psycopg://",
        poolclass=NullPool,
        creator=lambda: database.connect(autocommit=False),
        # The URL is only in `database`; keep it for error messages.
    ).execution_options(flagsched_database=database)

    @sa.event.listens_for(engine, "begin")
    def _settings(conn: Connection) -> None:
        driver = conn.connection.driver_connection
        if driver is not None and not driver.autocommit:  # AUTOCOMMIT has no transaction
            driver.execute(database.settings_sql())  # psycopg opens the transaction first

    return engine


def database_of(engine: Engine) -> Database:
    database: Database = engine.get_execution_options()["flagsched_database"]
    return database


@contextmanager
def connect(engine: Engine) -> Iterator[Connection]:
    """A connection outside any transaction (who uses it begins them), errors translated."""
    database = database_of(engine)
    try:
        with engine.connect() as conn:
            yield conn
    except sa.exc.DBAPIError as exc:
        raise database.error(exc.orig if exc.orig is not None else exc) from None


@contextmanager
def begin(engine: Engine) -> Iterator[Connection]:
    """A connection inside one transaction, committed on success, errors translated."""
    with connect(engine) as conn, conn.begin():
        yield conn
