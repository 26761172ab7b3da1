"""The reference agent: its lifecycle, its kernel table and its periodic loops.

`Agent.start()` probes the host, binds the RPC socket, connects the events,
fills the warm pool and starts the loops; `Agent.shutdown()` destroys every
kernel (each reported with kernel_terminated) and says instance_terminated.
The RPC server (`rpc.py`) calls the handlers here; running code is
`execution.py`'s.
"""
from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import socket
import time
import uuid
from collections.abc import Awaitable
from typing import Any
from urllib.parse import urlsplit

import psutil
import zmq
import zmq.asyncio

from sorna_server import __version__, curve
from sorna_server import agent_protocol as proto
from sorna_server.config import SornaConfig, parse_size

from . import AgentStartError
from .events import EventSender
from .execution import Execution
from .kernel import Kernel, KernelLimits, rlimits_for
from .languages import CatalogueError, Language, load_catalogue, runtime_versions
from .pool import WarmPool
from .process import RUNNER_FILE, RunnerDied, RunnerProcess
from .pty import PtySession
from .rpc import RPCError, RPCServer, method_table
from .sandbox.host import Host, Sandbox, SandboxUnavailable
from .sandbox.probe import Isolation
from .sandbox.workdirs import write_upload
from .stats import measure
from .zygote import Zygotes

log = logging.getLogger("sorna_agent")

SHUTDOWN_LINGER = 3.0       # seconds to deliver the last events at shutdown
MANAGER_CHECK_TIMEOUT = 3.0  # seconds to wait at start for a first handshake with a manager
MAX_KERNEL_ID = 128
MIN_KERNEL_MEM = 32 << 20


def split_bind_addr(addr: str) -> tuple[str, int]:
    parts = urlsplit(addr)
    if parts.scheme != "tcp" or not parts.hostname or parts.port is None:
        raise ValueError(f"expected tcp://IP:PORT, got {addr!r}")
    return parts.hostname, parts.port


def _advertise_host(bind_host: str, configured: str | None) -> str:
    if configured:
        return configured
    if bind_host not in ("0.0.0.0", "*", "::"):
        return bind_host
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


class Agent:
    def __init__(self, config: SornaConfig, *, private_mounts: bool = False):
        self.config = config
        self.instance_id = config.agent_instance_id or f"i-{socket.gethostname()}"
        try:
            self.bind_host, self.port = split_bind_addr(config.agent_bind_addr)
        except ValueError as exc:
            raise AgentStartError(f"invalid setting agent_rpc_addr: {exc}") from None
        self.addr = f"tcp://{_advertise_host(self.bind_host, config.agent_advertise_host)}" \
                    f":{self.port}"
        self.host = Host(config, self.instance_id, private_mounts)
        self.isolation = Isolation()
        self.languages: dict[str, Language] = {}
        self.language_info: dict[str, dict[str, Any]] = {}  # reported in info()
        self.kernels: dict[str, Kernel] = {}
        self.creating = 0
        self.pool: WarmPool | None = None
        self.zygotes = Zygotes(str(RUNNER_FILE), self.instance_id)
        self.events: EventSender | None = None
        self.ctx: zmq.asyncio.Context | None = None
        self.rpc: RPCServer | None = None
        self.keys: curve.KeyPair | None = None       # this agent's CurveZMQ keypair
        self.gateways: curve.KeyRing | None = None   # the gateway keys it accepts
        self._zap: Any = None
        self.execution = Execution(self)
        self.stopping = asyncio.Event()
        self.tasks: set[asyncio.Task[Any]] = set()     # loops and requests: cancelled at stop
        self.cleanups: set[asyncio.Task[Any]] = set()  # kernel terminations: awaited at stop

    # --- start and stop ------------------------------------------------------

    def load_keys(self) -> None:
        """Read `agent_key` and `gateway_keys`; without them, refuse a non-loopback bind."""
        config = self.config
        try:
            side = curve.load_side(config.agent_key, "agent_key", config.gateway_keys,
                                   "gateway_keys", peer="gateway", host=self.bind_host,
                                   port="the agent's RPC port (agent_rpc_addr)")
        except curve.CurveKeyError as exc:
            raise AgentStartError(str(exc)) from None
        if side is not None:
            self.keys, self.gateways = side

    async def start(self) -> None:
        self.load_keys()
        try:
            self.isolation = self.host.prepare()
        except (SandboxUnavailable, OSError) as exc:
            raise AgentStartError(str(exc)) from None
        try:
            self.languages = load_catalogue(
                for_other_users=self.isolation.uid_switch,
                visible_in=self.config.agent_rootfs_binds if self.isolation.mount_ns else None)
        except CatalogueError as exc:
            raise AgentStartError(str(exc)) from None
        if not self.languages:
            raise AgentStartError("no language of the catalogue has a usable interpreter"
                                  + (" inside the kernels' root (agent_rootfs_binds)"
                                     if self.isolation.mount_ns else ""))
        versions = await asyncio.get_running_loop().run_in_executor(
            None, runtime_versions, self.languages)
        self.language_info = {name: self._describe(lang, versions.get(name))
                              for name, lang in self.languages.items()}
        self.ctx = zmq.asyncio.Context()
        if self.gateways is not None:
            self._zap = curve.start_authenticator(self.ctx, self.gateways)
        self.rpc = RPCServer(self.ctx, self.config.agent_bind_addr, method_table(self),
                             keys=self.keys, ring=self.gateways)
        self.events = EventSender(self.ctx, self.instance_id, self.config.agent_managers,
                                  self.config.agent_event_queue_size, keys=self.keys,
                                  ring=self.gateways)
        self.events.start()
        refused = await self.events.check_managers(MANAGER_CHECK_TIMEOUT)
        if refused:
            events, self.events = self.events, None
            await events.close(0)
            raise AgentStartError(refused)
        self.pool = WarmPool(self.languages, self.config.agent_pool_size, self.spawn_runner,
                             self.discard_runner)
        self.pool.fill_all()
        log.info("agent %s listening on %s (advertised %s), managers %s",
                 self.instance_id, self.config.agent_bind_addr, self.addr,
                 ", ".join(self.config.agent_managers) or "none")
        log.info("agent protocol: %s", f"CurveZMQ, key {self.keys.public_text}, gateway keys "
                 f"from {self.config.gateway_keys}" if self.keys
                 else "plain ZeroMQ (no keys configured): loopback only")
        log.info("isolation: %s", self.isolation.describe())
        for refusal in self.isolation.refused:
            log.warning("the host refused %s", refusal)
        for protection in self.isolation.protections_off():
            log.warning("kernels run WITHOUT %s", protection)
        log.info("languages: %s; warm pool %d per language; max %d kernels",
                 ", ".join(sorted(self.languages)), self.config.agent_pool_size,
                 self.config.agent_max_kernels)
        self.events.emit("instance_started", info=self.info())
        for coro in (self.rpc.serve(self.spawn_task), self._heartbeats(), self._stats_loop(),
                     self._idle_sweeper()):
            self.spawn_task(coro)

    def spawn_task(self, coro: Awaitable[Any], *, cleanup: bool = False) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        group = self.cleanups if cleanup else self.tasks
        group.add(task)
        task.add_done_callback(group.discard)
        return task

    async def shutdown(self, reason: str = "shutdown") -> None:
        log.info("shutting down: destroying %d kernels", len(self.kernels))
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*list(self.tasks), return_exceptions=True)
        await asyncio.gather(*list(self.cleanups), return_exceptions=True)
        if self.pool is not None:
            await self.pool.close()
        await asyncio.gather(*(self.terminate(k, proto.REASON_AGENT_SHUTDOWN)
                               for k in list(self.kernels.values())), return_exceptions=True)
        await self.zygotes.close()
        await asyncio.get_running_loop().run_in_executor(None, self.host.close)
        if self.events is not None:
            self.events.emit("instance_terminated", reason=reason)
            await self.events.close(SHUTDOWN_LINGER)
        if self.rpc is not None:
            self.rpc.close()
        if self._zap is not None:
            self._zap.stop()
        if self.ctx is not None:
            self.ctx.term()
        log.info("agent %s stopped", self.instance_id)

    # --- facts ----------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        return {
            "addr": self.addr,
            "max_kernels": self.config.agent_max_kernels,
            "num_kernels": len(self.kernels),
            "languages": sorted(self.languages),
            "version": __version__,
            "cpu_count": psutil.cpu_count() or 1,
            "mem_bytes": psutil.virtual_memory().total,
            "isolation": self.isolation.as_info(),
            "language_info": self.language_info,
        }

    def _describe(self, lang: Language, version: str | None) -> dict[str, Any]:
        """What API clients learn of a language (GET /v2/languages)."""
        limits = self.max_limits(lang)
        described: dict[str, Any] = {
            "limits": {"max_mem": limits.max_mem, "exec_timeout": limits.exec_timeout,
                       "max_procs": limits.max_procs, "max_output": limits.max_output}}
        if lang.alias_of:
            described["alias_of"] = lang.alias_of
        if version:
            described["version"] = version
        return described

    def max_limits(self, lang: Language) -> KernelLimits:
        cfg = self.config
        own = lang.limits
        return KernelLimits(
            exec_timeout=min(cfg.agent_exec_timeout, float(own.get("exec_timeout", math.inf))),
            max_mem=min(cfg.agent_max_mem, int(own.get("max_mem", cfg.agent_max_mem))),
            idle_timeout=cfg.agent_idle_timeout,
            max_output=min(cfg.agent_max_output, int(own.get("max_output", cfg.agent_max_output))),
            cpu_time=max(1, math.ceil(cfg.agent_max_cpu_time)),
            max_procs=min(cfg.agent_max_procs, int(own.get("max_procs", cfg.agent_max_procs))),
            max_file_size=cfg.agent_max_file_size,
        )

    # --- runner processes -------------------------------------------------------

    async def spawn_runner(self, lang: Language, sandbox: Sandbox | None = None,
                           limits: KernelLimits | None = None) -> RunnerProcess:
        """A runner in `sandbox`, or in a new sandbox of its own (pool runners)."""
        limits = limits or self.max_limits(lang)
        own = sandbox is None
        if sandbox is None:
            sandbox = self.host.new_sandbox(memory=limits.max_mem, procs=limits.max_procs)
        try:
            runner = RunnerProcess(lang, sandbox)
            try:
                await runner.start(self.host.spec(sandbox), rlimits_for(limits, self.isolation),
                                   limits.max_output, await self.zygotes.get(lang.python))
            except BaseException:
                await asyncio.shield(self.kill_runner(runner))
                raise
        except BaseException:
            if own:
                await asyncio.shield(self.host.destroy(sandbox))
            raise
        return runner

    async def kill_runner(self, runner: RunnerProcess) -> None:
        """Kill a runner and whatever of its sandbox still runs (the sandbox stays)."""
        await runner.kill()
        await asyncio.get_running_loop().run_in_executor(
            None, self.host.kill_leftovers, runner.sandbox, runner.init_pid is not None)

    async def discard_runner(self, runner: RunnerProcess) -> None:
        """Kill a runner that is no kernel's (pool leftovers) and destroy its sandbox."""
        await self.kill_runner(runner)
        await self.host.destroy(runner.sandbox)

    def _watch(self, kernel: Kernel, runner: RunnerProcess) -> None:
        def on_exit(dead: RunnerProcess) -> None:
            if kernel.runner is not dead or kernel.closing or kernel.restarting or kernel.busy:
                return  # a run in progress sees it die and decides (execution.py)
            oom = kernel.sandbox.new_oom_kills()
            log.info("kernel %s: its process exited by itself%s", kernel.id,
                     " (killed: out of memory)" if oom else "")
            self.end_later(kernel, proto.REASON_OOM if oom else proto.REASON_EXITED)
        runner.on_exit = on_exit

    # --- kernel lifecycle ---------------------------------------------------------

    def _requested_limits(self, lang: Language, given: Any) -> KernelLimits:
        limits = self.max_limits(lang)
        if given is None:
            return limits
        try:
            mem = given.get("maxMem", given.get("max_mem"))
            if mem:
                mem = parse_size(mem)
                if mem < MIN_KERNEL_MEM:
                    raise ValueError("maxMem must be at least 32m")
                limits.max_mem = min(limits.max_mem, mem)
            timeout = given.get("execTimeout", given.get("exec_timeout"))
            if timeout:
                timeout = float(timeout)
                if not math.isfinite(timeout) or timeout < 0:
                    raise ValueError("execTimeout must be a positive number of seconds")
                limits.exec_timeout = min(limits.exec_timeout, timeout)
        except (ValueError, TypeError) as exc:
            raise RPCError(proto.ERR_INVALID_ARGS, f"bad limits: {exc}") from None
        return limits

    def end_later(self, kernel: Kernel, reason: str) -> None:
        """Terminate `kernel` in the background (awaited at shutdown)."""
        self.spawn_task(self.terminate(kernel, reason), cleanup=True)

    async def terminate(self, kernel: Kernel, reason: str) -> dict[str, Any]:
        """End a kernel for any reason: stats, kill, clean up, kernel_terminated."""
        if kernel.closing:
            return dict(kernel.usage.last)
        kernel.closing = True
        self.kernels.pop(kernel.id, None)
        stats = dict(kernel.usage.last)
        try:
            stats = await self._measure(kernel)
            if kernel.pty is not None:
                await kernel.pty.close()
            await self.kill_runner(kernel.runner)
            await self.host.destroy(kernel.sandbox)
        except Exception:
            log.exception("kernel %s: clean-up failed", kernel.id)
        finally:
            assert self.events is not None
            self.events.emit("kernel_terminated", kernel_id=kernel.id, reason=reason,
                             stats=stats)
            log.info("kernel %s (%s) terminated: %s", kernel.id, kernel.lang.name, reason)
        return stats

    async def _measure(self, kernel: Kernel) -> dict[str, Any]:
        if not kernel.runner.alive:
            return dict(kernel.usage.last)
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(None, measure, kernel.usage, kernel.root_pids(),
                                              kernel.sandbox.cgroup, self.isolation.net_ns)
        except Exception:
            log.exception("kernel %s: cannot measure usage", kernel.id)
            return dict(kernel.usage.last)

    async def replace_runner(self, kernel: Kernel) -> None:
        """Fresh process for the same kernel (same uid, same folder, new PTY ports)."""
        kernel.restarting = True
        kernel.available.clear()
        try:
            await self._measure(kernel)
            if kernel.sandbox.cgroup is None:  # cgroup counters simply go on
                kernel.usage.close_run()
            if kernel.pty is not None:
                await kernel.pty.close()
                kernel.pty = None
            await self.kill_runner(kernel.runner)
            kernel.sandbox.new_oom_kills()  # those of the run that was just stopped
            kernel.sandbox.settled_tasks = -1  # new processes: the next sweep looks
            runner = await self.spawn_runner(kernel.lang, kernel.sandbox, kernel.limits)
            await self._assign(runner, kernel.limits)
            kernel.runner = runner
            self._watch(kernel, runner)
            assert self.ctx is not None
            kernel.pty = PtySession(self.ctx, self.bind_host, kernel, self.keys)
            kernel.waiting_input = False
            kernel.batch_built = False
        finally:
            kernel.restarting = False
            kernel.available.set()

    async def _assign(self, runner: RunnerProcess, limits: KernelLimits) -> None:
        self.host.set_memory(runner.sandbox, limits.max_mem)
        runner.set_output_limit(limits.max_output)
        reply = await asyncio.wait_for(
            runner.request({"op": "assign", "max_mem": limits.max_mem,
                            "max_output": limits.max_output}), 10)
        if reply.get("type") != "assigned":
            raise RunnerDied(f"unexpected reply to assign: {reply!r}")

    async def _assigned_runner(self, lang: Language, limits: KernelLimits) -> RunnerProcess:
        """A runner from the pool (or started now) that took `limits`.  A pooled runner
        found dead (say, with its fork server) is replaced once, by a fresh one."""
        assert self.pool is not None
        for attempt in (1, 2):
            try:
                runner = await (self.pool.take(lang) if attempt == 1
                                else self.spawn_runner(self.languages[lang.runtime]))
            except (RunnerDied, OSError, RuntimeError) as exc:
                raise RPCError(proto.ERR_CREATION_FAILED, f"cannot start a kernel: {exc}") \
                    from None
            try:
                await self._assign(runner, limits)
                return runner
            except BaseException as exc:
                await asyncio.shield(self.discard_runner(runner))
                if attempt == 1 and isinstance(exc, RunnerDied):
                    log.info("a warm %s runner had died: starting another", lang.runtime)
                    continue
                if isinstance(exc, (RunnerDied, TimeoutError, OSError)):
                    raise RPCError(proto.ERR_CREATION_FAILED,
                                   f"cannot start a kernel: {exc}") from None
                raise
        raise AssertionError("unreachable")

    async def sweep(self, kernel: Kernel, exact: bool = False) -> None:
        """Kill what the last run left running: only the runner's own processes (PID 1
        and its reaper included), a shell kernel's session shell and the terminal's
        processes stay."""
        if not exact and self.host.unchanged(kernel.sandbox, kernel.runner.pid):
            return  # the common case after a run: nothing new in the kernel
        runner = kernel.runner
        sessions = {runner.outer_pid} if runner.outer_pid else set()  # PID 1's (its reaper)
        if kernel.pty is not None and kernel.pty.session_id() is not None:
            sessions.add(kernel.pty.session_id() or 0)
        try:
            killed = await self.host.sweep(kernel.sandbox, runner.keep_pids(), runner.pid,
                                           runner.pid if kernel.lang.kind == "shell" else None,
                                           sessions, exact)
        except Exception:
            log.exception("kernel %s: cannot sweep what its run left", kernel.id)
            return
        if killed:
            log.info("kernel %s: killed %d processes its run left behind", kernel.id, killed)

    def get_kernel(self, args: dict[str, Any]) -> Kernel:
        kernel = self.kernels.get(args["kernel_id"])
        if kernel is None or kernel.closing:
            raise RPCError(proto.ERR_KERNEL_NOT_FOUND, f"no kernel {args['kernel_id']!r} here")
        return kernel

    # --- RPC handlers (the table is in rpc.py) ------------------------------------

    async def ping(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"instance_id": self.instance_id, "version": __version__, "addr": self.addr}

    async def create_kernel(self, args: dict[str, Any]) -> dict[str, Any]:
        lang = self.languages.get(args["lang"])
        if lang is None:
            raise RPCError(proto.ERR_UNSUPPORTED_LANG, f"language {args['lang']!r} is not "
                           f"offered here (offered: {', '.join(sorted(self.languages))})")
        kernel_id: str = args.get("kernel_id") or uuid.uuid4().hex
        if len(kernel_id) > MAX_KERNEL_ID:
            raise RPCError(proto.ERR_INVALID_ARGS, "kernel_id is too long")
        if kernel_id in self.kernels:
            raise RPCError(proto.ERR_INVALID_ARGS, f"kernel {kernel_id!r} already exists")
        limits = self._requested_limits(lang, args.get("limits"))
        if len(self.kernels) + self.creating >= self.config.agent_max_kernels:
            raise RPCError(proto.ERR_NO_CAPACITY, "this agent runs its maximum of "
                           f"{self.config.agent_max_kernels} kernels")
        if self.stopping.is_set():
            raise RPCError(proto.ERR_NO_CAPACITY, "the agent is shutting down")
        self.creating += 1
        assert self.pool is not None and self.ctx is not None
        try:
            runner = await self._assigned_runner(lang, limits)
            try:
                kernel = Kernel(id=kernel_id, lang=lang, limits=limits,
                                isolation=self.isolation, runner=runner)
                self._watch(kernel, runner)
                pty = kernel.pty = PtySession(self.ctx, self.bind_host, kernel, self.keys)
            except BaseException as exc:
                await asyncio.shield(self.discard_runner(runner))
                if isinstance(exc, (RunnerDied, TimeoutError, OSError, zmq.ZMQError)):
                    raise RPCError(proto.ERR_CREATION_FAILED,
                                   f"cannot start a kernel: {exc}") from None
                raise
            if args.get("mounts"):
                log.info("kernel %s: mounts are not supported by this agent; ignored", kernel_id)
            self.kernels[kernel_id] = kernel
        finally:
            self.creating -= 1
        log.info("kernel %s (%s) created", kernel_id, lang.name)
        return {"kernel_id": kernel_id, "stdin_port": pty.stdin_port,
                "stdout_port": pty.stdout_port, "limits": limits.public()}

    async def destroy_kernel(self, args: dict[str, Any]) -> dict[str, Any]:
        kernel = self.get_kernel(args)
        return await self.terminate(kernel, args.get("reason") or proto.REASON_DESTROYED)

    async def restart_kernel(self, args: dict[str, Any]) -> dict[str, Any]:
        kernel = self.get_kernel(args)
        kernel.touch()
        try:
            await self.replace_runner(kernel)
        except (RunnerDied, OSError, TimeoutError, RuntimeError) as exc:
            await self.terminate(kernel, proto.REASON_EXITED)
            raise RPCError(proto.ERR_CREATION_FAILED, f"restart failed: {exc}") from None
        assert kernel.pty is not None
        log.info("kernel %s restarted", kernel.id)
        return {"stdin_port": kernel.pty.stdin_port, "stdout_port": kernel.pty.stdout_port}

    async def execute(self, args: dict[str, Any]) -> dict[str, Any]:
        kernel = self.get_kernel(args)
        return await self.execution.execute(kernel, args["mode"], args["code"],
                                            args.get("opts") or {})

    async def upload_file(self, args: dict[str, Any]) -> dict[str, Any]:
        kernel = self.get_kernel(args)
        kernel.touch()
        loop = asyncio.get_running_loop()
        try:
            size = await loop.run_in_executor(None, write_upload, kernel.workdir, args["name"],
                                              args["data"], kernel.uid,
                                              self.config.max_upload_size)
        except ValueError as exc:
            raise RPCError(proto.ERR_INVALID_ARGS, str(exc)) from None
        except OSError as exc:
            raise RPCError(proto.ERR_UPLOAD_FAILED, f"cannot write {args['name']!r}: "
                           f"{exc.strerror or exc}") from None
        return {"name": args["name"], "size": size}

    async def resize_pty(self, args: dict[str, Any]) -> dict[str, Any]:
        kernel = self.get_kernel(args)
        rows, cols = args["rows"], args["cols"]
        if not (1 <= rows <= 1000 and 1 <= cols <= 1000):
            raise RPCError(proto.ERR_INVALID_ARGS, "rows and cols must be within 1..1000")
        if kernel.pty is not None:
            kernel.pty.resize(rows, cols)
        return {}

    async def list_kernels(self, args: dict[str, Any]) -> dict[str, Any]:
        return {
            kernel.id: {"lang": kernel.lang.name, "created_at": kernel.created_at,
                        "stdin_port": kernel.pty.stdin_port if kernel.pty else 0,
                        "stdout_port": kernel.pty.stdout_port if kernel.pty else 0}
            for kernel in list(self.kernels.values()) if not kernel.closing
        }

    async def reset(self, args: dict[str, Any]) -> dict[str, Any]:
        kernels = list(self.kernels.values())
        await asyncio.gather(*(self.terminate(k, proto.REASON_RESET) for k in kernels))
        return {"destroyed": [k.id for k in kernels]}

    # --- loops ------------------------------------------------------------------

    async def _heartbeats(self) -> None:
        assert self.events is not None
        interval = self.config.heartbeat_interval
        while True:
            await asyncio.sleep(interval)
            self.events.emit("instance_heartbeat", info=self.info(),
                             running_kernels=sorted(self.kernels), interval=interval)

    async def _stats_loop(self) -> None:
        assert self.events is not None
        while True:
            await asyncio.sleep(self.config.agent_stats_interval)
            kernels = [k for k in self.kernels.values() if not k.closing]
            if not kernels:
                continue
            figures = await asyncio.gather(*(self._measure(k) for k in kernels))
            self.events.emit("instance_stats",
                             stats={k.id: s for k, s in zip(kernels, figures, strict=True)})
            for kernel in kernels:  # between runs: what a run may have hidden (sweep)
                if not kernel.busy and not kernel.closing and not kernel.restarting:
                    await self.sweep(kernel, exact=True)

    async def _idle_sweeper(self) -> None:
        period = max(0.05, min(1.0, self.config.agent_idle_timeout / 4))
        while True:
            await asyncio.sleep(period)
            for kernel in list(self.kernels.values()):
                if not kernel.closing and not kernel.restarting \
                        and kernel.idle_for() > kernel.limits.idle_timeout:
                    log.info("kernel %s idle for %.0f s", kernel.id, kernel.idle_for())
                    self.end_later(kernel, proto.REASON_IDLE)


async def serve(config: SornaConfig, *, private_mounts: bool = False) -> None:
    """Run an agent until SIGTERM/SIGINT; then destroy every kernel and exit."""
    agent = Agent(config, private_mounts=private_mounts)
    loop = asyncio.get_running_loop()
    stop = agent.stopping
    signals_seen = 0

    def on_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen > 1:
            log.warning("second signal: exiting without cleaning up")
            os._exit(1)
        log.info("received %s", signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await agent.start()
        await stop.wait()
    finally:
        started = time.monotonic()
        await agent.shutdown()
        log.info("shutdown took %.2f s", time.monotonic() - started)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
