"""One runner process (see runner.py) as the agent sees it: spawn, talk, kill.

The runner runs the tenant's code, so nothing it sends is trusted once that code
has run: frames are capped (a few times the kernel's output limit), at most a
few unread messages are kept, and a runner that breaks the framing is killed.
Only `ready`, sent before any user code, tells the agent the runner's pids.
"""
from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import signal
import socket
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .languages import Language
from .reaping import wait_pidfd, wait_process
from .sandbox.host import Sandbox
from .zygote import Zygote, ZygoteError

log = logging.getLogger(__name__)

RUNNER_FILE = Path(__file__).with_name("runner.py")
HEADER = struct.Struct(">I")
READY_TIMEOUT = 20.0
FRAME_OVERHEAD = 64 << 10   # bytes of a frame beyond its console text
BYTES_PER_CHAR = 6          # worst case of a character in JSON (a \uXXXX escape)
MAX_INBOX = 4               # unread messages kept; more is a runner breaking the protocol


def max_frame_for(max_output: int) -> int:
    """The largest frame a runner honouring `max_output` characters can need."""
    return max_output * BYTES_PER_CHAR + FRAME_OVERHEAD


class RunnerDied(Exception):
    """The runner process went away while we waited for it."""


class _Channel(asyncio.Protocol):
    """Frames from the runner: parsed in data_received, handed to one waiter."""

    def __init__(self, owner: RunnerProcess):
        self.owner = owner
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buffer
        buf += data
        while len(buf) >= HEADER.size:
            (size,) = HEADER.unpack_from(buf)
            if size > self.owner.max_frame:
                self.owner.broken(f"a frame of {size} bytes (at most {self.owner.max_frame})")
                buf.clear()
                return
            if len(buf) < HEADER.size + size:
                return
            body = bytes(buf[HEADER.size:HEADER.size + size])
            del buf[:HEADER.size + size]
            try:
                msg = json.loads(body)
            except ValueError:
                log.warning("runner %s sent an undecodable frame", self.owner.pid)
                continue
            self.owner._deliver(msg)

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner._closed()


class RunnerProcess:
    """A started runner: its control channel, its pids and the sandbox it runs in."""

    def __init__(self, lang: Language, sandbox: Sandbox):
        self.lang = lang
        self.sandbox = sandbox
        self.proc: subprocess.Popen[bytes] | None = None  # when started directly, not forked
        self.outer_pid: int | None = None    # the process started for it (session leader)
        self.pidfd: int | None = None        # a handle on outer_pid, when forked by a zygote
        self.zygote: Zygote | None = None    # ... by this one (it reaps outer_pid when told)
        self.pid: int | None = None          # the kernel process (outer pid)
        self.init_pid: int | None = None     # PID 1 of its namespace, when it has one
        self.transport: asyncio.Transport | None = None
        self.inbox: collections.deque[dict[str, Any]] = collections.deque()
        self.waiter: asyncio.Future[dict[str, Any]] | None = None
        self.seq = 0                          # number of the last request sent
        self.max_frame = max_frame_for(1 << 20)
        self.alive = False
        self.killed = False
        self.violation: str | None = None     # how it broke the protocol, if it did
        self.on_exit: Callable[[RunnerProcess], None] | None = None
        self._gone: asyncio.Event | None = None

    @property
    def uid(self) -> int | None:
        return self.sandbox.uid

    @property
    def workdir(self) -> Path:
        return self.sandbox.workdir

    def keep_pids(self) -> set[int]:
        """The runner's own processes (known from before any user code ran)."""
        return {pid for pid in (self.outer_pid, self.init_pid, self.pid) if pid}

    def set_output_limit(self, max_output: int) -> None:
        self.max_frame = max_frame_for(max_output)

    def spec(self, fd: int, sandbox_spec: dict[str, Any], rlimits: dict[str, int],
             max_output: int) -> dict[str, Any]:
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": self.sandbox.home,
            "USER": "work",
            "LOGNAME": "work",
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "PYTHONIOENCODING": "utf-8",
            "PYTHONDONTWRITEBYTECODE": "1",
            "TERM": "xterm-256color",
        }
        return {
            **sandbox_spec,
            "fd": fd,
            "kind": self.lang.kind,
            "shell": self.lang.shell,
            "query": self.lang.query,
            "query_source": self.lang.query_source,
            "rlimits": rlimits,
            "max_output": max_output,
            "env": env,
        }

    async def start(self, sandbox_spec: dict[str, Any], rlimits: dict[str, int],
                    max_output: int, zygote: Zygote | None = None) -> None:
        """Fork the runner from `zygote` (a few ms), or start a new interpreter."""
        self.set_output_limit(max_output)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            spec = self.spec(theirs.fileno(), sandbox_spec, rlimits, max_output)
            if zygote is not None:
                try:
                    self.zygote = zygote
                    self.outer_pid, self.pidfd = await zygote.fork(spec, theirs)
                except ZygoteError as exc:
                    raise RunnerDied(str(exc)) from None
            else:
                self.proc = subprocess.Popen(
                    [self.lang.python, "-u", "-B", str(RUNNER_FILE), json.dumps(spec)],
                    pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL, stderr=None, start_new_session=True,
                    cwd="/", env={"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"})
                self.outer_pid = self.proc.pid
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        await self._connect(ours)

    async def _connect(self, ours: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        self._gone = asyncio.Event()
        self.alive = True
        try:
            self.transport, _ = await loop.create_unix_connection(lambda: _Channel(self),
                                                                  sock=ours)
        except BaseException:
            ours.close()
            self.alive = False
            self._gone.set()
            raise
        try:
            ready = await asyncio.wait_for(self.receive(), READY_TIMEOUT)
        except (TimeoutError, RunnerDied):
            await self.kill()
            raise RunnerDied("the runner did not start") from None
        pid, init_pid = ready.get("pid"), ready.get("init_pid")
        if ready.get("type") != "ready" or not isinstance(pid, int) \
                or not isinstance(init_pid, (int, type(None))):
            await self.kill()
            raise RunnerDied(f"unexpected first message {ready!r}")
        self.pid, self.init_pid = pid, init_pid

    def broken(self, violation: str) -> None:
        """The runner broke the protocol: drop the connection (the agent kills it)."""
        if self.violation is None:
            log.warning("runner %s sent %s: ending it", self.pid, violation)
            self.violation = violation
        if self.transport is not None:
            self.transport.abort()

    def _deliver(self, msg: dict[str, Any]) -> None:
        if msg.get("seq", self.seq) != self.seq:
            log.debug("runner %s: dropped a stale reply %r", self.pid, msg.get("type"))
            return
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            self.waiter = None
            waiter.set_result(msg)
        elif len(self.inbox) >= MAX_INBOX:
            self.broken("more messages than requests")
        else:
            self.inbox.append(msg)

    def _closed(self) -> None:
        self.alive = False
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(RunnerDied("the kernel process is gone"))
        if self._gone is not None:
            self._gone.set()
        if self.on_exit is not None and not self.killed:
            self.on_exit(self)

    def send(self, msg: dict[str, Any]) -> None:
        if not self.alive or self.transport is None:
            raise RunnerDied("the kernel process is gone")
        self.seq += 1
        self.inbox.clear()  # anything unread belongs to an earlier request
        msg = {**msg, "seq": self.seq}
        data = json.dumps(msg, ensure_ascii=False).encode("utf-8", "surrogateescape")
        self.transport.write(HEADER.pack(len(data)) + data)

    def receive(self) -> asyncio.Future[dict[str, Any]]:
        """A future for the next message (RunnerDied once the process is gone)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[dict[str, Any]] = loop.create_future()
        if self.inbox:
            future.set_result(self.inbox.popleft())
        elif not self.alive:
            future.set_exception(RunnerDied("the kernel process is gone"))
        else:
            if self.waiter is not None and not self.waiter.done():
                self.waiter.cancel()
            self.waiter = future
        return future

    async def request(self, msg: dict[str, Any]) -> dict[str, Any]:
        self.send(msg)
        return await self.receive()

    def interrupt(self) -> None:
        if self.pid and self.alive:
            try:
                os.kill(self.pid, signal.SIGINT)
            except OSError:
                pass

    async def kill(self) -> None:  # noqa: C901  (one guarded step per way a runner lives)
        """Kill the kernel and everything it started; wait until it is gone."""
        self.killed = True
        for pid in (self.init_pid, self.pid):
            if pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        if self.proc is not None:
            if self.init_pid is None:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except OSError:
                    pass
            try:
                self.proc.kill()
            except OSError:
                pass
            await wait_process(self.proc)
        elif self.pidfd is not None:
            if self.init_pid is None and self.outer_pid is not None:
                try:  # not reaped until we say so: the group id is still the runner's
                    os.killpg(self.outer_pid, signal.SIGKILL)
                except OSError:
                    pass
            try:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            except OSError:
                pass
            await wait_pidfd(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = None
            if self.zygote is not None and self.outer_pid is not None:
                self.zygote.reap(self.outer_pid)
        if self.transport is not None:
            self.transport.abort()
        if self._gone is not None:
            try:
                await asyncio.wait_for(self._gone.wait(), 5)
            except TimeoutError:
                pass
        self.alive = False
