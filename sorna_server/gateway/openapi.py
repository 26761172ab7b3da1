"""`GET /openapi.json`: the OpenAPI 3.1 document, generated from the route table
(`routing.py`), the request and response models (`validation.py`,
`responses.py`) and the problem classes (`errors.py`), so it cannot drift from
what the server does.

The document covers every /v1 and /v2 route and the operations endpoints:
the signing scheme (`sornaSignature`), the required `X-Sorna-Version` header
(with the revisions each path accepts), request bodies, success bodies, and per
status the problem types an operation may answer.
"""
from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from .. import __version__
from . import errors
from .keys import ROUTES
from .responses import ProblemBody
from .versioning import PATH_MAJOR_REVISIONS, VERSION_HEADER

if TYPE_CHECKING:
    from .routing import Operation, Route, ServedRoutes

OPENAPI_VERSION = "3.1.0"
SCHEMA_REF = "#/components/schemas/{model}"
PROBLEM_MEDIA_TYPE = errors.PROBLEM_CONTENT_TYPE
SIGNATURE_SCHEME = "sornaSignature"

SIGNING_TEXT = """\
Every route except the hello (`GET /v1`, `GET /v2`) is signed with a keypair:

    Authorization: Sorna signMethod=HMAC-SHA256, credential=<ACCESS_KEY>:<SIGNATURE>
    Date: <ISO 8601 or RFC 1123 date within 15 minutes of the server's clock>
          (or X-Sorna-Date, which browsers can set)

    key = HMAC(HMAC(secret_key, date as YYYYMMDD), host)
    SIGNATURE = hex HMAC(key, "\\n".join([METHOD, path with query, raw date,
                "host:<Host header>", "content-type:<Content-Type, lowercase>",
                "x-sorna-version:<X-Sorna-Version>", hex digest of the body]))

The digest and HMACs use the hash named by signMethod (HMAC-SHA1 ... HMAC-SHA512).
Multipart uploads are signed with content-type `multipart/form-data` and the digest
of an empty body. A signature is accepted once; inactive keys are refused."""

# Problems any versioned route may answer; signed routes add the auth ones.
COMMON_PROBLEMS: tuple[type[errors.Problem], ...] = (
    errors.GenericBadRequest, errors.InvalidAPIParameters, errors.MethodNotAllowed,
    errors.RequestTooLarge, errors.InternalServerError, errors.ServiceUnavailable)
SIGNED_PROBLEMS: tuple[type[errors.Problem], ...] = (
    errors.InvalidAuthParameters, errors.AuthorizationFailed, errors.RateLimitExceeded)
OPS_PROBLEMS: tuple[type[errors.Problem], ...] = (
    errors.MethodNotAllowed, errors.InternalServerError)

_PATH_PARAM = re.compile(r"{([a-z_]+)}")


def all_problem_classes() -> list[type[errors.Problem]]:
    """Every problem type the server has (subclasses of errors.Problem)."""
    found: list[type[errors.Problem]] = [errors.Problem]
    index = 0
    while index < len(found):
        found.extend(sub for sub in found[index].__subclasses__() if sub not in found)
        index += 1
    return found


def problem_uri(problem: type[errors.Problem]) -> str:
    return errors.PROBLEM_BASE + problem.name


def _header(description: str, required: bool = True) -> dict[str, Any]:
    return {"description": description, "required": required, "schema": {"type": "string"}}


HEADERS = {
    "X-Request-ID": _header("The client's X-Request-ID (when acceptable) or a new one."),
    "X-RateLimit-Limit": _header("Requests allowed per rate-limit window."),
    "X-RateLimit-Remaining": _header("Requests left in the window."),
    "X-RateLimit-Reset": _header("Milliseconds until one more request is allowed."),
}
RESPONSE_HEADERS = {"X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"}}
API_RESPONSE_HEADERS = {name: {"$ref": f"#/components/headers/{name}"} for name in HEADERS}


def _model_schemas(routes: list[Route]) -> tuple[dict[Any, dict[str, Any]], dict[str, Any]]:
    """JSON schemas of every body model; returns (refs by (model, mode), components)."""
    models: list[tuple[type[BaseModel], Any]] = [(ProblemBody, "serialization")]
    for route in routes:
        for op in route.operations.values():
            if op.body is not None:
                models.append((op.body, "validation"))
            if op.response is not None:
                models.append((op.response, "serialization"))
    unique = list(dict.fromkeys(models))
    refs, top = models_json_schema(unique, ref_template=SCHEMA_REF)
    return refs, dict(top.get("$defs", {}))


class DocumentBuilder:
    def __init__(self, served: ServedRoutes):
        self.served = served
        self.refs, self.schemas = _model_schemas([*served.api, *served.ops])

    def build(self) -> dict[str, Any]:
        paths: dict[str, Any] = {}
        for prefix, majors in (("/v1", "v1"), ("/v2", "v2")):
            for route in self.served.api:
                paths[prefix + route.path] = self.path_item(route, majors)
        for route in self.served.ops:
            paths[route.path] = self.path_item(route, None)
        schemas = dict(self.schemas)
        schemas["ProblemType"] = {
            "type": "string", "description": "Every problem type of this server.",
            "enum": sorted(problem_uri(p) for p in all_problem_classes())}
        return {
            "openapi": OPENAPI_VERSION,
            "info": {"title": "Sorna API", "version": __version__,
                     "description": "Run code in remote, sandboxed kernels. Errors are RFC 7807 "
                                    "problem bodies (application/problem+json)."},
            "paths": paths,
            "components": {
                "schemas": schemas,
                "headers": HEADERS,
                "securitySchemes": {SIGNATURE_SCHEME: {
                    "type": "apiKey", "in": "header", "name": "Authorization",
                    "description": SIGNING_TEXT}},
            },
            "tags": [{"name": "v1", "description": "The API under /v1 (revision v1.20160915)."},
                     {"name": "v2", "description": "The API under /v2 (v2.20170315, "
                                                   "v3.20170615)."},
                     {"name": "ops", "description": "Operations endpoints: no signature, "
                                                   "no version header."}],
        }

    def path_item(self, route: Route, major: str | None) -> dict[str, Any]:
        item: dict[str, Any] = {}
        for method, op in route.operations.items():
            item[method.lower()] = self.operation(route, method, op, major)
        return item

    def operation(self, route: Route, method: str, op: Operation,
                  major: str | None) -> dict[str, Any]:
        slug = re.sub(r"[^a-z0-9]+", "_", route.path.lower()).strip("_") or "root"
        doc: dict[str, Any] = {
            "operationId": f"{major or 'ops'}_{method.lower()}_{slug}",
            "summary": op.summary,
            "tags": [major or "ops"],
            "security": [] if route.public else [{SIGNATURE_SCHEME: []}],
            "parameters": self.parameters(route, major),
            "responses": self.responses(route, op, major),
        }
        if op.body is not None:
            doc["requestBody"] = {"required": False, "content": {
                "application/json": {"schema": self.refs[(op.body, "validation")]}}}
        elif op.multipart:
            doc["requestBody"] = {"required": True, "content": {"multipart/form-data": {
                "schema": {"type": "object", "properties": {"src": {
                    "type": "array", "description": "Files; each part's file name is the "
                                                    "path inside the kernel's folder.",
                    "items": {"type": "string", "contentMediaType":
                              "application/octet-stream"}}}}}}}
        return doc

    def parameters(self, route: Route, major: str | None) -> list[dict[str, Any]]:
        params: list[dict[str, Any]] = []
        if major is not None:
            params.append({"name": VERSION_HEADER, "in": "header", "required": True,
                           "description": "The API revision; it must agree with the path.",
                           "schema": {"type": "string",
                                      "enum": list(PATH_MAJOR_REVISIONS[major])}})
        for name in _PATH_PARAM.findall(route.path):
            params.append({"name": name, "in": "path", "required": True,
                           "schema": {"type": "string", "minLength": 1}})
        return params

    def responses(self, route: Route, op: Operation, major: str | None) -> dict[str, Any]:
        headers = API_RESPONSE_HEADERS if major is not None else RESPONSE_HEADERS
        success: dict[str, Any] = {"description": op.summary, "headers": headers}
        if op.response is not None:
            success["content"] = {"application/json": {
                "schema": self.refs[(op.response, "serialization")]}}
        elif route.path == "/metrics":
            success["content"] = {"text/plain": {"schema": {"type": "string"}}}
        elif route.path == "/openapi.json":
            success["content"] = {"application/json": {"schema": {"type": "object"}}}
        responses: dict[str, Any] = {str(op.status): success}
        if route.path == "/readyz":
            responses["503"] = {**success, "description": "Not ready: `failed` names the "
                                                          "checks that failed."}
        kinds = COMMON_PROBLEMS + (() if route.public else SIGNED_PROBLEMS) \
            if major is not None else OPS_PROBLEMS
        by_status: dict[int, list[type[errors.Problem]]] = {}
        for problem in (*kinds, *op.problems):
            if problem not in by_status.setdefault(problem.status, []):
                by_status[problem.status].append(problem)
        for status, kinds_here in sorted(by_status.items()):
            responses[str(status)] = self.problem_response(kinds_here, headers)
        return responses

    def problem_response(self, kinds: list[type[errors.Problem]],
                         headers: dict[str, Any]) -> dict[str, Any]:
        names = ", ".join(f"`{p.name}`" for p in kinds)
        schema = {"allOf": [self.refs[(ProblemBody, "serialization")],
                            {"properties": {"type": {"enum": [problem_uri(p) for p in kinds]}}}]}
        return {"description": f"Problem: {names}.", "headers": headers,
                "content": {PROBLEM_MEDIA_TYPE: {"schema": schema}}}


def build_document(served: ServedRoutes) -> dict[str, Any]:
    return DocumentBuilder(served).build()


async def serve_document(request: web.Request) -> web.Response:
    served = request.app[ROUTES]
    if served.document is None:
        served.document = json.dumps(build_document(served), indent=1).encode()
    return web.Response(body=served.document, content_type="application/json")
