"""`sorna serve`: the API gateway, legacy listener and event intake in one command."""
from __future__ import annotations

import shlex
from typing import TYPE_CHECKING

import click

from .context import EXIT_FAILURE, CliContext, OperatorError, pass_cli
from .output import console

if TYPE_CHECKING:
    from sorna_server.server import ServerInfo


def print_banner(info: ServerInfo) -> None:
    out = console(stderr=True)
    out.print(f"[bold green]Sorna API gateway[/] listening on [bold]{info.endpoint}[/]"
              f" ({info.workers} worker{'s' if info.workers > 1 else ''})")
    out.print(f"  agent events: {info.events_addr}   legacy ZMQ: {info.legacy_addr}")
    if info.metrics_url:
        out.print(f"  metrics: {info.metrics_url}   health: {info.endpoint}/readyz")
    if info.standalone:
        out.print(f"  standalone: data in {info.data_dir}; local agent {info.agent_addr} "
                  f"(log: {info.agent_log})")
        for protection in info.agent_protections_off or []:
            out.print(f"  [bold yellow]kernel sandbox OFF on this host:[/] {protection}",
                      highlight=False)
    if info.access_key and info.secret_key:
        out.print(f"  access key: [bold]{info.access_key}[/]")
        out.print(f"  secret key: [bold]{info.secret_key}[/]")
        env = (f"SORNA_ENDPOINT={shlex.quote(info.endpoint)} "
               f"SORNA_ACCESS_KEY={shlex.quote(info.access_key)} "
               f"SORNA_SECRET_KEY={shlex.quote(info.secret_key)}")
        out.print("  try it with sorna-client (pip install sorna-client async_timeout):")
        out.print(f"    {env} python -m sorna.cli run python3 -c 'print(1)'", markup=False)
    out.print("  press Ctrl-C to stop")


@click.command()
@click.option("--host", "service_ip", help="Address to listen on (env SORNA_SERVICE_IP).")
@click.option("--port", "service_port", type=click.IntRange(0, 65535),
              help="HTTP(S) port; 0 = 8080, or 8443 with TLS (env SORNA_SERVICE_PORT).")
@click.option("--ssl-cert", type=click.Path(dir_okay=False), help="TLS certificate (PEM).")
@click.option("--ssl-key", type=click.Path(dir_okay=False), help="TLS private key (PEM).")
@click.option("--workers", type=click.IntRange(1, 64),
              help="Worker processes sharing the port (SO_REUSEPORT).")
@click.option("--manager-port", type=click.IntRange(0, 65535), help="Legacy ZMQ port (5001).")
@click.option("--events-port", type=click.IntRange(0, 65535), help="Agent events port (5002).")
@click.option("--agent-port", type=click.IntRange(0, 65535),
              help="RPC port of the local agent in --standalone mode (6001).")
@click.option("--gateway-key", type=click.Path(dir_okay=False),
              help="The gateway's CurveZMQ secret key file (`sorna keys generate`).")
@click.option("--agent-keys", type=click.Path(),
              help="Public key file, or folder of them, of the agents to accept.")
@click.option("--legacy/--no-legacy", "legacy_enabled", default=None,
              help="Serve the legacy ZMQ interface (off by default; no authentication).")
@click.option("--legacy-access-key", help="Keypair billed for legacy ZMQ requests.")
@click.option("--standalone", is_flag=True,
              help="Embedded Redis and SQLite, schema, example keypair and a local agent.")
@pass_cli
def serve(cli: CliContext, standalone: bool, **flags: object) -> None:
    """Run the API gateway (HTTP), the legacy ZMQ listener and the event intake."""
    cli.reload(**flags)
    config = cli.serve_logging()
    if standalone and (config.explicit_redis_url or not config.uses_embedded_db):
        click.echo("note: --standalone with a configured database/Redis uses them "
                   "instead of the embedded ones", err=True)
    from sorna_server.curve import CurveKeyError
    from sorna_server.db.engine import DatabaseUnavailable
    from sorna_server.redis_conn import RedisUnavailable
    from sorna_server.schema import SchemaError
    from sorna_server.server import StartupError, run

    try:
        run(config, standalone=standalone, on_ready=print_banner)
    except (StartupError, DatabaseUnavailable, RedisUnavailable, SchemaError,
            CurveKeyError) as exc:
        raise OperatorError(str(exc), EXIT_FAILURE) from exc
    except OSError as exc:
        raise OperatorError(f"cannot start the server: {exc}", EXIT_FAILURE) from exc
