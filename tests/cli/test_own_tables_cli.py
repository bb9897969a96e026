"""Your own tables, first step (issue 18): the configuration file through the real entry
point, and `migrate` / `migrate --check` checking it against the first application's live
tables (tests/fixtures/upstream-schema.sql) on a real PostgreSQL, changing nothing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.conftest import Ran, invoke
from tests.unit.test_tables import WORKED_EXAMPLE, toml

UPSTREAM = Path(__file__).resolve().parents[1] / "fixtures" / "upstream-schema.sql"


@pytest.fixture
def upstream_url(empty_database_url: str) -> Iterator[str]:
    """A database holding the first application's tables exactly, with flags in both of its
    environments and a schedule pointing at one."""
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        conn.execute(UPSTREAM.read_text())
        conn.execute(
            "INSERT INTO feature_flags (flag_key, environment) VALUES "
            "('new-checkout', 'production'), ('new-checkout', 'staging')"
        )
        conn.execute(
            "INSERT INTO feature_flag_schedules (flag_id, scheduled_at, updates) "
            'SELECT id, now(), \'{"enabled": true, "rolloutPercentage": 25}\' '
            "FROM feature_flags WHERE environment = 'production'"
        )
    yield empty_database_url


def snapshot(url: str) -> list[Any]:
    """Everything a migrate could change: schemas, relations, columns (types, defaults,
    nullability), indexes, constraints, triggers, functions, and the rows."""
    queries = [
        "SELECT nspname FROM pg_namespace",
        "SELECT n.nspname, c.relname, c.relkind FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')",
        "SELECT attrelid::regclass::text, attname, atttypid::regtype::text, attnotnull, "
        "pg_get_expr(d.adbin, d.adrelid) FROM pg_attribute a "
        "LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum "
        "WHERE attrelid IN (SELECT oid FROM pg_class WHERE relnamespace = 'public'::regnamespace) "
        "AND attnum > 0 AND NOT attisdropped",
        "SELECT pg_get_indexdef(indexrelid) FROM pg_index "
        "WHERE indrelid IN (SELECT oid FROM pg_class WHERE relnamespace = 'public'::regnamespace)",
        "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint "
        "WHERE connamespace = 'public'::regnamespace",
        "SELECT tgrelid::regclass::text, tgname FROM pg_trigger WHERE NOT tgisinternal",
        "SELECT proname FROM pg_proc WHERE pronamespace NOT IN "
        "('pg_catalog'::regnamespace, 'information_schema'::regnamespace)",
        "SELECT to_jsonb(f) FROM feature_flags f",
        "SELECT to_jsonb(s) FROM feature_flag_schedules s",
    ]
    with psycopg.connect(url) as conn:
        return [sorted(map(str, conn.execute(q).fetchall())) for q in queries]


def document(**changes: Any) -> dict[str, Any]:
    """The worked example with `section.key` values replaced (None: the key left out)."""
    doc: dict[str, Any] = json.loads(json.dumps(WORKED_EXAMPLE))
    for dotted, value in changes.items():
        section, _, key = dotted.partition("__")
        target = doc[section] if key else doc
        key = key or section
        if value is None:
            target.pop(key, None)
        else:
            target[key] = value
    return doc


def write(tmp_path: Path, doc: dict[str, Any] | str) -> str:
    path = tmp_path / "flagsched.toml"
    path.write_text(doc if isinstance(doc, str) else toml(doc))
    return str(path)


def errors(ran: Ran) -> list[str]:
    lines = ran.stderr.strip().splitlines()
    assert all(line.startswith("flagsched: error: ") for line in lines), ran.stderr
    assert "Traceback" not in ran.stderr
    return [line.removeprefix("flagsched: error: ") for line in lines]


def test_the_first_applications_configuration_passes_the_checks_and_changes_nothing(
    upstream_url: str, tmp_path: Path
) -> None:
    """`migrate --check` reads the catalog only: the file fits (one line says so), and
    flagsched's objects are still to be made (exit 1); nothing changed. Until `migrate`
    runs, every other command refuses (exit 3, naming what is missing, changing nothing)."""
    config = write(tmp_path, WORKED_EXAMPLE)
    before = snapshot(upstream_url)

    checked = invoke("--config", config, "migrate", "--check", url=upstream_url)
    assert checked.code == 1, checked.stderr
    assert f"configuration {config} matches the database" in checked.stdout
    assert "run `flagsched migrate`" in checked.stdout
    assert snapshot(upstream_url) == before


@pytest.mark.parametrize(
    "command",
    [
        ["process"],
        ["process", "--dry-run"],
        ["status"],
        ["list"],
        ["list-failed"],
        ["history"],
        ["schedule", "new-checkout", "--at", "now", "--enable"],
        ["cancel", "1"],
        ["retry", "1"],
        ["prune", "--older-than", "1"],
        ["migrate", "--sql"],
    ],
)
def test_every_other_command_refuses_before_migrate_changing_nothing(
    upstream_url: str, tmp_path: Path, command: list[str]
) -> None:
    config = write(tmp_path, WORKED_EXAMPLE)
    before = snapshot(upstream_url)
    ran = invoke(*command, url=upstream_url, env={"FLAGSCHED_CONFIG": config})
    (line,) = errors(ran)
    if command == ["migrate", "--sql"]:  # the catalog decides: there is no SQL to print
        assert ran.code == 2 and line.startswith(f"configuration {config}: "), line
    else:
        assert ran.code == 3 and "run `flagsched migrate`" in line, line
    assert ran.stdout == ""
    assert snapshot(upstream_url) == before


SCHEDULES = "public.feature_flag_schedules"


@pytest.mark.parametrize(
    ("changes", "problems"),
    [
        (
            {"flags__table": "public.flags"},
            ["[flags] table = 'public.flags': no such table"],
        ),
        (
            {"flags__table": "elsewhere.feature_flags"},
            ["[flags] table = 'elsewhere.feature_flags': no such table"],
        ),
        (
            {"flags__rollout": "rollout"},
            ["[flags] rollout = 'rollout': no such column in public.feature_flags"],
        ),
        (
            {"flags__enabled": "description"},
            [
                "[flags] enabled = 'description': public.feature_flags.description is text, "
                "expected boolean"
            ],
        ),
        (
            {"flags__updated_at": "rollout_percentage", "flags__rollout": "flag_key"},
            [
                "[flags] rollout = 'flag_key': public.feature_flags.flag_key is text, "
                "expected smallint or integer",
                "[flags] updated_at = 'rollout_percentage': "
                "public.feature_flags.rollout_percentage is integer, expected timestamp or "
                "timestamptz",
            ],
        ),
        (
            {"flags__scope": None},
            [
                "[flags] key = 'flag_key': not unique in the table: no unique index or "
                "constraint of public.feature_flags lies within (flag_key)"
            ],
        ),
        (
            {"flags__key": "description"},
            [
                "[flags] key = 'description': public.feature_flags.description may be NULL: "
                "it must be NOT NULL",
                "[flags] key = 'description': not unique within the scope (environment): no "
                "unique index or constraint of public.feature_flags lies within "
                "(description, environment)",
            ],
        ),
        (
            {"flags__scope": {"env": "production"}},
            ["[flags] scope.env: public.feature_flags has no column 'env'"],
        ),
        (
            {"flags__scope": {"environment": 1, "enabled": "yes"}},
            [
                "[flags] scope.environment = 1: an integer, but the column is text",
                "[flags] scope.enabled = 'yes': a string, but the column is boolean",
            ],
        ),
        (
            {"flags__id": "flag_key"},
            [
                "[flags] id = 'flag_key': not unique in public.feature_flags (no primary key "
                "or unique index on it alone)",
                "[schedules] flag_id = 'flag_id': public.feature_flag_schedules.flag_id is "
                "uuid, the flags' id is text",
            ],
        ),
        (
            {"flags__id": "created_at"},
            [
                "[flags] id = 'created_at': public.feature_flags.created_at is timestamp "
                "without time zone, expected bigint or integer or text or uuid or varchar".replace(
                    "bigint or integer", "integer or bigint"
                )
            ],
        ),
        (
            {"schedules__table": "public.schedules"},
            ["[schedules] table = 'public.schedules': no such table"],
        ),
        (
            {"schedules__flag_id": "created_by"},
            [
                f"[schedules] flag_id = 'created_by': {SCHEDULES}.created_by is text, the "
                "flags' id is uuid"
            ],
        ),
        (
            {"schedules__updates": "error_message"},
            [
                f"[schedules] updates = 'error_message': {SCHEDULES}.error_message is text, "
                "expected jsonb"
            ],
        ),
        (
            {"schedules__cancelled_at": "cancelled_by", "schedules__error": "error"},
            [
                f"[schedules] error = 'error': no such column in {SCHEDULES}",
                f"[schedules] cancelled_at = 'cancelled_by': {SCHEDULES}.cancelled_by is text, "
                "expected timestamp or timestamptz",
            ],
        ),
        (
            {"schedules__flag_id": None, "schedules__flag_key": "flag_key"},
            [
                f"[schedules] flag_key = 'flag_key': no such column in {SCHEDULES}",
                "[schedules] flag_key = 'flag_key': with a [flags] scope a key names a flag "
                "of every scope; reference flags by flag_id",
            ],
        ),
    ],
    ids=lambda v: "+".join(v) if isinstance(v, dict) else None,
)
@pytest.mark.parametrize("check", [True, False], ids=["check", "migrate"])
def test_a_configuration_that_does_not_fit_is_refused_one_line_per_problem(
    upstream_url: str,
    tmp_path: Path,
    changes: dict[str, Any],
    problems: list[str],
    check: bool,
) -> None:
    config = write(tmp_path, document(**changes))
    before = snapshot(upstream_url)
    ran = invoke("--config", config, "migrate", *(["--check"] if check else []), url=upstream_url)
    assert ran.code == 2
    assert errors(ran) == [f"configuration {config}: {p}" for p in problems]
    assert ran.stdout == ""
    assert snapshot(upstream_url) == before


def _alter(url: str, *statements: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def test_the_checks_read_the_live_tables(upstream_url: str, tmp_path: Path) -> None:
    """The same file, judged anew against the database as it is now."""
    config = write(tmp_path, WORKED_EXAMPLE)
    # the configuration fits: exit 1 only because flagsched's objects are still to be made
    assert invoke("--config", config, "migrate", "--check", url=upstream_url).code == 1

    # The unique index on (flag_key, environment) gone: uniqueness is no longer proved.
    _alter(upstream_url, "DROP INDEX feature_flags_flag_key_environment_unique")
    ran = invoke("--config", config, "migrate", "--check", url=upstream_url)
    assert ran.code == 2
    assert errors(ran) == [
        f"configuration {config}: [flags] key = 'flag_key': not unique within the scope "
        "(environment): no unique index or constraint of public.feature_flags lies within "
        "(flag_key, environment)"
    ]
    # A unique constraint on the key alone proves it within any scope; a partial unique
    # index proves nothing for the rows outside its predicate.
    _alter(
        upstream_url,
        "CREATE UNIQUE INDEX partial_key ON feature_flags (flag_key) WHERE enabled",
    )
    assert invoke("--config", config, "migrate", "--check", url=upstream_url).code == 2
    _alter(
        upstream_url,
        "DELETE FROM feature_flags WHERE environment = 'staging'",
        "ALTER TABLE feature_flags ADD CONSTRAINT key_unique UNIQUE (flag_key)",
    )
    assert invoke("--config", config, "migrate", "--check", url=upstream_url).code == 1

    # varchar and a domain over text are text; a column of another type is refused.
    _alter(
        upstream_url,
        "DROP INDEX partial_key",
        "CREATE DOMAIN flag_name AS varchar(200)",
        "ALTER TABLE feature_flags ALTER COLUMN flag_key TYPE flag_name",
        "ALTER TABLE feature_flags ALTER COLUMN enabled DROP DEFAULT",
        "ALTER TABLE feature_flags ALTER COLUMN enabled TYPE smallint USING enabled::int",
    )
    ran = invoke("--config", config, "migrate", "--check", url=upstream_url)
    assert errors(ran) == [
        f"configuration {config}: [flags] enabled = 'enabled': public.feature_flags.enabled "
        "is smallint, expected boolean"
    ]


def test_quoted_mixed_case_names_in_another_schema(empty_database_url: str, tmp_path: Path) -> None:
    _alter(
        empty_database_url,
        "CREATE SCHEMA app",
        'CREATE TABLE app."FeatureFlag" ("Id" bigint PRIMARY KEY, "Name" text NOT NULL UNIQUE, '
        '"isOn" boolean)',
    )
    flags = {"table": "app.FeatureFlag", "id": "Id", "key": "Name", "enabled": "isOn"}
    config = write(tmp_path, {"flags": flags})
    ran = invoke("--config", config, "migrate", "--check", url=empty_database_url)
    # the configuration fits; flagsched's schema beside it is not there yet: behind (exit 1)
    assert ran.code == 1 and "matches the database" in ran.stdout, ran
    assert "run `flagsched migrate`" in ran.stdout
    wrong_case = write(tmp_path, {"flags": {**flags, "table": "app.featureflag"}})
    ran = invoke("--config", wrong_case, "migrate", "--check", url=empty_database_url)
    assert errors(ran) == [
        f"configuration {wrong_case}: [flags] table = 'app.featureflag': no such table"
    ]


def test_without_flags_nothing_changes(empty_database_url: str, tmp_path: Path) -> None:
    """Only [approval] and the default schema: the built-in tables, as without a file (the
    policy acts on them: issue 20)."""
    config = write(
        tmp_path,
        'schema = "flagsched"\n[approval]\nflags = ["payments-*"]\n'
        "rollout_increase_over = 50\nenabling = true\n",
    )
    env = {"FLAGSCHED_CONFIG": config}
    assert invoke("migrate", url=empty_database_url, env=env).code == 0
    assert invoke("migrate", "--check", url=empty_database_url, env=env).code == 0
    assert (
        invoke(
            "schedule", "payments-x", "--at", "now", "--enable", url=empty_database_url, env=env
        ).code
        == 0
    )
    _alter(empty_database_url, "INSERT INTO feature_flags (key) VALUES ('payments-x')")
    ran = invoke("process", url=empty_database_url, env=env)
    assert ran.code == 0, ran.stderr
    with psycopg.connect(empty_database_url) as conn:
        # The policy names the flag: the change awaits a second person's approval.
        assert conn.execute("SELECT enabled FROM feature_flags").fetchall() == [(False,)]
        awaiting = "SELECT awaiting_approval_since IS NOT NULL FROM feature_flag_schedules"
        assert conn.execute(awaiting).fetchall() == [(True,)]


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("[flags\n", "invalid TOML"),
        ("colour = 'blue'\n", "colour: unknown key"),
        ("[approval]\nrollout_increase_over = 150\n", "approval.rollout_increase_over: must be"),
        ("[approval]\nflags = ['[x']\n", "approval.flags: invalid glob"),
        ("[flags]\ntable = 1\n", "flags.table: must be a string"),
        ('schema = "elsewhere"\n', "schema = 'elsewhere'"),
    ],
)
def test_a_bad_file_is_exit_2_and_one_line_for_any_command(
    tmp_path: Path, text: str, named: str
) -> None:
    config = write(tmp_path, text)
    for ran in (
        invoke("--config", config, "status", url="postgresql://nobody@127.0.0.1:1/none"),
        invoke("migrate", "--check", env={"FLAGSCHED_CONFIG": config}),
    ):
        assert ran.code == 2
        (line,) = errors(ran)
        assert line.startswith(f"configuration {config}: ") and named in line, line


def test_a_missing_file_is_named_and_the_option_beats_the_variable(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.toml")
    ran = invoke("--config", missing, "status")
    assert ran.code == 2
    assert errors(ran) == [f"configuration {missing}: cannot read it: No such file or directory"]
    good = write(tmp_path, "[approval]\nenabling = true\n")
    ran = invoke("--config", good, "migrate", "--sql", env={"FLAGSCHED_CONFIG": missing})
    assert ran.code == 0 and "CREATE TABLE" in ran.stdout
    ran = invoke("migrate", "--sql", env={"FLAGSCHED_CONFIG": missing})
    assert ran.code == 2


def _own_flags(scope: str) -> str:
    """Shape 2 (no [schedules]) on the first application's flags, scoped by `tier`."""
    return (
        '[flags]\ntable = "public.feature_flags"\nid = "id"\nkey = "flag_key"\n'
        f'enabled = "enabled"\nrollout = "rollout_percentage"\nscope = {{ tier = {scope} }}\n'
    )


@pytest.mark.parametrize("command", [["migrate", "--check"], ["migrate"]])
def test_a_scope_value_that_is_no_label_of_its_enum_column_is_refused(
    upstream_url: str, tmp_path: Path, command: list[str]
) -> None:
    _alter(
        upstream_url,
        "CREATE TYPE tier AS ENUM ('production', 'staging')",
        "ALTER TABLE feature_flags ADD COLUMN tier tier NOT NULL DEFAULT 'production'",
        "UPDATE feature_flags SET tier = 'staging' WHERE environment = 'staging'",
        "CREATE UNIQUE INDEX feature_flags_key_tier ON feature_flags (flag_key, tier)",
    )
    before = snapshot(upstream_url)
    config = write(tmp_path, _own_flags('"prod"'))
    ran = invoke("--config", config, *command, url=upstream_url)
    assert ran.code == 2
    assert errors(ran) == [
        f"configuration {config}: [flags] scope.tier = 'prod': not a label of the enum tier "
        "('production', 'staging')"
    ]
    assert ran.stdout == ""
    assert snapshot(upstream_url) == before
    config = write(tmp_path, _own_flags('"staging"'))
    assert invoke("--config", config, *command, url=upstream_url).code == (
        1 if "--check" in command else 0  # fits: flagsched's objects are missing / made
    )


@pytest.mark.parametrize("command", [["migrate", "--check"], ["migrate"], ["process"]])
def test_a_scope_value_holding_a_nul_is_refused_before_connecting(
    upstream_url: str, tmp_path: Path, command: list[str]
) -> None:
    before = snapshot(upstream_url)
    config = write(tmp_path, _own_flags('"production\\u0000"'))
    ran = invoke("--config", config, *command, url=upstream_url)
    assert ran.code == 2
    assert errors(ran) == [
        f"configuration {config}: flags.scope: tier: must not hold a NUL character"
    ]
    assert ran.stdout == ""
    assert snapshot(upstream_url) == before
