"""One stack for every scenario: `switchyard up` with real Envoy and two models whose
backends are simulators (`make test`) or real vLLM servers (`make test-vllm`).

- `tiny`: v1 (100 %) and v2 (0 %), parked with sleep level 2 after a rollout;
- `tiny-idle`: one version, scaled to zero after 2 s without a request (sleep level 1).

Scenarios leave the stack as they found it (`tiny` back on v1, awake, no rollout), so they
share one start-up: real vLLM servers take tens of seconds each to start on two cores.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.conftest import RUNNING, Running, start_switchyard, wait_until, write_config
from tests.scenarios import backends

MODEL, IDLE_MODEL = "tiny", "tiny-idle"
# Real vLLM takes 20-60 s to start on two shared cores (three servers at once: longer).
READY_TIMEOUT_S = 300.0 if backends.REAL else 30.0


@pytest.fixture(scope="session")
def models_dir() -> Path | None:
    """The generated tiny model and adapter (real vLLM only)."""
    return backends.tiny_model() if backends.REAL else None


@pytest.fixture(scope="session")
def stack(tmp_path_factory, models_dir) -> Iterator[Running]:
    models = [
        {"name": MODEL, "park": "sleep2", "wake_timeout_seconds": 60, "versions": [
            {"name": "v1", "weight": 100, "backend": backends.backend(models_dir)},
            {"name": "v2", "weight": 0, "backend": backends.backend(models_dir)},
        ]},
        {"name": IDLE_MODEL, "idle_timeout_seconds": 2, "wake_timeout_seconds": 60,
         "versions": [{"name": "v1", "weight": 100, "backend": backends.backend(models_dir)}]},
    ]  # fmt: skip
    directory = tmp_path_factory.mktemp(f"scenarios-{backends.KIND}")
    config_path, config = write_config(directory, models)
    running = start_switchyard("up", config_path, config, backends.environment(),
                               timeout=READY_TIMEOUT_S)  # fmt: skip
    try:
        wait_until(lambda: all_ready(running), READY_TIMEOUT_S, interval=0.5,
                   message="every version ready")  # fmt: skip
        yield running
    finally:
        running.stop()
        RUNNING.remove(running)


def all_ready(stack: Running) -> bool:
    status, body = stack.api("GET", "/v1/models")
    assert status == 200, body
    for model in body["models"]:
        for version in model["versions"]:
            if version["state"] == "error":  # it failed to start three times: say why
                log = backends.log_of(stack.state_dir, model["name"], version["name"])
                raise AssertionError(f"{model['name']}@{version['name']} failed to start:\n"
                                     + "\n".join(log.splitlines()[-15:]))
    return all(settled(v) for m in body["models"] for v in m["versions"])


@pytest.fixture
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.proxy}/v1", api_key="unused", max_retries=0,
                         timeout=60)  # fmt: skip


@pytest.fixture
def tiny(stack) -> Iterator[Running]:
    """The stack, put back after the test: no rollout, `tiny` all on v1, every version up."""
    yield stack
    for rollout in stack.api("GET", "/v1/rollouts?active=true")[1]["rollouts"]:
        stack.api("POST", f"/v1/rollouts/{rollout['id']}/abort")
    status, body = stack.api("POST", "/v1/rollback", {"model": MODEL, "to": "v1"})
    assert status == 200, body
    for version in ("v1", "v2"):  # a killed backend restarts (a parked one may stay parked)
        wait_until(lambda v=version: settled(version_of(stack, v)), READY_TIMEOUT_S,
                   interval=0.2, message=f"{MODEL}@{version} up again")  # fmt: skip


def settled(version: dict) -> bool:
    return version["ready"] or version["state"] == "sleeping"


def version_of(stack: Running, name: str, model: str = MODEL) -> dict:
    status, body = stack.api("GET", f"/v1/models/{model}")
    assert status == 200, body
    return next(v for v in body["versions"] if v["name"] == name)
