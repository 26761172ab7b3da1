"""Fixtures for registry tests: a real Redis, a real database, a real PULL socket.

`env` gives a started Registry (intake + sweeper) and helpers that create the
rows the gateway would create (keypair, PREPARING kernel) and PUSH real
protocol frames (`agent_protocol.encode_event`) as a simulated agent would.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import sqlalchemy as sa
import zmq
import zmq.asyncio

from sorna_server import agent_protocol as proto
from sorna_server.agent_client import AgentRPCClient
from sorna_server.config import SornaConfig
from sorna_server.db.engine import create_engine
from sorna_server.db.models import kernels, keypairs, metadata, usage
from sorna_server.redis_conn import RedisClients
from sorna_server.registry import KernelRecord, Registry

from ..conftest import flush_redis_dbs, wait_for  # noqa: F401  (wait_for: re-exported)


def info(addr: str = "tcp://127.0.0.1:1", *, max_kernels: int = 10,
         languages: tuple[str, ...] = ("python3", "bash"), num_kernels: int = 0) -> dict:
    return {"addr": addr, "max_kernels": max_kernels, "num_kernels": num_kernels,
            "languages": list(languages), "version": "test", "cpu_count": 2,
            "mem_bytes": 1 << 30, "isolation": {}}


@dataclass
class RegistryEnv:
    config: SornaConfig
    redis: RedisClients
    engine: Any
    rpc: AgentRPCClient
    registry: Registry
    pusher: zmq.asyncio.Socket
    extra: list = field(default_factory=list)

    async def push(self, event_type: str, instance_id: str, **fields: Any) -> None:
        await self.pusher.send(proto.encode_event(event_type, instance_id, **fields))

    async def push_raw(self, frame: bytes) -> None:
        await self.pusher.send(frame)

    async def heartbeat(self, instance_id: str, running: list[str] | tuple = (), *,
                        interval: float | None = None, **info_args: Any) -> None:
        await self.push("instance_heartbeat", instance_id, info=info(**info_args),
                        running_kernels=list(running),
                        interval=interval or self.config.heartbeat_interval)

    async def create_keypair(self, access_key: str | None = None, limit: int = 100) -> str:
        access_key = access_key or ("AKIA" + uuid.uuid4().hex[:16].upper())
        async with self.engine.begin() as conn:
            await conn.execute(sa.insert(keypairs).values(
                user_id=2, access_key=access_key, secret_key="s" * 40,
                concurrency_limit=limit, concurrency_used=0, rate_limit=1000))
        return access_key

    async def create_kernel_row(self, access_key: str, lang: str = "python3",
                                kernel_id: str | None = None) -> str:
        """What the gateway does before scheduling: take a slot + PREPARING row."""
        from sorna_server.db import quota

        kernel_id = kernel_id or uuid.uuid4().hex
        async with self.engine.begin() as conn:
            assert await quota.take_slot(conn, access_key)
            await conn.execute(sa.insert(kernels).values(id=kernel_id, lang=lang,
                                                         access_key=access_key))
        return kernel_id

    async def register(self, access_key: str, instance_id: str, *, lang: str = "python3",
                       addr: str = "tcp://127.0.0.1:1", token: str | None = None,
                       kernel_id: str | None = None, schedule: bool = False) -> str:
        kernel_id = await self.create_kernel_row(access_key, lang, kernel_id)
        if schedule:
            inst = await self.registry.schedule(lang, access_key)
            instance_id, addr = inst.id, inst.addr
        now = time.time()
        await self.registry.register_kernel(KernelRecord(
            id=kernel_id, instance_id=instance_id, addr=addr, access_key=access_key,
            lang=lang, stdin_port=1, stdout_port=2, created_at=now, last_used=now,
            num_queries=0, limits={}, last_stats={}), token)
        return kernel_id

    async def kernel_row(self, kernel_id: str) -> Any:
        async with self.engine.connect() as conn:
            return (await conn.execute(sa.select(kernels).where(kernels.c.id == kernel_id))).first()

    async def usage_rows(self, kernel_id: str) -> list:
        async with self.engine.connect() as conn:
            query = sa.select(usage).where(usage.c.kernel_id == kernel_id)
            return (await conn.execute(query)).all()

    async def slots_used(self, access_key: str) -> int:
        async with self.engine.connect() as conn:
            return (await conn.execute(sa.select(keypairs.c.concurrency_used)
                                       .where(keypairs.c.access_key == access_key))).scalar()


async def make_env(config: SornaConfig, *, intake: bool = True, sweeper: bool = True,
                   create_schema: bool = True) -> RegistryEnv:
    engine = create_engine(config)
    if create_schema:
        async with engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
    redis = RedisClients.connect(config.explicit_redis_url, config)
    rpc = AgentRPCClient(default_timeout=5.0)
    registry = Registry(config, redis, engine, rpc)
    await registry.start(intake=intake, sweeper=sweeper)
    pusher = zmq.asyncio.Context.instance().socket(zmq.PUSH)
    pusher.setsockopt(zmq.LINGER, 0)
    pusher.connect(f"tcp://127.0.0.1:{config.events_port}")
    return RegistryEnv(config, redis, engine, rpc, registry, pusher)


async def close_env(env: RegistryEnv) -> None:
    env.pusher.close(0)
    await env.registry.stop()
    await env.rpc.close()
    await env.redis.close()
    await env.engine.dispose()


# Registry tests use their own database numbers on a shared Redis server, so
# other suites running at the same time (which flush 11-14) do not disturb them.
REGISTRY_REDIS_DBS = {"redis_db_kernels": 7, "redis_db_instances": 8,
                      "redis_db_sessions": 9, "redis_db_ratelimit": 10}


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
