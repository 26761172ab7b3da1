"""Fork servers: one long-lived `runner.py --zygote` process per interpreter.

A zygote has already paid interpreter start-up and the imports a runner needs;
asked for a runner, it forks one in a few milliseconds, and the fork then
sandboxes itself exactly like a directly started runner (namespaces, rlimits,
uid, working directory).  The agent gets the new process's pid and a pidfd,
which it uses to kill and wait for it; the zygote, its parent, reaps it only
when the agent says so (after the kill), so its pid and process group id cannot
be reused while the agent may still signal them.  Runners die with their
zygote (PDEATHSIG), and the zygote dies with the agent.  The wire format is
described at the zygote in runner.py.
"""
from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import signal
import socket
import subprocess
import time
from typing import Any

from .reaping import wait_pidfd, wait_process

log = logging.getLogger(__name__)

START_TIMEOUT = 20.0
RETRY_AFTER = 30.0      # seconds without a fork server after one failed to start
FORK_TIMEOUT = 10.0
MAX_MESSAGE = 64 << 10


class ZygoteError(Exception):
    """The fork server could not start or could not fork."""


class Zygote:
    def __init__(self, python: str, runner_file: str, label: str):
        self.python = python
        self.runner_file = runner_file
        self.label = label
        self.proc: subprocess.Popen | None = None
        self.sock: socket.socket | None = None
        self.replies: collections.deque[asyncio.Future] = collections.deque()
        self.lock = asyncio.Lock()
        self.abandoned: set[asyncio.Task] = set()
        self.alive = False

    async def start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen(
                [self.python, "-u", "-B", self.runner_file, "--zygote", str(theirs.fileno()),
                 str(os.getpid()), self.label],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=None, start_new_session=True,
                cwd="/", env={"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"})
        except OSError as exc:
            ours.close()
            raise ZygoteError(f"cannot start the fork server: {exc}") from None
        finally:
            theirs.close()
        ours.setblocking(False)
        self.sock = ours
        self.alive = True
        asyncio.get_running_loop().add_reader(ours.fileno(), self._on_readable)
        try:
            ready, fds = await asyncio.wait_for(self._expect_reply(), START_TIMEOUT)
        except (TimeoutError, ZygoteError):
            await self.close()
            raise ZygoteError("the fork server did not start") from None
        _close_all(fds)
        if ready.get("type") != "ready":
            await self.close()
            raise ZygoteError(f"unexpected first message from the fork server: {ready!r}")
        log.info("fork server %s started for %s", self.proc.pid, self.python)

    def _expect_reply(self) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self.replies.append(future)
        return future

    def _on_readable(self) -> None:
        assert self.sock is not None
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self.sock, MAX_MESSAGE, 4)
            except BlockingIOError:
                return
            except OSError:
                data, fds = b"", []
            if not data and not fds:
                self._gone()
                return
            try:
                message = json.loads(data)
            except ValueError:
                message = {"type": "error", "message": "undecodable reply"}
            if self.replies:
                future = self.replies.popleft()
                if not future.done():
                    future.set_result((message, fds))
                    continue
            if message.get("type") == "forked" and len(fds) == 1:
                # its requester gave up: end that runner and have it reaped
                task = asyncio.ensure_future(self._abandon(int(message["pid"]), fds[0]))
                self.abandoned.add(task)
                task.add_done_callback(self.abandoned.discard)
                continue
            _close_all(fds)

    async def _abandon(self, pid: int, pidfd: int) -> None:
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            await wait_pidfd(pidfd)
        except OSError:
            pass
        finally:
            os.close(pidfd)
        self.reap(pid)

    def _gone(self) -> None:
        if self.alive:
            log.warning("fork server for %s exited", self.python)
        self.alive = False
        if self.sock is not None:
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
        while self.replies:
            future = self.replies.popleft()
            if not future.done():
                future.set_exception(ZygoteError("the fork server exited"))

    async def fork(self, spec: dict[str, Any], control: socket.socket) -> tuple[int, int]:
        """A new runner for `spec` talking on `control`: (pid, pidfd)."""
        async with self.lock:  # one fork at a time: replies come back in order
            if not self.alive or self.sock is None:
                raise ZygoteError("the fork server is not running")
            reply = self._expect_reply()
            request = json.dumps({"op": "fork", "spec": spec}).encode()
            try:
                socket.send_fds(self.sock, [request], [control.fileno()])
            except OSError as exc:
                self.replies.remove(reply)
                raise ZygoteError(f"cannot reach the fork server: {exc}") from None
            try:
                message, fds = await asyncio.wait_for(reply, FORK_TIMEOUT)
            except TimeoutError:
                log.warning("fork server for %s stopped answering: replacing it", self.python)
                await self.close()
                raise ZygoteError("the fork server did not answer") from None
        if message.get("type") != "forked" or len(fds) != 1:
            _close_all(fds)
            raise ZygoteError(f"fork failed: {message.get('message', message)}")
        return int(message["pid"]), fds[0]

    def reap(self, pid: int) -> None:
        """Let the zygote collect a runner the agent has killed and seen exit."""
        if self.alive and self.sock is not None:
            try:
                self.sock.send(json.dumps({"op": "reap", "pid": pid}).encode())
            except OSError as exc:
                log.warning("cannot ask the fork server to reap %s: %s", pid, exc)

    async def close(self) -> None:
        """Stop the zygote (runners it forked that are still alive die with it)."""
        self.alive = False
        self._gone()
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.proc is not None:
            try:
                self.proc.send_signal(signal.SIGKILL)
            except OSError:
                pass
            await wait_process(self.proc)


class Zygotes:
    """The fork servers of an agent, one per interpreter, started on first use and
    replaced when one has died.  `get` answers None when none can run (the caller
    then starts runners directly)."""

    def __init__(self, runner_file: str, label: str):
        self.runner_file = runner_file
        self.label = label
        self.by_python: dict[str, Zygote] = {}
        self.locks: dict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)
        self.failed_at: dict[str, float] = {}
        self.closing = False

    async def get(self, python: str) -> Zygote | None:
        async with self.locks[python]:
            zygote = self.by_python.get(python)
            if zygote is not None and zygote.alive:
                return zygote
            if self.closing or \
                    time.monotonic() - self.failed_at.get(python, -RETRY_AFTER) < RETRY_AFTER:
                return None
            if zygote is not None:
                await zygote.close()
            zygote = Zygote(python, self.runner_file, self.label)
            try:
                await zygote.start()
            except ZygoteError as exc:
                log.warning("%s: runners start without a fork server", exc)
                self.by_python.pop(python, None)
                self.failed_at[python] = time.monotonic()
                return None
            self.by_python[python] = zygote
            return zygote

    async def close(self) -> None:
        self.closing = True
        zygotes = list(self.by_python.values())
        self.by_python.clear()
        await asyncio.gather(*(z.close() for z in zygotes), return_exceptions=True)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
