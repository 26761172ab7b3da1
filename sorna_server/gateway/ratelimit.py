"""Per-keypair rate limiting (fourth middleware), shared by every gateway process.

The historic rolling 15-minute window: each accepted request is a member of a
sorted set per access key (score = time in ms) in the `ratelimit` Redis
database.  One Lua script drops members older than the window, counts, adds
the request when under the limit and reports the count and the time until
the oldest counted request leaves the window, so a request costs exactly one
Redis round trip and concurrent gateways never over-admit.

Every response carries `X-RateLimit-Limit`, `X-RateLimit-Remaining` and
`X-RateLimit-Reset` (milliseconds until one more request is allowed, or the
window length when nothing is counted); requests without a keypair are not
counted and report the historic anonymous allowance.
"""
from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from aiohttp import web

from .. import redis_keys
from . import keys
from .keys import KEYPAIR, RATE_LIMIT
from .errors import RateLimitExceeded

HISTORIC_WINDOW = 15 * 60.0
ANONYMOUS_LIMIT = 1000


_SCRIPT = """
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local count = redis.call('ZCARD', KEYS[1])
local allowed = 0
if count < limit then
  redis.call('ZADD', KEYS[1], now, ARGV[4])
  count = count + 1
  allowed = 1
end
redis.call('PEXPIRE', KEYS[1], window)
local reset = window
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if oldest[2] then
  reset = tonumber(oldest[2]) + window - now
end
return {allowed, count, reset}
"""


@dataclass(frozen=True, slots=True)
class RateLimitState:
    limit: int
    remaining: int
    reset_ms: int
    allowed: bool = True

    def headers(self) -> dict[str, str]:
        return {"X-RateLimit-Limit": str(self.limit),
                "X-RateLimit-Remaining": str(self.remaining),
                "X-RateLimit-Reset": str(self.reset_ms)}


class RateLimiter:
    def __init__(self, redis: aioredis.Redis, window: float = HISTORIC_WINDOW):
        self.redis = redis
        self.window_ms = max(int(window * 1000), 1)
        self._script = redis.register_script(_SCRIPT)
        self._member_prefix = f"{os.getpid()}.{os.urandom(3).hex()}."
        self._seq = itertools.count()

    def anonymous(self) -> RateLimitState:
        return RateLimitState(ANONYMOUS_LIMIT, ANONYMOUS_LIMIT, self.window_ms)

    def uncounted(self, limit: int) -> RateLimitState:
        """What to report when the request could not be counted (Redis down)."""
        return RateLimitState(limit, limit, self.window_ms)

    async def hit(self, access_key: str, limit: int) -> RateLimitState:
        """Count one request of `access_key`; `allowed` is False when over the limit."""
        now_ms = int(time.time() * 1000)
        member = f"{self._member_prefix}{next(self._seq)}"
        allowed, count, reset = await self._script(
            keys=[redis_keys.ratelimit(access_key)],
            args=[now_ms, self.window_ms, limit, member])
        return RateLimitState(limit, max(limit - int(count), 0), max(int(reset), 0),
                              bool(int(allowed)))


@web.middleware
async def ratelimit_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    keypair = request.get(KEYPAIR)
    if keypair is None:
        return await handler(request)
    limiter = request.app[keys.RATE_LIMITER]
    request[RATE_LIMIT] = limiter.uncounted(keypair.rate_limit)
    state = await limiter.hit(keypair.access_key, keypair.rate_limit)
    request[RATE_LIMIT] = state
    if not state.allowed:
        raise RateLimitExceeded(
            f"At most {state.limit} requests per {limiter.window_ms / 1000:g} s; "
            f"retry in {state.reset_ms} ms.")
    return await handler(request)


def rate_limit_headers(request: web.Request) -> dict[str, str]:
    state = request.get(RATE_LIMIT) or request.app[keys.RATE_LIMITER].anonymous()
    return state.headers()
