"""URL table: every route under /v1 and /v2, dispatched by the effective method.

Routes are registered for any method and dispatched on the method after
`X-Method-Override` (aiohttp resolves routes before middlewares run, so the
override cannot change the route itself).
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from . import api_basic, api_kernel, api_stream
from .errors import MethodNotAllowed
from .versioning import effective_method

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def MethodDispatch(handlers: dict[str, Handler], *, public: bool = False) -> Handler:
    """One route, several methods; `public` routes need no signature."""
    table = dict(handlers)
    if "GET" in table and "HEAD" not in table:
        table["HEAD"] = table["GET"]
    allowed = ", ".join(sorted(table))

    async def dispatch(request: web.Request) -> web.StreamResponse:
        method = effective_method(request)
        handler = table.get(method)
        if handler is None:
            raise MethodNotAllowed(f"{method} is not allowed here (allowed: {allowed}).")
        return await handler(request)

    dispatch.public = public  # type: ignore[attr-defined]
    return dispatch


def setup_routes(app: web.Application) -> None:
    hello = MethodDispatch({"GET": api_basic.hello}, public=True)
    authorize = MethodDispatch({"GET": api_basic.authorize, "POST": api_basic.authorize})
    create = MethodDispatch({"POST": api_kernel.create})
    kernel = MethodDispatch({"GET": api_kernel.info, "PATCH": api_kernel.restart,
                             "DELETE": api_kernel.destroy, "POST": api_kernel.execute})
    upload = MethodDispatch({"POST": api_kernel.upload})
    pty = MethodDispatch({"GET": api_stream.stream_pty})
    for prefix in ("/v1", "/v2"):
        app.router.add_route("*", prefix, hello)
        app.router.add_route("*", prefix + "/", hello)
        app.router.add_route("*", prefix + "/authorize", authorize)
        app.router.add_route("*", prefix + "/kernel/create", create)
        app.router.add_route("*", prefix + "/kernel/{kernel_id}", kernel)
        app.router.add_route("*", prefix + "/kernel/{kernel_id}/upload", upload)
        app.router.add_route("*", prefix + "/stream/kernel/{kernel_id}/pty", pty)
