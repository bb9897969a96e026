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

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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

    def column(self, logical: str) -> str:
        return dict(self.columns).get(logical, logical)


@dataclass(frozen=True)
class Tables:
    """Which tables flagsched runs on: the built-in ones, or those a configuration names
    (`flagsched.tables.Configuration.tables`)."""

    flags: TableMap = TableMap("feature_flags")
    schedules: TableMap = TableMap("feature_flag_schedules")
    changes: TableMap = TableMap("feature_flag_changes")
    recurrences: TableMap = TableMap("feature_flag_recurrences")
    approvals: TableMap = TableMap("feature_flag_approvals")  # four eyes (migration 0008)

    def table(self, logical: str) -> TableMap | None:
        found = getattr(self, logical, None)
        return found if isinstance(found, TableMap) else None


BUILT_IN = Tables()

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


def _expand(text: str, slots: Mapping[str, str], depth: int = 0) -> str:
    """Fragments and slots expanded in place (recursively); identifiers and constants kept
    as placeholders for `_compose`."""
    if depth > 10:
        raise ValueError("queries.sql: fragments nest too deep (a cycle?)")
    texts = _texts()

    def one(m: re.Match[str]) -> str:
        name, column, argument = m.group(1), m.group(2), m.group(3)
        if column is None and name in slots:
            return _expand(slots[name], slots, depth + 1)
        if column is None and name in texts:
            body = texts[name]
            if argument is not None:
                body = body.replace("{arg}", argument)
            return _expand(body, slots, depth + 1)
        return m.group(0)

    return _PLACEHOLDER.sub(one, text)


def _compose(text: str, tables: Tables, literals: Mapping[str, object]) -> sql.Composed:
    parts: list[sql.Composable] = []
    at = 0
    for m in _PLACEHOLDER.finditer(text):
        name, column, argument = m.group(1), m.group(2), m.group(3)
        table = tables.table(name)
        if argument is None and table is not None:
            if column is not None:
                piece: sql.Composable = sql.Identifier(table.column(column))
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
    expanded = _expand(texts[name], dict(slots))
    return _compose(expanded, tables, dict(literals)).as_string(None)


def statement(
    name: str,
    *,
    tables: Tables = BUILT_IN,
    literals: Mapping[str, int | str] | None = None,
    **slots: Sequence[str] | str,
) -> str:
    """The statement `name`, composed for `tables`; each slot is filled with the named
    fragment given, or the named fragments of a list joined with AND (none: `true`); each
    `{name}` of `literals` is that value as an SQL literal."""
    filled: list[tuple[str, str]] = []
    for slot, value in sorted(slots.items()):
        if isinstance(value, str):
            filled.append((slot, f"{{{value}}}"))
        else:
            filled.append((slot, " AND ".join(f"({{{f}}})" for f in value) or "true"))
    return _statement(name, tuple(filled), tables, tuple(sorted((literals or {}).items())))
