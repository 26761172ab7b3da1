"""Entry point of the `sorna` command: global options, lazy groups, error boundary.

Command modules are imported only when their command runs (or completes), so
`sorna --help` and `sorna COMMAND --help` load neither the server (aiohttp,
SQLAlchemy, ZeroMQ) nor even the settings loader: the command list shows the
short help kept in `COMMANDS` (a test checks it against each command's own).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Any

import click

from sorna_server import __version__
from sorna_server.logs import LOG_FORMATS, setup_logging

from .context import (  # noqa: F401  (OperatorError re-exported for command modules)
    EXIT_FAILURE,
    EXIT_USAGE,
    CliContext,
    OperatorError,
)

# command name -> ("module:attribute", short help); modules are imported only when used.
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("sorna_cli.serve:serve", "Run the API gateway (HTTP), the legacy ZMQ listener "
                                       "and the event intake."),
    "agent": ("sorna_cli.agent:agent", "Run the reference agent: sandboxed kernels for the "
                                       "managers."),
    "health": ("sorna_cli.health:health", "Check the database, Redis and the agents as "
                                          "GET /readyz does; exit 1 when one fails."),
    "schema": ("sorna_cli.schema:schema", "Create, migrate and inspect the database schema."),
    "fixture": ("sorna_cli.fixture:fixture", "Load JSON fixtures into the database."),
    "keypair": ("sorna_cli.keypair:keypair", "Manage API keypairs."),
    "keys": ("sorna_cli.keys:keys", "Make CurveZMQ keys for the agent protocol."),
    "registry": ("sorna_cli.registry:registry", "Inspect the live registry of agents and "
                                                "kernels; drain agents; reconcile."),
    "dbshell": ("sorna_cli.dbshell:dbshell", "Open psql or sqlite3 on the configured database."),
}


class LazyGroup(click.Group):
    """Imports a command's module only when that command is run, helped or completed."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(name for name, (target, _) in COMMANDS.items()
                      if importlib.util.find_spec(target.split(":")[0]) is not None)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        entry = COMMANDS.get(cmd_name)
        if entry is None:
            return None
        module_name, attr = entry[0].split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:   # a real missing dependency: say so loudly
                raise
            return None                   # this build has no such command module
        command: click.Command = getattr(module, attr)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list from COMMANDS, without importing any command module."""
        rows = [(name, COMMANDS[name][1]) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def _debug_requested(argv: list[str]) -> bool:
    """`--debug` or a true SORNA_DEBUG (read before the config, which may be what fails)."""
    env = os.environ.get("SORNA_DEBUG", "").strip().lower()
    return "--debug" in argv or env in {"1", "true", "yes", "on"}


def _config_error(exc: BaseException) -> bool:
    config = sys.modules.get("sorna_server.config")  # not loaded: it cannot be its error
    return config is not None and isinstance(exc, config.ConfigError)


def _database_unavailable(exc: BaseException) -> bool:
    engine = sys.modules.get("sorna_server.db.engine")
    return engine is not None and isinstance(exc, engine.DatabaseUnavailable)


class SornaGroup(LazyGroup):
    """The root group; its `main` is the error boundary, so CliRunner tests exercise it too.

    Errors become one line on stderr and a non-zero exit (no traceback unless
    `--debug`): 1 = the operation failed (e.g. database unreachable), 2 = bad input.
    """

    def main(self, args: Any = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True, **extra: Any) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        debug = _debug_requested(argv)
        try:
            result = super().main(argv, prog_name or "sorna", complete_var,
                                  standalone_mode=False, **extra)
        except click.exceptions.Abort:
            click.echo("Aborted.", err=True)
            sys.exit(130)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            sys.exit(130)
        except Exception as exc:  # the boundary: one line unless --debug
            if debug:
                raise
            if _config_error(exc):
                click.echo(f"Error: {exc}", err=True)
                sys.exit(EXIT_USAGE)
            if _database_unavailable(exc):
                click.echo(f"Error: {exc}", err=True)
                sys.exit(EXIT_FAILURE)
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            click.echo(f"Error: {exc.__class__.__name__}: {text} (run with --debug for details)",
                       err=True)
            sys.exit(EXIT_FAILURE)
        if isinstance(result, int) and result:   # ctx.exit(N) under standalone_mode=False
            sys.exit(result)
        return result


@click.group(name="sorna", cls=SornaGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="Config file (default ./sorna.toml; env SORNA_CONFIG).")
@click.option("--data-dir", type=click.Path(file_okay=False),
              help="Folder for the embedded SQLite file and Redis socket.")
@click.option("--db-url", help="SQLAlchemy database URL (env SORNA_DB_URL).")
@click.option("--redis-url", help="Redis URL (env SORNA_REDIS_URL).")
@click.option("--log-level", help="DEBUG, INFO, WARNING or ERROR.")
@click.option("--log-format", type=click.Choice(LOG_FORMATS),
              help="Log lines as text or JSON (env SORNA_LOG_FORMAT).")
@click.option("--debug", is_flag=True, default=None, help="Show tracebacks and debug logs.")
@click.version_option(version=__version__, prog_name="sorna")
@click.pass_context
def cli(ctx: click.Context, config_file: str | None, debug: bool | None, **overrides: Any) -> None:
    """Sorna: run code in remote, sandboxed kernels."""
    ctx.obj = CliContext(config_file, {**overrides, "debug": debug}, bool(debug))


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    # until a command loads the config (which may choose JSON): warnings on stderr
    setup_logging("DEBUG" if _debug_requested(list(args)) else "WARNING", "text")
    cli.main(args, prog_name="sorna")
