"""Seeing ahead: `plan` (every flag's state at a later time) and `agenda` (the changes coming
in a window, as a table, JSON or a self-contained HTML page)."""

from __future__ import annotations

from datetime import datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any

import click

from flagsched.cli.app import EXIT_OK, App, pass_app, say
from flagsched.cli.params import FORMAT, NOW, TIME, Now, instant, tz_option

AGENDA_DAYS = 7  # the default window of `agenda`


@click.command()
@click.option("--at", "at", type=TIME, required=True, metavar="TIME", help="The time to look at.")
@click.option("--flag", "flag_key", metavar="KEY", help="Only this flag.")
@tz_option()
@FORMAT
@pass_app
def plan(app: App, at: datetime | Now, flag_key: str | None, zone: tzinfo | None, fmt: str) -> int:
    """Every flag's state now and at TIME if what is scheduled happens, with the changes
    between (open schedules in order, retries at their next attempt, recurrences)."""
    from flagsched import operators, render

    seen = operators.outlook(
        app.database(),
        until=instant(at),  # None: now, by the database's clock
        flag_key=flag_key,
        every_flag=True,
        max_lateness_seconds=app.settings.max_lateness,
        policy=app.configuration.approval,
    )
    _say_cut(seen)
    click.echo(render.plan(seen, fmt, zone))
    return EXIT_OK


@click.command()
@click.option("--from", "start", type=TIME, metavar="TIME", help="Start of the window [now].")
@click.option(
    "--to",
    "end",
    type=TIME,
    metavar="TIME",
    help=f"End of the window [{AGENDA_DAYS} days after --from].",
)
@click.option("--flag", "flag_key", metavar="KEY", help="Only this flag.")
@tz_option()
@FORMAT
@click.option(
    "--html",
    "html_path",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Also write the agenda as one self-contained HTML page here (atomically).",
)
@pass_app
def agenda(
    app: App,
    start: datetime | Now | None,
    end: datetime | Now | None,
    flag_key: str | None,
    zone: tzinfo | None,
    fmt: str,
    html_path: Path | None,
) -> int:
    """The changes expected in a window, across flags, in time order: open schedules, retries
    at their next attempt, each occurrence of a recurrence."""
    from flagsched import operators, projection, render

    first, last = instant(start), instant(end)
    if first is not None and last is not None and last < first:
        raise click.BadParameter("is before --from", param_hint="--to")
    seen = operators.outlook(
        app.database(),
        until=last,
        # `--to now`: the database's now (an empty window from now), not the default span
        until_now=end is NOW,
        span=timedelta(days=AGENDA_DAYS),
        start=first,
        flag_key=flag_key,
        with_failed=html_path is not None,
        max_lateness_seconds=app.settings.max_lateness,
        policy=app.configuration.approval,
    )
    _say_cut(seen)
    steps = projection.agenda(seen.flags, start=seen.start)
    if html_path is not None:
        from flagsched import page

        try:
            page.write(html_path, seen, steps, zone=zone)
        except OSError as exc:  # a missing or unwritable directory, a full disk: the old
            # page stays as it was (the temporary file is removed)
            raise click.BadParameter(
                f"cannot write {html_path}: {exc.strerror or exc}", param_hint="--html"
            ) from None
        click.echo(f"flagsched: wrote {html_path}", err=True)
    click.echo(render.agenda(steps, fmt, zone))
    return EXIT_OK


def _say_cut(seen: Any) -> None:
    """Past the read limit the projection is incomplete after the last schedule read: say so
    (stdout keeps its format; exit 0)."""
    from flagsched.render import iso

    if seen.cut is not None:
        count, last = seen.cut
        say(
            f"flagsched: warning: only the first {count:,} open schedules due by the horizon "
            f"were read (up to {iso(last)}); changes of schedules due after that are left out"
        )
