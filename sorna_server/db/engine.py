"""Async engines for the configured database (asyncpg or aiosqlite)."""
from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from ..config import SornaConfig, mask_url

_ASYNC_DRIVERS = {"postgresql": "asyncpg", "sqlite": "aiosqlite"}


class DatabaseUnavailable(Exception):
    """The database cannot be reached; the message names the masked URL and why."""


def async_url(url: str) -> URL:
    """Turn any configured URL into one with the async driver for its backend."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "postgres":
        backend = "postgresql"
    driver = _ASYNC_DRIVERS.get(backend)
    if driver is None:
        raise ValueError(f"unsupported database backend {backend!r} (use postgresql or sqlite)")
    return parsed.set(drivername=f"{backend}+{driver}")


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def create_engine(config: SornaConfig, **kwargs: Any) -> AsyncEngine:
    """Create (but do not connect) the async engine for `config.database_url`."""
    url = async_url(config.database_url)
    if url.get_backend_name() == "sqlite":
        if config.uses_embedded_db:
            config.data_dir.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, **kwargs)
        sa.event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    kwargs.setdefault("pool_size", 8)
    kwargs.setdefault("max_overflow", 16)
    kwargs.setdefault("pool_pre_ping", True)
    return create_async_engine(url, **kwargs)


def describe_failure(config: SornaConfig, exc: BaseException) -> str:
    reason = getattr(exc, "orig", None) or exc
    text = str(reason).strip().splitlines()[0] if str(reason).strip() else reason.__class__.__name__
    return f"cannot reach database {mask_url(config.database_url)}: {text}"
