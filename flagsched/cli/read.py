"""Commands that only read: list, list-failed, status, recurrences, history, show."""

from __future__ import annotations

from datetime import datetime, tzinfo

import click

from flagsched.cli.app import EXIT_FAILED, EXIT_OK, App, pass_app, say
from flagsched.cli.params import (
    FORMAT,
    LIMIT,
    MAX_LAG_SECONDS,
    NOW,
    SCHEDULE_ID,
    TIME,
    FiniteFloat,
    Now,
    instant,
    tz_option,
)
from flagsched.model import ScheduleId


@click.command("list-failed")
@click.option("--permanent", is_flag=True, help="Only failed for good.")
@click.option("--retrying", is_flag=True, help="Only waiting for a retry.")
@click.option("--flag", "flag_key", metavar="KEY", help="Only this flag's schedules.")
@click.option("--limit", type=LIMIT, default=100, show_default=True)
@FORMAT
@pass_app
def list_failed(
    app: App, permanent: bool, retrying: bool, flag_key: str | None, limit: int, fmt: str
) -> int:
    """Failed schedules, most recently failed first."""
    from flagsched import operators, render

    if permanent and retrying:
        raise click.UsageError("--permanent and --retrying exclude each other")
    rows = operators.list_failed(
        app.database(),
        permanent=True if permanent else False if retrying else None,
        flag_key=flag_key,
        limit=limit,
    )
    click.echo(render.failed_schedules(rows, fmt))
    return EXIT_OK


@click.command()
@FORMAT
@click.option(
    "--max-lag",
    type=FiniteFloat(min=0, max=MAX_LAG_SECONDS),
    metavar="SECONDS",
    help="Exit 1 when a due schedule has waited longer than this (a health check).",
)
@pass_app
def status(app: App, fmt: str, max_lag: float | None) -> int:
    """Counts per state, the oldest due schedule's age, the next due time."""
    from flagsched import operators, render

    # The health check (--max-lag) runs every minute on large tables: it reads only the
    # backlog (index scans) and leaves the counts per state out.
    report = operators.status(app.database(), counts=max_lag is None)
    click.echo(render.status(report, fmt))
    lag = report.oldest_due_age_seconds
    if max_lag is not None and lag is not None and lag > max_lag:
        say(f"flagsched: a due schedule has waited {lag:.0f}s (> {max_lag:g}s)")
        return EXIT_FAILED
    return EXIT_OK


@click.command("list")
@click.option("--flag", "flag_key", metavar="KEY", help="Only this flag's schedules.")
@click.option(
    "--status",
    type=click.Choice(["pending", "failed", "applied", "cancelled"]),
    help="Only this status [the open ones: pending, and failed waiting for a retry].",
)
@click.option("--from", "start", type=TIME, metavar="TIME", help="scheduled_at at or after TIME.")
@click.option("--to", "end", type=TIME, metavar="TIME", help="scheduled_at before TIME.")
@tz_option()
@click.option("--limit", type=LIMIT, default=100, show_default=True)
@FORMAT
@pass_app
def list_(
    app: App,
    flag_key: str | None,
    status: str | None,
    start: datetime | Now | None,
    end: datetime | Now | None,
    zone: tzinfo | None,
    limit: int,
    fmt: str,
) -> int:
    """Schedules in (scheduled_at, id) order: what will happen, and when."""
    from flagsched import operators, render
    from flagsched.model import Status
    from flagsched.repository import DB_NOW

    given = {"start": start, "end": end}
    bounds = {k: DB_NOW if v is NOW else v for k, v in given.items() if v is not None}
    rows = operators.list_schedules(
        app.database(),
        policy=app.configuration.approval,
        flag_key=flag_key,
        status=None if status is None else Status(status),
        limit=limit,
        **bounds,
    )
    click.echo(render.schedules(rows, fmt, zone))
    return EXIT_OK


@click.command()
@tz_option(help="Show times in this zone [UTC].")
@FORMAT
@pass_app
def recurrences(app: App, zone: tzinfo | None, fmt: str) -> int:
    """Active recurrences, next occurrence first."""
    from flagsched import operators, render

    click.echo(render.recurrences(operators.recurrences(app.database()), fmt, zone))
    return EXIT_OK


@click.command()
@click.argument("flag_key", required=False)
@click.option("--since", type=TIME, metavar="TIME", help="Only changes at or after TIME.")
@tz_option()
@click.option("--limit", type=LIMIT, default=100, show_default=True)
@FORMAT
@pass_app
def history(
    app: App,
    flag_key: str | None,
    since: datetime | Now | None,
    zone: tzinfo | None,
    limit: int,
    fmt: str,
) -> int:
    """Changes of flags (by anyone), newest first."""
    from flagsched import operators, render

    rows = operators.history(
        app.database(),
        flag_key=flag_key,
        since=instant(since),
        since_now=since is NOW,
        limit=limit,
    )
    click.echo(render.changes(rows, fmt, zone))
    return EXIT_OK


@click.command()
@click.argument("schedule_id", metavar="ID", type=SCHEDULE_ID)
@FORMAT
@pass_app
def show(app: App, schedule_id: ScheduleId, fmt: str) -> int:
    """One schedule: its state, every attempt, its approvals, and the changes it made."""
    from flagsched import operators, render

    row = operators.show(app.database(), schedule_id, policy=app.configuration.approval)
    if row is None:
        say(f"flagsched: no schedule {schedule_id}")
        return EXIT_FAILED
    click.echo(render.schedule(row, fmt))
    return EXIT_OK
