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

import asyncio
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


# KEYS: one rate-limit key per request of the batch; ARGV: now (ms), window (ms),
# then (limit, member) per key.  Returns {allowed, count, reset} per key.
_SCRIPT = """
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local out = {}
for i, key in ipairs(KEYS) do
  local limit = tonumber(ARGV[1 + 2 * i])
  local member = ARGV[2 + 2 * i]
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  local count = redis.call('ZCARD', key)
  local allowed = 0
  if count < limit then
    redis.call('ZADD', key, now, member)
    count = count + 1
    allowed = 1
  end
  redis.call('PEXPIRE', key, window)
  local reset = window
  local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if oldest[2] then
    reset = tonumber(oldest[2]) + window - now
  end
  out[i] = {allowed, count, reset}
end
return out
"""
MAX_BATCH = 256

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
    """Counts requests in Redis; concurrent requests share one script call.

    While one call is in flight, new requests queue up and go together in the
    next call (each request still gets its own atomic count), so under load
    the Redis round trips per request drop well below one.
    """

    def __init__(self, redis: aioredis.Redis, window: float = HISTORIC_WINDOW):
        self.redis = redis
        self.window_ms = max(int(window * 1000), 1)
        self._script = redis.register_script(_SCRIPT)
        self._member_prefix = f"{os.getpid()}.{os.urandom(3).hex()}."
        self._seq = itertools.count()
        self._queue: list[tuple[str, int, str, asyncio.Future[RateLimitState]]] = []
        self._in_flight = False

    def anonymous(self) -> RateLimitState:
        return RateLimitState(ANONYMOUS_LIMIT, ANONYMOUS_LIMIT, self.window_ms)

    def uncounted(self, limit: int) -> RateLimitState:
        """What to report when the request could not be counted (Redis down)."""
        return RateLimitState(limit, limit, self.window_ms)

    async def hit(self, access_key: str, limit: int) -> RateLimitState:
        """Count one request of `access_key`; `allowed` is False when over the limit."""
        future: asyncio.Future[RateLimitState] = asyncio.get_running_loop().create_future()
        member = f"{self._member_prefix}{next(self._seq)}"
        self._queue.append((redis_keys.ratelimit(access_key), limit, member, future))
        if not self._in_flight:
            self._in_flight = True
            asyncio.get_running_loop().call_soon(self._send_next)
        return await future

    def _send_next(self) -> None:
        batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
        if not batch:
            self._in_flight = False
            return
        asyncio.ensure_future(self._send(batch))

    async def _send(self, batch: list[tuple[str, int, str, asyncio.Future[RateLimitState]]]
                    ) -> None:
        args: list[object] = [int(time.time() * 1000), self.window_ms]
        for _, limit, member, _ in batch:
            args += [limit, member]
        try:
            replies = await self._script(keys=[key for key, _, _, _ in batch], args=args)
        except BaseException as exc:
            for *_, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        else:
            for (_, limit, _, future), (allowed, count, reset) in zip(batch, replies):
                if not future.done():
                    future.set_result(RateLimitState(limit, max(limit - int(count), 0),
                                                     max(int(reset), 0), bool(int(allowed))))
        finally:
            self._send_next()


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
