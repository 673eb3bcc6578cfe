"""The endpoint picker's Prometheus metrics (`switchyard_picker_*`), served on a loopback
port of its own; the controller's /metrics includes them (docs/metrics.md)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

REGISTRY = CollectorRegistry(auto_describe=True)
# The picker's own CPU and memory: switchyard_picker_process_*.
ProcessCollector(namespace="switchyard_picker", registry=REGISTRY)

picks = Counter(
    "switchyard_picker_picks_total",
    "Endpoint choices, by the version the split chose and why: prefix (it had part of the "
    "prompt), load (no endpoint had any), none (no candidate known: Envoy's least request)",
    ["model", "version", "reason"],
    registry=REGISTRY,
)
pick_seconds = Histogram(
    "switchyard_picker_pick_seconds",
    "Time the picker spent on one request, from its message to its answer",
    buckets=(0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.1),
    registry=REGISTRY,
)
prompt_blocks = Counter(
    "switchyard_picker_prompt_blocks_total",
    "Prompt blocks (16 tokens) the picker looked up, by version",
    ["model", "version"],
    registry=REGISTRY,
)
matched_blocks = Counter(
    "switchyard_picker_matched_blocks_total",
    "Of those, the blocks the chosen endpoint was sent before: the prefix hit rate it expects",
    ["model", "version"],
    registry=REGISTRY,
)
reads = Counter(
    "switchyard_picker_endpoint_reads_total",
    "Reads of the endpoints' vLLM /metrics, by result",
    ["result"],
    registry=REGISTRY,
)
endpoints = Gauge(
    "switchyard_picker_endpoints",
    "Endpoints the picker reads (named by a request in the last minute)",
    registry=REGISTRY,
)
for _result in ("ok", "failed"):
    reads.labels(_result)
