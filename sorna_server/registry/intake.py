"""Agent event intake: one PULL socket on the events port feeding the registry.

Heartbeats are the hot path (every agent, every interval): the reader drains
every frame already queued, and all heartbeats of that batch go to Redis in one
pipeline of EVALSHA calls (one round trip per batch, no per-kernel round trips).
Events that need the database (kernel_terminated, ...) run as background tasks
tracked by the intake, so they never hold up the reader.  A kernel_terminated
whose settlement fails is kept by the lifecycle with the event's final stats
and retried.  Malformed frames are logged and dropped.

The application starts the intake (one process per server binds the port)
around a started Registry.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import sqlalchemy as sa
import zmq
import zmq.asyncio
from redis.exceptions import RedisError

from .. import agent_protocol as proto
from .. import curve, metrics
from .. import redis_keys as keys
from ..agent_client import AgentError
from ..config import SornaConfig
from ..db.models import FINAL_STATUSES, KernelStatus, kernels
from . import scripts
from .constants import (
    ABSENCE_GRACE_FACTOR,
    REASON_ABANDONED,
    REASON_ORPHANED,
    REASON_RESTARTED,
    REASON_VANISHED,
    SETTLED_BY_AGENT,
    SETTLED_BY_EVENT,
    SETTLED_BY_HEARTBEAT,
    SETTLED_BY_ORPHAN,
)
from .lifecycle import STORE_ERRORS, age_of
from .registry import Registry

log = logging.getLogger(__name__)

MAX_BATCH = 512
POLL_MS = 200
# what the heartbeat script answers for a heartbeat it refused, and why
HEARTBEAT_REFUSALS = {"foreign": "its instance id is registered by another key",
                      "taken": "its address is held by another live agent"}


def gateway_side(config: SornaConfig) -> tuple[curve.KeyPair, curve.KeyRing] | None:
    """The gateway's keypair and the agent keys it admits (None: plain, loopback only)."""
    return curve.load_side(config.gateway_key, "gateway_key", config.agent_keys, "agent_keys",
                           peer="agent", host=config.events_ip,
                           port="the agent events port (events_ip)")


class EventIntake:
    def __init__(self, registry: Registry):
        self.registry = registry
        self.lifecycle = registry.lifecycle
        self.config = registry.config
        self.ctx: zmq.asyncio.Context | None = None
        self.sock: zmq.asyncio.Socket | None = None
        self.keys: curve.KeyPair | None = None
        self.ring: curve.KeyRing | None = None   # the agent keys accepted
        self._auth: Any = None
        self._watch: curve.HandshakeWatch | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self.foreign = curve.RefusalLog("foreign events")
        self.endpoint: str | None = None
        self._reader: asyncio.Task | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._busy: set[str] = set()  # de-duplicates background work per subject
        self._closing = False
        self.received = 0  # frames read from the socket
        self.handled = 0   # frames whose handling finished (heartbeats are in Redis)
        self.dropped = 0   # malformed frames and events refused for their sender

    async def start(self) -> None:
        """Bind the events port: a CURVE server accepting the `agent_keys` when
        keys are configured, else plain and on loopback only."""
        config = self.config
        side = gateway_side(config)
        if side is not None:
            self.keys, self.ring = side
        self.ctx = zmq.asyncio.Context()  # its own: one ZAP handler per context
        if self.ring is not None:
            self._auth = curve.start_authenticator(self.ctx, self.ring)
        sock = self.ctx.socket(zmq.PULL)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        # a larger frame makes libzmq drop the connection: it is never buffered whole
        sock.setsockopt(zmq.MAXMSGSIZE, proto.MAX_EVENT_BYTES)
        curve.make_server(sock, self.keys)
        address = f"tcp://{config.events_ip}:{config.events_port}"
        try:
            sock.bind(address)
        except zmq.ZMQError as exc:
            sock.close(0)
            await self._close_context()
            raise OSError(f"cannot bind the events port {address}: {exc}") from None
        self.sock = sock
        self.endpoint = bytes(sock.getsockopt(zmq.LAST_ENDPOINT)).decode()
        if self.keys is not None:
            self._watch = curve.HandshakeWatch(sock, "the events port")
            self._watch_task = asyncio.create_task(self._watch.run(), name="events-refusals")
        self._reader = asyncio.create_task(self._read(), name="registry-event-intake")
        log.info("listening for agent events on %s (%s)", self.endpoint,
                 f"CurveZMQ, agent keys from {config.agent_keys}" if self.keys
                 else "plain ZeroMQ: no keys configured, loopback only")

    async def _close_context(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
            await asyncio.wait([self._watch_task], timeout=1.0)
        if self._watch is not None:
            self._watch.close()
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self.ctx is not None:
            self.ctx.destroy(linger=0)
            self.ctx = None

    async def stop(self, timeout: float = 5.0) -> None:
        self._closing = True
        reader_done = True
        if self._reader is not None:
            # the reader also checks `_closing` between polls (every POLL_MS), so it ends
            # even if a library swallows the cancellation
            self._reader.cancel()
            done, _ = await asyncio.wait([self._reader], timeout=2.0 + POLL_MS / 1000)
            reader_done = bool(done)
            self._reader = None
        if reader_done:
            # closing the socket or the context under a pending poll would leave that
            # poll (and its task) waiting forever
            if self.sock is not None:
                self.sock.close(0)
                self.sock = None
            await self._close_context()
        else:
            log.warning("the event reader did not stop; leaving its socket to the garbage "
                        "collector")
        pending = list(self._tasks)
        if pending:
            _, still = await asyncio.wait(pending, timeout=timeout)
            for task in still:
                log.warning("intake task %s cut off at shutdown", task.get_name())
                task.cancel()
            await asyncio.gather(*still, return_exceptions=True)

    @property
    def pending(self) -> int:
        """Event handlers still running in the background (settlements, revivals)."""
        return len(self._tasks)

    def spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        """Run background work (settlement, revival...) tracked for shutdown."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("intake task %s failed: %s: %s", task.get_name(),
                      exc.__class__.__name__, exc)

    # --- reading -----------------------------------------------------------
    async def _read(self) -> None:
        assert self.sock is not None
        while not self._closing:
            if not await self.sock.poll(POLL_MS, zmq.POLLIN):  # type: ignore[call-arg]
                continue
            frames: list[bytes] = []
            senders: list[str | None] = []
            while len(frames) < MAX_BATCH:
                try:
                    # on a ready socket, the asyncio recv completes at once
                    frame = self.sock.recv(zmq.NOBLOCK, copy=False).result()  # type: ignore[attr-defined]
                except zmq.Again:
                    break
                frames.append(frame.bytes)
                senders.append(curve.peer_key(frame) if self.keys is not None else None)
            try:
                await self.handle_frames(frames, senders)
            except (RedisError, OSError) as exc:
                metrics.child(metrics.AGENT_EVENTS_DROPPED, "registry-unavailable").inc(
                    len(frames))
                log.warning("dropped %d agent events: registry unavailable: %s",
                            len(frames), exc)
            except Exception:  # the listener must survive anything
                log.exception("unexpected error while handling %d agent events", len(frames))
            finally:
                self.handled += len(frames)

    async def handle_frames(self, frames: list[bytes],
                            senders: list[str | None] | None = None) -> None:
        """Handle a batch of event frames; `senders` are the CURVE keys (z85) of
        the agents that sent them (None without keys)."""
        heartbeats: list[dict[str, Any]] = []
        for frame, sender in zip(frames, senders or [None] * len(frames), strict=True):
            self.received += 1
            try:
                event = proto.decode_event(frame)
            except proto.ProtocolError as exc:
                self.dropped += 1
                metrics.child(metrics.AGENT_EVENTS_DROPPED, "malformed").inc()
                log.warning("dropped malformed agent event: %s", exc)
                continue
            if self.ring is not None and not self.ring.allows(sender):
                # a key removed from agent_keys while its connection stays open
                self.refuse(event, sender, "its key is no longer among agent_keys")
                continue
            event["sender"] = sender or ""  # never taken from the wire
            metrics.child(metrics.AGENT_EVENTS, event["type"]).inc()
            if event["type"] == "instance_heartbeat":
                heartbeats.append(event)
            else:
                self.dispatch(event)
        if heartbeats:
            await self.handle_heartbeats(heartbeats)

    def dispatch(self, event: dict[str, Any]) -> None:
        kind, iid = event["type"], event["instance_id"]
        if kind == "kernel_terminated":
            self.spawn(self.owned(event, self.on_kernel_terminated), f"settle {event['kernel_id']}")
        elif kind == "instance_stats":
            self.spawn(self.owned(event, self.on_stats), f"stats {iid}")
        elif kind == "instance_started":
            self.spawn(self.owned(event, self.on_started), f"started {iid}")
        elif kind == "instance_terminated":
            self.spawn(self.owned(event, self.on_terminated), f"terminated {iid}")

    async def owned(self, event: dict[str, Any], handler: Any) -> None:
        """Run `handler(event)` if the event's sender owns its instance id: the key
        that registered the id (instance_started may register a new id)."""
        owner = await self.registry.instance_owner(event["instance_id"])
        if owner == event["sender"] or (owner is None and event["type"] == "instance_started"):
            await handler(event)
        else:
            self.refuse(event, event["sender"], "its instance id is registered by another key"
                        if owner is not None else "its instance id is not registered")

    def refuse(self, event: dict[str, Any], sender: str | None, why: str) -> None:
        self.dropped += 1
        metrics.child(metrics.AGENT_EVENTS_DROPPED, "foreign").inc()
        self.foreign.note(f"refused {event['type']} for instance {event['instance_id']!r} "
                          f"from key {sender or '(plain)'}: {why}")

    async def on_stats(self, event: dict[str, Any]) -> None:
        await self.registry.update_stats(event["stats"], event["instance_id"])

    # --- heartbeats ----------------------------------------------------------
    def heartbeat_args(self, event: dict[str, Any], running: list[str], now: float) -> list[Any]:
        info = event["info"]
        interval = event.get("interval") or self.registry.heartbeat_interval
        interval = float(interval) if interval > 0 else self.registry.heartbeat_interval
        languages = sorted({str(lang) for lang in info["languages"] if isinstance(lang, str)})
        return [event["instance_id"], repr(now), self.registry.liveness_ttl_ms(interval),
                repr(interval), repr(interval * ABSENCE_GRACE_FACTOR), info["addr"],
                info["max_kernels"], info.get("num_kernels", len(running)),
                json.dumps(languages), str(info.get("version", "")), info.get("cpu_count", 0),
                info.get("mem_bytes", 0), json.dumps(info.get("isolation") or {}),
                json.dumps(info.get("language_info") or {}), event.get("sender", ""), *running]

    async def handle_heartbeats(self, events: list[dict[str, Any]]) -> None:
        now = time.time()
        client = self.registry.redis.instances
        argv = [self.heartbeat_args(e, list(e.get("running_kernels", ())), now) for e in events]
        if len(argv) == 1:  # the common case at steady state: no pipeline overhead
            try:
                results: list[Any] = [await scripts.heartbeat(client, *argv[0])]
            except RedisError as exc:
                results = [exc]
        else:
            for attempt in range(2):
                pipe = client.pipeline(transaction=False)
                for args in argv:
                    pipe.evalsha(scripts.heartbeat.sha, 0, *args)
                results = await pipe.execute(raise_on_error=False)
                if attempt == 0 and any(scripts.is_noscript(r) for r in results):
                    await scripts.heartbeat.load(client)
                    continue
                break
        for event, result in zip(events, results, strict=True):
            if isinstance(result, Exception):
                log.warning("heartbeat of %s not recorded: %s", event["instance_id"], result)
            else:
                self._after_heartbeat(event, *result)

    def _after_heartbeat(self, event: dict[str, Any], state: str, vanished: list[str],
                         unknown: list[str]) -> None:
        """Follow up a recorded heartbeat: registration, revival, kernels to settle."""
        iid = event["instance_id"]
        if state in HEARTBEAT_REFUSALS:
            self.refuse(event, event.get("sender"), HEARTBEAT_REFUSALS[state])
            return
        if state == "new":
            log.info("agent %s registered (%s)", iid, event["info"]["addr"])
        elif state == "lost":
            self._once(f"revive {iid}", self.revive(event))
        if vanished:
            self._once(f"vanished {iid}", self.lifecycle.settle_many(
                vanished, KernelStatus.LOST.value, REASON_VANISHED,
                path=SETTLED_BY_HEARTBEAT, instance_id=iid))
        if unknown:
            self._once(f"unknown {iid}", self.on_unknown_kernels(event, unknown))

    def _once(self, subject: str, coro: Any) -> None:
        """Run `coro` in the background unless work on `subject` is still running."""
        if subject in self._busy:
            coro.close()
            return
        self._busy.add(subject)
        task = self.spawn(coro, subject)
        task.add_done_callback(lambda _t: self._busy.discard(subject))

    # --- lifecycle events ------------------------------------------------------
    async def on_kernel_terminated(self, event: dict[str, Any]) -> None:
        """Settle with the event's final stats.  When that fails, the lifecycle keeps
        the settlement and retries it, and the end is noted in the kernel's Redis
        hash, so that whichever path settles the kernel first (this process's
        retry, another gateway's heartbeat or sweep, reconciliation) uses them."""
        kernel_id, iid = event["kernel_id"], event["instance_id"]
        try:
            await self.lifecycle.settle(kernel_id, KernelStatus.TERMINATED.value,
                                        event["reason"], event.get("stats"),
                                        path=SETTLED_BY_EVENT, instance_id=iid)
        except STORE_ERRORS:
            await self.lifecycle.note_final(kernel_id, iid, event["reason"],
                                            event.get("stats"))
            raise

    async def on_started(self, event: dict[str, Any]) -> None:
        """A fresh agent process: kernels Redis still holds for it died with the old one."""
        iid, info = event["instance_id"], event["info"]
        if not info.get("num_kernels"):
            old = await self.registry.instance_kernel_ids(iid)
            if old:
                count = await self.lifecycle.settle_many(
                    old, KernelStatus.LOST.value, REASON_RESTARTED, path=SETTLED_BY_AGENT,
                    instance_id=iid)
                log.warning("agent %s restarted: %d of its kernels ended", iid, count)
        await self.handle_heartbeats([{**event, "running_kernels": [],
                                       "interval": self.registry.heartbeat_interval}])

    async def on_terminated(self, event: dict[str, Any]) -> None:
        """The agent shut down (it sent kernel_terminated for its kernels first)."""
        iid = event["instance_id"]
        remaining = await self.registry.instance_kernel_ids(iid)
        if remaining:
            await self.lifecycle.settle_many(remaining, KernelStatus.TERMINATED.value,
                                             proto.REASON_AGENT_SHUTDOWN, path=SETTLED_BY_AGENT,
                                             instance_id=iid)
        await self.registry.forget_instance(iid)
        log.info("agent %s shut down (%s)", iid, event["reason"])

    async def revive(self, event: dict[str, Any]) -> None:
        """A heartbeat from an agent marked lost: reset it and register it again.

        Its kernels were settled LOST, so the agent must not keep running them.
        One process does it (claim key); the others ignore the heartbeat."""
        reg = self.registry
        iid, addr = event["instance_id"], event["info"]["addr"]
        claimed = await reg.redis.instances.set(
            keys.revive_claim(iid), reg.process_token, nx=True,
            px=int(max(reg.config.agent_rpc_timeout * 2, 5) * 1000))
        if not claimed:
            return
        try:
            reply = await reg.rpc.call(addr, "reset", {}, timeout=reg.config.agent_rpc_timeout)
        except AgentError as exc:
            log.warning("lost agent %s is back but reset failed (%s); retrying on its next "
                        "heartbeat", iid, exc)
            await reg.redis.instances.delete(keys.revive_claim(iid))
            return
        leftovers = await reg.instance_kernel_ids(iid)
        if leftovers:
            await self.lifecycle.settle_many(leftovers, KernelStatus.LOST.value,
                                             proto.REASON_LOST, path=SETTLED_BY_AGENT,
                                             instance_id=iid)
        await scripts.revive(reg.redis.instances, iid, repr(time.time()),
                             reg.liveness_ttl_ms(float(event.get("interval") or
                                                       reg.heartbeat_interval)))
        await self.handle_heartbeats([{**event, "running_kernels": []}])
        destroyed = reply.get("destroyed", []) if isinstance(reply, dict) else []
        log.warning("lost agent %s is back: reset (%d kernels destroyed) and registered again",
                    iid, len(destroyed))

    async def on_unknown_kernels(self, event: dict[str, Any], kernel_ids: list[str]) -> None:
        """Kernels an agent keeps reporting that Redis does not hold.

        Rule (docs/redis-layout.md, "Reconciliation"): a kernel whose DB row is
        RUNNING on this agent is adopted; a PREPARING row is left alone while its
        creation may still be in progress and ended as abandoned after
        `creation_timeout`; anything else (no row, a final row, a row of another
        agent) is destroyed on the agent.
        """
        reg = self.registry
        iid, addr = event["instance_id"], event["info"]["addr"]
        async with reg.db.connect() as conn:
            rows = {row.id: row for row in await conn.execute(
                sa.select(kernels.c.id, kernels.c.status, kernels.c.agent,
                          kernels.c.access_key, kernels.c.lang, kernels.c.created_at)
                .where(kernels.c.id.in_(kernel_ids)))}
        adopt: list[Any] = []
        destroy: list[str] = []
        for kernel_id in kernel_ids:
            row = rows.get(kernel_id)
            if row is None or row.status in FINAL_STATUSES:
                destroy.append(kernel_id)
            elif row.status == KernelStatus.RUNNING.value and row.agent == iid:
                adopt.append(row)
            elif row.status == KernelStatus.RUNNING.value:
                destroy.append(kernel_id)
            elif row.agent is None and age_of(row.created_at) > reg.creation_timeout:
                await self.lifecycle.settle(kernel_id, KernelStatus.ERROR.value,
                                            REASON_ABANDONED, path=SETTLED_BY_ORPHAN)
                destroy.append(kernel_id)
        if adopt:
            try:
                listing = await reg.rpc.call(addr, "list_kernels", {},
                                             timeout=reg.config.agent_rpc_timeout)
            except AgentError as exc:
                log.warning("cannot list kernels of %s to adopt them: %s", iid, exc)
                listing = {}
            for row in adopt:
                if isinstance(listing, dict) and row.id in listing:
                    await self.lifecycle.adopt(iid, addr, row.id, row.access_key, row.lang,
                                               listing[row.id] or {})
        for kernel_id in destroy:
            log.warning("destroying kernel %s on %s: no live record of it", kernel_id, iid)
            try:
                await reg.rpc.call(addr, "destroy_kernel",
                                   {"kernel_id": kernel_id, "reason": REASON_ORPHANED},
                                   timeout=reg.config.agent_rpc_timeout)
            except AgentError as exc:
                log.warning("could not destroy orphan kernel %s on %s: %s", kernel_id, iid, exc)
