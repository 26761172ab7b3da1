"""Entry point of the `sorna` command: global options, lazy groups, error boundary."""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
from typing import Any

import click

from sorna_server import __version__
from sorna_server.config import ConfigError

from .context import (  # noqa: F401  (OperatorError re-exported for command modules)
    EXIT_FAILURE,
    EXIT_USAGE,
    CliContext,
    OperatorError,
)

# command name -> "module:attribute"; modules are imported only when used.
COMMANDS = {
    "serve": "sorna_cli.serve:serve",
    "agent": "sorna_cli.agent:agent",
    "schema": "sorna_cli.schema:schema",
    "fixture": "sorna_cli.fixture:fixture",
    "keypair": "sorna_cli.keypair:keypair",
    "registry": "sorna_cli.registry:registry",
    "dbshell": "sorna_cli.dbshell:dbshell",
}


class LazyGroup(click.Group):
    """Imports a command's module only when that command (or `--help`) needs it."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(name for name, target in COMMANDS.items()
                      if importlib.util.find_spec(target.split(":")[0]) is not None)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:   # a real missing dependency: say so loudly
                raise
            return None                   # this build has no such command module
        return getattr(module, attr)


def _debug_requested(argv: list[str]) -> bool:
    """`--debug` or a true SORNA_DEBUG (read before the config, which may be what fails)."""
    env = os.environ.get("SORNA_DEBUG", "").strip().lower()
    return "--debug" in argv or env in {"1", "true", "yes", "on"}


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
        except ConfigError as exc:
            if debug:
                raise
            click.echo(f"Error: {exc}", err=True)
            sys.exit(EXIT_USAGE)
        except KeyboardInterrupt:
            sys.exit(130)
        except Exception as exc:  # the boundary: one line unless --debug
            if debug:
                raise
            from sorna_server.db.engine import DatabaseUnavailable

            if isinstance(exc, DatabaseUnavailable):
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
@click.option("--debug", is_flag=True, default=None, help="Show tracebacks and debug logs.")
@click.version_option(version=__version__, prog_name="sorna")
@click.pass_context
def cli(ctx: click.Context, config_file: str | None, debug: bool | None, **overrides: Any) -> None:
    """Sorna: run code in remote, sandboxed kernels."""
    ctx.obj = CliContext(config_file, {**overrides, "debug": debug}, bool(debug))


def _configure_logging(debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    _configure_logging(_debug_requested(list(args)))
    cli.main(args, prog_name="sorna")
