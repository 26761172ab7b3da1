"""Every Prometheus metric of the gateway, in one leaf module (README: "Metrics").

Counters and histograms are process-wide objects that code anywhere in the
server increments: `metrics.child(metrics.CREATES_REFUSED, "quota").inc()`.
With several worker processes (`--workers N`) the server runs
prometheus_client's multiprocess mode: `PROMETHEUS_MULTIPROC_DIR` is set by the
supervisor before the workers start, each worker writes its values to files
there, and a scrape of any worker adds up all of them.

Values that already live in the registry (kernels by state and language,
agents by state, each agent's load) are not kept here: `scrape_families()`
turns a snapshot read at scrape time into metric families, so they are always
true and never double-counted across workers or gateways (every gateway
reports the same cluster-wide value: aggregate them with max(), not sum()).

This module imports nothing of the project.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from prometheus_client import Counter, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric

NAMESPACE = "sorna"

disable_created_metrics()  # no `*_created` series: a third of the text, no use here


@lru_cache(maxsize=4096)
def child(metric: MetricWrapperBase, *label_values: str) -> Any:
    """`metric.labels(*label_values)`, looked up once per combination: `labels()`
    takes a lock and builds its key on every call (~1 us), and counting sits on
    the request path.  Label values here are bounded sets (route templates,
    statuses, reasons), so the cache never evicts in practice."""
    return metric.labels(*label_values)

# --- HTTP (gateway middleware) ----------------------------------------------
HTTP_REQUESTS = Counter(
    "http_requests", "HTTP requests answered, by route template, method and status.",
    ["route", "method", "status"], namespace=NAMESPACE)
HTTP_LATENCY = Histogram(
    "http_request_duration_seconds", "Time to answer an HTTP request, by route template "
    "and method (WebSocket streams count until they close).",
    ["route", "method"], namespace=NAMESPACE,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0))

# --- kernels (gateway handlers) ----------------------------------------------
CREATE_REFUSAL_REASONS = ("quota", "rate", "no-agent", "language", "full", "draining")
CREATES_REFUSED = Counter(
    "kernel_creates_refused", "Kernel creations refused, by reason: quota (412), rate (429), "
    "no-agent (none running), language (none offers it), full (every one is full), "
    "draining (every one that offers it is draining).",
    ["reason"], namespace=NAMESPACE)

EXECUTE_OUTCOMES = ("finished", "continued", "waiting-input", "build-finished", "timeout",
                    "oom", "failed", "not-found", "invalid")
EXECUTIONS = Counter(
    "executions", "Execute requests by language, mode and outcome (a result status, or "
    "timeout, oom, failed, not-found, invalid).",
    ["lang", "mode", "outcome"], namespace=NAMESPACE)

# --- registry (settlement and reconciliation hooks, event intake) ------------------
SETTLEMENTS = Counter(
    "kernel_settlements", "Kernels settled (final status, usage row and quota slot written "
    "exactly once), by the path that settled them and the final status.",
    ["path", "status"], namespace=NAMESPACE)
RECONCILE_FIXES = Counter(
    "reconcile_fixes", "Differences between Redis and the database repaired, by kind.",
    ["kind"], namespace=NAMESPACE)
AGENT_EVENTS = Counter(
    "agent_events", "Agent events taken in by the event intake, by type.",
    ["type"], namespace=NAMESPACE)
AGENT_EVENTS_DROPPED = Counter(
    "agent_events_dropped", "Agent event frames dropped, by reason (malformed, "
    "registry-unavailable, foreign: refused for their sender key).", ["reason"],
    namespace=NAMESPACE)

# --- values read from the registry at scrape time ----------------------------------
KERNELS = "sorna_kernels"
AGENTS = "sorna_agents"
AGENT_LOAD = "sorna_agent_load"
AGENT_CAPACITY = "sorna_agent_capacity"
BUILD_INFO = "sorna_build_info"
AGENT_STATES = ("running", "draining", "silent", "lost")


@dataclass(frozen=True, slots=True)
class AgentSample:
    instance_id: str
    state: str      # one of AGENT_STATES
    load: int       # kernels + reserved slots, as the managers count them
    capacity: int   # max_kernels


def scrape_families(kernels: Mapping[tuple[str, str], int], agents: Iterable[AgentSample],
                    version: str) -> list[Metric]:
    """Metric families for a registry snapshot: kernels by (state, lang), agents."""
    kernel_family = GaugeMetricFamily(
        KERNELS, "Live kernels by state (PREPARING, RUNNING) and language.",
        labels=["state", "lang"])
    for (state, lang), count in sorted(kernels.items()):
        kernel_family.add_metric([state, lang], count)
    by_state = dict.fromkeys(AGENT_STATES, 0)
    load = GaugeMetricFamily(AGENT_LOAD, "Kernels and reserved slots on each agent.",
                             labels=["instance"])
    capacity = GaugeMetricFamily(AGENT_CAPACITY, "Kernels each agent runs at most.",
                                 labels=["instance"])
    for agent in agents:
        by_state[agent.state] = by_state.get(agent.state, 0) + 1
        if agent.state != "lost":
            load.add_metric([agent.instance_id], agent.load)
            capacity.add_metric([agent.instance_id], agent.capacity)
    agent_family = GaugeMetricFamily(
        AGENTS, "Agents in the registry by state (running, draining, silent: heartbeats "
        "late but not yet lost, lost).", labels=["state"])
    for state, count in by_state.items():
        agent_family.add_metric([state], count)
    build = GaugeMetricFamily(BUILD_INFO, "The running Sorna version (always 1).",
                              labels=["version"])
    build.add_metric([version], 1)
    return [kernel_family, agent_family, load, capacity, build]
