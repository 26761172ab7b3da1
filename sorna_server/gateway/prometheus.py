"""`GET /metrics`: Prometheus text, on the API port or on its own address.

A scrape answers with (1) this process's metrics, or with `--workers N` the
sum of every worker's (prometheus_client multiprocess mode, set up by
`server.Supervisor`), and (2) values read from the registry right now: live
kernels by state and language (database), agents by state and each agent's
load (Redis).  A registry read that fails or takes too long leaves its families
out of that scrape (and is logged); the process metrics are always served.
"""
from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import sqlalchemy as sa
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric

from .. import __version__, metrics
from ..db.models import LIVE_STATUSES, kernels
from . import keys

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
SNAPSHOT_TIMEOUT = 2.0

log = logging.getLogger(__name__)


def process_metrics() -> bytes:
    """This process's metrics, or every worker's added up in multiprocess mode."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest(REGISTRY)


async def kernel_counts(app: web.Application) -> dict[tuple[str, str], int]:
    query = (sa.select(kernels.c.status, kernels.c.lang, sa.func.count())
             .where(kernels.c.status.in_(LIVE_STATUSES))
             .group_by(kernels.c.status, kernels.c.lang))
    async with app[keys.DB].connect() as conn:
        rows = (await conn.execute(query)).all()
    return {(status, lang): int(count) for status, lang, count in rows}


async def agent_samples(app: web.Application) -> list[metrics.AgentSample]:
    registry = app[keys.REGISTRY]
    instances = await registry.list_instances()
    alive = await asyncio.gather(*(registry.is_alive(i.id) for i in instances))
    samples = []
    for inst, up in zip(instances, alive, strict=True):
        if inst.status == "lost":
            state = "lost"
        elif not up:
            state = "silent"
        else:
            state = "draining" if inst.draining else "running"
        samples.append(metrics.AgentSample(inst.id, state, inst.load, inst.max_kernels))
    return samples


class _Families:
    """A collector that returns families gathered before the scrape."""

    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


async def _quietly(what: str, coro: Any, default: Any) -> Any:
    try:
        return await asyncio.wait_for(coro, SNAPSHOT_TIMEOUT)
    except Exception as exc:  # a scrape must not fail because the registry is down
        log.warning("metrics: could not read %s: %s: %s", what, type(exc).__name__, exc)
        return default


async def render(app: web.Application) -> bytes:
    counts, agents = await asyncio.gather(
        _quietly("kernel counts", kernel_counts(app), None),
        _quietly("agents", agent_samples(app), None))
    families = metrics.scrape_families(counts or {}, agents or [], __version__)
    if counts is None:
        families = [f for f in families if f.name != metrics.KERNELS]
    if agents is None:
        families = [f for f in families if f.name not in (metrics.AGENTS, metrics.AGENT_LOAD,
                                                          metrics.AGENT_CAPACITY)]
    snapshot = CollectorRegistry(auto_describe=False)
    snapshot.register(_Families(families))
    loop = asyncio.get_running_loop()
    own = await loop.run_in_executor(None, process_metrics)
    return own + generate_latest(snapshot)


def _gateway_of(request: web.Request) -> web.Application:
    """The gateway app: this one, or the one the separate metrics app reports on."""
    return request.app.get(keys.GATEWAY) or request.app


async def serve_metrics(request: web.Request) -> web.Response:
    body = await render(_gateway_of(request))
    response = web.Response(body=body)
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


def metrics_app(gateway: web.Application) -> web.Application:
    """A small application serving only /metrics (for `metrics_addr`)."""
    app = web.Application()
    app[keys.GATEWAY] = gateway
    app.router.add_get("/metrics", serve_metrics)
    return app
