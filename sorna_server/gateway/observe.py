"""The outermost middleware: request id, per-request metrics and timing.

`X-Request-ID`: a client's id is kept when it is short and plain (at most
`MAX_REQUEST_ID` characters of letters, digits and `-_.:/+=@`, starting with a
letter or digit); otherwise, or when there is none, the gateway makes one.
The id is echoed on every response (see `app._common_headers`), written in the
access log line, stamped on every log line written while serving the request
and sent to agents with each RPC call (`sorna_server.logs.REQUEST_ID`).

Each request is counted in `sorna_http_requests_total{route, method, status}`
and timed in `sorna_http_request_duration_seconds{route, method}`, where
`route` is the route template (`/v2/kernel/{kernel_id}`), so ids never become
label values.
"""
from __future__ import annotations

import asyncio
import re
import time
from random import getrandbits
from typing import Any

from aiohttp import web

from .. import metrics
from ..agent_protocol import MAX_REQUEST_ID
from ..logs import REQUEST_ID as REQUEST_ID_CONTEXT
from .keys import REQUEST_ID, STARTED

REQUEST_ID_HEADER = "X-Request-ID"
_VALID_ID = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._:/+=@-]{{0,{MAX_REQUEST_ID - 1}}}")
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED_ROUTE = "unmatched"
CLIENT_GONE = "499"  # the client went away before the answer (nginx's convention)


def new_request_id() -> str:
    """24 random hex digits.  Ids need to be unique, not secret: the process's
    Mersenne Twister (seeded from the OS, reseeded after fork) keeps the GIL,
    where `os.urandom` drops it and can wait a switch interval to get it back
    under load (py-spy put it at ~9 us a request)."""
    return f"{getrandbits(96):024x}"


def request_id_from(value: str | None) -> str:
    """The client's id when it is acceptable, else a new one."""
    if value and _VALID_ID.fullmatch(value):
        return value
    return new_request_id()


def route_label(request: web.Request) -> str:
    """The route template of the request (never a path with ids in it)."""
    resource = request.match_info.route.resource
    if resource is None:
        return UNMATCHED_ROUTE
    return resource.canonical


@web.middleware
async def observe_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    rid = request_id_from(request.headers.get(REQUEST_ID_HEADER))
    request[REQUEST_ID] = rid
    token = REQUEST_ID_CONTEXT.set(rid)
    started = request[STARTED] = time.perf_counter()
    status = "500"
    try:
        response = await handler(request)
        status = str(response.status)
        return response
    except web.HTTPException as exc:
        status = str(exc.status)
        raise
    except asyncio.CancelledError:
        status = CLIENT_GONE
        raise
    finally:
        REQUEST_ID_CONTEXT.reset(token)
        route = route_label(request)
        method = request.method if request.method in KNOWN_METHODS else "other"
        metrics.child(metrics.HTTP_REQUESTS, route, method, status).inc()
        metrics.child(metrics.HTTP_LATENCY, route, method).observe(time.perf_counter() - started)
        if status == "429" and route.endswith("/kernel/create"):
            metrics.child(metrics.CREATES_REFUSED, "rate").inc()
