"""Async engines for the configured database (asyncpg or aiosqlite)."""
from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
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
    # NORMAL in WAL mode cannot corrupt the database: a commit is durable once the
    # WAL is synced at the next checkpoint, so an OS crash or power loss may drop
    # the last commits (never a process crash).  It saves an fsync per commit
    # (~0.4 ms here; two commits per kernel creation).
    cursor.execute("PRAGMA synchronous=NORMAL")
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
    if "poolclass" not in kwargs:
        kwargs.setdefault("pool_size", 8)
        kwargs.setdefault("max_overflow", 16)
    kwargs.setdefault("pool_pre_ping", True)
    # asyncpg waits 60 s by default for an unreachable host; fail sooner.
    kwargs.setdefault("connect_args", {"timeout": CONNECT_TIMEOUT})
    return create_async_engine(url, **kwargs)


CONNECT_TIMEOUT = 10.0


def describe_failure(config: SornaConfig, exc: BaseException) -> str:
    """One line: the masked URL and the first line of the reason."""
    reason = getattr(exc, "orig", None) or exc
    text = str(reason).strip()
    # asyncpg errors adapted by SQLAlchemy read "<class 'asyncpg...Error'>: message".
    if text.startswith("<class '") and "'>: " in text:
        text = text.split("'>: ", 1)[1]
    text = text.splitlines()[0] if text else reason.__class__.__name__
    if isinstance(reason, TimeoutError) and not str(reason):
        text = "timed out"
    return f"cannot reach database {mask_url(config.database_url)}: {text}"


def _sqlite_preflight(config: SornaConfig) -> None:
    """Catch a missing folder before aiosqlite does (its failed connect leaves a thread behind)."""
    database = make_url(config.database_url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    path = Path(database)
    if not path.parent.is_dir():
        raise DatabaseUnavailable(f"cannot reach database {mask_url(config.database_url)}: "
                                  f"unable to open database file (folder {path.parent} "
                                  "does not exist)")
    if path.exists() and not path.is_file():
        raise DatabaseUnavailable(f"cannot reach database {mask_url(config.database_url)}: "
                                  f"unable to open database file ({path} is not a file)")


async def check_connection(engine: AsyncEngine, config: SornaConfig) -> None:
    """Open one connection and run `SELECT 1`; raise DatabaseUnavailable if that fails."""
    if engine.dialect.name == "sqlite":
        _sqlite_preflight(config)
    try:
        async with engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))
    except Exception as exc:  # any failure to connect means "unavailable"
        raise DatabaseUnavailable(describe_failure(config, exc)) from exc


@asynccontextmanager
async def open_database(config: SornaConfig, **kwargs: Any) -> AsyncIterator[AsyncEngine]:
    """An engine whose database answered a first query; disposed on exit."""
    engine = create_engine(config, **kwargs)
    try:
        await check_connection(engine, config)
        yield engine
    finally:
        await engine.dispose()
