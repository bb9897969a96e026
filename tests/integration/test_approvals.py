"""Four eyes (issue 20) on a real PostgreSQL with two logins, test_alice and test_bob, each
with the documented operator and approver grants (docs/deploy.md): who created a schedule
is the login that inserted it, noted by the database; nobody approves their own; an approved
change applies at the next tick; an unapproved one waits (no retry spent), holds its flag's
later changes back and expires like any late change. On the built-in tables and on your own
flags table (shape 2, `shaped_database_url`: the grants of docs/own-tables.md and
docs/deploy.md for it, the triggers `flagsched migrate` renders in flagsched's schema)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from flagsched.approval import ApprovalPolicy
from flagsched.model import Outcome, TickReport
from flagsched.schema import make_engine
from scripts import pgserver
from tests.conftest import OWN_CONFIGS, Ran
from tests.integration.test_least_privilege import PASSWORD, docs_sql, url_for

Sql = Callable[..., list[Any]]
ALICE, BOB = "test_alice", "test_bob"


@pytest.fixture(scope="module")
def logins(pg: pgserver.Postgresql) -> Iterator[None]:
    """The documented group roles, and two people: one login each. Roles are cluster-wide:
    what this module creates it drops again (test_least_privilege creates the documented
    roles for itself)."""
    admin = make_engine(pg.url(database="postgres")).execution_options(isolation_level="AUTOCOMMIT")
    made: list[str] = []
    with admin.connect() as conn:
        exists = conn.execute(
            sa.text("SELECT 1 FROM pg_roles WHERE rolname = 'flagsched_approver'")
        ).first()
        if exists is None:
            text = docs_sql("roles")
            conn.execute(sa.text(text))
            made = re.findall(r"CREATE ROLE (\w+)", text)
        for login in (ALICE, BOB):
            conn.execute(
                sa.text(
                    f"CREATE ROLE {login} LOGIN PASSWORD '{PASSWORD}' "
                    "IN ROLE flagsched_operator, flagsched_approver"
                )
            )
    try:
        yield
    finally:
        with admin.connect() as conn:
            for role in [ALICE, BOB, *reversed(made)]:
                conn.execute(sa.text(f"DROP ROLE IF EXISTS {role}"))
        admin.dispose()


@pytest.fixture
def database_url(shaped_database_url: str) -> str:
    """Every test here on the built-in tables and on your own flags table."""
    return shaped_database_url


@pytest.fixture
def people(logins: None, sql: Sql, database_url: str) -> Iterator[dict[str, str]]:
    """The documented operator and approver grants in this test's database (those for your
    own flags table on shape 2); each person's URL."""
    if database_url in OWN_CONFIGS:
        sql(docs_sql("own-grants-operator"))
        sql(docs_sql("own-grants-approver"))
        if "[schedules]" in Path(OWN_CONFIGS[database_url]).read_text():  # shape 3
            # the test's application table is public.app_schedules (tests/conftest.py)
            sql(
                docs_sql("app-grants").replace(
                    "public.feature_flag_schedules", "public.app_schedules"
                )
            )
    else:
        sql(docs_sql("grants-operator"))
        sql(docs_sql("grants-approver"))
    yield {name: url_for(database_url, name) for name in (ALICE, BOB)}


@pytest.fixture
def with_policy(database_url: str, tmp_path: Path) -> Callable[[str], dict[str, str]]:
    """with_policy("[approval] ..."): the environment naming a configuration with that
    policy, for this test's tables (on shape 2 its [flags] too)."""

    def env(policy: str) -> dict[str, str]:
        config = tmp_path / "flagsched.toml"
        own = OWN_CONFIGS.get(database_url)
        config.write_text((Path(own).read_text() + "\n" if own else "") + policy)
        return {"FLAGSCHED_CONFIG": str(config)}

    return env


@pytest.fixture
def tick(run_tick: Callable[..., TickReport]) -> Callable[..., TickReport]:
    """A tick (as the test's superuser login) under an approval policy."""

    def run(policy: ApprovalPolicy | None = None, **options: Any) -> TickReport:
        return run_tick(approval=policy or ApprovalPolicy(), **options)

    return run


def row(sql: Sql, schedule_id: int) -> dict[str, Any]:
    rows = sql(
        "SELECT status, retry_count, awaiting_approval_since IS NOT NULL AS awaiting, "
        "created_by, last_error FROM feature_flag_schedules WHERE id = :i",
        i=schedule_id,
    )
    return dict(rows[0]._mapping)


def new_id(ran: Ran) -> int:
    assert ran.code == 0, ran.stderr
    return int(ran.stdout.split()[0])


def test_self_approval_is_refused_and_a_second_login_approves_then_it_applies(
    people: dict[str, str],
    flagsched: Callable[..., Ran],
    tick: Callable[..., TickReport],
    sql: Sql,
    add_flag: Callable[..., None],
    flag: Callable[[str], tuple[bool, int]],
) -> None:
    add_flag("checkout")
    made = new_id(
        flagsched("schedule", "checkout", "--at", "now", "--enable", "--approval",
                  url=people[ALICE])
    )  # fmt: skip
    assert row(sql, made)["created_by"] == ALICE

    own = flagsched("approve", str(made), url=people[ALICE])
    assert own.code == 1
    assert own.stdout.strip() == (
        f"{made}: refused: four eyes: {ALICE} created it, so another login must approve it"
    )
    # Not through psql either: the database refuses the verdict itself.
    with (
        psycopg.connect(people[ALICE], autocommit=True) as conn,
        pytest.raises(psycopg.errors.CheckViolation, match="four eyes"),
    ):
        conn.execute(
            "INSERT INTO feature_flag_approvals (schedule_id, verdict, decided_by) "
            "VALUES (%s, 'approved', %s)",
            (made, BOB),
        )

    report = tick()
    assert report.count(Outcome.AWAITING_APPROVAL) == 1
    assert row(sql, made) | {"created_by": None} == {
        "status": "pending",
        "retry_count": 0,  # no retry spent
        "awaiting": True,
        "created_by": None,
        "last_error": None,
    }
    assert flag("checkout") == (False, 0)
    # A second tick passes it over: no place in the batch, nothing new to say.
    assert tick().count(Outcome.AWAITING_APPROVAL) == 0

    listed = json.loads(flagsched("list", "--format", "json", url=people[BOB]).stdout)
    assert [(r["id"], r["needs_approval"], r["awaiting_approval"]) for r in listed] == [
        (made, True, True)
    ]
    status = json.loads(flagsched("status", "--format", "json").stdout)
    assert status["awaiting_approval"] == 1

    approved = flagsched("approve", str(made), "--note", "looks right", url=people[BOB])
    assert approved.code == 0, approved.stderr
    assert approved.stdout.strip() == (f"{made}: approved by {BOB}; it applies at the next tick")
    assert tick().count(Outcome.APPLIED) == 1
    assert flag("checkout") == (True, 0)

    shown = json.loads(flagsched("show", str(made), "--format", "json").stdout)
    assert shown["status"] == "applied"
    assert shown["created_by"] == ALICE
    assert shown["needs_approval"] is True
    assert [(a["verdict"], a["by"], a["note"]) for a in shown["approvals"]] == [
        ("approved", BOB, "looks right")
    ]
    assert shown["approvals"][0]["at"].endswith("Z")
    table = flagsched("show", str(made))
    assert f"approved  {BOB}" in table.stdout


def test_bad_input_is_one_line_and_exit_1(
    people: dict[str, str],
    flagsched: Callable[..., Ran],
    tick: Callable[..., TickReport],
    sql: Sql,
    add_flag: Callable[..., None],
    add_schedule: Callable[..., int],
) -> None:
    add_flag("a")
    applied = add_schedule("a", {"enabled": True})
    tick()
    cancelled = add_schedule("a", {"enabled": False}, at="now() + interval '1 hour'")
    sql("UPDATE feature_flag_schedules SET status = 'cancelled' WHERE id = :i", i=cancelled)
    pending = add_schedule("a", {"rollout_percentage": 5}, at="now() + interval '1 hour'")
    assert flagsched("approve", str(pending), url=people[BOB]).code == 0  # ahead of time

    for ids, expected in [
        ([applied], f"{applied}: refused: it is applied"),
        ([cancelled], f"{cancelled}: refused: it is cancelled"),
        ([999999], "999999: refused: no such schedule"),
        ([pending], f"{pending}: refused: already approved by {BOB} at "),
    ]:
        ran = flagsched("approve", *map(str, ids), url=people[ALICE])
        assert ran.code == 1, ran.stderr
        assert ran.stdout.startswith(expected), ran.stdout
        assert ran.stdout.count("\n") == 1
    assert flagsched("reject", str(pending), url=people[BOB]).code == 2  # --note required
    assert flagsched("approve", url=people[BOB]).code == 2  # no id
    assert flagsched("reject", str(pending), "--note", " ", url=people[BOB]).code == 2


def test_reject_cancels_with_who_and_why(
    people: dict[str, str],
    flagsched: Callable[..., Ran],
    tick: Callable[..., TickReport],
    sql: Sql,
    add_flag: Callable[..., None],
    flag: Callable[[str], tuple[bool, int]],
) -> None:
    add_flag("search")
    made = new_id(
        flagsched("schedule", "search", "--at", "now", "--rollout", "90", "--approval",
                  url=people[ALICE])
    )  # fmt: skip
    tick()
    ran = flagsched("reject", str(made), "--note", "too fast", url=people[BOB])
    assert ran.code == 0, ran.stderr
    assert ran.stdout.strip() == f"{made}: rejected by {BOB}: cancelled"
    assert row(sql, made)["status"] == "cancelled"
    assert row(sql, made)["awaiting"] is False
    tick()
    assert flag("search") == (False, 0)
    shown = json.loads(flagsched("show", str(made), "--format", "json").stdout)
    assert [(a["verdict"], a["by"], a["note"]) for a in shown["approvals"]] == [
        ("rejected", BOB, "too fast")
    ]
    again = flagsched("approve", str(made), url=people[BOB])
    assert (again.code, again.stdout.strip()) == (1, f"{made}: refused: it is cancelled")


def test_policy_by_pattern_holds_a_row_an_application_inserted(
    people: dict[str, str],
    flagsched: Callable[..., Ran],
    sql: Sql,
    add_flag: Callable[..., None],
    add_schedule: Callable[..., int],
    flag: Callable[[str], tuple[bool, int]],
    with_policy: Callable[[str], dict[str, str]],
) -> None:
    env = with_policy('[approval]\nflags = ["payments-*"]\n')
    add_flag("payments-eu")
    add_flag("catalog")
    # The application's own login (here the test's) inserts directly, as it always has.
    risky = add_schedule("payments-eu", {"enabled": True})
    plain = add_schedule("catalog", {"enabled": True})
    assert row(sql, risky)["created_by"] == "postgres"

    ran = flagsched("process", env=env)
    assert ran.code == 0, ran.stderr
    assert "schedule_awaiting_approval" in ran.stderr
    assert (flag("payments-eu"), flag("catalog")) == ((False, 0), (True, 0))
    assert row(sql, risky)["awaiting"] is True
    listed = json.loads(flagsched("list", "--format", "json", env=env).stdout)
    assert [(r["id"], r["needs_approval"]) for r in listed] == [(risky, True)]
    shown = json.loads(flagsched("show", str(plain), "--format", "json", env=env).stdout)
    assert shown["needs_approval"] is False and shown["approvals"] == []

    assert flagsched("approve", str(risky), url=people[ALICE], env=env).code == 0
    assert flagsched("process", env=env).code == 0
    assert flag("payments-eu") == (True, 0)


def test_policy_by_rollout_increase_is_judged_step_by_step_against_the_flag_then(
    sql: Sql,
    tick: Callable[..., TickReport],
    add_flag: Callable[..., None],
    add_schedule: Callable[..., int],
    flag: Callable[[str], tuple[bool, int]],
) -> None:
    policy = ApprovalPolicy(rollout_increase_over=50)
    add_flag("gentle", rollout=10)
    add_flag("steep")
    add_flag("jump")
    gentle = [  # +20, +40: never more than 50 at once
        add_schedule("gentle", {"rollout_percentage": n}, at=f"now() - interval '{9 - i} minutes'")
        for i, n in enumerate((30, 70))
    ]
    steep = [  # +40 applies; then +60 from 40 awaits; 100 -> 100 is held behind it
        add_schedule("steep", {"rollout_percentage": n}, at=f"now() - interval '{9 - i} minutes'")
        for i, n in enumerate((40, 100, 100))
    ]
    jump = add_schedule("jump", {"rollout_percentage": 80, "enabled": True})
    report = tick(policy)
    assert report.count(Outcome.AWAITING_APPROVAL) == 2
    assert (flag("gentle"), flag("steep"), flag("jump")) == ((False, 70), (False, 40), (False, 0))
    assert [row(sql, i)["status"] for i in gentle] == ["applied", "applied"]
    assert [(row(sql, i)["status"], row(sql, i)["awaiting"]) for i in steep] == [
        ("applied", False),
        ("pending", True),
        ("pending", False),  # held back, not awaiting itself
    ]
    assert row(sql, jump)["awaiting"] is True
    # The flag changed meanwhile: the policy was judged when due, the verdict stands until
    # a second person gives one.
    sql("UPDATE feature_flags SET rollout_percentage = 90 WHERE key = 'steep'")
    tick(policy)
    assert row(sql, steep[1])["status"] == "pending"


def test_held_back_later_changes_and_a_batch_full_of_awaiting_rows_starves_nobody(
    people: dict[str, str],
    flagsched: Callable[..., Ran],
    tick: Callable[..., TickReport],
    sql: Sql,
    add_flag: Callable[..., None],
    add_schedule: Callable[..., int],
    flag: Callable[[str], tuple[bool, int]],
) -> None:
    policy = ApprovalPolicy(flags=("risky-*",))
    for n in range(4):
        add_flag(f"risky-{n}")
        add_schedule(f"risky-{n}", {"enabled": True}, at="now() - interval '10 minutes'")
    first = add_schedule("risky-0", {"rollout_percentage": 0}, at="now() - interval '9 minutes'")
    sql("UPDATE feature_flag_schedules SET needs_approval = false")  # by policy only
    tick(policy, batch_size=2, max_batches=3)
    assert sql("SELECT count(*) FROM feature_flag_schedules "
               "WHERE awaiting_approval_since IS NOT NULL")[0][0] == 4  # fmt: skip
    # Nothing that awaits takes a place: a free flag's change applies in a batch of one.
    add_flag("free")
    free = add_schedule("free", {"enabled": True}, at="now() - interval '1 minute'")
    report = tick(policy, batch_size=1)
    assert row(sql, free)["status"] == "applied"
    assert report.count(Outcome.HELD_BACK) == 1  # risky-0's later change, reported once
    assert row(sql, first) == {
        "status": "pending", "retry_count": 0, "awaiting": False, "created_by": "postgres",
        "last_error": None,
    }  # fmt: skip
    # The later change of the same flag needs approval too (the pattern): both approved,
    # both apply in order in one tick.
    awaiting = [
        int(r[0])
        for r in sql("SELECT id FROM feature_flag_schedules WHERE flag_key = 'risky-0' "
                     "ORDER BY scheduled_at")
    ]  # fmt: skip
    assert flagsched("approve", *map(str, awaiting), url=people[BOB]).code == 0
    tick(policy)
    assert flag("risky-0") == (True, 0)
    assert [row(sql, i)["status"] for i in awaiting] == ["applied", "applied"]


def test_a_ramp_with_approval_is_approved_as_a_group(
    people: dict[str, str],
    flagsched: Callable[..., Ran],
    tick: Callable[..., TickReport],
    add_flag: Callable[..., None],
    flag: Callable[[str], tuple[bool, int]],
) -> None:
    add_flag("ramped")
    ran = flagsched("ramp", "ramped", "--steps", "10,50", "--every", "1h",
                    "--start", "2000-01-01T00:00:00Z", "--approval", url=people[ALICE])  # fmt: skip
    assert ran.code == 0, ran.stderr
    group = ran.stderr.split("--group ")[1].split("`")[0]
    assert tick().count(Outcome.AWAITING_APPROVAL) == 1
    own = flagsched("approve", "--group", group, url=people[ALICE])
    assert own.code == 1 and own.stdout.count("four eyes") == 2
    assert flagsched("approve", "--group", group, url=people[BOB]).code == 0
    tick()
    assert flag("ramped") == (False, 50)


def test_expiry_while_waiting_fails_it_for_good_and_frees_the_flag(
    tick: Callable[..., TickReport],
    sql: Sql,
    add_flag: Callable[..., None],
    add_schedule: Callable[..., int],
    flag: Callable[[str], tuple[bool, int]],
) -> None:
    add_flag("late")
    waiting = add_schedule("late", {"enabled": True}, at="now() - interval '10 minutes'")
    later = add_schedule("late", {"rollout_percentage": 5}, at="now() - interval '5 minutes'")
    sql("UPDATE feature_flag_schedules SET needs_approval = true WHERE id = :i", i=waiting)
    tick(max_lateness=3600)
    assert row(sql, waiting)["awaiting"] is True
    assert row(sql, later)["status"] == "pending"
    # Nobody approved; now it is later than the lateness allows.
    report = tick(max_lateness=420)
    failed = row(sql, waiting)
    assert (failed["status"], failed["retry_count"]) == ("failed", 1)
    assert failed["last_error"].startswith("expired: ")
    assert report.count(Outcome.FAILED) == 1
    # Failed for good: it no longer holds the flag's later change back.
    assert row(sql, later)["status"] == "applied"
    assert flag("late") == (False, 5)


def test_a_recurrence_with_approval_makes_schedules_that_need_it(
    people: dict[str, str],
    flagsched: Callable[..., Ran],
    tick: Callable[..., TickReport],
    sql: Sql,
    add_flag: Callable[..., None],
) -> None:
    add_flag("window")
    made = new_id(
        flagsched("schedule", "window", "--cron", "* * * * *", "--enable", "--approval",
                  url=people[ALICE])
    )  # fmt: skip
    sql("UPDATE feature_flag_recurrences SET next_at = now() - interval '1 minute'")
    assert tick().count(Outcome.AWAITING_APPROVAL) == 1
    rows = sql(
        "SELECT needs_approval, created_by FROM feature_flag_schedules WHERE recurrence_id = :r",
        r=made,
    )
    assert [tuple(r) for r in rows] == [(True, ALICE)]


def test_the_metric_counts_due_schedules_awaiting_approval(
    flagsched: Callable[..., Ran],
    sql: Sql,
    add_flag: Callable[..., None],
    add_schedule: Callable[..., int],
    tmp_path: Path,
) -> None:
    add_flag("m")
    waiting = add_schedule("m", {"enabled": True})
    sql("UPDATE feature_flag_schedules SET needs_approval = true WHERE id = :i", i=waiting)
    path = tmp_path / "flagsched.prom"
    assert flagsched("process", "--metrics-file", str(path)).code == 0
    values = {
        line.split()[0]: float(line.split()[1])
        for line in path.read_text().splitlines()
        if line and not line.startswith("#")
    }
    assert values["flagsched_awaiting_approval"] == 1
    assert values["flagsched_oldest_awaiting_approval_seconds"] >= 0
    assert values['flagsched_tick_schedules{outcome="awaiting_approval"}'] == 1
    # It counts as due, but not towards the oldest due age: a person is what it waits for.
    assert values["flagsched_due_backlog"] == 1
    assert values["flagsched_oldest_due_age_seconds"] == 0


def test_plan_and_agenda_show_a_change_awaiting_approval(
    people: dict[str, str],
    flagsched: Callable[..., Ran],
    tick: Callable[..., TickReport],
    add_flag: Callable[..., None],
    add_schedule: Callable[..., int],
) -> None:
    add_flag("shown")
    made = new_id(
        flagsched("schedule", "shown", "--at", "now", "--enable", "--approval",
                  url=people[ALICE])
    )  # fmt: skip
    later = add_schedule("shown", {"rollout_percentage": 5}, at="now() + interval '1 hour'")
    tick()
    plan = json.loads(flagsched("plan", "--at", "2999-01-01T00:00:00Z", "--format", "json").stdout)
    (only,) = [f for f in plan if f["flag_key"] == "shown"]
    assert [(c["schedule_id"], c["outcome"]) for c in only["changes"]] == [
        (made, "held"),
        (later, "held"),
    ]
    assert only["changes"][0]["error"].startswith("awaiting approval")
    assert only["at"] == only["now"]
    agenda = json.loads(flagsched("agenda", "--format", "json").stdout)
    assert [(e["schedule_id"], e["status"]) for e in agenda] == [
        (made, "awaiting_approval"),
        (later, "pending"),
    ]
    table = flagsched("agenda").stdout
    assert "awaiting approval" in table
    # Approved: the plan applies both.
    assert flagsched("approve", str(made), url=people[BOB]).code == 0
    plan = json.loads(flagsched("plan", "--at", "2999-01-01T00:00:00Z", "--format", "json").stdout)
    (only,) = [f for f in plan if f["flag_key"] == "shown"]
    assert [c["outcome"] for c in only["changes"]] == ["applies", "applies"]


def test_dry_run_says_what_awaits_approval_and_changes_nothing(
    flagsched: Callable[..., Ran],
    sql: Sql,
    add_flag: Callable[..., None],
    add_schedule: Callable[..., int],
    with_policy: Callable[[str], dict[str, str]],
) -> None:
    add_flag("dry")
    waiting = add_schedule("dry", {"enabled": True})
    ran = flagsched("process", "--dry-run", env=with_policy("[approval]\nenabling = true\n"))
    assert ran.code == 0, ran.stderr
    (line,) = [x for x in ran.stdout.splitlines() if x.startswith(str(waiting))]
    assert "await approval (it switches the flag on)" in line
    assert row(sql, waiting)["awaiting"] is False


def test_an_approver_login_approves_but_cannot_schedule_or_touch_flags(
    people: dict[str, str],
    flagsched: Callable[..., Ran],
    sql: Sql,
    database_url: str,
    add_flag: Callable[..., None],
    add_schedule: Callable[..., int],
) -> None:
    sql("DROP ROLE IF EXISTS test_carol")
    sql(f"CREATE ROLE test_carol LOGIN PASSWORD '{PASSWORD}' IN ROLE flagsched_approver")
    try:
        carol = url_for(database_url, "test_carol")
        add_flag("c")
        made = add_schedule("c", {"enabled": True})
        ran = flagsched("approve", str(made), url=carol)
        assert ran.code == 0, ran.stdout + ran.stderr
        refused = flagsched("schedule", "c", "--at", "now", "--disable", url=carol)
        assert refused.code == 3 and "permission denied" in refused.stderr
        with psycopg.connect(carol, autocommit=True) as conn:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("UPDATE feature_flags SET enabled = true")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("UPDATE feature_flag_schedules SET updates = '{}'")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("DELETE FROM feature_flag_approvals")
        # A verdict names its login, whatever the INSERT says.
        by = sql("SELECT decided_by FROM feature_flag_approvals WHERE schedule_id = :i", i=made)
        assert [r[0] for r in by] == ["test_carol"]
    finally:
        sql("DROP OWNED BY test_carol")
        sql("DROP ROLE test_carol")


def test_a_flag_another_session_holds_is_judged_later_with_no_retry_spent(
    database_url: str,
    tick: Callable[..., TickReport],
    sql: Sql,
    add_flag: Callable[..., None],
    add_schedule: Callable[..., int],
    flag: Callable[[str], tuple[bool, int]],
) -> None:
    add_flag("busy")
    add_flag("free")
    held = add_schedule("busy", {"rollout_percentage": 10})
    free = add_schedule("free", {"rollout_percentage": 10})
    policy = ApprovalPolicy(rollout_increase_over=50)
    with psycopg.connect(database_url) as app:  # the application holds the flag's row
        app.execute("SELECT 1 FROM feature_flags WHERE key = 'busy' FOR UPDATE")
        report = tick(policy)
        app.rollback()
    assert report.count(Outcome.HELD_BACK) == 1
    assert row(sql, held) | {"created_by": None} == {
        "status": "pending",
        "retry_count": 0,
        "awaiting": False,
        "created_by": None,
        "last_error": None,
    }
    assert row(sql, free)["status"] == "applied"
    tick(policy)
    assert flag("busy") == (False, 10)


def test_an_invalid_change_behind_one_awaiting_approval_is_held_back_not_failed(
    tick: Callable[..., TickReport],
    sql: Sql,
    add_flag: Callable[..., None],
    add_schedule: Callable[..., int],
) -> None:
    add_flag("v")
    waiting = add_schedule("v", {"enabled": True}, at="now() - interval '3 minutes'")
    invalid = add_schedule("v", {"rollout_percentage": 1.5}, at="now() - interval '2 minutes'")
    sql("UPDATE feature_flag_schedules SET needs_approval = true WHERE id = :i", i=waiting)
    report = tick()
    assert report.count(Outcome.AWAITING_APPROVAL) == 1
    assert report.count(Outcome.FAILED) == 0
    assert (row(sql, invalid)["status"], row(sql, invalid)["retry_count"]) == ("pending", 0)
    # Its turn comes once the one before it is decided: then it fails on its own.
    sql("UPDATE feature_flag_schedules SET status = 'cancelled' WHERE id = :i", i=waiting)
    assert tick().count(Outcome.FAILED) == 1
    assert row(sql, invalid)["status"] == "failed"


def test_prune_deletes_a_schedules_verdicts_with_it(
    people: dict[str, str],
    flagsched: Callable[..., Ran],
    tick: Callable[..., TickReport],
    sql: Sql,
    add_flag: Callable[..., None],
    add_schedule: Callable[..., int],
) -> None:
    add_flag("p")
    old = add_schedule("p", {"enabled": True})
    assert flagsched("approve", str(old), url=people[BOB]).code == 0
    tick()
    sql("UPDATE feature_flag_schedules SET applied_at = now() - interval '40 days'")
    ran = flagsched("prune", "--older-than", "30", url=people[ALICE])
    assert ran.code == 0, ran.stderr
    assert sql("SELECT count(*) FROM feature_flag_schedules")[0][0] == 0
    assert sql("SELECT count(*) FROM feature_flag_approvals")[0][0] == 0


def test_approve_releases_an_approved_schedule_a_tick_still_holds_as_awaiting(
    people: dict[str, str],
    flagsched: Callable[..., Ran],
    tick: Callable[..., TickReport],
    sql: Sql,
    add_flag: Callable[..., None],
    flag: Callable[[str], tuple[bool, int]],
) -> None:
    """A verdict inserted in psql (the database checks it: not by the creator) approves the
    schedule but leaves it marked awaiting, which the claim passes over: `approve` must not
    refuse it as "already approved" and leave it stuck until it expires, but release it."""
    add_flag("stuck")
    made = new_id(
        flagsched("schedule", "stuck", "--at", "now", "--enable", "--approval",
                  url=people[ALICE])
    )  # fmt: skip
    tick()
    assert row(sql, made)["awaiting"] is True
    with psycopg.connect(people[BOB], autocommit=True) as conn:
        conn.execute(
            "INSERT INTO feature_flag_approvals (schedule_id, verdict, decided_by) "
            "VALUES (%s, 'approved', %s)",
            (made, BOB),
        )
    tick()
    assert row(sql, made)["awaiting"] is True  # approved, yet the claim passes it over
    # Its creator cannot release it: four eyes hold for the release too.
    own = flagsched("approve", str(made), url=people[ALICE])
    assert own.code == 1
    assert row(sql, made)["awaiting"] is True

    ran = flagsched("approve", str(made), url=people[BOB])
    assert ran.code == 0, ran.stdout + ran.stderr
    assert ran.stdout.startswith(f"{made}: already approved by {BOB} at "), ran.stdout
    assert ran.stdout.rstrip().endswith("released: it applies at the next tick"), ran.stdout
    assert row(sql, made)["awaiting"] is False
    assert tick().count(Outcome.APPLIED) == 1
    assert flag("stuck") == (True, 0)
    # Once released, a second `approve` is refused as before.
    again = flagsched("approve", str(made), url=people[BOB])
    assert again.code == 1


def test_plan_gives_the_policys_reason_for_a_change_it_found_awaiting(
    flagsched: Callable[..., Ran],
    sql: Sql,
    add_flag: Callable[..., None],
    add_schedule: Callable[..., int],
    with_policy: Callable[[str], dict[str, str]],
) -> None:
    """A change awaiting approval by the policy alone was never scheduled with --approval:
    plan and agenda must not say it was. If the flag has since changed so that the policy
    no longer asks for one, it still waits (a tick found it so), and they say that."""
    env = with_policy("[approval]\nenabling = true\nrollout_increase_over = 50\n")
    add_flag("switch")
    add_flag("jump")
    switch = add_schedule("switch", {"enabled": True})
    jump = add_schedule("jump", {"rollout_percentage": 80})
    assert flagsched("process", env=env).code == 0
    assert row(sql, switch)["awaiting"] and row(sql, jump)["awaiting"]

    def errors() -> dict[int, str]:
        ran = flagsched("plan", "--at", "2999-01-01T00:00:00Z", "--format", "json", env=env)
        assert ran.code == 0, ran.stderr
        return {
            c["schedule_id"]: c["error"]
            for f in json.loads(ran.stdout)
            for c in f["changes"]
            if c["schedule_id"] in (switch, jump)
        }

    assert errors() == {
        switch: "awaiting approval: it switches the flag on",
        jump: "awaiting approval: it raises the rollout by 80 points, more than 50",
    }
    agenda = flagsched("agenda", "--from", "2000-01-01T00:00:00Z", env=env).stdout
    assert "scheduled with --approval" not in agenda
    # The application moves the flag: the policy no longer asks, the mark still holds it.
    sql("UPDATE feature_flags SET rollout_percentage = 60 WHERE key = 'jump'")
    assert errors()[jump] == "awaiting approval: a tick found it needing approval when it was due"


def test_tick_finished_counts_the_changes_this_tick_found_awaiting(
    flagsched: Callable[..., Ran],
    sql: Sql,
    add_flag: Callable[..., None],
    add_schedule: Callable[..., int],
) -> None:
    """docs/operations.md: tick_finished's `awaiting_approval` is an outcome count, like
    `applied` or `held_back` (and flagsched_tick_schedules{outcome="awaiting_approval"}):
    the changes this tick found due and unapproved for the first time, not every change
    still waiting (that is the metric flagsched_awaiting_approval)."""
    env = {"FLAGSCHED_LOG_FORMAT": "json"}
    for key in ("one", "two"):
        add_flag(key)
        made = add_schedule(key, {"enabled": True})
        sql("UPDATE feature_flag_schedules SET needs_approval = true WHERE id = :i", i=made)

    def finished() -> dict[str, Any]:
        ran = flagsched("process", env=env)
        assert ran.code == 0, ran.stderr
        events = [json.loads(line) for line in ran.stderr.splitlines() if line.startswith("{")]
        (event,) = [e for e in events if e["event"] == "tick_finished"]
        assert isinstance(event, dict)
        return event

    assert finished()["awaiting_approval"] == 2
    again = finished()
    assert again["awaiting_approval"] == 0  # nothing new found: both were marked before
    assert again["due_backlog"] == 2


def test_approve_group_refuses_a_group_someone_slipped_another_change_into(
    people: dict[str, str],
    flagsched: Callable[..., Ran],
    sql: Sql,
    add_flag: Callable[..., None],
) -> None:
    """An operator may INSERT group_id (docs/deploy.md), so they can add a change of any
    flag to someone else's ramp. `approve --group G` approves "a ramp": it must not approve
    such a stowaway with it, unseen; it refuses the group, and each id can be approved."""
    add_flag("ramped")
    add_flag("payments-core")
    ran = flagsched("ramp", "ramped", "--steps", "10,50", "--every", "1h",
                    "--start", "2999-01-01T00:00:00Z", "--approval", url=people[BOB])  # fmt: skip
    assert ran.code == 0, ran.stderr
    group = int(ran.stderr.split("--group ")[1].split("`")[0])
    with psycopg.connect(people[ALICE], autocommit=True) as conn:
        row_ = conn.execute(
            "INSERT INTO feature_flag_schedules (flag_key, scheduled_at, updates, group_id) "
            "VALUES ('payments-core', '2999-01-01', '{\"enabled\": true}', %s) RETURNING id",
            (group,),
        ).fetchone()
        assert row_ is not None
        stowaway = int(row_[0])

    refused = flagsched("approve", "--group", str(group))  # a third login: the test's own
    assert refused.code == 1, refused.stdout + refused.stderr
    assert refused.stdout.startswith(f"group {group}: refused: "), refused.stdout
    assert "payments-core" in refused.stdout and str(stowaway) in refused.stdout
    assert sql("SELECT count(*) FROM feature_flag_approvals")[0][0] == 0  # nothing approved

    assert flagsched("approve", str(stowaway)).code == 0  # by id, seen: fine
    # A ramp as made (one flag, one creator) is still approved as a group.
    ran = flagsched("ramp", "ramped", "--steps", "60,70", "--every", "1h",
                    "--start", "2999-02-01T00:00:00Z", "--approval", url=people[BOB])  # fmt: skip
    other = ran.stderr.split("--group ")[1].split("`")[0]
    assert flagsched("approve", "--group", other).code == 0


def test_an_unreadable_awaiting_since_does_not_hide_the_oldest_wait(
    flagsched: Callable[..., Ran],
    sql: Sql,
    add_flag: Callable[..., None],
    add_schedule: Callable[..., int],
    tmp_path: Path,
) -> None:
    """Every value PostgreSQL can store must be survivable: awaiting_approval_since at
    -infinity (or BC) is the oldest wait there is, so the metric must not fall to 0 (which
    silences FlagschedAwaitingApproval for the genuine waits beside it)."""
    path = tmp_path / "flagsched.prom"

    def oldest() -> float:
        assert flagsched("process", "--metrics-file", str(path)).code == 0
        for line in path.read_text().splitlines():
            if line.startswith("flagsched_oldest_awaiting_approval_seconds "):
                return float(line.split()[1])
        raise AssertionError("no metric")

    for key in ("m1", "m2"):
        add_flag(key)
        made = add_schedule(key, {"enabled": True})
        sql("UPDATE feature_flag_schedules SET needs_approval = true WHERE id = :i", i=made)
    oldest()  # both found awaiting
    sql("UPDATE feature_flag_schedules SET awaiting_approval_since = now() - interval '2 hours'")
    assert 7000 < oldest() < 7300
    for value in ("-infinity", "0044-01-01 BC"):
        sql(
            "UPDATE feature_flag_schedules SET awaiting_approval_since = :v WHERE flag_key = 'm1'",
            v=value,
        )
        assert oldest() > 7300, value


def test_an_approval_written_ahead_for_an_id_not_yet_taken_is_refused(
    people: dict[str, str],
    flagsched: Callable[..., Ran],
    tick: Callable[..., TickReport],
    sql: Sql,
    add_flag: Callable[..., None],
    flag: Callable[[str], tuple[bool, int]],
) -> None:
    """Found by the adversarial pass: bob wrote an approval for the next id, then scheduled
    a change that got it, and it applied with nobody else's approval. A verdict on an id no
    schedule has is refused; and a verdict left over from a deleted row of the same id does
    not carry over to a row inserted later."""
    add_flag("f3")
    (next_id,) = sql("SELECT max(id) + 1000 FROM feature_flag_schedules")[0]
    with (
        psycopg.connect(people[BOB], autocommit=True) as conn,
        pytest.raises(psycopg.errors.ForeignKeyViolation, match="no schedule"),
    ):
        conn.execute(
            "INSERT INTO feature_flag_approvals (schedule_id, verdict, decided_by) "
            "VALUES (%s, 'approved', 'x')",
            (next_id or 1000,),
        )
    # A verdict left over (an application deleted the row without prune): alice approved
    # an old row of this id; bob's new row with the same id is not approved by it.
    old = new_id(
        flagsched("schedule", "f3", "--at", "now", "--enable", "--approval", url=people[BOB])
    )
    assert flagsched("approve", str(old), url=people[ALICE]).code == 0
    sql("DELETE FROM feature_flag_schedules WHERE id = :i", i=old)
    sql(
        "INSERT INTO feature_flag_schedules (id, flag_key, scheduled_at, updates, "
        "needs_approval, created_at) OVERRIDING SYSTEM VALUE "
        "VALUES (:i, 'f3', now(), '{\"enabled\": true}', true, now() + interval '1 second')",
        i=old,
    )
    report = tick()
    assert report.count(Outcome.AWAITING_APPROVAL) == 1
    assert flag("f3") == (False, 0)
    assert row(sql, old)["status"] == "pending"


def test_a_rejection_stands_even_if_the_row_is_made_pending_again(
    people: dict[str, str],
    flagsched: Callable[..., Ran],
    tick: Callable[..., TickReport],
    sql: Sql,
    add_flag: Callable[..., None],
    flag: Callable[[str], tuple[bool, int]],
) -> None:
    """Found by the adversarial pass: approved by bob, rejected by another login, then set
    back to pending by someone with UPDATE on the table: it applied. A rejection vetoes.
    And `approve` says so (exit 1) rather than `it applies when due` (a later pass)."""
    add_flag("search")
    made = new_id(
        flagsched("schedule", "search", "--at", "now", "--rollout", "90", "--approval",
                  url=people[ALICE])
    )  # fmt: skip
    assert flagsched("approve", str(made), url=people[BOB]).code == 0
    assert flagsched("reject", str(made), "--note", "no", url=people[BOB]).code == 0
    sql("UPDATE feature_flag_schedules SET status = 'pending' WHERE id = :i", i=made)
    again = flagsched("approve", str(made), url=people[BOB])
    assert again.code == 1, again
    assert (
        f"rejected by {BOB}" in again.stdout + again.stderr
        and "vetoes" in again.stdout + again.stderr
    )
    report = tick()
    assert report.count(Outcome.APPLIED) == 0
    assert report.count(Outcome.AWAITING_APPROVAL) == 1
    assert flag("search") == (False, 0)


def test_a_verdict_a_deleted_row_left_is_not_shown_as_the_verdict_of_its_ids_new_row(
    people: dict[str, str],
    flagsched: Callable[..., Ran],
    tick: Callable[..., TickReport],
    sql: Sql,
    add_flag: Callable[..., None],
    flag: Callable[[str], tuple[bool, int]],
) -> None:
    """Found by the adversarial pass: after an application deleted an approved row and
    inserted another with the same id, `list` and `show` said `approved by` the old row's
    approver, and `approve` refused the new row as `already approved`, while the claim
    (rightly) held it awaiting approval. They judge it by the claim's one rule now, as
    `plan` does: the old verdict is neither listed nor counted."""
    add_flag("f4")
    old = new_id(
        flagsched("schedule", "f4", "--at", "now", "--enable", "--approval", url=people[BOB])
    )
    assert flagsched("approve", str(old), url=people[ALICE]).code == 0
    shown = json.loads(flagsched("show", str(old), "--format", "json").stdout)
    assert (shown["approved"], [a["by"] for a in shown["approvals"]]) == (True, [ALICE])
    sql("DELETE FROM feature_flag_schedules WHERE id = :i", i=old)  # not by prune
    sql(
        "INSERT INTO feature_flag_schedules (id, flag_key, scheduled_at, updates, "
        "needs_approval) OVERRIDING SYSTEM VALUE "
        "VALUES (:i, 'f4', now(), '{\"enabled\": true}', true)",
        i=old,
    )

    def judged() -> tuple[Any, ...]:
        (listed,) = json.loads(flagsched("list", "--format", "json").stdout)
        shown = json.loads(flagsched("show", str(old), "--format", "json").stdout)
        plan = json.loads(
            flagsched("plan", "--at", "2099-01-01T00:00:00Z", "--format", "json").stdout
        )
        (change,) = plan[0]["changes"]
        return (
            (listed["approved"], [a["by"] for a in listed["approvals"]]),
            (shown["approved"], [a["by"] for a in shown["approvals"]]),
            change["outcome"],
        )

    assert judged() == ((False, []), (False, []), "held")
    assert "approved by" not in flagsched("list").stdout
    assert "no approvals" in flagsched("show", str(old)).stdout
    assert tick().count(Outcome.AWAITING_APPROVAL) == 1  # the claim agrees
    assert flag("f4") == (False, 0)

    again = flagsched("approve", str(old), url=people[ALICE])
    assert again.code == 0, again  # was: refused: already approved by test_alice at ...
    assert again.stdout.strip() == f"{old}: approved by {ALICE}; it applies at the next tick"
    assert judged()[:2] == ((True, [ALICE]), (True, [ALICE]))  # the new approval only
    assert tick().count(Outcome.APPLIED) == 1
    assert flag("f4") == (True, 0)
