"""A kernel as the agent keeps it: its runner process, limits, terminal, usage."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .languages import Language
from .process import RunnerProcess
from .sandbox.host import Sandbox
from .sandbox.probe import Isolation
from .stats import KernelUsage

if TYPE_CHECKING:
    from .pty import PtySession


@dataclass
class KernelLimits:
    exec_timeout: float
    max_mem: int
    idle_timeout: float
    max_output: int
    cpu_time: int
    max_procs: int
    max_file_size: int

    def public(self) -> dict[str, float | int]:
        return {"exec_timeout": self.exec_timeout, "max_mem": self.max_mem,
                "idle_timeout": self.idle_timeout}


@dataclass
class Kernel:
    id: str
    lang: Language
    limits: KernelLimits
    isolation: Isolation
    runner: RunnerProcess
    created_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)
    pty: PtySession | None = None
    usage: KernelUsage = field(default_factory=KernelUsage)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    available: asyncio.Event = field(default_factory=asyncio.Event)
    waiting_input: bool = False
    batch_built: bool = False
    busy: int = 0
    closing: bool = False
    restarting: bool = False

    def __post_init__(self) -> None:
        self.available.set()

    @property
    def sandbox(self) -> Sandbox:
        return self.runner.sandbox

    @property
    def uid(self) -> int | None:
        return self.runner.uid

    @property
    def workdir(self) -> Path:
        return self.runner.workdir

    def touch(self) -> None:
        self.last_used = time.monotonic()

    def idle_for(self) -> float:
        return 0.0 if self.busy else time.monotonic() - self.last_used

    def rlimits(self) -> dict[str, int]:
        return rlimits_for(self.limits, self.isolation)

    def root_pids(self) -> list[int]:
        pids = [pid for pid in (self.runner.pid,) if pid]
        if self.pty is not None and self.pty.proc is not None:
            pids.append(self.pty.proc.pid)
        return pids


def rlimits_for(limits: KernelLimits, isolation: Isolation) -> dict[str, int]:
    values = {"as": limits.max_mem, "cpu": limits.cpu_time, "fsize": limits.max_file_size,
              "core": 0}
    if isolation.uid_switch:  # RLIMIT_NPROC counts per uid: only meaningful with our own uid
        values["nproc"] = limits.max_procs
    return values
