"""Compare the live registry (Redis) with the database and with the agents; fix.

Used by `sorna registry reconcile [--fix]` and by the reconciler service of
every gateway (at start-up and then periodically).  One function per rule
(also in docs/redis-layout.md, "Reconciliation"):

- stale-redis-kernel: a Redis kernel whose row is missing or final (settled
  more than a moment ago): its Redis entries are removed.
- kernel-on-lost-agent: a Redis kernel on an agent that is unknown or lost:
  settled LOST.
- kernel-missing-from-agent-set: a Redis kernel missing from its agent's
  kernel set: added back.
- dangling-agent-kernel: a kernel-set member with no kernel record and no live
  row (a phantom): removed.
- abandoned-creation: a PREPARING row past the creation deadline: settled ERROR.
- unregistered-running-kernel / vanished-kernel / unverifiable-kernel: a
  RUNNING row that Redis does not hold: the agent is asked (`list_kernels`);
  if it runs the kernel, the kernel is adopted, else it is settled LOST; if the
  agent cannot be asked while it still looks alive, nothing is done this time.
- quota-drift: a keypair whose `concurrency_used` differs from its number of
  live rows: set to that number.
- stale-session: a session bound to a kernel that is neither in Redis nor live.
- missing-session: a running kernel created for a session that Redis no longer
  binds to it: bound again.

The snapshot is read database first, then Redis, and every candidate is
looked at again before it is reported, so work in progress (a creation, a
settlement's Redis clean-up) is not reported.  Every fix re-checks its
condition atomically when it acts: settlement is a conditional UPDATE,
removals of Redis entries only happen for rows in a final status (final is
for good), adoption re-reads the row after writing, session fixes are Lua
compare-and-set scripts, the quota fix counts under the keypair's row lock.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import sqlalchemy as sa
import zmq

from .. import agent_protocol as proto
from .. import redis_keys as keys
from ..agent_client import AgentError
from ..db.models import LIVE_STATUSES, KernelStatus, kernels, keypairs
from ..redis_conn import hash_fields, pipelined, scan_names, string_value, string_values
from . import scripts
from .constants import (
    ABSENT_AGENT_FACTOR,
    CLEANUP_GRACE,
    REASON_ABANDONED,
    RULE_ABANDONED_CREATION,
    RULE_KERNEL_ON_LOST_AGENT,
    RULE_MISSING_FROM_AGENT_SET,
    RULE_MISSING_SESSION,
    RULE_PHANTOM_AGENT_KERNEL,
    RULE_QUOTA_DRIFT,
    RULE_STALE_REDIS_KERNEL,
    RULE_STALE_SESSION,
    RULE_UNREGISTERED_RUNNING,
    RULE_UNVERIFIABLE_KERNEL,
    RULE_VANISHED_KERNEL,
    SETTLED_BY_RECONCILE,
)
from .lifecycle import age_of
from .records import Instance
from .registry import Registry

log = logging.getLogger(__name__)

KERNEL_FIELDS = ("instance", "access_key", "lang", "token")
SESSION_RECHECK_DELAY = 0.5  # a session bound a moment before its kernel row is inserted
CHUNK = 500


@dataclass
class Difference:
    kind: str      # the rule (constants.RULE_*)
    subject: str
    detail: str
    action: str
    fixed: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Snapshot:
    live_rows: dict[str, Any]                 # kernel id -> row (PREPARING/RUNNING)
    redis_kernels: dict[str, dict[str, str]]  # kernel id -> KERNEL_FIELDS present
    instances: dict[str, Instance]
    instance_sets: dict[str, set[str]]
    other_rows: dict[str, Any] = field(default_factory=dict)  # ids above, not live then
    absent_for: dict[str, float] = field(default_factory=dict)  # unknown agent -> seconds


async def reconcile(registry: Registry, *, fix: bool) -> list[Difference]:
    """One pass over every rule; returns the differences found (and fixed)."""
    return await Reconciliation(registry, fix).run()


class Reconciliation:
    def __init__(self, registry: Registry, fix: bool):
        self.reg = registry
        self.lifecycle = registry.lifecycle
        self.fix = fix
        self.diffs: list[Difference] = []

    def note(self, kind: str, subject: str, detail: str, action: str) -> Difference:
        diff = Difference(kind, subject, detail, action)
        self.diffs.append(diff)
        return diff

    async def run(self) -> list[Difference]:
        snap = await self.snapshot()
        rules: list[Callable[[Snapshot], Awaitable[None]]] = [
            self.stale_redis_kernels, self.kernels_on_lost_agents,
            self.kernels_missing_from_agent_sets, self.phantom_agent_kernels,
            self.abandoned_creations, self.running_rows_redis_lacks, self.quota_drift,
            self.stale_sessions, self.missing_sessions]
        for rule in rules:
            await rule(snap)
        return self.diffs

    # --- reading --------------------------------------------------------------
    async def snapshot(self) -> Snapshot:
        # Database first, then Redis: a kernel registered in between is then seen
        # in Redis with a live row.
        async with self.reg.db.connect() as conn:
            live_rows = {row.id: row for row in await conn.execute(
                sa.select(kernels.c.id, kernels.c.status, kernels.c.agent,
                          kernels.c.access_key, kernels.c.lang, kernels.c.created_at)
                .where(kernels.c.status.in_(LIVE_STATUSES)))}
        redis_kernels = await self._redis_kernels()
        instances = {inst.id: inst for inst in await self.reg.list_instances()}
        instance_sets = await self.reg.instance_kernel_sets(list(instances))
        snap = Snapshot(live_rows, redis_kernels, instances, instance_sets)
        others = set(redis_kernels).union(*instance_sets.values()) - live_rows.keys()
        snap.other_rows = await self.rows_of(others)
        referenced = {row.agent for row in live_rows.values() if row.agent} | {
            raw.get("instance", "") for raw in redis_kernels.values()}
        snap.absent_for = await self.absent_agents(referenced - {""}, set(instances))
        return snap

    async def absent_agents(self, referenced: set[str], known: set[str]) -> dict[str, float]:
        """How long each referenced agent has been unknown to Redis (0 the first
        time): after a Redis restart every agent is unknown until it heartbeats."""
        client, name, now = self.reg.redis.instances, keys.RECONCILE_ABSENT_AGENTS, time.time()
        recorded = await hash_fields(client, name)
        back = [iid for iid in recorded if iid in known]
        if back and self.fix:
            await client.hdel(name, *back)
        absent = sorted(referenced - known)
        for iid in absent:
            if iid not in recorded and self.fix:  # a report changes nothing
                await client.hsetnx(name, iid, repr(now))
        return {iid: now - float(recorded.get(iid) or now) for iid in absent}

    def gone(self, snap: Snapshot, iid: str) -> bool:
        """An agent that is lost, or that Redis has not known for a while."""
        inst = snap.instances.get(iid)
        if inst is not None:
            return inst.status == "lost"
        grace = self.reg.heartbeat_interval * ABSENT_AGENT_FACTOR
        return snap.absent_for.get(iid, 0.0) > grace

    async def _redis_kernels(self) -> dict[str, dict[str, str]]:
        prefix = keys.KERNEL_PREFIX
        names = [name for name in await scan_names(self.reg.redis.kernels, prefix + "*")
                 if ":" not in name[len(prefix):]]
        values = await pipelined(self.reg.redis.kernels, "hmget", names, *KERNEL_FIELDS) \
            if names else []
        result: dict[str, dict[str, str]] = {}
        for name, fields in zip(names, values, strict=True):
            present = {k: v for k, v in zip(KERNEL_FIELDS, fields, strict=True) if v is not None}
            if present:
                result[name[len(prefix):]] = present
        return result

    async def rows_of(self, kernel_ids: Iterable[str]) -> dict[str, Any]:
        """Current rows (id, status, agent, access_key, terminated_at) of the ids."""
        ids = sorted(kernel_ids)
        rows: dict[str, Any] = {}
        async with self.reg.db.connect() as conn:
            for start in range(0, len(ids), CHUNK):
                for row in await conn.execute(
                        sa.select(kernels.c.id, kernels.c.status, kernels.c.agent,
                                  kernels.c.access_key, kernels.c.terminated_at)
                        .where(kernels.c.id.in_(ids[start:start + CHUNK]))):
                    rows[row.id] = row
        return rows

    @staticmethod
    def settled_long_ago(row: Any) -> bool:
        """No row, or a final row whose own Redis clean-up has had time to run."""
        if row is None:
            return True
        if row.status in LIVE_STATUSES:
            return False
        return row.terminated_at is None or age_of(row.terminated_at) > CLEANUP_GRACE

    # --- rules: Redis kernels -----------------------------------------------------
    async def stale_redis_kernels(self, snap: Snapshot) -> None:
        for kid, raw in snap.redis_kernels.items():
            if kid in snap.live_rows:
                continue
            row = snap.other_rows.get(kid)
            if not self.settled_long_ago(row):
                continue
            diff = self.note(RULE_STALE_REDIS_KERNEL, kid,
                             f"DB row is {row.status if row is not None else 'missing'}",
                             "remove from Redis")
            if self.fix:
                diff.fixed = await self.lifecycle.clean_up(kid, raw.get("instance"),
                                                           raw.get("access_key"))

    async def kernels_on_lost_agents(self, snap: Snapshot) -> None:
        for kid, raw in snap.redis_kernels.items():
            iid = raw.get("instance", "")
            inst = snap.instances.get(iid)
            if kid not in snap.live_rows or not self.gone(snap, iid):
                continue
            diff = self.note(RULE_KERNEL_ON_LOST_AGENT, kid,
                             f"agent {iid} is {'unknown' if inst is None else 'lost'}",
                             "settle LOST")
            if self.fix:
                diff.fixed = await self.lifecycle.settle(
                    kid, KernelStatus.LOST.value, proto.REASON_LOST, path=SETTLED_BY_RECONCILE)

    async def kernels_missing_from_agent_sets(self, snap: Snapshot) -> None:
        for kid, raw in snap.redis_kernels.items():
            iid = raw.get("instance", "")
            inst = snap.instances.get(iid)
            if kid not in snap.live_rows or inst is None or inst.status == "lost" \
                    or kid in snap.instance_sets.get(iid, set()):
                continue
            if kid in await self.reg.instance_kernel_ids(iid):
                continue  # registered meanwhile
            diff = self.note(RULE_MISSING_FROM_AGENT_SET, kid, f"not in {iid}'s kernel set",
                             "add to the agent's kernel set")
            if self.fix:
                state = await scripts.bind_kernel(self.reg.redis.instances, iid, kid,
                                                  repr(time.time()), "0")
                row = (await self.rows_of([kid])).get(kid)
                if row is None or row.status not in LIVE_STATUSES:  # settled meanwhile
                    await self.lifecycle.clean_up(kid, iid, raw.get("access_key"))
                diff.fixed = state == "ok"

    async def phantom_agent_kernels(self, snap: Snapshot) -> None:
        for iid, members in sorted(snap.instance_sets.items()):
            for kid in sorted(members - snap.redis_kernels.keys() - snap.live_rows.keys()):
                if not self.settled_long_ago(snap.other_rows.get(kid)):
                    continue
                diff = self.note(RULE_PHANTOM_AGENT_KERNEL, f"{iid}/{kid}",
                                 "no kernel record, no live row",
                                 "remove from the agent's kernel set")
                if self.fix and self.settled_long_ago((await self.rows_of([kid])).get(kid)):
                    await scripts.forget_kernel(self.reg.redis.instances, iid, kid,
                                                repr(time.time()))
                    diff.fixed = True

    # --- rules: live rows ---------------------------------------------------------
    async def abandoned_creations(self, snap: Snapshot) -> None:
        deadline = self.lifecycle.creation_timeout
        for kid, row in snap.live_rows.items():
            if row.status != KernelStatus.PREPARING.value or age_of(row.created_at) <= deadline:
                continue
            diff = self.note(RULE_ABANDONED_CREATION, kid,
                             f"PREPARING for {age_of(row.created_at):.0f} s", "settle ERROR")
            if self.fix:
                diff.fixed = await self.lifecycle.settle(
                    kid, KernelStatus.ERROR.value, REASON_ABANDONED, path=SETTLED_BY_RECONCILE)

    async def running_rows_redis_lacks(self, snap: Snapshot) -> None:
        wanted = [row for kid, row in snap.live_rows.items()
                  if kid not in snap.redis_kernels and row.agent
                  and row.status == KernelStatus.RUNNING.value]
        if not wanted:
            return
        current = await self.rows_of(row.id for row in wanted)
        by_agent: dict[str, list[Any]] = {}
        for row in wanted:
            now = current.get(row.id)
            if now is not None and now.status == KernelStatus.RUNNING.value \
                    and not await self.reg.redis.kernels.exists(keys.kernel(row.id)):
                by_agent.setdefault(row.agent, []).append(row)
        listings = await self._ask_agents(snap.instances, by_agent)
        for iid, rows in sorted(by_agent.items()):
            for row in rows:
                await self._running_row(row, snap.instances.get(iid), listings.get(iid),
                                        self.gone(snap, iid))

    async def _running_row(self, row: Any, inst: Instance | None,
                           listing: dict[str, Any] | None, gone: bool) -> None:
        iid = row.agent
        if listing is not None and row.id in listing and inst is not None:
            diff = self.note(RULE_UNREGISTERED_RUNNING, row.id,
                             f"runs on {iid} but Redis lacks it", "adopt")
            if self.fix and not await self.reg.redis.kernels.exists(keys.kernel(row.id)):
                diff.fixed = await self.lifecycle.adopt(iid, inst.addr, row.id, row.access_key,
                                                        row.lang, listing[row.id] or {})
            return
        if listing is None and not gone and (inst is None or await self.reg.is_alive(iid)):
            self.note(RULE_UNVERIFIABLE_KERNEL, row.id,
                      f"RUNNING on {iid}, which cannot be asked now"
                      f"{' (not registered yet)' if inst is None else ''}", "none (retry later)")
            return
        where = ("unknown" if inst is None else "lost" if inst.status == "lost"
                 else "silent" if listing is None else "does not run it")
        diff = self.note(RULE_VANISHED_KERNEL, row.id, f"RUNNING in DB; agent {iid}: {where}",
                         "settle LOST")
        if self.fix and not await self.reg.redis.kernels.exists(keys.kernel(row.id)):
            diff.fixed = await self.lifecycle.settle(row.id, KernelStatus.LOST.value,
                                                     proto.REASON_LOST, path=SETTLED_BY_RECONCILE)

    async def _ask_agents(self, instances: dict[str, Instance],
                          wanted: dict[str, list[Any]]) -> dict[str, dict[str, Any] | None]:
        """`list_kernels` of every (non-lost) agent in `wanted`, concurrently; None
        for an agent that cannot be asked."""
        semaphore = asyncio.Semaphore(32)
        timeout = min(self.reg.config.agent_rpc_timeout, 5.0)

        async def ask(iid: str) -> dict[str, Any] | None:
            inst = instances.get(iid)
            if inst is None or inst.status == "lost":
                return None
            async with semaphore:
                try:
                    reply = await self.reg.rpc.call(inst.addr, "list_kernels", {},
                                                    timeout=timeout)
                except (AgentError, zmq.ZMQError) as exc:
                    log.warning("cannot list kernels of %s: %s", iid, exc)
                    return None
            return reply if isinstance(reply, dict) else {}

        ids = sorted(wanted)
        return dict(zip(ids, await asyncio.gather(*(ask(iid) for iid in ids)), strict=True))

    # --- rules: quota -----------------------------------------------------------------
    async def quota_drift(self, snap: Snapshot) -> None:
        async with self.reg.db.connect() as conn:
            drift = (await conn.execute(
                sa.select(keypairs.c.access_key, keypairs.c.concurrency_used,
                          _live_count().label("live"))
                .where(keypairs.c.concurrency_used != _live_count()))).all()
        for row in drift:
            fixed = await self._fix_quota(row.access_key, apply=self.fix)
            if fixed is None:
                continue  # it agreed when looked at again
            diff = self.note(RULE_QUOTA_DRIFT, row.access_key,
                             f"concurrency_used {fixed[0]}, live kernels {fixed[1]}",
                             f"set concurrency_used to {fixed[1]}")
            diff.fixed = self.fix

    async def _fix_quota(self, access_key: str, *, apply: bool) -> tuple[int, int] | None:
        """Re-check one keypair under its row lock (every slot change holds it in
        the transaction that changes the kernel row) and set its counter.
        Returns (counter, live rows), or None when they agree."""
        async with self.reg.db.begin() as conn:
            lock = sa.select(keypairs.c.concurrency_used).where(
                keypairs.c.access_key == access_key)
            if conn.dialect.name != "sqlite":  # SQLite serialises writers anyway
                lock = lock.with_for_update()
            used = (await conn.execute(lock)).scalar()
            live = (await conn.execute(
                sa.select(sa.func.count()).select_from(kernels)
                .where(kernels.c.access_key == access_key,
                       kernels.c.status.in_(LIVE_STATUSES)))).scalar() or 0
            if used is None or used == live:
                return None
            if apply:
                await conn.execute(sa.update(keypairs)
                                   .where(keypairs.c.access_key == access_key,
                                          keypairs.c.concurrency_used != _live_count())
                                   .values(concurrency_used=_live_count()))
            return int(used), int(live)

    # --- rules: sessions --------------------------------------------------------------
    async def stale_sessions(self, snap: Snapshot) -> None:
        sessions = self.reg.redis.sessions
        names = await scan_names(sessions, keys.SESSION_PREFIX + "*")
        if not names:
            return
        bound = dict(zip(names, await string_values(sessions, names), strict=True))
        candidates = {name: kid for name, kid in bound.items() if kid is not None
                      and kid not in snap.redis_kernels and kid not in snap.live_rows}
        if not candidates:
            return
        rows = await self.rows_of(set(candidates.values()))
        if any(kid not in rows for kid in candidates.values()):
            # a creation binds its session a moment before it inserts the row
            await asyncio.sleep(SESSION_RECHECK_DELAY)
            rows = await self.rows_of(set(candidates.values()))
        for name, kid in sorted(candidates.items()):
            row = rows.get(kid)
            if row is not None and row.status in LIVE_STATUSES:
                continue
            if await string_value(sessions, name) != kid:
                continue
            diff = self.note(RULE_STALE_SESSION, name,
                             f"bound to {kid} ({row.status if row is not None else 'no row'})",
                             "delete")
            if self.fix:
                await scripts.release_session(sessions, kid, keys=(name,))
                diff.fixed = True

    async def missing_sessions(self, snap: Snapshot) -> None:
        wanted = {kid: keys.session(raw["access_key"], raw["lang"], raw["token"])
                  for kid, raw in snap.redis_kernels.items()
                  if raw.get("token") and raw.get("access_key") and raw.get("lang")
                  and getattr(snap.live_rows.get(kid), "status", None)
                  == KernelStatus.RUNNING.value}
        if not wanted:
            return
        values = await string_values(self.reg.redis.sessions, list(wanted.values()))
        unbound = [kid for (kid, _), value in zip(wanted.items(), values, strict=True)
                   if value is None]
        if not unbound:
            return
        current = await self.rows_of(unbound)  # not settled (and so unbound) meanwhile
        for kid in unbound:
            name = wanted[kid]
            row = current.get(kid)
            if row is None or row.status != KernelStatus.RUNNING.value \
                    or not await self.reg.redis.kernels.exists(keys.kernel(kid)):
                continue
            diff = self.note(RULE_MISSING_SESSION, name, f"its kernel {kid} runs", "bind again")
            if self.fix:
                await scripts.claim_session(self.reg.redis.sessions, kid, keys=(name,))
                diff.fixed = True


def _live_count() -> Any:
    return (sa.select(sa.func.count()).select_from(kernels)
            .where(kernels.c.access_key == keypairs.c.access_key,
                   kernels.c.status.in_(LIVE_STATUSES))
            .scalar_subquery())
