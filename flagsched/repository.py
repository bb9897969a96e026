"""Every SQL statement flagsched runs, on a psycopg connection. Callers own the transaction;
the tick passes the database's `now` in."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg
from psycopg.abc import Buffer
from psycopg.rows import RowFactory, class_row, kwargs_row
from psycopg.types.datetime import IntervalLoader, TimestamptzLoader

from flagsched.db import Conn, one_line
from flagsched.errors import (
    DatabaseError,
    LockNotGranted,
    NotPermitted,
    SchemaNotCurrent,
    StatementFailed,
    UnsupportedDatabase,
)
from flagsched.model import (
    AwaitingBacklog,
    Backlog,
    Change,
    Claimed,
    DueRecurrence,
    MadeSchedule,
    Members,
    OnConflict,
    Outcome,
    Result,
    ScheduleId,
    Status,
    Updates,
    Verdict,
    id_order,
    schedule_id,
)
from flagsched.required import (
    REQUIRED,
    Function,
    Required,
    Table,
    Trigger,
    made_by_own_objects,
    relation,
    required,
    tick_calls,
)
from flagsched.sql import UPDATES_MAX_BYTES as UPDATES_MAX_BYTES
from flagsched.sql import Tables, current, statement, stored

if TYPE_CHECKING:  # the configuration's module: only `migrate` reads the catalog
    from flagsched.rows import (
        ActiveRecurrence,
        ApprovalRow,
        ApprovalSubject,
        ChangeRow,
        FailedRow,
        FlagRow,
        LockedSchedule,
        OpenSchedule,
        RecurrenceRow,
        ScheduleRow,
        ShownSchedule,
        StateCounts,
    )
    from flagsched.tables import CatalogTable, QualifiedName

_Row = TypeVar("_Row")

# pg_advisory_xact_lock key for `flagsched migrate` ("flagsch" in ASCII).
MIGRATION_LOCK_KEY = 0x666C6167736368


class _LenientTimestamptz(TimestamptzLoader):
    """A timestamptz Python cannot hold (infinity, BC, past 9999) as PostgreSQL's text,
    so one such row never stops a read command."""

    def load(self, data: Buffer) -> datetime | str:  # type: ignore[override]
        try:
            return super().load(data)
        except psycopg.DataError:
            return bytes(data).decode()


class _LenientInterval(IntervalLoader):
    def load(self, data: Buffer) -> timedelta | str:  # type: ignore[override]
        try:
            return super().load(data)
        except psycopg.DataError:
            return bytes(data).decode()


def _rows(
    conn: Conn,
    factory: RowFactory[_Row],
    sql: str,
    params: Mapping[str, Any] | None = None,
    *,
    lenient: bool = True,
) -> list[_Row]:
    """Rows typed by `factory` (psycopg class_row: a dataclass per row). `lenient`: a stored
    time or interval Python cannot hold (infinity, BC, past year 9999) comes back as
    PostgreSQL's text, so a command that shows rows reads any row (the claim reads its own
    rows clamped, and needs no such care)."""
    with conn.cursor(row_factory=factory) as cur:
        if lenient:
            cur.adapters.register_loader("timestamptz", _LenientTimestamptz)
            cur.adapters.register_loader("interval", _LenientInterval)
        return cur.execute(sql, params).fetchall()


def _claimed(now: datetime, **columns: Any) -> tuple[datetime, Claimed]:
    return now, Claimed(**columns)


def _held(**columns: Any) -> Claimed:
    """A held-back schedule: reported, never attempted (its `updates` is not read)."""
    return Claimed(**columns, updates=None, next_retry_at=None, blocked=True)


def _due_recurrence(now: datetime, **columns: Any) -> tuple[datetime, DueRecurrence]:
    return now, DueRecurrence(**columns)


# The claim's and the recurrences' rows carry the statement's now() first.
_CLAIMED = kwargs_row(_claimed)
_HELD_BACK = kwargs_row(_held)
_DUE_RECURRENCE = kwargs_row(_due_recurrence)


def _scalar(conn: Conn, sql: str, params: Mapping[str, Any] | None = None) -> Any:
    row = conn.execute(sql, params).fetchone()
    return None if row is None else row[0]


def _refuse_sql_ascii(encoding: str | bytes) -> None:
    """A SQL_ASCII database is refused: its text has no encoding, so neither can ours."""
    if isinstance(encoding, bytes):  # psycopg returns text undecoded from SQL_ASCII
        encoding = encoding.decode("ascii", "replace")
    if encoding == "SQL_ASCII":
        raise UnsupportedDatabase(
            "the database's encoding is SQL_ASCII (text without an encoding); flagsched "
            "needs UTF8: create the database with ENCODING 'UTF8'"
        )


def schema_revision(conn: Conn) -> str | None:
    """The alembic revision the database is at, or None when it was never migrated (for
    `migrate`; other commands check the objects they use, see `ensure_schema`)."""
    row = conn.execute(statement("encoding_and_migrated")).fetchone()
    encoding, migrated = row if row is not None else ("", False)
    _refuse_sql_ascii(encoding)
    if not migrated:
        return None
    value = _scalar(conn, statement("schema_revision"))
    return str(value) if value is not None else None


def _lookups(objects: Sequence[Required]) -> list[tuple[str, str, str, str]]:
    """Each object as catalog lookups: (kind, relation, name, how a message names it)."""
    found: list[tuple[str, str, str, str]] = []
    for o in objects:
        if isinstance(o, Table):
            kind = "table" if o.columns else "sequence"
            found.append(("relation", o.name, "", f"{kind} {o.name}"))
            found += [("column", o.name, c, f"column {o.name}.{c}") for c in o.columns]
        elif isinstance(o, Function):
            # a type of flagsched's schema among its arguments (an application's schedule
            # id): looked up first, as to_regprocedure fails on a type that does not exist
            own = next((a.removesuffix("[]") for a in o.arguments if "." in a), "")
            found.append(("function", own, o.signature, f"function {o.signature}"))
        else:
            found.append(("trigger", o.table, o.name, f"trigger {o.name} on {o.table}"))
    return found


def missing_objects(conn: Conn, objects: Sequence[Required] = REQUIRED) -> list[str]:
    """The objects of `objects` the database lacks, named for a message (a missing table
    stands for its columns). A SQL_ASCII database is refused."""
    lookups = _lookups(objects)
    row = conn.execute(
        statement("missing_objects"),
        {
            "kinds": [k for k, _, _, _ in lookups],
            "relations": [r for _, r, _, _ in lookups],
            "names": [n for _, _, n, _ in lookups],
        },
    ).fetchone()
    encoding, positions = row if row is not None else ("", [])
    _refuse_sql_ascii(encoding)
    missing = [lookups[n - 1] for n in positions]
    gone = {relation for kind, relation, _, _ in missing if kind == "relation"}
    named = [
        s
        for kind, relation, _, s in missing
        if kind not in ("column", "trigger") or relation not in gone
    ]
    return list(dict.fromkeys(named))  # a table listed twice is named once


_SHOWN_MISSING = 5  # a message names at most this many, then says how many more


def _shown(names: Sequence[str]) -> str:
    """`names` for a message: the first `_SHOWN_MISSING`, then how many more."""
    more = len(names) - _SHOWN_MISSING
    return ", ".join(names[:_SHOWN_MISSING]) + (f" and {more} more" if more > 0 else "")


def ensure_schema(conn: Conn) -> None:
    """Refuse to work on a database that lacks an object this release uses (on the tables
    of the current mapping). A schema that a later release migrated further is fine: only
    what is missing counts."""
    tables = current()
    if tables.app_schedules is not None:  # first: migrate would refuse this file
        _ensure_own_mapping(conn, tables)
    objects = required(tables)
    missing = missing_objects(conn, objects)
    if not missing:
        return
    if all(f"table {o.name}" in missing for o in objects if isinstance(o, Table) and o.columns):
        raise SchemaNotCurrent("the database is not migrated: run `flagsched migrate`")
    raise SchemaNotCurrent(
        f"the database schema lacks {_shown(missing)}, which "
        "this flagsched uses: run `flagsched migrate` (`flagsched migrate --check` first says "
        "whether the configuration does not match the tables or it was dropped by hand)"
    )


def open_rows_indexed(conn: Conn, tables: Tables) -> bool:
    """An application's schedules table has an index of its open rows by flag (a partial
    index led by its flag reference); True on other shapes, which have flagsched's own."""
    app = tables.app_schedules
    if app is None:
        return True
    mapped = dict(app.columns)
    column = mapped.get("flag_id") or mapped["flag_key"]
    return bool(
        _scalar(conn, statement("open_rows_indexed"), {"relation": relation(app), "column": column})
    )


def ensure_tick_permitted(conn: Conn) -> None:
    """Refuse to tick as a login that may not execute what every tick calls or update the
    flags it writes (exit 3, before anything is claimed): a grant missing after an upgrade's
    migrate would fail each schedule's write in turn and spend its retries. Decided by the
    catalog (`has_function_privilege`), never by an error's wording; a row-level security
    policy refusing one row stays that row's failure."""
    tables = current()
    functions = [f.signature for f in tick_calls(tables)]
    lacking: list[str] = _scalar(
        conn,
        statement("lacking_privileges"),
        {"functions": functions, "tables": [relation(tables.flags)]},
    )
    if lacking:
        raise NotPermitted(
            f"this login ({_scalar(conn, statement('login'))}) lacks {_shown(lacking)}, "
            "which every tick needs: run the "
            "grants again after each migrate (docs/deploy.md); nothing was claimed"
        )


def unnoted_view(tables: Tables) -> str:
    """What to do when flagsched's view over an application's schedules table has lost the
    note of the mapping it was made for (its COMMENT: a restore without comments)."""
    return (
        f"flagsched's view {relation(tables.schedules)} has no note of the mapping it was made "
        "for (restored without comments?): drop it (DROP VIEW ... CASCADE) and run "
        "`flagsched migrate`, which makes it again"
    )


def _ensure_own_mapping(conn: Conn, tables: Tables) -> None:
    """On an application's schedules table: refuse to work through flagsched's view when
    another mapping rendered it (the view dropped and migrated again with another file while
    this deployment kept the old one): this mapping's functions are still there, but the
    view would read and write the application's columns by the other mapping."""
    found = schedules_relation(conn, tables)
    if found is not None and found[0] == "v" and found[1] is None:
        raise SchemaNotCurrent(unnoted_view(tables))
    if found is not None and found[0] == "v" and found[1] != stored.mapping_note(tables):
        raise SchemaNotCurrent(
            f"flagsched's view {relation(tables.schedules)} was migrated with another mapping of "
            "the application's tables (a column, a member of updates or a scope column differs "
            "from this configuration's): give this deployment the configuration that migrated "
            "it (`flagsched migrate --check` with this one names what does not match the "
            "tables), or run `flagsched migrate` with this one once the view is dropped "
            "(docs/own-tables.md)"
        )


def catalog_table(conn: Conn, name: QualifiedName) -> CatalogTable | None:
    """What the catalog says of a configured table (None: no such relation)."""
    from flagsched.tables import CatalogColumn, CatalogTable

    found = conn.execute(
        statement("catalog_table"), {"schema": name.schema, "name": name.name}
    ).fetchone()
    if found is None:
        return None
    oid, kind, shown, schema = found
    columns = _rows(conn, class_row(CatalogColumn), statement("catalog_columns"), {"oid": oid})
    unique = conn.execute(statement("catalog_unique_indexes"), {"oid": oid}).fetchall()
    return CatalogTable(
        shown=shown,
        kind=kind,
        # an enum's labels arrive as a list: a tuple keeps the frozen row hashable
        columns=tuple(
            c if c.labels is None else replace(c, labels=tuple(c.labels)) for c in columns
        ),
        unique=tuple(frozenset(index) for (index,) in unique),
        schema=schema,
    )


def adopt_needed(conn: Conn, tables: Tables, facts: Mapping[str, str]) -> bool:
    """Whether `adopt` has anything to do: reads the catalog only, so it takes no lock on any
    table (every deploy runs `migrate`; one that has nothing to do never queues behind the
    application's locks)."""
    return _own_objects_stale(conn, tables, facts) or bool(
        missing_objects(
            conn,
            (
                *required(tables),
                *(Trigger(_on(tables, t), t.name) for t in stored.triggers(tables)),
            ),
        )
    )


def _on(tables: Tables, trigger: stored.Trigger) -> str:
    """The relation a trigger of `stored.triggers` is on."""
    table = tables.table(trigger.table)
    assert table is not None, trigger.table
    return relation(table)


def _own_objects_stale(conn: Conn, tables: Tables, facts: Mapping[str, str]) -> bool:
    """Whether flagsched's own schema, tables, view and the functions made with them
    (stored/own_tables.sql or own_schedules.sql) are not as this release renders them for
    this mapping: the text `flagsched migrate` last ran there is not the one it would run
    now (the note on the ramp groups' sequence, `stored.objects_note`), or one of them is
    missing. Catalog only."""
    if _scalar(conn, statement("own_objects_note"), {}) != stored.objects_note(tables, facts):
        return True
    return bool(missing_objects(conn, made_by_own_objects(tables)))


def set_lock_timeout(conn: Conn, seconds: float) -> None:
    """How long each later statement of this transaction waits for a lock."""
    ms = max(1, math.ceil(seconds * 1000))
    conn.execute(statement("set_lock_timeout", literals={"lock_timeout_ms": ms}))


@contextmanager
def _locking(what: str) -> Iterator[None]:
    """A lock not granted within the lock timeout inside, as LockNotGranted naming `what`."""
    try:
        yield
    except psycopg.errors.LockNotAvailable as exc:
        raise LockNotGranted(reason(exc), what) from exc


def adopt(conn: Conn, tables: Tables, facts: Mapping[str, str]) -> list[str]:
    """Create what flagsched keeps beside an application's tables (issue 18) that is missing:
    its schema, own tables, view and the functions made with them when they are not as this
    release renders them (`_own_objects_stale`), the stored objects of this mapping that are
    missing (their names carry a digest of their text: present means identical), and the
    triggers that are missing (by name): four eyes' on flagsched's own tables (also on
    tables an earlier release made without them), then the record triggers on the flags
    table and, over an application's schedules table, the one on it. Returns what it
    created, for the log. The caller holds the migration lock; never alters an application
    table but for those triggers, added last, so that their locks are held only while they
    are added until the caller commits. A lock not granted in time is LockNotGranted (the
    caller rolls back and tries again)."""
    made: list[str] = []
    read = [relation(tables.flags)]
    if tables.app_schedules is not None:
        read.append(relation(tables.app_schedules))
    missing = [
        t
        for t in stored.triggers(tables)
        if _scalar(conn, statement("trigger_missing"), {"relation": _on(tables, t), "name": t.name})
    ]
    on_application = [t for t in missing if t.table in ("flags", "app_schedules")]
    # what reads the application's tables (a SQL function's body, the view) waits only for
    # a lock that conflicts with reading them (ACCESS EXCLUSIVE)
    with _locking(
        f"the tables flagsched's objects read ({', '.join(read)}) or one of flagsched's own"
    ):
        if _own_objects_stale(conn, tables, facts):
            conn.execute(stored.own_tables(tables, facts))
            note = stored.objects_note(tables, facts)
            conn.execute(statement("note_own_objects", literals={"note": note}), {})
            made.append(note)
        for signature, create in stored.creates(tables, stored.ADOPTED_ROUTINES):
            if _scalar(conn, statement("routine_missing"), {"signature": signature}):
                conn.execute(create)
                made.append(f"function {signature}")
        for trigger in (t for t in missing if t not in on_application):
            conn.execute(trigger.create)
            made.append(f"trigger {trigger.name}")
        if any(t.table == "app_schedules" for t in on_application):
            # the rows the application's table holds, read before any lock its writers
            # wait for is taken (`flagsched migrate` notes again, after commit, those
            # inserted meanwhile)
            note_every_schedule(conn, tables)
    # last: from here to the caller's commit, the application's writers wait
    for trigger in on_application:
        with _locking(f"the table {_on(tables, trigger)}"):
            conn.execute(trigger.create)
        made.append(f"trigger {trigger.name}")
    return made


def note_every_schedule(conn: Conn, tables: Tables) -> None:
    """On an application's schedules table (`tables.app_schedules`), a state row for each of
    its rows that has none (`flagsched migrate`: those it held before flagsched's trigger)."""
    assert tables.app_schedules is not None
    with _locking(f"the table {relation(tables.app_schedules)}"):
        conn.execute(statement("note_every_schedule", tables=tables))


def schedules_relation(conn: Conn, tables: Tables) -> tuple[str, str | None] | None:
    """(relkind, the mapping noted on it) of flagsched's schedules relation (None: none)."""
    row = conn.execute(
        statement("schedules_relation"), {"relation": relation(tables.schedules)}
    ).fetchone()
    return None if row is None else (str(row[0]), row[1])


def flag_of_columns(conn: Conn, tables: Tables) -> list[str] | None:
    """On an application's schedules table (shape 3): the columns flagsched's function giving
    a schedule's flag returns for this mapping's reference to flags (its key, then the
    scope's columns, as the schema was migrated), None when there is none."""
    app = tables.app_schedules
    assert app is not None
    by_id = dict(app.columns).get("flag_id") is not None
    found = _scalar(
        conn,
        statement("flag_of_columns"),
        {
            "schema": tables.schedules.schema or "public",
            "flags": relation(tables.flags),
            "id": tables.flags.column("id") if by_id else None,
        },
    )
    return None if found is None else [str(c) for c in found]


def note_unseen_schedules(conn: Conn, ids: Sequence[ScheduleId] = ()) -> None:
    """On an application's schedules table, a state row for each open row that has none
    (inserted while flagsched's trigger was not there or not firing, e.g. a restore with
    triggers disabled), and for the rows of `ids` (as an operator gave them), so the view
    (and what changes schedules through it) sees them. A no-op on other shapes."""
    if current().app_schedules is not None:
        conn.execute(statement("note_unseen_schedules"), {"ids": [str(i) for i in ids]})


@dataclass(frozen=True, slots=True)
class RecordTrigger:
    """A trigger whose function lives in flagsched's schema: on which table, its name, and
    whether that table is this configuration's flags table."""

    relation: str
    name: str
    here: bool


def triggers_in_schema(conn: Conn, tables: Tables) -> list[RecordTrigger]:
    """The triggers flagsched's schema (`tables.fn.schema`) serves, on any table."""
    return _rows(
        conn,
        class_row(RecordTrigger),
        statement("record_triggers_in_schema"),
        {"schema": tables.fn.schema, "relation": relation(tables.flags)},
    )


@dataclass(frozen=True, slots=True)
class ServedElsewhere:
    """An application's table whose flagsched triggers belong to another flagsched schema."""

    relation: str
    schema: str


def served_elsewhere(conn: Conn, tables: Tables) -> ServedElsewhere | None:
    """The first of the configuration's application tables (flags, schedules) that carries
    flagsched's triggers of another schema than `tables.fn.schema` (None: none does)."""
    found = _rows(
        conn,
        class_row(ServedElsewhere),
        statement("flagsched_triggers_of_other_schemas"),
        {
            "schema": tables.fn.schema,
            "flags": relation(tables.flags),
            "schedules": None if tables.app_schedules is None else relation(tables.app_schedules),
        },
    )
    return found[0] if found else None


def take_migration_lock(conn: Conn) -> None:
    """Serialise concurrent `flagsched migrate` runs until this transaction ends."""
    conn.execute(statement("migration_lock"), {"key": MIGRATION_LOCK_KEY})


def db_now(conn: Conn) -> datetime:
    """The database's clock (the transaction's start), the only clock a tick uses."""
    value: datetime = _scalar(conn, statement("db_now"))
    return value


def flags_have(column: str) -> bool:
    """Whether the flags table has `column` (`rollout`, `updated_at`): an application's may
    not."""
    logical = {"rollout": "rollout_percentage"}.get(column, column)
    return current().flags.has(logical)


def members() -> Members:
    """The members of `updates` on the current mapping: named as an application's schedules
    table writes them (its configuration's `updates_enabled`, `updates_rollout`), and
    whether the flags table takes a rollout."""
    enabled, rollout = current().members
    return Members(enabled, rollout, flags_have("rollout"))


def claim(
    conn: Conn, *, limit: int, lock: bool = True, max_lateness_seconds: float | None = None
) -> tuple[datetime | None, list[Claimed]]:
    """Lock and return up to `limit` schedules due at the database's now(), ordered by flag
    then (scheduled_at, id), with that now() (None when nothing was claimed). A schedule
    awaiting approval is not due until it is past its lateness (`max_lateness_seconds`, or
    its expires_at). Without `lock`, the same rows read in a read-only transaction, locking
    none (a preview). With `lock`, a claimed row behind an earlier open schedule of its flag
    that is not claimed, read again in a statement after the claim's (queries.sql
    `earlier_open_outside`: one made open while the claim ran), is `blocked` too."""
    if not lock:
        read_only(conn)
    rows = _rows(
        conn,
        _CLAIMED,
        statement("claim"),
        {
            "limit": limit,
            "lock": lock,
            "scope": current().scope_parameter(),
            "lateness": max_lateness_seconds,
        },
        lenient=False,
    )
    claimed = [claimed for _, claimed in rows]
    if lock and claimed:
        late = {
            schedule_id(i)
            for (i,) in conn.execute(
                statement("earlier_open_outside"), {"ids": [c.id for c in claimed]}
            )
        }
        claimed = [replace(c, blocked=True) if c.id in late else c for c in claimed]
    return (rows[0][0] if rows else None), claimed


def held_back(
    conn: Conn, *, limit: int, max_lateness_seconds: float | None = None
) -> list[Claimed]:
    """Up to `limit` due schedules held back behind an earlier open schedule of their flag
    that is not due, or awaiting approval (stored/held_back.sql): never claimed, locked by
    nothing, only reported. Ordered by flag, then (scheduled_at, id)."""
    return _rows(
        conn,
        _HELD_BACK,
        statement("held_back"),
        {
            "limit": limit,
            "scope": current().scope_parameter(),
            "lateness": max_lateness_seconds,
        },
        lenient=False,
    )


def lock_flags(conn: Conn, keys: Sequence[str], *, wait: bool) -> dict[str, FlagRow]:
    """Four eyes: lock these flags as the write locks them (FOR NO KEY UPDATE, in key order)
    and read their values. Without `wait`, flags another session holds are left out; with
    it (one flag), a lock not granted within lock_timeout fails the statement."""
    from flagsched.rows import FlagRow

    if wait:
        found = [
            row
            for key in keys
            for row in _rows(conn, class_row(FlagRow), statement("lock_flag_waiting"), {"key": key})
        ]
    else:
        found = _rows(conn, class_row(FlagRow), statement("lock_flags"), {"keys": list(keys)})
    return {row.key: row for row in found}


def mark_awaiting(conn: Conn, ids: Sequence[ScheduleId], *, now: datetime) -> None:
    """These due schedules await approval from `now` on: the claim passes them over."""
    if ids:
        conn.execute(statement("mark_awaiting"), {"ids": list(ids), "now": now})


def awaiting_backlog(conn: Conn, *, now: datetime) -> AwaitingBacklog:
    """How many schedules due at `now` await approval, and how long the oldest has waited."""
    return _rows(conn, class_row(AwaitingBacklog), statement("awaiting_backlog"), {"now": now})[0]


def approvals_of(
    conn: Conn, ids: Sequence[ScheduleId]
) -> dict[ScheduleId, tuple[ApprovalRow, ...]]:
    """The verdicts on these schedules, oldest first, by schedule id."""
    from flagsched.rows import ApprovalRow

    found: dict[ScheduleId, list[ApprovalRow]] = {}
    if ids:
        for row in _rows(
            conn, class_row(ApprovalRow), statement("approvals_of"), {"ids": list(ids)}
        ):
            found.setdefault(row.schedule_id, []).append(row)
    return {k: tuple(v) for k, v in found.items()}


def approval_subject(conn: Conn, schedule_id: ScheduleId) -> ApprovalSubject:
    """What `approve` checks of a schedule it holds the lock of."""
    from flagsched.rows import ApprovalSubject

    return _rows(
        conn, class_row(ApprovalSubject), statement("approval_subject"), {"i": schedule_id}
    )[0]


def add_verdict(conn: Conn, schedule_id: ScheduleId, verdict: str, note: str | None) -> str:
    """Record a verdict by this login (session_user, set by the database); returns it.
    The database refuses an approval by the schedule's creator (check_violation)."""
    row = conn.execute(
        statement("add_verdict"), {"i": schedule_id, "verdict": verdict, "note": note}
    ).fetchone()
    return "" if row is None else str(row[0])


def clear_awaiting(conn: Conn, schedule_id: ScheduleId) -> None:
    """Approved: the claim takes the schedule again."""
    conn.execute(statement("clear_awaiting"), {"i": schedule_id})


def mark_rejected(conn: Conn, schedule_id: ScheduleId) -> None:
    """Rejected: cancelled (the verdict says who and why)."""
    conn.execute(statement("mark_rejected"), {"i": schedule_id})


def apply(
    conn: Conn,
    changes: Sequence[Change],
    *,
    wait: bool,
    max_lateness_seconds: float | None,
) -> dict[int, tuple[Verdict, str | None]]:
    """Write `changes` (in order: flag, then scheduled_at, id) with stored/apply.sql:
    under the flags' FOR NO KEY UPDATE row locks (SKIP LOCKED, or waited
    for with `wait`; a row referencing a flag by foreign key never blocks them) each change
    is decided (missing, busy, expired, conflict) and the rest written set-based, each
    flag's changes folded. Returns {index: (verdict, error)} for the changes that did not
    apply; a write that fails fails the statement (the caller's savepoint isolates it)."""
    rows = conn.execute(
        statement("apply"),
        {
            "ids": [c.schedule.id for c in changes],
            "keys": [c.schedule.flag_key for c in changes],
            "enabled": [c.updates.enabled for c in changes],
            "rollout": [c.updates.rollout_percentage for c in changes],
            "lateness": max_lateness_seconds,
            "wait": wait,
            "scope": current().scope_parameter(),
        },
    ).fetchall()
    return {int(item) - 1: (Verdict(outcome), message) for item, outcome, message in rows}


def safety_checks(
    conn: Conn, ids: Sequence[ScheduleId], *, max_lateness_seconds: float | None
) -> dict[ScheduleId, tuple[Verdict, str]]:
    """The expired / conflict verdicts the write would reach now (for --dry-run; no lock)."""
    rows = conn.execute(
        statement("safety_checks"),
        {"ids": list(ids), "lateness": max_lateness_seconds},
    ).fetchall()
    return {schedule_id(i): (Verdict(outcome), str(message)) for i, outcome, message in rows}


FOREIGN_KEY_VIOLATION = "23503"  # SQLSTATE: a row of another table references it


@contextmanager
def savepoint(conn: Conn) -> Iterator[None]:
    """A savepoint; a driver error inside rolls back to it and becomes a StatementFailed.
    Its statements are named ones (queries.sql), like every other statement sent."""
    try:
        conn.execute(statement("savepoint"))
        try:
            yield
        except BaseException:
            with suppress(psycopg.Error):  # a connection gone has nothing to roll back
                conn.execute(statement("rollback_to_savepoint"))
                conn.execute(statement("release_savepoint"))
            raise
        conn.execute(statement("release_savepoint"))
    except psycopg.Error as exc:
        raise StatementFailed(reason(exc), exc.sqlstate) from exc


def reason(exc: psycopg.Error) -> str:
    """The server's primary message and SQLSTATE, one line (no CONTEXT or driver noise)."""
    primary = exc.diag.message_primary
    if primary:
        return one_line(f"{primary} (SQLSTATE {exc.sqlstate or '?'})", [])
    return one_line(str(exc), [])


def read_only(conn: Conn) -> None:
    """The transaction reads only (a preview, the projections): it locks and writes nothing."""
    conn.execute(statement("read_only"))


def cancel_running_statement(conn: Conn) -> None:
    """Ask the server to cancel what this connection is running (safe from a signal handler)."""
    conn.cancel_safe(timeout=1.0)


def record(
    conn: Conn, results: Sequence[Result], *, now: datetime, notice: str | None = None
) -> list[tuple[ScheduleId, str]]:
    """Write every applied / retry / failed outcome of a batch, and its attempt, in one
    statement (applied ids travel as one array: the common case carries little); `notice`,
    when given, is NOTIFYed in the same statement (delivered at commit). Returns what an
    application's schedules table refused to take (id, why); flagsched's own table takes
    every row."""
    applied = [r.schedule for r in results if r.outcome is Outcome.APPLIED]
    failed = [r for r in results if r.outcome in (Outcome.RETRY, Outcome.FAILED)]
    if not applied and not failed:
        return []
    on_app_table = current().app_schedules is not None
    ran = conn.execute(
        statement("record_app" if on_app_table else "record"),
        {
            "applied": [c.id for c in applied],
            "applied_made": [c.attempts_made for c in applied],
            "failed": [r.schedule.id for r in failed],
            "failed_made": [r.schedule.attempts_made for r in failed],
            "outcomes": [r.outcome.value for r in failed],
            "next": [r.next_retry_at for r in failed],
            "errors": [r.error for r in failed],
            "max": [r.max_retries for r in failed],
            "now": now,
            "at": now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),  # once, not per row
            "notice": notice,
        },
    )
    return [(schedule_id(i), str(m)) for i, m in ran.fetchall()] if on_app_table else []


def list_failed(
    conn: Conn,
    *,
    permanent: bool | None,
    flag_key: str | None,
    limit: int,
) -> list[FailedRow]:
    """Failed schedules, most recently failed first; `permanent` filters by waiting/for good."""
    from flagsched.rows import FailedRow

    where = ["failed"]
    if permanent is True:
        where.append("for_good")
    elif permanent is False:
        where.append("waiting_row")
    if flag_key is not None:
        where.append("of_flag")
    return _rows(
        conn,
        class_row(FailedRow),
        statement("list_failed", where=where),
        {"flag_key": flag_key, "limit": limit},
    )


# --- operators -------------------------------------------------------------------------


def backlog(conn: Conn, *, now: datetime) -> Backlog:
    """Due count, oldest due time (and its age in seconds, a time before year 1 counted from
    year 1), next due time; index scans only (runs every tick and for `status --max-lag`)."""
    return _rows(
        conn,
        class_row(Backlog),
        statement("backlog"),
        {"now": now},
    )[0]


def state_counts(conn: Conn, *, now: datetime) -> StateCounts:
    """Schedules per state (one pass over the table: for `status`, not for the tick)."""
    from flagsched.rows import StateCounts

    return _rows(conn, class_row(StateCounts), statement("state_counts"), {"now": now})[0]


def existing_flags(conn: Conn, keys: Sequence[str]) -> set[str]:
    """Which of `keys` name a flag that exists."""
    rows = conn.execute(statement("existing_flags"), {"keys": list(keys)}).fetchall()
    return {row[0] for row in rows}


def insert_schedule(
    conn: Conn,
    *,
    flag_key: str,
    at: datetime | None,
    updates: Updates,
    max_retries: int | None,
    expires_after: timedelta | None = None,
    on_conflict: OnConflict = OnConflict.FAIL,
    needs_approval: bool = False,
) -> ScheduleId:
    """A new pending schedule; `at` None means the database's now(); expires_at is
    scheduled_at + expires_after; `needs_approval`: a second person must approve it."""
    new_id = _scalar(
        conn,
        statement("insert_schedule"),
        {
            "k": flag_key,
            "at": at,
            "u": json.dumps(updates.as_json()),
            "m": max_retries,
            "e": expires_after,
            "c": on_conflict.value,
            "approval": needs_approval,
        },
    )
    return schedule_id(new_id)


# What the database says of an id that cannot be one of the table's (not a uuid, a number
# out of range, too long): that no schedule has it.
_NOT_AN_ID = frozenset({"22P02", "22003", "22001"})


def _by_id(
    conn: Conn, factory: RowFactory[_Row], name: str, schedule_id: ScheduleId
) -> _Row | None:
    """The row statement `name` returns for one schedule id an operator gave. On an
    application's schedules table the id is text the database reads as the id's type; an id
    of the wrong form is an id no schedule has (in a savepoint: the transaction goes on)."""
    if current().app_schedules is None or isinstance(schedule_id, int):
        rows = _rows(conn, factory, statement(name), {"i": schedule_id})
        return rows[0] if rows else None
    try:
        with savepoint(conn):
            rows = _rows(conn, factory, statement(name), {"i": schedule_id})
    except StatementFailed as exc:
        if exc.sqlstate in _NOT_AN_ID:
            return None
        raise
    return rows[0] if rows else None


def lock_schedule(conn: Conn, schedule_id: ScheduleId) -> LockedSchedule | None:
    """Lock one schedule (waiting for a tick that holds it to commit) and return it."""
    from flagsched.rows import LockedSchedule

    return _by_id(conn, class_row(LockedSchedule), "lock_schedule", schedule_id)


def newer_applied_exists(conn: Conn, schedule_id: ScheduleId) -> bool:
    """Has a later schedule of the same flag, in (scheduled_at, id) order, been applied?
    Later schedules a tick has claimed but not committed count: their row locks are waited
    for first (up to lock_timeout; past it the statement fails and the caller says busy),
    and the check then reads what the tick committed (a new statement, a new snapshot)."""
    conn.execute(
        statement("lock_later_open"),
        {"i": schedule_id},
    )
    found = _scalar(
        conn,
        statement("later_applied_exists"),
        {"i": schedule_id},
    )
    return found is True


def reset_for_retry(conn: Conn, schedule_id: ScheduleId) -> None:
    """failed -> pending with retry_count 0; last_error stays until it applies. A retry is a
    review: conflicts count from now on, and lateness (and an expires_at, shifted by as much
    as the schedule was late) restarts here."""
    conn.execute(
        statement("reset_for_retry"),
        {"i": schedule_id},
    )


def mark_cancelled(conn: Conn, schedule_id: ScheduleId) -> None:
    conn.execute(statement("mark_cancelled"), {"i": schedule_id})


# --- the record ------------------------------------------------------------------------


def history(
    conn: Conn,
    *,
    flag_key: str | None,
    since: datetime | None,
    limit: int,
    since_now: bool = False,
) -> list[ChangeRow]:
    """Changes of flags, newest first (index scans on idx_changes_flag / _changed_at);
    `since_now`: changes from the database's now() on."""
    from flagsched.rows import ChangeRow

    where = []
    if flag_key is not None:
        where.append("of_flag")
    if since is not None or since_now:
        where.append("changed_since")
    order = "newest_of_flag" if flag_key is not None else "newest"
    return _rows(
        conn,
        class_row(ChangeRow),
        statement("history", where=where, order=order),
        {"flag_key": flag_key, "since": since, "limit": limit},
    )


def changes_of(conn: Conn, schedule_id: ScheduleId, flag_key: str) -> list[ChangeRow]:
    """The history entries that applied this schedule, oldest first."""
    from flagsched.rows import ChangeRow

    return _rows(
        conn,
        class_row(ChangeRow),
        statement("changes_of"),
        {"k": flag_key, "i": schedule_id},
    )


def show_schedule(conn: Conn, schedule_id: ScheduleId) -> ShownSchedule | None:
    """One schedule with everything `show` prints but its changes."""
    from flagsched.rows import ShownSchedule

    return _by_id(conn, class_row(ShownSchedule), "show_schedule", schedule_id)


def prune_history_batch(conn: Conn, *, older_than_seconds: float, limit: int) -> int:
    """Delete up to `limit` history rows older than that that no open schedule's conflict
    check still needs; returns how many."""
    rows = conn.execute(
        statement("prune_history_batch"),
        {"seconds": older_than_seconds, "limit": limit},
    ).fetchall()
    return len(rows)


def count_prunable_history(conn: Conn, *, older_than_seconds: float) -> int:
    return int(
        _scalar(
            conn,
            statement("count_prunable_history"),
            {"seconds": older_than_seconds},
        )
    )


def count_prunable(conn: Conn, *, older_than_seconds: float) -> dict[str, int]:
    rows = conn.execute(
        statement("count_prunable"),
        {"seconds": older_than_seconds},
    ).fetchall()
    return {str(status): int(n) for status, n in rows}


def prune_batch(
    conn: Conn, *, older_than_seconds: float, limit: int, skip: Sequence[ScheduleId] = ()
) -> tuple[dict[str, int], list[ScheduleId]]:
    """Delete up to `limit` old applied/cancelled schedules (not those in `skip`); rows a
    tick holds are skipped. Returns the counts per status, and the ids an application's
    foreign key still references (kept: deleting them fails, and would roll the whole batch
    back, so that prune never got past them). On an application's schedules table the old
    rows no trigger noted (a restore's history) go once the noted ones have: noted first,
    up to `limit` a batch."""
    params = {"seconds": older_than_seconds, "limit": limit, "skip": list(skip)}
    rows = conn.execute(statement("prunable_batch"), params).fetchall()
    if not rows and current().app_schedules is not None:
        unseen = conn.execute(statement("unseen_prunable"), params).fetchall()
        if unseen:
            conn.execute(statement("note_unseen_schedules"), {"ids": [r[0] for r in unseen]})
            rows = conn.execute(statement("prunable_batch"), params).fetchall()
    counts: dict[str, int] = {}
    referenced: list[ScheduleId] = []
    if not rows:
        return counts, referenced
    try:
        with savepoint(conn):  # the batch at once, the common case
            conn.execute(statement("delete_schedules"), {"ids": [r[0] for r in rows]})
        deleted = rows
    except StatementFailed as exc:
        if exc.sqlstate != FOREIGN_KEY_VIOLATION:  # a missing privilege, a read-only database
            raise DatabaseError(f"database error: {exc.message}") from exc
        deleted = []
        for one_id, status in rows:  # one by one, keeping the referenced ones
            try:
                with savepoint(conn):
                    conn.execute(statement("delete_schedules"), {"ids": [one_id]})
                deleted.append((one_id, status))
            except StatementFailed as one:
                if one.sqlstate != FOREIGN_KEY_VIOLATION:
                    raise DatabaseError(f"database error: {one.message}") from one
                referenced.append(schedule_id(one_id))
    for _, status in deleted:
        counts[str(status)] = counts.get(str(status), 0) + 1
    return counts, referenced


# --- authoring: list, ramps, recurrences -----------------------------------------------

# A bound of `list --from/--to now`: PostgreSQL reads the string 'now' cast to timestamptz
# as the transaction's now(), so the database's clock decides.
DB_NOW = "now"


def list_schedules(
    conn: Conn,
    *,
    flag_key: str | None = None,
    status: Status | None = None,
    start: datetime | str | None = None,
    end: datetime | str | None = None,
    limit: int = 100,
) -> list[ScheduleRow]:
    """Schedules in (scheduled_at, id) order: the open ones unless `status` is given;
    `start` <= scheduled_at < `end`."""
    from flagsched.rows import ScheduleRow

    where = ["open_schedule" if status is None else "with_status"]
    if flag_key is not None:
        where.append("of_flag")
    if start is not None:
        where.append("from_start")
    if end is not None:
        where.append("before_end")
    return _rows(
        conn,
        class_row(ScheduleRow),
        statement("list_schedules", where=where),
        {
            "status": None if status is None else status.value,
            "flag_key": flag_key,
            "start": start,
            "end": end,
            "limit": limit,
        },
    )


def insert_ramp(
    conn: Conn,
    *,
    flag_key: str,
    start: datetime | None,
    every: timedelta,
    steps: Sequence[Updates],
    expires_after: timedelta | None,
    on_conflict: OnConflict,
    needs_approval: bool = False,
) -> tuple[int, list[tuple[ScheduleId, datetime]]]:
    """One pending schedule per step, every `every` from `start` (None: now()), sharing one
    new group_id; returns (group_id, [(id, scheduled_at)] in step order)."""
    rows = conn.execute(
        statement("insert_ramp"),
        {
            "k": flag_key,
            "start": start,
            "every": every,
            "updates": [json.dumps(u.as_json()) for u in steps],
            "expires": expires_after,
            "c": on_conflict.value,
            "approval": needs_approval,
        },
    ).fetchall()
    made = sorted(((schedule_id(i), at) for _, i, at in rows), key=lambda r: (r[1], id_order(r[0])))
    return int(rows[0][0]), made


def group_schedules(conn: Conn, group_id: int) -> list[ScheduleId]:
    """The ids of every schedule of a group, in (scheduled_at, id) order."""
    rows = conn.execute(statement("group_schedules"), {"g": group_id}).fetchall()
    return [schedule_id(i) for (i,) in rows]


def insert_recurrence(
    conn: Conn,
    *,
    flag_key: str,
    cron: str,
    timezone: str,
    updates: Updates,
    next_at: datetime,
    expires_after: timedelta | None,
    on_conflict: OnConflict,
    needs_approval: bool = False,
) -> int:
    new_id = _scalar(
        conn,
        statement("insert_recurrence"),
        {
            "k": flag_key,
            "cron": cron,
            "tz": timezone,
            "u": json.dumps(updates.as_json()),
            "next": next_at,
            "e": expires_after,
            "c": on_conflict.value,
            "approval": needs_approval,
        },
    )
    return int(new_id)


def list_recurrences(conn: Conn, *, include_cancelled: bool = False) -> list[RecurrenceRow]:
    """Recurrences, next occurrence first (stopped ones, next_at NULL, last)."""
    from flagsched.rows import RecurrenceRow

    where = [] if include_cancelled else ["active_recurrence"]
    return _rows(conn, class_row(RecurrenceRow), statement("list_recurrences", where=where))


def lock_recurrence(conn: Conn, recurrence_id: int) -> RecurrenceRow | None:
    """Lock one recurrence (waiting for a tick materialising it) and return it."""
    from flagsched.rows import RecurrenceRow

    rows = _rows(conn, class_row(RecurrenceRow), statement("lock_recurrence"), {"i": recurrence_id})
    return rows[0] if rows else None


def cancel_recurrence(conn: Conn, recurrence_id: int) -> list[ScheduleId]:
    """Stop a recurrence and cancel its schedules not yet applied; returns their ids."""
    conn.execute(statement("stop_recurrence"), {"i": recurrence_id})
    rows = conn.execute(statement("cancel_recurrence_schedules"), {"i": recurrence_id}).fetchall()
    return sorted((schedule_id(r[0]) for r in rows), key=id_order)


def due_recurrences(conn: Conn, *, limit: int) -> tuple[datetime, list[DueRecurrence]]:
    """Lock up to `limit` active recurrences whose next_at <= now() (skipping those another
    tick holds) with that now(). An index probe: nothing due costs one short statement."""
    rows = _rows(  # next_at may be -infinity or BC: a text, never a crash
        conn,
        _DUE_RECURRENCE,
        statement("due_recurrences"),
        {"limit": limit},
    )
    now = rows[0][0] if rows else db_now(conn)
    return now, [due for _, due in rows]


def due_recurrences_preview(conn: Conn, *, limit: int) -> tuple[datetime, list[RecurrenceRow]]:
    """--dry-run: up to `limit` active recurrences whose next_at <= now(), locking nothing,
    with that now()."""
    from flagsched.rows import RecurrenceRow

    def row(now: datetime, **columns: Any) -> tuple[datetime, RecurrenceRow]:
        return now, RecurrenceRow(**columns)

    rows = _rows(conn, kwargs_row(row), statement("due_recurrences_preview"), {"limit": limit})
    now = rows[0][0] if rows else db_now(conn)
    return now, [due for _, due in rows]


def materialise(
    conn: Conn,
    fired: Sequence[tuple[int, datetime]],
    advanced: Sequence[tuple[int, datetime | None]],
) -> list[MadeSchedule]:
    """Turn each (recurrence id, occurrence) of `fired` into one pending schedule carrying
    the recurrence's updates, expires_after and on_conflict (at most one per occurrence,
    whoever else tries: the unique index), then set each recurrence's next_at; returns the
    schedules made (id, recurrence_id, flag_key, scheduled_at)."""
    made = _rows(
        conn,
        class_row(MadeSchedule),
        statement("materialise"),
        {"ids": [i for i, _ in fired], "ats": [at for _, at in fired]},
    )
    conn.execute(
        statement("advance_recurrences"),
        {"ids": [i for i, _ in advanced], "nexts": [at for _, at in advanced]},
    )
    return made


# --- seeing ahead: plan, agenda ---------------------------------------------------------


def flags_now(conn: Conn, *, keys: Sequence[str] | None = None) -> list[FlagRow]:
    """Flags as they are: every one, or those of `keys` (by the unique index on key)."""
    from flagsched.rows import FlagRow

    return _rows(
        conn,
        class_row(FlagRow),
        statement("flags_now", where=[] if keys is None else ["flag_in_keys"]),
        {"keys": None if keys is None else list(keys)},
    )


def _ahead(conn: Conn, where: str, params: Mapping[str, Any]) -> list[OpenSchedule]:
    from flagsched.rows import OpenSchedule

    chosen = [where] if params.get("flag_key") is None else [where, "of_flag"]
    return _rows(conn, class_row(OpenSchedule), statement("schedules_ahead", where=chosen), params)


# `plan` and `agenda` read at most this many open schedules (memory stays bounded).
AHEAD_LIMIT = 100_000


def schedules_ahead(
    conn: Conn, *, until: datetime, flag_key: str | None = None, limit: int | None = None
) -> list[OpenSchedule]:
    """Open schedules (pending, failed waiting for a retry) due by `until`, in (scheduled_at,
    id) order, at most `limit` (AHEAD_LIMIT): a range of idx_schedules_open
    (idx_schedules_flag_open with a flag), never the applied history. Also a retry due by
    `until` whose own scheduled_at is later (an application may store one; the tick claims
    a retry by its next_retry_at): a range of idx_schedules_next_retry_at."""
    most = limit or AHEAD_LIMIT
    params = {"until": until, "flag_key": flag_key, "limit": most}
    rows = _ahead(conn, "open_due_until", params)
    early = _ahead(conn, "retry_due_until_scheduled_after", params)
    if not early:
        return rows
    # Such a retry is held back behind an open schedule of its flag that comes before it in
    # (scheduled_at, id) order, also one due after `until`: read each such flag's first
    # open schedule after `until` that is not such a retry itself (one row per flag, by
    # idx_schedules_flag_open) so the projection holds the retries behind it as the tick
    # does.
    blockers = [
        row
        for key in sorted({r.flag_key for r in early})
        for row in _ahead(conn, "open_of_key_after_until", {**params, "key": key, "limit": 1})
    ]
    unique = {r.id: r for r in [*rows, *early, *blockers]}
    return sorted(unique.values(), key=lambda r: (r.scheduled_at, r.id))[:most]


def failed_between(
    conn: Conn, *, start: datetime, end: datetime, flag_key: str | None = None, limit: int = 1000
) -> list[OpenSchedule]:
    """Schedules failed for good that were due between `start` and `end` (the page marks
    them); the same index ranges as `schedules_ahead`."""
    return _ahead(
        conn,
        "failed_for_good_between",
        {"start": start, "end": end, "flag_key": flag_key, "limit": limit},
    )


def recurrences_ahead(conn: Conn, *, flag_key: str | None = None) -> list[ActiveRecurrence]:
    """Active recurrences (an index range of idx_recurrences_due), next occurrence first."""
    from flagsched.rows import ActiveRecurrence

    where = ["active_recurrence"] if flag_key is None else ["active_recurrence", "of_flag"]
    return _rows(
        conn,
        class_row(ActiveRecurrence),
        statement("recurrences_ahead", where=where),
        {"flag_key": flag_key},
    )
