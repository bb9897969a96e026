"""The configuration file (flagsched.tables): parsing, refusals, the table mapping, and the
pure checks against catalog facts. No database."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from datetime import UTC, date, datetime, time, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from flagsched.approval import ApprovalPolicy
from flagsched.errors import ConfigError
from flagsched.sql import BUILT_IN, statement
from flagsched.tables import (
    CatalogColumn,
    CatalogTable,
    Configuration,
    QualifiedName,
    check,
    load,
    parse,
    scope_value_problem,
)

WORKED_EXAMPLE: dict[str, Any] = {
    "schema": "flagsched",
    "flags": {
        "table": "public.feature_flags",
        "id": "id",
        "key": "flag_key",
        "enabled": "enabled",
        "rollout": "rollout_percentage",
        "updated_at": "updated_at",
        "scope": {"environment": "production"},
    },
    "schedules": {
        "table": "public.feature_flag_schedules",
        "id": "id",
        "flag_id": "flag_id",
        "updates": "updates",
        "updates_enabled": "enabled",
        "updates_rollout": "rolloutPercentage",
        "error": "error_message",
        "created_by": "created_by",
        "cancelled_by": "cancelled_by",
        "cancelled_at": "cancelled_at",
    },
    "approval": {
        "flags": ["payments-*", "checkout"],
        "rollout_increase_over": 50,
        "enabling": True,
    },
}


# ==================== a TOML writer for the tests (tomllib only reads) ===================


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        pairs = ", ".join(f"{toml_string(k)} = {toml_value(v)}" for k, v in value.items())
        return "{" + pairs + "}"
    raise TypeError(value)


def toml_string(text: str) -> str:
    """A TOML basic string: JSON's escapes are TOML's (DEL must be escaped too)."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def toml(document: dict[str, Any]) -> str:
    lines = [f"{toml_string(k)} = {toml_value(v)}" for k, v in document.items() if not _section(v)]
    for name, body in document.items():
        if _section(body):
            lines.append(f"[{name}]")
            lines += [f"{toml_string(k)} = {toml_value(v)}" for k, v in body.items()]
    return "\n".join(lines) + "\n"


def _section(value: Any) -> bool:
    return isinstance(value, dict)


def with_value(section: str | None, key: str, value: Any) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(json.dumps(WORKED_EXAMPLE))
    if section is None:
        document[key] = value
    else:
        document[section][key] = value
    return document


# ==================== parsing ============================================================


def test_the_worked_example_parses_into_every_key() -> None:
    config = parse(toml(WORKED_EXAMPLE), source="x.toml")
    assert config.flags is not None and config.schedules is not None
    assert config.flags.table == QualifiedName("public", "feature_flags")
    assert config.flags.key == "flag_key"
    assert config.flags.scope == (("environment", "production"),)
    assert config.schedules.flag_id == "flag_id" and config.schedules.flag_key is None
    assert config.schedules.updates_rollout == "rolloutPercentage"
    assert config.schedules.cancelled_at == "cancelled_at"
    assert config.approval == ApprovalPolicy(("payments-*", "checkout"), 50, True)
    assert config.not_available() is None  # every shape runs


def test_an_empty_file_and_approval_only_keep_the_built_in_tables() -> None:
    assert parse("") == Configuration()
    assert parse("").tables() is BUILT_IN
    only = parse('schema = "flagsched"\n[approval]\nflags = ["a*"]\nenabling = false\n')
    assert only.tables() is BUILT_IN
    assert only.not_available() is None
    assert only.approval.flags == ("a*",)


def test_approvals_run_on_your_flags_table_and_on_your_schedules_table() -> None:
    """Four eyes on your own tables (issue 20): [approval] beside [flags], with or without
    [schedules]; approve, reject and every other command run."""
    flags = toml({"flags": WORKED_EXAMPLE["flags"], "approval": WORKED_EXAMPLE["approval"]})
    own = parse(flags)
    assert own.approval == ApprovalPolicy(("payments-*", "checkout"), 50, True)
    both = parse(toml(WORKED_EXAMPLE))
    for config in (own, both):
        for command in (None, "approve", "reject", "process", "schedule", "migrate"):
            assert config.not_available(command) is None, command


def test_another_schema_without_flags_is_not_available_yet() -> None:
    reason = parse('schema = "elsewhere"').not_available()
    assert reason is not None and "'elsewhere'" in reason


def test_names_keep_their_case_and_need_no_quoting() -> None:
    config = parse(
        '[flags]\ntable = "public.FeatureFlag"\nid = "Id"\nkey = "Name"\nenabled = "isOn"\n'
    )
    assert config.flags is not None
    assert config.flags.table == QualifiedName("public", "FeatureFlag")
    text = statement("flags_now", tables=config.tables(), where=["flag_in_keys"])
    assert 'FROM "public"."FeatureFlag"' in text
    assert '"Name" = ANY(%(keys)s)' in text
    assert '"isOn" AS enabled' in text
    # No rollout column configured: the mapping does not invent one under the built-in name.
    assert config.tables().flags.column("rollout_percentage") == "rollout_percentage"


def test_an_unqualified_table_is_found_by_the_search_path() -> None:
    config = parse('[flags]\ntable = "flags"\nid = "id"\nkey = "k"\nenabled = "e"\n')
    assert config.flags is not None
    assert config.flags.table == QualifiedName(None, "flags")
    assert 'FROM "flags"' in statement("flags_now", tables=config.tables(), where=[])
    # flagsched's own tables go to its schema.
    assert config.tables().changes.schema == "flagsched"


FLAGS = '[flags]\ntable = "t"\nid = "id"\nkey = "k"\nenabled = "e"\n'


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("colour = 1", "colour: unknown key"),
        (
            "[flags]\ntable = 't'\nid='id'\nkey='k'\nenabled='e'\nkye = 'x'",
            "flags.kye: unknown key",
        ),
        ("[approval]\nenabled = true", "approval.enabled: unknown key"),
        # a misspelt required key is named as unknown, not as the required one missing
        ("[flags]\ntable = 't'\nid='id'\nkye='k'\nenabled='e'", "flags.kye: unknown key"),
        (FLAGS + "[schedules]\ntable='s'\nid='i'\nupdates='u'\nflag_idd='f'", "flag_idd: unknown"),
        ("[flags]\ntable = 't'\nid = 'id'\nkey = 'k'", "flags.enabled: missing"),
        ("[schedules]\ntable='s'\nid='id'\nflag_key='k'\nupdates='u'", "[schedules] needs [flags]"),
        ("flags = 1", "flags: must be a table ([flags]), got an integer"),
        ("schema = 5", "schema: must be a string (a name), got an integer"),
        ("schema = ''", "schema: must not be empty"),
        ("schema = ' x'", "starts or ends with a space"),
        (f"schema = '{'x' * 64}'", "longer than PostgreSQL's 63 bytes"),
        (FLAGS.replace('"t"', '"a.b.c"'), "more than one dot"),
        (FLAGS.replace('"t"', '"a."'), "flags.table: 'a.': must not be empty"),
        (FLAGS + "scope = {}", "flags.scope: names no column"),
        (FLAGS + "scope = { env = 1.5 }", "env: must be a string, an integer or a boolean"),
        (FLAGS + "scope = 'production'", "flags.scope: must be a table of column = value"),
        (FLAGS + 'scope = { env = "prod\\u0000" }', "flags.scope: env: must not hold a NUL"),
        # flagsched's own tables keep the scope's columns beside theirs, by the same names
        (FLAGS + 'scope = { new_enabled = "x" }', "column 'new_enabled': flagsched's own"),
        (FLAGS + 'scope = { key = "x" }', "column 'key': flagsched's own tables"),
        (FLAGS + "[schedules]\ntable='s'\nid='id'\nupdates='u'", "schedules.flag_id: give exactly"),
        (
            FLAGS + "[schedules]\ntable='s'\nid='i'\nupdates='u'\nflag_id='f'\nflag_key='k'",
            "schedules.flag_id: give exactly one",
        ),
        (
            FLAGS + "[schedules]\ntable='s'\nid='i'\nupdates='u'\nflag_key='k'\n"
            "updates_enabled='x'\nupdates_rollout='x'",
            "schedules.updates_rollout: must differ from updates_enabled",
        ),
        ("[approval]\nrollout_increase_over = 101", "rollout_increase_over: must be 0..100"),
        ("[approval]\nrollout_increase_over = -1", "rollout_increase_over: must be 0..100"),
        ("[approval]\nrollout_increase_over = 50.0", "must be an integer 0..100, got a float"),
        ("[approval]\nrollout_increase_over = true", "must be an integer 0..100, got a boolean"),
        ("[approval]\nenabling = 'yes'", "approval.enabling: must be true or false"),
        ("[approval]\nflags = 'pay-*'", "approval.flags: must be an array of glob patterns"),
        ("[approval]\nflags = ['pay-[ab']", "approval.flags: invalid glob: 'pay-[ab' has a '['"),
        ("[approval]\nflags = ['']", "approval.flags: invalid glob: an empty pattern"),
        ("[approval]\nflags = [1]", "must hold glob patterns (strings), got an integer"),
        ("[flags\n", "invalid TOML"),
        ("a = 1\na = 2", "invalid TOML"),
    ],
)
def test_a_bad_file_is_one_line_naming_the_file_and_the_key(text: str, named: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse(text, source="own.toml")
    message = raised.value.message
    assert message.startswith("configuration own.toml: ")
    assert named in message, message
    assert "\n" not in message
    assert raised.value.exit_code == 2


@pytest.mark.parametrize("pattern", ["payments-*", "checkout", "[!x]?", "a[]]b", "[*]", "a]b"])
def test_valid_globs_are_kept(pattern: str) -> None:
    config = parse(f"[approval]\nflags = [{json.dumps(pattern)}]")
    assert config.approval.flags == (pattern,)


def test_a_missing_or_unreadable_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"configuration .*nope\.toml: cannot read it"):
        load(str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError, match="cannot read it"):
        load(str(tmp_path))  # a directory
    binary = tmp_path / "latin1.toml"
    binary.write_bytes(b'schema = "\xe9"\n')
    with pytest.raises(ConfigError, match=r"latin1\.toml: not UTF-8"):
        load(str(binary))


# ==================== properties =========================================================

_scalars = st.one_of(
    st.text(max_size=20),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(),
    st.booleans(),
    st.datetimes(timezones=st.sampled_from([None, UTC, timezone(timedelta(hours=2))])),
    st.dates(),
    st.times(),
)
toml_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(min_size=1, max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)

# Every key of the file, and what its value must be.
_STRING_KEYS = [
    (None, "schema"),
    *[("flags", k) for k in ("table", "id", "key", "enabled", "rollout", "updated_at")],
    *[
        ("schedules", k)
        for k in (
            "table",
            "id",
            "flag_id",
            "updates",
            "updates_enabled",
            "updates_rollout",
            "error",
            "created_by",
            "cancelled_by",
            "cancelled_at",
        )
    ],
]
_OTHER_KEYS: list[tuple[str, str, Any]] = [
    ("flags", "scope", lambda v: isinstance(v, dict)),
    ("approval", "flags", lambda v: isinstance(v, list)),
    ("approval", "rollout_increase_over", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    ("approval", "enabling", lambda v: isinstance(v, bool)),
]
_KEYS: list[tuple[str | None, str, Any]] = [
    *[(s, k, lambda v: isinstance(v, str)) for s, k in _STRING_KEYS],
    *_OTHER_KEYS,
]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(_KEYS), toml_values)
@example((None, "schema", lambda v: isinstance(v, str)), [])
@example(("approval", "enabling", lambda v: isinstance(v, bool)), 1)
def test_any_value_of_a_wrong_type_is_a_config_error_naming_the_key(
    where: tuple[str | None, str, Any], value: Any
) -> None:
    section, key, right_type = where
    if right_type(value):
        return  # a value of the right type: other tests judge it
    text = toml(with_value(section, key, value))
    with pytest.raises(ConfigError) as raised:
        parse(text, source="own.toml")
    dotted = f"{section}.{key}" if section else key
    assert f": {dotted}: " in raised.value.message, raised.value.message
    assert "\n" not in raised.value.message


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
@example("[flags]\ntable = 1")
@example('[approval]\nflags = ["\\u0000"]')
def test_any_text_is_a_configuration_or_one_config_error(text: str) -> None:
    try:
        parse(text, source="own.toml")
    except ConfigError as exc:
        assert "\n" not in exc.message


_names = st.text(
    st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00."), min_size=1
).filter(lambda s: s == s.strip() and len(s.encode()) <= 63)


@settings(max_examples=200, deadline=None)
@given(
    _names,
    _names,
    _names,
    st.one_of(st.text(st.characters(blacklist_characters="\x00")), st.integers(), st.booleans()),
)
def test_names_and_scope_values_are_kept_exactly(
    schema: str, table: str, key: str, scope_value: Any
) -> None:
    document = {
        "flags": {
            "table": f"{schema}.{table}",
            "id": "id",
            "key": key,
            "enabled": "enabled",
            "scope": {key: scope_value},
        }
    }
    config = parse(toml(document))
    assert config.flags is not None
    assert config.flags.table == QualifiedName(schema, table)
    assert config.flags.key == key
    assert config.flags.scope == ((key, scope_value),)
    assert config.tables().flags.schema == schema


# ==================== the checks, on catalog facts =======================================


def _table(columns: dict[str, str], unique: list[set[str]], kind: str = "r") -> CatalogTable:
    return CatalogTable(
        shown="public.t",
        kind=kind,
        columns=tuple(CatalogColumn(n, t, t) for n, t in columns.items()),
        unique=tuple(frozenset(u) for u in unique),
    )


FLAG_COLUMNS = {"id": "uuid", "flag_key": "text", "enabled": "bool", "env": "text"}
SCOPED = parse(
    '[flags]\ntable = "t"\nid = "id"\nkey = "flag_key"\nenabled = "enabled"\n'
    'scope = { env = "production" }\n',
    source="own.toml",
)


@pytest.mark.parametrize(
    ("unique", "fits"),
    [
        ([{"id"}, {"flag_key", "env"}], True),
        ([{"id"}, {"flag_key"}], True),  # unique overall: unique within any scope
        ([{"id"}], False),
        ([{"id"}, {"flag_key", "env", "enabled"}], False),  # wider than key + scope
        ([{"flag_key", "env"}], False),  # the id is not unique
    ],
)
def test_uniqueness_is_proved_by_an_index_within_key_and_scope(
    unique: list[set[str]], fits: bool
) -> None:
    problems = check(SCOPED, _table(FLAG_COLUMNS, unique), None)
    assert (problems == []) is fits, problems


def test_each_problem_is_one_line_naming_the_key() -> None:
    flags = _table({"id": "numeric", "flag_key": "int4"}, [{"id"}], kind="r")
    problems = check(SCOPED, flags, None)
    assert problems == [
        "configuration own.toml: [flags] id = 'id': public.t.id is numeric, expected int4 or "
        "int8 or text or uuid or varchar".replace("int4", "integer").replace("int8", "bigint"),
        "configuration own.toml: [flags] key = 'flag_key': public.t.flag_key is int4, expected "
        "text or varchar",
        "configuration own.toml: [flags] enabled = 'enabled': no such column in public.t",
        "configuration own.toml: [flags] scope.env: public.t has no column 'env'",
    ]


def test_a_view_or_a_missing_table_is_named() -> None:
    assert check(SCOPED, None, None) == [
        "configuration own.toml: [flags] table = 't': no such table"
    ]
    view = _table(FLAG_COLUMNS, [], kind="v")
    assert check(SCOPED, view, None) == [
        "configuration own.toml: [flags] table = 't': public.t is not a table"
    ]


@pytest.mark.parametrize(
    ("value", "base_type", "fits"),
    [
        ("production", "text", True),
        ("production", "env_kind", True),  # an enum: the string is its input
        ("1", "int4", False),
        (1, "int8", True),
        (1, "text", False),
        (True, "bool", True),
        (True, "int4", False),  # a boolean is no integer here
        ("true", "bool", False),
    ],
)
def test_a_scope_value_must_be_comparable_with_its_column(
    value: Any, base_type: str, fits: bool
) -> None:
    column = CatalogColumn("env", base_type, base_type)
    assert (scope_value_problem(value, column) is None) is fits


def test_a_string_scope_value_of_an_enum_must_be_one_of_its_labels() -> None:
    # a domain over an enum has its base type's labels (the catalog read gives them)
    column = CatalogColumn("env", "env_kind", "env_domain", labels=("production", "staging"))
    assert scope_value_problem("staging", column) is None
    assert scope_value_problem("Production", column) == (
        "not a label of the enum env_domain ('production', 'staging')"
    )
    many = replace(column, labels=tuple(f"e{n}" for n in range(12)))
    problem = scope_value_problem("x", many)
    assert problem is not None and problem.endswith("'e9', ...)")


def test_no_flags_section_checks_nothing() -> None:
    assert check(Configuration(), None, None) == []


def test_messages_are_in_the_order_of_the_file() -> None:
    """Stable output: an operator fixing problems one by one sees the same list shrink."""
    flags = _table({}, [])
    problems = check(SCOPED, flags, None)
    keys = [re.search(r"\] ([^\s:=]+)", p).group(1) for p in problems]  # type: ignore[union-attr]
    assert keys == ["id", "key", "enabled", "scope.env"]


def test_an_id_or_key_that_may_be_null_is_refused() -> None:
    """A unique index allows NULLs: a nullable key passes the uniqueness check, but a flag
    without a key cannot be named, and the history trigger would fail the application's own
    write of such a row."""
    flags = CatalogTable(
        shown="public.t",
        kind="r",
        columns=(
            CatalogColumn("id", "uuid", "uuid", not_null=False),
            CatalogColumn("flag_key", "text", "text", not_null=False),
            CatalogColumn("enabled", "bool", "boolean", not_null=False),  # allowed
            CatalogColumn("env", "text", "text", not_null=False),  # allowed
        ),
        unique=(frozenset({"id"}), frozenset({"flag_key", "env"})),
    )
    assert check(SCOPED, flags, None) == [
        "configuration own.toml: [flags] id = 'id': public.t.id may be NULL: it must be NOT NULL",
        "configuration own.toml: [flags] key = 'flag_key': public.t.flag_key may be NULL: it "
        "must be NOT NULL",
    ]


@pytest.mark.parametrize(("base_type", "fits"), [("int2", True), ("int4", True), ("int8", False)])
def test_a_rollout_column_holds_what_the_record_holds(base_type: str, fits: bool) -> None:
    """flagsched records a rollout as an integer: a bigint column is refused."""
    config = parse(
        '[flags]\ntable = "t"\nid = "id"\nkey = "flag_key"\nenabled = "enabled"\nrollout = "r"\n',
        source="own.toml",
    )
    flags = _table({**FLAG_COLUMNS, "r": base_type}, [{"id"}, {"flag_key"}])
    assert (check(config, flags, None) == []) is fits


def test_flagsched_needs_a_schema_of_its_own() -> None:
    """`schema` naming the schema the application's flags table is in is refused: flagsched
    would create its tables (feature_flag_schedules, ...) beside the application's."""
    config = parse(
        'schema = "public"\n[flags]\ntable = "t"\nid = "id"\nkey = "flag_key"\n'
        'enabled = "enabled"\n',
        source="own.toml",
    )
    flags = CatalogTable(
        shown="public.t",
        kind="r",
        columns=tuple(CatalogColumn(n, t, t) for n, t in FLAG_COLUMNS.items()),
        unique=(frozenset({"id"}), frozenset({"flag_key"})),
        schema="public",
    )
    assert check(config, flags, None) == [
        "configuration own.toml: schema = 'public': it holds the [flags] table public.t; "
        "flagsched needs a schema of its own"
    ]
    elsewhere = CatalogTable(flags.shown, flags.kind, flags.columns, flags.unique, "app")
    assert check(config, elsewhere, None) == []


def test_the_names_a_scope_column_cannot_take_are_flagscheds_own_tables_columns() -> None:
    """OWN_COLUMNS (the rule of `scope`) holds every column of the tables the scope's
    columns are added to, as flagsched.schema describes them."""
    from flagsched.schema import metadata
    from flagsched.tables import OWN_COLUMNS

    described = {
        column.name
        for table in ("feature_flag_schedules", "feature_flag_changes", "feature_flag_recurrences")
        for column in metadata.tables[table].columns
    }
    assert described | {"key"} == OWN_COLUMNS
