"""The kernel lifecycle under faults: settlement paths recorded, settlement while
Redis is down, failed event settlements retried with the final stats, suspect
agents, re-checks against stale snapshots."""
from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from sorna_server import redis_keys as keys
from sorna_server.db.models import kernels
from sorna_server.registry import InstanceNotAvailable, KernelRecord, constants, scripts
from tests.helpers import (
    block_usage_inserts,
    close_env,
    make_env,
    wait_for,
)

STATS = {"cpu_used": 1500, "mem_max_bytes": 10 * 1024 * 1024}


async def _agent(env, iid="i-a", **info_args):
    await env.heartbeat(iid, **info_args)
    return await wait_for(lambda: env.registry.get_instance(iid))


async def test_settlement_path_is_recorded_in_kernel_and_usage_rows(env):
    ak = await env.create_keypair()
    await _agent(env)
    by_event = await env.register(ak, "i-a", schedule=True)
    by_destroy = await env.register(ak, "i-a", schedule=True)
    await env.push("kernel_terminated", "i-a", kernel_id=by_event, reason="self-terminated",
                   stats=STATS)
    assert await env.settle(by_destroy, "TERMINATED", "user-requested", STATS,
                            path=constants.SETTLED_BY_DESTROY)

    async def settled():
        return (await env.kernel_row(by_event)).status == "TERMINATED"
    await wait_for(settled)
    assert (await env.kernel_row(by_event)).settled_by == "event"
    assert (await env.usage_rows(by_event))[0].settled_by == "event"
    assert (await env.kernel_row(by_destroy)).settled_by == "destroy"
    assert (await env.usage_rows(by_destroy))[0].settled_by == "destroy"


async def test_settlement_hook_sees_each_settlement_once(env):
    seen = []
    env.registry.lifecycle.on_settled.append(seen.append)
    ak = await env.create_keypair()
    kid = await env.create_kernel_row(ak)
    results = await asyncio.gather(*(env.settle(kid, "ERROR", "x", path="create-failed")
                                     for _ in range(4)))
    assert results.count(True) == 1
    assert [(s.kernel_id, s.path, s.status) for s in seen] == [(kid, "create-failed", "ERROR")]




async def test_settlement_commits_while_redis_is_down_and_cleans_up_after(
        registry_config, private_redis):
    env = await make_env(registry_config(redis_url=private_redis.url), reconciler=False)
    try:
        from sorna_server.registry.reconciler import Reconciler

        ak = await env.create_keypair()
        await _agent(env)
        kid = await env.register(ak, "i-a", schedule=True, token="sess-redis-down")
        private_redis.save()  # Redis comes back with its data, as after a short outage
        private_redis.stop()
        started = time.monotonic()
        assert await env.settle(kid, "TERMINATED", "user-requested", STATS)
        assert time.monotonic() - started < 3
        assert await env.slots_used(ak) == 0
        assert len(await env.usage_rows(kid)) == 1
        assert env.registry.lifecycle.pending_count == 1  # the Redis clean-up waits
        # a creation that fails while Redis is down gives its slot back too
        failed = await env.create_kernel_row(ak)
        assert await env.registry.lifecycle.settle(failed, "ERROR", "redis-down",
                                                   path="create-failed", use_sampled=False)
        assert await env.slots_used(ak) == 0

        private_redis.start()
        reconciler = Reconciler(env.registry)
        reconciler.start()
        try:
            async def cleaned():
                return env.registry.lifecycle.pending_count == 0
            await wait_for(cleaned, timeout=10)
        finally:
            await reconciler.stop()
        assert await env.registry.get_kernel(kid) is None
        assert await env.registry.instance_kernel_ids("i-a") == set()
        assert await env.registry.claim_session(ak, "sess-redis-down", "python3", "n") is None
    finally:
        await close_env(env)


async def test_failed_event_settlement_is_retried_with_the_final_stats(env):
    ak = await env.create_keypair()
    await _agent(env)
    kid = await env.register(ak, "i-a", schedule=True)
    await env.registry.update_stats({kid: {"cpu_used": 7}})  # an older sample
    await block_usage_inserts(env.engine)
    try:
        await env.push("kernel_terminated", "i-a", kernel_id=kid, reason="self-terminated",
                       stats=STATS)

        async def pending():
            return env.registry.lifecycle.pending_settlement(kid)
        await wait_for(pending)
        # the agent no longer lists the kernel: the heartbeat path leaves it to the retry
        for _ in range(4):
            await env.heartbeat("i-a", [])
            await asyncio.sleep(env.config.heartbeat_interval)
        assert (await env.kernel_row(kid)).status == "RUNNING"
    finally:
        await block_usage_inserts(env.engine, block=False)

    async def settled():
        return (await env.kernel_row(kid)).status != "RUNNING"
    await wait_for(settled, timeout=20)
    row = await env.kernel_row(kid)
    assert (row.status, row.settled_by) == ("TERMINATED", "event")
    usage = await env.usage_rows(kid)
    assert len(usage) == 1 and usage[0].cpu_used == 1500
    assert await env.slots_used(ak) == 0


async def test_suspect_agent_gets_no_new_kernels_until_cleared(env):
    ak = await env.create_keypair()
    await _agent(env, "i-a")
    await _agent(env, "i-b")
    await env.registry.suspects.mark("i-a", "tcp://127.0.0.1:1")
    assert env.registry.suspects.is_suspect("i-a")
    chosen = {(await env.registry.schedule("python3", ak)).id for _ in range(4)}
    assert chosen == {"i-b"}
    await env.registry.suspects.mark("i-b", "tcp://127.0.0.1:1")
    with pytest.raises(InstanceNotAvailable) as err:
        await env.registry.schedule("python3", ak)
    assert err.value.reason == constants.ALL_UNREACHABLE
    # the probe keeps the mark while the agent stays silent
    await asyncio.sleep(env.config.heartbeat_interval * 2.5)
    assert await env.redis.instances.exists(keys.instance_suspect("i-a"))
    await env.redis.instances.delete(keys.instance_suspect("i-a"))  # as the probe does
    assert (await env.registry.schedule("python3", ak)).id == "i-a"


async def test_adoption_rechecks_the_row_after_writing(env):
    """A snapshot said RUNNING; the kernel was settled meanwhile: not adopted."""
    ak = await env.create_keypair()
    await _agent(env)
    kid = await env.register(ak, "i-a", schedule=True)
    assert await env.settle(kid, "TERMINATED", "user-requested", STATS)
    adopted = await env.registry.lifecycle.adopt("i-a", "tcp://127.0.0.1:1", kid, ak,
                                                 "python3", {})
    assert not adopted
    assert await env.registry.get_kernel(kid) is None
    assert kid not in await env.registry.instance_kernel_ids("i-a")


async def test_register_leaves_no_phantom_when_redis_fails_after_binding(env):
    """bind_kernel succeeded, then the kernel hash write failed: the creation's
    settlement (with the agent it was bound on) removes the kernel-set entry."""
    ak = await env.create_keypair()
    await _agent(env)
    kid = await env.create_kernel_row(ak)
    inst = await env.registry.schedule("python3", ak)
    record = KernelRecord(id=kid, instance_id=inst.id, addr=inst.addr, access_key=ak,
                          lang="python3", stdin_port=1, stdout_port=2, created_at=0.0,
                          last_used=0.0, num_queries=0, limits={}, last_stats={})
    await env.registry.lifecycle.register(record)
    # as if the hash write had failed: only the kernel-set entry is left
    await env.redis.kernels.delete(keys.kernel(kid))
    async with env.engine.begin() as conn:
        await conn.execute(sa.update(kernels).where(kernels.c.id == kid)
                           .values(status="PREPARING", agent=None))
    assert await env.registry.lifecycle.settle(kid, "ERROR", "creation-failed",
                                               path="create-failed", instance_id=inst.id,
                                               use_sampled=False)
    assert kid not in await env.registry.instance_kernel_ids(inst.id)
    assert (await env.registry.get_instance(inst.id)).load == 0


async def _backdate(env, kernel_id: str, seconds: float, column: str = "created_at") -> None:
    async with env.engine.begin() as conn:
        await conn.execute(sa.update(kernels).where(kernels.c.id == kernel_id)
                           .values({column: datetime.now(UTC) - timedelta(seconds=seconds)}))


async def test_heartbeats_remove_a_phantom_whose_kernel_was_settled(env):
    """A kernel-set entry left by a creation that failed after bind_kernel (its
    row is final, no kernel hash): the agent does not run it, and the vanished
    path removes it instead of failing to find its instance for ever."""
    ak = await env.create_keypair()
    await _agent(env)
    kid = await env.create_kernel_row(ak)
    assert await env.settle(kid, "ERROR", "creation-failed", path="create-failed")
    await scripts.bind_kernel(env.redis.instances, "i-a", kid, repr(time.time()), "0")
    assert (await env.registry.get_instance("i-a")).load == 1

    async def removed():
        await env.heartbeat("i-a", [])
        return await env.registry.instance_kernel_ids("i-a") == set()
    await wait_for(removed, timeout=10, interval=env.config.heartbeat_interval / 2)
    assert (await env.registry.get_instance("i-a")).load == 0
    assert (await env.kernel_row(kid)).settled_by == "create-failed"
