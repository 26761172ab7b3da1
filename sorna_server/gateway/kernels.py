"""Kernel lifecycle as the gateway drives it (shared by the HTTP routes and the
legacy ZMQ interface).

Create (get-or-create by the key's client session token and language):

1. bind the session to a fresh kernel id in Redis (`claim_session`); when
   another request bound it first, wait for that kernel and return it;
2. in ONE database transaction take a concurrency slot and insert the kernel
   row (PREPARING) — 412 when the keypair is at its limit (`lifecycle.open`);
3. let the registry pick (and reserve a slot on) the least-loaded agent;
4. ask that agent to start the kernel (RPC `create_kernel`); an agent that
   does not answer is marked suspect and steps 3-4 run once more;
5. register the kernel (Redis + DB row RUNNING, `lifecycle.register`).

Any failure after step 2 settles the kernel as ERROR in the database first
(the quota slot goes back even when Redis is down), then gives the agent slot
and the session back.  Calls to a kernel whose agent does not answer get 503
instance-not-available.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from .. import agent_protocol as proto
from ..agent_client import AgentError, AgentRPCClient, AgentTimeout, AgentUnreachable
from ..config import SornaConfig
from ..db.models import LIVE_STATUSES, KernelStatus, kernels
from ..registry import InstanceNotAvailable as NoInstance
from ..registry import KernelRecord, QuotaFull, RegistrationFailed, Registry
from ..registry.constants import SETTLED_BY_CREATE, SETTLED_BY_DESTROY
from ..registry.lifecycle import STORE_ERRORS, creation_rpc_timeout
from . import errors

log = logging.getLogger(__name__)

SESSION_WAIT_POLL = 0.05
RECORD_CACHE_TTL = 2.0  # seconds a kernel record may be reused for execute/upload
RECORD_CACHE_SIZE = 10000
ROW_GRACE = 2.0  # seconds a bound session may point at a kernel without a DB row
CREATE_ATTEMPTS = 4
EXEC_MARGIN = 3.0
UNREACHABLE_RETRIES = 1  # a create whose agent does not answer tries one other agent
AGENT_UNREACHABLE_REASON = "agent-unreachable"


def agent_error_fields(exc: AgentError) -> dict[str, Any]:
    return {"agentError": exc.as_dict()}


class QueryCounter:
    """Kernels' `num_queries`/`last_used`, written to Redis in batches.

    A query is sent at once when no write is in flight (so a lone execute is
    counted before its reply), else it joins the next write, which carries
    everything counted meanwhile in one script call: under load the Redis
    writes per execute drop well below one.  `landed(id)` waits until the
    queries counted so far for a kernel are written, so this gateway never
    reports a stale count; another gateway may lag by one write.
    """

    def __init__(self, registry: Registry):
        self.registry = registry
        self._pending: dict[str, int] = {}
        self._writing: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None

    def count(self, kernel_id: str) -> None:
        self._pending[kernel_id] = self._pending.get(kernel_id, 0) + 1
        if self._task is None:
            self._task = asyncio.create_task(self._write(), name="kernel-query-counts")

    async def landed(self, kernel_id: str) -> None:
        while self._task is not None and (kernel_id in self._pending
                                          or kernel_id in self._writing):
            await asyncio.shield(self._task)

    async def _write(self) -> None:
        try:
            while self._pending:
                self._writing, self._pending = self._pending, {}
                try:
                    await self.registry.touch_kernels(self._writing)
                except Exception as exc:  # bookkeeping must not fail the queries
                    log.warning("could not count %d queries: %s",
                                sum(self._writing.values()), exc)
                finally:
                    self._writing = {}
        finally:
            self._task = None

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


class KernelService:
    def __init__(self, config: SornaConfig, db: AsyncEngine, registry: Registry,
                 rpc: AgentRPCClient):
        self.config = config
        self.db = db
        self.registry = registry
        self.lifecycle = registry.lifecycle
        self.rpc = rpc
        self.create_timeout = creation_rpc_timeout(config)
        self._port_watchers: dict[str, set[asyncio.Event]] = defaultdict(set)
        self._background: set[asyncio.Task[Any]] = set()
        self._records: dict[str, tuple[float, KernelRecord]] = {}
        self.queries = QueryCounter(registry)

    # --- lookup -------------------------------------------------------------
    async def get_owned(self, access_key: str, kernel_id: str, *,
                        fresh: bool = True) -> KernelRecord:
        """The kernel if it exists and belongs to `access_key`; else kernel-not-found.

        `fresh=False` may answer from a short-lived local copy (owner, agent and
        limits of a kernel never change; a kernel that ended meanwhile is
        reported by its agent as not found).
        """
        if not fresh:
            cached = self._records.get(kernel_id)
            if cached is not None and cached[0] > time.monotonic():
                record = cached[1]
                if record.access_key != access_key:
                    raise errors.KernelNotFound(f"No kernel {kernel_id!r} for this access key.")
                return record
        else:
            await self.queries.landed(kernel_id)
        found = await self.registry.get_kernel(kernel_id) if _plausible_id(kernel_id) else None
        if found is None and _plausible_id(kernel_id):
            found = await self._from_database(kernel_id, access_key)
        if found is None or found.access_key != access_key:
            raise errors.KernelNotFound(f"No kernel {kernel_id!r} for this access key.")
        record = found
        if len(self._records) >= RECORD_CACHE_SIZE:
            self._records.clear()
        self._records[kernel_id] = (time.monotonic() + RECORD_CACHE_TTL, record)
        return record

    def forget(self, kernel_id: str) -> None:
        self._records.pop(kernel_id, None)

    async def _from_database(self, kernel_id: str, access_key: str) -> KernelRecord | None:
        """A kernel Redis does not hold (yet): a live row of this key is never
        answered 404.  A RUNNING row on a registered agent is served from the
        row (Redis is re-synced by the heartbeat and reconciliation); otherwise
        the client is told to retry (503)."""
        async with self.db.connect() as conn:
            row = (await conn.execute(
                sa.select(kernels.c.status, kernels.c.agent, kernels.c.lang,
                          kernels.c.created_at)
                .where(kernels.c.id == kernel_id, kernels.c.access_key == access_key))).first()
        if row is None or row.status not in LIVE_STATUSES:
            return None
        instance = await self.registry.get_instance(row.agent) if row.agent else None
        if row.status != KernelStatus.RUNNING.value or instance is None \
                or instance.status == "lost":
            raise errors.ServiceUnavailable(
                "The kernel exists but the registry is re-synchronising it; retry.")
        created = row.created_at.timestamp() if row.created_at is not None else time.time()
        return KernelRecord(
            id=kernel_id, instance_id=instance.id, addr=instance.addr, access_key=access_key,
            lang=row.lang, stdin_port=0, stdout_port=0, created_at=created,
            last_used=time.time(), num_queries=0, limits={}, last_stats={})

    # --- create -------------------------------------------------------------
    async def get_or_create(self, access_key: str, lang: str, token: str | None,
                            limits: dict[str, Any] | None = None,
                            mounts: list[str] | None = None) -> tuple[KernelRecord, bool]:
        """Return (kernel, created)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.create_timeout
        for _ in range(CREATE_ATTEMPTS):
            kernel_id = uuid.uuid4().hex
            if token is not None:
                bound = await self.registry.claim_session(access_key, token, lang, kernel_id)
                if bound is not None and bound != kernel_id:
                    record = await self._wait_for_kernel(bound, access_key, deadline)
                    if record is not None:
                        return record, False
                    # a stale session (its kernel has ended): unbind it and retry
                    await self.registry.release_session(access_key, token, lang, bound)
                    continue
            return await self._create(access_key, lang, token, limits, mounts, kernel_id), True
        raise errors.KernelCreationFailed("The client session kept changing; retry.")

    async def _wait_for_kernel(self, kernel_id: str, access_key: str,
                               deadline: float) -> KernelRecord | None:
        """Wait while another request creates the kernel bound to the session.

        None means the session is stale (its kernel ended or never got a row).
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        while True:
            record = await self.registry.get_kernel(kernel_id)
            if record is not None:
                return record if record.access_key == access_key else None
            async with self.db.connect() as conn:
                status = (await conn.execute(
                    sa.select(kernels.c.status).where(kernels.c.id == kernel_id))).scalar()
            if status == KernelStatus.RUNNING.value:
                # the DB row turns RUNNING a moment after Redis has the kernel
                return await self.registry.get_kernel(kernel_id)
            if status is not None and status != KernelStatus.PREPARING.value:
                return None
            if status is None and loop.time() - started > ROW_GRACE:
                return None
            if loop.time() > deadline:
                raise errors.KernelCreationFailed(
                    "Another request is still creating the kernel for this session.")
            await asyncio.sleep(SESSION_WAIT_POLL)

    async def _create(self, access_key: str, lang: str, token: str | None,
                      limits: dict[str, Any] | None, mounts: list[str] | None,
                      kernel_id: str) -> KernelRecord:
        try:
            await self.lifecycle.open(kernel_id, access_key, lang)
        except BaseException as exc:
            await self._release_session(access_key, token, lang, kernel_id)
            if isinstance(exc, QuotaFull):
                raise errors.QuotaExceeded(
                    "All concurrency slots of this access key are in use; "
                    "destroy a kernel first.") from None
            raise
        attempt = _CreateAttempt(kernel_id, access_key, lang, token)
        try:
            return await self._start_on_agent(attempt, limits, mounts)
        except BaseException as exc:
            reason = exc.name if isinstance(exc, errors.Problem) else "creation-failed"
            await self._abort(attempt, reason)
            raise

    async def _start_on_agent(self, attempt: _CreateAttempt, limits: dict[str, Any] | None,
                              mounts: list[str] | None) -> KernelRecord:
        """Schedule, ask the agent, register; an agent that does not answer is
        marked suspect and the creation tries once more on another agent."""
        args: dict[str, Any] = {"lang": attempt.lang, "kernel_id": attempt.kernel_id}
        if limits:
            args["limits"] = limits
        if mounts:
            args["mounts"] = list(mounts)
        for tries_left in range(UNREACHABLE_RETRIES, -1, -1):
            try:
                instance = await self.registry.schedule(attempt.lang, attempt.access_key)
            except NoInstance as exc:
                raise errors.InstanceNotAvailable(
                    _no_instance_text(exc.reason, attempt.lang), reason=exc.reason,
                    retry_after=1) from None
            attempt.instance_id = instance.id
            try:
                result = await self.rpc.call(instance.addr, "create_kernel", args,
                                             timeout=self.create_timeout)
            except AgentError as exc:
                if isinstance(exc, AgentTimeout):
                    self._in_background(self._destroy_quietly(instance.addr, attempt.kernel_id))
                if _unanswered(exc):
                    await self.registry.suspects.mark(instance.id, instance.addr)
                    await self._unreserve(attempt)
                    if tries_left:
                        continue
                    raise _agent_unavailable(exc) from None
                raise _creation_problem(exc) from None
            return await self._register(attempt, instance, result)
        raise AssertionError("unreachable")  # the loop returns or raises

    async def _register(self, attempt: _CreateAttempt, instance: Any,
                        result: dict[str, Any]) -> KernelRecord:
        now = time.time()
        record = KernelRecord(
            id=attempt.kernel_id, instance_id=instance.id, addr=instance.addr,
            access_key=attempt.access_key, lang=attempt.lang,
            stdin_port=int(result["stdin_port"]), stdout_port=int(result["stdout_port"]),
            created_at=now, last_used=now, num_queries=0,
            limits=dict(result.get("limits") or {}), last_stats={})
        try:
            await self.lifecycle.register(record, attempt.token)
        except BaseException as exc:
            if not (isinstance(exc, RegistrationFailed) and exc.reason.startswith("instance-")):
                # the reservation may be consumed already; an unused one expires
                attempt.reserved = False
            self._in_background(self._destroy_quietly(instance.addr, attempt.kernel_id))
            if isinstance(exc, RegistrationFailed):
                # the agent was found lost, or the creation abandoned, meanwhile: retry
                raise errors.InstanceNotAvailable(
                    f"The agent went away while the kernel was created ({exc.reason}); "
                    "retry.", reason=exc.reason) from None
            raise
        return record

    async def _unreserve(self, attempt: _CreateAttempt) -> None:
        instance_id, attempt.instance_id = attempt.instance_id, None
        if instance_id is None or not attempt.reserved:
            return
        try:
            await self.registry.unreserve(instance_id)
        except Exception as exc:  # an unused reservation expires by itself
            log.warning("could not give back the slot reserved on %s: %s", instance_id, exc)

    async def _abort(self, attempt: _CreateAttempt, reason: str) -> None:
        """Undo a failed creation: the quota slot first (the database alone, so it
        goes back even when Redis is down), then the agent slot and the session."""
        try:
            await self.lifecycle.settle(attempt.kernel_id, KernelStatus.ERROR.value, reason,
                                        path=SETTLED_BY_CREATE, instance_id=attempt.instance_id,
                                        use_sampled=False)
        except Exception as exc:  # queued by the lifecycle and retried
            log.error("could not settle failed kernel %s (%s): %s", attempt.kernel_id, reason,
                      exc)
        await self._unreserve(attempt)
        await self._release_session(attempt.access_key, attempt.token, attempt.lang,
                                    attempt.kernel_id)

    async def _release_session(self, access_key: str, token: str | None, lang: str,
                               kernel_id: str) -> None:
        if token is None:
            return
        try:
            await self.registry.release_session(access_key, token, lang, kernel_id)
        except Exception as exc:
            log.warning("could not release session of kernel %s: %s", kernel_id, exc)

    async def _destroy_quietly(self, addr: str, kernel_id: str) -> None:
        try:
            await self.rpc.call(addr, "destroy_kernel",
                                {"kernel_id": kernel_id, "reason": "creation-failed"})
        except AgentError as exc:
            log.info("cleanup destroy of kernel %s: %s", kernel_id, exc)

    def _in_background(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- operations on a kernel -----------------------------------------------
    async def destroy(self, record: KernelRecord) -> None:
        self.forget(record.id)
        try:
            stats = await self._call(record, "destroy_kernel",
                                     {"kernel_id": record.id, "reason": proto.REASON_DESTROYED},
                                     self.config.agent_rpc_timeout)
        except AgentError as exc:
            if exc.type != proto.ERR_KERNEL_NOT_FOUND:
                raise errors.KernelDestructionFailed(**agent_error_fields(exc)) from None
            stats = None  # already gone on the agent: settle with the last known stats
        try:
            await self.lifecycle.settle(record.id, KernelStatus.TERMINATED.value,
                                        proto.REASON_DESTROYED,
                                        stats if isinstance(stats, dict) else None,
                                        path=SETTLED_BY_DESTROY, instance_id=record.instance_id)
        except STORE_ERRORS as exc:
            # The kernel is gone on its agent; the settlement is kept with its final
            # stats and retried (reconciliation settles it if this process dies).
            log.warning("destroyed kernel %s; its settlement is postponed: %s", record.id, exc)
        self._notify_ports(record.id)

    async def _call(self, record: KernelRecord, method: str, args: dict[str, Any],
                    timeout: float) -> Any:
        """An RPC to the agent running `record`.  An agent that does not answer is
        marked suspect and the client gets 503 instance-not-available (at once
        while it stays suspect); agent errors are raised as they are."""
        suspects = self.registry.suspects
        if suspects.is_suspect(record.instance_id):
            raise errors.InstanceNotAvailable(
                f"The agent running kernel {record.id} does not answer right now; retry.",
                reason=AGENT_UNREACHABLE_REASON, retry_after=1)
        try:
            return await self.rpc.call(record.addr, method, args, timeout=timeout)
        except AgentError as exc:
            if not _unanswered(exc):
                raise
            await suspects.mark(record.instance_id, record.addr)
            raise _agent_unavailable(exc) from None

    async def restart(self, record: KernelRecord) -> KernelRecord:
        try:
            result = await self._call(record, "restart_kernel", {"kernel_id": record.id},
                                      self.create_timeout)
        except AgentError as exc:
            if exc.type == proto.ERR_KERNEL_NOT_FOUND:
                raise errors.KernelNotFound(**agent_error_fields(exc)) from None
            raise errors.KernelRestartFailed(**agent_error_fields(exc)) from None
        record.stdin_port = int(result["stdin_port"])
        record.stdout_port = int(result["stdout_port"])
        await self.registry.update_ports(record.id, record.stdin_port, record.stdout_port)
        self._notify_ports(record.id)
        return record

    def exec_deadline(self, record: KernelRecord, mode: str) -> float:
        exec_timeout = float(record.limits.get("exec_timeout") or self.config.agent_exec_timeout)
        runs = 2 if mode == "batch" else 1  # a batch run may build, then execute
        return exec_timeout * runs + max(EXEC_MARGIN, exec_timeout * 0.1)

    async def execute(self, record: KernelRecord, mode: str, code: str,
                      opts: dict[str, Any] | None) -> dict[str, Any]:
        # counted concurrently with the run (see QueryCounter)
        self.queries.count(record.id)
        try:
            result = await self._call(
                record, "execute",
                {"kernel_id": record.id, "mode": mode, "code": code, "opts": opts or {}},
                self.exec_deadline(record, mode))
        except AgentError as exc:
            if exc.type == proto.ERR_KERNEL_NOT_FOUND:
                self.forget(record.id)
                raise errors.KernelNotFound(**agent_error_fields(exc)) from None
            if exc.type == proto.ERR_INVALID_ARGS:
                raise errors.InvalidAPIParameters(exc.message, **agent_error_fields(exc)) \
                    from None
            raise errors.KernelExecutionFailed(**agent_error_fields(exc)) from None
        return result

    async def upload(self, record: KernelRecord, name: str, data: bytes) -> None:
        try:
            await self._call(record, "upload_file",
                             {"kernel_id": record.id, "name": name, "data": data},
                             self.config.agent_rpc_timeout)
        except AgentError as exc:
            if exc.type == proto.ERR_KERNEL_NOT_FOUND:
                raise errors.KernelNotFound(**agent_error_fields(exc)) from None
            if exc.type == proto.ERR_INVALID_ARGS:
                raise errors.InvalidAPIParameters(exc.message, **agent_error_fields(exc)) \
                    from None
            raise errors.KernelExecutionFailed(**agent_error_fields(exc)) from None

    async def resize_pty(self, record: KernelRecord, rows: int, cols: int) -> None:
        await self._call(record, "resize_pty",
                         {"kernel_id": record.id, "rows": rows, "cols": cols},
                         self.config.agent_rpc_timeout)

    # --- PTY bridges wait for port changes and ends ----------------------------
    def watch_ports(self, kernel_id: str) -> asyncio.Event:
        event = asyncio.Event()
        self._port_watchers[kernel_id].add(event)
        return event

    def unwatch_ports(self, kernel_id: str, event: asyncio.Event) -> None:
        watchers = self._port_watchers.get(kernel_id)
        if watchers is not None:
            watchers.discard(event)
            if not watchers:
                del self._port_watchers[kernel_id]

    def _notify_ports(self, kernel_id: str) -> None:
        for event in self._port_watchers.get(kernel_id, ()):
            event.set()

    async def close(self) -> None:
        await self.queries.close()
        tasks = list(self._background)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class _CreateAttempt:
    kernel_id: str
    access_key: str
    lang: str
    token: str | None
    instance_id: str | None = None  # the agent a slot is reserved on
    reserved: bool = True           # False once registration may have consumed it


def _unanswered(exc: AgentError) -> bool:
    """The agent did not answer at all (as opposed to answering with an error)."""
    return isinstance(exc, (AgentUnreachable, AgentTimeout))


def _agent_unavailable(exc: AgentError) -> errors.InstanceNotAvailable:
    return errors.InstanceNotAvailable("The agent does not answer right now; retry.",
                                       reason=AGENT_UNREACHABLE_REASON, retry_after=1,
                                       **agent_error_fields(exc))


def _creation_problem(exc: AgentError) -> errors.Problem:
    if exc.type == proto.ERR_NO_CAPACITY:
        return errors.InstanceNotAvailable("The chosen agent has no free slot; retry.",
                                           reason="all-full", retry_after=1,
                                           **agent_error_fields(exc))
    if exc.type == proto.ERR_INVALID_ARGS:
        return errors.InvalidAPIParameters(exc.message, **agent_error_fields(exc))
    return errors.KernelCreationFailed(**agent_error_fields(exc))


def _plausible_id(kernel_id: str) -> bool:
    return 0 < len(kernel_id) <= 64 and kernel_id.replace("-", "").isalnum()


def _no_instance_text(reason: str, lang: str) -> str:
    return {
        "no-agents": "No agent is running.",
        "language-not-offered": f"No agent offers the language {lang!r}.",
        "all-full": "Every agent that offers this language is full; retry later.",
        "all-draining": "Every agent that offers this language is being drained.",
        "all-unreachable": "No agent that offers this language answers right now; retry.",
    }.get(reason, f"No agent can run {lang!r} now ({reason}).")
