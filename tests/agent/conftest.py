"""A test harness that plays the manager: binds the events PULL, talks DEALER."""
from __future__ import annotations

from typing import Any

import pytest
import zmq

from tests.helpers import Harness


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
