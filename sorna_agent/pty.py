"""The interactive terminal of a kernel, bridged to two ZeroMQ ports.

The agent binds a SUB socket (stdin port; raw bytes in) and a PUB socket
(stdout port; raw bytes out) per kernel.  The terminal process (the language's
`interactive` command) starts on the first stdin bytes, on a pseudo-terminal,
in the kernel's sandbox: its cgroup, its namespaces (nsenter into those of the
kernel's PID 1, then a `cd` into the kernel's home), its uid (or, in a user
namespace, without capabilities), its rlimits, and with no_new_privs, so setuid
programs give nothing.  It leads its own session: the processes of that session
are the terminal's, which the end-of-run sweep leaves alone.  When it exits,
the next stdin bytes start a new one.
"""
from __future__ import annotations

import asyncio
import ctypes
import fcntl
import logging
import os
import resource
import shutil
import signal
import struct
import subprocess
import termios
from typing import TYPE_CHECKING

import zmq
import zmq.asyncio

from sorna_server import curve

from .reaping import wait_process

if TYPE_CHECKING:
    from .kernel import Kernel

log = logging.getLogger(__name__)

DEFAULT_ROWS, DEFAULT_COLS = 24, 80
PR_SET_NO_NEW_PRIVS = 38
IN_HOME = ("/bin/sh", "-c", 'cd "$HOME" && exec "$@"', "sorna-pty")  # inside the sandbox
NSENTER_FLAGS = {"user": "-U", "mnt": "-m", "pid": "-p", "net": "-n", "ipc": "-i", "uts": "-u"}
MAX_INPUT_FRAME = 1 << 20  # the gateway sends keystrokes in chunks of at most 64 KiB
RLIMITS = {"as": resource.RLIMIT_AS, "cpu": resource.RLIMIT_CPU, "nproc": resource.RLIMIT_NPROC,
           "fsize": resource.RLIMIT_FSIZE, "core": resource.RLIMIT_CORE}


class PtySession:
    def __init__(self, ctx: zmq.asyncio.Context, bind_host: str, kernel: Kernel,
                 keys: curve.KeyPair | None = None):
        """Bind the terminal's stdin (SUB) and stdout (PUB) sockets: CurveZMQ
        servers with the agent's `keys`, admitting the gateway keys (ZAP)."""
        self.ctx = ctx
        self.bind_host = bind_host
        self.kernel = kernel
        self.rows, self.cols = DEFAULT_ROWS, DEFAULT_COLS
        self.stdin_sock = ctx.socket(zmq.SUB)
        self.stdin_sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.stdin_sock.setsockopt(zmq.LINGER, 0)
        self.stdin_sock.setsockopt(zmq.MAXMSGSIZE, MAX_INPUT_FRAME)
        self.stdout_sock = ctx.socket(zmq.PUB)
        self.stdout_sock.setsockopt(zmq.LINGER, 0)
        curve.make_server(self.stdin_sock, keys)
        curve.make_server(self.stdout_sock, keys)
        self.stdin_port = self.stdin_sock.bind_to_random_port(f"tcp://{bind_host}")
        self.stdout_port = self.stdout_sock.bind_to_random_port(f"tcp://{bind_host}")
        self._stdout_sync: zmq.Socket[bytes] = zmq.Socket.shadow(self.stdout_sock.underlying)
        self.proc: subprocess.Popen | None = None
        self.master: int | None = None
        self._task = asyncio.create_task(self._stdin_loop(), name=f"pty-{kernel.id}")

    async def _stdin_loop(self) -> None:
        while True:
            frames = await self.stdin_sock.recv_multipart()
            data = b"".join(frames)
            if not data:
                continue
            self.kernel.touch()
            try:
                if self.master is None:
                    self._start()
                self._write(data)
            except Exception:
                log.exception("kernel %s: terminal input failed", self.kernel.id)

    def _write(self, data: bytes) -> None:
        assert self.master is not None
        view = memoryview(data)
        while view:
            try:
                written = os.write(self.master, view)
            except BlockingIOError:
                log.debug("kernel %s: terminal input dropped (terminal not reading)",
                          self.kernel.id)
                return
            view = view[written:]

    def session_id(self) -> int | None:
        """The terminal's session (its processes), while one runs."""
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def _command(self) -> list[str]:
        kernel = self.kernel
        command = list(kernel.lang.interactive) or ["/bin/sh"]
        runner = kernel.runner
        iso = kernel.isolation
        target = runner.init_pid or runner.pid  # PID 1: the kernel process is not dumpable
        if not (iso.namespaces or iso.uid_switch) or not target:
            return command
        wrapper = ["nsenter", "-t", str(target)]
        wrapper += [NSENTER_FLAGS[name] for name in iso.namespaces]
        if iso.uid_switch:
            wrapper += ["-S", str(kernel.uid), "-G", str(kernel.uid)]
        elif iso.userns:  # already the namespace's only user; it may not set groups
            wrapper.append("--preserve-credentials")
        wrapper.append("--")
        if iso.userns and shutil.which("setpriv"):  # uid 0 of the namespace, but no powers
            wrapper += ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--"]
        return wrapper + [*IN_HOME, *command]

    def _start(self) -> None:
        master, slave = os.openpty()
        self._set_size(slave)
        limits = self.kernel.rlimits()
        cgroup_procs = list(self.kernel.sandbox.cgroup.procs_files
                            if self.kernel.sandbox.cgroup is not None else [])
        libc = ctypes.CDLL(None, use_errno=True)

        def prepare_child() -> None:  # runs in the child between fork and exec
            for procs in cgroup_procs:  # first: all it starts is the kernel's
                with open(procs, "w") as fh:
                    fh.write(str(os.getpid()))
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
            for name, value in limits.items():
                resource.setrlimit(RLIMITS[name], (value, value))
            os.umask(0o022)
            libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)

        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": self.kernel.sandbox.home,
               "TERM": "xterm-256color", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
               "USER": "work", "LOGNAME": "work"}
        try:
            self.proc = subprocess.Popen(
                self._command(), stdin=slave, stdout=slave, stderr=slave,
                cwd=str(self.kernel.workdir), env=env, preexec_fn=prepare_child,
                close_fds=True)
        finally:
            os.close(slave)
        os.set_blocking(master, False)
        self.master = master
        asyncio.get_running_loop().add_reader(master, self._on_output)
        log.debug("kernel %s: terminal started (pid %s)", self.kernel.id, self.proc.pid)

    def _on_output(self) -> None:
        assert self.master is not None
        try:
            data = os.read(self.master, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._stop_terminal()
            return
        try:
            self._stdout_sync.send(data, flags=zmq.NOBLOCK)
        except zmq.Again:
            pass

    def _set_size(self, fd: int) -> None:
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", self.rows, self.cols, 0, 0))

    def resize(self, rows: int, cols: int) -> None:
        self.rows, self.cols = rows, cols
        if self.master is not None:
            self._set_size(self.master)
            if self.proc is not None and self.proc.poll() is None:
                try:
                    os.killpg(self.proc.pid, signal.SIGWINCH)
                except OSError:
                    pass

    def _stop_terminal(self) -> None:
        if self.master is not None:
            asyncio.get_running_loop().remove_reader(self.master)
            os.close(self.master)
            self.master = None
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except OSError:
                    pass
            asyncio.get_running_loop().create_task(wait_process(proc, 5.0))

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        proc = self.proc
        self._stop_terminal()
        if proc is not None:
            await wait_process(proc, 5.0)
        self.stdin_sock.close(linger=0)
        self.stdout_sock.close(linger=0)
