"""Every strategy end to end: admin API or CLI in, the split observed through Envoy out."""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import sys
import time
from collections import Counter

import aiohttp
import pytest

from tests.conftest import http_json, near_share, switchyard, wait_until

MODELS = [
    {
        "name": "llama-3-8b",
        "versions": [
            {"name": "v1", "weight": 100, "backend": {"sim": {}}},
            {"name": "v2", "weight": 0, "backend": {"sim": {}}},
        ],
    },
    {
        "name": "qwen-2-7b",
        "versions": [
            {"name": "v1", "weight": 100, "backend": {"sim": {}}},
            {"name": "v2", "weight": 0, "backend": {"sim": {}}},
        ],
    },
]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with switchyard("up", tmp_path_factory.mktemp("rollouts"), MODELS) as running:
        yield running


@pytest.fixture
def clean(stack):
    """Each test starts from v1 stable with no active rollout, whatever the last one left."""
    yield
    for rollout in stack.api("GET", "/v1/rollouts?active=true")[1]["rollouts"]:
        stack.api("POST", f"/v1/rollouts/{rollout['id']}/abort")
    for model in ("llama-3-8b", "qwen-2-7b"):
        stack.api("PUT", f"/v1/models/{model}/weights", {"weights": {"v1": 100, "v2": 0}})


def observed(stack, count: int = 400, model: str = "llama-3-8b", headers=None) -> Counter:
    async def run() -> Counter:
        served: Counter = Counter()
        body = {"model": model, "prompt": "x", "max_tokens": 1}
        async with aiohttp.ClientSession() as session:

            async def one(i: int) -> None:
                extra = headers(i) if callable(headers) else headers
                async with session.post(
                    f"{stack.proxy}/v1/completions", json=body, headers=extra
                ) as r:
                    assert r.status == 200, await r.text()
                    served[r.headers["x-switchyard-version"]] += 1

            for start in range(0, count, 50):
                await asyncio.gather(*(one(i) for i in range(start, min(count, start + 50))))
        return served

    return asyncio.run(run())


def start(stack, **spec) -> dict:
    status, rollout = stack.api("POST", "/v1/rollouts", {"model": "llama-3-8b", "to": "v2", **spec})
    assert status == 201, rollout
    return rollout


def wait_phase(stack, rollout_id: str, *phases: str, timeout: float = 20) -> dict:
    def reached():
        rollout = stack.api("GET", f"/v1/rollouts/{rollout_id}")[1]
        return rollout if rollout["phase"] in phases else None

    return wait_until(reached, timeout, message=f"{rollout_id} to reach {phases}")


def test_canary_split_follows_each_step_and_the_gate_holds(stack, clean):
    rollout = start(
        stack,
        strategy="canary",
        steps=[{"set_weight": 20}, {"pause": {}}, {"set_weight": 60}, {"pause": {}}],
    )
    wait_phase(stack, rollout["id"], "paused")
    served = observed(stack)
    assert near_share(served["v2"], 400, 0.20), served
    time.sleep(0.3)
    assert wait_phase(stack, rollout["id"], "paused")["weights"] == {"v1": 80, "v2": 20}

    stack.api("POST", f"/v1/rollouts/{rollout['id']}/resume")
    wait_until(lambda: stack.api("GET", f"/v1/rollouts/{rollout['id']}")[1]["weights"]["v2"] == 60)
    wait_phase(stack, rollout["id"], "paused")
    served = observed(stack)
    assert near_share(served["v2"], 400, 0.60), served

    status, done = stack.api("POST", f"/v1/rollouts/{rollout['id']}/promote")
    assert status == 200 and done["phase"] == "succeeded"
    assert observed(stack, 200) == Counter({"v2": 200})
    model = stack.api("GET", "/v1/models/llama-3-8b")[1]
    assert model["stable"] == "v2" and model["active_rollout"] is None


def test_abort_returns_all_traffic_to_from(stack, clean):
    rollout = start(stack, strategy="canary", steps=[{"set_weight": 50}, {"pause": {}}])
    wait_phase(stack, rollout["id"], "paused")
    status, aborted = stack.api("POST", f"/v1/rollouts/{rollout['id']}/abort")
    assert status == 200 and aborted["phase"] == "aborted"
    assert observed(stack, 200) == Counter({"v1": 200})


def test_timed_pauses_and_gradual_reach_the_candidate(stack, clean):
    rollout = start(stack, strategy="gradual", duration_seconds=0.6, step_percent=25)
    done = wait_phase(stack, rollout["id"], "succeeded")
    steps = [h["weights"]["v2"] for h in done["history"] if h["event"] == "step"]
    assert steps == [25, 50, 75, 100]
    assert observed(stack, 100) == Counter({"v2": 100})


def test_immediate(stack, clean):
    rollout = start(stack, strategy="immediate")
    wait_phase(stack, rollout["id"], "succeeded")
    assert observed(stack, 100) == Counter({"v2": 100})


def test_sticky_ab_keeps_every_user_on_one_version(stack, clean):
    rollout = start(stack, strategy="ab", weight=30, sticky={"header": "x-user-id"})
    wait_phase(stack, rollout["id"], "paused")
    seen: dict[str, set] = {}

    async def run() -> None:
        async with aiohttp.ClientSession() as session:

            async def user(uid: int) -> None:
                for _ in range(5):
                    body = {"model": "llama-3-8b", "prompt": "x", "max_tokens": 1}
                    headers = {"x-user-id": f"user-{uid}"}
                    async with session.post(
                        f"{stack.proxy}/v1/completions", json=body, headers=headers
                    ) as r:
                        assert r.status == 200
                        seen.setdefault(f"user-{uid}", set()).add(r.headers["x-switchyard-version"])

            await asyncio.gather(*(user(uid) for uid in range(200)))

    asyncio.run(run())
    assert len(seen) == 200
    assert all(len(versions) == 1 for versions in seen.values())
    share = sum(1 for versions in seen.values() if versions == {"v2"}) / 200
    assert 0.18 <= share <= 0.42, share


def test_blue_green_preview_then_flip(stack, clean):
    rollout = start(stack, strategy="blue_green")
    wait_phase(stack, rollout["id"], "paused")
    assert observed(stack, 100) == Counter({"v1": 100})
    assert observed(stack, 20, headers={"x-switchyard-version": "v2"}) == Counter({"v2": 20})
    stack.api("POST", f"/v1/rollouts/{rollout['id']}/promote")
    assert observed(stack, 100) == Counter({"v2": 100})


def test_mirror_copies_traffic_to_the_candidate(stack, clean):
    candidate = stack.api("GET", "/v1/models/llama-3-8b")[1]["versions"][1]["endpoints"][0]
    before = _served_by(candidate)
    rollout = start(stack, strategy="mirror", percent=100)
    wait_phase(stack, rollout["id"], "paused")
    assert observed(stack, 100) == Counter({"v1": 100})
    wait_until(lambda: _served_by(candidate) - before >= 90, message="mirrored requests")


def _served_by(base_url: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    with __import__("urllib.request").request.urlopen(f"{base_url}/metrics") as response:
        text = response.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "vllm:request_success"
        for sample in family.samples
        if sample.name.endswith("_total")
    )


def test_conflicts_and_refusals_change_nothing(stack, clean):
    rollout = start(stack, strategy="canary", steps=[{"set_weight": 10}, {"pause": {}}])
    wait_phase(stack, rollout["id"], "paused")
    status, body = stack.api(
        "POST", "/v1/rollouts", {"model": "llama-3-8b", "to": "v2", "strategy": "immediate"}
    )
    assert status == 409 and body["error"]["field"] == "model"
    status, body = stack.api("PUT", "/v1/models/llama-3-8b/weights", {"weights": {"v2": 100}})
    assert status == 409
    assert stack.api("GET", f"/v1/rollouts/{rollout['id']}")[1]["weights"] == {"v1": 90, "v2": 10}
    stack.api("POST", f"/v1/rollouts/{rollout['id']}/promote")
    status, body = stack.api("POST", f"/v1/rollouts/{rollout['id']}/promote")
    assert status == 409 and "succeeded" in body["error"]["message"]
    status, body = stack.api(
        "POST",
        "/v1/rollouts",
        {"model": "llama-3-8b", "to": "v2", "strategy": "canary", "steps": [{"set_weight": 150}]},
    )
    assert status == 422 and body["error"]["field"] == "steps[0].set_weight"
    assert stack.api("GET", "/v1/rollouts?active=true")[1]["rollouts"] == []


def test_cli_rollback_all_restores_both_models(stack, clean):
    for model in ("llama-3-8b", "qwen-2-7b"):
        status, rollout = stack.api(
            "POST",
            "/v1/rollouts",
            {
                "model": model,
                "to": "v2",
                "strategy": "canary",
                "steps": [{"set_weight": 50}, {"pause": {}}],
            },
        )
        assert status == 201
        wait_phase(stack, rollout["id"], "paused")
    done = _cli(stack, "rollback", "--all")
    assert done.returncode == 0, done.stderr
    assert "llama-3-8b: all traffic on v1" in done.stdout
    assert observed(stack, 100) == Counter({"v1": 100})
    assert observed(stack, 100, model="qwen-2-7b") == Counter({"v1": 100})
    assert stack.api("GET", "/v1/rollouts?active=true")[1]["rollouts"] == []


def test_cli_start_watch_and_exit_codes(stack, clean):
    done = _cli(
        stack,
        "rollout",
        "start",
        "llama-3-8b",
        "--to",
        "v2",
        "--steps",
        "30,100",
        "--pause",
        "0.2s",
        "--watch",
    )
    assert done.returncode == 0, done.stderr
    assert "[succeeded]" in done.stdout.splitlines()[-1]
    assert "v2=30%" in done.stdout
    done = _cli(stack, "rollout", "start", "llama-3-8b", "--to", "v1", "--steps", "20,100")
    assert done.returncode == 0
    assert "gates wait for: switchyard rollout resume" in done.stdout
    rollout_id = done.stdout.split()[1].rstrip(":")
    watcher = subprocess.Popen(
        [sys.executable, "-m", "controlplane", "rollout", "status", rollout_id, "--watch",
         "--server", stack.admin],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_phase(stack, rollout_id, "paused")
        assert _cli(stack, "rollout", "abort", rollout_id).returncode == 0
        out, _ = watcher.communicate(timeout=20)
    finally:
        watcher.kill()
    assert watcher.returncode == 1
    assert "[aborted]" in out
    # Nothing active: the model's status still says how its last rollout ended.
    done = _cli(stack, "rollout", "status", "--model", "llama-3-8b")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "no active rollouts"
    assert done.stdout.splitlines()[1].startswith(f"last: {rollout_id} ")
    assert "[aborted]" in done.stdout
    assert _cli(stack, "rollout", "promote", rollout_id).returncode == 1
    assert (
        _cli(stack, "rollout", "start", "llama-3-8b", "--to", "v2", "--strategy", "nope").returncode
        == 2
    )


def _cli(stack, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "controlplane", *args, "--server", stack.admin],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_events_stream_reports_the_rollout(stack, clean):
    async def run() -> list[str]:
        types: list[str] = []
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{stack.admin}/v1/events") as events,
        ):
            await asyncio.sleep(0.1)
            http_json(
                "POST",
                f"{stack.admin}/v1/rollouts",
                {"model": "llama-3-8b", "to": "v2", "strategy": "immediate"},
            )
            async for line in events.content:
                if line.startswith(b"event:"):
                    types.append(line[6:].strip().decode())
                    if types[-1] == "rollout.succeeded":
                        return types
        return types

    types = asyncio.run(asyncio.wait_for(run(), 15))
    assert types[0] == "rollout.started"
    assert "rollout.step" in types and "weights.changed" in types


def test_a_full_canary_under_streaming_load_fails_no_request(tmp_path):
    models = [
        dict(
            MODELS[0],
            versions=[dict(v, backend={"sim": {"itl_ms": 10}}) for v in MODELS[0]["versions"]],
        )
    ]
    with switchyard("up", tmp_path, models) as running:
        result = asyncio.run(_canary_under_load(running))
    assert result["errors"] == []
    assert result["streams"] >= 50
    assert result["versions"] == {"v1", "v2"}


async def _canary_under_load(running) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{running.proxy}/v1", api_key="x", max_retries=0)
    result: dict = {"errors": [], "streams": 0, "versions": set()}
    done = asyncio.Event()

    async def streamer() -> None:
        while not done.is_set():
            try:
                raw = await client.chat.completions.with_raw_response.create(
                    model="llama-3-8b",
                    messages=[{"role": "user", "content": "x"}],
                    max_tokens=10,
                    stream=True,
                )
                result["versions"].add(raw.headers["x-switchyard-version"])
                stream = raw.parse()
                stream = await stream if inspect.isawaitable(stream) else stream
                chunks = [c async for c in stream if c.choices and c.choices[0].delta.content]
                assert len(chunks) == 10, f"stream cut after {len(chunks)} tokens"
                result["streams"] += 1
            except Exception as exc:  # collected: the test asserts there are none
                result["errors"].append(repr(exc))

    async def roll() -> None:
        async with aiohttp.ClientSession() as session:
            steps = [{"set_weight": w} if i % 2 == 0 else {"pause": {"seconds": 0.3}}
                     for i, w in enumerate([10, 0, 25, 0, 50, 0, 75, 0, 100])]  # fmt: skip
            spec = {"model": "llama-3-8b", "to": "v2", "strategy": "canary", "steps": steps}
            async with session.post(f"{running.admin}/v1/rollouts", json=spec) as response:
                rollout = await response.json()
            while True:
                async with session.get(f"{running.admin}/v1/rollouts/{rollout['id']}") as response:
                    if (await response.json())["phase"] == "succeeded":
                        break
                await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        done.set()

    await asyncio.gather(roll(), *(streamer() for _ in range(50)))
    await client.close()
    return result
