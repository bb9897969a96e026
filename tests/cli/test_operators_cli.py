"""Operator commands through the real entry point: status, schedule, retry, cancel, prune."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import Ran

Sql = Callable[..., list[Any]]


def status_json(flagsched: Callable[..., Ran]) -> dict[str, Any]:
    ran = flagsched("status", "--format", "json")
    assert ran.code == 0, ran.stderr
    result: dict[str, Any] = json.loads(ran.stdout)
    return result


def test_status_counts_every_state(
    flagsched: Callable[..., Ran], add_flag: Any, add_schedule: Any
) -> None:
    assert status_json(flagsched)["due"] == 0
    add_flag("a")
    add_schedule("a", {"enabled": True}, at="now() - interval '10 minutes'")  # due
    add_schedule("a", {"enabled": True}, at="now() - interval '5 minutes'")  # due (held back)
    add_schedule("a", {"enabled": True}, at="now() + interval '1 hour'")  # later
    add_schedule(
        "a",
        {"enabled": True},
        status="failed",
        retry_count=1,
        next_retry_at="now() - interval '20 minutes'",
    )  # retry now due
    add_schedule(
        "a",
        {"enabled": True},
        status="failed",
        retry_count=1,
        next_retry_at="now() + interval '3 minutes'",
    )  # waiting
    add_schedule(
        "a",
        {"enabled": True},
        status="failed",
        retry_count=4,
        max_retries=3,
        next_retry_at="now() + interval '3 minutes'",
    )  # exhausted: for good
    add_schedule("a", {"enabled": True}, status="failed")  # no next_retry_at: for good
    add_schedule("a", {"enabled": True}, status="applied")
    add_schedule("a", {"enabled": True}, status="cancelled")
    report = status_json(flagsched)
    assert {
        k: report[k]
        for k in ("due", "scheduled", "waiting_retry", "failed", "applied", "cancelled")
    } == {"due": 3, "scheduled": 1, "waiting_retry": 1, "failed": 2, "applied": 1, "cancelled": 1}
    assert 1190 <= report["oldest_due_age_seconds"] <= 1300  # the retry's next_retry_at
    assert report["next_due_at"].endswith("Z")
    table = flagsched("status")
    assert (
        table.code == 0 and "failed for good" in table.stdout and "oldest due: 12" in table.stdout
    )


def test_status_max_lag_is_a_health_check(
    flagsched: Callable[..., Ran], add_flag: Any, add_schedule: Any
) -> None:
    assert flagsched("status", "--max-lag", "60").code == 0  # nothing due
    add_flag("a")
    add_schedule("a", {"enabled": True}, at="now() - interval '10 minutes'")
    assert flagsched("status", "--max-lag", "900").code == 0
    late = flagsched("status", "--max-lag", "300")
    assert late.code == 1 and "waited" in late.stderr


def test_schedule_adds_a_pending_schedule(
    flagsched: Callable[..., Ran], add_flag: Any, sql: Sql
) -> None:
    add_flag("a")
    ran = flagsched(
        "schedule",
        "a",
        "--at",
        "2030-01-02T03:04:05+01:00",
        "--enable",
        "--rollout",
        "40",
        "--max-retries",
        "5",
    )
    assert ran.code == 0, ran.stderr
    new_id = int(ran.stdout.strip())
    row = sql(
        "SELECT flag_key, scheduled_at, updates, status, max_retries, "
        "scheduled_at = '2030-01-02T02:04:05Z' FROM feature_flag_schedules WHERE id = :i",
        i=new_id,
    )[0]
    assert row[0] == "a" and row[2] == {"enabled": True, "rollout_percentage": 40}
    assert (row[3], row[4], row[5]) == ("pending", 5, True)
    assert "warning" not in ran.stderr

    now = flagsched("schedule", "a", "--at", "now", "--disable")
    assert now.code == 0
    assert sql(
        "SELECT scheduled_at <= now(), max_retries FROM feature_flag_schedules WHERE id = :i",
        i=int(now.stdout),
    )[0] == (True, 3)
    assert flagsched("process").code == 0
    assert sql("SELECT enabled FROM feature_flags")[0][0] is False


@pytest.mark.not_app_schedules(
    "`schedule` refuses a missing flag there (tests/cli/test_adopted_flags_cli.py)"
)
def test_schedule_warns_but_schedules_for_a_missing_flag(
    flagsched: Callable[..., Ran], sql: Sql
) -> None:
    ran = flagsched("schedule", "not-yet", "--at", "now", "--enable")
    assert ran.code == 0 and ran.stdout.strip().isdigit()
    assert "warning" in ran.stderr and "not-yet" in ran.stderr
    assert sql("SELECT count(*) FROM feature_flag_schedules")[0][0] == 1


def test_schedule_refuses_bad_input_with_exit_2(flagsched: Callable[..., Ran], sql: Sql) -> None:
    for args in (
        ["a", "--at", "now", "--rollout", "150"],
        ["a", "--at", "now", "--rollout", "-1"],
        ["a", "--at", "now"],
        ["a", "--at", "next tuesday", "--enable"],
        ["a", "--at", "2030-01-01T09:00:00", "--enable"],
        ["a", "--at", "now", "--enable", "--max-retries", "11"],
        ["--at", "now", "--enable"],
    ):
        ran = flagsched("schedule", *args)
        assert ran.code == 2, args
        assert "Traceback" not in ran.stderr
    assert sql("SELECT count(*) FROM feature_flag_schedules")[0][0] == 0


def test_retry_refusals_and_force(
    flagsched: Callable[..., Ran], add_flag: Any, add_schedule: Any, sql: Sql
) -> None:
    add_flag("a")
    old = add_schedule(
        "a",
        {"rollout_percentage": 10},
        status="failed",
        retry_count=4,
        at="now() - interval '2 hours'",
    )
    sql("UPDATE feature_flag_schedules SET last_error = 'boom' WHERE id = :i", i=old)
    newer = add_schedule(
        "a", {"rollout_percentage": 50}, status="applied", at="now() - interval '1 hour'"
    )
    pending = add_schedule("a", {"enabled": True}, at="now() + interval '1 day'")
    ran = flagsched("retry", str(old), str(newer), str(pending), "424242")
    assert ran.code == 1
    lines = dict(line.split(": ", 1) for line in ran.stdout.splitlines())
    assert "would undo newer state" in lines[str(old)] and "--force" in lines[str(old)]
    assert "applied, not failed" in lines[str(newer)]
    assert "pending, not failed" in lines[str(pending)]
    assert "no such schedule" in lines["424242"]
    assert sql("SELECT status FROM feature_flag_schedules WHERE id = :i", i=old)[0][0] == "failed"

    forced = flagsched("retry", "--force", str(old))
    assert forced.code == 0 and forced.stdout.startswith(f"{old}: pending again")
    row = sql(
        "SELECT status, retry_count, next_retry_at, last_error FROM feature_flag_schedules "
        "WHERE id = :i",
        i=old,
    )[0]
    assert tuple(row) == ("pending", 0, None, "boom")  # last_error stays until it applies
    logged = [json.loads(x) for x in forced.stderr.splitlines() if '"schedule_retried"' in x]
    assert logged[0]["previous_status"] == "failed" and logged[0]["previous_retry_count"] == 4


def test_retry_then_the_tick_applies_it(
    flagsched: Callable[..., Ran], add_flag: Any, add_schedule: Any, sql: Sql
) -> None:
    add_flag("a")
    sid = add_schedule("a", {"rollout_percentage": 70}, status="failed", retry_count=3)
    assert flagsched("retry", str(sid)).code == 0
    assert flagsched("process").code == 0
    assert sql("SELECT rollout_percentage FROM feature_flags")[0][0] == 70
    assert sql("SELECT last_error FROM feature_flag_schedules")[0][0] is None


def test_cancel(flagsched: Callable[..., Ran], add_flag: Any, add_schedule: Any, sql: Sql) -> None:
    add_flag("a")
    pending = add_schedule("a", {"enabled": True})
    failed = add_schedule(
        "a",
        {"enabled": True},
        status="failed",
        retry_count=1,
        next_retry_at="now() + interval '1 minute'",
    )
    applied = add_schedule("a", {"enabled": True}, status="applied")
    cancelled = add_schedule("a", {"enabled": True}, status="cancelled")
    ran = flagsched("cancel", str(pending), str(failed))
    assert ran.code == 0
    assert (
        sql(
            "SELECT count(*) FROM feature_flag_schedules WHERE status = 'cancelled' "
            "AND next_retry_at IS NULL"
        )[0][0]
        == 3
    )
    refused = flagsched("cancel", str(applied), str(cancelled), "999999")
    assert refused.code == 1
    assert "already applied" in refused.stdout and "already cancelled" in refused.stdout
    assert "999999: refused: no such schedule" in refused.stdout
    assert flagsched("process").code == 0
    assert sql("SELECT enabled FROM feature_flags")[0][0] is False


@pytest.mark.not_app_schedules(
    "a schedule of a missing flag: an application's foreign key keeps it out"
)
def test_prune_deletes_old_history_in_batches_and_keeps_failed(
    flagsched: Callable[..., Ran], sql: Sql
) -> None:
    sql("""INSERT INTO feature_flag_schedules (flag_key, scheduled_at, updates, status,
               applied_at, updated_at)
           SELECT 'a', now() - interval '60 days', '{"enabled": true}', s,
                  CASE WHEN s = 'applied' THEN now() - interval '40 days' END,
                  now() - interval '40 days'
           FROM generate_series(1, 6000) g,
                unnest(ARRAY['applied', 'cancelled', 'failed']) s""")
    sql("""INSERT INTO feature_flag_schedules (flag_key, scheduled_at, updates, status, applied_at)
           VALUES ('a', now(), '{"enabled": true}', 'applied', now() - interval '1 day'),
                  ('a', now(), '{"enabled": true}', 'cancelled', now())""")
    dry = flagsched("prune", "--older-than", "30", "--dry-run")
    assert dry.stdout.strip() == "would delete 12000 schedules (6000 applied, 6000 cancelled)"
    assert sql("SELECT count(*) FROM feature_flag_schedules")[0][0] == 18002
    ran = flagsched("prune", "--older-than", "30")
    assert ran.code == 0 and "deleted 12000 schedules" in ran.stdout
    finished = next(json.loads(x) for x in ran.stderr.splitlines() if "prune_finished" in x)
    assert finished["batches"] == 3  # 5000 rows per transaction
    left = dict(sql("SELECT status, count(*) FROM feature_flag_schedules GROUP BY status"))
    assert left == {"failed": 6000, "applied": 1, "cancelled": 1}
    for bad in ("0", "-3", "soon"):
        assert flagsched("prune", "--older-than", bad).code == 2


@pytest.mark.not_app_schedules(
    "a schedule of a missing flag: an application's foreign key keeps it out"
)
def test_stored_control_characters_are_shown_escaped_never_raw(
    flagsched: Callable[..., Ran], add_schedule: Any, sql: Sql
) -> None:
    key = "evil\x1b]0;pwned\x07\x1b[2J\nkey\u200b"
    shown = "evil\\x1b]0;pwned\\x07\\x1b[2J\\nkey\\u200b"
    failed = add_schedule(key, {"enabled": True}, status="failed", retry_count=1)
    sql(
        "UPDATE feature_flag_schedules SET last_error = :e WHERE id = :i",
        e="boom\r\n\x1b[31mred",
        i=failed,
    )
    add_schedule(key, {"enabled": True}, at="now() - interval '1 hour'")
    sql(
        "INSERT INTO feature_flag_schedules (flag_key, scheduled_at, updates, status) "
        "VALUES ('k', now(), '{}', E'odd\\x1b[5m')"
    )
    outputs = [
        flagsched("list-failed"),
        flagsched("process", "--dry-run"),
        flagsched("retry", str(failed + 2)),
    ]
    for ran in outputs:
        assert "\x1b" not in ran.stdout + ran.stderr and "\x07" not in ran.stdout
    assert shown in outputs[0].stdout and "boom\\r\\n\\x1b[31mred" in outputs[0].stdout
    assert len(outputs[0].stdout.splitlines()) == 2  # the header and one row: no raw newline
    assert shown in outputs[1].stdout
    assert "odd\\x1b[5m" in outputs[2].stdout
    assert json.loads(flagsched("list-failed", "--format", "json").stdout)[0]["flag_key"] == key


@pytest.mark.not_app_schedules(
    "a schedule of a missing flag: an application's foreign key keeps it out"
)
def test_after_retry_the_applied_event_is_not_a_first_attempt_as_the_runbook_says(
    flagsched: Callable[..., Ran], add_flag: Any, add_schedule: Any
) -> None:
    from pathlib import Path

    sid = add_schedule("late-flag", {"enabled": True})
    assert flagsched("process").code == 1  # the flag does not exist yet: failed for good
    add_flag("late-flag")
    assert flagsched("retry", str(sid)).code == 0
    ran = flagsched("process")
    assert ran.code == 0, ran.stderr
    (applied,) = [json.loads(x) for x in ran.stderr.splitlines() if '"schedule_applied"' in x]
    assert (applied["first_attempt"], applied["attempt"], applied["retry_count"]) == (False, 2, 0)
    runbook = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    assert "The applied event then says `first_attempt: false`" in runbook
    assert "`first_attempt: true`" not in runbook


def test_schedule_enable_and_disable_together_is_exit_2(
    flagsched: Callable[..., Ran], sql: Sql
) -> None:
    for when in (("--at", "now"), ("--cron", "0 9 * * *")):
        ran = flagsched("schedule", "a", *when, "--enable", "--disable")
        assert ran.code == 2, (when, ran.stdout)
        assert ran.stdout == "" and len(ran.stderr.strip().splitlines()) == 1
        assert "--enable and --disable exclude each other" in ran.stderr
    assert sql("SELECT count(*) FROM feature_flag_schedules")[0][0] == 0
    assert sql("SELECT count(*) FROM feature_flag_recurrences")[0][0] == 0


def test_every_limit_takes_the_one_bound_the_readme_states(flagsched: Callable[..., Ran]) -> None:
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    bound = 2**31 - 1
    stated = (
        f"`--limit` of `list`, `list-failed` and `history`, and\n`--max-batches`, up to {bound}"
    )
    assert stated in readme
    for command in (("list",), ("list-failed",), ("history",)):
        assert flagsched(*command, "--limit", str(bound)).code == 0, command
        too_many = flagsched(*command, "--limit", str(bound + 1))
        assert too_many.code == 2 and "--limit" in too_many.stderr, command


@pytest.fixture
def database_url(shaped_database_url: str) -> str:
    """Every test here on the built-in tables and on your own flags table (issue 18)."""
    return shaped_database_url
