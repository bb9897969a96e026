"""Rendering of command results for stdout: aligned tables and JSON (times in ISO 8601 UTC)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any


def visible(text: str) -> str:
    """`text` safe for a terminal: every character that is not printable (ESC and other
    control characters, newlines, invisible format characters) shown as Python writes it
    escaped (\\x1b, \\n, \\u200b); printable text is left exactly as it is."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def iso(value: datetime | None) -> str | None:
    """ISO 8601 in UTC, or None."""
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z") if value else None


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return iso(value)
    return (
        value if isinstance(value, (str, int, float, bool, list, dict, type(None))) else str(value)
    )


def _json_default(value: Any) -> Any:
    return iso(value) if isinstance(value, datetime) else str(value)


def to_json(data: Any) -> str:
    """JSON with datetimes (at any depth) as ISO 8601 UTC strings."""
    return json.dumps(data, indent=2, sort_keys=False, default=_json_default)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain aligned text table; the last column is left unpadded. Stored text (flag keys,
    errors) is shown `visible`: a row cannot write to the terminal."""
    cells = [[visible(str(h)) for h in headers]] + [
        ["" if c is None else visible(str(_plain(c))) for c in row] for row in rows
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        padded = [c.ljust(w) for c, w in zip(row[:-1], widths[:-1], strict=True)] + [row[-1]]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)
