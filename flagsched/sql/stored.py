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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cache
from importlib.resources import files

from psycopg import sql as psql

from flagsched.sql import BUILT_IN_ROUTINES, TableMap, Tables, _compose

# In dependency order: a template may call only those before it. Migration 0009 creates
# these for the built-in tables (whose record triggers are 0006's).
ROUTINES: tuple[str, ...] = ("kept_attempts", "check", "claim", "held_back", "apply")
# Added by later revisions of the built-in tables, each under its own name: 0010's
# held_back_once (flagsched_held_back_v3, stored/held_back_once.sql) reports what held_back
# reports in one pass over the open rows; 0011's check_clamped and apply_clamped
# (flagsched_check_v4, flagsched_apply_v6, `DERIVED`) are check and apply whose window
# never starts before PostgreSQL's earliest time.
LATER_ROUTINES: tuple[str, ...] = ("held_back_once", "check_clamped", "apply_clamped")
# Routines a later one replaced in this release's statements: still created (on your own
# tables too), as the previous release calls them, and no longer required.
SUPERSEDED: tuple[str, ...] = ("held_back", "check", "apply")
# Routines only your own tables keep for the previous release, created last (their names
# computed as it computed them) and never called or required: `claim_unguarded` is the claim
# without the guard (stored/claim_guard.sql) an application's schedules table's claim has
# since, under the name the previous release calls (on every other shape it is the claim).
PREVIOUS_ONLY: tuple[str, ...] = ("claim_unguarded",)
# What this release calls (the required-objects check).
CALLED: tuple[str, ...] = tuple(
    routine for routine in (*ROUTINES, *LATER_ROUTINES) if routine not in SUPERSEDED
)
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
    *LATER_ROUTINES,
    *PREVIOUS_ONLY,
)
# The base names of the routines only adopted shapes have (suffixed with their digest).
_ADOPTED_BASES: tuple[tuple[str, str], ...] = (
    ("record_moved", "flagsched_record_moved_v2"),
    ("record_change", "flagsched_record_change_v3"),
    ("record_truncate", "flagsched_record_truncate_v2"),
    ("note_creator", "flagsched_note_creator_v1"),
    ("note_recurrence_creator", "flagsched_note_recurrence_creator_v1"),
    ("check_approval", "flagsched_check_approval_v1"),
    ("claim_unguarded", "flagsched_claim_v3"),
)

# Each routine's argument types, as `to_regprocedure` reads them (the required-objects check).
ARGUMENTS: dict[str, tuple[str, ...]] = {
    "kept_attempts": ("jsonb",),
    "check": ("bigint", "interval"),
    "claim": ("integer", "boolean", "jsonb", "interval"),
    "claim_unguarded": ("integer", "boolean", "jsonb", "interval"),
    "held_back": ("integer", "jsonb", "interval"),
    "held_back_once": ("integer", "jsonb", "interval"),
    "apply": ("bigint[]", "text[]", "boolean[]", "integer[]", "interval", "boolean", "jsonb"),
    "check_clamped": ("bigint", "interval"),
    "apply_clamped": (
        "bigint[]",
        "text[]",
        "boolean[]",
        "integer[]",
        "interval",
        "boolean",
        "jsonb",
    ),
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
def _fragments(source: str = "fragments") -> dict[str, str]:
    """The fragments of `stored/<source>.sql` by name, their comment lines left out."""
    parts = _NAME.split(template(source))
    return {
        name: "\n".join(
            line for line in body.strip().splitlines() if not line.startswith("-- ")
        ).strip()
        for name, body in zip(parts[1::2], parts[2::2], strict=True)
    }


def _quoted(name: str) -> str:
    return psql.Identifier(name).as_string(None)


def _computed(
    tables: Tables, facts: Mapping[str, str] | None = None
) -> dict[str, Callable[[list[str]], str]]:
    """The fragments that depend on the mapping (and, for stored/own_schedules.sql, on
    `facts` of the catalog only `flagsched migrate` reads: `id_base_type`)."""
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
        column = _quoted(flags.column("updated_at"))
        if not tables.adopted:  # the built-in column is timestamptz (0009's text is frozen)
            return f",\n                {column} = now()"
        # A zone-less column gets the local time of the login's own zone, as the column's
        # DEFAULT now() in the application's sessions: not of the transaction's zone, which
        # flagsched sets to UTC (SET LOCAL). `reset_val` is the zone the session started
        # with (the role's, else the database's, else the server's setting, or PGTZ), which
        # SET LOCAL does not change. The mapping is built before any connection and does not
        # know the column's type, so one text serves both: `+ interval '0'` gives the base
        # type (a domain over timestamp counts as timestamp), and the local time is written
        # as the instant whose wall clock it is in the transaction's zone, which the
        # column's assignment cast turns back into that wall clock. A `timestamptz` column
        # (an instant, no zone to choose) keeps now().
        return (
            f",\n                {column} = CASE"
            f"\n                    WHEN pg_typeof(f.{column} + interval '0')"
            " = 'timestamp without time zone'::regtype"
            "\n                    THEN (now() AT TIME ZONE (SELECT s.reset_val"
            " FROM pg_catalog.pg_settings s WHERE s.name = 'TimeZone'))"
            " AT TIME ZONE current_setting('TimeZone')"
            "\n                    ELSE now() END"
        )

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

    computed: dict[str, Callable[[list[str]], str]] = {
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
        "schedule_id_type": lambda args: tables.schedule_id_type,
    }
    if tables.app_schedules is not None:
        computed.update(_app_schedules_computed(tables, tables.app_schedules, facts or {}))
    return computed


# The built-in columns an application's schedules table may have (each read and written when
# it does, else kept in flagsched's state table), with the type the view shows and the value
# an INSERT that names none gets.
_OPTIONAL_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("retry_count", "integer", "0"),
    ("max_retries", "integer", "3"),
    ("next_retry_at", "timestamptz", "NULL"),
    ("last_error", "text", "NULL"),
    ("applied_at", "timestamptz", "NULL"),
    ("created_at", "timestamptz", "now()"),
    ("updated_at", "timestamptz", "now()"),
)


def _app_schedules_computed(
    tables: Tables, app: TableMap, facts: Mapping[str, str]
) -> dict[str, Callable[[list[str]], str]]:
    """stored/own_schedules.sql's fragments: the view over an application's schedules table
    and the writes through it, for the columns that table has."""
    scope = [column for column, _ in tables.scope]
    present = [(c, t, d) for c, t, d in _OPTIONAL_COLUMNS if app.has(c)]
    flags = tables.flags

    def col(logical: str) -> str:
        return _quoted(app.column(logical))

    def by_flag_id() -> bool:
        return dict(app.columns).get("flag_id") is not None

    def view_column(args: list[str]) -> str:
        (name,) = args
        kind = dict((c, t) for c, t, _ in _OPTIONAL_COLUMNS)[name]
        return f"CAST(s.{_quoted(name)} AS {kind})" if app.has(name) else f"x.{_quoted(name)}"

    def unseen_column(args: list[str]) -> str:  # as view_column, before a state row exists
        (name,) = args
        kind, default = {c: (t, d) for c, t, d in _OPTIONAL_COLUMNS}[name]
        return (
            f"CAST(s.{_quoted(name)} AS {kind})" if app.has(name) else f"CAST({default} AS {kind})"
        )

    def flag_of_match(args: list[str]) -> str:
        column = flags.column("id") if by_flag_id() else flags.column("key")
        return f"f.{_quoted(column)} = p_ref"

    def flag_ref_type(args: list[str]) -> str:
        if not by_flag_id():
            return "text"
        flag_table = (
            f"{_quoted(flags.schema)}.{_quoted(flags.name)}"
            if flags.schema
            else _quoted(flags.name)
        )
        return f"{flag_table}.{_quoted(flags.column('id'))}%TYPE"

    def fit(column: str, expression: str) -> str:
        """`expression` cut to what a `varchar(n)` column of the application's table holds
        (`facts`: `length:<column>`), so a long message never makes its table refuse the row."""
        limit = facts.get(f"length:{column}")
        return f"left({expression}, {int(limit)})" if limit else expression

    def insert_columns(args: list[str]) -> str:
        names = [col("flag_id") if by_flag_id() else col("flag_key")]
        names += ["scheduled_at", "status", col("updates")]
        names += [_quoted(c) for c, _, _ in present]
        names += [col(k) for k in ("created_by", "error") if k in dict(app.columns)]
        return ", ".join(names)

    def insert_values(args: list[str]) -> str:
        values = ["flag" if by_flag_id() else "NEW.flag_key"]
        values += [
            "NEW.scheduled_at",
            "coalesce(NEW.status, 'pending')",
            f"{_schema(tables)}.flagsched_updates_out_v1(NEW.updates, "
            f"{members()[0]}, {members()[1]})",
        ]
        values += [
            f"coalesce(NEW.{_quoted(c)}, {d})" if d != "NULL" else fit(c, f"NEW.{_quoted(c)}")
            for c, _, d in present
        ]
        columns = dict(app.columns)
        if "created_by" in columns:
            values.append(fit(columns["created_by"], "session_user"))
        if "error" in columns:
            values.append(fit(columns["error"], "NEW.last_error"))
        return ", ".join(values)

    def app_set(args: list[str]) -> str:
        sets = [
            f"{_quoted(c)} = CASE WHEN NEW.{_quoted(c)} IS DISTINCT FROM OLD.{_quoted(c)} "
            f"THEN {fit(c, f'NEW.{_quoted(c)}')} ELSE s.{_quoted(c)} END"
            for c, _, _ in present
        ]
        columns = dict(app.columns)
        if "error" in columns:
            sets.append(
                f"{col('error')} = CASE WHEN NEW.last_error IS DISTINCT FROM OLD.last_error "
                f"THEN {fit(columns['error'], 'NEW.last_error')} ELSE s.{col('error')} END"
            )
        becomes_cancelled = "NEW.status = 'cancelled' AND OLD.status IS DISTINCT FROM 'cancelled'"
        if "cancelled_by" in columns:
            sets.append(
                f"{col('cancelled_by')} = CASE WHEN {becomes_cancelled} THEN "
                f"{fit(columns['cancelled_by'], 'session_user')} "
                f"ELSE s.{col('cancelled_by')} END"
            )
        if "cancelled_at" in columns:
            sets.append(
                f"{col('cancelled_at')} = CASE WHEN {becomes_cancelled} THEN now() "
                f"ELSE s.{col('cancelled_at')} END"
            )
        return "".join(f",\n                {one}" for one in sets)

    def record_app_set(args: list[str]) -> str:
        sets = [
            f"{_quoted(c)} = {fit(c, f'v.{_quoted(c)}')}"
            for c, _, _ in present
            if c != "created_at"
        ]
        if "error" in dict(app.columns):
            sets.append(f"{col('error')} = {fit(dict(app.columns)['error'], 'v.last_error')}")
        return "".join(f",\n        {one}" for one in sets)

    def members() -> tuple[str, str]:
        return _literal(tables.members[0]), _literal(tables.members[1])

    def view_scope_columns(args: list[str]) -> str:
        return "".join(f", f.{_quoted(c)}" for c in scope)

    def flag_of_scope_columns(args: list[str]) -> str:
        return "".join(f", {_quoted(c)} text" for c in scope)

    def flag_of_scope_values(args: list[str]) -> str:
        return "".join(f", CAST(f.{_quoted(c)} AS text)" for c in scope)

    def recurrence_in_scope(args: list[str]) -> str:
        terms = [f"r.{_quoted(c)} = NEW.{_quoted(c)}" for c in scope]
        return "(" + " AND ".join(terms) + ")" if terms else "true"

    def new_in_scope(args: list[str]) -> str:
        terms = [f"CAST(f.{_quoted(c)} AS text) = NEW.{_quoted(c)}" for c in scope]
        return "(" + " AND ".join(terms) + ")" if terms else "true"

    return {
        "id_domain": lambda args: tables.schedule_id_type,
        "mapping_comment": lambda args: _literal(mapping_note(tables)),
        "id_base_type": lambda args: facts.get("id_base_type", "bigint"),
        "member_enabled": lambda args: members()[0],
        "member_rollout": lambda args: members()[1],
        "view_column": view_column,
        "unseen_column": unseen_column,
        "view_scope_columns": view_scope_columns,
        "flag_of_match": flag_of_match,
        "flag_ref_type": flag_ref_type,
        "flag_ref": lambda args: col("flag_id") if by_flag_id() else col("flag_key"),
        "flag_ref_literal": lambda args: _literal(
            app.column("flag_id") if by_flag_id() else app.column("flag_key")
        ),
        "app_schedules_literal": lambda args: _literal(
            f"{_quoted(app.schema)}.{_quoted(app.name)}" if app.schema else _quoted(app.name)
        ),
        "flag_of_scope_columns": flag_of_scope_columns,
        "flag_of_scope_values": flag_of_scope_values,
        "new_in_scope": new_in_scope,
        "recurrence_in_scope": recurrence_in_scope,
        "insert_columns": insert_columns,
        "insert_values": insert_values,
        "app_set": app_set,
        "record_app_set": record_app_set,
    }


def _schema(tables: Tables) -> str:
    return _quoted(tables.schedules.schema or "public")


def _literal(value: str) -> str:
    return psql.Literal(value).as_string(None)


def _expand(
    text: str,
    tables: Tables,
    facts: Mapping[str, str] | None = None,
    overrides: Mapping[str, str] | None = None,
) -> str:
    fragments, computed = {**_fragments(), **(overrides or {})}, _computed(tables, facts)

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


# On an application's schedules table a schedule id is of the domain `Tables.schedule_id_type`
# names, not bigint: the frozen templates' spellings of a schedule id's type, each replaced
# when they are rendered for that shape (each must occur exactly once).
_SCHEDULE_ID_TYPES: dict[str, tuple[str, ...]] = {
    "claim": ("RETURNS TABLE (now timestamptz, id bigint,",),
    "held_back": ("RETURNS TABLE (id bigint,",),
    "held_back_once": ("RETURNS TABLE (id bigint,",),
    "check": ("p_id bigint,",),
    "apply": ("p_ids bigint[],",),
    "record_change": ("'{}'::bigint[]", "jsonb_array_elements_text(e.value)::bigint)"),
}


# On an application's schedules table the claim reads its rows through flagsched's view, on
# the application's own indexes (none of them partial): left to itself the planner hashes
# every due row to sort them, where walking the scheduled_at index stops at the batch's
# limit; and re-planning the view's joins at each claim costs more than running them. So
# that claim is planned once per session, without hash joins (measured: docs/benchmarks.md,
# case 13).
_APP_SCHEDULES_SETTINGS: dict[str, tuple[str, str]] = {
    "claim": (
        "SET jit = off AS",
        "SET jit = off SET enable_hashjoin = off SET plan_cache_mode = force_generic_plan AS",
    ),
}


# On an application's schedules table the claim first decides how it reads (stored/
# claim_guard.sql `claim_start`): with probes of each due row's flag (and a map of the flags
# held by a schedule that cannot move, into a variable the guarded probes read) where that
# table's indexes let the probes stop at the batch, else with one pass over its open rows.
_APP_SCHEDULES_CLAIM_START = (
    "#variable_conflict use_column\nBEGIN\n",
    "#variable_conflict use_column\n{claim_start()}\n",
)
_APP_SCHEDULES_CLAIM_BRANCH = (
    "    IF p_lock THEN\n",
    "    IF v_map THEN\n        {mapped_claim()}\n    ELSIF p_lock THEN\n",
)
# stored/claim_guard.sql `mapped_claim`'s statement: stored/fragments.sql's claim_query with
# the one-pass fragments in place of the probes (spelling, instead, times it occurs)
_MAPPED_PROBES = (
    ("{earlier_open(s)}", "{mapped_earlier_open(s)}", 2),
    ("{earlier_open_not_due(s)}", "{mapped_earlier_open_not_due(s)}", 2),
    ("{earlier_open_head(c)}", "{mapped_earlier_open_head(c)}", 1),
)


@cache
def _app_schedules_fragments(source: str) -> dict[str, str]:
    """The fragments of stored/<source>.sql and, for the claim's one-pass statement,
    `mapped_claim_query` (the frozen claim_query with `_MAPPED_PROBES`)."""
    text = _fragments()["claim_query"]
    for spelled, instead, times in _MAPPED_PROBES:
        if text.count(spelled) != times:
            raise ValueError(f"stored/fragments.sql claim_query: {spelled!r} not {times} times")
        text = text.replace(spelled, instead)
    return {**_fragments(source), "mapped_claim_query": text}


_APP_SCHEDULES_FRAGMENTS: dict[str, str] = {
    "claim": "claim_guard",
}


def _template_for(name: str, tables: Tables, routine: str | None = None) -> str:
    """stored/<name>.sql as rendered for `tables`, for `routine` (a routine derived from it:
    only the claim itself is guarded)."""
    text = template(name)
    if tables.app_schedules is None:
        return text
    replacements = [
        (s, s.replace("bigint", "{schedule_id_type()}")) for s in _SCHEDULE_ID_TYPES.get(name, ())
    ]
    if name in _APP_SCHEDULES_SETTINGS:
        replacements.append(_APP_SCHEDULES_SETTINGS[name])
    if (routine or name) in _APP_SCHEDULES_FRAGMENTS:
        replacements += [_APP_SCHEDULES_CLAIM_START, _APP_SCHEDULES_CLAIM_BRANCH]
    return _substituted(text, name, replacements)


def _substituted(text: str, name: str, replacements: Sequence[tuple[str, str]]) -> str:
    """`text` of stored/<name>.sql with each (spelled, instead): a frozen spelling that is not
    there exactly once is an error, never a silent miss."""
    for spelled, instead in replacements:
        if text.count(spelled) != 1:
            raise ValueError(f"stored/{name}.sql: {spelled!r} is not there exactly once")
        text = text.replace(spelled, instead)
    return text


# Routines derived from a frozen template by exact substitutions (each spelling must occur
# exactly once), rather than a copy of it: (template, ((spelled, instead), ...)).
# check_clamped (migration 0011): for a schedule judged by its snapshot, 0009's check also
# looks at the hour before its window's start, which is out of PostgreSQL's range when that
# start (a created_at) is in its first hour (4714-11-24 BC): the check, and the write that
# calls it, failed with "timestamp out of range". There the hour reaches back to the
# beginning of time; everywhere else it is the same expression. apply_clamped is 0009's
# apply calling check_clamped.
DERIVED: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {
    "check_clamped": (
        "check",
        (
            ("CREATE FUNCTION {fn.check}(", "CREATE FUNCTION {fn.check_clamped}("),
            (
                "AND c.written_at > {window_start()} - interval '1 hour'",
                "AND c.written_at > CASE"
                " WHEN {window_start()} >= TIMESTAMPTZ '4714-11-24 01:00:00+00 BC'"
                " THEN {window_start()} - interval '1 hour'"
                " ELSE TIMESTAMPTZ '-infinity' END",
            ),
        ),
    ),
    "apply_clamped": (
        "apply",
        (
            ("CREATE FUNCTION {fn.apply}(", "CREATE FUNCTION {fn.apply_clamped}("),
            ("LEFT JOIN LATERAL {fn.check}(", "LEFT JOIN LATERAL {fn.check_clamped}("),
        ),
    ),
    "claim_unguarded": (
        "claim",
        (("CREATE FUNCTION {fn.claim}(", "CREATE FUNCTION {fn.claim_unguarded}("),),
    ),
}


def _source(name: str, tables: Tables) -> str:
    """The template of routine `name` for `tables`: its file's, or a derived one's."""
    if name not in DERIVED:
        return _template_for(name, tables)
    base, substitutions = DERIVED[name]
    return _substituted(_template_for(base, tables, name), base, substitutions)


def render(name: str, tables: Tables, facts: Mapping[str, str] | None = None) -> str:
    """The CREATE statement of routine `name` for `tables` (its own and the other routines'
    names as `tables.fn` has them). A function body is quoted with `$$` unless a configured
    name holds `$$`: then with a tag the text does not hold (`$flagsched$`, ...)."""
    source = _source(name, tables).replace("$$", _BODY)
    overrides = (
        _app_schedules_fragments(_APP_SCHEDULES_FRAGMENTS[name])
        if tables.app_schedules is not None and name in _APP_SCHEDULES_FRAGMENTS
        else None
    )
    text = _compose(_expand(source, tables, facts, overrides), tables)
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


def own_tables(tables: Tables, facts: Mapping[str, str] | None = None) -> str:
    """The DDL of flagsched's own schema and tables beside an application's (idempotent):
    on an application's schedules table too (`[schedules]`), the view over it and what
    goes with it (stored/own_schedules.sql; `facts`: `id_base_type`, its id's type), and
    what shows and notes the rows its trigger did not note (stored/unseen_schedules.sql, and
    stored/unseen_once.sql, what this release calls), and the state table's indexes the
    claim's guard reads (stored/state_indexes.sql)."""
    if tables.app_schedules is not None:
        return ";\n".join(
            render(name, tables, facts)
            for name in ("own_schedules", "unseen_schedules", "unseen_once", "state_indexes")
        )
    return render("own_tables", tables)


def objects_note(tables: Tables, facts: Mapping[str, str] | None = None) -> str:
    """What `flagsched migrate` notes in flagsched's schema once it has run `own_tables`
    (on its ramp groups' sequence, queries.sql `note_own_objects`): a digest of that text, so
    that a later migrate finds in the catalog alone, without a lock on any table, whether
    there is anything to do (a no-op migrate on every deploy never queues behind the
    application's locks)."""
    return f"flagsched objects {_digest(own_tables(tables, facts))}"


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
        if table == "schedules" and tables.app_schedules is not None:
            continue  # a view: the application's table's own trigger notes the creator
        name = f"{family}_{_digest(tables.fn.column(routine))}"
        text = (
            f"CREATE TRIGGER {_quoted(name)} {timing} {event} ON {{{table}}} {transition} "
            f"{each} EXECUTE FUNCTION {{fn.{routine}}}()"
        )
        made.append(Trigger(table, name, _compose(text, tables).as_string(None)))
    if tables.app_schedules is not None:
        made.append(_schedule_trigger(tables))
    return made


# The record's write on an application's schedules table (queries.sql `record_app`), in
# flagsched's schema (stored/own_schedules.sql), named `<this>_<mapping_digest>`.
RECORD_APP = "flagsched_schedules_record_v1"
# What notes the rows of an application's schedules table no trigger noted (queries.sql
# `note_unseen_schedules`, stored/unseen_schedules.sql), in flagsched's schema.
NOTE_UNSEEN = "flagsched_note_unseen_v1"
# What this release calls instead (stored/unseen_once.sql): the same in two statements, so
# that a restore's many rows are noted in one pass; v1 stays for the previous release.
NOTE_UNSEEN_ONCE = "flagsched_note_unseen_v2"


def mapping_note(tables: Tables) -> str:
    """What `flagsched migrate` notes on its view over an application's schedules table
    (COMMENT ON VIEW), and compares with the configuration's."""
    return f"flagsched mapping {mapping_digest(tables)}"


def mapping_digest(tables: Tables) -> str:
    """What flagsched's view over an application's schedules table is rendered from, as the
    configuration says it (the tables, their configured columns, the members of `updates`,
    the scope's columns; not the scope's values, nor what the catalog says): one schema
    serves one such mapping. `flagsched migrate` notes it on the view, and the record's
    function carries it in its name, so a deployment of another mapping finds it missing."""
    app = tables.app_schedules
    assert app is not None
    flags = tables.flags
    return _digest(
        repr(
            (
                (flags.schema, flags.name, flags.columns, flags.absent),
                (app.schema, app.name, app.columns),
                tables.members,
                tuple(column for column, _ in tables.scope),
            )
        )
    )


# The one trigger flagsched puts on an application's schedules table (shape 3): it notes each
# row inserted (stored/own_schedules.sql, flagsched_schedule_noted_v1).
SCHEDULE_TRIGGER = "flagsched_note_schedule"


def _schedule_trigger(tables: Tables) -> Trigger:
    """The trigger on the application's schedules table."""
    text = (
        f"CREATE TRIGGER {SCHEDULE_TRIGGER} AFTER INSERT ON {{app_schedules}} "
        "REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION "
        f"{_schema(tables)}.flagsched_schedule_noted_v1()"
    )
    return Trigger("app_schedules", SCHEDULE_TRIGGER, _compose(text, tables).as_string(None))


def signature(routine: str, tables: Tables) -> str:
    """`name(types)` as `to_regprocedure` reads it, schema-qualified when adopted."""
    real = tables.fn.column(routine)
    # the built-in names are plain lower-case words (no quoting, as messages show them)
    name = real if tables.fn.schema is None else f"{_quoted(tables.fn.schema)}.{_quoted(real)}"
    return f"{name}({', '.join(arguments(routine, tables))})"


def arguments(routine: str, tables: Tables) -> tuple[str, ...]:
    """A routine's argument types for `tables`: `ARGUMENTS`, a schedule id of the domain on
    an application's schedules table (`_SCHEDULE_ID_TYPES`)."""
    types = ARGUMENTS[routine]
    if tables.app_schedules is None:
        return types
    domain = tables.schedule_id_type
    return tuple({"bigint": domain, "bigint[]": f"{domain}[]"}.get(t, t) for t in types)
