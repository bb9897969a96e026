"""Materialising recurrences on a real PostgreSQL: exactly once under overlapping ticks."""

from __future__ import annotations

import contextvars
import json
import random
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from structlog.testing import capture_logs

from flagsched import materialise, tick
from flagsched.db import Database, connection
from flagsched.model import Outcome
from tests.conftest import _command_env, invoke

Sql = Callable[..., list[Any]]


def add_recurrence(sql: Sql, key: str, cron: str, *, behind: str, zone: str = "UTC") -> int:
    rows = sql(
        f"""INSERT INTO feature_flag_recurrences (flag_key, cron, timezone, updates, next_at)
            VALUES (:k, :c, :z, CAST(:u AS jsonb), now() - interval '{behind}') RETURNING id""",
        k=key,
        c=cron,
        z=zone,
        u=json.dumps({"enabled": True}),
    )
    return int(rows[0][0])


def test_eight_overlapping_ticks_make_one_schedule_per_occurrence(
    database: Database, sql: Sql, add_flag: Any
) -> None:
    for n in range(40):
        add_flag(f"f{n}")
        add_recurrence(sql, f"f{n}", "* * * * *", behind="10 minutes")
    add_recurrence(sql, "f0", "0 6 * * 1", behind="21 days", zone="Europe/Berlin")
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            barrier.wait()
            tick.run(database, tick.TickOptions(batch_size=7), rng=random.Random(0))
        except BaseException as exc:
            errors.append(exc)

    # each thread in a copy of this context: the test's table mapping (its shape)
    threads = [
        threading.Thread(target=contextvars.copy_context().run, args=(run,)) for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    per_recurrence = sql(
        "SELECT recurrence_id, count(*), count(DISTINCT scheduled_at) "
        "FROM feature_flag_schedules GROUP BY recurrence_id"
    )
    # Ticks that overlap within one minute see the same latest occurrence; one that started
    # a minute later may add that minute's occurrence, never a second row for one occurrence.
    assert len(per_recurrence) == 41
    assert all(count == distinct for _, count, distinct in per_recurrence)
    assert all(count <= 2 for _, count, _ in per_recurrence)
    assert sql("SELECT count(*) FROM feature_flag_recurrences WHERE next_at <= now()")[0][0] == 0


def test_materialising_twice_in_one_minute_adds_nothing(
    database: Database, sql: Sql, add_flag: Any
) -> None:
    add_flag("a")
    rid = add_recurrence(sql, "a", "0 6 * * 1", behind="21 days", zone="Europe/Berlin")
    with connection(database) as conn:
        assert materialise.due_recurrences(database, conn) == 1
        assert materialise.due_recurrences(database, conn) == 0
    # Even if next_at is put back, the occurrence already has its schedule.
    sql("UPDATE feature_flag_recurrences SET next_at = now() - interval '21 days'")
    with connection(database) as conn:
        assert materialise.due_recurrences(database, conn) == 0
    row = sql(
        "SELECT count(*), min(extract(isodow FROM scheduled_at AT TIME ZONE 'Europe/Berlin')), "
        "min(to_char(scheduled_at AT TIME ZONE 'Europe/Berlin', 'HH24:MI')), "
        "min(now() - scheduled_at) < interval '7 days' "
        "FROM feature_flag_schedules WHERE recurrence_id = :r",
        r=rid,
    )[0]
    assert tuple(row) == (1, 1, "06:00", True)  # once, the latest Monday 06:00 in Berlin


def test_an_unreadable_recurrence_stops_alone(database: Database, sql: Sql, add_flag: Any) -> None:
    add_flag("a")
    good = add_recurrence(sql, "a", "* * * * *", behind="1 minute")
    bad_cron = add_recurrence(sql, "a", "every tuesday", behind="1 minute")
    bad_zone = add_recurrence(sql, "a", "* * * * *", behind="1 minute", zone="Nowhere/City")
    overflow = add_recurrence(sql, "a", "* * * * *", behind="1 minute")
    sql(
        "UPDATE feature_flag_recurrences SET expires_after = interval '100000000 years' "
        "WHERE id = :i",
        i=overflow,
    )
    with capture_logs() as logs:
        report = tick.run(database, tick.TickOptions(), rng=random.Random(0))
    assert report.count(Outcome.APPLIED) == 1
    stopped = {e["recurrence_id"]: e for e in logs if e["event"] == "recurrence_stopped"}
    assert set(stopped) == {bad_cron, bad_zone, overflow}
    assert all(e["flag_key"] == "a" and e["error"] for e in stopped.values())  # every path
    nexts = dict(sql("SELECT id, next_at IS NOT NULL FROM feature_flag_recurrences"))
    assert nexts == {good: True, bad_cron: False, bad_zone: False, overflow: False}
    assert [r[0] for r in sql("SELECT recurrence_id FROM feature_flag_schedules")] == [good]


def _many_due_recurrences(sql: Sql, count: int) -> None:
    """`count` recurrences each firing exactly once however long the test takes (yearly,
    due for more than a year: the missed occurrences collapse into one, the next is months
    away; an every-minute cron would fire again when a minute passes between two ticks)."""
    sql("INSERT INTO feature_flags (key) SELECT 'r' || g FROM generate_series(1, :n) AS g", n=count)
    sql(
        """INSERT INTO feature_flag_recurrences (flag_key, cron, timezone, updates, next_at)
           SELECT 'r' || g, '0 0 1 1 *', 'UTC', '{"enabled": true}',
                  now() - interval '400 days'
           FROM generate_series(1, :n) AS g""",
        n=count,
    )


def _made_once_each(sql: Sql) -> int:
    """Schedules made from recurrences; none twice for one recurrence."""
    twice = sql(
        "SELECT recurrence_id FROM feature_flag_schedules WHERE recurrence_id IS NOT NULL "
        "GROUP BY recurrence_id HAVING count(*) > 1"
    )
    assert twice == []
    return int(sql("SELECT count(*) FROM feature_flag_schedules")[0][0])


def test_a_stop_between_materialising_batches_keeps_what_was_committed(
    database: Database, sql: Sql, monkeypatch: Any
) -> None:
    """A signal arriving while the first batch is written: that batch commits, the tick
    stops before the next one and claims nothing; the next tick makes the rest, once each."""
    from flagsched import repository

    total = materialise.BATCH * 2 + 100
    _many_due_recurrences(sql, total)
    stop = tick.StopFlag()
    write = repository.materialise

    def signalled_during(*args: Any) -> Any:
        made = write(*args)
        stop.request(15)  # SIGTERM, as the handler of the command line would
        return made

    monkeypatch.setattr(repository, "materialise", signalled_during)
    report = tick.run(database, tick.TickOptions(), rng=random.Random(0), stop=stop)
    monkeypatch.setattr(repository, "materialise", write)
    assert report.interrupted_by == 15 and report.batches == 0
    assert _made_once_each(sql) == materialise.BATCH
    still_due = sql("SELECT count(*) FROM feature_flag_recurrences WHERE next_at <= now()")
    assert still_due[0][0] == total - materialise.BATCH
    tick.run(database, tick.TickOptions(batch_size=1), rng=random.Random(0))
    assert _made_once_each(sql) == total
    assert sql("SELECT count(*) FROM feature_flag_recurrences WHERE next_at <= now()")[0][0] == 0


@pytest.mark.not_app_schedules(
    "20,000 claims of one each over 20,000 due rows: the application's indexes give no "
    "(scheduled_at, id) order, so each claim sorts them (docs/own-tables.md, Cost)"
)
def test_sigterm_while_materialising_many_recurrences_ends_the_tick(
    database: Database, sql: Sql, database_url: str
) -> None:
    """A real process and a real SIGTERM while it turns 20,000 recurrences into schedules:
    it exits 143 before making them all (batches it committed stay), and the next tick
    makes the rest, exactly once."""
    import os
    import signal
    import subprocess
    import sys
    import time

    total = 20_000
    _many_due_recurrences(sql, total)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLAGSCHED_")}
    env.update(_command_env(database_url, {"FLAGSCHED_LOG_LEVEL": "warning"}))
    process = subprocess.Popen(
        [sys.executable, "-m", "flagsched", "process"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(3000):  # the first batch committed: it is materialising
            if _made_once_each(sql) > 0 or process.poll() is not None:
                break
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert code == 128 + signal.SIGTERM
    made = _made_once_each(sql)
    assert 0 < made < total  # stopped between batches, keeping the committed ones
    tick.run(database, tick.TickOptions(batch_size=1), rng=random.Random(0))
    assert _made_once_each(sql) == total


def test_a_stop_that_cancels_the_batch_statement_rolls_it_back_and_stops_no_recurrence(
    database: Database, sql: Sql, monkeypatch: Any
) -> None:
    """The signal's cancel fails the statement in flight: that batch rolls back whole and
    stays due; no recurrence is taken for one the database refused."""
    from flagsched import repository
    from flagsched.errors import StatementFailed

    _many_due_recurrences(sql, 10)
    stop = tick.StopFlag()
    write = repository.materialise

    def cancelled(*args: Any) -> Any:
        stop.request(15)
        raise StatementFailed("canceling statement due to user request", "57014")

    monkeypatch.setattr(repository, "materialise", cancelled)
    with capture_logs() as logs:
        report = tick.run(database, tick.TickOptions(), rng=random.Random(0), stop=stop)
    monkeypatch.setattr(repository, "materialise", write)
    assert report.interrupted_by == 15
    assert not [e for e in logs if e["event"] == "recurrence_stopped"]
    assert _made_once_each(sql) == 0
    assert sql("SELECT count(*) FROM feature_flag_recurrences WHERE next_at <= now()")[0][0] == 10
    tick.run(database, tick.TickOptions(), rng=random.Random(0))
    assert _made_once_each(sql) == 10


def test_a_row_referencing_a_recurrence_does_not_hide_it(
    database: Database, database_url: str, sql: Sql, add_flag: Any
) -> None:
    """An application row that references a recurrence by foreign key holds FOR KEY SHARE on
    it while its transaction is open; materialising locked recurrences FOR UPDATE SKIP
    LOCKED and skipped it silently. FOR NO KEY UPDATE (next_at is not a key) does not."""
    import psycopg

    sql(
        "CREATE TABLE test_recurrence_owners (id bigint GENERATED ALWAYS AS IDENTITY, "
        "recurrence_id bigint NOT NULL REFERENCES feature_flag_recurrences (id), team text)"
    )
    add_flag("a")
    rid = add_recurrence(sql, "a", "* * * * *", behind="10 minutes")
    with psycopg.connect(database_url) as app:
        app.execute(
            "INSERT INTO test_recurrence_owners (recurrence_id, team) VALUES (%s, 'x')", [rid]
        )
        with connection(database) as conn:
            assert materialise.due_recurrences(database, conn) == 1
        app.commit()


@pytest.fixture
def database_url(shaped_database_url: str) -> str:
    """Every test here on the built-in tables and on your own flags table (issue 18)."""
    return shaped_database_url


def test_dry_run_shows_the_due_occurrences_it_would_materialise_without_writing(
    database: Database, database_url: str, sql: Sql, add_flag: Any
) -> None:
    """Found by the adversarial pass: with only a recurrence due, `process --dry-run` said
    "nothing is due" (the tick's first step, materialising, was not previewed)."""
    add_flag("a")
    yearly = add_recurrence(sql, "a", "0 0 1 1 *", behind="400 days")  # missed ones collapse
    broken = add_recurrence(sql, "a", "every tuesday", behind="1 minute")

    def state() -> list[Any]:
        return sql("SELECT * FROM feature_flag_recurrences ORDER BY id") + sql(
            "SELECT * FROM feature_flag_schedules ORDER BY id"
        )

    before = state()
    plan = tick.preview(database, tick.TickOptions())
    ran = invoke("process", "--dry-run", url=database_url)
    assert state() == before
    (year,) = sql("SELECT CAST(extract(year FROM now()) AS integer)")[0]
    assert [(p.id, p.recurrence_id, p.flag_key, p.would) for p in plan] == [
        (None, yearly, "a", f"materialise recurrence {yearly} into a schedule to apply: on"),
        (None, broken, "a", f"stop recurrence {broken}: 'every tuesday' is not a 5-field "
         "cron expression (minute hour day month weekday, e.g. '0 2 * * *')"),
    ]  # fmt: skip
    assert plan[0].scheduled_at == datetime(year, 1, 1, tzinfo=UTC)
    assert ran.code == 0, ran.stderr
    assert "nothing is due" not in ran.stdout
    assert f"materialise recurrence {yearly} into a schedule to apply: on" in ran.stdout

    # The tick makes exactly what the preview showed.
    tick.run(database, tick.TickOptions(), rng=random.Random(0))
    made = sql("SELECT recurrence_id, scheduled_at, status FROM feature_flag_schedules")
    assert [tuple(r) for r in made] == [(yearly, plan[0].scheduled_at, "applied")]
