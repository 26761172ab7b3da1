"""Agents on one host, and hosts that refuse parts of the sandbox (simulated by settings)."""
from __future__ import annotations

import asyncio
import os

import pytest

from sorna_server.gateway import keys
from tests.helpers import TEST_REDIS_DBS, Sorna, stderr_of, stdout_of

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the kernel sandbox needs root")

NO_MOUNT_NAMESPACE = {"SORNA_AGENT_MOUNT_NAMESPACE": "false"}
NO_CGROUPS = {"SORNA_AGENT_CGROUPS": "none"}


def _isolation(harness) -> dict:
    return harness.wait_event(lambda e: e["type"] == "instance_started")["info"]["isolation"]


def _uid(harness, kernel_id: str) -> int:
    return int(stdout_of(harness.query(kernel_id, "import os\nos.getuid()")))


def _overlap(one: list[int], two: list[int]) -> bool:
    return one[0] <= two[1] and two[0] <= one[1]


def test_two_agents_on_one_host_never_share_uids(harness_factory, tmp_path):
    # the same (default-like) instance id on one host, each with its own data directory
    first = harness_factory(instance_id="i-one-host", data_dir=tmp_path / "one")
    second = harness_factory(instance_id="i-one-host", data_dir=tmp_path / "two")
    range_one, range_two = _isolation(first)["uid_range"], _isolation(second)["uid_range"]
    assert not _overlap(range_one, range_two)
    uid_one = _uid(first, first.create("python3"))
    uid_two = _uid(second, second.create("python3"))
    assert range_one[0] <= uid_one <= range_one[1]
    assert range_two[0] <= uid_two <= range_two[1]

    # a third agent on the first one's data directory cannot take the block in use
    third = harness_factory(instance_id="i-one-host", data_dir=tmp_path / "one")
    range_three = _isolation(third)["uid_range"]
    assert not _overlap(range_three, range_one) and not _overlap(range_three, range_two)
    assert "used by another agent" in third.agent.log()


def test_the_uid_block_survives_a_restart(harness_factory, tmp_path):
    harness = harness_factory(instance_id="i-restarted", data_dir=tmp_path / "data")
    block = _isolation(harness)["uid_range"]
    harness.agent.stop()
    again = harness_factory(instance_id="i-restarted", data_dir=tmp_path / "data")
    assert _isolation(again)["uid_range"] == block


def test_agent_refuses_to_start_without_mount_namespaces(agent_factory):
    agent = agent_factory(env=NO_MOUNT_NAMESPACE, wait=False)
    assert agent.proc.wait(60) != 0
    output = agent.log()
    assert "Traceback" not in output
    assert "refuses mount namespaces" in output and "--isolation" in output


def test_best_effort_without_mount_namespaces_says_what_is_off(harness_factory):
    harness = harness_factory(isolation="best-effort", env=NO_MOUNT_NAMESPACE)
    isolation = _isolation(harness)
    assert isolation["mount_namespace"] is False
    assert any("private filesystem view" in p for p in isolation["protections_off"])
    assert any("mount namespaces" in r for r in isolation["refused"])
    assert "WITHOUT private filesystem view" in harness.agent.log()
    kernel = harness.create("python3")
    # as documented: the host's folders are visible; the kernel still runs as its own uid
    assert stdout_of(harness.query(kernel, "import os\nos.path.isdir('/var'), os.getuid() > 0")
                     ) == "(True, True)\n"


def test_without_cgroups_limits_are_per_process_and_said_so(harness_factory):
    harness = harness_factory(env=NO_CGROUPS, max_mem="256m")
    isolation = _isolation(harness)
    assert isolation["cgroups"] is False and isolation["mount_namespace"] is True
    assert any(p.startswith("cgroup limits") for p in isolation["protections_off"])
    kernel = harness.create("python3")
    assert "MemoryError" in stderr_of(harness.query(kernel, "block = bytearray(1 << 30)"))
    harness.query(kernel, "sum(range(3 * 10**6))")
    stats = harness.ok("destroy_kernel", kernel_id=kernel)
    assert stats["mem_max_bytes"] > 1 << 20  # sampled from the processes instead


async def test_registry_inspect_shows_the_protections_that_are_off(gateway_factory):
    gateway = await gateway_factory(agents=1, agent_flags={"isolation": "best-effort",
                                                           "env": NO_CGROUPS})
    (instance,) = await gateway.app[keys.REGISTRY].list_instances()
    config = gateway.config
    env = {f"SORNA_{name.upper()}": str(db) for name, db in TEST_REDIS_DBS.items()}
    data = await asyncio.to_thread(Sorna(config.database_url).json, "--redis-url",
                                   config.explicit_redis_url, "registry", "inspect",
                                   instance.id, env=env)
    isolation = data["instance"]["isolation"]
    assert isolation["cgroups"] is False
    assert any(p.startswith("cgroup limits") for p in isolation["protections_off"])
