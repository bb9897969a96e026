"""Schema migrations from code: alembic is imported only here, only by `flagsched migrate`."""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any, TextIO

from sqlalchemy.engine import Connection, Engine

from flagsched import repository
from flagsched.db import Database
from flagsched.db import begin as db_begin
from flagsched.errors import UnsupportedDatabase
from flagsched.schema import begin

if TYPE_CHECKING:
    from alembic.config import Config


def _script_location() -> str:
    # Shipped inside the wheel as flagsched.migrations (top-level migrations/ in the source).
    spec = importlib.util.find_spec("flagsched.migrations")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("flagsched.migrations is missing from this installation")
    return str(next(iter(spec.submodule_search_locations)))


def config(stdout: TextIO | None = None) -> Config:
    """An alembic Config pointing at the packaged migrations."""
    import sys

    from alembic.config import Config

    cfg = Config(stdout=stdout or sys.stdout)
    cfg.set_main_option("script_location", _script_location())
    return cfg


def head() -> str:
    """The latest revision of the migration scripts."""
    from alembic.script import ScriptDirectory

    revision = ScriptDirectory.from_config(config()).get_current_head()
    assert revision is not None
    return revision


def _driver(conn: Connection) -> Any:
    """The psycopg connection under a SQLAlchemy one (same transaction): repository runs on it."""
    return conn.connection.driver_connection


def _known(found: str | None) -> str | None:
    """`found` if these migration scripts know it; else the database was migrated by another
    (newer?) flagsched, and nothing here can tell what upgrading it would mean."""
    from alembic.script import ScriptDirectory

    if found is not None and found not in {
        script.revision for script in ScriptDirectory.from_config(config()).walk_revisions()
    }:
        raise UnsupportedDatabase(
            f"the database is at revision {found!r}, which this flagsched does not know "
            f"(latest here: {head()}; migrated by a newer version?); nothing was changed"
        )
    return found


def preflight(database: Database) -> None:
    """Refuse a database flagsched cannot work with (SQL_ASCII, an unknown revision) in one
    line, on a plain connection: SQLAlchemy's first connect would fail on SQL_ASCII with a
    TypeError of its own."""
    with db_begin(database) as conn:
        _known(repository.schema_revision(conn))


def current(engine: Engine) -> str | None:
    """The revision the database is at (None: never migrated)."""
    with begin(engine) as conn:
        return _known(repository.schema_revision(_driver(conn)))


def upgrade(engine: Engine, revision: str = "head") -> tuple[str | None, str | None]:
    """Upgrade in one transaction under an advisory lock; returns (before, after)."""
    return _run(engine, "upgrade", revision)


def downgrade(engine: Engine, revision: str) -> tuple[str | None, str | None]:
    """Downgrade to `revision` ("base" removes everything); returns (before, after)."""
    return _run(engine, "downgrade", revision)


def _run(engine: Engine, direction: str, revision: str) -> tuple[str | None, str | None]:
    from alembic import command

    cfg = config()
    with begin(engine) as conn:
        # Two pods starting together: the second waits here, then finds nothing to do.
        repository.take_migration_lock(_driver(conn))
        before = _known(repository.schema_revision(_driver(conn)))
        cfg.attributes["connection"] = conn
        getattr(command, direction)(cfg, revision)
        after = repository.schema_revision(_driver(conn))
    return before, after


def print_sql(stdout: TextIO) -> None:
    """Write the SQL of a full upgrade to `stdout`; touches no database."""
    from alembic import command

    command.upgrade(config(stdout), "head", sql=True)
