"""Connections: psycopg 3 directly, one connection per command, with our session settings.
Transactions and savepoints, driver errors turned into flagsched errors naming the database
by host, port and name, never by its URL.

The tick runs on psycopg without SQLAlchemy: importing SQLAlchemy alone costs a cron run
~150 ms, and its result handling was most of a batch's CPU (docs/benchmarks.md). SQLAlchemy
Core describes the schema and drives alembic (flagsched.schema, flagsched.migrate)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, TypeAlias

import orjson
import psycopg
from psycopg.types.json import set_json_loads
from psycopg.types.string import TextLoader

from flagsched.errors import DatabaseError, DatabaseUnavailable, FlagschedError
from flagsched.model import Unreadable
from flagsched.sql import statement
from flagsched.urls import database_url_problem, describe_database, url_secrets
from flagsched.urls import one_line as one_line  # where the repository finds it

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

    def settings_sql(self) -> str:
        """The session settings as SET LOCAL statements (queries.sql `session_settings`)."""
        return statement("session_settings", literals=self._timeouts())

    def begin_sql(self) -> str:
        """A transaction's start and its settings as one simple-protocol query (one round trip)."""
        return statement("begin", literals=self._timeouts())

    def _timeouts(self) -> dict[str, int]:
        # Whole milliseconds, rounded up: a tiny timeout must not become 0 (none).
        return {
            "lock_timeout_ms": math.ceil(self.lock_timeout * 1000),
            "statement_timeout_ms": math.ceil((self.statement_timeout or 0) * 1000),
        }

    def connect(self, *, autocommit: bool = True) -> Conn:
        """A new connection; transactions are explicit (`transaction`) unless autocommit=False
        (then the caller sends `settings_sql()` at the start of each transaction)."""
        try:
            conn = psycopg.connect(
                libpq_url(self.url),
                autocommit=autocommit,
                # The only startup parameter: poolers pass it on, and refuse most others.
                application_name=self.application_name,
                # Never prepare server-side: a pooler may run the next transaction on a server
                # connection that has not seen the statement (or has one of the same name).
                prepare_threshold=None,
                connect_timeout=10,
            )
        except (psycopg.Error, ValueError) as exc:
            raise self.error(exc, connecting=True) from None
        set_json_loads(_json_loads, conn)  # every claimed schedule's `updates`
        # An application's uuid ids (schedules, flags) are read as text: flagsched passes them
        # back as it read them and prints them as they are.
        conn.adapters.register_loader("uuid", TextLoader)
        return conn

    def error(
        self, exc: BaseException, *, connecting: bool = False, conn: Conn | None = None
    ) -> FlagschedError:
        """A driver error as a flagsched error: one line, naming the database by host, port
        and name (never the URL), withheld whole if the driver's text quotes the password."""
        problem = database_url_problem(self.url)
        if problem is not None:  # libpq's own words may quote a misread part of the password
            return DatabaseUnavailable(f"could not connect: the database URL: {problem}")
        # The server never has the password to quote: its messages (with a SQLSTATE) are
        # shown as they are, a flag key that happens to contain the password included. Only
        # the client library's own text is withheld if it quotes the password.
        client_side = getattr(exc, "sqlstate", None) is None
        reason = one_line(_without_long_context(exc), url_secrets(self.url) if client_side else ())
        if connecting or connection_lost(exc, conn):
            return DatabaseUnavailable(
                f"could not connect to {describe_database(self.url)}: {reason}"
            )
        return DatabaseError(f"database error: {reason}")

    @contextmanager
    def errors(self, conn: Conn | None = None) -> Iterator[None]:
        """Translate driver errors raised inside into flagsched errors."""
        try:
            yield
        except psycopg.Error as exc:
            raise self.error(exc, conn=conn) from None


# A server error's CONTEXT (where in a function it arose) is kept up to this many characters
# at its start and at its end (the function and line): inside a stored function it quotes
# the whole statement (10,000 characters for the claim).
CONTEXT_SHOWN = 200


def _without_long_context(exc: BaseException) -> str:
    """The driver's text of `exc`, a long CONTEXT cut in its middle."""
    text = str(exc)
    diag = getattr(exc, "diag", None)
    context = getattr(diag, "context", None)
    if not context or len(context) <= 2 * CONTEXT_SHOWN:
        return text
    cut = f"{context[:CONTEXT_SHOWN]} ... {context[-CONTEXT_SHOWN:]}"
    return text.replace(context, cut, 1)


def _json_loads(data: bytes | str) -> Any:
    """orjson; the standard library for what orjson refuses and jsonb holds (1e400); and for
    what neither reads (nested too deep), an Unreadable that fails its row, not the tick.
    An object holding a non-integral number is read again with the number exact (Decimal):
    jsonb's numbers are exact, a float is not (50.000000000000001 is not 50)."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        pass
    else:
        if not (isinstance(value, dict) and any(type(v) is float for v in value.values())):
            return value
    try:
        return json.loads(data, parse_float=Decimal)
    except RecursionError:
        return Unreadable("nested too deeply")
    except ValueError as exc:
        return Unreadable(one_line(str(exc)))


# Connection exceptions (class 08), and the server going away (admin or crash shutdown,
# starting up or shutting down): the database is unavailable, not a statement wrong.
_UNAVAILABLE_SQLSTATES = ("57P01", "57P02", "57P03")


def connection_lost(exc: BaseException, conn: Conn | None = None) -> bool:
    """Did `exc` lose the connection? Decided by SQLSTATE and the connection's state, never
    by the message's wording (which changes with the server's language and version)."""
    if conn is not None and conn.broken:
        return True
    if not isinstance(exc, psycopg.OperationalError):
        return False
    sqlstate = exc.sqlstate
    # No SQLSTATE: the client library itself failed (the socket closed, the server vanished).
    return sqlstate is None or sqlstate.startswith("08") or sqlstate in _UNAVAILABLE_SQLSTATES


@contextmanager
def connection(database: Database) -> Iterator[Conn]:
    """One connection for a whole command (batches reuse it), errors translated."""
    conn = database.connect()
    try:
        with database.errors(conn):
            yield conn
    finally:
        conn.close()


@contextmanager
def transaction(database: Database, conn: Conn, *, rollback: bool = False) -> Iterator[None]:
    """One transaction on `conn` (autocommit), started with the session settings in the same
    round trip: committed on success (unless `rollback`), rolled back on error, errors
    translated. Savepoints inside are psycopg's `conn.transaction()`; so is this, when `conn`
    is already in a transaction."""
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        with database.errors(conn), conn.transaction(force_rollback=rollback):
            yield
        return
    with database.errors(conn):
        conn.execute(database.begin_sql())
        try:
            yield
        except BaseException:
            _rollback_quietly(conn)
            raise
        if rollback:
            conn.rollback()
        else:
            conn.commit()


def _rollback_quietly(conn: Conn) -> None:
    """Roll back after an error; a connection that is gone has nothing to roll back, and the
    error that got us here is the one to report."""
    if conn.closed or conn.broken:
        return
    with suppress(psycopg.Error):
        conn.rollback()


@contextmanager
def begin(database: Database) -> Iterator[Conn]:
    """A connection inside one transaction, committed on success, errors translated."""
    with connection(database) as conn, transaction(database, conn):
        yield conn
