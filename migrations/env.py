"""Alembic environment for Sorna.

The database URL always comes from Sorna's own config loader (`sorna.toml`,
`SORNA_*`, flags), never from `alembic.ini`, so every command talks to the same
database.  Three ways in:

- `sorna_server.schema` passes an open (sync-adapted) connection in
  `config.attributes["connection"]`, from inside its own event loop;
- a plain `alembic` command (with an alembic.ini whose `script_location` points
  here) opens the async engine itself with `asyncio.run`;
- `alembic ... --sql` renders SQL offline from the configured URL.
"""
from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.pool import NullPool

from sorna_server.db.models import metadata

alembic_config = context.config


def _sorna_config():
    from sorna_server.config import load_config

    given = alembic_config.attributes.get("sorna_config")
    if given is not None:
        return given
    return load_config(alembic_config.get_main_option("sorna_config_file") or None)


def run_migrations_on(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        compare_type=True,
        # SQLite cannot ALTER most things; batch mode recreates the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_migrations_online() -> None:
    from sorna_server.db.engine import open_database

    async with open_database(_sorna_config(), poolclass=NullPool) as engine:
        async with engine.begin() as conn:
            await conn.run_sync(run_migrations_on)


def run_migrations_offline() -> None:
    from sorna_server.db.engine import async_url

    url = async_url(_sorna_config().database_url)
    context.configure(url=url, target_metadata=metadata, literal_binds=True,
                      dialect_opts={"paramstyle": "named"},
                      render_as_batch=url.get_backend_name() == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
elif alembic_config.attributes.get("connection") is not None:
    run_migrations_on(alembic_config.attributes["connection"])
else:
    asyncio.run(run_migrations_online())
