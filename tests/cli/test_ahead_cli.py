"""`flagsched plan` and `flagsched agenda` through the real entry point, on PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Ran

Sql = Callable[..., list[Any]]


def _ramp(flagsched: Callable[..., Ran], key: str, *args: str) -> list[int]:
    ran = flagsched("ramp", key, *args)
    assert ran.code == 0, ran.stderr
    return [int(line) for line in ran.stdout.split()]


def test_plan_folds_a_ramp_a_retry_and_a_held_change(
    flagsched: Callable[..., Ran],
    add_flag: Callable[..., None],
    add_schedule: Callable[..., int],
) -> None:
    add_flag("checkout")
    add_flag("search", enabled=True, rollout=5)
    add_flag("idle", enabled=True, rollout=100)
    steps = _ramp(
        flagsched,
        "checkout",
        "--steps",
        "10,50,100",
        "--every",
        "1h",
        "--start",
        "2100-01-01T10:00:00Z",
        "--enable",
    )
    retry = add_schedule(
        "search",
        {"rollout_percentage": 20},
        at="'2099-12-31T09:00:00Z'",
        status="failed",
        retry_count=1,
        next_retry_at="'2100-01-01T12:00:00Z'",
    )
    behind = add_schedule("search", {"rollout_percentage": 30}, at="'2100-01-01T10:30:00Z'")

    ran = flagsched("plan", "--at", "2100-01-01T11:00:00Z", "--format", "json")
    assert ran.code == 0, ran.stderr
    plan = {f["flag_key"]: f for f in json.loads(ran.stdout)}
    assert set(plan) == {"checkout", "search", "idle"}
    assert plan["idle"] == {
        "flag_key": "idle",
        "now": {"enabled": True, "rollout_percentage": 100},
        "at": {"enabled": True, "rollout_percentage": 100},
        "changes": [],
    }
    checkout = plan["checkout"]
    assert checkout["now"] == {"enabled": False, "rollout_percentage": 0}
    assert checkout["at"] == {"enabled": True, "rollout_percentage": 50}
    assert [(c["schedule_id"], c["at"], c["outcome"]) for c in checkout["changes"]] == [
        (steps[0], "2100-01-01T10:00:00Z", "applies"),
        (steps[1], "2100-01-01T11:00:00Z", "applies"),
    ]
    assert checkout["changes"][0]["change"] == {"enabled": True, "rollout_percentage": 10}
    # The retry comes at 12:00, after the horizon: the schedule behind it is held.
    search = plan["search"]
    assert search["at"] == search["now"] == {"enabled": True, "rollout_percentage": 5}
    assert [(c["schedule_id"], c["outcome"]) for c in search["changes"]] == [(behind, "held")]

    later = json.loads(
        flagsched(
            "plan", "--at", "2100-01-01T13:00:00Z", "--flag", "search", "--format", "json"
        ).stdout
    )
    assert later == [
        {
            "flag_key": "search",
            "now": {"enabled": True, "rollout_percentage": 5},
            "at": {"enabled": True, "rollout_percentage": 30},
            "changes": [
                {
                    "at": "2100-01-01T12:00:00Z",
                    "scheduled_at": "2099-12-31T09:00:00Z",
                    "schedule_id": retry,
                    "recurrence_id": None,
                    "change": {"rollout_percentage": 20},
                    "outcome": "applies",
                    "error": None,
                },
                {
                    "at": "2100-01-01T12:00:00Z",  # held behind the retry until then
                    "scheduled_at": "2100-01-01T10:30:00Z",
                    "schedule_id": behind,
                    "recurrence_id": None,
                    "change": {"rollout_percentage": 30},
                    "outcome": "applies",
                    "error": None,
                },
            ],
        }
    ]
    table = flagsched("plan", "--at", "2100-01-01T12:00:00", "--tz", "Europe/Berlin")
    assert table.code == 0, table.stderr
    assert "at 2100-01-01T12:00:00+01:00" in table.stdout  # 11:00 UTC, read and shown in Berlin
    assert "2100-01-01T11:00:00+01:00  checkout" in table.stdout  # the first step, 10:00 UTC
    assert "held" in table.stdout


def test_agenda_lists_the_window_in_time_order_with_recurrences_expanded(
    flagsched: Callable[..., Ran], add_flag: Callable[..., None], tmp_path: Path
) -> None:
    add_flag("maintenance")
    ran = flagsched(
        "schedule", "maintenance", "--cron", "0 2 * * *", "--tz", "Europe/Berlin", "--enable"
    )
    assert ran.code == 0, ran.stderr
    recurrence = int(ran.stdout)
    steps = _ramp(flagsched, "maintenance", "--steps", "25,75", "--every", "1d", "--start", "now")
    page = tmp_path / "agenda.html"
    ran = flagsched("agenda", "--format", "json", "--html", str(page))
    assert ran.code == 0, ran.stderr
    entries = json.loads(ran.stdout)
    assert [e["at"] for e in entries] == sorted(e["at"] for e in entries)
    occurrences = [e for e in entries if e["status"] == "recurring"]
    assert len(occurrences) == 7  # one a day for the 7 days of the default window
    assert {e["recurrence_id"] for e in occurrences} == {recurrence}
    assert all(e["schedule_id"] is None for e in occurrences)
    ramp = [e for e in entries if e["status"] == "pending"]
    assert [e["schedule_id"] for e in ramp] == steps
    assert {e["group_id"] for e in ramp} != {None}
    assert set(entries[0]) >= {
        "at",
        "flag_key",
        "change",
        "schedule_id",
        "recurrence_id",
        "group_id",
        "status",
    }
    assert page.read_text().startswith("<!DOCTYPE html>")
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file was renamed, not left


@pytest.mark.not_app_schedules(
    "a schedule of a missing flag: an application's foreign key keeps it out"
)
def test_hostile_rows_are_shown_never_a_crash(
    flagsched: Callable[..., Ran],
    add_flag: Callable[..., None],
    add_schedule: Callable[..., int],
    sql: Sql,
    tmp_path: Path,
) -> None:
    add_flag("<script>alert(1)</script>")
    key = "<script>alert(1)</script>"
    huge = add_schedule(key, {"rollout_percentage": 10**400}, at="now() + interval '1 hour'")
    half = add_schedule(key, {"rollout_percentage": 12.5}, at="now() + interval '2 hours'")
    typo = add_schedule(key, {"rollout_percentage": "fifty"}, at="now() + interval '3 hours'")
    bc = add_schedule(key, {"enabled": True}, at="'0044-03-15 BC'")
    never = add_schedule(key, {"enabled": False}, at="'infinity'")
    deep = sql(
        "INSERT INTO feature_flag_schedules (flag_key, scheduled_at, updates) "
        "VALUES (:k, now() + interval '4 hours', CAST(:u AS jsonb)) RETURNING id",
        k=key,
        u="[" * 5000 + "]" * 5000,
    )[0][0]
    ok = add_schedule(
        key, {"enabled": True, "rollout_percentage": 5.0}, at="now() + interval '5 hours'"
    )
    missing = add_schedule("gone", {"enabled": True}, at="now() + interval '1 hour'")
    # times PostgreSQL stores and Python cannot hold, in every column the projection reads
    untimed = add_schedule(
        "gone", {"enabled": True}, status="failed", retry_count=1,
        next_retry_at="'infinity'",
    )  # fmt: skip
    sql(
        "INSERT INTO feature_flag_schedules (flag_key, scheduled_at, updates, expires_at) "
        "VALUES (:k, now() + interval '2 hours', '{\"enabled\": false}', '-infinity')",
        k=key,
    )
    sql(
        "INSERT INTO feature_flag_recurrences (flag_key, cron, timezone, updates, next_at, "
        "expires_after) VALUES (:k, '0 * * * *', 'UTC', '{\"enabled\": true}', '-infinity', "
        "'178000000 years'), (:k, '0 * * * *', 'UTC', '{\"enabled\": true}', '10000-01-01', "
        "NULL), (:k, '0 * * * *', 'Nowhere/Land', '{\"rollout_percentage\": 1e400}', now(), "
        "NULL)",
        k=key,
    )
    page = tmp_path / "page.html"
    ran = flagsched("agenda", "--format", "json", "--html", str(page))
    assert ran.code == 0, ran.stderr
    entries = json.loads(ran.stdout)
    by_id = {e["schedule_id"]: e for e in entries}
    # an expiry 178,000,000 years on is past what PostgreSQL holds: the tick stops that
    # recurrence ("timestamp out of range") at its first occurrence, so none is coming
    assert [e for e in entries if e["status"] == "recurring"] == []
    assert never not in by_id
    assert {i: by_id[i]["outcome"] for i in (huge, half, typo, bc, deep, ok, missing)} == {
        huge: "fails",
        half: "fails",
        typo: "fails",
        bc: "fails",
        deep: "fails",
        ok: "applies",
        missing: "fails",
    }
    assert by_id[untimed]["outcome"] == "fails"  # the next tick fails it: it holds nothing
    assert "outside the years" in by_id[bc]["error"]
    assert by_id[missing]["error"] == "the flag does not exist"
    for fmt in ("table", "json"):
        assert flagsched("agenda", "--format", fmt).code == 0
        plan = flagsched("plan", "--at", "2200-01-01T00:00:00Z", "--format", fmt)
        assert plan.code == 0, plan.stderr
    html = page.read_text()
    assert key not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_agenda_window_flag_and_usage_errors(
    flagsched: Callable[..., Ran],
    add_flag: Callable[..., None],
    add_schedule: Callable[..., int],
    tmp_path: Path,
) -> None:
    add_flag("a")
    add_flag("b")
    first = add_schedule("a", {"enabled": True}, at="'2100-01-01T10:00:00Z'")
    add_schedule("b", {"enabled": True}, at="'2100-01-01T11:00:00Z'")
    later = add_schedule("a", {"rollout_percentage": 40}, at="'2100-01-09T10:00:00Z'")

    def ids(*args: str) -> list[int]:
        ran = flagsched("agenda", "--format", "json", *args)
        assert ran.code == 0, ran.stderr
        return [e["schedule_id"] for e in json.loads(ran.stdout)]

    assert ids() == []  # the next 7 days hold nothing
    assert ids("--from", "2100-01-01T00:00:00Z", "--flag", "a") == [first]  # 7 days from --from
    assert ids("--from", "2100-01-01T10:30:00Z", "--to", "2100-01-10T00:00:00Z") != []
    assert ids("--from", "2100-01-01T10:30:00Z", "--to", "2100-01-10T00:00:00Z", "--flag", "a") == [
        later
    ]
    assert flagsched("agenda").stdout.strip() == "no changes expected"
    wrong = flagsched("agenda", "--from", "2100-01-02T00:00:00Z", "--to", "2100-01-01T00:00:00Z")
    assert wrong.code == 2 and "--to" in wrong.stderr
    assert flagsched("plan").code == 2  # --at is required
    assert flagsched("plan", "--at", "2026-03-29T02:30", "--tz", "Europe/Berlin").code == 2  # gap
    assert flagsched("agenda", "--tz", "Mars/Olympus").code == 2
    edge = flagsched(
        "agenda", "--from", "9999-12-29T00:00:00Z", "--format", "json",
        "--tz", "Pacific/Kiritimati", "--html", str(tmp_path / "edge.html"),
    )  # fmt: skip
    assert (edge.code, edge.stdout.strip()) == (0, "[]")  # the window ends where times do
    assert flagsched("plan", "--at", "9999-12-29T00:00:00Z").code == 0
    early = flagsched(
        "agenda", "--from", "0001-01-02T00:00:00Z", "--to", "0001-01-03T00:00:00Z",
        "--tz", "America/Los_Angeles", "--html", str(tmp_path / "early.html"),
    )  # fmt: skip
    assert early.code == 0, early.stderr
    unknown = json.loads(
        flagsched("plan", "--at", "now", "--flag", "nope", "--format", "json").stdout
    )
    assert unknown == [{"flag_key": "nope", "now": None, "at": None, "changes": []}]


def test_agenda_html_into_a_place_it_cannot_write_is_one_line_and_exit_2(
    flagsched: Callable[..., Ran], add_flag: Callable[..., None], tmp_path: Path
) -> None:
    """A missing directory, or a file where the directory should be: one line naming
    --html and the path, exit 2 (a usage error, not "could not run"), no traceback, nothing
    left behind."""
    add_flag("f")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    for target in (tmp_path / "missing" / "agenda.html", blocker / "agenda.html"):
        ran = flagsched("agenda", "--html", str(target))
        assert ran.code == 2, (ran.code, ran.stderr)
        lines = ran.stderr.strip().splitlines()
        assert len(lines) == 1, ran.stderr
        assert "--html" in lines[0] and str(target) in lines[0], lines[0]
        assert "internal error" not in lines[0] and "Traceback" not in ran.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_plan_past_the_read_limit_says_what_it_left_out(
    flagsched: Callable[..., Ran],
    add_flag: Callable[..., None],
    add_schedule: Callable[..., int],
    monkeypatch: Any,
) -> None:
    """More open schedules due by the horizon than plan reads (100,000; 3 here): a flag
    whose only change comes after the last one read would be shown unchanged, silently.
    Exit 0 still, but one warning line says the projection stops at the last time read."""
    from flagsched import repository

    monkeypatch.setattr(repository, "AHEAD_LIMIT", 3)
    add_flag("busy")
    add_flag("late")
    for hours in (1, 2, 3):
        add_schedule("busy", {"rollout_percentage": hours}, at=f"now() + interval '{hours} hours'")
    add_schedule("late", {"enabled": True}, at="now() + interval '5 hours'")
    for args in (("plan", "--at", "now"), ("agenda",)):
        ran = flagsched(*args[:1], *(("--at", _in(6)) if args[0] == "plan" else ()))
        assert ran.code == 0, ran.stderr
        warning = [line for line in ran.stderr.splitlines() if "3 open schedules" in line]
        assert len(warning) == 1, ran.stderr
    few = flagsched("plan", "--at", _in(2), "--format", "json")
    assert "open schedules" not in few.stderr  # within the limit: no warning
    exactly = flagsched("plan", "--at", _in(4), "--format", "json")
    assert "open schedules" not in exactly.stderr  # as many as the limit: nothing left out


def _in(hours: int) -> str:
    from datetime import UTC, datetime, timedelta

    return (datetime.now(UTC) + timedelta(hours=hours)).isoformat()


def test_agenda_to_now_is_an_empty_window_not_the_default_week(
    flagsched: Callable[..., Ran],
    add_flag: Callable[..., None],
    add_schedule: Callable[..., int],
) -> None:
    """`--to now` means the database's now, like `now` everywhere: nothing is expected
    between now and now. It was read as "no --to" (the next 7 days)."""
    add_flag("f")
    add_schedule("f", {"enabled": True}, at="now() + interval '1 hour'")
    for args in (("--to", "now"), ("--from", "now", "--to", "now")):
        ran = flagsched("agenda", *args, "--format", "json")
        assert ran.code == 0, ran.stderr
        assert json.loads(ran.stdout) == [], args
    week = flagsched("agenda", "--from", "now", "--format", "json")
    assert len(json.loads(week.stdout)) == 1


def test_agenda_html_through_a_symlink_rewrites_its_target(
    flagsched: Callable[..., Ran], add_flag: Callable[..., None], tmp_path: Path
) -> None:
    """A published path is often a symlink (a web root pointing at a release directory):
    the page replaces the file it points to, atomically, and the link stays a link. It used
    to replace the link with a file, leaving the target's old page published for ever."""
    add_flag("f")
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "agenda.html"
    target.write_text("old page")
    link = tmp_path / "agenda.html"
    link.symlink_to(target)
    ran = flagsched("agenda", "--html", str(link))
    assert ran.code == 0, ran.stderr
    assert link.is_symlink()
    assert target.read_text().startswith("<!DOCTYPE html>")
    assert not list(tmp_path.glob("**/.*.tmp"))


def test_plan_counts_a_retry_due_before_its_own_scheduled_at(
    flagsched: Callable[..., Ran],
    add_flag: Callable[..., None],
    add_schedule: Callable[..., int],
) -> None:
    """An application stored a failed schedule waiting for a retry due now whose
    scheduled_at is tomorrow: the next tick claims it (a retry is due by next_retry_at) and
    applies it. plan read only schedules with scheduled_at up to the horizon and missed it."""
    add_flag("f")
    retry = add_schedule(
        "f",
        {"enabled": True},
        at="now() + interval '1 day'",
        status="failed",
        retry_count=1,
        next_retry_at="now() - interval '1 minute'",
    )
    ran = flagsched("plan", "--at", _in(1), "--format", "json")
    assert ran.code == 0, ran.stderr
    [f] = json.loads(ran.stdout)
    assert f["at"] == {"enabled": True, "rollout_percentage": 0}
    assert [(c["schedule_id"], c["outcome"]) for c in f["changes"]] == [(retry, "applies")]
    tick = flagsched("process")
    assert tick.code == 0, tick.stderr
    assert (
        json.loads(flagsched("plan", "--at", "now", "--format", "json").stdout)[0]["now"]
        == (f["at"])
    )


def test_plan_holds_such_a_retry_behind_an_earlier_schedule_after_the_horizon(
    flagsched: Callable[..., Ran],
    add_flag: Callable[..., None],
    add_schedule: Callable[..., int],
) -> None:
    """The same retry (scheduled tomorrow, due now) behind a pending schedule in two hours:
    the tick holds it back until that one applies, so at one hour it is `held`."""
    add_flag("f")
    add_schedule("f", {"rollout_percentage": 5}, at="now() + interval '2 hours'")
    retry = add_schedule(
        "f",
        {"enabled": True},
        at="now() + interval '1 day'",
        status="failed",
        retry_count=1,
        next_retry_at="now() - interval '1 minute'",
    )
    [f] = json.loads(flagsched("plan", "--at", _in(1), "--format", "json").stdout)
    assert f["at"] == f["now"]
    assert [(c["schedule_id"], c["outcome"]) for c in f["changes"]] == [(retry, "held")]
    assert flagsched("process").code == 0
    assert (
        json.loads(flagsched("plan", "--at", "now", "--format", "json").stdout)[0]["now"]
        == (f["now"])
    )
    later = json.loads(flagsched("plan", "--at", _in(3), "--format", "json").stdout)[0]
    assert later["at"] == {"enabled": True, "rollout_percentage": 5}


def test_plan_shows_a_conflict_that_has_already_happened(
    flagsched: Callable[..., Ran],
    add_flag: Callable[..., None],
    add_schedule: Callable[..., int],
    sql: Sql,
) -> None:
    """Someone changed the flag in psql after the schedule was created: the tick will fail
    it for good (`conflict:`, on_conflict fail), so plan must not say it applies. A change
    still to come cannot be foreseen; one already recorded can."""
    add_flag("f")
    add_flag("g")
    doomed = add_schedule("f", {"rollout_percentage": 50}, at="now() + interval '1 hour'")
    fine = add_schedule("g", {"rollout_percentage": 50}, at="now() + interval '1 hour'")
    sql("UPDATE feature_flags SET enabled = true WHERE key = 'f'")
    sql("UPDATE feature_flag_schedules SET on_conflict = 'apply' WHERE id = :i", i=fine)
    sql("UPDATE feature_flags SET enabled = true WHERE key = 'g'")
    plan = {
        f["flag_key"]: f
        for f in json.loads(flagsched("plan", "--at", _in(2), "--format", "json").stdout)
    }
    [change] = plan["f"]["changes"]
    assert (change["schedule_id"], change["outcome"]) == (doomed, "fails")
    assert change["error"].startswith("conflict:")
    assert plan["f"]["at"] == {"enabled": True, "rollout_percentage": 0}
    assert [c["outcome"] for c in plan["g"]["changes"]] == ["applies"]  # on_conflict apply
    assert plan["g"]["at"] == {"enabled": True, "rollout_percentage": 50}


@pytest.fixture
def database_url(shaped_database_url: str) -> str:
    """Every test here on the built-in tables and on your own flags table (issue 18)."""
    return shaped_database_url
