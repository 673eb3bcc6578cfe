"""The controller's Prometheus metrics, all prefixed `switchyard_`, with bounded labels.

Every label value comes from a closed set (the tuples below) or from the configured models and
versions. Counters are created at 0 for every value they can take (`observe_models` for the
per-model ones), so the first rollback or rollout is an increase Prometheus can see rather than
a series appearing at 1. docs/metrics.md lists them all.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

REGISTRY = CollectorRegistry(auto_describe=True)
# The controller's own CPU, memory and file descriptors: switchyard_process_*.
ProcessCollector(namespace="switchyard", registry=REGISTRY)
FAST_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)

version_weight = Gauge(
    "switchyard_version_weight",
    "Weight (percent) set for a model version",
    ["model", "version"],
    registry=REGISTRY,
)
backend_ready = Gauge(
    "switchyard_backend_ready",
    "1 when the version has a ready endpoint (in Envoy's EDS)",
    ["model", "version"],
    registry=REGISTRY,
)
backend_state = Gauge(
    "switchyard_backend_state",
    "1 for the version's current state (starting, active, sleeping, waking, error, stopped)",
    ["model", "version", "state"],
    registry=REGISTRY,
)
backend_sleeps = Counter(
    "switchyard_backend_sleeps_total",
    "Versions parked (vLLM sleep mode or stopped), by model",
    ["model", "version"],
    registry=REGISTRY,
)
backend_wakes = Counter(
    "switchyard_backend_wakes_total",
    "Versions woken from sleep or stop, by model",
    ["model", "version"],
    registry=REGISTRY,
)
backend_sleep_seconds = Histogram(
    "switchyard_backend_sleep_seconds",
    "Time a version took to fall asleep",
    ["model"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=REGISTRY,
)
backend_wake_seconds = Histogram(
    "switchyard_backend_wake_seconds",
    "Time a version took from wake request to ready",
    ["model"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
    registry=REGISTRY,
)
backend_restarts = Counter(
    "switchyard_backend_restarts_total",
    "Backend processes restarted after they died",
    ["model", "version"],
    registry=REGISTRY,
)
version_degraded = Gauge(
    "switchyard_version_degraded",
    "1 while a serving version is outside its model's alert thresholds",
    ["model", "version"],
    registry=REGISTRY,
)
scale_events = Counter(
    "switchyard_scale_events_total",
    "Scale-to-zero events: direction is `down` (idle, parked) or `up` (woken by a request)",
    ["model", "version", "direction"],
    registry=REGISTRY,
)
weight_changes = Counter(
    "switchyard_weight_changes_total",
    "Weight changes applied, by model",
    ["model"],
    registry=REGISTRY,
)
xds_connected = Gauge(
    "switchyard_xds_connected_envoys", "Envoys connected to the ADS server", registry=REGISTRY
)
xds_pushes = Counter(
    "switchyard_xds_pushes_total",
    "Discovery responses sent, by type",
    ["type"],
    registry=REGISTRY,
)
xds_pushed_bytes = Counter(
    "switchyard_xds_pushed_bytes",
    "Bytes of xDS responses sent to Envoys (each serialized once per change; the nonce aside)",
    ["type"],
    registry=REGISTRY,
)
xds_acks = Counter(
    "switchyard_xds_acks_total", "Discovery responses ACKed, by type", ["type"], registry=REGISTRY
)
xds_nacks = Counter(
    "switchyard_xds_nacks_total",
    "Discovery responses NACKed, by type",
    ["type"],
    registry=REGISTRY,
)
xds_ack_latency = Histogram(
    "switchyard_xds_push_ack_seconds",
    "Time from a push to the Envoy's ACK, by type",
    ["type"],
    buckets=FAST_BUCKETS,
    registry=REGISTRY,
)
snapshot_build = Histogram(
    "switchyard_snapshot_build_seconds",
    "Time to build and serialize one xDS snapshot",
    buckets=FAST_BUCKETS,
    registry=REGISTRY,
)
admin_requests = Counter(
    "switchyard_admin_requests_total",
    "Admin API requests by route and status",
    ["route", "method", "status"],
    registry=REGISTRY,
)
admin_latency = Histogram(
    "switchyard_admin_request_seconds",
    "Admin API latency by route",
    ["route", "method"],
    buckets=FAST_BUCKETS,
    registry=REGISTRY,
)
proxy_restarts = Counter(
    "switchyard_envoy_restarts_total",
    "Times `switchyard up` restarted its Envoy",
    registry=REGISTRY,
)
rollouts_started = Counter(
    "switchyard_rollouts_started_total",
    "Rollouts started, by model and strategy",
    ["model", "strategy"],
    registry=REGISTRY,
)
rollouts_finished = Counter(
    "switchyard_rollouts_finished_total",
    "Rollouts ended, by model and outcome (succeeded, aborted, rolled_back)",
    ["model", "outcome"],
    registry=REGISTRY,
)
rollbacks = Counter(
    "switchyard_rollbacks_total",
    "Rollbacks, by model and reason (analysis, emergency, ...)",
    ["model", "reason"],
    registry=REGISTRY,
)
analysis_verdicts = Counter(
    "switchyard_analysis_verdicts_total",
    "Analysis verdicts, by model and result",
    ["model", "result"],
    registry=REGISTRY,
)
rollout_phase = Gauge(
    "switchyard_rollout_phase",
    "Phase of the model's latest rollout: 0 progressing, 1 paused, 2 succeeded, 3 aborted, "
    "4 rolled_back",
    ["model"],
    registry=REGISTRY,
)
rollout_step = Gauge(
    "switchyard_rollout_step",
    "Step index of the model's active rollout",
    ["model"],
    registry=REGISTRY,
)
asyncio_tasks = Gauge(
    "switchyard_asyncio_tasks",
    "asyncio tasks alive in the controller (flat over time: no task leaks)",
    registry=REGISTRY,
)
webhook_drops = Counter(
    "switchyard_webhook_events_dropped_total",
    "Events a webhook receiver never got: `queue_full` (it fell 1,000 events behind, the "
    "oldest waiting one was dropped) or `failed` (every delivery attempt failed)",
    ["reason"],
    registry=REGISTRY,
)


# The closed label sets (they mirror state.VERSION_STATES, xds SHORT_NAMES, the rollout spec's
# strategies and the engine's phases and rollback reasons).
VERSION_STATES = ("starting", "active", "sleeping", "waking", "error", "stopped")
XDS_TYPES = ("cds", "eds", "lds", "rds")
STRATEGIES = ("immediate", "gradual", "canary", "ab", "blue_green", "mirror")
OUTCOMES = ("succeeded", "aborted", "rolled_back")
VERDICTS = ("pass", "fail", "inconclusive")
ROLLBACK_REASONS = (
    "emergency", "unready", "analysis", "error_rate", "latency_p95_ms", "ttft_p95_ms",
    "itl_p95_ms", "stalled", "unhealthy", "crashed",
)  # fmt: skip

WEBHOOK_DROP_REASONS = ("queue_full", "failed")

for _type in XDS_TYPES:
    for _family in (xds_pushes, xds_acks, xds_nacks, xds_ack_latency):
        _family.labels(_type)
for _reason in WEBHOOK_DROP_REASONS:
    webhook_drops.labels(_reason)



def _count_tasks() -> float:
    """Read at scrape time, on the event loop (the admin API serves /metrics)."""
    try:
        return float(len(asyncio.all_tasks()))
    except RuntimeError:  # scraped off the loop: unknown
        return float("nan")


asyncio_tasks.set_function(_count_tasks)

_seen_versions: set[tuple[str, str]] = set()


def observe_models(models: Iterable[Any], prune: bool = True) -> None:
    """Bring the per-model series in line with the state (called on every snapshot rebuild).

    Sets each version's weight, readiness and state; creates the per-model counters at 0; with
    `prune` (`models` is every model), drops the series of versions that no longer exist, so a
    removed version leaves no stale weight.
    """
    current: set[tuple[str, str]] = set()
    for model in models:
        for version in model.versions.values():
            key = (model.name, version.name)
            current.add(key)
            version_weight.labels(*key).set(version.weight)
            backend_ready.labels(*key).set(int(version.ready))
            for state in VERSION_STATES:
                backend_state.labels(*key, state).set(int(version.state == state))
        _init_model_counters(model.name)
    if not prune:
        _seen_versions.update(current)
        return
    for key in _seen_versions - current:
        for gauge in (version_weight, backend_ready):
            gauge.remove(*key)
        for state in VERSION_STATES:
            backend_state.remove(*key, state)
    _seen_versions.clear()
    _seen_versions.update(current)


_counted_models: set[str] = set()  # whose counters exist (they are never removed)


def _init_model_counters(model: str) -> None:
    """A model's counters at 0, created once: a weight change does not look up 23 series."""
    if model in _counted_models:
        return
    _counted_models.add(model)
    weight_changes.labels(model)
    for strategy in STRATEGIES:
        rollouts_started.labels(model, strategy)
    for outcome in OUTCOMES:
        rollouts_finished.labels(model, outcome)
    for reason in ROLLBACK_REASONS:
        rollbacks.labels(model, reason)
    for result in VERDICTS:
        analysis_verdicts.labels(model, result)
