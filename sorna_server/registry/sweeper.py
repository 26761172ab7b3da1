"""Lost-agent sweep, run in every gateway process.

Each round, every process tries to take the sweep claim (SET NX PX); the one
that gets it marks instances whose liveness key lapsed as lost (one Lua script)
and settles their kernels LOST.  The sweep looks at state, not at events, so an
agent that lapsed while no gateway was running is found by the next one.
Keyspace notifications are not needed (and not relied on).
"""
from __future__ import annotations

import asyncio
import logging
import random
import time

import sqlalchemy as sa
from redis.exceptions import RedisError

from .. import agent_protocol as proto
from .. import redis_keys as keys
from ..db.models import KernelStatus
from . import scripts
from .constants import SETTLED_BY_SWEEP
from .periodic import pause
from .registry import Registry

log = logging.getLogger(__name__)


async def sweep_once(registry: Registry, *, claim: bool = True) -> dict[str, int]:
    """One sweep round; returns {lost instance id: kernels settled by this call}.
    With `claim`, does nothing unless this process wins the round's claim."""
    if claim:
        ttl_ms = max(int(registry.heartbeat_interval * 1000 * 0.9), 100)
        won = await registry.redis.instances.set(keys.SWEEP_CLAIM, registry.process_token,
                                                 nx=True, px=ttl_ms)
        if not won:
            return {}
    lost = await scripts.sweep(registry.redis.instances, repr(time.time()))
    settled: dict[str, int] = {}
    for instance_id, kernel_ids, fresh in lost:
        if fresh == "new":
            log.warning("agent %s lost (no heartbeat); ending its %d kernels",
                        instance_id, len(kernel_ids))
        settled[instance_id] = await registry.lifecycle.settle_many(
            kernel_ids, KernelStatus.LOST.value, proto.REASON_LOST, path=SETTLED_BY_SWEEP,
            instance_id=instance_id)
    return settled


class Sweeper:
    def __init__(self, registry: Registry):
        self.registry = registry
        self.interval = registry.heartbeat_interval
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._sweep_forever(), name="registry-sweeper")

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task], timeout=5.0)
            self._task = None

    async def _pause(self, seconds: float) -> bool:
        return await pause(self._stopping, seconds)

    async def _sweep_forever(self) -> None:
        # jitter so several gateways do not all knock at the same instant
        while await self._pause(self.interval * random.uniform(0.9, 1.1)):
            try:
                await sweep_once(self.registry)
            except (RedisError, OSError, sa.exc.SQLAlchemyError) as exc:
                log.warning("lost-agent sweep failed: %s", exc)
            except Exception:
                log.exception("lost-agent sweep failed")
