"""Operator commands that change state: retry, cancel, approve, reject, prune, migrate."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import click

from flagsched import logs
from flagsched.cli.app import EXIT_FAILED, EXIT_OK, EXIT_USAGE, App, pass_app, say
from flagsched.cli.params import GROUP_ID, MAX_PRUNE_DAYS, SCHEDULE_ID, FiniteFloat
from flagsched.errors import ConfigError
from flagsched.model import ScheduleId

if TYPE_CHECKING:
    from flagsched.db import Database
    from flagsched.tables import Configuration


@click.command()
@click.option("--sql", is_flag=True, help="Print the SQL of the upgrade instead of running it.")
@click.option("--check", is_flag=True, help="Exit 0 at the latest revision, 1 behind it.")
@pass_app
def migrate(app: App, sql: bool, check: bool) -> int:
    """Upgrade the database schema to the latest revision (idempotent, safe concurrently)."""
    from flagsched import migrate as migrations

    if sql and check:
        raise click.UsageError("--sql and --check exclude each other")
    configuration = app.configuration
    refused = configuration.not_available("migrate")
    if refused and sql:
        raise ConfigError(refused)
    if configuration.flags is not None and sql:
        raise ConfigError(
            f"{configuration.where}: `migrate --sql` on your own tables is not available in "
            "this release (run `flagsched migrate --check`, then `flagsched migrate`)"
        )
    if configuration.flags is not None:
        database = app.database()
        problems = migrations.check_configuration(database, configuration)
        for problem in problems:
            say(f"flagsched: error: {problem}")
        if problems:
            return EXIT_USAGE
        if check:
            missing = migrations.missing(database, configuration)
            if missing:
                click.echo(
                    f"{configuration.where} matches the database; flagsched's schema lacks "
                    f"{', '.join(missing[:5])}: run `flagsched migrate`"
                )
                return EXIT_FAILED
            click.echo(f"{configuration.where} matches the database; flagsched is in place")
            _advise_open_rows_index(database, configuration)
            return EXIT_OK
        made = migrations.adopt(database, configuration)
        _advise_open_rows_index(database, configuration)
        logs.get_logger().info("migrate_finished", adopted=True, created=len(made))
        return EXIT_OK
    if refused:
        raise ConfigError(refused)
    if sql:
        migrations.print_sql(sys.stdout)
        return EXIT_OK
    from flagsched.schema import make_engine

    # DDL may legitimately outlast the tick's statement timeout; only the lock wait is bounded.
    database = app.database()
    migrations.preflight(database)
    engine = make_engine(database.url, lock_timeout=database.lock_timeout, statement_timeout=None)
    log = logs.get_logger()
    if check:
        found, latest = migrations.current(engine), migrations.head()
        if found == latest:
            missing = migrations.missing(database, configuration)
            if missing:  # dropped by hand: `migrate` has nothing left to run
                click.echo(
                    f"schema is at the latest revision ({latest}) but lacks "
                    f"{', '.join(missing[:5])}, which no revision re-creates: it was changed "
                    'outside flagsched; restore it (docs/operations.md: "An object flagsched '
                    'uses is missing")'
                )
                return EXIT_FAILED
            click.echo(f"schema is at the latest revision ({latest})")
            return EXIT_OK
        click.echo(
            f"schema is at {found or 'no revision'}, latest is {latest}: run `flagsched migrate`"
        )
        return EXIT_FAILED
    before, after = migrations.upgrade(engine)
    log.info("migrate_finished", from_revision=before, to_revision=after, changed=before != after)
    return EXIT_OK


def _advise_open_rows_index(database: Database, configuration: Configuration) -> None:
    """Advice once `migrate` (or its check) has passed, not a problem: the exit code stays."""
    from flagsched import migrate as migrations

    unindexed = migrations.open_rows_unindexed(database, configuration)
    if unindexed is not None:
        logs.get_logger().warning(
            "schedules_table_without_open_rows_index",
            table=unindexed,
            advice="a drain reads each flag's history and walks past applied rows; "
            "see docs/own-tables.md, 'Cost', for the two indexes that make it cheaper",
        )


def _report_each(results: list[Any]) -> int:
    from flagsched import render

    for result in results:
        click.echo(render.handled(result))
    return EXIT_OK if all(r.ok for r in results) else EXIT_FAILED


@click.command()
@click.argument("ids", nargs=-1, required=True, type=SCHEDULE_ID)
@click.option("--force", is_flag=True, help="Retry even when a later schedule was applied.")
@pass_app
def retry(app: App, ids: tuple[ScheduleId, ...], force: bool) -> int:
    """Make failed schedules pending again (retry_count back to 0)."""
    from flagsched import operators

    return _report_each(operators.retry(app.database(), list(ids), force=force))


@click.command()
@click.argument("ids", nargs=-1, type=SCHEDULE_ID)
@click.option(
    "--group", "groups", type=GROUP_ID, multiple=True, metavar="G", help="A ramp's group."
)
@click.option(
    "--recurrence",
    "recurrence_ids",
    type=GROUP_ID,
    multiple=True,
    metavar="R",
    help="A recurrence.",
)
@pass_app
def cancel(
    app: App, ids: tuple[int, ...], groups: tuple[int, ...], recurrence_ids: tuple[int, ...]
) -> int:
    """Cancel pending or failed schedules, a group's schedules not yet applied, or a
    recurrence (with its schedules not yet applied)."""
    from flagsched import operators

    if not (ids or groups or recurrence_ids):
        raise click.UsageError("give schedule ids, --group G or --recurrence R")
    database = app.database()
    results = operators.cancel(database, list(ids)) if ids else []
    for group_id in dict.fromkeys(groups):
        results += operators.cancel_group(database, group_id)
    for recurrence_id in dict.fromkeys(recurrence_ids):
        results += operators.cancel_recurrence(database, recurrence_id)
    return _report_each(results)


@click.command()
@click.argument("ids", nargs=-1, type=SCHEDULE_ID)
@click.option(
    "--group", "groups", type=GROUP_ID, multiple=True, metavar="G", help="A ramp's group."
)
@click.option("--note", metavar="TEXT", help="Why (kept with the approval).")
@pass_app
def approve(
    app: App, ids: tuple[ScheduleId, ...], groups: tuple[int, ...], note: str | None
) -> int:
    """Approve schedules (or a ramp's group) as this database login: a second person's
    yes. A login never approves a schedule it created."""
    from flagsched import operators

    if not (ids or groups):
        raise click.UsageError("give schedule ids or --group G")
    database = app.database()
    results = operators.approve(database, list(ids), note=_note(note)) if ids else []
    for group_id in dict.fromkeys(groups):
        results += operators.approve_group(database, group_id, note=_note(note))
    return _report_each(results)


@click.command()
@click.argument("ids", nargs=-1, required=True, type=SCHEDULE_ID)
@click.option("--note", metavar="TEXT", required=True, help="Why (kept with the verdict).")
@pass_app
def reject(app: App, ids: tuple[ScheduleId, ...], note: str) -> int:
    """Reject schedules: each is cancelled, and the record says who (this login) and why."""
    from flagsched import operators

    text = _note(note)
    if text is None:
        raise click.BadParameter("say why: the note must not be empty", param_hint="--note")
    return _report_each(operators.reject(app.database(), list(ids), note=text))


MAX_NOTE = 1000


def _note(note: str | None) -> str | None:
    """A note as kept: one line, at most MAX_NOTE characters; empty is none."""
    if note is None or not note.strip():
        return None
    text = " ".join(note.split())
    if len(text) > MAX_NOTE or "\x00" in text:
        raise click.BadParameter(
            f"at most {MAX_NOTE} characters, no NUL character", param_hint="--note"
        )
    return text


@click.command()
@click.option(
    "--older-than",
    "days",
    type=FiniteFloat(min=0, min_open=True, max=MAX_PRUNE_DAYS),
    required=True,
    metavar="DAYS",
    help=f"Age in days (a positive number, at most {MAX_PRUNE_DAYS}).",
)
@click.option("--dry-run", is_flag=True, help="Count what would be deleted.")
@click.option("--history", is_flag=True, help="Also delete flag history older than DAYS.")
@pass_app
def prune(app: App, days: float, dry_run: bool, history: bool) -> int:
    """Delete applied and cancelled schedules older than DAYS, in small batches."""
    from flagsched import operators, render

    pruned = operators.prune(app.database(), older_than_days=days, dry_run=dry_run, history=history)
    click.echo(render.pruned(pruned, dry_run=dry_run, history=history))
    return EXIT_OK
