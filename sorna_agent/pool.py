"""Warm pool: runner processes started ahead of time, one deque per language.

A pooled runner has paid interpreter start-up, its imports and its sandbox
set-up (namespaces, uid, working directory) already; `create_kernel` only
assigns it.  Taking one schedules a refill in the background.
"""
from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from .languages import Language
from .process import RunnerProcess

log = logging.getLogger(__name__)

Spawner = Callable[[Language], Coroutine[Any, Any, RunnerProcess]]
REFILL_CONCURRENCY = 2  # runners started at once per language (this many cores help)
Discarder = Callable[[RunnerProcess], Coroutine[Any, Any, None]]


class WarmPool:
    def __init__(self, languages: dict[str, Language], size: int, spawn: Spawner,
                 discard: Discarder):
        self.languages = languages
        self.size = size
        self.spawn = spawn
        self.discard = discard
        # keyed by runtime: an alias shares the runners of the language it stands for
        self.ready: dict[str, collections.deque[RunnerProcess]] = {
            lang.runtime: collections.deque() for lang in languages.values()}
        self._refills: dict[str, asyncio.Task] = {}
        self.closing = False

    def fill_all(self) -> None:
        for name in self.ready:
            self._schedule_refill(name)

    def _schedule_refill(self, name: str) -> None:
        if self.size <= 0 or self.closing:
            return
        task = self._refills.get(name)
        if task is None or task.done():
            self._refills[name] = asyncio.create_task(self._refill(name), name=f"pool-{name}")

    async def _refill(self, name: str) -> None:
        failures = 0
        queue = self.ready[name]
        while not self.closing and len(queue) < self.size:
            batch = min(self.size - len(queue), REFILL_CONCURRENCY)
            results = await asyncio.gather(
                *(self.spawn(self.languages[name]) for _ in range(batch)),
                return_exceptions=True)
            for result in results:
                if isinstance(result, asyncio.CancelledError):
                    raise result
                if isinstance(result, BaseException):
                    failures += 1
                    log.warning("warm pool: cannot start a %s runner: %s", name, result)
                    continue
                if self.closing:
                    await self.discard(result)
                    continue
                result.on_exit = self._on_pooled_exit
                queue.append(result)
            if failures >= 3:
                return
            if failures:
                await asyncio.sleep(0.5 * failures)

    def _on_pooled_exit(self, runner: RunnerProcess) -> None:
        queue = self.ready.get(runner.lang.runtime)
        if queue is not None and runner in queue:
            queue.remove(runner)
            asyncio.get_running_loop().create_task(self.discard(runner))
            self._schedule_refill(runner.lang.runtime)

    async def take(self, lang: Language) -> RunnerProcess:
        """A ready runner for `lang`: from the pool if any, else started now."""
        queue = self.ready[lang.runtime]
        runner = None
        while queue:
            candidate = queue.popleft()
            if candidate.alive:
                runner = candidate
                break
            asyncio.get_running_loop().create_task(self.discard(candidate))
        self._schedule_refill(lang.runtime)
        if runner is None:
            runner = await self.spawn(self.languages[lang.runtime])
        runner.on_exit = None
        return runner

    async def close(self) -> None:
        self.closing = True
        tasks = list(self._refills.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        runners = [runner for queue in self.ready.values() for runner in queue]
        for queue in self.ready.values():
            queue.clear()
        await asyncio.gather(*(self.discard(r) for r in runners), return_exceptions=True)
