"""Sorna versus Jupyter Kernel Gateway, side by side in one run on this machine.

Both servers run on loopback with their client in this process (same cores):

- start: create a kernel and get the first result of `1+1` (kernel deleted after each run)
- execute: round trip of `1+1` on one warm kernel
- parallel: executes/s with 8 kernels, one client loop per kernel
- rest: authenticated kernel-info requests/s with 32 concurrent clients

Sorna runs as `sorna serve --standalone` in a temporary folder.  Jupyter Kernel
Gateway (with ipykernel) is not a dependency of this project: install it in a
separate virtualenv and point `--jkg-bin` at its `jupyter-kernelgateway`, e.g.

    python -m venv /tmp/jkg && /tmp/jkg/bin/pip install jupyter_kernel_gateway==3.0.1 ipykernel
    python bench/versus_jkg.py --jkg-bin /tmp/jkg/bin/jupyter-kernelgateway

Without `--jkg-bin` only Sorna is measured.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from sorna_server.gateway.auth import sign_request

VERSION = "v2.20170315"
JKG_TOKEN = "bench-token"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def wait_http(url: str, headers: dict[str, str] | None = None, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(url, headers=headers) as resp:
                    if resp.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


class Sorna:
    name = "Sorna"

    def __init__(self, port: int, access_key: str, secret_key: str):
        self.base = f"http://127.0.0.1:{port}"
        self.host = f"127.0.0.1:{port}"
        self.access_key = access_key
        self.secret_key = secret_key
        self.session: aiohttp.ClientSession | None = None

    def _headers(self, method: str, path: str, body: bytes, content_type: str) -> dict[str, str]:
        raw_date = datetime.now(UTC).isoformat()
        signature = sign_request(self.secret_key, method=method, path_qs=path, raw_date=raw_date,
                                 host=self.host, content_type=content_type, version=VERSION,
                                 body=body)
        return {"Date": raw_date, "X-Sorna-Version": VERSION, "Content-Type": content_type,
                "Authorization": "Sorna signMethod=HMAC-SHA256, "
                                 f"credential={self.access_key}:{signature}"}

    async def request(self, method: str, path: str, payload: Any = None) -> Any:
        body = json.dumps(payload).encode() if payload is not None else b""
        content_type = "application/json" if payload is not None else "application/octet-stream"
        headers = self._headers(method, path, body, content_type)
        async with self.session.request(method, self.base + path, data=body,
                                        headers=headers) as resp:
            text = await resp.read()
            if resp.status >= 300:
                raise RuntimeError(f"{method} {path}: {resp.status} {text[:200]!r}")
            return json.loads(text) if text else None

    async def create(self) -> str:
        data = await self.request("POST", "/v2/kernel/create",
                                  {"lang": "python3", "clientSessionToken": uuid.uuid4().hex})
        return data["kernelId"]

    async def execute(self, kernel_id: str, code: str) -> Any:
        data = await self.request("POST", f"/v2/kernel/{kernel_id}",
                                  {"mode": "query", "code": code})
        return data["result"]

    async def info(self, kernel_id: str) -> Any:
        return await self.request("GET", f"/v2/kernel/{kernel_id}")

    async def destroy(self, kernel_id: str) -> None:
        await self.request("DELETE", f"/v2/kernel/{kernel_id}")


class JupyterKernelGateway:
    name = "Jupyter KG"

    def __init__(self, port: int):
        self.base = f"http://127.0.0.1:{port}"
        self.headers = {"Authorization": f"token {JKG_TOKEN}"}
        self.session: aiohttp.ClientSession | None = None
        self.sockets: dict[str, aiohttp.ClientWebSocketResponse] = {}

    async def create(self) -> str:
        async with self.session.post(self.base + "/api/kernels", json={"name": "python3"},
                                     headers=self.headers) as resp:
            kernel_id = (await resp.json())["id"]
        self.sockets[kernel_id] = await self.session.ws_connect(
            f"{self.base}/api/kernels/{kernel_id}/channels", headers=self.headers)
        return kernel_id

    async def execute(self, kernel_id: str, code: str) -> Any:
        ws = self.sockets[kernel_id]
        msg_id = uuid.uuid4().hex
        await ws.send_json({
            "header": {"msg_id": msg_id, "username": "bench", "session": kernel_id,
                       "msg_type": "execute_request", "version": "5.3",
                       "date": datetime.now(UTC).isoformat()},
            "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
            "content": {"code": code, "silent": False, "store_history": False,
                        "user_expressions": {}, "allow_stdin": False, "stop_on_error": True},
        })
        result = None
        replied = False
        while not (replied and result is not None):
            msg = await ws.receive_json()
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind = msg["msg_type"]
            if kind == "execute_result":
                result = msg["content"]["data"]["text/plain"]
            elif kind == "execute_reply":
                replied = True
                if msg["content"]["status"] != "ok":
                    raise RuntimeError(f"execute failed: {msg['content']}")
        return result

    async def info(self, kernel_id: str) -> Any:
        async with self.session.get(f"{self.base}/api/kernels/{kernel_id}",
                                    headers=self.headers) as resp:
            if resp.status != 200:
                raise RuntimeError(f"info: {resp.status}")
            return await resp.json()

    async def destroy(self, kernel_id: str) -> None:
        ws = self.sockets.pop(kernel_id, None)
        if ws is not None:
            await ws.close()
        async with self.session.delete(f"{self.base}/api/kernels/{kernel_id}",
                                       headers=self.headers) as resp:
            await resp.read()


async def measure(target: Any, args: argparse.Namespace) -> dict[str, float]:
    figures: dict[str, float] = {}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        target.session = session
        # warm up both code paths once (the server may still be waiting for its agent)
        deadline = time.monotonic() + 60
        while True:
            try:
                kernel_id = await target.create()
                break
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)
        await target.execute(kernel_id, "1+1")
        await target.destroy(kernel_id)

        starts = []
        for _ in range(args.starts):
            began = time.perf_counter()
            kernel_id = await target.create()
            await target.execute(kernel_id, "1+1")
            starts.append((time.perf_counter() - began) * 1000)
            await target.destroy(kernel_id)
        figures["start p50 ms"] = statistics.median(starts)

        kernel_id = await target.create()
        rtts = []
        for _ in range(args.executes):
            began = time.perf_counter()
            await target.execute(kernel_id, "1+1")
            rtts.append((time.perf_counter() - began) * 1000)
        figures["execute p50 ms"] = statistics.median(rtts)
        figures["execute min ms"] = min(rtts)

        async def rest_worker(stop: float) -> int:
            done = 0
            while time.perf_counter() < stop:
                await target.info(kernel_id)
                done += 1
            return done

        stop = time.perf_counter() + args.seconds
        counts = await asyncio.gather(*(rest_worker(stop) for _ in range(32)))
        figures["rest 32 clients req/s"] = sum(counts) / args.seconds
        await target.destroy(kernel_id)

        kernels = [await target.create() for _ in range(8)]

        async def exec_worker(kid: str, stop: float) -> int:
            done = 0
            while time.perf_counter() < stop:
                await target.execute(kid, "1+1")
                done += 1
            return done

        stop = time.perf_counter() + args.seconds
        counts = await asyncio.gather(*(exec_worker(k, stop) for k in kernels))
        figures["8 kernels executes/s"] = sum(counts) / args.seconds
        for kid in kernels:
            await target.destroy(kid)
    return figures


def start_sorna(workdir: Path, port: int, workers: int) -> subprocess.Popen:
    env = {**os.environ, "SORNA_LOG_LEVEL": "WARNING"}
    return subprocess.Popen(
        [sys.executable, "-m", "sorna_cli", "--data-dir", str(workdir / "sorna-data"), "serve",
         "--standalone", "--host", "127.0.0.1", "--port", str(port),
         "--manager-port", str(free_port()), "--events-port", str(free_port()),
         "--agent-port", str(free_port()), "--workers", str(workers)],
        cwd=workdir, env=env, stdout=subprocess.DEVNULL,
        stderr=(workdir / "sorna.log").open("wb"), start_new_session=True)


def bench_keypair(workdir: Path) -> tuple[str, str]:
    """A keypair whose rate limit and quota do not cap the benchmark."""
    out = subprocess.run(
        [sys.executable, "-m", "sorna_cli", "--data-dir", str(workdir / "sorna-data"),
         "keypair", "create", "--user-id", "1000", "--concurrency-limit", "64",
         "--rate-limit", "1000000000", "--json"],
        cwd=workdir, check=True, capture_output=True, text=True).stdout
    data = json.loads(out)
    return data["access_key"], data["secret_key"]


def start_jkg(binary: str, workdir: Path, port: int) -> subprocess.Popen:
    bindir = str(Path(binary).resolve().parent)
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    return subprocess.Popen(
        [binary, "--KernelGatewayApp.ip=127.0.0.1", f"--KernelGatewayApp.port={port}",
         f"--KernelGatewayApp.auth_token={JKG_TOKEN}", "--KernelGatewayApp.log_level=WARN"],
        cwd=workdir, env=env, stdout=subprocess.DEVNULL,
        stderr=(workdir / "jkg.log").open("wb"), start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


async def main(args: argparse.Namespace) -> None:
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="sorna-vs-") as tmp:
        workdir = Path(tmp)
        port = free_port()
        proc = start_sorna(workdir, port, args.workers)
        try:
            await wait_http(f"http://127.0.0.1:{port}/v2")
            results["Sorna"] = await measure(Sorna(port, *bench_keypair(workdir)), args)
        finally:
            stop(proc)
        if args.jkg_bin:
            port = free_port()
            proc = start_jkg(args.jkg_bin, workdir, port)
            try:
                await wait_http(f"http://127.0.0.1:{port}/api",
                                headers={"Authorization": f"token {JKG_TOKEN}"})
                results["Jupyter KG"] = await measure(JupyterKernelGateway(port), args)
            finally:
                stop(proc)
    names = list(results)
    metrics = list(results[names[0]])
    print(f"{'metric':<24}" + "".join(f"{n:>14}" for n in names)
          + ("  ratio (better = >1)" if len(names) == 2 else ""))
    for metric in metrics:
        row = f"{metric:<24}" + "".join(f"{results[n][metric]:>14.2f}" for n in names)
        if len(names) == 2:
            ours, theirs = results["Sorna"][metric], results["Jupyter KG"][metric]
            ratio = theirs / ours if "ms" in metric else ours / theirs
            row += f"  {ratio:>8.1f}x"
        print(row)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jkg-bin", help="path of jupyter-kernelgateway (separate venv)")
    parser.add_argument("--workers", type=int, default=1, help="sorna serve --workers")
    parser.add_argument("--starts", type=int, default=20)
    parser.add_argument("--executes", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=5.0)
    try:
        from uvloop import run
    except ImportError:
        from asyncio import run
    run(main(parser.parse_args()))
