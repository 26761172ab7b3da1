"""Kernel working folders: the scratch folder, one folder per kernel sandbox (a
size-limited tmpfs where the agent can mount one), and uploads that never
follow a symlink.

The scratch folder is the agent's own (0700, or 0711 when kernels without a
mount namespace must reach their folders through it; they still cannot list
it), outside the data directory: `agent_scratch_dir`, or a fresh folder
`sorna-agent-*` in the system's temporary folder.  A scratch folder left by an
agent that died is removed at the next start.

Disk quota: when the agent runs as root it first moves into a mount namespace
of its own (private mounts, host mounts still propagate in), and mounts each
kernel's folder as a tmpfs of `agent_disk_quota` bytes there: the host's mount
table never sees them and they vanish with the agent.
"""
from __future__ import annotations

import ctypes
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path

log = logging.getLogger(__name__)

CLONE_NEWNS = 0x00020000
MS_NOSUID = 2
MS_NODEV = 4
MS_REC = 16384
MS_SLAVE = 1 << 19
MNT_DETACH = 2
SCRATCH_PREFIX = "sorna-agent-"
OWNER_FILE = ".agent-pid"
STAGE = ".rootfs"  # empty mount point where each kernel builds its root (in its own ns)


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def enter_private_mount_namespace() -> bool:
    """Give the agent a mount namespace of its own (root only, before any thread starts)."""
    if os.geteuid() != 0:
        return False
    if threading.active_count() > 1 or len(os.listdir("/proc/self/task")) > 1:
        log.warning("the agent already runs threads: no private mount namespace, no disk quota")
        return False
    libc = _libc()
    if libc.unshare(CLONE_NEWNS) != 0:
        return False
    if libc.mount(None, b"/", None, MS_REC | MS_SLAVE, None) != 0:
        log.warning("cannot make the agent's mounts private: %s",
                    os.strerror(ctypes.get_errno()))
        return False
    return True


def prepare_scratch(configured: Path | None, instance_id: str, reachable: bool) -> Path:
    """A fresh scratch folder of this agent; `reachable`: kernels need o+x on it."""
    parent = configured if configured is not None else Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale_scratch(parent)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in instance_id)[:40]
    scratch = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{safe}-", dir=parent))
    scratch.chmod(0o711 if reachable else 0o700)
    (scratch / OWNER_FILE).write_text(str(os.getpid()))
    (scratch / STAGE).mkdir(mode=0o700)
    return scratch


def remove_stale_scratch(parent: Path) -> None:
    """Remove scratch folders left by agents that were killed."""
    for folder in parent.glob(f"{SCRATCH_PREFIX}*"):
        try:
            owner = int((folder / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        if not os.path.exists(f"/proc/{owner}"):
            shutil.rmtree(folder, ignore_errors=True)


def make_workdir(path: Path, uid: int | None, quota: int | None) -> Path:
    """The kernel's folder: owned by its uid, a tmpfs of `quota` bytes when given."""
    path.mkdir(mode=0o700)
    if quota:
        options = f"size={quota},mode=0700"
        if uid is not None:
            options += f",uid={uid},gid={uid}"
        if _libc().mount(b"tmpfs", os.fsencode(path), b"tmpfs", MS_NOSUID | MS_NODEV,
                         options.encode()) != 0:
            errno = ctypes.get_errno()
            path.rmdir()
            raise OSError(errno, f"cannot mount the kernel's folder: {os.strerror(errno)}")
    elif uid is not None:
        os.chown(path, uid, uid)
    return path


def remove_workdir(path: Path, mounted: bool = False) -> None:
    """Blocking: use a thread."""
    if mounted:
        _libc().umount2(os.fsencode(path), MNT_DETACH)
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
