"""The command line: one click group. Settings and logging are configured once, on first
use; this is the only place that exits, turning results and errors into exit codes. The
commands live in one module per group: tick (process), authoring (schedule, ramp),
operate (retry, cancel, approve, reject, prune, migrate), read (list, list-failed, status,
recurrences, history, show), ahead (plan, agenda); their parameters in params, their output
in flagsched.render."""

from __future__ import annotations

import contextvars
import importlib
import signal
import sys
from typing import NoReturn

import click

from flagsched import logs
from flagsched.cli.app import EXIT_COULD_NOT_RUN, EXIT_OK, EXIT_USAGE, App, redacted, say
from flagsched.errors import ConfigError, FlagschedError

# Every command, by name: the module (under flagsched.cli) and the function that define it.
# Only the invoked command's module is imported (a cron run of `process` pays for no other).
COMMANDS = {
    "process": ("tick", "process"),
    "schedule": ("authoring", "schedule"),
    "ramp": ("authoring", "ramp"),
    "retry": ("operate", "retry"),
    "cancel": ("operate", "cancel"),
    "approve": ("operate", "approve"),
    "reject": ("operate", "reject"),
    "prune": ("operate", "prune"),
    "migrate": ("operate", "migrate"),
    "list": ("read", "list_"),
    "list-failed": ("read", "list_failed"),
    "status": ("read", "status"),
    "recurrences": ("read", "recurrences"),
    "history": ("read", "history"),
    "show": ("read", "show"),
    "plan": ("ahead", "plan"),
    "agenda": ("ahead", "agenda"),
}


class LazyGroup(click.Group):
    """click's lazy group: the commands are named up front, and each is imported when asked
    for (to run it, or for `--help`, which lists them all)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module, name = COMMANDS[cmd_name]
        command = getattr(importlib.import_module(f"flagsched.cli.{module}"), name)
        assert isinstance(command, click.Command) and command.name == cmd_name
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="flagsched")
@click.option(
    "--config",
    "config_path",
    metavar="PATH",
    help="The configuration file (TOML; default: FLAGSCHED_CONFIG): your own tables.",
)
@click.pass_context
def cli(ctx: click.Context, config_path: str | None) -> None:
    """Apply scheduled feature-flag changes stored in PostgreSQL."""
    app = ctx.ensure_object(App)
    app.load_configuration(config_path)
    if not app.configured:
        return  # the built-in tables: nothing to refuse
    command = ctx.invoked_subcommand
    refused = app.configuration.not_available(command)
    # `migrate` checks a configuration with [flags] against the database before it refuses.
    adopted = app.configuration.flags is not None
    if refused and not (adopted and command == "migrate"):
        raise ConfigError(refused)
    if not refused:
        from flagsched import sql

        sql.use(app.configuration.tables())


def main(argv: list[str] | None = None) -> NoReturn:
    """Entry point: the only place that exits."""
    sys.exit(run(argv))


def run(argv: list[str] | None = None) -> int:
    """One invocation, as its exit code. No traceback reaches an operator. It runs in a copy
    of the caller's context: the table mapping it chose (`flagsched.sql.use`) ends with it,
    so in-process callers (the tests) never inherit another invocation's tables."""
    return contextvars.copy_context().run(_run, argv)


def _run(argv: list[str] | None) -> int:
    try:
        code = cli.main(args=argv, prog_name="flagsched", standalone_mode=False)
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.ClickException as exc:
        say(f"flagsched: error: {_usage_line(exc)}")
        code = EXIT_USAGE if isinstance(exc, click.UsageError) else exc.exit_code
    except click.exceptions.Abort:
        code = 128 + signal.SIGINT
    except FlagschedError as exc:
        say(f"flagsched: error: {exc.message}")
        code = exc.exit_code
    except Exception as exc:
        logs.debug_exception("internal_error", exc)  # FLAGSCHED_LOG_LEVEL=debug: the traceback
        say(f"flagsched: internal error: {type(exc).__name__}: {redacted(str(exc))}")
        code = EXIT_COULD_NOT_RUN
    return code if isinstance(code, int) else EXIT_OK


def _usage_line(exc: click.ClickException) -> str:
    """click's message as one line, with where to read more (click's own rendering takes four)."""
    from flagsched.urls import one_line

    message = one_line(exc.format_message())
    ctx = exc.ctx if isinstance(exc, click.UsageError) else None
    return f"{message} (see `{ctx.command_path} --help`)" if ctx is not None else message
