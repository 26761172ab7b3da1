"""The API contract: the OpenAPI document, bounded request models (the known 500s),
`GET /languages`, and the request id travelling to the agent."""
from __future__ import annotations

import asyncio
import json
import uuid

import pytest
import zmq
import zmq.asyncio
from openapi_spec_validator import validate

from sorna_server import agent_protocol as proto
from sorna_server.gateway import keys
from sorna_server.gateway.languages import language_offers
from sorna_server.gateway.openapi import all_problem_classes
from sorna_server.gateway.routing import API_PREFIXES, API_ROUTES
from sorna_server.registry import Instance
from tests.helpers import PROBLEM, free_port, info, stdout_of, wait_for

# --- the document ---------------------------------------------------------------


async def test_openapi_document_is_valid_and_covers_every_route(gateway_factory):
    gw = await gateway_factory()
    resp = await gw.client.get("/openapi.json")
    assert resp.status == 200
    doc = await resp.json()
    validate(doc)  # OpenAPI 3.1 (openapi-spec-validator)
    assert doc["openapi"].startswith("3.1")

    served = {r.resource.canonical for r in gw.app.router.routes() if r.resource is not None}
    documented = set(doc["paths"])
    aliases = {prefix + alias for route in API_ROUTES for alias in route.aliases
               for prefix in API_PREFIXES}
    assert served - aliases == documented

    # each documented operation is served with that method
    for path, item in doc["paths"].items():
        for method in item:
            op = item[method]
            assert op["responses"], (path, method)
            if path.startswith(("/v1", "/v2")):
                version = next(p for p in op["parameters"] if p["name"] == "X-Sorna-Version")
                assert version["required"] and version["in"] == "header"
                assert op["security"] == ([] if path in ("/v1", "/v2")
                                          else [{"sornaSignature": []}])
                assert "400" in op["responses"] and "500" in op["responses"]
    assert "HMAC" in doc["components"]["securitySchemes"]["sornaSignature"]["description"]
    # every problem type of the code is in the document
    types = set(doc["components"]["schemas"]["ProblemType"]["enum"])
    assert {PROBLEM + p.name for p in all_problem_classes()} == types
    assert PROBLEM + "quota-exceeded" in json.dumps(
        doc["paths"]["/v2/kernel/create"]["post"]["responses"]["412"])
    # the bounds of the models are in the document
    schemas = json.dumps(doc["components"]["schemas"])
    assert str((1 << 64) - 1) in schemas and str((1 << 31) - 1) in schemas
    assert str(1 << 50) in schemas


async def test_document_without_metrics_route_when_moved(gateway_factory):
    gw = await gateway_factory(metrics_enabled=False)
    doc = await (await gw.client.get("/openapi.json")).json()
    assert "/metrics" not in doc["paths"] and "/healthz" in doc["paths"]


# --- the three known 500s, and other input msgpack or UTF-8 cannot carry -----------

async def test_bounds_stop_values_agents_cannot_receive(gateway_factory):
    gw = await gateway_factory(agents=1)
    # limits.maxMem of 10**30: an integer msgpack cannot pack
    for limits in ({"maxMem": 10**30}, {"maxMem": "1e30"}, {"maxMem": "99999999999t"},
                   {"maxMem": -1}, {"execTimeout": 10**20}):
        status, _, problem = await gw.request("POST", "/v2/kernel/create", {
            "lang": "python3", "clientSessionToken": uuid.uuid4().hex, "limits": limits})
        assert status == 400, (limits, problem)
        assert problem["type"] == PROBLEM + "invalid-api-params"
    kernel_id = await gw.create_kernel("python3")
    # options.col of 10**20 in complete mode
    for options in ({"col": 10**20}, {"row": -1}, {"line": 5}):
        status, problem = await gw.execute(kernel_id, "pri", mode="complete", options=options)
        assert status == 400, (options, problem)
        assert problem["type"] == PROBLEM + "invalid-api-params"
    # other options travel as they are (integers beyond 64 bits as numbers)
    status, body = await gw.execute(kernel_id, "pri", mode="complete",
                                    options={"col": 3, "extra": {"deep": [10**30, "x"]}})
    assert status == 200 and "print(" in body["result"]["completions"]
    status, body = await gw.execute(kernel_id, "print('still here')")
    assert status == 200 and stdout_of(body["result"]) == "still here\n"


async def test_malformed_json_bodies_are_400s(gateway_factory):
    gw = await gateway_factory()
    bodies = [
        b'{"echo": ' * 100_000 + b"1" + b"}" * 100_000,     # RecursionError in the parser
        b"[" * 100_000,
        b'{"echo": ' + b"[" * 40 + b"]" * 40 + b"}",         # deeper than 32 levels
        b'{"echo": "\\ud800"}',                              # a lone surrogate
        b'{"echo": "\xed\xa0\x80"}',                         # an encoded surrogate
        b'{"echo": NaN}', b'{"echo": Infinity}',
        b"\xff\xfe{}",
    ]
    for raw in bodies:
        status, headers, problem = await gw.request("POST", "/v2/authorize", raw=raw)
        assert status == 400, (raw[:40], problem)
        assert problem["type"] == PROBLEM + "invalid-api-params"
        assert headers["X-Request-ID"]
    # a lone surrogate in a session token would reach Redis: refused
    raw = b'{"lang": "python3", "clientSessionToken": "abcdefgh\\udc00"}'
    status, _, problem = await gw.request("POST", "/v2/kernel/create", raw=raw)
    assert status == 400, problem
    # what is fine stays fine: a proper surrogate pair, moderate nesting
    raw = b'{"echo": {"a": [[["\\ud83d\\ude00"]]]}}'
    status, _, body = await gw.request("POST", "/v2/authorize", raw=raw)
    assert status == 200 and body["echo"] == {"a": [[["\U0001F600"]]]}


# --- /languages --------------------------------------------------------------------

def _instance(iid: str, languages: list[str], draining: bool = False) -> Instance:
    return Instance(id=iid, addr="tcp://127.0.0.1:1", status="running", max_kernels=4,
                    num_kernels=0, languages=languages, version="1.0", last_heartbeat=0.0,
                    draining=draining)


def test_language_offers_fold_aliases_and_count_agents(make_config):
    config = make_config()
    described = {"python3": {"version": "3.11.2", "limits": {"max_mem": 1 << 28,
                                                            "exec_timeout": 5}},
                 "python": {"alias_of": "python3"}, "bash": {"version": "5.2"}}
    offers = language_offers([(_instance("i-a", ["bash", "python", "python3"]), described),
                              (_instance("i-b", ["python3"], draining=True), {}),
                              (_instance("i-c", ["c"]), {})], config)
    by_name = {offer.name: offer for offer in offers}
    assert list(by_name) == ["bash", "c", "python3"]
    py = by_name["python3"]
    assert py.aliases == ["python"] and py.versions == ["3.11.2"]
    assert py.agents == 2 and py.accepting == 1
    assert py.defaultLimits.maxMem == 1 << 28 and py.defaultLimits.execTimeout == 5
    # without reported limits: the gateway's configured agent defaults
    assert by_name["c"].defaultLimits.maxMem == config.agent_max_mem
    assert by_name["c"].versions == [] and by_name["c"].aliases == []


async def test_languages_route_lists_what_live_agents_offer(gateway_factory):
    gw = await gateway_factory(agents=1)
    status, _, body = await gw.request("GET", "/v2/languages")
    assert status == 200, body
    names = {offer["name"]: offer for offer in body["languages"]}
    assert {"python3", "bash"} <= set(names)
    assert names["python3"]["agents"] == 1 and names["python3"]["accepting"] == 1
    status, _, body = await gw.request("GET", "/v1/languages", version="v1.20160915")
    assert status == 200 and body["languages"]
    # the reference agent reports aliases, interpreter versions and default limits
    python3 = names["python3"]
    assert "python" in python3["aliases"] and "python" not in names
    assert len(python3["versions"]) == 1 and python3["versions"][0].startswith("3.")
    limits = python3["defaultLimits"]
    assert 32 << 20 <= limits["maxMem"] <= 512 << 20 and 0 < limits["execTimeout"] <= 10
    # unsigned: refused like every signed route
    resp = await gw.client.get("/v2/languages", headers={"X-Sorna-Version": "v2.20170315"})
    assert resp.status == 401


# --- the request id travels to the agent ---------------------------------------------

class PlayedAgent:
    """An agent played over real ZeroMQ: heartbeats to the gateway, a ROUTER that
    records each RPC request and answers create_kernel."""

    def __init__(self, events_port: int):
        self.ctx = zmq.asyncio.Context()
        self.port = free_port()
        self.addr = f"tcp://127.0.0.1:{self.port}"
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.bind(self.addr)
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.connect(f"tcp://127.0.0.1:{events_port}")
        self.requests: list[proto.Request] = []
        self.tasks = [asyncio.create_task(self._serve()), asyncio.create_task(self._beat())]

    async def _beat(self) -> None:
        while True:
            await self.push.send(proto.encode_event(
                "instance_heartbeat", "i-played", info=info(self.addr, languages=("python3",)),
                running_kernels=[], interval=0.5))
            await asyncio.sleep(0.5)

    async def _serve(self) -> None:
        while True:
            ident, frame = await self.router.recv_multipart()
            request = proto.decode_request(frame)
            self.requests.append(request)
            result = {"kernel_id": request.args.get("kernel_id"), "stdin_port": 1,
                      "stdout_port": 2} if request.method == "create_kernel" else {}
            await self.router.send_multipart([ident, proto.encode_result(request.id, result)])

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.router.close(0)
        self.push.close(0)
        self.ctx.term()


@pytest.fixture
async def played_gateway(gateway_factory):
    gw = await gateway_factory()
    agent = PlayedAgent(gw.config.events_port)
    registry = gw.app[keys.REGISTRY]

    async def registered() -> bool:
        return any(i.addr == agent.addr for i in await registry.list_instances())
    try:
        await wait_for(registered)
        yield gw, agent
    finally:
        await agent.close()


async def test_the_request_id_travels_in_agent_calls(played_gateway):
    gw, agent = played_gateway
    status, headers, body = await gw.request("POST", "/v2/kernel/create", {
        "lang": "python3", "clientSessionToken": uuid.uuid4().hex},
        headers={"X-Request-ID": "trace-create-7"})
    assert status == 201, body
    create = [r for r in agent.requests if r.method == "create_kernel"]
    assert [r.request_id for r in create] == ["trace-create-7"]
    # without a client id, the agent gets the one the gateway made (and echoed)
    status, headers, _ = await gw.request("DELETE", f"/v2/kernel/{body['kernelId']}")
    assert status == 204
    destroy = [r for r in agent.requests if r.method == "destroy_kernel"]
    assert destroy[-1].request_id == headers["X-Request-ID"]


def test_request_id_field_is_optional_in_the_protocol():
    old = proto.pack({"v": 1, "id": 1, "method": "ping", "args": {}})  # an old manager
    assert proto.decode_request(old).request_id is None
    for bad in (5, "", "x" * 129, "a\nb"):
        frame = proto.pack({"v": 1, "id": 1, "method": "ping", "args": {}, "request_id": bad})
        assert proto.decode_request(frame).request_id is None  # ignored, never refused
    frame = proto.encode_request(3, "ping", {}, request_id="r-1")
    assert proto.decode_request(frame).request_id == "r-1"
