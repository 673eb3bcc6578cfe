"""Live weight changes through the admin API, observed as an OpenAI client through Envoy."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import aiohttp
import openai

from tests.conftest import start_switchyard, switchyard, two_version_models, write_config

CHAT = {"model": "llama-3-8b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


async def _versions_served(proxy: str, count: int, concurrency: int = 16) -> Counter:
    """Send `count` chat requests; count the versions that answered (all must be 200)."""
    served: Counter = Counter()
    queue = iter(range(count))
    async with aiohttp.ClientSession() as session:

        async def worker() -> None:
            for _ in queue:
                async with session.post(f"{proxy}/v1/chat/completions", json=CHAT) as response:
                    assert response.status == 200, await response.text()
                    served[response.headers["x-switchyard-version"]] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return served


def test_flips_apply_live_and_the_next_requests_follow(stack, set_weights):
    model = set_weights("llama-3-8b", v1=0, v2=100)
    assert {v["name"]: v["weight"] for v in model["versions"]} == {"v1": 0, "v2": 100}
    assert asyncio.run(_versions_served(stack.proxy, 300)) == Counter({"v2": 300})

    set_weights("llama-3-8b", v1=100, v2=0)
    assert asyncio.run(_versions_served(stack.proxy, 300)) == Counter({"v1": 300})


def test_even_split_lands_within_four_points(stack, set_weights):
    set_weights("llama-3-8b", v1=50, v2=50)
    served = asyncio.run(_versions_served(stack.proxy, 2000))
    assert sum(served.values()) == 2000
    assert abs(served["v1"] / 2000 - 0.5) <= 0.04, served


def test_cli_changes_the_split(stack, set_weights):
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "controlplane", "weights", "llama-3-8b", "v1=0", "v2=100",
         "--server", stack.admin],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "v2=100%" in done.stdout
    assert asyncio.run(_versions_served(stack.proxy, 50)) == Counter({"v2": 50})


def test_weights_change_is_an_event_and_a_metric(stack, set_weights):
    async def watch() -> dict:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{stack.admin}/v1/events") as events,
        ):
            await asyncio.sleep(0.1)
            change = asyncio.create_task(
                session.put(
                    f"{stack.admin}/v1/models/llama-3-8b/weights",
                    json={"weights": {"v1": 70, "v2": 30}},
                )
            )
            async for line in events.content:
                if line.startswith(b"data:"):
                    (await change).release()
                    return json.loads(line[5:])
        raise AssertionError("no event")

    event = asyncio.run(asyncio.wait_for(watch(), 10))
    assert event["type"] == "weights.changed"
    assert event["weights"] == {"v1": 70, "v2": 30}
    metrics_text = _get_text(f"{stack.admin}/metrics")
    assert 'switchyard_version_weight{model="llama-3-8b",version="v2"} 30.0' in metrics_text
    assert "switchyard_xds_connected_envoys 1.0" in metrics_text


def _get_text(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def test_no_request_fails_while_weights_flip_under_load(tmp_path):
    """Streams in flight keep streaming to the end; new requests never fail."""
    models = two_version_models(sim={"itl_ms": 20})
    with switchyard("up", tmp_path, models) as running:
        results = asyncio.run(_load_during_flips(running))
    assert results["errors"] == []
    assert results["streams_completed"] >= 20
    assert results["requests_completed"] >= 100
    assert set(results["versions"]) == {"v1", "v2"}


async def _load_during_flips(running) -> dict:
    client = openai.AsyncOpenAI(base_url=f"{running.proxy}/v1", api_key="x", max_retries=0)
    results: dict = {
        "errors": [],
        "streams_completed": 0,
        "requests_completed": 0,
        "versions": set(),
    }
    stop = asyncio.Event()

    async def streamer() -> None:
        while not stop.is_set():
            try:
                stream = await client.chat.completions.create(
                    model="llama-3-8b", messages=[{"role": "user", "content": "x"}],
                    max_tokens=15, stream=True,
                )  # fmt: skip
                tokens = [c async for c in stream if c.choices and c.choices[0].delta.content]
                assert len(tokens) == 15, f"stream cut after {len(tokens)} tokens"
                results["streams_completed"] += 1
            except Exception as exc:  # every failure is collected and reported
                results["errors"].append(repr(exc))

    async def requester() -> None:
        while not stop.is_set():
            try:
                raw = await client.completions.with_raw_response.create(
                    model="llama-3-8b", prompt="x", max_tokens=1
                )
                results["versions"].add(raw.headers["x-switchyard-version"])
                results["requests_completed"] += 1
            except Exception as exc:
                results["errors"].append(repr(exc))

    async def flipper() -> None:
        async with aiohttp.ClientSession() as session:
            for i in range(20):
                weights = {"v1": 0, "v2": 100} if i % 2 == 0 else {"v1": 100, "v2": 0}
                url = f"{running.admin}/v1/models/llama-3-8b/weights"
                async with session.put(url, json={"weights": weights}) as response:
                    assert response.status == 200, await response.text()
                await asyncio.sleep(0.1)
        stop.set()

    workers = [streamer() for _ in range(6)] + [requester() for _ in range(4)]
    await asyncio.gather(flipper(), *workers)
    await client.close()
    return results


def test_weights_survive_a_restart(tmp_path):
    config_path, config = write_config(tmp_path, two_version_models())
    running = start_switchyard("up", config_path, config)
    try:
        status, _ = running.api("PUT", "/v1/models/llama-3-8b/weights", {"weights": {"v2": 100}})
        assert status == 200
    finally:
        running.stop()
    running = start_switchyard("up", config_path, config)
    try:
        status, model = running.api("GET", "/v1/models/llama-3-8b")
        assert {v["name"]: v["weight"] for v in model["versions"]} == {"v1": 0, "v2": 100}
        assert model["stable"] == "v2"
        assert asyncio.run(_versions_served(running.proxy, 50)) == Counter({"v2": 50})
    finally:
        running.stop()
