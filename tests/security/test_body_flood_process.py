"""A flood of large bodies with bad signatures against a real `sorna serve
--standalone` process: its peak memory (VmHWM, reset before the flood) grows
by at most the pre-authentication budget plus a margin, where reading every
body before checking its signature would grow it by the sum of the bodies."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest

from tests.helpers import EXAMPLE_ACCESS, VERSION_HEADERS, client_signature

MB = 1 << 20
BUDGET = 16 * MB
SENDERS = 16
BODY_SIZE = 7 * MB + MB // 2   # under max_request_body (8m): only the budget stops them
MARGIN = 24 * MB               # allocator, per-connection buffers, logging


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def _reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS


async def _flood(endpoint: str, host: str) -> list[int | str]:
    body = b'{"echo": "' + b"x" * (BODY_SIZE - 13) + b'"}'
    half = len(body) // 2
    arrived = 0
    all_arrived = asyncio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        """Half of the body, wait until every sender got that far (or 5 s), the rest:
        without a bound the server holds every half at once."""
        nonlocal arrived
        yield body[:half]
        arrived += 1
        if arrived == SENDERS:
            all_arrived.set()
        try:
            await asyncio.wait_for(all_arrived.wait(), 5)
        except TimeoutError:
            pass
        yield body[half:]

    async def one(session: aiohttp.ClientSession) -> int | str:
        date = datetime.now(UTC).isoformat()
        signature = client_signature("POST", "/v2/authorize", date, host, "application/json",
                                     body, "x" * 40)  # a wrong secret
        headers = {"Date": date, "X-Sorna-Version": "v2.20170315",
                   "Content-Type": "application/json",
                   "Authorization": f"Sorna signMethod=HMAC-SHA256, "
                                    f"credential={EXAMPLE_ACCESS}:{signature}"}
        try:
            async with session.post("/v2/authorize", data=slow_body(), headers=headers) as resp:
                return resp.status
        except aiohttp.ClientError as exc:  # refused while still sending
            return type(exc).__name__

    async with aiohttp.ClientSession(endpoint) as session:
        return list(await asyncio.gather(*(one(session) for _ in range(SENDERS))))


@pytest.mark.slow
async def test_bad_signature_body_flood_keeps_the_gateway_memory_bounded(standalone):
    server = standalone(SORNA_AUTH_BODY_BUDGET=str(BUDGET), SORNA_MAX_REQUEST_BODY="8m")
    pid = server.proc.pid
    host = f"127.0.0.1:{server.port}"
    async with aiohttp.ClientSession(server.endpoint) as session:  # warm up
        for _ in range(5):
            async with session.get("/v2", headers=VERSION_HEADERS) as resp:
                assert resp.status == 200
    _reset_peak(pid)
    baseline = _status_kib(pid, "VmRSS")
    answers = []
    for _ in range(2):
        answers += await _flood(server.endpoint, host)
    growth = (_status_kib(pid, "VmHWM") - baseline) * 1024
    assert all(answer in (401, 503) or isinstance(answer, str) for answer in answers), answers
    assert 401 in answers, answers
    assert growth < BUDGET + MARGIN, (
        f"peak memory grew by {growth / MB:.0f} MB during a flood of "
        f"{2 * SENDERS} x {BODY_SIZE / MB:.1f} MB; answers {answers}")
    assert server.proc.poll() is None
