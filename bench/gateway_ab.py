"""Two builds' gateways side by side: requests/s and gateway CPU per request.

On a shared machine, separate runs of `bench/gateway.py` differ by 20-30% with
whatever else runs; a before/after taken that way says little about a 5%
change.  This starts `sorna serve --standalone` from each source tree at once
(each with its own embedded Redis, SQLite and agent, `PYTHONPATH=<tree>`) and
alternates short rounds of each case between them, swapping which goes first
every round, so both see the same load from elsewhere:

  hello      GET /v2 (no authentication)
  authorize  GET /v2/authorize (signed, leased key: signature, replay check)
  exec       POST /v2/kernel/<id> {"mode": "query", "code": "1+1"}

Prints, per case, each build's requests/s and gateway CPU us/request, and the
B/A throughput ratio of each round pair (mean, median, range).

    python bench/gateway_ab.py BEFORE_TREE AFTER_TREE [--rounds 12] [--clients 32]
                               [--round-seconds 1] [--json]

Both trees need the dependencies of this one installed; `git worktree add
/tmp/before <commit>` gives a tree of an older commit.  The client side
(signing, sampling) is this tree's, so both builds are driven the same way.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gateway import VERSION, Sampler, Server, cpu_seconds, sign  # noqa: E402

CASES = ("hello", "authorize", "exec")
Case = Callable[[], Awaitable[None]]


async def cases_of(server: Server, access: str, secret: str,
                   session: aiohttp.ClientSession) -> dict[str, Case]:
    host = f"127.0.0.1:{server.ports['port']}"
    base = server.endpoint
    body = json.dumps({"lang": "python3", "clientSessionToken": uuid.uuid4().hex}).encode()
    async with session.post(f"{base}/v2/kernel/create", data=body, headers=sign(
            "POST", "/v2/kernel/create", host, body, access, secret)) as resp:
        assert resp.status == 201, await resp.text()
        exec_path = f"/v2/kernel/{(await resp.json())['kernelId']}"
    exec_body = json.dumps({"mode": "query", "code": "1+1"}).encode()

    async def hello() -> None:
        async with session.get(f"{base}/v2", headers={"X-Sorna-Version": VERSION}) as resp:
            await resp.read()
            assert resp.status == 200

    async def authorize() -> None:
        async with session.get(f"{base}/v2/authorize", headers=sign(
                "GET", "/v2/authorize", host, b"", access, secret)) as resp:
            await resp.read()
            assert resp.status == 200, resp.status

    async def execute() -> None:
        async with session.post(f"{base}{exec_path}", data=exec_body, headers=sign(
                "POST", exec_path, host, exec_body, access, secret)) as resp:
            await resp.read()
            assert resp.status == 200, resp.status

    return {"hello": hello, "authorize": authorize, "exec": execute}


async def measure(servers: list[Server], credentials: list[tuple[str, str]],
                  args: argparse.Namespace) -> dict[str, list[list[dict]]]:
    """Per case, per build: the figures of each round."""
    results: dict[str, list[list[dict]]] = {case: [[], []] for case in CASES}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        builds = [await cases_of(server, *creds, session)
                  for server, creds in zip(servers, credentials, strict=True)]
        for cases in builds:  # warm-up
            for one in cases.values():
                for _ in range(50):
                    await one()
        clocks = [cpu_seconds(server.proc.pid) for server in servers]
        for round_no in range(args.rounds):
            for case in CASES:
                for index in ((0, 1) if round_no % 2 == 0 else (1, 0)):
                    sampler = Sampler(clocks[index])
                    await sampler.round(builds[index][case], args.clients, args.round_seconds)
                    results[case][index].append(sampler.figures())
    return results


def summary(results: dict[str, list[list[dict]]], names: list[str]) -> list[dict]:
    rows = []
    for case, (before, after) in results.items():
        ratios = [b["rps"] / a["rps"] for a, b in zip(before, after, strict=True) if a["rps"]]
        rows.append({
            "case": case,
            **{f"{name}_rps": statistics.mean(r["rps"] for r in runs)
               for name, runs in zip(names, (before, after), strict=True)},
            **{f"{name}_gw_cpu_us": statistics.median(r["gw_cpu_us"] for r in runs)
               for name, runs in zip(names, (before, after), strict=True)},
            "ratio_mean": statistics.mean(ratios), "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios), "ratio_max": max(ratios),
            "errors": sum(r["errors"] for r in before + after)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path, help="source tree A (before)")
    parser.add_argument("after", type=Path, help="source tree B (after)")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--round-seconds", type=float, default=1.0)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    trees = [args.before.resolve(), args.after.resolve()]
    for tree in trees:
        if not (tree / "sorna_cli").is_dir():
            parser.error(f"{tree} is not a Sorna source tree (no sorna_cli/ in it)")
    with tempfile.TemporaryDirectory(prefix="sorna-ab-") as tmp:
        servers: list[Server] = []
        try:
            for index, tree in enumerate(trees):
                folder = Path(tmp) / str(index)
                folder.mkdir()
                os.environ["PYTHONPATH"] = str(tree)  # inherited by `sorna serve`
                servers.append(Server(folder))
            credentials = []
            for server, tree in zip(servers, trees, strict=True):
                os.environ["PYTHONPATH"] = str(tree)  # `sorna keypair create` of that build
                server.wait_ready()
                credentials.append(server.create_keypair())
            try:
                import uvloop
                results = uvloop.run(measure(servers, credentials, args))
            except ImportError:
                results = asyncio.run(measure(servers, credentials, args))
        finally:
            for server in servers:
                server.stop()
    names = ["before", "after"]
    rows = summary(results, names)
    if args.json:
        print(json.dumps({"trees": [str(t) for t in trees], "clients": args.clients,
                          "rounds": args.rounds, "summary": rows}, indent=2))
        return
    print(f"A = {trees[0]}\nB = {trees[1]}\n{args.clients} clients, {args.rounds} rounds of "
          f"{args.round_seconds:g} s per case and build")
    print(f"{'case':<10} {'A req/s':>9} {'B req/s':>9} {'A us/req':>9} {'B us/req':>9} "
          f"{'B/A mean':>9} {'median':>7} {'range':>13}")
    for row in rows:
        print(f"{row['case']:<10} {row['before_rps']:>9.0f} {row['after_rps']:>9.0f} "
              f"{row['before_gw_cpu_us']:>9.1f} {row['after_gw_cpu_us']:>9.1f} "
              f"{row['ratio_mean']:>9.3f} {row['ratio_median']:>7.3f} "
              f"{row['ratio_min']:>6.3f}-{row['ratio_max']:.3f}")
    print(f"(errors: {sum(row['errors'] for row in rows)})")


if __name__ == "__main__":
    main()
