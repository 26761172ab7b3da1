"""The kernel runner: one process per kernel, talking to the agent over a socket.

This file is a standalone program that uses only the standard library, so it
runs on whatever interpreter the language catalogue names (the agent's own
Python is usually not readable by an unprivileged user).  The agent starts it
as `python3 runner.py SPEC_JSON` with the control socket as an inherited fd.

Start-up, in order (all before any user code):
1. new network and PID namespaces when `unshare_net` / `unshare_pid` ask for
   them (needs root); with a PID namespace the process forks twice: the outer
   process only waits, the first child is PID 1 of the namespace and reaps
   orphans, the second child is the kernel.  Killing PID 1 kills everything
   the kernel ever started.
2. the kernel process joins a new session, moves into its working directory,
   sets its rlimits and drops to the unprivileged uid/gid.
3. fd 1 and 2 become pipes drained by a thread, so output written by child
   processes (os.system, subprocess) is captured too.
4. it says `ready` and serves requests until the socket closes.

Frames on the control socket: 4-byte big-endian length, then a JSON object.
Requests carry `op`, replies carry `type`; the agent sends one request at a
time per kernel (except that an `input` request answers a pending prompt).
"""
import ctypes
import json
import os
import select
import signal
import socket
import struct
import sys
import threading

CLONE_NEWNET = 0x40000000
CLONE_NEWPID = 0x20000000
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
SIOCSIFFLAGS = 0x8914
IFF_UP_LOOPBACK_RUNNING = 0x1 | 0x8 | 0x40
HEADER = struct.Struct(">I")


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _prctl(option, arg):
    try:
        _libc().prctl(option, arg, 0, 0, 0)
    except Exception:
        pass


def _outer_pid():
    """Our pid as the agent sees it (/proc belongs to the agent's namespace)."""
    try:
        return int(os.readlink("/proc/self"))
    except (OSError, ValueError):
        return os.getpid()


def _loopback_up():
    import fcntl
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH", b"lo", IFF_UP_LOOPBACK_RUNNING))
    except OSError:
        pass


def enter_namespaces(spec):
    """Unshare what the spec asks for; return (net, pid) flags actually obtained."""
    got_net = got_pid = False
    if spec.get("unshare_net"):
        got_net = _libc().unshare(CLONE_NEWNET) == 0
    if spec.get("unshare_pid"):
        got_pid = _libc().unshare(CLONE_NEWPID) == 0
    return got_net, got_pid


def fork_into_pid_namespace(ctl_fd):
    """Outer process waits; PID 1 reaps; the returned-into process is the kernel.

    Returns the outer pid of PID 1 (the process to kill to end everything)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    init = os.fork()
    if init:
        os.close(ctl_fd)
        _, status = os.waitpid(init, 0)
        os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    init_outer_pid = _outer_pid()
    _loopback_up()
    kernel = os.fork()
    if kernel:
        os.close(ctl_fd)
        while True:  # PID 1: reap every orphan until the kernel itself exits
            try:
                pid, status = os.wait()
            except ChildProcessError:
                os._exit(0)
            if pid == kernel:
                os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    return init_outer_pid


def apply_limits_and_drop(spec):
    import resource
    try:
        os.setsid()
    except OSError:
        pass  # already a session leader (started with a new session)
    os.chdir(spec["workdir"])
    names = {"as": resource.RLIMIT_AS, "cpu": resource.RLIMIT_CPU,
             "nproc": resource.RLIMIT_NPROC, "fsize": resource.RLIMIT_FSIZE,
             "core": resource.RLIMIT_CORE}
    for name, value in (spec.get("rlimits") or {}).items():
        if name in names and value is not None:
            value = int(value)
            try:
                resource.setrlimit(names[name], (value, value))
            except (ValueError, OSError):
                soft, hard = resource.getrlimit(names[name])
                if hard == resource.RLIM_INFINITY or value <= hard:
                    resource.setrlimit(names[name], (value, hard))
    uid, gid = spec.get("uid"), spec.get("gid")
    if uid is not None:
        os.setgroups([])
        os.setgid(gid if gid is not None else uid)
        os.setuid(uid)
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    os.environ.clear()
    os.environ.update(spec.get("env") or {})


# --- the channel to the agent ---------------------------------------------------

class Channel:
    def __init__(self, fd):
        self.sock = socket.socket(fileno=fd)
        self.sock.setblocking(True)
        os.set_inheritable(self.sock.fileno(), False)
        self.lock = threading.Lock()

    def send(self, msg):
        data = json.dumps(msg, ensure_ascii=False).encode("utf-8", "surrogateescape")
        with self.lock:
            self.sock.sendall(HEADER.pack(len(data)) + data)

    def _exact(self, size):
        buf = bytearray(size)
        view = memoryview(buf)
        got = 0
        while got < size:
            n = self.sock.recv_into(view[got:])
            if n == 0:
                raise EOFError
            got += n
        return bytes(buf)

    def recv(self):
        (size,) = HEADER.unpack(self._exact(HEADER.size))
        return json.loads(self._exact(size))


# --- output capture -------------------------------------------------------------

class Console:
    """Ordered [kind, text] records of one run, bounded by `limit` bytes."""

    def __init__(self, limit):
        self.limit = limit
        self.lock = threading.Lock()
        self.records = []
        self.size = 0
        self.dropped = 0

    def add(self, kind, text):
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

    def take(self):
        with self.lock:
            records = self.records
            if self.dropped:
                records.append(["stderr", f"\n[output truncated: {self.dropped} more characters "
                                          f"over the limit of {self.limit} per execution]\n"])
            self.records, self.size, self.dropped = [], 0, 0
            return records


class Stream:
    """sys.stdout / sys.stderr replacement writing straight into the console."""

    def __init__(self, console, kind, fileno):
        self.console, self.kind, self._fileno = console, kind, fileno
        self.encoding, self.errors = "utf-8", "replace"

    def write(self, text):
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        self.console.add(self.kind, text)
        return len(text)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def flush(self):
        pass

    def isatty(self):
        return False

    def fileno(self):
        return self._fileno

    def writable(self):
        return True

    def readable(self):
        return False


class FdCapture:
    """fd 1 and 2 are pipes; a thread moves what children write into the console."""

    def __init__(self, console):
        self.console = console
        self.lock = threading.Lock()
        self.readers = {}
        for fd, kind in ((1, "stdout"), (2, "stderr")):
            read_end, write_end = os.pipe()
            os.dup2(write_end, fd)
            os.close(write_end)
            os.set_blocking(read_end, False)
            self.readers[read_end] = kind
        threading.Thread(target=self._pump, name="capture", daemon=True).start()

    def _read_available(self, fd):
        while True:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                return
            if not chunk:
                return
            self.console.add(self.readers[fd], chunk.decode("utf-8", "replace"))

    def _pump(self):
        fds = list(self.readers)
        while True:
            ready, _, _ = select.select(fds, [], [])
            with self.lock:
                for fd in ready:
                    self._read_available(fd)

    def drain(self):
        """Move everything already written into the console (call after a run)."""
        with self.lock:
            for fd in self.readers:
                self._read_available(fd)


# --- kernels ----------------------------------------------------------------------

class Interrupted(Exception):
    pass


class BaseKernel:
    def __init__(self, chan, spec):
        self.chan = chan
        self.spec = spec
        self.console = Console(int(spec.get("max_output") or (1 << 20)))
        self.capture = FdCapture(self.console)
        self.running = False  # SIGINT interrupts only while user code runs
        self.seq = None       # number of the request being answered
        self.pid = os.getpid()
        self.code_cache = {}
        signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum, frame):
        if self.running:
            self.running = False
            raise KeyboardInterrupt

    def reply(self, msg):
        if os.getpid() != self.pid:
            os._exit(0)  # a fork of the kernel fell back into the runner: it must not answer
        msg["seq"] = self.seq
        self.chan.send(msg)

    def finish(self, status="finished", **extra):
        self.capture.drain()
        self.reply({"type": "done", "status": status, "console": self.console.take(), **extra})

    def serve(self):
        while True:
            try:
                msg = self.chan.recv()
            except (EOFError, OSError):
                os._exit(0)
            self.handle(msg)

    def handle(self, msg):
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

    def assign(self, msg):
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

    def run_shell(self, cmd):
        """Batch build/exec step: run a shell command, output captured."""
        import subprocess
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

    def complete(self, msg):
        return []


class PythonKernel(BaseKernel):
    def __init__(self, chan, spec):
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

    def prompt(self, prompt="", password=False):
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

    def _compile(self, code):
        cached = self.code_cache.get(code)
        if cached is not None:
            return cached
        compiled = self._compile_new(code)
        if len(code) < 4096:
            if len(self.code_cache) >= 256:
                self.code_cache.clear()
            self.code_cache[code] = compiled
        return compiled

    def _compile_new(self, code):
        tree = self.ast.parse(code, "<input>", "exec")
        last = None
        if tree.body and isinstance(tree.body[-1], self.ast.Expr):
            last = self.ast.Expression(tree.body.pop().value)
        body = compile(tree, "<input>", "exec")
        return body, (compile(last, "<input>", "eval") if last is not None else None)

    def run_code(self, code):
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

    def complete(self, msg):
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
        items = []
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


def _user_frames(tb):
    """The traceback without the runner's own frames."""
    frames = []
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

    def __init__(self, kernel):
        self.kernel = kernel
        self.encoding = "utf-8"

    def readline(self, size=-1):
        return self.kernel.prompt("") + "\n"

    def read(self, size=-1):
        return self.readline()

    def isatty(self):
        return False

    def fileno(self):
        return 0


class ShellKernel(BaseKernel):
    """A persistent shell: each query is sourced into the same session."""

    def __init__(self, chan, spec):
        super().__init__(chan, spec)
        import tempfile
        self.private = tempfile.mkdtemp(prefix="sorna-")
        self.script = os.path.join(self.private, "cmd")
        self.shell = None
        self.start_shell()

    def start_shell(self):
        import subprocess
        done_read, done_write = os.pipe()
        self.shell = subprocess.Popen(
            self.spec.get("shell") or ["/bin/bash", "--norc", "--noprofile"],
            stdin=subprocess.PIPE, pass_fds=(done_write,), start_new_session=True)
        os.close(done_write)
        self.done_fd = done_read
        self.done_file = os.fdopen(done_read, "rb", buffering=0)
        self.done_write_fd = done_write
        self.shell.stdin.write(b"trap 'return 130 2>/dev/null' INT\n")
        self.shell.stdin.flush()

    def _on_sigint(self, signum, frame):
        if self.running == "shell":
            try:
                os.killpg(self.shell.pid, signal.SIGINT)
            except OSError:
                pass
        else:
            super()._on_sigint(signum, frame)

    def run_code(self, code):
        with open(self.script, "w") as fh:
            fh.write(code if code.endswith("\n") else code + "\n")
        line = (f"source {self.script} </dev/null; "
                f"echo \"$?\" >&{self.done_write_fd}\n").encode()
        status = None
        try:
            self.shell.stdin.write(line)
            self.shell.stdin.flush()
            self.running = "shell"
            status = self._read_status()
        except (BrokenPipeError, OSError):
            status = None
        finally:
            self.running = False
        if status is None:
            code = self.shell.wait()
            self.console.add("stderr", f"[the shell exited with status {code}; "
                                       "a new shell was started]\n")
            self.done_file.close()
            self.start_shell()
        self.finish(exit_code=status)

    def _read_status(self):
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

    def complete(self, msg):
        import subprocess
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
        items = []
        for item in out.stdout.decode("utf-8", "replace").splitlines():
            if item not in items:
                items.append(item)
        return items[:200]


class ProgramKernel(BaseKernel):
    """Compiled languages: each query is a whole program, built and run by the
    catalogue's `query` command; nothing persists between queries but files."""

    PRIVATE = ".sorna"  # hidden folder of the kernel for query sources and binaries

    def __init__(self, chan, spec):
        super().__init__(chan, spec)
        import shlex
        self.quote = shlex.quote
        self.command = spec.get("query") or ""
        self.source_name = spec.get("query_source") or "query.src"

    def run_code(self, code):
        if not self.command:
            self.console.add("stderr", "this language runs programs in batch mode only\n")
            self.finish()
            return
        private = os.path.join(os.getcwd(), self.PRIVATE)
        source = os.path.join(private, self.source_name)
        binary = os.path.join(private, "query")
        try:
            os.makedirs(private, mode=0o700, exist_ok=True)
            with open(source, "w") as fh:
                fh.write(code if code.endswith("\n") else code + "\n")
        except OSError as exc:
            self.console.add("stderr", f"cannot write the program: {exc}\n")
            self.finish()
            return
        self.run_shell(self.command.replace("{src}", self.quote(source))
                       .replace("{bin}", self.quote(binary)))


KERNELS = {"python": PythonKernel, "shell": ShellKernel, "program": ProgramKernel}


def start_kernel(spec, ctl_fd):
    """Sandbox this process as the spec says, then serve as its kernel. Never returns."""
    got_net, got_pid = enter_namespaces(spec)
    init_pid = fork_into_pid_namespace(ctl_fd) if got_pid else None
    apply_limits_and_drop(spec)
    chan = Channel(ctl_fd)
    kernel = KERNELS[spec.get("kind", "python")](chan, spec)
    chan.send({"type": "ready", "pid": _outer_pid(), "init_pid": init_pid,
               "net_ns": got_net, "pid_ns": got_pid, "uid": os.getuid()})
    kernel.serve()
    os._exit(0)


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

ZYGOTE_PRELOAD = ("ast", "getpass", "rlcompleter", "traceback", "tempfile", "subprocess",
                  "resource", "fcntl", "shlex")


def _zygote_child(zsock, zygote_pid, spec, ctl_fd):
    """In the fork: undo the zygote's own settings, then become the runner."""
    try:
        zsock.close()
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != zygote_pid:
            os._exit(0)  # the zygote died before we were set up
        os.setsid()
        sys.argv[1:] = []
        start_kernel(spec, ctl_fd)
    except BaseException:
        import traceback
        traceback.print_exc()
    os._exit(70)


def _zygote_fork(sock, me, message, fds):
    """Fork a runner for one request: (reply, fds to attach)."""
    if len(fds) != 1 or not isinstance(message.get("spec"), dict):
        raise ValueError("a fork request needs a spec and one control socket")
    spec = message["spec"]
    spec["fd"] = fds[0]
    pid = os.fork()
    if pid == 0:
        _zygote_child(sock, me, spec, fds[0])
    return {"type": "forked", "pid": pid}, [os.pidfd_open(pid)]


def zygote(sock_fd, agent_pid):
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != agent_pid:
        os._exit(0)
    import gc
    import importlib
    for name in ZYGOTE_PRELOAD:
        importlib.import_module(name)
    gc.freeze()  # what exists now stays shared with the forks (no GC writes to it)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # children wait for an explicit reap
    sock = socket.socket(fileno=sock_fd)
    sock.setblocking(True)
    me = os.getpid()
    sock.send(json.dumps({"type": "ready", "pid": me}).encode())
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(sock, 1 << 16, 4)
        except OSError:
            os._exit(0)
        if not data and not fds:
            os._exit(0)  # the agent closed its end
        attached = []
        try:
            message = json.loads(data)
            if message.get("op") == "reap":
                try:
                    os.waitpid(int(message["pid"]), os.WNOHANG)
                except (ChildProcessError, ValueError, KeyError, TypeError):
                    pass
                continue
            reply, attached = _zygote_fork(sock, me, message, fds)
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


def main():
    if len(sys.argv) > 3 and sys.argv[1] == "--zygote":
        zygote(int(sys.argv[2]), int(sys.argv[3]))
        return
    spec = json.loads(sys.argv[1])
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    start_kernel(spec, int(spec["fd"]))


if __name__ == "__main__":
    main()
