"""What isolation this host gives kernels, probed once at start.

Running as root means each kernel process gets its own unprivileged uid (no
passwd entry needed) and, if `unshare` works here, its own network and PID
namespaces.  Limits are rlimits (address space, CPU time, processes per uid,
file size); cgroups are not used.
"""
from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

CLONE_NEWNET = 0x40000000
CLONE_NEWPID = 0x20000000


@dataclass(frozen=True)
class Isolation:
    uid_switch: bool
    net_ns: bool
    pid_ns: bool

    def as_info(self) -> dict:
        return {
            "user": "uid-per-kernel" if self.uid_switch else "agent-user",
            "net_namespace": self.net_ns,
            "pid_namespace": self.pid_ns,
            "limits": "rlimits",
            "rlimits": ["address-space", "cpu-time", "processes", "file-size"],
            "cgroups": False,
        }

    def describe(self) -> str:
        parts = ["a distinct unprivileged uid per kernel" if self.uid_switch
                 else "the agent's own uid (not root: no uid switch)"]
        parts.append("own network namespace" if self.net_ns else "host network (no netns)")
        parts.append("own PID namespace" if self.pid_ns else "host PID namespace (no pidns)")
        parts.append("rlimits for memory, CPU time, processes, file size (no cgroups)")
        return "; ".join(parts)


def _probe_unshare(flags: int) -> bool:
    """Try unshare(flags) in a throw-away child; True if the host allows it."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            os._exit(0 if libc.unshare(flags) == 0 else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def probe_isolation(want: bool = True) -> Isolation:
    if not want:
        return Isolation(False, False, False)
    root = os.geteuid() == 0
    return Isolation(
        uid_switch=root,
        net_ns=root and _probe_unshare(CLONE_NEWNET),
        pid_ns=root and _probe_unshare(CLONE_NEWPID),
    )
