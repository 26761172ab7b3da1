"""The sandbox as a whole: what the host allows, and one `Sandbox` per kernel.

`Host.prepare()` (at agent start) probes namespaces, prepares cgroups, claims
the uid block, makes the scratch folder and works out the root filesystem
plan; `Host.new_sandbox()` gives a kernel its uid, folder and cgroup; the
runner (`runner.py`) does the rest inside the new process, following
`Host.spec()`.  A `Sandbox` outlives restarts of the kernel's process.
"""
from __future__ import annotations

import asyncio
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sorna_server.config import SornaConfig

from . import cgroups, rootfs
from .cgroups import CgroupError, Cgroups, KernelCgroup
from .probe import AGENT_USER, Isolation, probe_namespaces
from .uids import (
    UidBlock,
    UidBlockError,
    UidPool,
    claim_block,
    kill_uid,
    processes_of,
    remove_files_of,
    state_file,
)
from .workdirs import STAGE, make_workdir, prepare_scratch, remove_workdir

log = logging.getLogger(__name__)


class SandboxUnavailable(Exception):
    """The host cannot give kernels what `agent_isolation` asks for (message: why, and
    what to do)."""


@dataclass
class Sandbox:
    """What one kernel lives in: its uid, its folder and its cgroup."""

    name: str
    workdir: Path
    uid: int | None
    cgroup: KernelCgroup | None
    home: str                 # the folder as the kernel sees it
    mounted: bool             # the folder is a tmpfs (disk quota)
    oom_kills: int = 0        # OOM kills already accounted for
    settled_tasks: int = -1   # its task count after the last sweep (nothing to kill)

    def oom_pending(self) -> bool:
        """An OOM kill happened that `new_oom_kills` has not reported yet."""
        return self.cgroup is not None and self.cgroup.oom_kills() > self.oom_kills

    def new_oom_kills(self) -> int:
        """OOM kills in this sandbox since the last call."""
        if self.cgroup is None:
            return 0
        total = self.cgroup.oom_kills()
        new, self.oom_kills = total - self.oom_kills, total
        return max(new, 0)


class Host:
    def __init__(self, config: SornaConfig, instance_id: str, private_mounts: bool):
        self.config = config
        self.instance_id = instance_id
        self.private_mounts = private_mounts  # the agent has its own mount namespace
        self.isolation = Isolation()
        self.cgroups: Cgroups | None = None
        self.block: UidBlock | None = None
        self.uids: UidPool | None = None
        self.scratch: Path | None = None
        self.plan: dict[str, Any] | None = None

    # --- start and stop ---------------------------------------------------------

    def prepare(self) -> Isolation:
        """Probe and set everything up (blocking, at start).  Raises SandboxUnavailable."""
        cfg = self.config
        if cfg.agent_isolation == "none":
            self.isolation = Isolation()
            self.scratch = prepare_scratch(cfg.agent_scratch_dir, self.instance_id,
                                           reachable=False)
            return self.isolation
        identity, namespaces, refused = probe_namespaces(mount_wanted=cfg.agent_mount_namespace)
        if "mnt" not in namespaces and cfg.agent_isolation == "auto":
            raise SandboxUnavailable(
                "this host refuses mount namespaces (" + "; ".join(refused) + "), so kernels "
                "would see the host's files; run the agent with --isolation best-effort "
                "(whatever the host allows, said in its info) or --isolation none")
        self.cgroups = self._prepare_cgroups(refused)
        if identity != AGENT_USER and os.geteuid() == 0:
            self._claim_uids()
        quota = self.private_mounts and cfg.agent_disk_quota > 0 and os.geteuid() == 0
        uid_range = (self.block.base, self.block.base + self.block.size - 1) if self.block \
            else None
        self.isolation = Isolation(identity=identity, namespaces=namespaces,
                                   cgroups=self.cgroups.version if self.cgroups else None,
                                   disk_quota=quota, uid_range=uid_range, refused=tuple(refused))
        reachable = identity != AGENT_USER and "mnt" not in namespaces
        self.scratch = prepare_scratch(cfg.agent_scratch_dir, self.instance_id, reachable)
        if self.isolation.mount_ns:
            self.plan = rootfs.plan(cfg.agent_rootfs_binds, cfg.agent_rootfs_etc,
                                    str(self.scratch / STAGE), cfg.agent_tmp_size,
                                    cfg.agent_shm_size)
        return self.isolation

    def _prepare_cgroups(self, refused: list[str]) -> Cgroups | None:
        if self.config.agent_cgroups == "none":
            refused.append("cgroups (turned off by agent_cgroups)")
            return None
        try:
            return cgroups.detect(self.config.agent_cgroups, self.config.agent_cgroup_root)
        except (CgroupError, OSError) as exc:
            refused.append(f"cgroups ({exc})")
            return None

    def _claim_uids(self) -> None:
        cfg = self.config
        try:
            self.block = claim_block(state_file(cfg.data_dir, self.instance_id),
                                     cfg.agent_runtime_dir, cfg.agent_uid_min,
                                     cfg.agent_uid_max, cfg.agent_uid_block_size)
        except (UidBlockError, OSError) as exc:
            raise SandboxUnavailable(f"cannot claim a block of kernel uids: {exc}") from None
        self.uids = UidPool(self.block.base, self.block.size)
        log.info("kernel uids %d..%d", self.block.base, self.block.base + self.block.size - 1)

    def close(self) -> None:
        """Blocking: at shutdown, after every kernel is gone."""
        if self.cgroups is not None:
            self.cgroups.close()
        if self.scratch is not None:
            remove_workdir(self.scratch)
        if self.block is not None:
            self.block.release()

    # --- sandboxes ----------------------------------------------------------------

    def new_sandbox(self, *, memory: int, procs: int) -> Sandbox:
        """A uid, a folder and a cgroup for a new kernel (a few quick syscalls)."""
        assert self.scratch is not None
        name = f"k-{uuid.uuid4().hex[:16]}"
        uid = self.uids.take() if self.uids is not None else None
        workdir = self.scratch / name
        cgroup = None
        try:
            make_workdir(workdir, uid, self.config.agent_disk_quota
                         if self.isolation.disk_quota else None)
            if self.cgroups is not None:
                cgroup = self.cgroups.create(name)
                cgroup.set_limits(memory=memory, pids=procs, cpus=self.config.agent_cpu_limit)
        except BaseException:
            if cgroup is not None:
                cgroup.remove()
            if workdir.exists():
                remove_workdir(workdir, self.isolation.disk_quota)
            if uid is not None and self.uids is not None:
                self.uids.give_back(uid, clean=True)
            raise
        home = rootfs.HOME if self.isolation.mount_ns else str(workdir)
        return Sandbox(name, workdir, uid, cgroup, home, self.isolation.disk_quota)

    def spec(self, sandbox: Sandbox) -> dict[str, Any]:
        """The sandbox part of the runner's spec (see runner.py)."""
        iso = self.isolation
        spec: dict[str, Any] = {
            "workdir": str(sandbox.workdir),
            "home": sandbox.home,
            "uid": sandbox.uid if iso.uid_switch else None,
            "gid": sandbox.uid if iso.uid_switch else None,
            "namespaces": list(iso.namespaces),
            "cgroups": sandbox.cgroup.procs_files if sandbox.cgroup else [],
        }
        if iso.userns:
            spec["userns"] = {"uid": os.geteuid(), "gid": os.getegid()}
        if self.plan is not None:
            spec["rootfs"] = {**self.plan, "etc_files": rootfs.etc_files(spec["uid"])}
        return spec

    def set_memory(self, sandbox: Sandbox, memory: int) -> None:
        if sandbox.cgroup is not None:
            sandbox.cgroup.set_memory(memory)

    def kill_leftovers(self, sandbox: Sandbox, pid_namespace_ended: bool) -> None:
        """After the kernel's process tree was killed: anything of it still alive.
        Blocking: use a thread."""
        if sandbox.cgroup is not None:
            sandbox.cgroup.kill_all()
        elif sandbox.uid is not None and not pid_namespace_ended:
            kill_uid(sandbox.uid)

    async def destroy(self, sandbox: Sandbox) -> None:
        """Everything of the sandbox goes; its uid is given back once nothing of it is left."""
        clean = await asyncio.get_running_loop().run_in_executor(None, self._destroy, sandbox)
        if sandbox.uid is not None and self.uids is not None:
            self.uids.give_back(sandbox.uid, clean)

    def _destroy(self, sandbox: Sandbox) -> bool:
        """Blocking: True when nothing of the sandbox's uid is left."""
        clean = True
        if sandbox.cgroup is not None:
            clean = sandbox.cgroup.kill_all() and sandbox.cgroup.remove()
        elif sandbox.uid is not None:
            clean = kill_uid(sandbox.uid)
        remove_workdir(sandbox.workdir, sandbox.mounted)
        if sandbox.uid is None:
            return clean
        if not self.isolation.mount_ns:  # it could write to the host's shared folders
            clean = remove_files_of(sandbox.uid) and clean
        if sandbox.cgroup is None:
            clean = clean and not processes_of(sandbox.uid)
        return clean

    # --- what a run leaves behind -------------------------------------------------------

    async def sweep(self, sandbox: Sandbox, keep: set[int], kernel_pid: int | None,
                    shell_parent: int | None, sessions: set[int], exact: bool = False) -> int:
        """SIGKILL the kernel's processes that are not its own long-lived ones: `keep`
        (the runner's), the children of `shell_parent` (a shell kernel's session shell)
        and the processes of `sessions` (its PID 1's, its terminal's: no process of a
        run can join them).  Returns how many were killed.

        After a run the check is one cheap counter (`unchanged`); the full look runs when
        it moved, and always when `exact` (the agent's periodic sweep)."""
        if not exact and self.unchanged(sandbox, kernel_pid):
            return 0
        if sandbox.cgroup is not None:  # a few small reads: inline
            killed = _kill_strays(sandbox.cgroup.pids(), keep, shell_parent, sessions)
        elif kernel_pid is None:
            return 0
        else:  # a scan of the host's /proc: in a thread
            killed = await asyncio.get_running_loop().run_in_executor(
                None, self._sweep_without_cgroup, sandbox, keep, kernel_pid, shell_parent,
                sessions)
        count = self._count(sandbox, kernel_pid)
        sandbox.settled_tasks = -1 if killed or count is None else count
        return killed

    def unchanged(self, sandbox: Sandbox, kernel_pid: int | None) -> bool:
        """Nothing can have been added since the last sweep: its cgroup holds as many
        tasks (one pread), or its own /proc lists as many processes.  Without either,
        only the periodic sweep looks."""
        count = self._count(sandbox, kernel_pid)
        return count is None or count == sandbox.settled_tasks

    def _count(self, sandbox: Sandbox, kernel_pid: int | None) -> int | None:
        if sandbox.cgroup is not None:
            return sandbox.cgroup.task_count()
        if self.isolation.mount_ns and kernel_pid:  # its /proc is its PID namespace's
            try:
                return sum(name.isdigit() for name in os.listdir(f"/proc/{kernel_pid}/root/proc"))
            except OSError:
                return -1
        return None

    def _sweep_without_cgroup(self, sandbox: Sandbox, keep: set[int], kernel_pid: int,
                              shell_parent: int | None, sessions: set[int]) -> int:
        if self.isolation.pid_ns:
            pids = same_pid_namespace(kernel_pid)
        elif sandbox.uid is not None:
            pids = processes_of(sandbox.uid)
        else:
            pids = descendants(kernel_pid)
        return _kill_strays(pids, keep, shell_parent, sessions)


def _parent_and_session(pid: int) -> tuple[int, int] | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            data = fh.read()
    except OSError:
        return None
    fields = data[data.rfind(")") + 2:].split()
    try:
        return int(fields[1]), int(fields[3])
    except (IndexError, ValueError):
        return None


def _kill_strays(pids: list[int], keep: set[int], shell_parent: int | None,
                 sessions: set[int]) -> int:
    strays = []
    for pid in pids:
        if pid in keep:
            continue
        facts = _parent_and_session(pid)
        if facts is None:
            continue
        parent, session = facts
        if (shell_parent is not None and parent == shell_parent) or session in sessions:
            continue
        strays.append(pid)
    cgroups.kill_pids(strays)
    return len(strays)


def same_pid_namespace(pid: int) -> list[int]:
    """Processes in the PID namespace of `pid` (from the host's /proc).  Blocking."""
    try:
        target = os.stat(f"/proc/{pid}/ns/pid").st_ino
    except OSError:
        return []
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if os.stat(f"/proc/{entry.name}/ns/pid").st_ino == target:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def descendants(pid: int) -> list[int]:
    import psutil
    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []
