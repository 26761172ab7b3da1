"""Manager-side RPC client for agents.

One DEALER socket per agent address, reused by every call; concurrent calls
are multiplexed by request id and each has its own deadline.  A call to an
agent that is not connected fails within `connect_grace` seconds, and calls in
flight fail as soon as the connection drops, so a dead agent never makes a
request hang until its deadline.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from . import agent_protocol as proto

log = logging.getLogger(__name__)


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
    """One DEALER socket to one agent, with its reader and monitor tasks."""

    def __init__(self, ctx: zmq.asyncio.Context, addr: str):
        self.addr = addr
        self.pending: dict[int, asyncio.Future] = {}
        self.connected = asyncio.Event()
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IMMEDIATE, 1)
        self.sock.setsockopt(zmq.RECONNECT_IVL, 100)
        self.sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        self.sock.setsockopt(zmq.HEARTBEAT_IVL, 2000)
        self.sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 6000)
        # "connected" = the ZMTP handshake is done: with IMMEDIATE set, a send
        # between TCP connect and handshake would fail with EAGAIN.
        self.monitor = self.sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED)
        self.sock.connect(addr)
        self.reader = asyncio.create_task(self._read_replies(), name=f"rpc-reader {addr}")
        self.watcher = asyncio.create_task(self._watch(), name=f"rpc-monitor {addr}")

    async def _read_replies(self) -> None:
        while True:
            frame = await self.sock.recv()
            try:
                reply = proto.decode_reply(frame)
            except proto.ProtocolError as exc:
                log.warning("dropped malformed reply from %s: %s", self.addr, exc)
                continue
            future = self.pending.pop(reply.id, None) if isinstance(reply.id, int) else None
            if future is None or future.done():
                continue  # the caller gave up already
            if reply.ok:
                future.set_result(reply.result)
            else:
                error = dict(reply.error)
                err_type = error.pop("type")
                message = error.pop("message", "")
                future.set_exception(AgentError(err_type, message, error))

    async def _watch(self) -> None:
        while True:
            event = parse_monitor_message(await self.monitor.recv_multipart())
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.connected.set()
            elif event["event"] in (zmq.EVENT_DISCONNECTED, zmq.EVENT_CLOSED):
                self.connected.clear()
                self.fail_all("connection lost")

    def fail_all(self, message: str) -> None:
        pending, self.pending = self.pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(AgentUnreachable(self.addr, message))

    async def close(self) -> None:
        for task in (self.reader, self.watcher):
            task.cancel()
        await asyncio.gather(self.reader, self.watcher, return_exceptions=True)
        self.fail_all("client closed")
        self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close(linger=0)


class AgentRPCClient:
    """Call agent RPC methods: `await client.call(addr, "execute", {...}, timeout=12)`."""

    def __init__(self, default_timeout: float = 10.0, connect_grace: float = 1.0,
                 ctx: zmq.asyncio.Context | None = None):
        self.default_timeout = default_timeout
        self.connect_grace = connect_grace
        self._ctx = ctx or zmq.asyncio.Context.instance()
        self._conns: dict[str, _Connection] = {}
        self._ids = itertools.count(1)

    def _connection(self, addr: str) -> _Connection:
        conn = self._conns.get(addr)
        if conn is None:
            conn = self._conns[addr] = _Connection(self._ctx, addr)
        return conn

    async def call(self, addr: str, method: str, args: dict[str, Any] | None = None,
                   timeout: float | None = None) -> Any:
        """Send one request and wait for its reply.

        Raises AgentError (the agent's error type and message), AgentTimeout
        (no reply before the deadline) or AgentUnreachable (not connected, or
        the connection dropped while waiting).
        """
        timeout = self.default_timeout if timeout is None else timeout
        conn = self._connection(addr)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if not conn.connected.is_set():
            try:
                await asyncio.wait_for(conn.connected.wait(), min(self.connect_grace, timeout))
            except TimeoutError:
                raise AgentUnreachable(addr, "not connected") from None
        req_id = next(self._ids)
        future: asyncio.Future = loop.create_future()
        conn.pending[req_id] = future
        try:
            try:
                await conn.sock.send(proto.encode_request(req_id, method, args), flags=zmq.NOBLOCK)
            except zmq.Again:
                raise AgentUnreachable(addr, "not connected") from None
            remaining = max(deadline - loop.time(), 0)
            try:
                return await asyncio.wait_for(asyncio.shield(future), remaining)
            except TimeoutError:
                raise AgentTimeout(addr, method, timeout) from None
        finally:
            conn.pending.pop(req_id, None)

    async def forget(self, addr: str) -> None:
        """Close the connection to an agent that went away."""
        conn = self._conns.pop(addr, None)
        if conn is not None:
            await conn.close()

    async def close(self) -> None:
        conns, self._conns = list(self._conns.values()), {}
        await asyncio.gather(*(conn.close() for conn in conns), return_exceptions=True)
