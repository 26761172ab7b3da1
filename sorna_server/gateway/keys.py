"""Typed keys of everything the gateway application holds (one place)."""
from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from ..agent_client import AgentRPCClient
    from ..config import SornaConfig
    from ..redis_conn import RedisClients
    from ..registry import Registry
    from ..registry.intake import EventIntake
    from .auth import Keypair, KeypairCache
    from .bodies import PreAuthBudget
    from .kernels import KernelService
    from .ratelimit import RateLimiter, RateLimitState, ReplayGuard
    from .routing import ServedRoutes
    from .usage import KeypairActivity

CONFIG: web.AppKey[SornaConfig] = web.AppKey("config")
PRIMARY: web.AppKey[bool] = web.AppKey("primary", bool)
"""True in the one process that binds the event intake and the legacy port."""
DB: web.AppKey[AsyncEngine] = web.AppKey("db")
REDIS: web.AppKey[RedisClients] = web.AppKey("redis")
RPC: web.AppKey[AgentRPCClient] = web.AppKey("rpc")
REGISTRY: web.AppKey[Registry] = web.AppKey("registry")
INTAKE: web.AppKey[EventIntake] = web.AppKey("intake")
"""The event intake, in the process that binds the events port."""
KEYPAIRS: web.AppKey[KeypairCache] = web.AppKey("keypairs")
PREAUTH_BUDGET: web.AppKey[PreAuthBudget] = web.AppKey("preauth_budget")
"""Bytes of request bodies held before their signature is checked (see bodies.py)."""
RATE_LIMITER: web.AppKey[RateLimiter] = web.AppKey("rate_limiter")
ACTIVITY: web.AppKey[KeypairActivity] = web.AppKey("activity")
KERNELS: web.AppKey[KernelService] = web.AppKey("kernels")
WEBSOCKETS: web.AppKey[weakref.WeakSet[web.WebSocketResponse]] = web.AppKey("websockets")
ROUTES: web.AppKey[ServedRoutes] = web.AppKey("routes")
"""The route table this application serves (the OpenAPI document is made from it)."""
GATEWAY: web.AppKey[web.Application] = web.AppKey("gateway", web.Application)
"""In the separate metrics application (`metrics_addr`): the gateway it reports on."""

# --- per-request values (set by the middlewares) -----------------------------
API_MAJOR: web.RequestKey[str] = web.RequestKey("api_major", str)
API_REVISION: web.RequestKey[str] = web.RequestKey("api_revision", str)
METHOD: web.RequestKey[str] = web.RequestKey("method", str)
"""The effective method (after X-Method-Override)."""
KEYPAIR: web.RequestKey[Keypair] = web.RequestKey("keypair")
ACCESS_KEY: web.RequestKey[str] = web.RequestKey("access_key", str)
RATE_LIMIT: web.RequestKey[RateLimitState] = web.RequestKey("rate_limit")
REPLAY_GUARD: web.RequestKey[ReplayGuard] = web.RequestKey("replay_guard")
"""The checked signature, for the rate-limit script to accept it only once."""
SIGNED_BODY: web.RequestKey[bytes] = web.RequestKey("signed_body", bytes)
"""The body whose hash the signature covered (non-multipart requests)."""
UPLOAD_DIGEST: web.RequestKey[str] = web.RequestKey("upload_digest", str)
"""X-Sorna-Upload-SHA256 of a multipart upload, covered by the signature."""
REQUEST_ID: web.RequestKey[str] = web.RequestKey("request_id", str)
"""The request's X-Request-ID (the client's, or a generated one)."""
STARTED: web.RequestKey[float] = web.RequestKey("started", float)
"""time.perf_counter() when the gateway began to handle the request."""
