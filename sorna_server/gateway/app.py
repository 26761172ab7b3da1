"""The application factory: `create_app(config)` -> the gateway `web.Application`.

Middlewares, outermost first: request id and metrics, CORS (when
`cors_origins` is set), problem+json errors, API version check,
authentication, rate limiting.  Resources live in `app.cleanup_ctx`, in
dependency order (Redis, database, agent RPC client, registry, services, the
legacy listener), and are released in reverse order.
"""
from __future__ import annotations

import logging
import weakref
from collections.abc import AsyncIterator

from aiohttp import WSCloseCode, web

from .. import __version__, curve, metrics, redis_keys
from ..agent_client import AgentRPCClient
from ..config import SornaConfig
from ..redis_conn import open_redis
from ..registry import Registry
from ..registry.intake import EventIntake
from ..registry.lifecycle import Settlement
from ..registry.reconcile import Difference
from ..registry.reconciler import Reconciler
from ..registry.sweeper import Sweeper
from ..schema import open_ready_database
from . import keys
from .auth import KeypairCache, auth_middleware
from .bodies import PreAuthBudget
from .cors import cors_middleware
from .errors import problem_middleware
from .kernels import KernelService
from .observe import REQUEST_ID_HEADER, new_request_id, observe_middleware
from .ratelimit import RateLimiter, rate_limit_headers, ratelimit_middleware
from .routing import setup_routes
from .usage import KeypairActivity
from .versioning import version_middleware

log = logging.getLogger(__name__)

SERVER_HEADER = f"Sorna-API/{__version__}"
ACTIVITY_FLUSH_INTERVAL = 3.0


def create_app(config: SornaConfig, *, primary: bool = True) -> web.Application:
    """Build the gateway.  `primary` = this process binds the event intake and
    the legacy ZMQ port (exactly one process of a multi-worker server does)."""
    cors = cors_middleware(config.cors_origins)
    app = web.Application(
        middlewares=[observe_middleware, *([cors] if cors else []), problem_middleware,
                     version_middleware, auth_middleware, ratelimit_middleware],
        # bodies are read by auth (bounded, see bodies.py) and the upload handler
        client_max_size=config.max_request_body,
    )
    app[keys.CONFIG] = config
    app[keys.PRIMARY] = primary
    app[keys.WEBSOCKETS] = weakref.WeakSet()
    app.cleanup_ctx.extend([_redis, _database, _rpc, _registry, _event_intake, _sweeper,
                            _reconciler, _services, _legacy])
    app.on_shutdown.append(_close_websockets)
    app.on_response_prepare.append(_common_headers)
    setup_routes(app, metrics_here=config.metrics_enabled and config.metrics_addr is None)
    return app


async def _redis(app: web.Application) -> AsyncIterator[None]:
    async with open_redis(app[keys.CONFIG]) as clients:
        app[keys.REDIS] = clients
        yield


async def _database(app: web.Application) -> AsyncIterator[None]:
    async with open_ready_database(app[keys.CONFIG]) as engine:
        app[keys.DB] = engine
        yield


async def _rpc(app: web.Application) -> AsyncIterator[None]:
    config = app[keys.CONFIG]
    instances = app[keys.REDIS].instances

    async def key_for(addr: str) -> str | None:
        key = await instances.hget(redis_keys.AGENT_KEYS, addr)
        return key.decode() if isinstance(key, bytes) else key

    gateway_key = None if config.gateway_key is None else \
        curve.load_keypair(config.gateway_key, "gateway_key")
    client = AgentRPCClient(default_timeout=config.agent_rpc_timeout, keys=gateway_key,
                            key_for=key_for)
    app[keys.RPC] = client
    try:
        yield
    finally:
        await client.close()


async def _registry(app: web.Application) -> AsyncIterator[None]:
    registry = Registry(app[keys.CONFIG], app[keys.REDIS], app[keys.DB], app[keys.RPC])
    registry.lifecycle.on_settled.append(_count_settlement)
    await registry.start()
    app[keys.REGISTRY] = registry
    try:
        yield
    finally:
        await registry.stop()


async def _event_intake(app: web.Application) -> AsyncIterator[None]:
    """Agent events (one process per server binds the events port)."""
    if not app[keys.PRIMARY]:
        yield
        return
    intake = EventIntake(app[keys.REGISTRY])
    await intake.start()
    app[keys.INTAKE] = intake
    try:
        yield
    finally:
        await intake.stop()


async def _sweeper(app: web.Application) -> AsyncIterator[None]:
    """Lost-agent sweep (every process; one per round does the work)."""
    sweeper = Sweeper(app[keys.REGISTRY])
    sweeper.start()
    try:
        yield
    finally:
        await sweeper.stop()


async def _reconciler(app: web.Application) -> AsyncIterator[None]:
    """Periodic reconciliation and retries of failed settlements (every process)."""
    reconciler = Reconciler(app[keys.REGISTRY])
    reconciler.on_pass.append(_count_fixes)
    reconciler.start()
    try:
        yield
    finally:
        await reconciler.stop()


def _count_settlement(settlement: Settlement) -> None:
    metrics.child(metrics.SETTLEMENTS, settlement.path, settlement.status).inc()


def _count_fixes(differences: list[Difference]) -> None:
    for difference in differences:
        if difference.fixed:
            metrics.child(metrics.RECONCILE_FIXES, difference.kind).inc()


async def _services(app: web.Application) -> AsyncIterator[None]:
    config = app[keys.CONFIG]
    app[keys.KEYPAIRS] = KeypairCache(app[keys.DB], config.keypair_cache_ttl)
    app[keys.PREAUTH_BUDGET] = PreAuthBudget(config.auth_body_budget)
    app[keys.RATE_LIMITER] = RateLimiter(app[keys.REDIS].ratelimit, config.rate_limit_window)
    activity = KeypairActivity(app[keys.DB], ACTIVITY_FLUSH_INTERVAL)
    app[keys.ACTIVITY] = activity
    kernels = KernelService(config, app[keys.DB], app[keys.REGISTRY], app[keys.RPC])
    app[keys.KERNELS] = kernels
    activity.start()
    try:
        yield
    finally:
        await kernels.close()
        await activity.stop()
        await app[keys.RATE_LIMITER].close()


async def _legacy(app: web.Application) -> AsyncIterator[None]:
    if not app[keys.PRIMARY] or not app[keys.CONFIG].legacy_enabled:
        yield
        return
    from ..legacy import LegacyListener

    config = app[keys.CONFIG]
    listener = LegacyListener(config, app[keys.KERNELS])
    await listener.start()
    try:
        yield
    finally:
        await listener.stop()


async def _close_websockets(app: web.Application) -> None:
    open_sockets = app[keys.WEBSOCKETS]
    for ws in list(open_sockets):
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")


async def _common_headers(request: web.Request, response: web.StreamResponse) -> None:
    headers = response.headers
    headers["Server"] = SERVER_HEADER
    try:
        headers[REQUEST_ID_HEADER] = request[keys.REQUEST_ID]
    except KeyError:  # not through the middlewares (cannot happen for our routes)
        headers[REQUEST_ID_HEADER] = new_request_id()
    headers.update(rate_limit_headers(request))
    if response.status == 204:
        # The historic sync client reads Content-Length and Content-Type of every
        # response, 204 included (aiohttp drops them by default).
        headers["Content-Length"] = "0"
        headers.setdefault("Content-Type", "application/octet-stream")
