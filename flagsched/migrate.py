"""Schema migrations from code: alembic is imported only here, only by `flagsched migrate`."""

from __future__ import annotations

import importlib.util
import re
import threading
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TextIO

from sqlalchemy import event as sa_event
from sqlalchemy.engine import Connection, Engine

from flagsched import policy, repository
from flagsched.db import Conn, Database
from flagsched.db import begin as db_begin
from flagsched.errors import ConfigError, CouldNotRun, LockNotGranted, UnsupportedDatabase
from flagsched.schema import begin, connect
from flagsched.sql import Tables
from flagsched.tables import SCHEDULE_OPTIONAL, Configuration, QualifiedName, check

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


def check_configuration(database: Database, configuration: Configuration) -> list[str]:
    """Each way `configuration` does not fit the live tables, one line each (empty: it fits).
    Reads the catalog only, in a transaction of its own: changes nothing."""
    if configuration.flags is None:
        return []
    schedules = configuration.schedules
    with db_begin(database) as conn:
        flags = repository.catalog_table(conn, configuration.flags.table)
        found = repository.catalog_table(conn, schedules.table) if schedules else None
    return check(configuration, flags, found)


def adopt(database: Database, configuration: Configuration) -> list[str]:
    """Create flagsched's schema, tables, stored objects and triggers beside an application's
    tables (issue 18), what is missing of them: idempotent, and safe when several run at
    once. Returns what it made.

    First, from the catalog alone (no lock on any table), whether there is anything to do:
    every deploy runs `migrate`, and one that has nothing to do returns at once, even while
    the application holds its tables locked. Otherwise in one transaction under the
    migration lock, in which every lock on a table is waited for at most
    `policy.lock_attempts`' wait (a lock request waiting in a table's queue holds the
    application's writes behind it): a lock not granted rolls it all back, and it is tried
    again after a pause, within FLAGSCHED_LOCK_TIMEOUT in all; then it fails (exit 3),
    having changed nothing."""
    from flagsched.sql.stored import SCHEDULE_TRIGGER

    with db_begin(database) as conn:
        tables, facts = _refused_or_mapped(conn, configuration)
        if not repository.adopt_needed(conn, tables, facts):
            return []
    wait, pauses = policy.lock_attempts(database.lock_timeout)
    busy: LockNotGranted | None = None
    for pause in pauses:
        time.sleep(pause)
        try:
            with db_begin(database) as conn:
                repository.take_migration_lock(conn)
                tables, facts = _refused_or_mapped(conn, configuration)
                repository.set_lock_timeout(conn, wait)
                made = repository.adopt(conn, tables, facts)
        except LockNotGranted as exc:
            busy = exc
            continue
        if f"trigger {SCHEDULE_TRIGGER}" in made:
            _note_inserted_meanwhile(database, tables)
        return made
    assert busy is not None
    raise CouldNotRun(
        f"{busy.what} stayed locked by other transactions: `flagsched migrate` tried "
        f"{len(pauses)} times in {database.lock_timeout:g} s (FLAGSCHED_LOCK_TIMEOUT), waiting "
        f"at most {wait:g} s each time, and changed nothing; run it again"
    )


def _note_inserted_meanwhile(database: Database, tables: Tables) -> None:
    """The rows the application inserted while flagsched's trigger on its schedules table was
    being added: noted now, or, when the table stays locked, by the next tick (the open ones:
    `note_unseen_schedules`)."""
    try:
        with db_begin(database) as conn:
            repository.note_every_schedule(conn, tables)
    except LockNotGranted as exc:
        from flagsched import logs

        logs.get_logger().warning("migrate_note_deferred", table=exc.what, error=exc.message)


def _refused_or_mapped(conn: Conn, configuration: Configuration) -> tuple[Tables, dict[str, str]]:
    """Why flagsched's schema cannot take `configuration` (ConfigError), else its mapping as
    the catalog completes it (the columns an application's schedules table lacks) and the
    facts flagsched's own objects are rendered with. Catalog reads only."""
    tables = configuration.tables()
    # the scope's columns first, then the schedules relation: each message names the
    # difference that matters, and what to do about it
    refused = _another_scope(conn, configuration, tables)
    if refused is None:
        refused = _another_schedules_mapping(
            configuration, tables, repository.schedules_relation(conn, tables)
        )
    if refused is None:
        refused = _serves_another(configuration, repository.triggers_in_schema(conn, tables))
    if refused is None:
        refused = _another_schema(configuration, repository.served_elsewhere(conn, tables))
    if refused is not None:
        raise ConfigError(refused)
    facts: dict[str, str] = {}
    if configuration.schedules is not None and tables.app_schedules is not None:
        # the view over the application's schedules table reads the built-in columns it
        # has, and keeps the others in flagsched's state table; the domain of its id is its
        # id's type (both as the catalog says now: migrate checked it first)
        found = repository.catalog_table(conn, configuration.schedules.table)
        assert found is not None
        id_column = found.column(configuration.schedules.id)
        assert id_column is not None
        facts["id_base_type"] = id_column.shown_type
        # the text columns flagsched writes, cut to a varchar's length (stored.py `fit`)
        for column in found.columns:
            length = re.fullmatch(r"character varying\((\d+)\)", column.shown_type)
            if length:
                facts[f"length:{column.name}"] = length.group(1)
        absent = tuple(c for c in SCHEDULE_OPTIONAL if found.column(c) is None)
        tables = replace(tables, app_schedules=replace(tables.app_schedules, absent=absent))
    return tables, facts


# Where the operator reads what to do when a scope's columns change.
SCOPE_COLUMNS_DOC = 'docs/own-tables.md, "Changing a scope\'s columns"'


def _another_scope(conn: Conn, configuration: Configuration, tables: Tables) -> str | None:
    """Why flagsched's schema cannot take this configuration's scope (None: it can). The
    scope's columns are columns of flagsched's own tables (its schedules table on shape 2,
    its history and recurrences tables), each row holding the scope it belongs to; and on
    shape 3 the columns a schedule's flag is returned with (the flag-of function of
    stored/own_schedules.sql, which flagsched's view calls: CREATE OR REPLACE cannot change
    what it returns). They stay those the schema was first migrated with: `migrate` never
    guesses which scope the rows already there belong to."""
    scope = [column for column, _ in tables.scope]
    where = f"{configuration.where}: schema = {configuration.schema!r}"
    own = [tables.changes, tables.recurrences]
    if tables.app_schedules is None:
        own.insert(0, tables.schedules)
    lacking: list[str] = []
    for table in own:
        found = repository.catalog_table(conn, QualifiedName(table.schema, table.name))
        if found is not None:
            lacking += [c for c in scope if found.column(c) is None and c not in lacking]
    if lacking:
        return (
            f"{where} holds flagsched's tables without the scope's column(s) "
            f"{', '.join(lacking)} (made for another scope): a schema keeps the scope's "
            f"columns it was first migrated with; to scope by other columns, see "
            f"{SCOPE_COLUMNS_DOC}"
        )
    if tables.app_schedules is None:
        return None
    returned = repository.flag_of_columns(conn, tables)
    if returned is not None and returned[1:] != scope:
        shown = ", ".join(returned[1:]) or "none"
        return (
            f"{where} holds flagsched's view over an application's schedules table made for "
            f"another scope (its columns: {shown}; this configuration's: "
            f"{', '.join(scope) or 'none'}): a schema keeps the scope's columns it was first "
            f"migrated with; to scope by other columns, see {SCOPE_COLUMNS_DOC}"
        )
    return None


def _serves_another(
    configuration: Configuration, found: list[repository.RecordTrigger]
) -> str | None:
    """Why flagsched's schema cannot serve this configuration (None: it can). One schema
    keeps one flags table's schedules and history: a second flags table's deployment would
    claim, count and prune the first one's rows. And one flags table carries one family of
    record triggers: a second family (another mapping of its columns, or another release's
    rendering) would record every change twice."""
    from flagsched.sql import stored

    ours = {t.name for t in stored.triggers(configuration.tables())}
    record = [t for t in found if t.name.startswith(stored.RECORD_FAMILIES)]
    elsewhere = sorted({t.relation for t in record if not t.here})
    if elsewhere:
        return (
            f"{configuration.where}: schema = {configuration.schema!r} already serves the "
            f"flags table {elsewhere[0]}: give this configuration a schema of its own"
        )
    other = sorted(t.name for t in record if t.here and t.name not in ours)
    if other:
        return (
            f"{configuration.where}: the flags table already has flagsched's record triggers "
            f"of another mapping of its columns or another release ({', '.join(other)}): "
            "deployments of one flags table map the same columns; to change the mapping, "
            "drop those triggers first (docs/own-tables.md)"
        )
    return None


def _another_schema(
    configuration: Configuration, found: repository.ServedElsewhere | None
) -> str | None:
    """Why this configuration's schema cannot serve its tables (None: it can): another
    flagsched schema serves them already. A second schema would put a second family of
    triggers on them (every change of a flag recorded twice; on a schedules table the
    trigger noting its rows is one, so the second schema's state would never be noted)."""
    if found is None:
        return None
    return (
        f"{configuration.where}: the table {found.relation} is served by flagsched's schema "
        f"{found.schema!r} already: deployments of one application's tables share one schema "
        f"(schema = {found.schema!r})"
    )


def _another_schedules_mapping(
    configuration: Configuration, tables: Tables, found: tuple[str, str | None] | None
) -> str | None:
    """Why flagsched's schema cannot take this configuration's schedules (None: it can).
    One schema keeps one schedules relation: flagsched's own table (no `[schedules]`) or its
    view over one application's schedules table, of one mapping (`stored.mapping_digest`):
    another deployment's would read and write through what this one rendered."""
    from flagsched.sql import stored

    if found is None:
        return None
    kind, noted = found
    where = f"{configuration.where}: schema = {configuration.schema!r}"
    if tables.app_schedules is None:
        if kind == "r":
            return None
        return (
            f"{where} serves an application's schedules table ([schedules]): a deployment "
            "without [schedules] needs a schema of its own"
        )
    if kind != "v":
        return (
            f"{where} holds flagsched's own schedules table (a deployment without "
            "[schedules]): with [schedules], give flagsched a schema of its own"
        )
    if noted is None:
        return f"{configuration.where}: {repository.unnoted_view(tables)}"
    if noted != stored.mapping_note(tables):
        return (
            f"{where} serves an application's schedules table with another mapping ([flags], "
            "[schedules], the members of updates or the scope's columns differ): deployments "
            "sharing a schema map the same tables the same way; to change the mapping, drop "
            "flagsched's view first (docs/own-tables.md)"
        )
    return None


def missing(database: Database, configuration: Configuration) -> list[str]:
    """What of the objects this release uses on `configuration`'s tables is missing
    (`--check`): beside an application's tables, after what `migrate` would refuse (exit
    2); on the built-in tables at the latest revision, what was dropped by hand."""
    from flagsched.required import required

    with db_begin(database) as conn:
        if configuration.flags is not None:
            _refused_or_mapped(conn, configuration)
        return repository.missing_objects(conn, required(configuration.tables()))


def open_rows_unindexed(database: Database, configuration: Configuration) -> str | None:
    """The application's schedules table when it has no index of its open rows by flag
    (`migrate` warns: docs/own-tables.md, "Known limit"), else None."""
    tables = configuration.tables()
    with db_begin(database) as conn:
        if repository.open_rows_indexed(conn, tables):
            return None
    from flagsched.required import relation

    assert tables.app_schedules is not None
    return relation(tables.app_schedules)


def current(engine: Engine) -> str | None:
    """The revision the database is at (None: never migrated)."""
    with begin(engine) as conn:
        return _known(repository.schema_revision(_driver(conn)))


# alembic's `context` and `op` are process-wide proxies: two threads migrating at once
# (tests do) must not both be inside alembic; processes are serialised by the database lock.
_ONE_ALEMBIC_AT_A_TIME = threading.Lock()


def upgrade(engine: Engine, revision: str = "head") -> tuple[str | None, str | None]:
    """Upgrade to `revision`, each revision in its own transaction; returns (before, after)."""
    return _run(engine, "upgrade", revision)


def downgrade(engine: Engine, revision: str) -> tuple[str | None, str | None]:
    """Downgrade to `revision` ("base" removes everything); returns (before, after)."""
    return _run(engine, "downgrade", revision)


def _run(engine: Engine, direction: str, revision: str) -> tuple[str | None, str | None]:
    """Run the revisions from the database's to `revision`, one transaction each, so that a
    long one never keeps the locks of those before it, and one that fails leaves those
    before it done. Several migrates at once: every transaction first takes the migration
    lock (transaction-scoped: nothing may outlive a transaction behind a pooler), then reads
    the revision the database is at and plans one step from there; a migrate that waited
    finds the work done and does the next step, or nothing."""
    from alembic.runtime.environment import EnvironmentContext
    from alembic.script import ScriptDirectory

    cfg = config()
    script = ScriptDirectory.from_config(cfg)
    steps_to = script._upgrade_revs if direction == "upgrade" else script._downgrade_revs
    seen: list[str | None] = []  # the revision each transaction found, under the lock
    planned: list[int] = []

    def next_step(heads: Any, _context: Any) -> Any:
        seen.append(_known(heads[0] if heads else None))
        steps = steps_to(revision, heads)[:1]
        planned.append(len(steps))
        return steps

    def lock(conn: Connection) -> None:
        repository.take_migration_lock(_driver(conn))

    with connect(engine) as conn:
        # On every transaction alembic begins on it, after the session settings (per revision,
        # and again after an autocommit_block: CREATE INDEX CONCURRENTLY).
        sa_event.listen(conn, "begin", lock)
        cfg.attributes["connection"] = conn
        while not planned or planned[-1]:
            with (
                _ONE_ALEMBIC_AT_A_TIME,
                EnvironmentContext(cfg, script, fn=next_step, destination_rev=revision),
            ):
                script.run_env()
            if conn.in_transaction():  # nothing left to do: end the read (and the lock)
                conn.commit()
    return seen[0], seen[-1]


def print_sql(stdout: TextIO) -> None:
    """Write the SQL of a full upgrade to `stdout`; touches no database."""
    from alembic import command

    command.upgrade(config(stdout), "head", sql=True)
