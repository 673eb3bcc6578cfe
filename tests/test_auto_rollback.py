"""A bad canary is rolled back by itself: real Envoy stats, real vLLM metrics, injected faults.

Timing is measured in bench/, not asserted here: these tests only wait (generously) for the
rollback and check what a user would see afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import aiohttp
import pytest

from tests.conftest import InBackground, http_json, switchyard, wait_until

MODELS = [
    {
        "name": "llama-3-8b",
        "versions": [
            {"name": "v1", "weight": 100, "backend": {"sim": {"ttft_ms": 30}}},
            {"name": "v2", "weight": 0, "backend": {"sim": {"ttft_ms": 30}}},
        ],
    }
]
ANALYSIS = {"interval_seconds": 1, "min_requests": 10, "failure_limit": 1}


class Load(InBackground):
    """Steady traffic through Envoy from a background thread (about 60 requests/s)."""

    def __init__(self, proxy: str, concurrency: int = 6, pause: float = 0.1) -> None:
        self.proxy, self.concurrency, self.pause = proxy, concurrency, pause
        self.statuses: list[tuple[float, str, int]] = []  # (time, version, status)
        super().__init__()

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=5)
        async with aiohttp.ClientSession(timeout=timeout) as session:

            async def worker() -> None:
                body = {"model": "llama-3-8b", "prompt": "x", "max_tokens": 2}
                while not self.stopping.is_set():
                    try:
                        async with session.post(f"{self.proxy}/v1/completions", json=body) as r:
                            await r.read()
                            version = r.headers.get("x-switchyard-version", "?")
                            self.statuses.append((time.time(), version, r.status))
                    except (aiohttp.ClientError, TimeoutError):
                        self.statuses.append((time.time(), "?", 0))
                    await asyncio.sleep(self.pause)

            await asyncio.gather(*(worker() for _ in range(self.concurrency)))


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with switchyard("up", tmp_path_factory.mktemp("auto-rollback"), MODELS) as running:
        yield running


@pytest.fixture
def candidate(stack):
    """v2's simulator URL; its faults are cleared and v1 restored after each test."""
    url = stack.api("GET", "/v1/models/llama-3-8b")[1]["versions"][1]["endpoints"][0]
    yield url
    current_url = stack.api("GET", "/v1/models/llama-3-8b")[1]["versions"][1]["endpoints"]
    for endpoint in current_url or [url]:
        with contextlib.suppress(OSError):  # a killed candidate not back yet has no faults
            http_json("DELETE", f"{endpoint}/sim/faults")
    time.sleep(1.5)  # requests slowed by the fault finish and Envoy flushes them (1 s)
    for rollout in stack.api("GET", "/v1/rollouts?active=true")[1]["rollouts"]:
        stack.api("POST", f"/v1/rollouts/{rollout['id']}/abort")
    stack.api("PUT", "/v1/models/llama-3-8b/weights", {"weights": {"v1": 100, "v2": 0}})


def canary(stack, analysis: dict, weight: int = 50) -> dict:
    spec = {
        "model": "llama-3-8b", "to": "v2", "strategy": "canary",
        "steps": [{"set_weight": weight}, {"pause": {"seconds": 60}}],
        "analysis": {**ANALYSIS, **analysis},
    }  # fmt: skip
    status, rollout = stack.api("POST", "/v1/rollouts", spec)
    assert status == 201, rollout
    wait_until(lambda: current(stack, rollout)["weights"]["v2"] == weight, 10)
    return rollout


def current(stack, rollout: dict) -> dict:
    return stack.api("GET", f"/v1/rollouts/{rollout['id']}")[1]


def rolled_back(stack, rollout: dict, timeout: float = 20) -> dict:
    try:
        return wait_until(
            lambda: (r := current(stack, rollout))["phase"] == "rolled_back" and r,
            timeout, message="automatic rollback",
        )  # fmt: skip
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last status: {current(stack, rollout)}") from None


def test_error_storm_on_the_candidate_is_rolled_back(stack, candidate):
    with Load(stack.proxy) as load:
        rollout = canary(stack, {"max_error_rate": 0.05})
        # healthy first: the analysis passes
        wait_until(
            lambda: (current(stack, rollout)["analysis_status"] or {}).get("result") == "pass"
        )
        assert current(stack, rollout)["phase"] == "progressing"
        http_json("POST", f"{candidate}/sim/faults", {"error_rate": 1.0, "status": 500})
        fault_at = time.time()
        done = rolled_back(stack, rollout)
        time.sleep(0.5)
    assert "error_rate" in done["message"] and "max_error_rate 0.05" in done["message"]
    model = stack.api("GET", "/v1/models/llama-3-8b")[1]
    assert {v["name"]: v["weight"] for v in model["versions"]} == {"v1": 100, "v2": 0}
    after = [s for s in load.statuses if s[0] > time.time() - 0.4]
    assert after and all(version == "v1" and status == 200 for _, version, status in after)
    assert all(status == 200 for t, _, status in load.statuses if t < fault_at)
    metrics = _get(f"{stack.admin}/metrics")
    rollbacks = [line for line in metrics.splitlines() if line.startswith("switchyard_rollbacks")]
    assert 'switchyard_rollbacks_total{model="llama-3-8b",reason="error_rate"} 1.0' in rollbacks, (
        rollbacks,
        done["message"],
    )


def test_slow_first_token_is_rolled_back(stack, candidate):
    with Load(stack.proxy):
        rollout = canary(stack, {"max_ttft_p95_ms": 150})
        http_json("POST", f"{candidate}/sim/faults", {"ttft_ms": 400})
        done = rolled_back(stack, rollout)
    assert "ttft_p95_ms" in done["message"]


def test_a_candidate_three_times_slower_than_stable_is_rolled_back(stack, candidate):
    with Load(stack.proxy):
        rollout = canary(stack, {"max_latency_ratio": 2.0})
        time.sleep(2)
        now = current(stack, rollout)
        assert now["phase"] == "progressing", (now["message"], now["analysis_status"])
        http_json("POST", f"{candidate}/sim/faults", {"ttft_ms": 120})
        done = rolled_back(stack, rollout)
    assert "max_latency_ratio 2" in done["message"]


def test_a_hung_candidate_is_rolled_back(stack, candidate):
    with Load(stack.proxy):
        rollout = canary(stack, {"max_latency_p95_ms": 500, "max_error_rate": 0.05})
        http_json("POST", f"{candidate}/sim/faults", {"hang": True})
        done = rolled_back(stack, rollout)
    assert done["weights"] == {"v1": 100, "v2": 0}
    assert "stalled" in done["message"]


def test_low_traffic_is_inconclusive_and_holds(stack, candidate):
    spec = {
        "model": "llama-3-8b", "to": "v2", "strategy": "canary",
        "steps": [{"set_weight": 10}, {"set_weight": 50}],
        "analysis": {**ANALYSIS, "min_requests": 1000, "max_error_rate": 0.05},
    }  # fmt: skip
    status, rollout = stack.api("POST", "/v1/rollouts", spec)
    assert status == 201
    with Load(stack.proxy, concurrency=1, pause=0.2):
        time.sleep(3)
    held = current(stack, rollout)
    assert held["phase"] == "progressing" and held["weights"]["v2"] == 10
    assert held["analysis_status"]["result"] == "inconclusive"
    assert "min_requests 1000" in held["message"]


def test_a_healthy_canary_completes_with_passing_verdicts(stack, candidate):
    spec = {
        "model": "llama-3-8b", "to": "v2", "strategy": "canary",
        "steps": [{"set_weight": 30}, {"pause": {"seconds": 2}}, {"set_weight": 60}],
        "analysis": {**ANALYSIS, "max_error_rate": 0.05, "max_ttft_p95_ms": 500},
    }  # fmt: skip
    with Load(stack.proxy) as load:
        status, rollout = stack.api("POST", "/v1/rollouts", spec)
        assert status == 201
        done = wait_until(
            lambda: (r := current(stack, rollout))["phase"] == "succeeded" and r, 30,
            message="healthy canary to succeed",
        )  # fmt: skip
    assert done["analysis_status"]["result"] == "pass"
    assert all(status == 200 for _, _, status in load.statuses)
    assert stack.api("GET", "/v1/models/llama-3-8b")[1]["stable"] == "v2"


def test_health_endpoint_and_cli_show_the_versions(stack, candidate):
    import subprocess
    import sys

    with Load(stack.proxy):
        time.sleep(2.5)
        status, health = stack.api("GET", "/v1/models/llama-3-8b/health?window=5")
    assert status == 200
    v1 = health["versions"]["v1"]
    assert v1["requests"] > 20 and v1["error_rate"] == 0 and v1["latency_p95_ms"] > 0
    assert v1["ttft_p95_ms"] is not None and v1["ttft_p95_ms"] >= 30
    done = subprocess.run(
        [sys.executable, "-m", "controlplane", "models", "--health", "--server", stack.admin],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "TTFT P95" in done.stdout and "llama-3-8b" in done.stdout
    assert stack.api("GET", "/v1/models/llama-3-8b/health?window=0")[0] == 422


def _get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def test_a_killed_candidate_is_rolled_back(stack, candidate):
    import os
    import signal

    pid_file = stack.state_dir / "pids" / "sim-llama-3-8b@v2.pid"
    with Load(stack.proxy) as load:
        rollout = canary(stack, {"max_error_rate": 0.05})
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
        done = rolled_back(stack, rollout)
        time.sleep(0.5)
    assert done["weights"] == {"v1": 100, "v2": 0}
    after = [s for s in load.statuses if s[0] > time.time() - 0.4]
    assert after and all(status == 200 for _, _, status in after)
    # the local runtime brings the killed simulator back for the next rollout
    wait_until(lambda: stack.api("GET", "/v1/models/llama-3-8b")[1]["versions"][1]["ready"], 20)
