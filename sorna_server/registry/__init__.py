"""The live registry of agents (instances) and kernels: Redis state, scheduling,
the kernel lifecycle (settlement), event intake, lost-agent sweep and
reconciliation.  See docs/redis-layout.md.

Dependencies point one way: `constants` and `records` are leaves; `scripts`,
`suspects` and `lifecycle` build on them; `registry` (the Redis state) holds a
lifecycle and the suspects; the services (`intake`, `sweeper`, `reconcile`,
`reconciler`) use a Registry and are started by the application.
"""
from .constants import ALL_DRAINING, ALL_FULL, ALL_UNREACHABLE, LANGUAGE_NOT_OFFERED, NO_AGENTS
from .lifecycle import KernelLifecycle, QuotaFull, Settlement, usage_units
from .records import Instance, InstanceNotAvailable, KernelRecord, RegistrationFailed
from .registry import Registry, open_registry

__all__ = [
    "Registry", "Instance", "KernelRecord", "InstanceNotAvailable", "RegistrationFailed",
    "KernelLifecycle", "QuotaFull", "Settlement", "NO_AGENTS", "LANGUAGE_NOT_OFFERED",
    "ALL_FULL", "ALL_DRAINING", "ALL_UNREACHABLE", "usage_units", "open_registry",
]
