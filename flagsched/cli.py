"""The command line: parse, wire, call one function, turn results and errors into exit codes."""

from __future__ import annotations

import functools
import itertools
import math
import random
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import click

from flagsched import logs
from flagsched.db import Database
from flagsched.errors import FlagschedError
from flagsched.settings import PG_INT_MAX, Settings, load_settings

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
            logs.configure(settings.log_format, settings.log_level)
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
_FORMAT = click.option(
    "--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True
)

BIGINT_MAX = 2**63 - 1  # schedule ids are bigint
MAX_LAG_SECONDS = 10 * 365 * 86400
MAX_PRUNE_DAYS = 36500


class FiniteFloat(click.FloatRange):
    """A FloatRange that also refuses nan and inf (FloatRange lets nan through every bound)."""

    name = "finite float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return super().convert(number, param, ctx)


COUNT = click.IntRange(1, PG_INT_MAX)  # limits and counts: what PostgreSQL's integers hold
SCHEDULE_ID = click.IntRange(1, BIGINT_MAX)


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
    migrations.preflight(database)
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
        # A second signal ends the process at once (the server rolls the transaction back
        # when the connection drops), as it would without us: a stuck tick stays stoppable.
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, signal.SIG_DFL)
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
    type=COUNT,
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
        max_lateness=settings.max_lateness,
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
    from flagsched.urls import describe_url, endpoint_error

    try:
        metrics.publish(report, metrics_file=metrics_file, pushgateway=pushgateway)
    except Exception as exc:
        where = {"pushgateway": describe_url(pushgateway)} if pushgateway else {}
        error = endpoint_error(exc, pushgateway) if pushgateway else str(exc)
        logs.get_logger().warning("metrics_publish_failed", **where, error=_redacted(error))


@cli.command("list-failed")
@click.option("--permanent", is_flag=True, help="Only failed for good.")
@click.option("--retrying", is_flag=True, help="Only waiting for a retry.")
@click.option("--flag", "flag_key", metavar="KEY", help="Only this flag's schedules.")
@click.option("--limit", type=COUNT, default=100, show_default=True)
@_FORMAT
@pass_app
def list_failed(
    app: App, permanent: bool, retrying: bool, flag_key: str | None, limit: int, fmt: str
) -> int:
    """Failed schedules, most recently failed first."""
    from flagsched import output, repository
    from flagsched.db import begin

    if permanent and retrying:
        raise click.UsageError("--permanent and --retrying exclude each other")

    with begin(app.database()) as conn:
        repository.ensure_schema(conn)
        rows = repository.list_failed(
            conn,
            permanent=True if permanent else False if retrying else None,
            flag_key=flag_key,
            limit=limit,
        )
    if not _json_or_empty(fmt, rows, "no failed schedules"):
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
@_FORMAT
@click.option(
    "--max-lag",
    type=FiniteFloat(min=0, max=MAX_LAG_SECONDS),
    metavar="SECONDS",
    help="Exit 1 when a due schedule has waited longer than this (a health check).",
)
@pass_app
def status(app: App, fmt: str, max_lag: float | None) -> int:
    """Counts per state, the oldest due schedule's age, the next due time."""
    from flagsched import operators, output

    # The health check (--max-lag) runs every minute on large tables: it reads only the
    # backlog (index scans) and leaves the counts per state out.
    report = operators.status(app.database(), counts=max_lag is None)
    if fmt == "json":
        click.echo(output.to_json(report))
    else:
        age = report["oldest_due_age_seconds"]
        states = [
            ("due (incl. retries now due, held back)", "due"),
            ("scheduled for later", "scheduled"),
            ("waiting for a retry", "waiting_retry"),
            ("failed for good", "failed"),
            ("applied", "applied"),
            ("cancelled", "cancelled"),
            ("unknown (a status outside the four)", "unknown"),
        ]
        click.echo(
            output.table(
                ["STATE", "COUNT"],
                [(label, report[key]) for label, key in states if key in report],
            )
        )
        click.echo(
            f"oldest due: {'-' if age is None else f'{age:.0f}s ago'}"
            f"{'' if age is None else ' (' + str(output.iso(report['oldest_due_at'])) + ')'}"
        )
        click.echo(f"next due:   {output.iso(report['next_due_at']) or '-'}")
    lag = report["oldest_due_age_seconds"]
    if max_lag is not None and lag is not None and lag > max_lag:
        _say(f"flagsched: a due schedule has waited {lag:.0f}s (> {max_lag:g}s)")
        return EXIT_FAILED
    return EXIT_OK


def _zone_option(name: str | None) -> Any:
    """--tz ZONE as a tzinfo (None: not given)."""
    from flagsched.times import InvalidTime, parse_zone

    if name is None:
        return None
    try:
        return parse_zone(name)
    except InvalidTime as exc:
        raise click.BadParameter(str(exc), param_hint="--tz") from None


def _time_option(text: str | None, zone: Any, hint: str) -> Any:
    """A TIME option: a datetime, None for `now` (the database's clock)."""
    from flagsched.times import InvalidTime, parse_time

    if text is None:
        return None
    try:
        return parse_time(text, zone)
    except InvalidTime as exc:
        raise click.BadParameter(str(exc), param_hint=hint) from None


def _duration_option(text: str | None, hint: str) -> Any:
    from flagsched.times import InvalidTime, parse_duration

    if text is None:
        return None
    try:
        return parse_duration(text)
    except InvalidTime as exc:
        raise click.BadParameter(str(exc), param_hint=hint) from None


def _check_reach(at: Any, span: Any, hint: str) -> None:
    """The latest time a command would store must stay readable (years up to 9999)."""
    from datetime import timedelta

    from flagsched.times import LATEST, MAX_DURATION

    span = span or timedelta(0)
    try:
        beyond = span > MAX_DURATION if at is None else at + span > LATEST
    except OverflowError:
        beyond = True
    if beyond:
        raise click.BadParameter("reaches past the year 9999", param_hint=hint)


def _updates(enabled: bool | None, rollout: int | None) -> Any:
    from flagsched.model import InvalidUpdates, Updates

    change: dict[str, object] = {}
    if enabled is not None:
        change["enabled"] = enabled
    if rollout is not None:
        change["rollout_percentage"] = rollout
    if not change:
        raise click.UsageError("give a change: --enable, --disable and/or --rollout N")
    try:
        return Updates.parse(change)  # the tick's own validation
    except InvalidUpdates as exc:
        raise click.UsageError(str(exc)) from None


def _warn_missing_flag(flag_key: str, what: str = "the schedule fails") -> None:
    _say(
        f"flagsched: warning: flag {flag_key!r} does not exist yet; {what} "
        "for good if it still does not when it is due"
    )


def _flag_key(flag_key: str) -> str:
    if not flag_key.strip():
        raise click.BadParameter("a flag key cannot be empty or only spaces", param_hint="FLAG_KEY")
    return flag_key


_TZ_HELP = "IANA time zone for TIME values without an offset, and for the table [UTC]."
_ON_CONFLICT = click.option(
    "--on-conflict",
    type=click.Choice(["fail", "apply"]),
    default="fail",
    show_default=True,
    help="When someone else changed the flag since: fail it, or apply anyway.",
)
_EXPIRES = click.option(
    "--expires-after",
    metavar="DURATION",
    help="Fail for good instead of applying when this late (90s, 30m, 2h, 1d).",
)


@cli.command()
@click.argument("flag_key")
@click.option(
    "--at",
    "at_text",
    metavar="TIME",
    help="ISO 8601 with an offset (2026-12-01T09:00:00+01:00), a local time with --tz, or now.",
)
@click.option(
    "--cron",
    "cron_text",
    metavar="EXPR",
    help="Instead of --at: recur on this 5-field cron expression, in --tz.",
)
@click.option("--tz", "tz_name", metavar="ZONE", help=_TZ_HELP)
@click.option("--enable/--disable", "enabled", default=None, help="Turn the flag on or off.")
@click.option(
    "--rollout", type=click.IntRange(0, 100), metavar="N", help="Set rollout_percentage (0..100)."
)
@click.option("--max-retries", type=click.IntRange(0, 10), help="Retries after a failure [3].")
@_EXPIRES
@_ON_CONFLICT
@pass_app
def schedule(
    app: App,
    flag_key: str,
    at_text: str | None,
    cron_text: str | None,
    tz_name: str | None,
    enabled: bool | None,
    rollout: int | None,
    max_retries: int | None,
    expires_after: str | None,
    on_conflict: str,
) -> int:
    """Add a pending schedule (prints its id), or with --cron a recurrence (prints its id)."""
    from flagsched import operators
    from flagsched.model import OnConflict

    flag_key = _flag_key(flag_key)
    if (at_text is None) == (cron_text is None):
        raise click.UsageError("give exactly one of --at TIME and --cron EXPR")
    zone = _zone_option(tz_name)
    expires = _duration_option(expires_after, "--expires-after")
    if cron_text is not None:
        from flagsched.recurring import InvalidCron, validate
        from flagsched.times import zone_name

        if max_retries is not None:
            raise click.UsageError("--max-retries applies to --at schedules, not to --cron")
        try:
            cron = validate(cron_text)
        except InvalidCron as exc:
            raise click.BadParameter(str(exc), param_hint="--cron") from None
        updates = _updates(enabled, rollout)
        new_id, _, exists = operators.add_recurrence(
            app.database(),
            flag_key=flag_key,
            cron=cron,
            zone="UTC" if zone is None else zone_name(zone),
            updates=updates,
            expires_after=expires,
            on_conflict=OnConflict(on_conflict),
        )
        if not exists:
            _warn_missing_flag(flag_key, "each schedule it makes fails")
        click.echo(new_id)
        return EXIT_OK
    at = _time_option(at_text, zone, "--at")
    _check_reach(at, expires, "--expires-after")
    updates = _updates(enabled, rollout)
    new_id, exists = operators.add_schedule(
        app.database(),
        flag_key=flag_key,
        at=at,
        updates=updates,
        max_retries=max_retries,
        expires_after=expires,
        on_conflict=OnConflict(on_conflict),
    )
    if not exists:
        _warn_missing_flag(flag_key)
    click.echo(new_id)
    return EXIT_OK


def _parse_steps(text: str) -> list[int]:
    """--steps: integers 0..100, strictly rising (see docs/operations.md, Authoring)."""
    try:
        steps = [int(part) for part in text.split(",")]
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is not a list of integers (e.g. 10,25,50,100)", param_hint="--steps"
        ) from None
    if any(not 0 <= n <= 100 for n in steps):
        raise click.BadParameter("every step must be 0..100", param_hint="--steps")
    if any(b <= a for a, b in itertools.pairwise(steps)):
        raise click.BadParameter(
            "steps must rise (10,25,50,100); to go down, schedule the change itself",
            param_hint="--steps",
        )
    return steps


@cli.command()
@click.argument("flag_key")
@click.option(
    "--steps", required=True, metavar="N,N,...", help="Rollout steps, rising: 10,25,50,100."
)
@click.option("--every", required=True, metavar="DURATION", help="Time between steps (30m, 1d).")
@click.option("--start", "start_text", metavar="TIME", help="When the first step is due [now].")
@click.option("--tz", "tz_name", metavar="ZONE", help=_TZ_HELP)
@click.option("--enable", is_flag=True, help="Each step also sets enabled true.")
@_EXPIRES
@_ON_CONFLICT
@pass_app
def ramp(
    app: App,
    flag_key: str,
    steps: str,
    every: str,
    start_text: str | None,
    tz_name: str | None,
    enable: bool,
    expires_after: str | None,
    on_conflict: str,
) -> int:
    """Add a rollout ramp: one schedule per step, one group; prints the ids in order."""
    from flagsched import operators
    from flagsched.model import OnConflict, Updates

    flag_key = _flag_key(flag_key)
    values = _parse_steps(steps)
    interval = _duration_option(every, "--every")
    start = _time_option(start_text, _zone_option(tz_name), "--start")
    expires = _duration_option(expires_after, "--expires-after")
    last_step = interval * (len(values) - 1)
    _check_reach(start, last_step if expires is None else last_step + expires, "--every")
    group_id, made, exists = operators.add_ramp(
        app.database(),
        flag_key=flag_key,
        steps=[Updates(enabled=True if enable else None, rollout_percentage=n) for n in values],
        start=start,
        every=interval,
        expires_after=expires,
        on_conflict=OnConflict(on_conflict),
    )
    if not exists:
        _warn_missing_flag(flag_key, "each step fails")
    for schedule_id, _ in made:
        click.echo(schedule_id)
    click.echo(
        f"flagsched: ramp group {group_id}; stop it with `flagsched cancel --group {group_id}`",
        err=True,
    )
    return EXIT_OK


def _shown(value: Any, zone: Any) -> Any:
    from flagsched.times import format_time

    return format_time(value, zone)


def _change(updates: Any) -> str:
    import json

    text = json.dumps(updates, separators=(",", ":")) if isinstance(updates, dict) else str(updates)
    return text if len(text) <= 60 else text[:57] + "..."


@cli.command("list")
@click.option("--flag", "flag_key", metavar="KEY", help="Only this flag's schedules.")
@click.option(
    "--status",
    type=click.Choice(["pending", "failed", "applied", "cancelled"]),
    help="Only this status [the open ones: pending, and failed waiting for a retry].",
)
@click.option("--from", "from_text", metavar="TIME", help="scheduled_at at or after TIME.")
@click.option("--to", "to_text", metavar="TIME", help="scheduled_at before TIME.")
@click.option("--tz", "tz_name", metavar="ZONE", help=_TZ_HELP)
@click.option("--limit", type=click.IntRange(1, 100000), default=100, show_default=True)
@_FORMAT
@pass_app
def list_(
    app: App,
    flag_key: str | None,
    status: str | None,
    from_text: str | None,
    to_text: str | None,
    tz_name: str | None,
    limit: int,
    fmt: str,
) -> int:
    """Schedules in (scheduled_at, id) order: what will happen, and when."""
    from flagsched import operators, output
    from flagsched.model import Status
    from flagsched.repository import DB_NOW

    zone = _zone_option(tz_name)
    bounds = {}
    for key, text, hint in (("start", from_text, "--from"), ("end", to_text, "--to")):
        if text is not None:
            bounds[key] = _time_option(text, zone, hint) or DB_NOW
    rows = operators.list_schedules(
        app.database(),
        flag_key=flag_key,
        status=None if status is None else Status(status),
        limit=limit,
        **bounds,
    )
    if _json_or_empty(fmt, rows, "no schedules"):
        return EXIT_OK

    def state(row: dict[str, Any]) -> str:
        if row["status"] != "failed":
            return str(row["status"])
        if row["permanent"]:
            return "failed for good"
        return f"retrying at {_shown(row['next_retry_at'], zone)}"

    click.echo(
        output.table(
            ["ID", "FLAG", "SCHEDULED_AT", "STATUS", "CHANGE", "GROUP", "EXPIRES_AT"],
            [
                (
                    r["id"],
                    r["flag_key"],
                    _shown(r["scheduled_at"], zone),
                    state(r),
                    _change(r["updates"]),
                    r["group_id"] if r["recurrence_id"] is None else f"r{r['recurrence_id']}",
                    _shown(r["expires_at"], zone),
                )
                for r in rows
            ],
        )
    )
    return EXIT_OK


@cli.command()
@click.option("--tz", "tz_name", metavar="ZONE", help="Show times in this zone [UTC].")
@_FORMAT
@pass_app
def recurrences(app: App, tz_name: str | None, fmt: str) -> int:
    """Active recurrences, next occurrence first."""
    from flagsched import operators, output
    from flagsched.times import format_duration

    zone = _zone_option(tz_name)
    rows = [
        {**r, "expires_after": format_duration(r["expires_after"])}
        for r in operators.recurrences(app.database())
    ]
    if not _json_or_empty(fmt, rows, "no recurrences"):
        click.echo(
            output.table(
                ["ID", "FLAG", "CRON", "TIMEZONE", "NEXT_AT", "CHANGE", "EXPIRES_AFTER"],
                [
                    (
                        r["id"],
                        r["flag_key"],
                        r["cron"],
                        r["timezone"],
                        _shown(r["next_at"], zone) or "never (stopped)",
                        _change(r["updates"]),
                        r["expires_after"],
                    )
                    for r in rows
                ],
            )
        )
    return EXIT_OK


def _json_or_empty(fmt: str, rows: list[dict[str, Any]], empty: str) -> bool:
    """Rows as JSON, or the line `empty` when there are none; False: print them as a table."""
    from flagsched import output

    if fmt == "json":
        click.echo(output.to_json(rows))
        return True
    if not rows:
        click.echo(empty)
        return True
    return False


def _report_each(results: list[Any]) -> int:
    from flagsched.output import visible

    for result in results:
        click.echo(f"{visible(result.subject or str(result.id))}: {visible(result.message)}")
    return EXIT_OK if all(r.ok for r in results) else EXIT_FAILED


@cli.command()
@click.argument("ids", nargs=-1, required=True, type=SCHEDULE_ID)
@click.option("--force", is_flag=True, help="Retry even when a later schedule was applied.")
@pass_app
def retry(app: App, ids: tuple[int, ...], force: bool) -> int:
    """Make failed schedules pending again (retry_count back to 0)."""
    from flagsched import operators

    return _report_each(operators.retry(app.database(), list(ids), force=force))


@cli.command()
@click.argument("ids", nargs=-1, type=SCHEDULE_ID)
@click.option(
    "--group", "groups", type=SCHEDULE_ID, multiple=True, metavar="G", help="A ramp's group."
)
@click.option(
    "--recurrence",
    "recurrence_ids",
    type=SCHEDULE_ID,
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


@cli.command()
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
    from flagsched import operators

    counts, _ = operators.prune(
        app.database(), older_than_days=days, dry_run=dry_run, history=history
    )
    verb = "would delete" if dry_run else "deleted"
    line = (
        f"{verb} {counts['applied'] + counts['cancelled']} schedules "
        f"({counts['applied']} applied, {counts['cancelled']} cancelled)"
    )
    if history:
        line += f" and {counts['history']} history entries"
    click.echo(line)
    return EXIT_OK



def _values(state: dict[str, Any] | None) -> str:
    if state is None:
        return "-"
    enabled = "on" if state["enabled"] else "off"
    return f"{enabled} {state['rollout_percentage']}%"


def _history_table(rows: list[dict[str, Any]], zone: Any = None) -> str:
    from flagsched import output

    return output.table(
        ["ID", "CHANGED_AT", "FLAG", "ACTOR", "OLD", "NEW", "SCHEDULES"],
        [
            (
                r["id"],
                _shown(r["changed_at"], zone),
                r["flag_key"],
                r["actor"],
                _values(r["old"]),
                _values(r["new"]),
                ",".join(str(i) for i in r["schedule_ids"]) or "-",
            )
            for r in rows
        ],
    )


@cli.command()
@click.argument("flag_key", required=False)
@click.option("--since", "since_text", metavar="TIME", help="Only changes at or after TIME.")
@click.option("--tz", "tz_name", metavar="ZONE", help=_TZ_HELP)
@click.option("--limit", type=click.IntRange(1, 1_000_000), default=100, show_default=True)
@_FORMAT
@pass_app
def history(
    app: App,
    flag_key: str | None,
    since_text: str | None,
    tz_name: str | None,
    limit: int,
    fmt: str,
) -> int:
    """Changes of flags (by anyone), newest first."""
    from flagsched import operators

    zone = _zone_option(tz_name)
    since: datetime | None = _time_option(since_text, zone, "--since")  # None: now (the db's)
    rows = operators.history(
        app.database(),
        flag_key=flag_key,
        since=since,
        since_now=since_text is not None and since is None,
        limit=limit,
    )
    if not _json_or_empty(fmt, rows, "no changes recorded"):
        click.echo(_history_table(rows, zone))
    return EXIT_OK


@cli.command()
@click.argument("schedule_id", metavar="ID", type=SCHEDULE_ID)
@_FORMAT
@pass_app
def show(app: App, schedule_id: int, fmt: str) -> int:
    """One schedule: its state, every attempt, and the changes it made."""
    from flagsched import operators, output

    row = operators.show(app.database(), schedule_id)
    if row is None:
        _say(f"flagsched: no schedule {schedule_id}")
        return EXIT_FAILED
    if fmt == "json":
        click.echo(output.to_json(row))
        return EXIT_OK
    fields = [k for k in row if k not in ("attempts", "changes")]
    click.echo(output.table(["FIELD", "VALUE"], [(k, row[k]) for k in fields]))
    click.echo("")
    attempts = row["attempts"]
    if attempts:
        click.echo(
            output.table(
                ["ATTEMPT", "AT", "OUTCOME", "ERROR"],
                [
                    (a.get("attempt"), a.get("at"), a.get("outcome"), a.get("error"))
                    for a in attempts
                    if isinstance(a, dict)
                ],
            )
        )
    else:
        click.echo("no attempts yet")
    click.echo("")
    click.echo(_history_table(row["changes"]) if row["changes"] else "no changes made")
    return EXIT_OK


# plan and agenda (seeing ahead) live in their own module, which adds them to `cli`.
import flagsched.ahead_cli  # noqa: E402, F401


def main(argv: list[str] | None = None) -> NoReturn:
    """Entry point: the only place that exits."""
    sys.exit(run(argv))


def run(argv: list[str] | None = None) -> int:
    """One invocation, as its exit code. No traceback reaches an operator."""
    try:
        code = cli.main(args=argv, prog_name="flagsched", standalone_mode=False)
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.ClickException as exc:
        _say(f"flagsched: error: {_usage_line(exc)}")
        code = EXIT_USAGE if isinstance(exc, click.UsageError) else exc.exit_code
    except click.exceptions.Abort:
        code = 128 + signal.SIGINT
    except FlagschedError as exc:
        _say(f"flagsched: error: {exc.message}")
        code = exc.exit_code
    except Exception as exc:
        logs.debug_exception("internal_error", exc)  # FLAGSCHED_LOG_LEVEL=debug: the traceback
        _say(f"flagsched: internal error: {type(exc).__name__}: {_redacted(str(exc))}")
        code = EXIT_COULD_NOT_RUN
    return code if isinstance(code, int) else EXIT_OK


def _say(line: str) -> None:
    """One line for the operator on stderr. A stderr that is full or closed loses the line,
    never the command's outcome or exit code."""
    from flagsched.output import visible

    with suppress(OSError, ValueError):  # ENOSPC, EPIPE, EBADF; ValueError: stream closed
        click.echo(visible(line), err=True)


def _usage_line(exc: click.ClickException) -> str:
    """click's message as one line, with where to read more (click's own rendering takes four)."""
    from flagsched.urls import one_line

    message = one_line(exc.format_message())
    ctx = exc.ctx if isinstance(exc, click.UsageError) else None
    return f"{message} (see `{ctx.command_path} --help`)" if ctx is not None else message


def _redacted(text: str) -> str:
    """One line; withheld whole if it quotes the database password."""
    from flagsched.settings import raw_database_url
    from flagsched.urls import one_line, url_secrets

    return one_line(text, url_secrets(raw_database_url()))
