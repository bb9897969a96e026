"""What the command line accepts: bounds, and parsing of TIME, DURATION, zones, steps, ids."""

from __future__ import annotations

import itertools
import math
from typing import Any

import click

from flagsched.settings import PG_INT_MAX

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
# --limit of list, list-failed and history: one bound, the README's (what LIMIT accepts).
LIMIT = COUNT

FORMAT = click.option(
    "--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True
)
TZ_HELP = "IANA time zone for TIME values without an offset, and for the table [UTC]."
ON_CONFLICT = click.option(
    "--on-conflict",
    type=click.Choice(["fail", "apply"]),
    default="fail",
    show_default=True,
    help="When someone else changed the flag since: fail it, or apply anyway.",
)
EXPIRES = click.option(
    "--expires-after",
    metavar="DURATION",
    help="Fail for good instead of applying when this late (90s, 30m, 2h, 1d).",
)


def zone_option(name: str | None) -> Any:
    """--tz ZONE as a tzinfo (None: not given)."""
    from flagsched.times import InvalidTime, parse_zone

    if name is None:
        return None
    try:
        return parse_zone(name)
    except InvalidTime as exc:
        raise click.BadParameter(str(exc), param_hint="--tz") from None


def time_option(text: str | None, zone: Any, hint: str) -> Any:
    """A TIME option: a datetime, None for `now` (the database's clock)."""
    from flagsched.times import InvalidTime, parse_time

    if text is None:
        return None
    try:
        return parse_time(text, zone)
    except InvalidTime as exc:
        raise click.BadParameter(str(exc), param_hint=hint) from None


def duration_option(text: str | None, hint: str) -> Any:
    from flagsched.times import InvalidTime, parse_duration

    if text is None:
        return None
    try:
        return parse_duration(text)
    except InvalidTime as exc:
        raise click.BadParameter(str(exc), param_hint=hint) from None


def check_reach(at: Any, span: Any, hint: str) -> None:
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


def parse_steps(text: str) -> list[int]:
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


def flag_key(value: str) -> str:
    if not value.strip():
        raise click.BadParameter("a flag key cannot be empty or only spaces", param_hint="FLAG_KEY")
    return value
