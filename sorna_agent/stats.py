"""Per-kernel resource figures from /proc (psutil): the STATS_FIELDS map."""
from __future__ import annotations

from dataclasses import dataclass, field

import psutil

from sorna_server.agent_protocol import STATS_FIELDS


@dataclass
class KernelUsage:
    """Accumulates what a kernel used, across restarts of its process."""

    cpu_ms_done: float = 0.0        # CPU of processes that already ended (earlier runs)
    mem_max_bytes: int = 0
    io_read_done: int = 0
    io_write_done: int = 0
    last: dict = field(default_factory=lambda: dict.fromkeys(STATS_FIELDS, 0))

    def close_run(self) -> None:
        """The kernel process is about to be replaced: keep what it used."""
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


def measure(usage: KernelUsage, root_pids: list[int], own_netns: bool) -> dict:
    """Update `usage` from the live process tree and return the stats map. Blocking."""
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
    usage.mem_max_bytes = max(usage.mem_max_bytes, rss)
    rx, tx = _net_bytes(root_pids[0]) if (own_netns and root_pids) else (0, 0)
    stats = {
        "cpu_used": int(usage.cpu_ms_done + cpu * 1000),
        "mem_max_bytes": int(usage.mem_max_bytes),
        "io_read_bytes": int(usage.io_read_done + io_read),
        "io_write_bytes": int(usage.io_write_done + io_write),
        "net_rx_bytes": int(rx),
        "net_tx_bytes": int(tx),
    }
    # Counters never go backwards, even if a child ended between two readings.
    for name in ("cpu_used", "io_read_bytes", "io_write_bytes", "net_rx_bytes", "net_tx_bytes"):
        stats[name] = max(stats[name], int(usage.last.get(name, 0)))
    usage.last = stats
    return dict(stats)
