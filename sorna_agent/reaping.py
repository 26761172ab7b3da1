"""Waiting for processes without blocking the event loop (pidfds), and reaping them.

A leaf module: the runner processes (`process.py`), the fork servers
(`zygote.py`) and the terminals (`pty.py`) all import it, and it imports
nothing of theirs.
"""
from __future__ import annotations

import asyncio
import logging
import os
import select
import subprocess

log = logging.getLogger(__name__)


def pidfd_exited(pidfd: int) -> bool:
    """True when the process behind `pidfd` has exited (a pidfd polls readable then)."""
    return bool(select.select([pidfd], [], [], 0)[0])


async def wait_pidfd(pidfd: int, timeout: float = 10.0) -> None:
    """Wait until the process behind `pidfd` has exited (it need not be our child)."""
    if pidfd_exited(pidfd):
        return
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def on_readable() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_reader(pidfd, on_readable)
    try:
        await asyncio.wait_for(done, timeout)
    except TimeoutError:
        log.warning("a process did not exit within %.0f s", timeout)
    finally:
        loop.remove_reader(pidfd)


async def wait_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int | None:
    """Wait for a child without blocking the loop (pidfd) and reap it."""
    if proc.poll() is not None:
        return proc.returncode
    try:
        fd = os.pidfd_open(proc.pid)
    except (OSError, AttributeError):
        return await asyncio.get_running_loop().run_in_executor(None, proc.wait)
    try:
        await wait_pidfd(fd, timeout)
    finally:
        os.close(fd)
    return proc.poll()
