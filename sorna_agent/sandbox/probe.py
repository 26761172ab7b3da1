"""What isolation this host gives kernels, probed once at start.

An agent running as root gives each kernel its own unprivileged uid; one that
is not root confines kernels in a user namespace instead, where the host
allows it.  Each namespace is tried in a throw-away child (mount namespaces
by mounting a tmpfs in one, PID namespaces by mounting a fresh /proc), so a
host that refuses one (seccomp, AppArmor, a locked-down container) is seen
at start and said in the log and in `info.isolation`.
"""
from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass, field

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_REC = 16384
MS_PRIVATE = 1 << 18

UID_PER_KERNEL = "uid-per-kernel"
USER_NAMESPACE = "user-namespace"
AGENT_USER = "agent-user"


@dataclass(frozen=True)
class Isolation:
    """What every kernel of this agent gets."""

    identity: str = AGENT_USER               # UID_PER_KERNEL, USER_NAMESPACE or AGENT_USER
    namespaces: tuple[str, ...] = ()         # of "user", "mnt", "pid", "net", "ipc", "uts"
    cgroups: str | None = None               # "v1" or "v2" when kernels get their own cgroup
    disk_quota: bool = False                 # working folders are size-limited tmpfs
    uid_range: tuple[int, int] | None = None  # first and last kernel uid (UID_PER_KERNEL)
    refused: tuple[str, ...] = field(default=())  # what the host refused, and why

    @property
    def uid_switch(self) -> bool:
        return self.identity == UID_PER_KERNEL

    @property
    def userns(self) -> bool:
        return "user" in self.namespaces

    @property
    def mount_ns(self) -> bool:
        return "mnt" in self.namespaces

    @property
    def pid_ns(self) -> bool:
        return "pid" in self.namespaces

    @property
    def net_ns(self) -> bool:
        return "net" in self.namespaces

    def protections_off(self) -> list[str]:
        """Plain words for each protection kernels do not get here."""
        off = []
        if not self.mount_ns:
            off.append("private filesystem view (kernels see the host's files)")
        if not (self.pid_ns and self.mount_ns):  # a fresh /proc needs both
            off.append("own process view (kernels see the host's processes)")
        if not self.net_ns:
            off.append("network isolation (kernels reach the host's network)")
        if self.identity == AGENT_USER:
            off.append("own user per kernel (kernels run as the agent's user)")
        elif self.identity == USER_NAMESPACE:
            off.append("own uid per kernel (a user namespace confines them instead)")
        if self.cgroups is None:
            off.append("cgroup limits (memory, processes and CPU are limited per process only)")
        if not self.disk_quota:
            off.append("disk quota on the working folder (only a per-file size limit)")
        return off

    def as_info(self) -> dict[str, object]:
        return {
            "user": self.identity,
            "mount_namespace": self.mount_ns,
            "pid_namespace": self.pid_ns,
            "net_namespace": self.net_ns,
            "ipc_namespace": "ipc" in self.namespaces,
            "user_namespace": self.userns,
            "cgroups": self.cgroups is not None,
            "cgroup_version": self.cgroups,
            "limits": "cgroups+rlimits" if self.cgroups else "rlimits",
            "rlimits": ["address-space", "cpu-time", "processes", "file-size"],
            "disk_quota": "tmpfs" if self.disk_quota else None,
            "uid_range": list(self.uid_range) if self.uid_range else None,
            "protections_off": self.protections_off(),
            "refused": list(self.refused),
        }

    def describe(self) -> str:
        parts = [{UID_PER_KERNEL: "a distinct unprivileged uid per kernel",
                  USER_NAMESPACE: "a user namespace per kernel (the agent is not root)",
                  AGENT_USER: "the agent's own user"}[self.identity]]
        if self.namespaces:
            parts.append("namespaces " + ", ".join(self.namespaces))
        parts.append(f"cgroup {self.cgroups} limits" if self.cgroups else "no cgroups")
        if self.disk_quota:
            parts.append("tmpfs disk quota")
        off = self.protections_off()
        if off:
            parts.append("OFF: " + "; ".join(off))
        return "; ".join(parts)


NAMESPACE_FLAGS = {"mnt": CLONE_NEWNS, "pid": CLONE_NEWPID, "net": CLONE_NEWNET,
                   "ipc": CLONE_NEWIPC, "uts": CLONE_NEWUTS}


def _child_tries(flags: int, userns: bool, check: str) -> None:  # pragma: no cover - child
    """In a forked child: unshare `flags` and do what `check` names; exit 0 on success."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(flags) != 0:
            os._exit(1)
        if userns:
            uid, gid = os.geteuid(), os.getegid()
            with open("/proc/self/setgroups", "w") as fh:
                fh.write("deny")
            with open("/proc/self/uid_map", "w") as fh:
                fh.write(f"0 {uid} 1")
            with open("/proc/self/gid_map", "w") as fh:
                fh.write(f"0 {gid} 1")
        if check == "mount":
            if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0 or \
                    libc.mount(b"tmpfs", b"/tmp", b"tmpfs", 0, b"size=64k") != 0:
                os._exit(3)
        elif check == "proc":
            pid = os.fork()
            if pid == 0:
                ok = libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) == 0 and \
                    libc.mount(b"proc", b"/proc", b"proc", 0, None) == 0
                os._exit(0 if ok else 4)
            _, status = os.waitpid(pid, 0)
            os._exit(os.waitstatus_to_exitcode(status))
        os._exit(0)
    except BaseException:
        os._exit(2)


def _works(flags: int, userns: bool, check: str = "") -> bool:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        _child_tries(flags, userns, check)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def probe_namespaces(*, mount_wanted: bool = True) -> tuple[str, tuple[str, ...], list[str]]:
    """(identity, namespaces kernels can get, what was refused).  Forks a few children."""
    refused: list[str] = []
    root = os.geteuid() == 0
    base = 0
    userns = False
    if root:
        identity = UID_PER_KERNEL
    elif _works(CLONE_NEWUSER, True):
        identity, base, userns = USER_NAMESPACE, CLONE_NEWUSER, True
    else:
        refused.append("user namespaces (needed when the agent is not root)")
        return AGENT_USER, (), refused
    names = ["user"] if userns else []
    for name in ("net", "ipc", "uts"):
        if _works(base | NAMESPACE_FLAGS[name], userns):
            names.append(name)
        else:
            refused.append(f"{name} namespaces")
    if _works(base | CLONE_NEWNS | CLONE_NEWPID, userns, "proc"):
        names.append("pid")
        if not mount_wanted:
            refused.append("mount namespaces (turned off by agent_mount_namespace)")
        elif _works(base | CLONE_NEWNS, userns, "mount"):
            names.append("mnt")
        else:
            refused.append("mount namespaces (unshare or tmpfs mounts refused)")
    else:
        refused.append("PID namespaces with a fresh /proc (so no mount namespace either)")
    return identity, tuple(names), refused
