"""vLLM-named Prometheus metrics for the simulator.

The hot path only bumps plain ints and floats (the event loop is single threaded, so no locks);
the values are turned into metric families on scrape by a custom collector. Each sim has its own
`CollectorRegistry`, so several sims in one process never share or collide on series.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import Counter
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
FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")
SLEEP_STATES = ("awake", "weights_offloaded", "discard_all")  # awake, level 1, level 2
LABELS = ["model_name", "engine"]  # vLLM labels every engine metric with both
ENGINE = "0"  # one engine per server (no data parallelism)


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
        family = HistogramMetricFamily(name, doc, labels=LABELS)
        buckets, total = [], 0
        for bound, count in zip(self.bounds, self.counts, strict=False):
            total += count
            buckets.append((floatToGoString(bound), total))
        buckets.append(("+Inf", total + self.counts[-1]))
        family.add_metric([model, ENGINE], buckets, self.sum)
        return family


class LoraInfo:
    """vLLM's `vllm:lora_requests_info`: a gauge whose labels name the adapters with requests
    running and waiting (comma-separated) and `max_lora`, set to the time of the last
    update. vLLM keeps every label combination it ever set, each with the time it last held:
    the newest is the present."""

    def __init__(self, max_lora: int) -> None:
        self.max_lora = str(max_lora)
        self.running: Counter[str] = Counter()  # adapter -> its requests running
        self.waiting: Counter[str] = Counter()
        self.seen: dict[tuple[str, str], float] = {}  # (running, waiting) -> when last true

    def family(self) -> GaugeMetricFamily:
        running = ",".join(name for name, count in self.running.items() if count > 0)
        waiting = ",".join(name for name, count in self.waiting.items() if count > 0)
        self.seen[(running, waiting)] = time.time()
        family = GaugeMetricFamily(
            "vllm:lora_requests_info", "Running stats on lora requests.",
            labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
        )  # fmt: skip
        for (run, wait), when in self.seen.items():
            family.add_metric([self.max_lora, run, wait], when)
        return family


class SimMetrics:
    """The counters, gauges and histograms of one simulated vLLM server."""

    def __init__(self, model: str, kv_cache_tokens: int = 65536, max_loras: int = 8) -> None:
        self.model = model
        self.running = 0
        self.waiting = 0
        self.kv_tokens = 0  # tokens the running requests hold in the KV cache
        self.kv_cache_tokens = kv_cache_tokens
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of which found there
        self.sleep_state = "awake"
        self.success = dict.fromkeys(FINISH_REASONS, 0)
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)
        self.queue = Histogram(E2E_BUCKETS)  # vLLM's request_queue_time buckets
        self.lora = LoraInfo(max_loras)  # as vLLM started with --enable-lora
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(self)

    def finish(self, reason: str, prompt_tokens: int, generated: int, e2e: float) -> None:
        """Account one finished request (a success in vLLM's terms, whatever its reason)."""
        self.success[reason] += 1
        self.prompt_tokens += prompt_tokens
        self.generation_tokens += generated
        self.e2e.observe(e2e)

    def collect(self) -> Iterator[Metric]:
        ids = [self.model, ENGINE]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=LABELS)
            family.add_metric(ids, value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=LABELS)
            family.add_metric(ids, value)
            return family

        yield gauge("vllm:num_requests_running",
                    "Number of requests in model execution batches.", self.running)
        yield gauge("vllm:num_requests_waiting",
                    "Number of requests waiting to be processed.", self.waiting)
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                    min(1.0, self.kv_tokens / self.kv_cache_tokens))
        sleep = GaugeMetricFamily(
            "vllm:engine_sleep_state", "Engine sleep state; awake = 0 means engine is sleeping; "
            "awake = 1 means engine is awake; weights_offloaded = 1 means sleep level 1; "
            "discard_all = 1 means sleep level 2.", labels=[*LABELS, "sleep_state"],
        )  # fmt: skip
        for state in SLEEP_STATES:
            sleep.add_metric([*ids, state], 1.0 if state == self.sleep_state else 0.0)
        yield sleep
        yield counter("vllm:prefix_cache_queries",
                      "Prefix cache queries, in terms of number of queried tokens.",
                      self.prefix_queries)
        yield counter("vllm:prefix_cache_hits",
                      "Prefix cache hits, in terms of number of cached tokens.", self.prefix_hits)
        yield counter("vllm:prompt_tokens", "Number of prefill tokens processed.",
                      self.prompt_tokens)
        yield counter("vllm:generation_tokens", "Number of generation tokens processed.",
                      self.generation_tokens)
        success = CounterMetricFamily(
            "vllm:request_success", "Count of successfully processed requests.",
            labels=[*LABELS, "finished_reason"],
        )
        for reason, count in self.success.items():
            success.add_metric([*ids, reason], count)
        yield success
        yield self.ttft.family(
            "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
            self.model,
        )
        yield self.itl.family(
            "vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
            self.model,
        )
        yield self.e2e.family(
            "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
            self.model,
        )
        yield self.queue.family(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.", self.model,
        )
        yield self.lora.family()

    def render(self) -> bytes:
        """The Prometheus text exposition (format 0.0.4, what vLLM serves)."""
        return generate_latest(self.registry)
