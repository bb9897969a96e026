"""Authoring through the real entry point: list, time zones, ramps, recurrences, cancel."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import Ran

Sql = Callable[..., list[Any]]


@pytest.fixture
def in_process(
    database_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Callable[..., Ran]:
    """The real entry point (main) in-process: for refusals, which never reach a tick."""
    from flagsched.cli import main

    monkeypatch.setenv("FLAGSCHED_DATABASE_URL", database_url)
    monkeypatch.setenv("FLAGSCHED_LOG_FORMAT", "json")

    def run(*args: str) -> Ran:
        with pytest.raises(SystemExit) as exited:
            main(list(args))
        out = capsys.readouterr()
        return Ran(int(exited.value.code or 0), out.out, out.err)

    return run


def ids(ran: Ran) -> list[int]:
    assert ran.code == 0, ran.stderr
    return [int(line) for line in ran.stdout.split()]


def listed(flagsched: Callable[..., Ran], *args: str) -> list[dict[str, Any]]:
    ran = flagsched("list", "--format", "json", *args)
    assert ran.code == 0, ran.stderr
    rows: list[dict[str, Any]] = json.loads(ran.stdout)
    return rows


def test_schedule_in_a_zone_with_expiry_and_conflict_policy(
    flagsched: Callable[..., Ran], add_flag: Any, sql: Sql
) -> None:
    add_flag("a")
    (new_id,) = ids(
        flagsched(
            "schedule", "a", "--at", "2026-07-01T09:00", "--tz", "Europe/Berlin", "--enable",
            "--expires-after", "90m", "--on-conflict", "apply",
        )
    )  # fmt: skip
    row = sql(
        "SELECT scheduled_at = '2026-07-01T07:00Z', expires_at - scheduled_at, on_conflict "
        "FROM feature_flag_schedules WHERE id = :i",
        i=new_id,
    )[0]
    assert row[0] is True and row[1].total_seconds() == 5400 and row[2] == "apply"
    (now_id,) = ids(flagsched("schedule", "a", "--at", "now", "--disable", "--expires-after", "1d"))
    row = sql(
        "SELECT expires_at - scheduled_at, scheduled_at <= now(), on_conflict "
        "FROM feature_flag_schedules WHERE id = :i",
        i=now_id,
    )[0]
    assert row[0].total_seconds() == 86400 and row[1] is True and row[2] == "fail"


@pytest.mark.parametrize(
    ("at", "shown"),
    [
        ("2026-03-29T02:30", ["2026-03-29T01:30:00Z", "2026-03-29T00:30:00Z", "gap"]),
        ("2026-10-25T02:30", ["2026-10-25T00:30:00Z", "2026-10-25T01:30:00Z", "fold"]),
    ],
)
def test_dst_gap_and_fold_are_refused_with_exit_2(
    in_process: Callable[..., Ran], sql: Sql, at: str, shown: list[str]
) -> None:
    for command in (
        ["schedule", "a", "--at", at, "--enable"],
        ["ramp", "a", "--steps", "10,50", "--every", "1h", "--start", at],
        ["list", "--from", at],
    ):
        ran = in_process(*command, "--tz", "Europe/Berlin")
        assert ran.code == 2, command
        assert "Europe/Berlin" in ran.stderr and all(s in ran.stderr for s in shown)
        assert "Traceback" not in ran.stderr
    assert sql("SELECT count(*) FROM feature_flag_schedules")[0][0] == 0


def test_authoring_refuses_bad_input_with_exit_2(in_process: Callable[..., Ran], sql: Sql) -> None:
    for args in (
        ["schedule", "a", "--enable"],  # neither --at nor --cron
        ["schedule", "a", "--at", "now", "--cron", "0 2 * * *", "--enable"],
        ["schedule", "a", "--at", "now", "--enable", "--tz", "Mars/Base"],
        ["schedule", "a", "--at", "now", "--enable", "--expires-after", "soon"],
        ["schedule", "a", "--at", "9999-12-29T00:00:00Z", "--enable", "--expires-after", "3d"],
        ["schedule", "a", "--at", "now", "--enable", "--on-conflict", "maybe"],
        ["schedule", "a", "--cron", "0 2 * *", "--enable"],
        ["schedule", "a", "--cron", "0 25 * * *", "--enable"],
        ["schedule", "a", "--cron", "0 0 30 2 *", "--enable"],
        ["schedule", "a", "--cron", "0 2 * * *"],  # no change
        ["schedule", "a", "--cron", "0 2 * * *", "--enable", "--max-retries", "2"],
        ["ramp", "a", "--steps", "10,50,25", "--every", "1h"],
        ["ramp", "a", "--steps", "10,10", "--every", "1h"],
        ["ramp", "a", "--steps", "10,150", "--every", "1h"],
        ["ramp", "a", "--steps", "ten", "--every", "1h"],
        ["ramp", "a", "--steps", "10,50", "--every", "0s"],
        ["ramp", "a", "--steps", "10,50,90", "--every", "36500d"],
        ["list", "--status", "due"],
        ["list", "--to", "yesterday"],
        ["cancel"],
    ):
        ran = in_process(*args)
        assert ran.code == 2, args
        assert "Traceback" not in ran.stderr and ran.stderr.strip().count("\n") <= 4, args
    assert sql("SELECT count(*) FROM feature_flag_schedules")[0][0] == 0
    assert sql("SELECT count(*) FROM feature_flag_recurrences")[0][0] == 0


def test_ramp_makes_one_group_and_a_tick_applies_the_overdue_steps_in_order(
    flagsched: Callable[..., Ran], add_flag: Any, sql: Sql
) -> None:
    add_flag("a")
    ran = flagsched(
        "ramp", "a", "--steps", "10,25,50,100", "--every", "10m", "--enable",
        "--start", "2026-01-01T09:00", "--tz", "Europe/Berlin", "--expires-after", "3650d",
    )  # fmt: skip
    steps = ids(ran)
    assert len(steps) == 4 and steps == sorted(steps)
    rows = sql(
        "SELECT id, scheduled_at, updates, group_id, expires_at - scheduled_at "
        "FROM feature_flag_schedules ORDER BY scheduled_at, id"
    )
    assert [r[0] for r in rows] == steps
    assert [r[1].isoformat() for r in rows] == [
        f"2026-01-01T08:{m}:00+00:00" for m in ("00", "10", "20", "30")
    ]
    assert [r[2] for r in rows] == [
        {"enabled": True, "rollout_percentage": n} for n in (10, 25, 50, 100)
    ]
    group = rows[0][3]
    assert group is not None and {r[3] for r in rows} == {group}
    assert f"--group {group}" in ran.stderr
    assert {r[4].total_seconds() for r in rows} == {3650 * 86400}  # not expired yet
    # Another ramp gets another group.
    other = ids(flagsched("ramp", "a", "--steps", "5", "--every", "1h", "--start", "now"))
    assert (
        sql("SELECT group_id FROM feature_flag_schedules WHERE id = :i", i=other[0])[0][0] != group
    )
    flagsched("cancel", *map(str, other))
    # All overdue: one tick lands all four, in order.
    assert flagsched("process").code == 0
    assert sql("SELECT enabled, rollout_percentage FROM feature_flags")[0] == (True, 100)
    changes = sql("SELECT new_rollout_percentage FROM feature_flag_changes ORDER BY id")
    assert changes[-1][0] == 100
    assert {
        r[0] for r in sql("SELECT status FROM feature_flag_schedules WHERE group_id = :g", g=group)
    } == {"applied"}


def test_cancel_group_stops_a_ramp_where_it_is(
    flagsched: Callable[..., Ran], add_flag: Any, sql: Sql
) -> None:
    add_flag("a")
    steps = ids(flagsched("ramp", "a", "--steps", "10,25,50,100", "--every", "1h"))
    assert flagsched("process").code == 0  # the first step is due now
    assert sql("SELECT rollout_percentage FROM feature_flags")[0][0] == 10
    group = sql("SELECT group_id FROM feature_flag_schedules LIMIT 1")[0][0]
    ran = flagsched("cancel", "--group", str(group))
    assert ran.code == 0, ran.stdout
    assert f"{steps[0]}: left as it is: already applied" in ran.stdout
    assert all(f"{i}: cancelled (was pending)" in ran.stdout for i in steps[1:])
    statuses = sql("SELECT status FROM feature_flag_schedules ORDER BY scheduled_at, id")
    assert [s[0] for s in statuses] == ["applied", "cancelled", "cancelled", "cancelled"]
    again = flagsched("cancel", "--group", str(group))
    assert again.code == 0 and "already cancelled" in again.stdout
    unknown = flagsched("cancel", "--group", "999999")
    assert unknown.code == 1 and "group 999999: refused: no such group" in unknown.stdout
    assert flagsched("cancel", str(steps[0])).code == 1  # plain ids still work (and refuse)


@pytest.mark.not_app_schedules(
    "a schedule of a missing flag: an application's foreign key keeps it out"
)
def test_list_shows_open_schedules_in_order_with_filters_and_both_formats(
    flagsched: Callable[..., Ran], add_flag: Any, add_schedule: Any, sql: Sql
) -> None:
    assert flagsched("list").stdout.strip() == "no schedules"
    assert flagsched("list", "--format", "json").stdout.strip() == "[]"
    add_flag("a")
    later = add_schedule("a", {"rollout_percentage": 50}, at="'2030-01-01T12:00Z'")
    sooner = add_schedule("a", {"rollout_percentage": 25}, at="'2030-01-01T09:00Z'")
    same_time = add_schedule("b", {"enabled": True}, at="'2030-01-01T09:00Z'")
    retrying = add_schedule(
        "a", {"enabled": True}, at="'2020-06-01T00:00Z'", status="failed", retry_count=1,
        next_retry_at="'2020-06-01T00:02Z'",
    )  # fmt: skip
    for_good = add_schedule("a", {"enabled": True}, status="failed", at="'2020-01-01T00:00Z'")
    applied = add_schedule("a", {"enabled": True}, status="applied", at="'2020-02-01T00:00Z'")
    add_schedule("a", {"enabled": True}, status="cancelled", at="'2020-03-01T00:00Z'")

    rows = listed(flagsched)
    assert [r["id"] for r in rows] == [retrying, sooner, same_time, later]
    assert set(rows[0]) >= {
        "id", "flag_key", "scheduled_at", "updates", "status", "retry_count", "max_retries",
        "next_retry_at", "last_error", "applied_at", "created_at", "updated_at", "permanent",
        "group_id", "expires_at", "on_conflict", "recurrence_id",
    }  # fmt: skip
    assert rows[1]["scheduled_at"] == "2030-01-01T09:00:00Z" and rows[1]["permanent"] is False
    assert rows[1]["updates"] == {"rollout_percentage": 25} and rows[1]["on_conflict"] == "fail"
    assert [r["id"] for r in listed(flagsched, "--flag", "a")] == [retrying, sooner, later]
    assert [r["id"] for r in listed(flagsched, "--status", "failed")] == [for_good, retrying]
    assert listed(flagsched, "--status", "failed")[0]["permanent"] is True
    assert [r["id"] for r in listed(flagsched, "--status", "applied")] == [applied]
    window = ["--from", "2030-01-01T10:00", "--to", "2030-01-01T13:00", "--tz", "Europe/Berlin"]
    assert [r["id"] for r in listed(flagsched, *window)] == [sooner, same_time]  # [09, 12) UTC
    assert [r["id"] for r in listed(flagsched, "--from", "now")] == [sooner, same_time, later]
    assert [r["id"] for r in listed(flagsched, "--to", "now")] == [retrying]
    assert [r["id"] for r in listed(flagsched, "--limit", "2")] == [retrying, sooner]

    table = flagsched("list", "--flag", "a")
    assert table.code == 0
    lines = table.stdout.splitlines()
    assert lines[0].split() == [
        "ID",
        "FLAG",
        "SCHEDULED_AT",
        "STATUS",
        "CHANGE",
        "GROUP",
        "EXPIRES_AT",
        "APPROVAL",
    ]
    assert "retrying at 2020-06-01T00:02:00Z" in lines[1]
    assert "2030-01-01T09:00:00Z" in lines[2] and '{"rollout_percentage":25}' in lines[2]
    local = flagsched("list", "--flag", "a", "--tz", "Europe/Berlin")
    assert "2030-01-01T10:00:00+01:00" in local.stdout


def test_recurrence_is_added_listed_materialised_and_cancelled(
    flagsched: Callable[..., Ran], add_flag: Any, sql: Sql
) -> None:
    add_flag("a")
    (rid,) = ids(
        flagsched(
            "schedule", "a", "--cron", "0 2 * * *", "--tz", "Europe/Berlin", "--enable",
            "--expires-after", "2d",  # the latest 02:00 is less than two days ago: not expired
        )
    )  # fmt: skip
    row = sql(
        "SELECT cron, timezone, updates, next_at > now(), next_at <= now() + interval '1 day', "
        "expires_after, cancelled_at FROM feature_flag_recurrences WHERE id = :i",
        i=rid,
    )[0]
    assert row[:5] == ("0 2 * * *", "Europe/Berlin", {"enabled": True}, True, True)
    assert row[5].total_seconds() == 2 * 86400 and row[6] is None
    shown = json.loads(flagsched("recurrences", "--format", "json").stdout)
    assert [(r["id"], r["cron"], r["expires_after"]) for r in shown] == [(rid, "0 2 * * *", "2d")]
    assert shown[0]["next_at"].endswith("Z")
    assert "Europe/Berlin" in flagsched("recurrences").stdout

    # Three weeks of ticks missed: one schedule, at the latest occurrence, applied at once.
    sql("UPDATE feature_flag_recurrences SET next_at = now() - interval '21 days'")
    assert flagsched("process").code == 0
    made = sql(
        "SELECT id, status, recurrence_id, expires_at - scheduled_at, scheduled_at <= now(), "
        "scheduled_at > now() - interval '1 day' FROM feature_flag_schedules"
    )
    assert len(made) == 1 and made[0][1:] == ("applied", rid, made[0][3], True, True)
    assert made[0][3].total_seconds() == 2 * 86400
    assert sql("SELECT enabled FROM feature_flags")[0][0] is True
    assert sql("SELECT next_at > now() FROM feature_flag_recurrences")[0][0] is True
    assert flagsched("process").code == 0
    assert sql("SELECT count(*) FROM feature_flag_schedules")[0][0] == 1
    assert listed(flagsched, "--status", "applied")[0]["recurrence_id"] == rid

    # A schedule it made still waiting for a retry is cancelled with it.
    sql(
        "UPDATE feature_flag_schedules SET status = 'failed', next_retry_at = now() + interval '1h'"
    )
    ran = flagsched("cancel", "--recurrence", str(rid))
    assert ran.code == 0, ran.stdout
    assert f"recurrence {rid}: stopped" in ran.stdout and f"{made[0][0]}: cancelled" in ran.stdout
    assert flagsched("recurrences").stdout.strip() == "no recurrences"
    sql("UPDATE feature_flag_recurrences SET next_at = now() - interval '1 day'")
    assert flagsched("process").code == 0
    assert sql("SELECT count(*) FROM feature_flag_schedules")[0][0] == 1  # no more
    again = flagsched("cancel", "--recurrence", str(rid), "--recurrence", "424242")
    assert again.code == 1
    assert (
        "already cancelled" in again.stdout
        and "424242: refused: no such recurrence" in again.stdout
    )


@pytest.mark.not_app_schedules(
    "an occurrence of a missing flag makes no schedule there (tests/cli/test_adopted_flags_cli.py)"
)
def test_a_recurrence_on_a_missing_flag_makes_schedules_that_fail_for_good(
    flagsched: Callable[..., Ran], sql: Sql
) -> None:
    ran = flagsched("schedule", "ghost", "--cron", "*/5 * * * *", "--disable")
    assert ran.code == 0 and "warning" in ran.stderr
    sql("UPDATE feature_flag_recurrences SET next_at = now() - interval '5 minutes'")
    assert flagsched("process").code == 1  # failed for good in this tick
    row = sql("SELECT status, next_retry_at, last_error FROM feature_flag_schedules")[0]
    assert row[0] == "failed" and row[1] is None and "ghost" in row[2]


@pytest.mark.not_app_schedules(
    "a schedule of a missing flag: an application's foreign key keeps it out"
)
def test_values_python_cannot_hold_never_stop_list_or_recurrences(
    flagsched: Callable[..., Ran], add_schedule: Any, sql: Sql
) -> None:
    far = add_schedule("a", {"enabled": True}, at="'infinity'")
    sql("UPDATE feature_flag_schedules SET expires_at = '20000-01-01T00:00Z' WHERE id = :i", i=far)
    sql(
        "INSERT INTO feature_flag_recurrences (flag_key, cron, timezone, updates, next_at, "
        "expires_after) VALUES ('a', '0 2 * * *', 'UTC', '{}', '-infinity', "
        "interval '100000000 years')"
    )
    rows = listed(flagsched)
    assert [(r["id"], r["scheduled_at"]) for r in rows] == [(far, "infinity")]
    assert rows[0]["expires_at"].startswith("20000-01-01")
    table = flagsched("list", "--tz", "Europe/Berlin")
    assert table.code == 0 and "infinity" in table.stdout
    shown = flagsched("recurrences", "--format", "json")
    assert shown.code == 0, shown.stderr
    assert json.loads(shown.stdout)[0]["next_at"] == "-infinity"
    assert flagsched("recurrences").code == 0


def test_a_recurrence_due_since_minus_infinity_fires_once(
    flagsched: Callable[..., Ran], add_flag: Any, sql: Sql
) -> None:
    add_flag("a")
    sql(
        "INSERT INTO feature_flag_recurrences (flag_key, cron, timezone, updates, next_at) "
        "VALUES ('a', '0 2 * * *', 'UTC', '{\"enabled\": true}', '-infinity')"
    )
    assert flagsched("process").code == 0
    assert sql("SELECT next_at > now() FROM feature_flag_recurrences")[0][0] is True
    assert sql("SELECT status FROM feature_flag_schedules") == [("applied",)]


def test_every_time_option_reads_tz_wherever_it_stands(
    flagsched: Callable[..., Ran], sql: Sql
) -> None:
    """TIME is read in --tz whether --tz comes before or after it on the command line."""
    local, utc = "2030-06-01T09:00", "2030-06-01T07:00:00Z"
    sql("INSERT INTO feature_flags (key) VALUES ('a')")
    for order in (
        ("--at", local, "--tz", "Europe/Berlin"),
        ("--tz", "Europe/Berlin", "--at", local),
    ):
        assert flagsched("schedule", "a", *order, "--enable").code == 0
    ramp = flagsched(
        "ramp", "a", "--steps", "10,20", "--every", "1h", "--start", local, "--tz", "Europe/Berlin"
    )
    assert ramp.code == 0, ramp.stderr
    at = sql(
        "SELECT to_char(scheduled_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') "
        "FROM feature_flag_schedules ORDER BY id"
    )
    assert [r[0] for r in at] == [utc, utc, utc, "2030-06-01T08:00:00Z"]
    for since in (
        ("--since", local, "--tz", "Asia/Tokyo"),
        ("--tz", "Asia/Tokyo", "--since", local),
    ):
        assert flagsched("history", *since).code == 0
    shown = listed(flagsched, "--from", local, "--tz", "Europe/Berlin", "--to", "2030-06-01T09:30")
    assert len(shown) == 3  # 07:00Z three times; the 08:00Z step is after --to (07:30Z)


@pytest.fixture
def database_url(shaped_database_url: str) -> str:
    """Every test here on the built-in tables and on your own flags table (issue 18)."""
    return shaped_database_url
