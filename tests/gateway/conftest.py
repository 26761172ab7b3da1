"""Fixtures for gateway tests: the real app (factory) on a real port, real Redis,
a real database with the schema and keypairs, and real reference agents.

`gateway_factory(**config_overrides)` starts the app through `aiohttp_client`
and returns a `Gateway` whose `request()` signs requests exactly as the
historic client does.  `gateway_factory(agents=1)` also starts a reference
agent reporting to the gateway's event port and waits until it is registered.
`serve(*flags)` runs `sorna serve` as a real process instead.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from sorna_server.config import SornaConfig
from sorna_server.gateway import keys
from sorna_server.gateway.app import create_app
from tests.helpers import (
    Gateway,
    flush_redis_dbs,
    prepare_database,
    wait_for,
)


@pytest.fixture
def gateway_redis_url(embedded_redis_url) -> str:
    """The Redis of gateway tests: the embedded one (test modules may override this
    fixture with `redis_url` to also run against the real server)."""
    return embedded_redis_url


@pytest.fixture
def gateway_config(make_config, db_url, gateway_redis_url) -> Callable[..., SornaConfig]:
    """Config on a fresh database (sqlite, and postgresql when configured) and a
    flushed Redis."""
    def build(**overrides: Any) -> SornaConfig:
        values: dict[str, Any] = {"db_url": db_url, "redis_url": gateway_redis_url,
                                  "heartbeat_interval": 0.5, "keypair_cache_ttl": 0.5,
                                  "agent_rpc_timeout": 5.0, "log_level": "INFO"}
        values.update(overrides)
        config = make_config(**values)
        flush_redis_dbs(config.explicit_redis_url,
                        [config.redis_db_kernels, config.redis_db_instances,
                         config.redis_db_sessions, config.redis_db_ratelimit])
        return config
    return build


@pytest.fixture
async def gateway_factory(gateway_config, aiohttp_client, agent_factory):
    async def start(*, agents: int = 0, agent_flags: dict[str, Any] | None = None,
                    prepare: bool = True, **overrides: Any) -> Gateway:
        config = gateway_config(**overrides)
        if prepare:
            await prepare_database(config)
        client = await aiohttp_client(create_app(config))
        gateway = Gateway(config, client)
        for _ in range(agents):
            gateway.agents.append(await asyncio.to_thread(
                agent_factory, config.events_port, heartbeat_interval=0.5,
                **(agent_flags or {})))
        if agents:
            registry = gateway.app[keys.REGISTRY]

            async def all_registered() -> bool:
                addrs = {i.addr for i in await registry.list_instances() if i.status == "running"}
                return all(agent.addr in addrs for agent in gateway.agents)
            await wait_for(all_registered)
        return gateway
    return start


