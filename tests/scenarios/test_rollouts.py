"""Weights, a canary, and candidates that fail for real: a hung server (SIGSTOP) and a dead one
(SIGKILL), rolled back by the analysis from Envoy's stats and the backends' own /metrics.

The 2 s bound on a rollback is the project's worst case (docs/benchmarks.md measures it);
here it only has to hold on a shared two-core machine with three vLLM servers on it.
"""

from __future__ import annotations

import os
import signal
import time

from tests.conftest import near_share, wait_until
from tests.scenarios import backends
from tests.scenarios.conftest import (
    MODEL,
    Load,
    current,
    rollout,
    until_phase,
    version_of,
)

ANALYSIS = {"interval_seconds": 1, "min_requests": 10, "failure_limit": 1,
            "max_error_rate": 0.05}  # fmt: skip
ROLLBACK_WITHIN_S = 2.0


def served(client, count: int) -> list[str]:
    versions = []
    for _ in range(count):
        raw = client.completions.with_raw_response.create(model=MODEL, prompt="x", max_tokens=1)
        versions.append(raw.headers["x-switchyard-version"])
    return versions


def test_a_weight_change_splits_the_traffic(tiny, client):
    status, body = tiny.api("PUT", f"/v1/models/{MODEL}/weights",
                            {"weights": {"v1": 50, "v2": 50}})  # fmt: skip
    assert status == 200, body
    versions = served(client, 60)
    assert near_share(versions.count("v2"), len(versions), 0.5)


def test_a_healthy_canary_succeeds_on_passing_verdicts_and_parks_the_old_stable(tiny, client):
    spec = {"strategy": "canary", "analysis": {**ANALYSIS, "max_ttft_p95_ms": 2000},
            "steps": [{"set_weight": 50}, {"pause": {"seconds": 3}}, {"set_weight": 100}]}
    with Load(tiny.proxy) as load:
        done = until_phase(tiny, rollout(tiny, spec), "succeeded", 60)
    assert done["analysis_status"]["result"] == "pass", done["analysis_status"]
    figures = done["analysis_status"]["figures"]["candidate"]
    assert figures["ttft_p95_ms"] is not None  # from the backend's own /metrics
    assert not load.failures(), load.failures()[:5]
    assert set(served(client, 5)) == {"v2"}
    assert tiny.api("GET", f"/v1/models/{MODEL}")[1]["stable"] == "v2"
    wait_until(lambda: version_of(tiny, "v1")["state"] == "sleeping", 30,
               message="the old stable parked")  # fmt: skip


def _rolled_back_after(stack, spec: dict, fault, recover=lambda: None) -> tuple[dict, float, Load]:
    """Run a canary at 50 % under load, inject `fault` once it passes, and return the rolled
    back rollout and how long after the fault its rollback was recorded. The generations are
    long enough (~0.3 s) for five of them to outlast a stats flush, as real ones do."""
    with Load(stack.proxy, concurrency=6, timeout=30, max_tokens=96) as load:
        canary = rollout(stack, spec)
        until_phase(stack, canary, "progressing", 10)
        wait_until(lambda: (current(stack, canary)["analysis_status"] or {}).get("result")
                   == "pass", 60, message="a passing verdict first")  # fmt: skip
        fault_at = time.time()
        fault()
        until_phase(stack, canary, "rolled_back", 30)
        recover()  # the requests the fault held finish: the load stops at once
        time.sleep(0.5)
    done = current(stack, canary)  # the history entry follows the Envoys' ACK
    seconds = rolled_back_at(done) - fault_at
    print(f"rolled back {seconds:.2f} s after the fault ({backends.KIND}): {done['message']}")
    return done, seconds, load


def rolled_back_at(rollout: dict) -> float:
    return min(h["time"] for h in rollout["history"] if h["phase"] == "rolled_back")


# Few requests suffice: a busy shared machine makes real vLLM's long generations slow.
CANARY = {"strategy": "canary", "analysis": {**ANALYSIS, "min_requests": 4},
          "steps": [{"set_weight": 50}, {"pause": {"seconds": 120}}]}  # fmt: skip


def test_a_hung_candidate_is_rolled_back_within_two_seconds(tiny, client):
    pid = backends.pid_of(tiny.state_dir, MODEL, "v2")
    try:
        done, seconds, load = _rolled_back_after(tiny, CANARY,
                                                 lambda: os.kill(pid, signal.SIGSTOP),
                                                 lambda: os.kill(pid, signal.SIGCONT))
    finally:
        os.kill(pid, signal.SIGCONT)
    assert "stalled" in done["message"], done["message"]
    assert seconds <= ROLLBACK_WITHIN_S, (seconds, done["message"])
    assert done["weights"] == {"v1": 100, "v2": 0}
    after = [r for r in load.results if r[0] > rolled_back_at(done)]
    assert all(status == 200 for _, _, status in after), after
    assert set(served(client, 5)) == {"v1"}


def test_a_killed_candidate_is_rolled_back_within_two_seconds(tiny, client):
    pid = backends.pid_of(tiny.state_dir, MODEL, "v2")
    done, seconds, load = _rolled_back_after(tiny, CANARY, lambda: os.kill(pid, signal.SIGKILL))
    assert seconds <= ROLLBACK_WITHIN_S, (seconds, done["message"])
    assert done["weights"] == {"v1": 100, "v2": 0}
    after = [r for r in load.results if r[0] > rolled_back_at(done)]
    assert all(status == 200 for _, _, status in after), after
    assert set(served(client, 5)) == {"v1"}
