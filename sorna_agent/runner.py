"""The kernel runner: one process per kernel, talking to the agent over a socket.

This file is a standalone program that uses only the standard library, so it
runs on whatever interpreter the language catalogue names (the agent's own
Python is usually not readable by an unprivileged user).  The agent starts it
as `python3 runner.py SPEC_JSON` with the control socket as an inherited fd,
or (usually) a fork server started from this file forks it (see the end).

Start-up, in order, all before any user code (docs/kernel-sandbox.md says what
a kernel ends up seeing):
1. the outer process joins the kernel's cgroups (`cgroups`: cgroup.procs
   files the agent made), then unshares the namespaces of `namespaces` in one
   call: user (agents that are not root: it maps its own uid to 0), mount,
   PID, network, IPC, UTS.
2. with a PID namespace it forks: the outer process only waits; the child is
   PID 1 of the namespace ("init").  With a mount namespace (`rootfs`), init
   builds the kernel's root on a small tmpfs (read-only binds of the system
   folders and of the needed parts of /etc, a minimal /dev, fresh /tmp and
   /dev/shm, the working folder as home), pivots into it, detaches the host's
   tree and mounts a fresh /proc.  It brings loopback up, forks the kernel
   process and then only reaps orphans.  Killing init kills everything the
   kernel ever started.
3. the kernel process joins a new session, moves into its home, sets its
   rlimits and drops to the unprivileged uid/gid (or, in a user namespace,
   drops every capability), then sets no_new_privs and becomes non-dumpable.
4. fd 1 and 2 become pipes drained by a thread, so output written by child
   processes (os.system, subprocess) is captured too.
5. it says `ready` (with its pid and init's pid as the agent sees them) and
   serves requests until the socket closes.

Frames on the control socket: 4-byte big-endian length, then a JSON object.
Requests carry `op`, replies carry `type`; the agent sends one request at a
time per kernel (except that an `input` request answers a pending prompt).
Nothing the runner says is trusted by the agent once user code has run.
"""
import ctypes
import functools
import json
import os
import platform
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
from types import FrameType, TracebackType
from typing import Any, BinaryIO, NoReturn

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
NAMESPACES = {"user": CLONE_NEWUSER, "mnt": CLONE_NEWNS, "pid": CLONE_NEWPID,
              "net": CLONE_NEWNET, "ipc": CLONE_NEWIPC, "uts": CLONE_NEWUTS}

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_RELATIME = 1 << 21
MNT_DETACH = 2
# statvfs flags of a mount that a remount must keep (a user namespace may not drop them)
KEPT_MOUNT_FLAGS = ((os.ST_NOEXEC, MS_NOEXEC), (os.ST_NOATIME, MS_NOATIME),
                    (os.ST_NODIRATIME, MS_NODIRATIME), (os.ST_RELATIME, MS_RELATIME))
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
LINUX_CAPABILITY_VERSION_3 = 0x20080522
SIOCSIFFLAGS = 0x8914
IFF_UP_LOOPBACK_RUNNING = 0x1 | 0x8 | 0x40
HEADER = struct.Struct(">I")
HOSTNAME = "sorna-kernel"
REAPER = ("/bin/sh", "sorna-kernel-init", "-c",
          "trap '' HUP INT TERM; while :; do sleep 3600; done")
PRIVATE_FOLDER = ".sorna"  # hidden folder in the kernel's home (query sources, scripts)
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
DEV_LINKS = (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
             ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2"), ("ptmx", "pts/ptmx"))

Spec = dict[str, Any]


# --- system calls -----------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _prctl(option: int, arg: int) -> None:
    try:
        _libc().prctl(option, arg, 0, 0, 0)
    except Exception:
        pass


def _bytes(value: str | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def mount(source: str | None, target: str, fstype: str | None, flags: int,
          data: str | None = None) -> None:
    _check(_libc().mount(_bytes(source), _bytes(target), _bytes(fstype), flags, _bytes(data)),
           f"mount {target}")


def _pivot_into_cwd() -> None:
    """Make the current folder the root and detach the old root below it."""
    number = SYS_PIVOT_ROOT.get(platform.machine())
    if number is None:
        raise OSError(f"pivot_root: unknown system call number on {platform.machine()}")
    _check(_libc().syscall(number, b".", b"."), "pivot_root")
    _check(_libc().umount2(b".", MNT_DETACH), "detach the old root")
    os.chdir("/")


def _drop_bounding_set() -> None:
    """No capability can ever come back, whatever is executed (needs CAP_SETPCAP)."""
    libc = _libc()
    try:
        with open("/proc/sys/kernel/cap_last_cap") as fh:
            last = int(fh.read())
    except (OSError, ValueError):
        last = 40
    for cap in range(last + 1):
        libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)


def _drop_capabilities() -> None:
    """Empty every capability set (in a user namespace the kernel is uid 0 there)."""
    libc = _libc()
    _drop_bounding_set()
    header = (ctypes.c_uint32 * 2)(LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()
    _check(libc.capset(header, data), "capset")


def _loopback_up() -> None:
    import fcntl
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH", b"lo", IFF_UP_LOOPBACK_RUNNING))
    except OSError:
        pass


def _outer_pid(host_proc: int | None = None) -> int:
    """Our pid as the agent sees it (through the host's /proc)."""
    try:
        if host_proc is not None:
            return int(os.readlink("self", dir_fd=host_proc))
        return int(os.readlink("/proc/self"))
    except (OSError, ValueError):
        return os.getpid()


# --- entering the sandbox --------------------------------------------------------------

def enter_sandbox(spec: Spec, ctl_fd: int) -> dict[str, Any]:
    """Cgroups and namespaces; returns (in the kernel process only) the facts for `ready`.

    `pid1`: the fork server already made our PID namespace, and we are its PID 1."""
    for procs in spec.get("cgroups") or ():
        with open(procs, "w") as fh:
            fh.write("0")  # this process (and all it will start)
    namespaces = list(spec.get("namespaces") or ())
    pid1 = bool(spec.get("pid1"))
    flags = 0
    for name in namespaces:
        if not (pid1 and name == "pid"):
            flags |= NAMESPACES[name]
    if flags:
        _check(_libc().unshare(flags), f"unshare {' '.join(namespaces)}")
    if "user" in namespaces:
        _map_own_user(spec["userns"])
    if "pid" not in namespaces:
        return {"namespaces": namespaces, "pid": _outer_pid(), "init_pid": None}
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not pid1:
        _become_init(ctl_fd)
    host_proc = os.open("/proc", os.O_PATH | os.O_DIRECTORY)  # the agent's view of pids
    _in_child(_set_up_namespaces, spec, namespaces)
    _fork_kernel(ctl_fd)
    facts = {"namespaces": namespaces, "pid": _outer_pid(host_proc),
             "init_pid": _outer_parent(host_proc)}
    os.close(host_proc)
    return facts


def _set_up_namespaces(spec: Spec, namespaces: list[str]) -> None:
    """What holds for the whole namespaces: the root, loopback, the hostname."""
    if spec.get("rootfs"):
        build_root(spec["rootfs"], spec["workdir"])
    if "net" in namespaces:
        _loopback_up()
    if "uts" in namespaces:
        _check(_libc().sethostname(HOSTNAME.encode(), len(HOSTNAME)), "sethostname")


def _in_child(work: Any, *args: Any) -> None:
    """Run `work` in a short-lived child and wait for it: the memory it dirties goes with
    it, instead of staying private to PID 1 or the kernel for the kernel's whole life."""
    child = os.fork()
    if child == 0:
        try:
            _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            work(*args)
        except BaseException:
            import traceback
            traceback.print_exc()
            os._exit(70)
        os._exit(0)
    _, status = os.waitpid(child, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise OSError(f"setting up the kernel's namespaces failed ({status})")


def _map_own_user(ids: dict[str, int]) -> None:
    """In a new user namespace: we are uid/gid 0 there, the agent's user outside."""
    with open("/proc/self/setgroups", "w") as fh:
        fh.write("deny")
    with open("/proc/self/uid_map", "w") as fh:
        fh.write(f"0 {int(ids['uid'])} 1")
    with open("/proc/self/gid_map", "w") as fh:
        fh.write(f"0 {int(ids['gid'])} 1")


def _become_init(ctl_fd: int) -> None:
    """After unsharing the PID namespace ourselves: the outer process only waits for its
    first child, PID 1 of the namespace; returns in that child."""
    init = os.fork()
    if init:
        os.close(ctl_fd)
        _, status = os.waitpid(init, 0)
        os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _fork_kernel(ctl_fd: int) -> None:
    """PID 1 forks the kernel process and then only reaps orphans; returns in the kernel.

    PID 1 becomes a small shell looping on `sleep` (a shell reaps every child it has,
    orphans included): a Python process would keep about 1 MiB of memory of its own per
    kernel.  Without /bin/sh, a Python loop reaps instead."""
    kernel = os.fork()
    if kernel:
        os.close(ctl_fd)
        try:
            os.execv(REAPER[0], list(REAPER[1:]))
        except OSError:
            _reap_until(kernel)
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _outer_parent(host_proc: int) -> int | None:
    """Our parent's pid as the agent sees it."""
    try:
        fd = os.open("self/stat", os.O_RDONLY, dir_fd=host_proc)
        try:
            data = os.read(fd, 4096).decode()
        finally:
            os.close(fd)
        return int(data[data.rfind(")") + 2:].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _reap_until(kernel: int) -> NoReturn:
    """PID 1: reap every orphan until the kernel process itself exits."""
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            os._exit(0)
        if pid == kernel:
            os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


def build_root(plan: Spec, workdir: str) -> None:
    """The kernel's private root: see docs/kernel-sandbox.md.  Runs in the kernel process
    (still root), in the kernel's mount and PID namespaces."""
    root = plan["stage"]
    os.umask(0o022)
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we do here reaches the host
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,nr_inodes=4096,mode=0755")
    for path in plan["binds"]:
        _bind_readonly(path, root + path)
    for path, target in plan["links"]:
        os.symlink(target, root + path)
    _make_etc(root, plan)
    _make_dev(root, plan["shm_size"])
    _make_tmpfs(root + "/tmp", plan["tmp_size"])
    home = root + plan["home"]
    os.makedirs(home)
    mount(workdir, home, None, MS_BIND)
    os.mkdir(root + "/proc")
    # our PID namespace's /proc, mounted while the host's is still in view (a user
    # namespace may mount proc only beside a fully visible one)
    mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    mount(None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chdir(root)
    _pivot_into_cwd()


def _bind_readonly(source: str, target: str) -> None:
    _bind(source, target)
    kept = 0
    source_flags = os.statvfs(source).f_flag
    for st_flag, ms_flag in KEPT_MOUNT_FLAGS:
        if source_flags & st_flag:
            kept |= ms_flag
    mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | kept)


def _bind(source: str, target: str) -> None:
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    else:
        open(target, "w").close()
    mount(source, target, None, MS_BIND)


def _make_etc(root: str, plan: Spec) -> None:
    os.mkdir(root + "/etc")
    for name, content in plan["etc_files"].items():
        with open(f"{root}/etc/{name}", "w") as fh:
            fh.write(content)
    for name, target in plan["etc_links"]:
        os.symlink(target, f"{root}/etc/{name}")
    for name in plan["etc_binds"]:
        _bind_readonly(f"/etc/{name}", f"{root}/etc/{name}")


def _make_dev(root: str, shm_size: int) -> None:
    dev = root + "/dev"
    os.mkdir(dev)
    mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,nr_inodes=64,mode=0755")
    for name in DEVICES:
        _bind(f"/dev/{name}", f"{dev}/{name}")
    for name, target in DEV_LINKS:
        os.symlink(target, f"{dev}/{name}")
    os.mkdir(dev + "/pts")
    mount("devpts", dev + "/pts", "devpts", MS_NOSUID | MS_NOEXEC,
          "newinstance,ptmxmode=0666,mode=0620")
    _make_tmpfs(dev + "/shm", shm_size)
    mount(None, dev, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NOEXEC)


def _make_tmpfs(path: str, size: int) -> None:
    os.makedirs(path, exist_ok=True)
    mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, f"size={int(size)},mode=1777")


def apply_limits_and_drop(spec: Spec) -> None:
    import resource
    try:
        os.setsid()
    except OSError:
        pass  # already a session leader (started with a new session)
    os.chdir(spec["home"])
    names = {"as": resource.RLIMIT_AS, "cpu": resource.RLIMIT_CPU,
             "nproc": resource.RLIMIT_NPROC, "fsize": resource.RLIMIT_FSIZE,
             "core": resource.RLIMIT_CORE}
    for name, value in (spec.get("rlimits") or {}).items():
        if name in names and value is not None:
            _set_rlimit(names[name], int(value))
    uid, gid = spec.get("uid"), spec.get("gid")
    if uid is not None:
        _drop_bounding_set()
        os.setgroups([])
        os.setgid(gid if gid is not None else uid)
        os.setuid(uid)
    elif "user" in (spec.get("namespaces") or ()):
        _drop_capabilities()
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    _prctl(PR_SET_DUMPABLE, 0)  # no ptrace, no /proc/PID/mem from the kernel's children
    os.umask(0o022)  # the agent's own umask (077) is not the kernel's business
    os.environ.clear()
    os.environ.update(spec.get("env") or {})
    if sys.path:
        sys.path[0] = ""  # uploaded modules import from the home folder, as in a REPL


def _set_rlimit(which: int, value: int) -> None:
    import resource
    try:
        resource.setrlimit(which, (value, value))
    except (ValueError, OSError):
        soft, hard = resource.getrlimit(which)
        if hard == resource.RLIM_INFINITY or value <= hard:
            resource.setrlimit(which, (value, hard))


# --- the channel to the agent ---------------------------------------------------

class Channel:
    def __init__(self, fd: int):
        self.sock = socket.socket(fileno=fd)
        self.sock.setblocking(True)
        os.set_inheritable(self.sock.fileno(), False)
        self.lock = threading.Lock()

    def send(self, msg: dict[str, Any]) -> None:
        data = json.dumps(msg, ensure_ascii=False).encode("utf-8", "surrogateescape")
        with self.lock:
            self.sock.sendall(HEADER.pack(len(data)) + data)

    def _exact(self, size: int) -> bytes:
        buf = bytearray(size)
        view = memoryview(buf)
        got = 0
        while got < size:
            n = self.sock.recv_into(view[got:])
            if n == 0:
                raise EOFError
            got += n
        return bytes(buf)

    def recv(self) -> Any:
        (size,) = HEADER.unpack(self._exact(HEADER.size))
        return json.loads(self._exact(size))


# --- output capture -------------------------------------------------------------

class Console:
    """Ordered [kind, text] records of one run, bounded by `limit` bytes."""

    def __init__(self, limit: int):
        self.limit = limit
        self.lock = threading.Lock()
        self.records: list[list[str]] = []
        self.size = 0
        self.dropped = 0

    def add(self, kind: str, text: str) -> None:
        if not text:
            return
        with self.lock:
            room = self.limit - self.size
            if room <= 0:
                self.dropped += len(text)
                return
            if len(text) > room:
                self.dropped += len(text) - room
                text = text[:room]
            self.size += len(text)
            if self.records and self.records[-1][0] == kind:
                self.records[-1][1] += text
            else:
                self.records.append([kind, text])

    def take(self) -> list[list[str]]:
        with self.lock:
            records = self.records
            if self.dropped:
                records.append(["stderr", f"\n[output truncated: {self.dropped} more characters "
                                          f"over the limit of {self.limit} per execution]\n"])
            self.records, self.size, self.dropped = [], 0, 0
            return records


class Stream:
    """sys.stdout / sys.stderr replacement writing straight into the console."""

    def __init__(self, console: Console, kind: str, fileno: int):
        self.console, self.kind, self._fileno = console, kind, fileno
        self.encoding, self.errors = "utf-8", "replace"

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        self.console.add(self.kind, text)
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self._fileno

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False


class FdCapture:
    """fd 1 and 2 are pipes; a thread moves what children write into the console."""

    def __init__(self, console: Console):
        self.console = console
        self.lock = threading.Lock()
        self.readers: dict[int, str] = {}
        for fd, kind in ((1, "stdout"), (2, "stderr")):
            read_end, write_end = os.pipe()
            os.dup2(write_end, fd)
            os.close(write_end)
            os.set_blocking(read_end, False)
            self.readers[read_end] = kind
        threading.Thread(target=self._pump, name="capture", daemon=True).start()

    def _read_available(self, fd: int) -> None:
        while True:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                return
            if not chunk:
                return
            self.console.add(self.readers[fd], chunk.decode("utf-8", "replace"))

    def _pump(self) -> None:
        fds = list(self.readers)
        while True:
            ready, _, _ = select.select(fds, [], [])
            with self.lock:
                for fd in ready:
                    self._read_available(fd)

    def drain(self) -> None:
        """Move everything already written into the console (call after a run)."""
        with self.lock:
            for fd in self.readers:
                self._read_available(fd)


# --- kernels ----------------------------------------------------------------------

class Interrupted(Exception):
    pass


class BaseKernel:
    def __init__(self, chan: Channel, spec: Spec):
        self.chan = chan
        self.spec = spec
        self.console = Console(int(spec.get("max_output") or (1 << 20)))
        self.capture = FdCapture(self.console)
        self.running: bool | str = False  # SIGINT interrupts only while user code runs
        self.seq: Any = None  # number of the request being answered
        self.pid = os.getpid()
        self.code_cache: dict[str, tuple[Any, Any]] = {}
        signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        if self.running:
            self.running = False
            raise KeyboardInterrupt

    def reply(self, msg: dict[str, Any]) -> None:
        if os.getpid() != self.pid:
            os._exit(0)  # a fork of the kernel fell back into the runner: it must not answer
        msg["seq"] = self.seq
        self.chan.send(msg)

    def finish(self, status: str = "finished", **extra: Any) -> None:
        self.capture.drain()
        self.reply({"type": "done", "status": status, "console": self.console.take(), **extra})

    def serve(self) -> NoReturn:
        while True:
            try:
                msg = self.chan.recv()
            except (EOFError, OSError):
                os._exit(0)
            self.handle(msg)

    def handle(self, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        self.seq = msg.get("seq")
        if op == "assign":
            self.assign(msg)
        elif op == "exec":
            self.run_code(msg.get("code", ""))
        elif op == "input":
            self.finish()  # no prompt is pending: nothing to answer
        elif op == "complete":
            self.reply({"type": "completions", "items": self.complete(msg)})
        elif op == "shell":
            self.run_shell(msg.get("cmd", ""))
        elif op == "ping":
            self.reply({"type": "pong"})
        else:
            self.reply({"type": "error", "message": f"unknown op {op!r}"})

    def assign(self, msg: dict[str, Any]) -> None:
        import resource
        max_mem = msg.get("max_mem")
        if max_mem:
            soft, hard = resource.getrlimit(resource.RLIMIT_AS)
            if hard == resource.RLIM_INFINITY or max_mem < hard:
                try:
                    resource.setrlimit(resource.RLIMIT_AS, (max_mem, max_mem))
                except (ValueError, OSError):
                    pass
        if msg.get("max_output"):
            self.console.limit = int(msg["max_output"])
        self.reply({"type": "assigned"})

    def run_shell(self, cmd: str) -> None:
        """Batch build/exec step: run a shell command, output captured."""
        code = None
        try:
            self.running = True
            try:
                code = subprocess.call(cmd, shell=True, stdin=subprocess.DEVNULL)
            finally:
                self.running = False
        except KeyboardInterrupt:
            self.console.add("stderr", "\n[interrupted]\n")
        except OSError as exc:
            self.console.add("stderr", f"cannot run {cmd!r}: {exc}\n")
        self.finish(exit_code=code)

    def run_code(self, code: str) -> None:
        raise NotImplementedError

    def complete(self, msg: dict[str, Any]) -> list[str]:
        return []


class PythonKernel(BaseKernel):
    def __init__(self, chan: Channel, spec: Spec):
        super().__init__(chan, spec)
        import ast
        import builtins
        import getpass
        import rlcompleter
        import traceback
        self.ast, self.traceback, self.rlcompleter = ast, traceback, rlcompleter
        self.namespace = {"__name__": "__main__", "__builtins__": builtins}
        self.stdout = Stream(self.console, "stdout", 1)
        self.stderr = Stream(self.console, "stderr", 2)
        sys.stdout, sys.stderr = self.stdout, self.stderr
        sys.stdin = _PromptStdin(self)
        builtins.input = self.prompt
        getpass.getpass = lambda prompt="Password: ", stream=None: self.prompt(prompt, True)

    def prompt(self, prompt: object = "", password: bool = False) -> str:
        """input()/getpass(): report waiting-input, block for the answer."""
        was_running, self.running = self.running, False
        self.console.add("stdout", str(prompt))
        self.capture.drain()
        self.reply({"type": "done", "status": "waiting-input", "console": self.console.take(),
                    "options": {"is_password": bool(password)}})
        while True:
            try:
                msg = self.chan.recv()
            except (EOFError, OSError):
                os._exit(0)
            op = msg.get("op")
            self.seq = msg.get("seq")
            if op in ("input", "exec"):
                answer = msg.get("text", msg.get("code", ""))
                self.running = was_running
                return answer.rstrip("\n") if isinstance(answer, str) else ""
            if op == "complete":
                self.reply({"type": "completions", "items": []})
            elif op == "assign":
                self.assign(msg)
            else:
                self.reply({"type": "error", "message": "waiting for input"})

    def _compile(self, code: str) -> tuple[Any, Any]:
        cached = self.code_cache.get(code)
        if cached is not None:
            return cached
        compiled = self._compile_new(code)
        if len(code) < 4096:
            if len(self.code_cache) >= 256:
                self.code_cache.clear()
            self.code_cache[code] = compiled
        return compiled

    def _compile_new(self, code: str) -> tuple[Any, Any]:
        tree = self.ast.parse(code, "<input>", "exec")
        last = None
        final = tree.body[-1] if tree.body else None
        if isinstance(final, self.ast.Expr):
            tree.body.pop()
            last = self.ast.Expression(final.value)
        body = compile(tree, "<input>", "exec")
        return body, (compile(last, "<input>", "eval") if last is not None else None)

    def run_code(self, code: str) -> None:
        try:
            body, last = self._compile(code)
        except (SyntaxError, ValueError, OverflowError) as exc:
            self.console.add("stderr", "".join(
                self.traceback.format_exception_only(type(exc), exc)))
            self.finish()
            return
        try:
            self.running = True
            try:
                exec(body, self.namespace)
                if last is not None:
                    value = eval(last, self.namespace)
                    if value is not None:
                        self.namespace["_"] = value
                        self.console.add("stdout", repr(value) + "\n")
            finally:
                self.running = False
        except SystemExit as exc:
            self.console.add("stderr", f"[SystemExit: {exc.code}]\n")
        except BaseException as exc:  # the user's exception, KeyboardInterrupt included
            tb = _user_frames(exc.__traceback__)
            try:
                text = "".join(self.traceback.format_exception(type(exc), exc, tb))
            except Exception:
                text = f"{type(exc).__name__}: {exc}\n"
            self.console.add("stderr", text)
        self.finish()

    def complete(self, msg: dict[str, Any]) -> list[str]:
        line = msg.get("line") or ""
        col = msg.get("col")
        if isinstance(col, int) and 0 <= col <= len(line):
            line = line[:col]
        word = ""
        for ch in reversed(line):
            if ch.isalnum() or ch in "._":
                word = ch + word
            else:
                break
        completer = self.rlcompleter.Completer(self.namespace)
        items: list[str] = []
        try:
            for state in range(200):
                item = completer.complete(word, state)
                if item is None:
                    break
                if item not in items:
                    items.append(item)
        except Exception:
            pass
        return items


def _user_frames(tb: TracebackType | None) -> TracebackType | None:
    """The traceback without the runner's own frames."""
    frames: list[TracebackType] = []
    while tb is not None:
        if tb.tb_frame.f_code.co_filename != __file__:
            frames.append(tb)
        tb = tb.tb_next
    for earlier, later in zip(frames, frames[1:], strict=False):
        earlier.tb_next = later
    if frames:
        frames[-1].tb_next = None
        return frames[0]
    return None


class _PromptStdin:
    """sys.stdin that asks the user through the agent (readline/read)."""

    def __init__(self, kernel: "PythonKernel"):
        self.kernel = kernel
        self.encoding = "utf-8"

    def readline(self, size: int = -1) -> str:
        return self.kernel.prompt("") + "\n"

    def read(self, size: int = -1) -> str:
        return self.readline()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return 0


class ShellKernel(BaseKernel):
    """A persistent shell: each query is sourced into the same session."""

    def __init__(self, chan: Channel, spec: Spec):
        super().__init__(chan, spec)
        self.script = os.path.join(private_folder(), "cmd")
        self.shell, self.done_file, self.done_write_fd = self._start_shell()

    def _start_shell(self) -> tuple["subprocess.Popen[bytes]", BinaryIO, int]:
        done_read, done_write = os.pipe()
        shell = subprocess.Popen(
            self.spec.get("shell") or ["/bin/bash", "--norc", "--noprofile"],
            stdin=subprocess.PIPE, pass_fds=(done_write,), start_new_session=True)
        os.close(done_write)
        assert shell.stdin is not None
        shell.stdin.write(b"trap 'return 130 2>/dev/null' INT\n")
        shell.stdin.flush()
        return shell, os.fdopen(done_read, "rb", buffering=0), done_write

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        if self.running == "shell":
            try:
                os.killpg(self.shell.pid, signal.SIGINT)
            except OSError:
                pass
        else:
            super()._on_sigint(signum, frame)

    def run_code(self, code: str) -> None:
        with open(self.script, "w") as fh:
            fh.write(code if code.endswith("\n") else code + "\n")
        line = (f"source {self.script} </dev/null; "
                f"echo \"$?\" >&{self.done_write_fd}\n").encode()
        status = None
        try:
            assert self.shell.stdin is not None
            self.shell.stdin.write(line)
            self.shell.stdin.flush()
            self.running = "shell"
            status = self._read_status()
        except (BrokenPipeError, OSError):
            status = None
        finally:
            self.running = False
        if status is None:
            exit_code = self.shell.wait()
            self.console.add("stderr", f"[the shell exited with status {exit_code}; "
                                       "a new shell was started]\n")
            self.done_file.close()
            self.shell, self.done_file, self.done_write_fd = self._start_shell()
        self.finish(exit_code=status)

    def _read_status(self) -> int | None:
        data = b""
        while not data.endswith(b"\n"):
            chunk = self.done_file.read(64)
            if not chunk:
                return None
            data += chunk
        try:
            return int(data.strip().splitlines()[-1])
        except ValueError:
            return None

    def complete(self, msg: dict[str, Any]) -> list[str]:
        line = (msg.get("line") or "")
        col = msg.get("col")
        if isinstance(col, int) and 0 <= col <= len(line):
            line = line[:col]
        word = line.split()[-1] if line.split() and not line.endswith(" ") else ""
        try:
            out = subprocess.run(["/bin/bash", "--norc", "-c", 'compgen -c -f -- "$1"', "_", word],
                                 capture_output=True, timeout=2, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.SubprocessError):
            return []
        items: list[str] = []
        for item in out.stdout.decode("utf-8", "replace").splitlines():
            if item not in items:
                items.append(item)
        return items[:200]


def private_folder() -> str:
    """The kernel's hidden folder in its home, for query sources, scripts and binaries."""
    path = os.path.join(os.getcwd(), PRIVATE_FOLDER)
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


class ProgramKernel(BaseKernel):
    """Compiled languages: each query is a whole program, built and run by the
    catalogue's `query` command; nothing persists between queries but files."""

    def __init__(self, chan: Channel, spec: Spec):
        super().__init__(chan, spec)
        import shlex
        self.quote = shlex.quote
        self.command = spec.get("query") or ""
        self.source_name = spec.get("query_source") or "query.src"

    def run_code(self, code: str) -> None:
        if not self.command:
            self.console.add("stderr", "this language runs programs in batch mode only\n")
            self.finish()
            return
        try:
            private = private_folder()
            source = os.path.join(private, self.source_name)
            binary = os.path.join(private, "query")
            with open(source, "w") as fh:
                fh.write(code if code.endswith("\n") else code + "\n")
        except OSError as exc:
            self.console.add("stderr", f"cannot write the program: {exc}\n")
            self.finish()
            return
        self.run_shell(self.command.replace("{src}", self.quote(source))
                       .replace("{bin}", self.quote(binary)))


KERNELS: dict[str, type[BaseKernel]] = {
    "python": PythonKernel, "shell": ShellKernel, "program": ProgramKernel}


def start_kernel(spec: Spec, ctl_fd: int) -> NoReturn:
    """Sandbox this process as the spec says, then serve as its kernel. Never returns."""
    facts = enter_sandbox(spec, ctl_fd)
    apply_limits_and_drop(spec)
    import gc
    gc.enable()
    chan = Channel(ctl_fd)
    kernel = KERNELS[spec.get("kind", "python")](chan, spec)
    chan.send({"type": "ready", "uid": os.getuid(), **facts})
    kernel.serve()


# --- the fork server (zygote) ----------------------------------------------------
#
# `runner.py --zygote FD AGENT_PID LABEL` starts a long-lived process that has
# imported everything a kernel needs and forks one fresh runner per request, so a
# runner costs a fork instead of an interpreter start.  FD is a SOCK_SEQPACKET
# socket carrying one JSON object per message:
#   {"op": "fork", "spec": {...}} with the runner's control socket attached
#       (SCM_RIGHTS); reply {"type": "forked", "pid": N} with a pidfd of the new
#       process attached, or {"type": "error", "message": ...};
#   {"op": "reap", "pid": N}: collect that exited child (no reply).  The agent
#       sends it after it has killed the runner (its process group included) and
#       seen it exit, so a runner's pid and process group id are never reused
#       while the agent may still signal them.
# The first message is {"type": "ready"}.  The zygote dies with the agent
# (PDEATHSIG) and its runners die with it.  LABEL only names the agent in `ps`.

PRELOAD = ("ast", "getpass", "rlcompleter", "traceback", "tempfile", "resource", "fcntl",
           "shlex")


def preload() -> None:
    """Import what kernels use, while the interpreter's files are still visible."""
    import importlib
    for name in PRELOAD:
        importlib.import_module(name)


def _zygote_child(zsock: socket.socket, zygote: int, spec: Spec, ctl_fd: int,
                  own_pid_ns: int | None) -> NoReturn:
    """In the fork: undo the zygote's own settings, then become the runner.
    `zygote`: a pidfd of the zygote (our parent, outside our PID namespace as PID 1)."""
    try:
        zsock.close()
        if own_pid_ns is not None:
            os.close(own_pid_ns)
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if select.select([zygote], [], [], 0)[0]:
            os._exit(0)  # the zygote died before we were set up
        os.close(zygote)
        os.setsid()
        sys.argv[1:] = []
        start_kernel(spec, ctl_fd)
    except BaseException:
        import traceback
        traceback.print_exc()
    os._exit(70)


def _zygote_fork(sock: socket.socket, me: int, message: dict[str, Any],
                 fds: list[int], own_pid_ns: int | None) -> tuple[dict[str, Any], list[int]]:
    """Fork a runner for one request: (reply, fds to attach).

    When the runner gets a PID namespace and no user namespace, the zygote makes the
    namespace itself (unshare, fork, then back to its own): its child is then PID 1
    at once, and no outer process has to wait for it (one process less per kernel)."""
    if len(fds) != 1 or not isinstance(message.get("spec"), dict):
        raise ValueError("a fork request needs a spec and one control socket")
    spec = message["spec"]
    spec["fd"] = fds[0]
    namespaces = spec.get("namespaces") or ()
    spec["pid1"] = own_pid_ns is not None and "pid" in namespaces and "user" not in namespaces \
        and _libc().unshare(CLONE_NEWPID) == 0
    try:
        pid = os.fork()
        if pid == 0:
            _zygote_child(sock, me, spec, fds[0], own_pid_ns)
    finally:
        if spec["pid1"]:
            _check(_libc().setns(own_pid_ns, CLONE_NEWPID), "back to our PID namespace")
    return {"type": "forked", "pid": pid}, [os.pidfd_open(pid)]


def zygote(sock_fd: int, agent_pid: int) -> NoReturn:
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != agent_pid:
        os._exit(0)
    import gc
    preload()
    gc.freeze()  # what exists now stays shared with the forks (no GC writes to it)
    gc.disable()  # and no collection between forks either: kernels turn it back on
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # children wait for an explicit reap
    sock = socket.socket(fileno=sock_fd)
    sock.setblocking(True)
    me = os.pidfd_open(os.getpid())  # our children check through it that we still live
    try:  # to come back to after making a child's PID namespace (root only)
        own_pid_ns: int | None = os.open("/proc/self/ns/pid", os.O_RDONLY) \
            if os.geteuid() == 0 else None
    except OSError:
        own_pid_ns = None
    sock.send(json.dumps({"type": "ready", "pid": os.getpid()}).encode())
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(sock, 1 << 16, 4)
        except OSError:
            os._exit(0)
        if not data and not fds:
            os._exit(0)  # the agent closed its end
        _zygote_serve_one(sock, me, data, fds, own_pid_ns)


def _zygote_serve_one(sock: socket.socket, me: int, data: bytes, fds: list[int],
                      own_pid_ns: int | None) -> None:
    attached: list[int] = []
    try:
        message = json.loads(data)
        if message.get("op") == "reap":
            try:
                os.waitpid(int(message["pid"]), os.WNOHANG)
            except (ChildProcessError, ValueError, KeyError, TypeError):
                pass
            return
        reply, attached = _zygote_fork(sock, me, message, fds, own_pid_ns)
    except (OSError, ValueError, AttributeError) as exc:
        reply = {"type": "error", "message": str(exc)}
    finally:
        for fd in fds:
            os.close(fd)
    try:
        socket.send_fds(sock, [json.dumps(reply).encode()], attached)
    except OSError:
        os._exit(0)
    finally:
        for fd in attached:
            os.close(fd)


def main() -> None:
    if len(sys.argv) > 3 and sys.argv[1] == "--zygote":
        zygote(int(sys.argv[2]), int(sys.argv[3]))
    spec = json.loads(sys.argv[1])
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    preload()
    start_kernel(spec, int(spec["fd"]))


if __name__ == "__main__":
    main()
