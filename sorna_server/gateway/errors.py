"""RFC 7807 problem bodies and the outermost middleware that guarantees them.

Every error the API returns is `application/problem+json` with a `type` of
`https://api.sorna.io/probs/<name>` and the historic status code.  Handlers
raise a `Problem` subclass; the middleware also turns aiohttp's own HTTP
errors, a Redis or database outage (503) and any unexpected exception (500,
logged with its traceback, never shown) into problem bodies.
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import sqlalchemy.exc as sa_exc
from aiohttp import web
from redis import exceptions as redis_exc

from ..db.engine import DatabaseUnavailable
from ..redis_conn import RedisUnavailable

log = logging.getLogger(__name__)

PROBLEM_BASE = "https://api.sorna.io/probs/"
PROBLEM_CONTENT_TYPE = "application/problem+json"


class Problem(Exception):
    """An API error with a problem type; extra keyword fields go into the body."""

    status = 500
    name = "internal-server-error"
    title = "Something went wrong inside the server."
    retry_after: int | None = None  # seconds, sent as Retry-After

    def __init__(self, detail: str | None = None, *, retry_after: int | None = None,
                 **fields: Any):
        super().__init__(detail or self.title)
        self.detail = detail
        self.fields = fields
        if retry_after is not None:
            self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"type": PROBLEM_BASE + self.name, "title": self.title}
        if self.detail:
            body["detail"] = self.detail
        body.update(self.fields)
        return body

    def response(self) -> web.Response:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None \
            else None
        return problem_response(self.status, self.body(), headers)


def problem_response(status: int, body: dict[str, Any],
                     headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=json.dumps(body), headers=headers,
                        content_type=PROBLEM_CONTENT_TYPE)


class GenericBadRequest(Problem):
    status, name, title = 400, "generic-bad-request", "Bad request."


class InvalidAPIParameters(Problem):
    status, name, title = 400, "invalid-api-params", "Missing or invalid API parameters."


class InvalidAuthParameters(Problem):
    status, name, title = 400, "invalid-auth-params", "Missing or invalid authorization parameters."


class AuthorizationFailed(Problem):
    status, name, title = 401, "auth-failed", "Credential/signature mismatch."


class GenericNotFound(Problem):
    status, name, title = 404, "generic-not-found", "Unknown URL path."


class KernelNotFound(Problem):
    status, name, title = 404, "kernel-not-found", "No such kernel."


class MethodNotAllowed(Problem):
    status, name, title = 405, "method-not-allowed", "Method not allowed for this path."


class QuotaExceeded(Problem):
    status, name, title = 412, "quota-exceeded", "Your resource quota is exceeded."


class RequestTooLarge(Problem):
    status, name, title = 413, "request-too-large", "The request body is too large."


class RateLimitExceeded(Problem):
    status, name, title = 429, "rate-limit-exceeded", "Rate limit exceeded."


class KernelCreationFailed(Problem):
    status, name, title = 500, "kernel-creation-failed", "Kernel creation has failed."


class KernelExecutionFailed(Problem):
    status, name = 500, "kernel-execution-failed"
    title = "Executing user code in the kernel has failed."


class KernelRestartFailed(Problem):
    status, name, title = 500, "kernel-restart-failed", "Restarting the kernel has failed."


class KernelDestructionFailed(Problem):
    status, name, title = 500, "kernel-destruction-failed", "Destroying the kernel has failed."


class InternalServerError(Problem):
    pass


class InstanceNotAvailable(Problem):
    status, name, title = 503, "instance-not-available", "No agent can run the kernel now."
    retry_after = 1


class ServiceUnavailable(Problem):
    status, name, title = 503, "service-unavailable", "A service the API depends on is unavailable."
    retry_after = 1


_HTTP_STATUS_PROBLEMS: dict[int, type[Problem]] = {
    404: GenericNotFound,
    405: MethodNotAllowed,
    413: RequestTooLarge,
}


def dependency_failure(exc: BaseException) -> str | None:
    """Name the dependency ("redis" or "database") that `exc` says is down, else None."""
    if isinstance(exc, (RedisUnavailable, redis_exc.ConnectionError, redis_exc.TimeoutError,
                        redis_exc.BusyLoadingError)):
        return "redis"
    if isinstance(exc, redis_exc.ResponseError) and "LOADING" in str(exc):
        return "redis"
    if isinstance(exc, (DatabaseUnavailable, sa_exc.OperationalError, sa_exc.InterfaceError,
                        sa_exc.DisconnectionError, sa_exc.TimeoutError)):
        return "database"
    if isinstance(exc, sa_exc.DBAPIError) and (exc.connection_invalidated or _pg_unreachable(exc)):
        return "database"
    if _asyncpg_transient(exc):
        return "database"
    if isinstance(exc, (ConnectionError, TimeoutError)) or (
            isinstance(exc, OSError) and exc.errno is not None):
        # raw socket errors from drivers (asyncpg connect, redis connect)
        return "database" if "asyncpg" in type(exc).__module__ else "redis or database"
    return None


def _pg_unreachable(exc: sa_exc.DBAPIError) -> bool:
    """asyncpg errors meaning "the server or the database is not there right now"."""
    orig = getattr(exc, "orig", None)
    if orig is not None and _asyncpg_transient(orig):
        return True
    text = f"{type(orig).__name__} {orig}".lower()
    return any(word in text for word in (
        "invalidcatalogname", "does not exist", "cannotconnectnow", "connectiondoesnotexist",
        "adminshutdown", "terminating connection", "connection refused", "too many clients",
        "the database system is shutting down", "the database system is starting up"))


# asyncpg errors (raised as they are while a pooled connection is opened, or
# wrapped by SQLAlchemy) that mean "retry shortly": the server is shutting down
# or starting up, refuses more connections, or the connection went away.
_ASYNCPG_TRANSIENT = frozenset({
    "CannotConnectNowError", "TooManyConnectionsError", "AdminShutdownError",
    "CrashShutdownError", "ConnectionDoesNotExistError", "ConnectionFailureError",
    "PostgresConnectionError", "ConnectionRejectionError", "InterfaceError",
    "InternalClientError", "SqlclientUnableToEstablishSqlconnectionError",
    "ConnectionResetError",
})


def _asyncpg_transient(exc: BaseException) -> bool:
    return type(exc).__module__.startswith("asyncpg") and any(
        cls.__name__ in _ASYNCPG_TRANSIENT for cls in type(exc).__mro__)


def as_problem(exc: BaseException) -> Problem:
    """Translate any exception into the Problem the client should see."""
    if isinstance(exc, Problem):
        return exc
    if isinstance(exc, web.HTTPException):
        problem_cls = _HTTP_STATUS_PROBLEMS.get(exc.status)
        if problem_cls is None:
            problem = GenericBadRequest(exc.reason) if 400 <= exc.status < 500 \
                else InternalServerError()
            problem.status = exc.status if exc.status >= 400 else 500
            return problem
        return problem_cls()
    failed = dependency_failure(exc)
    if failed is not None:
        log.warning("%s unavailable: %s: %s", failed, type(exc).__name__, exc)
        return ServiceUnavailable(f"The {failed} is not reachable right now; retry later.")
    log.error("unexpected error", exc_info=exc)
    return InternalServerError()


@web.middleware
async def problem_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Outermost: whatever happens inside, the client gets a problem body."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise  # redirects and the like are not errors
        if exc.status == 405:
            return MethodNotAllowed(f"{request.method} is not allowed here.").response()
        return as_problem(exc).response()
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # the boundary: translate, never leak a traceback
        return as_problem(exc).response()
