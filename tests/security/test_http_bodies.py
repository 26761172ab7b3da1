"""Attacks with request bodies, against the real gateway, database, Redis and agent.

- a flood of large bodies with bad signatures (memory held before the
  signature is checked stays within `auth_body_budget`);
- an upload carrying more than `max_upload_total` bytes of files;
- a captured upload's headers sent with another multipart body, for the
  historic form (the replay cache limits it to one use) and for the signed
  `X-Sorna-Upload-SHA256` form (refused outright).
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import aiohttp

from sorna_server.gateway import keys
from tests.helpers import EXAMPLE_ACCESS, EXAMPLE_SECRET, PROBLEM, VERSION, stdout_of

BAD_SECRET = "x" * 40


async def test_body_flood_with_bad_signatures_stays_within_the_budget(gateway_factory):
    budget_size = 4 << 20
    gw = await gateway_factory(auth_body_budget=budget_size, max_request_body="2m")
    budget = gw.app[keys.PREAUTH_BUDGET]
    body = b'{"echo": "' + b"x" * (1900 << 10) + b'"}'
    everyone_started = asyncio.Event()
    started = 0

    async def slow_body() -> AsyncIterator[bytes]:
        """1.5 MB, then wait until every sender got that far (or 3 s), then the rest."""
        nonlocal started
        yield body[:1500 << 10]
        started += 1
        if started == 24:
            everyone_started.set()
        try:
            await asyncio.wait_for(everyone_started.wait(), 3)
        except TimeoutError:
            pass
        yield body[1500 << 10:]

    async def attack() -> int | str:
        headers = gw.sign_headers("POST", "/v2/authorize", body, secret=BAD_SECRET)
        try:
            async with gw.client.post("/v2/authorize", data=slow_body(),
                                      headers=headers) as resp:
                return resp.status
        except aiohttp.ClientError as exc:  # refused while still sending
            return type(exc).__name__

    async def legit() -> int:
        await asyncio.sleep(0.2)  # while the flood holds the budget
        return (await gw.request("POST", "/v2/authorize", {"echo": "small"}))[0]

    results = await asyncio.gather(*(attack() for _ in range(24)), legit())
    answers, legit_status = results[:-1], results[-1]
    assert legit_status == 200  # small bodies need no budget
    assert all(answer in (401, 503) or isinstance(answer, str) for answer in answers), answers
    assert 401 in answers and budget.refused > 0, answers
    assert 0 < budget.peak <= budget_size
    assert budget.used == 0
    # the budget is whole again: a large signed body passes
    status, _, reply = await gw.request("POST", "/v2/authorize", {"echo": "y" * (1 << 20)})
    assert status == 200 and len(reply["echo"]) == 1 << 20
    # and a body over max_request_body is refused by its declared length
    status, _, reply = await gw.request("POST", "/v2/authorize", {"echo": "y" * (3 << 20)})
    assert status == 413 and reply["type"].startswith(PROBLEM)


async def test_a_slow_body_cannot_hold_the_budget(gateway_factory):
    gw = await gateway_factory(auth_body_timeout=0.5)
    budget = gw.app[keys.PREAUTH_BUDGET]
    body = b'{"echo": "' + b"x" * (1 << 20) + b'"}'
    stalled = asyncio.Event()

    async def stalling_body() -> AsyncIterator[bytes]:
        yield body[:-10]
        stalled.set()
        await asyncio.sleep(30)  # never finishes within the test
        yield body[-10:]

    headers = gw.sign_headers("POST", "/v2/authorize", body, secret=BAD_SECRET)
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with gw.client.post("/v2/authorize", data=stalling_body(), headers=headers) as resp:
        assert resp.status == 408
        assert (await resp.json())["type"] == PROBLEM + "request-timeout"
    assert stalled.is_set() and loop.time() - started < 5
    assert budget.used == 0 and budget.peak > 0


def multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    """A multipart body as `requests` (and so sorna-client) encodes it."""
    boundary = uuid.uuid4().hex
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="src"; '
        f'filename="{name}"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode()
        + data + b"\r\n" for name, data in files) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def files_digest(files: list[tuple[str, bytes]]) -> str:
    """X-Sorna-Upload-SHA256 as a new client computes it (see docs/security.md)."""
    lines = "".join(f"{hashlib.sha256(name.encode()).hexdigest()} "
                    f"{hashlib.sha256(data).hexdigest()}\n" for name, data in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def signed_upload_headers(host: str, path: str, digest: str | None) -> dict[str, str]:
    """Headers of an upload signed like sorna-client does, or (with `digest`) with
    the files' digest in the body-hash position and its header."""
    date = datetime.now(UTC)
    body_hash = digest or hashlib.sha256(b"").hexdigest()
    text = "\n".join(("POST", path, date.isoformat(), f"host:{host}",
                      "content-type:multipart/form-data", f"x-sorna-version:{VERSION}",
                      body_hash))
    key = hmac.new(EXAMPLE_SECRET.encode(), date.strftime("%Y%m%d").encode(), "sha256").digest()
    key = hmac.new(key, host.encode(), "sha256").digest()
    signature = hmac.new(key, text.encode(), "sha256").hexdigest()
    headers = {"Date": date.isoformat(), "X-Sorna-Version": VERSION,
               "Authorization": f"Sorna signMethod=HMAC-SHA256, "
                                f"credential={EXAMPLE_ACCESS}:{signature}"}
    if digest:
        headers["X-Sorna-Upload-SHA256"] = digest
    return headers


async def _post(gw, path: str, headers: dict[str, str], files: list[tuple[str, bytes]]):
    body, content_type = multipart(files)
    async with gw.client.post(path, data=body,
                              headers={**headers, "Content-Type": content_type}) as resp:
        text = await resp.text()
        return resp.status, text


async def _listing(gw, kernel_id: str) -> str:
    status, _, body = await gw.request("POST", f"/v2/kernel/{kernel_id}", {
        "mode": "query", "code": "import os\nprint(sorted(f for f in os.listdir('.') "
                                 "if f.endswith('.py')), open('main.py').read() "
                                 "if os.path.exists('main.py') else None)"})
    assert status == 200, body
    return stdout_of(body["result"])


async def test_upload_total_is_capped(gateway_factory):
    gw = await gateway_factory(agents=1, max_upload_total="1m", max_upload_size="768k")
    kernel_id = await gw.create_kernel("python3")
    path = f"/v2/kernel/{kernel_id}/upload"
    files = [(f"part{i}.py", b"#" * (400 << 10)) for i in range(3)]  # each under 768k
    status, text = await _post(gw, path, gw.sign_headers(
        "POST", path, content_type="multipart/form-data"), files)
    assert status == 413 and PROBLEM + "request-too-large" in text, text
    assert await _listing(gw, kernel_id) == "[] None\n"  # nothing reached the kernel
    # a declared length far beyond the cap is refused before the body is read
    headers = gw.sign_headers("POST", path, content_type="multipart/form-data")
    headers["Content-Type"] = "multipart/form-data; boundary=x"
    headers["Content-Length"] = str(64 << 20)
    reader, writer = await asyncio.open_connection(gw.client.server.host,
                                                   gw.client.server.port)
    head = f"POST {path} HTTP/1.1\r\nHost: {gw.host}\r\n" + "".join(
        f"{name}: {value}\r\n" for name, value in headers.items()) + "\r\n"
    writer.write(head.encode())
    reply = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    writer.close()
    assert reply.split()[1] == b"413", reply
    # within the total it works
    status, text = await _post(gw, path, gw.sign_headers(
        "POST", path, content_type="multipart/form-data"), files[:2])
    assert status == 204, text


async def test_captured_historic_upload_cannot_carry_another_body(gateway_factory):
    gw = await gateway_factory(agents=1)
    kernel_id = await gw.create_kernel("python3")
    path = f"/v2/kernel/{kernel_id}/upload"
    headers = signed_upload_headers(gw.host, path, None)
    status, text = await _post(gw, path, headers, [("main.py", b"print('mine')\n")])
    assert status == 204, text
    # the historic signature does not cover the body, but it is used up
    status, text = await _post(gw, path, headers, [("main.py", b"print('evil')\n")])
    assert status == 401 and PROBLEM + "auth-failed" in text, text
    assert await _listing(gw, kernel_id) == "['main.py'] print('mine')\n\n"


async def test_signed_upload_digest_refuses_a_swapped_body(gateway_factory):
    gw = await gateway_factory(agents=1)
    kernel_id = await gw.create_kernel("python3")
    path = f"/v2/kernel/{kernel_id}/upload"
    mine = [("main.py", b"print('mine')\n"), ("lib.py", b"X = 1\n")]
    headers = signed_upload_headers(gw.host, path, files_digest(mine))

    # intercepted before it arrives: other files, other names, other order
    for swapped in ([("main.py", b"print('evil')\n"), ("lib.py", b"X = 1\n")],
                    [("main2.py", b"print('mine')\n"), ("lib.py", b"X = 1\n")],
                    list(reversed(mine)), mine[:1]):
        fresh = signed_upload_headers(gw.host, path, files_digest(mine))
        status, text = await _post(gw, path, fresh, swapped)
        assert status == 401 and "X-Sorna-Upload-SHA256" in text, (swapped, text)
    assert await _listing(gw, kernel_id) == "[] None\n"

    # the header cannot be stripped from, nor added to, a signed request
    stripped = {k: v for k, v in signed_upload_headers(gw.host, path, files_digest(mine)).items()
                if k != "X-Sorna-Upload-SHA256"}
    status, text = await _post(gw, path, stripped, mine)
    assert status == 401, text
    added = {**signed_upload_headers(gw.host, path, None),
             "X-Sorna-Upload-SHA256": files_digest(mine)}
    status, text = await _post(gw, path, added, mine)
    assert status == 401, text
    assert await _listing(gw, kernel_id) == "[] None\n"

    # the genuine request works, once
    status, text = await _post(gw, path, headers, mine)
    assert status == 204, text
    assert await _listing(gw, kernel_id) == "['lib.py', 'main.py'] print('mine')\n\n"
    status, text = await _post(gw, path, headers, mine)
    assert status == 401, text
