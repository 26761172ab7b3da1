"""Lost-agent sweep and start-up reconciliation, run in every gateway process.

Each round, every process tries to take the sweep claim (SET NX PX); the one
that gets it marks instances whose liveness key lapsed as lost (one Lua script)
and settles their kernels LOST.  The sweep looks at state, not at events, so an
agent that lapsed while no gateway was running is found by the next one.
Keyspace notifications are not needed (and not relied on).

On start, after a grace period of about two heartbeat intervals (so running
agents have re-announced themselves), the process reconciles Redis with the
database and with what the agents run (`reconcile.reconcile`).
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import TYPE_CHECKING

import sqlalchemy as sa
from redis.exceptions import RedisError

from .. import agent_protocol as proto
from .. import redis_keys as keys
from ..db.models import KernelStatus
from . import scripts
from .registry import GRACE_PERIOD_FACTOR

if TYPE_CHECKING:
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
        settled[instance_id] = await registry.settle_many(
            kernel_ids, KernelStatus.LOST.value, proto.REASON_LOST)
    return settled


class Sweeper:
    def __init__(self, registry: Registry):
        self.registry = registry
        self.interval = registry.heartbeat_interval
        self.grace = registry.heartbeat_interval * GRACE_PERIOD_FACTOR
        self.grace_done = asyncio.Event()
        self.last_reconcile: list = []
        self._tasks: list[asyncio.Task] = []
        self._stopping = asyncio.Event()

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._sweep_forever(), name="registry-sweeper"),
                       asyncio.create_task(self._grace_period(), name="registry-grace")]

    async def stop(self) -> None:
        self._stopping.set()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5.0)
        self._tasks = []

    async def _pause(self, seconds: float) -> bool:
        """Sleep; False when the sweeper is stopping."""
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            return True
        return False

    async def _sweep_forever(self) -> None:
        # jitter so several gateways do not all knock at the same instant
        while await self._pause(self.interval * random.uniform(0.9, 1.1)):
            try:
                await sweep_once(self.registry)
            except (RedisError, OSError, sa.exc.SQLAlchemyError) as exc:
                log.warning("lost-agent sweep failed: %s", exc)
            except Exception:
                log.exception("lost-agent sweep failed")

    async def _grace_period(self) -> None:
        from .reconcile import reconcile

        if not await self._pause(self.grace):
            return
        try:
            self.last_reconcile = await reconcile(self.registry, fix=True)
        except (RedisError, OSError, sa.exc.SQLAlchemyError) as exc:
            log.warning("start-up reconciliation failed: %s", exc)
        except Exception:
            log.exception("start-up reconciliation failed")
        else:
            for diff in self.last_reconcile:
                log.warning("reconciled: %s %s: %s -> %s", diff.kind, diff.subject,
                            diff.detail, diff.action)
        finally:
            self.grace_done.set()
