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


def _visible(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    """On a terminal, stored text (a flag key with ESC in it) is shown escaped, never obeyed
    (JSON escapes control characters itself)."""
    from flagsched.render import visible  # console only: a cron run (JSON) never needs it

    for key, value in event.items():
        if isinstance(value, str):
            event[key] = visible(value)
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
    held and written in one write at its end (a batch's lines: one write, not a hundred).
    Logging never decides what a command does: a stream that is full, closed or missing
    (stderr closed: None) loses the lines, and nothing else happens."""

    def __init__(self, stream: TextIO | None) -> None:
        self.stream = stream
        self.held: list[str] | None = None

    def msg(self, message: str) -> None:
        if self.held is not None:
            self.held.append(message)
        else:
            self._write(message + "\n")

    debug = info = warning = error = critical = exception = log = msg

    def write_held(self) -> None:
        lines, self.held = self.held, None
        if lines:
            self._write("\n".join(lines) + "\n")

    def _write(self, text: str) -> None:
        if self.stream is None:
            return
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # ENOSPC (2>/dev/full), EPIPE, EBADF; closed: ValueError
            self.stream = None  # what is lost is lost; later lines would fail the same way


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
    stream = stream or sys.stderr  # None when the process was started with stderr closed
    _output = _Output(stream)
    tty = _isatty(stream)
    if fmt == "auto":
        fmt = "console" if tty else "json"
    processors: list[Processor] = [_stamp]
    if fmt == "console":
        processors += [_isoformat, _visible, structlog.dev.ConsoleRenderer(colors=tty)]
    else:  # a traceback (debug only) as one field of the one line
        processors += [
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=_dumps),
        ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=lambda *_: _output,
        cache_logger_on_first_use=False,
    )


def reset() -> None:
    """Forget this invocation's configuration (for running several in one process)."""
    global _output
    _output = None
    structlog.reset_defaults()


def debug_exception(event: str, exc: BaseException) -> None:
    """At debug level, log `exc` with its traceback; nothing before logging is configured
    (structlog's default would print to stdout, which is for data)."""
    if _output is not None:
        get_logger().debug(event, exc_info=exc)


def _isatty(stream: TextIO | None) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (OSError, ValueError):
        return False


def get_logger(**context: Any) -> structlog.typing.FilteringBoundLogger:
    """A logger bound to `context`."""
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger().bind(**context)
    return logger
