"""`sorna health`: the readiness checks of `GET /readyz`, run from this host.

Uses the same settings as the servers (same folder, `--config` or
environment) and the same checks (`sorna_server.health`): the database answers,
Redis answers, and a live agent takes kernels.  Exit status 0 when all pass,
1 when one fails.  It never creates anything: no embedded Redis is started and
no SQLite file is made.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import click

from .context import EXIT_FAILURE, CliContext, pass_cli, run_async, running_embedded_redis
from .output import json_option, print_json, print_table

if TYPE_CHECKING:
    from sorna_server.config import SornaConfig
    from sorna_server.health import HealthReport


async def _check(config: SornaConfig) -> HealthReport:
    from sqlalchemy.ext.asyncio import create_async_engine

    from sorna_server.agent_client import AgentRPCClient
    from sorna_server.db.engine import create_engine
    from sorna_server.health import readiness
    from sorna_server.redis_conn import RedisClients
    from sorna_server.registry import Registry

    missing: dict[str, str] = {}
    if config.uses_embedded_db and not (config.data_dir / "sorna.db").is_file():
        missing["database"] = f"no embedded SQLite database in {config.data_dir.resolve()}"
        engine = None
    else:
        engine = create_engine(config)  # connects only when the check runs
    url = config.explicit_redis_url or running_embedded_redis(config)
    redis = RedisClients.connect(url, config) if url else None
    if redis is None:
        missing["redis"] = (f"none configured and no embedded Redis runs in "
                            f"{config.data_dir.resolve()}")
        missing["agents"] = "unknown without Redis"
    rpc = AgentRPCClient()
    registry = None
    if redis is not None:
        # the agents check reads Redis only; without a database, an engine that
        # is never connected stands in
        registry = Registry(config, redis, engine or create_async_engine("sqlite+aiosqlite://"),
                            rpc)
    try:
        return await readiness(engine=engine, redis=redis, registry=registry, missing=missing)
    finally:
        await rpc.close()
        if redis is not None:
            await redis.close()
        if registry is not None:
            await registry.db.dispose()


@click.command()
@json_option
@pass_cli
def health(cli: CliContext, as_json: bool) -> None:
    """Check the database, Redis and the agents as GET /readyz does; exit 1 when one fails."""
    report = run_async(_check(cli.config))
    if as_json:
        print_json(report.as_dict())
    else:
        print_table(("check", "ok", "detail", "ms"),
                    [(c.name, "yes" if c.ok else "NO", c.detail, f"{c.latency_ms:.1f}")
                     for c in report.checks])
    if not report.ok:
        if not as_json:
            click.echo(f"not ready: {', '.join(report.failed)} failed", err=True)
        raise click.exceptions.Exit(EXIT_FAILURE)
