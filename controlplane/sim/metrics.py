"""vLLM-named Prometheus metrics for the simulator.

The hot path only bumps plain ints and floats (the event loop is single threaded, so no locks);
the values are turned into metric families on scrape by a custom collector. Each sim has its own
`CollectorRegistry`, so several sims in one process never share or collide on series.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

# Bucket edges as vLLM's v1 PrometheusStatLogger defines them, so dashboards and quantile
# queries written against real vLLM read the sim the same way.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
E2E_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
    40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip

# vLLM pre-creates one success series per finish reason, so they exist (at 0) before traffic.
FINISH_REASONS = ("stop", "length", "abort")


class Histogram:
    """A lock-free cumulative histogram: `observe` is one bisect and two additions."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # last slot is +Inf
        self.sum = 0.0

    def observe(self, value: float, count: int = 1) -> None:
        """Record `count` observations of `value` (buckets are `le`, hence bisect_left)."""
        self.counts[bisect_left(self.bounds, value)] += count
        self.sum += value * count

    def family(self, name: str, doc: str, model: str) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, doc, labels=["model_name"])
        buckets, total = [], 0
        for bound, count in zip(self.bounds, self.counts, strict=False):
            total += count
            buckets.append((floatToGoString(bound), total))
        buckets.append(("+Inf", total + self.counts[-1]))
        family.add_metric([model], buckets, self.sum)
        return family


class SimMetrics:
    """The counters, gauges and histograms of one simulated vLLM server."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.running = 0
        self.waiting = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.success = dict.fromkeys(FINISH_REASONS, 0)
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(self)

    def finish(self, reason: str, prompt_tokens: int, generated: int, e2e: float) -> None:
        """Account one finished request (a success in vLLM's terms, whatever its reason)."""
        self.success[reason] += 1
        self.prompt_tokens += prompt_tokens
        self.generation_tokens += generated
        self.e2e.observe(e2e)

    def collect(self) -> Iterator[Metric]:
        model = self.model
        labels = ["model_name"]
        running = GaugeMetricFamily(
            "vllm:num_requests_running", "Number of requests in model execution batches.",
            labels=labels,
        )
        running.add_metric([model], self.running)
        yield running
        waiting = GaugeMetricFamily(
            "vllm:num_requests_waiting", "Number of requests waiting to be processed.",
            labels=labels,
        )
        waiting.add_metric([model], self.waiting)
        yield waiting
        prompt = CounterMetricFamily(
            "vllm:prompt_tokens", "Number of prefill tokens processed.", labels=labels
        )
        prompt.add_metric([model], self.prompt_tokens)
        yield prompt
        generation = CounterMetricFamily(
            "vllm:generation_tokens", "Number of generation tokens processed.", labels=labels
        )
        generation.add_metric([model], self.generation_tokens)
        yield generation
        success = CounterMetricFamily(
            "vllm:request_success", "Count of successfully processed requests.",
            labels=["model_name", "finished_reason"],
        )
        for reason, count in self.success.items():
            success.add_metric([model, reason], count)
        yield success
        yield self.ttft.family(
            "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
            model,
        )
        yield self.itl.family(
            "vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
            model,
        )
        yield self.e2e.family(
            "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
            model,
        )

    def render(self) -> bytes:
        """The Prometheus text exposition (format 0.0.4, what vLLM serves)."""
        return generate_latest(self.registry)
