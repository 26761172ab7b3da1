"""Rate-limit leases against a real Redis: never over-admit, even with two gateways."""
from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from sorna_server import redis_keys
from sorna_server.gateway.ratelimit import MAX_LEASE, RateLimiter
from tests.helpers import TEST_REDIS_DBS

RATELIMIT_DB = TEST_REDIS_DBS["redis_db_ratelimit"]  # flushed by the redis_url fixture


async def test_leases_never_over_admit_across_two_gateways(redis_url):
    client = aioredis.Redis.from_url(redis_url, db=RATELIMIT_DB)
    first, second = RateLimiter(client, 60.0), RateLimiter(client, 60.0)
    limit = 2000  # leases of up to 2 slots
    try:
        async def burst(limiter: RateLimiter) -> list[bool]:
            states = []
            for _ in range(30):  # sequential rounds let the lease sizes grow
                states += await asyncio.gather(*(limiter.hit("AKLEASE", limit)
                                                 for _ in range(40)))
            return [s.allowed for s in states]
        results = await asyncio.gather(burst(first), burst(second))
        admitted = sum(sum(r) for r in results)
        assert admitted == limit  # 2,400 asked, exactly the limit admitted
        counted = await client.zcard(redis_keys.ratelimit("AKLEASE"))
        assert counted == limit
    finally:
        await first.close()
        await second.close()
        await client.aclose()


async def test_lease_remaining_is_exact_and_unused_slots_are_given_back(redis_url):
    client = aioredis.Redis.from_url(redis_url, db=RATELIMIT_DB)
    limiter = RateLimiter(client, 60.0)
    limit = 1_000_000
    key = redis_keys.ratelimit("AKLEASE2")
    try:
        remaining = [(await limiter.hit("AKLEASE2", limit)).remaining for _ in range(300)]
        assert remaining == list(range(limit - 1, limit - 301, -1))
        counted = await client.zcard(key)
        assert 300 <= counted <= 300 + MAX_LEASE  # leased ahead, at most one lease
        assert counted > 300  # the busy key did take a lease
        await limiter.close()
        assert await client.zcard(key) == 300
    finally:
        await client.aclose()
