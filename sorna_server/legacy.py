"""The legacy ZeroMQ interface (DESIGN section 8), port 5001, loopback by default.

REQ/REP with JSON objects:

    {"action": 0, "body": x}                              -> {"reply": 0, "body": x}       PING
    {"action": 2, "user_id", "entry_id", "lang"}          -> {"reply": 200, "kernel_id",
                                                              "kernel_addr", "stdin_addr",
                                                              "stdout_addr"}  GET_OR_CREATE
    {"action": 3, "kernel_id"}                            -> {"reply": 200}                DESTROY

Failures answer `reply` 400 (invalid input) or 500 with a `cause`.  There is no
authentication: kernels are billed to `config.legacy_access_key`, and only
that key's kernels can be destroyed here.  The socket is a ROUTER speaking the
REQ envelope, so slow requests (kernel creation) do not hold up the others;
malformed frames are logged and answered with 400, never fatal.
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import zmq
import zmq.asyncio

from .config import SornaConfig
from .gateway import errors
from .gateway.kernels import KernelService

log = logging.getLogger(__name__)

PING, GET_OR_CREATE, DESTROY = 0, 2, 3
MAX_FRAME = 1 << 20


class LegacyError(Exception):
    def __init__(self, reply: int, cause: str):
        super().__init__(cause)
        self.reply = reply
        self.cause = cause


class LegacyListener:
    def __init__(self, config: SornaConfig, kernels: KernelService,
                 ctx: zmq.asyncio.Context | None = None):
        self.config = config
        self.kernels = kernels
        self.ctx = ctx or zmq.asyncio.Context.instance()
        self.sock: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[None]] = set()

    @property
    def addr(self) -> str:
        return f"tcp://{self.config.manager_ip}:{self.config.manager_port}"

    async def start(self) -> None:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME)
        sock.bind(self.addr)
        self.sock = sock
        self._task = asyncio.create_task(self._serve(), name="legacy-listener")
        log.info("legacy ZMQ interface listening on %s", self.addr)

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._inflight) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None

    async def _serve(self) -> None:
        assert self.sock is not None
        while True:
            frames = await self.sock.recv_multipart()
            # REQ envelope: [identity, (more routing ids...), b"", body]
            try:
                split = frames.index(b"", 1)
            except ValueError:
                log.warning("legacy: dropped a frame without a REQ envelope")
                continue
            envelope, body = frames[:split + 1], frames[split + 1:]
            task = asyncio.create_task(self._answer(envelope, body))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _answer(self, envelope: list[bytes], body: list[bytes]) -> None:
        try:
            reply = await self.handle(body[0] if len(body) == 1 else None)
        except LegacyError as exc:
            reply = {"reply": exc.reply, "cause": exc.cause}
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # never let one request stop the listener
            problem = errors.as_problem(exc)
            reply = {"reply": 500, "cause": problem.detail or problem.title}
        if self.sock is not None:
            await self.sock.send_multipart([*envelope, json.dumps(reply).encode()])

    async def handle(self, frame: bytes | None) -> dict[str, Any]:
        if frame is None:
            raise LegacyError(400, "expected exactly one JSON frame")
        try:
            request = json.loads(frame)
        except (ValueError, UnicodeDecodeError):
            log.warning("legacy: malformed request frame (%d bytes)", len(frame))
            raise LegacyError(400, "the request is not valid JSON") from None
        if not isinstance(request, dict):
            raise LegacyError(400, "the request must be a JSON object")
        action = request.get("action")
        if action == PING:
            return {"reply": 0, "body": request.get("body")}
        if action == GET_OR_CREATE:
            return await self._get_or_create(request)
        if action == DESTROY:
            return await self._destroy(request)
        raise LegacyError(400, f"unknown action {action!r}")

    def _access_key(self) -> str:
        access_key = self.config.legacy_access_key
        if not access_key:
            raise LegacyError(500, "the legacy interface has no keypair to bill: "
                                   "set legacy_access_key (SORNA_LEGACY_ACCESS_KEY)")
        return access_key

    async def _get_or_create(self, request: dict[str, Any]) -> dict[str, Any]:
        user_id, entry_id, lang = (request.get(k) for k in ("user_id", "entry_id", "lang"))
        for name, value in (("user_id", user_id), ("entry_id", entry_id)):
            if not isinstance(value, (str, int)) or isinstance(value, bool) or value == "":
                raise LegacyError(400, f"{name} must be a non-empty string or integer")
        if not isinstance(lang, str) or not lang or len(lang) > 64:
            raise LegacyError(400, "lang must be a non-empty string")
        token = f"legacy:{user_id}:{entry_id}"
        if len(token) > 200:
            raise LegacyError(400, "user_id and entry_id are too long")
        access_key = self._access_key()
        try:
            record, _ = await self.kernels.get_or_create(access_key, lang, token)
        except errors.Problem as problem:
            raise LegacyError(400 if problem.status == 400 else 500,
                              f"{problem.name}: {problem.detail or problem.title}") from None
        host = record.agent_host
        return {"reply": 200, "kernel_id": record.id, "kernel_addr": record.addr,
                "stdin_addr": f"tcp://{host}:{record.stdin_port}",
                "stdout_addr": f"tcp://{host}:{record.stdout_port}"}

    async def _destroy(self, request: dict[str, Any]) -> dict[str, Any]:
        kernel_id = request.get("kernel_id")
        if not isinstance(kernel_id, str) or not kernel_id:
            raise LegacyError(400, "kernel_id must be a non-empty string")
        access_key = self._access_key()
        try:
            record = await self.kernels.get_owned(access_key, kernel_id)
            await self.kernels.destroy(record)
        except errors.Problem as problem:
            raise LegacyError(400 if problem.status in (400, 404) else 500,
                              f"{problem.name}: {problem.detail or problem.title}") from None
        return {"reply": 200}
