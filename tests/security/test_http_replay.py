"""Replaying a captured signed request, against the real gateway, database,
Redis (embedded, and the real server when configured) and a real agent.

A signature is accepted once while its date is within the window, on every
gateway sharing the Redis, for keys counted per request and for busy keys
admitted from a rate-limit lease alike; the check rides on the rate-limit
script (no extra Redis round trip).
"""
from __future__ import annotations

import asyncio
import json

import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer

from sorna_server import keypairs as keypair_api
from sorna_server import redis_keys
from sorna_server.gateway import keys
from sorna_server.gateway.app import create_app
from sorna_server.gateway.auth import MAX_CLOCK_SKEW, REPLAY_MARGIN
from sorna_server.gateway.ratelimit import LEASE_SHARE
from tests.helpers import OTHER_ACCESS, OTHER_SECRET, PROBLEM, stdout_of

BUSY_ACCESS = "AKIABUSYKEY000000001"
BUSY_SECRET = "busySecretKey0123456789abcdefghijklmnopq"


async def _busy_keypair(gw) -> None:
    """A key with a limit large enough for rate-limit leases."""
    await keypair_api.create_keypair(gw.app[keys.DB], 4, rate_limit=100 * LEASE_SHARE,
                                     access_key=BUSY_ACCESS, secret_key=BUSY_SECRET)


async def _run(gw, kernel_id: str, code: str, access: str, secret: str) -> tuple[int, dict]:
    status, _, answer = await gw.request("POST", f"/v2/kernel/{kernel_id}",
                                         {"mode": "query", "code": code},
                                         access_key=access, secret=secret)
    return status, answer


async def _send(client: TestClient, path: str, headers: dict[str, str],
                body: bytes) -> tuple[int, dict]:
    async with client.post(path, data=body, headers=headers) as resp:
        return resp.status, await resp.json()


async def test_a_replayed_execute_runs_once(gateway_factory):
    gw = await gateway_factory(agents=1)
    await _busy_keypair(gw)
    for access, secret in ((OTHER_ACCESS, OTHER_SECRET), (BUSY_ACCESS, BUSY_SECRET)):
        kernel_id = await gw.create_kernel("python3", access_key=access, secret=secret)
        status, _ = await _run(gw, kernel_id, "runs = 0", access, secret)
        assert status == 200
        if access == BUSY_ACCESS:  # warm up: the key now admits requests from leases
            for _ in range(8):
                assert (await gw.request("GET", "/v2/authorize", access_key=access,
                                         secret=secret))[0] == 200
        path = f"/v2/kernel/{kernel_id}"
        body = json.dumps({"mode": "query", "code": "runs += 1\nprint(runs)"}).encode()
        captured = gw.sign_headers("POST", path, body, access_key=access, secret=secret)

        status, answer = await _send(gw.client, path, captured, body)
        assert status == 200 and stdout_of(answer["result"]) == "1\n"
        for _ in range(2):  # the attacker replays it
            status, answer = await _send(gw.client, path, captured, body)
            assert status == 401, answer
            assert answer["type"] == PROBLEM + "auth-failed"
            assert "already used" in answer["detail"]
        status, answer = await _run(gw, kernel_id, "print(runs)", access, secret)
        assert stdout_of(answer["result"]) == "1\n", access


async def test_concurrent_replays_run_once_on_two_gateways(gateway_factory, aiohttp_client):
    gw = await gateway_factory(agents=1)
    await _busy_keypair(gw)
    # a second gateway process on the same Redis and database
    second = await aiohttp_client(TestServer(create_app(gw.config, primary=False)))
    for access, secret in ((OTHER_ACCESS, OTHER_SECRET), (BUSY_ACCESS, BUSY_SECRET)):
        kernel_id = await gw.create_kernel("python3", access_key=access, secret=secret)
        status, _ = await _run(gw, kernel_id, "runs = 0", access, secret)
        assert status == 200
        path = f"/v2/kernel/{kernel_id}"
        body = json.dumps({"mode": "query", "code": "runs += 1"}).encode()
        # both gateways see the same Host, as behind a load balancer
        captured = gw.sign_headers("POST", path, body, access_key=access, secret=secret)
        captured["Host"] = gw.host
        results = await asyncio.gather(*(_send(client, path, captured, body)
                                         for client in [gw.client, second] * 6))
        statuses = sorted(status for status, _ in results)
        assert statuses == [200] + [401] * 11, results
        status, answer = await _run(gw, kernel_id, "print(runs)", access, secret)
        assert stdout_of(answer["result"]) == "1\n", access


async def test_replay_check_is_in_the_rate_limit_script(gateway_factory):
    """One script call per request (no extra round trip), and each used signature
    is stored with a TTL that outlives its date's window."""
    gw = await gateway_factory()
    limiter = gw.app[keys.RATE_LIMITER]
    before = limiter.script_calls
    signatures = []
    for _ in range(20):
        headers = gw.sign_headers("GET", "/v2/authorize", access_key=OTHER_ACCESS,
                                  secret=OTHER_SECRET)
        signatures.append(headers["Authorization"].rpartition(":")[2])
        async with gw.client.get("/v2/authorize", headers=headers) as resp:
            assert resp.status == 200
    assert limiter.script_calls - before == 20
    client = aioredis.Redis.from_url(gw.config.explicit_redis_url,
                                     db=gw.config.redis_db_ratelimit)
    try:
        for signature in signatures:
            ttl = await client.pttl(redis_keys.replay(signature[:32]))
            window_ms = (MAX_CLOCK_SKEW.total_seconds() + REPLAY_MARGIN) * 1000
            assert window_ms - 60_000 < ttl <= window_ms
    finally:
        await client.aclose()
