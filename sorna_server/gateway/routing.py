"""The route table: every route of the API and of the operations endpoints, as data.

`API_ROUTES` lists each route once, with per method its handler, request body
model, response model and the problem types it may answer; `setup_routes()`
registers it under /v1 and /v2 and `openapi.py` documents the same table, so
the document cannot drift from what is served.

Routes are registered for any method and dispatched on the method after
`X-Method-Override` (aiohttp resolves routes before middlewares run, so the
override cannot change the route itself); a method a route does not serve
answers 405 `method-not-allowed`.  CORS preflights of allowed origins are
answered before routing matters (`cors.py`).
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web
from pydantic import BaseModel

from . import api_basic, api_kernel, api_stream, health, languages, openapi, prometheus
from . import errors as problems
from . import responses as bodies
from . import validation as bodies_in
from .errors import MethodNotAllowed, Problem
from .keys import ROUTES
from .versioning import effective_method

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

API_PREFIXES = ("/v1", "/v2")


@dataclass(frozen=True)
class Operation:
    handler: Handler
    summary: str
    status: int = 200
    response: type[BaseModel] | None = None   # JSON body of the success answer
    body: type[BaseModel] | None = None       # JSON request body
    multipart: bool = False                   # multipart/form-data request body (files)
    websocket: bool = False
    problems: tuple[type[Problem], ...] = ()  # besides the ones every route may answer


@dataclass(frozen=True)
class Route:
    path: str                                 # under each of API_PREFIXES
    operations: dict[str, Operation]
    public: bool = False                      # no signature needed
    aliases: tuple[str, ...] = ()             # also served at these paths (not documented)
    tag: str = "api"


_KERNEL_LOOKUP = (problems.KernelNotFound,)

API_ROUTES: tuple[Route, ...] = (
    Route("", {"GET": Operation(api_basic.hello, "Hello: the newest API revision.",
                                response=bodies.Hello)},
          public=True, aliases=("/",)),
    Route("/authorize", {
        "GET": Operation(api_basic.authorize, "Check a keypair and its signature.",
                         response=bodies.Authorized),
        "POST": Operation(api_basic.authorize, "Check a keypair; echo the body's `echo`.",
                          response=bodies.Authorized, body=bodies_in.Authorize),
    }),
    Route("/languages", {"GET": Operation(
        languages.languages, "Languages the live agents offer.", response=bodies.Languages)}),
    Route("/kernel/create", {"POST": Operation(
        api_kernel.create, "Create a kernel, or get the one of this client session token.",
        status=201, response=bodies.KernelCreated, body=bodies_in.CreateKernel,
        problems=(problems.QuotaExceeded, problems.InstanceNotAvailable,
                  problems.KernelCreationFailed))}),
    Route("/kernel/{kernel_id}", {
        "GET": Operation(api_kernel.info, "Information about a kernel.",
                         response=bodies.KernelInfo, problems=_KERNEL_LOOKUP),
        "POST": Operation(api_kernel.execute, "Run code (query, batch or complete mode).",
                          response=bodies.ExecuteReply, body=bodies_in.Execute,
                          problems=(*_KERNEL_LOOKUP, problems.KernelExecutionFailed)),
        "PATCH": Operation(api_kernel.restart, "Restart a kernel (its state is lost).",
                           status=204,
                           problems=(*_KERNEL_LOOKUP, problems.KernelRestartFailed)),
        "DELETE": Operation(api_kernel.destroy, "Destroy a kernel.", status=204,
                            problems=(*_KERNEL_LOOKUP, problems.KernelDestructionFailed)),
    }),
    Route("/kernel/{kernel_id}/upload", {"POST": Operation(
        api_kernel.upload, "Upload files into the kernel's working folder.", status=204,
        multipart=True,
        problems=(*_KERNEL_LOOKUP, problems.RequestTooLarge, problems.KernelExecutionFailed))}),
    Route("/stream/kernel/{kernel_id}/pty", {"GET": Operation(
        api_stream.stream_pty, "WebSocket terminal of the kernel.", status=101,
        websocket=True, problems=_KERNEL_LOOKUP)}),
)

OPS_ROUTES: tuple[Route, ...] = (
    Route("/healthz", {"GET": Operation(health.healthz, "Liveness: the process serves.",
                                        response=bodies.Liveness)}, public=True, tag="ops"),
    Route("/readyz", {"GET": Operation(
        health.readyz, "Readiness: database, Redis and a live agent (503 names what failed).",
        response=bodies.Readiness)}, public=True, tag="ops"),
    Route("/openapi.json", {"GET": Operation(openapi.serve_document,
                                             "This OpenAPI document.")},
          public=True, tag="ops"),
)
METRICS_ROUTE = Route("/metrics", {"GET": Operation(
    prometheus.serve_metrics, "Prometheus metrics (text format).")}, public=True, tag="ops")


@dataclass
class ServedRoutes:
    """What one application serves (kept in `app[keys.ROUTES]` for the OpenAPI
    document, which is rendered on its first request and kept)."""

    api: tuple[Route, ...]
    ops: tuple[Route, ...]
    document: bytes | None = None


def MethodDispatch(handlers: dict[str, Handler], *, public: bool = False,
                   unversioned: bool = False) -> Handler:
    """One route, several methods; `public` routes need no signature and
    `unversioned` ones (the operations endpoints) no version header."""
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
    dispatch.unversioned = unversioned  # type: ignore[attr-defined]
    return dispatch


def _register(app: web.Application, path: str, dispatch: Handler) -> None:
    app.router.add_route("*", path, dispatch)


def ops_routes(*, metrics_here: bool) -> tuple[Route, ...]:
    """The operations routes one application serves (/metrics unless moved or off)."""
    return OPS_ROUTES + ((METRICS_ROUTE,) if metrics_here else ())


def setup_routes(app: web.Application, *, metrics_here: bool = True) -> None:
    app[ROUTES] = ServedRoutes(API_ROUTES, ops_routes(metrics_here=metrics_here))
    for route in API_ROUTES:
        dispatch = MethodDispatch({m: op.handler for m, op in route.operations.items()},
                                  public=route.public)
        for prefix in API_PREFIXES:
            for path in (route.path, *route.aliases):
                _register(app, prefix + path, dispatch)
    for route in ops_routes(metrics_here=metrics_here):
        _register(app, route.path, MethodDispatch(
            {m: op.handler for m, op in route.operations.items()},
            public=True, unversioned=True))
