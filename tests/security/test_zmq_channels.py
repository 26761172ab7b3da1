"""Attacks on the ZeroMQ channels between gateways and agents (CurveZMQ), against
real gateways (in process), real agents (processes), Redis and a database.

Each test plays one attacker and shows the attack has no effect, beside the
legitimate path doing the same thing with the right keys (so that each
assertion could fail):

- the events port (gateway side): plain peers, unknown keys, an allowed agent
  key speaking for another agent's instance id, oversized frames;
- the agent's RPC port and a kernel's PTY ports: plain peers and unknown keys;
- start-up checks: wrong keys fail loudly, non-loopback binds need keys;
- rotation of gateway and agent keys through key folders, also across a
  reconnection while a key is out of a folder; `sorna keys generate`.
"""
from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import zmq
import zmq.asyncio
from aiohttp.test_utils import TestServer
from zmq.utils.monitor import recv_monitor_message

from sorna_server import agent_protocol as proto
from sorna_server import curve, redis_keys
from sorna_server.db.models import kernels, usage
from sorna_server.gateway import keys as app_keys
from sorna_server.gateway.app import create_app
from sorna_server.registry import Registry
from sorna_server.registry.intake import EventIntake
from tests.helpers import (
    AgentCurve,
    Gateway,
    free_port,
    info,
    ping_agent,
    run_sorna,
    stdout_of,
    wait_for,
)

HUGE_CPU = 10**15
NO_REPLY_WAIT = 1.5  # seconds a refused RPC peer waits for an answer


# --- keys --------------------------------------------------------------------

@dataclass
class Keys:
    """Key files of one deployment: the gateway keypair, the gateway's folder of
    accepted agent keys and the agents' folder of accepted gateway keys."""
    root: Path
    agent_keys: Path     # the gateway's agent_keys (folder)
    gateway_keys: Path   # the agents' gateway_keys (folder)

    def make(self, name: str) -> tuple[Path, curve.KeyPair]:
        """A new keypair NAME: (its public key file, the keypair)."""
        public_file, secret_file = curve.generate(self.root / name)
        return public_file, curve.load_keypair(secret_file, name)

    def secret(self, name: str) -> Path:
        return self.root / f"{name}{curve.SECRET_SUFFIX}"

    def allow_agent(self, name: str) -> None:
        shutil.copy(self.root / f"{name}{curve.PUBLIC_SUFFIX}",
                    self.agent_keys / f"{name}{curve.PUBLIC_SUFFIX}")

    def allow_gateway(self, name: str) -> None:
        shutil.copy(self.root / f"{name}{curve.PUBLIC_SUFFIX}",
                    self.gateway_keys / f"{name}{curve.PUBLIC_SUFFIX}")

    def admitted_agent(self, name: str) -> curve.KeyPair:
        """A new keypair NAME that the gateway accepts as an agent's."""
        self.make(name)
        self.allow_agent(name)
        return self.pair(name)

    def agent(self, name: str = "agent", allowed: bool = True,
              gateway: curve.KeyPair | None = None) -> AgentCurve:
        """A new agent keypair (in agent_keys unless `allowed` is false)."""
        self.make(name)
        if allowed:
            self.allow_agent(name)
        return AgentCurve(self.secret(name), self.gateway_keys,
                          gateway or self.pair("gateway"))

    def pair(self, name: str) -> curve.KeyPair:
        return curve.load_keypair(self.secret(name), name)

    def gateway_settings(self, name: str = "gateway") -> dict[str, Any]:
        return {"gateway_key": str(self.secret(name)), "agent_keys": str(self.agent_keys)}


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    """SQLite only: these channels do not touch the database differently per backend
    (the HTTP attack tests run on every backend)."""
    return f"sqlite:///{tmp_path / 'test.db'}"


@pytest.fixture
def gateway_redis_url(embedded_redis_url: str) -> str:
    """The embedded Redis only, for the same reason."""
    return embedded_redis_url


@pytest.fixture
def zkeys(tmp_path: Path) -> Keys:
    """A gateway keypair "gateway" accepted by the agents, and empty key folders."""
    found = Keys(tmp_path / "keys", tmp_path / "keys" / "agents", tmp_path / "keys" / "gateways")
    found.agent_keys.mkdir(parents=True)
    found.gateway_keys.mkdir(parents=True)
    found.make("gateway")
    found.allow_gateway("gateway")
    return found


async def _secure_gateway(gateway_factory: Callable[..., Any], zkeys: Keys, agents: int = 1,
                          **overrides: Any) -> tuple[Gateway, AgentCurve]:
    """A gateway with keys and `agents` agents sharing the agent keypair "agent"."""
    agent = zkeys.agent("agent")
    gw = await gateway_factory(agents=agents, agent_flags={"curve": agent},
                               **zkeys.gateway_settings(), **overrides)
    return gw, agent


# --- helpers -------------------------------------------------------------------

def _registry(gw: Gateway) -> Registry:
    return gw.app[app_keys.REGISTRY]


def _intake(gw: Gateway) -> EventIntake:
    return gw.app[app_keys.INTAKE]


def _events_addr(gw: Gateway) -> str:
    return f"tcp://127.0.0.1:{gw.config.events_port}"


def _socket(kind: int, addr: str, pair: curve.KeyPair | None = None,
            server_key: bytes | None = None) -> zmq.asyncio.Socket:
    """A socket of `kind` connected to `addr`: plain, or a CURVE client with `pair`."""
    sock = zmq.asyncio.Context.instance().socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    curve.make_client(sock, pair, server_key)
    sock.connect(addr)
    return sock


def _event_pusher(gw: Gateway, zkeys: Keys, pair: curve.KeyPair) -> zmq.asyncio.Socket:
    """A PUSH socket to the gateway's events port with `pair`'s key."""
    return _socket(zmq.PUSH, _events_addr(gw), pair, zkeys.pair("gateway").public)


async def _instances(gw: Gateway) -> dict[str, tuple[str, int, str, str]]:
    """What an attacker would want to change: each instance's address, capacity,
    key and status."""
    return {i.id: (i.addr, i.max_kernels, i.key, i.status)
            for i in await _registry(gw).list_instances()}


async def _heartbeats(gw: Gateway, instance_id: str, count: int = 2,
                      timeout: float = 15.0) -> None:
    """Wait until `count` more heartbeats of `instance_id` were recorded."""
    seen: list[float] = []

    async def recorded() -> bool:
        instance = await _registry(gw).get_instance(instance_id)
        if instance is not None and (not seen or instance.last_heartbeat > seen[-1]):
            seen.append(instance.last_heartbeat)
        return len(seen) > count
    await wait_for(recorded, timeout, interval=0.02)


async def _kernel_runs(gw: Gateway, kernel_id: str) -> None:
    """The kernel is still RUNNING in the database and still executes code."""
    status = await gw.scalar(sa.select(kernels.c.status).where(kernels.c.id == kernel_id))
    assert status == "RUNNING", status
    code, body = await gw.execute(kernel_id, "print(6 * 7)")
    assert code == 200 and stdout_of(body["result"]) == "42\n", body


async def _exists(gw: Gateway, kernel_id: str, name: str) -> bool:
    """Whether file `name` exists in the (bash) kernel's home, asked through the API."""
    code, body = await gw.execute(kernel_id, f"test -e {name} && echo yes || echo no")
    assert code == 200, body
    return stdout_of(body["result"]).strip() == "yes"


def _forged_events(instance_id: str, kernel_id: str, fake_id: str) -> list[bytes]:
    """Every event type an attacker would forge on the events port."""
    return [
        # a fake agent claiming a huge capacity (beyond the protocol's bounds too)
        proto.encode_event("instance_heartbeat", fake_id + "-huge", running_kernels=[],
                           interval=0.5, info=info(max_kernels=10**6)),
        # a fake agent within bounds, to attract kernels
        proto.encode_event("instance_heartbeat", fake_id, running_kernels=[], interval=0.5,
                           info=info(max_kernels=50)),
        proto.encode_event("instance_started", fake_id + "-started", info=info()),
        # "the real agent restarted": would end its kernels
        proto.encode_event("instance_started", instance_id, info=info(num_kernels=0)),
        # the real kernel "ended" with an enormous bill
        proto.encode_event("kernel_terminated", instance_id, kernel_id=kernel_id,
                           reason=proto.REASON_EXITED,
                           stats={"cpu_used": HUGE_CPU, "mem_max_bytes": HUGE_CPU}),
        proto.encode_event("instance_terminated", instance_id, reason="agent-shutdown"),
    ]


def _warnings(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.WARNING and text in r.getMessage()]


async def _no_effect(gw: Gateway, before: dict[str, Any], instance_id: str,
                     kernel_id: str, *, besides: tuple[str, ...] = ()) -> None:
    """After forged events: the registry (but for the instances `besides`) and the
    kernel are as they were."""
    await _heartbeats(gw, instance_id, 2)  # the real agent's events still count
    after = await _instances(gw)
    for name in besides:
        after.pop(name, None)
    assert after == before
    await _kernel_runs(gw, kernel_id)
    async with gw.app[app_keys.DB].connect() as conn:
        rows = (await conn.execute(sa.select(usage).where(usage.c.kernel_id == kernel_id))).all()
    assert rows == []


# --- 1. the legitimate path ------------------------------------------------------

async def test_execute_over_curve_and_the_instance_is_bound_to_the_agent_key(
        gateway_factory, zkeys):
    gw, agent = await _secure_gateway(gateway_factory, zkeys)
    real = gw.agents[0]
    assert "CurveZMQ" in real.log()
    instance = await _registry(gw).get_instance(real.instance_id)
    assert instance is not None and instance.status == "running"
    assert instance.key == agent.public.decode() and curve.is_z85_key(instance.key)
    # the key the gateway's RPC and PTY connections name as the agent's server key
    assert await gw.app[app_keys.REDIS].instances.hget(redis_keys.AGENT_KEYS, real.addr) \
        == instance.key
    kernel_id = await gw.create_kernel("python3")
    await _kernel_runs(gw, kernel_id)
    # the agent speaks CURVE only: a plain ping gets nothing
    assert not await asyncio.to_thread(ping_agent, real.addr, 0.5)
    assert await asyncio.to_thread(ping_agent, real.addr, 5, zkeys.pair("gateway"),
                                   agent.public)


# --- 2. a plain ZeroMQ peer on the events port ------------------------------------------

async def _victim(gateway_factory: Callable[..., Any], zkeys: Keys,
                  caplog: pytest.LogCaptureFixture) -> tuple[Gateway, Any, str, dict[str, Any]]:
    """A secure gateway with one agent and one running kernel: (gateway, agent, kernel id,
    the instances as they were before the attack)."""
    caplog.set_level(logging.INFO)
    gw, _ = await _secure_gateway(gateway_factory, zkeys)
    kernel_id = await gw.create_kernel("python3")
    return gw, gw.agents[0], kernel_id, await _instances(gw)


async def test_plain_peer_forging_events_has_no_effect(gateway_factory, zkeys, caplog):
    gw, real, kernel_id, before = await _victim(gateway_factory, zkeys, caplog)
    watch = _intake(gw)._watch
    assert watch is not None

    pushers = [_socket(zmq.PUSH, _events_addr(gw)) for _ in range(4)]
    try:
        for sock in pushers:
            for frame in _forged_events(real.instance_id, kernel_id, "i-forged"):
                await sock.send(frame)
        # several refused handshakes, one log line
        await wait_for(lambda: watch.refusals.count >= len(pushers), 10)
        await _no_effect(gw, before, real.instance_id, kernel_id)
    finally:
        for sock in pushers:
            sock.close(0)
    lines = _warnings(caplog, "refused a peer on the events port")
    assert len(lines) == 1, lines
    assert "CURVE handshake failed" in lines[0] and "more refused" not in lines[0]


# --- 3. a CURVE peer with an unknown key -------------------------------------------

async def test_unknown_key_peer_forging_events_has_no_effect(gateway_factory, zkeys, caplog):
    gw, real, kernel_id, before = await _victim(gateway_factory, zkeys, caplog)
    _, stranger = zkeys.make("stranger")
    gateway_public = zkeys.pair("gateway").public

    sock = _socket(zmq.PUSH, _events_addr(gw), stranger, gateway_public)
    try:
        for frame in _forged_events(real.instance_id, kernel_id, "i-stranger"):
            await sock.send(frame)
        await wait_for(lambda: _warnings(caplog, stranger.public_text), 10)
        await _no_effect(gw, before, real.instance_id, kernel_id)
    finally:
        sock.close(0)
    (line,) = _warnings(caplog, stranger.public_text)
    assert "unknown agent key" in line

    # contrast: once the key is accepted, the same peer's events count
    zkeys.allow_agent("stranger")  # accepted at once: an unknown key rechecks the folder
    sock = _socket(zmq.PUSH, _events_addr(gw), stranger, gateway_public)
    try:
        await sock.send(_forged_events(real.instance_id, kernel_id, "i-stranger")[1])
        await wait_for(lambda: _registry(gw).get_instance("i-stranger"), 10)
    finally:
        sock.close(0)


# --- 4. an allowed agent key speaking for another agent ----------------------------------

async def test_allowed_key_cannot_speak_for_another_agents_instance(gateway_factory, zkeys,
                                                                    caplog):
    caplog.set_level(logging.INFO)
    gw, agent = await _secure_gateway(gateway_factory, zkeys)
    real = gw.agents[0]
    kernel_id = await gw.create_kernel("python3")
    other = zkeys.admitted_agent("other")
    before = await _instances(gw)
    intake = _intake(gw)
    dropped = intake.dropped

    sock = _event_pusher(gw, zkeys, other)
    try:
        for frame in [
            proto.encode_event("instance_heartbeat", real.instance_id, running_kernels=[],
                               interval=0.5, info=info("tcp://127.0.0.1:1")),
            proto.encode_event("kernel_terminated", real.instance_id, kernel_id=kernel_id,
                               reason=proto.REASON_EXITED, stats={"cpu_used": HUGE_CPU}),
            proto.encode_event("instance_terminated", real.instance_id,
                               reason="agent-shutdown"),
            # contrast: its own instance id is accepted
            proto.encode_event("instance_heartbeat", "i-other", running_kernels=[],
                               interval=0.5, info=info("tcp://127.0.0.1:2")),
        ]:
            await sock.send(frame)
        own = await wait_for(lambda: _registry(gw).get_instance("i-other"), 10)
        assert own.key == other.public_text
        await wait_for(lambda: intake.dropped >= dropped + 3 and not intake.pending, 10)
    finally:
        sock.close(0)
    assert intake.dropped == dropped + 3
    await _no_effect(gw, before, real.instance_id, kernel_id, besides=("i-other",))
    assert before[real.instance_id][0] == real.addr
    assert before[real.instance_id][2] == agent.public.decode()
    lines = _warnings(caplog, f"from key {other.public_text}")  # one: rate-limited
    assert len(lines) == 1, lines
    assert re.match(rf"refused (instance_heartbeat|kernel_terminated|instance_terminated) "
                    rf"for instance '{real.instance_id}'", lines[0]), lines
    assert "registered by another key" in lines[0]


async def test_allowed_key_cannot_claim_another_agents_address(gateway_factory, zkeys,
                                                                caplog):
    """A new instance id with a live agent's address would repoint the key the
    gateway connects to that address with, and attract kernels."""
    caplog.set_level(logging.INFO)
    gw, agent = await _secure_gateway(gateway_factory, zkeys)
    real = gw.agents[0]
    other = zkeys.admitted_agent("other")
    intake = _intake(gw)
    dropped = intake.dropped
    sock = _event_pusher(gw, zkeys, other)
    try:
        for instance_id, addr, langs in (
                ("i-phantom", real.addr, ("python3", "bash")),
                ("i-honest", "tcp://127.0.0.1:4", ("cobol",))):  # contrast: its own address
            await sock.send(proto.encode_event("instance_heartbeat", instance_id,
                                               running_kernels=[], interval=0.5,
                                               info=info(addr, max_kernels=100,
                                                         languages=langs)))
        honest = await wait_for(lambda: _registry(gw).get_instance("i-honest"), 10)
        assert honest.key == other.public_text
        await wait_for(lambda: intake.dropped > dropped and not intake.pending, 10)
    finally:
        sock.close(0)
    assert intake.dropped == dropped + 1
    assert await _registry(gw).get_instance("i-phantom") is None
    assert await gw.app[app_keys.REDIS].instances.hget(redis_keys.AGENT_KEYS, real.addr) \
        == agent.public.decode()
    (line,) = _warnings(caplog, "'i-phantom'")
    assert other.public_text in line and "address is held by another" in line
    await _heartbeats(gw, real.instance_id, 2)
    kernel_id = await gw.create_kernel("python3")
    record = await _registry(gw).get_kernel(kernel_id)
    assert record is not None and record.instance_id == real.instance_id
    await _kernel_runs(gw, kernel_id)


# --- 5. an oversized event frame ----------------------------------------------------------

async def test_oversized_event_frame_is_dropped_and_the_intake_lives_on(gateway_factory, zkeys):
    gw, _ = await _secure_gateway(gateway_factory, zkeys)
    real = gw.agents[0]
    other = zkeys.admitted_agent("other")
    intake = _intake(gw)

    def heartbeat(padding: int) -> bytes:
        return proto.encode_event("instance_heartbeat", "i-big", running_kernels=[],
                                  interval=0.5, info=info("tcp://127.0.0.1:3"),
                                  padding=b"x" * padding)
    big = _event_pusher(gw, zkeys, other)
    monitor = big.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
    try:
        frame = heartbeat(8 << 20)
        assert len(frame) > proto.MAX_EVENT_BYTES
        await big.send(frame)
        events = []
        while zmq.EVENT_DISCONNECTED not in events:  # the gateway cut the connection
            assert await monitor.poll(10_000), events
            events.append((await recv_monitor_message(monitor))["event"])
        assert zmq.EVENT_HANDSHAKE_SUCCEEDED in events
    finally:
        big.disable_monitor()
        monitor.close(0)
        big.close(0)
    assert await _registry(gw).get_instance("i-big") is None
    assert intake._reader is not None and not intake._reader.done()
    await _heartbeats(gw, real.instance_id, 2)  # the real agent's heartbeats still count

    # a valid event of the same key, just under the limit, still counts
    small = _event_pusher(gw, zkeys, other)
    try:
        await small.send(heartbeat(proto.MAX_EVENT_BYTES - 4096))
        instance = await wait_for(lambda: _registry(gw).get_instance("i-big"), 10)
        assert instance.key == other.public_text
    finally:
        small.close(0)


# --- 6. the agent's RPC port --------------------------------------------------------------

async def test_agent_rpc_answers_only_gateway_keys(gateway_factory, zkeys):
    gw, agent = await _secure_gateway(gateway_factory, zkeys)
    real = gw.agents[0]
    kernel_id = await gw.create_kernel("bash")
    _, stranger = zkeys.make("stranger")

    def requests(marker: str) -> list[bytes]:
        return [proto.encode_request(1, "list_kernels"),
                proto.encode_request(2, "execute", {"kernel_id": kernel_id, "mode": "query",
                                                    "code": f"echo x > {marker}"}),
                proto.encode_request(3, "create_kernel", {"lang": "python3"})]

    attackers = [_socket(zmq.DEALER, real.addr),
                 _socket(zmq.DEALER, real.addr, stranger, agent.public)]
    try:
        for sock in attackers:
            for frame in requests("rpc-pwned"):
                await sock.send(frame)
        await asyncio.sleep(NO_REPLY_WAIT)
        for sock in attackers:
            assert not await sock.poll(0), "a refused peer got a reply"
    finally:
        for sock in attackers:
            sock.close(0)
    assert not await _exists(gw, kernel_id, "rpc-pwned")
    await wait_for(lambda: "refused a peer on the RPC port" in real.log(), 10)
    await wait_for(lambda: f"unknown gateway key {stranger.public_text}" in real.log(), 10)
    # contrast: the same requests with the gateway keypair get answers and act
    legit = _socket(zmq.DEALER, real.addr, zkeys.pair("gateway"), agent.public)
    try:
        for frame in requests("rpc-legit")[:2] + [
                proto.encode_request(3, "create_kernel", {"lang": "no-such-language"})]:
            await legit.send(frame)
        replies = {}
        while len(replies) < 3:
            assert await legit.poll(15_000), replies
            reply = proto.decode_reply(await legit.recv())
            replies[reply.id] = reply
    finally:
        legit.close(0)
    assert replies[1].ok and set(replies[1].result) == {kernel_id}  # none was created
    assert replies[2].ok, replies[2].error
    assert not replies[3].ok and replies[3].error["type"] == proto.ERR_UNSUPPORTED_LANG
    assert await _exists(gw, kernel_id, "rpc-legit")


# --- 7. a kernel's PTY ports --------------------------------------------------------------

async def _type_until(gw: Gateway, kernel_id: str, sock: zmq.asyncio.Socket, name: str,
                      timeout: float) -> bool:
    """Type `echo x > NAME` into the PTY until the file shows up (or time out)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await sock.send(f"echo x > {name}\n".encode())
        await asyncio.sleep(0.3)
        if await _exists(gw, kernel_id, name):
            return True
    return False


async def test_pty_ports_refuse_strangers(gateway_factory, zkeys):
    gw, agent = await _secure_gateway(gateway_factory, zkeys)
    kernel_id = await gw.create_kernel("bash")
    record = await _registry(gw).get_kernel(kernel_id)
    assert record is not None
    stdin = f"tcp://127.0.0.1:{record.stdin_port}"
    stdout = f"tcp://127.0.0.1:{record.stdout_port}"
    _, stranger = zkeys.make("stranger")
    gateway = zkeys.pair("gateway")

    listeners = {"plain": _socket(zmq.SUB, stdout),
                 "stranger": _socket(zmq.SUB, stdout, stranger, agent.public),
                 "gateway": _socket(zmq.SUB, stdout, gateway, agent.public)}
    for sock in listeners.values():
        sock.setsockopt(zmq.SUBSCRIBE, b"")
    typists = {"plain": _socket(zmq.PUB, stdin),
               "stranger": _socket(zmq.PUB, stdin, stranger, agent.public),
               "gateway": _socket(zmq.PUB, stdin, gateway, agent.public)}
    try:
        for who in ("plain", "stranger"):
            assert not await _type_until(gw, kernel_id, typists[who], "pwned", 2.0), who
        # contrast: the gateway's key types into the terminal (and sees its output)
        assert await _type_until(gw, kernel_id, typists["gateway"], "pwned", 20)
        received = {who: b"" for who in listeners}
        for who, sock in listeners.items():
            while await sock.poll(100 if received[who] or who != "gateway" else 5000):
                received[who] += await sock.recv()
        assert b"echo x > pwned" in received["gateway"], received
        assert received["plain"] == received["stranger"] == b"", received
    finally:
        for sock in [*listeners.values(), *typists.values()]:
            sock.close(0)


# --- 8. agents with wrong keys fail at start -----------------------------------------

async def test_agents_with_wrong_keys_fail_loudly_at_start(gateway_factory, agent_factory,
                                                           zkeys):
    gw = await gateway_factory(**zkeys.gateway_settings())
    port = gw.config.events_port
    zkeys.make("impostor-gateway")
    wrong_gateway = zkeys.root / "wrong-gateway"
    wrong_gateway.mkdir()
    shutil.copy(zkeys.root / "impostor-gateway.key", wrong_gateway / "impostor-gateway.key")
    cases = {
        "wrong gateway key": AgentCurve(zkeys.agent("a1").key, wrong_gateway,
                                        zkeys.pair("impostor-gateway")),
        "agent key not accepted": zkeys.agent("a2", allowed=False),
    }
    agents = {name: await asyncio.to_thread(agent_factory, port, curve=setting, wait=False,
                                            heartbeat_interval=0.5)
              for name, setting in cases.items()}
    # contrast: the right keys start and register (its key, added to agent_keys just
    # now, is accepted at once: an unknown key makes the gateway recheck the folder)
    good = await asyncio.to_thread(agent_factory, port, curve=zkeys.agent("a3"),
                                   heartbeat_interval=0.5)
    for name, started in agents.items():
        code = await asyncio.to_thread(started.proc.wait, 20)
        assert code != 0, name
        log = started.log()
        assert "the agent cannot start: no manager accepted this agent" in log, (name, log)
        assert "Traceback" not in log
    assert "is gateway_keys the key of that gateway" in agents["wrong gateway key"].log()
    assert "refused this agent's key" in agents["agent key not accepted"].log()
    await wait_for(lambda: _registry(gw).get_instance(good.instance_id), 10)
    assert good.proc.poll() is None
    assert set(await _instances(gw)) == {good.instance_id}


# --- 9. non-loopback binds without keys ------------------------------------------------

def _one_line_refusal(result: subprocess.CompletedProcess[str], settings: str,
                      started: float) -> None:
    assert result.returncode != 0, result
    assert time.monotonic() - started < 20
    lines = [line for line in result.stderr.splitlines() if "without CurveZMQ keys" in line]
    assert len(lines) == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1] == lines[0]  # the command's last word
    assert lines[0].startswith("Error: ") and "0.0.0.0" in lines[0], lines
    assert f"set {settings}" in lines[0], lines
    assert "Traceback" not in result.stderr


def test_non_loopback_binds_without_keys_are_refused(tmp_path, zkeys):
    started = time.monotonic()
    serve = run_sorna("serve", "--host", "127.0.0.1", "--port", str(free_port()),
                      "--events-port", str(free_port()), cwd=tmp_path,
                      env={"SORNA_EVENTS_IP": "0.0.0.0",
                           "SORNA_DATA_DIR": str(tmp_path / "serve")})
    _one_line_refusal(serve, "gateway_key and agent_keys", started)

    port = free_port()
    started = time.monotonic()
    agent = run_sorna("--data-dir", str(tmp_path / "agent"), "agent",
                      "--rpc-addr", f"tcp://0.0.0.0:{port}", "--instance-id", "i-open")
    _one_line_refusal(agent, "agent_key and gateway_keys", started)

    # contrast: with keys the agent listens beyond loopback, and speaks CURVE only
    setting = zkeys.agent("open")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sorna_cli", "--data-dir", str(tmp_path / "agent"), "agent",
         "--rpc-addr", f"tcp://0.0.0.0:{port}", "--instance-id", "i-open", "--key",
         str(setting.key), "--gateway-keys", str(setting.gateway_keys)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={k: v for k, v in os.environ.items() if not k.startswith("SORNA_")})
    try:
        addr = f"tcp://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while not ping_agent(addr, 0.5, setting.gateway, setting.public):
            assert proc.poll() is None and time.monotonic() < deadline
        assert not ping_agent(addr, 0.5)
    finally:
        proc.kill()  # a graceful stop would wait SHUTDOWN_LINGER for undelivered events
        proc.wait(20)


# --- 10. key rotation ---------------------------------------------------------------------

async def test_gateway_key_rotation(gateway_factory, zkeys):
    gw, agent = await _secure_gateway(gateway_factory, zkeys)
    real = gw.agents[0]
    port = gw.config.events_port
    await gw.client.close()  # the old gateway goes away
    zkeys.make("gateway-new")

    # the new gateway, before the agents accept its key: nothing gets through
    new = await gateway_factory(prepare=False, events_port=port,
                                **zkeys.gateway_settings("gateway-new"))
    await asyncio.sleep(3 * 0.5 + 1)
    assert await _registry(new).get_instance(real.instance_id) is None

    zkeys.allow_gateway("gateway-new")  # the agents' folder now holds both keys
    instance = await wait_for(lambda: _registry(new).get_instance(real.instance_id), 15)
    assert instance.key == agent.public.decode()
    kernel_id = await new.create_kernel("python3")
    await _kernel_runs(new, kernel_id)
    assert real.proc.poll() is None  # the same agent process, never restarted


async def test_a_gateway_key_admitted_late_works_without_restart(gateway_factory, zkeys,
                                                                 aiohttp_client):
    """Two gateways on one Redis: the second one's key is not among the agent's
    gateway keys yet, so the agent refuses its calls; once the key is added, the
    same gateway process gets through (it does not keep the refused connection)."""
    gw, _ = await _secure_gateway(gateway_factory, zkeys)
    zkeys.make("gateway-b")
    config = gw.config.model_copy(update={"gateway_key": zkeys.secret("gateway-b")})
    second = Gateway(config, await aiohttp_client(TestServer(create_app(config,
                                                                        primary=False))))
    status, _, body = await second.request("POST", "/v2/kernel/create", {
        "lang": "python3", "clientSessionToken": "refused-by-the-agent"})
    assert status == 503 and body["reason"] == "all-unreachable", (status, body)
    assert await gw.slots_used() == 0

    zkeys.allow_gateway("gateway-b")

    async def created() -> str | None:  # once the agent is no longer a suspect
        status, _, body = await second.request("POST", "/v2/kernel/create", {
            "lang": "python3", "clientSessionToken": "admitted-by-the-agent"})
        assert status in (201, 503), (status, body)
        return body["kernelId"] if status == 201 else None
    kernel_id = await wait_for(created, 15, interval=0.5)
    await _kernel_runs(second, kernel_id)
    await _kernel_runs(gw, kernel_id)  # both gateways reach it


async def test_agent_key_rotation(gateway_factory, zkeys, caplog):
    caplog.set_level(logging.INFO)
    gw, agent = await _secure_gateway(gateway_factory, zkeys)
    real = gw.agents[0]
    public = agent.public.decode()
    key_file = zkeys.agent_keys / "agent.key"
    revoked = "its key is no longer among agent_keys"

    key_file.unlink()  # the operator revokes the agent's key
    removed = time.monotonic()
    await wait_for(lambda: _warnings(caplog, revoked), 10)
    assert time.monotonic() - removed < curve.RELOAD_INTERVAL + 2
    (line,) = _warnings(caplog, revoked)
    assert public in line and real.instance_id in line
    last = (await _registry(gw).get_instance(real.instance_id)).last_heartbeat
    await asyncio.sleep(1.5)
    assert (await _registry(gw).get_instance(real.instance_id)).last_heartbeat == last

    zkeys.allow_agent("agent")  # and gives it back: the open connection counts again
    await _heartbeats(gw, real.instance_id, 2)
    instance = await wait_for(lambda: _running(gw, real.instance_id), 15)
    assert instance.key == public

    # revoked while the gateway restarts: the agent's new handshake is refused ...
    key_file.unlink()
    port = gw.config.events_port
    await gw.client.close()
    new = await gateway_factory(prepare=False, events_port=port, **zkeys.gateway_settings())
    await wait_for(lambda: _warnings(caplog, f"unknown agent key {public}"), 10)
    await wait_for(lambda: "refused this agent's key" in real.log(), 10)
    assert await _registry(new).get_instance(real.instance_id) is None
    # ... and once the key is back, the agent connects again by itself
    zkeys.allow_agent("agent")
    instance = await wait_for(lambda: _running(new, real.instance_id), 15)
    assert instance.key == public and real.proc.poll() is None
    assert "accepts this agent's key again" in real.log()


async def _running(gw: Gateway, instance_id: str) -> Any:
    instance = await _registry(gw).get_instance(instance_id)
    return instance if instance is not None and instance.status == "running" else None


# --- 11. key files and the legacy interface --------------------------------------------

def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


async def test_keys_generate_and_legacy_off_by_default(gateway_factory, tmp_path):
    base = tmp_path / "made" / "gw1"
    result = await asyncio.to_thread(run_sorna, "keys", "generate", str(base))
    assert result.returncode == 0, result.stderr
    secret = base.with_name("gw1.key_secret")
    public = base.with_name("gw1.key")
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert "secret-key" not in public.read_text()
    pair = curve.load_keypair(secret, "key")
    assert curve.load_public_keys(public, "key") == {pair.public}
    assert pair.public_text in result.stdout
    before = (secret.read_bytes(), public.read_bytes())

    again = await asyncio.to_thread(run_sorna, "keys", "generate", str(base))
    assert again.returncode != 0 and "exists already" in again.stderr, again
    assert (secret.read_bytes(), public.read_bytes()) == before

    plain = await gateway_factory()
    assert not plain.config.legacy_enabled
    assert not _listening(plain.config.manager_port)
    legacy = await gateway_factory(legacy_enabled=True, prepare=False)  # contrast
    assert _listening(legacy.config.manager_port)
