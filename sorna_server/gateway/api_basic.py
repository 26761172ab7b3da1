"""`GET /` (hello, unauthenticated) and `/authorize` (signed echo)."""
from __future__ import annotations

import json

from aiohttp import web

from .validation import Authorize, json_body, parse
from .versioning import KNOWN_REVISIONS

LATEST_REVISION = KNOWN_REVISIONS[-1]
_AUTHORIZED = json.dumps({"authorized": "yes"}).encode()
_HELLO = json.dumps({"version": LATEST_REVISION}).encode()


async def hello(request: web.Request) -> web.Response:
    return web.Response(body=_HELLO, content_type="application/json")


async def authorize(request: web.Request) -> web.Response:
    data = await json_body(request)
    if not data:
        return web.Response(body=_AUTHORIZED, content_type="application/json")
    body = parse(Authorize, data)
    reply: dict[str, object] = {"authorized": "yes"}
    if body.echo is not None:
        reply["echo"] = body.echo
    return web.json_response(reply)
