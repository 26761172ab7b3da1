"""`GET /healthz` (liveness) and `GET /readyz` (readiness) for load balancers and
orchestrators: no signature, no version header (see `sorna_server.health`)."""
from __future__ import annotations

import json

from aiohttp import web

from ..health import readiness
from . import keys

_ALIVE = json.dumps({"status": "ok"}).encode()


async def healthz(request: web.Request) -> web.Response:
    """The process serves requests (nothing else is checked)."""
    return web.Response(body=_ALIVE, content_type="application/json")


async def readyz(request: web.Request) -> web.Response:
    """200 when the database, Redis and a live agent answer; else 503 naming the failures."""
    app = request.app
    report = await readiness(engine=app[keys.DB], redis=app[keys.REDIS],
                             registry=app[keys.REGISTRY])
    return web.json_response(report.as_dict(), status=200 if report.ok else 503)
