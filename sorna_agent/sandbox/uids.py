"""Kernel uids: distinct unprivileged uids for the kernels of one agent."""
from __future__ import annotations

import os
import signal
import zlib

UID_BASE = 1_000_000
UID_BLOCK = 4096


class UidPool:
    """Hands out distinct uids from a block chosen by the instance id."""

    def __init__(self, instance_id: str, size: int):
        block = zlib.crc32(instance_id.encode()) % 100_000
        self.base = UID_BASE + block * UID_BLOCK
        self.size = min(size, UID_BLOCK)
        self.free = list(range(self.base, self.base + self.size))
        self.used: set[int] = set()

    def take(self) -> int:
        if not self.free:
            raise RuntimeError("no free kernel uid")
        uid = self.free.pop(0)
        self.used.add(uid)
        return uid

    def give_back(self, uid: int) -> None:
        if uid in self.used:
            self.used.discard(uid)
            self.free.append(uid)


def kill_uid(uid: int, rounds: int = 5) -> None:
    """SIGKILL every process owned by `uid` (fork bombs included). Blocking; use a thread."""
    import psutil
    for _ in range(rounds):
        victims = []
        for proc in psutil.process_iter(["uids"]):
            uids = proc.info.get("uids")
            if uids is not None and uids.real == uid:
                victims.append(proc.pid)
        if not victims:
            return
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
