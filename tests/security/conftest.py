"""Fixtures of the attack tests: the gateway fixtures of tests/gateway (a real
app, database, Redis and agents), here also run against the real Redis server
when SORNA_TEST_REDIS_URL is set; and `standalone`, a real `sorna serve
--standalone` process for the tests that measure its memory."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.gateway.conftest import gateway_config, gateway_factory  # noqa: F401  (shared fixtures)
from tests.helpers import free_port, stop_process


@pytest.fixture
def gateway_redis_url(redis_url) -> str:
    """Embedded Redis, and the real server when SORNA_TEST_REDIS_URL is set."""
    return redis_url


@dataclass
class StandaloneServer:
    proc: subprocess.Popen[bytes]
    folder: Path
    log_path: Path
    port: int

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log()
            if re.search(r"listening on http", log) and "press Ctrl-C" in log:
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited {self.proc.returncode}:\n{log}")
            time.sleep(0.2)
        raise AssertionError(f"serve did not get ready:\n{self.log()}")


@pytest.fixture
def standalone(tmp_path: Path) -> Iterator[Callable[..., StandaloneServer]]:
    """`standalone(SORNA_SETTING=value, ...)` starts `sorna serve --standalone`
    in a fresh folder on free loopback ports and waits until it serves."""
    started: list[StandaloneServer] = []

    def start(**settings: str) -> StandaloneServer:
        folder = tmp_path / f"serve{len(started)}"
        folder.mkdir()
        port = free_port()
        args = [sys.executable, "-m", "sorna_cli", "serve", "--standalone", "--host",
                "127.0.0.1", "--port", str(port), "--manager-port", str(free_port()),
                "--events-port", str(free_port()), "--agent-port", str(free_port())]
        env = {name: value for name, value in os.environ.items()
               if not name.startswith("SORNA_")}
        env.update(settings)
        log_path = tmp_path / f"serve{len(started)}.log"
        proc = subprocess.Popen(args, cwd=folder, env=env, stdout=subprocess.DEVNULL,
                                stderr=log_path.open("wb"))
        server = StandaloneServer(proc, folder, log_path, port)
        started.append(server)
        server.wait_ready()
        return server

    yield start
    for server in started:
        stop_process(server.proc, signal.SIGTERM, 30)
