"""Health signals per model version, kept as one-second deltas and summed over windows.

Sources push deltas here: Envoy's stats (request, error, retry counts and the upstream
latency histogram of cluster `<model>@<version>`, summed over every Envoy) and vLLM's
`/metrics` (time to first token, inter-token latency, queue depth). The analysis asks for a
window's `Figures`, and may wait for the next report of a model (`wait_for_update`), so
that verdicts follow the data instead of a timer. Nothing here does I/O; every method runs on
the event loop (the sources push from it).

A hung version answers nothing, so its window has no requests to judge: `stuck_seconds`
measures the hang from Envoy's flushes instead. Per Envoy (`source`): from the first flush
after the version's last completion (on any Envoy) that shows requests in flight, to that
Envoy's latest flush, which must still show at least STUCK_MIN_IN_FLIGHT of them. So
requests sat unanswered for at least that long. One flush interval (1 s) is the shortest
stall there is to see; a lone long generation is never called stuck (it takes two). Envoys
silent for FRESH_S say nothing about now.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque
from dataclasses import dataclass, field

RETENTION_S = 600.0  # the longest window anyone may ask for
FRESH_S = 2.0  # an Envoy whose last flush is older than this (2 flushes) tells nothing of now
STUCK_MIN_IN_FLIGHT = 2  # one request alone may be a long generation


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
    healthy_hosts: float | None = None  # Envoy's membership_healthy: hosts it sends traffic to
    # vLLM scrapes: 1 when the endpoint's /metrics did not answer in time (a hung or dead
    # process; a slow but live engine still answers it), 0 when it did
    unanswered: float | None = None
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
    # how long requests have sat in flight with none completing (module doc), as of the
    # window's end and not limited to the window
    stuck_seconds: float | None = None
    healthy_hosts: float | None = None
    unanswered: float | None = None  # endpoints whose last /metrics scrape got no answer

    def to_json(self) -> dict:
        return {key: _round(value) for key, value in self.__dict__.items()}


def _round(value):
    return round(value, 4) if isinstance(value, float) else value


class HealthSignals:
    """Deltas per (model, version), kept for RETENTION_S, summed on demand."""

    def __init__(self) -> None:
        self._deltas: dict[tuple[str, str], deque[Delta]] = {}
        self._generations: dict[str, int] = {}  # per model: how many reports so far
        self._waiters: dict[str, set[asyncio.Future]] = {}

    def add(self, model: str, version: str, delta: Delta) -> None:
        series = self._deltas.setdefault((model, version), deque())
        series.append(delta)
        horizon = delta.time - RETENTION_S
        while series and series[0].time < horizon:
            series.popleft()
        self._generations[model] = self._generations.get(model, 0) + 1
        for waiter in self._waiters.pop(model, ()):
            if not waiter.done():
                waiter.set_result(True)

    def generation(self, model: str) -> int:
        """A number that grows with every report about `model` (0 before the first)."""
        return self._generations.get(model, 0)

    async def wait_for_update(
        self, model: str, timeout: float | None, after: int | None = None
    ) -> bool:
        """Until the next report about `model` (True) or `timeout` seconds (False).

        With `after` (a `generation` seen earlier), returns True at once when reports came
        since. A flush of one Envoy reports every version in one go, so a waiter wakes once
        per flush, after all of them.
        """
        if after is not None and self.generation(model) > after:
            return True
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(model, set()).add(waiter)
        try:
            with contextlib.suppress(TimeoutError):
                return await asyncio.wait_for(waiter, timeout)
            return False
        finally:
            waiters = self._waiters.get(model)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self._waiters[model]

    def add_cluster(self, cluster: str, delta: Delta) -> None:
        """Envoy names clusters `<model>@<version>`; other clusters are not ours."""
        model, sep, version = cluster.rpartition("@")
        if sep:
            self.add(model, version, delta)

    def window(
        self,
        model: str,
        version: str,
        seconds: float,
        now: float | None = None,
        since: float | None = None,
    ) -> Figures:
        """Figures over (now - seconds, now]; `stuck_seconds` looks back to `since` (default:
        all that is kept)."""
        now = time.time() if now is None else now
        start = now - seconds
        series = self._deltas.get((model, version), ())
        deltas = [d for d in series if start < d.time <= now]
        requests = sum(d.requests for d in deltas)
        errors = sum(d.errors for d in deltas)
        retries = sum(d.retries for d in deltas)
        latency = _merge(d.latency_ms for d in deltas)
        ttft, itl = _merge(d.ttft_s for d in deltas), _merge(d.itl_s for d in deltas)
        return Figures(
            window_seconds=seconds,
            requests=requests,
            errors=errors,
            retries=retries,
            requests_per_second=requests / seconds if seconds > 0 else 0.0,
            # Failed attempts over attempts: every retry follows a failed attempt, so a
            # version whose failures Envoy retried elsewhere still shows them.
            error_rate=(errors + retries) / (requests + retries) if requests else None,
            latency_p50_ms=latency.quantile(0.50) if latency else None,
            latency_p95_ms=latency.quantile(0.95) if latency else None,
            latency_p99_ms=latency.quantile(0.99) if latency else None,
            ttft_p95_ms=_ms(ttft.quantile(0.95)) if ttft else None,
            itl_p95_ms=_ms(itl.quantile(0.95)) if itl else None,
            running=_last_gauges(deltas, "running"),
            waiting=_last_gauges(deltas, "waiting"),
            in_flight=_last_gauges(deltas, "in_flight"),
            healthy_hosts=_last_gauges(deltas, "healthy_hosts"),
            unanswered=_last_gauges(deltas, "unanswered"),
            stuck_seconds=stuck_seconds(series, now, now - RETENTION_S if since is None else since),
        )

    def forget(self, model: str, version: str) -> None:
        self._deltas.pop((model, version), None)


def stuck_seconds(deltas, now: float, since: float) -> float | None:
    """How long one version has been stuck, from its deltas (see the module doc); None when
    it is not: a completion in the latest flush, or fewer than two requests in flight."""
    envoy = [d for d in deltas if d.in_flight is not None and since < d.time <= now]
    last_completion = max((d.time for d in envoy if d.requests), default=since)
    flushes: dict[str, list[Delta]] = {}
    for delta in envoy:
        if delta.time >= last_completion:
            flushes.setdefault(delta.source, []).append(delta)
    longest = None
    for series in flushes.values():
        first = next((d for d in series if d.in_flight), None)
        last = series[-1]
        if first is None or last.time < now - FRESH_S or last.requests:
            continue
        if last.in_flight >= STUCK_MIN_IN_FLIGHT and last.time > first.time:
            longest = max(longest or 0.0, last.time - first.time)
    return longest


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
