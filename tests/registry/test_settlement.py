"""Settlement exactly once, event intake (real frames over a real PUSH socket),
lost agents and revival, malformed frames."""
from __future__ import annotations

import asyncio

import msgpack

from sorna_server import agent_protocol as proto
from sorna_server import redis_keys as keys
from tests.helpers import wait_for

STATS = {"cpu_used": 1500, "mem_max_bytes": 10 * 1024 * 1024, "io_read_bytes": 4096,
         "io_write_bytes": 4096, "net_rx_bytes": 2048, "net_tx_bytes": 0}


async def _agent(env, iid="i-a", **info_args):
    await env.heartbeat(iid, **info_args)
    return await wait_for(lambda: env.registry.get_instance(iid))


async def test_settle_once_writes_usage_and_releases_quota(env):
    ak = await env.create_keypair(limit=3)
    await _agent(env)
    kid = await env.register(ak, "i-a", token="sess-00001", schedule=True)
    assert await env.slots_used(ak) == 1
    assert (await env.registry.get_instance("i-a")).load == 1
    results = await asyncio.gather(*(env.settle(kid, "TERMINATED",
                                                                "user-requested", STATS)
                                     for _ in range(8)))
    assert sorted(results) == [False] * 7 + [True]
    row = await env.kernel_row(kid)
    assert row.status == "TERMINATED" and row.termination_reason == "user-requested"
    usage = await env.usage_rows(kid)
    assert len(usage) == 1
    assert (usage[0].cpu_used, usage[0].mem_used, usage[0].io_used, usage[0].net_used) == \
        (1500, 10240, 8, 2)
    assert await env.slots_used(ak) == 0
    assert await env.registry.get_kernel(kid) is None
    assert (await env.registry.get_instance("i-a")).load == 0
    assert await env.registry.claim_session(ak, "sess-00001", "python3", "new") is None
    # later paths are no-ops
    assert not await env.settle(kid, "LOST", "agent-lost")
    assert (await env.kernel_row(kid)).status == "TERMINATED"
    assert await env.slots_used(ak) == 0


async def test_error_before_registration_has_no_usage(env):
    ak = await env.create_keypair()
    kid = await env.create_kernel_row(ak)
    assert await env.settle(kid, "ERROR", "kernel-creation-failed")
    assert (await env.kernel_row(kid)).status == "ERROR"
    assert await env.usage_rows(kid) == []
    assert await env.slots_used(ak) == 0


# What the agent reports differs from what the gateway's destroy settles with, so
# the recorded row tells which path won.
EVENT_STATS = {**STATS, "cpu_used": 2500}


async def test_destroy_races_kernel_terminated_event(env):
    ak = await env.create_keypair()
    await _agent(env)
    kids = [await env.register(ak, "i-a", schedule=True) for _ in range(5)]
    assert await env.slots_used(ak) == 5
    for kid in kids:
        # the agent reports the end while the gateway settles its destroy
        await env.push("kernel_terminated", "i-a", kernel_id=kid, reason="self-terminated",
                       stats=EVENT_STATS)
    direct = await asyncio.gather(*(env.settle(kid, "TERMINATED",
                                                               "user-requested", STATS)
                                    for kid in kids))
    assert all(isinstance(won, bool) for won in direct)
    await env.idle()  # the event path finished its settlements (or no-ops) too
    for kid, won_directly in zip(kids, direct, strict=True):
        row = await env.kernel_row(kid)
        usage = await env.usage_rows(kid)
        assert row.status == "TERMINATED"
        assert len(usage) == 1
        if won_directly:
            assert (row.termination_reason, usage[0].cpu_used) == ("user-requested", 1500)
        else:
            assert (row.termination_reason, usage[0].cpu_used) == ("self-terminated", 2500)
    assert await env.slots_used(ak) == 0
    assert (await env.registry.get_instance("i-a")).load == 0


async def test_kernel_terminated_from_another_agent_is_ignored(env, caplog):
    ak = await env.create_keypair()
    await _agent(env, "i-a")
    await _agent(env, "i-b")
    kid = await env.register(ak, "i-a")
    await env.push("kernel_terminated", "i-b", kernel_id=kid, reason="self-terminated")
    await env.push("kernel_terminated", "i-a", kernel_id="unknown-kernel", reason="x")
    await env.idle()
    assert f"ignored end of kernel {kid} reported by i-b (it runs on i-a)" in caplog.text
    assert (await env.kernel_row(kid)).status == "RUNNING"
    await env.push("kernel_terminated", "i-a", kernel_id=kid, reason="self-terminated")

    async def ended():
        return (await env.kernel_row(kid)).status == "TERMINATED"
    await wait_for(ended)
    assert (await env.kernel_row(kid)).termination_reason == "self-terminated"


async def test_stats_events_update_last_stats(env):
    ak = await env.create_keypair()
    await _agent(env)
    kid = await env.register(ak, "i-a")
    await env.push("instance_stats", "i-a", stats={kid: STATS, "ghost": STATS})

    async def has_stats():
        record = await env.registry.get_kernel(kid)
        return record.last_stats == STATS
    await wait_for(has_stats)
    assert not await env.redis.kernels.exists(keys.kernel("ghost"))
    # settlement without stats uses the last known ones
    assert await env.settle(kid, "LOST", "agent-lost")
    assert (await env.usage_rows(kid))[0].cpu_used == 1500


async def test_lost_agent_settles_kernels_then_revives(env, caplog):
    ak = await env.create_keypair()
    await _agent(env, "i-a", max_kernels=2)
    kids = [await env.register(ak, "i-a", schedule=True) for _ in range(2)]
    # no more heartbeats: the liveness key (3.3 x 0.5 s) lapses, the sweep marks it lost

    async def lost():
        inst = await env.registry.get_instance("i-a")
        return inst.status == "lost"
    await wait_for(lost, timeout=6)

    async def settled():
        rows = [await env.kernel_row(k) for k in kids]
        return all(r.status == "LOST" for r in rows)
    await wait_for(settled)
    for kid in kids:
        assert [(row.kernel_id, row.cpu_used) for row in await env.usage_rows(kid)] == \
            [(kid, 0)]  # no stats ever arrived
        assert (await env.kernel_row(kid)).termination_reason == proto.REASON_LOST
        assert await env.registry.get_kernel(kid) is None
    assert await env.slots_used(ak) == 0
    assert "i-a" not in await env.redis.instances.smembers(keys.SCHED_LIVE)
    # a heartbeat from the lost agent: the registry tries to reset it (the fake
    # address does not answer, so it stays lost until the reset succeeds)
    await env.heartbeat("i-a", max_kernels=2)
    await env.idle()
    assert "lost agent i-a is back but reset failed" in caplog.text
    assert (await env.registry.get_instance("i-a")).status == "lost"


async def test_vanished_kernel_is_settled_after_two_heartbeats(env):
    ak = await env.create_keypair()
    await _agent(env)
    keep = await env.register(ak, "i-a")
    gone = await env.register(ak, "i-a")
    async def settled():
        await env.heartbeat("i-a", [keep])  # a live agent that no longer lists `gone`
        await env.idle()
        return (await env.kernel_row(gone)).status == "LOST"
    await wait_for(settled, interval=0.3)
    assert (await env.kernel_row(gone)).termination_reason == "vanished-from-agent"
    assert (await env.kernel_row(keep)).status == "RUNNING"
    assert await env.slots_used(ak) == 1


async def _address_record(env, addr: str) -> tuple[str | None, str | None]:
    """(the instance holding `addr`, the agent key kept for it) in Redis."""
    instances = env.redis.instances
    holder, key = (await instances.hget(keys.AGENT_ADDRS, addr),
                   await instances.hget(keys.AGENT_KEYS, addr))
    return tuple(v.decode() if isinstance(v, bytes) else v for v in (holder, key))


async def test_instance_terminated_forgets_the_agent(env):
    ak = await env.create_keypair()
    addr = (await _agent(env)).addr
    assert await _address_record(env, addr) == ("i-a", "")  # no keys: the empty key
    kid = await env.register(ak, "i-a")
    await env.push("instance_terminated", "i-a", reason="shutdown")

    async def forgotten():
        return await env.registry.get_instance("i-a") is None
    await wait_for(forgotten)
    assert (await env.kernel_row(kid)).status == "TERMINATED"
    assert await env.slots_used(ak) == 0
    assert await _address_record(env, addr) == (None, None)  # the address is free, no key kept


async def test_an_agent_that_moves_releases_its_old_address(env):
    await _agent(env, addr="tcp://127.0.0.1:11")
    await env.heartbeat("i-a", addr="tcp://127.0.0.1:12")

    async def moved():
        return (await env.registry.get_instance("i-a")).addr == "tcp://127.0.0.1:12"
    await wait_for(moved)
    assert await _address_record(env, "tcp://127.0.0.1:12") == ("i-a", "")
    assert await _address_record(env, "tcp://127.0.0.1:11") == (None, None)


async def test_malformed_frames_are_dropped_and_intake_survives(env):
    bad = [b"", b"\xc1garbage", msgpack.packb([1, 2, 3]),
           msgpack.packb({"v": 99, "type": "instance_heartbeat"}),
           msgpack.packb({"v": 1, "type": "no_such_event", "instance_id": "x", "ts": 1.0}),
           proto.encode_event("instance_heartbeat", "i-bad", info={"addr": 5},
                              running_kernels=[], interval=1),
           proto.encode_event("instance_heartbeat", "", info={}, running_kernels=[],
                              interval=1),
           proto.encode_event("kernel_terminated", "i-x", kernel_id=7, reason="x"),
           proto.encode_event("instance_stats", "i-x", stats={"k": 5})]
    for frame in bad:
        await env.push_raw(frame)
    await env.heartbeat("i-good")
    await wait_for(lambda: env.registry.get_instance("i-good"))
    assert [i.id for i in await env.registry.list_instances()] == ["i-good"]
    assert env.intake.dropped == len(bad)


async def test_register_after_settlement_is_refused(env):
    import pytest

    from sorna_server.registry import RegistrationFailed

    ak = await env.create_keypair()
    await _agent(env)
    kid = await env.create_kernel_row(ak)
    assert await env.settle(kid, "ERROR", "gone")
    from sorna_server.registry import KernelRecord

    await env.registry.schedule("python3", ak)
    record = KernelRecord(id=kid, instance_id="i-a", addr="tcp://127.0.0.1:1", access_key=ak,
                          lang="python3", stdin_port=1, stdout_port=2, created_at=0.0,
                          last_used=0.0, num_queries=0, limits={}, last_stats={})
    with pytest.raises(RegistrationFailed) as err:
        await env.registry.lifecycle.register(record, "sess-00002")
    assert err.value.reason == "kernel-settled"
    assert (await env.registry.get_instance("i-a")).load == 0
    assert await env.registry.get_kernel(kid) is None
    assert await env.registry.claim_session(ak, "sess-00002", "python3", "z") is None
    assert (await env.kernel_row(kid)).status == "ERROR"
