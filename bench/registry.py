"""Registry benchmark: heartbeat intake, scheduling latency, CPU share.

    python bench/registry.py [--agents 1000] [--kernels 10000] [--interval 3]
                             [--steady 30] [--blast 60000] [--samples 2000]
                             [--redis-url URL] [--db-url URL] [--json]

One "gateway" child process runs a Registry with event intake and sweeper (as
`sorna serve` does).  This process simulates the agents: one real ZeroMQ PUSH
socket per agent, connected over loopback, sending real `instance_heartbeat`
frames (`agent_protocol.encode_event`) that list each agent's kernels.

Phases:
1. latency with 10 instances: 10 agents heartbeat; `schedule()` timed
   `--samples` times (each followed by an untimed `unreserve()`).
2. 1,000 agents register; 10,000 kernels are registered (DB rows RUNNING,
   Redis records via the registry) and the agents' heartbeats list them.
3. steady state: every agent heartbeats every `--interval` seconds for
   `--steady` seconds; the gateway's CPU share is measured, and scheduling
   latency with 1,000 instances is timed under that load.  Then one periodic
   reconciliation pass over the 1,000 agents and 10,000 kernels is timed: wall
   time and Redis time (INFO commandstats), heartbeats paused.
4. intake capacity: `--blast` heartbeats pushed as fast as possible; events/s
   the gateway handled.

The gateway child runs on uvloop, as `sorna serve` does (--no-uvloop: asyncio).
Without --redis-url an embedded Redis is started in a temporary folder;
without --db-url, SQLite in that folder.  Loopback only; bounded duration.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import resource
import socket
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import zmq
import zmq.asyncio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sorna_server import agent_protocol as proto  # noqa: E402
from sorna_server.agent_client import AgentRPCClient  # noqa: E402
from sorna_server.config import load_config  # noqa: E402
from sorna_server.db.engine import create_engine  # noqa: E402
from sorna_server.redis_conn import EmbeddedRedis, RedisClients  # noqa: E402
from sorna_server.registry import Registry  # noqa: E402
from sorna_server.registry.intake import EventIntake  # noqa: E402
from sorna_server.registry.reconcile import reconcile  # noqa: E402
from sorna_server.registry.sweeper import Sweeper  # noqa: E402

LANG = "python3"
BENCH_DBS = {"redis_db_kernels": 1, "redis_db_instances": 2, "redis_db_sessions": 3,
             "redis_db_ratelimit": 4}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- the gateway child -------------------------------------------------------
async def gateway_main(settings: dict[str, Any]) -> None:
    """Run a registry with intake + sweeper; report counters on stdout."""
    config = load_config(None, **settings)
    redis = RedisClients.connect(config.explicit_redis_url, config)
    engine = create_engine(config)
    rpc = AgentRPCClient()
    registry = Registry(config, redis, engine, rpc)
    await registry.start()
    intake = EventIntake(registry)
    await intake.start()
    sweeper = Sweeper(registry)
    sweeper.start()
    me = psutil.Process()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_reader(sys.stdin.fileno(), stop.set)  # parent closes stdin to stop us
    try:
        while not stop.is_set():
            cpu = me.cpu_times()
            print(json.dumps({"received": intake.received, "handled": intake.handled,
                              "cpu": cpu.user + cpu.system, "t": time.monotonic()}),
                  flush=True)
            try:
                await asyncio.wait_for(stop.wait(), 0.2)
            except TimeoutError:
                pass
    finally:
        await sweeper.stop()
        await intake.stop()
        await registry.stop()
        await rpc.close()
        await redis.close()
        await engine.dispose()


class Gateway:
    """The child process and its latest counters."""

    def __init__(self, settings: dict[str, Any]):
        self.settings = settings
        self.latest: dict[str, float] = {}
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--gateway-child", json.dumps(self.settings),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        self._reader = asyncio.create_task(self._read())
        while not self.latest:
            await asyncio.sleep(0.05)
            if self.proc.returncode is not None:
                raise RuntimeError("gateway child exited")

    async def _read(self) -> None:
        assert self.proc and self.proc.stdout
        async for line in self.proc.stdout:
            try:
                self.latest = json.loads(line)
            except ValueError:
                pass

    async def sample(self) -> dict[str, float]:
        seen = self.latest
        while self.latest is seen:
            await asyncio.sleep(0.02)
        return self.latest

    async def stop(self) -> None:
        if self.proc is None:
            return
        assert self.proc.stdin
        self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 15)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        self._reader.cancel()


# --- simulated agents ---------------------------------------------------------
class Agents:
    def __init__(self, count: int, events_addr: str, prefix: str):
        self.ctx = zmq.asyncio.Context.instance()
        self.ids = [f"{prefix}-{n:04d}" for n in range(count)]
        self.kernels: dict[str, list[str]] = {iid: [] for iid in self.ids}
        self.socks = []
        for _ in self.ids:
            sock = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 100_000)
            sock.connect(events_addr)
            self.socks.append(sock)
        self.sent = 0

    def frame(self, index: int, interval: float) -> bytes:
        iid = self.ids[index]
        return proto.encode_event(
            "instance_heartbeat", iid,
            info={"addr": f"tcp://127.0.0.1:{20000 + index}", "max_kernels": 16,
                  "num_kernels": len(self.kernels[iid]), "languages": [LANG, "bash"],
                  "version": "bench", "cpu_count": 8, "mem_bytes": 16 << 30, "isolation": {}},
            running_kernels=self.kernels[iid], interval=interval)

    async def beat_all(self, interval: float) -> None:
        for index, sock in enumerate(self.socks):
            await sock.send(self.frame(index, interval))
            self.sent += 1

    async def beat_forever(self, interval: float, until: float) -> None:
        """Each agent every `interval` seconds, spread evenly over the interval;
        each frame lists the agent's kernels at the time it is sent."""
        n = len(self.socks)
        start = time.monotonic()
        round_no = 0
        while time.monotonic() < until:
            for index in range(n):
                due = start + round_no * interval + index * interval / n
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if time.monotonic() >= until:
                    return
                await self.socks[index].send(self.frame(index, interval))
                self.sent += 1
            round_no += 1

    async def blast(self, total: int, interval: float) -> float:
        """Push `total` heartbeats as fast as the sockets take them; returns seconds."""
        frames = [self.frame(i, interval) for i in range(len(self.socks))]
        plain = [zmq.Socket.shadow(sock.underlying) for sock in self.socks]
        t0 = time.monotonic()
        for k in range(total):
            index = k % len(plain)
            while True:
                try:
                    plain[index].send(frames[index], zmq.NOBLOCK)
                    break
                except zmq.Again:
                    await asyncio.sleep(0.001)
            self.sent += 1
            if k % 1000 == 0:
                await asyncio.sleep(0)
        return time.monotonic() - t0

    def close(self) -> None:
        for sock in self.socks:
            sock.close(0)


# --- measurements --------------------------------------------------------------
async def wait_handled(gateway: Gateway, target: int, timeout: float) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        sample = await gateway.sample()
        if sample["handled"] >= target or time.monotonic() > deadline:
            return sample


async def schedule_latency(registry: Registry, samples: int) -> dict[str, float]:
    timings = []
    for _ in range(samples):
        t0 = time.perf_counter()
        inst = await registry.schedule(LANG, "AKIABENCH")
        timings.append((time.perf_counter() - t0) * 1000)
        await registry.unreserve(inst.id)
    timings.sort()
    return {"p50_ms": round(statistics.median(timings), 3),
            "p95_ms": round(timings[int(len(timings) * 0.95) - 1], 3),
            "max_ms": round(timings[-1], 3), "samples": samples}


async def prepare_database(engine: Any, kernels_total: int) -> None:
    import sqlalchemy as sa

    from sorna_server.db.models import keypairs, metadata

    async with engine.begin() as conn:
        await conn.run_sync(metadata.drop_all)
        await conn.run_sync(metadata.create_all)
        await conn.execute(sa.insert(keypairs).values(
            user_id=1, access_key="AKIABENCH", secret_key="x" * 40,
            concurrency_limit=kernels_total + 10, concurrency_used=0,
            rate_limit=10 ** 6))


async def register_kernels(registry: Registry, engine: Any, agents: Agents, total: int) -> None:
    """10 kernels per agent: RUNNING DB rows (one bulk insert) + Redis records."""
    import sqlalchemy as sa

    from sorna_server.db.models import kernels, keypairs

    async with engine.begin() as conn:
        rows = []
        planned: dict[str, list[str]] = {iid: [] for iid in agents.ids}
        for n in range(total):
            iid = agents.ids[n % len(agents.ids)]
            kid = uuid.uuid4().hex
            planned[iid].append(kid)
            rows.append({"id": kid, "lang": LANG, "access_key": "AKIABENCH", "agent": iid,
                         "status": "RUNNING"})
        await conn.execute(sa.insert(kernels), rows)
        await conn.execute(sa.update(keypairs).values(concurrency_used=total))
    semaphore = asyncio.Semaphore(64)

    async def one(index: int, iid: str, kid: str) -> None:
        async with semaphore:
            await registry.lifecycle.adopt(iid, f"tcp://127.0.0.1:{20000 + index}", kid,
                                           "AKIABENCH", LANG,
                                           {"created_at": time.time(), "stdin_port": 1,
                                            "stdout_port": 2})
            agents.kernels[iid].append(kid)  # from now on the agent "runs" it
    await asyncio.gather(*(one(i, iid, kid) for i, iid in enumerate(agents.ids)
                           for kid in planned[iid]))


async def redis_busy_usec(registry: Registry) -> int:
    """Microseconds Redis has spent executing commands so far (INFO commandstats)."""
    stats = await registry.redis.instances.info("commandstats")
    return sum(int(value.get("usec", 0)) for value in stats.values() if isinstance(value, dict))


async def reconcile_pass(registry: Registry) -> dict[str, Any]:
    """One periodic reconciliation pass (as every gateway runs it each period),
    without fixes, with the heartbeats stopped so that Redis time is the pass's."""
    await asyncio.sleep(0.5)  # let the intake finish the last heartbeats
    busy = await redis_busy_usec(registry)
    started = time.monotonic()
    diffs = await reconcile(registry, fix=False)
    wall = time.monotonic() - started
    busy = await redis_busy_usec(registry) - busy
    return {"wall_ms": round(wall * 1000, 1), "redis_ms": round(busy / 1000, 1),
            "differences": len(diffs),
            "differences_by_rule": {kind: sum(d.kind == kind for d in diffs)
                                    for kind in sorted({d.kind for d in diffs})}}


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    workdir = Path(tempfile.mkdtemp(prefix="sorna-bench-"))
    embedded = None
    redis_url = args.redis_url
    if redis_url is None:
        embedded = EmbeddedRedis(workdir)
        redis_url = await embedded.start()
    db_url = args.db_url or f"sqlite:///{workdir / 'bench.db'}"
    events_port = free_port()
    settings = {"data_dir": str(workdir), "redis_url": redis_url, "db_url": db_url,
                "events_ip": "127.0.0.1", "events_port": events_port,
                "heartbeat_interval": args.interval, **BENCH_DBS}
    config = load_config(None, **settings)
    redis = RedisClients.connect(redis_url, config)
    for client in redis.all():
        await client.flushdb()
    engine = create_engine(config)
    rpc = AgentRPCClient()
    registry = Registry(config, redis, engine, rpc)  # the "other gateway" that schedules
    gateway = Gateway({**settings, "_uvloop": not args.no_uvloop})
    results: dict[str, Any] = {"agents": args.agents, "kernels": args.kernels,
                               "interval_s": args.interval}
    small = big = None
    try:
        await prepare_database(engine, args.kernels)
        await gateway.start()
        # kernels are registered after the gateway's start-up reconciliation
        # (2 heartbeat intervals), as they would be in a running system
        grace_over = time.monotonic() + 2 * args.interval + 1.0
        addr = f"tcp://127.0.0.1:{events_port}"

        # 1. ten instances
        small = Agents(10, addr, "i-small")
        await asyncio.sleep(0.5)
        await small.beat_all(args.interval)
        await wait_handled(gateway, small.sent, 20)
        results["schedule_10_instances"] = await schedule_latency(registry, args.samples)
        small.close()
        for iid in small.ids:
            await registry.forget_instance(iid)

        # 2. a thousand instances, ten thousand kernels (agents keep beating)
        big = Agents(args.agents, addr, "i-big")
        await asyncio.sleep(1.0)
        setup_until = time.monotonic() + 3600
        beating = asyncio.create_task(big.beat_forever(args.interval, setup_until))
        while len(await registry.list_instances()) < args.agents:
            await asyncio.sleep(0.2)
        await asyncio.sleep(max(grace_over - time.monotonic(), 0))
        t0 = time.monotonic()
        await register_kernels(registry, engine, big, args.kernels)
        results["register_kernels_s"] = round(time.monotonic() - t0, 2)
        results["instances_registered"] = len(await registry.list_instances())
        await asyncio.sleep(args.interval)  # every heartbeat now lists its 10 kernels

        # 3. steady state
        first = await gateway.sample()
        latency_task = asyncio.create_task(schedule_latency(registry, args.samples))
        await asyncio.sleep(args.steady)
        last = await gateway.sample()
        results["schedule_1000_instances"] = await latency_task
        beating.cancel()
        await asyncio.gather(beating, return_exceptions=True)
        wall = last["t"] - first["t"]
        results["steady_state"] = {
            "seconds": round(wall, 1),
            "heartbeats_per_s": round((last["handled"] - first["handled"]) / wall, 1),
            "gateway_cpu_percent_of_one_core": round(100 * (last["cpu"] - first["cpu"]) / wall, 1),
        }
        results["kernel_records_after_steady_state"] = len(await registry.list_kernels())
        results["instances_alive"] = sum([await registry.is_alive(i) for i in big.ids])
        results["reconcile_pass"] = await reconcile_pass(registry)

        # 4. capacity
        start = await gateway.sample()
        send_seconds = await big.blast(args.blast, args.interval)
        target = start["received"] + args.blast
        end = await wait_handled(gateway, start["handled"] + args.blast, 120)
        elapsed = end["t"] - start["t"]
        results["intake_capacity"] = {
            "events": int(end["handled"] - start["handled"]),
            "seconds": round(elapsed, 2),
            "events_per_s": round((end["handled"] - start["handled"]) / elapsed, 0),
            "gateway_cpu_percent_of_one_core":
                round(100 * (end["cpu"] - start["cpu"]) / elapsed, 1),
            "all_received": end["received"] >= target,
            "sender_seconds": round(send_seconds, 2),
        }
    finally:
        for agents in (small, big):
            if agents is not None:
                agents.close()
        await gateway.stop()
        await rpc.close()
        await redis.close()
        await engine.dispose()
        if embedded is not None:
            await embedded.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--kernels", type=int, default=10000)
    parser.add_argument("--interval", type=float, default=3.0)
    parser.add_argument("--steady", type=float, default=30.0, help="seconds of steady state")
    parser.add_argument("--blast", type=int, default=60000, help="heartbeats for the capacity run")
    parser.add_argument("--samples", type=int, default=2000, help="schedule() calls per case")
    parser.add_argument("--redis-url")
    parser.add_argument("--db-url")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--no-uvloop", action="store_true",
                        help="run the gateway on the default asyncio loop")
    parser.add_argument("--gateway-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.gateway_child:
        settings = json.loads(args.gateway_child)
        use_uvloop = settings.pop("_uvloop", True)
        if use_uvloop:  # as `sorna serve` runs
            import uvloop
            uvloop.run(gateway_main(settings))
        else:
            asyncio.run(gateway_main(settings))
        return
    results = asyncio.run(bench(args))
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for key, value in results.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
