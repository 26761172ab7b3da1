"""Soak test: the fault suite's load with a schedule of faults, then the invariants.

    python bench/soak.py [--duration 300] [--clients 40] [--agents 2] [--max-kernels 8]
                         [--db-url URL | --private-postgres] [--quiet 15]
                         [--heartbeat-interval 3] [--reconcile-interval 10] [--json]

A private redis-server, 2 gateway processes (`sorna serve`), `--agents`
reference agents and clients looping create -> 3 executes -> destroy (one
keypair each, concurrency limit 4, so a 412 means a leaked slot).  While the
load runs, faults are injected in turn, each followed by `--quiet` seconds:

    agent SIGKILL (then restarted), Redis restart (down 3 s), gateway SIGKILL
    (then restarted), agent SIGSTOP for 5 s, event settlement failure (usage
    inserts refused for 3 s), database stop for 3 s (--private-postgres only)

After each fault the time to full service (create -> execute -> destroy
succeeding on every gateway) is measured.  At the end the load stops and the
invariants of issue 10 are checked once things settle: one usage row per
ended kernel, no live row without a live kernel, quota counters equal live
kernels, agent kernel sets equal what the agents run, `sorna registry
reconcile` clean, no 500 answered.  Prints counts by operation, status and
problem type; exits 1 if any invariant fails.

Without --db-url: SQLite in a temporary folder.  --private-postgres starts a
PostgreSQL cluster of its own (needs the server binaries and the `postgres`
user), the only way to stop the database without touching a shared server.
Loopback only; bounded by --duration (plus the final settling, at most about a
minute).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sorna_server.db.engine import create_engine  # noqa: E402
from tests.faults.cluster import (  # noqa: E402
    Cluster,
    Load,
    PrivatePostgres,
    Settings,
    full_service_after,
    wait_invariants,
)
from tests.helpers import block_usage_inserts  # noqa: E402

Fault = Callable[[], Awaitable[None]]


def faults(cluster: Cluster, pg: PrivatePostgres | None) -> list[tuple[str, Fault]]:
    async def agent_sigkill() -> None:
        cluster.signal_agent(len(cluster.agents) - 1, signal.SIGKILL)
        await asyncio.sleep(2 * cluster.settings.heartbeat_interval)
        await asyncio.to_thread(cluster.start_agent, len(cluster.agents) - 1)

    async def redis_restart() -> None:
        cluster.redis.stop()
        await asyncio.sleep(3.0)
        await asyncio.to_thread(cluster.redis.start)

    async def gateway_sigkill() -> None:
        cluster.kill_gateway(0)
        await asyncio.sleep(2.0)
        await asyncio.to_thread(cluster.start_gateway, 0)

    async def agent_sigstop() -> None:
        cluster.signal_agent(0, signal.SIGSTOP)
        await asyncio.sleep(5.0)
        cluster.signal_agent(0, signal.SIGCONT)

    async def event_settlement_failure() -> None:
        engine = create_engine(cluster.config)
        try:
            await block_usage_inserts(engine)
            await asyncio.sleep(3.0)
            await block_usage_inserts(engine, block=False)
        finally:
            await engine.dispose()

    schedule: list[tuple[str, Fault]] = [
        ("agent SIGKILL", agent_sigkill), ("Redis restart", redis_restart),
        ("gateway SIGKILL", gateway_sigkill), ("agent SIGSTOP 5 s", agent_sigstop),
        ("event settlement failure", event_settlement_failure)]
    if pg is not None:
        async def database_stop() -> None:
            await asyncio.to_thread(pg.stop, "fast")
            await asyncio.sleep(3.0)
            await asyncio.to_thread(pg.start)
        schedule.append(("database stop", database_stop))
    return schedule


async def soak(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    pg: PrivatePostgres | None = None
    if args.private_postgres:
        pg = PrivatePostgres()
        pg.init()
        pg.start()
    db_url = pg.url if pg is not None else args.db_url or f"sqlite:///{workdir / 'soak.db'}"
    settings = Settings(heartbeat_interval=args.heartbeat_interval,
                        reconcile_interval=args.reconcile_interval,
                        agent_rpc_timeout=args.agent_rpc_timeout,
                        creation_deadline=args.creation_deadline, max_kernels=args.max_kernels,
                        agents=args.agents)
    cluster = Cluster(workdir, db_url, settings)
    report: dict[str, Any] = {"duration_s": args.duration, "clients": args.clients,
                              "agents": args.agents, "faults": []}
    try:
        keys = await cluster.prepare_database(keys=args.clients)
        await asyncio.to_thread(cluster.start)
        await cluster.wait_ready()
        load = Load(cluster, keys, clients=args.clients, max_seconds=args.duration + 120)
        load.start()
        started = time.monotonic()
        schedule = faults(cluster, pg)
        try:
            await asyncio.sleep(min(args.quiet, args.duration / 4))
            n = 0
            while time.monotonic() - started < args.duration - args.quiet:
                name, fault = schedule[n % len(schedule)]
                n += 1
                entry: dict[str, Any] = {"fault": name,
                                         "at_s": round(time.monotonic() - started, 1)}
                await fault()
                try:
                    entry["full_service_after_s"] = round(
                        await full_service_after(cluster, keys[0], timeout=60), 2)
                except TimeoutError as exc:
                    entry["full_service_after_s"] = None
                    entry["error"] = str(exc)
                report["faults"].append(entry)
                print(json.dumps(entry), file=sys.stderr, flush=True)
                await asyncio.sleep(max(0.0, min(args.quiet, args.duration
                                                 - (time.monotonic() - started))))
        finally:
            await load.stop()
        report["kernels_done"] = load.kernels_done
        report["answers"] = load.status_counts()
        settle_timeout = cluster.config.creation_deadline + 3 * args.reconcile_interval + 30
        found, seconds = await wait_invariants(cluster, load, timeout=max(settle_timeout, 60))
        report["settled_after_s"] = round(seconds, 1)
        report["invariants"] = {name: ("ok" if not items else items[:20])
                                for name, items in found.items()}
        report["ok"] = not any(found.values())
    finally:
        await asyncio.to_thread(cluster.stop)
        if pg is not None:
            await asyncio.to_thread(pg.destroy)
    return report


def print_report(report: dict[str, Any]) -> None:
    print(f"soak: {report['duration_s']} s, {report['clients']} clients, "
          f"{report['agents']} agents, {report.get('kernels_done', 0)} kernels done")
    print("\nanswers (operation status problem-type: count)")
    for key, count in report.get("answers", {}).items():
        print(f"  {key:60} {count:8d}")
    print("\nfaults (time to full service after the fault ended)")
    for entry in report["faults"]:
        after = entry["full_service_after_s"]
        print(f"  {entry['at_s']:7.1f} s  {entry['fault']:28} "
              f"{'not restored: ' + entry.get('error', '') if after is None else f'{after:.2f} s'}")
    print(f"\ninvariants (settled after {report.get('settled_after_s', '?')} s)")
    for name, result in report.get("invariants", {}).items():
        print(f"  {'ok  ' if result == 'ok' else 'FAIL'} {name}")
        if result != "ok":
            for item in result:
                print(f"         {item}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of load")
    parser.add_argument("--clients", type=int, default=40)
    parser.add_argument("--agents", type=int, default=2)
    parser.add_argument("--max-kernels", type=int, default=8)
    parser.add_argument("--quiet", type=float, default=15.0, help="seconds after each fault")
    parser.add_argument("--heartbeat-interval", type=float, default=3.0)
    parser.add_argument("--reconcile-interval", type=float, default=10.0)
    parser.add_argument("--agent-rpc-timeout", type=float, default=10.0)
    parser.add_argument("--creation-deadline", type=float, default=30.0)
    parser.add_argument("--db-url", help="database (default: SQLite in a temporary folder)")
    parser.add_argument("--private-postgres", action="store_true",
                        help="a PostgreSQL cluster of its own (adds the database-stop fault)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="sorna-soak-"))
    try:
        report = asyncio.run(soak(args, workdir))
    finally:
        if args.keep:
            print(f"logs in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    sys.exit(0 if report.get("ok") else 1)


if __name__ == "__main__":
    main()
