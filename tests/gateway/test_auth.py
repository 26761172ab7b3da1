"""Hello, authorize, version checks, signatures, keypair cache, rate limits and
problem bodies, against the real app with a real database and Redis."""
from __future__ import annotations

import asyncio
import email.utils
import json
import time
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from sorna_server import keypairs as keypair_api
from sorna_server.db.models import keypairs
from sorna_server.gateway import keys
from tests.helpers import (
    EXAMPLE_ACCESS,
    OTHER_ACCESS,
    OTHER_SECRET,
    PROBLEM,
    VERSION,
    VERSION_HEADERS,
    client_signature,
    wait_for,
)


@pytest.fixture
def gateway_redis_url(redis_url) -> str:
    """These tests also run against the real Redis when SORNA_TEST_REDIS_URL is set."""
    return redis_url


async def test_hello_is_public_and_carries_headers(gateway_factory):
    gw = await gateway_factory()
    for path, version in (("/v2", VERSION), ("/v2/", "v3.20170615"), ("/v1", "v1.20160915")):
        resp = await gw.client.get(path, headers={"X-Sorna-Version": version})
        assert resp.status == 200
        assert (await resp.json())["version"] == "v3.20170615"
        assert resp.headers["Server"].startswith("Sorna-API/")
        assert int(resp.headers["X-RateLimit-Limit"]) > 0
        assert "X-RateLimit-Remaining" in resp.headers
        assert int(resp.headers["X-RateLimit-Reset"]) == 900_000


async def test_authorize_echo_and_problem_bodies(gateway_factory):
    gw = await gateway_factory()
    status, headers, body = await gw.request("GET", "/v2/authorize")
    assert status == 200 and body == {"authorized": "yes"}
    assert headers["X-RateLimit-Limit"] == "1000"
    assert int(headers["X-RateLimit-Remaining"]) == 999
    status, _, body = await gw.request("POST", "/v2/authorize", {"echo": "hi there"})
    assert status == 200 and body == {"authorized": "yes", "echo": "hi there"}
    # the other keypair, and HMAC-SHA1 style shapes use the same code path
    status, _, body = await gw.request("GET", "/v2/authorize", access_key=OTHER_ACCESS,
                                       secret=OTHER_SECRET)
    assert status == 200

    # unknown paths and wrong methods are problems too
    resp = await gw.client.get("/v2/nothing/here", headers=VERSION_HEADERS)
    assert resp.status == 404
    assert resp.content_type == "application/problem+json"
    assert (await resp.json())["type"] == PROBLEM + "generic-not-found"
    assert resp.headers["Server"].startswith("Sorna-API/")
    resp = await gw.client.get("/")
    assert resp.status == 404 and (await resp.json())["type"] == PROBLEM + "generic-not-found"
    status, headers, body = await gw.request("PUT", "/v2/authorize")
    assert status == 405 and body["type"] == PROBLEM + "method-not-allowed"
    assert "X-RateLimit-Remaining" in headers


async def test_version_header_checks_and_method_override(gateway_factory):
    gw = await gateway_factory()
    # v1 revision on a /v2 path, and a v2 revision on a /v1 path
    status, _, body = await gw.request("GET", "/v2/authorize", version="v1.20160915")
    assert status == 400 and body["type"] == PROBLEM + "invalid-api-params"
    assert "does not match" in body["detail"]
    status, _, body = await gw.request("GET", "/v1/authorize", version="v2.20170315")
    assert status == 400 and body["type"] == PROBLEM + "invalid-api-params"
    status, _, body = await gw.request("GET", "/v2/authorize", version="v9.20990101")
    assert status == 400 and "Unsupported API version" in body["detail"]
    # v3 revisions use /v2 paths; v1 revisions use /v1 paths
    status, _, _ = await gw.request("GET", "/v2/authorize", version="v3.20170615")
    assert status == 200
    status, _, _ = await gw.request("GET", "/v1/authorize", version="v1.20160915")
    assert status == 200
    # X-Method-Override counts when it was signed: the signature covers the
    # effective method.  A POST that acts as PUT is refused like a PUT ...
    async def overridden(signed: str, override: str) -> tuple[int, dict]:
        headers = {**gw.sign_headers(signed, "/v2/authorize"), "X-Method-Override": override}
        async with gw.client.post("/v2/authorize", headers=headers) as resp:
            return resp.status, await resp.json()
    status, body = await overridden("PUT", "PUT")
    assert status == 405 and body["type"] == PROBLEM + "method-not-allowed"
    status, body = await overridden("GET", "get")
    assert status == 200 and body == {"authorized": "yes"}
    # ... and an override the signature does not cover is refused
    status, body = await overridden("POST", "GET")
    assert status == 401 and body["type"] == PROBLEM + "auth-failed"


async def test_bad_credentials(gateway_factory):
    gw = await gateway_factory()
    # no Authorization header at all
    resp = await gw.client.get("/v2/authorize", headers={"X-Sorna-Version": "v2.20170315"})
    assert resp.status == 401
    assert (await resp.json())["type"] == PROBLEM + "auth-failed"
    assert resp.headers["X-RateLimit-Limit"]
    # wrong secret
    status, _, body = await gw.request("GET", "/v2/authorize", secret="x" * 40)
    assert status == 401 and body["type"] == PROBLEM + "auth-failed"
    # unknown key
    status, _, body = await gw.request("GET", "/v2/authorize", access_key="AKIANOSUCHKEY0000000")
    assert status == 401 and body["type"] == PROBLEM + "auth-failed"
    # body changed after signing
    headers = gw.sign_headers("POST", "/v2/authorize", b'{"echo": 1}')
    resp = await gw.client.post("/v2/authorize", data=b'{"echo": 2}', headers=headers)
    assert resp.status == 401
    # stale and future dates
    for skew in (timedelta(minutes=-16), timedelta(minutes=16)):
        status, _, body = await gw.request("GET", "/v2/authorize",
                                           date=datetime.now(UTC) + skew)
        assert status == 400 and body["type"] == PROBLEM + "invalid-auth-params"
    # garbage headers
    for auth in ("Basic abc", "Sorna signMethod=HMAC-MD4, credential=A:B",
                 "Sorna signMethod=HMAC-SHA256", "Sorna"):
        headers = gw.sign_headers("GET", "/v2/authorize")
        headers["Authorization"] = auth
        resp = await gw.client.get("/v2/authorize", headers=headers)
        assert resp.status == 400, auth
        assert (await resp.json())["type"] == PROBLEM + "invalid-auth-params"
    headers = gw.sign_headers("GET", "/v2/authorize")
    headers["Date"] = "yesterday-ish"
    resp = await gw.client.get("/v2/authorize", headers=headers)
    assert resp.status == 400


async def test_rfc1123_date_and_x_sorna_date(gateway_factory):
    gw = await gateway_factory()
    now = datetime.now(UTC)
    rfc = email.utils.format_datetime(now, usegmt=True)
    signature = client_signature("GET", "/v2/authorize", rfc, gw.host, "application/json", b"",
                                 "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
                                 day=now.strftime("%Y%m%d"))
    headers = {"X-Sorna-Date": rfc, "X-Sorna-Version": "v2.20170315",
               "Content-Type": "application/json",
               "Authorization": f"Sorna signMethod=HMAC-SHA256, "
                                f"credential={EXAMPLE_ACCESS}:{signature}"}
    resp = await gw.client.get("/v2/authorize", headers=headers)
    assert resp.status == 200, await resp.text()


async def test_deactivation_takes_effect_within_the_cache_ttl(gateway_factory):
    gw = await gateway_factory(keypair_cache_ttl=0.5)
    status, _, _ = await gw.request("GET", "/v2/authorize", access_key=OTHER_ACCESS,
                                    secret=OTHER_SECRET)
    assert status == 200
    await keypair_api.deactivate_keypair(gw.app[keys.DB], OTHER_ACCESS)
    started = time.monotonic()

    async def refused() -> bool:
        status, _, body = await gw.request("GET", "/v2/authorize", access_key=OTHER_ACCESS,
                                           secret=OTHER_SECRET)
        return status == 401 and "not active" in body["detail"]
    await wait_for(refused, timeout=5)
    assert time.monotonic() - started < 2.0


async def test_malformed_bodies_are_400_never_500(gateway_factory):
    gw = await gateway_factory()
    cases = [
        b"{not json",
        b"[1, 2]",
        json.dumps({"lang": 3, "clientSessionToken": "abcdefghij"}).encode(),
        json.dumps({"lang": "python3", "clientSessionToken": "short"}).encode(),
        json.dumps({"lang": "python3", "clientSessionToken": "x" * 81}).encode(),
        json.dumps({"lang": "python3", "clientSessionToken": "abcdefghij",
                    "limits": {"maxMem": "lots"}}).encode(),
        json.dumps({"lang": "python3", "clientSessionToken": "abcdefghij",
                    "limits": {"execTimeout": "10"}}).encode(),
        json.dumps({"lang": "python3", "clientSessionToken": "abcdefghij",
                    "mounts": "notalist"}).encode(),
        json.dumps({"lang": "../etc", "clientSessionToken": "abcdefghij"}).encode(),
        b"\xff\xfe\x00",
        # found by the property tests: these used to be 500s
        json.dumps({"lang": "python3", "clientSessionToken": "abcdefghij",
                    "limits": {"maxMem": "inf"}}).encode(),
        b"[" * 100_000 + b"]" * 100_000,
    ]
    for raw in cases:
        status, headers, body = await gw.request("POST", "/v2/kernel/create", raw=raw)
        assert status == 400, (raw, body)
        assert body["type"] == PROBLEM + "invalid-api-params", raw
        assert "X-RateLimit-Remaining" in headers
    status, _, body = await gw.request("POST", "/v2/kernel/abc", raw=b'{"mode": "fly"}')
    assert status == 400 and body["type"] == PROBLEM + "invalid-api-params"
    status, _, body = await gw.request("POST", "/v2/kernel/abc", raw=b'{"code": 12}')
    assert status == 400
    # an oversized body is refused with a problem body too
    big = b'{"echo": "' + b"x" * (17 << 20) + b'"}'
    status, _, body = await gw.request("POST", "/v2/authorize", raw=big)
    assert status == 413 and body["type"].startswith(PROBLEM)


async def test_rate_limit_exhaustion_429_and_reset(gateway_factory):
    gw = await gateway_factory(rate_limit_window=2.0)
    async with gw.app[keys.DB].begin() as conn:
        await conn.execute(sa.update(keypairs).where(keypairs.c.access_key == OTHER_ACCESS)
                           .values(rate_limit=5))
    seen = []
    for _ in range(5):
        status, headers, _ = await gw.request("GET", "/v2/authorize", access_key=OTHER_ACCESS,
                                              secret=OTHER_SECRET)
        assert status == 200
        seen.append(int(headers["X-RateLimit-Remaining"]))
    assert seen == [4, 3, 2, 1, 0]
    status, headers, body = await gw.request("GET", "/v2/authorize", access_key=OTHER_ACCESS,
                                             secret=OTHER_SECRET)
    assert status == 429 and body["type"] == PROBLEM + "rate-limit-exceeded"
    assert headers["X-RateLimit-Remaining"] == "0" and headers["X-RateLimit-Limit"] == "5"
    reset_ms = int(headers["X-RateLimit-Reset"])
    assert 0 < reset_ms <= 2000
    # another key is not affected (counted separately)
    status, _, _ = await gw.request("GET", "/v2/authorize")
    assert status == 200
    await asyncio.sleep(reset_ms / 1000 + 0.1)
    status, headers, _ = await gw.request("GET", "/v2/authorize", access_key=OTHER_ACCESS,
                                          secret=OTHER_SECRET)
    assert status == 200 and int(headers["X-RateLimit-Remaining"]) >= 0


async def test_concurrent_requests_never_over_admit(gateway_factory):
    gw = await gateway_factory()
    async with gw.app[keys.DB].begin() as conn:
        await conn.execute(sa.update(keypairs).where(keypairs.c.access_key == OTHER_ACCESS)
                           .values(rate_limit=10))
    results = await asyncio.gather(*(gw.request("GET", "/v2/authorize", access_key=OTHER_ACCESS,
                                                secret=OTHER_SECRET) for _ in range(25)))
    statuses = sorted(status for status, _, _ in results)
    assert statuses.count(200) == 10 and statuses.count(429) == 15


async def test_keypair_activity_is_batched(gateway_factory):
    gw = await gateway_factory()
    for _ in range(3):
        status, _, _ = await gw.request("GET", "/v2/authorize", access_key=OTHER_ACCESS,
                                        secret=OTHER_SECRET)
        assert status == 200
    query = sa.select(keypairs.c.num_queries).where(keypairs.c.access_key == OTHER_ACCESS)
    assert await gw.scalar(query) == 0  # not one write per request
    assert gw.app[keys.ACTIVITY].pending == 3
    await gw.app[keys.ACTIVITY].flush()
    assert await gw.scalar(query) == 3
    last_used = await gw.scalar(sa.select(keypairs.c.last_used)
                                .where(keypairs.c.access_key == OTHER_ACCESS))
    assert last_used is not None
