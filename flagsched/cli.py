"""The command line: parse, wire, call one function, turn results and errors into exit codes."""

from __future__ import annotations

import functools
import random
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import click

from flagsched import logs
from flagsched.db import Database, url_secrets
from flagsched.errors import FlagschedError
from flagsched.settings import Settings, load_settings

# Exit codes (SPEC): 0 ok, 1 something failed / refused / behind, 2 usage or configuration,
# 3 could not run. A tick stopped by SIGTERM or SIGINT exits 128 + signal (143, 130).
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_COULD_NOT_RUN = 0, 1, 2, 3


class App:
    """Per-invocation wiring: settings and logging configured once, on first use."""

    def __init__(self) -> None:
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            settings = load_settings()
            logs.configure(
                settings.log_format, settings.log_level, secrets=url_secrets(settings.database_url)
            )
            for warning in settings.warnings:
                logs.get_logger().warning("setting_ignored", message=warning)
            self._settings = settings
        return self._settings

    def database(self) -> Database:
        settings = self.settings
        return Database(
            settings.require_database_url(),
            lock_timeout=settings.lock_timeout,
            statement_timeout=settings.statement_timeout,
        )


pass_app = click.make_pass_decorator(App, ensure=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="flagsched")
def cli() -> None:
    """Apply scheduled feature-flag changes stored in PostgreSQL."""


@cli.command()
@click.option("--sql", is_flag=True, help="Print the SQL of the upgrade instead of running it.")
@click.option("--check", is_flag=True, help="Exit 0 at the latest revision, 1 behind it.")
@pass_app
def migrate(app: App, sql: bool, check: bool) -> int:
    """Upgrade the database schema to the latest revision (idempotent, safe concurrently)."""
    from flagsched import migrate as migrations

    if sql and check:
        raise click.UsageError("--sql and --check exclude each other")
    if sql:
        migrations.print_sql(sys.stdout)
        return EXIT_OK
    from flagsched.schema import make_engine

    # DDL may legitimately outlast the tick's statement timeout; only the lock wait is bounded.
    database = app.database()
    engine = make_engine(database.url, lock_timeout=database.lock_timeout, statement_timeout=None)
    log = logs.get_logger()
    if check:
        found, latest = migrations.current(engine), migrations.head()
        if found == latest:
            click.echo(f"schema is at the latest revision ({latest})")
            return EXIT_OK
        click.echo(
            f"schema is at {found or 'no revision'}, latest is {latest}: run `flagsched migrate`"
        )
        return EXIT_FAILED
    before, after = migrations.upgrade(engine)
    log.info("migrate_finished", from_revision=before, to_revision=after, changed=before != after)
    return EXIT_OK


@contextmanager
def _signals_stop(stop: Any) -> Iterator[None]:
    """SIGTERM/SIGINT ask the tick to stop at its next safe point instead of killing it."""

    def handler(signum: int, _: FrameType | None) -> None:
        stop.request(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def _pinged(command: Callable[..., int]) -> Callable[..., int]:
    """`process --ping-url URL` / FLAGSCHED_PING_URL: GET URL/start as the tick starts and
    URL/<exit code> as it ends. A failed ping is a warning, never the exit code; a dry run
    (not a tick) does not ping."""

    @functools.wraps(command)
    def run(app: App, ping_url: str | None, **options: Any) -> int:
        url = ping_url or app.settings.ping_url
        if url is None or options.get("dry_run"):
            return command(app, **options)
        from flagsched.ping import Pinger

        pinger = Pinger(url)
        pinger.start()
        code = EXIT_COULD_NOT_RUN
        try:
            code = command(app, **options)
        except FlagschedError as exc:
            code = exc.exit_code
            raise
        finally:
            for failed in pinger.finish(code):
                logs.get_logger().warning(
                    "ping_failed", ping=failed.ping, host=failed.host, error=failed.reason
                )
        return code

    return run


def _ping_url(value: str | None) -> str | None:
    from flagsched.ping import check_url

    try:
        return None if value is None else check_url(value)
    except ValueError as exc:  # the message never quotes the URL: it may hold a token
        raise click.BadParameter(str(exc), param_hint="--ping-url") from None


@cli.command()
@click.option("--batch-size", type=click.IntRange(1, 1000), help="Schedules per batch [100].")
@click.option(
    "--max-batches",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Run up to N batches (each its own transaction), stopping when nothing is due.",
)
@click.option("--dry-run", is_flag=True, help="Show what would be applied; change nothing.")
@click.option(
    "--metrics-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write Prometheus metrics here (atomically), for node_exporter.",
)
@click.option("--pushgateway", metavar="URL", help="Push-add the metrics to this Pushgateway.")
@click.option(
    "--ping-url",
    metavar="URL",
    callback=lambda _ctx, _param, value: _ping_url(value),
    help="GET URL/start and URL/<exit code> (a cron monitor) [FLAGSCHED_PING_URL].",
)
@pass_app
@_pinged
def process(
    app: App,
    batch_size: int | None,
    max_batches: int,
    dry_run: bool,
    metrics_file: Path | None,
    pushgateway: str | None,
) -> int:
    """Run one tick: apply the schedules that are due."""
    from flagsched import output, tick
    from flagsched.model import Outcome

    settings = app.settings
    options = tick.TickOptions(
        batch_size=batch_size or settings.batch_size,
        max_batches=max_batches,
        retry_max_delay=settings.retry_max_delay,
        max_retries_override=settings.max_retries_override,
    )
    database = app.database()
    if dry_run:
        plan = tick.preview(database, options)
        if not plan:
            click.echo("nothing is due")
        else:
            click.echo(
                output.table(
                    ["ID", "FLAG", "SCHEDULED_AT", "WOULD"],
                    [(s.id, s.flag_key, s.scheduled_at, what) for s, what in plan],
                )
            )
        return EXIT_OK
    stop = tick.StopFlag()
    report = None
    try:
        with _signals_stop(stop):
            report = tick.run(database, options, rng=random.Random(), stop=stop)
    finally:
        if metrics_file or pushgateway:
            _publish(report, metrics_file, pushgateway)
    if report.interrupted_by is not None:
        return 128 + report.interrupted_by
    return EXIT_FAILED if report.count(Outcome.FAILED) else EXIT_OK


def _publish(report: Any, metrics_file: Path | None, pushgateway: str | None) -> None:
    """Metrics never change the tick's exit code: a failure to publish is a warning."""
    from flagsched import metrics

    try:
        metrics.publish(report, metrics_file=metrics_file, pushgateway=pushgateway)
    except Exception as exc:
        logs.get_logger().warning("metrics_publish_failed", error=_redacted(str(exc)))


@cli.command("list-failed")
@click.option("--permanent", "which", flag_value="permanent", help="Only failed for good.")
@click.option("--retrying", "which", flag_value="retrying", help="Only waiting for a retry.")
@click.option("--flag", "flag_key", metavar="KEY", help="Only this flag's schedules.")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True)
@click.option(
    "--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True
)
@pass_app
def list_failed(app: App, which: str | None, flag_key: str | None, limit: int, fmt: str) -> int:
    """Failed schedules, most recently failed first."""
    from flagsched import output, repository
    from flagsched.db import begin

    with begin(app.database()) as conn:
        repository.ensure_schema(conn)
        rows = repository.list_failed(
            conn,
            permanent={"permanent": True, "retrying": False}.get(which or ""),
            flag_key=flag_key,
            limit=limit,
        )
    if fmt == "json":
        click.echo(output.to_json(rows))
    elif not rows:
        click.echo("no failed schedules")
    else:
        click.echo(
            output.table(
                ["ID", "FLAG", "SCHEDULED_AT", "ATTEMPTS", "RETRY", "LAST_ERROR"],
                [
                    (
                        r["id"],
                        r["flag_key"],
                        r["scheduled_at"],
                        r["retry_count"],
                        "permanent"
                        if r["permanent"]
                        else f"retrying at {output.iso(r['next_retry_at'])}",
                        r["last_error"],
                    )
                    for r in rows
                ],
            )
        )
    return EXIT_OK


@cli.command()
@click.option(
    "--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True
)
@click.option(
    "--max-lag",
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    help="Exit 1 when a due schedule has waited longer than this (a health check).",
)
@pass_app
def status(app: App, fmt: str, max_lag: float | None) -> int:
    """Counts per state, the oldest due schedule's age, the next due time."""
    from flagsched import operators, output

    report = operators.status(app.database())
    if fmt == "json":
        click.echo(output.to_json(report))
    else:
        age = report["oldest_due_age_seconds"]
        click.echo(
            output.table(
                ["STATE", "COUNT"],
                [
                    ("due (incl. retries now due, held back)", report["due"]),
                    ("scheduled for later", report["scheduled"]),
                    ("waiting for a retry", report["waiting_retry"]),
                    ("failed for good", report["failed"]),
                    ("applied", report["applied"]),
                    ("cancelled", report["cancelled"]),
                ],
            )
        )
        click.echo(
            f"oldest due: {'-' if age is None else f'{age:.0f}s ago'}"
            f"{'' if age is None else ' (' + str(output.iso(report['oldest_due_at'])) + ')'}"
        )
        click.echo(f"next due:   {output.iso(report['next_due_at']) or '-'}")
    lag = report["oldest_due_age_seconds"]
    if max_lag is not None and lag is not None and lag > max_lag:
        click.echo(f"flagsched: a due schedule has waited {lag:.0f}s (> {max_lag:g}s)", err=True)
        return EXIT_FAILED
    return EXIT_OK


@cli.command()
@click.argument("flag_key")
@click.option(
    "--at",
    "at_text",
    required=True,
    metavar="TIME",
    help="ISO 8601 with an offset (2026-12-01T09:00:00+01:00), or now.",
)
@click.option("--enable/--disable", "enabled", default=None, help="Turn the flag on or off.")
@click.option("--rollout", type=int, metavar="N", help="Set rollout_percentage (0..100).")
@click.option("--max-retries", type=click.IntRange(0, 10), help="Retries after a failure [3].")
@pass_app
def schedule(
    app: App,
    flag_key: str,
    at_text: str,
    enabled: bool | None,
    rollout: int | None,
    max_retries: int | None,
) -> int:
    """Add a pending schedule; prints its id."""
    from flagsched import operators
    from flagsched.model import InvalidUpdates, Updates, parse_when

    try:
        at = parse_when(at_text)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--at") from None
    change: dict[str, object] = {}
    if enabled is not None:
        change["enabled"] = enabled
    if rollout is not None:
        change["rollout_percentage"] = rollout
    if not change:
        raise click.UsageError("give a change: --enable, --disable and/or --rollout N")
    try:
        updates = Updates.parse(change)  # the tick's own validation
    except InvalidUpdates as exc:
        raise click.UsageError(str(exc)) from None
    new_id, exists = operators.add_schedule(
        app.database(), flag_key=flag_key, at=at, updates=updates, max_retries=max_retries
    )
    if not exists:
        click.echo(
            f"flagsched: warning: flag {flag_key!r} does not exist yet; the schedule "
            "fails for good if it still does not when it is due",
            err=True,
        )
    click.echo(new_id)
    return EXIT_OK


def _report_each(results: list[Any]) -> int:
    for result in results:
        click.echo(f"{result.id}: {result.message}")
    return EXIT_OK if all(r.ok for r in results) else EXIT_FAILED


@cli.command()
@click.argument("ids", nargs=-1, required=True, type=int)
@click.option("--force", is_flag=True, help="Retry even when a later schedule was applied.")
@pass_app
def retry(app: App, ids: tuple[int, ...], force: bool) -> int:
    """Make failed schedules pending again (retry_count back to 0)."""
    from flagsched import operators

    return _report_each(operators.retry(app.database(), list(ids), force=force))


@cli.command()
@click.argument("ids", nargs=-1, required=True, type=int)
@pass_app
def cancel(app: App, ids: tuple[int, ...]) -> int:
    """Cancel pending or failed schedules."""
    from flagsched import operators

    return _report_each(operators.cancel(app.database(), list(ids)))


@cli.command()
@click.option(
    "--older-than",
    "days",
    type=click.FloatRange(min=0, min_open=True),
    required=True,
    metavar="DAYS",
    help="Age in days (a positive number).",
)
@click.option("--dry-run", is_flag=True, help="Count what would be deleted.")
@pass_app
def prune(app: App, days: float, dry_run: bool) -> int:
    """Delete applied and cancelled schedules older than DAYS, in small batches."""
    from flagsched import operators

    counts, _ = operators.prune(app.database(), older_than_days=days, dry_run=dry_run)
    verb = "would delete" if dry_run else "deleted"
    click.echo(
        f"{verb} {sum(counts.values())} schedules "
        f"({counts['applied']} applied, {counts['cancelled']} cancelled)"
    )
    return EXIT_OK


def main(argv: list[str] | None = None) -> NoReturn:
    """Entry point: the only place that exits. No traceback reaches an operator."""
    try:
        code = cli.main(args=argv, prog_name="flagsched", standalone_mode=False)
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.ClickException as exc:
        exc.show()
        code = EXIT_USAGE if isinstance(exc, click.UsageError) else exc.exit_code
    except click.exceptions.Abort:
        code = 128 + signal.SIGINT
    except FlagschedError as exc:
        click.echo(f"flagsched: error: {exc.message}", err=True)
        code = exc.exit_code
    except Exception as exc:
        click.echo(
            f"flagsched: internal error: {type(exc).__name__}: {_redacted(str(exc))}", err=True
        )
        code = EXIT_COULD_NOT_RUN
    sys.exit(code if isinstance(code, int) else EXIT_OK)


def _redacted(text: str) -> str:
    from flagsched.db import one_line, url_secrets
    from flagsched.settings import raw_database_url

    return one_line(text, url_secrets(raw_database_url()))
