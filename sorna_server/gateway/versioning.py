"""API version check and `X-Method-Override` (second middleware).

Paths live under `/v1` and `/v2`.  `X-Sorna-Version` must be one of the known
revisions and agree with the path's major version (v3 revisions use `/v2`
paths).  A request without the header is refused with `generic-bad-request`
("API version missing in headers."), as the historic server refused it; the
historic answer carried status 404 through a class-inheritance slip, this one
carries 400.  The operations endpoints (`/healthz`, `/readyz`, `/metrics`,
`/openapi.json`: routes marked `unversioned`) need no header.

`X-Method-Override` names the method the handler runs (the effective method).
It is honoured only where the signature covers it: the authentication
middleware checks the signature over the effective method and nothing else,
so a request signed as `GET` and sent with `X-Method-Override: DELETE` fails
authentication (see `auth`).  The historic client never sends the header.
"""
from __future__ import annotations

from typing import Any

from aiohttp import web

from .errors import GenericBadRequest, GenericNotFound, InvalidAPIParameters
from .keys import API_MAJOR, API_REVISION, METHOD

VERSION_HEADER = "X-Sorna-Version"
METHOD_OVERRIDE_HEADER = "X-Method-Override"

KNOWN_REVISIONS = ("v1.20160915", "v2.20170315", "v3.20170615")
PATH_MAJOR_REVISIONS: dict[str, tuple[str, ...]] = {
    "v1": ("v1.20160915",),
    "v2": ("v2.20170315", "v3.20170615"),
}
OVERRIDABLE_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})



def path_major(path: str) -> str | None:
    """'v1' / 'v2' for paths under them, else None."""
    head = path[1:3]
    if head in PATH_MAJOR_REVISIONS and (len(path) == 3 or path[3] == "/"):
        return head
    return None


def effective_method(request: web.Request) -> str:
    """The method the handler runs, and so the one the signature must cover."""
    return request.get(METHOD) or request.method


@web.middleware
async def version_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    major = path_major(request.path)
    if major is None:
        if getattr(request.match_info.handler, "unversioned", False):
            return await handler(request)
        raise GenericNotFound(f"Unknown path {request.path!r}; the API lives under /v1 and /v2.")
    revision = request.headers.get(VERSION_HEADER)
    if revision is None:
        raise GenericBadRequest("API version missing in headers.")
    if revision not in KNOWN_REVISIONS:
        raise InvalidAPIParameters(
            f"Unsupported API version {revision!r}; use one of {', '.join(KNOWN_REVISIONS)}.")
    elif revision not in PATH_MAJOR_REVISIONS[major]:
        raise InvalidAPIParameters(
            f"API version {revision} does not match the path version /{major}.")
    override = request.headers.get(METHOD_OVERRIDE_HEADER)
    if override:
        method = override.strip().upper()
        if method not in OVERRIDABLE_METHODS:
            raise InvalidAPIParameters(f"Unsupported {METHOD_OVERRIDE_HEADER} value.")
        request[METHOD] = method
    request[API_MAJOR] = major
    request[API_REVISION] = revision
    return await handler(request)
