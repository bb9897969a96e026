"""Gentle migrations: one transaction per revision, several migrates at once still safe (also
through PgBouncer), and room for CREATE INDEX CONCURRENTLY in a future revision."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from flagsched import migrate, repository
from flagsched.errors import DatabaseError
from flagsched.schema import make_engine
from scripts import pgbouncer as pgbouncer_script

# Which transaction wrote each revision into alembic_version.
VERSION_LOG = """
CREATE TABLE test_version_log (version text, txid bigint, n serial);
CREATE FUNCTION test_log_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO test_version_log (version, txid) VALUES (NEW.version_num, txid_current());
    RETURN NEW;
END $$;
CREATE TRIGGER test_log_version AFTER INSERT OR UPDATE ON alembic_version
    FOR EACH ROW EXECUTE FUNCTION test_log_version();
"""


def _sql(url: str, statement: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(statement)
        return cur.fetchall() if cur.description else []


def _at_0001_with_version_log(url: str) -> None:
    migrate.upgrade(make_engine(url), "0001")
    _sql(url, VERSION_LOG)


def _log(url: str) -> list[tuple[object, ...]]:
    return _sql(url, "SELECT version, txid FROM test_version_log ORDER BY n")


def test_each_revision_commits_in_its_own_transaction(empty_database_url: str) -> None:
    _at_0001_with_version_log(empty_database_url)
    assert migrate.upgrade(make_engine(empty_database_url)) == ("0001", migrate.head())
    log = _log(empty_database_url)
    assert [v for v, _ in log] == [
        "0002", "0003", "0004", "0005", "0006", "0007", "0008", "0009", "0010", "0011"
    ]  # fmt: skip
    assert len({txid for _, txid in log}) == len(log)


def test_a_failing_revision_leaves_the_revisions_before_it_done(empty_database_url: str) -> None:
    engine = make_engine(empty_database_url)
    migrate.upgrade(engine, "0003")
    _sql(empty_database_url, "CREATE TABLE feature_flag_recurrences (id int)")  # 0005 fails
    with pytest.raises(DatabaseError, match="feature_flag_recurrences"):
        migrate.upgrade(engine)
    assert migrate.current(engine) == "0004"
    assert _sql(empty_database_url, "SELECT to_regclass('feature_flag_changes') IS NOT NULL") == [
        (True,)
    ]
    _sql(empty_database_url, "DROP TABLE feature_flag_recurrences")
    assert migrate.upgrade(engine) == ("0004", migrate.head())


def _migrate_processes(url: str, count: int) -> list[subprocess.Popen[str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLAGSCHED_", "DATABASE_URL"))}
    env.update(FLAGSCHED_DATABASE_URL=url, FLAGSCHED_LOG_FORMAT="json", FLAGSCHED_LOCK_TIMEOUT="60")
    return [
        subprocess.Popen(
            [sys.executable, "-m", "flagsched", "migrate"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(count)
    ]


def _waiting_for_the_lock(url: str) -> int:
    return int(
        _sql(
            url,
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )[0][0]
    )


@pytest.fixture
def other_session(empty_database_url: str) -> Iterator[psycopg.Connection[object]]:
    with psycopg.connect(empty_database_url) as conn:
        yield conn


@pytest.mark.parametrize("pooled", [False, True], ids=["direct", "through-pgbouncer"])
def test_migrates_racing_revision_by_revision_apply_each_revision_once(
    empty_database_url: str,
    other_session: psycopg.Connection[object],
    request: pytest.FixtureRequest,
    pooled: bool,
) -> None:
    url = empty_database_url
    if pooled:
        url = request.getfixturevalue("pgbouncer").url(empty_database_url)
    # Started at 0001 while another session holds the lock: they all queue for the next
    # revision, and after each revision the next lock holder finds the database moved on.
    _at_0001_with_version_log(empty_database_url)
    other_session.execute("SELECT pg_advisory_xact_lock(%s)", (repository.MIGRATION_LOCK_KEY,))
    processes = _migrate_processes(url, 3)
    # The pooler has 2 server connections: at most 2 can wait on the server at once.
    while _waiting_for_the_lock(empty_database_url) < (1 if pooled else 3):
        assert all(p.poll() is None for p in processes)
        time.sleep(0.05)
    other_session.commit()
    results = [p.communicate(timeout=120) for p in processes]
    assert [p.returncode for p in processes] == [0, 0, 0], results
    assert [v for v, _ in _log(empty_database_url)] == [
        "0002", "0003", "0004", "0005", "0006", "0007", "0008", "0009", "0010", "0011"
    ]  # fmt: skip
    assert migrate.current(make_engine(empty_database_url)) == migrate.head()


# A future revision that builds an index without blocking writes.
CONCURRENT_REVISION = '''
"""An index built CONCURRENTLY (a test revision).

Revision ID: 0099
Revises: 0011
"""

from alembic import op

revision = "0099"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.execute(
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS idx_test_concurrently "
            "ON feature_flag_schedules (created_at)"
        )
    op.execute("COMMENT ON INDEX idx_test_concurrently IS 'built concurrently'")


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.execute("DROP INDEX CONCURRENTLY IF EXISTS idx_test_concurrently")
'''


@pytest.fixture
def with_concurrent_revision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped migrations plus revision 0099 that runs CREATE INDEX CONCURRENTLY."""
    location = tmp_path / "migrations"
    shipped = Path(migrate._script_location())
    shutil.copytree(shipped, location, ignore=shutil.ignore_patterns("__pycache__"))
    (location / "versions" / "0099_concurrent_index.py").write_text(CONCURRENT_REVISION)
    monkeypatch.setattr(migrate, "_script_location", lambda: str(location))


def _index(url: str) -> list[tuple[object, ...]]:
    return _sql(
        url,
        "SELECT i.indisvalid, obj_description(i.indexrelid, 'pg_class') FROM pg_index i "
        "WHERE i.indexrelid = to_regclass('idx_test_concurrently')",
    )


@pytest.mark.parametrize("pooled", [False, True], ids=["direct", "through-pgbouncer"])
def test_a_revision_may_build_an_index_concurrently(
    database_url: str,
    with_concurrent_revision: None,
    request: pytest.FixtureRequest,
    pooled: bool,
) -> None:
    url = database_url
    if pooled:
        bouncer: pgbouncer_script.PgBouncer = request.getfixturevalue("pgbouncer")
        url = bouncer.url(database_url)
    engine = make_engine(url)
    assert migrate.upgrade(engine) == ("0011", "0099")
    assert _index(database_url) == [(True, "built concurrently")]
    assert migrate.downgrade(engine, "0011") == ("0099", "0011")
    assert _index(database_url) == []


def test_migrate_sql_commits_around_a_concurrent_index(
    with_concurrent_revision: None, capsys: pytest.CaptureFixture[str]
) -> None:
    migrate.print_sql(sys.stdout)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    at = next(i for i, line in enumerate(lines) if "CREATE INDEX CONCURRENTLY" in line)
    assert (lines[at - 1], lines[at + 1]) == ("COMMIT;", "BEGIN;")  # outside a transaction
    # One per revision, and one more: 0099 commits before its concurrent index and begins after.
    assert lines.count("BEGIN;") == lines.count("COMMIT;") == 13


def test_an_application_updating_flags_while_0006_runs_never_deadlocks(
    empty_database_url: str,
) -> None:
    """An application transaction holding the flags table (its UPDATE then writes the
    history through the trigger) while `migrate` runs 0006: the migration waits for it, the
    application's write goes through, and both finish (0006 took the history table first and
    deadlocked with such a writer: `make bench`, case 10)."""
    url = empty_database_url
    migrate.upgrade(make_engine(url), "0005")
    _sql(url, "INSERT INTO feature_flags (key) VALUES ('a')")
    with psycopg.connect(url) as app:
        app.execute("LOCK TABLE feature_flags IN ROW EXCLUSIVE MODE")  # as its UPDATE would
        process = _migrate_processes(url, 1)[0]
        try:
            deadline = time.monotonic() + 30
            while not _sql(  # migrate waits for a lock this transaction holds
                url,
                "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND application_name LIKE 'flagsched%'",
            ):
                assert time.monotonic() < deadline and process.poll() is None
                time.sleep(0.05)
            # its UPDATE writes the history: it must not wait for the migration
            app.execute("SET LOCAL lock_timeout = '10s'")
            app.execute("UPDATE feature_flags SET enabled = true WHERE key = 'a'")
            app.commit()
        finally:
            _, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert migrate.current(make_engine(url)) == migrate.head()
    assert _sql(url, "SELECT enabled FROM feature_flags") == [(True,)]
