"""Readiness checks, shared by `GET /readyz` and `sorna health`.

Three checks, run concurrently, each bounded by `timeout` seconds:

- `database`: `SELECT 1` answers;
- `redis`: `PING` answers;
- `agents`: at least one agent is alive (liveness key present), not lost and
  not draining, so new kernels can be created (being momentarily full does not
  fail the check; the detail says how many slots are free).
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from .redis_conn import RedisClients
    from .registry import Registry

CHECK_TIMEOUT = 2.0
CHECK_NAMES = ("database", "redis", "agents")


@dataclass
class CheckResult:
    name: str
    ok: bool
    detail: str
    latency_ms: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "detail": self.detail, "latency_ms": round(self.latency_ms, 2)}


@dataclass
class HealthReport:
    checks: list[CheckResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    @property
    def failed(self) -> list[str]:
        return [check.name for check in self.checks if not check.ok]

    def as_dict(self) -> dict[str, Any]:
        return {"status": "ready" if self.ok else "unavailable", "failed": self.failed,
                "checks": {check.name: check.as_dict() for check in self.checks}}


async def _timed(name: str, probe: Callable[[], Awaitable[str]], timeout: float) -> CheckResult:
    started = time.perf_counter()
    try:
        detail = await asyncio.wait_for(probe(), timeout)
        ok = True
    except TimeoutError:
        ok, detail = False, f"no answer within {timeout:g} s"
    except Exception as exc:  # a failed check is a result, whatever the driver raised
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        ok, detail = False, f"{type(exc).__name__}: {text}"[:300]
    return CheckResult(name, ok, detail, (time.perf_counter() - started) * 1000)


async def database_ok(engine: AsyncEngine) -> str:
    import sqlalchemy as sa

    async with engine.connect() as conn:
        await conn.execute(sa.text("SELECT 1"))
    return "answers"


async def redis_ok(redis: RedisClients) -> str:
    await redis.kernels.ping()
    return "answers"


async def agents_ok(registry: Registry) -> str:
    instances = await registry.list_instances()
    candidates = [i for i in instances if i.status == "running" and not i.draining]
    alive = [i for i, up in zip(candidates, await asyncio.gather(
        *(registry.is_alive(i.id) for i in candidates)), strict=True) if up]
    if not alive:
        lost = sum(1 for i in instances if i.status == "lost")
        draining = sum(1 for i in instances if i.draining and i.status != "lost")
        raise LookupError(f"no live agent takes kernels ({len(instances)} known: {lost} lost, "
                          f"{draining} draining)")
    free = sum(max(i.max_kernels - i.load, 0) for i in alive)
    return f"{len(alive)} live agent(s), {free} free kernel slot(s)"


async def readiness(*, engine: AsyncEngine | None, redis: RedisClients | None,
                    registry: Registry | None, timeout: float = CHECK_TIMEOUT,
                    missing: dict[str, str] | None = None) -> HealthReport:
    """Run the checks; a component given as None fails with `missing[name]` as detail."""
    missing = missing or {}
    probes: dict[str, Callable[[], Awaitable[str]] | None] = {
        "database": (lambda: database_ok(engine)) if engine is not None else None,
        "redis": (lambda: redis_ok(redis)) if redis is not None else None,
        "agents": (lambda: agents_ok(registry)) if registry is not None else None,
    }
    results = await asyncio.gather(*(
        _timed(name, probe, timeout) if probe is not None else _skipped(name, missing)
        for name, probe in probes.items()))
    return HealthReport(list(results))


async def _skipped(name: str, missing: dict[str, str]) -> CheckResult:
    return CheckResult(name, False, missing.get(name, "not configured"))
