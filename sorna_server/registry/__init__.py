"""The live registry of agents (instances) and kernels: Redis state, scheduling,
event intake, settlement and lost-agent handling.  See docs/redis-layout.md."""
from .records import (
    ALL_DRAINING,
    ALL_FULL,
    LANGUAGE_NOT_OFFERED,
    NO_AGENTS,
    Instance,
    InstanceNotAvailable,
    KernelRecord,
    RegistrationFailed,
)
from .registry import Registry, open_registry, usage_units

__all__ = [
    "Registry", "Instance", "KernelRecord", "InstanceNotAvailable", "RegistrationFailed",
    "NO_AGENTS", "LANGUAGE_NOT_OFFERED", "ALL_FULL", "ALL_DRAINING", "usage_units", "open_registry",
]
