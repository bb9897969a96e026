"""`plan` against what the ticks then do, on PostgreSQL (hypothesis): any mix of overdue
pending schedules, retries due now or later, expiries, FLAGSCHED_MAX_LATENESS, invalid
updates and missing flags. `plan --at` a moment after now predicts every flag's state and
every schedule's outcome; then `process` runs until nothing moves, and the two must agree."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.conftest import OWN_CONFIGS, Ran

Sql = Callable[..., list[Any]]

_UPDATES = st.sampled_from(
    [
        {"enabled": True},
        {"enabled": False},
        {"rollout_percentage": 25},
        {"enabled": True, "rollout_percentage": 100},
        {"rollout_percentage": 1.5},  # invalid: fails for good
        [1],  # invalid
        {"enabled": None},
        {"rollout_percentage": 100.0},
        {"rollout_percentage": -0.0},
        {"rollout_percentage": True},
        {"rollout_percentage": 101},
        {"rollout_percentage": 10**20},
        {"enabled": 1},
        {"enabled": True, "rollout_percentage": None},
        {"Enabled": True},
    ]
)

_SCHEDULE = st.fixed_dictionaries(
    {
        "flag": st.sampled_from(["a", "b", "gone"]),
        "minutes_ago": st.integers(1, 180),
        "kind": st.sampled_from(
            ["pending", "retry_due", "retry_later", "pending_later", "retry_due_scheduled_later"]
        ),
        "updates": _UPDATES,
        "expires": st.sampled_from([None, "past", "future"]),
        "on_conflict": st.sampled_from(["fail", "apply"]),
        "approval": st.sampled_from([False, False, True]),  # four eyes: --approval
    }
)

# Four eyes: the configuration's [approval] policy, judged by plan as by the tick.
_POLICY = st.sampled_from(
    [
        None,
        'flags = ["a"]',
        "rollout_increase_over = 20",
        "enabling = true",
        "rollout_increase_over = 0\nenabling = true",
    ]
)


def _insert(sql: Sql, s: dict[str, Any]) -> int:
    retry = {
        "pending": ("pending", 0, "NULL"),
        "retry_due": ("failed", 1, "now() - interval '30 seconds'"),
        "retry_later": ("failed", 1, "now() + interval '2 hours'"),
        "pending_later": ("pending", 0, "NULL"),
        "retry_due_scheduled_later": ("failed", 1, "now() - interval '30 seconds'"),
    }[s["kind"]]
    # the last two are scheduled after the horizon (an application may store such a retry)
    sign = -1 if s["kind"] in ("pending_later", "retry_due_scheduled_later") else 1
    expires = {
        None: "NULL",
        "past": "now() - interval '20 seconds'",
        "future": "now() + interval '1 hour'",
    }[s["expires"]]
    rows = sql(
        f"""INSERT INTO feature_flag_schedules
            (flag_key, scheduled_at, updates, status, retry_count, next_retry_at, expires_at,
             on_conflict, needs_approval)
            VALUES (:k, now() - make_interval(mins => :m), CAST(:u AS jsonb), :s, :rc,
                    {retry[2]}, {expires}, :c, :a)
            RETURNING id""",
        k=s["flag"],
        m=sign * s["minutes_ago"],
        u=json.dumps(s["updates"]),
        s=retry[0],
        rc=retry[1],
        c=s["on_conflict"],
        a=s.get("approval", False),
    )
    return int(rows[0][0])


@pytest.mark.not_app_schedules(
    "a schedule of a missing flag: an application's foreign key keeps it out"
)
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    flags=st.fixed_dictionaries(
        {k: st.tuples(st.booleans(), st.sampled_from([0, 10, 50])) for k in ("a", "b")}
    ),
    schedules=st.lists(_SCHEDULE, min_size=1, max_size=7),
    lateness=st.sampled_from([None, "3600"]),
    touched=st.sampled_from([None, "a", "b"]),  # changed in psql after the schedules: conflicts
    policy=_POLICY,
)
@example(  # a retry due now behind another one and a pending step, both scheduled later
    flags={"a": (False, 0), "b": (False, 0)},
    schedules=[
        {
            "flag": "a",
            "minutes_ago": m,
            "kind": k,
            "updates": {"enabled": True},
            "expires": e,
            "on_conflict": "fail",
        }
        for m, k, e in (
            (1, "pending", None),
            (1, "retry_due_scheduled_later", None),
            (2, "retry_due_scheduled_later", "past"),
            (1, "pending_later", None),
        )
    ],
    lateness=None,
    touched=None,
    policy=None,
)
@example(  # four eyes: an unapproved step holds the next; an expired one frees the flag
    flags={"a": (False, 0), "b": (False, 0)},
    schedules=[
        {
            "flag": "a",
            "minutes_ago": m,
            "kind": "pending",
            "updates": u,
            "expires": e,
            "on_conflict": "apply",
            "approval": False,
        }
        for m, u, e in (
            (9, {"rollout_percentage": 25}, "past"),
            (8, {"rollout_percentage": 25}, None),
            (7, {"enabled": True}, None),
        )
    ],
    lateness=None,
    touched=None,
    policy="rollout_increase_over = 20",
)
def test_plan_predicts_what_the_ticks_do(
    flagsched: Callable[..., Ran],
    sql: Sql,
    flags: dict[str, tuple[bool, int]],
    schedules: list[dict[str, Any]],
    lateness: str | None,
    touched: str | None,
    policy: str | None,
    tmp_path_factory: Any,
    database_url: str,
) -> None:
    sql("DELETE FROM feature_flag_schedules")  # a view on an application's schedules table
    sql(
        "TRUNCATE feature_flags, feature_flag_changes, "
        "feature_flag_recurrences RESTART IDENTITY CASCADE"
    )
    for key, (on, rollout) in flags.items():
        sql(
            "INSERT INTO feature_flags (key, enabled, rollout_percentage) VALUES (:k, :e, :r)",
            k=key,
            e=on,
            r=rollout,
        )
    ids = [_insert(sql, s) for s in schedules]
    if touched is not None:
        sql("UPDATE feature_flags SET enabled = NOT enabled WHERE key = :k", k=touched)
    env = {} if lateness is None else {"FLAGSCHED_MAX_LATENESS": lateness}
    if policy is not None:  # on your own flags table, beside its [flags]
        config = tmp_path_factory.mktemp("config") / "flagsched.toml"
        own = OWN_CONFIGS.get(database_url)
        config.write_text((Path(own).read_text() if own else "") + f"\n[approval]\n{policy}\n")
        env["FLAGSCHED_CONFIG"] = str(config)
    horizon = sql("SELECT to_char(now() + interval '2 seconds', 'YYYY-MM-DD\"T\"HH24:MI:SS.USOF')")
    ran = flagsched("plan", "--at", horizon[0][0], "--format", "json", env=env)
    assert ran.code == 0, ran.stderr
    plan = {f["flag_key"]: f for f in json.loads(ran.stdout)}
    predicted = {c["schedule_id"]: c["outcome"] for f in plan.values() for c in f["changes"]}
    awaiting = {
        c["schedule_id"]
        for f in plan.values()
        for c in f["changes"]
        if (c["error"] or "").startswith("awaiting approval")
    }
    before = {
        row[0]: (row[1], row[2])
        for row in sql("SELECT id, status, next_retry_at FROM feature_flag_schedules")
    }

    tick = flagsched("process", "--max-batches", "20", env=env)
    assert tick.code in (0, 1), tick.stderr

    states = {
        row[0]: {"enabled": row[1], "rollout_percentage": row[2]}
        for row in sql("SELECT key, enabled, rollout_percentage FROM feature_flags")
    }
    for key, state in states.items():
        assert plan[key]["at"] == state, (key, plan[key], schedules)
    after = {
        row[0]: (row[1], row[2] or "")
        for row in sql("SELECT id, status, last_error FROM feature_flag_schedules")
    }
    marked = {
        row[0]
        for row in sql(
            "SELECT id FROM feature_flag_schedules WHERE awaiting_approval_since IS NOT NULL"
        )
    }
    assert marked == awaiting, (marked, awaiting, schedules, policy)
    for i in ids:
        status, error = after[i]
        outcome = predicted.get(i)
        if outcome == "applies":
            assert status == "applied", (i, outcome, after[i], schedules)
        elif outcome == "expires":
            assert status == "failed" and error.startswith("expired:"), (i, after[i], schedules)
        elif outcome == "fails":
            assert status == "failed" and not error.startswith("expired:"), (i, after[i])
        else:  # held, or not due by the horizon: left as it was
            assert status == before[i][0], (i, outcome, after[i], before[i], schedules)


_RECURRENCE = st.fixed_dictionaries(
    {
        "flag": st.sampled_from(["a", "b"]),
        "cron": st.sampled_from(["*/7 * * * *", "0 * * * *", "13 */2 * * *", "59 23 * * *"]),
        "minutes_ago": st.integers(1, 3000),
        "updates": _UPDATES,
        "expires_after": st.sampled_from([None, "5 minutes", "-1 minute", "-3000 years"]),
    }
)


@pytest.mark.not_app_schedules(
    "a schedule of a missing flag: an application's foreign key keeps it out"
)
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    schedules=st.lists(_SCHEDULE, max_size=4),
    recurrences=st.lists(_RECURRENCE, min_size=1, max_size=3),
)
def test_plan_predicts_missed_recurrences_as_the_ticks_turn_them_into_schedules(
    flagsched: Callable[..., Ran],
    sql: Sql,
    schedules: list[dict[str, Any]],
    recurrences: list[dict[str, Any]],
) -> None:
    import time

    # a minute boundary between plan and tick would make an occurrence one sees, not both
    second = float(sql("SELECT extract(second FROM clock_timestamp())")[0][0])
    if not 3 < second < 50:
        time.sleep((64 - second) % 60)
    sql("DELETE FROM feature_flag_schedules")  # a view on an application's schedules table
    sql(
        "TRUNCATE feature_flags, feature_flag_changes, "
        "feature_flag_recurrences RESTART IDENTITY CASCADE"
    )
    sql("INSERT INTO feature_flags (key) VALUES ('a'), ('b')")
    for s in schedules:
        _insert(sql, s)
    for r in recurrences:
        sql(
            f"""INSERT INTO feature_flag_recurrences
                (flag_key, cron, timezone, updates, next_at, expires_after)
                VALUES (:k, :c, 'Europe/Berlin', CAST(:u AS jsonb),
                        now() - make_interval(mins => :m),
                        {"NULL" if r["expires_after"] is None else repr(r["expires_after"])})""",
            k=r["flag"],
            c=r["cron"],
            u=json.dumps(r["updates"]),
            m=r["minutes_ago"],
        )
    horizon = sql("SELECT to_char(now() + interval '2 seconds', 'YYYY-MM-DD\"T\"HH24:MI:SS.USOF')")
    ran = flagsched("plan", "--at", horizon[0][0], "--format", "json")
    assert ran.code == 0, ran.stderr
    plan = {f["flag_key"]: f for f in json.loads(ran.stdout)}
    occurrences = sorted(
        (c["recurrence_id"], c["scheduled_at"], c["outcome"])
        for f in plan.values()
        for c in f["changes"]
        if c["schedule_id"] is None
    )

    tick = flagsched("process", "--max-batches", "20")
    assert tick.code in (0, 1), tick.stderr

    states = {
        row[0]: {"enabled": row[1], "rollout_percentage": row[2]}
        for row in sql("SELECT key, enabled, rollout_percentage FROM feature_flags")
    }
    for key, state in states.items():
        assert plan[key]["at"] == state, (key, plan[key], schedules, recurrences)
    made = sorted(
        (row[0], row[1].isoformat().replace("+00:00", "Z"), _outcome(row[2], row[3]))
        for row in sql(
            "SELECT recurrence_id, scheduled_at, status, coalesce(last_error, '') "
            "FROM feature_flag_schedules WHERE recurrence_id IS NOT NULL"
        )
    )
    assert made == occurrences, (made, occurrences, recurrences)


def _outcome(status: str, error: str) -> str:
    """A schedule's state after the ticks, in the words of plan's outcome."""
    if status == "applied":
        return "applies"
    if status == "failed":
        return "expires" if error.startswith("expired:") else "fails"
    return "held"


@pytest.fixture
def database_url(shaped_database_url: str) -> str:
    """Every test here on the built-in tables and on your own flags table (issue 18)."""
    return shaped_database_url
