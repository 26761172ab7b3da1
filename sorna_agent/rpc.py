"""The agent's RPC server: its ROUTER socket, the receive loop and the method table.

Every request runs in its own task, so a slow kernel never delays calls for
other kernels (calls that run code in one kernel are serialised by that
kernel's lock, in `execution.py`).  A malformed frame is logged and dropped.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import zmq
import zmq.asyncio

from sorna_server import agent_protocol as proto
from sorna_server import curve
from sorna_server.logs import REQUEST_ID

from . import AgentStartError

if TYPE_CHECKING:
    from .agent import Agent

log = logging.getLogger("sorna_agent")

Method = Callable[[dict[str, Any]], Awaitable[Any]]


class RPCError(Exception):
    """An error reply: `type` is one of the protocol's error types."""

    def __init__(self, err_type: str, message: str, **details: Any):
        super().__init__(message)
        self.type = err_type
        self.message = message
        self.details = details


def method_table(agent: Agent) -> dict[str, Method]:
    """Protocol method name -> the agent's handler (args map in, result out)."""
    return {
        "ping": agent.ping,
        "create_kernel": agent.create_kernel,
        "destroy_kernel": agent.destroy_kernel,
        "restart_kernel": agent.restart_kernel,
        "execute": agent.execute,
        "upload_file": agent.upload_file,
        "resize_pty": agent.resize_pty,
        "list_kernels": agent.list_kernels,
        "reset": agent.reset,
    }


class RPCServer:
    """The ROUTER socket managers call, bound at construction.

    With keys it is a CurveZMQ server: the ZAP handler admits the gateway keys
    of `ring` at the handshake, and each request is checked again against the
    current keys (a key removed from `gateway_keys` stops working at once)."""

    def __init__(self, ctx: zmq.asyncio.Context, bind_addr: str,
                 methods: dict[str, Method], *, keys: curve.KeyPair | None = None,
                 ring: curve.KeyRing | None = None):
        self.methods = methods
        self.ring = ring
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.sock.setsockopt(zmq.MAXMSGSIZE, proto.MAX_RPC_BYTES)
        curve.make_server(self.sock, keys)
        try:
            self.sock.bind(bind_addr)
        except zmq.ZMQError as exc:
            self.sock.close(linger=0)
            raise AgentStartError(f"cannot listen on {bind_addr}: {exc}") from None
        self.watch = curve.HandshakeWatch(self.sock, "the RPC port") \
            if keys is not None else None
        self.revoked = curve.RefusalLog("revoked gateway key")

    async def serve(self, spawn: Callable[[Awaitable[Any]], object]) -> None:
        """Receive requests forever; `spawn` runs each answer as a task."""
        if self.watch is not None:
            spawn(self.watch.run())
        while True:
            parts = await self.sock.recv_multipart(copy=False)
            if len(parts) != 2:
                log.warning("dropped a malformed RPC message of %d frames", len(parts))
                continue
            if self.ring is not None:
                sender = curve.peer_key(parts[1])
                if not self.ring.allows(sender):
                    self.revoked.note(f"dropped an RPC request from gateway key {sender}: "
                                      f"no longer among gateway_keys")
                    continue
            identity, frame = parts[0].bytes, parts[1].bytes
            try:
                request = proto.decode_request(frame)
            except proto.ProtocolError as exc:
                log.warning("dropped a malformed RPC frame: %s", exc)
                continue
            spawn(self._answer(identity, request))

    async def _answer(self, identity: bytes, request: proto.Request) -> None:
        # each request is its own task: the id stamps every log line written for it
        REQUEST_ID.set(request.request_id)
        method = self.methods.get(request.method)
        try:
            if method is None:
                raise RPCError(proto.ERR_UNKNOWN_METHOD, f"unknown method {request.method!r}")
            try:
                proto.validate_args(request.method, request.args)
            except proto.ProtocolError as exc:
                raise RPCError(proto.ERR_INVALID_ARGS, str(exc)) from None
            reply = proto.encode_result(request.id, await method(request.args))
        except RPCError as exc:
            reply = proto.encode_error(request.id, exc.type, exc.message, **exc.details)
        except asyncio.CancelledError:
            reply = proto.encode_error(request.id, proto.ERR_INTERNAL, "the agent is stopping")
            await self._reply(identity, reply)
            raise
        except Exception as exc:
            log.exception("%s failed", request.method)
            reply = proto.encode_error(request.id, proto.ERR_INTERNAL,
                                       f"{exc.__class__.__name__}: {exc}")
        await self._reply(identity, reply)

    async def _reply(self, identity: bytes, reply: bytes) -> None:
        try:
            await self.sock.send_multipart([identity, reply])
        except zmq.ZMQError as exc:
            log.warning("cannot send a reply: %s", exc)

    def close(self) -> None:
        if self.watch is not None:
            self.watch.close()
        self.sock.close(linger=0)
