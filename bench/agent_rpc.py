"""Agent RPC benchmark: starts its own agent, measures over real ZeroMQ RPC.

    python bench/agent_rpc.py [--pool-size 4] [--creates 50] [--executes 1000]
                              [--parallel 8] [--seconds 5] [--density 200]

Figures: create_kernel latency (p50/p95) at a manager's pace (`--create-gap`) and
under churn (create/destroy back to back), execute `1+1` round trip (p50/p95),
executes per second with N kernels executing in parallel, and memory density:
the PSS of `--density` idle python kernels (every process of the agent's tree
but the agent itself, with and without the fork servers and the warm pool).
The client is the manager's own `AgentRPCClient`.  Reading other users' PSS
needs root (as the full sandbox does).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sorna_server import curve  # noqa: E402
from sorna_server.agent_client import AgentRPCClient  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[index]


async def wait_ready(client: AgentRPCClient, addr: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            await client.call(addr, "ping", timeout=1)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def bench(args: argparse.Namespace, addr: str, agent_pid: int,
                keys: tuple[curve.KeyPair, str] | None) -> list[tuple[str, str]]:
    """`keys`: the gateway keypair and the agent's public key (None: plain ZeroMQ)."""
    async def key_for(_addr: str) -> str | None:
        return keys[1] if keys else None

    client = AgentRPCClient(default_timeout=30, keys=keys[0] if keys else None,
                            key_for=key_for)
    rows: list[tuple[str, str]] = []
    try:
        await wait_ready(client, addr)
        await asyncio.sleep(args.warmup)  # let the warm pool fill

        creates = []
        for _ in range(args.creates):
            started = time.perf_counter()
            result = await client.call(addr, "create_kernel", {"lang": "python3"})
            creates.append((time.perf_counter() - started) * 1000)
            await client.call(addr, "destroy_kernel", {"kernel_id": result["kernel_id"]})
            await asyncio.sleep(args.create_gap)
        rows.append((f"create_kernel p50 ({args.creates} runs)",
                     f"{statistics.median(creates):.1f} ms"))
        rows.append(("create_kernel p95", f"{percentile(creates, 95):.1f} ms"))

        churn = []  # sustained create/destroy with no pause: the pool cannot keep up
        for _ in range(args.creates):
            started = time.perf_counter()
            result = await client.call(addr, "create_kernel", {"lang": "python3"})
            churn.append((time.perf_counter() - started) * 1000)
            await client.call(addr, "destroy_kernel", {"kernel_id": result["kernel_id"]})
        rows.append((f"create_kernel p50, churn ({args.creates} runs, no gap)",
                     f"{statistics.median(churn):.1f} ms"))
        rows.append(("create_kernel p95, churn", f"{percentile(churn, 95):.1f} ms"))

        kernel = (await client.call(addr, "create_kernel", {"lang": "python3"}))["kernel_id"]
        execute = {"kernel_id": kernel, "mode": "query", "code": "1+1"}
        for _ in range(50):
            await client.call(addr, "execute", execute)
        rtts = []
        for _ in range(args.executes):
            started = time.perf_counter()
            result = await client.call(addr, "execute", execute)
            rtts.append((time.perf_counter() - started) * 1000)
        assert result["console"] == [["stdout", "2\n"]], result
        rows.append((f"execute 1+1 p50 ({args.executes} runs)",
                     f"{statistics.median(rtts):.3f} ms"))
        rows.append(("execute 1+1 p95", f"{percentile(rtts, 95):.3f} ms"))
        await client.call(addr, "destroy_kernel", {"kernel_id": kernel})

        kernels = [(await client.call(addr, "create_kernel", {"lang": "python3"}))["kernel_id"]
                   for _ in range(args.parallel)]
        stop_at = time.perf_counter() + args.seconds
        counts = [0] * len(kernels)

        async def hammer(index: int, kernel_id: str) -> None:
            call = {"kernel_id": kernel_id, "mode": "query", "code": "1+1"}
            while time.perf_counter() < stop_at:
                await client.call(addr, "execute", call)
                counts[index] += 1

        started = time.perf_counter()
        await asyncio.gather(*(hammer(i, k) for i, k in enumerate(kernels)))
        elapsed = time.perf_counter() - started
        rows.append((f"executes/s, {args.parallel} kernels in parallel",
                     f"{sum(counts) / elapsed:,.0f}"))
        await client.call(addr, "reset", {})
        if args.density:
            rows += await density(client, addr, args.density, agent_pid)
    finally:
        await client.close()
    return rows


def pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def tree_pss_kib(agent_pid: int) -> int:
    """PSS of every descendant of the agent (fork servers, warm pool, kernels)."""
    import psutil
    return sum(pss_kib(child.pid) for child in psutil.Process(agent_pid).children(recursive=True))


async def density(client: AgentRPCClient, addr: str, count: int,
                  agent_pid: int) -> list[tuple[str, str]]:
    await asyncio.sleep(1.0)  # the warm pool is full again
    before = tree_pss_kib(agent_pid)
    kernels = [(await client.call(addr, "create_kernel", {"lang": "python3"}))["kernel_id"]
               for _ in range(count)]
    await asyncio.sleep(2.0)  # idle, and the pool refilled
    after = tree_pss_kib(agent_pid)
    await client.call(addr, "reset", {})
    assert len(kernels) == count
    return [(f"PSS per idle python kernel ({count} kernels)",
             f"{(after - before) / count / 1024:.2f} MiB"),
            ("  the same, fork servers and warm pool included",
             f"{after / count / 1024:.2f} MiB")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool-size", type=int, default=4)
    parser.add_argument("--creates", type=int, default=50)
    parser.add_argument("--create-gap", type=float, default=0.05,
                        help="seconds between creates (a manager's pace, lets the pool refill)")
    parser.add_argument("--executes", type=int, default=1000)
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--plain", action="store_true",
                        help="plain ZeroMQ instead of CurveZMQ (to see what CURVE costs)")
    parser.add_argument("--density", type=int, default=200,
                        help="idle python kernels for the PSS figure (0: skip it)")
    args = parser.parse_args()

    port = free_port()
    addr = f"tcp://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="sorna-bench-") as data_dir:
        key_flags: list[str] = []
        keys = None
        if not args.plain:
            folder = Path(data_dir) / "keys"
            curve.generate(folder / "gateway")
            agent_public, _ = curve.generate(folder / "agent")
            key_flags = ["--key", str(folder / "agent.key_secret"),
                         "--gateway-keys", str(folder / "gateway.key")]
            keys = (curve.load_keypair(folder / "gateway.key_secret", "gateway_key"),
                    next(iter(curve.load_public_keys(agent_public, "agent"))).decode())
        agent = subprocess.Popen(
            [sys.executable, "-m", "sorna_cli", "--data-dir", data_dir, "agent",
             "--rpc-addr", addr, "--instance-id", "i-bench", "--manager",
             f"tcp://127.0.0.1:{free_port()}", "--pool-size", str(args.pool_size),
             "--max-kernels", str(max(16, args.parallel + 2, args.density + 2)), *key_flags],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(data_dir, "agent.log"), "wb"),
            env={**os.environ, "SORNA_LOG_LEVEL": "WARNING"})
        try:
            try:
                import uvloop
                rows = uvloop.run(bench(args, addr, agent.pid, keys))
            except ImportError:
                rows = asyncio.run(bench(args, addr, agent.pid, keys))
        finally:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(30)
            except subprocess.TimeoutExpired:
                agent.kill()
    width = max(len(name) for name, _ in rows)
    print(f"{'figure':<{width}}  value")
    print(f"{'-' * width}  {'-' * 12}")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print(f"({'plain ZeroMQ' if args.plain else 'CurveZMQ'}; agent pool size {args.pool_size}, "
          f"{os.cpu_count()} CPUs, Python "
          f"{sys.version.split()[0]})")


if __name__ == "__main__":
    main()
