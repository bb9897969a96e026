"""What the command line accepts: bounds, and click.ParamTypes for TIME (reads --tz),
DURATION, zones, steps, flag keys and ids; a bad value is exit 2 naming the option."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from datetime import datetime, timedelta, tzinfo
from typing import Any, NoReturn

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
            _fail(f"{value!r} is not a finite number.", param, ctx)
        return super().convert(number, param, ctx)


class Integer(click.IntRange):
    """An IntRange whose refusal of a non-number says "not a valid integer" (click's says
    "integer range", which reads as if a range were asked for)."""

    name = "integer"


COUNT = Integer(1, PG_INT_MAX)  # limits and counts: what PostgreSQL's integers hold
GROUP_ID = Integer(1, BIGINT_MAX)  # a ramp's group and a recurrence: flagsched's


class ScheduleIdType(click.ParamType):  # type: ignore[type-arg]
    """A schedule's id as its table has it: a positive bigint on flagsched's own schedules
    table; on an application's (`[schedules]`) any non-empty text, passed to the database as
    text, which reads it as the id's type (uuid, text, an integer): an id of the wrong form
    for that type is an id no schedule has."""

    name = "id"

    def convert(self, value: object, param: Param, ctx: Ctx) -> int | str:
        from flagsched import sql

        if isinstance(value, int) or sql.current().app_schedules is None:
            number: int = GROUP_ID.convert(value, param, ctx)  # type: ignore[arg-type]
            return number
        text = str(value)
        if not text or "\x00" in text or len(text) > 1000:
            _fail(f"{text[:40]!r} is not a schedule id", param, ctx)
        return text


SCHEDULE_ID = ScheduleIdType()
# --limit of list, list-failed and history: one bound, the README's (what LIMIT accepts).
LIMIT = COUNT

Param = click.Parameter | None
Ctx = click.Context | None


def _fail(message: str, param: Param, ctx: Ctx) -> NoReturn:
    """A bad value, exit 2, named as operators have always read it: `--at`, `FLAG_KEY`."""
    hint = None
    if isinstance(param, click.Option):
        hint = param.opts[0]
    elif param is not None:
        hint = param.human_readable_name
    raise click.BadParameter(message, ctx=ctx, param=param, param_hint=hint)


class Now:
    """TIME `now`: the database's clock decides when, never the host's."""

    def __repr__(self) -> str:
        return "now"


NOW = Now()


class Zone(click.ParamType[tzinfo, Any]):
    """--tz ZONE: an IANA name, as a tzinfo."""

    name = "zone"

    def convert(self, value: Any, param: Param, ctx: Ctx) -> tzinfo:
        from flagsched.times import InvalidTime, parse_zone

        if isinstance(value, tzinfo):
            return value
        try:
            return parse_zone(value)
        except InvalidTime as exc:
            _fail(str(exc), param, ctx)


class Time(click.ParamType[datetime | Now, Any]):
    """TIME: ISO 8601 with an offset, `now` (NOW), or a local time in the command's --tz
    (declared eager, so it is read first whatever the order on the command line)."""

    name = "time"

    def convert(self, value: Any, param: Param, ctx: Ctx) -> datetime | Now:
        from flagsched.times import InvalidTime, parse_time

        if isinstance(value, datetime | Now):
            return value
        given = ctx.params.get("zone") if ctx is not None else None
        zone = given if isinstance(given, tzinfo) else None  # click marks "not given" its way
        try:
            at = parse_time(value, zone)
        except InvalidTime as exc:
            _fail(str(exc), param, ctx)
        return NOW if at is None else at


class Duration(click.ParamType[timedelta, Any]):
    """DURATION: 90s, 30m, 2h, 1d (and combinations), as a timedelta."""

    name = "duration"

    def convert(self, value: Any, param: Param, ctx: Ctx) -> timedelta:
        from flagsched.times import InvalidTime, parse_duration

        if isinstance(value, timedelta):
            return value
        try:
            return parse_duration(value)
        except InvalidTime as exc:
            _fail(str(exc), param, ctx)


class Steps(click.ParamType[list[int], Any]):
    """--steps: integers 0..100, strictly rising (see docs/operations.md, Authoring)."""

    name = "steps"

    def convert(self, value: Any, param: Param, ctx: Ctx) -> list[int]:
        if isinstance(value, list):
            return [int(n) for n in value]
        try:
            steps = [int(part) for part in value.split(",")]
        except ValueError:
            _fail(f"{value!r} is not a list of integers (e.g. 10,25,50,100)", param, ctx)
        if any(not 0 <= n <= 100 for n in steps):
            _fail("every step must be 0..100", param, ctx)
        if any(b <= a for a, b in itertools.pairwise(steps)):
            _fail(
                "steps must rise (10,25,50,100); to go down, schedule the change itself",
                param,
                ctx,
            )
        return steps


class FlagKey(click.ParamType[str, Any]):
    """FLAG_KEY: any text but empty or only spaces."""

    name = "flag_key"

    def convert(self, value: Any, param: Param, ctx: Ctx) -> str:
        text = str(value)
        if not text.strip():
            _fail("a flag key cannot be empty or only spaces", param, ctx)
        return text


ZONE, TIME, DURATION, STEPS, FLAG_KEY = Zone(), Time(), Duration(), Steps(), FlagKey()


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
    type=DURATION,
    metavar="DURATION",
    help="Fail for good instead of applying when this late (90s, 30m, 2h, 1d).",
)


def tz_option(help: str = TZ_HELP) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """--tz ZONE, read before any TIME option of the command (eager)."""
    return click.option("--tz", "zone", type=ZONE, is_eager=True, metavar="ZONE", help=help)


def instant(value: datetime | Now | None) -> datetime | None:
    """A TIME for a use case: None means now, the database's clock."""
    return None if value is None or value is NOW else value  # type: ignore[return-value]


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
