"""The controller's Prometheus metrics, all prefixed `switchyard_`, with bounded labels."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)
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
