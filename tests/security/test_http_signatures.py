"""Attacks on the request signature itself, against the real gateway (real
database, Redis and, where a kernel is needed, a real agent).

- a captured signed GET replayed with `X-Method-Override: DELETE`;
- malformed signatures and header bytes that are not UTF-8;
- telling an unknown access key from a wrong signature (answer and timing).
"""
from __future__ import annotations

import asyncio
import statistics
import time

from tests.helpers import EXAMPLE_ACCESS, PROBLEM

AUTH_FAILED = PROBLEM + "auth-failed"


async def test_method_override_of_a_captured_get_does_not_destroy(gateway_factory):
    gw = await gateway_factory(agents=1)
    kernel_id = await gw.create_kernel("python3")
    path = f"/v2/kernel/{kernel_id}"
    captured = gw.sign_headers("GET", path)  # what the client signed for its GET

    for transport in ("GET", "POST", "DELETE"):
        headers = {**captured, "X-Method-Override": "DELETE"}
        async with gw.client.request(transport, path, headers=headers) as resp:
            assert resp.status == 401, (transport, await resp.text())
            body = await resp.json()
            assert body["type"] == AUTH_FAILED
            assert ("overriding method" in body["detail"]) == (transport != "DELETE")
    # the kernel is still there, and the captured request itself was not used up
    async with gw.client.get(path, headers=captured) as resp:
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["lang"] == "python3"

    # an override that was signed is honoured (the signature covers it)
    headers = {**gw.sign_headers("DELETE", path), "X-Method-Override": "DELETE"}
    async with gw.client.post(path, headers=headers) as resp:
        assert resp.status == 204
    status, _, body = await gw.request("GET", path)
    assert status == 404 and body["type"] == PROBLEM + "kernel-not-found"


MALFORMED_SIGNATURES = [
    "é" * 64,                                  # non-ASCII, right length
    "ａ" * 64,                                 # full-width letters
    "0" * 63 + "é",
    "z" * 64,                                  # not hex
    "0" * 63,                                  # too short
    "0" * 65,                                  # too long
    "0" * 4000,                                # (aiohttp refuses header lines > 8 KB)
    "0x" + "0" * 62,
    " " + "0" * 63,
    "0" * 32 + "\t" + "0" * 31,
]


async def test_malformed_signatures_are_401_never_500(gateway_factory):
    gw = await gateway_factory()
    for signature in MALFORMED_SIGNATURES:
        headers = gw.sign_headers("GET", "/v2/authorize")
        headers["Authorization"] = (f"Sorna signMethod=HMAC-SHA256, "
                                    f"credential={EXAMPLE_ACCESS}:{signature}")
        async with gw.client.get("/v2/authorize", headers=headers) as resp:
            assert resp.status == 401, (signature[:20], await resp.text())
            assert resp.content_type == "application/problem+json"
            assert (await resp.json())["type"] == AUTH_FAILED
    # a right signature in upper case is the same signature (and still works)
    headers = gw.sign_headers("GET", "/v2/authorize")
    prefix, _, signature = headers["Authorization"].rpartition(":")
    headers["Authorization"] = f"{prefix}:{signature.upper()}"
    async with gw.client.get("/v2/authorize", headers=headers) as resp:
        assert resp.status == 200, await resp.text()


async def _raw_request(host: str, port: int, head: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(head)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


async def test_header_bytes_that_are_not_utf8_get_a_problem_not_a_500(gateway_factory):
    gw = await gateway_factory()
    good = gw.sign_headers("GET", "/v2/authorize")
    server = gw.client.server
    bad_values = {
        "Authorization": b"Sorna signMethod=HMAC-SHA256, credential=AKIA\xff\xfe:" + b"\xc3" * 64,
        "Host": b"127.0.0.1\xff",
        "Date": b"2024-01-01T00:00:00\xff",
        "Content-Type": b"application/\xffjson",
        "X-Method-Override": b"DEL\xffETE",
        "X-Sorna-Version": b"v2.2017\xff0315",
    }
    for name, value in bad_values.items():
        headers = {key.encode(): val.encode() for key, val in good.items()}
        headers[name.encode()] = value
        headers.setdefault(b"Host", f"{server.host}:{server.port}".encode())
        head = b"GET /v2/authorize HTTP/1.1\r\n" + b"".join(
            key + b": " + val + b"\r\n" for key, val in headers.items()) + \
            b"Connection: close\r\n\r\n"
        reply = await _raw_request(server.host, server.port, head)
        status_line = reply.split(b"\r\n", 1)[0]
        status = int(status_line.split()[1])
        assert 400 <= status < 500, (name, reply[:300])
    # non-ASCII in the path of a signed request
    head = (b"GET /v2/kernel/\xc3\xa9\xff HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            + b"".join(key.encode() + b": " + val.encode() + b"\r\n" for key, val in good.items())
            + b"\r\n")
    reply = await _raw_request(server.host, server.port, head)
    assert 400 <= int(reply.split()[1]) < 500, reply[:300]


async def test_unknown_key_and_bad_signature_look_the_same(gateway_factory):
    gw = await gateway_factory()
    body = b'{"echo": "' + b"x" * (4 << 20) + b'"}'  # a body that takes time to read

    async def attempt(access_key: str) -> tuple[int, dict, float]:
        headers = gw.sign_headers("POST", "/v2/authorize", body, access_key=access_key,
                                  secret="not-the-secret" + "x" * 26)
        started = time.perf_counter()
        async with gw.client.post("/v2/authorize", data=body, headers=headers) as resp:
            answer = await resp.json()
            return resp.status, answer, time.perf_counter() - started

    unknown = "AKIANOSUCHKEY0000000"
    known_status, known_body, _ = await attempt(EXAMPLE_ACCESS)
    unknown_status, unknown_body, _ = await attempt(unknown)
    assert known_status == unknown_status == 401
    assert known_body == unknown_body
    assert known_body["type"] == AUTH_FAILED

    # and no timing difference worth the name: both read and hash the body and
    # compute a signature (the unknown key against a dummy key)
    # (in A B B A order, so that whatever favours the first or the second request
    # of a pair, such as a busy machine, weighs on both alike)
    times: dict[str, list[float]] = {EXAMPLE_ACCESS: [], unknown: []}
    for round_ in range(40):
        pair = (EXAMPLE_ACCESS, unknown) if round_ % 2 == 0 else (unknown, EXAMPLE_ACCESS)
        for access_key in pair:
            times[access_key].append((await attempt(access_key))[2])
    known_times, unknown_times = times[EXAMPLE_ACCESS], times[unknown]
    # the fastest tenth of each: what the work costs, with the least of the noise
    known, unknown_ = (statistics.quantiles(t, n=10)[0] for t in (known_times, unknown_times))
    assert 0.5 < unknown_ / known < 2.0, (known, unknown_)
