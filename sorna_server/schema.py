"""Create and migrate the database schema (alembic, driven through the async engine).

Every function takes the loaded `SornaConfig`; the database URL always comes
from it (an optional alembic.ini may only change where the migration scripts
live).  Alembic runs synchronously on a connection borrowed from the async
engine through `AsyncConnection.run_sync`, so no sync driver is needed.
"""
from __future__ import annotations

import importlib.resources
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

import sorna_server

from .config import SornaConfig, mask_url
from .db.engine import open_database
from .db.models import metadata

VERSION_TABLE = "alembic_version"


class SchemaError(Exception):
    """The schema operation cannot be done; the message is one line with a hint."""


class SchemaMissing(SchemaError):
    """The database has no (or an unmanaged) Sorna schema."""


@dataclass
class SchemaStatus:
    """Where a database stands relative to the migration scripts."""

    url: str                      # masked
    revisions: list[str]          # revisions stamped in the database (empty: none)
    head: str                     # newest revision of the scripts
    tables: list[str] = field(default_factory=list)

    @property
    def up_to_date(self) -> bool:
        return self.revisions == [self.head]

    def as_dict(self) -> dict[str, Any]:
        return {"url": self.url, "revisions": self.revisions, "head": self.head,
                "up_to_date": self.up_to_date, "tables": self.tables}


def migrations_dir() -> Path:
    """The alembic script folder: inside the installed package, else the source tree."""
    try:
        location = importlib.resources.files("sorna_server.migrations")
        path = Path(str(location))
        if (path / "env.py").is_file():
            return path
    except ModuleNotFoundError:
        pass
    source_tree = Path(sorna_server.__file__).resolve().parent.parent / "migrations"
    if (source_tree / "env.py").is_file():
        return source_tree
    raise SchemaError("the migration scripts are missing from this installation "
                      "(expected the sorna_server.migrations package)")


def alembic_config(config: SornaConfig, ini_file: str | os.PathLike | None = None) -> AlembicConfig:
    """An alembic Config for `config`; `ini_file` may set `script_location` (its URL is unused)."""
    if ini_file is not None:
        if not Path(ini_file).is_file():
            raise SchemaError(f"alembic config file {ini_file} does not exist")
        cfg = AlembicConfig(str(ini_file))
    else:
        cfg = AlembicConfig()
    if not cfg.get_main_option("script_location"):
        cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.attributes["sorna_config"] = config
    return cfg


def _script(cfg: AlembicConfig) -> ScriptDirectory:
    try:
        return ScriptDirectory.from_config(cfg)
    except CommandError as exc:
        raise SchemaError(f"cannot read migration scripts: {exc}") from None


def _head(script: ScriptDirectory) -> str:
    heads = script.get_heads()
    if len(heads) != 1:
        raise SchemaError(f"the migration scripts have {len(heads)} heads ({', '.join(heads)}); "
                          "expected exactly one")
    return heads[0]


def _table_names(conn: Connection) -> list[str]:
    return sorted(sa.inspect(conn).get_table_names())


def _current_revisions(conn: Connection) -> list[str]:
    return sorted(MigrationContext.configure(conn).get_current_heads())


def _run(cfg: AlembicConfig, conn: Connection, action: str, *args: Any) -> None:
    cfg.attributes["connection"] = conn
    try:
        getattr(command, action)(cfg, *args)
    except CommandError as exc:
        raise SchemaError(f"{action} failed: {exc}") from None
    finally:
        cfg.attributes.pop("connection", None)


async def _status(conn: AsyncConnection, config: SornaConfig, head: str) -> SchemaStatus:
    tables = await conn.run_sync(_table_names)
    revisions = await conn.run_sync(_current_revisions) if VERSION_TABLE in tables else []
    return SchemaStatus(url=mask_url(config.database_url), revisions=revisions, head=head,
                        tables=[name for name in tables if name != VERSION_TABLE])


async def _create_and_stamp(conn: AsyncConnection, cfg: AlembicConfig) -> None:
    await conn.run_sync(metadata.create_all)
    await conn.run_sync(lambda sync_conn: _run(cfg, sync_conn, "stamp", "head"))


async def oneshot(config: SornaConfig, rev: str = "head", *,
                  ini_file: str | os.PathLike | None = None) -> SchemaStatus:
    """Create the newest schema on an empty database and stamp it; refuse otherwise."""
    cfg = alembic_config(config, ini_file)
    head = _head(_script(cfg))
    if rev not in ("head", head):
        raise SchemaError(f"oneshot only creates the newest schema (head = {head}); "
                          f"to build revision {rev}, run `sorna schema upgrade {rev}` "
                          "on the empty database")
    async with open_database(config) as engine:
        async with engine.begin() as conn:
            before = await _status(conn, config, head)
            if before.tables or before.revisions:
                shown = ", ".join((before.tables or [VERSION_TABLE])[:5])
                raise SchemaError(f"database {before.url} already has tables ({shown}); "
                                  "use `sorna schema upgrade` to bring it up to date")
            await _create_and_stamp(conn, cfg)
            return await _status(conn, config, head)


async def upgrade(config: SornaConfig, rev: str = "head", *,
                  ini_file: str | os.PathLike | None = None) -> tuple[SchemaStatus, SchemaStatus]:
    """Run the migrations up to `rev`; returns the status before and after."""
    cfg = alembic_config(config, ini_file)
    head = _head(_script(cfg))
    async with open_database(config) as engine:
        async with engine.begin() as conn:
            before = await _status(conn, config, head)
            if before.tables and not before.revisions:
                raise SchemaMissing(
                    f"database {before.url} has tables ({', '.join(before.tables[:5])}) but no "
                    "alembic version; it was not created by `sorna schema`")
            await conn.run_sync(lambda sync_conn: _run(cfg, sync_conn, "upgrade", rev))
            after = await _status(conn, config, head)
    return before, after


async def ensure_schema(config: SornaConfig, *,
                        ini_file: str | os.PathLike | None = None) -> str:
    """Make the schema current: "created" (empty DB), "upgraded" (behind) or "current"."""
    cfg = alembic_config(config, ini_file)
    head = _head(_script(cfg))
    async with open_database(config) as engine:
        async with engine.begin() as conn:
            status = await _status(conn, config, head)
            if status.up_to_date:
                return "current"
            if not status.tables and not status.revisions:
                await _create_and_stamp(conn, cfg)
                return "created"
            if not status.revisions:
                raise SchemaMissing(
                    f"database {status.url} has tables ({', '.join(status.tables[:5])}) but no "
                    "alembic version; use an empty database")
            await conn.run_sync(lambda sync_conn: _run(cfg, sync_conn, "upgrade", "head"))
            return "upgraded"


async def current(config: SornaConfig, *,
                  ini_file: str | os.PathLike | None = None) -> SchemaStatus:
    """The revisions stamped in the database, next to the newest script revision."""
    cfg = alembic_config(config, ini_file)
    head = _head(_script(cfg))
    async with open_database(config) as engine:
        async with engine.connect() as conn:
            return await _status(conn, config, head)


async def require_schema(conn: AsyncConnection, config: SornaConfig) -> None:
    """Raise SchemaMissing with a hint when Sorna's tables are not there."""
    tables = set(await conn.run_sync(_table_names))
    missing = sorted(set(metadata.tables) - tables)
    if missing:
        raise SchemaMissing(f"database {mask_url(config.database_url)} has no Sorna schema "
                            f"(missing {', '.join(missing)}); run `sorna schema oneshot head`")


@asynccontextmanager
async def open_ready_database(config: SornaConfig) -> AsyncIterator[AsyncEngine]:
    """An engine on a reachable database that has Sorna's tables; disposed on exit."""
    async with open_database(config) as engine:
        async with engine.connect() as conn:
            await require_schema(conn, config)
        yield engine


def history(config: SornaConfig, *,
            ini_file: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """The migration scripts, newest first (no database needed)."""
    cfg = alembic_config(config, ini_file)
    script = _script(cfg)
    heads = set(script.get_heads())
    return [
        {
            "revision": rev.revision,
            "down_revision": rev.down_revision,
            "description": (rev.doc or "").strip(),
            "is_head": rev.revision in heads,
        }
        for rev in script.walk_revisions()
    ]
