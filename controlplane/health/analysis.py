"""The health analysis: a rollout's candidate judged against its thresholds and its stable.

`judge` is pure: two windows of `Figures` and the rollout's `analysis` thresholds in, one
`Verdict` out. `HealthAnalysis` is the engine's `Analysis`: it reads both windows from
`HealthSignals` and calls `judge`.

Rules, in order:

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
"""

from __future__ import annotations

import time
from typing import Any

from controlplane.health.signals import RETENTION_S, Figures, HealthSignals
from controlplane.rollout.analysis import Verdict
from controlplane.rollout.spec import AnalysisSpec

MIN_WINDOW_S = 3.0
WINDOW_INTERVALS = 3

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


def _num(value: float) -> str:
    """Short and readable: 0.42, 812, 2.5, 0.0012."""
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.4g}"


STALL_FACTOR = 5  # the window must hold this many stable p99 latencies to call a stall
STALL_MIN_S = 2.5  # and at least two of Envoy's 1 s stats flushes


def stalled(candidate: Figures, stable: Figures | None) -> str | None:
    """A hung candidate answers nothing, so it never reaches `min_requests`: catch it here.

    Stalled = requests are in flight on the candidate, none completed in the window, while
    the stable version completes requests well within it (its p99 latency times STALL_FACTOR
    fits in the window). Long generations (p99 near or above the window) never count as a
    stall: there, silence is normal.
    """
    if stable is None or not stable.requests or stable.latency_p99_ms is None:
        return None
    if candidate.requests or not candidate.in_flight or candidate.window_seconds < STALL_MIN_S:
        return None
    if stable.latency_p99_ms * STALL_FACTOR > candidate.window_seconds * 1000:
        return None
    return (
        f"stalled {_num(candidate.in_flight)} requests in flight, none completed in "
        f"{_num(candidate.window_seconds)}s (stable p99 {_num(stable.latency_p99_ms)} ms)"
    )


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
    if candidate.requests < min_requests:
        reason = f"{_num(candidate.requests)} requests < min_requests {min_requests}"
        return Verdict("inconclusive", reason, figures)

    breaches: list[str] = []
    missing: list[str] = []
    skipped: list[str] = []
    for key, name in ABSOLUTE.items():
        limit = used.get(key)
        if limit is None:
            continue
        value = getattr(candidate, name)
        if value is None:
            missing.append(f"no {name} data for {key} {_num(limit)}")
        elif value > limit:
            breaches.append(f"{name} {_num(value)} > {key} {_num(limit)}")

    relative = [(key, name, True) for key, name in RATIOS.items()]
    relative += [(key, name, False) for key, name in DIFFERENCES.items()]
    for key, name, ratio in relative:
        limit = used.get(key)
        if limit is None:
            continue
        value = getattr(candidate, name)
        base = getattr(stable, name) if stable is not None else None
        if stable is None or stable.requests < min_requests:
            count = _num(stable.requests) if stable is not None else "0"
            skipped.append(f"{key}: stable has {count} requests < min_requests {min_requests}")
            continue
        if base is None or (ratio and base <= 0):
            skipped.append(f"{key}: stable has no {name} data")
            continue
        if value is None:
            missing.append(f"no {name} data for {key} {_num(limit)}")
            continue
        if ratio:
            measured = value / base
            if measured > limit:
                breaches.append(
                    f"{name} ratio {_num(measured)} ({_num(value)} vs stable {_num(base)})"
                    f" > {key} {_num(limit)}"
                )
        else:
            measured = value - base
            if measured > limit:
                breaches.append(
                    f"{name} delta {_num(measured)} ({_num(value)} vs stable {_num(base)})"
                    f" > {key} {_num(limit)}"
                )
    if skipped:
        figures["skipped"] = skipped
    if breaches:
        return Verdict("fail", "; ".join(breaches), figures)
    if missing:
        return Verdict("inconclusive", "; ".join(missing), figures)
    checked = len([key for key in used if key != "min_requests"]) - len(skipped)
    reason = f"{checked} checks passed over {_num(candidate.requests)} requests"
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

    async def evaluate(self, rollout: dict[str, Any]) -> Verdict:
        thresholds = rollout.get("analysis") or {}
        interval = thresholds.get("interval_seconds") or 1.0
        now = time.time()
        # Never judge a rollout on what its versions did before it started.
        started = rollout.get("created_at") or 0.0
        window = min(self.window_seconds or window_for(interval), max(0.0, now - started))
        model = rollout["model"]
        candidate = self.signals.window(model, rollout["to"], window, now)
        source = rollout.get("from")
        stable = self.signals.window(model, source, window, now) if source else None
        verdict = judge(candidate, stable, thresholds)
        figures = {**verdict.figures, "window_seconds": window}
        return Verdict(verdict.result, verdict.reason, figures)
