"""The endpoint picker's Prometheus metrics (`switchyard_picker_*`), served on a loopback
port of its own; the controller's /metrics includes them (docs/metrics.md).

The decisions' series (picks, prompt blocks, matched blocks, time per pick) are counted by
the engine that decides: the native one counts them in C, on its own thread, and the
Python one in `Decisions`; both hand them over in one shape (`stats()`), which
`DecisionCollector` exposes when Prometheus reads."""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict

from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

REGISTRY = CollectorRegistry(auto_describe=True)
# The picker's own CPU and memory: switchyard_picker_process_*.
ProcessCollector(namespace="switchyard_picker", registry=REGISTRY)

# The upper bounds of switchyard_picker_pick_seconds (the native engine has the same).
PICK_BUCKETS = (0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.1)

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


class Decisions:
    """The Python engine's counts, in the shape of the native engine's `stats()`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the gRPC transport decides on threads of its own
        self.picks: dict[tuple[str, str], int] = defaultdict(int)  # (pool, reason)
        self.prompt_blocks: dict[str, int] = defaultdict(int)  # pool
        self.matched_blocks: dict[str, int] = defaultdict(int)
        self.pick_buckets = [0] * (len(PICK_BUCKETS) + 1)  # not cumulative; the last: +Inf
        self.pick_sum = 0.0

    def count(self, pool: str, reason: str, blocks: int = 0, matched: int = 0) -> None:
        """One decision for `pool`, and the prompt blocks it looked up and found."""
        with self._lock:
            self.picks[(pool, reason)] += 1
            if blocks:
                self.prompt_blocks[pool] += blocks
                self.matched_blocks[pool] += matched

    def observe(self, seconds: float) -> None:
        with self._lock:
            self.pick_buckets[bisect.bisect_left(PICK_BUCKETS, seconds)] += 1
            self.pick_sum += seconds

    def stats(self) -> dict:
        with self._lock:
            return {"picks": dict(self.picks), "prompt_blocks": dict(self.prompt_blocks),
                    "matched_blocks": dict(self.matched_blocks),
                    "pick_buckets": list(self.pick_buckets), "pick_sum": self.pick_sum}  # fmt: skip


class DecisionCollector:
    """switchyard_picker_picks_total, _prompt_blocks_total, _matched_blocks_total and
    _pick_seconds, read from the deciding engine's `stats()` at each scrape."""

    def __init__(self) -> None:
        self.source = None  # the running picker's engine (service.serve)

    def describe(self):
        return self.collect(_EMPTY)

    def collect(self, source=None):
        source = source or self.source or _EMPTY
        stats = source.stats()
        picks = CounterMetricFamily(
            "switchyard_picker_picks",
            "Endpoint choices, by the version the split chose and why: prefix (it had part of "
            "the prompt), load (no endpoint had any), none (no candidate known: Envoy's least "
            "request)",
            labels=["model", "version", "reason"],
        )
        for (pool, reason), count in sorted(stats["picks"].items()):
            picks.add_metric([*_model_version(pool), reason], count)
        yield picks
        for name, documentation, key in (
            ("switchyard_picker_prompt_blocks", "Prompt blocks the picker looked up, by version",
             "prompt_blocks"),
            ("switchyard_picker_matched_blocks", "Of those, the blocks the chosen endpoint was "
             "sent before: the prefix hit rate it expects", "matched_blocks"),
        ):  # fmt: skip
            family = CounterMetricFamily(name, documentation, labels=["model", "version"])
            for pool, count in sorted(stats[key].items()):
                family.add_metric(list(_model_version(pool)), count)
            yield family
        cumulative, buckets = 0, []
        bounds = (*map(floatToGoString, PICK_BUCKETS), "+Inf")
        for bound, count in zip(bounds, stats["pick_buckets"], strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        yield HistogramMetricFamily(
            "switchyard_picker_pick_seconds",
            "Time the picker spent on one request, from its message to its answer",
            buckets=buckets, sum_value=stats["pick_sum"],
        )  # fmt: skip


def _model_version(pool: str) -> tuple[str, str]:
    model, _, version = pool.rpartition("@")
    return model, version


_EMPTY = Decisions()
decisions = DecisionCollector()
REGISTRY.register(decisions)
