"""Reconciliation, one rule at a time, and the periodic reconciler: each
difference is reported without --fix, repaired with it, and reported no more."""
from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from sorna_server import redis_keys as keys
from sorna_server.db.models import kernels, keypairs
from sorna_server.registry import constants, scripts
from sorna_server.registry.reconcile import reconcile
from tests.helpers import close_env, make_env, wait_for


@pytest.fixture
async def quiet_env(registry_config):
    """A registry with intake and sweeper but no reconciler of its own; agents
    heartbeat every 30 s so nothing lapses during the test."""
    env = await make_env(registry_config(heartbeat_interval=30), reconciler=False)
    try:
        yield env
    finally:
        await close_env(env)


async def _agent(env, iid="i-a"):
    await env.heartbeat(iid, interval=30)
    return await wait_for(lambda: env.registry.get_instance(iid))


async def _kinds(env, fix: bool = False) -> list[str]:
    return sorted(d.kind for d in await reconcile(env.registry, fix=fix))


async def _set_row(env, kernel_id: str, **values) -> None:
    async with env.engine.begin() as conn:
        await conn.execute(sa.update(kernels).where(kernels.c.id == kernel_id).values(**values))


def _ago(seconds: float) -> datetime:
    return datetime.now(UTC) - timedelta(seconds=seconds)


async def test_consistent_state_reports_nothing(quiet_env):
    env = quiet_env
    ak = await env.create_keypair()
    await _agent(env)
    await env.register(ak, "i-a", schedule=True, token="sess-ok")
    await env.create_kernel_row(ak)  # a creation in progress
    assert await _kinds(env) == []


async def test_phantom_kernel_set_entry(quiet_env):
    env = quiet_env
    ak = await env.create_keypair()
    await _agent(env)
    kid = await env.create_kernel_row(ak)
    await scripts.bind_kernel(env.redis.instances, "i-a", kid, "1.0", "0")
    assert await _kinds(env) == []  # its row is still PREPARING: a creation in progress
    assert await env.settle(kid, "ERROR", "creation-failed", path="create-failed")
    assert await env.registry.instance_kernel_ids("i-a") == {kid}  # settled elsewhere
    await _set_row(env, kid, terminated_at=_ago(60))
    assert await _kinds(env) == [constants.RULE_PHANTOM_AGENT_KERNEL]
    assert await _kinds(env, fix=True) == [constants.RULE_PHANTOM_AGENT_KERNEL]
    assert await env.registry.instance_kernel_ids("i-a") == set()
    assert (await env.registry.get_instance("i-a")).load == 0
    assert await _kinds(env) == []


async def test_abandoned_creation_gives_the_slot_back(quiet_env):
    env = quiet_env
    ak = await env.create_keypair()
    kid = await env.create_kernel_row(ak)
    await _set_row(env, kid, created_at=_ago(3600))
    assert await _kinds(env) == [constants.RULE_ABANDONED_CREATION]
    await _kinds(env, fix=True)
    row = await env.kernel_row(kid)
    assert (row.status, row.settled_by) == ("ERROR", constants.SETTLED_BY_RECONCILE)
    assert await env.slots_used(ak) == 0
    assert await _kinds(env) == []


async def test_stale_redis_kernel_and_its_session(quiet_env):
    env = quiet_env
    ak = await env.create_keypair()
    await _agent(env)
    kid = await env.register(ak, "i-a", schedule=True, token="sess-stale")
    # settled in the database by a process that died before its Redis clean-up
    await _set_row(env, kid, status="TERMINATED", terminated_at=_ago(60))
    async with env.engine.begin() as conn:
        await conn.execute(sa.update(keypairs).where(keypairs.c.access_key == ak)
                           .values(concurrency_used=0))
    assert await _kinds(env) == [constants.RULE_STALE_REDIS_KERNEL]
    await _kinds(env, fix=True)
    assert await env.registry.get_kernel(kid) is None
    assert await env.registry.instance_kernel_ids("i-a") == set()
    assert await env.redis.sessions.get(keys.session(ak, "python3", "sess-stale")) is None
    assert await _kinds(env) == []


async def test_just_settled_kernel_is_not_reported(quiet_env):
    """A settlement's own Redis clean-up runs right after its commit: not a difference."""
    env = quiet_env
    ak = await env.create_keypair()
    await _agent(env)
    kid = await env.register(ak, "i-a", schedule=True)
    await _set_row(env, kid, status="TERMINATED", terminated_at=datetime.now(UTC))
    async with env.engine.begin() as conn:
        await conn.execute(sa.update(keypairs).where(keypairs.c.access_key == ak)
                           .values(concurrency_used=0))
    assert await _kinds(env) == []


async def test_missing_session_is_bound_again(quiet_env):
    env = quiet_env
    ak = await env.create_keypair()
    await _agent(env)
    kid = await env.register(ak, "i-a", schedule=True, token="sess-missing")
    await env.redis.sessions.delete(keys.session(ak, "python3", "sess-missing"))
    assert await _kinds(env) == [constants.RULE_MISSING_SESSION]
    await _kinds(env, fix=True)
    assert await env.registry.claim_session(ak, "sess-missing", "python3", "x") == kid
    assert await _kinds(env) == []


async def test_stale_session_is_deleted(quiet_env):
    env = quiet_env
    ak = await env.create_keypair()
    kid = await env.create_kernel_row(ak)
    await env.settle(kid, "ERROR", "x", path="create-failed")
    await env.registry.claim_session(ak, "sess-old", "python3", kid)
    assert await _kinds(env) == [constants.RULE_STALE_SESSION]
    await _kinds(env, fix=True)
    assert await env.registry.claim_session(ak, "sess-old", "python3", "x") is None


async def test_quota_drift(quiet_env):
    env = quiet_env
    ak = await env.create_keypair()
    await env.create_kernel_row(ak)
    async with env.engine.begin() as conn:
        await conn.execute(sa.update(keypairs).where(keypairs.c.access_key == ak)
                           .values(concurrency_used=5))
    assert await _kinds(env) == [constants.RULE_QUOTA_DRIFT]
    await _kinds(env, fix=True)
    assert await env.slots_used(ak) == 1
    assert await _kinds(env) == []


async def test_running_row_no_agent_runs(quiet_env):
    env = quiet_env
    ak = await env.create_keypair()
    kid = await env.create_kernel_row(ak)
    await _set_row(env, kid, status="RUNNING", agent="i-gone")
    # an agent Redis does not know may just not have heartbeated since a Redis restart
    assert await _kinds(env) == [constants.RULE_UNVERIFIABLE_KERNEL]
    assert await env.slots_used(ak) == 1
    await env.redis.instances.hset(keys.RECONCILE_ABSENT_AGENTS, "i-gone",
                                   repr(time.time() - 3600))
    assert await _kinds(env) == [constants.RULE_VANISHED_KERNEL]
    await _kinds(env, fix=True)
    row = await env.kernel_row(kid)
    assert (row.status, row.settled_by) == ("LOST", constants.SETTLED_BY_RECONCILE)
    assert await env.slots_used(ak) == 0


async def test_kernel_on_lost_agent(quiet_env):
    env = quiet_env
    ak = await env.create_keypair()
    await _agent(env)
    kid = await env.register(ak, "i-a", schedule=True)
    await env.redis.instances.hset(keys.instance("i-a"), "status", "lost")
    assert await _kinds(env) == [constants.RULE_KERNEL_ON_LOST_AGENT]
    await _kinds(env, fix=True)
    assert (await env.kernel_row(kid)).status == "LOST"
    assert await _kinds(env) == []


async def test_concurrent_passes_fix_each_difference_once(quiet_env):
    env = quiet_env
    ak = await env.create_keypair(limit=50)
    seen = []
    env.registry.lifecycle.on_settled.append(seen.append)
    stuck = [await env.create_kernel_row(ak) for _ in range(10)]
    for kid in stuck:
        await _set_row(env, kid, created_at=_ago(3600))
    results = await asyncio.gather(*(reconcile(env.registry, fix=True) for _ in range(4)))
    assert sum(d.fixed for diffs in results for d in diffs) == len(stuck)
    assert sorted(s.kernel_id for s in seen) == sorted(stuck)
    assert await env.slots_used(ak) == 0


async def test_periodic_reconciler_repairs_without_an_operator(registry_config):
    env = await make_env(registry_config(heartbeat_interval=0.2, reconcile_interval=0.5))
    try:
        passes = []
        env.reconciler.on_pass.append(passes.append)
        ak = await env.create_keypair()
        kid = await env.create_kernel_row(ak)
        await _set_row(env, kid, created_at=_ago(3600))

        async def reported():
            return any(d.kind == constants.RULE_ABANDONED_CREATION and d.fixed
                       for p in passes for d in p)
        await wait_for(reported, timeout=10)
        assert await env.slots_used(ak) == 0
        assert (await env.kernel_row(kid)).settled_by == constants.SETTLED_BY_RECONCILE
    finally:
        await close_env(env)


async def test_one_gateway_per_period_takes_the_lease(registry_config):
    config = registry_config(heartbeat_interval=0.2, reconcile_interval=60)
    first = await make_env(config, intake=False, sweeper=False, reconciler=False)
    second = await make_env(config, intake=False, sweeper=False, reconciler=False,
                            create_schema=False)
    try:
        from sorna_server.registry.reconciler import Reconciler

        results = await asyncio.gather(Reconciler(first.registry).run_pass(),
                                       Reconciler(second.registry).run_pass())
        assert sorted(r is None for r in results) == [False, True]
    finally:
        await close_env(second)
        await close_env(first)
