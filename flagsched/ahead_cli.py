"""Seeing ahead on the command line: `plan` (every flag's state at a later time) and `agenda`
(the changes coming in a window, as a table, JSON or a self-contained HTML page). Importing
this module adds both commands to the `cli` group (cli.py imports it at its end)."""

from __future__ import annotations

from datetime import datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any

import click

from flagsched.cli import (
    _FORMAT,
    _TZ_HELP,
    EXIT_OK,
    App,
    _shown,
    _time_option,
    _zone_option,
    cli,
    pass_app,
)

AGENDA_DAYS = 7  # the default window of `agenda`


def _state(state: Any) -> str:
    if state is None:
        return "(no such flag)"
    return f"{'on' if state.enabled else 'off'} {state.rollout_percentage}%"


def _source(step: Any) -> str:
    if step.schedule_id is not None:
        return f"schedule {step.schedule_id}"
    return f"recurrence {step.recurrence_id}"


def _outcome(step: Any) -> str:
    return step.outcome.value if step.error is None else f"{step.outcome.value}: {step.error}"


def change_json(step: Any) -> dict[str, Any]:
    """One change of `plan --format json`."""
    return {
        "at": step.at,
        "scheduled_at": step.scheduled_at,
        "schedule_id": step.schedule_id,
        "recurrence_id": step.recurrence_id,
        "change": step.stored,
        "outcome": step.outcome.value,
        "error": step.error,
    }


def agenda_json(step: Any) -> dict[str, Any]:
    """One entry of `agenda --format json`: a change of `plan`, with its flag, ramp group and
    where it comes from (`status`)."""
    return {
        "at": step.at,
        "flag_key": step.flag_key,
        **change_json(step),
        "group_id": step.group_id,
        "status": step.kind.value,
    }


def _lateness(app: App) -> float | None:
    value: float | None = app.settings.max_lateness
    return value


@click.command()
@click.option("--at", "at_text", required=True, metavar="TIME", help="The time to look at.")
@click.option("--flag", "flag_key", metavar="KEY", help="Only this flag.")
@click.option("--tz", "tz_name", metavar="ZONE", help=_TZ_HELP)
@_FORMAT
@pass_app
def plan(app: App, at_text: str, flag_key: str | None, tz_name: str | None, fmt: str) -> int:
    """Every flag's state now and at TIME if what is scheduled happens, with the changes
    between (open schedules in order, retries at their next attempt, recurrences)."""
    from flagsched import operators, output

    zone = _zone_option(tz_name)
    at = _time_option(at_text, zone, "--at")  # None: now, by the database's clock
    seen = operators.outlook(
        app.database(),
        until=at,
        flag_key=flag_key,
        every_flag=True,
        max_lateness_seconds=_lateness(app),
    )
    if fmt == "json":
        click.echo(
            output.to_json(
                [
                    {
                        "flag_key": f.flag_key,
                        "now": None if f.now is None else f.now.as_json(),
                        "at": None if f.at is None else f.at.as_json(),
                        "changes": [change_json(s) for s in f.steps],
                    }
                    for f in seen.flags
                ]
            )
        )
        return EXIT_OK
    if not seen.flags:
        click.echo("no flags")
        return EXIT_OK
    click.echo(f"at {_shown(seen.until, zone)} (now {_shown(seen.now, zone)})")
    click.echo(
        output.table(
            ["FLAG", "NOW", "AT", "CHANGES"],
            [(f.flag_key, _state(f.now), _state(f.at), len(f.steps)) for f in seen.flags],
        )
    )
    steps = [s for f in seen.flags for s in f.steps]
    if steps:
        click.echo("")
        click.echo(_steps_table(sorted(steps, key=lambda s: (s.at, s.flag_key)), zone))
    return EXIT_OK


def _steps_table(steps: list[Any], zone: tzinfo | None) -> str:
    from flagsched import output

    return output.table(
        ["AT", "FLAG", "SOURCE", "CHANGE", "STATUS", "GROUP", "OUTCOME"],
        [
            (
                _shown(s.at, zone),
                s.flag_key,
                _source(s),
                output.compact(s.stored),
                s.kind.value,
                "" if s.group_id is None else f"ramp {s.group_id}",
                _outcome(s),
            )
            for s in steps
        ],
    )


@click.command()
@click.option("--from", "from_text", metavar="TIME", help="Start of the window [now].")
@click.option(
    "--to", "to_text", metavar="TIME", help=f"End of the window [{AGENDA_DAYS} days after --from]."
)
@click.option("--flag", "flag_key", metavar="KEY", help="Only this flag.")
@click.option("--tz", "tz_name", metavar="ZONE", help=_TZ_HELP)
@_FORMAT
@click.option(
    "--html",
    "html_path",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Also write the agenda as one self-contained HTML page here (atomically).",
)
@pass_app
def agenda(
    app: App,
    from_text: str | None,
    to_text: str | None,
    flag_key: str | None,
    tz_name: str | None,
    fmt: str,
    html_path: Path | None,
) -> int:
    """The changes expected in a window, across flags, in time order: open schedules, retries
    at their next attempt, each occurrence of a recurrence."""
    from flagsched import operators, output, projection

    zone = _zone_option(tz_name)
    start: datetime | None = _time_option(from_text, zone, "--from")
    end: datetime | None = _time_option(to_text, zone, "--to")
    if start is not None and end is not None and end < start:
        raise click.BadParameter("is before --from", param_hint="--to")
    seen = operators.outlook(
        app.database(),
        until=end,
        span=timedelta(days=AGENDA_DAYS),
        start=start,
        flag_key=flag_key,
        with_failed=html_path is not None,
        max_lateness_seconds=_lateness(app),
    )
    steps = projection.agenda(seen.flags, start=seen.start)
    if html_path is not None:
        from flagsched import page

        page.write(html_path, seen, steps, zone=zone)
        click.echo(f"flagsched: wrote {html_path}", err=True)
    if fmt == "json":
        click.echo(output.to_json([agenda_json(s) for s in steps]))
    elif not steps:
        click.echo("no changes expected")
    else:
        click.echo(_steps_table(steps, zone))
    return EXIT_OK


cli.add_command(plan)
cli.add_command(agenda)
