"""Redis or the database going away: 503 problem bodies, and recovery when they return.

Redis: a private redis-server process (the embedded binary) on a TCP port,
killed and started again on the same port (empty, as after a crash).
Database: a private PostgreSQL database dropped (connections terminated) and
created again with the schema — only when SORNA_TEST_DB_URL is set.  (A SQLite
file cannot be taken away from a process that has it open, and as root
permission bits do not make it unreadable, so SQLite has no outage to test.)
"""
from __future__ import annotations

import asyncio
import uuid

import pytest
from sqlalchemy.engine import make_url

from tests.helpers import (
    PG_URL,
    PROBLEM,
    VERSION_HEADERS,
    pg_admin,
    prepare_database,
    wait_for,
)


async def test_redis_down_gives_503_and_recovers(gateway_factory, private_redis):
    gw = await gateway_factory(agents=1, redis_url=private_redis.url)
    kernel_id = await gw.create_kernel("python3")
    status, _, _ = await gw.request("GET", "/v2/authorize")
    assert status == 200

    private_redis.stop()
    loop = asyncio.get_running_loop()
    started = loop.time()
    for method, path, body in (("GET", "/v2/authorize", None),
                               ("GET", f"/v2/kernel/{kernel_id}", None),
                               ("POST", "/v2/kernel/create",
                                {"lang": "python3", "clientSessionToken": uuid.uuid4().hex})):
        status, headers, problem = await gw.request(method, path, body)
        assert status == 503, (path, problem)
        assert problem["type"] == PROBLEM + "service-unavailable"
        assert "X-RateLimit-Limit" in headers
    assert loop.time() - started < 15
    resp = await gw.client.get("/v2", headers=VERSION_HEADERS)  # needs no Redis
    assert resp.status == 200

    await asyncio.to_thread(private_redis.start)  # back, but empty (as after a crash)

    async def authorized() -> bool:
        status, _, _ = await gw.request("GET", "/v2/authorize")
        return status == 200
    await wait_for(authorized, timeout=15)

    # the agent's next heartbeats re-register it: new kernels work again
    async def can_create() -> bool:
        status, _, body = await gw.request("POST", "/v2/kernel/create", {
            "lang": "python3", "clientSessionToken": uuid.uuid4().hex})
        return status == 201
    await wait_for(can_create, timeout=20, interval=0.5)


@pytest.mark.skipif(not PG_URL, reason="needs SORNA_TEST_DB_URL (PostgreSQL)")
async def test_database_down_gives_503_and_recovers(gateway_factory, db_url):
    if not db_url.startswith("postgresql"):
        pytest.skip("the outage is simulated with a PostgreSQL database")

    gw = await gateway_factory(keypair_cache_ttl=0.2)
    status, _, _ = await gw.request("GET", "/v2/authorize")
    assert status == 200
    name = make_url(db_url).database
    await asyncio.to_thread(pg_admin, f'DROP DATABASE "{name}" WITH (FORCE)')
    await asyncio.sleep(0.3)  # past the keypair cache TTL
    for method, path, body in (("GET", "/v2/authorize", None),
                               ("POST", "/v2/kernel/create",
                                {"lang": "python3", "clientSessionToken": uuid.uuid4().hex})):
        status, headers, problem = await gw.request(method, path, body)
        assert status == 503, (path, problem)
        assert problem["type"] == PROBLEM + "service-unavailable"
        assert "database" in problem["detail"]

    await asyncio.to_thread(pg_admin, f'CREATE DATABASE "{name}"')
    await prepare_database(gw.config)

    async def authorized() -> bool:
        status, _, _ = await gw.request("GET", "/v2/authorize")
        return status == 200
    await wait_for(authorized, timeout=15)
