"""Agents that stopped answering RPC: suspect until they answer again.

A failed call for want of an answer (unreachable, or no reply in time) marks
the agent suspect at once: a Redis key with a TTL of a few heartbeat
intervals, which the scheduling script skips, so no gateway sends it new
kernels; calls to its kernels from this process fail fast (503).  A probe
pings the agent every heartbeat interval, keeping the key alive while it stays
silent and deleting it as soon as it answers.  Lost detection is unchanged: an
agent that also stops heartbeating is swept as lost (which deletes the key).
"""
from __future__ import annotations

import asyncio
import logging

from redis.exceptions import RedisError

from .. import redis_keys as keys
from ..agent_client import AgentError, AgentRPCClient
from ..redis_conn import RedisClients
from .constants import LIVENESS_TTL_FACTOR

log = logging.getLogger(__name__)


class SuspectAgents:
    def __init__(self, redis: RedisClients, rpc: AgentRPCClient, heartbeat_interval: float):
        self.redis = redis
        self.rpc = rpc
        self.interval = heartbeat_interval
        self.ttl_ms = max(int(heartbeat_interval * LIVENESS_TTL_FACTOR * 1000), 2000)
        self._probes: dict[str, asyncio.Task[None]] = {}

    def is_suspect(self, instance_id: str) -> bool:
        """Whether this process saw the agent fail to answer and has not seen it since."""
        return instance_id in self._probes

    async def mark(self, instance_id: str, addr: str) -> None:
        """The agent did not answer: stop scheduling to it and probe it until it does."""
        if instance_id not in self._probes:
            log.warning("agent %s (%s) does not answer; no new kernels go to it", instance_id,
                        addr)
            self._probes[instance_id] = asyncio.create_task(
                self._probe(instance_id, addr), name=f"probe {instance_id}")
        try:
            await self.redis.instances.set(keys.instance_suspect(instance_id), addr,
                                           px=self.ttl_ms)
        except (RedisError, OSError) as exc:
            log.warning("could not mark agent %s suspect: %s", instance_id, exc)

    async def _probe(self, instance_id: str, addr: str) -> None:
        try:
            while True:
                await asyncio.sleep(self.interval)
                try:
                    await self.rpc.call(addr, "ping", {}, timeout=max(self.interval, 1.0))
                except AgentError:
                    if not await self._still_registered(instance_id):
                        return
                    await self._refresh(instance_id, addr)
                    continue
                log.info("agent %s answers again", instance_id)
                await self._clear(instance_id)
                return
        finally:
            self._probes.pop(instance_id, None)

    async def _still_registered(self, instance_id: str) -> bool:
        try:
            status = await self.redis.instances.hget(keys.instance(instance_id), "status")
        except (RedisError, OSError):
            return True
        return status not in (None, "lost")

    async def _refresh(self, instance_id: str, addr: str) -> None:
        try:
            await self.redis.instances.set(keys.instance_suspect(instance_id), addr,
                                           px=self.ttl_ms)
        except (RedisError, OSError):
            pass

    async def _clear(self, instance_id: str) -> None:
        try:
            await self.redis.instances.delete(keys.instance_suspect(instance_id))
        except (RedisError, OSError) as exc:  # the key expires by itself
            log.warning("could not clear suspect agent %s: %s", instance_id, exc)

    async def close(self) -> None:
        probes = list(self._probes.values())
        for task in probes:
            task.cancel()
        await asyncio.gather(*probes, return_exceptions=True)
        self._probes.clear()
