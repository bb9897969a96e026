"""What every command shares: the invocation's wiring (settings and logging configured
once, on first use), the exit codes, and the one way to tell the operator a line."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import suppress
from typing import TYPE_CHECKING, Concatenate, ParamSpec, TypeVar

import click

from flagsched import logs
from flagsched.db import Database
from flagsched.settings import Settings, load_settings

if TYPE_CHECKING:
    from flagsched.tables import Configuration

# Exit codes (SPEC): 0 ok, 1 something failed / refused / behind, 2 usage or configuration,
# 3 could not run. A tick stopped by SIGTERM or SIGINT exits 128 + signal (143, 130).
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_COULD_NOT_RUN = 0, 1, 2, 3


class App:
    """Per-invocation wiring: the configuration file read once, by the group; settings and
    logging configured once, on first use."""

    def __init__(self) -> None:
        self._settings: Settings | None = None
        self._configuration: Configuration | None = None

    def load_configuration(self, path: str | None) -> None:
        """Read the configuration: `--config PATH`, else FLAGSCHED_CONFIG, else none (the
        built-in tables). A bad file is a ConfigError (exit 2)."""
        from flagsched.settings import config_path

        path = path or config_path()
        if path:
            from flagsched import tables

            self._configuration = tables.load(path)

    @property
    def configured(self) -> bool:
        """Whether a configuration file was read (else the built-in tables)."""
        return self._configuration is not None

    @property
    def configuration(self) -> Configuration:
        """The configuration read, or `Configuration()`: the built-in tables."""
        if self._configuration is None:
            from flagsched.tables import Configuration

            self._configuration = Configuration()
        return self._configuration

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            settings = load_settings()
            logs.configure(settings.log_format, settings.log_level)
            for warning in settings.warnings:
                logs.get_logger().warning("setting_ignored", message=warning)
            self._settings = settings
        return self._settings

    def database(self) -> Database:
        settings = self.settings
        return Database(
            settings.require_database_url(),
            lock_timeout=settings.lock_timeout,
            statement_timeout=settings.statement_timeout,
        )


P = ParamSpec("P")
R = TypeVar("R")
_pass_app = click.make_pass_decorator(App, ensure=True)


def pass_app(command: Callable[Concatenate[App, P], R]) -> Callable[P, R]:
    """Give a command this invocation's App as its first argument."""
    return _pass_app(command)


def say(line: str) -> None:
    """One line for the operator on stderr. A stderr that is full or closed loses the line,
    never the command's outcome or exit code."""
    from flagsched.render import visible

    with suppress(OSError, ValueError):  # ENOSPC, EPIPE, EBADF; ValueError: stream closed
        click.echo(visible(line), err=True)


def redacted(text: str) -> str:
    """One line; withheld whole if it quotes the database password."""
    from flagsched.settings import raw_database_url
    from flagsched.urls import one_line, url_secrets

    return one_line(text, url_secrets(raw_database_url()))
