"""Which tables and columns flagsched runs on: the TOML configuration (`FLAGSCHED_CONFIG` or
`--config`), parsed into frozen values, turned into the table mapping the named statements
use, and judged against what the database's catalog says of those tables. Pure: no I/O but
reading the file in `load`; the catalog facts come in as values (flagsched.repository
reads them)."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime, time
from typing import Any

from flagsched.approval import ApprovalPolicy
from flagsched.errors import ConfigError
from flagsched.sql import BUILT_IN, TableMap, Tables

DEFAULT_SCHEMA = "flagsched"
# PostgreSQL keeps at most NAMEDATALEN - 1 bytes of a name and silently cuts the rest: a
# longer name would name another object.
MAX_NAME_BYTES = 63

ScopeValue = str | int | bool


@dataclass(frozen=True)
class QualifiedName:
    """A table's name: `schema` None means "found by the search_path"."""

    schema: str | None
    name: str

    def __str__(self) -> str:
        return self.name if self.schema is None else f"{self.schema}.{self.name}"


@dataclass(frozen=True)
class FlagsTable:
    """`[flags]`: the application's flags table and the columns flagsched reads and writes."""

    table: QualifiedName
    id: str
    key: str
    enabled: str
    rollout: str | None = None
    updated_at: str | None = None
    scope: tuple[tuple[str, ScopeValue], ...] = ()  # (column, value), as the file orders them


@dataclass(frozen=True)
class SchedulesTable:
    """`[schedules]`: the application's schedules table. A flag is referenced by its id
    (`flag_id`) or by its key (`flag_key`): exactly one of them."""

    table: QualifiedName
    id: str
    updates: str
    flag_id: str | None = None
    flag_key: str | None = None
    updates_enabled: str = "enabled"
    updates_rollout: str = "rollout_percentage"
    error: str | None = None
    created_by: str | None = None
    cancelled_by: str | None = None
    cancelled_at: str | None = None


@dataclass(frozen=True)
class Configuration:
    """The whole file; `Configuration()` is "no configuration": the built-in tables."""

    source: str | None = None  # the file it was read from, for messages
    schema: str = DEFAULT_SCHEMA
    flags: FlagsTable | None = None
    schedules: SchedulesTable | None = None
    approval: ApprovalPolicy = field(default_factory=ApprovalPolicy)

    @property
    def where(self) -> str:
        return f"configuration {self.source}" if self.source else "the configuration"

    def not_available(self, command: str | None = None) -> str | None:
        """Why this release cannot run `command` with this configuration (None: it can).
        Every command runs on every shape (built-in tables, an application's flags, its
        flags and schedules), approvals included; only flagsched's own schema moved
        elsewhere without `[flags]` is refused, before touching the database."""
        if self.flags is None:
            if self.schema != DEFAULT_SCHEMA:
                return (
                    f"{self.where}: schema = {self.schema!r} (flagsched's own schema elsewhere "
                    f"than {DEFAULT_SCHEMA!r}) without [flags] is not available: the built-in "
                    "tables live in the search_path"
                )
            return None
        return None

    def tables(self) -> Tables:
        """The table mapping the named statements and the stored templates are composed
        with: without `[flags]` exactly the built-in one."""
        if self.flags is None:
            return BUILT_IN
        return _adopted_tables(self)


def _scope_text(value: ScopeValue) -> str:
    """A scope value as flagsched's own tables hold it: the text PostgreSQL casts the
    column's value to (`true`, `42`, `production`), so one comparison serves every type."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _adopted_tables(configuration: Configuration) -> Tables:
    from flagsched.sql import stored

    flags = configuration.flags
    assert flags is not None
    flag_columns = [("id", flags.id), ("key", flags.key), ("enabled", flags.enabled)]
    absent: list[str] = []
    if flags.rollout is not None:
        flag_columns.append(("rollout_percentage", flags.rollout))
    else:
        absent.append("rollout_percentage")
    if flags.updated_at is not None:
        flag_columns.append(("updated_at", flags.updated_at))
    else:
        absent.append("updated_at")
    own = configuration.schema
    app_schedules: TableMap | None = None
    members = BUILT_IN.members
    if configuration.schedules is not None:
        s = configuration.schedules
        optional = {
            "flag_id": s.flag_id,
            "flag_key": s.flag_key,
            "error": s.error,
            "created_by": s.created_by,
            "cancelled_by": s.cancelled_by,
            "cancelled_at": s.cancelled_at,
        }
        schedule_columns = [("id", s.id), ("updates", s.updates)]
        schedule_columns += [(k, v) for k, v in optional.items() if v is not None]
        app_schedules = TableMap(s.table.name, tuple(schedule_columns), s.table.schema)
        members = (s.updates_enabled, s.updates_rollout)
    mapping = Tables(
        flags=TableMap(flags.table.name, tuple(flag_columns), flags.table.schema, tuple(absent)),
        # flagsched's own schedules table, or its view over the application's (shape 3)
        schedules=TableMap(BUILT_IN.schedules.name, schema=own),
        schedules_all=TableMap(
            f"{BUILT_IN.schedules.name}_all" if app_schedules else BUILT_IN.schedules.name,
            schema=own,
        ),
        changes=TableMap(BUILT_IN.changes.name, schema=own),
        recurrences=TableMap(BUILT_IN.recurrences.name, schema=own),
        approvals=TableMap(BUILT_IN.approvals.name, schema=own),
        app_schedules=app_schedules,
        state=TableMap(BUILT_IN.state.name, schema=own),
        members=members,
        scope=tuple((column, _scope_text(value)) for column, value in flags.scope),
    )
    # the stored objects' names depend on the scope's columns, never on its values
    unscoped = replace(mapping, scope=tuple((column, "") for column, _ in mapping.scope))
    routines = stored.adopted_routines(unscoped, own)
    if app_schedules is not None:  # rendered by `flagsched migrate` (own_schedules.sql,
        # unseen_schedules.sql, unseen_once.sql)
        named = f"{stored.RECORD_APP}_{stored.mapping_digest(unscoped)}"
        routines = replace(
            routines,
            columns=(
                *routines.columns,
                ("record_app", named),
                ("note_unseen", stored.NOTE_UNSEEN),
                ("note_unseen_once", stored.NOTE_UNSEEN_ONCE),
            ),
        )
    return replace(mapping, fn=routines)


# ==================== parsing: TOML -> Configuration =====================================


def load(path: str) -> Configuration:
    """Read and parse the file at `path`; every problem is one ConfigError line naming the
    file (and the key)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ConfigError(f"configuration {path}: cannot read it: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"configuration {path}: not UTF-8 ({exc.reason})") from None
    return parse(text, source=path)


def parse(text: str, *, source: str | None = None) -> Configuration:
    """Parse the TOML text of a configuration."""
    where = f"configuration {source}" if source else "the configuration"
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: invalid TOML: {_one_line(str(exc))}") from None
    return from_document(document, source=source)


def from_document(document: Mapping[str, Any], *, source: str | None = None) -> Configuration:
    """The configuration from a parsed TOML document (what `tomllib` returns)."""
    where = f"configuration {source}" if source else "the configuration"
    top = _Section(document, "", where, ("schema", "flags", "schedules", "approval"))
    schema = top.get("schema", _name, DEFAULT_SCHEMA)
    flags_doc = top.section("flags", FlagsTable)
    schedules_doc = top.section("schedules", SchedulesTable)
    approval_doc = top.section("approval", ApprovalPolicy)
    flags = _flags(flags_doc) if flags_doc is not None else None
    schedules = _schedules(schedules_doc) if schedules_doc is not None else None
    if schedules is not None and flags is None:
        raise top.problem("schedules", "[schedules] needs [flags] (the flags it changes)")
    approval = _approval(approval_doc) if approval_doc is not None else ApprovalPolicy()
    return Configuration(source, schema, flags, schedules, approval)


def _flags(s: _Section) -> FlagsTable:
    result = FlagsTable(
        table=s.require("table", _table_name),
        id=s.require("id", _name),
        key=s.require("key", _name),
        enabled=s.require("enabled", _name),
        rollout=s.get("rollout", _name, None),
        updated_at=s.get("updated_at", _name, None),
        scope=s.get("scope", _scope, ()),
    )
    return result


def _schedules(s: _Section) -> SchedulesTable:
    flag_id, flag_key = s.get("flag_id", _name, None), s.get("flag_key", _name, None)
    if (flag_id is None) == (flag_key is None):
        raise s.problem("flag_id", "give exactly one of flag_id (by the flag's id) or flag_key")
    result = SchedulesTable(
        table=s.require("table", _table_name),
        id=s.require("id", _name),
        updates=s.require("updates", _name),
        flag_id=flag_id,
        flag_key=flag_key,
        updates_enabled=s.get("updates_enabled", _member, "enabled"),
        updates_rollout=s.get("updates_rollout", _member, "rollout_percentage"),
        error=s.get("error", _name, None),
        created_by=s.get("created_by", _name, None),
        cancelled_by=s.get("cancelled_by", _name, None),
        cancelled_at=s.get("cancelled_at", _name, None),
    )
    if result.updates_enabled == result.updates_rollout:
        raise s.problem("updates_rollout", "must differ from updates_enabled")
    return result


def _approval(s: _Section) -> ApprovalPolicy:
    result = ApprovalPolicy(
        flags=s.get("flags", _globs, ()),
        rollout_increase_over=s.get("rollout_increase_over", _percent, None),
        enabling=s.get("enabling", _boolean, False),
    )
    return result


class _Section:
    """One table of the document: values taken by key. A key outside `known` is refused
    first, before any value is read: a misspelt required key is named as unknown, not
    reported as the required one missing."""

    def __init__(
        self, values: Mapping[str, Any], path: str, where: str, known: Iterable[str]
    ) -> None:
        self.values, self.path, self.where = values, path, where
        allowed = set(known)
        for key in values:
            if key not in allowed:
                raise self.problem(key, "unknown key")

    def problem(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.where}: {self.path}{key}: {message}")

    def get(self, key: str, convert: Callable[[Any], Any], default: Any) -> Any:
        if key not in self.values:
            return default
        try:
            return convert(self.values[key])
        except ValueError as exc:
            raise self.problem(key, str(exc)) from None

    def require(self, key: str, convert: Callable[[Any], Any]) -> Any:
        if key not in self.values:
            raise self.problem(key, "missing (required in this section)")
        return self.get(key, convert, None)

    def section(self, key: str, read_into: type) -> _Section | None:
        """The table `[key]`, whose keys are the fields of the dataclass it is read into."""
        if key not in self.values:
            return None
        value = self.values[key]
        if not isinstance(value, dict):
            raise self.problem(key, f"must be a table ([{key}]), got {_kind(value)}")
        known = (f.name for f in dataclasses.fields(read_into))
        return _Section(value, f"{self.path}{key}.", self.where, known)


def _kind(value: object) -> str:
    """A TOML value's type, as the file spells it."""
    kinds: Sequence[tuple[type | tuple[type, ...], str]] = (
        (bool, "a boolean"),
        (int, "an integer"),
        (float, "a float"),
        (str, "a string"),
        (datetime, "a date-time"),
        (date, "a date"),
        (time, "a time"),
        (list, "an array"),
        (dict, "a table"),
    )
    return next((name for t, name in kinds if isinstance(value, t)), type(value).__name__)


def _string(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string ({what}), got {_kind(value)}")
    return value


def _name(value: object) -> str:
    """A column (or schema) name, taken as written: case kept, no quoting needed."""
    name = _string(value, "a name")
    if not name:
        raise ValueError("must not be empty")
    if name != name.strip():
        raise ValueError(f"{name!r} starts or ends with a space")
    if "\x00" in name:
        raise ValueError("must not hold a NUL character")
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise ValueError(f"{name!r} is longer than PostgreSQL's {MAX_NAME_BYTES} bytes")
    return name


def _table_name(value: object) -> QualifiedName:
    """`table` or `schema.table`: the one dot separates the schema. A name that holds a dot
    itself cannot be written (refused, not guessed)."""
    text = _string(value, "a table name, optionally schema-qualified")
    parts = text.split(".")
    if len(parts) > 2:
        raise ValueError(
            f"{text!r} has more than one dot: write table or schema.table (a name holding a "
            "dot itself is not supported)"
        )
    try:
        names = [_name(part) for part in parts]
    except ValueError as exc:
        raise ValueError(f"{text!r}: {exc}") from None
    return QualifiedName(None, names[0]) if len(names) == 1 else QualifiedName(*names)


def _member(value: object) -> str:
    """A member name inside `updates` (a JSON object key): any non-empty string."""
    member = _string(value, "a member name of updates")
    if not member:
        raise ValueError("must not be empty")
    return member


# The columns of flagsched's own schedules, history and recurrences tables (and `key`, the
# column of the function that gives a schedule's flag), beside which a scope's columns are
# added under their own names: a scope column of one of these names cannot be (a test holds
# this list to flagsched.schema's tables).
OWN_COLUMNS = frozenset(
    [
        "actor",
        "applied_at",
        "attempts",
        "awaiting_approval_since",
        "cancelled_at",
        "changed_at",
        "created_at",
        "created_by",
        "created_snapshot",
        "created_xact",
        "cron",
        "expires_after",
        "expires_at",
        "flag_key",
        "group_id",
        "id",
        "key",
        "last_error",
        "max_retries",
        "needs_approval",
        "new_enabled",
        "new_rollout_percentage",
        "next_at",
        "next_retry_at",
        "old_enabled",
        "old_flag_key",
        "old_rollout_percentage",
        "on_conflict",
        "recurrence_id",
        "retry_count",
        "reviewed_at",
        "schedule_ids",
        "scheduled_at",
        "status",
        "timezone",
        "updated_at",
        "updates",
        "written_at",
        "xact",
    ]
)


def _scope(value: object) -> tuple[tuple[str, ScopeValue], ...]:
    if not isinstance(value, dict):
        raise ValueError(f"must be a table of column = value, got {_kind(value)}")
    if not value:
        raise ValueError("names no column (leave scope out for every row)")
    pairs: list[tuple[str, ScopeValue]] = []
    for column, wanted in value.items():
        try:
            name = _name(column)
        except ValueError as exc:
            raise ValueError(f"column {column!r}: {exc}") from None
        if not isinstance(wanted, str | int | bool):
            raise ValueError(
                f"{column}: must be a string, an integer or a boolean, got {_kind(wanted)}"
            )
        if isinstance(wanted, str) and "\x00" in wanted:  # no PostgreSQL text holds one
            raise ValueError(f"{column}: must not hold a NUL character")
        if name in OWN_COLUMNS:
            raise ValueError(
                f"column {column!r}: flagsched's own tables have a column of that name, beside "
                "which they keep the scope's columns (a scope column cannot be named "
                f"{', '.join(sorted(OWN_COLUMNS)[:3])}, ...: see docs/own-tables.md)"
            )
        pairs.append((name, wanted))
    return tuple(pairs)


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {_kind(value)}")
    return value


def _percent(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"must be an integer 0..100, got {_kind(value)}")
    if not 0 <= value <= 100:
        raise ValueError(f"must be 0..100, got {value}")
    return value


# A glob of fnmatch's syntax: `*`, `?`, `[seq]`, `[!seq]`; every `[` closed.
_BRACKET = re.compile(r"\[!?\]?[^\]]*\]")


def glob_problem(pattern: str) -> str | None:
    """Why `pattern` is not a valid glob (None: it is)."""
    if not pattern:
        return "an empty pattern matches no flag"
    if any(ord(c) < 32 or ord(c) == 127 for c in pattern):
        return f"{pattern!r} holds a control character"
    if "[" in _BRACKET.sub("", pattern):
        return f"{pattern!r} has a '[' that is never closed"
    return None


def _globs(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError(f"must be an array of glob patterns, got {_kind(value)}")
    patterns: list[str] = []
    for item in value:
        if not isinstance(item, str):
            raise ValueError(f"must hold glob patterns (strings), got {_kind(item)}")
        problem = glob_problem(item)
        if problem:
            raise ValueError(f"invalid glob: {problem}")
        patterns.append(item)
    return tuple(patterns)


def _one_line(text: str) -> str:
    return " ".join(text.split())


# ==================== the checks: configuration against the catalog =====================


@dataclass(frozen=True)
class CatalogColumn:
    name: str
    base_type: str  # pg_type.typname of the type (a domain's base type): int8, text, ...
    shown_type: str  # format_type(): "character varying(40)", "timestamp without time zone"
    not_null: bool = True  # NOT NULL (itself, or its domain)
    # An enum's labels (of the column's type, or its domain's base type); None: no enum.
    labels: tuple[str, ...] | None = None


@dataclass(frozen=True)
class CatalogTable:
    """What the catalog says of one table, as far as the checks need it."""

    shown: str  # schema.name as the database resolved it
    kind: str  # pg_class.relkind
    columns: tuple[CatalogColumn, ...]
    unique: tuple[frozenset[str], ...]  # key columns of each valid, non-partial unique index
    schema: str = ""  # the schema it is in, as the database resolved it

    def column(self, name: str) -> CatalogColumn | None:
        return next((c for c in self.columns if c.name == name), None)


# Accepted types, by pg_type.typname, with the kind a comparison of two ids needs.
ID_TYPES = {"int8": "integer", "int4": "integer", "uuid": "uuid", "text": "text", "varchar": "text"}
TEXT = frozenset({"text", "varchar"})
INTEGER = frozenset({"int2", "int4", "int8"})
# A rollout is recorded (history, the apply's arrays) as an integer: a bigint column could
# hold a value the record cannot, and an application's write of it would fail in the trigger.
ROLLOUT = frozenset({"int2", "int4"})
TIMESTAMP = frozenset({"timestamp", "timestamptz"})
BOOLEAN = frozenset({"bool"})
JSONB = frozenset({"jsonb"})
_TABLE_KINDS = {"r", "p"}  # a table, a partitioned table
_SHOWN = {
    "int8": "bigint",
    "int4": "integer",
    "int2": "smallint",
    "bool": "boolean",
    "timestamptz": "timestamptz",
    "timestamp": "timestamp",
}

# Columns of an application's schedules table that keep their built-in names: required ones,
# and those written when present (each with the types accepted).
SCHEDULE_REQUIRED = {"scheduled_at": TIMESTAMP, "status": TEXT}
SCHEDULE_OPTIONAL = {
    "applied_at": TIMESTAMP,
    "retry_count": INTEGER,
    "max_retries": INTEGER,
    "next_retry_at": TIMESTAMP,
    "last_error": TEXT,
    "created_at": TIMESTAMP,
    "updated_at": TIMESTAMP,
}


def _types(accepted: frozenset[str] | Mapping[str, str]) -> str:
    return " or ".join(_SHOWN.get(t, t) for t in sorted(accepted))


def check(
    config: Configuration,
    flags: CatalogTable | None,
    schedules: CatalogTable | None,
) -> list[str]:
    """Every way the configuration does not fit the live tables, one line each (empty: it
    fits). `flags`/`schedules`: the catalog's view of the configured tables (None: no such
    table)."""
    if config.flags is None:
        return []
    where = config.where
    problems: list[str] = []
    f = config.flags

    def table_problem(section: str, name: QualifiedName, found: CatalogTable | None) -> bool:
        if found is None:
            problems.append(f"{where}: [{section}] table = {str(name)!r}: no such table")
            return True
        if found.kind not in _TABLE_KINDS:
            problems.append(
                f"{where}: [{section}] table = {str(name)!r}: {found.shown} is not a table"
            )
            return True
        return False

    def column(
        section: str,
        key: str,
        name: str,
        table: CatalogTable,
        accepted: frozenset[str] | Mapping[str, str],
    ) -> CatalogColumn | None:
        found = table.column(name)
        if found is None:
            problems.append(
                f"{where}: [{section}] {key} = {name!r}: no such column in {table.shown}"
            )
        elif found.base_type not in accepted:
            problems.append(
                f"{where}: [{section}] {key} = {name!r}: {table.shown}.{name} is "
                f"{found.shown_type}, expected {_types(accepted)}"
            )
            return None
        return found

    flag_id: CatalogColumn | None = None
    if not table_problem("flags", f.table, flags):
        assert flags is not None
        flag_id = column("flags", "id", f.id, flags, ID_TYPES)
        key = column("flags", "key", f.key, flags, TEXT)
        # A row without an id or a key cannot be named, and its history could not be
        # recorded: the record trigger would fail the application's own write of it.
        for option, found_column in (("id", flag_id), ("key", key)):
            if found_column is not None and not found_column.not_null:
                problems.append(
                    f"{where}: [flags] {option} = {found_column.name!r}: "
                    f"{flags.shown}.{found_column.name} may be NULL: it must be NOT NULL"
                )
        column("flags", "enabled", f.enabled, flags, BOOLEAN)
        if f.rollout is not None:
            column("flags", "rollout", f.rollout, flags, ROLLOUT)
        if f.updated_at is not None:
            column("flags", "updated_at", f.updated_at, flags, TIMESTAMP)
        scope = [name for name, _ in f.scope]
        missing_scope = [name for name in scope if flags.column(name) is None]
        for name, value in f.scope:
            found = flags.column(name)
            if found is None:
                problems.append(
                    f"{where}: [flags] scope.{name}: {flags.shown} has no column {name!r}"
                )
            elif (problem := scope_value_problem(value, found)) is not None:
                problems.append(f"{where}: [flags] scope.{name} = {value!r}: {problem}")
        if flag_id is not None and not _unique(flags, {f.id}):
            problems.append(
                f"{where}: [flags] id = {f.id!r}: not unique in {flags.shown} (no primary key "
                "or unique index on it alone)"
            )
        if key is not None and not missing_scope and not _unique(flags, {f.key, *scope}):
            within = f"within the scope ({', '.join(scope)})" if scope else "in the table"
            columns = ", ".join([f.key, *scope])
            problems.append(
                f"{where}: [flags] key = {f.key!r}: not unique {within}: no unique index or "
                f"constraint of {flags.shown} lies within ({columns})"
            )

    # flagsched's own tables and functions never go beside the application's: its schema
    # holds tables of flagsched's names, which an application schema may hold already.
    for section, found_table in (("flags", flags), ("schedules", schedules)):
        if found_table is not None and found_table.schema == config.schema:
            problems.append(
                f"{where}: schema = {config.schema!r}: it holds the [{section}] table "
                f"{found_table.shown}; flagsched needs a schema of its own"
            )

    s = config.schedules
    if s is not None and not table_problem("schedules", s.table, schedules):
        assert schedules is not None
        sid = column("schedules", "id", s.id, schedules, ID_TYPES)
        if sid is not None and not _unique(schedules, {s.id}):
            problems.append(
                f"{where}: [schedules] id = {s.id!r}: not unique in {schedules.shown} (no "
                "primary key or unique index on it alone)"
            )
        if s.flag_key is not None:
            column("schedules", "flag_key", s.flag_key, schedules, TEXT)
            if f.scope:
                problems.append(
                    f"{where}: [schedules] flag_key = {s.flag_key!r}: with a [flags] scope a "
                    "key names a flag of every scope; reference flags by flag_id"
                )
        elif s.flag_id is not None:
            ref = column("schedules", "flag_id", s.flag_id, schedules, ID_TYPES)
            if (
                ref is not None
                and flag_id is not None
                and ID_TYPES[ref.base_type] != ID_TYPES[flag_id.base_type]
            ):
                problems.append(
                    f"{where}: [schedules] flag_id = {s.flag_id!r}: "
                    f"{schedules.shown}.{s.flag_id} is {ref.shown_type}, the flags' id "
                    f"is {flag_id.shown_type}"
                )
        column("schedules", "updates", s.updates, schedules, JSONB)
        for key_name, text_column in (
            ("error", s.error),
            ("created_by", s.created_by),
            ("cancelled_by", s.cancelled_by),
        ):
            if text_column is not None:
                column("schedules", key_name, text_column, schedules, TEXT)
        if s.cancelled_at is not None:
            column("schedules", "cancelled_at", s.cancelled_at, schedules, TIMESTAMP)
        for name, accepted in SCHEDULE_REQUIRED.items():
            found = schedules.column(name)
            if found is None:
                problems.append(
                    f"{where}: [schedules] {schedules.shown} has no column {name!r} (required, "
                    "by this name)"
                )
            elif found.base_type not in accepted:
                problems.append(
                    f"{where}: [schedules] {schedules.shown}.{name} is {found.shown_type}, "
                    f"expected {_types(accepted)}"
                )
        for name, accepted in SCHEDULE_OPTIONAL.items():
            found = schedules.column(name)
            if found is not None and found.base_type not in accepted:
                problems.append(
                    f"{where}: [schedules] {schedules.shown}.{name} is {found.shown_type}, "
                    f"expected {_types(accepted)} (or no such column)"
                )
    return problems


def scope_value_problem(value: ScopeValue, column: CatalogColumn) -> str | None:
    """Why a scope value cannot be compared with its column (None: it can). A boolean
    needs a boolean column, an integer an integer column; a string is the column's input
    (text, an enum, ...), so not an integer's or a boolean's, and an enum's only when it is
    one of its labels."""
    if isinstance(value, bool):
        wanted, fits = "a boolean", column.base_type in BOOLEAN
    elif isinstance(value, int):
        wanted, fits = "an integer", column.base_type in INTEGER
    else:
        if column.labels is not None and value not in column.labels:
            # its input would fail every statement comparing the scope (22P02)
            return (
                f"not a label of the enum {column.shown_type} "
                f"({_one_line(', '.join(repr(label) for label in column.labels[:10]))}"
                f"{', ...' if len(column.labels) > 10 else ''})"
            )
        wanted = "a string"
        fits = column.base_type not in INTEGER | BOOLEAN
    return None if fits else f"{wanted}, but the column is {column.shown_type}"


def _unique(table: CatalogTable, columns: set[str]) -> bool:
    """Whether rows that agree on `columns` are one row: some unique index's key columns all
    lie within them (a unique index on the key alone proves it within any scope too)."""
    return any(index <= columns for index in table.unique if index)
