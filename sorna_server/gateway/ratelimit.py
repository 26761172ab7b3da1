"""Per-keypair rate limiting (fourth middleware), shared by every gateway process.

The historic rolling 15-minute window: each counted request is a member of a
sorted set per access key (score = time in ms) in the `ratelimit` Redis
database.  One Lua script drops members older than the window, counts, adds
the request when under the limit and reports the count and the time until
the oldest counted request leaves the window, so concurrent gateways never
over-admit.  Concurrent requests share one script call (each still gets its
own atomic count).

Leases, for keys with large limits: a busy key may take several slots in one
call (at most 0.1% of its limit and `MAX_LEASE`, growing only while leases get
used up) and admit that many requests without counting each in Redis. The slots
are counted in Redis *before* they are used, so several gateways still never
admit more than the limit; slots not used within `LEASE_TTL` are given back
(removed from the set) at the key's next request or at shutdown. Consequences,
per gateway: the reported remaining count ignores other gateways' requests for
up to `LEASE_TTL`; a gateway that dies holding a lease leaves at most
`MAX_LEASE` unused slots counted until they leave the window.  Keys with a
limit below 2,000 never lease: every request is counted in Redis as it arrives.

Replay protection rides on the same script: each signed request brings its
signature (`ReplayGuard`), which the script stores with `SET NX PX` (a TTL
until the request's date leaves the 15-minute window) before counting; a
signature already stored means a replay, refused with 401 and not counted.
Several gateways share the store, so a signature is used once across all of
them.  A request admitted from a lease still needs that check: it makes a
script call of its own with nothing to count, batched with whatever else is
waiting, so a busy key costs one script call per batch rather than one per
request.  When Redis is down every signed request answers 503, leased or not
(the check fails closed; `hit()` without a `ReplayGuard` keeps the old
behaviour of leases, which may admit their remaining slots).

Every response carries `X-RateLimit-Limit`, `X-RateLimit-Remaining` and
`X-RateLimit-Reset` (milliseconds until one more request is allowed, or the
window length when nothing is counted); requests without a keypair are not
counted and report the historic anonymous allowance.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from aiohttp import web
from redis.exceptions import RedisError

from .. import redis_keys
from . import keys
from .errors import AuthorizationFailed, RateLimitExceeded
from .keys import KEYPAIR, RATE_LIMIT, REPLAY_GUARD

log = logging.getLogger(__name__)

HISTORIC_WINDOW = 15 * 60.0
ANONYMOUS_LIMIT = 1000
MAX_LEASE = 64          # slots one gateway may hold for one key
LEASE_SHARE = 1000      # ... and at most limit // LEASE_SHARE of them
LEASE_TTL = 0.5         # seconds; unused slots are given back afterwards


# KEYS: (rate-limit key, replay key) per entry of the batch; ARGV: now (ms),
# window (ms), then (limit, member, n, replay ttl ms) per entry.  A replay ttl
# > 0 first stores the replay key (SET NX PX); when it already exists the
# entry is a replay: nothing is counted.  Otherwise add up to n members
# (member .. ':' .. j) while under the limit (n = 0: the replay check only).
# Returns {granted, count, reset, replayed} per entry.
_SCRIPT = """
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local out = {}
for i = 1, #KEYS / 2 do
  local key = KEYS[2 * i - 1]
  local limit = tonumber(ARGV[4 * i - 1])
  local member = ARGV[4 * i]
  local n = tonumber(ARGV[4 * i + 1])
  local replay_ttl = tonumber(ARGV[4 * i + 2])
  if replay_ttl > 0 and not redis.call('SET', KEYS[2 * i], '', 'NX', 'PX', replay_ttl) then
    out[i] = {0, 0, 0, 1}
  elseif n == 0 then
    out[i] = {0, 0, 0, 0}
  else
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
    local count = redis.call('ZCARD', key)
    local granted = math.max(math.min(n, limit - count), 0)
    for j = 1, granted do
      redis.call('ZADD', key, now, member .. ':' .. j)
    end
    count = count + granted
    redis.call('PEXPIRE', key, window)
    local reset = window
    local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    if oldest[2] then
      reset = tonumber(oldest[2]) + window - now
    end
    out[i] = {granted, count, reset, 0}
  end
end
return out
"""
MAX_BATCH = 256


@dataclass(frozen=True, slots=True)
class ReplayGuard:
    """What the script needs to accept a signature once: the signature (lower-case
    hex) and the wall-clock time after which its request's date is out of the window."""
    signature: str
    expires_at: float

    @property
    def key(self) -> str:
        return redis_keys.replay(self.signature[:32])  # 128 bits are plenty

    def ttl_ms(self, now: float) -> int:
        return max(int((self.expires_at - now) * 1000), 1)


@dataclass(frozen=True, slots=True)
class RateLimitState:
    limit: int
    remaining: int
    reset_ms: int
    allowed: bool = True
    replayed: bool = False

    def headers(self) -> dict[str, str]:
        return {"X-RateLimit-Limit": str(self.limit),
                "X-RateLimit-Remaining": str(self.remaining),
                "X-RateLimit-Reset": str(self.reset_ms)}


@dataclass(slots=True)
class _Lease:
    """Slots of one key counted in Redis and not used yet by this gateway."""
    key: str
    member: str        # the slots are members member:1 .. member:size
    size: int
    left: int
    limit: int
    count: int         # the key's count in Redis right after the grant
    reset_at: float    # monotonic time at which one more slot frees up
    expires: float     # monotonic

    def take(self, now: float) -> RateLimitState:
        self.left -= 1
        return RateLimitState(self.limit, max(self.limit - self.count + self.left, 0),
                              max(int((self.reset_at - now) * 1000), 0))


_Reply = tuple[int, int, int, bool]  # granted, count, reset ms, replayed


@dataclass(slots=True)
class _Ask:
    """One entry of a script call."""
    key: str
    limit: int
    member: str
    n: int
    replay: ReplayGuard | None
    future: asyncio.Future[_Reply]


class RateLimiter:
    """Counts requests in Redis; concurrent requests share one script call,
    and busy keys with large limits take leases (see the module text)."""

    def __init__(self, redis: aioredis.Redis, window: float = HISTORIC_WINDOW):
        self.redis = redis
        self.window_ms = max(int(window * 1000), 1)
        self.lease_ttl = min(LEASE_TTL, window / 100)
        self._script = redis.register_script(_SCRIPT)
        self._member_prefix = f"{os.getpid()}.{os.urandom(3).hex()}."
        self._seq = itertools.count()
        self._queue: list[_Ask] = []
        self._in_flight = False
        self._leases: dict[str, _Lease] = {}
        self._lease_size: dict[str, int] = {}
        self._leasing: dict[str, asyncio.Future[None]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self.script_calls = 0   # for tests and measurements: Redis round trips taken

    def anonymous(self) -> RateLimitState:
        return RateLimitState(ANONYMOUS_LIMIT, ANONYMOUS_LIMIT, self.window_ms)

    def uncounted(self, limit: int) -> RateLimitState:
        """What to report when the request could not be counted (Redis down)."""
        return RateLimitState(limit, limit, self.window_ms)

    async def hit(self, access_key: str, limit: int,
                  replay: ReplayGuard | None = None) -> RateLimitState:
        """Count one request of `access_key`; `allowed` is False when over the limit,
        `replayed` True when `replay`'s signature was used before (then nothing is counted)."""
        if min(MAX_LEASE, limit // LEASE_SHARE) < 2:
            return self._state(limit, *await self._count(access_key, limit, 1, replay=replay))
        while True:
            now = time.monotonic()
            lease = self._leases.get(access_key)
            if lease is not None:
                if lease.left > 0 and lease.expires > now and lease.limit == limit:
                    if replay is None:
                        return lease.take(now)
                    # the replay check still goes to Redis (batched with other requests)
                    if (await self._count(access_key, limit, 0, replay=replay))[3]:
                        return self._replayed(limit)
                    replay = None
                    continue  # the lease may have changed meanwhile
                self._end_lease(access_key, lease, now)
            leasing = self._leasing.get(access_key)
            if leasing is None:
                break
            await asyncio.shield(leasing)  # another request is taking a lease: use it
        return await self._take_lease(access_key, limit, replay)

    async def _take_lease(self, access_key: str, limit: int,
                          replay: ReplayGuard | None) -> RateLimitState:
        size = min(self._lease_size.get(access_key, 1), MAX_LEASE, limit // LEASE_SHARE)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._leasing[access_key] = done
        try:
            member = self._next_member()
            granted, count, reset, replayed = await self._count(access_key, limit, size,
                                                                member, replay)
            now = time.monotonic()
            if replayed:
                return self._replayed(limit)
            if granted == 0:
                return self._state(limit, 0, count, reset)
            lease = _Lease(redis_keys.ratelimit(access_key), member, granted, granted, limit,
                           count, now + reset / 1000, now + self.lease_ttl)
            self._leases[access_key] = lease
            return lease.take(now)
        finally:
            del self._leasing[access_key]
            done.set_result(None)

    def _end_lease(self, access_key: str, lease: _Lease, now: float) -> None:
        """Drop a used-up or expired lease; size the next one; give unused slots back."""
        del self._leases[access_key]
        used = lease.size - lease.left
        self._lease_size[access_key] = used * 2 if lease.left == 0 else max(used, 1)
        if len(self._lease_size) > 10000:
            self._lease_size.clear()
        if lease.left > 0:
            unused = [f"{lease.member}:{j}" for j in range(used + 1, lease.size + 1)]
            task = asyncio.ensure_future(self._give_back(lease.key, unused))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _give_back(self, key: str, members: list[str]) -> None:
        try:
            await self.redis.zrem(key, *members)
        except (RedisError, OSError) as exc:  # they leave the window by themselves
            log.info("could not give back %d rate-limit slots of %s: %s", len(members), key, exc)

    async def close(self) -> None:
        """Give back the unused slots of every lease."""
        now = time.monotonic()
        for access_key, lease in list(self._leases.items()):
            self._end_lease(access_key, lease, now)
        await asyncio.gather(*self._background, return_exceptions=True)

    def _state(self, limit: int, granted: int, count: int, reset: int,
               replayed: bool = False) -> RateLimitState:
        if replayed:
            return self._replayed(limit)
        return RateLimitState(limit, max(limit - int(count), 0), max(int(reset), 0),
                              bool(granted))

    def _replayed(self, limit: int) -> RateLimitState:
        return RateLimitState(limit, limit, self.window_ms, allowed=False, replayed=True)

    def _next_member(self) -> str:
        return f"{self._member_prefix}{next(self._seq)}"

    async def _count(self, access_key: str, limit: int, n: int, member: str | None = None,
                     replay: ReplayGuard | None = None) -> _Reply:
        """Check `replay`, then add up to n slots for the key in Redis:
        (granted, count, reset ms, replayed)."""
        future: asyncio.Future[_Reply] = asyncio.get_running_loop().create_future()
        self._queue.append(_Ask(redis_keys.ratelimit(access_key), limit,
                                member or self._next_member(), n, replay, future))
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

    async def _send(self, batch: list[_Ask]) -> None:
        now = time.time()
        args: list[str | int] = [int(now * 1000), self.window_ms]
        script_keys: list[str] = []
        for ask in batch:
            replay_key, ttl = (ask.replay.key, ask.replay.ttl_ms(now)) if ask.replay \
                else (ask.key, 0)
            script_keys += [ask.key, replay_key]
            args += [ask.limit, ask.member, ask.n, ttl]
        self.script_calls += 1
        try:
            replies = await self._script(keys=script_keys, args=args)
        except BaseException as exc:
            for ask in batch:
                if not ask.future.done():
                    ask.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        else:
            for ask, (granted, count, reset, replayed) in zip(batch, replies, strict=True):
                if not ask.future.done():
                    ask.future.set_result((int(granted), int(count), int(reset),
                                           bool(replayed)))
        finally:
            self._send_next()


@web.middleware
async def ratelimit_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    keypair = request.get(KEYPAIR)
    if keypair is None:
        return await handler(request)
    limiter = request.app[keys.RATE_LIMITER]
    request[RATE_LIMIT] = limiter.uncounted(keypair.rate_limit)
    state = await limiter.hit(keypair.access_key, keypair.rate_limit, request.get(REPLAY_GUARD))
    if state.replayed:
        raise AuthorizationFailed("This signature was already used; sign every request anew.")
    request[RATE_LIMIT] = state
    if not state.allowed:
        raise RateLimitExceeded(
            f"At most {state.limit} requests per {limiter.window_ms / 1000:g} s; "
            f"retry in {state.reset_ms} ms.")
    return await handler(request)


def rate_limit_headers(request: web.Request) -> dict[str, str]:
    state = request.get(RATE_LIMIT) or request.app[keys.RATE_LIMITER].anonymous()
    return state.headers()
