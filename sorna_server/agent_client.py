"""Manager-side RPC client for agents.

One DEALER socket per agent address, reused by every call; concurrent calls
are multiplexed by request id and each has its own deadline.  A call to an
agent that is not connected fails within `connect_grace` seconds, and calls in
flight fail as soon as the connection drops, so a dead agent never makes a
request hang until its deadline.

With keys, each socket is a CurveZMQ client whose server key is the key the
agent registered with (`key_for(addr)`, read when a connection is made or is
down, so a connected call costs nothing extra).  The CURVE handshake happens
once per connection, never per call.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from . import agent_protocol as proto
from . import curve
from .logs import current_request_id

log = logging.getLogger(__name__)

MAX_SOCKETS = 65536  # libzmq's default is 1,023 per context


class AgentError(Exception):
    """An agent answered with an error, or could not be asked."""

    def __init__(self, err_type: str, message: str, details: dict[str, Any] | None = None):
        super().__init__(f"{err_type}: {message}")
        self.type = err_type
        self.message = message
        self.details = dict(details or {})

    def as_dict(self) -> dict[str, Any]:
        return {**self.details, "type": self.type, "message": self.message}


class AgentUnreachable(AgentError):
    def __init__(self, addr: str, message: str):
        super().__init__(proto.ERR_AGENT_UNREACHABLE, f"{addr}: {message}")
        self.addr = addr


class AgentTimeout(AgentError):
    def __init__(self, addr: str, method: str, timeout: float):
        super().__init__(proto.ERR_RPC_TIMEOUT,
                         f"{addr} did not answer {method} within {timeout:g} s")
        self.addr = addr


class _Connection:
    """One DEALER socket to one agent, read by event-loop callbacks.

    The sockets are plain (non-asyncio) pyzmq sockets: the loop watches their
    ZMQ_FD with `add_reader`, and each wake-up drains every queued message
    with NOBLOCK until EAGAIN.  That FD is edge-triggered (it signals state
    changes, not "data available"), so after each send — which may consume
    the edge — ZMQ_EVENTS is checked and a drain scheduled when replies are
    already waiting.  A monitor socket reports the ZMTP handshake and
    disconnects, so calls fail fast when the agent goes away.
    """

    def __init__(self, ctx: zmq.Context, addr: str, loop: asyncio.AbstractEventLoop,
                 keys: curve.KeyPair | None = None, server_key: bytes | None = None):
        self.addr = addr
        self.server_key = server_key
        self.loop = loop
        self.pending: dict[int, asyncio.Future] = {}
        self.connected = asyncio.Event()
        self.closed = False
        # the agent refused our key: libzmq never retries such a connection, so the
        # client replaces it on the next call (the key may be admitted by then)
        self.refused = False
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IMMEDIATE, 1)
        self.sock.setsockopt(zmq.RECONNECT_IVL, 100)
        self.sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        self.sock.setsockopt(zmq.HEARTBEAT_IVL, 2000)
        self.sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 6000)
        self.sock.setsockopt(zmq.MAXMSGSIZE, proto.MAX_RPC_BYTES)
        curve.make_client(self.sock, keys, server_key)
        # "connected" = the ZMTP handshake is done: with IMMEDIATE set, a send
        # between TCP connect and handshake would fail with EAGAIN.
        self.monitor = self.sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED)
        self.sock.connect(addr)
        self._fds = (self.sock.getsockopt(zmq.FD), self.monitor.getsockopt(zmq.FD))
        loop.add_reader(self._fds[0], self.drain_replies)
        loop.add_reader(self._fds[1], self._drain_monitor)
        loop.call_soon(self.drain_replies)
        loop.call_soon(self._drain_monitor)

    def send(self, frame: bytes) -> None:
        """Queue one request (raises zmq.Again when the agent is not connected)."""
        self.sock.send(frame, zmq.NOBLOCK)
        if self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self.loop.call_soon(self.drain_replies)

    def drain_replies(self) -> None:
        sock = self.sock
        while not self.closed:
            try:
                frame = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError as exc:
                log.warning("reading replies from %s: %s", self.addr, exc)
                return
            self._dispatch(frame)

    def _dispatch(self, frame: bytes) -> None:
        try:
            reply = proto.decode_reply(frame)
        except proto.ProtocolError as exc:
            log.warning("dropped malformed reply from %s: %s", self.addr, exc)
            return
        future = self.pending.pop(reply.id, None) if isinstance(reply.id, int) else None
        if future is None or future.done():
            return  # the caller gave up already
        if reply.ok:
            future.set_result(reply.result)
        else:
            error = dict(reply.error)
            err_type = error.pop("type")
            message = error.pop("message", "")
            future.set_exception(AgentError(err_type, message, error))

    def _drain_monitor(self) -> None:
        while not self.closed:
            try:
                event = parse_monitor_message(self.monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            except zmq.ZMQError as exc:
                log.warning("reading the monitor of %s: %s", self.addr, exc)
                return
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.connected.set()
            elif event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self.refused = True
                self.fail_all("the agent refused this gateway's key")
            elif event["event"] in (zmq.EVENT_DISCONNECTED, zmq.EVENT_CLOSED):
                self.connected.clear()
                self.fail_all("connection lost")

    def fail_all(self, message: str) -> None:
        pending, self.pending = self.pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(AgentUnreachable(self.addr, message))

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for fd in self._fds:
            self.loop.remove_reader(fd)
        self.fail_all("client closed")
        self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close(linger=0)


def _sync_context(ctx: zmq.Context | None) -> zmq.Context:
    """A plain pyzmq context on the same libzmq context (the shared instance by
    default, so the process keeps one I/O thread), with the socket limit raised."""
    base = ctx if ctx is not None else zmq.asyncio.Context.instance()
    with contextlib.suppress(zmq.ZMQError):
        # libzmq sizes its socket table when the context creates its first
        # socket: this only helps when the RPC client is set up first (the
        # gateway does so); the default allows 1,023 sockets, and each agent
        # connection takes three (DEALER, monitor pair).
        if base.get(zmq.MAX_SOCKETS) < MAX_SOCKETS:
            base.set(zmq.MAX_SOCKETS, MAX_SOCKETS)
    return base if type(base) is zmq.Context else zmq.Context.shadow(base.underlying)


class AgentRPCClient:
    """Call agent RPC methods: `await client.call(addr, "execute", {...}, timeout=12)`."""

    def __init__(self, default_timeout: float = 10.0, connect_grace: float = 1.0,
                 ctx: zmq.Context | None = None, keys: curve.KeyPair | None = None,
                 key_for: Callable[[str], Awaitable[str | None]] | None = None):
        """`keys`: the gateway's CURVE keypair (None: plain sockets); `key_for(addr)`:
        the public key (z85) of the agent at `addr`, None when none registered."""
        self.default_timeout = default_timeout
        self.connect_grace = connect_grace
        self.keys = keys
        self.key_for = key_for
        self._ctx = _sync_context(ctx)
        self._conns: dict[str, _Connection] = {}
        self._ids = itertools.count(1)

    async def _connection(self, addr: str) -> _Connection:
        conn = self._conns.get(addr)
        if conn is not None and (conn.connected.is_set() or self.keys is None):
            return conn
        server_key = await self.server_key(addr)
        conn = self._conns.get(addr)  # another call may have connected meanwhile
        if conn is not None and conn.server_key == server_key and not conn.refused:
            return conn
        if conn is not None:  # the agent at this address registered another key (or refused)
            await conn.close()
        conn = self._conns[addr] = _Connection(self._ctx, addr, asyncio.get_running_loop(),
                                               self.keys, server_key)
        return conn

    async def server_key(self, addr: str) -> bytes | None:
        """The CURVE key to connect to `addr` with (None without keys)."""
        if self.keys is None:
            return None
        if self.key_for is None:
            raise AgentUnreachable(addr, "no agent keys known")
        try:
            key = await self.key_for(addr)
        except Exception as exc:  # the registry is unavailable: cannot know the key
            raise AgentUnreachable(addr, f"cannot look up its key: {exc}") from None
        if not key or not curve.is_z85_key(key):
            raise AgentUnreachable(addr, "no agent with a CurveZMQ key registered this address")
        return key.encode("ascii")

    async def call(self, addr: str, method: str, args: dict[str, Any] | None = None,
                   timeout: float | None = None, request_id: str | None = None) -> Any:
        """Send one request and wait for its reply.

        `request_id` (default: the id of the API request being served, if any)
        travels in the request so the agent can log it.  Raises AgentError (the
        agent's error type and message), AgentTimeout (no reply before the
        deadline) or AgentUnreachable (not connected, or the connection dropped
        while waiting).
        """
        timeout = self.default_timeout if timeout is None else timeout
        conn = await self._connection(addr)
        loop = conn.loop
        deadline = loop.time() + timeout
        if not conn.connected.is_set():
            try:
                await asyncio.wait_for(conn.connected.wait(), min(self.connect_grace, timeout))
            except TimeoutError:
                raise AgentUnreachable(addr, "not connected") from None
        req_id = next(self._ids)
        future: asyncio.Future = loop.create_future()
        conn.pending[req_id] = future
        timer = loop.call_at(deadline, _expire, future, addr, method, timeout)
        try:
            try:
                conn.send(proto.encode_request(req_id, method, args,
                                               request_id or current_request_id()))
            except zmq.Again:
                raise AgentUnreachable(addr, "not connected") from None
            return await future
        finally:
            timer.cancel()
            conn.pending.pop(req_id, None)

    async def forget(self, addr: str) -> None:
        """Close the connection to an agent that went away."""
        conn = self._conns.pop(addr, None)
        if conn is not None:
            await conn.close()

    async def close(self) -> None:
        conns, self._conns = list(self._conns.values()), {}
        await asyncio.gather(*(conn.close() for conn in conns), return_exceptions=True)


def _expire(future: asyncio.Future, addr: str, method: str, timeout: float) -> None:
    if not future.done():
        future.set_exception(AgentTimeout(addr, method, timeout))
