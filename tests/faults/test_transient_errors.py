"""Transient database and Redis errors are answered 503 with Retry-After, never 500.

The exceptions are the drivers' own classes, raised as the drivers raise them
while a pooled connection is opened (asyncpg) or wrapped by SQLAlchemy."""
from __future__ import annotations

import asyncpg
import pytest
import sqlalchemy.exc as sa_exc
from redis import exceptions as redis_exc

from sorna_server.gateway import errors


@pytest.mark.parametrize("exc", [
    asyncpg.exceptions.CannotConnectNowError("the database system is shutting down"),
    asyncpg.exceptions.TooManyConnectionsError("sorry, too many clients already"),
    asyncpg.exceptions.AdminShutdownError("terminating connection due to administrator command"),
    asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed"),
    ConnectionRefusedError(111, "Connection refused"),
    sa_exc.DBAPIError("SELECT 1", None,
                      asyncpg.exceptions.CannotConnectNowError("starting up")),
    sa_exc.OperationalError("SELECT 1", None, Exception("database is locked")),
    redis_exc.ConnectionError("Connection closed by server."),
    redis_exc.BusyLoadingError("Redis is loading the dataset in memory"),
])
def test_transient_errors_are_503_with_retry_after(exc: BaseException) -> None:
    problem = errors.as_problem(exc)
    assert problem.status == 503 and problem.name == "service-unavailable"
    response = problem.response()
    assert response.status == 503 and response.headers["Retry-After"] == "1"


def test_a_bug_is_still_500() -> None:
    assert errors.as_problem(ValueError("bug")).status == 500
    assert errors.as_problem(asyncpg.exceptions.UndefinedTableError("no table")).status == 500
