"""The database objects this release uses: the one list every command checks before it works
(repository.ensure_schema, one catalog query). Not a revision number: a schema that a later
release migrated further (more columns, more functions, an unknown alembic revision) serves
this release as long as everything listed here is there (docs/deploy.md, "Upgrades").

Add an entry when the code starts to use an object (a new column in a statement, a new
stored function name); remove one only when no statement uses it any more. A stored
function is named with its argument types, as `to_regprocedure` reads them: a changed
function gets a new name (`_v2` -> `_v3`), so the old release keeps finding its own."""

from __future__ import annotations

from dataclasses import dataclass

from flagsched.sql import BUILT_IN, TableMap, Tables
from flagsched.sql.stored import (
    ADOPTED_ROUTINES,
    APPROVAL_TRIGGERS,
    ARGUMENTS,
    CALLED,
    PREVIOUS_ONLY,
    SCHEDULE_TRIGGER,
    SUPERSEDED,
    arguments,
)


@dataclass(frozen=True, slots=True)
class Table:
    """A table (or sequence: `columns` empty) and the columns flagsched reads or writes."""

    name: str
    columns: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Function:
    """A stored function flagsched calls, by its signature."""

    name: str
    arguments: tuple[str, ...]

    @property
    def signature(self) -> str:
        return f"{self.name}({', '.join(self.arguments)})"


@dataclass(frozen=True, slots=True)
class Trigger:
    """A trigger flagsched relies on (the record: nothing bypasses it), by family: a trigger
    named `name`, or `name` followed by `_` and anything (`_v2`, `_moved`, ...)."""

    table: str
    name: str


Required = Table | Function | Trigger

REQUIRED: tuple[Required, ...] = (
    Table("feature_flags", ("key", "enabled", "rollout_percentage", "updated_at")),
    Table(
        "feature_flag_schedules",
        (
            "id",
            "flag_key",
            "scheduled_at",
            "updates",
            "status",
            "retry_count",
            "max_retries",
            "next_retry_at",
            "last_error",
            "applied_at",
            "created_at",
            "updated_at",
            "on_conflict",
            "expires_at",
            "group_id",
            "reviewed_at",
            "attempts",
            "recurrence_id",
            "created_xact",  # prune --history keeps what their conflict windows need
            "created_snapshot",
        ),
    ),
    Table("feature_flag_schedule_group_seq"),
    Table(
        "feature_flag_changes",
        (
            "id",
            "flag_key",
            "changed_at",
            "actor",
            "old_enabled",
            "old_rollout_percentage",
            "new_enabled",
            "new_rollout_percentage",
            "schedule_ids",
            "xact",
        ),
    ),
    Table(
        "feature_flag_recurrences",
        (
            "id",
            "flag_key",
            "cron",
            "timezone",
            "updates",
            "next_at",
            "expires_after",
            "on_conflict",
            "cancelled_at",
            "created_at",
        ),
    ),
    # Four eyes (migration 0008): its columns listed after the older ones, so a schema an
    # older release left is told first what that release lacked.
    Table("feature_flag_schedules", ("needs_approval", "created_by", "awaiting_approval_since")),
    Table("feature_flag_recurrences", ("needs_approval",)),
    Table(
        "feature_flag_approvals",
        ("id", "schedule_id", "verdict", "decided_by", "decided_at", "note"),
    ),
    # Migration 0009, from the templates of flagsched/sql/stored/ (0006's and 0007's
    # predecessors stay for the previous release, unused here): the claim and the report
    # know approvals. The report is 0010's (flagsched_held_back_v3, one pass); the check and
    # the write are 0011's (flagsched_check_v4, flagsched_apply_v6: a window that never
    # starts before PostgreSQL's time); 0009's flagsched_held_back_v2, flagsched_check_v3
    # and flagsched_apply_v5 stay for the previous release.
    *(Function(BUILT_IN.fn.column(routine), ARGUMENTS[routine]) for routine in CALLED),
    # The record's triggers by family: `flagsched_record_update` is met by any trigger of
    # that name or named `flagsched_record_update_...` (this release's _v2 and _moved). A
    # later release that changes the record replaces its trigger (two would record each
    # change twice) under a new name of the same family, and this one keeps working.
    *(
        Trigger("feature_flags", f"flagsched_record_{event}")
        for event in ("insert", "update", "delete", "truncate")
    ),
    # Four eyes: the creator of a schedule is the login that inserted it, noted by the
    # database (also for rows applications insert); a verdict is its login's own.
    Trigger("feature_flag_schedules", "flagsched_note_creator"),
    Trigger("feature_flag_recurrences", "flagsched_note_creator"),
    Trigger("feature_flag_approvals", "flagsched_check_approval"),
)


def relation(table: TableMap) -> str:
    """A table as `to_regclass` reads it: quoted, schema-qualified when configured."""
    name = _quoted(table.name)
    return f"{_quoted(table.schema)}.{name}" if table.schema else name


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def required(tables: Tables) -> tuple[Required, ...]:
    """What this release uses on `tables`: `REQUIRED` for the built-in tables; on an
    application's (issue 18) its flags table's configured columns, flagsched's own tables in
    its schema (the built-in columns plus the scope's), the stored objects of that mapping
    (by their digest names), the record triggers on the flags table and four eyes' on
    flagsched's own tables (issue 20), by family."""
    if not tables.adopted:
        return REQUIRED
    flags = tables.flags
    scope = tuple(column for column, _ in tables.scope)
    flag_columns = tuple(
        flags.column(c)
        for c in ("id", "key", "enabled", "rollout_percentage", "updated_at")
        if flags.has(c)
    ) + tuple(c for c in scope if c not in {flags.column(c) for c in ("id", "key")})
    own: dict[str, Table] = {}
    for t in REQUIRED:  # a table listed twice (columns of a later migration): one entry
        if isinstance(t, Table):
            before = own.get(t.name)
            own[t.name] = Table(t.name, (before.columns if before else ()) + t.columns)
    seq = own["feature_flag_schedule_group_seq"]
    return (
        Table(relation(flags), flag_columns),
        Table(relation(tables.schedules), own["feature_flag_schedules"].columns + scope),
        Table(relation(TableMap(seq.name, schema=tables.schedules.schema))),
        Table(relation(tables.changes), own["feature_flag_changes"].columns + scope),
        Table(relation(tables.recurrences), own["feature_flag_recurrences"].columns + scope),
        Table(relation(tables.approvals), own["feature_flag_approvals"].columns),
        *(
            Function(
                f"{_quoted(tables.fn.schema or 'public')}.{_quoted(tables.fn.column(routine))}",
                arguments(routine, tables),
            )
            for routine in ADOPTED_ROUTINES
            # created for the previous release, not called
            if routine not in SUPERSEDED and routine not in PREVIOUS_ONLY
        ),
        *_app_schedules(tables),
        *(
            Trigger(relation(flags), f"flagsched_record_{event}")
            for event in ("insert", "update", "delete", "truncate")
        ),
        *(
            Trigger(relation(_table(tables, t)), family)
            for t, family in APPROVAL_TRIGGERS
            # over an application's schedules table (a view) its own trigger notes the
            # creator (`_app_schedules`)
            if not (t == "schedules" and tables.app_schedules is not None)
        ),
    )


def made_by_own_objects(tables: Tables) -> tuple[Required, ...]:
    """What of `required(tables)` flagsched's own objects (stored/own_tables.sql, or
    own_schedules.sql) make: its tables and, over an application's schedules table, the view,
    the state table and the record's function (`flagsched migrate` runs that text again when
    one of them is missing)."""
    own = tuple(
        o for o in required(tables) if isinstance(o, Table) and o.name != relation(tables.flags)
    )
    return own + tuple(o for o in _app_schedules(tables) if isinstance(o, Function))


def _app_schedules(tables: Tables) -> tuple[Required, ...]:
    """On an application's schedules table (shape 3): flagsched's state table, the trigger
    that notes each row inserted, and what shows and notes those it did not."""
    if tables.app_schedules is None:
        return ()
    domain = tables.schedule_id_type
    schema = _quoted(tables.fn.schema or "public")
    return (
        Table(relation(tables.state), ("id", "attempts", "created_snapshot")),
        Trigger(relation(tables.app_schedules), SCHEDULE_TRIGGER),
        # the rows no trigger noted: shown by the reads, noted by the tick and the writes
        Table(relation(tables.schedules_all), ("id", "flag_key", "status")),
        Function(f"{schema}.{_quoted(tables.fn.column('note_unseen_once'))}", ("text[]",)),
        Function(
            f"{_quoted(tables.fn.schema or 'public')}.{_quoted(tables.fn.column('record_app'))}",
            (f"{domain}[]", "text[]", "timestamp with time zone[]", "integer[]", "integer[]",
             "timestamp with time zone[]", "text[]", "timestamp with time zone[]", "jsonb[]",
             "text"),
        ),
    )  # fmt: skip


def _table(tables: Tables, logical: str) -> TableMap:
    found = tables.table(logical)
    assert found is not None, logical
    return found


def tick_calls(tables: Tables) -> tuple[Function, ...]:
    """The routines every tick calls on `tables` (its login needs EXECUTE on each, nested
    calls included), as `required` names them: this release's claim, check, write, report
    and kept attempts, and on an application's schedules table the record of its rows and
    the noting of those no trigger noted. Not the record triggers' functions: a trigger's
    function is not the firing login's to execute."""
    routines = (*CALLED, *(("record_app", "note_unseen_once") if tables.app_schedules else ()))
    names = [tables.fn.column(r) for r in routines]
    if tables.fn.schema is not None:
        names = [f"{_quoted(tables.fn.schema)}.{_quoted(name)}" for name in names]
    wanted = set(names)
    return tuple(o for o in required(tables) if isinstance(o, Function) and o.name in wanted)
