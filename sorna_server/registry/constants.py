"""Names and numbers shared by the registry modules (a leaf: it imports nothing).

Settlement paths and reconciliation rules are plain string constants so that
logs, the database (`kernels.settled_by`, `usage.settled_by`) and metrics use
the same words.
"""
from __future__ import annotations

# --- why scheduling found no agent ------------------------------------------
NO_AGENTS = "no-agents"
LANGUAGE_NOT_OFFERED = "language-not-offered"
ALL_FULL = "all-full"
ALL_DRAINING = "all-draining"
ALL_UNREACHABLE = "all-unreachable"  # the agents with room are suspect (not answering RPC)

# --- timing, in heartbeat intervals -------------------------------------------
LIVENESS_TTL_FACTOR = 3.3   # liveness key TTL
ABSENCE_GRACE_FACTOR = 1.5  # a kernel missing from (or unknown to) heartbeats this long is acted on
GRACE_PERIOD_FACTOR = 2.0   # start-up reconciliation waits this long for agents to re-announce
ABSENT_AGENT_FACTOR = 6.6   # an agent Redis does not know this long is taken for gone

# --- which path settled a kernel (kernels.settled_by, usage.settled_by) ------
SETTLED_BY_EVENT = "event"            # the agent's kernel_terminated event
SETTLED_BY_DESTROY = "destroy"        # a client's destroy request
SETTLED_BY_CREATE = "create-failed"   # the creation failed (the slot goes back)
SETTLED_BY_SWEEP = "sweep"            # the agent was lost (lost-agent sweep)
SETTLED_BY_HEARTBEAT = "heartbeat"    # the agent stopped reporting the kernel
SETTLED_BY_AGENT = "agent-lifecycle"  # the agent restarted, shut down or was revived
SETTLED_BY_RECONCILE = "reconcile"    # periodic or operator reconciliation
SETTLED_BY_ORPHAN = "orphan"          # a stale creation an agent reported
SETTLE_PATHS = (SETTLED_BY_EVENT, SETTLED_BY_DESTROY, SETTLED_BY_CREATE, SETTLED_BY_SWEEP,
                SETTLED_BY_HEARTBEAT, SETTLED_BY_AGENT, SETTLED_BY_RECONCILE, SETTLED_BY_ORPHAN)

# --- termination reasons the registry writes ------------------------------------
REASON_VANISHED = "vanished-from-agent"
REASON_RESTARTED = "agent-restarted"
REASON_ORPHANED = "orphaned"
REASON_ABANDONED = "creation-abandoned"

# --- reconciliation rules (one function each in reconcile.py) -------------------
RULE_STALE_REDIS_KERNEL = "stale-redis-kernel"
RULE_KERNEL_ON_LOST_AGENT = "kernel-on-lost-agent"
RULE_MISSING_FROM_AGENT_SET = "kernel-missing-from-agent-set"
RULE_PHANTOM_AGENT_KERNEL = "dangling-agent-kernel"
RULE_ABANDONED_CREATION = "abandoned-creation"
RULE_UNREGISTERED_RUNNING = "unregistered-running-kernel"
RULE_VANISHED_KERNEL = "vanished-kernel"
RULE_UNVERIFIABLE_KERNEL = "unverifiable-kernel"
RULE_QUOTA_DRIFT = "quota-drift"
RULE_STALE_SESSION = "stale-session"
RULE_MISSING_SESSION = "missing-session"
RECONCILE_RULES = (RULE_STALE_REDIS_KERNEL, RULE_KERNEL_ON_LOST_AGENT,
                   RULE_MISSING_FROM_AGENT_SET, RULE_PHANTOM_AGENT_KERNEL,
                   RULE_ABANDONED_CREATION, RULE_UNREGISTERED_RUNNING, RULE_VANISHED_KERNEL,
                   RULE_UNVERIFIABLE_KERNEL, RULE_QUOTA_DRIFT, RULE_STALE_SESSION,
                   RULE_MISSING_SESSION)

# Seconds a settled kernel's Redis leftovers may stay before reconciliation
# reports them (its own clean-up normally removes them within milliseconds).
CLEANUP_GRACE = 3.0
