"""Table definitions (the schema at the latest revision), the engine factory and URL handling."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import NullPool

from flagsched.errors import DatabaseError, DatabaseUnavailable

# The alembic head. The tick checks it without importing alembic (cold start);
# a test keeps it equal to the migration scripts' head.
SCHEMA_REVISION = "0002"
APPLICATION_NAME = "flagsched"

metadata = sa.MetaData()

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
    sa.CheckConstraint("max_retries >= 0 AND max_retries <= 10", name="max_retries_check"),
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
)


def sqlalchemy_url(raw: str) -> sa.URL:
    """postgresql://, postgres:// or postgresql+psycopg:// -> a psycopg 3 SQLAlchemy URL."""
    scheme, rest = raw.split("://", 1)
    if scheme.lower() not in ("postgresql", "postgres", "postgresql+psycopg"):
        raise ValueError(f"unsupported scheme {scheme!r}")
    return sa.make_url(f"postgresql+psycopg://{rest}")


def redact_url(raw: str) -> str:
    """The URL with any password (userinfo or ?password=) replaced by ***."""
    try:
        parts = urlsplit(raw)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, host = netloc.rsplit("@", 1)
            if ":" in userinfo:
                userinfo = userinfo.split(":", 1)[0] + ":***"
            netloc = f"{userinfo}@{host}"
        query = urlencode(
            [(k, "***" if k.lower() == "password" else v) for k, v in parse_qsl(parts.query)]
        )
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        return "(unparseable URL)"


def url_secrets(raw: str | None) -> list[str]:
    """Strings that must never be shown: the URL's password, in every spelling it may take."""
    if not raw:
        return []
    secrets: list[str] = []
    try:
        url = sqlalchemy_url(raw)
        if url.password:
            secrets.append(str(url.password))
        secrets += [
            v for k, v in url.query.items() if k.lower() == "password" and isinstance(v, str)
        ]
    except Exception:
        match = re.search(r"://[^:/@]*:([^@]*)@", raw)
        if match:
            secrets.append(match.group(1))
    raw_password = re.search(r"://[^:/@]*:([^@]*)@", raw)
    if raw_password:
        secrets.append(raw_password.group(1))  # percent-encoded spelling too
    return [s for s in dict.fromkeys(secrets) if s]


def one_line(text: str, secrets: list[str]) -> str:
    """A driver message as one readable line, with every secret replaced by ***."""
    line = " ".join(part.strip() for part in str(text).splitlines() if part.strip())
    for secret in secrets:
        line = line.replace(secret, "***")
    return line


def make_engine(
    raw_url: str,
    *,
    lock_timeout: float = 5,
    statement_timeout: float | None = 30,
    application_name: str = APPLICATION_NAME,
) -> Engine:
    """One engine per process, no pool: a tick uses one connection and exits."""
    options = [
        f"-c lock_timeout={int(lock_timeout * 1000)}",
        f"-c statement_timeout={int((statement_timeout or 0) * 1000)}",
        # A crashed or stuck tick must never keep its claimed rows locked for long.
        "-c idle_in_transaction_session_timeout=60000",
        "-c timezone=UTC",
        # JIT compiles the claim (its cost estimate is high) for ~30 ms each time: never worth it.
        "-c jit=off",
    ]
    return sa.create_engine(
        sqlalchemy_url(raw_url),
        poolclass=NullPool,
        connect_args={
            "application_name": application_name,
            "options": " ".join(options),
            "connect_timeout": 10,
        },
    )


@contextmanager
def translate_errors(engine: Engine) -> Iterator[None]:
    """Turn driver errors into the flagsched hierarchy, with no password in the message."""
    secrets = url_secrets(engine.url.render_as_string(hide_password=False))
    # redact_url also hides a ?password= query parameter, which SQLAlchemy's rendering shows.
    where = redact_url(engine.url.render_as_string(hide_password=False))
    try:
        yield
    except sa.exc.DBAPIError as exc:
        reason = one_line(str(exc.orig) if exc.orig else str(exc), secrets)
        if exc.connection_invalidated or _is_connect_error(exc):
            raise DatabaseUnavailable(f"could not connect to {where}: {reason}") from None
        raise DatabaseError(f"database error: {reason}") from None


def _is_connect_error(exc: sa.exc.DBAPIError) -> bool:
    import psycopg

    orig = exc.orig
    return isinstance(orig, psycopg.OperationalError) and (
        "connection" in str(orig).lower() or getattr(orig, "sqlstate", None) is None
    )


@contextmanager
def begin(engine: Engine) -> Iterator[Connection]:
    """A connection inside one transaction, committed on success, errors translated."""
    with translate_errors(engine), engine.begin() as conn:
        yield conn


@contextmanager
def connection(engine: Engine) -> Iterator[Connection]:
    """One connection for a whole command (batches reuse it), errors translated."""
    with translate_errors(engine), engine.connect() as conn:
        yield conn


@contextmanager
def transaction(engine: Engine, conn: Connection) -> Iterator[sa.engine.RootTransaction]:
    """One transaction on `conn`: committed on success, rolled back on error, translated."""
    with translate_errors(engine), conn.begin() as tx:
        yield tx
