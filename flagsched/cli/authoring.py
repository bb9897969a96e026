"""Authoring: `schedule` (one change, or with --cron a recurrence) and `ramp`."""

from __future__ import annotations

from datetime import datetime, timedelta, tzinfo
from typing import Any

import click

from flagsched.cli.app import EXIT_OK, App, pass_app, say
from flagsched.cli.params import (
    DURATION,
    EXPIRES,
    FLAG_KEY,
    ON_CONFLICT,
    STEPS,
    TIME,
    Integer,
    Now,
    check_reach,
    instant,
    tz_option,
)

APPROVAL = click.option(
    "--approval",
    "needs_approval",
    is_flag=True,
    help="A second person must approve it (`flagsched approve`) before it applies.",
)


def _no_rollout_column(option: str) -> None:
    """A flags table without a rollout column (your own, issue 18) takes no rollout change:
    refused when written (exit 2), as the tick would fail it for good."""
    from flagsched.repository import flags_have

    if not flags_have("rollout"):
        raise click.UsageError(
            f"{option}: the flags table has no rollout column (no `rollout` in [flags] of the "
            "configuration): only --enable / --disable can be scheduled"
        )


def _updates(enabled: bool | None, rollout: int | None) -> Any:
    from flagsched.model import InvalidUpdates, Updates

    if rollout is not None:
        _no_rollout_column("--rollout")
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
    say(
        f"flagsched: warning: flag {flag_key!r} does not exist yet; {what} "
        "for good if it still does not when it is due"
    )


@click.command()
@click.argument("flag_key", type=FLAG_KEY)
@click.option(
    "--at",
    type=TIME,
    metavar="TIME",
    help="ISO 8601 with an offset (2026-12-01T09:00:00+01:00), a local time with --tz, or now.",
)
@click.option(
    "--cron",
    "cron_text",
    metavar="EXPR",
    help="Instead of --at: recur on this 5-field cron expression, in --tz.",
)
@tz_option()
@click.option("--enable", is_flag=True, help="Turn the flag on.")
@click.option("--disable", is_flag=True, help="Turn the flag off.")
@click.option(
    "--rollout", type=Integer(0, 100), metavar="N", help="Set rollout_percentage (0..100)."
)
@click.option("--max-retries", type=Integer(0, 10), help="Retries after a failure [3].")
@EXPIRES
@ON_CONFLICT
@APPROVAL
@pass_app
def schedule(
    app: App,
    flag_key: str,
    at: datetime | Now | None,
    cron_text: str | None,
    zone: tzinfo | None,
    enable: bool,
    disable: bool,
    rollout: int | None,
    max_retries: int | None,
    expires_after: timedelta | None,
    on_conflict: str,
    needs_approval: bool,
) -> int:
    """Add a pending schedule (prints its id), or with --cron a recurrence (prints its id)."""
    from flagsched import operators
    from flagsched.model import OnConflict

    if (at is None) == (cron_text is None):
        raise click.UsageError("give exactly one of --at TIME and --cron EXPR")
    if enable and disable:
        raise click.UsageError("--enable and --disable exclude each other")
    enabled = True if enable else False if disable else None
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
        recurrence = operators.add_recurrence(
            app.database(),
            flag_key=flag_key,
            cron=cron,
            zone="UTC" if zone is None else zone_name(zone),
            updates=updates,
            expires_after=expires_after,
            on_conflict=OnConflict(on_conflict),
            needs_approval=needs_approval,
        )
        if not recurrence.flag_exists:
            _warn_missing_flag(flag_key, "each schedule it makes fails")
        click.echo(recurrence.id)
        return EXIT_OK
    check_reach(instant(at), expires_after, "--expires-after")
    updates = _updates(enabled, rollout)
    added = operators.add_schedule(
        app.database(),
        flag_key=flag_key,
        at=instant(at),
        updates=updates,
        max_retries=max_retries,
        expires_after=expires_after,
        on_conflict=OnConflict(on_conflict),
        needs_approval=needs_approval,
    )
    if not added.flag_exists:
        _warn_missing_flag(flag_key)
    click.echo(added.id)
    return EXIT_OK


@click.command()
@click.argument("flag_key", type=FLAG_KEY)
@click.option(
    "--steps",
    type=STEPS,
    required=True,
    metavar="N,N,...",
    help="Rollout steps, rising: 10,25,50,100.",
)
@click.option(
    "--every",
    type=DURATION,
    required=True,
    metavar="DURATION",
    help="Time between steps (30m, 1d).",
)
@click.option("--start", type=TIME, metavar="TIME", help="When the first step is due [now].")
@tz_option()
@click.option("--enable", is_flag=True, help="Each step also sets enabled true.")
@EXPIRES
@ON_CONFLICT
@APPROVAL
@pass_app
def ramp(
    app: App,
    flag_key: str,
    steps: list[int],
    every: timedelta,
    start: datetime | Now | None,
    zone: tzinfo | None,
    enable: bool,
    expires_after: timedelta | None,
    on_conflict: str,
    needs_approval: bool,
) -> int:
    """Add a rollout ramp: one schedule per step, one group; prints the ids in order."""
    from flagsched import operators
    from flagsched.model import OnConflict, Updates

    _no_rollout_column("--steps")
    last_step = every * (len(steps) - 1)
    reach = last_step if expires_after is None else last_step + expires_after
    check_reach(instant(start), reach, "--every")
    added = operators.add_ramp(
        app.database(),
        flag_key=flag_key,
        steps=[Updates(enabled=True if enable else None, rollout_percentage=n) for n in steps],
        start=instant(start),
        every=every,
        expires_after=expires_after,
        on_conflict=OnConflict(on_conflict),
        needs_approval=needs_approval,
    )
    if not added.flag_exists:
        _warn_missing_flag(flag_key, "each step fails")
    for step in added.steps:
        click.echo(step.id)
    group_id = added.group_id
    if needs_approval:
        click.echo(
            f"flagsched: approve it with `flagsched approve --group {group_id}` (another login)",
            err=True,
        )
    click.echo(
        f"flagsched: ramp group {group_id}; stop it with `flagsched cancel --group {group_id}`",
        err=True,
    )
    return EXIT_OK
