"""Rendering of command results for stdout: aligned tables and JSON (times in ISO 8601 UTC),
one function per kind of row. A table shows any value a row holds, as its JSON form does:
exact numbers as numbers, a short note for what is nested too deeply or cannot be read.
Files a command writes (the metrics textfile, the agenda page) are replaced atomically."""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime, tzinfo
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flagsched.model import row_dict

if TYPE_CHECKING:
    from flagsched.operators import Outlook, Pruned
    from flagsched.projection import State, Step
    from flagsched.rows import (
        ChangeRow,
        FailedRow,
        RecurrenceRow,
        ScheduleRow,
        ShownSchedule,
        StatusReport,
    )
    from flagsched.tick import Preview

# Deeper JSON values (a stored `updates` may nest a thousand levels) are shown as a note:
# no encoder recursion, no page-long line.
MAX_DEPTH = 32


def visible(text: str) -> str:
    """`text` safe for a terminal: every character that is not printable (ESC and other
    control characters, newlines, invisible format characters) shown as Python writes it
    escaped (\\x1b, \\n, \\u200b); printable text is left exactly as it is."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def iso(value: object) -> str | None:
    """ISO 8601 in UTC, or None; a time Python cannot hold as PostgreSQL wrote it."""
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    return None if value is None else str(value)


def depth(value: object) -> int:
    """How deeply `value` nests lists and dicts (iteratively: any depth is safe)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, list | dict):
            deepest = max(deepest, level)
            stack.extend(
                (v, level + 1) for v in (item.values() if isinstance(item, dict) else item)
            )
    return deepest


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return iso(value)
    if isinstance(value, list | dict):
        levels = depth(value)
        return value if levels <= MAX_DEPTH else f"(nested {levels} levels deep: not shown)"
    return value if isinstance(value, str | int | float | bool | type(None)) else str(value)


def _json_default(value: object) -> object:
    """JSON for what json cannot write itself: times as ISO 8601 UTC, exact numbers
    (Decimal) as numbers, anything else as its text."""
    if isinstance(value, datetime):
        return iso(value)
    if isinstance(value, Decimal):
        return _number(value)
    return str(value)


def _number(value: Decimal) -> object:
    """An exact number as JSON writes numbers; one no Python number holds as written (past
    the 4,300 digits of an int, beyond a float's range, or rounding to 0) as its text."""
    if value.is_finite() and value == value.to_integral() and value.adjusted() < 4000:
        return int(value)
    number = float(value)
    if math.isfinite(number) and (number != 0 or value.is_zero()):
        return number
    return str(value)


def compact(value: Any, width: int | None = None) -> str:
    """A stored value as one line for a table cell: JSON (exact numbers as numbers), a note
    for what is nested too deeply or cannot be read; cut to `width` characters if given."""
    plain = _plain(value)
    if isinstance(plain, list | dict):
        text = json.dumps(plain, separators=(",", ":"), default=_json_default)
    else:
        text = "" if plain is None else str(plain)
    if width is not None and len(text) > width:
        return text[: width - 3] + "..."
    return text


def _fields(row: Any) -> dict[str, Any]:
    """A row, typed (a dataclass) or a dict, as a dict in column order."""
    return row if isinstance(row, dict) else row_dict(row)


def to_json(data: Any) -> str:
    """JSON with datetimes (at any depth) as ISO 8601 UTC strings, exact numbers as numbers;
    a row's values nested too deeply are shown as a note."""
    if isinstance(data, list):
        data = [{k: _plain(v) for k, v in _fields(row).items()} for row in data]
    elif isinstance(data, dict):
        data = {k: _plain(v) for k, v in data.items()}
    return json.dumps(data, indent=2, sort_keys=False, default=_json_default)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain aligned text table; the last column is left unpadded. Stored text (flag keys,
    errors) is shown `visible`: a row cannot write to the terminal."""
    cells = [[visible(str(h)) for h in headers]] + [
        [visible(compact(c)) for c in row] for row in rows
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        padded = [c.ljust(w) for c, w in zip(row[:-1], widths[:-1], strict=True)] + [row[-1]]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def shown(value: Any, zone: tzinfo | None = None) -> Any:
    """A time for a table: UTC, or `zone` when --tz was given."""
    from flagsched.times import format_time

    return format_time(value, zone)


def change(updates: Any) -> str:
    """A schedule's `updates` in a table cell: compact JSON, cut at 60 characters."""
    return compact(updates, width=60)


def rows_or_empty(fmt: str, rows: Sequence[Any], empty: str) -> str | None:
    """Rows as JSON, or the line `empty` when there are none; None: print them as a table."""
    if fmt == "json":
        return to_json(rows)
    if not rows:
        return empty
    return None


def dry_run(plan: Sequence[Preview]) -> str:
    """What `process --dry-run` would do, one schedule (or due occurrence of a recurrence,
    no schedule yet: ID `-`) a line."""
    if not plan:
        return "nothing is due"
    return table(
        ["ID", "FLAG", "SCHEDULED_AT", "WOULD"],
        [("-" if p.id is None else p.id, p.flag_key, p.scheduled_at, p.would) for p in plan],
    )


def failed_schedules(rows: Sequence[FailedRow], fmt: str) -> str:
    """`list-failed`: most recently failed first."""
    text = rows_or_empty(fmt, rows, "no failed schedules")
    if text is not None:
        return text
    return table(
        ["ID", "FLAG", "SCHEDULED_AT", "ATTEMPTS", "RETRY", "LAST_ERROR"],
        [
            (
                r.id,
                r.flag_key,
                r.scheduled_at,
                r.retry_count,
                "permanent" if r.permanent else f"retrying at {iso(r.next_retry_at)}",
                r.last_error,
            )
            for r in rows
        ],
    )


_STATES = [
    ("due (incl. retries now due, held back)", "due"),
    ("scheduled for later", "scheduled"),
    ("waiting for a retry", "waiting_retry"),
    ("failed for good", "failed"),
    ("applied", "applied"),
    ("cancelled", "cancelled"),
    ("unknown (a status outside the four)", "unknown"),
    ("awaiting approval (due, counted in due)", "awaiting_approval"),
]


def status_json(report: StatusReport) -> dict[str, Any]:
    """`status --format json`: the backlog, the counts per state between (when counted)."""
    return {
        "due": report.due,
        **(row_dict(report.counts) if report.counts is not None else {}),
        "oldest_due_at": report.oldest_due_at,
        "oldest_due_age_seconds": report.oldest_due_age_seconds,
        "next_due_at": report.next_due_at,
        "now": report.now,
    }


def status(report: StatusReport, fmt: str) -> str:
    """`status`: counts per state, the oldest due schedule's age, the next due time."""
    if fmt == "json":
        return to_json(status_json(report))
    fields = status_json(report)
    age = report.oldest_due_age_seconds
    counts = table(
        ["STATE", "COUNT"], [(label, fields[key]) for label, key in _STATES if key in fields]
    )
    oldest = "-" if age is None else f"{age:.0f}s ago ({iso(report.oldest_due_at)})"
    return "\n".join(
        [counts, f"oldest due: {oldest}", f"next due:   {iso(report.next_due_at) or '-'}"]
    )


def _with_verdicts(row: ScheduleRow) -> dict[str, Any]:
    """A schedule for JSON: its fields, `approvals` as [{verdict, by, at, note}]."""
    return {**row_dict(row), "approvals": [a.shown() for a in row.approvals]}


def _approval_state(row: ScheduleRow) -> str:
    """A table's word on a schedule's approval: the claim's (`row.approved`, and the
    verdicts that count)."""
    approved = [a for a in row.approvals if a.verdict == "approved"]
    rejected = [a for a in row.approvals if a.verdict == "rejected"]
    if row.approved and approved:
        return f"approved by {approved[0].by}"
    if rejected:
        return f"rejected by {rejected[-1].by}"
    if row.awaiting_approval:
        return "awaiting approval"
    return "needs approval" if row.needs_approval else "-"


def schedules(rows: Sequence[ScheduleRow], fmt: str, zone: tzinfo | None = None) -> str:
    """`list`: schedules in (scheduled_at, id) order."""
    text = rows_or_empty(fmt, [_with_verdicts(r) for r in rows], "no schedules")
    if text is not None:
        return text

    def state(row: ScheduleRow) -> str:
        if row.awaiting_approval:
            return "awaiting approval"
        if row.status != "failed":
            return str(row.status)
        if row.permanent:
            return "failed for good"
        return f"retrying at {shown(row.next_retry_at, zone)}"

    return table(
        ["ID", "FLAG", "SCHEDULED_AT", "STATUS", "CHANGE", "GROUP", "EXPIRES_AT", "APPROVAL"],
        [
            (
                r.id,
                r.flag_key,
                shown(r.scheduled_at, zone),
                state(r),
                change(r.updates),
                r.group_id if r.recurrence_id is None else f"r{r.recurrence_id}",
                shown(r.expires_at, zone),
                _approval_state(r),
            )
            for r in rows
        ],
    )


def recurrences(rows: Sequence[RecurrenceRow], fmt: str, zone: tzinfo | None = None) -> str:
    """`recurrences`: active recurrences, next occurrence first."""
    from flagsched.times import format_duration

    shown_rows = [{**row_dict(r), "expires_after": format_duration(r.expires_after)} for r in rows]
    text = rows_or_empty(fmt, shown_rows, "no recurrences")
    if text is not None:
        return text
    return table(
        ["ID", "FLAG", "CRON", "TIMEZONE", "NEXT_AT", "CHANGE", "EXPIRES_AFTER"],
        [
            (
                r.id,
                r.flag_key,
                r.cron,
                r.timezone,
                shown(r.next_at, zone) or "never (stopped)",
                change(r.updates),
                s["expires_after"],
            )
            for r, s in zip(rows, shown_rows, strict=True)
        ],
    )


def flag_values(enabled: object, rollout: object) -> str:
    """A flag's values in a cell: `on 25%`; a value an application's nullable column leaves
    unset (or a flags table without a rollout column) is `unset`: `off, rollout unset`."""
    on_off = "on" if enabled is True else "off" if enabled is False else "enabled unset"
    percent = "rollout unset" if rollout is None else f"{compact(rollout)}%"
    unset = enabled is None or rollout is None
    return f"{on_off}, {percent}" if unset else f"{on_off} {percent}"


def _values(state: Any) -> str:
    if not isinstance(state, dict):
        return "-"
    return flag_values(state.get("enabled"), state.get("rollout_percentage"))


def changes(rows: Sequence[ChangeRow], fmt: str = "table", zone: tzinfo | None = None) -> str:
    """`history`: changes of flags, newest first."""
    text = rows_or_empty(fmt, rows, "no changes recorded")
    if text is not None:
        return text
    return table(
        ["ID", "CHANGED_AT", "FLAG", "ACTOR", "OLD", "NEW", "SCHEDULES"],
        [
            (
                r.id,
                shown(r.changed_at, zone),
                r.flag_key,
                r.actor,
                _values(r.old),
                _values(r.new),
                ",".join(str(i) for i in r.schedule_ids) or "-",
            )
            for r in rows
        ],
    )


def schedule(row: ShownSchedule, fmt: str) -> str:
    """`show ID`: the schedule's fields, every attempt, the changes it made."""
    if fmt == "json":
        return to_json({**_with_verdicts(row), "changes": [row_dict(c) for c in row.changes]})
    fields = table(
        ["FIELD", "VALUE"],
        [(k, v) for k, v in row_dict(row).items() if k not in ("attempts", "changes", "approvals")],
    )
    verdicts = (
        table(
            ["VERDICT", "BY", "AT", "NOTE"],
            [(a.verdict, a.by, iso(a.at), a.note) for a in row.approvals],
        )
        if row.approvals
        else "no approvals"
    )
    attempts = row.attempts
    if not isinstance(attempts, list):  # unreadable (nested too deeply): a note, as in JSON
        tried = f"attempts: {compact(attempts)}"
    elif attempts:
        tried = table(
            ["ATTEMPT", "AT", "OUTCOME", "ERROR"],
            [
                (a.get("attempt"), a.get("at"), a.get("outcome"), a.get("error"))
                if isinstance(a, dict)
                else ("?", None, None, a)
                for a in attempts
            ],
        )
    else:
        tried = "no attempts yet"
    made = changes(row.changes) if row.changes else "no changes made"
    return "\n\n".join([fields, verdicts, tried, made])


def handled(result: Any) -> str:
    """One line per id an operator command acted on: what happened to it."""
    return f"{visible(result.subject or str(result.id))}: {visible(result.message)}"


def pruned(counts: Pruned, *, dry_run: bool, history: bool) -> str:
    """`prune`: what was (or would be) deleted."""
    verb = "would delete" if dry_run else "deleted"
    line = (
        f"{verb} {counts.applied + counts.cancelled} schedules "
        f"({counts.applied} applied, {counts.cancelled} cancelled)"
    )
    if history:
        line += f" and {counts.history} history entries"
    return line


def write_atomically(path: Path, data: bytes) -> None:
    """Replace `path` with `data` in one step (a temporary file in the same directory, then
    a rename): a reader sees the old file or the new one, never half of one. A symlink is
    followed: the file it points to is replaced, the link stays."""
    path = Path(os.path.realpath(path))
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # as an ordinary new file (mkstemp makes 0600)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _state(state: State | None) -> str:
    if state is None:
        return "(no such flag)"
    return flag_values(state.enabled, state.rollout_percentage)


def _source(step: Step) -> str:
    if step.schedule_id is not None:
        return f"schedule {step.schedule_id}"
    return f"recurrence {step.recurrence_id}"


def _outcome(step: Step) -> str:
    return step.outcome.value if step.error is None else f"{step.outcome.value}: {step.error}"


def change_json(step: Step) -> dict[str, Any]:
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


def agenda_json(step: Step) -> dict[str, Any]:
    """One entry of `agenda --format json`: a change of `plan`, with its flag, ramp group and
    where it comes from (`status`)."""
    return {
        "at": step.at,
        "flag_key": step.flag_key,
        **change_json(step),
        "group_id": step.group_id,
        "status": agenda_status(step),
    }


def agenda_status(step: Step) -> str:
    """Where a change comes from, or that it waits for a second person."""
    from flagsched.projection import AWAITING_APPROVAL, Outcome

    if step.outcome is Outcome.HELD and (step.error or "").startswith(AWAITING_APPROVAL):
        return "awaiting_approval"
    return step.kind.value


def _steps(steps: Sequence[Step], zone: tzinfo | None) -> str:
    return table(
        ["AT", "FLAG", "SOURCE", "CHANGE", "STATUS", "GROUP", "OUTCOME"],
        [
            (
                shown(s.at, zone),
                s.flag_key,
                _source(s),
                compact(s.stored, 60),
                agenda_status(s).replace("_", " "),
                "" if s.group_id is None else f"ramp {s.group_id}",
                _outcome(s),
            )
            for s in steps
        ],
    )


def plan(seen: Outlook, fmt: str, zone: tzinfo | None = None) -> str:
    """`plan`: every flag's state now and at the time asked, then the changes between."""
    if fmt == "json":
        return to_json(
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
    if not seen.flags:
        return "no flags"
    lines = [
        f"at {shown(seen.until, zone)} (now {shown(seen.now, zone)})",
        table(
            ["FLAG", "NOW", "AT", "CHANGES"],
            [(f.flag_key, _state(f.now), _state(f.at), len(f.steps)) for f in seen.flags],
        ),
    ]
    steps = [s for f in seen.flags for s in f.steps]
    if steps:
        lines += ["", _steps(sorted(steps, key=lambda s: (s.at, s.flag_key)), zone)]
    return "\n".join(lines)


def agenda(steps: Sequence[Step], fmt: str, zone: tzinfo | None = None) -> str:
    """`agenda`: the changes expected in the window, in time order."""
    if fmt == "json":
        return to_json([agenda_json(s) for s in steps])
    return _steps(steps, zone) if steps else "no changes expected"
