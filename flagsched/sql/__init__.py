"""Every runtime statement flagsched sends, named, in `queries.sql` (procrastinate's layout),
read once from the package and composed with psycopg.sql.

A statement's text may hold placeholders in braces:
- `{schedules}`, `{flags.key}`: a table or column of the table mapping (`Tables`), composed
  as a quoted `psycopg.sql.Identifier`, so a mapped, quoted name (issue 18) changes no
  statement;
- `{MAX_TEXT}`: a constant of `CONSTANTS`, composed as a `psycopg.sql.Literal`: a limit the
  code also uses is defined once; `{lock_timeout_ms}`: a value the caller gives
  (`statement(name, literals={...})`), composed the same way, for the few statements that
  take no parameters (SET LOCAL cannot);
- `{waiting_row}`, `{clamped_time(next_retry_at)}`: a named fragment of the same file (a rule
  used by several statements is spelled once); a fragment's `{arg}` is its argument;
- `{where}`, `{order}`: a slot the caller fills with named fragments (`statement(name,
  where=[...])`), for the few statements whose filters vary.
`%(name)s` parameters are psycopg's, sent separately (never interpolated). A statement is
composed once per table mapping and slot choice, then cached."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from contextvars import ContextVar, Token
from dataclasses import dataclass, replace
from functools import cache
from importlib.resources import files

from psycopg import sql

from flagsched.model import MAX_TEXT, NOTIFY_CHANNEL

# Stored `updates` larger than this is shown as a note of its size, never shipped whole.
UPDATES_MAX_BYTES = 8192

# Values statements spell as literals, defined here once (the Python side uses the same).
CONSTANTS: Mapping[str, object] = {
    "MAX_TEXT": MAX_TEXT,
    "UPDATES_MAX_BYTES": UPDATES_MAX_BYTES,
    "INT_MAX": 2147483647,  # PostgreSQL's integer: a counter saturates there
    "NOTIFY_CHANNEL": NOTIFY_CHANNEL,
}


@dataclass(frozen=True)
class TableMap:
    """One table: its name in the database (in `schema`, else found by the search_path) and
    its columns' names (logical -> real); a column not listed keeps its logical name."""

    name: str
    columns: tuple[tuple[str, str], ...] = ()  # (logical, real) pairs
    schema: str | None = None
    absent: tuple[str, ...] = ()  # logical columns the table does not have (a rollout)

    def column(self, logical: str) -> str:
        return dict(self.columns).get(logical, logical)

    def has(self, logical: str) -> bool:
        return logical not in self.absent


# The stored objects (flagsched/sql/stored/*.sql) by logical name, as the built-in tables
# have them: created by migration 0009 (and 0010, 0011) from the templates. A later release
# that changes a template ships a new file (or a derivation of a frozen one,
# `stored.DERIVED`) and a new name here (`_v3` -> `_v4`), keeping the old.
BUILT_IN_ROUTINES: tuple[tuple[str, str], ...] = (
    ("kept_attempts", "flagsched_kept_attempts_v3"),
    ("check", "flagsched_check_v3"),
    ("claim", "flagsched_claim_v3"),
    ("held_back", "flagsched_held_back_v2"),
    ("apply", "flagsched_apply_v5"),
    ("held_back_once", "flagsched_held_back_v3"),  # migration 0010
    ("check_clamped", "flagsched_check_v4"),  # migration 0011
    ("apply_clamped", "flagsched_apply_v6"),  # migration 0011
)


@dataclass(frozen=True)
class Tables:
    """Which tables flagsched runs on: the built-in ones, or those a configuration names
    (`flagsched.tables.Configuration.tables`)."""

    flags: TableMap = TableMap("feature_flags")
    schedules: TableMap = TableMap("feature_flag_schedules")
    changes: TableMap = TableMap("feature_flag_changes")
    recurrences: TableMap = TableMap("feature_flag_recurrences")
    approvals: TableMap = TableMap("feature_flag_approvals")  # four eyes (migration 0008)
    # The stored objects' names (`{fn.claim}`), in `fn.schema` (None: the search_path).
    fn: TableMap = TableMap("", BUILT_IN_ROUTINES)
    # This deployment's scope: (column, value as text), the flags' rows it works on; in
    # flagsched's own tables the same columns hold the value as text. A value is never part
    # of a statement's text: it is the `scope` parameter (`scope_parameter`).
    scope: tuple[tuple[str, str], ...] = ()
    # The application's schedules table (`[schedules]`, shape 3), None otherwise. Its
    # logical columns: id, flag_id or flag_key, updates, error, created_by, cancelled_by,
    # cancelled_at (those configured), and the built-in names it has (`absent`: those it
    # lacks, known to `flagsched migrate` only). flagsched reads and writes it through
    # `schedules`, then a view in flagsched's schema (stored/own_schedules.sql) over it, the
    # flags and `state` (what flagsched keeps of each of its rows): every statement stays
    # the same on every shape.
    app_schedules: TableMap | None = None
    state: TableMap = TableMap("feature_flag_schedule_state")
    # What the operators' reads (`list`, `show`, `status`, ...) read schedules from:
    # `schedules`, or beside an application's schedules table a view of flagsched's view and
    # the application's rows no trigger noted yet (stored/unseen_schedules.sql).
    schedules_all: TableMap = TableMap("feature_flag_schedules")
    # The members of `updates` that set enabled and the rollout, as the application spells
    # them (the view shows them under the built-in names).
    members: tuple[str, str] = ("enabled", "rollout_percentage")

    def table(self, logical: str) -> TableMap | None:
        found = getattr(self, logical, None)
        return found if isinstance(found, TableMap) else None

    @property
    def adopted(self) -> bool:
        """Runs on an application's tables (flagsched's own in `schedules.schema`). The
        stored objects' names do not count: a revision renders the built-in tables' objects
        under the names it fixes (0009's are five of `BUILT_IN_ROUTINES`)."""
        return replace(self, fn=BUILT_IN.fn) != BUILT_IN

    @property
    def schedule_id_type(self) -> str:
        """The type of a schedule id, as a cast names it: bigint, or on an application's
        schedules table the domain over its id's type that `flagsched migrate` creates in
        flagsched's schema (so no statement and no stored function depends on which type
        that is: uuid, text or an integer)."""
        if self.app_schedules is None:
            return "bigint"
        return sql.Identifier(self.state.schema or "public", SCHEDULE_ID_DOMAIN).as_string(None)

    def scope_parameter(self) -> str:
        """The scope values as the stored functions take them (`p_scope jsonb`)."""
        return json.dumps(dict(self.scope), sort_keys=True)


BUILT_IN = Tables()

# On an application's schedules table: the domain naming its id's type (see
# `Tables.schedule_id_type`).
SCHEDULE_ID_DOMAIN = "feature_flag_schedule_id"

# The mapping of this invocation: set once by the CLI from the configuration (`use`), read
# by every statement. A context variable rather than an argument threaded through every
# repository function: the repository keeps calling named statements only, and no caller
# chooses tables (one code path for every shape; the differences are in the mapping).
_current: ContextVar[Tables] = ContextVar("flagsched_tables", default=BUILT_IN)


def use(tables: Tables) -> Token[Tables]:
    """Make `tables` the mapping statements are composed with (returns the token that
    `_current.reset` takes, for tests)."""
    return _current.set(tables)


def current() -> Tables:
    """The mapping statements are composed with now."""
    return _current.get()


_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)
# {name}, {table.column}, {fragment(argument)}: anything else in braces (a JSON or array
# literal) is left as it is.
_PLACEHOLDER = re.compile(r"\{(\w+)(?:\.(\w+))?(?:\((.*?)\))?\}")


class UnknownStatement(KeyError):
    """No statement or fragment of that name in queries.sql."""


@cache
def _texts() -> dict[str, str]:
    """queries.sql as {name: text}: each `-- name: x` line starts one, up to the next."""
    source = files(__package__).joinpath("queries.sql").read_text(encoding="utf-8")
    parts = _NAME.split(source)
    texts: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        lines = [line for line in body.strip().splitlines() if not line.startswith("-- ")]
        if name in texts:
            raise ValueError(f"queries.sql names {name!r} twice")
        texts[name] = "\n".join(lines).strip().rstrip(";")
    return texts


def names() -> list[str]:
    """Every statement and fragment name in queries.sql."""
    return sorted(_texts())


def _scope_match(tables: Tables, alias: str) -> str:
    """A row of flagsched's own tables is in this deployment's scope: its scope columns hold
    the scope's values (as text). `true` without a scope. Client-side statements spell the
    values as literals (quoted by psycopg.sql): a statement is composed per mapping, and the
    scope is part of it; only the stored functions, shared by every scope, take them as a
    parameter."""
    terms = [f"{_prefix(alias)}{_ident(c)} = {_lit(v)}" for c, v in tables.scope]
    return "(" + " AND ".join(terms) + ")" if terms else "true"


def _flag_in_scope(tables: Tables, alias: str) -> str:
    """A row of the flags table is in this deployment's scope (its column as text)."""
    terms = [f"CAST({_prefix(alias)}{_ident(c)} AS text) = {_lit(v)}" for c, v in tables.scope]
    return "(" + " AND ".join(terms) + ")" if terms else "true"


def _scope_columns(tables: Tables, alias: str) -> str:
    """`, <scope columns>` (of `alias`) after a column list; nothing without a scope."""
    return "".join(f", {_prefix(alias)}{_ident(column)}" for column, _ in tables.scope)


def _scope_values(tables: Tables, alias: str) -> str:
    """`, <scope values>` after a VALUES list of flagsched's own tables."""
    return "".join(f", {_lit(value)}" for _, value in tables.scope)


def _flag_rollout(tables: Tables, alias: str) -> str:
    """A flags row's rollout; NULL when the table has none."""
    if not tables.flags.has("rollout_percentage"):
        return "CAST(NULL AS integer)"
    return f"{_prefix(alias)}{_ident(tables.flags.column('rollout_percentage'))}"


def _group_seq(tables: Tables, alias: str) -> str:
    """The ramp groups' sequence, as nextval() reads its name (in flagsched's schema)."""
    schema = tables.schedules.schema if tables.adopted else None
    name = "feature_flag_schedule_group_seq"
    if schema:
        name = sql.Identifier(schema, name).as_string(None)
    return _lit(name)


def _group_seq_relation(tables: Tables, alias: str) -> str:
    """The ramp groups' sequence as a statement names it (flagsched's schema, quoted)."""
    schema = tables.schedules.schema if tables.adopted else None
    name = "feature_flag_schedule_group_seq"
    return ".".join(_ident(part) for part in ((schema,) if schema else ()) + (name,))


def _schedule_id_type(tables: Tables, alias: str) -> str:
    """The type of a schedule id (`Tables.schedule_id_type`), for a cast."""
    return tables.schedule_id_type.replace("%", "%%")


def _recurrence_unique(tables: Tables, alias: str) -> str:
    """Materialising an occurrence twice makes one schedule: the unique index of flagsched's
    own schedules table decides (ON CONFLICT); over an application's schedules table (a
    view, where ON CONFLICT cannot be written) its INSTEAD OF INSERT trigger does, under the
    recurrence's row lock (stored/own_schedules.sql)."""
    if tables.app_schedules is not None:
        return ""
    return "ON CONFLICT (recurrence_id, scheduled_at) WHERE recurrence_id IS NOT NULL DO NOTHING"


def _prefix(alias: str) -> str:
    return f"{alias}." if alias else ""


# The computed fragments are parts of statements executed with psycopg parameters: a `%` in
# a configured name or scope value is doubled (psycopg reads `%%` as `%`).
def _ident(name: str) -> str:
    return sql.Identifier(name).as_string(None).replace("%", "%%")


def _lit(value: str) -> str:
    return sql.Literal(value).as_string(None).replace("%", "%%")


# Fragments that depend on the mapping (a scope's columns and values, absent columns).
_COMPUTED = {
    "scope_match": _scope_match,
    "flag_in_scope": _flag_in_scope,
    "scope_columns": _scope_columns,
    "scope_values": _scope_values,
    "flag_rollout": _flag_rollout,
    "group_seq": _group_seq,
    "group_seq_relation": _group_seq_relation,
    "schedule_id_type": _schedule_id_type,
    "recurrence_unique": _recurrence_unique,
}


def _expand(text: str, slots: Mapping[str, str], tables: Tables, depth: int = 0) -> str:
    """Fragments and slots expanded in place (recursively); identifiers and constants kept
    as placeholders for `_compose`."""
    if depth > 10:
        raise ValueError("queries.sql: fragments nest too deep (a cycle?)")
    texts = _texts()

    def one(m: re.Match[str]) -> str:
        name, column, argument = m.group(1), m.group(2), m.group(3)
        if column is None and name in _COMPUTED:
            return _COMPUTED[name](tables, argument or "")
        if column is None and name in slots:
            return _expand(slots[name], slots, tables, depth + 1)
        if column is None and name in texts:
            body = texts[name]
            if argument is not None:
                body = body.replace("{arg}", argument)
            return _expand(body, slots, tables, depth + 1)
        return m.group(0)

    return _PLACEHOLDER.sub(one, text)


def _compose(
    text: str,
    tables: Tables,
    literals: Mapping[str, object] | None = None,
    *,
    parameters: bool = False,
) -> sql.Composed:
    """`text` with its placeholders as identifiers and literals (`literals`: values the
    caller gives). With `parameters` (a statement executed with psycopg parameters), a `%`
    in a name or value is doubled, or psycopg would read it as a placeholder (a configured
    name may hold any character)."""
    literals = literals or {}
    parts: list[sql.Composable] = []
    at = 0
    for m in _PLACEHOLDER.finditer(text):
        name, column, argument = m.group(1), m.group(2), m.group(3)
        table = tables.table(name)
        if argument is None and name == "fn" and column is not None:
            real = tables.fn.column(column)
            schema = tables.fn.schema
            piece: sql.Composable = sql.Identifier(schema, real) if schema else sql.Identifier(real)
        elif argument is None and table is not None:
            if column is not None:
                piece = sql.Identifier(table.column(column))
            elif table.schema is not None:
                piece = sql.Identifier(table.schema, table.name)
            else:
                piece = sql.Identifier(table.name)
        elif argument is None and column is None and name in literals:
            piece = sql.Literal(literals[name])
        elif argument is None and column is None and name in CONSTANTS:
            piece = sql.Literal(CONSTANTS[name])
        else:
            raise UnknownStatement(f"queries.sql: unknown placeholder {m.group(0)}")
        if parameters:
            piece = sql.SQL(piece.as_string(None).replace("%", "%%"))
        parts += [sql.SQL(text[at : m.start()]), piece]
        at = m.end()
    parts.append(sql.SQL(text[at:]))
    return sql.Composed(parts)


@cache
def _statement(
    name: str,
    slots: tuple[tuple[str, str], ...],
    tables: Tables,
    literals: tuple[tuple[str, object], ...],
) -> str:
    texts = _texts()
    if name not in texts:
        raise UnknownStatement(f"queries.sql has no statement {name!r}")
    expanded = _expand(texts[name], dict(slots), tables)
    return _compose(expanded, tables, dict(literals), parameters=True).as_string(None)


def statement(
    name: str,
    *,
    tables: Tables | None = None,
    literals: Mapping[str, int | str] | None = None,
    **slots: Sequence[str] | str,
) -> str:
    """The statement `name`, composed for `tables` (default: the current mapping); each slot
    is filled with the named fragment given, or the named fragments of a list joined with AND
    (none: `true`); each `{name}` of `literals` is that value as an SQL literal."""
    filled: list[tuple[str, str]] = []
    for slot, value in sorted(slots.items()):
        if isinstance(value, str):
            filled.append((slot, f"{{{value}}}"))
        else:
            filled.append((slot, " AND ".join(f"({{{f}}})" for f in value) or "true"))
    return _statement(
        name,
        tuple(filled),
        current() if tables is None else tables,
        tuple(sorted((literals or {}).items())),
    )
