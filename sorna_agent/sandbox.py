"""What isolation this host gives kernels, and the per-kernel uid and folder.

Probed once at start: running as root means each kernel process gets its own
unprivileged uid (no passwd entry needed) and, if `unshare` works here, its own
network and PID namespaces.  Limits are rlimits (address space, CPU time,
processes per uid, file size); cgroups are not used.
"""
from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import zlib
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CLONE_NEWNET = 0x40000000
CLONE_NEWPID = 0x20000000
UID_BASE = 1_000_000
UID_BLOCK = 4096


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


def make_workdir(scratch: Path, name: str, uid: int | None) -> Path:
    path = scratch / name
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if uid is not None:
        os.chown(path, uid, uid)
    return path


def remove_workdir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def safe_upload_path(workdir: Path, name: str) -> Path | None:
    """Resolve an upload name inside `workdir`; None for escapes and odd names."""
    if not name or "\x00" in name or name.startswith("/") or "\\" in name:
        return None
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return None
    target = workdir.joinpath(*parts)
    try:
        target.resolve(strict=False).relative_to(workdir.resolve())
    except ValueError:
        return None
    return target


def write_upload(workdir: Path, name: str, data: bytes, uid: int | None, max_size: int) -> int:
    """Write an uploaded file below `workdir` without following any symlink the
    kernel may have planted; directories are created as needed. Blocking."""
    target = safe_upload_path(workdir, name)
    if target is None:
        raise ValueError(f"refused file name {name!r}")
    if len(data) > max_size:
        raise ValueError(f"file of {len(data)} bytes exceeds the limit of {max_size}")
    parts = name.split("/")
    dir_fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts[:-1]:
            try:
                os.mkdir(part, 0o755, dir_fd=dir_fd)
                if uid is not None:
                    os.chown(part, uid, uid, dir_fd=dir_fd, follow_symlinks=False)
            except FileExistsError:
                pass
            next_fd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
            os.close(dir_fd)
            dir_fd = next_fd
        fd = os.open(parts[-1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644,
                     dir_fd=dir_fd)
        try:
            if uid is not None:
                os.fchown(fd, uid, uid)
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
        finally:
            os.close(fd)
    finally:
        os.close(dir_fd)
    return len(data)
