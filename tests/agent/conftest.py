"""A test harness that plays the manager: binds the events PULL, talks DEALER."""
from __future__ import annotations

import itertools
import time
from typing import Any, Callable

import pytest
import zmq

from sorna_server import agent_protocol as proto


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


@pytest.fixture
def harness_factory(agent_factory, free_port):
    """`harness_factory(**agent_flags)` -> a Harness around a fresh agent."""
    ctx = zmq.Context()
    made: list[Harness] = []
    sockets: list[zmq.Socket] = []

    def make(**flags: Any) -> Harness:
        port = free_port()
        pull = ctx.socket(zmq.PULL)
        pull.setsockopt(zmq.LINGER, 0)
        pull.bind(f"tcp://127.0.0.1:{port}")
        sockets.append(pull)
        flags.setdefault("pool_size", 1)
        flags.setdefault("heartbeat_interval", 0.5)
        agent = agent_factory(events_port=port, **flags)
        harness = Harness(agent, pull, ctx)
        made.append(harness)
        return harness

    yield make
    for harness in made:
        harness.agent.stop()
        harness.close()
    for sock in sockets:
        sock.close(0)
    ctx.term()


@pytest.fixture
def harness(harness_factory) -> Harness:
    return harness_factory()
