"""One cgroup per kernel, on cgroup v2 or v1, whichever this host offers.

The agent makes a parent cgroup of its own (`sorna-agent-<pid>`) below its own
cgroup, or below `agent_cgroup_root`, and one child per kernel sandbox.  The
runner joins it before it unshares anything, so every process of the kernel
(its PTY included) is counted: memory (swap included), number of processes,
a CPU quota and an equal CPU weight.  The usage figures (CPU time, peak
memory, storage I/O, OOM kills) are read from it.

v2: one hierarchy; the agent moves itself into a leaf (`sorna-agent-<pid>/agent`)
so that the parent may hand memory, pids, cpu and io to the kernels' cgroups
(the "no internal processes" rule).  v1: one folder per hierarchy, in those of
memory, pids, cpu, cpuacct and blkio that are mounted (memory and pids are
required).  Everything here is small blocking file I/O on cgroupfs.
"""
from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
V1_CONTROLLERS = ("memory", "pids", "cpu", "cpuacct", "blkio")
V1_REQUIRED = ("memory", "pids")
V2_REQUIRED = ("memory", "pids")
V2_WANTED = ("memory", "pids", "cpu", "io")
CPU_PERIOD_US = 100_000
PARENT_PREFIX = "sorna-agent-"


class CgroupError(Exception):
    """Cgroups cannot be used here (the message says why)."""


@dataclass(frozen=True)
class Usage:
    cpu_ms: int = 0
    mem_peak: int = 0
    io_read: int = 0
    io_write: int = 0


def _read(path: Path) -> str:
    with open(path) as fh:
        return fh.read()


def _write(path: Path, value: str) -> None:
    with open(path, "w") as fh:
        fh.write(value)


def _read_int(path: Path, default: int = 0) -> int:
    try:
        return int(_read(path).split()[0])
    except (OSError, ValueError, IndexError):
        return default


def _keyed(path: Path, key: str) -> int:
    """The value of `key` in a flat keyed file (memory.events, cpu.stat, oom_control)."""
    try:
        for line in _read(path).splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _pids(procs: Path) -> list[int]:
    """The pids in a cgroup.procs file (opened afresh: v1 caches the list per open file)."""
    try:
        fd = os.open(procs, os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = os.read(fd, 1 << 20)
        finally:
            os.close(fd)
        return [int(line) for line in data.split()]
    except (OSError, ValueError):
        return []


def _keyed_fd(fd: int, key: bytes) -> int:
    """Like `_keyed`, from a kept-open file (one pread: this runs after every execute)."""
    try:
        for line in os.pread(fd, 4096, 0).splitlines():
            name, _, value = line.partition(b" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def kill_pids(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


class KernelCgroup:
    """The cgroup(s) of one kernel sandbox."""

    version = ""

    def __init__(self, dirs: list[Path], pids_dir: Path):
        self.dirs = dirs
        self.pids_dir = pids_dir             # the folder with pids.current
        self._events_fd: int | None = None  # the file with the OOM-kill counter, kept open
        self._tasks_fd: int | None = None   # pids.current, kept open
        self.memory = -1                    # the memory limit last set

    def _oom_counter(self, path: Path, key: bytes) -> int:
        if self._events_fd is None:
            self._events_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        return _keyed_fd(self._events_fd, key)

    @property
    def procs_files(self) -> list[str]:
        """What a process writes its pid into to join."""
        return [str(d / "cgroup.procs") for d in self.dirs]

    def pids(self) -> list[int]:
        return _pids(self.pids_dir / "cgroup.procs")

    def task_count(self) -> int:
        """Threads of all its processes (one pread: cheaper than listing the processes)."""
        if self._tasks_fd is None:
            self._tasks_fd = os.open(self.pids_dir / "pids.current", os.O_RDONLY | os.O_CLOEXEC)
        try:
            return int(os.pread(self._tasks_fd, 64, 0))
        except (OSError, ValueError):
            return -1

    def set_limits(self, *, memory: int, pids: int, cpus: float) -> None:
        raise NotImplementedError

    def set_memory(self, memory: int) -> None:
        raise NotImplementedError

    def usage(self) -> Usage:
        raise NotImplementedError

    def oom_kills(self) -> int:
        raise NotImplementedError

    def kill_all(self, timeout: float = 5.0) -> bool:
        """SIGKILL every process in it, until it is empty.  Blocking (use a thread)."""
        deadline = time.monotonic() + timeout
        while True:
            pids = self.pids()
            if not pids:
                return True
            kill_pids(pids)
            if time.monotonic() > deadline:
                log.warning("cgroup %s still has processes %s", self.dirs[0], pids[:10])
                return False
            time.sleep(0.01)

    def remove(self, timeout: float = 5.0) -> bool:
        """Remove the (empty) cgroup folders.  Blocking (use a thread)."""
        for fd in (self._events_fd, self._tasks_fd):
            if fd is not None:
                os.close(fd)
        self._events_fd = self._tasks_fd = None
        deadline = time.monotonic() + timeout
        remaining = list(self.dirs)
        while remaining:
            for path in list(remaining):
                try:
                    path.rmdir()
                    remaining.remove(path)
                except FileNotFoundError:
                    remaining.remove(path)
                except OSError:
                    pass
            if remaining:
                if time.monotonic() > deadline:
                    log.warning("cannot remove cgroups %s", remaining)
                    return False
                time.sleep(0.01)
        return True


class KernelCgroupV1(KernelCgroup):
    version = "v1"

    def __init__(self, by_controller: dict[str, Path]):
        super().__init__(list(dict.fromkeys(by_controller.values())), by_controller["pids"])
        self.at = by_controller

    def set_limits(self, *, memory: int, pids: int, cpus: float) -> None:
        self.set_memory(memory)
        _write(self.at["pids"] / "pids.max", str(pids))
        cpu = self.at.get("cpu")
        if cpu is not None:
            _write(cpu / "cpu.cfs_period_us", str(CPU_PERIOD_US))
            _write(cpu / "cpu.cfs_quota_us", str(max(1000, int(cpus * CPU_PERIOD_US))))

    def set_memory(self, memory: int) -> None:
        if memory == self.memory:
            return
        self.memory = memory
        mem = self.at["memory"]
        swap = mem / "memory.memsw.limit_in_bytes"
        current = _read_int(mem / "memory.limit_in_bytes")
        # memory+swap may never be below memory: order the two writes accordingly
        if memory < current:
            _write(mem / "memory.limit_in_bytes", str(memory))
            if swap.exists():
                _write(swap, str(memory))
        else:
            if swap.exists():
                _write(swap, str(memory))
            _write(mem / "memory.limit_in_bytes", str(memory))

    def usage(self) -> Usage:
        cpu_ns = _read_int(self.at["cpuacct"] / "cpuacct.usage") if "cpuacct" in self.at else 0
        io_read = io_write = 0
        blkio = self.at.get("blkio")
        if blkio is not None:
            io_read, io_write = _blkio_bytes(blkio / "blkio.throttle.io_service_bytes_recursive")
        return Usage(cpu_ms=cpu_ns // 1_000_000,
                     mem_peak=_read_int(self.at["memory"] / "memory.max_usage_in_bytes"),
                     io_read=io_read, io_write=io_write)

    def oom_kills(self) -> int:
        return self._oom_counter(self.at["memory"] / "memory.oom_control", b"oom_kill")


def _blkio_bytes(path: Path) -> tuple[int, int]:
    read = write = 0
    try:
        for line in _read(path).splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[1] == "Read":
                read += int(parts[2])
            elif len(parts) == 3 and parts[1] == "Write":
                write += int(parts[2])
    except (OSError, ValueError):
        pass
    return read, write


class KernelCgroupV2(KernelCgroup):
    version = "v2"

    def __init__(self, path: Path):
        super().__init__([path], path)
        self.path = path
        self.peak_seen = 0

    def set_limits(self, *, memory: int, pids: int, cpus: float) -> None:
        self.set_memory(memory)
        _write(self.path / "pids.max", str(pids))
        if (self.path / "cpu.max").exists():
            _write(self.path / "cpu.max", f"{max(1000, int(cpus * CPU_PERIOD_US))} "
                                           f"{CPU_PERIOD_US}")

    def set_memory(self, memory: int) -> None:
        if memory == self.memory:
            return
        self.memory = memory
        _write(self.path / "memory.max", str(memory))
        if (self.path / "memory.swap.max").exists():
            _write(self.path / "memory.swap.max", "0")

    def usage(self) -> Usage:
        peak = self.path / "memory.peak"  # Linux 5.19+; before that, the highest sample
        if peak.exists():
            mem_peak = _read_int(peak)
        else:
            self.peak_seen = max(self.peak_seen, _read_int(self.path / "memory.current"))
            mem_peak = self.peak_seen
        io_read = io_write = 0
        try:
            for line in _read(self.path / "io.stat").splitlines():
                for item in line.split()[1:]:
                    key, _, value = item.partition("=")
                    if key == "rbytes":
                        io_read += int(value)
                    elif key == "wbytes":
                        io_write += int(value)
        except (OSError, ValueError):
            pass
        return Usage(cpu_ms=_keyed(self.path / "cpu.stat", "usage_usec") // 1000,
                     mem_peak=mem_peak, io_read=io_read, io_write=io_write)

    def oom_kills(self) -> int:
        return self._oom_counter(self.path / "memory.events", b"oom_kill")

    def kill_all(self, timeout: float = 5.0) -> bool:
        kill = self.path / "cgroup.kill"  # Linux 5.14+: the kernel kills them all at once
        if kill.exists():
            try:
                _write(kill, "1")
            except OSError:
                pass
        return super().kill_all(timeout)


# --- finding and preparing the hierarchies -------------------------------------------

@dataclass(frozen=True)
class Mount:
    path: Path
    root: str
    version: str
    controllers: frozenset[str]


def _mounts(mountinfo: str) -> list[Mount]:
    found = []
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        options = set(tail[2].split(","))
        controllers = frozenset(c for c in V1_CONTROLLERS if c in options)
        path = Path(fields[4].replace("\\040", " "))
        found.append(Mount(path, fields[3], "v2" if tail[0] == "cgroup2" else "v1", controllers))
    return found


def _own_paths(proc_cgroup: str) -> dict[str, str]:
    """Controller name (or "" for v2) -> our cgroup path in that hierarchy."""
    own: dict[str, str] = {}
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if not controllers:
            own[""] = path
        for controller in controllers.split(","):
            own[controller] = path
    return own


def _inside(mount: Mount, cgroup_path: str, configured: str | None) -> Path:
    """The folder of `cgroup_path` (or of the configured root) in this mount."""
    if configured:
        return mount.path / configured.strip("/")
    rel = cgroup_path
    if mount.root != "/" and rel.startswith(mount.root):
        rel = rel[len(mount.root):]
    return mount.path / rel.strip("/")


class Cgroups:
    """The agent's parent cgroup(s): makes and forgets one cgroup per kernel sandbox."""

    version = ""

    def __init__(self, parents: dict[str, Path]):
        self.parents = parents  # controller ("" for v2) -> our parent folder

    def create(self, name: str) -> KernelCgroup:
        raise NotImplementedError

    def close(self) -> None:
        for path in dict.fromkeys(self.parents.values()):
            _remove_tree(path)


class CgroupsV1(Cgroups):
    version = "v1"

    def create(self, name: str) -> KernelCgroup:
        made: dict[Path, Path] = {}
        by_controller = {}
        for controller, parent in self.parents.items():
            if parent not in made:
                made[parent] = parent / name
                made[parent].mkdir()
            by_controller[controller] = made[parent]
        return KernelCgroupV1(by_controller)


class CgroupsV2(Cgroups):
    version = "v2"

    def create(self, name: str) -> KernelCgroup:
        path = self.parents[""] / name
        path.mkdir()
        return KernelCgroupV2(path)


def detect(mode: str, configured_root: str | None) -> Cgroups:
    """Prepare cgroups as `mode` (auto, v2, v1) says, or raise CgroupError saying why not."""
    mounts = _mounts(_read(Path("/proc/self/mountinfo")))
    own = _own_paths(_read(Path("/proc/self/cgroup")))
    name = f"{PARENT_PREFIX}{os.getpid()}"
    reasons = []
    if mode in ("auto", "v2"):
        try:
            return _prepare_v2(mounts, own, configured_root, name)
        except CgroupError as exc:
            reasons.append(f"v2: {exc}")
    if mode in ("auto", "v1"):
        try:
            return _prepare_v1(mounts, own, configured_root, name)
        except CgroupError as exc:
            reasons.append(f"v1: {exc}")
    raise CgroupError("; ".join(reasons) or f"unknown mode {mode!r}")


def _prepare_v1(mounts: list[Mount], own: dict[str, str], configured: str | None,
                name: str) -> Cgroups:
    parents: dict[str, Path] = {}
    for controller in V1_CONTROLLERS:
        mount = next((m for m in mounts if m.version == "v1" and controller in m.controllers),
                     None)
        if mount is None:
            continue
        base = _inside(mount, own.get(controller, "/"), configured)
        _remove_stale(base)
        parent = base / name
        try:
            parent.mkdir(exist_ok=True)
        except OSError as exc:
            for made in parents.values():
                _remove_tree(made)
            raise CgroupError(f"cannot create {parent}: {exc.strerror}") from None
        parents[controller] = parent
    missing = [c for c in V1_REQUIRED if c not in parents]
    if missing:
        for made in dict.fromkeys(parents.values()):
            _remove_tree(made)
        raise CgroupError(f"no writable {' and '.join(missing)} hierarchy")
    return CgroupsV1(parents)


def _prepare_v2(mounts: list[Mount], own: dict[str, str], configured: str | None,
                name: str) -> Cgroups:
    mount = next((m for m in mounts if m.version == "v2"), None)
    if mount is None:
        raise CgroupError("no cgroup2 mount")
    base = _inside(mount, own.get("", "/"), configured)
    available = set(_read(base / "cgroup.controllers").split()) \
        if (base / "cgroup.controllers").exists() else set()
    missing = [c for c in V2_REQUIRED if c not in available]
    if missing:
        raise CgroupError(f"{base} offers no {' and '.join(missing)} controller")
    _remove_stale(base)
    parent = base / name
    wanted = " ".join(f"+{c}" for c in V2_WANTED if c in available)
    try:
        parent.mkdir(exist_ok=True)
        if configured is None:  # we live in `base`: move into a leaf so `base` may delegate
            (parent / "agent").mkdir(exist_ok=True)
            _write(parent / "agent" / "cgroup.procs", str(os.getpid()))
            _write(base / "cgroup.subtree_control", wanted)
        kernels = parent / "kernels"
        kernels.mkdir(exist_ok=True)
        _write(parent / "cgroup.subtree_control", wanted)
        _write(kernels / "cgroup.subtree_control", wanted)
    except OSError as exc:
        _remove_tree(parent)
        raise CgroupError(f"cannot delegate controllers below {base}: "
                          f"{exc.strerror or exc}") from None
    return CgroupsV2({"": kernels})


def _remove_tree(path: Path) -> None:
    """Remove a cgroup folder and its children, killing what is left inside."""
    if not path.is_dir():
        return
    for child in [p for p in path.iterdir() if p.is_dir()]:
        _remove_tree(child)
    leftovers = _pids(path / "cgroup.procs")
    if leftovers and path.name != "agent":
        kill_pids(leftovers)
    KernelCgroup([path], path).remove(timeout=2.0)


def _remove_stale(base: Path) -> None:
    """Parents left by agents that died (their pid is gone)."""
    try:
        candidates = [p for p in base.iterdir() if p.name.startswith(PARENT_PREFIX)]
    except OSError:
        return
    for path in candidates:
        try:
            pid = int(path.name[len(PARENT_PREFIX):])
        except ValueError:
            continue
        if pid != os.getpid() and not os.path.exists(f"/proc/{pid}"):
            log.info("removing the cgroup %s of a dead agent", path)
            _remove_tree(path)
