"""CORS for browser clients (`cors_origins`), through aiohttp-middlewares.

Only requests whose `Origin` is one of `cors_origins` (or any origin, with
`*`) are handled as CORS requests:

- their preflight (`OPTIONS` with `Access-Control-Request-Method`) is answered
  at once, before the version check and the signature check, with the methods
  and headers the API uses;
- their other requests are served as usual (signed like any request) and get
  `Access-Control-Allow-Origin` and the exposed headers on the answer.

Any other preflight goes through the normal chain and is refused there (no
version header: 400; no signature: 401), with no CORS header, so the browser
blocks the call.  Browsers do not let scripts set `Date`: browser clients sign
with `X-Sorna-Date` instead.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aiohttp import web
from aiohttp_middlewares import cors_middleware as library_cors_middleware

ALLOW_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
ALLOW_HEADERS = ("authorization", "content-type", "x-sorna-date", "x-sorna-version",
                 "x-method-override", "x-request-id")
EXPOSE_HEADERS = ("X-Request-ID", "X-RateLimit-Limit", "X-RateLimit-Remaining",
                  "X-RateLimit-Reset", "Server")
PREFLIGHT_MAX_AGE = 600  # seconds a browser may reuse a preflight answer
ANY_ORIGIN = "*"


def cors_middleware(origins: Sequence[str]) -> Any:
    """The middleware for the configured origins (empty: None, no CORS at all)."""
    if not origins:
        return None
    allow_all = ANY_ORIGIN in origins
    allowed = frozenset(origins)
    inner = library_cors_middleware(
        allow_all=allow_all, origins=[o for o in origins if o != ANY_ORIGIN],
        allow_methods=ALLOW_METHODS, allow_headers=ALLOW_HEADERS,
        expose_headers=EXPOSE_HEADERS, max_age=PREFLIGHT_MAX_AGE)

    @web.middleware
    async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if origin is None or not (allow_all or origin in allowed):
            return await handler(request)
        try:
            response: web.StreamResponse = await inner(request, handler)
        except web.HTTPOk as preflight:  # the library answers a preflight this way
            preflight.headers["Vary"] = "Origin"
            raise
        if not response.prepared:
            response.headers["Vary"] = "Origin"
        return response

    return middleware
