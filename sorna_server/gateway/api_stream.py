"""`GET /stream/kernel/{id}/pty`: a WebSocket bridged to the kernel's PTY.

Client messages (JSON text): `{"type": "stdin", "chars": <base64>}`,
`{"type": "resize", "rows": R, "cols": C}`, `{"type": "ping"}` (answered with
`{"type": "pong"}`) and `{"type": "restart"}`.  Server messages:
`{"type": "out", "data": <base64>}`, and `{"type": "error", "message": ...}` for
a message it could not act on.

The kernel's stdin port is a SUB socket on the agent (we connect PUB), its
stdout port a PUB socket (we connect SUB).  The bridge reconnects when the
kernel is restarted (by this connection, another request or another gateway:
the registry's ports are re-read every `PORT_CHECK_INTERVAL` seconds) and
closes the WebSocket when the kernel ends.

The signature is checked once, when the socket opens; afterwards the bridge
keeps asking the keypair cache (a dictionary look-up, reloaded from the
database every `keypair_cache_ttl` seconds) and closes the socket with 1008
(policy violation) once the key is deactivated or deleted: within the cache
TTL plus a quarter of it (at most `KEY_CHECK_MAX_INTERVAL`).  While the
database cannot be reached the bridge stays open and asks again.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
from typing import Any

import zmq
import zmq.asyncio
from aiohttp import WSCloseCode, WSMsgType, web

from .. import curve
from ..agent_client import AgentError
from ..registry import KernelRecord
from . import keys
from .auth import KeypairCache
from .errors import InvalidAPIParameters, Problem, as_problem
from .kernels import KernelService
from .keys import ACCESS_KEY

log = logging.getLogger(__name__)

PORT_CHECK_INTERVAL = 1.0
KEY_CHECK_MAX_INTERVAL = 1.0
MAX_STDIN_CHUNK = 64 << 10
MAX_OUTPUT_FRAME = 1 << 20  # a terminal's output frame from the agent (it sends a few KB)


async def stream_pty(request: web.Request) -> web.WebSocketResponse:
    service = request.app[keys.KERNELS]
    record = await service.get_owned(request[ACCESS_KEY], request.match_info["kernel_id"])
    ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=1 << 20)
    if not ws.can_prepare(request).ok:
        raise InvalidAPIParameters("This path needs a WebSocket upgrade request.")
    await ws.prepare(request)
    sockets = request.app[keys.WEBSOCKETS]
    sockets.add(ws)
    bridge = PtyBridge(ws, record, service, request.app[keys.KEYPAIRS], request[ACCESS_KEY])
    try:
        await bridge.run()
    finally:
        sockets.discard(ws)
    return ws


class PtyBridge:
    def __init__(self, ws: web.WebSocketResponse, record: KernelRecord, service: KernelService,
                 keypairs: KeypairCache, access_key: str):
        self.ws = ws
        self.record = record
        self.service = service
        self.keypairs = keypairs
        self.access_key = access_key
        self.ctx = zmq.asyncio.Context.instance()
        self.stdin: zmq.asyncio.Socket | None = None
        self.stdout: zmq.asyncio.Socket | None = None
        self.downstream: asyncio.Task[None] | None = None

    async def _connect(self) -> None:
        """Connect to the kernel's PTY sockets: CURVE clients of the agent's key."""
        host = self.record.agent_host
        rpc = self.service.rpc
        server_key = await rpc.server_key(self.record.addr)
        self.stdin = self.ctx.socket(zmq.PUB)
        self.stdin.setsockopt(zmq.LINGER, 0)
        curve.make_client(self.stdin, rpc.keys, server_key)
        self.stdin.connect(f"tcp://{host}:{self.record.stdin_port}")
        self.stdout = self.ctx.socket(zmq.SUB)
        self.stdout.setsockopt(zmq.LINGER, 0)
        self.stdout.setsockopt(zmq.MAXMSGSIZE, MAX_OUTPUT_FRAME)
        self.stdout.setsockopt(zmq.SUBSCRIBE, b"")
        curve.make_client(self.stdout, rpc.keys, server_key)
        self.stdout.connect(f"tcp://{host}:{self.record.stdout_port}")
        self.downstream = asyncio.create_task(self._forward_output(self.stdout))

    async def _disconnect(self) -> None:
        if self.downstream is not None:
            self.downstream.cancel()
            await asyncio.gather(self.downstream, return_exceptions=True)
            self.downstream = None
        for sock in (self.stdin, self.stdout):
            if sock is not None:
                sock.close(linger=0)
        self.stdin = self.stdout = None

    async def _reconnect(self) -> None:
        await self._disconnect()
        await self._connect()

    async def _forward_output(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            frames = await sock.recv_multipart()
            for frame in frames:
                if self.ws.closed:
                    return
                await self.ws.send_str(json.dumps(
                    {"type": "out", "data": base64.b64encode(frame).decode("ascii")}))

    async def _watch_kernel(self) -> None:
        """Follow port changes (restarts) and the kernel's end."""
        changed = self.service.watch_ports(self.record.id)
        try:
            while not self.ws.closed:
                try:
                    await asyncio.wait_for(changed.wait(), PORT_CHECK_INTERVAL)
                except TimeoutError:
                    pass
                changed.clear()
                try:
                    current = await self.service.registry.get_kernel(self.record.id)
                except Exception as exc:  # Redis blip: keep the bridge, look again later
                    log.debug("pty watch of %s: %s", self.record.id, exc)
                    continue
                if current is None:
                    await self.ws.close(code=WSCloseCode.OK, message=b"kernel terminated")
                    return
                if (current.stdin_port, current.stdout_port) != (
                        self.record.stdin_port, self.record.stdout_port):
                    self.record = current
                    await self._reconnect()
        finally:
            self.service.unwatch_ports(self.record.id, changed)

    async def _watch_keypair(self) -> None:
        """Close the socket once its access key is no longer active."""
        interval = min(max(self.keypairs.ttl / 4, 0.05), KEY_CHECK_MAX_INTERVAL)
        while not self.ws.closed:
            await asyncio.sleep(interval)
            try:
                keypair = await self.keypairs.get(self.access_key)
            except Exception as exc:  # database down: keep the bridge, ask again
                log.debug("pty key check of %s: %s", self.access_key, exc)
                continue
            if keypair is None or not keypair.is_active:
                log.info("closing the terminal of kernel %s: access key %s is not active",
                         self.record.id, self.access_key)
                await self.ws.close(code=WSCloseCode.POLICY_VIOLATION,
                                    message=b"access key deactivated")
                return

    async def run(self) -> None:
        try:
            await self._connect()
        except AgentError as exc:
            await self._send_error(str(exc))
            await self.ws.close(code=WSCloseCode.TRY_AGAIN_LATER, message=b"agent unreachable")
            return
        watchers = [asyncio.create_task(self._watch_kernel()),
                    asyncio.create_task(self._watch_keypair())]
        try:
            async for msg in self.ws:
                if msg.type == WSMsgType.TEXT:
                    await self._handle(msg.data)
                elif msg.type == WSMsgType.ERROR:
                    break
        finally:
            for watcher in watchers:
                watcher.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)
            await self._disconnect()

    async def _handle(self, text: str) -> None:
        try:
            msg: Any = json.loads(text)
            kind = msg.get("type") if isinstance(msg, dict) else None
            if kind == "stdin":
                data = base64.b64decode(str(msg.get("chars", "")).encode("ascii"), validate=True)
                if len(data) > MAX_STDIN_CHUNK:
                    raise ValueError("stdin chunk too large")
                if self.stdin is not None:
                    await self.stdin.send(data)
            elif kind == "resize":
                rows, cols = msg.get("rows"), msg.get("cols")
                if not (isinstance(rows, int) and isinstance(cols, int)
                        and 0 < rows < 10000 and 0 < cols < 10000):
                    raise ValueError("resize needs integer rows and cols")
                await self.service.resize_pty(self.record, rows, cols)
            elif kind == "ping":
                await self.ws.send_str(json.dumps({"type": "pong"}))
            elif kind == "restart":
                self.record = await self.service.restart(self.record)
                await self._reconnect()
            else:
                raise ValueError(f"unknown message type {kind!r}")
        except (ValueError, binascii.Error, UnicodeError) as exc:
            await self._send_error(f"bad message: {exc}")
        except (AgentError, Problem) as exc:
            await self._send_error(str(exc))
        except Exception as exc:  # e.g. Redis down during a restart: report, keep the bridge
            await self._send_error(as_problem(exc).title)

    async def _send_error(self, message: str) -> None:
        if not self.ws.closed:
            await self.ws.send_str(json.dumps({"type": "error", "message": message}))
