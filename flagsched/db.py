"""Connections: psycopg 3 directly, one connection per command, with our session settings.
Transactions and savepoints, driver errors turned into flagsched errors, URLs redacted.

The tick runs on psycopg without SQLAlchemy: importing SQLAlchemy alone costs a cron run
~150 ms, and its result handling was most of a batch's CPU (docs/benchmarks.md). SQLAlchemy
Core describes the schema and drives alembic (flagsched.schema, flagsched.migrate)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeAlias
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import orjson
import psycopg
from psycopg.types.json import set_json_loads

from flagsched.errors import DatabaseError, DatabaseUnavailable, FlagschedError
from flagsched.model import Unreadable

# The alembic head. The tick checks it without importing alembic (cold start);
# a test keeps it equal to the migration scripts' head.
SCHEMA_REVISION = "0005"
APPLICATION_NAME = "flagsched"
SCHEMES = ("postgresql", "postgres", "postgresql+psycopg")

Conn: TypeAlias = "psycopg.Connection[Any]"


def libpq_url(raw: str) -> str:
    """postgresql://, postgres:// or postgresql+psycopg:// -> a URL libpq accepts."""
    scheme, sep, rest = raw.partition("://")
    if not sep or scheme.lower() not in SCHEMES:
        raise ValueError(f"unsupported scheme {scheme!r}")
    return f"postgresql://{rest}"


@dataclass(frozen=True, slots=True)
class Database:
    """Where and how to connect. Every connection gets the same session settings."""

    url: str = field(repr=False)  # it may hold a password
    lock_timeout: float = 5
    statement_timeout: float | None = 30
    application_name: str = APPLICATION_NAME

    def options(self) -> str:
        return " ".join(
            [
                # Whole milliseconds, rounded up: a tiny timeout must not become 0 (none).
                f"-c lock_timeout={math.ceil(self.lock_timeout * 1000)}",
                f"-c statement_timeout={math.ceil((self.statement_timeout or 0) * 1000)}",
                # A crashed or stuck tick must never keep its claimed rows locked for long.
                "-c idle_in_transaction_session_timeout=60000",
                "-c timezone=UTC",
                # JIT compiles the claim (its cost estimate is high) for ~30 ms: never worth it.
                "-c jit=off",
            ]
        )

    def connect(self, *, autocommit: bool = True) -> Conn:
        """A new connection; transactions are explicit (`transaction`) unless autocommit=False."""
        try:
            conn = psycopg.connect(
                libpq_url(self.url),
                autocommit=autocommit,
                application_name=self.application_name,
                options=self.options(),
                connect_timeout=10,
            )
        except (psycopg.Error, ValueError) as exc:
            raise self.error(exc, connecting=True) from None
        set_json_loads(_json_loads, conn)  # every claimed schedule's `updates`
        return conn

    def error(self, exc: BaseException, *, connecting: bool = False) -> FlagschedError:
        """A driver error as a flagsched error: one line, no password."""
        reason = one_line(str(exc), url_secrets(self.url))
        if connecting or _is_connection_lost(exc):
            return DatabaseUnavailable(f"could not connect to {redact_url(self.url)}: {reason}")
        return DatabaseError(f"database error: {reason}")

    @contextmanager
    def errors(self) -> Iterator[None]:
        """Translate driver errors raised inside into flagsched errors."""
        try:
            yield
        except psycopg.Error as exc:
            raise self.error(exc) from None


def _json_loads(data: bytes | str) -> Any:
    """orjson; the standard library for what orjson refuses and jsonb holds (1e400); and for
    what neither reads (nested too deep), an Unreadable that fails its row, not the tick."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(data)
    except RecursionError:
        return Unreadable("nested too deeply")
    except ValueError as exc:
        return Unreadable(one_line(str(exc), []))


def _is_connection_lost(exc: BaseException) -> bool:
    return isinstance(exc, psycopg.OperationalError) and (
        "connection" in str(exc).lower() or getattr(exc, "sqlstate", None) is None
    )


@contextmanager
def connection(database: Database) -> Iterator[Conn]:
    """One connection for a whole command (batches reuse it), errors translated."""
    conn = database.connect()
    try:
        with database.errors():
            yield conn
    finally:
        conn.close()


@contextmanager
def transaction(
    database: Database, conn: Conn, *, rollback: bool = False
) -> Iterator[psycopg.Transaction]:
    """One transaction on `conn`: committed on success (unless `rollback`), rolled back on
    error, errors translated."""
    with database.errors(), conn.transaction(force_rollback=rollback) as tx:
        yield tx


@contextmanager
def begin(database: Database) -> Iterator[Conn]:
    """A connection inside one transaction, committed on success, errors translated."""
    with connection(database) as conn, transaction(database, conn):
        yield conn


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
    userinfo = re.search(r"://[^:/@]*:([^@]*)@", raw)
    if userinfo:
        secrets += [userinfo.group(1), unquote(userinfo.group(1))]
    try:
        query = urlsplit(raw).query
        secrets += [v for k, v in parse_qsl(query) if k.lower() == "password"]
        secrets += re.findall(r"(?i)password=([^&]*)", query)  # as written, still encoded
    except ValueError:
        pass
    return [s for s in dict.fromkeys(secrets) if s]


def one_line(text: str, secrets: list[str]) -> str:
    """A driver message as one readable line, with every secret replaced by ***."""
    line = " ".join(part.strip() for part in str(text).splitlines() if part.strip())
    for secret in secrets:
        line = line.replace(secret, "***")
    return line
