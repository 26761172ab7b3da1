"""Registration by heartbeat, scheduling choices and reasons, drain, sessions."""
from __future__ import annotations

import pytest

from sorna_server import redis_keys as keys
from sorna_server.registry import InstanceNotAvailable
from tests.helpers import wait_for


async def test_heartbeat_registers_and_refreshes(env):
    await env.heartbeat("i-a", max_kernels=4, languages=("python3",))
    inst = await wait_for(lambda: env.registry.get_instance("i-a"))
    assert inst.status == "running" and inst.max_kernels == 4
    assert inst.languages == ["python3"] and not inst.draining
    first = inst.last_heartbeat
    ttl = await env.redis.instances.pttl(keys.instance_alive("i-a"))
    assert 0 < ttl <= int(0.5 * 3.3 * 1000)
    await env.heartbeat("i-a", max_kernels=6, languages=("python3", "bash"))

    async def refreshed():
        current = await env.registry.get_instance("i-a")
        return current if current.last_heartbeat > first else None
    inst = await wait_for(refreshed)
    assert inst.max_kernels == 6 and inst.languages == ["bash", "python3"]
    assert inst.first_heartbeat <= first
    assert [i.id for i in await env.registry.list_instances()] == ["i-a"]


async def test_schedule_reasons(env):
    with pytest.raises(InstanceNotAvailable) as err:
        await env.registry.schedule("python3", "AK")
    assert err.value.reason == "no-agents"
    await env.heartbeat("i-a", max_kernels=1, languages=("python3",))
    await wait_for(lambda: env.registry.get_instance("i-a"))
    with pytest.raises(InstanceNotAvailable) as err:
        await env.registry.schedule("bash", "AK")
    assert err.value.reason == "language-not-offered"
    inst = await env.registry.schedule("python3", "AK")
    assert inst.id == "i-a" and inst.load == 1
    with pytest.raises(InstanceNotAvailable) as err:
        await env.registry.schedule("python3", "AK")
    assert err.value.reason == "all-full"
    await env.registry.unreserve("i-a")
    assert (await env.registry.get_instance("i-a")).load == 0
    assert await env.registry.set_draining("i-a", True) is not None
    with pytest.raises(InstanceNotAvailable) as err:
        await env.registry.schedule("python3", "AK")
    assert err.value.reason == "all-draining"
    inst = await env.registry.set_draining("i-a", False)
    assert inst.status == "running" and not inst.draining
    assert (await env.registry.schedule("python3", "AK")).id == "i-a"


async def test_schedule_spreads_least_loaded(env):
    for iid in ("i-a", "i-b", "i-c"):
        await env.heartbeat(iid, max_kernels=10, languages=("python3",))
    await wait_for(lambda: _count(env, 3))
    picks = [(await env.registry.schedule("python3", "AK")).id for _ in range(9)]
    assert sorted(picks.count(i) for i in ("i-a", "i-b", "i-c")) == [3, 3, 3]
    # a bigger agent takes proportionally more (load is kernels / max_kernels)
    await env.heartbeat("i-d", max_kernels=40, languages=("python3",))
    await wait_for(lambda: _count(env, 4))
    picks = [(await env.registry.schedule("python3", "AK")).id for _ in range(10)]
    assert picks.count("i-d") >= 8


async def test_draining_keeps_kernels_and_takes_no_new(env):
    ak = await env.create_keypair()
    await env.heartbeat("i-a", max_kernels=5, languages=("python3",))
    await env.heartbeat("i-b", max_kernels=5, languages=("python3",))
    await wait_for(lambda: _count(env, 2))
    kid = await env.register(ak, "i-a")
    await env.registry.set_draining("i-a", True)
    for _ in range(5):
        assert (await env.registry.schedule("python3", ak)).id == "i-b"
    assert await env.registry.get_kernel(kid) is not None
    assert (await env.kernel_row(kid)).status == "RUNNING"
    # a heartbeat does not undo the drain
    await env.heartbeat("i-a", [kid], max_kernels=5, languages=("python3",))
    await env.heartbeat("i-b", max_kernels=5, languages=("python3",))

    async def beat_seen():
        return (await env.registry.get_instance("i-a")).num_kernels == 0
    await wait_for(beat_seen)
    assert (await env.registry.get_instance("i-a")).status == "draining"
    with pytest.raises(InstanceNotAvailable) as err:
        await env.registry.schedule("python3", ak)
    assert err.value.reason == "all-full"


async def test_sessions_are_scoped_by_access_key(env):
    reg = env.registry
    assert await reg.claim_session("AK1", "token-1234", "python3", "k1") is None
    assert await reg.claim_session("AK1", "token-1234", "python3", "k2") == "k1"
    assert await reg.claim_session("AK2", "token-1234", "python3", "k3") is None
    await reg.release_session("AK1", "token-1234", "python3", "k2")  # not ours: kept
    assert await reg.claim_session("AK1", "token-1234", "python3", "k4") == "k1"
    await reg.release_session("AK1", "token-1234", "python3", "k1")
    assert await reg.claim_session("AK1", "token-1234", "python3", "k5") is None


async def test_kernel_record_roundtrip_and_touch(env):
    ak = await env.create_keypair()
    await env.heartbeat("i-a", languages=("python3",), addr="tcp://10.1.2.3:6001")
    await wait_for(lambda: env.registry.get_instance("i-a"))
    kid = await env.register(ak, "i-a", addr="tcp://10.1.2.3:6001", token="sess-0001",
                             schedule=True)
    record = await env.registry.get_kernel(kid)
    assert record.instance_id == "i-a" and record.agent_host == "10.1.2.3"
    assert record.access_key == ak and record.stdin_port == 1
    assert (await env.kernel_row(kid)).agent == "i-a"
    assert await env.registry.claim_session(ak, "sess-0001", "python3", "other") == kid
    assert await env.registry.touch_kernel(kid) == 1
    assert await env.registry.touch_kernel(kid) == 2
    assert await env.registry.touch_kernel("nope") == 0
    before = (await env.registry.get_kernel(kid)).last_used
    assert await env.registry.touch_kernels({kid: 3, "nope": 5}) == 1
    assert await env.registry.touch_kernels({}) == 0
    await env.registry.update_ports(kid, 7001, 7002)
    record = await env.registry.get_kernel(kid)
    assert (record.stdin_port, record.stdout_port, record.num_queries) == (7001, 7002, 5)
    assert record.last_used >= before
    await env.registry.update_ports("nope", 1, 2)
    assert await env.registry.get_kernel("nope") is None
    inst = await env.registry.get_instance("i-a")
    assert inst.load == 1  # the reservation became the kernel


async def _count(env, n):
    return len(await env.registry.list_instances()) == n
