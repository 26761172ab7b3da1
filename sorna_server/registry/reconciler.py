"""The reconciler service, run in every gateway process.

- After a start-up grace period of about two heartbeat intervals (so running
  agents have re-announced themselves) and then every `reconcile_interval`
  seconds, one reconciliation pass with fixes (`reconcile.reconcile`).  Several
  gateways may run it: each period one of them takes a Redis lease (SET NX PX)
  and the others skip that period; every fix also re-checks its own condition.
- About every second, the settlements and Redis clean-ups of this process that
  failed are retried (`KernelLifecycle.retry_pending`), so service is back
  within a second or two of Redis or the database coming back.

Each pass's differences go to the `on_pass` hooks (metrics attach there).
"""
from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable

import sqlalchemy as sa
from redis.exceptions import RedisError

from .. import redis_keys as keys
from .constants import GRACE_PERIOD_FACTOR
from .periodic import pause
from .reconcile import Difference, reconcile
from .registry import Registry

log = logging.getLogger(__name__)

RETRY_INTERVAL = 1.0
FAILURES = (RedisError, OSError, sa.exc.SQLAlchemyError)


class Reconciler:
    def __init__(self, registry: Registry):
        self.registry = registry
        self.interval = registry.config.reconcile_interval
        self.grace = registry.heartbeat_interval * GRACE_PERIOD_FACTOR
        self.first_pass_done = asyncio.Event()
        self.last_pass: list[Difference] = []
        self.passes = 0
        self.on_pass: list[Callable[[list[Difference]], None]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._reconcile_forever(), name="registry-reconciler"),
                       asyncio.create_task(self._retry_forever(), name="registry-retries")]

    async def stop(self) -> None:
        self._stopping.set()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5.0)
        self._tasks = []

    async def _pause(self, seconds: float) -> bool:
        return await pause(self._stopping, seconds)

    async def _reconcile_forever(self) -> None:
        if not await self._pause(self.grace):
            return
        await self.run_pass()
        self.first_pass_done.set()
        if self.interval <= 0:
            return
        # jitter so several gateways do not all knock at the same instant
        while await self._pause(self.interval * random.uniform(0.9, 1.1)):
            await self.run_pass()

    async def run_pass(self, *, lease: bool = True) -> list[Difference] | None:
        """One pass with fixes; None when another gateway holds this period's lease
        or the pass failed."""
        reg = self.registry
        try:
            if lease:
                ttl_ms = max(int(max(self.interval, self.grace) * 900), 500)
                if not await reg.redis.instances.set(keys.RECONCILE_CLAIM, reg.process_token,
                                                     nx=True, px=ttl_ms):
                    return None
            diffs = await reconcile(reg, fix=True)
        except FAILURES as exc:
            log.warning("reconciliation failed: %s", exc)
            return None
        except Exception:
            log.exception("reconciliation failed")
            return None
        self.passes += 1
        self.last_pass = diffs
        for diff in diffs:
            log.warning("reconciled: %s %s: %s -> %s%s", diff.kind, diff.subject, diff.detail,
                        diff.action, "" if diff.fixed else " (not fixed)")
        for hook in self.on_pass:
            try:
                hook(diffs)
            except Exception:  # a hook must never break reconciliation
                log.exception("reconciliation hook failed")
        return diffs

    async def _retry_forever(self) -> None:
        lifecycle = self.registry.lifecycle
        while await self._pause(RETRY_INTERVAL):
            if not lifecycle.pending_count:
                continue
            try:
                await lifecycle.retry_pending()
            except FAILURES as exc:
                log.warning("retrying settlements failed: %s", exc)
            except Exception:
                log.exception("retrying settlements failed")
