"""The API against its own OpenAPI document, on a live `sorna serve --standalone`
(embedded Redis and SQLite, a real reference agent), with schemathesis.

Every operation of /v2 and the operations endpoints gets generated requests,
valid and invalid, each signed by a requests auth hook exactly as the historic
client signs.  A response fails the test when it is an undocumented status, an
undocumented content type, misses a documented header, breaks its schema, or is
a 500 that is not an agent failure (`internal-server-error`).  Creates use real
languages most of the time and the created kernels are destroyed at once (so
slots stay free and values reach the agent); executes and uploads go to a real
kernel.  The same live server also checks the request id in the JSON access
log and metrics across two workers is in `test_metrics_add_up_across_workers`.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.helpers import (
    PROBLEM,
    VERSION_HEADERS,
    ServeProcess,
    client_signature,
    free_port,
    stop_process,
)

pytestmark = pytest.mark.slow

EXAMPLES = {GenerationMode.POSITIVE: 12, GenerationMode.NEGATIVE: 8}
MORE_EXAMPLES = {"POST /v2/kernel/create": 40, "POST /v2/kernel/{kernel_id}": 40}
LANGUAGES = ("python3", "bash")
AGENT_FAILURES = {PROBLEM + name for name in (
    "kernel-creation-failed", "kernel-execution-failed", "kernel-restart-failed",
    "kernel-destruction-failed")}


class SornaSigner(requests.auth.AuthBase):
    """Signs each prepared request (method, path, date, host, content type, version, body)."""

    def __init__(self, access_key: str, secret_key: str):
        self.access_key = access_key
        self.secret_key = secret_key

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers.setdefault("Content-Type", "application/json")
        content_type = request.headers["Content-Type"].split(";")[0].strip().lower()
        body = request.body or b""
        if isinstance(body, str):
            body = body.encode()
        date = datetime.now(UTC).isoformat()
        signature = client_signature(
            request.method or "GET", request.path_url, date, urlsplit(request.url).netloc,
            content_type, body, self.secret_key,
            version=request.headers.get("X-Sorna-Version", ""))
        request.headers["Date"] = date
        request.headers["Authorization"] = (f"Sorna signMethod=HMAC-SHA256, "
                                            f"credential={self.access_key}:{signature}")
        return request


class LiveServer:
    def __init__(self, process: ServeProcess, endpoint: str, access: str, secret: str):
        self.process = process
        self.endpoint = endpoint
        self.session = requests.Session()
        self.session.auth = SornaSigner(access, secret)
        self.kernel_id = self.create("python3")

    def create(self, lang: str) -> str:
        resp = self.session.post(self.endpoint + "/v2/kernel/create", headers=VERSION_HEADERS,
                                 data=json.dumps({"lang": lang,
                                                  "clientSessionToken": uuid.uuid4().hex}))
        assert resp.status_code == 201, resp.text
        return resp.json()["kernelId"]

    def destroy(self, kernel_id: str) -> None:
        self.session.delete(f"{self.endpoint}/v2/kernel/{kernel_id}", headers=VERSION_HEADERS)

    def live_kernel(self) -> str:
        """The kernel the fuzzed executes use (made again if a request ended it)."""
        resp = self.session.get(f"{self.endpoint}/v2/kernel/{self.kernel_id}",
                                headers=VERSION_HEADERS)
        if resp.status_code == 404:
            self.kernel_id = self.create("python3")
        return self.kernel_id


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> Iterator[LiveServer]:
    folder = Path(tmp_path_factory.mktemp("live")) / "server"
    folder.mkdir()
    args = ["serve", "--standalone", "--host", "127.0.0.1", "--port", str(free_port()),
            "--manager-port", str(free_port()), "--events-port", str(free_port()),
            "--agent-port", str(free_port())]
    process = ServeProcess(folder, args, {"SORNA_LOG_FORMAT": "json",
                                          "SORNA_AGENT_EXEC_TIMEOUT": "2"})
    try:
        endpoint = process.wait_ready()
        made = subprocess.run(
            [sys.executable, "-m", "sorna_cli", "keypair", "create", "--user-id", "7",
             "--rate-limit", "1000000000", "--concurrency-limit", "8", "--json"],
            cwd=folder, capture_output=True, text=True, check=True)
        keys = json.loads(made.stdout)
        yield LiveServer(process, endpoint, keys["access_key"], keys["secret_key"])
    finally:
        stop_process(process.proc, timeout=30)


def no_internal_error(ctx: Any, response: Any, case: Any) -> None:
    """A 5xx must be a documented dependency or agent failure, never an internal error."""
    if response.status_code < 500 or response.status_code == 503:
        return
    try:
        kind = json.loads(response.content).get("type")
    except ValueError:
        kind = None
    if kind not in AGENT_FAILURES:
        raise AssertionError(f"{case.method} {case.path}: {response.status_code} {kind}: "
                             f"{response.content[:300]!r}")


CHECKS = [status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, no_internal_error]


EXTREME_INTS = (1 << 63, 1 << 64, 10**20, 10**30, -(1 << 63) - 1)
SOME_INTS = st.one_of(st.sampled_from(EXTREME_INTS), st.integers(-10, 1 << 40))


def with_extreme_ints(value: Any) -> Any:
    """A strategy: `value` with each integer kept or replaced by one past 64 bits."""
    if isinstance(value, bool) or value is None:
        return st.just(value)
    if isinstance(value, int):
        return st.one_of(st.just(value), st.sampled_from(EXTREME_INTS))
    if isinstance(value, dict):
        return st.fixed_dictionaries({k: with_extreme_ints(v) for k, v in value.items()})
    if isinstance(value, list):
        return st.tuples(*(with_extreme_ints(v) for v in value)).map(list)
    return st.just(value)


# The values that travel to the agent, filled in often (generated bodies leave
# optional members out most of the time): a create's limits, a completion's
# cursor.  Integers come from anywhere, up to well past 64 bits.
AGENT_LIMITS = st.fixed_dictionaries({
    "maxMem": st.one_of(st.sampled_from([*EXTREME_INTS, "1e30", "99999999999t", "512m"]),
                        st.integers(0, 1 << 40))},
    optional={"execTimeout": st.one_of(SOME_INTS, st.floats(allow_nan=False))})
COMPLETION = st.fixed_dictionaries({"mode": st.just("complete"), "code": st.text(max_size=20),
                                    "options": st.fixed_dictionaries({"col": SOME_INTS}, optional={
                                        "line": st.text(max_size=20), "row": SOME_INTS})})


def agent_bound(body: Any, context_label: str) -> Any:
    """A strategy for a generated body, with what reaches the agent filled in at times."""
    strategy = with_extreme_ints(body)
    if isinstance(body, dict) and "clientSessionToken" in body:  # kernel/create
        return st.tuples(strategy, st.sampled_from([*LANGUAGES, body.get("lang")]),
                         st.one_of(AGENT_LIMITS, st.none())).map(
            lambda parts: {**parts[0], "lang": parts[1],
                           **({"limits": parts[2]} if parts[2] is not None else {})})
    if context_label == "POST /v2/kernel/{kernel_id}":  # execute
        return st.one_of(COMPLETION, strategy)
    return strategy


def fuzzed_schema(live: LiveServer) -> Any:
    schema = schemathesis.openapi.from_url(live.endpoint + "/openapi.json")
    schema = schema.include(path_regex=r"^/(v2|healthz|readyz|metrics|openapi\.json)")

    @schema.hook
    def flatmap_body(context: Any, body: Any) -> Any:
        """Integers pushed past what msgpack carries; creates mostly in a language
        the agent offers, so the values reach it."""
        return agent_bound(body, context.operation.label)

    @schema.hook
    def map_path_parameters(context: Any, params: dict[str, Any]) -> dict[str, Any]:
        operation = context.operation
        if params and "kernel_id" in params and operation.method.upper() != "DELETE":
            params = {**params, "kernel_id": live.live_kernel()}
        return params

    return schema


# Values that once gave 500s (msgpack could not pack them), always tried, through the
# same calls and checks as the generated ones; and a body nested 100,000 deep, which
# no generated body reaches (the parser's recursion limit).
KNOWN_EDGES: dict[str, list[Any]] = {
    "POST /v2/kernel/create": [{"lang": "python3", "clientSessionToken": "known-edge-1",
                                "limits": {"maxMem": 10**30}}],
    "POST /v2/kernel/{kernel_id}": [{"mode": "complete", "code": "pri",
                                     "options": {"col": 10**20}}],
}
RAW_EDGES: dict[str, list[bytes]] = {
    "POST /v2/authorize": [b'{"echo": ' * 100_000 + b"1" + b"}" * 100_000],
}


def run_known_edges(live: LiveServer, schema: Any, operation: Any) -> None:
    for body in KNOWN_EDGES.get(operation.label, []):
        params = {"kernel_id": live.live_kernel()} if "{kernel_id}" in operation.path else None
        case = schema.make_case(operation=operation, body=body, headers=dict(VERSION_HEADERS),
                                path_parameters=params, media_type="application/json")
        response = case.call(base_url=live.endpoint, session=live.session, timeout=30)
        case.validate_response(response, checks=CHECKS)
    for raw in RAW_EDGES.get(operation.label, []):
        case = schema.make_case(operation=operation, headers=dict(VERSION_HEADERS))
        response = live.session.post(live.endpoint + operation.path, data=raw,
                                     headers=VERSION_HEADERS, timeout=30)
        case.validate_response(response, checks=CHECKS)


def run_operation(live: LiveServer, operation: Any, mode: GenerationMode) -> None:
    examples = EXAMPLES[mode]
    if mode is GenerationMode.POSITIVE:
        examples = MORE_EXAMPLES.get(operation.label, examples)

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        response = case.call(base_url=live.endpoint, session=live.session, timeout=30)
        case.validate_response(response, checks=CHECKS)
        if response.status_code == 201 and case.path.endswith("/kernel/create"):
            live.destroy(response.json()["kernelId"])  # keep the slots free

    run()


def test_every_operation_keeps_to_the_document(live):
    schema = fuzzed_schema(live)
    failures = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 14, [op.label for op in operations]
    for operation in operations:
        try:
            run_known_edges(live, schema, operation)
        except (Exception, BaseExceptionGroup) as exc:
            failures.append(f"{operation.label} (known edges): {exc}"[:3000])
        for mode in EXAMPLES:
            if mode is GenerationMode.NEGATIVE and not operation.path.startswith("/v2"):
                continue  # the operations endpoints take no input to get wrong
            try:
                run_operation(live, operation, mode)
            except (Exception, BaseExceptionGroup) as exc:  # report all operations together
                failures.append(f"{operation.label} ({mode.value}): {exc}"[:3000])
    assert not failures, "\n\n".join(failures)


def test_access_log_carries_the_request_id_in_json(live):
    resp = requests.get(live.endpoint + "/v2", headers={**VERSION_HEADERS,
                                                         "X-Request-ID": "live-trace-1"})
    assert resp.headers["X-Request-ID"] == "live-trace-1"

    def access_line() -> dict[str, Any] | None:  # written just after the answer is sent
        for line in live.process.log().splitlines():
            if line.startswith("{") and "live-trace-1" in line:
                return json.loads(line)
        return None

    deadline = time.monotonic() + 10
    while (access := access_line()) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert access is not None, live.process.log()[-3000:]
    assert access["logger"] == "sorna.access" and access["request_id"] == "live-trace-1"
    assert access["method"] == "GET" and access["path"] == "/v2" and access["status"] == 200
    assert access["access_key"] == "-" and access["latency_ms"] >= 0


def _requests_total(text: str, route: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "sorna_http_requests_total" and sample.labels["route"] == route:
                total += sample.value
    return total


def test_metrics_add_up_across_workers(serve):
    server, ports = serve("--standalone", "--workers", "2", name="metrics",
                          env={"SORNA_METRICS_ADDR": f"127.0.0.1:{free_port()}"})
    endpoint = server.wait_ready()
    metrics_url = re.search(r"metrics: (http://\S+/metrics)", server.log()).group(1)
    for _ in range(40):  # fresh connections spread over both workers
        with requests.Session() as session:
            resp = session.get(endpoint + "/healthz", timeout=10)
            assert resp.status_code == 200
    # both workers answered some of them, and every scrape adds up all of them
    assert set(re.findall(r"\[(w\d)\] sorna\.access .*GET /healthz", server.log())) == \
        {"w0", "w1"}, server.log()
    for _ in range(3):
        text = requests.get(metrics_url, timeout=10).text
        assert _requests_total(text, "/healthz") == 40
    # the API port serves no /metrics when it is moved
    assert requests.get(endpoint + "/metrics", timeout=10).status_code == 404
    metrics_dirs = list((server.cwd / "sorna-data").glob("prometheus-*"))
    assert len(metrics_dirs) == 1
    assert server.stop() == 0
    assert not metrics_dirs[0].exists()
