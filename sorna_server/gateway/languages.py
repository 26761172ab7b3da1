"""`GET /languages` (signed): the languages the live agents offer.

Read from the registry's instance records: every agent that is alive (its
liveness key is present) and not lost counts.  Aliases, runtime versions and
default limits come from the optional `language_info` an agent reports in its
heartbeat (docs/agent-protocol.md); without it a language is listed with no
aliases or versions and the gateway's configured agent defaults as limits.
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .. import redis_keys
from ..config import SornaConfig
from ..registry import Instance
from . import keys
from .responses import LanguageLimits, LanguageOffer, Languages

LANGUAGE_INFO_FIELD = "language_info"  # instance hash field, when the registry stores it
_LIMIT_NAMES = {"max_mem": "maxMem", "exec_timeout": "execTimeout", "max_procs": "maxProcs",
                "max_output": "maxOutput"}
_WHOLE_NUMBERS = {"maxMem", "maxProcs", "maxOutput"}


@dataclass
class _Offer:
    aliases: set[str] = field(default_factory=set)
    versions: set[str] = field(default_factory=set)
    limits: dict[str, Any] | None = None
    agents: set[str] = field(default_factory=set)
    accepting: set[str] = field(default_factory=set)


def _described(info: dict[str, Any], name: str) -> dict[str, Any]:
    entry = info.get(name)
    return entry if isinstance(entry, dict) else {}


def _limits(reported: Any) -> dict[str, Any] | None:
    if not isinstance(reported, dict):
        return None
    limits: dict[str, Any] = {}
    for key, value in reported.items():
        if isinstance(key, str) and isinstance(value, (int, float)) \
                and not isinstance(value, bool):
            name = _LIMIT_NAMES.get(key, key)
            limits[name] = int(value) if name in _WHOLE_NUMBERS else value
    return limits or None


def language_offers(agents: Iterable[tuple[Instance, dict[str, Any]]],
                    config: SornaConfig) -> list[LanguageOffer]:
    """Group (agent, its language_info) pairs by language, aliases folded in."""
    offers: dict[str, _Offer] = {}
    for agent, info in agents:
        for name in agent.languages:
            described = _described(info, name)
            target = described.get("alias_of")
            canonical = target if isinstance(target, str) and target else name
            offer = offers.setdefault(canonical, _Offer())
            if canonical != name:
                offer.aliases.add(name)
                described = _described(info, canonical)
            if isinstance(described.get("version"), str):
                offer.versions.add(described["version"])
            if offer.limits is None:
                offer.limits = _limits(described.get("limits"))
            offer.agents.add(agent.id)
            if not agent.draining:
                offer.accepting.add(agent.id)
    defaults = {"maxMem": config.agent_max_mem, "execTimeout": config.agent_exec_timeout}
    return [LanguageOffer(name=name, aliases=sorted(offer.aliases),
                          versions=sorted(offer.versions),
                          defaultLimits=LanguageLimits(**(offer.limits or defaults)),
                          agents=len(offer.agents), accepting=len(offer.accepting))
            for name, offer in sorted(offers.items())]


async def live_agents(app: web.Application) -> list[tuple[Instance, dict[str, Any]]]:
    """Live, non-lost agents with their reported language_info (may be empty)."""
    registry = app[keys.REGISTRY]
    known = [i for i in await registry.list_instances() if i.status != "lost"]
    alive = await asyncio.gather(*(registry.is_alive(i.id) for i in known))
    agents = [i for i, up in zip(known, alive, strict=True) if up]
    if not agents:
        return []
    pipe = app[keys.REDIS].instances.pipeline(transaction=False)
    for agent in agents:
        pipe.hget(redis_keys.instance(agent.id), LANGUAGE_INFO_FIELD)
    infos: list[Any] = []
    for raw in await pipe.execute():
        try:
            info = json.loads(raw) if raw else {}
        except ValueError:
            info = {}
        infos.append(info if isinstance(info, dict) else {})
    return list(zip(agents, infos, strict=True))


async def languages(request: web.Request) -> web.Response:
    offers = language_offers(await live_agents(request.app), request.app[keys.CONFIG])
    return web.json_response(Languages(languages=offers).model_dump(exclude_none=True))
