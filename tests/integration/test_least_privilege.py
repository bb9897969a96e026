"""The roles of docs/deploy.md: each command works with exactly the grants documented for it,
and the roles cannot do more. The SQL is read out of docs/deploy.md, so the two never drift."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from flagsched.schema import make_engine
from scripts import pgserver
from tests.conftest import Ran, invoke

Sql = Callable[..., list[Any]]
DOCS = Path(__file__).resolve().parents[2] / "docs" / "deploy.md"
UPSTREAM = Path(__file__).resolve().parents[1] / "fixtures" / "upstream-schema.sql"
PASSWORD = "s3cret-pw"  # the test server trusts 127.0.0.1; the URL carries one anyway
DENIED = "42501"  # insufficient_privilege


def docs_sql(name: str, docs: Path = DOCS) -> str:
    """The ```sql block right after `<!-- sql:NAME -->` in docs/deploy.md (or `docs`)."""
    match = re.search(
        rf"<!-- sql:{re.escape(name)} -->\s*```sql\n(.*?)```", docs.read_text(), re.DOTALL
    )
    assert match, f"{docs.name} has no sql:{name} block"
    return match.group(1)


@pytest.fixture(scope="module")
def roles(pg: pgserver.Postgresql) -> None:
    """The documented roles, created once on the test server (roles are cluster-wide)."""
    admin = make_engine(pg.url(database="postgres")).execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(docs_sql("roles")))
        # The docs name no reader login; a test needs one.
        conn.execute(sa.text("CREATE ROLE test_reader LOGIN IN ROLE flagsched_reader"))
        for login in ("flagsched_worker", "flagsched_oncall", "test_reader"):
            conn.execute(sa.text(f"ALTER ROLE {login} PASSWORD '{PASSWORD}'"))
    admin.dispose()


def url_for(database_url: str, login: str) -> str:
    url = sa.make_url(database_url).set(username=login, password=PASSWORD)
    return url.render_as_string(hide_password=False)


@pytest.fixture
def grant(roles: None, sql: Sql) -> Callable[[str], None]:
    """grant("process") runs that documented block in this test's database."""

    def run(block: str) -> None:
        text = docs_sql(f"grants-{block}")
        # Each block grants to its own role only, and never everything.
        assert set(re.findall(r"\bTO (\w+)", text)) == {f"flagsched_{block}"}
        assert "ALL" not in text.upper().split()
        sql(text)

    return run


@pytest.fixture
def as_login(database_url: str) -> Iterator[Callable[[str], Callable[[str], str | None]]]:
    """as_login("flagsched_worker")(statement): None when it ran, else the SQLSTATE."""
    engines: list[sa.Engine] = []

    def login(name: str) -> Callable[[str], str | None]:
        engine = make_engine(url_for(database_url, name), lock_timeout=1)
        engines.append(engine)

        def attempt(statement: str) -> str | None:
            try:
                with engine.begin() as conn:
                    conn.execute(sa.text(statement))
            except sa.exc.DBAPIError as exc:
                return str(getattr(exc.orig, "sqlstate", None))
            return None

        return attempt

    yield login
    for engine in engines:
        engine.dispose()


def state(sql: Sql, schedule_id: int) -> tuple[str, int, bool]:
    rows = sql(
        "SELECT status, retry_count, next_retry_at IS NOT NULL FROM feature_flag_schedules "
        "WHERE id = :i",
        i=schedule_id,
    )
    return (rows[0][0], rows[0][1], rows[0][2])


def test_process_applies_due_schedules_with_only_its_grants(
    flagsched: Callable[..., Ran],
    database_url: str,
    grant: Callable[[str], None],
    sql: Sql,
    add_flag: Any,
    add_schedule: Any,
    failing: Any,
) -> None:
    # Hardened databases revoke EXECUTE from PUBLIC: the documented grants must suffice.
    sql("REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA public FROM PUBLIC")
    grant("process")
    add_flag("checkout")
    add_flag("ramp")
    add_flag("broken")
    enable = add_schedule("checkout", {"enabled": True})
    ramp = [
        add_schedule("ramp", {"rollout_percentage": 10}, at="now() - interval '3 minutes'"),
        add_schedule("ramp", {"rollout_percentage": 50}, at="now() - interval '2 minutes'"),
    ]
    ghost = add_schedule("ghost", {"enabled": True})  # no such flag: failed for good
    broken = add_schedule("broken", {"enabled": True})  # an error: a retry
    later = add_schedule("checkout", {"enabled": False}, at="now() + interval '1 hour'")
    sql(
        "INSERT INTO feature_flag_recurrences (flag_key, cron, timezone, updates, next_at) "
        "VALUES ('window', '* * * * *', 'UTC', '{\"enabled\": true}', now() - interval '1 hour')"
    )
    add_flag("window")
    failing("broken")
    # Test scaffolding, not a documented grant: the failure trigger runs as the tick's role.
    sql("GRANT SELECT ON test_failing_flags TO flagsched_process")
    worker = url_for(database_url, "flagsched_worker")

    preview = flagsched("process", "--dry-run", url=worker)
    assert preview.code == 0, preview.stderr
    ran = flagsched("process", url=worker)

    assert ran.code == 1, ran.stderr  # the ghost failed for good; nothing was refused
    assert "permission denied" not in ran.stderr
    assert PASSWORD not in ran.stderr + preview.stderr
    for applied in (enable, *ramp):
        assert state(sql, applied)[0] == "applied"
    assert state(sql, ghost) == ("failed", 1, False)
    assert state(sql, broken) == ("failed", 1, True)
    assert state(sql, later) == ("pending", 0, False)
    flags = sql("SELECT key, enabled, rollout_percentage FROM feature_flags ORDER BY key")
    assert [tuple(row) for row in flags] == [
        ("broken", False, 0),
        ("checkout", True, 0),
        ("ramp", False, 50),
        ("window", True, 0),  # made from the recurrence, applied in the same tick
    ]
    # Its writes are in the history (the trigger needs no grant of the tick's role); the
    # broken flag's failure isolated it alone: the other flags' writes stay set-based, a
    # flag's changes folded into one entry naming both schedules (issue 17: the fallback
    # goes flag by flag, no longer change by change).
    recorded = sql(
        "SELECT flag_key, actor, to_jsonb(schedule_ids) FROM feature_flag_changes "
        "WHERE cardinality(schedule_ids) > 0 ORDER BY flag_key, id"
    )
    assert [tuple(r) for r in recorded] == [
        ("checkout", "flagsched", [enable]),
        ("ramp", "flagsched", [ramp[0], ramp[1]]),
        ("window", "flagsched", [int(sql("SELECT max(id) FROM feature_flag_schedules")[0][0])]),
    ]
    # The same login serves the health check.
    health = flagsched("status", "--max-lag", "3600", url=worker)
    assert health.code == 0, health.stderr


@pytest.mark.parametrize(
    ("revoke", "named"),
    [
        # an upgrade's migrate not followed by the grants: its new write is not granted
        (
            "REVOKE EXECUTE ON FUNCTION flagsched_apply_v6(bigint[], text[], boolean[], "
            "integer[], interval, boolean, jsonb) FROM flagsched_process",
            "EXECUTE on function flagsched_apply_v6(",
        ),
        (
            "REVOKE UPDATE (enabled, rollout_percentage, updated_at) ON feature_flags "
            "FROM flagsched_process",
            'UPDATE on table "feature_flags"',
        ),
    ],
)
def test_a_tick_lacking_a_grant_it_needs_claims_nothing_and_spends_no_retry(
    flagsched: Callable[..., Ran],
    database_url: str,
    grant: Callable[[str], None],
    sql: Sql,
    add_flag: Any,
    add_schedule: Any,
    revoke: str,
    named: str,
) -> None:
    """Found by the adversary: the claim was granted, the write not; each schedule's write
    was refused in turn and spent its retry (max_retries 0: failed for good). A privilege
    the tick lacks is the deployment's fault, not the row's: exit 3 naming it, nothing
    claimed, the schedules as they were."""
    sql("REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA public FROM PUBLIC")
    grant("process")
    sql(revoke)
    add_flag("checkout")
    due = add_schedule("checkout", {"enabled": True})
    sql("UPDATE feature_flag_schedules SET max_retries = 0 WHERE id = :i", i=due)
    worker = url_for(database_url, "flagsched_worker")

    ran = flagsched("process", url=worker)

    assert ran.code == 3, ran.stderr
    line = ran.stderr.strip().splitlines()[-1]
    assert named in line and "this login (flagsched_worker) lacks" in line, line
    assert "run the grants again after each migrate" in line and PASSWORD not in ran.stderr
    assert state(sql, due) == ("pending", 0, False)
    assert sql("SELECT enabled FROM feature_flags WHERE key = 'checkout'")[0][0] is False
    grant("process")  # the grants again: the same tick applies it
    assert flagsched("process", url=worker).code == 0
    assert state(sql, due)[0] == "applied"


def test_an_application_role_with_no_grant_on_the_history_still_writes_flags(
    roles: None, database_url: str, sql: Sql, add_flag: Any
) -> None:
    """The history trigger runs with its owner's rights: an upgrade of flagsched must never
    break an application's writes; the change is still recorded under the writer's name."""
    add_flag("a")
    sql("DROP ROLE IF EXISTS test_app")
    sql(f"CREATE ROLE test_app LOGIN PASSWORD '{PASSWORD}'")
    sql("GRANT SELECT, UPDATE ON feature_flags TO test_app")
    app = url_for(database_url, "test_app")
    with psycopg.connect(app, application_name="api", autocommit=True) as conn:
        conn.execute("UPDATE feature_flags SET enabled = true WHERE key = 'a'")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DELETE FROM feature_flag_changes")
    rows = sql("SELECT actor FROM feature_flag_changes WHERE old_enabled IS NOT NULL")
    assert [r[0] for r in rows] == ["test_app (api)"]


@pytest.mark.parametrize(
    "statement",
    [
        "DROP TABLE feature_flag_schedules",
        "DROP TABLE feature_flags",
        "TRUNCATE feature_flag_schedules",
        "DELETE FROM feature_flag_schedules",
        "DELETE FROM feature_flags",
        "INSERT INTO feature_flags (key) VALUES ('x')",
        # It inserts only what a recurrence makes: no status, max_retries or group.
        "INSERT INTO feature_flag_schedules (flag_key, scheduled_at, updates, status) "
        "VALUES ('x', now(), '{}', 'applied')",
        "INSERT INTO feature_flag_schedules (flag_key, scheduled_at, updates, max_retries) "
        "VALUES ('x', now(), '{}', 10)",
        "INSERT INTO feature_flag_recurrences (flag_key, cron, timezone, updates, next_at) "
        "VALUES ('x', '* * * * *', 'UTC', '{}', now())",
        "UPDATE feature_flag_recurrences SET cron = '* * * * *'",
        "UPDATE feature_flag_recurrences SET cancelled_at = NULL",
        "UPDATE feature_flag_schedules SET updates = '{}'",
        "UPDATE feature_flag_schedules SET scheduled_at = now()",
        "UPDATE feature_flags SET key = 'renamed'",
        "UPDATE alembic_version SET version_num = '0001'",
        "DELETE FROM feature_flag_changes",
        "UPDATE feature_flag_changes SET actor = 'someone'",
        "INSERT INTO feature_flag_changes (flag_key, actor) VALUES ('a', 'forged')",
        "ALTER TABLE feature_flags ADD COLUMN x int",
        "CREATE TABLE public.intruder (x int)",
        "CREATE INDEX ON feature_flags (enabled)",
    ],
)
def test_process_role_can_do_nothing_else(
    grant: Callable[[str], None], as_login: Any, add_flag: Any, statement: str
) -> None:
    grant("process")
    add_flag("a")
    assert as_login("flagsched_worker")(statement) == DENIED


def test_reader_runs_status_and_list_failed_but_changes_nothing(
    flagsched: Callable[..., Ran],
    database_url: str,
    grant: Callable[[str], None],
    as_login: Any,
    sql: Sql,
    add_flag: Any,
    add_schedule: Any,
) -> None:
    grant("reader")
    add_flag("a")
    due = add_schedule("a", {"enabled": True})
    failed = add_schedule("a", {"enabled": False}, status="failed", retry_count=4)
    reader = url_for(database_url, "test_reader")

    status = flagsched("status", "--format", "json", url=reader)
    assert status.code == 0, status.stderr
    assert json.loads(status.stdout)["due"] == 1
    listed = flagsched("list-failed", "--format", "json", url=reader)
    assert listed.code == 0, listed.stderr
    assert [row["id"] for row in json.loads(listed.stdout)] == [failed]
    history = flagsched("history", "a", "--format", "json", url=reader)
    assert history.code == 0, history.stderr
    assert [e["new"] for e in json.loads(history.stdout)] == [
        {"enabled": False, "rollout_percentage": 0}
    ]
    shown = flagsched("show", str(failed), "--format", "json", url=reader)
    assert shown.code == 0, shown.stderr
    assert json.loads(shown.stdout)["id"] == failed
    for command in (("list",), ("recurrences",), ("list", "--status", "failed")):
        assert flagsched(*command, url=reader).code == 0, command

    tick = flagsched("process", url=reader)
    assert tick.code == 3  # could not run: a tick updates flags, the reader may not
    assert "this login (test_reader) lacks UPDATE on table" in tick.stderr
    assert state(sql, due)[0] == "pending"
    attempt = as_login("test_reader")
    assert attempt("UPDATE feature_flag_schedules SET status = 'cancelled'") == DENIED
    assert attempt("SELECT count(*) FROM feature_flags") == DENIED


def test_operator_runs_operator_commands_but_never_touches_flags(
    flagsched: Callable[..., Ran],
    database_url: str,
    grant: Callable[[str], None],
    as_login: Any,
    sql: Sql,
    add_flag: Any,
    add_schedule: Any,
) -> None:
    grant("operator")
    add_flag("a")
    failed = add_schedule("a", {"enabled": True}, status="failed", retry_count=4)
    doomed = add_schedule("other", {"enabled": True})
    old = add_schedule("a", {"rollout_percentage": 5}, at="now() - interval '9 days'")
    sql(
        "UPDATE feature_flag_schedules SET status = 'applied', "
        "applied_at = now() - interval '8 days' WHERE id = :i",
        i=old,
    )
    oncall = url_for(database_url, "flagsched_oncall")

    added = flagsched("schedule", "a", "--at", "now", "--rollout", "20", url=oncall)
    assert added.code == 0, added.stderr
    new_id = int(added.stdout.strip())
    assert state(sql, new_id) == ("pending", 0, False)
    retried = flagsched("retry", str(failed), url=oncall)
    assert retried.code == 0, retried.stdout + retried.stderr
    assert state(sql, failed) == ("pending", 0, False)
    cancelled = flagsched("cancel", str(doomed), url=oncall)
    assert cancelled.code == 0, cancelled.stdout + cancelled.stderr
    assert state(sql, doomed)[0] == "cancelled"
    sql("UPDATE feature_flag_changes SET changed_at = now() - interval '8 days'")
    pruned = flagsched("prune", "--older-than", "7", "--history", url=oncall)
    assert pruned.code == 0, pruned.stderr
    assert sql("SELECT count(*) FROM feature_flag_schedules WHERE id = :i", i=old)[0][0] == 0
    assert sql("SELECT count(*) FROM feature_flag_changes")[0][0] == 0
    for command in (
        ("status",),
        ("list-failed",),
        ("history",),
        ("show", str(new_id)),
        ("list",),
        ("recurrences",),
    ):
        assert flagsched(*command, url=oncall).code == 0
    ramp = flagsched("ramp", "a", "--steps", "10,50", "--every", "1h", "--enable", url=oncall)
    assert ramp.code == 0, ramp.stderr
    group = sql(
        "SELECT group_id FROM feature_flag_schedules WHERE id = :i", i=int(ramp.stdout.split()[0])
    )
    assert flagsched("cancel", "--group", str(group[0][0]), url=oncall).code == 0
    recurring = flagsched(
        "schedule", "a", "--cron", "0 2 * * *", "--tz", "Europe/Berlin", "--enable",
        "--expires-after", "1h", "--on-conflict", "apply", url=oncall,
    )  # fmt: skip
    assert recurring.code == 0, recurring.stderr
    stopped = flagsched("cancel", "--recurrence", recurring.stdout.strip(), url=oncall)
    assert stopped.code == 0, stopped.stdout + stopped.stderr

    attempt = as_login("flagsched_oncall")
    for statement in (
        "UPDATE feature_flags SET enabled = true",
        "INSERT INTO feature_flags (key) VALUES ('x')",
        "DELETE FROM feature_flags",
        "UPDATE feature_flag_schedules SET updates = '{}'",
        "DROP TABLE feature_flag_schedules",
    ):
        assert attempt(statement) == DENIED, statement


def _one_of_each(sql: Sql, add_flag: Any, add_schedule: Any) -> tuple[int, int, int]:
    """A failed schedule, a pending one and a recurrence of flag a: what retry/cancel act on."""
    add_flag("a")
    failed = add_schedule("a", {"enabled": False}, status="failed", retry_count=4)
    pending = add_schedule("a", {"enabled": True}, at="now() + interval '1 day'")
    (recurrence,) = sql(
        "INSERT INTO feature_flag_recurrences (flag_key, cron, timezone, updates, next_at) "
        "VALUES ('a', '0 9 * * *', 'UTC', '{\"enabled\": true}', now() + interval '1 day') "
        "RETURNING id"
    )[0]
    return failed, pending, int(recurrence)


def _acting_on(failed: int, pending: int, recurrence: int) -> list[tuple[str, ...]]:
    return [
        ("retry", str(failed)),
        ("cancel", str(pending)),
        ("cancel", "--recurrence", str(recurrence)),
    ]


def _one_line_could_not_run(ran: Ran, cause: str) -> None:
    assert ran.code == 3, (ran.code, ran.stdout, ran.stderr)
    errors = [line for line in ran.stderr.splitlines() if line.startswith("flagsched: ")]
    assert len(errors) == 1 and cause in errors[0], ran.stderr
    assert "busy" not in ran.stdout + ran.stderr


def test_retry_and_cancel_without_update_privilege_could_not_run_not_busy(
    flagsched: Callable[..., Ran],
    database_url: str,
    grant: Callable[[str], None],
    sql: Sql,
    add_flag: Any,
    add_schedule: Any,
) -> None:
    """A reader (SELECT only) cannot lock a schedule for update: exit 3 naming the missing
    privilege, never "busy, try again"."""
    grant("reader")
    failed, pending, recurrence = _one_of_each(sql, add_flag, add_schedule)
    reader = url_for(database_url, "test_reader")
    for args in _acting_on(failed, pending, recurrence):
        ran = flagsched(*args, url=reader)
        _one_line_could_not_run(ran, "permission denied for table")
        assert f"(SQLSTATE {DENIED})" in ran.stderr
    assert state(sql, failed)[0] == "failed" and state(sql, pending)[0] == "pending"


def test_prune_without_delete_privilege_could_not_run(
    flagsched: Callable[..., Ran],
    database_url: str,
    grant: Callable[[str], None],
    sql: Sql,
    add_flag: Any,
    add_schedule: Any,
) -> None:
    """Found by the adversarial pass: prune as a login that may not delete said so and exited
    1 ("some items refused"); a missing privilege is exit 3, and nothing is deleted."""
    grant("process")
    add_flag("a")
    old = add_schedule("a", {"enabled": True}, status="applied")
    sql("UPDATE feature_flag_schedules SET applied_at = now() - interval '30 days'")
    ran = flagsched("prune", "--older-than", "1", url=url_for(database_url, "flagsched_worker"))
    _one_line_could_not_run(ran, "permission denied for table")
    assert state(sql, old)[0] == "applied"


def test_retry_and_cancel_on_a_read_only_database_could_not_run_not_busy(
    flagsched: Callable[..., Ran], sql: Sql, add_flag: Any, add_schedule: Any
) -> None:
    """A hot standby, or `default_transaction_read_only`: exit 3 naming it, never "busy"."""
    failed, pending, recurrence = _one_of_each(sql, add_flag, add_schedule)
    sql(
        "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET default_transaction_read_only = on',"
        " current_database()); END $$"
    )
    for args in _acting_on(failed, pending, recurrence):
        _one_line_could_not_run(flagsched(*args), "read-only transaction (SQLSTATE 25006)")
    assert state(sql, failed)[0] == "failed" and state(sql, pending)[0] == "pending"


def test_plan_and_agenda_need_the_flags_the_operator_may_read(
    flagsched: Callable[..., Ran],
    database_url: str,
    grant: Callable[[str], None],
    add_flag: Any,
    add_schedule: Any,
    tmp_path: Path,
    sql: Sql,
) -> None:
    sql("REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA public FROM PUBLIC")  # the grants suffice
    grant("operator")
    grant("reader")
    add_flag("a")
    later = add_schedule("a", {"enabled": True}, at="now() + interval '1 hour'")
    oncall = url_for(database_url, "flagsched_oncall")
    due = add_schedule("a", {"rollout_percentage": 5}, at="now() - interval '1 minute'")
    preview = flagsched("process", "--dry-run", url=oncall)
    assert preview.code == 0 and str(due) in preview.stdout, preview
    plan = flagsched("plan", "--at", "2100-01-01T00:00:00Z", "--format", "json", url=oncall)
    assert plan.code == 0, plan.stderr
    assert [c["schedule_id"] for c in json.loads(plan.stdout)[0]["changes"]] == [due, later]
    page = tmp_path / "agenda.html"
    agenda = flagsched("agenda", "--html", str(page), "--format", "json", url=oncall)
    assert agenda.code == 0, agenda.stderr
    assert [e["schedule_id"] for e in json.loads(agenda.stdout)] == [due, later]
    # The reader may not read the flags (docs/deploy.md): one line, exit 3, no page.
    refused = flagsched("agenda", "--html", str(tmp_path / "no.html"), url=url_for(
        database_url, "test_reader"))  # fmt: skip
    assert refused.code == 3 and "permission denied" in refused.stderr
    assert not (tmp_path / "no.html").exists()


OWN_CONFIG = UPSTREAM.with_name("upstream-flags.toml").read_text()


# Shape 3: the first application's schedules table too.
APP_CONFIG = OWN_CONFIG + UPSTREAM.with_name("upstream-schedules.toml").read_text()


@pytest.fixture(params=["own-flags", "app-schedules"])
def own(
    request: pytest.FixtureRequest, roles: None, empty_database_url: str, tmp_path: Path
) -> Iterator[OwnDeployment]:
    """Shape 2 beside the first application's flags table (and shape 3, on its schedules
    table too), migrated by the superuser, with EXECUTE revoked from PUBLIC on flagsched's
    functions (a hardened database): the documented grants must suffice."""
    config = tmp_path / "own.toml"
    config.write_text(OWN_CONFIG if request.param == "own-flags" else APP_CONFIG)
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        conn.execute(UPSTREAM.read_text())
    migrated = invoke("--config", str(config), "migrate", url=empty_database_url)
    assert migrated.code == 0, migrated.stderr
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        conn.execute("REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA flagsched FROM PUBLIC")
    yield OwnDeployment(empty_database_url, str(config), request.param == "app-schedules")


class OwnDeployment:
    def __init__(self, url: str, config: str, app_schedules: bool = False) -> None:
        self.url, self.config, self.app_schedules = url, config, app_schedules

    def grant(self, block: str) -> None:
        """Run docs/deploy.md's shape-2 block of that role (to that role only), and on shape
        3 the statements of its shape-3 block that grant to that role."""
        text = docs_sql(f"own-grants-{block}")
        assert set(re.findall(r"\bTO (\w+)", text)) == {f"flagsched_{block}"}
        self.sql(text)
        if self.app_schedules:
            for grant in docs_sql("app-grants").split(";"):
                if f"flagsched_{block}" in grant:
                    self.sql(grant)

    def sql(self, statement: str, params: Any = None) -> list[Any]:
        with psycopg.connect(self.url, autocommit=True) as conn:
            cur = conn.execute(statement, params)
            return cur.fetchall() if cur.description else []

    def run(self, login: str, *args: str) -> Ran:
        return invoke("--config", self.config, *args, url=url_for(self.url, login))

    def attempt(self, login: str, statement: str) -> str | None:
        """None when `statement` ran as `login`, else its SQLSTATE."""
        try:
            with psycopg.connect(url_for(self.url, login)) as conn:
                conn.execute(statement)
        except psycopg.Error as exc:
            return exc.sqlstate
        return None

    def add_schedule(self, key: str, updates: str, at: str = "now() - interval '1 minute'",
                     status: str = "pending") -> int | str:  # fmt: skip
        (row,) = self.sql(
            "INSERT INTO flagsched.feature_flag_schedules "
            "(flag_key, scheduled_at, updates, status, environment) "
            f"VALUES (%(k)s, {at}, %(u)s, %(s)s, 'production') RETURNING id",
            {"k": key, "u": updates, "s": status},
        )
        return row[0] if isinstance(row[0], int) else str(row[0])

    def status(self, schedule_id: int | str) -> str:
        (row,) = self.sql(
            "SELECT status FROM flagsched.feature_flag_schedules WHERE id = %(i)s",
            {"i": schedule_id},
        )
        return str(row[0])


def test_process_on_your_flags_table_works_with_only_its_documented_grants(
    own: OwnDeployment,
) -> None:
    """docs/deploy.md's shape-2 grants for a tick beside the first application's flags table."""
    own.grant("process")
    empty_database_url = own.url
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO feature_flags (flag_key, environment) VALUES "
            "('checkout', 'production'), ('checkout', 'staging'), ('window', 'production')"
        )
        if own.app_schedules:  # a schedule refers to a flag that exists: one it cannot apply
            conn.execute("INSERT INTO feature_flags (flag_key) VALUES ('ghost')")
        ghost = '{"rollout_percentage": 250}' if own.app_schedules else '{"enabled": true}'
        conn.execute(
            "INSERT INTO flagsched.feature_flag_schedules "
            "(flag_key, scheduled_at, updates, environment) VALUES "
            "('checkout', now() - interval '1 minute', "
            "'{\"enabled\": true, \"rollout_percentage\": 20}', 'production'), "
            "('ghost', now() - interval '1 minute', %(ghost)s, 'production')",
            {"ghost": ghost},
        )
        conn.execute(
            "INSERT INTO flagsched.feature_flag_recurrences "
            "(flag_key, cron, timezone, updates, next_at, environment) VALUES ('window', "
            "'* * * * *', 'UTC', '{\"enabled\": true}', now() - interval '1 hour', 'production')"
        )
    preview = own.run("flagsched_worker", "process", "--dry-run")
    assert preview.code == 0, preview.stderr
    ran = own.run("flagsched_worker", "process")
    assert ran.code == 1, ran.stderr  # the ghost failed for good; nothing was refused
    assert "permission denied" not in ran.stderr + preview.stderr
    with psycopg.connect(empty_database_url) as conn:
        assert conn.execute(
            "SELECT flag_key, environment, enabled, rollout_percentage FROM feature_flags "
            "ORDER BY 1, 2"
        ).fetchall() == [
            ("checkout", "production", True, 20),
            ("checkout", "staging", False, 0),
            *([("ghost", "production", False, 0)] if own.app_schedules else []),
            ("window", "production", True, 0),
        ]
        assert conn.execute(
            "SELECT flag_key, status FROM flagsched.feature_flag_schedules ORDER BY 1"
        ).fetchall() == [("checkout", "applied"), ("ghost", "failed"), ("window", "applied")]
    # The same login serves the health check.
    health = own.run("flagsched_worker", "status", "--max-lag", "3600")
    assert health.code == 0, health.stderr


@pytest.mark.parametrize(
    "statement",
    [
        "DELETE FROM public.feature_flags",
        "INSERT INTO public.feature_flags (flag_key) VALUES ('x')",
        "UPDATE public.feature_flags SET flag_key = 'renamed'",
        "UPDATE public.feature_flags SET environment = 'staging'",
        "DELETE FROM flagsched.feature_flag_schedules",
        "UPDATE flagsched.feature_flag_schedules SET updates = '{}'",
        "UPDATE flagsched.feature_flag_schedules SET environment = 'staging'",
        "INSERT INTO flagsched.feature_flag_schedules (flag_key, scheduled_at, updates, status) "
        "VALUES ('x', now(), '{}', 'applied')",
        "DELETE FROM flagsched.feature_flag_changes",
        "INSERT INTO flagsched.feature_flag_changes (flag_key, actor) VALUES ('a', 'forged')",
        "UPDATE flagsched.feature_flag_recurrences SET cron = '* * * * *'",
        "CREATE TABLE flagsched.intruder (x int)",
        "ALTER TABLE public.feature_flags ADD COLUMN x int",
    ],
)
def test_process_role_on_your_flags_table_can_do_nothing_else(
    own: OwnDeployment, statement: str
) -> None:
    own.grant("process")
    assert own.attempt("flagsched_worker", statement) == DENIED


def test_reader_on_your_flags_table_reads_and_changes_nothing(own: OwnDeployment) -> None:
    own.grant("reader")
    own.sql("INSERT INTO feature_flags (flag_key, environment) VALUES ('a', 'production')")
    own.sql("UPDATE feature_flags SET enabled = true WHERE flag_key = 'a'")
    due = own.add_schedule("a", '{"enabled": false}')
    failed = own.add_schedule("a", '{"rollout_percentage": 5}', status="failed")
    own.sql(
        "INSERT INTO flagsched.feature_flag_recurrences "
        "(flag_key, cron, timezone, updates, next_at, environment) VALUES ('a', "
        "'0 9 * * *', 'UTC', '{\"enabled\": true}', now() + interval '1 day', 'production')"
    )
    status = own.run("test_reader", "status", "--format", "json")
    assert status.code == 0, status.stderr
    assert json.loads(status.stdout)["due"] == 1
    listed = own.run("test_reader", "list-failed", "--format", "json")
    assert listed.code == 0, listed.stderr
    assert [row["id"] for row in json.loads(listed.stdout)] == [failed]
    history = own.run("test_reader", "history", "a", "--format", "json")
    assert history.code == 0, history.stderr
    assert [e["new"]["enabled"] for e in json.loads(history.stdout)] == [True, False]
    for command in (
        ("show", str(failed)),
        ("list",),
        ("list", "--status", "failed"),
        ("recurrences",),
    ):
        ran = own.run("test_reader", *command)
        assert ran.code == 0, (command, ran.stderr)

    tick = own.run("test_reader", "process")
    assert tick.code == 3 and "this login (test_reader) lacks" in tick.stderr, tick
    assert own.status(due) == "pending"
    for statement in (
        # on shape 3 the reader reads a schedule's flag through the view (docs/deploy.md)
        *(() if own.app_schedules else ("SELECT count(*) FROM public.feature_flags",)),
        "UPDATE flagsched.feature_flag_schedules SET status = 'cancelled'",
        "DELETE FROM flagsched.feature_flag_changes",
    ):
        assert own.attempt("test_reader", statement) == DENIED, statement


def test_operator_on_your_flags_table_runs_its_commands_but_never_touches_flags(
    own: OwnDeployment, tmp_path: Path
) -> None:
    own.grant("operator")
    own.sql(
        "INSERT INTO feature_flags (flag_key, environment) VALUES "
        "('a', 'production'), ('a', 'staging')"
    )
    if own.app_schedules:  # a schedule refers to a flag that exists
        own.sql("INSERT INTO feature_flags (flag_key, environment) VALUES ('other', 'production')")
    failed = own.add_schedule("a", '{"enabled": true}', status="failed")
    doomed = own.add_schedule("other", '{"enabled": true}')
    old = own.add_schedule("a", '{"rollout_percentage": 5}', at="now() - interval '9 days'")
    own.sql(
        "UPDATE flagsched.feature_flag_schedules SET status = 'applied', "
        "applied_at = now() - interval '8 days' WHERE id = %(i)s",
        {"i": old},
    )

    def run(*args: str) -> Ran:
        ran = own.run("flagsched_oncall", *args)
        assert ran.code == 0, (args, ran.stdout, ran.stderr)
        return ran

    new_id = run("schedule", "a", "--at", "now", "--rollout", "20").stdout.strip()
    assert own.sql(
        "SELECT status, environment FROM flagsched.feature_flag_schedules WHERE id = %(i)s",
        {"i": new_id},
    ) == [("pending", "production")]
    run("retry", str(failed))
    assert own.status(failed) == "pending"
    run("cancel", str(doomed))
    assert own.status(doomed) == "cancelled"
    own.sql("UPDATE flagsched.feature_flag_changes SET changed_at = now() - interval '8 days'")
    run("prune", "--older-than", "7", "--history")
    assert own.sql("SELECT count(*) FROM flagsched.feature_flag_schedules WHERE id = %(i)s",
                   {"i": old}) == [(0,)]  # fmt: skip
    assert own.sql(  # the staging flag's history is another deployment's
        "SELECT environment FROM flagsched.feature_flag_changes"
    ) == [("staging",)]
    ramp = run("ramp", "a", "--steps", "10,50", "--every", "1h", "--enable")
    (group,) = own.sql(
        "SELECT group_id FROM flagsched.feature_flag_schedules WHERE id = %(i)s",
        {"i": ramp.stdout.split()[0]},
    )[0]
    run("cancel", "--group", str(group))
    recurring = run(
        "schedule", "a", "--cron", "0 2 * * *", "--tz", "Europe/Berlin", "--enable",
        "--expires-after", "1h", "--on-conflict", "apply",
    )  # fmt: skip
    for command in (
        ("status",),
        ("list-failed",),
        ("history",),
        ("show", str(new_id)),
        ("list",),
        ("recurrences",),
        ("plan", "--at", "2100-01-01T00:00:00Z"),
        ("agenda", "--html", str(tmp_path / "agenda.html")),
    ):
        run(*command)
    run("cancel", "--recurrence", recurring.stdout.strip())
    assert own.sql(
        "SELECT flag_key, environment, enabled, rollout_percentage FROM feature_flags ORDER BY 1, 2"
    ) == [("a", "production", False, 0), ("a", "staging", False, 0)] + (
        [("other", "production", False, 0)] if own.app_schedules else []
    )
    for statement in (
        "UPDATE public.feature_flags SET enabled = true",
        "INSERT INTO public.feature_flags (flag_key) VALUES ('x')",
        "DELETE FROM public.feature_flags",
        "UPDATE flagsched.feature_flag_schedules SET updates = '{}'",
        "UPDATE flagsched.feature_flag_schedules SET environment = 'staging'",
        f"DROP {'VIEW' if own.app_schedules else 'TABLE'} flagsched.feature_flag_schedules",
    ):
        assert own.attempt("flagsched_oncall", statement) == DENIED, statement
