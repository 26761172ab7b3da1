"""Request bodies read before their signature is checked, in bounded memory.

The historic client signs a JSON body with its hash, so the gateway must read
the whole body to check the signature.  Until that check passes the bytes
belong to nobody, and a flood of large bodies with bad signatures must not be
able to fill the gateway's memory.  So:

- the body is hashed while it streams in (the hash never needs the bytes twice);
- each request may hold `FREE_BYTES` (64 KiB, the order of what aiohttp
  already buffers per connection) without asking anyone; every byte beyond that
  is taken from one `PreAuthBudget` per process (`auth_body_budget`).  When the
  budget is spent, the request is refused at once (503, retry later): nothing
  waits while holding bytes, so nothing can deadlock;
- a body larger than `max_request_body` is refused (413) as soon as its
  declared length or its bytes say so, and the whole body must arrive within
  `auth_body_timeout` seconds (408), so a slow sender cannot pin the budget;
- whatever the outcome, the reservation is returned when the check is over.

Memory held by unauthenticated bodies is therefore at most `auth_body_budget`
plus `FREE_BYTES` per open request.  Multipart uploads are not read here at
all: the historic client signs them without their body (see `auth`).
"""
from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web

from .errors import Problem, RequestTooLarge, ServiceUnavailable

FREE_BYTES = 64 << 10


class RequestTimeout(Problem):
    status, name, title = 408, "request-timeout", "The request body did not arrive in time."


class PreAuthBudget:
    """Bytes of not-yet-authenticated bodies held in memory, across requests."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self.peak = 0
        self.refused = 0

    def take(self, size: int) -> bool:
        if self.used + size > self.limit:
            self.refused += 1
            return False
        self.used += size
        self.peak = max(self.peak, self.used)
        return True

    def give(self, size: int) -> None:
        self.used -= size


class PendingBody:
    """A body read (and hashed) but not yet trusted."""

    def __init__(self, hash_name: str):
        self._hasher = hashlib.new(hash_name)
        self._chunks: list[bytes] = []
        self.size = 0
        self.borrowed = 0   # bytes taken from the budget

    @property
    def hexdigest(self) -> str:
        return self._hasher.hexdigest()

    def add(self, chunk: bytes) -> None:
        self._hasher.update(chunk)
        self._chunks.append(chunk)
        self.size += len(chunk)

    def data(self) -> bytes:
        return b"".join(self._chunks)

    def drop(self) -> None:
        self._chunks.clear()


@asynccontextmanager
async def pending_body(request: web.Request, budget: PreAuthBudget, hash_name: str, *,
                       max_size: int, timeout: float) -> AsyncIterator[PendingBody]:
    """Read the body of `request` within the bounds above; the budget is given
    back when the block ends (keep `data()` only once the signature matched)."""
    body = PendingBody(hash_name)
    try:
        if request.can_read_body:
            declared = request.content_length
            if declared is not None and declared > max_size:
                raise RequestTooLarge(f"The body may be at most {max_size} bytes.")
            try:
                async with asyncio.timeout(timeout):
                    await _fill(request, body, budget, max_size)
            except TimeoutError:
                raise RequestTimeout(f"The body must arrive within {timeout:g} s.") from None
        yield body
    finally:
        body.drop()
        budget.give(body.borrowed)


async def _fill(request: web.Request, body: PendingBody, budget: PreAuthBudget,
                max_size: int) -> None:
    while chunk := await request.content.readany():
        size = body.size + len(chunk)
        if size > max_size:
            raise RequestTooLarge(f"The body may be at most {max_size} bytes.")
        needed = max(size - FREE_BYTES, 0) - body.borrowed
        if needed > 0:
            if not budget.take(needed):
                raise ServiceUnavailable(
                    "Too many request bodies are waiting for authentication; retry later.")
            body.borrowed += needed
        body.add(chunk)
