"""LoRA adapters as model versions (docs/lora.md): real `switchyard up`, real Envoy, simulator
servers for the base model (two replicas), the openai SDK.

An adapter version lives on its base's servers: it is loaded on every replica, Envoy rewrites
the body's `model` to its lora name, and it rolls out, rolls back, parks (unloads) and comes
back like any version. Timing is measured in bench/, not asserted here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import aiohttp
import openai
import pytest

from tests.conftest import InBackground, free_port, http_json, switchyard, wait_until

BASE, BOT, OTHER = "llama", "support-bot", "qwen"
ANALYSIS = {"interval_seconds": 1, "min_requests": 10, "max_error_rate": 0.05,
            "failure_limit": 1}  # fmt: skip


def adapter_dir(root: Path, name: str) -> str:
    """What the simulator checks of an adapter: its directory holds adapter_config.json."""
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    return str(path)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("adapters")


@pytest.fixture(scope="module")
def stack(tmp_path_factory, adapters):
    models = [
        # Loading an adapter takes 0.3 s: long enough that a replica routed before its load
        # is done would answer 404 to some requests.
        {"name": BASE, "versions": [{"name": "v1", "weight": 100, "replicas": 2,
                                     "backend": {"sim": {"lora_load_ms": 300}}}]},
        {"name": BOT, "versions": [{"name": "v1", "weight": 100, "backend": {"adapter": {
            "base": BASE, "path": adapter_dir(adapters, "support-v1")}}}]},
        {"name": OTHER, "versions": [{"name": "v1", "weight": 100, "backend": {"sim": {}}}]},
    ]  # fmt: skip
    with switchyard("up", tmp_path_factory.mktemp("lora"), models) as running:
        wait_until(lambda: version(running, BOT, "v1")["ready"], 20, message="v1 ready")
        yield running


@pytest.fixture
def lora(stack, adapters):
    """The stack with v2 added (an adapter from another directory), put back afterwards:
    no rollout, all traffic on v1, v2 removed, no fault left on the base's servers."""
    status, body = stack.api("POST", f"/v1/models/{BOT}/versions", {
        "name": "v2",
        "backend": {"adapter": {"base": BASE, "path": adapter_dir(adapters, "support-v2")}}})
    assert status == 201, body
    wait_until(lambda: version(stack, BOT, "v2")["ready"], 20, message="v2 loaded everywhere")
    yield stack
    for url in base_urls(stack):
        with contextlib.suppress(OSError):
            http_json("DELETE", f"{url}/sim/faults")
    for rollout in stack.api("GET", "/v1/rollouts?active=true")[1]["rollouts"]:
        stack.api("POST", f"/v1/rollouts/{rollout['id']}/abort")
    status, body = stack.api("POST", "/v1/rollback", {"model": BOT, "to": "v1"})
    assert status == 200, body
    wait_until(lambda: stack.api("DELETE", f"/v1/models/{BOT}/versions/v2")[0] == 204, 20,
               interval=0.2, message="v2 removed")  # fmt: skip


def version(stack, model: str, name: str) -> dict:
    status, body = stack.api("GET", f"/v1/models/{model}")
    assert status == 200, body
    return next(v for v in body["versions"] if v["name"] == name)


def base_urls(stack) -> list[str]:
    return version(stack, BASE, "v1")["endpoints"]


def listed(url: str) -> dict[str, dict]:
    """What one base server serves: the base and its adapters, by id."""
    with urllib.request.urlopen(f"{url}/v1/models", timeout=5) as response:
        return {entry["id"]: entry for entry in json.load(response)["data"]}


def client_for(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.proxy}/v1", api_key="unused", max_retries=0)


def served(client: openai.OpenAI, **extra) -> tuple[str, str, str]:
    """(x-switchyard-version, the response's model, its text) of one completion."""
    raw = client.completions.with_raw_response.create(
        model=BOT, prompt="the quick brown fox", max_tokens=4, **extra)  # fmt: skip
    completion = raw.parse()
    return raw.headers["x-switchyard-version"], completion.model, completion.choices[0].text


class Load(InBackground):
    """Steady completions through Envoy for each model: (time, model, version, status,
    body) per request, status 0 when it failed without an answer."""

    def __init__(self, proxy: str, models: tuple[str, ...], concurrency: int = 3) -> None:
        self.proxy, self.models, self.concurrency = proxy, models, concurrency
        self.results: list[tuple[float, str, str, int, str]] = []
        super().__init__()

    async def run(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:

            async def worker(model: str) -> None:
                body = {"model": model, "prompt": "x", "max_tokens": 2}
                while not self.stopping.is_set():
                    sent = time.time()
                    try:
                        async with session.post(f"{self.proxy}/v1/completions", json=body) as r:
                            text = await r.text()
                            self.results.append((sent, model, r.headers.get(
                                "x-switchyard-version", "?"), r.status, text))  # fmt: skip
                    except (aiohttp.ClientError, TimeoutError) as exc:
                        self.results.append((sent, model, "?", 0, repr(exc)))
                    await asyncio.sleep(0.03)

            await asyncio.gather(*(worker(model) for model in self.models
                                   for _ in range(self.concurrency)))  # fmt: skip

    def failures(self, model: str) -> list[tuple[float, str, str, int, str]]:
        return [r for r in self.results if r[1] == model and r[3] != 200]


def test_adapter_versions_are_loaded_on_every_replica_and_served_under_the_public_name(lora):
    urls = base_urls(lora)
    assert len(urls) == 2
    for url in urls:  # each base server serves both adapters under their lora names
        models = listed(url)
        assert models[f"{BOT}--v1"]["parent"] == BASE and models[f"{BOT}--v2"]["parent"] == BASE
        assert models[f"{BOT}--v2"]["root"].endswith("support-v2")
    v2 = version(lora, BOT, "v2")
    assert (v2["state"], sorted(v2["endpoints"]), v2["replicas"]) == ("active", sorted(urls), 2)
    assert v2["backend"] == {"adapter": {"base": BASE, "path": v2["backend"]["adapter"]["path"]}}

    client = client_for(lora)
    assert [m.id for m in client.models.list()] == [BASE, BOT, OTHER]  # the public name, once
    assert lora.api("PUT", f"/v1/models/{BOT}/weights", {"weights": {"v1": 50, "v2": 50}})[0] == 200
    answers = Counter(served(client) for _ in range(40))
    # Two adapters, two sets of weights: each version answers with its own words, and the
    # response's `model` is the adapter vLLM ran (its lora name).
    assert {(v, m) for v, m, _ in answers} == {("v1", f"{BOT}--v1"), ("v2", f"{BOT}--v2")}
    texts = {v: t for v, _, t in answers}
    assert texts["v1"] != texts["v2"]
    base_text = client.completions.create(model=BASE, prompt="the quick brown fox",
                                          max_tokens=4).choices[0].text  # fmt: skip
    assert base_text not in texts.values()
    # A pin reaches one version, streaming included.
    stream = client.completions.create(model=BOT, prompt="x", max_tokens=3, stream=True,
                                       extra_headers={"x-switchyard-version": "v2"})  # fmt: skip
    chunks = list(stream)
    assert {chunk.model for chunk in chunks} == {f"{BOT}--v2"}
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed == " ".join(texts["v2"].split()[:3])
    # A body sent as a form (curl -d) is JSON all the same: the rewrite still happens.
    request = urllib.request.Request(
        f"{lora.proxy}/v1/completions", method="POST",
        data=json.dumps({"model": BOT, "prompt": "x", "max_tokens": 1}).encode(),
        headers={"content-type": "application/x-www-form-urlencoded",
                 "x-switchyard-version": "v1"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=10) as response:
        assert json.load(response)["model"] == f"{BOT}--v1"
    # A lora name is not a public name: a client cannot pick an adapter past the split.
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model=f"{BOT}--v2", prompt="x", max_tokens=1)


def test_sticky_ab_keeps_a_user_on_one_adapter(lora):
    status, body = lora.api("POST", "/v1/rollouts", {
        "model": BOT, "to": "v2", "strategy": "ab", "weight": 50,
        "sticky": {"header": "x-user-id"}})  # fmt: skip
    assert status == 201, body
    wait_until(lambda: version(lora, BOT, "v2")["weight"] == 50, 10)
    client = client_for(lora)
    seen: dict[str, set[str]] = {}
    for user in range(12):
        for _ in range(3):
            v, model, _ = served(client, extra_headers={"x-user-id": f"user-{user}"})
            assert model == f"{BOT}--{v}"
            seen.setdefault(f"user-{user}", set()).add(v)
    assert all(len(versions) == 1 for versions in seen.values())
    assert set().union(*seen.values()) == {"v1", "v2"}


@pytest.mark.parametrize(
    ("model", "body", "field", "words"),
    [
        (BOT, {"name": "v3", "backend": {"adapter": {"base": "nope", "path": "/a"}}},
         "backend.adapter.base", "no model 'nope'"),
        (BOT, {"name": "v3", "backend": {"adapter": {"base": BOT, "path": "/a"}}},
         "backend.adapter.base", "another model"),
        (BOT, {"name": "v3", "backend": {"adapter": {"base": BASE, "path": "/a",
                                                     "lora_name": f"{BOT}--v1"}}},
         "backend.adapter.lora_name", f"{BOT}@v1 is loaded on 'llama'"),
        (BOT, {"name": "v3", "backend": {"adapter": {"base": BASE, "path": "/a",
                                                     "lora_name": BASE}}},
         "backend.adapter.lora_name", "the base model's own name"),
        (BOT, {"name": "v3", "replicas": 2, "backend": {"adapter": {"base": BASE,
                                                                    "path": "/a"}}},
         "replicas", "every replica of its base"),
        (BASE, {"name": "v3", "backend": {"adapter": {"base": BOT, "path": "/a"}}},
         "backend.adapter.base", "'support-bot' has LoRA adapter versions itself"),
        # An adapter on llama would break support-bot, whose base llama is: refused.
        (BASE, {"name": "v3", "backend": {"adapter": {"base": OTHER, "path": "/a"}}},
         "backend", "models[support-bot].versions[v1].backend.adapter.base: 'llama' has "
         "LoRA adapter versions itself (v3)"),
    ],
)  # fmt: skip
def test_bad_adapter_versions_are_refused_and_change_nothing(stack, model, body, field, words):
    before = stack.api("GET", "/v1/models")[1]
    loaded = [set(listed(url)) for url in base_urls(stack)]
    status, reply = stack.api("POST", f"/v1/models/{model}/versions", body)
    assert status == 422, reply
    assert reply["error"]["field"] == field and words in reply["error"]["message"], reply
    assert stack.api("GET", "/v1/models")[1] == before
    time.sleep(0.3)
    assert [set(listed(url)) for url in base_urls(stack)] == loaded


def test_a_model_of_adapters_on_a_base_that_is_an_adapter_is_refused(stack):
    adapter = {"adapter": {"base": BOT, "path": "/a"}}
    status, reply = stack.api("POST", "/v1/models", {"name": "other-bot", "versions": [
        {"name": "v1", "weight": 100, "backend": adapter}]})  # fmt: skip
    assert status == 422, reply
    assert reply["error"]["field"] == "versions[v1].backend.adapter.base"
    assert "'support-bot' has LoRA adapter versions itself" in reply["error"]["message"]
    assert stack.api("GET", "/v1/models/other-bot")[0] == 404


def test_a_failing_adapter_canary_is_rolled_back_and_the_base_sees_no_error(lora):
    with Load(lora.proxy, (BOT, BASE)) as load:
        time.sleep(1.5)
        status, rollout = lora.api("POST", "/v1/rollouts", {
            "model": BOT, "to": "v2", "strategy": "canary",
            "steps": [{"set_weight": 50}, {"pause": {}}], "analysis": ANALYSIS})  # fmt: skip
        assert status == 201, rollout
        wait_until(lambda: lora.api("GET", f"/v1/rollouts/{rollout['id']}")[1]["phase"]
                   == "paused", 20, message="canary at 50 %")  # fmt: skip
        time.sleep(2)  # v2 serves and passes
        for url in base_urls(lora):  # break v2's adapter on every server; the base is fine
            status, _ = http_json("POST", f"{url}/sim/faults", {
                "adapter": f"{BOT}--v2", "error_rate": 1.0, "status": 500})  # fmt: skip
            assert status == 200
        broken = time.time()
        done = wait_until(
            lambda: (r := lora.api("GET", f"/v1/rollouts/{rollout['id']}")[1])["phase"]
            == "rolled_back" and r, 30, interval=0.1, message="rolled back")  # fmt: skip
        time.sleep(1)
    assert "error_rate" in done["message"], done
    assert version(lora, BOT, "v1")["weight"] == 100
    assert load.failures(BASE) == []  # the base model's own traffic: not one error
    # Nor did the adapter's clients see one: while a rollout runs, Envoy retries a 5xx on
    # stable's hosts, and the retry names v1's adapter (the body is rewritten per host).
    assert load.failures(BOT) == []
    base_ok = [r for r in load.results if r[1] == BASE and r[0] > broken]
    assert len(base_ok) > 20
    # After the rollback every adapter request is v1's again, and succeeds.
    after = [r for r in load.results if r[1] == BOT and r[0] > time.time() - 0.8]
    assert after and all(r[2] == "v1" and r[3] == 200 for r in after)


def test_a_mirrored_copy_reaches_the_candidates_own_adapter(lora):
    for url in base_urls(lora):  # v2's adapter fails: only its copies can see that
        assert http_json("POST", f"{url}/sim/faults", {
            "adapter": f"{BOT}--v2", "error_rate": 1.0, "status": 500})[0] == 200  # fmt: skip
    mirror = {"model": BOT, "to": "v2", "strategy": "mirror", "percent": 100}
    status, body = lora.api("POST", "/v1/rollouts", mirror)
    assert status == 201, body
    wait_until(lambda: lora.api("GET", f"/v1/models/{BOT}")[1]["traffic_policy"], 10)
    client = client_for(lora)
    assert {served(client)[:2] for _ in range(20)} == {("v1", f"{BOT}--v1")}

    def v2_errors() -> float:
        health = lora.api("GET", f"/v1/models/{BOT}/health?window=30")[1]["versions"]
        return health["v2"]["errors"]

    # Envoy's stats for v2 count the copies' 500s: they ran v2's adapter, not v1's.
    wait_until(lambda: v2_errors() >= 10, 10, interval=0.2, message="copies failed on v2")


def test_a_successful_rollout_unloads_the_old_adapter_from_every_replica(lora):
    status, rollout = lora.api("POST", "/v1/rollouts", {"model": BOT, "to": "v2",
                                                        "strategy": "immediate"})  # fmt: skip
    assert status == 201, rollout
    wait_until(lambda: version(lora, BOT, "v1")["state"] == "stopped", 20, interval=0.1,
               message="v1 parked")  # fmt: skip
    for url in base_urls(lora):
        models = listed(url)
        assert f"{BOT}--v1" not in models and f"{BOT}--v2" in models
    client = client_for(lora)
    assert {served(client)[:2] for _ in range(10)} == {("v2", f"{BOT}--v2")}
    assert version(lora, BOT, "v1")["endpoints"] == []
    # The emergency rollback loads it again everywhere before it gets traffic.
    status, body = lora.api("POST", "/v1/rollback", {"model": BOT})
    assert status == 200, body
    assert version(lora, BOT, "v1")["ready"]
    for url in base_urls(lora):
        assert f"{BOT}--v1" in listed(url)
    assert {served(client)[:2] for _ in range(10)} == {("v1", f"{BOT}--v1")}


def test_a_restarted_base_replica_gets_its_adapters_back_before_adapter_traffic(lora):
    before = set(base_urls(lora))
    pid_file = lora.state_dir / "pids" / f"sim-{BASE}@v1.0.pid"
    routed_early: list[str] = []
    with Load(lora.proxy, (BOT,), concurrency=4) as load:
        time.sleep(1)
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
        killed = time.time()

        def joined() -> bool:
            """The restarted replica in the adapter's endpoints; when it first is, it
            already serves the adapter (a load takes 0.3 s)."""
            for name in ("v1", "v2"):
                new = set(version(lora, BOT, name)["endpoints"]) - before
                for url in new:
                    if f"{BOT}--{name}" not in listed(url):
                        routed_early.append(f"{name} at {url}")
            return all(set(version(lora, BOT, n)["endpoints"]) - before for n in ("v1", "v2"))

        wait_until(joined, 30, interval=0.02, message="the restarted replica serves adapters")
        time.sleep(1.5)
    assert routed_early == []
    new = set(base_urls(lora)) - before
    assert len(new) == 1 and len(base_urls(lora)) == 2
    restarted = listed(new.pop())
    assert f"{BOT}--v1" in restarted and f"{BOT}--v2" in restarted
    failures = load.failures(BOT)
    # No request met a server without the adapter (vLLM's 404); only those in flight on
    # the killed process when it died may have failed.
    assert not [f for f in failures if f[3] == 404], failures
    assert all(abs(f[0] - killed) < 1 for f in failures), failures
    assert len(failures) <= 4, failures
    assert any(r[0] > killed + 1 and r[3] == 200 for r in load.results)


def test_an_analysis_on_figures_vllm_keeps_per_server_is_refused_for_adapters(lora):
    for key in ("max_ttft_p95_ms", "max_itl_p95_ms", "max_ttft_ratio"):
        status, reply = lora.api("POST", "/v1/rollouts", {
            "model": BOT, "to": "v2", "strategy": "gradual", "duration_seconds": 10,
            "step_percent": 50, "analysis": {**ANALYSIS, key: 500}})  # fmt: skip
        assert status == 422, reply
        assert reply["error"]["field"] == f"analysis.{key}"
        assert "LoRA adapter" in reply["error"]["message"]
    assert lora.api("GET", "/v1/rollouts?active=true")[1]["rollouts"] == []
    assert version(lora, BOT, "v2")["weight"] == 0


def test_the_cli_adds_an_adapter_version_and_shows_its_base(stack, adapters):
    path = adapter_dir(adapters, "support-v3")
    done = cli(stack, "models", "add-version", BOT, f"v3=adapter:{BASE}={path}",
               "--lora-name", "support-three")  # fmt: skip
    try:
        assert done.returncode == 0, done.stderr
        assert f"added {BOT}@v3 at 0% (adapter backend)" in done.stdout
        assert "active" in done.stdout  # it waited until loaded everywhere
        for url in base_urls(stack):
            assert listed(url)["support-three"]["root"] == path
        table = cli(stack, "models").stdout
        row = next(line for line in table.splitlines() if line.split()[:2] == [BOT, "v3"])
        assert f"on {BASE}: " in row and "yes 2/2" in row
        bad = cli(stack, "models", "add-version", BOT, "v4=adapter:/only/a/path")
        assert bad.returncode == 2 and "adapter:BASE=PATH" in bad.stderr
    finally:
        cli(stack, "models", "remove-version", BOT, "v3")
    wait_until(lambda: all("support-three" not in listed(url) for url in base_urls(stack)), 10,
               message="v3 unloaded when removed")  # fmt: skip


def test_a_restarted_control_plane_finds_its_adapters_on_a_url_base(tmp_path, adapters):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    sim = subprocess.Popen([sys.executable, "-m", "controlplane", "sim", "--port", str(port),
                            "--model", BASE], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_until(lambda: _answers(f"{base}/health"), message="sim up")
        models = [
            {"name": BASE, "versions": [{"name": "v1", "weight": 100, "backend": {"url": base}}]},
            {"name": BOT, "versions": [{"name": "v1", "weight": 100, "backend": {"adapter": {
                "base": BASE, "path": adapter_dir(adapters, "url-v1")}}}]},
        ]  # fmt: skip
        v2 = {"name": "v2", "backend": {"adapter": {"base": BASE,
                                                    "path": adapter_dir(adapters, "url-v2")}}}
        with switchyard("up", tmp_path, models) as stack:
            assert stack.api("POST", f"/v1/models/{BOT}/versions", v2)[0] == 201
            wait_until(lambda: version(stack, BOT, "v2")["ready"], 20)
        # Not ours to clean up: the server keeps serving them while no control plane runs.
        assert {f"{BOT}--v1", f"{BOT}--v2"} <= set(listed(base))
        # Restarted with v1 read from elsewhere now: found loaded from the old path, it is
        # loaded again from the new one; v2 (added at run time) is found as it was.
        models[1]["versions"][0]["backend"]["adapter"]["path"] = adapter_dir(adapters, "url-v1b")
        with switchyard("up", tmp_path, models) as stack:
            wait_until(lambda: version(stack, BOT, "v1")["ready"]
                       and version(stack, BOT, "v2")["ready"], 20)  # fmt: skip
            roots = {name: entry["root"] for name, entry in listed(base).items()}
            assert roots[f"{BOT}--v1"].endswith("url-v1b") and roots[f"{BOT}--v2"].endswith(
                "url-v2")  # fmt: skip
            client = client_for(stack)
            for name in ("v1", "v2"):
                pinned = served(client, extra_headers={"x-switchyard-version": name})
                assert pinned[:2] == (name, f"{BOT}--{name}")
            assert "adapter.load_failed" not in stack.logs()
    finally:
        sim.kill()
        sim.wait()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def cli(stack, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "controlplane", *args, "--server", stack.admin],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
