"""The health analysis: a rollout's candidate judged against its thresholds and its stable.

`judge` is pure: two windows of `Figures` and the rollout's `analysis` thresholds in, one
`Verdict` out. `HealthAnalysis` is the engine's `Analysis`: it reads both windows from
`HealthSignals` and calls `judge`.

Rules, in order:

- a stalled candidate (`stalled`: requests stuck in flight for a flush interval and five
  stable p99 latencies) fails, whatever its request count;
- fewer candidate requests than `min_requests`: `inconclusive` (the rollout holds; it never
  advances, nor rolls back, on too little data);
- every configured absolute threshold (`max_error_rate`, `max_latency_p95_ms`,
  `max_ttft_p95_ms`, `max_itl_p95_ms`) is checked against the candidate;
- every configured relative threshold (`max_latency_ratio`, `max_ttft_ratio`: candidate p95
  over stable p95; `max_error_rate_delta`: candidate error rate minus stable's) is checked
  against the stable over the same window, unless the stable has fewer than `min_requests`
  requests or lacks the figure: then the check is skipped and the skip noted in `figures`;
- any breach: `fail`, the reason listing every breach ("error_rate 0.42 > max_error_rate
  0.05; ..."); else a configured check whose candidate figure is missing (no TTFT data yet):
  `inconclusive`; else `pass`.

The window (`HealthAnalysis`): `max(3 * interval_seconds, 3 s)` unless given. A 1 s window at
a 1 s evaluation interval holds zero, one or two one-second flushes depending on timing, so
its request count jumps around and `min_requests` flips verdicts to inconclusive; three
seconds always holds at least two flushes. It costs little speed: a window's error rate (or
p95) crosses its threshold as soon as the faulty requests are a `threshold / fault rate`
share of the window (0.1 of it for a 50 % error rate against `max_error_rate` 0.05), so a
hard fault fails the first verdict that sees one flush of it; only a marginal fault, barely
above its threshold, takes up to the whole window to show.

When: the engine asks for a verdict as soon as new signals for the model arrive
(`HealthAnalysis.wait_for_data`), at most every MIN_GAP_S and at least every
`interval_seconds`. Envoy flushes every second, so a fault is judged on the first flush that
holds enough of it instead of waiting up to one more interval for a timer.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from controlplane.health.signals import RETENTION_S, Figures, HealthSignals
from controlplane.health.verdict import AnalysisSpec, Verdict

MIN_WINDOW_S = 3.0
WINDOW_INTERVALS = 3
MIN_GAP_S = 0.1  # at most ten verdicts a second, however often data arrives

# threshold -> the candidate figure it bounds
ABSOLUTE = {
    "max_error_rate": "error_rate",
    "max_latency_p95_ms": "latency_p95_ms",
    "max_ttft_p95_ms": "ttft_p95_ms",
    "max_itl_p95_ms": "itl_p95_ms",
}
RATIOS = {"max_latency_ratio": "latency_p95_ms", "max_ttft_ratio": "ttft_p95_ms"}
DIFFERENCES = {"max_error_rate_delta": "error_rate"}
CHECKS = (*ABSOLUTE, *RATIOS, *DIFFERENCES)
DEFAULT_MIN_REQUESTS = AnalysisSpec.model_fields["min_requests"].default


def short(value: float) -> str:
    """Short and readable: 0.42, 812, 2.5, 0.0012."""
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.4g}"


STALL_FACTOR = 5  # the stall must last this many stable p99 latencies
# and at least this long. Spans run from one flush of an Envoy to a later one, so they are
# whole flush intervals already (1 s, `stats_flush_interval`); this floor, under half a
# second, also lets a 0.5 s interval halve the time to see a hang.
STALL_MIN_S = 0.45


def stalled(candidate: Figures, stable: Figures | None) -> str | None:
    """A hung candidate answers nothing, so it never reaches `min_requests`: catch it here.

    Stalled = the candidate is stuck (`Figures.stuck_seconds`: requests in flight, none
    completed) for at least one Envoy stats flush interval and for STALL_FACTOR times
    the stable's p99 latency. With fast backends that is the first whole flush interval
    after the hang; slow generations (stable p99 near a second or more) need proportionally
    longer, so silence that is normal for them is never called a stall. Unless the
    candidate's /metrics does not answer either (`Figures.unanswered`): a live engine,
    however slow its generations, answers a scrape in milliseconds, so that is a hung
    process and one flush interval of silence is enough. (Without it, a stable p99 above
    200 ms, common on real vLLM, cost a hang a second silent flush: 3 s instead of 2.)
    """
    stuck = candidate.stuck_seconds
    if stuck is None or stuck < STALL_MIN_S:
        return None
    stuck_for = (f"stalled {short(candidate.in_flight or 0)} requests in flight, none completed"
                 f" in {short(stuck)}s")  # fmt: skip
    if candidate.unanswered:  # its process does not even answer /metrics: hung, not slow
        return f"{stuck_for} (its /metrics does not answer)"
    if stable is None or not stable.requests or stable.latency_p99_ms is None:
        return None
    if stable.latency_p99_ms * STALL_FACTOR > stuck * 1000:
        return None
    return f"{stuck_for} (stable p99 {short(stable.latency_p99_ms)} ms)"


def no_healthy_host(candidate: Figures) -> str | None:
    """Envoy took every candidate host out (health checks, outlier detection, or none left)
    while requests still came for it: stable answered them (failover), so its request
    figures look fine. Judged failing."""
    if candidate.healthy_hosts is None or candidate.healthy_hosts > 0 or not candidate.requests:
        return None
    return (
        f"unhealthy: no candidate host passes Envoy's health checks and outlier detection; "
        f"stable served its {short(candidate.requests)} requests"
    )


def absolute_checks(figures: Figures, thresholds: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Every absolute threshold set in `thresholds`, checked on one version's figures:
    (breaches, missing figures). Shared by rollout verdicts and the health alerts."""
    breaches: list[str] = []
    missing: list[str] = []
    for key, name in ABSOLUTE.items():
        limit = thresholds.get(key)
        if limit is None:
            continue
        value = getattr(figures, name)
        if value is None:
            missing.append(f"no {name} data for {key} {short(limit)}")
        elif value > limit:
            breaches.append(f"{name} {short(value)} > {key} {short(limit)}")
    return breaches, missing


def judge(candidate: Figures, stable: Figures | None, thresholds: dict[str, Any]) -> Verdict:
    """The verdict on `candidate` for the rollout's `analysis` dict (see the module doc)."""
    min_requests = thresholds.get("min_requests")
    if min_requests is None:
        min_requests = DEFAULT_MIN_REQUESTS
    used = {"min_requests": min_requests}
    used |= {key: thresholds[key] for key in CHECKS if thresholds.get(key) is not None}
    figures: dict[str, Any] = {
        "candidate": candidate.to_json(),
        "stable": stable.to_json() if stable is not None else None,
        "thresholds": used,
    }
    stall = stalled(candidate, stable)
    if stall:
        return Verdict("fail", stall, figures)
    unhealthy = no_healthy_host(candidate)
    if unhealthy and candidate.requests < min_requests:
        return Verdict("fail", unhealthy, figures)
    if candidate.requests < min_requests:
        reason = f"{short(candidate.requests)} requests < min_requests {min_requests}"
        return Verdict("inconclusive", reason, figures)

    breaches, missing = absolute_checks(candidate, used)
    skipped: list[str] = []
    relative = [(key, name, True) for key, name in RATIOS.items()]
    relative += [(key, name, False) for key, name in DIFFERENCES.items()]
    for key, name, ratio in relative:
        limit = used.get(key)
        if limit is None:
            continue
        value = getattr(candidate, name)
        base = getattr(stable, name) if stable is not None else None
        if stable is None or stable.requests < min_requests:
            count = short(stable.requests) if stable is not None else "0"
            skipped.append(f"{key}: stable has {count} requests < min_requests {min_requests}")
            continue
        if base is None or (ratio and base <= 0):
            skipped.append(f"{key}: stable has no {name} data")
            continue
        if value is None:
            missing.append(f"no {name} data for {key} {short(limit)}")
            continue
        if ratio:
            measured = value / base
            if measured > limit:
                breaches.append(
                    f"{name} ratio {short(measured)} ({short(value)} vs stable {short(base)})"
                    f" > {key} {short(limit)}"
                )
        else:
            measured = value - base
            if measured > limit:
                breaches.append(
                    f"{name} delta {short(measured)} ({short(value)} vs stable {short(base)})"
                    f" > {key} {short(limit)}"
                )
    if skipped:
        figures["skipped"] = skipped
    if unhealthy:
        breaches.append(unhealthy)
    if breaches:
        return Verdict("fail", "; ".join(breaches), figures)
    if missing:
        return Verdict("inconclusive", "; ".join(missing), figures)
    checked = len([key for key in used if key != "min_requests"]) - len(skipped)
    reason = f"{checked} checks passed over {short(candidate.requests)} requests"
    if skipped:
        reason += f" ({len(skipped)} skipped)"
    return Verdict("pass", reason, figures)


def window_for(interval_seconds: float) -> float:
    """The window a verdict looks at, for the rollout's evaluation interval (module doc)."""
    return min(max(WINDOW_INTERVALS * interval_seconds, MIN_WINDOW_S), RETENTION_S)


class HealthAnalysis:
    """The engine's `Analysis` over live health signals: `to` is judged against `from`."""

    def __init__(self, signals: HealthSignals, window_seconds: float | None = None) -> None:
        self.signals = signals
        self.window_seconds = window_seconds
        self._seen: int | None = None  # the model's signal generation at the last verdict
        self._judged_at = float("-inf")  # event loop time of the last verdict

    async def evaluate(self, rollout: dict[str, Any]) -> Verdict:
        thresholds = rollout.get("analysis") or {}
        interval = thresholds.get("interval_seconds") or 1.0
        model = rollout["model"]
        self._seen = self.signals.generation(model)
        self._judged_at = asyncio.get_running_loop().time()
        now = time.time()
        # Never judge a rollout on what its versions did before it started.
        started = rollout.get("created_at") or 0.0
        window = min(self.window_seconds or window_for(interval), max(0.0, now - started))
        candidate = self.signals.window(model, rollout["to"], window, now, since=started)
        source = rollout.get("from")
        stable = self.signals.window(model, source, window, now) if source else None
        verdict = judge(candidate, stable, thresholds)
        figures = {**verdict.figures, "window_seconds": window}
        return Verdict(verdict.result, verdict.reason, figures)

    async def wait_for_data(self, rollout: dict[str, Any], timeout: float | None) -> bool:
        """Until the model has news since the last verdict (True), or `timeout` (False).

        The engine races this against its own wake-up so that a verdict follows each Envoy
        flush (and vLLM scrape) at once; verdicts stay at least MIN_GAP_S apart.
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        fresh = await self.signals.wait_for_update(rollout["model"], timeout, after=self._seen)
        ready_at = self._judged_at + MIN_GAP_S
        if deadline is not None:
            ready_at = min(ready_at, deadline)
        if ready_at > loop.time():
            await asyncio.sleep(ready_at - loop.time())
        return fresh
