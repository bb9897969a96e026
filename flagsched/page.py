"""The agenda as one self-contained HTML page (`agenda --html PATH`): per flag a timeline over
the window, drawn as inline SVG from a jinja2 template with autoescaping (every stored value is
text, never markup), with a table of the same changes beside it. Nothing on the page loads
anything: no script, style sheet, font or image from elsewhere. Geometry is computed here;
the template only writes it out."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any

from flagsched.projection import FlagAhead, Kind, Outcome, State, Step
from flagsched.render import agenda_status, compact, iso, write_atomically
from flagsched.times import format_time, zone_name

WIDTH = 1000  # the SVG's user units across the window
LANE = 64  # height of one flag's drawing (rollout 0..100 %)
TOP = 6
# Tick spacing candidates; the first that gives at most this many ticks is used.
MAX_TICKS = 8
_STEPS = [timedelta(hours=h) for h in (1, 2, 3, 6, 12)] + [
    timedelta(days=d) for d in (1, 2, 7, 14, 30, 91, 365)
]


@dataclass(frozen=True, slots=True)
class Span:
    x: float
    width: float
    title: str


@dataclass(frozen=True, slots=True)
class Marker:
    x: float
    y: float
    css: str  # applies / expires / fails / held, plus retrying / recurring
    title: str
    data: dict[str, str]


@dataclass(frozen=True, slots=True)
class Row:
    when: str
    source: str
    change: str
    status: str
    outcome: str


@dataclass(frozen=True, slots=True)
class Lane:
    flag_key: str
    summary: str
    rollout: str  # SVG path of the rollout step line
    enabled: list[Span]
    windows: list[Span]  # recurring windows: from an occurrence to the flag's next change
    markers: list[Marker]
    failed: list[Marker]
    rows: list[Row]


class _Scale:
    def __init__(self, start: datetime, end: datetime) -> None:
        self.start = start
        self.seconds = max((end - start).total_seconds(), 1.0)

    def x(self, at: datetime) -> float:
        offset = (at - self.start).total_seconds() / self.seconds
        return round(min(max(offset, 0.0), 1.0) * WIDTH, 2)


def _y(percentage: int | None) -> float:
    # an unset rollout (a nullable column, or none) is drawn on the 0 line
    return round(TOP + LANE * (1 - (percentage or 0) / 100), 2)


def _when(at: datetime, zone: tzinfo | None) -> str:
    """A time on the page: to the second, in the chosen zone with its offset."""
    try:
        return at.astimezone(zone or UTC).isoformat(timespec="seconds")
    except OverflowError:  # near year 1 or 9999 the zone's offset does not fit
        return format_time(at) or ""


def _state(state: State | None) -> str:
    if state is None:
        return "no such flag"
    on_off = {True: "enabled", False: "disabled", None: "enabled unset"}[state.enabled]
    percent = "unset" if state.rollout_percentage is None else f"{state.rollout_percentage} %"
    return f"{on_off}, rollout {percent}"


def _source(step: Step) -> str:
    if step.schedule_id is not None:
        ramp = "" if step.group_id is None else f" (ramp {step.group_id})"
        return f"schedule {step.schedule_id}{ramp}"
    return f"recurrence {step.recurrence_id}"


def _outcome(step: Step) -> str:
    return step.outcome.value if step.error is None else f"{step.outcome.value}: {step.error}"


def _window(step: Step, until: datetime, steps: Sequence[Step]) -> bool:
    """Whether what a recurrence's occurrence set, in force until `until`, is a window: it
    lasts at most half the time to the recurrence's next occurrence (a nightly 22:00 to
    23:00 window, not the 23 hours between its end and the next one)."""
    if step.kind is not Kind.RECURRING:
        return False
    same = [
        s.at
        for s in steps
        if s.recurrence_id == step.recurrence_id and s.kind is Kind.RECURRING and s.at != step.at
    ]
    later = [at for at in same if at > step.at]
    earlier = [at for at in same if at < step.at]
    if later:
        period = later[0] - step.at
    elif earlier:  # the last occurrence in the window: the period before it
        period = step.at - earlier[-1]
    else:
        return False
    return until - step.at <= period / 2


def _lane(
    flag: FlagAhead,
    steps: Sequence[Step],
    failed: Sequence[Any],
    scale: _Scale,
    start: datetime,
    end: datetime,
    zone: tzinfo | None,
) -> Lane:
    # The flag's state through the window: what it is at `start`, then each applied change.
    state = flag.now
    timeline: list[tuple[datetime, State | None, Step | None]] = []
    for step in flag.steps:
        if step.outcome is not Outcome.APPLIES:
            continue
        if step.at <= start:
            state = step.after
        else:
            timeline.append((step.at, step.after, step))
    points: list[tuple[datetime, State | None, Step | None]] = [
        (start, state, None),
        *timeline,
        (end, None, None),
    ]
    rollout: list[str] = []
    enabled: list[Span] = []
    windows: list[Span] = []
    for (at, value, cause), (following, _, _) in itertools.pairwise(points):
        if value is None:
            continue
        x0, x1 = scale.x(at), scale.x(following)
        y = _y(value.rollout_percentage)
        rollout.append(f"{'M' if not rollout else 'L'}{x0},{y} L{x1},{y}")
        when = f"{_when(at, zone)} to {_when(following, zone)}"
        if value.enabled:
            enabled.append(Span(x0, round(x1 - x0, 2), f"enabled from {when}"))
        if cause is not None and _window(cause, following, flag.steps):
            windows.append(
                Span(x0, round(x1 - x0, 2), f"recurrence {cause.recurrence_id} in force {when}")
            )
    markers = []
    rows = []
    for step in steps:
        shown = _when(step.at, zone)
        change = compact(step.stored, 60)
        status = agenda_status(step)  # where it comes from, or awaiting_approval
        title = f"{_source(step)}: {change} at {shown} ({status}, {_outcome(step)})"
        y = _y(step.after.rollout_percentage) if step.after is not None else TOP + LANE
        markers.append(
            Marker(
                x=scale.x(step.at),
                y=y,
                css=f"{step.outcome.value} {step.kind.value}",
                title=title,
                data={
                    "flag-key": step.flag_key,
                    "at": iso(step.at) or "",
                    "schedule-id": "" if step.schedule_id is None else str(step.schedule_id),
                    "recurrence-id": (
                        "" if step.recurrence_id is None else str(step.recurrence_id)
                    ),
                    "group-id": "" if step.group_id is None else str(step.group_id),
                    "status": status,
                    "outcome": step.outcome.value,
                },
            )
        )
        rows.append(Row(shown, _source(step), change, status, _outcome(step)))
    failed_markers = [
        Marker(
            x=scale.x(row.scheduled_at),
            y=TOP + LANE,
            css="failed",
            title=(
                f"schedule {row.id}: {compact(row.updates, 60)} due "
                f"{_when(row.scheduled_at, zone)} failed for good: "
                f"{compact(row.last_error or '', 200)}"
            ),
            data={"flag-key": row.flag_key, "schedule-id": str(row.id), "status": "failed"},
        )
        for row in failed
    ]
    return Lane(
        flag_key=flag.flag_key,
        summary=f"now {_state(flag.now)}; at the end of the window {_state(flag.at)}",
        rollout=" ".join(rollout),
        enabled=enabled,
        windows=windows,
        markers=markers,
        failed=failed_markers,
        rows=rows,
    )


def _ticks(start: datetime, end: datetime, zone: tzinfo, scale: _Scale) -> list[tuple[float, str]]:
    """Axis ticks on whole hours or local midnights of the zone, labelled in it."""
    span = end - start
    step = next((s for s in _STEPS if span / s <= MAX_TICKS), _STEPS[-1])
    local = start.astimezone(zone)
    if step < timedelta(days=1):
        hours = int(step.total_seconds() // 3600)
        first = local.replace(minute=0, second=0, microsecond=0, hour=local.hour // hours * hours)
        label = "%a %H:%M"
    else:
        first = local.replace(hour=0, minute=0, second=0, microsecond=0)
        label = "%a %d %b" if step < timedelta(days=30) else "%d %b %Y"
    ticks: list[tuple[float, str]] = []
    at = first
    while len(ticks) < 4 * MAX_TICKS:
        try:
            moment = at.astimezone(UTC)
        except OverflowError:
            break
        if moment > end:
            break
        if moment >= start:
            ticks.append((scale.x(moment), at.strftime(label)))
        try:  # on the wall clock, so days stay days across a DST change
            at = (at.replace(tzinfo=None) + step).replace(tzinfo=zone)
        except OverflowError:
            break
    return ticks


def render(outlook: Any, steps: Sequence[Step], *, zone: tzinfo | None, generated: str = "") -> str:
    """The page for `agenda`'s projection (`outlook`, operators.Outlook) and its `steps`."""
    import jinja2

    shown = zone or UTC
    start, end = outlook.start, outlook.until
    scale = _Scale(start, end)
    by_flag: dict[str, list[Step]] = {}
    for step in steps:
        by_flag.setdefault(step.flag_key, []).append(step)
    failed: dict[str, list[Any]] = {}
    for row in outlook.failed:
        failed.setdefault(row.flag_key, []).append(row)
    keys = sorted({*by_flag, *failed, *(f.flag_key for f in outlook.flags if f.steps)})
    flags = {f.flag_key: f for f in outlook.flags}
    lanes = [
        _lane(
            flags.get(key) or FlagAhead(key, None, None, ()),
            by_flag.get(key, []),
            failed.get(key, []),
            scale,
            start,
            end,
            zone,
        )
        for key in keys
    ]
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("flagsched", "templates"),
        autoescape=True,  # every value is text: a flag key `<script>` shows as such
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    now_x = scale.x(outlook.now) if start <= outlook.now <= end else None
    return environment.get_template("agenda.html.j2").render(
        lanes=lanes,
        ticks=_ticks(start, end, shown, scale),
        width=WIDTH,
        height=LANE + 2 * TOP,
        band=LANE,
        top=TOP,
        now_x=now_x,
        now=_when(outlook.now, zone),
        start=_when(start, zone),
        end=_when(end, zone),
        zone=zone_name(shown),
        count=len(steps),
        generated=generated,
    )


def write(path: Path, outlook: Any, steps: Sequence[Step], *, zone: tzinfo | None) -> None:
    """Render the page and replace `path` with it atomically (cron may publish it any minute)."""
    write_atomically(path, render(outlook, steps, zone=zone).encode())
