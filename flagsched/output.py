"""Rendering of command results: aligned tables and JSON for stdout (times in ISO 8601 UTC),
and files written atomically (the metrics textfile, the agenda page)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

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
        return int(value) if value == value.to_integral() else float(value)
    return str(value)


def to_json(data: Any) -> str:
    """JSON with datetimes (at any depth) as ISO 8601 UTC strings, exact numbers as numbers;
    a row's values nested too deeply are shown as a note."""
    if isinstance(data, list):
        data = [{k: _plain(v) for k, v in row.items()} for row in data]
    elif isinstance(data, dict):
        data = {k: _plain(v) for k, v in data.items()}
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


def compact(value: object, limit: int = 60) -> str:
    """A stored value (such as `updates`) on one short line: JSON with exact numbers, a note
    for what nests too deeply; never longer than `limit`."""
    plain = _plain(value)
    text = (
        json.dumps(plain, separators=(",", ":"), default=_json_default)
        if isinstance(plain, list | dict)
        else str(plain)
    )
    return text if len(text) <= limit else text[: limit - 3] + "..."


def write_atomically(path: Path, data: bytes) -> None:
    """Replace `path` with `data` in one step (a temporary file in the same directory, then
    a rename): a reader sees the old file or the new one, never half of one."""
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
