"""Every Redis key name Sorna uses, in one place (see docs/redis-layout.md).

Keys live in four logical databases whose numbers come from the config
(`redis_db_kernels`, `redis_db_instances`, `redis_db_sessions`,
`redis_db_ratelimit`).  The Lua scripts of the registry build key names from
the prefixes below, so a rename here renames them everywhere.

All scheduling state (instance hashes, their kernel sets, reservations,
liveness keys and the per-language candidate sets) lives in the *instances*
database, because one Lua script must see all of it at once.
"""
from __future__ import annotations

# --- database "kernels" (default 1) ---------------------------------------
KERNEL_PREFIX = "kernel:"
"""Hash per kernel: instance, addr, access_key, lang, stdin_port, stdout_port,
created_at, registered_at, last_used, num_queries, limits (JSON), last_stats
(JSON), token (client session token, when the kernel was created for one)."""

ACCESS_KEY_KERNELS_PREFIX = "access_key_kernels:"
"""Set of kernel ids per access key (an index for listings)."""

# --- database "instances" (default 2) -------------------------------------
INSTANCE_PREFIX = "instance:"
"""Hash per agent: addr, status (running | draining | lost), draining (0/1),
max_kernels, num_kernels (as the agent reports it), load (kernels + reserved
slots, as the manager counts it), languages (JSON list), version, cpu_count,
mem_bytes, isolation (JSON), interval, first_heartbeat, last_heartbeat, lost_at."""

INSTANCE_KERNELS_SUFFIX = ":kernels"
"""instance:<id>:kernels — set of the kernel ids registered on the agent."""

INSTANCE_RESERVED_SUFFIX = ":reserved"
"""instance:<id>:reserved — sorted set of slot reservations (member = random
token, score = expiry time); a reservation turns into a kernel-set member on
register, is given back by unreserve, or expires."""

INSTANCE_ALIVE_SUFFIX = ":alive"
"""instance:<id>:alive — liveness key, TTL about 3.3 heartbeat intervals."""

INSTANCE_MISSING_SUFFIX = ":missing"
"""instance:<id>:missing — hash kernel id -> time the agent first failed to
report a kernel the registry holds (settled when it stays missing)."""

INSTANCE_UNKNOWN_SUFFIX = ":unknown"
"""instance:<id>:unknown — hash kernel id -> time the agent first reported a
kernel the registry does not hold (adopted or destroyed when it stays)."""

INSTANCE_SUSPECT_SUFFIX = ":suspect"
"""instance:<id>:suspect — set (with a TTL of a few heartbeat intervals) when an
RPC to the agent failed for want of an answer: scheduling skips the agent until
it answers again (the key is deleted) or is found lost."""

INSTANCES = "instances"
"""Set of every known instance id (lost ones included, until forgotten)."""

AGENT_KEYS = "agent-keys"
"""Hash: agent RPC address -> CURVE public key (z85, "" without keys) of the agent
that last registered with that address; gateways connect to it with that key."""

AGENT_ADDRS = "agent-addrs"
"""Hash: agent RPC address -> the instance id holding it.  Another instance id
may register that address only once the holder is lost or forgotten."""

SCHED_LIVE = "sched:live"
"""Set of instance ids that are not lost."""

SCHED_DRAINING = "sched:draining"
"""Set of instance ids being drained."""

SCHED_OFFER_PREFIX = "sched:offer:"
"""sched:offer:<lang> — set of non-lost instances offering the language."""

SCHED_OPEN_PREFIX = "sched:open:"
"""sched:open:<lang> — set of non-lost, non-draining instances offering it."""

SCHED_FREE_PREFIX = "sched:free:"
"""sched:free:<lang> — sorted set of scheduling candidates: non-lost,
non-draining instances offering the language with at least one free slot,
scored by load / max_kernels (lowest first)."""

SWEEP_CLAIM = "claim:sweep"
"""SET NX PX claim: the gateway process that holds it runs this round of the
lost-agent sweep."""

RECONCILE_CLAIM = "claim:reconcile"
"""SET NX PX lease: the gateway process that holds it runs this period's
reconciliation pass (the others skip it)."""

RECONCILE_ABSENT_AGENTS = "reconcile:absent-agents"
"""Hash agent id -> time reconciliation first found live kernels on an agent
Redis does not know (after a Redis restart every agent is unknown until its
next heartbeat); their kernels are settled only once it stays unknown."""

REVIVE_CLAIM_PREFIX = "claim:revive:"
"""claim:revive:<instance id> — one process resets a revived agent."""

# --- database "sessions" (default 3) --------------------------------------
SESSION_PREFIX = "session:"
"""session:<access_key>:<lang>:<client session token> -> kernel id."""

# --- database "ratelimit" (default 4): owned by the gateway -----------------
RATELIMIT_PREFIX = "ratelimit:"
"""ratelimit:<access_key> — sorted set of the requests counted in the rolling
window (member = unique request tag, score = arrival time in ms; a gateway's
lease of several slots adds `<tag>:1` .. `<tag>:n` at once, see
`sorna_server.gateway.ratelimit`); expires one window after the last request."""


REPLAY_PREFIX = "replay:"
"""replay:<first 32 hex digits of a request signature> — a signature already
used (string, SET NX with a TTL running until the request's date leaves the
15-minute window), checked and set in the rate-limit script; see
`sorna_server.gateway.ratelimit` and docs/security.md."""


def ratelimit(access_key: str) -> str:
    return RATELIMIT_PREFIX + access_key


def replay(signature_prefix: str) -> str:
    return REPLAY_PREFIX + signature_prefix


def kernel(kernel_id: str) -> str:
    return KERNEL_PREFIX + kernel_id


def access_key_kernels(access_key: str) -> str:
    return ACCESS_KEY_KERNELS_PREFIX + access_key


def instance(instance_id: str) -> str:
    return INSTANCE_PREFIX + instance_id


def instance_kernels(instance_id: str) -> str:
    return INSTANCE_PREFIX + instance_id + INSTANCE_KERNELS_SUFFIX


def instance_reserved(instance_id: str) -> str:
    return INSTANCE_PREFIX + instance_id + INSTANCE_RESERVED_SUFFIX


def instance_alive(instance_id: str) -> str:
    return INSTANCE_PREFIX + instance_id + INSTANCE_ALIVE_SUFFIX


def instance_suspect(instance_id: str) -> str:
    return INSTANCE_PREFIX + instance_id + INSTANCE_SUSPECT_SUFFIX


def sched_free(lang: str) -> str:
    return SCHED_FREE_PREFIX + lang


def revive_claim(instance_id: str) -> str:
    return REVIVE_CLAIM_PREFIX + instance_id


def session(access_key: str, lang: str, token: str) -> str:
    return f"{SESSION_PREFIX}{access_key}:{lang}:{token}"
