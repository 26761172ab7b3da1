"""Events to the managers: one PUSH socket connected to every manager address.

ZeroMQ spreads events over the connected managers (several gateways share
the load).  With ZMQ_IMMEDIATE a send only succeeds once some manager is
connected; until then events wait in our own bounded queue.  When the queue
is full the oldest heartbeat or stats event is dropped; `kernel_terminated`
and `instance_terminated` are never dropped.
"""
from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any

import zmq
import zmq.asyncio

from sorna_server import agent_protocol as proto

log = logging.getLogger(__name__)

DROPPABLE = frozenset({"instance_heartbeat", "instance_stats"})
DEFAULT_QUEUE_LIMIT = 256


class EventSender:
    def __init__(self, ctx: zmq.asyncio.Context, instance_id: str, managers: list[str],
                 queue_limit: int = DEFAULT_QUEUE_LIMIT):
        self.instance_id = instance_id
        self.managers = list(managers)
        self.queue_limit = queue_limit
        self.queue: collections.deque[tuple[str, bytes]] = collections.deque()
        self.dropped = 0
        self.sent = 0
        self.sock = ctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.IMMEDIATE, 1)
        self.sock.setsockopt(zmq.SNDHWM, 1000)
        self.sock.setsockopt(zmq.LINGER, 0)
        for addr in self.managers:
            self.sock.connect(addr)
        # plain (non-future) view of the same socket for non-blocking sends
        self._sync: zmq.Socket[bytes] = zmq.Socket.shadow(self.sock.underlying)
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._flush_loop(), name="events")

    def emit(self, event_type: str, **fields: Any) -> None:
        frame = proto.encode_event(event_type, self.instance_id, **fields)
        if len(self.queue) >= self.queue_limit:
            self._drop_one()
        self.queue.append((event_type, frame))
        self._wakeup.set()

    def _drop_one(self) -> None:
        for index, (event_type, _) in enumerate(self.queue):
            if event_type in DROPPABLE:
                del self.queue[index]
                self.dropped += 1
                if self.dropped in (1, 10, 100) or self.dropped % 1000 == 0:
                    log.warning("no manager is listening: dropped %d heartbeat/stats events",
                                self.dropped)
                return

    def _send_ready(self) -> int:
        """Send what the socket accepts right now; return how many were sent."""
        count = 0
        while self.queue:
            _, frame = self.queue[0]
            try:
                self._sync.send(frame, flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            self.queue.popleft()
            count += 1
        self.sent += count
        return count

    async def _flush_loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self.queue:
                if not self._send_ready():
                    # wait until a manager connects (or a new event arrives)
                    await self._writable(1000)

    async def _writable(self, timeout_ms: int) -> None:
        """Wait until the socket accepts a message (a manager is connected), or time out."""
        poller = zmq.asyncio.Poller()
        poller.register(self.sock, zmq.POLLOUT)
        await poller.poll(timeout_ms)

    async def close(self, linger: float) -> None:
        """Send what is queued (for at most `linger` seconds), then close."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + linger
        while self.queue and loop.time() < deadline:
            if not self._send_ready():
                await self._writable(max(1, int((deadline - loop.time()) * 1000)))
        if self.queue:
            log.warning("%d events not delivered at shutdown (no manager listening)",
                        len(self.queue))
        # give ZeroMQ time to push what it accepted onto the wire
        self.sock.setsockopt(zmq.LINGER, int(max(deadline - loop.time(), 0.5) * 1000))
        self.sock.close()
