"""The live registry: which agents are alive and which kernels run where.

State lives in Redis (layout: `sorna_server.redis_keys`, docs/redis-layout.md);
durable records (kernel rows, usage, quotas) in the database.  Every public
method is safe to call from any number of gateway processes at once.

Settlement (the end of a kernel, whatever ended it) is decided by the
database: one conditional UPDATE moves the kernel row from PREPARING/RUNNING to
its final status, and only the caller whose UPDATE matched writes the usage row
and gives back the quota slot, in the same transaction.  Redis bookkeeping is
removed afterwards by idempotent operations (the instance load is derived from
set sizes, so removing a kernel twice frees one slot).
"""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from redis.exceptions import RedisError
from sqlalchemy.ext.asyncio import AsyncEngine

from .. import redis_keys as keys
from ..agent_client import AgentRPCClient
from ..config import SornaConfig
from ..db import quota
from ..db.models import FINAL_STATUSES, LIVE_STATUSES, KernelStatus, kernels, usage
from ..redis_conn import RedisClients, hgetall_many
from . import scripts
from .records import Instance, InstanceNotAvailable, KernelRecord, RegistrationFailed

log = logging.getLogger(__name__)

LIVENESS_TTL_FACTOR = 3.3   # liveness key TTL, in heartbeat intervals
ABSENCE_GRACE_FACTOR = 1.5  # a kernel missing from (or unknown to) heartbeats this long is acted on
GRACE_PERIOD_FACTOR = 2.0   # start-up reconciliation waits this many heartbeat intervals


def usage_units(stats: dict[str, Any] | None) -> dict[str, int]:
    """Usage columns from agent stats: cpu in ms, memory/io/net in KiB."""
    stats = stats or {}

    def num(name: str) -> int:
        value = stats.get(name, 0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            return 0
        return int(value)

    return {
        "cpu_used": num("cpu_used"),
        "mem_used": num("mem_max_bytes") // 1024,
        "io_used": (num("io_read_bytes") + num("io_write_bytes")) // 1024,
        "net_used": (num("net_rx_bytes") + num("net_tx_bytes")) // 1024,
    }


def _loads(text: str | None, default: Any) -> Any:
    if not text:
        return default
    try:
        return json.loads(text)
    except ValueError:
        return default


class Registry:
    def __init__(self, config: SornaConfig, redis: RedisClients, db: AsyncEngine,
                 rpc: AgentRPCClient):
        self.config = config
        self.redis = redis
        self.db = db
        self.rpc = rpc
        self.heartbeat_interval = config.heartbeat_interval
        # A slot reservation (and a PREPARING kernel row) older than this is abandoned.
        self.creation_timeout = max(30.0, 3 * config.agent_rpc_timeout)
        self.process_token = secrets.token_hex(8)
        self._tasks: set[asyncio.Task] = set()
        self._intake: Any = None
        self._sweeper: Any = None

    # --- lifecycle ---------------------------------------------------------
    async def start(self, *, intake: bool = True, sweeper: bool = True) -> None:
        """Load the scripts; bind the event intake and start the sweeper as asked."""
        from .intake import EventIntake
        from .sweeper import Sweeper

        for script in scripts.ALL:
            await script.load(self.redis.instances)
        if intake:
            self._intake = EventIntake(self)
            await self._intake.start()
        if sweeper:
            self._sweeper = Sweeper(self)
            self._sweeper.start()

    async def stop(self, timeout: float = 5.0) -> None:
        if self._intake is not None:
            await self._intake.stop()
            self._intake = None
        if self._sweeper is not None:
            await self._sweeper.stop()
            self._sweeper = None
        pending = list(self._tasks)
        if pending:
            done, still = await asyncio.wait(pending, timeout=timeout)
            for task in still:
                log.warning("registry task %s cut off at shutdown", task.get_name())
                task.cancel()
            await asyncio.gather(*still, return_exceptions=True)

    @property
    def events_endpoint(self) -> str | None:
        return self._intake.endpoint if self._intake is not None else None

    def spawn(self, coro: Any, name: str) -> asyncio.Task:
        """Run background work (settlement, revival...) tracked for shutdown."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("registry task %s failed: %s: %s", task.get_name(),
                      exc.__class__.__name__, exc)

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
        return await scripts.claim_session(
            self.redis.sessions, kernel_id, keys=(keys.session(access_key, lang, token),))

    async def release_session(self, access_key: str, token: str, lang: str,
                              kernel_id: str) -> None:
        """Unbind the session, only if it is still bound to `kernel_id`."""
        await scripts.release_session(
            self.redis.sessions, kernel_id, keys=(keys.session(access_key, lang, token),))

    # --- kernels ---------------------------------------------------------------
    async def register_kernel(self, record: KernelRecord, token: str | None = None) -> None:
        """Record a kernel the agent created: kernel hash, the instance's kernel set
        (consuming the reservation), the session, and the DB row -> RUNNING.

        Raises RegistrationFailed (after undoing its Redis writes) when the agent
        is no longer registered or the kernel row is no longer PREPARING.
        """
        now = time.time()
        state = await scripts.bind_kernel(
            self.redis.instances, record.instance_id, record.id, repr(now), "1")
        if state != "ok":
            raise RegistrationFailed(record.id, f"instance-{state}")
        mapping = {**record.to_hash(), "registered_at": repr(now)}
        if token:
            mapping["token"] = token
        pipe = self.redis.kernels.pipeline(transaction=True)
        pipe.hset(keys.kernel(record.id), mapping=mapping)
        pipe.sadd(keys.access_key_kernels(record.access_key), record.id)
        await pipe.execute()
        if token:
            await self.claim_session(record.access_key, token, record.lang, record.id)
        async with self.db.begin() as conn:
            result = await conn.execute(
                sa.update(kernels)
                .where(kernels.c.id == record.id,
                       kernels.c.status == KernelStatus.PREPARING.value)
                .values(status=KernelStatus.RUNNING.value, agent=record.instance_id))
        if result.rowcount != 1:
            await self._forget_kernel(record.id, mapping, None)
            raise RegistrationFailed(record.id, "kernel-settled")

    async def adopt_kernel(self, instance_id: str, addr: str, kernel_id: str,
                           access_key: str, lang: str, info: dict[str, Any]) -> None:
        """Take back into Redis a kernel an agent runs whose DB row is RUNNING there
        (Redis lost it, e.g. after a restart of an embedded Redis)."""
        now = time.time()
        state = await scripts.bind_kernel(
            self.redis.instances, instance_id, kernel_id, repr(now), "0")
        if state != "ok":
            raise RegistrationFailed(kernel_id, f"instance-{state}")
        created = info.get("created_at")
        record = KernelRecord(
            id=kernel_id, instance_id=instance_id, addr=addr, access_key=access_key, lang=lang,
            stdin_port=int(info.get("stdin_port") or 0),
            stdout_port=int(info.get("stdout_port") or 0),
            created_at=float(created) if isinstance(created, (int, float)) else now,
            last_used=now, num_queries=0, limits={}, last_stats={})
        pipe = self.redis.kernels.pipeline(transaction=True)
        pipe.hset(keys.kernel(kernel_id), mapping={**record.to_hash(), "registered_at": repr(now),
                                                    "adopted_at": repr(now)})
        pipe.sadd(keys.access_key_kernels(access_key), kernel_id)
        await pipe.execute()
        log.info("adopted kernel %s running on %s", kernel_id, instance_id)

    async def get_kernel(self, kernel_id: str) -> KernelRecord | None:
        raw = await self.redis.kernels.hgetall(keys.kernel(kernel_id))
        return KernelRecord.from_hash(kernel_id, raw) if raw else None

    async def get_kernels(self, kernel_ids: Iterable[str]) -> list[KernelRecord]:
        ids = list(kernel_ids)
        if not ids:
            return []
        raws = await hgetall_many(self.redis.kernels, [keys.kernel(kid) for kid in ids])
        return [KernelRecord.from_hash(kid, raw) for kid, raw in zip(ids, raws, strict=True) if raw]

    async def kernel_extra(self, kernel_id: str) -> dict[str, str]:
        """Fields of the kernel hash beyond KernelRecord (token, registered_at...)."""
        raw = await self.redis.kernels.hgetall(keys.kernel(kernel_id))
        return {k: v for k, v in raw.items()
                if k in ("token", "registered_at", "adopted_at")}

    async def list_kernels(self, *, instance_id: str | None = None,
                           access_key: str | None = None) -> list[KernelRecord]:
        if instance_id is not None:
            ids = set(await self.redis.instances.smembers(keys.instance_kernels(instance_id)))
            if access_key is not None:
                ids &= set(await self.redis.kernels.smembers(keys.access_key_kernels(access_key)))
        elif access_key is not None:
            ids = set(await self.redis.kernels.smembers(keys.access_key_kernels(access_key)))
        else:
            ids = {key[len(keys.KERNEL_PREFIX):] async for key in
                   self.redis.kernels.scan_iter(match=keys.KERNEL_PREFIX + "*", count=1000)}
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

    async def update_stats(self, stats: dict[str, dict[str, Any]]) -> int:
        args: list[str] = []
        for kernel_id, values in stats.items():
            args += [kernel_id, json.dumps(values)]
        if not args:
            return 0
        return int(await scripts.update_stats(self.redis.kernels, *args))

    # --- settlement ------------------------------------------------------------
    async def settle_kernel(self, kernel_id: str, status: str, reason: str,
                            stats: dict | None = None) -> bool:
        """End a kernel exactly once across all processes; True if this call did it."""
        return await self.settle(kernel_id, status, reason, stats)

    async def settle(self, kernel_id: str, status: str, reason: str,
                     stats: dict | None = None, *, instance_id: str | None = None) -> bool:
        """settle_kernel, optionally only if the kernel belongs to `instance_id`
        (events from an agent never end another agent's kernel)."""
        if status not in FINAL_STATUSES:
            raise ValueError(f"not a final kernel status: {status!r}")
        raw = await self.redis.kernels.hgetall(keys.kernel(kernel_id))
        if instance_id is not None and raw and raw.get("instance") != instance_id:
            log.warning("ignored end of kernel %s reported by %s (it runs on %s)",
                        kernel_id, instance_id, raw.get("instance"))
            return False
        stats_given = stats is not None
        if stats is None:
            stats = _loads(raw.get("last_stats"), {})
        won, row = await self._settle_row(kernel_id, status, reason, stats, stats_given,
                                          instance_id)
        if won or raw:
            await self._forget_kernel(kernel_id, raw, row)
        if won:
            log.info("kernel %s settled %s (%s)", kernel_id, status, reason)
        return won

    async def _settle_row(self, kernel_id: str, status: str, reason: str, stats: dict,
                          stats_given: bool, instance_id: str | None) -> tuple[bool, Any]:
        now = datetime.now(UTC)
        conditions = [kernels.c.id == kernel_id, kernels.c.status.in_(LIVE_STATUSES)]
        if instance_id is not None:
            conditions.append(sa.or_(kernels.c.agent == instance_id, kernels.c.agent.is_(None)))
        async with self.db.begin() as conn:
            result = await conn.execute(
                sa.update(kernels).where(*conditions)
                .values(status=status, terminated_at=now, termination_reason=reason[:128]))
            if result.rowcount != 1:
                return False, None
            row = (await conn.execute(
                sa.select(kernels.c.access_key, kernels.c.lang, kernels.c.created_at,
                          kernels.c.agent).where(kernels.c.id == kernel_id))).one()
            if row.agent is not None or stats_given:
                await conn.execute(sa.insert(usage).values(
                    access_key=row.access_key, kernel_type=row.lang, kernel_id=kernel_id,
                    started_at=row.created_at, terminated_at=now, **usage_units(stats)))
            await quota.release_slot(conn, row.access_key)
            return True, row

    async def _forget_kernel(self, kernel_id: str, raw: dict[str, str], row: Any) -> None:
        """Remove a kernel's Redis bookkeeping; idempotent."""
        instance_id = raw.get("instance") or (row.agent if row is not None else None)
        access_key = raw.get("access_key") or (row.access_key if row is not None else None)
        now = repr(time.time())
        if instance_id:
            await scripts.forget_kernel(self.redis.instances, instance_id, kernel_id, now)
        pipe = self.redis.kernels.pipeline(transaction=True)
        pipe.delete(keys.kernel(kernel_id))
        if access_key:
            pipe.srem(keys.access_key_kernels(access_key), kernel_id)
        await pipe.execute()
        token, lang = raw.get("token"), raw.get("lang")
        if token and access_key and lang:
            await self.release_session(access_key, token, lang, kernel_id)

    async def settle_many(self, kernel_ids: Iterable[str], status: str, reason: str,
                          *, instance_id: str | None = None, parallel: int = 16) -> int:
        """Settle several kernels (bounded concurrency); returns how many this call ended."""
        semaphore = asyncio.Semaphore(parallel)

        async def one(kernel_id: str) -> bool:
            async with semaphore:
                try:
                    return await self.settle(kernel_id, status, reason, instance_id=instance_id)
                except (RedisError, OSError, sa.exc.SQLAlchemyError) as exc:
                    log.warning("could not settle kernel %s: %s", kernel_id, exc)
                    return False

        results = await asyncio.gather(*(one(kid) for kid in kernel_ids))
        return sum(results)

    # --- instances ---------------------------------------------------------------
    async def get_instance(self, instance_id: str) -> Instance | None:
        raw = await self.redis.instances.hgetall(keys.instance(instance_id))
        return Instance.from_hash(instance_id, raw) if raw else None

    async def list_instances(self) -> list[Instance]:
        ids = sorted(await self.redis.instances.smembers(keys.INSTANCES))
        if not ids:
            return []
        raws = await hgetall_many(self.redis.instances, [keys.instance(iid) for iid in ids])
        return [Instance.from_hash(iid, raw) for iid, raw in zip(ids, raws, strict=True) if raw]

    async def instance_kernel_ids(self, instance_id: str) -> set[str]:
        return set(await self.redis.instances.smembers(keys.instance_kernels(instance_id)))

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
