"""Events to the managers: PUSH sockets connected to every manager address.

ZeroMQ spreads events over the connected managers (several gateways share
the load).  With keys, there is one PUSH socket ("link") per accepted gateway
key, each a CurveZMQ client of that key connected to every manager address:
only a manager holding that key completes the handshake, so during a gateway
key rotation the old and the new key both work.  The links follow the
`gateway_keys` folder.

With ZMQ_IMMEDIATE a send only succeeds once some manager is connected; until
then events wait in our own bounded queue.  When the queue is full the oldest
heartbeat or stats event is dropped; `kernel_terminated` and
`instance_terminated` are never dropped.
"""
from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from sorna_server import agent_protocol as proto
from sorna_server import curve

log = logging.getLogger(__name__)

DROPPABLE = frozenset({"instance_heartbeat", "instance_stats"})
DEFAULT_QUEUE_LIMIT = 256
LINK_SYNC_INTERVAL = 2.0
# libzmq never reconnects an endpoint whose handshake the server refused (ZAP):
# the link connects again itself after this many seconds, since the key may be
# admitted again by then
REFUSED_RETRY_INTERVAL = 2.0
MONITORED = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
             | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


class Link:
    """One PUSH socket, connected to every manager with one server key."""

    def __init__(self, ctx: zmq.asyncio.Context, managers: list[str],
                 keys: curve.KeyPair | None, server_key: bytes | None):
        self.server_key = server_key
        self.handshakes = 0
        self.refused = False  # a manager turned this agent's key down (definitive)
        self.failures: list[str] = []
        self._retries: set[asyncio.TimerHandle] = set()
        self._refusing: set[str] = set()  # endpoints refusing the key after a handshake
        self.sock = ctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.IMMEDIATE, 1)
        self.sock.setsockopt(zmq.SNDHWM, 1000)
        self.sock.setsockopt(zmq.LINGER, 0)
        curve.make_client(self.sock, keys, server_key)
        self.monitor = self.sock.get_monitor_socket(MONITORED)
        for addr in managers:
            self.sock.connect(addr)
        # plain (non-future) view of the same socket for non-blocking sends
        self.sync: zmq.Socket[bytes] = zmq.Socket.shadow(self.sock.underlying)
        self._monitor_task = asyncio.create_task(self._watch(), name="events-link")

    async def _watch(self) -> None:
        while True:
            try:
                event = parse_monitor_message(await self.monitor.recv_multipart())
            except zmq.ZMQError:
                return
            endpoint = event["endpoint"].decode(errors="replace")
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                if not self.handshakes:
                    log.info("events: connected to manager %s%s", endpoint, self._key_note())
                elif endpoint in self._refusing:
                    log.info("events: manager %s accepts this agent's key again", endpoint)
                self._refusing.discard(endpoint)
                self.handshakes += 1
            else:
                refused = event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH
                reason = self._failure(refused)
                self.refused |= refused
                if refused:
                    self._retry(endpoint)
                    if self.handshakes and endpoint not in self._refusing:
                        self._refusing.add(endpoint)  # it worked before: key removed there
                        log.warning("events: manager %s: %s; retrying every %g s", endpoint,
                                    reason, REFUSED_RETRY_INTERVAL)
                if len(self.failures) < 100:
                    self.failures.append(f"{endpoint}: {reason}")
                if len(self.failures) in (1, 10) and not self.handshakes:
                    log.warning("events: manager %s: %s%s", endpoint, reason, self._key_note())

    def _failure(self, refused: bool) -> str:
        """Why a handshake failed, for the operator (`refused`: ZAP turned our key down)."""
        if refused:
            return "the manager refused this agent's key (is it among the gateway's agent_keys?)"
        if self.server_key:
            return ("CurveZMQ handshake failed (is gateway_keys the key of that gateway, and "
                    "does it use keys?)")
        return "handshake failed (the manager expects CurveZMQ keys: set agent_key and " \
               "gateway_keys)"

    def _retry(self, endpoint: str) -> None:
        """Connect to `endpoint` again a little later (libzmq gave up on it)."""
        def reconnect() -> None:
            self._retries.discard(handle)
            if not self.sock.closed:
                self._reconnect(endpoint)
        handle = asyncio.get_running_loop().call_later(REFUSED_RETRY_INTERVAL, reconnect)
        self._retries.add(handle)

    def _reconnect(self, endpoint: str) -> None:
        try:
            self.sock.disconnect(endpoint)
        except zmq.ZMQError:
            pass  # libzmq may have forgotten the endpoint already
        try:
            self.sock.connect(endpoint)
        except zmq.ZMQError as exc:
            log.warning("events: cannot connect to manager %s again: %s", endpoint, exc)

    def _key_note(self) -> str:
        return f" (gateway key {self.server_key.decode()})" if self.server_key else ""

    def close(self, linger_ms: int = 0) -> None:
        for handle in self._retries:
            handle.cancel()
        self._monitor_task.cancel()
        self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.setsockopt(zmq.LINGER, linger_ms)
        self.sock.close()


class EventSender:
    def __init__(self, ctx: zmq.asyncio.Context, instance_id: str, managers: list[str],
                 queue_limit: int = DEFAULT_QUEUE_LIMIT, *, keys: curve.KeyPair | None = None,
                 ring: curve.KeyRing | None = None):
        self.ctx = ctx
        self.instance_id = instance_id
        self.managers = list(managers)
        self.queue_limit = queue_limit
        self.keys = keys
        self.ring = ring  # the gateway keys: one link each (None: one plain link)
        self.queue: collections.deque[tuple[str, bytes]] = collections.deque()
        self.dropped = 0
        self.sent = 0
        self.links: dict[bytes | None, Link] = {}
        self._next = 0
        self._wakeup = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self.sync_links()
        self._tasks.append(asyncio.create_task(self._flush_loop(), name="events"))
        if self.ring is not None:
            self._tasks.append(asyncio.create_task(self._follow_keys(), name="events-keys"))

    def sync_links(self) -> None:
        """One link per gateway key (or one plain link): add new keys, drop removed ones."""
        wanted: set[bytes | None] = set(self.ring.current()) if self.ring is not None \
            else {None}
        for key in set(self.links) - wanted:
            log.info("events: gateway key %s removed", key.decode() if key else "(plain)")
            self.links.pop(key).close()
        for key in sorted(wanted - set(self.links), key=lambda k: k or b""):
            self.links[key] = Link(self.ctx, self.managers, self.keys, key)
        if self.queue:
            self._wakeup.set()

    async def _follow_keys(self) -> None:
        while True:
            await asyncio.sleep(LINK_SYNC_INTERVAL)
            self.sync_links()

    async def check_managers(self, timeout: float) -> str | None:
        """Wait for a first handshake with a manager.  Return a message when managers
        were reached but every handshake failed (wrong keys); None when one succeeded,
        or none was reachable within `timeout` (gateways may start after agents)."""
        if not self.managers:
            return None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            links = list(self.links.values())
            if any(link.handshakes for link in links):
                return None
            failures = [failure for link in links for failure in link.failures]
            if any(link.refused for link in links) or len(failures) >= 2 * len(links):
                return "no manager accepted this agent: " + "; ".join(sorted(set(failures)))
            await asyncio.sleep(0.05)
        log.warning("events: no manager reachable yet at %s; events wait for one",
                    ", ".join(self.managers))
        return None

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

    def _send_one(self, frame: bytes) -> bool:
        """Send on the next link that has a manager connected (round robin)."""
        links = list(self.links.values())
        for offset in range(len(links)):
            link = links[(self._next + offset) % len(links)]
            try:
                link.sync.send(frame, flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                continue
            self._next = (self._next + offset + 1) % len(links)
            return True
        return False

    def _send_ready(self) -> int:
        """Send what the links accept right now; return how many were sent."""
        count = 0
        while self.queue:
            if not self._send_one(self.queue[0][1]):
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
        """Wait until a link accepts a message (a manager is connected), or time out."""
        if not self.links:  # no gateway key accepted yet: wait for the folder to change
            await asyncio.sleep(timeout_ms / 1000)
            return
        poller = zmq.asyncio.Poller()
        for link in self.links.values():
            poller.register(link.sock, zmq.POLLOUT)
        await poller.poll(timeout_ms)

    async def close(self, linger: float) -> None:
        """Send what is queued (for at most `linger` seconds), then close."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + linger
        while self.queue and loop.time() < deadline:
            if not self._send_ready():
                await self._writable(max(1, int((deadline - loop.time()) * 1000)))
        if self.queue:
            log.warning("%d events not delivered at shutdown (no manager listening)",
                        len(self.queue))
        # give ZeroMQ time to push what it accepted onto the wire
        linger_ms = int(max(deadline - loop.time(), 0.5) * 1000)
        for link in self.links.values():
            link.close(linger_ms)
        self.links.clear()
