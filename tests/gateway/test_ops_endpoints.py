"""Operations endpoints and what every response carries: /healthz, /readyz,
/metrics, the version check, X-Request-ID and CORS, on the real app with real
Redis, database and agents."""
from __future__ import annotations

import asyncio
import re
import uuid

import pytest
import zmq
import zmq.asyncio
from prometheus_client.parser import text_string_to_metric_families

from sorna_server import keypairs as keypair_api
from sorna_server.gateway import keys
from tests.helpers import (
    OTHER_ACCESS,
    OTHER_SECRET,
    PROBLEM,
    VERSION,
    VERSION_HEADERS,
    PrivateRedis,
    free_port,
    wait_for,
)


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for item in family.samples:
            if item.name == name and all(item.labels.get(k) == v for k, v in labels.items()):
                return float(item.value)
    return 0.0


async def scrape(gw) -> str:
    resp = await gw.client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    return await resp.text()


# --- health -------------------------------------------------------------------

async def test_healthz_and_readyz_need_no_signature_nor_version(gateway_factory):
    gw = await gateway_factory()
    resp = await gw.client.get("/healthz")
    assert resp.status == 200 and await resp.json() == {"status": "ok"}
    # no agent yet: not ready, and the body names the failed check
    resp = await gw.client.get("/readyz")
    assert resp.status == 503
    body = await resp.json()
    assert body["status"] == "unavailable" and body["failed"] == ["agents"]
    assert body["checks"]["database"]["ok"] and body["checks"]["redis"]["ok"]
    assert "no live agent" in body["checks"]["agents"]["detail"]


async def test_readyz_turns_ready_with_an_agent_and_not_when_it_drains(gateway_factory):
    gw = await gateway_factory(agents=1)
    resp = await gw.client.get("/readyz")
    body = await resp.json()
    assert resp.status == 200, body
    assert body == {"status": "ready", "failed": [], "checks": body["checks"]}
    assert "1 live agent(s)" in body["checks"]["agents"]["detail"]
    registry = gw.app[keys.REGISTRY]
    await registry.set_draining(gw.agents[0].instance_id, True)
    resp = await gw.client.get("/readyz")
    assert resp.status == 503 and (await resp.json())["failed"] == ["agents"]


async def test_readyz_names_redis_when_it_is_down(gateway_factory, tmp_path):
    redis = PrivateRedis(free_port(), tmp_path)
    redis.start()
    try:
        gw = await gateway_factory(redis_url=redis.url)
        redis.stop()
        resp = await gw.client.get("/readyz")
        body = await resp.json()
        assert resp.status == 503
        assert "redis" in body["failed"] and "database" not in body["failed"]
        assert body["checks"]["redis"]["detail"]
        resp = await gw.client.get("/healthz")  # the process still serves
        assert resp.status == 200
    finally:
        redis.stop()


# --- the historic version check --------------------------------------------------

async def test_a_request_without_version_header_is_a_generic_bad_request(gateway_factory):
    gw = await gateway_factory()
    for method, path in (("GET", "/v2"), ("GET", "/v1"), ("POST", "/v2/kernel/create"),
                         ("GET", "/v2/authorize"), ("DELETE", "/v2/kernel/abc")):
        resp = await gw.client.request(method, path)
        assert resp.status == 400, path
        problem = await resp.json()
        assert problem["type"] == PROBLEM + "generic-bad-request"
        assert problem["detail"] == "API version missing in headers."
        assert resp.content_type == "application/problem+json"
    resp = await gw.client.get("/v2", headers=VERSION_HEADERS)
    assert resp.status == 200
    # the operations endpoints are outside the versioned API
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        resp = await gw.client.get(path)
        assert resp.status in (200, 503), path
        assert resp.content_type != "application/problem+json", path


# --- X-Request-ID -------------------------------------------------------------

async def test_request_id_is_echoed_kept_or_replaced(gateway_factory):
    gw = await gateway_factory()
    resp = await gw.client.get("/v2", headers={**VERSION_HEADERS, "X-Request-ID": "abc-123.x"})
    assert resp.headers["X-Request-ID"] == "abc-123.x"
    ids = set()
    for headers in ({}, {"X-Request-ID": "bad id with spaces"}, {"X-Request-ID": "x" * 129},
                    {"X-Request-ID": "-starts-with-dash"}, {"X-Request-ID": "a\tb"}):
        resp = await gw.client.get("/v2", headers={**VERSION_HEADERS, **headers})
        rid = resp.headers["X-Request-ID"]
        assert re.fullmatch(r"[0-9a-f]{24}", rid), rid
        ids.add(rid)
    assert len(ids) == 5  # a new one each time
    # errors carry it too: unknown path, unsigned call, missing version, bad body
    for method, path, headers in (("GET", "/nowhere", {}),
                                  ("GET", "/v2/authorize", VERSION_HEADERS), ("GET", "/v2", {}),
                                  ("POST", "/v2/kernel/create", VERSION_HEADERS)):
        resp = await gw.client.request(method, path, headers={**headers, "X-Request-ID": "err-1"})
        assert resp.status >= 400
        assert resp.headers["X-Request-ID"] == "err-1", path
    status, headers, body = await gw.request("POST", "/v2/kernel/create", {"lang": "x"},
                                             headers={"X-Request-ID": "err-2"})
    assert status == 400 and headers["X-Request-ID"] == "err-2"



async def test_request_id_reaches_the_agent_log(gateway_factory):
    """One failing request can be followed from the gateway to the agent."""
    gw = await gateway_factory(agents=1)
    status, headers, body = await gw.request(
        "POST", "/v2/kernel/create", {"lang": "python3", "clientSessionToken": "trace-token-1"},
        headers={"X-Request-ID": "trace-4242"})
    assert status == 201 and headers["X-Request-ID"] == "trace-4242", body
    kernel_id = body["kernelId"]
    agent = gw.agents[0]
    await wait_for(lambda: "[trace-4242]" in agent.log() and kernel_id in agent.log())
    line = next(line for line in agent.log().splitlines() if "[trace-4242]" in line)
    assert kernel_id in line, line


# --- metrics ------------------------------------------------------------------

async def test_metrics_count_requests_by_route_and_refused_creates(gateway_factory):
    gw = await gateway_factory(agents=1)
    before = await scrape(gw)
    for _ in range(3):
        status, _, _ = await gw.request("GET", "/v2/authorize")
        assert status == 200
    # refused creates: a language no agent offers, and the quota of the other key (2)
    status, _, body = await gw.request("POST", "/v2/kernel/create", {
        "lang": "cobol", "clientSessionToken": uuid.uuid4().hex})
    assert status == 503 and body["reason"] == "language-not-offered"
    kernel_id = await gw.create_kernel("python3")
    status, result = await gw.execute(kernel_id, "print(6*7)")
    assert status == 200
    after = await scrape(gw)

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert delta("sorna_http_requests_total", route="/v2/authorize", method="GET",
                 status="200") == 3
    assert delta("sorna_http_request_duration_seconds_count", route="/v2/authorize",
                 method="GET") == 3
    assert delta("sorna_http_requests_total", route="/v2/kernel/{kernel_id}", method="POST",
                 status="200") >= 1  # ids never become label values
    assert "kernel_id=" not in after and kernel_id not in after
    assert delta("sorna_kernel_creates_refused_total", reason="language") == 1
    assert delta("sorna_executions_total", lang="python3", mode="query",
                 outcome="finished") >= 1
    # values read from the registry at scrape time
    assert sample(after, "sorna_kernels", state="RUNNING", lang="python3") == 1
    assert sample(after, "sorna_agents", state="running") == 1
    instance = gw.agents[0].instance_id
    assert sample(after, "sorna_agent_load", instance=instance) == 1
    assert sample(after, "sorna_agent_capacity", instance=instance) > 1
    assert sample(after, "sorna_build_info") == 1


async def test_metrics_count_settlements_events_and_dropped_frames(gateway_factory):
    gw = await gateway_factory(agents=1)
    before = await scrape(gw)
    kernel_id = await gw.create_kernel("python3")
    status, _, _ = await gw.request("DELETE", f"/v2/kernel/{kernel_id}")
    assert status == 204
    intake = gw.app[keys.INTAKE]
    received = intake.received
    push = zmq.asyncio.Context.instance().socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(f"tcp://127.0.0.1:{gw.config.events_port}")
    try:
        await push.send(b"not msgpack at all")
        await wait_for(lambda: intake.received > received and intake.dropped >= 1)
    finally:
        push.close(0)
    after = await scrape(gw)

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    # the destroy request and the agent's kernel_terminated race to settle: one of them does
    assert sum(delta("sorna_kernel_settlements_total", path=path, status="TERMINATED")
               for path in ("destroy", "event")) == 1
    assert delta("sorna_agent_events_dropped_total", reason="malformed") == 1

    async def terminated_event_counted() -> bool:  # the agent's own report of the destroy
        return sample(await scrape(gw), "sorna_agent_events_total",
                      type="kernel_terminated") > sample(before, "sorna_agent_events_total",
                                                         type="kernel_terminated")
    await wait_for(terminated_event_counted)


async def test_metrics_count_timeouts_quota_and_rate_refusals(gateway_factory):
    gw = await gateway_factory(agents=1, agent_flags={"exec_timeout": 1})
    before = await scrape(gw)
    kernel_id = await gw.create_kernel("python3")
    status, problem = await gw.execute(kernel_id, "while True: pass")
    assert status == 500 and problem["agentError"]["type"] == "execution-timeout"
    # the other keypair may run 2 kernels: the third is refused by quota
    for _ in range(2):
        await gw.create_kernel("python3", access_key=OTHER_ACCESS, secret=OTHER_SECRET)
    status, _, body = await gw.request("POST", "/v2/kernel/create", {
        "lang": "python3", "clientSessionToken": uuid.uuid4().hex},
        access_key=OTHER_ACCESS, secret=OTHER_SECRET)
    assert status == 412
    # a keypair allowed 2 requests per window: its third create is refused by rate
    access, secret = "AKIARATELIMITED00001", "r" * 40
    await keypair_api.create_keypair(gw.app[keys.DB], 5, rate_limit=2, access_key=access,
                                     secret_key=secret)
    statuses = []
    for _ in range(3):
        status, _, _ = await gw.request("POST", "/v2/kernel/create", {
            "lang": "cobol", "clientSessionToken": uuid.uuid4().hex},
            access_key=access, secret=secret)
        statuses.append(status)
    assert statuses == [503, 503, 429]
    after = await scrape(gw)
    assert sample(after, "sorna_executions_total", lang="python3", mode="query",
                  outcome="timeout") - sample(before, "sorna_executions_total", lang="python3",
                                              mode="query", outcome="timeout") == 1
    for reason, count in (("quota", 1), ("rate", 1), ("language", 2)):
        assert sample(after, "sorna_kernel_creates_refused_total", reason=reason) - \
            sample(before, "sorna_kernel_creates_refused_total", reason=reason) == count, reason


async def test_metrics_can_move_or_be_turned_off(gateway_factory):
    gw = await gateway_factory(metrics_enabled=False)
    resp = await gw.client.get("/metrics")
    assert resp.status == 404 and (await resp.json())["type"] == PROBLEM + "generic-not-found"
    gw = await gateway_factory(metrics_addr="127.0.0.1:9", prepare=False)
    resp = await gw.client.get("/metrics")
    assert resp.status == 404  # served by the separate listener (see test_live_server)


# --- CORS ---------------------------------------------------------------------

PREFLIGHT = {"Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type, x-sorna-version"}


async def test_cors_preflight_only_for_configured_origins(gateway_factory):
    gw = await gateway_factory(cors_origins="https://app.example, https://other.example")
    resp = await gw.client.options("/v2/kernel/create",
                                   headers={"Origin": "https://app.example", **PREFLIGHT})
    assert resp.status == 200  # no signature, no version header
    assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "POST" in resp.headers["Access-Control-Allow-Methods"]
    assert "x-sorna-version" in resp.headers["Access-Control-Allow-Headers"]
    assert resp.headers["Vary"] == "Origin"
    assert resp.headers["X-Request-ID"]

    resp = await gw.client.options("/v2/kernel/create",
                                   headers={"Origin": "https://evil.example", **PREFLIGHT})
    assert resp.status in (400, 401)
    assert "Access-Control-Allow-Origin" not in resp.headers

    # the real call from an allowed origin is signed as usual and exposes our headers
    status, headers, _ = await gw.request("GET", "/v2/authorize",
                                          headers={"Origin": "https://other.example"})
    assert status == 200
    assert headers["Access-Control-Allow-Origin"] == "https://other.example"
    assert "X-RateLimit-Remaining" in headers["Access-Control-Expose-Headers"]
    resp = await gw.client.get("/v2/authorize", headers={"Origin": "https://app.example",
                                                         "X-Sorna-Version": VERSION})
    assert resp.status == 401  # an allowed origin does not replace the signature


async def test_no_cors_without_configured_origins(gateway_factory):
    gw = await gateway_factory()
    resp = await gw.client.options("/v2/authorize",
                                   headers={"Origin": "https://app.example", **PREFLIGHT})
    assert resp.status >= 400 and "Access-Control-Allow-Origin" not in resp.headers


async def test_cors_origins_are_validated(make_config):
    from sorna_server.config import ConfigError
    with pytest.raises(ConfigError, match="cors_origins"):
        make_config(cors_origins="app.example")
    assert make_config(cors_origins="*").cors_origins == ["*"]


async def test_metrics_scrape_survives_a_registry_outage(gateway_factory, tmp_path):
    redis = PrivateRedis(free_port(), tmp_path)
    redis.start()
    try:
        gw = await gateway_factory(redis_url=redis.url)
        await scrape(gw)
        redis.stop()
        text = await asyncio.wait_for(scrape(gw), 15)
        assert "sorna_http_requests_total" in text
        assert "sorna_agents{" not in text  # left out of this scrape, not made up
    finally:
        redis.stop()
