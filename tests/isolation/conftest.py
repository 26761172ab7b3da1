"""Isolation tests: real agents, real kernels, two tenants, real attacks.

Each test runs the attack from inside a kernel (or from the other tenant's
kernel) and asserts what the attacker sees.  The fixtures are the agent and
gateway suites' own (a fake manager over real ZeroMQ; the real gateway app).
The full sandbox (uid per kernel, namespaces, cgroups) needs root: every test
module here is skipped otherwise.
"""
from __future__ import annotations

from tests.agent.conftest import harness, harness_factory  # noqa: F401  (shared fixtures)
from tests.gateway.conftest import (  # noqa: F401  (shared fixtures)
    gateway_config,
    gateway_factory,
    gateway_redis_url,
)
