"""Plain helpers shared by the test suites, imported as a module (`from tests import helpers`
or `from tests.helpers import ...`); fixtures stay in the conftest files.

- real-service plumbing: free ports, polling, stopping processes, flushing Redis,
  PostgreSQL admin statements, a private redis-server (`PrivateRedis`) and
  `sorna serve` as a real process (`ServeProcess`);
- the reference agent as a child process (`AgentProcess`) and a manager-side
  harness that talks to it over the agent protocol (`Harness`);
- API signing exactly as the historic client does, and a signed test client
  (`Gateway`);
- registry scaffolding that plays agents over real ZeroMQ (`RegistryEnv`);
- `Sorna`, the `sorna` command through CliRunner and its real error boundary.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import inspect
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import redis as sync_redis
import sqlalchemy as sa
import zmq
import zmq.asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient
from click.testing import CliRunner, Result
from sqlalchemy.engine import make_url

from sorna_cli.main import cli
from sorna_server import agent_protocol as proto
from sorna_server import curve
from sorna_server import keypairs as keypair_api
from sorna_server.agent_client import AgentRPCClient
from sorna_server.config import SornaConfig
from sorna_server.db.engine import create_engine
from sorna_server.db.models import kernels, keypairs, metadata, usage
from sorna_server.fixture_loader import populate
from sorna_server.gateway import keys
from sorna_server.redis_conn import RedisClients, redis_server_binary
from sorna_server.registry import KernelRecord, Registry
from sorna_server.schema import ensure_schema

PG_URL = os.environ.get("SORNA_TEST_DB_URL")
REAL_REDIS_URL = os.environ.get("SORNA_TEST_REDIS_URL")
# Database numbers the tests use, away from the defaults so a shared server
# used by a developer is not clobbered.
TEST_REDIS_DBS = {"redis_db_kernels": 11, "redis_db_instances": 12,
                  "redis_db_sessions": 13, "redis_db_ratelimit": 14}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def wait_for(predicate: Callable[[], Any], timeout: float = 15.0,
                   interval: float = 0.05) -> Any:
    """Poll a predicate (plain or async) until it returns something truthy (or fail the test)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)

def pg_admin(statement: str) -> None:
    async def run() -> None:
        import asyncpg
        url = make_url(PG_URL)
        conn = await asyncpg.connect(host=url.host or "127.0.0.1", port=url.port or 5432,
                                     user=url.username or "postgres", password=url.password,
                                     database=url.database or "postgres")
        try:
            await conn.execute(statement)
        finally:
            await conn.close()
    asyncio.run(run())

def flush_redis_dbs(url: str, dbs: Iterable[int]) -> None:
    """Empty the given database numbers of the Redis at `url`."""
    for db in dbs:
        client = sync_redis.Redis.from_url(url, db=db)
        try:
            client.flushdb()
        finally:
            client.close()

class PrivateRedis:
    """A redis-server of the test's own (the embedded binary) on a TCP port, that
    the test may kill and start again.  Empty after a restart, unless `save()`
    wrote a snapshot just before (then it comes back with that data)."""

    def __init__(self, port: int, workdir: Path):
        self.port = port
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:

        self.proc = subprocess.Popen(
            [str(redis_server_binary()), "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.workdir),
             "--databases", "16"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if sync_redis.Redis(port=self.port, socket_connect_timeout=0.2).ping():
                    return
            except sync_redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("private redis-server did not start")

    def save(self) -> None:
        client = sync_redis.Redis(port=self.port)
        try:
            client.save()
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


async def block_usage_inserts(engine: Any, block: bool = True) -> None:
    """Make every INSERT into `usage` fail (a trigger), or stop doing so: a
    database failure of settlement, injected without touching the server."""
    if engine.dialect.name == "sqlite":
        statements = (["CREATE TRIGGER sorna_test_block_usage BEFORE INSERT ON usage "
                       "BEGIN SELECT RAISE(ABORT, 'injected failure'); END"] if block
                      else ["DROP TRIGGER IF EXISTS sorna_test_block_usage"])
    elif block:
        statements = [
            "CREATE OR REPLACE FUNCTION sorna_test_block_usage() RETURNS trigger AS "
            "$$ BEGIN RAISE EXCEPTION 'injected failure'; END $$ LANGUAGE plpgsql",
            "CREATE TRIGGER sorna_test_block_usage BEFORE INSERT ON usage "
            "FOR EACH ROW EXECUTE FUNCTION sorna_test_block_usage()"]
    else:
        statements = ["DROP TRIGGER IF EXISTS sorna_test_block_usage ON usage"]
    async with engine.begin() as conn:
        for statement in statements:
            await conn.execute(sa.text(statement))


class ServeProcess:
    """`sorna ARGS...` (a server) as a real process in `cwd`; its stderr goes to a log file."""

    def __init__(self, cwd: Path, args: list[str], env: dict[str, str] | None = None):
        self.cwd = cwd
        self.log_path = cwd.parent / f"serve-{cwd.name}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sorna_cli", *args], cwd=cwd,
            stdout=subprocess.DEVNULL, stderr=self.log_path.open("wb"),
            env={**os.environ, **(env or {})})

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 90) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(r"listening on (https?://[^\s)]+)", self.log())
            if match and "press Ctrl-C" in self.log():
                return match.group(1)
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.05)
        raise AssertionError(f"serve did not get ready:\n{self.log()}")

    def wait_log(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} in the log:\n{self.log()}")
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if not stop_process(self.proc, sig, timeout):
            raise AssertionError(f"serve did not stop within {timeout} s:\n{self.log()}")
        return self.proc.returncode


class AgentProcess:
    """A reference agent (`sorna agent`) running as a real child process."""

    def __init__(self, proc: subprocess.Popen[bytes], addr: str, instance_id: str,
                 log_path: Path):
        self.proc = proc
        self.addr = addr
        self.instance_id = instance_id
        self.log_path = log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        stop_process(self.proc, sig, timeout)
        return self.proc.returncode


@dataclass(frozen=True)
class AgentCurve:
    """CurveZMQ settings of a test agent (`agent_factory(curve=...)`): its secret
    key file (`--key`), the gateway public keys it accepts (`--gateway-keys`, a
    file or a folder), and a gateway keypair among those, to ping it with."""
    key: Path
    gateway_keys: Path
    gateway: curve.KeyPair

    @property
    def public(self) -> bytes:
        """The agent's public key (z85)."""
        return curve.load_keypair(self.key, "agent_key").public


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM,
                 timeout: float = 20.0) -> bool:
    """Send `sig` and wait; kill after `timeout`.  True if it ended by itself in time."""
    if proc.poll() is not None:
        return True
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
        return True
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return False


def is_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def processes_matching(match: Callable[[psutil.Process], bool]) -> list[int]:
    """Pids of the live (non-zombie) processes for which `match` is true."""
    found = []
    for proc in psutil.process_iter():
        try:
            if match(proc) and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
        except (psutil.Error, OSError):
            continue
    return found


def wait_processes_gone(pids: Iterable[int], timeout: float = 15.0) -> None:
    """Poll until none of `pids` is alive (zombies count as gone); fail the test otherwise."""
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while True:
        alive = [pid for pid in alive if is_alive(pid)]
        if not alive:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"still alive {timeout} s later: {alive}")
        time.sleep(0.05)


def ping_agent(addr: str, timeout: float, keys: curve.KeyPair | None = None,
               server_key: bytes | None = None) -> bool:
    """True if the agent at `addr` answers `ping` within `timeout` seconds; with
    `keys` (a gateway keypair) and `server_key` (the agent's public key), over CURVE."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    curve.make_client(sock, keys, server_key)
    sock.connect(addr)
    try:
        sock.send(proto.encode_request(1, "ping"))
        if sock.poll(int(timeout * 1000)):
            return proto.decode_reply(sock.recv()).ok
        return False
    finally:
        sock.close(0)

class Harness:
    def __init__(self, agent: Any, events: zmq.Socket, ctx: zmq.Context):
        self.agent = agent
        self.ctx = ctx
        self.pull = events
        self.dealer = ctx.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.LINGER, 0)
        self.dealer.connect(agent.addr)
        self.ids = itertools.count(1)
        self.events: list[dict] = []

    # --- RPC -----------------------------------------------------------------
    def send(self, method: str, **args: Any) -> int:
        req_id = next(self.ids)
        self.dealer.send(proto.encode_request(req_id, method, args))
        return req_id

    def receive(self, timeout: float = 15.0) -> proto.Reply:
        if not self.dealer.poll(int(timeout * 1000)):
            raise AssertionError(f"no reply within {timeout} s\n{self.agent.log()[-3000:]}")
        return proto.decode_reply(self.dealer.recv())

    def call(self, method: str, timeout: float = 15.0, **args: Any) -> proto.Reply:
        req_id = self.send(method, **args)
        reply = self.receive(timeout)
        assert reply.id == req_id
        return reply

    def ok(self, method: str, timeout: float = 15.0, **args: Any) -> Any:
        reply = self.call(method, timeout, **args)
        assert reply.ok, reply.error
        return reply.result

    def error(self, method: str, timeout: float = 15.0, **args: Any) -> dict:
        reply = self.call(method, timeout, **args)
        assert not reply.ok, reply.result
        return reply.error

    def create(self, lang: str = "python3", **args: Any) -> str:
        return self.ok("create_kernel", lang=lang, **args)["kernel_id"]

    def query(self, kernel_id: str, code: str, timeout: float = 15.0) -> dict:
        return self.ok("execute", timeout, kernel_id=kernel_id, mode="query", code=code)

    # --- events --------------------------------------------------------------
    def collect(self, timeout: float = 0.0) -> None:
        while self.pull.poll(int(timeout * 1000)):
            self.events.append(proto.decode_event(self.pull.recv()))
            timeout = 0

    def wait_event(self, predicate: Callable[[dict], bool], timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for event in self.events[seen:]:
                if predicate(event):
                    return event
            seen = len(self.events)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"event not seen; got {[e['type'] for e in self.events]}")
            self.collect(remaining)

    def terminated(self, kernel_id: str, timeout: float = 10.0) -> dict:
        return self.wait_event(lambda e: e["type"] == "kernel_terminated"
                               and e["kernel_id"] == kernel_id, timeout)

    def close(self) -> None:
        self.dealer.close(0)


def kernel_process_filter(harness: Harness, kernel_id: str) -> Callable[[psutil.Process], bool]:
    """Recognise the processes of a python kernel, forked children included.

    Forked children keep the runner's command line, so argv cannot tell them
    apart.  When the agent gives each kernel its own uid (as root) the uid does;
    otherwise (no uid switch, hence no PID namespace) the process group does."""
    result = harness.query(kernel_id, "import os\nprint(os.getuid(), os.getpgid(0))")
    uid, pgid = (int(part) for part in stdout_of(result).split())
    if uid != os.getuid():
        return lambda proc: proc.uids().real == uid
    return lambda proc: os.getpgid(proc.pid) == pgid


def stdout_of(result: dict) -> str:
    return "".join(data for kind, data in result["console"] if kind == "stdout")


def stderr_of(result: dict) -> str:
    return "".join(data for kind, data in result["console"] if kind == "stderr")


def pty_exchange(harness: Harness, created: dict, keys: bytes, expect: bytes,
                 timeout: float = 15.0) -> bytes:
    """Type `keys` into a kernel's PTY until `expect` shows up in its output."""
    stdin = harness.ctx.socket(zmq.PUB)
    stdout = harness.ctx.socket(zmq.SUB)
    try:
        for sock in (stdin, stdout):
            sock.setsockopt(zmq.LINGER, 0)
        stdout.setsockopt(zmq.SUBSCRIBE, b"")
        stdin.connect(f"tcp://127.0.0.1:{created['stdin_port']}")
        stdout.connect(f"tcp://127.0.0.1:{created['stdout_port']}")
        received = b""
        deadline = time.monotonic() + timeout
        while expect not in received and time.monotonic() < deadline:
            stdin.send(keys)
            while stdout.poll(500):
                received += stdout.recv()
        assert expect in received, received
        return received
    finally:
        stdin.close(0)
        stdout.close(0)

EXAMPLE_ACCESS = "AKIAIOSFODNN7EXAMPLE"
EXAMPLE_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
OTHER_ACCESS = "AKIAOTHERKEY00000001"
OTHER_SECRET = "otherSecretKey0123456789abcdefghijklmnop"
VERSION = "v2.20170315"
VERSION_HEADERS = {"X-Sorna-Version": VERSION}
PROBLEM = "https://api.sorna.io/probs/"

def client_signature(method: str, path: str, date: str, host: str, content_type: str,
                     body: bytes, secret: str, version: str = VERSION,
                     hash_name: str = "sha256", day: str | None = None) -> str:
    """An independent copy of the historic client's signing (sorna/auth.py)."""
    if content_type.startswith("multipart/"):
        body = b""
    body_hash = hashlib.new(hash_name, body).hexdigest()
    text = f"{method}\n{path}\n{date}\nhost:{host}\ncontent-type:{content_type}\n" \
           f"x-sorna-version:{version}\n{body_hash}"
    day = day or datetime.fromisoformat(date).strftime("%Y%m%d")
    key = hmac.new(secret.encode(), day.encode(), hash_name).digest()
    key = hmac.new(key, host.encode(), hash_name).digest()
    return hmac.new(key, text.encode(), hash_name).hexdigest()


@dataclass
class Gateway:
    config: SornaConfig
    client: TestClient
    agents: list = field(default_factory=list)

    @property
    def app(self) -> web.Application:
        return self.client.server.app

    @property
    def host(self) -> str:
        return f"{self.client.server.host}:{self.client.server.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def sign_headers(self, method: str, path: str, body: bytes = b"", *,
                     access_key: str = EXAMPLE_ACCESS, secret: str = EXAMPLE_SECRET,
                     content_type: str = "application/json", version: str = VERSION,
                     date: datetime | None = None) -> dict[str, str]:
        date_text = (date or datetime.now(UTC)).isoformat()
        signature = client_signature(method, path, date_text, self.host, content_type, body,
                                     secret, version)
        return {"Date": date_text, "X-Sorna-Version": version, "Content-Type": content_type,
                "Authorization": f"Sorna signMethod=HMAC-SHA256, "
                                 f"credential={access_key}:{signature}"}

    async def request(self, method: str, path: str, body: Any = None, *,
                      access_key: str = EXAMPLE_ACCESS, secret: str = EXAMPLE_SECRET,
                      raw: bytes | None = None, headers: dict[str, str] | None = None,
                      **sign_args: Any) -> tuple[int, dict[str, str], Any]:
        """Send a signed request; returns (status, headers, decoded JSON or text)."""
        data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
        all_headers = self.sign_headers(method, path, data, access_key=access_key,
                                        secret=secret, **sign_args)
        all_headers.update(headers or {})
        async with self.client.request(method, path, data=data, headers=all_headers) as resp:
            text = await resp.text()
            try:
                payload = json.loads(text) if text else None
            except ValueError:
                payload = text
            return resp.status, dict(resp.headers), payload

    async def create_kernel(self, lang: str = "python3", token: str | None = None,
                            **kwargs: Any) -> str:
        status, _, body = await self.request("POST", "/v2/kernel/create", {
            "lang": lang, "clientSessionToken": token or uuid.uuid4().hex}, **kwargs)
        assert status == 201, body
        return body["kernelId"]

    async def execute(self, kernel_id: str, code: str, mode: str = "query",
                      **kwargs: Any) -> tuple[int, Any]:
        status, _, body = await self.request("POST", f"/v2/kernel/{kernel_id}",
                                             {"mode": mode, "code": code, **kwargs})
        return status, body

    async def scalar(self, statement: Any) -> Any:
        async with self.app[keys.DB].connect() as conn:
            return (await conn.execute(statement)).scalar()

    async def slots_used(self, access_key: str = EXAMPLE_ACCESS) -> int:
        return await self.scalar(sa.select(keypairs.c.concurrency_used)
                                 .where(keypairs.c.access_key == access_key))

async def prepare_database(config: SornaConfig, *, other_concurrency: int = 2) -> None:
    await ensure_schema(config)
    engine = create_engine(config)
    try:
        await populate(engine, "example_keypair")
        await keypair_api.create_keypair(engine, 3, concurrency_limit=other_concurrency,
                                         rate_limit=1000, access_key=OTHER_ACCESS,
                                         secret_key=OTHER_SECRET)
    finally:
        await engine.dispose()

def info(addr: str = "tcp://127.0.0.1:1", *, max_kernels: int = 10,
         languages: tuple[str, ...] = ("python3", "bash"), num_kernels: int = 0) -> dict:
    return {"addr": addr, "max_kernels": max_kernels, "num_kernels": num_kernels,
            "languages": list(languages), "version": "test", "cpu_count": 2,
            "mem_bytes": 1 << 30, "isolation": {}}


@dataclass
class RegistryEnv:
    config: SornaConfig
    redis: RedisClients
    engine: Any
    rpc: AgentRPCClient
    registry: Registry
    pusher: zmq.asyncio.Socket
    extra: list = field(default_factory=list)
    intake: Any = None    # registry.intake.EventIntake, when started
    sweeper: Any = None   # registry.sweeper.Sweeper, when started
    reconciler: Any = None  # registry.reconciler.Reconciler, when started
    pushed: int = 0  # frames this env sent to the intake

    async def settle(self, kernel_id: str, status: str, reason: str,
                     stats: dict | None = None, path: str = "destroy") -> bool:
        return await self.registry.lifecycle.settle(kernel_id, status, reason, stats,
                                                    path=path)

    async def push(self, event_type: str, instance_id: str, **fields: Any) -> None:
        await self.push_raw(proto.encode_event(event_type, instance_id, **fields))

    async def push_raw(self, frame: bytes) -> None:
        await self.pusher.send(frame)
        self.pushed += 1

    async def idle(self, timeout: float = 15.0) -> None:
        """Wait until the intake has handled every frame this env pushed and the
        background work they started (settlements, revivals) has finished: after
        this, whatever the events were going to do is done."""
        intake = self.intake
        assert intake is not None, "the environment was made without its intake"

        def quiet() -> bool:
            return intake.handled >= self.pushed and not intake.pending
        await wait_for(quiet, timeout)

    async def heartbeats_seen(self, instance_id: str, count: int = 2,
                              timeout: float = 15.0) -> None:
        """Wait until `count` more heartbeats of an agent were recorded, then until
        the registry's background work (what they started) has finished."""
        seen: list[float] = []

        async def recorded() -> bool:
            instance = await self.registry.get_instance(instance_id)
            if instance is not None and (not seen or instance.last_heartbeat > seen[-1]):
                seen.append(instance.last_heartbeat)
            return len(seen) > count
        await wait_for(recorded, timeout, interval=0.02)
        if self.intake is not None:
            await wait_for(lambda: not self.intake.pending, timeout)

    async def heartbeat(self, instance_id: str, running: list[str] | tuple = (), *,
                        interval: float | None = None, **info_args: Any) -> None:
        # one address per instance id (a live agent's address is its alone); loopback
        # ports below 1000 refuse connections at once
        port = 1 + zlib.crc32(instance_id.encode()) % 999
        info_args.setdefault("addr", f"tcp://127.0.0.1:{port}")
        await self.push("instance_heartbeat", instance_id, info=info(**info_args),
                        running_kernels=list(running),
                        interval=interval or self.config.heartbeat_interval)

    async def create_keypair(self, access_key: str | None = None, limit: int = 100) -> str:
        access_key = access_key or ("AKIA" + uuid.uuid4().hex[:16].upper())
        async with self.engine.begin() as conn:
            await conn.execute(sa.insert(keypairs).values(
                user_id=2, access_key=access_key, secret_key="s" * 40,
                concurrency_limit=limit, concurrency_used=0, rate_limit=1000))
        return access_key

    async def create_kernel_row(self, access_key: str, lang: str = "python3",
                                kernel_id: str | None = None) -> str:
        """What the gateway does before scheduling: take a slot + PREPARING row."""
        from sorna_server.db import quota

        kernel_id = kernel_id or uuid.uuid4().hex
        async with self.engine.begin() as conn:
            assert await quota.take_slot(conn, access_key)
            await conn.execute(sa.insert(kernels).values(id=kernel_id, lang=lang,
                                                         access_key=access_key))
        return kernel_id

    async def register(self, access_key: str, instance_id: str, *, lang: str = "python3",
                       addr: str = "tcp://127.0.0.1:1", token: str | None = None,
                       kernel_id: str | None = None, schedule: bool = False) -> str:
        kernel_id = await self.create_kernel_row(access_key, lang, kernel_id)
        if schedule:
            inst = await self.registry.schedule(lang, access_key)
            instance_id, addr = inst.id, inst.addr
        now = time.time()
        await self.registry.lifecycle.register(KernelRecord(
            id=kernel_id, instance_id=instance_id, addr=addr, access_key=access_key,
            lang=lang, stdin_port=1, stdout_port=2, created_at=now, last_used=now,
            num_queries=0, limits={}, last_stats={}), token)
        return kernel_id

    async def kernel_row(self, kernel_id: str) -> Any:
        async with self.engine.connect() as conn:
            return (await conn.execute(sa.select(kernels).where(kernels.c.id == kernel_id))).first()

    async def usage_rows(self, kernel_id: str) -> list:
        async with self.engine.connect() as conn:
            query = sa.select(usage).where(usage.c.kernel_id == kernel_id)
            return (await conn.execute(query)).all()

    async def slots_used(self, access_key: str) -> int:
        async with self.engine.connect() as conn:
            return (await conn.execute(sa.select(keypairs.c.concurrency_used)
                                       .where(keypairs.c.access_key == access_key))).scalar()


async def make_env(config: SornaConfig, *, intake: bool = True, sweeper: bool = True,
                   reconciler: bool = True, create_schema: bool = True) -> RegistryEnv:
    """A started Registry with the services the application would start around it."""
    from sorna_server.registry.intake import EventIntake
    from sorna_server.registry.reconciler import Reconciler
    from sorna_server.registry.sweeper import Sweeper

    engine = create_engine(config)
    if create_schema:
        async with engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
    redis = RedisClients.connect(config.explicit_redis_url, config)
    rpc = AgentRPCClient(default_timeout=5.0)
    registry = Registry(config, redis, engine, rpc)
    await registry.start()
    pusher = zmq.asyncio.Context.instance().socket(zmq.PUSH)
    pusher.setsockopt(zmq.LINGER, 0)
    pusher.connect(f"tcp://127.0.0.1:{config.events_port}")
    env = RegistryEnv(config, redis, engine, rpc, registry, pusher)
    if intake:
        env.intake = EventIntake(registry)
        await env.intake.start()
    if sweeper:
        env.sweeper = Sweeper(registry)
        env.sweeper.start()
    if reconciler:
        env.reconciler = Reconciler(registry)
        env.reconciler.start()
    return env


async def close_env(env: RegistryEnv) -> None:
    env.pusher.close(0)
    for service in (env.reconciler, env.sweeper, env.intake):
        if service is not None:
            await service.stop()
    await env.registry.stop()
    await env.rpc.close()
    await env.redis.close()
    await env.engine.dispose()


# Registry tests use their own database numbers on a shared Redis server, so
# other suites running at the same time (which flush 11-14) do not disturb them.
REGISTRY_REDIS_DBS = {"redis_db_kernels": 7, "redis_db_instances": 8,
                      "redis_db_sessions": 9, "redis_db_ratelimit": 10}

def run_sorna(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
              python_flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """`python [FLAGS] -m sorna_cli ARGS` as a real process (the console entry point's path)."""
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("SORNA_") or k.startswith("SORNA_TEST_")}
    return subprocess.run([sys.executable, *python_flags, "-m", "sorna_cli", *args],
                          capture_output=True, text=True, env={**clean, **(env or {})}, cwd=cwd,
                          timeout=60)


class Sorna:
    """Call `sorna ARGS...` with CliRunner; results keep stdout and stderr apart."""

    def __init__(self, db_url: str | None = None):
        self.db_url = db_url
        self.runner = CliRunner()

    def __call__(self, *args: str, env: dict[str, str] | None = None,
                 db: bool = True) -> Result:
        argv = (["--db-url", self.db_url] if db and self.db_url else []) + list(args)
        result = self.runner.invoke(cli, argv, env=env, catch_exceptions=True)
        # The boundary never lets a traceback through (no --debug here).
        assert "Traceback" not in result.output, result.output
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        return result

    def json(self, *args: str, **kwargs: Any) -> Any:
        result = self(*args, "--json", **kwargs)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)
