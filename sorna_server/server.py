"""`run(config)`: the gateway server process(es) behind `sorna serve`.

One process (the default) runs the HTTP(S) API, the legacy ZMQ listener and the
agent event intake.  With `config.workers > 1` a supervisor starts that many
worker processes that share the HTTP port (SO_REUSEPORT), Redis and the
database; only worker 0 binds the ZMQ ports (legacy and events).

Shutdown (SIGTERM/SIGINT): stop accepting connections, let requests in flight
finish within `config.shutdown_timeout`, close WebSockets, release resources;
Redis and database state is left as it is (a restart re-syncs).  A second
signal forces the exit.  In standalone mode a local reference agent is a
child process, stopped (its kernels destroyed and settled) with the server.

The server never prints: it logs, and hands a `ServerInfo` to the caller's
`on_ready` callback (the CLI prints the banner).  Logging is set up by the
caller (`sorna serve`: `sorna_server.logs.setup_logging`), and by each worker
process for itself.

Metrics: `/metrics` is on the API port unless `metrics_addr` moves it to a
separate listener (bound by the primary process) or `metrics_enabled` is off.
With several workers the supervisor gives them a private, empty directory for
prometheus_client's multiprocess mode (`PROMETHEUS_MULTIPROC_DIR`), so a
scrape of any worker adds up all workers' counts; the directory is removed when
the server stops (and a crashed server's is removed at the next start).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import ssl
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from aiohttp import web

from . import curve
from .children import die_with_parent
from .config import SornaConfig
from .datadir import prepare_data_dir
from .db.engine import open_database
from .db.models import keypairs
from .gateway import keys
from .gateway.access_log import RequestLog
from .gateway.app import create_app
from .gateway.prometheus import MULTIPROC_ENV, metrics_app
from .logs import setup_logging
from .redis_conn import EmbeddedRedis
from .registry.intake import gateway_side

log = logging.getLogger(__name__)
access_log = logging.getLogger("sorna.access")

EXAMPLE_FIXTURE = "example_keypair"
AGENT_START_TIMEOUT = 60.0
AGENT_STOP_TIMEOUT = 20.0
WORKER_START_TIMEOUT = 60.0
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
METRICS_DIR_PREFIX = "prometheus-"


class StartupError(Exception):
    """The server could not start; the message is one line for the operator."""


@dataclass
class ServerInfo:
    endpoint: str
    events_addr: str
    legacy_addr: str
    workers: int
    standalone: bool
    data_dir: str
    access_key: str | None = None
    secret_key: str | None = None
    agent_addr: str | None = None
    agent_log: str | None = None
    metrics_url: str | None = None
    agent_protections_off: list[str] | None = None  # what the local agent's kernels lack


def run(config: SornaConfig, *, standalone: bool = False,
        on_ready: Callable[[ServerInfo], None] | None = None) -> None:
    """Serve until SIGTERM/SIGINT (blocking)."""
    if standalone or config.uses_embedded_db or config.explicit_redis_url is None:
        prepare_data_dir(config.data_dir)
    if standalone and config.gateway_key is None:
        config = with_standalone_keys(config)
    check_keys(config)
    if config.workers > 1:
        _run_loop(Supervisor(config, standalone=standalone, on_ready=on_ready).serve())
    else:
        _run_loop(GatewayServer(config, standalone=standalone, on_ready=on_ready).serve())


def check_keys(config: SornaConfig) -> None:
    """Fail at once (CurveKeyError, one line) on unreadable keys, or on a
    non-loopback events port without keys."""
    gateway_side(config)
    if config.legacy_enabled and not curve.is_loopback(config.manager_ip):
        log.warning("the legacy ZMQ interface has no authentication and listens on %s: "
                    "keep that network trusted", config.manager_ip)


def with_standalone_keys(config: SornaConfig) -> SornaConfig:
    """The config with CurveZMQ keys for the gateway and its local agent, made in
    the data directory on first use (`keys/gateway.*`, `keys/agent.*`)."""
    folder = config.data_dir.resolve() / "keys"
    for name in ("gateway", "agent"):
        if not (folder / f"{name}{curve.SECRET_SUFFIX}").is_file():
            curve.generate(folder / name, overwrite=True)
            log.info("made the CurveZMQ key %s", folder / f"{name}{curve.SECRET_SUFFIX}")
    return config.model_copy(update={
        "gateway_key": folder / f"gateway{curve.SECRET_SUFFIX}",
        "agent_keys": folder / f"agent{curve.PUBLIC_SUFFIX}",
        "agent_key": folder / f"agent{curve.SECRET_SUFFIX}",
        "gateway_keys": folder / f"gateway{curve.PUBLIC_SUFFIX}"})


def _run_loop(coro: Any) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


# --- shared pieces -------------------------------------------------------------

def endpoint_of(config: SornaConfig, port: int) -> str:
    scheme = "https" if config.ssl_cert else "http"
    host = config.service_ip
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


def ssl_context(config: SornaConfig) -> ssl.SSLContext | None:
    if not config.ssl_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(str(config.ssl_cert), str(config.ssl_key))
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(f"cannot load ssl_cert/ssl_key: {exc}") from None
    return context


def example_keypair() -> dict[str, Any]:
    from .fixture_loader import load_fixture
    return load_fixture(EXAMPLE_FIXTURE)["keypairs"][0]


async def prepare_standalone(config: SornaConfig) -> dict[str, Any]:
    """Create or upgrade the schema and load the example keypair when absent."""
    from .fixture_loader import populate
    from .schema import ensure_schema

    outcome = await ensure_schema(config)
    log.info("schema %s (%s)", outcome, "embedded SQLite" if config.uses_embedded_db else "db")
    example = example_keypair()
    async with open_database(config) as engine:
        async with engine.connect() as conn:
            present = (await conn.execute(sa.select(keypairs.c.access_key).where(
                keypairs.c.access_key == example["access_key"]))).first()
        if present is None:
            await populate(engine, EXAMPLE_FIXTURE)
            log.info("loaded the %s fixture", EXAMPLE_FIXTURE)
    return example


class SignalCatcher:
    """First signal: graceful stop; second: `on_force`.  Restores the old handlers."""

    def __init__(self, on_force: Callable[[], None]):
        self.stop = asyncio.Event()
        self.on_force = on_force
        self.count = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    def install(self) -> None:
        self._loop = asyncio.get_running_loop()
        for sig in HANDLED_SIGNALS:
            self._loop.add_signal_handler(sig, self._handle, sig)

    def restore(self) -> None:
        if self._loop is not None:
            for sig in HANDLED_SIGNALS:
                self._loop.remove_signal_handler(sig)
            self._loop = None

    def _handle(self, sig: int) -> None:
        self.count += 1
        if self.count == 1:
            log.info("received %s: shutting down (send it again to force)",
                     signal.Signals(sig).name)
            self.stop.set()
        else:
            log.warning("received %s again: forcing exit", signal.Signals(sig).name)
            self.on_force()


# --- one gateway process ---------------------------------------------------------

class GatewayServer:
    def __init__(self, config: SornaConfig, *, primary: bool = True, standalone: bool = False,
                 reuse_port: bool = False, prepared: bool = False, own_redis: bool = True,
                 on_ready: Callable[[ServerInfo], None] | None = None):
        self.config = config
        self.primary = primary
        self.standalone = standalone
        self.reuse_port = reuse_port
        self.prepared = prepared
        self.own_redis = own_redis
        self.on_ready = on_ready
        self.signals = SignalCatcher(self.force_exit)
        self.runner: web.AppRunner | None = None
        self.metrics_runner: web.AppRunner | None = None
        self.redis: EmbeddedRedis | None = None
        self.agent: asyncio.subprocess.Process | None = None
        self.example: dict[str, Any] | None = None
        self.info: ServerInfo | None = None

    async def serve(self) -> None:
        self.signals.install()
        try:
            await self.startup()
            if self.on_ready is not None and self.info is not None:
                self.on_ready(self.info)
            await self.signals.stop.wait()
        finally:
            try:
                await self.shutdown()
            finally:
                self.signals.restore()

    def request_stop(self) -> None:
        self.signals.stop.set()

    async def startup(self) -> None:
        config = self.config
        context = ssl_context(config)
        if self.standalone and self.primary:
            if self.prepared:
                self.example = example_keypair()
            else:
                self.example = await prepare_standalone(config)
        if self.own_redis and config.explicit_redis_url is None:
            self.redis = EmbeddedRedis(config.data_dir)
            await self.redis.start()
        app = create_app(config, primary=self.primary)
        if self.standalone and self.primary:
            app.cleanup_ctx.append(self._agent_ctx)
        self.runner = web.AppRunner(app, access_log_class=RequestLog, access_log=access_log,
                                    access_log_format=config.log_format,
                                    shutdown_timeout=config.shutdown_timeout,
                                    handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, config.service_ip, config.http_port,
                           ssl_context=context, reuse_port=self.reuse_port or None)
        try:
            await site.start()
        except OSError as exc:
            raise StartupError(f"cannot listen on {config.service_ip}:{config.http_port}: "
                               f"{exc.strerror or exc}") from None
        endpoint = endpoint_of(config, self.runner.addresses[0][1])
        log.info("gateway listening on %s (pid %d%s)", endpoint, os.getpid(),
                 ", primary" if self.primary else "")
        if config.metrics_enabled and config.metrics_addr and self.primary:
            await self._start_metrics(app, config.metrics_addr)
        agent_addr, protections_off = None, None
        if self.standalone and self.primary:
            agent_addr, protections_off = await self._wait_for_agent(app)
        self.info = ServerInfo(
            endpoint=endpoint,
            events_addr=f"tcp://{config.events_ip}:{config.events_port}",
            legacy_addr=f"tcp://{config.manager_ip}:{config.manager_port}"
            if config.legacy_enabled else "off",
            workers=config.workers, standalone=self.standalone,
            data_dir=str(config.data_dir.resolve()),
            access_key=(self.example or {}).get("access_key"),
            secret_key=(self.example or {}).get("secret_key"),
            agent_addr=agent_addr, agent_protections_off=protections_off,
            agent_log=str(self._agent_log_path()) if self.standalone else None,
            metrics_url=self._metrics_url(endpoint))

    def _metrics_url(self, endpoint: str) -> str | None:
        if not self.config.metrics_enabled:
            return None
        if self.config.metrics_addr:
            return f"http://{self.config.metrics_addr}/metrics"
        return f"{endpoint}/metrics"

    async def _start_metrics(self, app: web.Application, addr: str) -> None:
        host, _, port = addr.rpartition(":")
        self.metrics_runner = web.AppRunner(metrics_app(app), access_log=None,
                                            handle_signals=False)
        await self.metrics_runner.setup()
        site = web.TCPSite(self.metrics_runner, host.strip("[]"), int(port))
        try:
            await site.start()
        except OSError as exc:
            raise StartupError(f"cannot listen on metrics_addr {addr}: "
                               f"{exc.strerror or exc}") from None
        log.info("metrics on http://%s/metrics", addr)

    async def shutdown(self) -> None:
        if self.metrics_runner is not None:
            metrics_runner, self.metrics_runner = self.metrics_runner, None
            await metrics_runner.cleanup()
        if self.runner is not None:
            runner, self.runner = self.runner, None
            in_flight = runner.server.requests_count if runner.server else 0
            bound = self.config.shutdown_timeout + AGENT_STOP_TIMEOUT + 10
            try:
                await asyncio.wait_for(runner.cleanup(), bound)
            except TimeoutError:
                log.error("shutdown took longer than %.0f s; %d requests may have been cut off",
                          bound, in_flight)
        if self.redis is not None:
            await self.redis.stop()
            self.redis = None
        log.info("gateway stopped")

    def force_exit(self) -> None:
        server = self.runner.server if self.runner else None
        log.warning("forced exit: %d requests in flight were cut off",
                    server.requests_count if server else 0)
        for process in (self.agent, self.redis.process if self.redis else None):
            if process is not None and process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
        logging.shutdown()
        os._exit(1)

    # --- the standalone agent ------------------------------------------------
    def _agent_rpc_addr(self) -> str:
        return f"tcp://127.0.0.1:{self.config.agent_port}"

    def _agent_log_path(self) -> Path:
        return self.config.data_dir.resolve() / "agent.log"

    async def _agent_ctx(self, app: web.Application) -> AsyncIterator[None]:
        config = self.config
        args = [sys.executable, "-m", "sorna_cli", "--data-dir", str(config.data_dir.resolve()),
                "--log-level", config.log_level, "--log-format", config.log_format, "agent",
                "--rpc-addr", self._agent_rpc_addr(),
                *(["--key", str(config.agent_key), "--gateway-keys", str(config.gateway_keys)]
                  if config.agent_key and config.gateway_keys else []),
                "--manager", f"tcp://127.0.0.1:{config.events_port}",
                "--max-kernels", str(config.agent_max_kernels),
                "--exec-timeout", str(config.agent_exec_timeout),
                "--idle-timeout", str(config.agent_idle_timeout),
                "--heartbeat-interval", str(config.heartbeat_interval),
                # a laptop trial runs with what the host allows; the banner says what is off
                "--isolation", "best-effort" if config.agent_isolation == "auto"
                else config.agent_isolation]
        log_file = self._agent_log_path().open("ab")
        try:
            env = {k: v for k, v in os.environ.items() if k != MULTIPROC_ENV}
            self.agent = await asyncio.create_subprocess_exec(
                *args, stdin=asyncio.subprocess.DEVNULL, stdout=log_file, stderr=log_file, env=env,
                start_new_session=True, preexec_fn=die_with_parent)
        finally:
            log_file.close()
        log.info("started the reference agent (pid %d) on %s", self.agent.pid,
                 self._agent_rpc_addr())
        try:
            yield
        finally:
            await self._stop_agent(app)

    async def _wait_for_agent(self, app: web.Application) -> tuple[str, list[str]]:
        registry = app[keys.REGISTRY]
        addr = self._agent_rpc_addr()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + AGENT_START_TIMEOUT
        while loop.time() < deadline:
            if self.agent is not None and self.agent.returncode is not None:
                raise StartupError(f"the reference agent exited with {self.agent.returncode}; "
                                   f"see {self._agent_log_path()}")
            for instance in await registry.list_instances():
                if instance.addr == addr and instance.status == "running":
                    return addr, list(instance.isolation.get("protections_off") or [])
            await asyncio.sleep(0.1)
        raise StartupError(f"the reference agent did not register within "
                           f"{AGENT_START_TIMEOUT:.0f} s; see {self._agent_log_path()}")

    async def _stop_agent(self, app: web.Application) -> None:
        agent, self.agent = self.agent, None
        if agent is None or agent.returncode is not None:
            return
        agent.terminate()
        try:
            await asyncio.wait_for(agent.wait(), AGENT_STOP_TIMEOUT)
        except TimeoutError:
            log.warning("the reference agent did not stop within %.0f s; killing it",
                        AGENT_STOP_TIMEOUT)
            agent.kill()
            await agent.wait()
        # let the intake settle the kernel_terminated events the agent sent on its way out
        registry = app.get(keys.REGISTRY)
        if registry is None:
            return
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            instances = [i for i in await _quiet(registry.list_instances(), [])
                         if i.addr == self._agent_rpc_addr()]
            if not instances or all(i.status != "running" or i.num_kernels == 0
                                    for i in instances):
                break
            await asyncio.sleep(0.1)


async def _quiet(coro: Any, default: Any) -> Any:
    try:
        return await coro
    except Exception:
        return default


# --- several worker processes -------------------------------------------------------

def _worker_main(values: dict[str, Any], index: int, standalone: bool, conn: Any) -> None:
    """Entry point of a worker process (spawned)."""
    os.setpgrp()  # a terminal's Ctrl-C reaches the supervisor only; it tells us
    die_with_parent()
    setup_logging(values.get("log_level", "INFO"), values.get("log_format", "text"),
                  label=f"w{index}")
    config = SornaConfig.model_construct(**values)

    def ready(info: ServerInfo) -> None:
        conn.send(("ready", asdict(info)))

    server = GatewayServer(config, primary=index == 0, standalone=standalone, reuse_port=True,
                           prepared=True, own_redis=False, on_ready=ready)
    try:
        _run_loop(server.serve())
    except Exception as exc:
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        raise SystemExit(1) from None


def prepare_metrics_dir(data_dir: Path) -> Path:
    """An empty private folder for this server's multiprocess metrics.

    Folders of servers that are gone (a crash skips the clean-up) are removed.
    """
    root = data_dir.resolve()
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    for old in root.glob(METRICS_DIR_PREFIX + "*"):
        pid = old.name.removeprefix(METRICS_DIR_PREFIX)
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    folder = root / f"{METRICS_DIR_PREFIX}{os.getpid()}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(mode=0o700)
    return folder


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Supervisor:
    def __init__(self, config: SornaConfig, *, standalone: bool = False,
                 on_ready: Callable[[ServerInfo], None] | None = None):
        self.config = config
        self.standalone = standalone
        self.on_ready = on_ready
        self.processes: list[multiprocessing.process.BaseProcess] = []
        self.redis: EmbeddedRedis | None = None
        self.metrics_dir: Path | None = None
        self.signals = SignalCatcher(self.force_exit)

    async def serve(self) -> None:
        self.signals.install()
        try:
            if self.standalone:
                await prepare_standalone(self.config)
            if self.config.explicit_redis_url is None:
                self.redis = EmbeddedRedis(self.config.data_dir)
                await self.redis.start()
            if self.config.metrics_enabled:
                self.metrics_dir = prepare_metrics_dir(self.config.data_dir)
                os.environ[MULTIPROC_ENV] = str(self.metrics_dir)
            info = await self._start_workers()
            if self.on_ready is not None:
                self.on_ready(info)
            while not self.signals.stop.is_set():
                if not any(p.is_alive() for p in self.processes):
                    log.error("every worker has exited; stopping")
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.signals.stop.wait(), 0.5)
        finally:
            try:
                await self._stop_workers()
                if self.redis is not None:
                    await self.redis.stop()
                if self.metrics_dir is not None:
                    os.environ.pop(MULTIPROC_ENV, None)
                    shutil.rmtree(self.metrics_dir, ignore_errors=True)
            finally:
                self.signals.restore()

    async def _start_workers(self) -> ServerInfo:
        ctx = multiprocessing.get_context("spawn")
        values = {name: getattr(self.config, name) for name in type(self.config).model_fields}
        pipes = []
        for index in range(self.config.workers):
            receiver, sender = ctx.Pipe(duplex=False)
            process = ctx.Process(target=_worker_main, name=f"sorna-worker-{index}",
                                  args=(values, index, self.standalone, sender), daemon=False)
            process.start()
            sender.close()
            self.processes.append(process)
            pipes.append(receiver)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WORKER_START_TIMEOUT + (AGENT_START_TIMEOUT if self.standalone
                                                         else 0)
        infos: dict[int, ServerInfo] = {}
        while len(infos) < len(pipes):
            if self.signals.stop.is_set():
                raise StartupError("interrupted while the workers were starting")
            if loop.time() > deadline:
                raise StartupError("the workers did not start in time")
            for index, pipe in enumerate(pipes):
                if index in infos:
                    continue
                if pipe.poll():
                    try:
                        kind, payload = pipe.recv()
                    except EOFError:
                        raise StartupError(f"worker {index} exited during start-up") from None
                    if kind != "ready":
                        raise StartupError(f"worker {index} failed to start: {payload}")
                    infos[index] = ServerInfo(**payload)
                elif not self.processes[index].is_alive():
                    raise StartupError(f"worker {index} exited during start-up "
                                       f"(code {self.processes[index].exitcode})")
            await asyncio.sleep(0.05)
        return infos[0]

    async def _stop_workers(self) -> None:
        for process in self.processes:
            if process.is_alive() and process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)
        bound = self.config.shutdown_timeout + AGENT_STOP_TIMEOUT + 15
        deadline = time.monotonic() + bound
        while any(p.is_alive() for p in self.processes) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        for process in self.processes:
            if process.is_alive():
                log.error("worker %s did not stop within %.0f s; killing it", process.name, bound)
                process.kill()
            process.join(1)

    def force_exit(self) -> None:
        log.warning("forced exit: killing %d workers", len(self.processes))
        for process in self.processes:
            if process.is_alive() and process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGKILL)
        if self.redis is not None and self.redis.process is not None:
            with contextlib.suppress(ProcessLookupError):
                self.redis.process.kill()
        logging.shutdown()
        os._exit(1)
