"""Fixtures for registry tests: a real Redis, a real database, a real PULL socket.

`env` gives a started Registry (intake + sweeper) and helpers that create the
rows the gateway would create (keypair, PREPARING kernel) and PUSH real
protocol frames (`agent_protocol.encode_event`) as a simulated agent would.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from sorna_server.config import SornaConfig
from tests.helpers import REGISTRY_REDIS_DBS, RegistryEnv, close_env, flush_redis_dbs, make_env


@pytest.fixture
def registry_config(make_config, db_url, redis_url) -> Callable[..., SornaConfig]:
    flush_redis_dbs(redis_url, REGISTRY_REDIS_DBS.values())

    def build(**overrides: Any) -> SornaConfig:
        values = {"db_url": db_url, "redis_url": redis_url, "heartbeat_interval": 0.5,
                  **REGISTRY_REDIS_DBS}
        values.update(overrides)
        return make_config(**values)
    return build


@pytest.fixture
async def env(registry_config) -> RegistryEnv:
    environment = await make_env(registry_config())
    try:
        yield environment
    finally:
        await close_env(environment)
