"""The registry's value types: instances, kernels, and why scheduling failed."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .constants import ALL_DRAINING, ALL_FULL, ALL_UNREACHABLE, LANGUAGE_NOT_OFFERED, NO_AGENTS

_REASON_TEXT = {
    NO_AGENTS: "no agent is connected",
    LANGUAGE_NOT_OFFERED: "no agent offers this language",
    ALL_FULL: "every agent offering this language is full",
    ALL_DRAINING: "every agent offering this language is being drained",
    ALL_UNREACHABLE: "no agent offering this language answers right now",
}


class InstanceNotAvailable(Exception):
    """No agent can take a new kernel; `reason` is one of the constants above."""

    def __init__(self, reason: str, lang: str | None = None):
        self.reason = reason
        self.lang = lang
        text = _REASON_TEXT.get(reason, reason)
        super().__init__(f"{text} ({lang})" if lang else text)


class RegistrationFailed(Exception):
    """`register_kernel` could not register the kernel; nothing of it stays in Redis.

    `reason`: `instance-unknown`, `instance-lost` (the agent went away while the
    kernel was created) or `kernel-settled` (its DB row is no longer PREPARING,
    e.g. the kernel already terminated).  The caller treats it as a failed
    creation (settle ERROR, destroy on the agent).
    """

    def __init__(self, kernel_id: str, reason: str):
        self.kernel_id = kernel_id
        self.reason = reason
        super().__init__(f"kernel {kernel_id} not registered: {reason}")


def _float(value: Any, default: float = 0.0) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _int(value: Any, default: int = 0) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _json(value: Any, default: Any) -> Any:
    if not value:
        return default
    try:
        return json.loads(value)
    except (TypeError, ValueError):
        return default


@dataclass
class Instance:
    id: str
    addr: str
    status: str  # running | draining | lost
    max_kernels: int
    num_kernels: int
    languages: list[str]
    version: str
    last_heartbeat: float
    draining: bool
    load: int = 0  # kernels registered here + slots reserved, as the manager counts them
    first_heartbeat: float = 0.0
    cpu_count: int = 0
    mem_bytes: int = 0
    isolation: dict = field(default_factory=dict)
    interval: float = 0.0
    key: str = ""  # the CURVE public key (z85) that registered this instance; "" = plain

    @classmethod
    def from_hash(cls, instance_id: str, raw: dict[str, str]) -> Instance:
        return cls(
            id=instance_id,
            addr=raw.get("addr", ""),
            status=raw.get("status", "running"),
            max_kernels=_int(raw.get("max_kernels")),
            num_kernels=_int(raw.get("num_kernels")),
            languages=list(_json(raw.get("languages"), [])),
            version=raw.get("version", ""),
            last_heartbeat=_float(raw.get("last_heartbeat")),
            draining=raw.get("draining") == "1",
            load=_int(raw.get("load")),
            first_heartbeat=_float(raw.get("first_heartbeat")),
            cpu_count=_int(raw.get("cpu_count")),
            mem_bytes=_int(raw.get("mem_bytes")),
            isolation=dict(_json(raw.get("isolation"), {})),
            interval=_float(raw.get("interval")),
            key=raw.get("key", ""),
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class KernelRecord:
    id: str
    instance_id: str
    addr: str  # the agent's RPC address
    access_key: str
    lang: str
    stdin_port: int
    stdout_port: int
    created_at: float
    last_used: float
    num_queries: int
    limits: dict
    last_stats: dict

    @property
    def agent_host(self) -> str:
        """Host part of the agent address (the PTY ports are on that host)."""
        host = urlsplit(self.addr).hostname if "://" in self.addr else None
        if host is None:
            host = self.addr.rpartition(":")[0] or self.addr
        return host

    def to_hash(self) -> dict[str, str]:
        return {
            "instance": self.instance_id,
            "addr": self.addr,
            "access_key": self.access_key,
            "lang": self.lang,
            "stdin_port": str(self.stdin_port),
            "stdout_port": str(self.stdout_port),
            "created_at": repr(float(self.created_at)),
            "last_used": repr(float(self.last_used)),
            "num_queries": str(self.num_queries),
            "limits": json.dumps(self.limits or {}),
            "last_stats": json.dumps(self.last_stats or {}),
        }

    @classmethod
    def from_hash(cls, kernel_id: str, raw: dict[str, str]) -> KernelRecord:
        return cls(
            id=kernel_id,
            instance_id=raw.get("instance", ""),
            addr=raw.get("addr", ""),
            access_key=raw.get("access_key", ""),
            lang=raw.get("lang", ""),
            stdin_port=_int(raw.get("stdin_port")),
            stdout_port=_int(raw.get("stdout_port")),
            created_at=_float(raw.get("created_at")),
            last_used=_float(raw.get("last_used")),
            num_queries=_int(raw.get("num_queries")),
            limits=dict(_json(raw.get("limits"), {})),
            last_stats=dict(_json(raw.get("last_stats"), {})),
        )

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "agent_host": self.agent_host}
