"""`make demo`: a throwaway PostgreSQL, the real CLI on realistic schedules, then clean up."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import sqlalchemy as sa

from flagsched.schema import make_engine
from flagsched.sql import statement
from scripts import pgserver

# `make demo` leaves the agenda page here (build/ is ignored by git).
AGENDA_PAGE = Path("build") / "agenda.html"


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


def _scalar(engine: sa.Engine, name: str) -> object:
    """The value of queries.sql's statement `name`."""
    with engine.connect() as conn:
        return conn.execute(sa.text(statement(name))).scalar()


def banner(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)


def main() -> int:
    server = pgserver.start()
    try:
        admin = make_engine(server.url(database="postgres")).execution_options(
            isolation_level="AUTOCOMMIT"
        )
        with admin.connect() as conn:
            conn.execute(sa.text(statement("demo_database")))
        url = server.url(database="demo")
        env = {**os.environ, "FLAGSCHED_DATABASE_URL": url, "FLAGSCHED_LOG_FORMAT": "console"}
        engine = make_engine(url)

        def flagsched(
            *args: str,
            login: str | None = None,
            config: Path | None = None,
            database: str | None = None,
        ) -> None:
            """The real CLI; `login`: as that database login (a person), `config`: with that
            configuration file, `database`: on that database (the application's)."""
            shown = f"FLAGSCHED_CONFIG={config} " if config else ""
            where = dict(env)
            if database is not None:
                where["FLAGSCHED_DATABASE_URL"] = server.url(database=database)
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

        def sql(name: str) -> None:
            """Run queries.sql's statement `name` (the application's side)."""
            with engine.begin() as conn:
                conn.execute(sa.text(statement(name)))

        def show(name: str) -> None:
            with engine.connect() as conn:
                result = conn.execute(sa.text(statement(name)))
                from flagsched.render import table

                print(table(list(result.keys()), [tuple(r) for r in result]), flush=True)

        banner("A throwaway PostgreSQL is up; migrate it")
        flagsched("migrate")
        banner("Seed three flags and nine schedules")
        sql("demo_seed")
        show("demo_seeded")
        banner("Tick 1: the ramp lands in order, bad ones fail for good, search-v2 will retry")
        flagsched("process")
        flagsched("list-failed")
        banner("The outage ends; move time forward so search-v2's retry is due")
        sql("demo_outage_ends")
        sql("demo_retries_due_now")
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
        sql("demo_add_maintenance_flag")
        flagsched("ramp", "search-v2", "--steps", "25,50,100", "--every", "10m")
        flagsched("list", "--flag", "search-v2", "--tz", "Europe/Berlin")
        banner("Stop the ramp where it is: its steps not yet applied are cancelled")
        flagsched("process")
        group = _scalar(engine, "demo_last_group")
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
        sql("demo_cron_was_down")
        flagsched("process")
        flagsched("list", "--flag", "maintenance-mode", "--status", "applied")
        flagsched("recurrences")
        banner("The record: every change of new-checkout, and the ramp's first step")
        flagsched("history", "new-checkout")
        flagsched("show", "1")
        banner("An incident: someone turns search-v2 off in psql after a change was scheduled")
        flagsched("schedule", "search-v2", "--at", "now", "--rollout", "50")
        with psycopg.connect(url, autocommit=True, application_name="psql") as conn:
            conn.execute(statement("demo_switch_off_in_psql"))
        banner("A change that comes too late: it expired an hour ago")
        sql("demo_late_change")
        banner("Tick 3: the scheduled change is in conflict, the late one expired; both fail")
        flagsched("process")
        flagsched("list-failed", "--permanent")
        flagsched("history", "search-v2")
        banner("The on-call engineer reviews the conflict and says: apply it anyway")
        conflicted = _scalar(engine, "demo_conflicted")
        flagsched("retry", str(conflicted))
        flagsched("process")
        banner("Seeing ahead: a ramp for dark-mode, and search-v2's backend down again")
        soon = datetime.now(UTC).replace(second=0, microsecond=0) + timedelta(hours=2)
        flagsched(
            "ramp", "dark-mode", "--steps", "10,25,50,100", "--every", "1d",
            "--start", soon.isoformat(),
        )  # fmt: skip
        sql("demo_outage_again")
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
            conn.execute(sa.text(statement("demo_two_people")))
        with engine.begin() as conn:
            conn.execute(sa.text(_docs_sql("grants-operator") + _docs_sql("grants-approver")))
        sql("demo_add_payments_flag")
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
        waiting = str(_scalar(engine, "demo_last_schedule"))
        banner("alice tries to approve her own change: refused")
        flagsched("approve", waiting, login="alice", config=policy)
        banner("bob approves it; the next tick applies it")
        flagsched("approve", waiting, "--note", "checked with the payments team", login="bob",
                  config=policy)  # fmt: skip
        flagsched("process", config=policy)
        flagsched("show", waiting, config=policy)
        banner("The flags now")
        show("demo_flags")
        banner("The schedules now")
        show("demo_schedules")
        _own_tables(admin, server, flagsched)
        engine.dispose()
        admin.dispose()
    finally:
        server.stop()
        banner("PostgreSQL stopped and its files removed")
        if AGENDA_PAGE.exists():
            print(f"The agenda page is at {AGENDA_PAGE.resolve()} (open it in a browser)")
    return 0


UPSTREAM = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "upstream-schema.sql"
APP_CONFIG = "".join(
    (UPSTREAM.parent / name).read_text()
    for name in ("upstream-flags.toml", "upstream-schedules.toml")
)


def _own_tables(admin: sa.Engine, server: pgserver.Postgresql, flagsched: Any) -> None:
    """An application that has its own flags and schedules tables (the first application's,
    tests/fixtures/upstream-schema.sql): flagsched runs on them as they are."""
    banner(
        "Your own tables: an application with flags and schedules tables of its own (uuid ids, "
        "two environments, camelCase updates); its admin API wrote a schedule"
    )
    with admin.connect() as conn:
        conn.execute(sa.text(statement("demo_app_database")))
    app_url = server.url(database="demo_app")
    with psycopg.connect(app_url, autocommit=True) as conn:
        conn.execute(UPSTREAM.read_text())
        conn.execute(statement("demo_app_seed"))
    config = AGENDA_PAGE.parent / "app.toml"
    config.write_text(APP_CONFIG)
    print(config.read_text(), end="", flush=True)
    flagsched("migrate", config=config, database="demo_app")
    flagsched("schedule", "new-checkout", "--at", "now", "--rollout", "50", config=config,
              database="demo_app")  # fmt: skip
    flagsched("list", config=config, database="demo_app")
    banner("A tick for production applies both, in order; staging's flag is not touched")
    flagsched("process", config=config, database="demo_app")
    app = make_engine(app_url)
    with app.connect() as conn:
        from flagsched.render import table

        for name in ("demo_app_flags", "demo_app_schedules"):
            result = conn.execute(sa.text(statement(name)))
            print(table(list(result.keys()), [tuple(r) for r in result]), flush=True)
    app.dispose()
    flagsched("history", "new-checkout", config=config, database="demo_app")


if __name__ == "__main__":
    sys.exit(main())
