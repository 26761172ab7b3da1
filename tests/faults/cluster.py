"""A whole Sorna deployment of real processes, a bounded load, and the
accounting invariants: the plumbing of the fault suite (tests/faults/) and of
bench/soak.py.

- `Cluster`: a private redis-server on its own port (killable, restartable),
  the database (a URL given, or a private PostgreSQL cluster of its own that
  can be stopped: `PrivatePostgres`), N gateway processes (`sorna serve`, each
  with its own events port) and M reference agents (`sorna agent`) sending
  events to every gateway.  Loopback only.
- `Load`: clients looping create -> executes -> destroy over signed HTTP,
  spread over the gateways; every answer is counted by operation, status and
  problem type.  Bounded: it stops when told, or after `max_seconds`.
- `check_invariants`: the invariants of issue 10, read from the database,
  Redis, the agents (RPC `list_kernels`) and `sorna registry reconcile`.
"""
from __future__ import annotations

import asyncio
import contextlib
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import sqlalchemy as sa

from sorna_server import keypairs as keypair_api
from sorna_server.agent_client import AgentError, AgentRPCClient
from sorna_server.config import SornaConfig, load_config
from sorna_server.db.engine import create_engine
from sorna_server.db.models import LIVE_STATUSES, kernels, keypairs, usage
from sorna_server.redis_conn import RedisClients
from sorna_server.registry import Registry
from sorna_server.schema import ensure_schema
from tests.helpers import VERSION, PrivateRedis, client_signature, free_port, ping_agent

PROBLEM_PREFIX = "https://api.sorna.io/probs/"


# --- processes -----------------------------------------------------------------
def _wait_port(port: int, timeout: float, proc: subprocess.Popen | None = None,
               log: Path | None = None) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            text = log.read_text(errors="replace")[-3000:] if log else ""
            raise RuntimeError(f"process exited with {proc.returncode}:\n{text}")
        with socket.socket() as sock:
            sock.settimeout(0.2)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


class PrivatePostgres:
    """A PostgreSQL cluster of the test's own (initdb + pg_ctl on a free port), so
    stopping it never touches a shared server.  Needs the server binaries under
    /usr/lib/postgresql/*/bin and the `postgres` system user (initdb refuses root)."""

    def __init__(self) -> None:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
        if not found:
            raise RuntimeError("no PostgreSQL server binaries under /usr/lib/postgresql")
        self.bin = Path(found[-1]).parent
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="sorna-pg-"))
        shutil.chown(self.dir, "postgres", "postgres")
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"

    @staticmethod
    def available() -> bool:
        import pwd

        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return False
        return bool(glob.glob("/usr/lib/postgresql/*/bin/initdb"))

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        command = ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else list(args)
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def init(self) -> None:
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U",
                  "postgres", "--no-sync")

    def start(self) -> None:
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                   "-c max_connections=200")
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log),
                  "-o", options, "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class GatewayProcess:
    index: int
    port: int
    events_port: int
    manager_port: int
    data_dir: Path
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.data_dir / "gateway.log"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class AgentProc:
    index: int
    instance_id: str
    port: int
    data_dir: Path
    proc: subprocess.Popen | None = None

    @property
    def addr(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.data_dir / "agent.log"


@dataclass
class Settings:
    heartbeat_interval: float = 1.0
    reconcile_interval: float = 2.0
    agent_rpc_timeout: float = 2.0
    creation_deadline: float = 1.0  # raised to the creation time-out (16 s here)
    max_kernels: int = 6
    gateways: int = 2
    agents: int = 2


class Cluster:
    def __init__(self, workdir: Path, db_url: str, settings: Settings | None = None):
        self.workdir = workdir
        self.db_url = db_url
        self.settings = settings or Settings()
        self.redis = PrivateRedis(free_port(), workdir)
        self.gateways = [GatewayProcess(i, free_port(), free_port(), free_port(),
                                        workdir / f"gateway-{i}")
                         for i in range(self.settings.gateways)]
        self.agents = [AgentProc(i, f"i-fault-{i}-{uuid.uuid4().hex[:6]}", free_port(),
                                 workdir / f"agent-{i}")
                       for i in range(self.settings.agents)]
        self.config: SornaConfig = self.make_config()

    def make_config(self) -> SornaConfig:
        s = self.settings
        return load_config(None, data_dir=str(self.workdir / "cli"), db_url=self.db_url,
                           redis_url=self.redis.url, heartbeat_interval=s.heartbeat_interval,
                           reconcile_interval=s.reconcile_interval,
                           agent_rpc_timeout=s.agent_rpc_timeout,
                           creation_deadline=s.creation_deadline)

    @property
    def env(self) -> dict[str, str]:
        """Environment of every process (settings by SORNA_* variables)."""
        s = self.settings
        base = {k: v for k, v in os.environ.items() if not k.startswith("SORNA_")
                or k.startswith("SORNA_TEST_")}
        return {**base, "SORNA_DB_URL": self.db_url, "SORNA_REDIS_URL": self.redis.url,
                "SORNA_HEARTBEAT_INTERVAL": str(s.heartbeat_interval),
                "SORNA_RECONCILE_INTERVAL": str(s.reconcile_interval),
                "SORNA_AGENT_RPC_TIMEOUT": str(s.agent_rpc_timeout),
                "SORNA_CREATION_DEADLINE": str(s.creation_deadline),
                "SORNA_LOG_LEVEL": "INFO"}

    # --- lifecycle ---------------------------------------------------------------
    async def prepare_database(self, keys: int) -> list[tuple[str, str]]:
        """Schema and `keys` keypairs (concurrency limit 4 each)."""
        await ensure_schema(self.config)
        engine = create_engine(self.config)
        pairs = []
        try:
            for n in range(keys):
                access = f"AKIAFAULT{n:04d}{uuid.uuid4().hex[:7].upper()}"
                secret = uuid.uuid4().hex + uuid.uuid4().hex[:8]
                await keypair_api.create_keypair(engine, 10 + n, concurrency_limit=4,
                                                 rate_limit=10 ** 6, access_key=access,
                                                 secret_key=secret)
                pairs.append((access, secret))
        finally:
            await engine.dispose()
        return pairs

    def start(self) -> None:
        self.redis.start()
        for gateway in self.gateways:
            self.start_gateway(gateway.index)
        for agent in self.agents:
            self.start_agent(agent.index)

    def start_gateway(self, index: int) -> None:
        gw = self.gateways[index]
        gw.data_dir.mkdir(parents=True, exist_ok=True)
        args = [sys.executable, "-m", "sorna_cli", "--data-dir", str(gw.data_dir), "serve",
                "--host", "127.0.0.1", "--port", str(gw.port), "--events-port",
                str(gw.events_port), "--manager-port", str(gw.manager_port)]
        gw.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL,
                                   stderr=gw.log.open("ab"), env={
                                       **self.env, "SORNA_EVENTS_IP": "127.0.0.1",
                                       "SORNA_MANAGER_IP": "127.0.0.1"})
        _wait_port(gw.port, 60, gw.proc, gw.log)

    def start_agent(self, index: int) -> None:
        agent = self.agents[index]
        agent.data_dir.mkdir(parents=True, exist_ok=True)
        args = [sys.executable, "-m", "sorna_cli", "--data-dir", str(agent.data_dir), "agent",
                "--rpc-addr", agent.addr, "--instance-id", agent.instance_id,
                "--max-kernels", str(self.settings.max_kernels), "--pool-size", "1",
                "--heartbeat-interval", str(self.settings.heartbeat_interval),
                "--isolation", "none"]
        for gw in self.gateways:
            args += ["--manager", f"tcp://127.0.0.1:{gw.events_port}"]
        agent.proc = subprocess.Popen(args, stdout=agent.log.open("ab"),
                                      stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + 60
        while not ping_agent(agent.addr, 0.5):
            if agent.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"agent did not start:\n{agent.log.read_text()[-3000:]}")

    def signal_agent(self, index: int, sig: int) -> None:
        proc = self.agents[index].proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            if sig == signal.SIGKILL:
                proc.wait()

    def kill_gateway(self, index: int) -> None:
        proc = self.gateways[index].proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def stop(self) -> None:
        for agent in self.agents:
            if agent.proc is not None and agent.proc.poll() is None:
                agent.proc.send_signal(signal.SIGCONT)
        for proc in [a.proc for a in self.agents] + [g.proc for g in self.gateways]:
            if proc is not None and proc.poll() is None:
                proc.terminate()
        for proc in [a.proc for a in self.agents] + [g.proc for g in self.gateways]:
            if proc is None:
                continue
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.redis.stop()

    def logs(self, tail: int = 4000) -> str:
        parts = []
        for path in [g.log for g in self.gateways] + [a.log for a in self.agents]:
            if path.exists():
                parts.append(f"--- {path.parent.name}\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Every gateway answers and every agent is registered in Redis."""
        async def ready() -> bool:
            redis = RedisClients.connect(self.redis.url, self.config)
            try:
                registry = Registry(self.config, redis, create_engine(self.config),
                                    AgentRPCClient())
                alive = [i.id for i in await registry.list_instances() if i.status == "running"]
                await registry.db.dispose()
                await registry.rpc.close()
                return all(a.instance_id in alive for a in self.agents)
            except Exception:
                return False
            finally:
                await redis.close()
        deadline = time.monotonic() + timeout
        while not await ready():
            if time.monotonic() > deadline:
                raise RuntimeError("cluster not ready:\n" + self.logs())
            await asyncio.sleep(0.2)


# --- load ----------------------------------------------------------------------------
@dataclass
class Outcome:
    op: str
    status: int | str  # HTTP status, or "conn-error"
    problem: str = ""


@dataclass
class Load:
    """Clients looping create -> `executes` x execute -> destroy."""

    cluster: Cluster
    keypairs: list[tuple[str, str]]
    clients: int = 4
    executes: int = 3
    max_seconds: float = 300.0
    exit_code_every: int = 0  # every n-th kernel runs code that ends it (kernel_terminated)
    counts: Counter = field(default_factory=Counter)
    server_errors: list[str] = field(default_factory=list)
    kernels_done: int = 0
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task] = field(default_factory=list)
    _session: aiohttp.ClientSession | None = None

    def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        self._tasks = [asyncio.create_task(self._client(n)) for n in range(self.clients)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    def status_counts(self) -> dict[str, int]:
        """'op status problem' -> count."""
        return {" ".join(str(p) for p in key if p != ""): n
                for key, n in sorted(self.counts.items(), key=lambda kv: str(kv[0]))}

    @property
    def answered_500(self) -> int:
        return sum(n for (op, status, problem), n in self.counts.items()
                   if isinstance(status, int) and status >= 500 and status != 503)

    async def request(self, gateway: int, method: str, path: str, body: Any,
                      keypair: tuple[str, str], op: str) -> tuple[int | str, Any]:
        gw = self.cluster.gateways[gateway]
        data = b"" if body is None else json.dumps(body).encode()
        host = f"127.0.0.1:{gw.port}"
        date = datetime.now(UTC).isoformat()
        signature = client_signature(method, path, date, host, "application/json", data,
                                     keypair[1])
        headers = {"Date": date, "X-Sorna-Version": VERSION, "Content-Type": "application/json",
                   "Authorization": f"Sorna signMethod=HMAC-SHA256, "
                                    f"credential={keypair[0]}:{signature}"}
        assert self._session is not None
        try:
            async with self._session.request(method, gw.url + path, data=data,
                                             headers=headers) as resp:
                text = await resp.text()
                status: int | str = resp.status
        except (aiohttp.ClientError, TimeoutError, OSError):
            self.counts[(op, "conn-error", "")] += 1
            return "conn-error", None
        try:
            payload = json.loads(text) if text else None
        except ValueError:
            payload = text
        problem = ""
        if isinstance(payload, dict) and isinstance(payload.get("type"), str):
            problem = payload["type"].removeprefix(PROBLEM_PREFIX)
        self.counts[(op, status, problem)] += 1
        if isinstance(status, int) and status >= 500 and status != 503:
            self.server_errors.append(f"{op} {status} {text[:300]}")
        return status, payload

    def _gateway(self, client: int) -> int:
        alive = [g.index for g in self.cluster.gateways if g.alive]
        if not alive:
            return client % len(self.cluster.gateways)
        return alive[client % len(alive)]

    async def _client(self, n: int) -> None:
        keypair = self.keypairs[n % len(self.keypairs)]
        deadline = time.monotonic() + self.max_seconds
        made = 0
        while not self._stop.is_set() and time.monotonic() < deadline:
            status, body = await self.request(
                self._gateway(n), "POST", "/v2/kernel/create",
                {"lang": "python3", "clientSessionToken": uuid.uuid4().hex}, keypair, "create")
            if status != 201:
                await asyncio.sleep(0.2 + random.random() * 0.2)
                continue
            kernel_id = body["kernelId"]
            made += 1
            ends_itself = self.exit_code_every and made % self.exit_code_every == 0
            for _ in range(self.executes):
                code = ("import os, threading; threading.Timer(0.2, os._exit, (0,)).start()"
                        if ends_itself else "print(6 * 7)")
                status, _ = await self.request(self._gateway(n), "POST",
                                               f"/v2/kernel/{kernel_id}",
                                               {"mode": "query", "code": code}, keypair,
                                               "execute")
                if status == 404 or ends_itself:
                    break
            if not ends_itself:
                await self.destroy(n, kernel_id, keypair)
            self.kernels_done += 1

    async def destroy(self, n: int, kernel_id: str, keypair: tuple[str, str]) -> None:
        """Destroy, retrying while told to retry (a client would): bounded."""
        for attempt in range(40):
            status, _ = await self.request(self._gateway(n), "DELETE",
                                           f"/v2/kernel/{kernel_id}", None, keypair,
                                           "destroy" if attempt == 0 else "destroy-retry")
            if status in (204, 404) or (isinstance(status, int) and 400 <= status < 500):
                return
            await asyncio.sleep(0.25)


async def full_service_after(cluster: Cluster, keypair: tuple[str, str],
                             timeout: float = 30.0) -> float:
    """Seconds until create -> execute -> destroy succeeds on every live gateway."""
    load = Load(cluster, [keypair], clients=0)
    load.start()
    started = time.monotonic()
    try:
        for gw in [g.index for g in cluster.gateways if g.alive]:
            while True:
                if time.monotonic() - started > timeout:
                    raise TimeoutError(f"no full service within {timeout} s")
                status, body = await load.request(gw, "POST", "/v2/kernel/create",
                                                  {"lang": "python3",
                                                   "clientSessionToken": uuid.uuid4().hex},
                                                  keypair, "probe-create")
                if status == 201:
                    kid = body["kernelId"]
                    status, _ = await load.request(gw, "POST", f"/v2/kernel/{kid}",
                                                   {"mode": "query", "code": "print(1)"},
                                                   keypair, "probe-execute")
                    await load.destroy(gw, kid, keypair)
                    if status == 200:
                        break
                await asyncio.sleep(0.05)
    finally:
        await load.stop()
    return time.monotonic() - started


# --- invariants -------------------------------------------------------------------------
INVARIANTS = ("one usage row per ended kernel", "no live row without a live kernel",
              "quota counters equal live kernels", "agent kernel sets equal what agents run",
              "registry reconcile is clean", "no 500 answered")


@dataclass
class Observed:
    """One look at the database, Redis and the agents."""

    rows: list[Any]
    usage_count: dict[str, int]
    quota: list[Any]
    instances: dict[str, Any]
    kernel_sets: dict[str, set[str]]
    listings: dict[str, set[str] | None]  # None: the agent does not answer


async def observe(cluster: Cluster) -> Observed:
    config = cluster.config
    engine = create_engine(config)
    redis = RedisClients.connect(cluster.redis.url, config)
    rpc = AgentRPCClient(default_timeout=3.0)
    try:
        registry = Registry(config, redis, engine, rpc)
        async with engine.connect() as conn:
            rows = (await conn.execute(sa.select(kernels.c.id, kernels.c.status,
                                                 kernels.c.agent, kernels.c.access_key))).all()
            usage_count = dict((await conn.execute(
                sa.select(usage.c.kernel_id, sa.func.count()).group_by(usage.c.kernel_id)
            )).all())
            quota = (await conn.execute(sa.select(keypairs.c.access_key,
                                                  keypairs.c.concurrency_used))).all()
        instances = {i.id: i for i in await registry.list_instances()}
        kernel_sets = {iid: await registry.instance_kernel_ids(iid) for iid in instances}
        listings: dict[str, set[str] | None] = {}
        for agent in cluster.agents:
            try:
                reply = await rpc.call(agent.addr, "list_kernels", {}, timeout=3.0)
                listings[agent.instance_id] = set(reply) if isinstance(reply, dict) else set()
            except AgentError:
                listings[agent.instance_id] = None
    finally:
        await rpc.close()
        await redis.close()
        await engine.dispose()
    return Observed(rows, usage_count, quota, instances, kernel_sets, listings)


def usage_violations(seen: Observed) -> list[str]:
    found = []
    for row in seen.rows:
        n = seen.usage_count.get(row.id, 0)
        if row.status in LIVE_STATUSES and n:
            found.append(f"{row.id}: live with {n} usage rows")
        elif row.status not in LIVE_STATUSES and n != 1 and (row.agent is not None or n > 1):
            found.append(f"{row.id}: {row.status} with {n} usage rows")
    return found


def live_row_violations(seen: Observed) -> list[str]:
    found = []
    for row in seen.rows:
        if row.status not in LIVE_STATUSES:
            continue
        running = seen.listings.get(row.agent or "")
        inst = seen.instances.get(row.agent or "")
        if row.status != "RUNNING" or running is None or row.id not in running \
                or inst is None or inst.status == "lost":
            found.append(f"{row.id}: {row.status} on {row.agent}")
    return found


def quota_violations(seen: Observed) -> list[str]:
    live = Counter(row.access_key for row in seen.rows if row.status in LIVE_STATUSES)
    return [f"{access_key}: counter {used}, live {live.get(access_key, 0)}"
            for access_key, used in seen.quota if used != live.get(access_key, 0)]


def kernel_set_violations(seen: Observed) -> list[str]:
    found = []
    for iid, inst in seen.instances.items():
        running = seen.listings.get(iid)
        expected = set() if inst.status == "lost" or running is None else running
        members = seen.kernel_sets.get(iid, set())
        if members != expected:
            found.append(f"{iid} ({inst.status}): Redis {sorted(members)}, "
                         f"agent {sorted(expected)}")
    return found


async def check_invariants(cluster: Cluster, load: Load | None = None, *,
                           with_cli: bool = True) -> dict[str, list[str]]:
    """Every invariant -> the violations found (empty lists when all hold)."""
    seen = await observe(cluster)
    found = dict(zip(INVARIANTS[:4], (usage_violations(seen), live_row_violations(seen),
                                      quota_violations(seen), kernel_set_violations(seen)),
                     strict=True))
    found[INVARIANTS[4]] = reconcile_cli(cluster) if with_cli else []
    found[INVARIANTS[5]] = [] if load is None or not load.answered_500 else (
        load.server_errors[:10] or [f"{load.answered_500} x 5xx"])
    return found


def reconcile_cli(cluster: Cluster) -> list[str]:
    """`sorna registry reconcile --json` (no --fix): the differences it reports."""
    result = subprocess.run(
        [sys.executable, "-m", "sorna_cli", "--data-dir", str(cluster.workdir / "cli"),
         "registry", "reconcile", "--json"],
        env=cluster.env, capture_output=True, text=True, timeout=60)
    try:
        report = json.loads(result.stdout)
    except ValueError:
        return [f"exit {result.returncode}: {result.stdout[-500:]} {result.stderr[-500:]}"]
    return [f"{d['kind']} {d['subject']}: {d['detail']}" for d in report["differences"]]


async def wait_invariants(cluster: Cluster, load: Load | None = None,
                          timeout: float = 40.0) -> tuple[dict[str, list[str]], float]:
    """Poll until every invariant holds (or `timeout`); returns the last findings
    and the seconds it took."""
    started = time.monotonic()
    while True:
        found = await check_invariants(cluster, load, with_cli=False)
        if not any(found.values()):
            found = await check_invariants(cluster, load, with_cli=True)
            if not any(found.values()):
                return found, time.monotonic() - started
        if time.monotonic() - started > timeout:
            return found, time.monotonic() - started
        await asyncio.sleep(0.5)
