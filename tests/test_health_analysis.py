"""The health analysis: `judge` rules as tables, histogram quantiles, signal windows, and
`HealthAnalysis.evaluate` over hand-fed signals. No I/O."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import pytest

from controlplane.health.analysis import MIN_GAP_S, HealthAnalysis, judge, stalled, window_for
from controlplane.health.signals import Delta, Figures, HealthSignals, Histogram

MODEL = "llama-3-8b"


def figures(**values) -> Figures:
    """A healthy version over a 3 s window: 100 requests, no errors, modest latencies."""
    base = {
        "window_seconds": 3.0,
        "requests": 100.0,
        "errors": 0.0,
        "retries": 0.0,
        "requests_per_second": 100 / 3,
        "error_rate": 0.0,
        "latency_p50_ms": 80.0,
        "latency_p95_ms": 200.0,
        "latency_p99_ms": 300.0,
        "ttft_p95_ms": 50.0,
        "itl_p95_ms": 10.0,
        "running": 2.0,
        "waiting": 0.0,
    }
    return Figures(**{**base, **values})


ALL = {
    "interval_seconds": 1,
    "min_requests": 20,
    "failure_limit": 1,
    "max_error_rate": 0.05,
    "max_latency_p95_ms": 500,
    "max_ttft_p95_ms": 100,
    "max_itl_p95_ms": 30,
    "max_latency_ratio": 2,
    "max_ttft_ratio": 1.5,
    "max_error_rate_delta": 0.02,
}


# -- judge --------------------------------------------------------------------------------------


def test_pass_with_every_threshold() -> None:
    verdict = judge(figures(), figures(), ALL)
    assert verdict.result == "pass", verdict.reason
    assert verdict.reason == "7 checks passed over 100 requests"
    assert verdict.figures["candidate"] == figures().to_json()
    assert verdict.figures["stable"] == figures().to_json()
    used = {key: value for key, value in ALL.items() if key.startswith(("max_", "min_"))}
    assert verdict.figures["thresholds"] == used
    assert "skipped" not in verdict.figures


@pytest.mark.parametrize(
    ("candidate", "thresholds", "reason"),
    [
        (
            {"errors": 42.0, "error_rate": 0.42},
            {"max_error_rate": 0.05},
            "error_rate 0.42 > max_error_rate 0.05",
        ),
        (
            {"latency_p95_ms": 812.4},
            {"max_latency_p95_ms": 500},
            "latency_p95_ms 812 > max_latency_p95_ms 500",
        ),
        (
            {"ttft_p95_ms": 250.0},
            {"max_ttft_p95_ms": 100},
            "ttft_p95_ms 250 > max_ttft_p95_ms 100",
        ),
        (
            {"itl_p95_ms": 42.5},
            {"max_itl_p95_ms": 30},
            "itl_p95_ms 42.5 > max_itl_p95_ms 30",
        ),
    ],
    ids=["error_rate", "latency", "ttft", "itl"],
)
def test_each_absolute_breach_fails(candidate: dict, thresholds: dict, reason: str) -> None:
    verdict = judge(figures(**candidate), figures(), thresholds)
    assert (verdict.result, verdict.reason) == ("fail", reason)
    # The same value exactly at the limit passes: thresholds are inclusive.
    limit = next(iter(thresholds.values()))
    name = next(iter(candidate)) if len(candidate) == 1 else "error_rate"
    assert judge(figures(**{name: float(limit)}), figures(), thresholds).result == "pass"


@pytest.mark.parametrize(
    ("candidate", "thresholds", "reason"),
    [
        (
            {"latency_p95_ms": 500.0},
            {"max_latency_ratio": 2},
            "latency_p95_ms ratio 2.5 (500 vs stable 200) > max_latency_ratio 2",
        ),
        (
            {"ttft_p95_ms": 90.0},
            {"max_ttft_ratio": 1.5},
            "ttft_p95_ms ratio 1.8 (90 vs stable 50) > max_ttft_ratio 1.5",
        ),
        (
            {"errors": 4.0, "error_rate": 0.04},
            {"max_error_rate_delta": 0.02},
            "error_rate delta 0.03 (0.04 vs stable 0.01) > max_error_rate_delta 0.02",
        ),
    ],
    ids=["latency_ratio", "ttft_ratio", "error_rate_delta"],
)
def test_each_relative_breach_fails(candidate: dict, thresholds: dict, reason: str) -> None:
    stable = figures(errors=1.0, error_rate=0.01)
    verdict = judge(figures(**candidate), stable, thresholds)
    assert (verdict.result, verdict.reason) == ("fail", reason)
    # Without the stable to compare with, the same candidate is not failed.
    assert judge(figures(**candidate), None, thresholds).result == "pass"


def test_below_min_requests_is_inconclusive_even_when_failing() -> None:
    candidate = figures(requests=12.0, errors=12.0, error_rate=1.0)
    verdict = judge(candidate, figures(), {"min_requests": 20, "max_error_rate": 0.05})
    assert (verdict.result, verdict.reason) == ("inconclusive", "12 requests < min_requests 20")
    assert verdict.figures["candidate"]["requests"] == 12.0
    # min_requests left out: the spec's default (20) applies.
    verdict = judge(candidate, figures(), {"max_error_rate": 0.05})
    assert verdict.reason == "12 requests < min_requests 20"
    assert verdict.figures["thresholds"] == {"min_requests": 20, "max_error_rate": 0.05}


@pytest.mark.parametrize(
    ("stable", "note"),
    [
        (None, "stable has 0 requests < min_requests 20"),
        (figures(requests=5.0), "stable has 5 requests < min_requests 20"),
        (
            figures(latency_p95_ms=None, ttft_p95_ms=None, error_rate=None),
            "stable has no {name} data",
        ),
    ],
    ids=["no-stable", "stable-too-few", "stable-lacks-figures"],
)
def test_relative_checks_skipped_without_stable_data(stable, note: str) -> None:
    candidate = figures(latency_p95_ms=900.0, ttft_p95_ms=500.0, errors=9.0, error_rate=0.09)
    thresholds = {"max_latency_ratio": 2, "max_ttft_ratio": 1.5, "max_error_rate_delta": 0.02}
    verdict = judge(candidate, stable, thresholds)
    assert verdict.result == "pass", verdict.reason
    assert verdict.reason == "0 checks passed over 100 requests (3 skipped)"
    names = {
        "max_latency_ratio": "latency_p95_ms",
        "max_ttft_ratio": "ttft_p95_ms",
        "max_error_rate_delta": "error_rate",
    }
    assert verdict.figures["skipped"] == [
        f"{key}: {note.format(name=name)}" for key, name in names.items()
    ]
    assert verdict.figures["stable"] == (stable.to_json() if stable else None)


def test_missing_candidate_figure_is_inconclusive_unless_another_check_fails() -> None:
    no_ttft = figures(ttft_p95_ms=None)
    thresholds = {"max_error_rate": 0.05, "max_ttft_p95_ms": 100, "max_ttft_ratio": 2}
    verdict = judge(no_ttft, figures(), thresholds)
    assert verdict.result == "inconclusive"
    assert verdict.reason == (
        "no ttft_p95_ms data for max_ttft_p95_ms 100; no ttft_p95_ms data for max_ttft_ratio 2"
    )
    failing = replace(no_ttft, errors=30.0, error_rate=0.3)
    verdict = judge(failing, figures(), thresholds)
    assert (verdict.result, verdict.reason) == ("fail", "error_rate 0.3 > max_error_rate 0.05")


def test_min_requests_zero_with_no_traffic_is_inconclusive_not_pass() -> None:
    empty = figures(requests=0.0, error_rate=None, latency_p95_ms=None)
    verdict = judge(empty, None, {"min_requests": 0, "max_error_rate": 0.05})
    assert verdict.result == "inconclusive"
    assert verdict.reason == "no error_rate data for max_error_rate 0.05"


def test_multiple_breaches_are_all_listed() -> None:
    candidate = figures(
        errors=42.0, error_rate=0.42, latency_p95_ms=1200.0, ttft_p95_ms=400.0, itl_p95_ms=5.0
    )
    verdict = judge(candidate, figures(), ALL)
    assert verdict.result == "fail"
    assert verdict.reason.split("; ") == [
        "error_rate 0.42 > max_error_rate 0.05",
        "latency_p95_ms 1200 > max_latency_p95_ms 500",
        "ttft_p95_ms 400 > max_ttft_p95_ms 100",
        "latency_p95_ms ratio 6 (1200 vs stable 200) > max_latency_ratio 2",
        "ttft_p95_ms ratio 8 (400 vs stable 50) > max_ttft_ratio 1.5",
        "error_rate delta 0.42 (0.42 vs stable 0) > max_error_rate_delta 0.02",
    ]


def test_null_thresholds_are_not_checked() -> None:
    # The contract's example spec carries explicit nulls.
    thresholds = {"min_requests": 20, "max_error_rate": 0.05, "max_latency_p95_ms": None}
    verdict = judge(figures(latency_p95_ms=99999.0), figures(), thresholds)
    assert (verdict.result, verdict.reason) == ("pass", "1 checks passed over 100 requests")
    assert verdict.figures["thresholds"] == {"min_requests": 20, "max_error_rate": 0.05}


# -- histograms and windows ---------------------------------------------------------------------


def test_histogram_quantile_on_known_data() -> None:
    bounds = (1.0, 2.0, 4.0)
    histogram = Histogram(bounds, [10.0, 10.0, 0.0, 0.0])
    assert histogram.quantile(0.5) == pytest.approx(1.0)
    assert histogram.quantile(0.95) == pytest.approx(1.9)  # 1 + (19 - 10) / 10
    assert histogram.quantile(0.25) == pytest.approx(0.5)
    # Everything above the last bound: the bound is all a histogram can say.
    assert Histogram(bounds, [0.0, 0.0, 0.0, 5.0]).quantile(0.95) == 4.0
    assert Histogram.empty(bounds).quantile(0.95) is None
    # From Prometheus' cumulative `le` counts (one per bound, then +Inf).
    cumulative = Histogram.from_cumulative(bounds, [10.0, 20.0, 20.0, 20.0])
    assert cumulative.counts == [10.0, 10.0, 0.0, 0.0]
    assert cumulative.quantile(0.95) == pytest.approx(1.9)


def test_window_ignores_deltas_outside_it() -> None:
    signals = HealthSignals()
    now = 1000.0
    bounds = (0.1, 0.2)
    slow = Histogram(bounds, [0.0, 0.0, 10.0])
    fast = Histogram(bounds, [10.0, 0.0, 0.0])
    signals.add(MODEL, "v1", Delta(time=now - 10, requests=50, errors=50, ttft_s=slow))
    signals.add(MODEL, "v1", Delta(time=now - 3, requests=7, errors=7))  # on the edge: out
    signals.add(MODEL, "v1", Delta(time=now - 2, requests=10, errors=1, ttft_s=fast))
    signals.add(MODEL, "v1", Delta(time=now, requests=10, errors=0, latency_ms=None))
    signals.add(MODEL, "v1", Delta(time=now + 1, requests=99, errors=99))  # the future: out
    window = signals.window(MODEL, "v1", 3.0, now=now)
    assert (window.requests, window.errors, window.error_rate) == (20.0, 1.0, 0.05)
    assert window.requests_per_second == pytest.approx(20 / 3)
    assert window.ttft_p95_ms == pytest.approx(95.0)
    assert window.latency_p95_ms is None  # no latency data is None, not 0
    assert signals.window(MODEL, "v2", 3.0, now=now).error_rate is None


def test_gauges_are_the_latest_per_source_summed_across_sources() -> None:
    signals = HealthSignals()
    now = 1000.0
    signals.add(MODEL, "v1", Delta(time=now - 2, source="a", running=9, waiting=9))
    signals.add(MODEL, "v1", Delta(time=now - 1, source="a", running=3, waiting=1))
    signals.add(MODEL, "v1", Delta(time=now - 1, source="b", running=4, waiting=None))
    signals.add(MODEL, "v1", Delta(time=now, source="envoy", requests=5))  # no gauges
    window = signals.window(MODEL, "v1", 3.0, now=now)
    assert (window.running, window.waiting) == (7.0, 1.0)
    assert signals.window(MODEL, "v1", 0.5, now=now).running is None


# -- HealthAnalysis -----------------------------------------------------------------------------


def rollout(**analysis) -> dict:
    return {
        "id": "ro-1",
        "model": MODEL,
        "from": "v1",
        "to": "v2",
        "strategy": "canary",
        "analysis": {"interval_seconds": 1, "min_requests": 20, **analysis},
    }


def feed(signals: HealthSignals, version: str, ago: float, requests: int, errors: int) -> None:
    latency = Histogram((100.0, 250.0, 500.0), [requests, 0.0, 0.0, 0.0])
    delta = Delta(time=time.time() - ago, requests=requests, errors=errors, latency_ms=latency)
    signals.add(MODEL, version, delta)


def test_window_scales_with_the_interval() -> None:
    assert window_for(1) == 3.0
    assert window_for(0.2) == 3.0
    assert window_for(5) == 15.0
    assert window_for(3600) == 600.0  # never longer than the signals keep


async def test_evaluate_judges_candidate_against_stable_over_the_window() -> None:
    signals = HealthSignals()
    analysis = HealthAnalysis(signals)
    for ago in (2.5, 1.5, 0.5):
        feed(signals, "v1", ago, requests=30, errors=0)
        feed(signals, "v2", ago, requests=10, errors=0)
    feed(signals, "v2", 20, requests=100, errors=100)  # long ago: outside the window

    verdict = await analysis.evaluate(rollout(max_error_rate=0.05, max_error_rate_delta=0.01))
    assert verdict.result == "pass", verdict.reason
    assert verdict.figures["window_seconds"] == 3.0
    assert verdict.figures["candidate"]["requests"] == 30.0
    assert verdict.figures["stable"]["requests"] == 90.0

    feed(signals, "v2", 0.1, requests=10, errors=8)  # the candidate starts failing
    verdict = await analysis.evaluate(rollout(max_error_rate=0.05, max_error_rate_delta=0.01))
    assert verdict.result == "fail"
    assert verdict.reason == (
        "error_rate 0.2 > max_error_rate 0.05; "
        "error_rate delta 0.2 (0.2 vs stable 0) > max_error_rate_delta 0.01"
    )


async def test_evaluate_is_inconclusive_without_candidate_traffic() -> None:
    signals = HealthSignals()
    feed(signals, "v1", 0.5, requests=100, errors=0)
    feed(signals, "v2", 0.5, requests=12, errors=12)
    verdict = await HealthAnalysis(signals).evaluate(rollout(max_error_rate=0.05))
    assert (verdict.result, verdict.reason) == ("inconclusive", "12 requests < min_requests 20")
    # A longer fixed window sees more: the constructor's window wins over the interval.
    feed(signals, "v2", 8, requests=20, errors=0)
    verdict = await HealthAnalysis(signals, window_seconds=10).evaluate(rollout(max_error_rate=0.5))
    assert verdict.result == "pass", verdict.reason
    assert verdict.figures["window_seconds"] == 10


# -- stalls: a hung candidate answers nothing ----------------------------------------------------


def flushes(signals: HealthSignals, version: str, now: float, rows, source: str = "envoy"):
    """Envoy flushes: (seconds before now, completed requests, requests in flight)."""
    for ago, requests, in_flight in rows:
        delta = Delta(time=now - ago, requests=requests, in_flight=in_flight, source=source)
        signals.add(MODEL, version, delta)


@pytest.mark.parametrize(
    ("rows", "stuck"),
    [
        ([(2, 20, 0), (1, 15, 3), (0, 0, 27)], 1.0),  # hang: one flush with nothing done
        ([(3, 20, 1), (2, 0, 9), (1, 0, 30), (0, 0, 55)], 3.0),  # in flight at the last answer
        ([(2, 0, 2), (1, 0, 10), (0, 0, 30)], 2.0),  # in flight from the first flush on
        ([(1, 0, 3), (0, 5, 8)], None),  # still completing
        ([(2, 10, 1), (1, 0, 1), (0, 0, 1)], None),  # one long generation
        ([(2, 10, 2), (1, 0, 2), (0, 0, 2)], 2.0),  # two: closed-loop clients all stuck
        ([(1, 12, 0)], None),  # nothing in flight
        ([(4, 20, 1), (3, 0, 30)], None),  # no flush for 3 s: says nothing about now
    ],
    ids=[
        "hang",
        "longer-hang",
        "from-the-start",
        "completing",
        "long-request",
        "two-stuck",
        "idle",
        "stale",
    ],
)
def test_stuck_seconds_from_envoy_flushes(rows, stuck) -> None:
    signals = HealthSignals()
    flushes(signals, "v2", 1000.0, rows)
    signals.add(MODEL, "v2", Delta(time=999.5, running=40.0, source="http://sim"))  # a scrape
    assert signals.window(MODEL, "v2", 3.0, now=1000.0).stuck_seconds == stuck


def test_stuck_seconds_across_envoys_and_since() -> None:
    signals = HealthSignals()
    now = 1000.0
    flushes(signals, "v2", now, [(2, 5, 2), (1, 0, 6), (0.2, 0, 9)], source="a")
    flushes(signals, "v2", now, [(1.8, 4, 1), (0.8, 0, 4)], source="b")
    # a's flush 2 s ago came before b's last answers: from then on, a is stuck 0.8 s, b 1 s
    assert signals.window(MODEL, "v2", 3.0, now=now).stuck_seconds == pytest.approx(1.0)
    # Never reaching back before `since` (the rollout's start).
    since = now - 1.5
    assert signals.window(MODEL, "v2", 3.0, now=now, since=since).stuck_seconds == pytest.approx(
        0.8
    )
    # A completion on any Envoy means the version still answers.
    flushes(signals, "v2", now, [(0.1, 1, 0)], source="b")
    assert signals.window(MODEL, "v2", 3.0, now=now).stuck_seconds is None


def test_a_candidate_that_does_not_answer_its_scrapes_is_stalled_after_one_flush() -> None:
    """Real vLLM's generations often take over 200 ms: 5 stable p99s then outlast a flush,
    and a hung candidate waited a second silent flush (3.3 s to roll back). A process that
    does not answer /metrics either is hung, not slow: one flush of silence is enough."""
    slow = figures(latency_p99_ms=400.0)
    hung = figures(requests=3.0, in_flight=6.0, stuck_seconds=1.0, unanswered=1.0)
    assert stalled(hung, slow) == ("stalled 6 requests in flight, none completed in 1s "
                                   "(its /metrics does not answer)")  # fmt: skip
    assert stalled(hung, None) is not None  # no stable to compare with: still hung
    answering = figures(requests=3.0, in_flight=6.0, stuck_seconds=1.0, unanswered=0.0)
    assert stalled(answering, slow) is None  # a live engine, slow: not yet
    assert stalled(figures(requests=3.0, in_flight=6.0, stuck_seconds=0.3, unanswered=1.0),
                   slow) is None  # less than a flush of silence  # fmt: skip


@pytest.mark.parametrize(
    ("stuck", "stable", "stall"),
    [
        (1.0, figures(latency_p99_ms=40.0), "stalled 27 requests in flight, none completed in"
         " 1s (stable p99 40 ms)"),
        (0.3, figures(latency_p99_ms=40.0), None),  # less than one flush interval
        (1.0, figures(latency_p99_ms=2000.0), None),  # slow generations: silence is normal
        (10.0, figures(latency_p99_ms=2000.0), "stalled 27 requests in flight, none completed"
         " in 10s (stable p99 2000 ms)"),  # ... for a while
        (None, figures(latency_p99_ms=40.0), None),  # not stuck
        (5.0, None, None),  # nothing to compare with
        (5.0, figures(requests=0.0, latency_p99_ms=None), None),
    ],
    ids=["hang", "too-short", "slow-stable", "slow-stable-long-hang", "not-stuck", "no-stable",
         "idle-stable"],
)  # fmt: skip
def test_stall_rule(stuck, stable, stall) -> None:
    candidate = figures(requests=3.0, in_flight=27.0, stuck_seconds=stuck)
    assert stalled(candidate, stable) == stall
    verdict = judge(candidate, stable, {"min_requests": 20, "max_error_rate": 0.05})
    assert (verdict.result, verdict.reason) == (
        ("fail", stall) if stall else ("inconclusive", "3 requests < min_requests 20")
    )


def hung(signals: HealthSignals, stable_latency_ms: float, candidate_rows) -> None:
    """The stable answers steadily in `stable_latency_ms`; the candidate as `candidate_rows`."""
    now = time.time()
    bounds = (50.0, 100.0, 1000.0, 2500.0, 5000.0)
    bucket = next(i for i, bound in enumerate(bounds) if stable_latency_ms <= bound)
    for ago in (2.0, 1.0, 0.0):
        counts = [0.0] * (len(bounds) + 1)
        counts[bucket] = 20.0
        latency = Histogram(bounds, counts)
        delta = Delta(time=now - ago, requests=20, latency_ms=latency, in_flight=1, source="e")
        signals.add(MODEL, "v1", delta)
    flushes(signals, "v2", now, candidate_rows, source="e")


HANG = [(2, 5, 0), (1, 5, 3), (0, 0, 27)]  # answers until a second ago, then nothing


@pytest.mark.parametrize(
    ("stable_latency_ms", "candidate_rows", "stuck", "result", "reason"),
    [
        (40, HANG, 1.0, "fail", "stalled 27 requests in flight, none completed in 1s"),
        (2000, HANG, 1.0, "inconclusive", "10 requests < min_requests 20"),
        (40, [(1, 2, 0), (0, 1, 0)], None, "inconclusive", "3 requests < min_requests 20"),
    ],
    ids=["fast-stable-hung-candidate", "slow-generations", "low-traffic-nothing-in-flight"],
)
async def test_evaluate_calls_a_hang_after_one_flush_only_when_safe(
    stable_latency_ms, candidate_rows, stuck, result: str, reason: str
) -> None:
    signals = HealthSignals()
    hung(signals, stable_latency_ms, candidate_rows)
    doc = {**rollout(max_error_rate=0.05), "created_at": time.time() - 60}
    verdict = await HealthAnalysis(signals).evaluate(doc)
    assert verdict.result == result and verdict.reason.startswith(reason), verdict.reason
    assert verdict.figures["candidate"]["stuck_seconds"] == stuck


# -- verdicts follow the data -------------------------------------------------------------------


async def test_wait_for_update_wakes_on_the_models_next_report() -> None:
    signals = HealthSignals()
    assert await signals.wait_for_update(MODEL, 0.01) is False
    seen = signals.generation(MODEL)
    waiter = asyncio.create_task(signals.wait_for_update(MODEL, 5))
    await asyncio.sleep(0.01)
    signals.add("other-model", "v1", Delta())
    assert not waiter.done()  # another model's news does not wake it
    signals.add(MODEL, "v1", Delta())
    assert await asyncio.wait_for(waiter, 1) is True
    # News since a generation seen earlier: no waiting at all.
    assert await signals.wait_for_update(MODEL, None, after=seen) is True
    assert await signals.wait_for_update(MODEL, 0.01, after=signals.generation(MODEL)) is False
    assert signals._waiters == {}  # nothing left behind


async def test_wait_for_data_keeps_verdicts_apart_and_bounded() -> None:
    signals = HealthSignals()
    analysis = HealthAnalysis(signals)
    doc = {**rollout(max_error_rate=0.05), "created_at": time.time() - 60}
    loop = asyncio.get_running_loop()
    await analysis.evaluate(doc)
    judged = loop.time()
    signals.add(MODEL, "v2", Delta())  # news right after a verdict ...
    assert await analysis.wait_for_data(doc, 5) is True
    assert loop.time() - judged >= MIN_GAP_S * 0.9  # ... waits for the gap
    await analysis.evaluate(doc)
    started = loop.time()
    assert await analysis.wait_for_data(doc, 0.3) is False  # no news: the interval bounds it
    assert 0.25 <= loop.time() - started < 1.0
