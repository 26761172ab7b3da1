"""The one owner of a kernel's database row, its settlement and its quota slot.

State machine of a kernel row (`kernels.status`):

    PREPARING --register--> RUNNING --settle--> TERMINATED | LOST | ERROR
        \\-------------------settle------------------/

- `open` takes a concurrency slot and inserts the PREPARING row, in one
  transaction (QuotaFull when the keypair is at its limit).
- `register` records in Redis what the agent created, then moves the row
  PREPARING -> RUNNING with one conditional UPDATE (RegistrationFailed when the
  row was settled meanwhile).
- `settle` ends the kernel exactly once across every process: one transaction
  moves the row from a live status to its final one (the conditional UPDATE
  decides the single winner), writes the usage row and gives the quota slot
  back.  It never waits on Redis: Redis clean-up (kernel hash, the agent's
  kernel set, the session) follows, and when Redis fails it is kept in a
  pending set that `retry_pending` works through (the periodic reconciliation
  is the backstop across process deaths).  A settlement whose database
  transaction fails is kept too, with the stats it was given, and retried.

The gateway, the event intake, the lost-agent sweeper and reconciliation all
settle through here; each says which path it is (`constants.SETTLED_BY_*`),
stored in `kernels.settled_by` and `usage.settled_by`.  Every settlement won is
handed to the `on_settled` hooks (metrics attach there).
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from redis.exceptions import RedisError
from sqlalchemy.ext.asyncio import AsyncEngine

from .. import redis_keys as keys
from ..config import SornaConfig
from ..db import quota
from ..db.models import FINAL_STATUSES, LIVE_STATUSES, KernelStatus, kernels, usage
from ..redis_conn import RedisClients, hash_fields, hash_mapping
from . import scripts
from .constants import SETTLED_BY_EVENT
from .records import KernelRecord, RegistrationFailed

log = logging.getLogger(__name__)

# Errors that mean "the store did not answer", as opposed to a bug.
STORE_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, sa.exc.SQLAlchemyError)
RETRY_BACKOFF_MAX = 30.0


class QuotaFull(Exception):
    """Every concurrency slot of the keypair is in use."""


def usage_units(stats: dict[str, Any] | None) -> dict[str, int]:
    """Usage columns from agent stats: cpu in ms, memory/io/net in KiB."""
    stats = stats or {}

    def num(name: str) -> int:
        value = stats.get(name, 0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            return 0
        return int(value)

    return {
        "cpu_used": num("cpu_used"),
        "mem_used": num("mem_max_bytes") // 1024,
        "io_used": (num("io_read_bytes") + num("io_write_bytes")) // 1024,
        "net_used": (num("net_rx_bytes") + num("net_tx_bytes")) // 1024,
    }


def creation_deadline(config: SornaConfig) -> float:
    """Seconds after which a PREPARING kernel (and its agent slot reservation) is
    abandoned: the configured deadline, but never less than a creation may take."""
    return max(config.creation_deadline, creation_rpc_timeout(config) + 1.0)


def creation_rpc_timeout(config: SornaConfig) -> float:
    """How long the gateway waits for an agent's `create_kernel`."""
    return max(config.agent_rpc_timeout, 5.0) * 3


@dataclass(frozen=True)
class Settlement:
    """One settlement this process won (what the `on_settled` hooks receive)."""

    kernel_id: str
    status: str
    reason: str
    path: str
    access_key: str
    agent: str | None


@dataclass
class _PendingSettlement:
    status: str
    reason: str
    stats: dict[str, Any] | None
    path: str
    instance_id: str | None
    attempts: int = 0
    next_try: float = 0.0


@dataclass
class _PendingCleanup:
    instance_id: str | None
    access_key: str | None
    attempts: int = 0
    next_try: float = 0.0


def age_of(created_at: datetime | None) -> float:
    """Seconds since a database timestamp (naive ones are UTC, as SQLite returns them)."""
    if created_at is None:
        return 0.0
    if created_at.tzinfo is None:
        created_at = created_at.replace(tzinfo=UTC)
    return (datetime.now(UTC) - created_at).total_seconds()


def _loads(text: str | None) -> dict[str, Any]:
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _backoff(attempts: int) -> float:
    return time.monotonic() + min(RETRY_BACKOFF_MAX, 0.5 * 2 ** min(attempts, 6))


class KernelLifecycle:
    def __init__(self, config: SornaConfig, redis: RedisClients, db: AsyncEngine):
        self.config = config
        self.redis = redis
        self.db = db
        self.creation_timeout = creation_deadline(config)
        self.on_settled: list[Callable[[Settlement], None]] = []
        self._pending_settlements: dict[str, _PendingSettlement] = {}
        self._pending_cleanups: dict[str, _PendingCleanup] = {}

    # --- PREPARING ------------------------------------------------------------
    async def open(self, kernel_id: str, access_key: str, lang: str) -> None:
        """Take a concurrency slot and insert the PREPARING row (one transaction)."""
        async with self.db.begin() as conn:
            if not await quota.take_slot(conn, access_key):
                raise QuotaFull(access_key)
            await conn.execute(kernels.insert().values(
                id=kernel_id, lang=lang, access_key=access_key, agent=None,
                status=KernelStatus.PREPARING.value))

    async def status_of(self, kernel_id: str) -> str | None:
        async with self.db.connect() as conn:
            return (await conn.execute(
                sa.select(kernels.c.status).where(kernels.c.id == kernel_id))).scalar()

    # --- RUNNING ----------------------------------------------------------------
    async def register(self, record: KernelRecord, token: str | None = None) -> None:
        """Record a kernel the agent created: the instance's kernel set (consuming
        the reservation), the kernel hash, the session, then the row -> RUNNING.

        Raises RegistrationFailed (after undoing its Redis writes) when the agent
        is no longer registered or the row is no longer PREPARING.  Any other
        failure leaves Redis entries that the caller's settlement removes.
        """
        now = time.time()
        state = await scripts.bind_kernel(
            self.redis.instances, record.instance_id, record.id, repr(now), "1")
        if state != "ok":
            raise RegistrationFailed(record.id, f"instance-{state}")
        mapping = {**record.to_hash(), "registered_at": repr(now)}
        if token:
            mapping["token"] = token
        await self._write_kernel_hash(record, mapping)
        if token:
            await scripts.claim_session(self.redis.sessions, record.id,
                                        keys=(keys.session(record.access_key, record.lang,
                                                           token),))
        async with self.db.begin() as conn:
            result = await conn.execute(
                sa.update(kernels)
                .where(kernels.c.id == record.id,
                       kernels.c.status == KernelStatus.PREPARING.value)
                .values(status=KernelStatus.RUNNING.value, agent=record.instance_id))
        if result.rowcount != 1:
            await self.clean_up(record.id, record.instance_id, record.access_key)
            raise RegistrationFailed(record.id, "kernel-settled")

    async def adopt(self, instance_id: str, addr: str, kernel_id: str, access_key: str,
                    lang: str, info: dict[str, Any]) -> bool:
        """Take back into Redis a kernel an agent runs whose row is RUNNING there
        (Redis lost it).  Re-checks the row after writing: if it was settled
        meanwhile the entries are removed again and False is returned."""
        now = time.time()
        state = await scripts.bind_kernel(
            self.redis.instances, instance_id, kernel_id, repr(now), "0")
        if state != "ok":
            raise RegistrationFailed(kernel_id, f"instance-{state}")
        created = info.get("created_at")
        record = KernelRecord(
            id=kernel_id, instance_id=instance_id, addr=addr, access_key=access_key, lang=lang,
            stdin_port=int(info.get("stdin_port") or 0),
            stdout_port=int(info.get("stdout_port") or 0),
            created_at=float(created) if isinstance(created, (int, float)) else now,
            last_used=now, num_queries=0, limits={}, last_stats={})
        await self._write_kernel_hash(record, {**record.to_hash(), "registered_at": repr(now),
                                               "adopted_at": repr(now)})
        async with self.db.connect() as conn:
            row = (await conn.execute(sa.select(kernels.c.status, kernels.c.agent)
                                      .where(kernels.c.id == kernel_id))).first()
        if row is None or row.status != KernelStatus.RUNNING.value or row.agent != instance_id:
            await self.clean_up(kernel_id, instance_id, access_key)
            return False
        log.info("adopted kernel %s running on %s", kernel_id, instance_id)
        return True

    async def _write_kernel_hash(self, record: KernelRecord, mapping: dict[str, str]) -> None:
        pipe = self.redis.kernels.pipeline(transaction=True)
        pipe.hset(keys.kernel(record.id), mapping=hash_mapping(mapping))
        pipe.sadd(keys.access_key_kernels(record.access_key), record.id)
        await pipe.execute()

    # --- ended ------------------------------------------------------------------
    async def settle(self, kernel_id: str, status: str, reason: str,
                     stats: dict[str, Any] | None = None, *, path: str,
                     instance_id: str | None = None, use_sampled: bool = True) -> bool:
        """End a kernel exactly once across all processes; True if this call did it.

        `stats`: the kernel's final usage (from the agent); when None, the last
        sampled stats in Redis are used if Redis answers (unless `use_sampled`
        is False, as for a creation that failed).  `instance_id`: only
        end the kernel if it runs there (events from an agent never end another
        agent's kernel).  A database failure is re-raised after the settlement
        is queued for `retry_pending` with the same stats.
        """
        if status not in FINAL_STATUSES:
            raise ValueError(f"not a final kernel status: {status!r}")
        stats_given = stats is not None
        if stats is None and use_sampled:
            sampled, final = await self._sampled(kernel_id, instance_id)
            if final is not None:
                # its agent reported the end: settle as the event said
                status, reason, path = KernelStatus.TERMINATED.value, final[0], SETTLED_BY_EVENT
                stats, stats_given = final[1], True
            else:
                stats = sampled
        stats = stats or {}
        try:
            won, row = await self._settle_row(kernel_id, status, reason, stats, stats_given,
                                              path, instance_id)
        except STORE_ERRORS:
            self._queue_settlement(kernel_id, _PendingSettlement(
                status, reason, stats if stats_given else None, path, instance_id))
            raise
        self._pending_settlements.pop(kernel_id, None)
        if row is not None and row.status not in LIVE_STATUSES:
            await self.clean_up(kernel_id, row.agent or instance_id, row.access_key)
        if instance_id is not None and (row is None or (row.status not in LIVE_STATUSES
                                                        and row.agent not in (None, instance_id))):
            await self.clean_up(kernel_id, instance_id, None)  # a phantom entry there
        if not won and instance_id is not None and row is not None \
                and row.status in LIVE_STATUSES and row.agent not in (None, instance_id):
            log.warning("ignored end of kernel %s reported by %s (it runs on %s)",
                        kernel_id, instance_id, row.agent)
        if won:
            assert row is not None
            log.info("kernel %s settled %s (%s, by %s)", kernel_id, status, reason, path)
            self._record(Settlement(kernel_id, status, reason, path, row.access_key, row.agent))
        return won

    async def settle_many(self, kernel_ids: Iterable[str], status: str, reason: str,
                          *, path: str, instance_id: str | None = None,
                          parallel: int = 16) -> int:
        """Settle several kernels (bounded concurrency); returns how many this call
        ended.  Kernels with a settlement pending retry (an agent's event with its
        final stats) are left to that retry."""
        semaphore = asyncio.Semaphore(parallel)

        async def one(kernel_id: str) -> bool:
            if kernel_id in self._pending_settlements:
                return False
            async with semaphore:
                try:
                    return await self.settle(kernel_id, status, reason, path=path,
                                             instance_id=instance_id)
                except STORE_ERRORS as exc:
                    log.warning("could not settle kernel %s: %s", kernel_id, exc)
                    return False

        results = await asyncio.gather(*(one(kid) for kid in kernel_ids))
        return sum(results)

    def pending_settlement(self, kernel_id: str) -> bool:
        return kernel_id in self._pending_settlements

    def _record(self, settlement: Settlement) -> None:
        for hook in self.on_settled:
            try:
                hook(settlement)
            except Exception:  # a hook must never break settlement
                log.exception("settlement hook failed")

    async def note_final(self, kernel_id: str, instance_id: str, reason: str,
                         stats: dict[str, Any] | None) -> None:
        """Keep an agent's report of a kernel's end (reason, final stats) in the
        kernel's Redis hash, for whichever path ends up settling it."""
        try:
            await scripts.update_kernel(
                self.redis.kernels, kernel_id, "final_reason", reason, "final_instance",
                instance_id, "final_stats", json.dumps(stats or {}))
        except (RedisError, OSError) as exc:  # this process still settles with them
            log.warning("could not note the end of kernel %s: %s", kernel_id, exc)

    async def _sampled(self, kernel_id: str, instance_id: str | None
                       ) -> tuple[dict[str, Any], tuple[str, dict[str, Any]] | None]:
        """The last stats sampled into Redis, and (reason, final stats) when its
        agent reported the end; ({}, None) when Redis cannot say (never waits for
        Redis to come back)."""
        try:
            raw = await self.redis.kernels.hmget(
                keys.kernel(kernel_id), ["last_stats", "final_reason", "final_instance",
                                         "final_stats"])
        except (RedisError, OSError):
            return {}, None
        last, reason, reported_by, final = (v if isinstance(v, str) else None for v in raw)
        if reason and (instance_id is None or reported_by == instance_id):
            return _loads(last), (reason, _loads(final))
        return _loads(last), None

    async def _settle_row(self, kernel_id: str, status: str, reason: str,
                          stats: dict[str, Any], stats_given: bool, path: str,
                          instance_id: str | None) -> tuple[bool, Any]:
        """The settlement transaction; returns (won, the row's id/status/agent/access_key)."""
        now = datetime.now(UTC)
        conditions = [kernels.c.id == kernel_id, kernels.c.status.in_(LIVE_STATUSES)]
        if instance_id is not None:
            conditions.append(sa.or_(kernels.c.agent == instance_id, kernels.c.agent.is_(None)))
        columns = (kernels.c.access_key, kernels.c.lang, kernels.c.created_at,
                   kernels.c.agent, kernels.c.status)
        async with self.db.begin() as conn:
            result = await conn.execute(
                sa.update(kernels).where(*conditions)
                .values(status=status, terminated_at=now, termination_reason=reason[:128],
                        settled_by=path))
            row = (await conn.execute(sa.select(*columns)
                                      .where(kernels.c.id == kernel_id))).first()
            if result.rowcount != 1:
                return False, row
            assert row is not None
            if row.agent is not None or stats_given:
                await conn.execute(sa.insert(usage).values(
                    access_key=row.access_key, kernel_type=row.lang, kernel_id=kernel_id,
                    started_at=row.created_at, terminated_at=now, settled_by=path,
                    **usage_units(stats)))
            await quota.release_slot(conn, row.access_key)
            return True, row

    # --- Redis clean-up -------------------------------------------------------------
    async def clean_up(self, kernel_id: str, instance_id: str | None,
                       access_key: str | None) -> bool:
        """Remove a settled kernel's Redis entries; idempotent.  When Redis fails,
        the clean-up is kept for `retry_pending`; returns whether it is done."""
        try:
            await self._clean_redis(kernel_id, instance_id, access_key)
        except (RedisError, OSError) as exc:
            pending = self._pending_cleanups.setdefault(
                kernel_id, _PendingCleanup(instance_id, access_key))
            pending.attempts += 1
            pending.next_try = _backoff(pending.attempts)
            log.warning("Redis clean-up of kernel %s postponed: %s", kernel_id, exc)
            return False
        self._pending_cleanups.pop(kernel_id, None)
        return True

    async def _clean_redis(self, kernel_id: str, instance_id: str | None,
                           access_key: str | None) -> None:
        # The hash goes last: it names the session, so an interrupted clean-up
        # can still find it when retried.
        raw = await hash_fields(self.redis.kernels, keys.kernel(kernel_id))
        access_key = access_key or raw.get("access_key")
        token, lang = raw.get("token"), raw.get("lang")
        if token and access_key and lang:
            await scripts.release_session(self.redis.sessions, kernel_id,
                                          keys=(keys.session(access_key, lang, token),))
        now = repr(time.time())
        for iid in {instance_id, raw.get("instance")} - {None, ""}:
            await scripts.forget_kernel(self.redis.instances, iid, kernel_id, now)
        pipe = self.redis.kernels.pipeline(transaction=True)
        pipe.delete(keys.kernel(kernel_id))
        if access_key:
            pipe.srem(keys.access_key_kernels(access_key), kernel_id)
        await pipe.execute()

    # --- retries ------------------------------------------------------------------
    def _queue_settlement(self, kernel_id: str, pending: _PendingSettlement) -> None:
        previous = self._pending_settlements.get(kernel_id)
        if previous is not None:
            # keep the first final stats an agent reported
            if previous.stats is not None and pending.stats is None:
                return
            pending.attempts = previous.attempts
        pending.attempts += 1
        pending.next_try = _backoff(pending.attempts)
        self._pending_settlements[kernel_id] = pending
        log.warning("settlement of kernel %s (%s by %s) failed; will retry",
                    kernel_id, pending.status, pending.path)

    @property
    def pending_count(self) -> int:
        return len(self._pending_settlements) + len(self._pending_cleanups)

    async def retry_pending(self, *, force: bool = False) -> int:
        """Retry settlements and Redis clean-ups that failed; returns how many are
        still pending.  Called about every second by the reconciler service."""
        now = time.monotonic()
        for kernel_id, item in list(self._pending_settlements.items()):
            if not force and item.next_try > now:
                continue
            try:
                await self.settle(kernel_id, item.status, item.reason, item.stats,
                                  path=item.path, instance_id=item.instance_id)
            except STORE_ERRORS:
                continue  # re-queued by settle with a longer back-off
        for kernel_id, cleanup in list(self._pending_cleanups.items()):
            if force or cleanup.next_try <= now:
                await self.clean_up(kernel_id, cleanup.instance_id, cleanup.access_key)
        return self.pending_count
