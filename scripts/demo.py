"""`make demo`: a throwaway PostgreSQL, the real CLI on realistic schedules, then clean up."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import sqlalchemy as sa

from flagsched.schema import make_engine
from scripts import pgserver

# `make demo` leaves the agenda page here (build/ is ignored by git).
AGENDA_PAGE = Path("build") / "agenda.html"

SEED = """
INSERT INTO feature_flags (key, enabled, rollout_percentage) VALUES
    ('new-checkout', false, 0), ('dark-mode', false, 0), ('search-v2', false, 0);

-- A rollout ramp that is overdue: all four steps land in one tick, in order.
INSERT INTO feature_flag_schedules (flag_key, scheduled_at, updates) VALUES
    ('new-checkout', now() - interval '40 minutes', '{"enabled": true, "rollout_percentage": 10}'),
    ('new-checkout', now() - interval '30 minutes', '{"rollout_percentage": 25}'),
    ('new-checkout', now() - interval '20 minutes', '{"rollout_percentage": 50}'),
    ('new-checkout', now() - interval '10 minutes', '{"rollout_percentage": 100}'),
    ('dark-mode',    now() - interval '5 minutes',  '{"enabled": true}'),
    -- due tomorrow: left alone
    ('dark-mode',    now() + interval '1 day',      '{"enabled": false}'),
    -- a flag that was deleted: fails for good at once
    ('legacy-banner', now() - interval '1 minute',  '{"enabled": false}'),
    -- a typo an application made: fails for good, touches no flag
    ('dark-mode',    now() - interval '1 minute',   '{"rollout_percentage": "fifty"}'),
    -- search-v2's database trigger fails for now (an outage): retried with backoff
    ('search-v2',    now() - interval '2 minutes',  '{"enabled": true, "rollout_percentage": 5}');

-- Simulate a transient failure from the database side for search-v2.
CREATE TABLE demo_outage (key text PRIMARY KEY);
INSERT INTO demo_outage VALUES ('search-v2');
CREATE FUNCTION demo_outage() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM demo_outage WHERE key = NEW.key) THEN
        RAISE EXCEPTION 'search backend unavailable (simulated outage)';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER demo_outage BEFORE UPDATE ON feature_flags
    FOR EACH ROW EXECUTE FUNCTION demo_outage();
"""


def _docs_sql(name: str) -> str:
    """The ```sql block after `<!-- sql:NAME -->` in docs/deploy.md: the demo sets up roles
    and grants exactly as the documentation says."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "deploy.md").read_text()
    found = re.search(rf"<!-- sql:{re.escape(name)} -->\s*```sql\n(.*?)```", text, re.DOTALL)
    if found is None:
        raise SystemExit(f"docs/deploy.md has no sql:{name} block")
    return found.group(1)


def as_login(url: str, login: str) -> str:
    """The demo database's URL as another login (the throwaway server trusts local logins)."""
    return sa.make_url(url).set(username=login).render_as_string(hide_password=False)


def _scalar(engine: sa.Engine, query: str) -> object:
    with engine.connect() as conn:
        return conn.execute(sa.text(query)).scalar()


def banner(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)


def main() -> int:
    server = pgserver.start()
    try:
        admin = make_engine(server.url(database="postgres")).execution_options(
            isolation_level="AUTOCOMMIT"
        )
        with admin.connect() as conn:
            conn.execute(sa.text("CREATE DATABASE demo"))
        url = server.url(database="demo")
        env = {**os.environ, "FLAGSCHED_DATABASE_URL": url, "FLAGSCHED_LOG_FORMAT": "console"}
        engine = make_engine(url)

        def flagsched(*args: str, login: str | None = None, config: Path | None = None) -> None:
            """The real CLI; `login`: as that database login (a person), `config`: with that
            configuration file."""
            shown = f"FLAGSCHED_CONFIG={config} " if config else ""
            where = dict(env)
            if login is not None:
                where["FLAGSCHED_DATABASE_URL"] = as_login(url, login)
                shown = f"[{login}] {shown}"
            if config is not None:
                where["FLAGSCHED_CONFIG"] = str(config)
            print(f"{shown}$ flagsched {' '.join(args)}", flush=True)
            code = subprocess.run(
                [sys.executable, "-m", "flagsched", *args], env=where, check=False
            ).returncode
            print(f"(exit {code})", flush=True)

        def sql(statement: str) -> None:
            with engine.begin() as conn:
                conn.execute(sa.text(statement))

        def show(query: str) -> None:
            with engine.connect() as conn:
                result = conn.execute(sa.text(query))
                from flagsched.render import table

                print(table(list(result.keys()), [tuple(r) for r in result]), flush=True)

        banner("A throwaway PostgreSQL is up; migrate it")
        flagsched("migrate")
        banner("Seed three flags and nine schedules")
        sql(SEED)
        show("SELECT id, flag_key, scheduled_at, updates FROM feature_flag_schedules ORDER BY id")
        banner("Tick 1: the ramp lands in order, bad ones fail for good, search-v2 will retry")
        flagsched("process")
        flagsched("list-failed")
        banner("The outage ends; move time forward so search-v2's retry is due")
        sql("DELETE FROM demo_outage")
        sql(
            "UPDATE feature_flag_schedules SET next_retry_at = now() "
            "WHERE status = 'failed' AND next_retry_at IS NOT NULL"
        )
        banner("Tick 2: search-v2 succeeds on its retry")
        flagsched("process")
        flagsched("list-failed", "--format", "json", "--permanent")
        if (
            "status"
            in subprocess.run(
                [sys.executable, "-m", "flagsched", "--help"],
                env=env,
                capture_output=True,
                text=True,
                check=False,
            ).stdout
        ):
            flagsched("status")
        banner("Authoring: a ramp for search-v2, one step every 10 minutes, as one group")
        sql("INSERT INTO feature_flags (key) VALUES ('maintenance-mode')")
        flagsched("ramp", "search-v2", "--steps", "25,50,100", "--every", "10m")
        flagsched("list", "--flag", "search-v2", "--tz", "Europe/Berlin")
        banner("Stop the ramp where it is: its steps not yet applied are cancelled")
        flagsched("process")
        group = _scalar(engine, "SELECT max(group_id) FROM feature_flag_schedules")
        flagsched("cancel", "--group", str(group))
        banner("A recurring window: maintenance mode on at 02:00 and off at 04:00 Berlin time")
        flagsched(
            "schedule", "maintenance-mode", "--cron", "0 2 * * *", "--tz", "Europe/Berlin",
            "--enable", "--expires-after", "1h",
        )  # fmt: skip
        flagsched(
            "schedule",
            "maintenance-mode",
            "--cron",
            "0 4 * * *",
            "--tz",
            "Europe/Berlin",
            "--disable",
        )
        flagsched("recurrences")
        banner(
            "Cron was down for three weeks: each window fires once, for its latest occurrence; "
            "one more than an hour past its time (--expires-after 1h) fails, never switching late"
        )
        sql("UPDATE feature_flag_recurrences SET next_at = next_at - interval '21 days'")
        flagsched("process")
        flagsched("list", "--flag", "maintenance-mode", "--status", "applied")
        flagsched("recurrences")
        banner("The record: every change of new-checkout, and the ramp's first step")
        flagsched("history", "new-checkout")
        flagsched("show", "1")
        banner("An incident: someone turns search-v2 off in psql after a change was scheduled")
        flagsched("schedule", "search-v2", "--at", "now", "--rollout", "50")
        with psycopg.connect(url, autocommit=True, application_name="psql") as conn:
            conn.execute("UPDATE feature_flags SET enabled = false WHERE key = 'search-v2'")
        banner("A change that comes too late: it expired an hour ago")
        sql(
            "INSERT INTO feature_flag_schedules (flag_key, scheduled_at, updates, expires_at) "
            "VALUES ('dark-mode', now() - interval '2 hours', '{\"rollout_percentage\": 50}', "
            "now() - interval '1 hour')"
        )
        banner("Tick 3: the scheduled change is in conflict, the late one expired; both fail")
        flagsched("process")
        flagsched("list-failed", "--permanent")
        flagsched("history", "search-v2")
        banner("The on-call engineer reviews the conflict and says: apply it anyway")
        conflicted = _scalar(
            engine, "SELECT id FROM feature_flag_schedules WHERE last_error LIKE 'conflict:%'"
        )
        flagsched("retry", str(conflicted))
        flagsched("process")
        banner("Seeing ahead: a ramp for dark-mode, and search-v2's backend down again")
        soon = datetime.now(UTC).replace(second=0, microsecond=0) + timedelta(hours=2)
        flagsched(
            "ramp", "dark-mode", "--steps", "10,25,50,100", "--every", "1d",
            "--start", soon.isoformat(),
        )  # fmt: skip
        sql("INSERT INTO demo_outage VALUES ('search-v2')")
        flagsched("schedule", "search-v2", "--at", "now", "--rollout", "75")
        flagsched("process")
        flagsched("schedule", "search-v2", "--at", (soon + timedelta(days=1)).isoformat(),
                  "--rollout", "100")  # fmt: skip
        banner("What will the flags be in two days? And what happens this week?")
        flagsched("plan", "--at", (soon + timedelta(days=2)).isoformat(), "--tz", "Europe/Berlin")
        AGENDA_PAGE.parent.mkdir(exist_ok=True)
        flagsched("agenda", "--tz", "Europe/Berlin", "--html", str(AGENDA_PAGE))
        banner(
            "Four eyes: payments changes need a second person. Two people, one database "
            "login each (docs/deploy.md: roles and grants)"
        )
        with admin.connect() as conn:
            conn.execute(sa.text(_docs_sql("roles")))
            conn.execute(
                sa.text(
                    "CREATE ROLE alice LOGIN IN ROLE flagsched_operator, flagsched_approver;"
                    "CREATE ROLE bob LOGIN IN ROLE flagsched_operator, flagsched_approver"
                )
            )
        sql(_docs_sql("grants-operator") + _docs_sql("grants-approver"))
        sql("INSERT INTO feature_flags (key) VALUES ('payments-v2')")
        policy = AGENDA_PAGE.parent / "flagsched.toml"
        policy.write_text(
            '[approval]\nflags = ["payments-*"]\nrollout_increase_over = 50\nenabling = true\n'
        )
        print(policy.read_text(), end="", flush=True)
        flagsched(
            "schedule", "payments-v2", "--at", "now", "--enable", "--rollout", "100",
            login="alice", config=policy,
        )  # fmt: skip
        banner("Tick 4: the change is due, but nobody else has approved it: it waits")
        flagsched("process", config=policy)
        flagsched("status", config=policy)
        flagsched("list", "--flag", "payments-v2", config=policy)
        waiting = str(_scalar(engine, "SELECT max(id) FROM feature_flag_schedules"))
        banner("alice tries to approve her own change: refused")
        flagsched("approve", waiting, login="alice", config=policy)
        banner("bob approves it; the next tick applies it")
        flagsched("approve", waiting, "--note", "checked with the payments team", login="bob",
                  config=policy)  # fmt: skip
        flagsched("process", config=policy)
        flagsched("show", waiting, config=policy)
        banner("The flags now")
        show("SELECT key, enabled, rollout_percentage, updated_at FROM feature_flags ORDER BY key")
        banner("The schedules now")
        show(
            "SELECT id, flag_key, status, retry_count, applied_at, last_error "
            "FROM feature_flag_schedules ORDER BY id"
        )
        engine.dispose()
        admin.dispose()
    finally:
        server.stop()
        banner("PostgreSQL stopped and its files removed")
        if AGENDA_PAGE.exists():
            print(f"The agenda page is at {AGENDA_PAGE.resolve()} (open it in a browser)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
