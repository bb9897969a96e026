"""Materialising recurrences on a real PostgreSQL: exactly once under overlapping ticks."""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Callable
from typing import Any

from flagsched import materialise, tick
from flagsched.db import Database, connection
from flagsched.model import Outcome

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

    threads = [threading.Thread(target=run) for _ in range(8)]
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
    report = tick.run(database, tick.TickOptions(), rng=random.Random(0))
    assert report.count(Outcome.APPLIED) == 1
    nexts = dict(sql("SELECT id, next_at IS NOT NULL FROM feature_flag_recurrences"))
    assert nexts == {good: True, bad_cron: False, bad_zone: False, overflow: False}
    assert [r[0] for r in sql("SELECT recurrence_id FROM feature_flag_schedules")] == [good]
