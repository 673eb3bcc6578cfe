"""Health signals per model version, kept as one-second deltas and summed over windows.

Sources push deltas here: Envoy's stats (request, error, retry counts and the upstream
latency histogram of cluster `<model>@<version>`, summed over every Envoy) and vLLM's
`/metrics` (time to first token, inter-token latency, queue depth). The analysis asks for a
window's `Figures`. Nothing here does I/O.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field

RETENTION_S = 600.0  # the longest window anyone may ask for


@dataclass
class Histogram:
    """Counts per bucket: counts[i] is observations <= bounds[i] and > bounds[i-1]; the last
    count is above the last bound. Deltas, not cumulative."""

    bounds: tuple[float, ...]
    counts: list[float]

    @classmethod
    def empty(cls, bounds: tuple[float, ...]) -> Histogram:
        return cls(bounds, [0.0] * (len(bounds) + 1))

    @classmethod
    def from_cumulative(cls, bounds: tuple[float, ...], cumulative: list[float]) -> Histogram:
        """From Prometheus-style cumulative `le` counts (one per bound, then +Inf)."""
        counts = [cumulative[0]] + [b - a for a, b in itertools.pairwise(cumulative)]
        return cls(tuple(bounds), [max(0.0, c) for c in counts])

    @property
    def total(self) -> float:
        return sum(self.counts)

    def add(self, other: Histogram) -> None:
        if other.bounds != self.bounds:
            raise ValueError("cannot add histograms with different buckets")
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]

    def quantile(self, q: float) -> float | None:
        """Linear interpolation inside the bucket, as Prometheus' histogram_quantile does."""
        total = self.total
        if total <= 0:
            return None
        rank = q * total
        seen = 0.0
        for index, count in enumerate(self.counts):
            if seen + count >= rank and count > 0:
                if index == len(self.bounds):  # above the last bound: the bound is all we know
                    return self.bounds[-1]
                lower = self.bounds[index - 1] if index > 0 else 0.0
                upper = self.bounds[index]
                return lower + (upper - lower) * (rank - seen) / count
            seen += count
        return self.bounds[-1]


@dataclass
class Delta:
    """What one source observed about one version since its previous report."""

    time: float = field(default_factory=time.time)
    requests: float = 0.0  # completed upstream requests
    errors: float = 0.0  # 5xx answers, connect failures, resets and timeouts
    retries: float = 0.0
    latency_ms: Histogram | None = None  # Envoy's upstream_rq_time
    ttft_s: Histogram | None = None  # vLLM's time_to_first_token_seconds
    itl_s: Histogram | None = None  # vLLM's inter_token_latency_seconds
    e2e_s: Histogram | None = None  # vLLM's e2e_request_latency_seconds
    running: float | None = None  # gauges: the last value in the window counts
    waiting: float | None = None
    in_flight: float | None = None  # Envoy's upstream_rq_active: requests sent, not answered
    source: str = ""  # which Envoy or endpoint, so gauges are summed across sources


@dataclass(frozen=True)
class Figures:
    """A version's health over one window: what the analysis and the health API use."""

    window_seconds: float
    requests: float
    errors: float
    retries: float
    requests_per_second: float
    error_rate: float | None
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    latency_p99_ms: float | None
    ttft_p95_ms: float | None
    itl_p95_ms: float | None
    running: float | None
    waiting: float | None
    in_flight: float | None = None

    def to_json(self) -> dict:
        return {key: _round(value) for key, value in self.__dict__.items()}


def _round(value):
    return round(value, 4) if isinstance(value, float) else value


class HealthSignals:
    """Deltas per (model, version), kept for RETENTION_S, summed on demand."""

    def __init__(self) -> None:
        self._deltas: dict[tuple[str, str], deque[Delta]] = {}

    def add(self, model: str, version: str, delta: Delta) -> None:
        series = self._deltas.setdefault((model, version), deque())
        series.append(delta)
        horizon = delta.time - RETENTION_S
        while series and series[0].time < horizon:
            series.popleft()

    def add_cluster(self, cluster: str, delta: Delta) -> None:
        """Envoy names clusters `<model>@<version>`; other clusters are not ours."""
        model, sep, version = cluster.rpartition("@")
        if sep:
            self.add(model, version, delta)

    def window(self, model: str, version: str, seconds: float, now: float | None = None) -> Figures:
        now = time.time() if now is None else now
        start = now - seconds
        deltas = [d for d in self._deltas.get((model, version), ()) if start < d.time <= now]
        requests = sum(d.requests for d in deltas)
        errors = sum(d.errors for d in deltas)
        latency = _merge(d.latency_ms for d in deltas)
        ttft, itl = _merge(d.ttft_s for d in deltas), _merge(d.itl_s for d in deltas)
        return Figures(
            window_seconds=seconds,
            requests=requests,
            errors=errors,
            retries=sum(d.retries for d in deltas),
            requests_per_second=requests / seconds if seconds > 0 else 0.0,
            error_rate=errors / requests if requests else None,
            latency_p50_ms=latency.quantile(0.50) if latency else None,
            latency_p95_ms=latency.quantile(0.95) if latency else None,
            latency_p99_ms=latency.quantile(0.99) if latency else None,
            ttft_p95_ms=_ms(ttft.quantile(0.95)) if ttft else None,
            itl_p95_ms=_ms(itl.quantile(0.95)) if itl else None,
            running=_last_gauges(deltas, "running"),
            waiting=_last_gauges(deltas, "waiting"),
            in_flight=_last_gauges(deltas, "in_flight"),
        )

    def forget(self, model: str, version: str) -> None:
        self._deltas.pop((model, version), None)


def _merge(histograms) -> Histogram | None:
    merged: Histogram | None = None
    for histogram in histograms:
        if histogram is None:
            continue
        if merged is None:
            merged = Histogram(histogram.bounds, list(histogram.counts))
        elif histogram.bounds == merged.bounds:
            merged.add(histogram)
    return merged


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


def _last_gauges(deltas: list[Delta], name: str) -> float | None:
    """The latest value of a gauge per source, summed over sources."""
    latest: dict[str, float] = {}
    for delta in deltas:
        value = getattr(delta, name)
        if value is not None:
            latest[delta.source] = value
    return sum(latest.values()) if latest else None
