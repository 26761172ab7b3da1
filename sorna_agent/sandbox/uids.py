"""Kernel uids: a random block per agent, claimed host-wide, never reused while in use.

The block (`agent_uid_block_size` uids, aligned inside `agent_uid_min`..`agent_uid_max`)
is chosen at random the first time and recorded in the agent's state file in
the data directory, so a restart keeps it.  While the agent runs it holds an
exclusive lock on `<agent_runtime_dir>/uid-block-<first uid>.lock`; another
agent on this host that finds its recorded block locked picks a new one, so
two live agents never share a uid.  A lock file is removed by the agent that
holds it (when it stops, or at start for those of agents that died).

Inside the block uids are handed out round-robin, so a uid comes back only
after every other uid of the block has been used.  A uid is given back only
once nothing of it remains: its processes are gone (the agent checks) and,
when kernels have no private filesystem view, its files in the host's shared
writable folders are removed first; a uid whose leftovers cannot be removed is
kept out of use.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import secrets
import signal
import stat
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SHARED_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm")  # where a kernel without a mount ns can write


class UidBlockError(Exception):
    pass


@dataclass
class UidBlock:
    base: int
    size: int
    lock_fd: int | None = None
    lock_path: Path | None = None

    def release(self) -> None:
        """Give the block up: its lock file goes while we still hold the lock (see _lock)."""
        if self.lock_fd is not None:
            if self.lock_path is not None:
                self.lock_path.unlink(missing_ok=True)
            os.close(self.lock_fd)
            self.lock_fd = None


def state_file(data_dir: Path, instance_id: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", instance_id)[:100]
    return data_dir / f"agent-{safe}.json"


def lock_path(runtime_dir: Path, base: int) -> Path:
    return runtime_dir / f"uid-block-{base}.lock"


def _lock(runtime_dir: Path, base: int) -> int | None:
    """Lock the block host-wide; the fd holds the lock, None if another agent holds it.

    The holder removes the file when it gives the block up, so a lock is ours only if
    the file we locked is still the one at that path (else it was just removed: retry)."""
    path = lock_path(runtime_dir, base)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            if os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _prepare_runtime_dir(runtime_dir: Path) -> None:
    runtime_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = os.lstat(runtime_dir)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
        raise UidBlockError(f"{runtime_dir} must be a folder of the agent's user that others "
                            "cannot write")


def remove_stale_locks(runtime_dir: Path) -> None:
    """Lock files left by agents that died: locked by nobody, so ours to remove."""
    for path in runtime_dir.glob("uid-block-*.lock"):
        try:
            base = int(path.name[len("uid-block-"):-len(".lock")])
        except ValueError:
            continue
        fd = _lock(runtime_dir, base)
        if fd is not None:
            UidBlock(base, 0, fd, path).release()


def claim_block(state: Path, runtime_dir: Path, uid_min: int, uid_max: int,
                size: int) -> UidBlock:
    """The agent's uid block: the recorded one if it is free, else a new random one."""
    _prepare_runtime_dir(runtime_dir)
    remove_stale_locks(runtime_dir)
    count = (uid_max - uid_min + 1) // size
    if count < 1:
        raise UidBlockError("agent_uid_min..agent_uid_max holds no whole uid block")
    recorded: dict[str, int] = {}
    try:
        recorded = json.loads(state.read_text())
    except (OSError, ValueError):
        pass
    base = recorded.get("uid_base")
    if isinstance(base, int) and recorded.get("uid_block_size") == size \
            and uid_min <= base <= uid_max - size + 1:
        fd = _lock(runtime_dir, base)
        if fd is not None:
            return UidBlock(base, size, fd, lock_path(runtime_dir, base))
        log.warning("uid block %d of this agent's state is used by another agent on this "
                    "host: choosing another", base)
    for _ in range(64):
        base = uid_min + secrets.randbelow(count) * size
        fd = _lock(runtime_dir, base)
        if fd is not None:
            state.write_text(json.dumps({"uid_base": base, "uid_block_size": size}))
            return UidBlock(base, size, fd, lock_path(runtime_dir, base))
    raise UidBlockError("no free uid block found (too many agents for agent_uid_min..max?)")


class UidPool:
    """Hands out the block's uids round-robin; a uid comes back only when clean."""

    def __init__(self, base: int, size: int):
        self.base = base
        self.size = size
        self.cursor = 0
        self.in_use: set[int] = set()
        self.dirty: set[int] = set()

    def take(self) -> int:
        for _ in range(self.size):
            uid = self.base + self.cursor
            self.cursor = (self.cursor + 1) % self.size
            if uid not in self.in_use and uid not in self.dirty:
                self.in_use.add(uid)
                return uid
        raise RuntimeError(f"no free kernel uid in the block {self.base}+{self.size} "
                           f"({len(self.dirty)} kept out of use for leftovers)")

    def give_back(self, uid: int, clean: bool) -> None:
        self.in_use.discard(uid)
        if not clean:
            log.warning("uid %d keeps leftovers: it stays out of use", uid)
            self.dirty.add(uid)


def processes_of(uid: int) -> list[int]:
    """Processes whose real uid is `uid` (from their status: /proc/PID of a process that
    is not dumpable, as a kernel is, belongs to root).  Blocking."""
    pids = []
    wanted = str(uid)
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as fh:
                for line in fh:
                    if line.startswith("Uid:"):
                        if line.split()[1] == wanted:
                            pids.append(int(name))
                        break
        except OSError:
            continue
    return pids


def kill_uid(uid: int, rounds: int = 5) -> bool:
    """SIGKILL every process owned by `uid` (fork bombs included); True when none is left.
    Blocking: use a thread."""
    for _ in range(rounds):
        victims = processes_of(uid)
        if not victims:
            return True
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    return not processes_of(uid)


def remove_files_of(uid: int, folders: tuple[str, ...] = SHARED_WRITABLE) -> bool:
    """Delete what `uid` left in the host's shared writable folders; True when nothing is
    left.  Never follows symlinks.  Blocking: use a thread."""
    clean = True
    for top in folders:
        for dirpath, dirnames, filenames in os.walk(top, topdown=False):
            for name in filenames + dirnames:
                path = os.path.join(dirpath, name)
                try:
                    info = os.lstat(path)
                    if info.st_uid != uid:
                        continue
                    if stat.S_ISDIR(info.st_mode):
                        os.rmdir(path)
                    else:
                        os.unlink(path)
                except FileNotFoundError:
                    continue
                except OSError:
                    clean = False
    return clean
