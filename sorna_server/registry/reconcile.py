"""Compare the live registry (Redis) with the database and with the agents; fix.

Used by `sorna registry reconcile [--fix]` and by every gateway process at the
end of its start-up grace period.  The rules (also in docs/redis-layout.md):

- A Redis kernel whose DB row is missing or final: its Redis bookkeeping is removed.
- A Redis kernel on an agent that is unknown or lost: settled LOST.
- A Redis kernel missing from its agent's kernel set: added back.
- An agent's kernel-set member with no kernel record and no live DB row: removed.
- A RUNNING DB row with no Redis record: the agent is asked (`list_kernels`); if
  it runs the kernel, the kernel is adopted, else it is settled LOST.  If the
  agent cannot be asked while it still looks alive, nothing is done this time.
- A PREPARING DB row older than the creation timeout with no Redis record:
  settled ERROR (`creation-abandoned`).
- A keypair whose `concurrency_used` differs from its number of live kernel
  rows: set to that number (one atomic UPDATE).
- A session bound to a kernel that is neither in Redis nor live in the DB: deleted.

Every fix re-checks its condition (settlement only acts on live rows, adoption
only writes a missing record), so running it while gateways work is safe.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
import zmq

from .. import agent_protocol as proto
from .. import redis_keys as keys
from ..agent_client import AgentError
from ..db.models import LIVE_STATUSES, KernelStatus, kernels, keypairs
from ..redis_conn import hgetall_many
from . import scripts
from .intake import REASON_ABANDONED, _age

if TYPE_CHECKING:
    from .registry import Registry

log = logging.getLogger(__name__)


@dataclass
class Difference:
    kind: str
    subject: str
    detail: str
    action: str
    fixed: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


async def _scan_hashes(client: Any, prefix: str) -> dict[str, dict[str, str]]:
    names = [key async for key in client.scan_iter(match=prefix + "*", count=1000)]
    names = [name for name in names if ":" not in name[len(prefix):]]
    if not names:
        return {}
    raws = await hgetall_many(client, names)
    return {name[len(prefix):]: raw for name, raw in zip(names, raws, strict=True) if raw}


async def reconcile(  # noqa: C901  (issue 10 splits it into one function per rule)
        registry: Registry, *, fix: bool) -> list[Difference]:
    reg = registry
    diffs: list[Difference] = []

    def note(kind: str, subject: str, detail: str, action: str) -> Difference:
        diff = Difference(kind, subject, detail, action)
        diffs.append(diff)
        return diff

    # Database first, then Redis: a kernel registered in between is then seen
    # in Redis, and every fix re-checks before acting.
    async with reg.db.connect() as conn:
        live_rows = {row.id: row for row in await conn.execute(
            sa.select(kernels.c.id, kernels.c.status, kernels.c.agent, kernels.c.access_key,
                      kernels.c.lang, kernels.c.created_at)
            .where(kernels.c.status.in_(LIVE_STATUSES)))}
    redis_kernels = await _scan_hashes(reg.redis.kernels, keys.KERNEL_PREFIX)
    instances = {inst.id: inst for inst in await reg.list_instances()}
    instance_sets: dict[str, set[str]] = {}
    if instances:
        pipe = reg.redis.instances.pipeline(transaction=False)
        for iid in instances:
            pipe.smembers(keys.instance_kernels(iid))
        for iid, members in zip(instances, await pipe.execute(), strict=True):
            instance_sets[iid] = set(members)
    other_status: dict[str, str] = {}
    unknown_ids = [kid for kid in redis_kernels if kid not in live_rows]
    if unknown_ids:
        async with reg.db.connect() as conn:
            for start in range(0, len(unknown_ids), 500):
                chunk = unknown_ids[start:start + 500]
                for row in await conn.execute(sa.select(kernels.c.id, kernels.c.status)
                                              .where(kernels.c.id.in_(chunk))):
                    other_status[row.id] = row.status

    # 1. Redis kernels against the database and their agents
    for kid, raw in redis_kernels.items():
        iid = raw.get("instance", "")
        if kid not in live_rows:
            state = other_status.get(kid, "missing")
            diff = note("stale-redis-kernel", kid, f"DB row is {state}", "remove from Redis")
            if fix:
                await reg._forget_kernel(kid, raw, None)
                diff.fixed = True
            continue
        inst = instances.get(iid)
        if inst is None or inst.status == "lost":
            diff = note("kernel-on-lost-agent", kid,
                        f"agent {iid} is {'unknown' if inst is None else 'lost'}", "settle LOST")
            if fix:
                await reg.settle(kid, KernelStatus.LOST.value, proto.REASON_LOST)
                diff.fixed = True
            continue
        if kid not in instance_sets.get(iid, set()):
            diff = note("kernel-missing-from-agent-set", kid, f"not in {iid}'s kernel set",
                        "add to the agent's kernel set")
            if fix:
                state = await scripts.bind_kernel(reg.redis.instances, iid, kid,
                                                  repr(_now()), "0")
                diff.fixed = state == "ok"

    # 2. agents' kernel sets against kernel records
    for iid, members in instance_sets.items():
        for kid in sorted(members - redis_kernels.keys()):
            if kid in live_rows:
                continue  # creation in progress (PREPARING), or handled by rule 3
            diff = note("dangling-agent-kernel", f"{iid}/{kid}", "no kernel record, no live row",
                        "remove from the agent's kernel set")
            if fix:
                await scripts.forget_kernel(reg.redis.instances, iid, kid, repr(_now()))
                diff.fixed = True

    # 3. live DB rows that Redis does not hold
    running_by_agent: dict[str, list[Any]] = {}
    for kid, row in live_rows.items():
        if kid in redis_kernels:
            continue
        if row.status == KernelStatus.RUNNING.value and row.agent:
            running_by_agent.setdefault(row.agent, []).append(row)
        elif row.status == KernelStatus.PREPARING.value \
                and _age(row.created_at) > reg.creation_timeout:
            diff = note("abandoned-creation", kid,
                        f"PREPARING for {_age(row.created_at):.0f} s", "settle ERROR")
            if fix and not await reg.redis.kernels.exists(keys.kernel(kid)):
                diff.fixed = await reg.settle(kid, KernelStatus.ERROR.value, REASON_ABANDONED)
    listings = await _ask_agents(reg, instances, running_by_agent)
    for iid, rows in sorted(running_by_agent.items()):
        inst = instances.get(iid)
        listing = listings.get(iid)
        for row in rows:
            if listing is not None and row.id in listing:
                diff = note("unregistered-running-kernel", row.id,
                            f"runs on {iid} but Redis lacks it", "adopt")
                if fix and not await reg.redis.kernels.exists(keys.kernel(row.id)):
                    await reg.adopt_kernel(iid, inst.addr, row.id, row.access_key, row.lang,
                                           listing[row.id] or {})
                    diff.fixed = True
            elif listing is None and inst is not None and await reg.is_alive(iid):
                note("unverifiable-kernel", row.id,
                     f"RUNNING on {iid}, which cannot be asked now", "none (retry later)")
            else:
                where = ("unknown" if inst is None else inst.status if listing is None and
                         inst.status == "lost" else "silent" if listing is None else
                         "does not run it")
                diff = note("vanished-kernel", row.id, f"RUNNING in DB; agent {iid}: {where}",
                            "settle LOST")
                if fix and not await reg.redis.kernels.exists(keys.kernel(row.id)):
                    diff.fixed = await reg.settle(row.id, KernelStatus.LOST.value,
                                                  proto.REASON_LOST)

    # 4. quota counters against live rows
    live_count = (sa.select(sa.func.count()).select_from(kernels)
                  .where(kernels.c.access_key == keypairs.c.access_key,
                         kernels.c.status.in_(LIVE_STATUSES))
                  .scalar_subquery())
    async with reg.db.connect() as conn:
        drift = (await conn.execute(
            sa.select(keypairs.c.access_key, keypairs.c.concurrency_used,
                      live_count.label("live"))
            .where(keypairs.c.concurrency_used != live_count))).all()
    for row in drift:
        diff = note("quota-drift", row.access_key,
                    f"concurrency_used {row.concurrency_used}, live kernels {row.live}",
                    f"set concurrency_used to {row.live}")
        if fix:
            async with reg.db.begin() as conn:
                await conn.execute(sa.update(keypairs)
                                   .where(keypairs.c.access_key == row.access_key)
                                   .values(concurrency_used=live_count))
            diff.fixed = True

    # 5. sessions bound to kernels that are gone
    names = [key async for key in reg.redis.sessions.scan_iter(
        match=keys.SESSION_PREFIX + "*", count=1000)]
    if names:
        values = await reg.redis.sessions.mget(names)
        for name, kid in zip(names, values, strict=True):
            if kid is None or kid in redis_kernels or kid in live_rows:
                continue
            async with reg.db.connect() as conn:
                status = (await conn.execute(sa.select(kernels.c.status)
                                             .where(kernels.c.id == kid))).scalar()
            if status in LIVE_STATUSES:
                continue
            diff = note("stale-session", name, f"bound to {kid} ({status or 'no row'})",
                        "delete")
            if fix:
                await scripts.release_session(reg.redis.sessions, kid, keys=(name,))
                diff.fixed = True
    return diffs


async def _ask_agents(reg: Registry, instances: dict[str, Any],
                      wanted: dict[str, list[Any]]) -> dict[str, dict[str, Any] | None]:
    """`list_kernels` of every (non-lost) agent in `wanted`, concurrently; None
    for an agent that cannot be asked."""
    semaphore = asyncio.Semaphore(32)

    async def ask(iid: str) -> dict[str, Any] | None:
        inst = instances.get(iid)
        if inst is None or inst.status == "lost":
            return None
        async with semaphore:
            try:
                reply = await reg.rpc.call(inst.addr, "list_kernels", {},
                                           timeout=min(reg.config.agent_rpc_timeout, 5.0))
            except (AgentError, zmq.ZMQError) as exc:
                log.warning("cannot list kernels of %s: %s", iid, exc)
                return None
        return reply if isinstance(reply, dict) else {}

    ids = sorted(wanted)
    return dict(zip(ids, await asyncio.gather(*(ask(iid) for iid in ids)), strict=True))


def _now() -> float:
    import time

    return time.time()
