"""The repository on a real, migrated PostgreSQL, without the command line: the named
statements, typed rows from claim to record, and the write's one mechanism and fallback."""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import datetime
from typing import Any

import pytest

from flagsched import repository, tick
from flagsched.db import Database, begin, connection, transaction
from flagsched.errors import StatementFailed
from flagsched.model import (
    Backlog,
    Change,
    Claimed,
    Outcome,
    Result,
    Updates,
    Verdict,
)
from flagsched.rows import (
    ChangeRow,
    FailedRow,
    ScheduleRow,
    ShownSchedule,
)

Sql = Callable[..., list[Any]]


def _changes(claimed: list[Claimed]) -> list[Change]:
    return [Change(c, Updates.parse(c.updates), True) for c in claimed]


def test_one_schedule_from_claim_to_record_in_typed_rows(
    database: Database, add_flag: Any, add_schedule: Any
) -> None:
    add_flag("checkout")
    first = add_schedule("checkout", {"rollout_percentage": 10}, at="now() - interval '2 min'")
    second = add_schedule("checkout", {"enabled": True})
    with begin(database) as conn:
        now, claimed = repository.claim(conn, limit=10)
        assert isinstance(now, datetime)
        assert [(c.id, c.flag_key, c.blocked, c.defect) for c in claimed] == [
            (first, "checkout", False, None),
            (second, "checkout", False, None),
        ]
        assert claimed[0].updates == {"rollout_percentage": 10}
        with repository.savepoint(conn):
            verdicts = repository.apply(
                conn, _changes(claimed), wait=False, max_lateness_seconds=None
            )
        assert verdicts == {}
        repository.record(conn, [Result(c, Outcome.APPLIED) for c in claimed], now=now)
    with begin(database) as conn:
        shown = repository.show_schedule(conn, second)
        assert isinstance(shown, ShownSchedule)
        assert (shown.status, shown.retry_count, shown.permanent) == ("applied", 0, False)
        assert isinstance(shown.attempts, list) and shown.attempts[0]["outcome"] == "applied"
        (change,) = repository.changes_of(conn, second, "checkout")
        assert isinstance(change, ChangeRow)
        assert change.schedule_ids == [first, second]  # one folded write, both named
        assert change.new == {"enabled": True, "rollout_percentage": 10}
        newest = repository.history(conn, flag_key="checkout", since=None, limit=5)
        assert newest[0] == change  # newest first: the tick's, then the flag's INSERT
        backlog = repository.backlog(conn, now=repository.db_now(conn))
        assert isinstance(backlog, Backlog) and backlog.due == 0


def test_reads_come_back_as_their_row_types(
    database: Database, add_flag: Any, add_schedule: Any
) -> None:
    add_flag("a")
    waiting = add_schedule(
        "a",
        {"enabled": True},
        status="failed",
        retry_count=1,
        next_retry_at="now() + interval '1 hour'",
    )
    later = add_schedule("a", {"enabled": False}, at="now() + interval '2 hours'")
    with begin(database) as conn:
        listed = repository.list_schedules(conn, flag_key="a")
        assert [type(r) for r in listed] == [ScheduleRow, ScheduleRow]
        assert [r.id for r in listed] == [waiting, later]
        failed = repository.list_failed(conn, permanent=False, flag_key=None, limit=10)
        assert [(type(r), r.id, r.permanent) for r in failed] == [(FailedRow, waiting, False)]
        locked = repository.lock_schedule(conn, waiting)
        assert locked is not None and locked.waiting and locked.retry_count == 1


def test_a_refused_flag_is_reported_by_the_statement_and_the_rest_written(
    database: Database, add_flag: Any, add_schedule: Any, failing: Any, flag: Any
) -> None:
    add_flag("good")
    add_flag("bad")
    add_schedule("good", {"enabled": True})
    add_schedule("bad", {"enabled": True})
    failing("bad")
    with begin(database) as conn:
        _, claimed = repository.claim(conn, limit=10)
        with repository.savepoint(conn):
            verdicts = repository.apply(
                conn, _changes(claimed), wait=False, max_lateness_seconds=None
            )
    keys = [c.flag_key for c in claimed]
    assert list(verdicts) == [keys.index("bad")]
    verdict, message = verdicts[keys.index("bad")]
    assert verdict is Verdict.FLAG_FAILED
    assert message is not None and "injected failure for bad" in message
    assert message.endswith("(SQLSTATE P0001)")
    assert flag("good") == (True, 0) and flag("bad") == (False, 0)


def test_a_timed_out_write_fails_the_statement_with_its_sqlstate(
    database_url: str, add_flag: Any, add_schedule: Any, failing: Any
) -> None:
    add_flag("slow")
    add_schedule("slow", {"enabled": True})
    failing("slow", sleep=5)
    database = Database(database_url, lock_timeout=1, statement_timeout=0.3)
    with begin(database) as conn:
        _, claimed = repository.claim(conn, limit=10)
        with pytest.raises(StatementFailed) as caught, repository.savepoint(conn):
            repository.apply(conn, _changes(claimed), wait=False, max_lateness_seconds=None)
        assert caught.value.sqlstate == "57014"
        assert repository.db_now(conn) is not None  # rolled back to the savepoint only


def test_the_write_isolates_one_refused_flag_among_many(
    database: Database, sql: Sql, add_flag: Any, add_schedule: Any, failing: Any
) -> None:
    keys = [f"f{n:03}" for n in range(64)]
    for key in keys:
        add_flag(key)
        add_schedule(key, {"rollout_percentage": 40})
        add_schedule(key, {"rollout_percentage": 60})
    failing("f041")
    with connection(database) as conn, transaction(database, conn):
        _, claimed = repository.claim(conn, limit=1000)
        changes = _changes(claimed)
        verdicts = tick._write(conn, changes, tick.StopFlag(), None, tick.HeldFlags())
    refused = {changes[i].schedule.flag_key: v for i, (v, _) in verdicts.items()}
    assert set(refused) == {"f041"}  # the first refused (a retry), the second held back
    assert sorted(v for v, _ in verdicts.values()) == [Verdict.ERROR, Verdict.NOT_ATTEMPTED]
    rows = sql("SELECT key, rollout_percentage FROM feature_flags ORDER BY key")
    assert {k: r for k, r in rows if r != 60} == {"f041": 0}


def test_held_back_rows_are_typed_claims_never_attempted(
    database: Database, add_flag: Any, add_schedule: Any
) -> None:
    add_flag("a")
    add_schedule(
        "a",
        {"enabled": True},
        status="failed",
        retry_count=1,
        next_retry_at="now() + interval '1 hour'",
        at="now() - interval '5 minutes'",
    )
    behind = add_schedule("a", {"enabled": False})
    with begin(database) as conn:
        (held,) = repository.held_back(conn, limit=10)
    assert (held.id, held.blocked, held.updates) == (behind, True, None)


def test_a_whole_tick_uses_only_named_statements(
    database: Database, add_flag: Any, add_schedule: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every statement a tick sends is one of queries.sql's, a transaction's start included
    (composed with this database's timeouts)."""
    import psycopg

    from flagsched.sql import names, statement

    known = set()
    for name in names():
        try:
            known.add(statement(name))
        except Exception:  # a fragment, or a statement whose slots or literals vary
            continue
    known.add(database.begin_sql())
    sent: list[str] = []
    real = psycopg.Connection.execute

    def execute(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        sent.append(str(query))
        return real(self, query, *args, **kwargs)

    add_flag("a")
    add_schedule("a", {"enabled": True})
    monkeypatch.setattr(psycopg.Connection, "execute", execute)
    report = tick.run(database, tick.TickOptions(), rng=random.Random(0))
    assert report.count(Outcome.APPLIED) == 1
    own = [q for q in sent if not q.startswith("BEGIN")]
    assert own and all(q in known for q in own), [q[:60] for q in own if q not in known]


def test_a_savepoint_undoes_only_its_own_writes(
    database: Database, add_flag: Any, sql: Sql
) -> None:
    add_flag("a")
    add_flag("b")
    with connection(database) as conn, transaction(database, conn):
        conn.execute("UPDATE feature_flags SET enabled = true WHERE key = 'a'")
        with pytest.raises(StatementFailed, match="division by zero"), repository.savepoint(conn):
            conn.execute("UPDATE feature_flags SET enabled = true WHERE key = 'b'")
            conn.execute("SELECT 1 / 0")
        conn.execute("UPDATE feature_flags SET rollout_percentage = 5 WHERE key = 'b'")
    rows = sql("SELECT key, enabled, rollout_percentage FROM feature_flags ORDER BY key")
    assert [tuple(r) for r in rows] == [("a", True, 0), ("b", False, 5)]


@pytest.fixture
def database_url(shaped_database_url: str) -> str:
    """Every test here on the built-in tables and on your own flags table (issue 18)."""
    return shaped_database_url


def test_a_server_errors_context_is_cut_never_the_whole_statement(database_url: str) -> None:
    """An error inside a stored function quotes the whole statement in its CONTEXT (10,000
    characters for the claim): the one line an operator reads keeps its start only."""
    import psycopg

    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "CREATE FUNCTION test_long() RETURNS integer LANGUAGE plpgsql AS $$ BEGIN "
            f"RETURN (SELECT 1 / 0 WHERE '{'x' * 5000}' <> ''); END $$"
        )
        with pytest.raises(psycopg.Error) as caught:
            conn.execute("SELECT test_long()")
    message = str(Database(database_url).error(caught.value))
    assert "division by zero" in message and "test_long" in message
    assert len(message) < 1000 and "\n" not in message
