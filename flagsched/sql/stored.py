"""flagsched's stored logic (the claim, the write, the checks) as templates, rendered for one
table mapping (`Tables`): the files under `stored/`, with the placeholders of queries.sql
(`{schedules}`, `{flags.key}`, `{fn.check}`) and fragments (`{open(e)}`): those of
`stored/fragments.sql`, and a few that depend on the mapping (the scope, the columns a flags
table may lack) defined here.

The built-in tables get them from migration 0009, under the fixed names of
`BUILT_IN_ROUTINES`; an application's tables (issue 18) get them from `flagsched migrate`,
in flagsched's own schema, named with a digest of their rendered text
(`flagsched_claim_v3_1a2b3c4d`): two mappings, or two releases whose text differs, live
side by side, and a deployment finds its own by computing the same name. Scope values are
never rendered: they are the functions' `p_scope` parameter, so deployments of different
scopes on the same tables share the objects. Shipped template files are frozen like
migrations (tests/migration/shipped.sha256)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache
from importlib.resources import files

from psycopg import sql as psql

from flagsched.sql import BUILT_IN_ROUTINES, TableMap, Tables, _compose

# In dependency order: a template may call only those before it. Migration 0009 creates
# these for the built-in tables (whose record triggers are 0006's).
ROUTINES: tuple[str, ...] = ("kept_attempts", "check", "claim", "held_back", "apply")
# An application's tables also get the record triggers' functions (issue 18), and four
# eyes' (issue 20: migration 0008's triggers, which the built-in tables have from it). Each
# routine's digest covers only the names of those before it: one added at the end leaves the
# names of the earlier ones as a previous release computed them.
ADOPTED_ROUTINES: tuple[str, ...] = (
    *ROUTINES,
    "record_moved",
    "record_change",
    "record_truncate",
    "note_creator",
    "note_recurrence_creator",
    "check_approval",
)
# The base names of the routines only adopted shapes have (suffixed with their digest).
_ADOPTED_BASES: tuple[tuple[str, str], ...] = (
    ("record_moved", "flagsched_record_moved_v2"),
    ("record_change", "flagsched_record_change_v3"),
    ("record_truncate", "flagsched_record_truncate_v2"),
    ("note_creator", "flagsched_note_creator_v1"),
    ("note_recurrence_creator", "flagsched_note_recurrence_creator_v1"),
    ("check_approval", "flagsched_check_approval_v1"),
)

# Each routine's argument types, as `to_regprocedure` reads them (the required-objects check).
ARGUMENTS: dict[str, tuple[str, ...]] = {
    "kept_attempts": ("jsonb",),
    "check": ("bigint", "interval"),
    "claim": ("integer", "boolean", "jsonb", "interval"),
    "held_back": ("integer", "jsonb", "interval"),
    "apply": ("bigint[]", "text[]", "boolean[]", "integer[]", "interval", "boolean", "jsonb"),
    "record_moved": (),
    "record_change": (),
    "record_truncate": (),
    "note_creator": (),
    "note_recurrence_creator": (),
    "check_approval": (),
}

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)
# {name(argument)}: arguments hold no braces (nested fragments are expanded
# from the inside out, after `{arg}` is replaced).
_FRAGMENT = re.compile(r"\{(\w+)\(([^{}]*?)\)\}")
_DIGEST_HEX = 8


@cache
def template(name: str) -> str:
    """The text of `stored/<name>.sql`, its leading comment lines kept (they are SQL)."""
    return files(__package__).joinpath("stored", f"{name}.sql").read_text(encoding="utf-8")


@cache
def _fragments() -> dict[str, str]:
    parts = _NAME.split(template("fragments"))
    return {
        name: "\n".join(
            line for line in body.strip().splitlines() if not line.startswith("-- ")
        ).strip()
        for name, body in zip(parts[1::2], parts[2::2], strict=True)
    }


def _quoted(name: str) -> str:
    return psql.Identifier(name).as_string(None)


def _computed(tables: Tables) -> dict[str, Callable[[list[str]], str]]:
    """The fragments that depend on the mapping."""
    scope = [column for column, _ in tables.scope]
    flags = tables.flags

    def scope_of(args: list[str]) -> str:  # a row of flagsched's own tables, in scope
        (alias,) = args
        terms = [f"{alias}.{_quoted(c)} = (p_scope ->> {_literal(c)})" for c in scope]
        return "(" + " AND ".join(terms) + ")" if terms else "true"

    def flag_scope(args: list[str]) -> str:  # a row of the flags table, in scope
        (alias,) = args
        terms = [f"CAST({alias}.{_quoted(c)} AS text) = (p_scope ->> {_literal(c)})" for c in scope]
        return "(" + " AND ".join(terms) + ")" if terms else "true"

    def same_scope(args: list[str]) -> str:  # two rows of flagsched's own tables
        a, b = args
        terms = [f"{a}.{_quoted(c)} = {b}.{_quoted(c)}" for c in scope]
        return "(" + " AND ".join(terms) + ")" if terms else "true"

    def set_rollout(args: list[str]) -> str:
        if not flags.has("rollout_percentage"):
            return ""  # a change asking for a rollout fails before it gets here
        column = _quoted(flags.column("rollout_percentage"))
        return f",\n                {column} = coalesce(v.rollout, f.{column})"

    def set_updated_at(args: list[str]) -> str:
        if not flags.has("updated_at"):
            return ""
        # now() into a zone-less column is the session's local time, as its DEFAULT now()
        return f",\n                {_quoted(flags.column('updated_at'))} = now()"

    def rollout(args: list[str]) -> str:  # a flags row's rollout (NULL: the table has none)
        (alias,) = args
        if not flags.has("rollout_percentage"):
            return "CAST(NULL AS integer)"
        return f"{alias}.{_quoted(flags.column('rollout_percentage'))}"

    def scope_columns(args: list[str]) -> str:  # after a column list of flagsched's tables
        return "".join(f", {_quoted(c)}" for c in scope)

    def scope_values(args: list[str]) -> str:  # a flags row's scope, as text
        (alias,) = args
        return "".join(f", CAST({alias}.{_quoted(c)} AS text)" for c in scope)

    def scope_column_definitions(args: list[str]) -> str:
        return "".join(f",\n    {_quoted(c)} text NULL" for c in scope)

    def schema_name(args: list[str]) -> str:
        return _quoted(tables.schedules.schema or "public")

    return {
        "rollout": rollout,
        "scope_columns": scope_columns,
        "scope_values": scope_values,
        "scope_column_definitions": scope_column_definitions,
        "schema_name": schema_name,
        "schedules_schema": schema_name,
        "scope_of": scope_of,
        "flag_scope": flag_scope,
        "same_scope": same_scope,
        "set_rollout": set_rollout,
        "set_updated_at": set_updated_at,
    }


def _literal(value: str) -> str:
    return psql.Literal(value).as_string(None)


def _expand(text: str, tables: Tables) -> str:
    fragments, computed = _fragments(), _computed(tables)

    def one(m: re.Match[str]) -> str:
        name, argument = m.group(1), m.group(2).strip()
        if name in computed:
            return computed[name]([a.strip() for a in argument.split(",")] if argument else [])
        if name in fragments:
            return fragments[name].replace("{arg}", argument)
        raise KeyError(f"stored templates: unknown fragment {m.group(0)}")

    for _ in range(20):
        expanded = _FRAGMENT.sub(one, text)
        if expanded == text:
            return expanded
        text = expanded
    raise ValueError("stored templates: fragments nest too deep (a cycle?)")


_BODY = "\x00body\x00"  # the templates' `$$` while names are composed


def render(name: str, tables: Tables) -> str:
    """The CREATE statement of routine `name` for `tables` (its own and the other routines'
    names as `tables.fn` has them). A function body is quoted with `$$` unless a configured
    name holds `$$`: then with a tag the text does not hold (`$flagsched$`, ...)."""
    text = _compose(_expand(template(name).replace("$$", _BODY), tables), tables)
    rendered = text.as_string(None)
    tag, n = "$$", 0
    while tag in rendered:
        tag, n = f"$flagsched{n or ''}$", n + 1
    return rendered.replace(_BODY, tag)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:_DIGEST_HEX]


@cache
def adopted_routines(tables: Tables, schema: str) -> TableMap:
    """The routines' names for an adopted mapping: `<base>_<digest>` in `schema`, the digest
    over the text rendered with the routine's own name still the base name (the routines it
    calls already named), so the same mapping and templates always give the same names."""
    bases = dict(BUILT_IN_ROUTINES + _ADOPTED_BASES)
    named: list[tuple[str, str]] = []
    for routine in ADOPTED_ROUTINES:
        draft = replace(tables, fn=TableMap("", (*named, (routine, bases[routine])), schema))
        named.append((routine, f"{bases[routine]}_{_digest(render(routine, draft))}"))
    return TableMap("", tuple(named), schema)


def creates(tables: Tables, routines: tuple[str, ...] = ROUTINES) -> list[tuple[str, str]]:
    """(signature, CREATE statement) of every routine of `tables`, in dependency order: what
    migration 0009 (built-in) or `flagsched migrate` (adopted, `ADOPTED_ROUTINES`) runs."""
    return [(signature(routine, tables), render(routine, tables)) for routine in routines]


def own_tables(tables: Tables) -> str:
    """The DDL of flagsched's own schema and tables beside an application's (idempotent)."""
    return render("own_tables", tables)


# flagsched's triggers beside an application's tables: (table, family, timing, event,
# transition tables, condition, function). Named `<family>_<digest of the function's name>`,
# so the required-objects check (by family) finds them and a second migrate finds them by
# name. On the flags table the record triggers (issue 18); on flagsched's own schedules,
# recurrences and approvals tables four eyes' (issue 20, as migration 0008 has them on the
# built-in tables: the creator noted on INSERT, a verdict checked).
_TRIGGERS: tuple[tuple[str, str, str, str, str, str, str], ...] = (
    (
        "flags",
        "flagsched_record_insert",
        "AFTER",
        "INSERT",
        "REFERENCING NEW TABLE AS new_rows",
        "FOR EACH STATEMENT",
        "record_change",
    ),
    (
        "flags",
        "flagsched_record_update",
        "AFTER",
        "UPDATE",
        "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows",
        "FOR EACH STATEMENT",
        "record_change",
    ),
    # row-level AFTER triggers of a statement fire before its statement-level ones
    (
        "flags",
        "flagsched_record_update_moved",
        "AFTER",
        "UPDATE",
        "",
        "FOR EACH ROW WHEN (OLD.{flags.id} IS DISTINCT FROM NEW.{flags.id})",
        "record_moved",
    ),
    (
        "flags",
        "flagsched_record_delete",
        "AFTER",
        "DELETE",
        "REFERENCING OLD TABLE AS old_rows",
        "FOR EACH STATEMENT",
        "record_change",
    ),
    (
        "flags",
        "flagsched_record_truncate",
        "BEFORE",
        "TRUNCATE",
        "",
        "FOR EACH STATEMENT",
        "record_truncate",
    ),
    ("schedules", "flagsched_note_creator", "BEFORE", "INSERT", "", "FOR EACH ROW", "note_creator"),
    (
        "recurrences",
        "flagsched_note_creator",
        "BEFORE",
        "INSERT",
        "",
        "FOR EACH ROW",
        "note_recurrence_creator",
    ),
    (
        "approvals",
        "flagsched_check_approval",
        "BEFORE",
        "INSERT",
        "",
        "FOR EACH ROW",
        "check_approval",
    ),
)


# The record trigger families' name prefixes (each trigger's name ends in its digest).
RECORD_FAMILIES: tuple[str, ...] = tuple(
    family for table, family, *_ in _TRIGGERS if table == "flags"
)
# Four eyes' triggers by table and family (the required-objects check).
APPROVAL_TRIGGERS: tuple[tuple[str, str], ...] = tuple(
    (table, family) for table, family, *_ in _TRIGGERS if table != "flags"
)


@dataclass(frozen=True, slots=True)
class Trigger:
    """One of flagsched's triggers beside an application's tables."""

    table: str  # the logical table it is on (`flags`, `schedules`, ...: `Tables.table`)
    name: str
    create: str  # its CREATE TRIGGER statement


def triggers(tables: Tables) -> list[Trigger]:
    """flagsched's triggers of an adopted mapping: the record triggers on the flags table,
    four eyes' on flagsched's own tables."""
    made = []
    for table, family, timing, event, transition, each, routine in _TRIGGERS:
        name = f"{family}_{_digest(tables.fn.column(routine))}"
        text = (
            f"CREATE TRIGGER {_quoted(name)} {timing} {event} ON {{{table}}} {transition} "
            f"{each} EXECUTE FUNCTION {{fn.{routine}}}()"
        )
        made.append(Trigger(table, name, _compose(text, tables).as_string(None)))
    return made


def signature(routine: str, tables: Tables) -> str:
    """`name(types)` as `to_regprocedure` reads it, schema-qualified when adopted."""
    real = tables.fn.column(routine)
    # the built-in names are plain lower-case words (no quoting, as messages show them)
    name = real if tables.fn.schema is None else f"{_quoted(tables.fn.schema)}.{_quoted(real)}"
    return f"{name}({', '.join(ARGUMENTS[routine])})"
