"""One stack for every scenario: `switchyard up` with real Envoy and two models whose
backends are simulators (`make test`) or real vLLM servers (`make test-vllm`).

- `tiny`: v1 (100 %) and v2 (0 %), parked with sleep level 2 after a rollout;
- `tiny-idle`: one version, scaled to zero after 2 s without a request (sleep level 1).

Scenarios leave the stack as they found it (`tiny` back on v1, awake, no rollout), so they
share one start-up: real vLLM servers take tens of seconds each to start on two cores.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import openai
import pytest

from tests.conftest import (
    RUNNING,
    InBackground,
    Running,
    start_switchyard,
    wait_until,
    write_config,
)
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
            {"name": "v1", "weight": 100, "backend": backends.backend(models_dir, itl_ms=3)},
            {"name": "v2", "weight": 0, "backend": backends.backend(models_dir, itl_ms=3)},
        ]},
        {"name": IDLE_MODEL, "idle_timeout_seconds": 2, "wake_timeout_seconds": 60,
         "versions": [{"name": "v1", "weight": 100, "backend": backends.backend(models_dir)}]},
    ]  # fmt: skip
    directory = tmp_path_factory.mktemp(f"scenarios-{backends.KIND}")
    # Envoys report every 0.5 s: the setting under which a hang is rolled back within 2 s
    # (docs/benchmarks.md, section 8).
    config_path, config = write_config(directory, models, health={"stats_flush_seconds": 0.5})
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


class Load(InBackground):
    """Steady completions through Envoy from a background thread: (time sent, version,
    status) of each, status 0 for a request that failed or took longer than `timeout` s."""

    def __init__(self, proxy: str, model: str = MODEL, concurrency: int = 4, pause: float = 0.05,
                 timeout: float = 20.0, max_tokens: int = 2) -> None:  # fmt: skip
        self.proxy, self.model, self.concurrency = proxy, model, concurrency
        self.pause, self.timeout, self.max_tokens = pause, timeout, max_tokens
        self.results: list[tuple[float, str, int]] = []
        super().__init__()

    async def run(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout)) as s:

            async def worker() -> None:
                body = {"model": self.model, "prompt": "x", "max_tokens": self.max_tokens,
                        "ignore_eos": True}
                while not self.stopping.is_set():
                    sent = time.time()
                    try:
                        async with s.post(f"{self.proxy}/v1/completions", json=body) as response:
                            await response.read()
                            version = response.headers.get("x-switchyard-version", "?")
                            self.results.append((sent, version, response.status))
                    except (aiohttp.ClientError, TimeoutError):
                        self.results.append((sent, "?", 0))
                    await asyncio.sleep(self.pause)

            await asyncio.gather(*(worker() for _ in range(self.concurrency)))

    def failures(self) -> list[tuple[float, str, int]]:
        return [result for result in self.results if result[2] != 200]


def rollout(stack: Running, spec: dict) -> dict:
    status, body = stack.api("POST", "/v1/rollouts", {"model": MODEL, "to": "v2", **spec})
    assert status == 201, body
    return body


def current(stack: Running, rollout: dict) -> dict:
    return stack.api("GET", f"/v1/rollouts/{rollout['id']}")[1]


def until_phase(stack: Running, rollout: dict, phase: str, timeout: float = 30) -> dict:
    try:
        return wait_until(lambda: (r := current(stack, rollout))["phase"] == phase and r,
                          timeout, interval=0.05, message=f"rollout {phase}")  # fmt: skip
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last: {current(stack, rollout)}") from None


def is_sleeping(endpoint: str) -> bool:
    with urllib.request.urlopen(f"{endpoint}/is_sleeping", timeout=10) as response:
        return json.load(response)["is_sleeping"]


def answer(client, model: str = MODEL, **options) -> str:
    """A deterministic answer (temperature 0): the same weights give the same text."""
    return client.completions.create(model=model, prompt="the quick brown fox", max_tokens=8,
                                     temperature=0, extra_body={"ignore_eos": True},
                                     **options).choices[0].text  # fmt: skip
