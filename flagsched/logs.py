"""The one structlog configuration: stderr, JSON off a terminal, console on one."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def _isoformat(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    for key, value in event.items():
        if isinstance(value, datetime):
            event[key] = value.isoformat()
    return event


def _json_default(value: object) -> str:
    """JSON for what json cannot write itself: times as ISO 8601, anything else as repr."""
    return value.isoformat() if isinstance(value, datetime) else repr(value)


def _dumps(event: Any, **_: Any) -> str:
    return orjson.dumps(event, default=_json_default).decode()


def _stamp(_: WrappedLogger, method: str, event: EventDict) -> EventDict:
    """Level and UTC time in one step (a tick writes a line per schedule: it adds up)."""
    event["level"] = method
    event["timestamp"] = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    return event


class _Output:
    """Where rendered lines go: each written and flushed at once, or, inside `together()`,
    held and written in one write at its end (a batch's lines: one write, not a hundred)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.held: list[str] | None = None

    def msg(self, message: str) -> None:
        if self.held is not None:
            self.held.append(message)
        else:
            self.stream.write(message + "\n")
            self.stream.flush()

    debug = info = warning = error = critical = exception = log = msg

    def write_held(self) -> None:
        lines, self.held = self.held, None
        if lines:
            self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()


_output: _Output | None = None


@contextmanager
def together() -> Iterator[None]:
    """Lines logged inside are written together when it ends (also when it raises)."""
    output = _output
    if output is None or output.held is not None:
        yield
        return
    output.held = []
    try:
        yield
    finally:
        output.write_held()


def configure(
    fmt: str = "auto",
    level: str = "info",
    stream: TextIO | None = None,
) -> None:
    """Configure structlog once for this invocation. No field is masked: messages name a
    database by host, port and name, never by its URL (flagsched.urls)."""
    global _output
    stream = stream or sys.stderr
    _output = _Output(stream)
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    processors: list[Processor] = [_stamp]
    if fmt == "console":
        processors += [_isoformat, structlog.dev.ConsoleRenderer(colors=stream.isatty())]
    else:
        processors += [structlog.processors.JSONRenderer(serializer=_dumps)]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=lambda *_: _output,
        cache_logger_on_first_use=False,
    )


def get_logger(**context: Any) -> structlog.typing.FilteringBoundLogger:
    """A logger bound to `context`."""
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger().bind(**context)
    return logger
