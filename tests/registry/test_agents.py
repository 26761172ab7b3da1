"""The registry with real reference agents (subprocesses) and real sockets."""
from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sorna_server import agent_protocol as proto
from sorna_server.agent_client import AgentError
from sorna_server.registry import InstanceNotAvailable, KernelRecord
from sorna_server.registry.sweeper import sweep_once
from tests.helpers import REGISTRY_REDIS_DBS, close_env, flush_redis_dbs, make_env, wait_for

AGENT_FLAGS = {"heartbeat_interval": 0.5, "pool_size": 0, "stats_interval": 0.5}


async def start_agent(env, agent_factory, *, max_kernels=4, **flags):
    agent = await asyncio.to_thread(agent_factory, env.config.events_port,
                                    max_kernels=max_kernels, **{**AGENT_FLAGS, **flags})
    await wait_for(lambda: env.registry.get_instance(agent.instance_id), timeout=15)
    return agent


async def create_kernel(env, access_key, lang="bash", token=None):
    """What the gateway does: DB row + slot, schedule, RPC create_kernel, register."""
    kernel_id = await env.create_kernel_row(access_key, lang)
    try:
        inst = await env.registry.schedule(lang, access_key)
    except InstanceNotAvailable:
        await env.settle(kernel_id, "ERROR", "instance-not-available")
        raise
    try:
        reply = await env.rpc.call(inst.addr, "create_kernel",
                                   {"lang": lang, "kernel_id": kernel_id}, timeout=30)
    except AgentError:
        await env.registry.unreserve(inst.id)
        await env.settle(kernel_id, "ERROR", "kernel-creation-failed")
        raise
    now = time.time()
    await env.registry.lifecycle.register(KernelRecord(
        id=kernel_id, instance_id=inst.id, addr=inst.addr, access_key=access_key, lang=lang,
        stdin_port=reply["stdin_port"], stdout_port=reply["stdout_port"], created_at=now,
        last_used=now, num_queries=0, limits=reply.get("limits", {}), last_stats={}), token)
    return kernel_id, inst


async def test_kernel_lifecycle_with_a_real_agent(env, agent_factory):
    ak = await env.create_keypair()
    agent = await start_agent(env, agent_factory)
    inst = await env.registry.get_instance(agent.instance_id)
    assert inst.addr == agent.addr and "bash" in inst.languages and inst.max_kernels == 4
    kid, _ = await create_kernel(env, ak, token="tok-life-1")
    # heartbeats keep the kernel (it is in running_kernels) and stats arrive
    await env.heartbeats_seen(agent.instance_id, 3)
    assert (await env.kernel_row(kid)).status == "RUNNING"
    record = await wait_for(lambda: _with_stats(env, kid), timeout=10)
    assert set(record.last_stats) == set(proto.STATS_FIELDS)
    assert (await env.registry.get_instance(agent.instance_id)).num_kernels == 1
    # destroy (gateway path) races the agent's own kernel_terminated event, which
    # carries the same reason and stats: whichever wins, the kernel is settled once
    stats = await env.rpc.call(agent.addr, "destroy_kernel", {"kernel_id": kid})
    await env.settle(kid, "TERMINATED", "user-requested", stats)
    # a heartbeat after the destroy comes after the agent's kernel_terminated
    await env.heartbeats_seen(agent.instance_id, 1)
    row = await env.kernel_row(kid)
    assert (row.status, row.termination_reason) == ("TERMINATED", proto.REASON_DESTROYED)
    assert [(row.cpu_used, row.mem_used) for row in await env.usage_rows(kid)] == \
        [(stats["cpu_used"], stats["mem_max_bytes"] // 1024)]
    assert await env.slots_used(ak) == 0
    assert (await env.registry.get_instance(agent.instance_id)).load == 0


async def _with_stats(env, kid):
    record = await env.registry.get_kernel(kid)
    return record if record and record.last_stats else None


async def test_sigkill_agent_is_lost_and_settled_once(env, agent_factory):
    ak = await env.create_keypair(limit=5)
    agent = await start_agent(env, agent_factory)
    kids = [(await create_kernel(env, ak))[0] for _ in range(2)]
    assert await env.slots_used(ak) == 2
    agent.proc.send_signal(signal.SIGKILL)
    agent.proc.wait()

    async def lost():
        return (await env.registry.get_instance(agent.instance_id)).status == "lost"
    await wait_for(lost, timeout=10)

    async def settled():
        return all([(await env.kernel_row(k)).status == "LOST" for k in kids])
    await wait_for(settled, timeout=10)
    # more sweeps settle nothing twice
    for _ in range(2):
        assert await sweep_once(env.registry, claim=False) in ({}, {agent.instance_id: 0})
    for kid in kids:
        assert len(await env.usage_rows(kid)) == 1
        assert (await env.kernel_row(kid)).termination_reason == proto.REASON_LOST
    assert await env.slots_used(ak) == 0
    with pytest.raises(InstanceNotAvailable) as err:
        await env.registry.schedule("bash", ak)
    assert err.value.reason == "no-agents"


async def test_revived_agent_is_reset_and_registered_again(env, agent_factory):
    ak = await env.create_keypair()
    agent = await start_agent(env, agent_factory)
    kid, _ = await create_kernel(env, ak)
    agent.proc.send_signal(signal.SIGSTOP)
    try:
        async def lost():
            return (await env.registry.get_instance(agent.instance_id)).status == "lost"
        await wait_for(lost, timeout=10)
        await wait_for(lambda: _status_is(env, kid, "LOST"), timeout=10)
    finally:
        agent.proc.send_signal(signal.SIGCONT)

    async def revived():
        inst = await env.registry.get_instance(agent.instance_id)
        return inst.status == "running"
    await wait_for(revived, timeout=15)
    # the reset destroyed the kernel we had settled as LOST
    assert await env.rpc.call(agent.addr, "list_kernels") == {}
    assert len(await env.usage_rows(kid)) == 1
    kid2, inst = await create_kernel(env, ak)
    assert inst.id == agent.instance_id
    assert (await env.kernel_row(kid2)).status == "RUNNING"


async def _status_is(env, kid, status):
    return (await env.kernel_row(kid)).status == status


async def test_drain_with_real_agents(env, agent_factory):
    ak = await env.create_keypair()
    a = await start_agent(env, agent_factory)
    b = await start_agent(env, agent_factory)
    kid, inst = await create_kernel(env, ak)
    await env.registry.set_draining(inst.id, True)
    other = b if inst.id == a.instance_id else a
    for _ in range(3):
        assert (await create_kernel(env, ak))[1].id == other.instance_id
    await env.heartbeats_seen(inst.id, 2)  # heartbeats from the drained agent keep it draining
    drained = await env.registry.get_instance(inst.id)
    assert drained.status == "draining" and drained.load == 1
    assert (await env.kernel_row(kid)).status == "RUNNING"
    await env.registry.set_draining(inst.id, False)
    assert (await create_kernel(env, ak))[1].id == inst.id


async def test_restart_with_live_kernels_reconciles(registry_config, agent_factory):
    """Gateway restart whose Redis lost everything (as an embedded Redis does):
    live kernels are adopted, an orphan is destroyed, nothing is lost or leaked."""
    config = registry_config()
    env = await make_env(config)
    try:
        ak = await env.create_keypair()
        agent = await start_agent(env, agent_factory)
        kids = [(await create_kernel(env, ak, token=f"tok-restart-{i}"))[0] for i in range(3)]
        orphan = (await env.rpc.call(agent.addr, "create_kernel", {"lang": "bash"}))["kernel_id"]
    finally:
        await close_env(env)
    flush_redis_dbs(config.explicit_redis_url, list(REGISTRY_REDIS_DBS.values())[:3])
    env = await make_env(config, create_schema=False)
    try:
        await wait_for(lambda: env.registry.get_instance(agent.instance_id), timeout=10)
        await asyncio.wait_for(env.reconciler.first_pass_done.wait(), 10)

        async def adopted():
            records = [await env.registry.get_kernel(k) for k in kids]
            return all(records)
        await wait_for(adopted, timeout=10)
        for kid in kids:
            assert (await env.kernel_row(kid)).status == "RUNNING"
            assert (await env.registry.get_kernel(kid)).instance_id == agent.instance_id
        assert await env.slots_used(ak) == 3
        assert (await env.registry.get_instance(agent.instance_id)).load == 3

        async def orphan_gone():
            return orphan not in await env.rpc.call(agent.addr, "list_kernels")
        await wait_for(orphan_gone, timeout=10)
        assert set(await env.rpc.call(agent.addr, "list_kernels")) == set(kids)
        await env.heartbeats_seen(agent.instance_id, 3)  # the adopted kernels stay
        assert all([(await env.kernel_row(k)).status == "RUNNING" for k in kids])
        assert await env.usage_rows(kids[0]) == []
    finally:
        await close_env(env)


GATEWAY_SCRIPT = r"""
import asyncio, json, sys, time
sys.path.insert(0, sys.argv[2])
from sorna_server.config import load_config
from tests.helpers import make_env, close_env
from tests.registry.test_agents import create_kernel
from sorna_server.registry import InstanceNotAvailable

async def main():
    config = load_config(None, **json.loads(sys.argv[1]))
    env = await make_env(config, intake=False, sweeper=False, create_schema=False)
    try:
        while time.time() < float(sys.argv[4]):
            await asyncio.sleep(0.005)
        async def one():
            try:
                kid, inst = await create_kernel(env, sys.argv[3])
                return ["ok", inst.id]
            except InstanceNotAvailable as exc:
                return ["refused", exc.reason]
        print(json.dumps(await asyncio.gather(*(one() for _ in range(25)))))
    finally:
        await close_env(env)
asyncio.run(main())
"""


async def test_two_gateways_fifty_creations_three_agents(env, agent_factory, tmp_path):
    ak = await env.create_keypair(limit=100)
    agents = [await start_agent(env, agent_factory, max_kernels=10) for _ in range(3)]
    config = env.config
    settings = {"db_url": config.database_url, "redis_url": config.explicit_redis_url,
                "data_dir": str(config.data_dir), "events_port": config.events_port,
                **REGISTRY_REDIS_DBS, "heartbeat_interval": 0.5}
    repo = str(Path(__file__).resolve().parents[2])
    start_at = time.time() + 3.0
    procs = [await asyncio.create_subprocess_exec(
        sys.executable, "-c", GATEWAY_SCRIPT, json.dumps(settings), repo, ak, str(start_at),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=repo) for _ in range(2)]
    outputs = [await asyncio.wait_for(p.communicate(), 100) for p in procs]
    results = []
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err.decode()
        results += json.loads(out.decode().strip().splitlines()[-1])
    ok = [r[1] for r in results if r[0] == "ok"]
    refused = [r[1] for r in results if r[0] == "refused"]
    assert len(results) == 50
    assert len(ok) == 30 and refused == ["all-full"] * 20
    assert sorted(ok.count(a.instance_id) for a in agents) == [10, 10, 10]
    for a in agents:
        inst = await env.registry.get_instance(a.instance_id)
        assert inst.load == 10
        assert len(await env.rpc.call(a.addr, "list_kernels")) == 10
    assert await env.slots_used(ak) == 30
