"""Keypair activity (`last_used`, `num_queries`) written in batches.

Each authenticated request only bumps an in-memory counter; a background task
writes the accumulated counts every `interval` seconds in one transaction, and
once more at shutdown.  Counts that could not be written (database down) are
kept and retried with the next batch.
"""
from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from ..db.models import keypairs

log = logging.getLogger(__name__)


class KeypairActivity:
    def __init__(self, engine: AsyncEngine, interval: float = 3.0):
        self.engine = engine
        self.interval = interval
        self._counts: dict[str, int] = {}
        self._last_used: dict[str, datetime] = {}
        self._task: asyncio.Task[None] | None = None

    def note(self, access_key: str) -> None:
        self._counts[access_key] = self._counts.get(access_key, 0) + 1
        self._last_used[access_key] = datetime.now(UTC)

    @property
    def pending(self) -> int:
        return sum(self._counts.values())

    async def flush(self) -> int:
        """Write what has accumulated; return the number of keypairs updated."""
        if not self._counts:
            return 0
        counts, self._counts = self._counts, {}
        last_used, self._last_used = self._last_used, {}
        statement = (
            sa.update(keypairs)
            .where(keypairs.c.access_key == sa.bindparam("key"))
            .values(num_queries=keypairs.c.num_queries + sa.bindparam("count"),
                    last_used=sa.bindparam("used"))
        )
        rows = [{"key": key, "count": count, "used": last_used[key]}
                for key, count in sorted(counts.items())]
        try:
            async with self.engine.begin() as conn:
                await conn.execute(statement, rows)
        except BaseException:
            for key, count in counts.items():  # keep them for the next try
                self._counts[key] = self._counts.get(key, 0) + count
                self._last_used.setdefault(key, last_used[key])
            raise
        return len(rows)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.flush()
            except Exception as exc:  # keep going; the counts are retried
                log.warning("could not write keypair activity (%d requests kept): %s",
                            self.pending, exc)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="keypair-activity")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        try:
            await self.flush()
        except Exception as exc:
            log.warning("could not write the last keypair activity (%d requests lost): %s",
                        self.pending, exc)
