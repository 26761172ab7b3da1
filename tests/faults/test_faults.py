"""Faults injected into a running deployment of real processes, under load.

Each test starts a private redis-server (killable), 2 gateway processes
(`sorna serve`) and 2 reference agents, on PostgreSQL when SORNA_TEST_DB_URL
is set (else SQLite), runs a bounded load of clients looping
create -> execute x3 -> destroy, injects one fault while the load runs, stops
the load, and then checks every accounting invariant of issue 10 once the
system has settled (`cluster.wait_invariants`):

- each ended kernel has exactly one usage row (kernels that never reached an
  agent — failed creations — have none), no live kernel has one;
- no PREPARING or RUNNING row lacks a live kernel on a live agent;
- every quota counter equals the keypair's live kernels;
- every agent's kernel set in Redis equals what the agent runs;
- `sorna registry reconcile` (no --fix) reports nothing;
- no 500 was answered (503 with Retry-After is the answer while a dependency
  is away).

Short heartbeat (1 s) and reconciliation (2 s) intervals keep each test to
well under a minute (the gateway SIGKILL test waits for the 16 s creation
deadline).
"""
from __future__ import annotations

import asyncio
import signal
import time
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from sorna_server.db.engine import create_engine
from sorna_server.db.models import kernels, usage
from tests.faults.cluster import Cluster, Load, PrivatePostgres, full_service_after, wait_invariants
from tests.helpers import PG_URL, block_usage_inserts, pg_admin

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

LOAD_CLIENTS = 4
WARM_UP = 2.0  # seconds of load before the fault


@pytest.fixture
def fault_db(tmp_path: Path):
    """PostgreSQL (a fresh database on SORNA_TEST_DB_URL's server) or SQLite."""
    if PG_URL:
        name = f"sorna_fault_{uuid.uuid4().hex[:12]}"
        pg_admin(f'CREATE DATABASE "{name}"')
        yield make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
        pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    else:
        yield f"sqlite:///{tmp_path / 'fault.db'}"


async def _start(workdir: Path, db_url: str) -> tuple[Cluster, list[tuple[str, str]]]:
    cluster = Cluster(workdir, db_url)
    keys = await cluster.prepare_database(keys=LOAD_CLIENTS)
    await asyncio.to_thread(cluster.start)
    try:
        await cluster.wait_ready()
    except BaseException:
        cluster.stop()
        raise
    return cluster, keys


@pytest.fixture
async def deployment(tmp_path: Path, fault_db: str):
    cluster, keys = await _start(tmp_path, fault_db)
    try:
        yield cluster, keys
    finally:
        await asyncio.to_thread(cluster.stop)


async def _under_load(cluster: Cluster, keys, fault, **load_args) -> Load:
    """Run the load, inject `fault` after the warm-up, stop the load a moment
    after the fault is over; returns the load (with its counts)."""
    load = Load(cluster, keys, clients=LOAD_CLIENTS, **load_args)
    load.start()
    try:
        await asyncio.sleep(WARM_UP)
        await fault()
        await asyncio.sleep(2.0)
    finally:
        await load.stop()
    assert load.counts[("create", 201, "")] > 0, load.status_counts()
    return load


async def _assert_invariants(cluster: Cluster, load: Load) -> None:
    found, _ = await wait_invariants(cluster, load, timeout=45)
    broken = {name: items for name, items in found.items() if items}
    assert not broken, f"{broken}\nload: {load.status_counts()}\n{cluster.logs()}"


async def test_agent_sigkill(deployment):
    cluster, keys = deployment

    async def fault():
        cluster.signal_agent(1, signal.SIGKILL)
        await asyncio.sleep(2.0)
    load = await _under_load(cluster, keys, fault)
    await _assert_invariants(cluster, load)


async def test_gateway_sigkill_mid_create(deployment):
    cluster, keys = deployment
    engine = create_engine(cluster.config)

    async def fault():
        # kill gateway 0 the moment a creation is in progress (a PREPARING row)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            async with engine.connect() as conn:
                preparing = (await conn.execute(
                    sa.select(sa.func.count()).select_from(kernels)
                    .where(kernels.c.status == "PREPARING"))).scalar()
            if preparing:
                cluster.kill_gateway(0)
                return
            await asyncio.sleep(0.005)
        raise AssertionError("no creation in progress to interrupt")
    try:
        load = await _under_load(cluster, keys, fault)
    finally:
        await engine.dispose()
    await _assert_invariants(cluster, load)


async def test_redis_restart(deployment):
    cluster, keys = deployment

    async def fault():
        cluster.redis.stop()
        await asyncio.sleep(3.0)
        await asyncio.to_thread(cluster.redis.start)
        seconds = await full_service_after(cluster, keys[0])
        assert seconds < 5.0, f"full service {seconds:.1f} s after Redis came back"
    load = await _under_load(cluster, keys, fault)
    # a running kernel was never answered 404 because Redis had forgotten it
    # (a destroy retried after a 503 may find it gone: its first attempt did it)
    for op in ("execute", "destroy"):
        assert load.counts[(op, 404, "kernel-not-found")] == 0, load.status_counts()
    await _assert_invariants(cluster, load)


@pytest.mark.skipif(not PG_URL or not PrivatePostgres.available(),
                    reason="needs SORNA_TEST_DB_URL (PostgreSQL) and the server binaries")
async def test_database_stop(tmp_path: Path):
    pg = PrivatePostgres()
    pg.init()
    pg.start()
    try:
        cluster, keys = await _start(tmp_path, pg.url)
        try:
            async def fault():
                await asyncio.to_thread(pg.stop, "fast")
                await asyncio.sleep(3.0)
                await asyncio.to_thread(pg.start)
                seconds = await full_service_after(cluster, keys[0])
                assert seconds < 5.0, f"full service {seconds:.1f} s after the database"
            load = await _under_load(cluster, keys, fault)
            assert load.counts[("create", 503, "service-unavailable")] > 0, \
                load.status_counts()
            await _assert_invariants(cluster, load)
        finally:
            await asyncio.to_thread(cluster.stop)
    finally:
        await asyncio.to_thread(pg.destroy)


async def test_agent_sigstop(deployment):
    """Frozen (not dead) for longer than its liveness: marked lost, kernels settled;
    thawed: revived (reset) and used again."""
    cluster, keys = deployment

    async def fault():
        cluster.signal_agent(1, signal.SIGSTOP)
        await asyncio.sleep(5.0)
        cluster.signal_agent(1, signal.SIGCONT)
    load = await _under_load(cluster, keys, fault)
    await _assert_invariants(cluster, load)


async def test_event_settlement_failure(deployment):
    """Kernels that end by themselves while settlement fails (every usage insert
    is refused for a while): their kernel_terminated settlements are retried
    with the events' final stats, not settled later as vanished."""
    cluster, keys = deployment
    engine = create_engine(cluster.config)

    async def fault():
        await block_usage_inserts(engine)
        await asyncio.sleep(3.0)
        await block_usage_inserts(engine, block=False)
    try:
        load = await _under_load(cluster, keys, fault, exit_code_every=2)
        await _assert_invariants(cluster, load)
        async with engine.connect() as conn:
            by_path = dict((await conn.execute(
                sa.select(kernels.c.termination_reason, sa.func.count())
                .where(kernels.c.status != "RUNNING")
                .group_by(kernels.c.termination_reason))).all())
            settled_by = dict((await conn.execute(
                sa.select(usage.c.settled_by, sa.func.count())
                .group_by(usage.c.settled_by))).all())
    finally:
        await engine.dispose()
    assert by_path.get("self-terminated", 0) > 0, by_path
    assert by_path.get("vanished-from-agent", 0) == 0, by_path
    assert settled_by.get("event", 0) > 0, settled_by


async def test_dead_agent_is_suspect_at_once_and_creates_go_elsewhere(deployment):
    """Before the dead agent is even found lost, every create succeeds (a create
    that picked it retries once on the other agent) and nothing answers 500."""
    cluster, keys = deployment
    dead = cluster.agents[1]
    cluster.signal_agent(1, signal.SIGKILL)
    load = Load(cluster, keys[:1], clients=0)
    load.start()
    try:
        statuses, held = [], []
        for _ in range(4):  # kept running, so the scheduler soon prefers the dead agent
            status, body = await load.request(0, "POST", "/v2/kernel/create",
                                              {"lang": "python3",
                                               "clientSessionToken": uuid.uuid4().hex},
                                              keys[0], "create")
            statuses.append(status)
            if status == 201:
                held.append(body["kernelId"])
        for kernel_id in held:
            await load.destroy(0, kernel_id, keys[0])
    finally:
        await load.stop()
    assert statuses == [201] * 4, load.status_counts()
    from sorna_server import redis_keys
    from sorna_server.redis_conn import RedisClients

    redis = RedisClients.connect(cluster.redis.url, cluster.config)
    try:
        status = await redis.instances.hget(redis_keys.instance(dead.instance_id), "status")
        suspect = await redis.instances.exists(redis_keys.instance_suspect(dead.instance_id))
    finally:
        await redis.close()
    assert status == "lost" or suspect, status
