"""Per-kernel resource figures: the STATS_FIELDS map.

With cgroups the figures are the cgroup's own counters: CPU time of every
process the kernel ever ran (exact, in ms), the peak of memory charged to it
(its tmpfs files included) and its storage I/O.  Without cgroups they are
sampled from the live process tree (processes that ended between two samples
are missed).  Network bytes come from the kernel's network namespace.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import psutil

from sorna_server.agent_protocol import STATS_FIELDS

from .sandbox.cgroups import KernelCgroup

COUNTERS = ("cpu_used", "io_read_bytes", "io_write_bytes", "net_rx_bytes", "net_tx_bytes")


@dataclass
class KernelUsage:
    """Accumulates what a kernel used, across restarts of its process."""

    cpu_ms_done: float = 0.0        # CPU of processes that already ended (earlier runs)
    mem_max_bytes: int = 0
    io_read_done: int = 0
    io_write_done: int = 0
    last: dict[str, Any] = field(default_factory=lambda: dict.fromkeys(STATS_FIELDS, 0))

    def close_run(self) -> None:
        """The kernel process is about to be replaced: keep what it used (sampled mode)."""
        self.cpu_ms_done = float(self.last["cpu_used"])
        self.io_read_done = int(self.last["io_read_bytes"])
        self.io_write_done = int(self.last["io_write_bytes"])


def _tree(root_pids: list[int]) -> list[psutil.Process]:
    procs: list[psutil.Process] = []
    for pid in root_pids:
        try:
            root = psutil.Process(pid)
            procs.append(root)
            procs.extend(root.children(recursive=True))
        except psutil.Error:
            continue
    return procs


def _net_bytes(pid: int) -> tuple[int, int]:
    """Bytes received/sent by the network namespace of `pid` (all interfaces)."""
    rx = tx = 0
    try:
        with open(f"/proc/{pid}/net/dev") as fh:
            for line in fh.readlines()[2:]:
                _, _, rest = line.partition(":")
                cols = rest.split()
                if len(cols) >= 9:
                    rx += int(cols[0])
                    tx += int(cols[8])
    except (OSError, ValueError):
        pass
    return rx, tx


def _sampled(usage: KernelUsage, root_pids: list[int]) -> tuple[float, int, int, int]:
    cpu = 0.0
    rss = 0
    io_read = io_write = 0
    for proc in _tree(root_pids):
        try:
            with proc.oneshot():
                times = proc.cpu_times()
                cpu += times.user + times.system + times.children_user + times.children_system
                rss += proc.memory_info().rss
                try:
                    io = proc.io_counters()
                    io_read += io.read_bytes
                    io_write += io.write_bytes
                except (psutil.AccessDenied, AttributeError):
                    pass
        except psutil.Error:
            continue
    return (usage.cpu_ms_done + cpu * 1000, rss, usage.io_read_done + io_read,
            usage.io_write_done + io_write)


def measure(usage: KernelUsage, root_pids: list[int], cgroup: KernelCgroup | None,
            own_netns: bool) -> dict[str, Any]:
    """Update `usage` and return the stats map.  Blocking (a few file reads)."""
    if cgroup is not None:
        figures = cgroup.usage()
        cpu_ms: float = figures.cpu_ms
        mem, io_read, io_write = figures.mem_peak, figures.io_read, figures.io_write
    else:
        cpu_ms, mem, io_read, io_write = _sampled(usage, root_pids)
    usage.mem_max_bytes = max(usage.mem_max_bytes, mem)
    rx, tx = _net_bytes(root_pids[0]) if (own_netns and root_pids) else (0, 0)
    stats = {
        "cpu_used": int(cpu_ms),
        "mem_max_bytes": int(usage.mem_max_bytes),
        "io_read_bytes": int(io_read),
        "io_write_bytes": int(io_write),
        "net_rx_bytes": int(rx),
        "net_tx_bytes": int(tx),
    }
    # Counters never go backwards, even if a child ended between two readings.
    for name in COUNTERS:
        stats[name] = max(stats[name], int(usage.last.get(name, 0)))
    usage.last = stats
    return dict(stats)
