"""`process`: one tick, with its options, signals, cron-monitor ping and metrics."""

from __future__ import annotations

import functools
import random
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import click

from flagsched import logs
from flagsched.cli.app import EXIT_COULD_NOT_RUN, EXIT_FAILED, EXIT_OK, App, pass_app, redacted
from flagsched.cli.params import COUNT, Integer
from flagsched.errors import FlagschedError


@contextmanager
def signals_stop(stop: Any) -> Iterator[None]:
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
    if value is None:
        return None
    from flagsched.ping import check_url  # urllib.request: only when there is a ping

    try:
        return check_url(value)
    except ValueError as exc:  # the message never quotes the URL: it may hold a token
        raise click.BadParameter(str(exc), param_hint="--ping-url") from None


@click.command()
@click.option("--batch-size", type=Integer(1, 1000), help="Schedules per batch [100].")
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
    from flagsched import tick
    from flagsched.model import Outcome

    settings = app.settings
    options = tick.TickOptions(
        batch_size=batch_size or settings.batch_size,
        max_batches=max_batches,
        retry_max_delay=settings.retry_max_delay,
        max_retries_override=settings.max_retries_override,
        max_lateness=settings.max_lateness,
        approval=app.configuration.approval,
    )
    database = app.database()
    if dry_run:
        from flagsched import render

        click.echo(render.dry_run(tick.preview(database, options)))
        return EXIT_OK
    stop = tick.StopFlag()
    report = None
    try:
        with signals_stop(stop):
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
        logs.get_logger().warning("metrics_publish_failed", **where, error=redacted(error))
