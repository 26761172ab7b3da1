"""The live registry: which agents are alive and which kernels run where.

State lives in Redis (layout: `sorna_server.redis_keys`, docs/redis-layout.md).
Every public method is safe to call from any number of gateway processes at
once.  The durable side of a kernel (its database row, settlement, quota
slot) belongs to `lifecycle.KernelLifecycle`, reached as `registry.lifecycle`;
agents that stopped answering RPC are tracked by `registry.suspects`.  The
background services (event intake, lost-agent sweeper, reconciler) are
separate objects that the application starts around a Registry.
"""
from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, cast

from sqlalchemy.ext.asyncio import AsyncEngine

from .. import redis_keys as keys
from ..agent_client import AgentRPCClient
from ..config import SornaConfig
from ..redis_conn import (
    RedisClients,
    hash_fields,
    hgetall_many,
    scan_names,
    set_members,
    smembers_many,
)
from . import scripts
from .constants import LIVENESS_TTL_FACTOR
from .lifecycle import KernelLifecycle
from .records import Instance, InstanceNotAvailable, KernelRecord
from .suspects import SuspectAgents


class Registry:
    def __init__(self, config: SornaConfig, redis: RedisClients, db: AsyncEngine,
                 rpc: AgentRPCClient):
        self.config = config
        self.redis = redis
        self.db = db
        self.rpc = rpc
        self.heartbeat_interval = config.heartbeat_interval
        self.process_token = secrets.token_hex(8)
        self.lifecycle = KernelLifecycle(config, redis, db)
        self.suspects = SuspectAgents(redis, rpc, config.heartbeat_interval)
        # A slot reservation (and a PREPARING kernel row) older than this is abandoned.
        self.creation_timeout = self.lifecycle.creation_timeout

    async def start(self) -> None:
        """Load the Lua scripts (they are also loaded on first use)."""
        for script in scripts.ALL:
            await script.load(self.redis.instances)

    async def stop(self) -> None:
        await self.suspects.close()

    # --- scheduling ----------------------------------------------------------
    async def schedule(self, lang: str, access_key: str) -> Instance:
        """Pick the least-loaded live, non-draining agent offering `lang` with a free
        slot and reserve that slot, atomically (one Lua script).  Raises
        InstanceNotAvailable with the reason when nothing fits."""
        now = time.time()
        token = secrets.token_hex(8)
        result = await scripts.schedule(
            self.redis.instances, lang, repr(now), repr(now + self.creation_timeout), token)
        if result[0] != "ok":
            raise InstanceNotAvailable(result[1], lang)
        _, instance_id, flat = result
        return Instance.from_hash(instance_id, dict(zip(flat[::2], flat[1::2], strict=True)))

    async def unreserve(self, instance_id: str) -> None:
        """Give back a slot reserved by `schedule` when the creation failed."""
        await scripts.unreserve(self.redis.instances, instance_id, repr(time.time()))

    # --- sessions ------------------------------------------------------------
    async def claim_session(self, access_key: str, token: str, lang: str,
                            kernel_id: str) -> str | None:
        """Bind the session to `kernel_id` if unbound (returns None); else return
        the kernel id it is bound to."""
        return cast("str | None", await scripts.claim_session(
            self.redis.sessions, kernel_id, keys=(keys.session(access_key, lang, token),)))

    async def release_session(self, access_key: str, token: str, lang: str,
                              kernel_id: str) -> None:
        """Unbind the session, only if it is still bound to `kernel_id`."""
        await scripts.release_session(
            self.redis.sessions, kernel_id, keys=(keys.session(access_key, lang, token),))

    # --- kernels ---------------------------------------------------------------
    async def get_kernel(self, kernel_id: str) -> KernelRecord | None:
        raw = await hash_fields(self.redis.kernels, keys.kernel(kernel_id))
        return KernelRecord.from_hash(kernel_id, raw) if raw else None

    async def get_kernels(self, kernel_ids: Iterable[str]) -> list[KernelRecord]:
        ids = list(kernel_ids)
        if not ids:
            return []
        raws = await hgetall_many(self.redis.kernels, [keys.kernel(kid) for kid in ids])
        return [KernelRecord.from_hash(kid, raw) for kid, raw in zip(ids, raws, strict=True) if raw]

    async def kernel_extra(self, kernel_id: str) -> dict[str, str]:
        """Fields of the kernel hash beyond KernelRecord (token, registered_at...)."""
        raw = await hash_fields(self.redis.kernels, keys.kernel(kernel_id))
        return {k: v for k, v in raw.items()
                if k in ("token", "registered_at", "adopted_at")}

    async def list_kernels(self, *, instance_id: str | None = None,
                           access_key: str | None = None) -> list[KernelRecord]:
        if instance_id is not None:
            ids = await self.instance_kernel_ids(instance_id)
            if access_key is not None:
                ids &= await set_members(self.redis.kernels, keys.access_key_kernels(access_key))
        elif access_key is not None:
            ids = await set_members(self.redis.kernels, keys.access_key_kernels(access_key))
        else:
            ids = {key[len(keys.KERNEL_PREFIX):] for key in
                   await scan_names(self.redis.kernels, keys.KERNEL_PREFIX + "*")}
        records = await self.get_kernels(sorted(ids))
        return sorted(records, key=lambda r: (r.created_at, r.id))

    async def update_ports(self, kernel_id: str, stdin_port: int, stdout_port: int) -> None:
        await scripts.update_kernel(self.redis.kernels, kernel_id, "stdin_port", str(stdin_port),
                                    "stdout_port", str(stdout_port))

    async def touch_kernel(self, kernel_id: str) -> int:
        """Count one query and stamp last_used; returns the new count (0 if unknown)."""
        return int(await scripts.touch_kernel(self.redis.kernels, kernel_id, repr(time.time())))

    async def touch_kernels(self, counts: dict[str, int]) -> int:
        """touch_kernel for many kernels at once: add `counts[id]` queries to each
        and stamp last_used; returns how many of them exist."""
        args: list[Any] = [repr(time.time())]
        for kernel_id, count in counts.items():
            args += [kernel_id, int(count)]
        if len(args) == 1:
            return 0
        return int(await scripts.touch_kernels(self.redis.kernels, *args))

    async def update_stats(self, stats: dict[str, dict[str, Any]],
                           instance_id: str | None = None) -> int:
        """Store per-kernel stats; with `instance_id`, only of that agent's kernels."""
        if instance_id is not None:
            own = await self.instance_kernel_ids(instance_id)
            stats = {kid: values for kid, values in stats.items() if kid in own}
        args: list[str] = []
        for kernel_id, values in stats.items():
            args += [kernel_id, json.dumps(values)]
        if not args:
            return 0
        return int(await scripts.update_stats(self.redis.kernels, *args))

    # --- instances ---------------------------------------------------------------
    async def get_instance(self, instance_id: str) -> Instance | None:
        raw = await hash_fields(self.redis.instances, keys.instance(instance_id))
        return Instance.from_hash(instance_id, raw) if raw else None

    async def list_instances(self) -> list[Instance]:
        ids = sorted(await set_members(self.redis.instances, keys.INSTANCES))
        if not ids:
            return []
        raws = await hgetall_many(self.redis.instances, [keys.instance(iid) for iid in ids])
        return [Instance.from_hash(iid, raw) for iid, raw in zip(ids, raws, strict=True) if raw]

    async def instance_owner(self, instance_id: str) -> str | None:
        """The agent key (z85; "" without keys) that registered `instance_id`,
        or None when no agent holds that id."""
        owner = await self.redis.instances.hget(keys.instance(instance_id), "key")
        return owner.decode() if isinstance(owner, bytes) else owner

    async def instance_kernel_ids(self, instance_id: str) -> set[str]:
        return await set_members(self.redis.instances, keys.instance_kernels(instance_id))

    async def is_alive(self, instance_id: str) -> bool:
        return bool(await self.redis.instances.exists(keys.instance_alive(instance_id)))

    async def set_draining(self, instance_id: str, draining: bool) -> Instance | None:
        """Drain (no new kernels; existing ones keep running) or undrain an agent.
        Returns the updated instance, or None when the id is unknown."""
        status = await scripts.set_draining(self.redis.instances, instance_id,
                                            repr(time.time()), "1" if draining else "0")
        if not status:
            return None
        return await self.get_instance(instance_id)

    async def forget_instance(self, instance_id: str) -> list[str]:
        """Remove an instance from Redis; returns the kernel ids it still held."""
        return list(await scripts.forget_instance(self.redis.instances, instance_id) or [])

    async def instance_kernel_sets(self, instance_ids: list[str]) -> dict[str, set[str]]:
        """The kernel set of each instance, in one round trip."""
        names = [keys.instance_kernels(iid) for iid in instance_ids]
        return dict(zip(instance_ids, await smembers_many(self.redis.instances, names),
                        strict=True))

    def liveness_ttl_ms(self, interval: float) -> int:
        return max(int(interval * LIVENESS_TTL_FACTOR * 1000), 1000)


@asynccontextmanager
async def open_registry(config: SornaConfig, *, need_db: bool = False,
                        rpc_timeout: float = 5.0) -> AsyncIterator[Registry]:
    """A Registry on the configured Redis (embedded one found through the data
    directory) for tools such as `sorna registry`; nothing is started.  With
    `need_db`, the database must be reachable and have Sorna's tables."""
    from ..db.engine import create_engine
    from ..redis_conn import open_redis
    from ..schema import open_ready_database

    async with open_redis(config) as redis, AsyncExitStack() as stack:
        if need_db:
            engine = await stack.enter_async_context(open_ready_database(config))
        else:
            engine = create_engine(config)  # connects only if used
            stack.push_async_callback(engine.dispose)
        rpc = AgentRPCClient(default_timeout=rpc_timeout)
        stack.push_async_callback(rpc.close)
        yield Registry(config, redis, engine, rpc)
