"""Shared fixtures: real databases and real Redis servers, never mocks.

- `db_url`: a fresh SQLite file, and (when SORNA_TEST_DB_URL is set) a fresh
  PostgreSQL database created for the test and dropped after it.
- `redis_url`: the embedded redis-server (session-scoped), and (when
  SORNA_TEST_REDIS_URL is set) that real server; the databases tests use are
  flushed before each test.
- `make_config`: builds a SornaConfig for a test with free ports and a private
  data directory; keyword arguments override settings.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from sorna_server.config import SornaConfig, load_config
from sorna_server.redis_conn import EmbeddedRedis
from tests import helpers
from tests.helpers import (
    PG_URL,
    REAL_REDIS_URL,
    TEST_REDIS_DBS,
    AgentCurve,
    AgentProcess,
    PrivateRedis,
    ServeProcess,
    flush_redis_dbs,
    pg_admin,
    ping_agent,
    stop_process,
)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """`@pytest.mark.needs_gcc` (gcc) or `@pytest.mark.needs_gcc("g++")`: skip without it."""
    for marker in item.iter_markers("needs_gcc"):
        missing = [tool for tool in (marker.args or ("gcc",)) if shutil.which(tool) is None]
        if missing:
            pytest.skip(f"{', '.join(missing)} is not installed")


@pytest.fixture
def free_port() -> Callable[[], int]:
    """Call it to get a TCP port on 127.0.0.1 that is free right now."""
    return helpers.free_port


DB_BACKENDS = ["sqlite"] + (["postgresql"] if PG_URL else [])


@pytest.fixture(params=DB_BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL of an empty database of each configured backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'test.db'}"
    name = f"sorna_test_{uuid.uuid4().hex[:12]}"
    pg_admin(f'CREATE DATABASE "{name}"')
    request.addfinalizer(lambda: pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    return make_url(PG_URL).set(database=name).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def embedded_redis_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    # A short path: unix socket paths are limited to about 100 bytes.
    data_dir = Path(tmp_path_factory.mktemp("redis"))
    server = EmbeddedRedis(data_dir)
    loop = asyncio.new_event_loop()
    try:
        url = loop.run_until_complete(server.start())
        yield url
        loop.run_until_complete(server.stop())
    finally:
        loop.close()


REDIS_BACKENDS = ["embedded"] + (["real"] if REAL_REDIS_URL else [])


@pytest.fixture(params=REDIS_BACKENDS)
def redis_url(request: pytest.FixtureRequest) -> str:
    """A Redis URL whose test databases are empty."""
    url = request.getfixturevalue("embedded_redis_url") if request.param == "embedded" \
        else REAL_REDIS_URL
    flush_redis_dbs(url, TEST_REDIS_DBS.values())
    return url


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., SornaConfig]:
    """Build a config for this test: private data dir, free ports, overrides win."""
    def build(**overrides: Any) -> SornaConfig:
        values: dict[str, Any] = {
            "data_dir": str(tmp_path / "data"),
            "service_ip": "127.0.0.1",
            "service_port": helpers.free_port(),
            "manager_port": helpers.free_port(),
            "events_ip": "127.0.0.1",
            "events_port": helpers.free_port(),
            "agent_port": helpers.free_port(),
            **TEST_REDIS_DBS,
        }
        values.update(overrides)
        return load_config(None, **values)
    return build


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never see the developer's SORNA_* settings (SORNA_TEST_* stay)."""
    for name in list(os.environ):
        if name.startswith("SORNA_") and not name.startswith("SORNA_TEST_"):
            monkeypatch.delenv(name)


@pytest.fixture
def agent_factory(tmp_path: Path) -> Callable[..., AgentProcess]:
    """Start reference agents: `agent_factory(events_port=..., instance_id=..., **flags)`
    (`data_dir=`: its data directory, default a fresh one per instance id).

    Keyword flags map to `sorna agent` options (max_kernels -> --max-kernels).
    `curve=AgentCurve(...)` gives it CurveZMQ keys (`--key`, `--gateway-keys`) and
    pings it with the gateway keypair of that setting.
    Waits until the agent answers `ping`; every agent is stopped after the test.
    """
    started: list[AgentProcess] = []

    def start(events_port: int | None = None, *, instance_id: str | None = None,
              managers: list[str] | None = None, env: dict[str, str] | None = None,
              wait: bool = True, data_dir: Path | None = None,
              curve: AgentCurve | None = None, **flags: Any) -> AgentProcess:
        port = helpers.free_port()
        addr = f"tcp://127.0.0.1:{port}"
        instance_id = instance_id or f"i-test-{uuid.uuid4().hex[:8]}"
        managers = managers or ([f"tcp://127.0.0.1:{events_port}"] if events_port else [])
        data_dir = data_dir or tmp_path / instance_id
        data_dir.mkdir(parents=True, exist_ok=True)
        args = [sys.executable, "-m", "sorna_cli", "--data-dir", str(data_dir), "agent",
                "--rpc-addr", addr, "--instance-id", instance_id]
        for manager in managers:
            args += ["--manager", manager]
        if curve is not None:
            args += ["--key", str(curve.key), "--gateway-keys", str(curve.gateway_keys)]
        ping_keys = (curve.gateway, curve.public) if curve is not None else (None, None)
        for name, value in flags.items():
            args += [f"--{name.replace('_', '-')}", str(value)]
        log_path = data_dir / "agent.log"
        proc = subprocess.Popen(args, stdout=log_path.open("wb"), stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})
        agent = AgentProcess(proc, addr, instance_id, log_path)
        started.append(agent)
        if wait:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise RuntimeError(f"agent exited with {proc.returncode}:\n{agent.log()}")
                if ping_agent(addr, 0.5, *ping_keys):
                    break
            else:
                raise RuntimeError(f"agent did not answer ping:\n{agent.log()}")
        return agent

    yield start
    for agent in started:
        agent.stop()


@pytest.fixture
def serve(tmp_path, free_port):
    """Start `sorna serve` processes on free loopback ports: `serve(*flags, name=, env=)`
    returns (process, ports); every server is stopped after the test."""
    started: list[ServeProcess] = []

    def start(*extra: str, name: str = "empty",
              env: dict[str, str] | None = None) -> tuple[ServeProcess, dict[str, int]]:
        folder = tmp_path / name
        folder.mkdir()
        ports = {"port": free_port(), "manager-port": free_port(),
                 "events-port": free_port(), "agent-port": free_port()}
        args = ["serve", "--host", "127.0.0.1", *extra]
        for flag, port in ports.items():
            args += [f"--{flag}", str(port)]
        process = ServeProcess(folder, args, env)
        started.append(process)
        return process, ports

    yield start
    for process in started:  # a graceful stop also stops the embedded Redis and the agent
        stop_process(process.proc, signal.SIGTERM, 30)


@pytest.fixture
def private_redis(free_port, tmp_path):
    """A redis-server of the test's own that it may kill and restart (`PrivateRedis`)."""
    server = PrivateRedis(free_port(), tmp_path)
    server.start()
    yield server
    server.stop()
