"""`sorna dbshell`: open psql or sqlite3 on the configured database."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from typing import TYPE_CHECKING

import click

from .context import EXIT_FAILURE, EXIT_USAGE, CliContext, OperatorError, pass_cli

if TYPE_CHECKING:
    from sorna_server.config import SornaConfig


def shell_command(config: SornaConfig) -> tuple[list[str], dict[str, str]]:
    """The client command line and extra environment (the password goes in PGPASSWORD)."""
    from sqlalchemy.engine import make_url

    url = make_url(config.database_url)
    backend = url.get_backend_name()
    if backend == "sqlite":
        if not url.database or url.database == ":memory:":
            raise OperatorError("dbshell needs a SQLite file, not an in-memory database",
                                EXIT_USAGE)
        return ["sqlite3", url.database], {}
    if backend in ("postgresql", "postgres"):
        argv = ["psql"]
        host = url.host or url.query.get("host")
        if host:
            argv += ["-h", str(host)]
        if url.port:
            argv += ["-p", str(url.port)]
        if url.username:
            argv += ["-U", url.username]
        argv.append(url.database or "postgres")
        env = {"PGPASSWORD": url.password} if url.password else {}
        return argv, env
    raise OperatorError(f"dbshell supports postgresql and sqlite, not {backend}", EXIT_USAGE)


@click.command(context_settings={"ignore_unknown_options": True})
@click.argument("client_args", nargs=-1, type=click.UNPROCESSED)
@pass_cli
def dbshell(cli: CliContext, client_args: tuple[str, ...]) -> None:
    """Open psql or sqlite3 on the configured database.

    Extra arguments go to the client, e.g. `sorna dbshell -- -c 'select 1'`.
    """
    from sorna_server.config import mask_url

    argv, extra_env = shell_command(cli.config)
    binary = shutil.which(argv[0])
    if binary is None:
        package = "the PostgreSQL client (psql)" if argv[0] == "psql" else "sqlite3"
        raise OperatorError(f"{argv[0]} is not installed or not on PATH; install {package} to "
                            f"open {mask_url(cli.config.database_url)}", EXIT_FAILURE)
    sys.stdout.flush()
    try:
        completed = subprocess.run([binary, *argv[1:], *client_args],
                                   env={**os.environ, **extra_env}, check=False)
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    if completed.returncode:
        raise SystemExit(completed.returncode)
