"""Migrations on a real PostgreSQL: the schema is the SPEC's, both ways, concurrently."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.engine import Engine

from flagsched import migrate, repository
from flagsched.db import Database, connection
from flagsched.errors import SchemaNotCurrent
from flagsched.schema import make_engine, metadata

HEAD = migrate.head()

# SPEC "Data", column by column: (name, type, nullable, default contains)
SPEC_COLUMNS = {
    "feature_flags": [
        ("id", "bigint", "NO", None),
        ("key", "text", "NO", None),
        ("enabled", "boolean", "NO", "false"),
        ("rollout_percentage", "integer", "NO", "0"),
        ("created_at", "timestamp with time zone", "NO", "now()"),
        ("updated_at", "timestamp with time zone", "NO", "now()"),
    ],
    "feature_flag_schedules": [
        ("id", "bigint", "NO", None),
        ("flag_key", "text", "NO", None),
        ("scheduled_at", "timestamp with time zone", "NO", None),
        ("updates", "jsonb", "NO", None),
        ("status", "text", "NO", "'pending'"),
        ("applied_at", "timestamp with time zone", "YES", None),
        ("created_at", "timestamp with time zone", "NO", "now()"),
        ("updated_at", "timestamp with time zone", "NO", "now()"),
        ("retry_count", "integer", "NO", "0"),
        ("max_retries", "integer", "NO", "3"),
        ("next_retry_at", "timestamp with time zone", "YES", None),
        ("last_error", "text", "YES", None),
        ("on_conflict", "text", "NO", "'fail'"),
        ("expires_at", "timestamp with time zone", "YES", None),
        ("group_id", "bigint", "YES", None),
        ("reviewed_at", "timestamp with time zone", "YES", None),
        ("attempts", "jsonb", "NO", "'[]'"),
        ("recurrence_id", "bigint", "YES", None),
        ("created_xact", "xid8", "YES", "pg_current_xact_id()"),
        ("created_snapshot", "pg_snapshot", "YES", "pg_current_snapshot()"),
        ("needs_approval", "boolean", "NO", "false"),
        ("created_by", "text", "YES", None),
        ("awaiting_approval_since", "timestamp with time zone", "YES", None),
    ],
    "feature_flag_recurrences": [
        ("id", "bigint", "NO", None),
        ("flag_key", "text", "NO", None),
        ("cron", "text", "NO", None),
        ("timezone", "text", "NO", None),
        ("updates", "jsonb", "NO", None),
        ("next_at", "timestamp with time zone", "YES", None),
        ("expires_after", "interval", "YES", None),
        ("on_conflict", "text", "NO", "'fail'"),
        ("cancelled_at", "timestamp with time zone", "YES", None),
        ("created_at", "timestamp with time zone", "NO", "now()"),
        ("needs_approval", "boolean", "NO", "false"),
        ("created_by", "text", "YES", None),
    ],
    "feature_flag_approvals": [
        ("id", "bigint", "NO", None),
        ("schedule_id", "bigint", "NO", None),
        ("verdict", "text", "NO", None),
        ("decided_by", "text", "NO", None),
        ("decided_at", "timestamp with time zone", "NO", "now()"),
        ("note", "text", "YES", None),
    ],
    "feature_flag_changes": [
        ("id", "bigint", "NO", None),
        ("flag_key", "text", "NO", None),
        ("changed_at", "timestamp with time zone", "NO", "now()"),
        ("actor", "text", "NO", None),
        ("old_enabled", "boolean", "YES", None),
        ("old_rollout_percentage", "integer", "YES", None),
        ("new_enabled", "boolean", "YES", None),
        ("new_rollout_percentage", "integer", "YES", None),
        ("schedule_ids", "ARRAY", "NO", "'{}'"),
        ("written_at", "timestamp with time zone", "NO", "statement_timestamp()"),
        ("xact", "xid8", "YES", "pg_current_xact_id()"),
        ("old_flag_key", "text", "YES", None),
    ],
}


def columns(engine: Engine, table: str) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT column_name, data_type, is_nullable, column_default, is_identity "
                "FROM information_schema.columns WHERE table_name = :t ORDER BY ordinal_position"
            ),
            {"t": table},
        )
        return [tuple(r) for r in rows]


def test_upgrade_creates_exactly_the_spec_schema(empty_database_url: str) -> None:
    engine = make_engine(empty_database_url)
    assert migrate.upgrade(engine) == (None, HEAD)
    for table, expected in SPEC_COLUMNS.items():
        found = columns(engine, table)
        assert [c[0] for c in found] == [e[0] for e in expected]
        for (name, dtype, nullable, default, identity), (_, etype, enull, edefault) in zip(
            found, expected, strict=True
        ):
            assert (dtype, nullable) == (etype, enull), name
            if edefault is None:
                assert default is None, name
            else:
                assert default is not None and edefault in default, name
            assert identity == ("YES" if name == "id" else "NO"), name
    with engine.connect() as conn:
        indexes = set(
            conn.execute(
                sa.text(
                    "SELECT indexname FROM pg_indexes WHERE tablename = 'feature_flag_schedules'"
                )
            ).scalars()
        )
        checks: dict[str, str] = dict(
            conn.execute(
                sa.text(
                    "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
                    "WHERE contype = 'c'"
                )
            ).all()
        )
        unique = conn.execute(
            sa.text(
                "SELECT count(*) FROM pg_constraint WHERE contype = 'u' "
                "AND conrelid = 'feature_flags'::regclass"
            )
        ).scalar()
    assert "idx_schedules_next_retry_at" in indexes
    assert {
        "idx_schedules_pending_due",
        "idx_schedules_flag_open",
        "idx_schedules_recurrence",
        "idx_schedules_open",
    } <= indexes
    assert "max_retries >= 0" in checks["max_retries_check"]
    assert "max_retries <= 10" in checks["max_retries_check"]
    assert "rollout_percentage >= 0" in checks["rollout_percentage_check"]
    assert unique == 1


def test_table_metadata_equals_the_migrated_schema(engine: Engine) -> None:
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == []


def test_head_constant_matches_the_scripts() -> None:
    assert migrate.head() == HEAD


def test_revision_one_has_no_retry_columns_and_downgrade_upgrade_round_trips(
    empty_database_url: str,
) -> None:
    engine = make_engine(empty_database_url)
    migrate.upgrade(engine, "0001")
    names = [c[0] for c in columns(engine, "feature_flag_schedules")]
    assert "retry_count" not in names and "next_retry_at" not in names
    migrate.upgrade(engine)
    assert migrate.current(engine) == HEAD
    assert migrate.downgrade(engine, "0001") == (HEAD, "0001")
    assert "max_retries" not in [c[0] for c in columns(engine, "feature_flag_schedules")]
    migrate.downgrade(engine, "base")
    assert columns(engine, "feature_flags") == []
    migrate.upgrade(engine)
    expected = SPEC_COLUMNS["feature_flag_schedules"]
    assert len(columns(engine, "feature_flag_schedules")) == len(expected)


def test_upgrade_keeps_existing_rows(empty_database_url: str) -> None:
    engine = make_engine(empty_database_url)
    migrate.upgrade(engine, "0001")
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO feature_flag_schedules (flag_key, scheduled_at, updates) "
                "VALUES ('a', now(), '{\"enabled\": true}')"
            )
        )
    migrate.upgrade(engine)
    with engine.connect() as conn:
        row = conn.execute(
            sa.text("SELECT retry_count, max_retries, next_retry_at FROM feature_flag_schedules")
        ).one()
    assert tuple(row) == (0, 3, None)


def test_a_second_upgrade_is_a_no_op(engine: Engine) -> None:
    assert migrate.upgrade(engine) == (HEAD, HEAD)


def test_concurrent_upgrades_both_succeed(empty_database_url: str) -> None:
    errors: list[BaseException] = []
    barrier = threading.Barrier(3)

    def run() -> None:
        try:
            barrier.wait()
            migrate.upgrade(make_engine(empty_database_url))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert migrate.current(make_engine(empty_database_url)) == HEAD


def test_schema_guard(empty_database_url: str) -> None:
    engine = make_engine(empty_database_url)
    database = Database(empty_database_url)
    with connection(database) as conn, pytest.raises(SchemaNotCurrent, match="not migrated"):
        repository.ensure_schema(conn)
    migrate.upgrade(engine, "0001")
    with (
        connection(database) as conn,
        pytest.raises(SchemaNotCurrent, match="run `flagsched migrate`"),
    ):
        repository.ensure_schema(conn)
    migrate.upgrade(engine)
    with connection(database) as conn:
        repository.ensure_schema(conn)


def test_revision_five_adds_recurrences_and_downgrades_to_four(empty_database_url: str) -> None:
    engine = make_engine(empty_database_url)
    migrate.upgrade(engine, "0004")
    assert columns(engine, "feature_flag_recurrences") == []
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO feature_flag_schedules (flag_key, scheduled_at, updates) "
                "VALUES ('a', now(), '{\"enabled\": true}')"
            )
        )
    migrate.upgrade(engine)
    assert "recurrence_id" in [c[0] for c in columns(engine, "feature_flag_schedules")]
    with engine.begin() as conn:
        assert conn.execute(sa.text("SELECT recurrence_id FROM feature_flag_schedules")).all() == [
            (None,)
        ]
        conn.execute(sa.text("UPDATE feature_flag_schedules SET recurrence_id = 7"))
        # One schedule per occurrence: a second row at the same instant is refused.
        with pytest.raises(sa.exc.IntegrityError):
            conn.execute(
                sa.text(
                    "INSERT INTO feature_flag_schedules (flag_key, scheduled_at, updates, "
                    "recurrence_id) SELECT 'a', scheduled_at, updates, 7 "
                    "FROM feature_flag_schedules"
                )
            )
    assert migrate.downgrade(engine, "0004") == (HEAD, "0004")
    assert columns(engine, "feature_flag_recurrences") == []
    assert "recurrence_id" not in [c[0] for c in columns(engine, "feature_flag_schedules")]
    migrate.upgrade(engine)
    assert migrate.current(engine) == HEAD


def test_revision_six_keeps_the_old_functions_and_downgrades_to_five(
    empty_database_url: str,
) -> None:
    """0006 adds new functions beside 0004's (the previous release still calls them),
    swaps the UPDATE history trigger for a row-level one, and gives it all back on
    downgrade; rows from before it keep NULL in the new columns."""
    engine = make_engine(empty_database_url)
    migrate.upgrade(engine, "0005")

    def run(statement: str) -> list[Any]:
        with engine.begin() as conn:
            result = conn.execute(sa.text(statement))
            return list(result) if result.returns_rows else []

    def update_triggers() -> list[str]:
        return [
            r[0]
            for r in run(
                "SELECT tgname FROM pg_trigger WHERE tgrelid = 'feature_flags'::regclass "
                "AND tgname LIKE 'flagsched_record_update%' ORDER BY 1"
            )
        ]

    run(
        "INSERT INTO feature_flags (key) VALUES ('a'); "
        "INSERT INTO feature_flag_schedules (flag_key, scheduled_at, updates) "
        "VALUES ('a', now(), '{\"enabled\": true}')"
    )
    assert update_triggers() == ["flagsched_record_update"]
    migrate.upgrade(engine)
    assert update_triggers() == ["flagsched_record_update_moved", "flagsched_record_update_v2"]
    assert run("SELECT created_xact FROM feature_flag_schedules") == [(None,)]
    for function in (
        "flagsched_claim_v1(integer, boolean)",
        "flagsched_claim_v2(integer, boolean)",
        "flagsched_held_back_v1(integer)",
        "flagsched_check_v1(bigint, interval)",
        "flagsched_check_v2(bigint, interval)",
        "flagsched_kept_attempts_v1(jsonb)",
        "flagsched_kept_attempts_v2(jsonb)",
        "flagsched_apply_v2(bigint[], text[], boolean[], integer[], boolean[], interval, boolean)",
        "flagsched_apply_v3(bigint[], text[], boolean[], integer[], boolean[], interval, boolean)",
        "flagsched_record_change_v1()",
        "flagsched_record_change_v2()",
        "flagsched_record_moved_v1()",
    ):
        assert run(f"SELECT to_regprocedure('{function}') IS NOT NULL") == [(True,)], function
    run("UPDATE feature_flags SET enabled = true")
    assert migrate.downgrade(engine, "0005") == (HEAD, "0005")
    assert update_triggers() == ["flagsched_record_update"]
    assert run("SELECT to_regprocedure('flagsched_claim_v2(integer, boolean)')") == [(None,)]
    assert "created_xact" not in [c[0] for c in columns(engine, "feature_flag_schedules")]
    run("UPDATE feature_flags SET enabled = false")  # the statement trigger records again
    assert run(
        "SELECT old_enabled, new_enabled FROM feature_flag_changes "
        "WHERE old_enabled IS NOT NULL ORDER BY id"
    ) == [(False, True), (True, False)]
    migrate.upgrade(engine)
    assert migrate.current(engine) == HEAD


def test_revision_eleven_adds_the_clamped_check_beside_the_previous_releases(
    empty_database_url: str,
) -> None:
    """0011 adds flagsched_check_v4 and flagsched_apply_v6 beside 0009's check_v3 and
    apply_v5, which the previous release calls and which work as before, side by side with
    them; v4 checks a schedule created in PostgreSQL's first hour, where v3 overflows, and
    otherwise decides as v3 does. Downgrading to 0010 drops only 0011's."""
    engine = make_engine(empty_database_url)
    migrate.upgrade(engine, "0010")

    def run(statement: str, **params: Any) -> list[Any]:
        with engine.begin() as conn:
            result = conn.execute(sa.text(statement), params)
            return list(result) if result.returns_rows else []

    def exists(signature: str) -> bool:
        return bool(run("SELECT to_regprocedure(:s) IS NOT NULL", s=signature)[0][0])

    def schedule(key: str, created_at: str = "now()") -> int:
        return int(
            run(
                "INSERT INTO feature_flag_schedules (flag_key, scheduled_at, updates, created_at) "
                f"VALUES (:k, now() - interval '1 minute', '{{\"enabled\": true}}', {created_at}) "
                "RETURNING id",
                k=key,
            )[0][0]
        )

    def apply(version: str, sid: int, key: str) -> list[Any]:
        return run(
            f"SELECT * FROM flagsched_apply_{version}(ARRAY[CAST(:i AS bigint)], ARRAY[:k], "
            "ARRAY[true], ARRAY[CAST(NULL AS integer)], interval '1 hour', true, '{}')",
            i=sid,
            k=key,
        )

    check_v4 = "flagsched_check_v4(bigint, interval)"
    apply_v6 = (
        "flagsched_apply_v6(bigint[], text[], boolean[], integer[], interval, boolean, jsonb)"
    )
    previous = (
        "flagsched_check_v3(bigint, interval)",
        "flagsched_apply_v5(bigint[], text[], boolean[], integer[], interval, boolean, jsonb)",
    )
    run("INSERT INTO feature_flags (key) VALUES ('a'), ('b'), ('c'), ('d')")
    old_row = schedule("a")
    first_hour = schedule("b", "TIMESTAMPTZ '4714-11-24 00:30:00+00 BC'")
    conflicted = schedule("c")
    run("UPDATE feature_flags SET rollout_percentage = 5 WHERE key = 'c'")  # another writer
    assert not exists(check_v4) and not exists(apply_v6)
    migrate.upgrade(engine)
    assert all(exists(f) for f in (check_v4, apply_v6, *previous))
    # The previous release's write and check, as before.
    assert apply("v5", old_row, "a") == []
    with pytest.raises(sa.exc.DataError, match="timestamp out of range"):
        run("SELECT * FROM flagsched_check_v3(:i, interval '1 hour')", i=first_hour)
    # This release's, beside them.
    assert run("SELECT * FROM flagsched_check_v4(:i, interval '1 hour')", i=first_hour) == []
    assert apply("v6", first_hour, "b") == []
    for version in ("v3", "v4"):
        ((outcome, message),) = run(
            f"SELECT * FROM flagsched_check_{version}(:i, interval '1 hour')", i=conflicted
        )
        assert outcome == "conflict" and message.startswith("conflict: flag 'c' was changed")
    assert [r[1] for r in apply("v5", conflicted, "c")] == ["conflict"]
    assert [r[1] for r in apply("v6", conflicted, "c")] == ["conflict"]
    assert run("SELECT key, enabled FROM feature_flags ORDER BY key") == [
        ("a", True), ("b", True), ("c", False), ("d", False)
    ]  # fmt: skip
    assert migrate.downgrade(engine, "0010") == (HEAD, "0010")
    assert not exists(check_v4) and not exists(apply_v6)
    assert all(exists(f) for f in previous)
    migrate.upgrade(engine)
    assert migrate.current(engine) == HEAD
