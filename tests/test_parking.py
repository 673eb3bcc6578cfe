"""Parking defects that need the simulator's timing faults: sleep and wake calls that take
longer than a fixed HTTP timeout, and errors that must never escape a background task.
(The parking scenarios both backends run are in tests/scenarios/test_parking.py.)"""

from __future__ import annotations

import json
import time
import urllib.request

import pytest

from controlplane.config import parse_config
from controlplane.controller import Controller
from tests.conftest import http_json, switchyard, wait_until


def two_versions(**model) -> list[dict]:
    return [{"name": "m", **model, "versions": [
        {"name": "v1", "weight": 100, "backend": {"sim": {}}},
        {"name": "v2", "weight": 0, "backend": {"sim": {}}},
    ]}]  # fmt: skip


def version_of(stack, name: str) -> dict:
    return next(v for v in stack.api("GET", "/v1/models/m")[1]["versions"] if v["name"] == name)


def pinned(stack, version: str, timeout: float = 5) -> int:
    request = urllib.request.Request(
        f"{stack.proxy}/v1/completions", method="POST",
        data=json.dumps({"model": "m", "prompt": "x", "max_tokens": 1}).encode(),
        headers={"content-type": "application/json", "x-switchyard-version": version},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.status


def park_v1(stack) -> None:
    status, body = stack.api("POST", "/v1/rollouts", {"model": "m", "to": "v2",
                                                      "strategy": "immediate"})  # fmt: skip
    assert status == 201, body


def test_a_wake_that_takes_longer_than_five_seconds_is_waited_for(tmp_path):
    """Real wake-ups take seconds to minutes: the rollback waits up to the model's
    wake_timeout_seconds (it used to give up after a fixed 5 s)."""
    with switchyard("up", tmp_path, two_versions(wake_timeout_seconds=30)) as stack:
        endpoint = version_of(stack, "v1")["endpoints"][0]
        http_json("POST", f"{endpoint}/sim/faults", {"wake_ms": 6000})
        park_v1(stack)
        wait_until(lambda: version_of(stack, "v1")["state"] == "sleeping", 20, message="parked")
        started = time.monotonic()
        status, body = stack.api("POST", "/v1/rollback", {"model": "m"})
        assert status == 200, body
        assert time.monotonic() - started >= 6
        assert version_of(stack, "v1")["state"] == "active"
        assert pinned(stack, "v1") == 200


def test_a_sleep_that_times_out_is_never_left_routed_asleep(tmp_path):
    """A /sleep that outlasts its timeout may still complete: the version goes back into
    Envoy only once its engine says it is awake (woken if need be), so no request is held
    by a sleeping engine. It used to go back at once, asleep, and its requests hung."""
    with switchyard("up", tmp_path, two_versions(wake_timeout_seconds=1)) as stack:
        endpoint = version_of(stack, "v1")["endpoints"][0]
        http_json("POST", f"{endpoint}/sim/faults", {"sleep_ms": 6000})
        park_v1(stack)
        wait_until(lambda: "backend.park_failed" in stack.logs(), 20, message="the sleep fails")
        wait_until(lambda: version_of(stack, "v1")["state"] == "active", 10,
                   message="v1 back in service")  # fmt: skip
        assert http_json("GET", f"{endpoint}/is_sleeping")[1] == {"is_sleeping": False}
        assert all(pinned(stack, "v1") == 200 for _ in range(5))


class RaisingRuntime:
    """A runtime whose sleep fails the way an unconverted library error does."""

    async def sleep(self, model: str, version: str, level: int) -> None:
        raise TimeoutError

    async def scale(self, model: str, version: str, replicas: int) -> None:
        raise OSError("connection reset")


@pytest.mark.parametrize("park", ["sleep1", "stop"])
async def test_no_error_escapes_parking(tmp_path, monkeypatch, park):
    """Parking runs in the background: whatever the runtime raises is logged, never raised
    (a plain TimeoutError used to end the task that parked)."""
    config = parse_config({"models": [{"name": "m", "park": park, "versions": [
        {"name": "v1", "weight": 0, "backend": {"sim": {}}},
        {"name": "v2", "weight": 100, "backend": {"sim": {}}},
    ]}]})  # fmt: skip
    controller = Controller(config, tmp_path)
    controller.runtime = RaisingRuntime()
    monkeypatch.setattr("controlplane.controller.PARK_GRACE_S", 0.0)
    try:
        model = controller.state.model("m")
        await controller.park("m", "v1", model.traffic_generation)  # returns, logs
    finally:
        controller.store.close()
