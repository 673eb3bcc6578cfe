"""The vLLM simulator over real HTTP: the OpenAI SDK for the OpenAI API, aiohttp for the rest."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import pytest_asyncio
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from controlplane.sim import SimConfig, make_app

MODEL = "sim-model"
USER = [{"role": "user", "content": "tell me a short story please"}]  # 6 words


@dataclass
class Sim:
    """One running simulator and the clients a test talks to it with."""

    port: int
    runner: web.AppRunner
    http: aiohttp.ClientSession
    client: openai.AsyncOpenAI

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def request(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any, Any]:
        """(status, parsed JSON body or raw text, headers)."""
        async with self.http.request(method, self.url + path, **kwargs) as resp:
            text = await resp.text()
            try:
                body: Any = json.loads(text)
            except ValueError:
                body = text
            return resp.status, body, resp.headers

    async def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        status, text, _ = await self.request("GET", "/metrics")
        assert status == 200
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }


def metric(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples[(name, frozenset({"model_name": MODEL, "engine": "0", **labels}.items()))]


StartSim = Callable[..., Awaitable[Sim]]


@pytest_asyncio.fixture
async def start_sim() -> AsyncIterator[StartSim]:
    """Start sims on free ports; every one is shut down (and its clients closed) afterwards."""
    sims: list[Sim] = []

    async def start(**config: Any) -> Sim:
        runner = web.AppRunner(make_app(SimConfig(**{"model": MODEL, **config})))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = runner.addresses[0][1]
        sim = Sim(
            port=port,
            runner=runner,
            http=aiohttp.ClientSession(),
            client=openai.AsyncOpenAI(
                base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0
            ),
        )
        sims.append(sim)
        return sim

    yield start
    for sim in sims:
        await sim.client.close()
        await sim.http.close()
        if sim.runner.server is not None:  # a test may have shut it down itself
            await sim.runner.cleanup()


@pytest_asyncio.fixture
async def sim(start_sim: StartSim) -> Sim:
    return await start_sim(version="v7")


# -- OpenAI endpoints -------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_models_health_and_version(sim: Sim) -> None:
    models = await sim.client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    status, body, _ = await sim.request("GET", "/v1/models")
    entry = body["data"][0]
    assert body["object"] == "list"
    assert (entry["object"], entry["owned_by"], entry["root"]) == ("model", "vllm", MODEL)
    assert entry["max_model_len"] == 8192
    status, body, _ = await sim.request("GET", "/health")
    assert (status, body) == (200, "")
    status, body, _ = await sim.request("GET", "/version")
    assert (status, body) == (200, {"version": "0.32.0"})  # the vLLM release it imitates


@pytest.mark.asyncio
async def test_chat_completion(sim: Sim) -> None:
    raw = await sim.client.chat.completions.with_raw_response.create(
        model=MODEL, messages=USER, max_tokens=5
    )
    assert raw.headers["x-sim-version"] == "v7"
    reply = raw.parse()
    assert reply.id.startswith("chatcmpl-") and len(reply.id) > len("chatcmpl-")
    assert (reply.object, reply.model) == ("chat.completion", MODEL)
    choice = reply.choices[0]
    assert (choice.index, choice.message.role, choice.finish_reason) == (0, "assistant", "length")
    assert len(choice.message.content.split()) == 5
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (6, 5)
    assert reply.usage.total_tokens == 11

    # Without max_tokens the sim writes its default length and stops on its own.
    reply = await sim.client.chat.completions.create(model=MODEL, messages=USER)
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == 16
    assert len(reply.choices[0].message.content.split()) == 16
    # max_completion_tokens (the newer name) is honoured too.
    reply = await sim.client.chat.completions.create(
        model=MODEL, messages=USER, max_completion_tokens=2
    )
    assert reply.usage.completion_tokens == 2


@pytest.mark.asyncio
async def test_completion(sim: Sim) -> None:
    reply = await sim.client.completions.create(model=MODEL, prompt="one two three", max_tokens=4)
    assert reply.id.startswith("cmpl-")
    assert (reply.object, reply.model) == ("text_completion", MODEL)
    assert reply.choices[0].finish_reason == "length"
    assert len(reply.choices[0].text.split()) == 4
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (3, 4)


@pytest.mark.asyncio
async def test_chat_stream_with_usage_matches_the_non_streamed_text(sim: Sim) -> None:
    stream = await sim.client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=7, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert all(c.object == "chat.completion.chunk" and c.model == MODEL for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c for c in chunks if c.choices]
    assert [c.choices[0].finish_reason for c in content][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in content[:-1])
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert (usage_chunk.usage.prompt_tokens, usage_chunk.usage.completion_tokens) == (6, 7)
    streamed = "".join(c.choices[0].delta.content or "" for c in content)
    reply = await sim.client.chat.completions.create(model=MODEL, messages=USER, max_tokens=7)
    assert streamed == reply.choices[0].message.content


@pytest.mark.asyncio
async def test_completion_stream_wire_format(sim: Sim) -> None:
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 3, "stream": True}
    async with sim.http.post(sim.url + "/v1/completions", json=body) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert resp.headers["Transfer-Encoding"] == "chunked"
        assert resp.headers["x-sim-version"] == "v7"
        raw = (await resp.read()).decode()
    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    chunks = [json.loads(event.removeprefix("data: ")) for event in events[:-2]]
    assert len(chunks) == 3  # one per token, no usage chunk unless asked for
    assert all(c["object"] == "text_completion" and c["choices"] for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, "length"]

    stream = await sim.client.completions.create(model=MODEL, prompt="hello", stream=True)
    text = "".join([chunk.choices[0].text async for chunk in stream])
    assert len(text.split()) == 16


@pytest.mark.asyncio
async def test_embeddings_are_deterministic(sim: Sim) -> None:
    reply = await sim.client.embeddings.create(model=MODEL, input=["alpha", "beta", "alpha"])
    vectors = [item.embedding for item in reply.data]
    assert len(vectors) == 3 and len(vectors[0]) == 16
    assert vectors[0] == pytest.approx(vectors[2]) and vectors[0] != vectors[1]
    assert reply.usage.prompt_tokens == 3
    status, body, _ = await sim.request(
        "POST", "/v1/embeddings", json={"input": "alpha", "encoding_format": "float"}
    )
    assert status == 200
    assert body["data"][0]["embedding"] == pytest.approx(vectors[0], abs=1e-6)


# -- validation -------------------------------------------------------------------------------


REAL = json.loads((Path(__file__).parent / "fixtures" / "vllm" / "errors.json").read_text())
# Answers the sim must give exactly as vLLM 0.32 did (tests/fixtures/vllm/capture.py). The
# served model was `tiny` with a 512-token context; adapters are loaded from real paths.
SAME_AS_VLLM = ["unknown_model", "max_tokens_over_context", "prompt_over_context",
                "lora_load_twice", "lora_unload_unknown"]  # fmt: skip


@pytest.mark.asyncio
@pytest.mark.parametrize("case", SAME_AS_VLLM)
async def test_error_bodies_are_vllms(start_sim: StartSim, tmp_path, case: str) -> None:
    sim = await start_sim(model="tiny", max_model_len=512)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    load = {"lora_name": "adapter", "lora_path": str(adapter)}
    assert (await sim.request("POST", "/v1/load_lora_adapter", json=load))[0] == 200
    method, path, body = REAL[case]["request"]
    if body and "lora_path" in body:
        body = {**body, "lora_path": str(adapter)}
    status, answer, _ = await sim.request(method, path, json=body)
    assert (status, answer) == (REAL[case]["status"], REAL[case]["body"])


@pytest.mark.asyncio
async def test_lora_adapters_answer_as_models_and_are_listed_with_their_parent(
    sim: Sim, tmp_path
) -> None:
    adapter = tmp_path / "support"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    missing = {"lora_name": "other", "lora_path": "/no/such/adapter"}
    status, body, _ = await sim.request("POST", "/v1/load_lora_adapter", json=missing)
    assert (status, body) == (404, {"error": {
        "message": "Loading lora other failed: No adapter found for /no/such/adapter",
        "type": "NotFoundError", "param": None, "code": 404}})  # fmt: skip
    load = {"lora_name": "support", "lora_path": str(adapter)}
    status, text, _ = await sim.request("POST", "/v1/load_lora_adapter", json=load)
    assert (status, text) == (200, "Success: LoRA adapter 'support' added successfully.")
    listed = {m["id"]: m for m in (await sim.request("GET", "/v1/models"))[1]["data"]}
    assert listed["support"]["parent"] == MODEL and listed["support"]["root"] == str(adapter)
    assert listed[MODEL]["parent"] is None
    reply = await sim.client.chat.completions.create(model="support", messages=USER,
                                                     max_tokens=2)  # fmt: skip
    assert reply.model == "support" and reply.usage.completion_tokens == 2
    status, _, _ = await sim.request("POST", "/v1/unload_lora_adapter",
                                     json={"lora_name": "support"})  # fmt: skip
    assert status == 200
    with pytest.raises(openai.NotFoundError):
        await sim.client.chat.completions.create(model="support", messages=USER)


@pytest.mark.asyncio
async def test_malformed_requests_are_400(sim: Sim) -> None:
    status, body, _ = await sim.request("POST", "/v1/chat/completions", data=b"{not json")
    assert status == 400 and body["error"]["type"] == "BadRequestError"
    for path, payload in [
        ("/v1/chat/completions", {"model": MODEL}),
        ("/v1/chat/completions", {"model": MODEL, "messages": []}),
        ("/v1/completions", {"model": MODEL}),
    ]:
        status, body, _ = await sim.request("POST", path, json=payload)
        assert status == 400, payload
        assert body["error"]["type"] == "BadRequestError" and body["error"]["code"] == 400
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        await sim.client.chat.completions.create(model=MODEL, messages=USER, max_tokens=8190)


# -- metrics ----------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_metrics_count_requests_and_tokens(sim: Sim) -> None:
    before = await sim.metrics()
    assert metric(before, "vllm:num_requests_running") == 0
    assert metric(before, "vllm:num_requests_waiting") == 0
    await sim.client.chat.completions.create(model=MODEL, messages=USER, max_tokens=3)
    await sim.client.completions.create(model=MODEL, prompt="a b")  # 16 tokens, "stop"
    stream = await sim.client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=4, stream=True
    )
    async for _ in stream:
        pass
    after = await sim.metrics()

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("vllm:prompt_tokens_total") == 6 + 2 + 6
    assert delta("vllm:generation_tokens_total") == 3 + 16 + 4
    assert delta("vllm:request_success_total", finished_reason="length") == 2
    assert delta("vllm:request_success_total", finished_reason="stop") == 1
    assert delta("vllm:time_to_first_token_seconds_count") == 3
    assert delta("vllm:e2e_request_latency_seconds_count") == 3
    assert delta("vllm:inter_token_latency_seconds_count") == 2 + 15 + 3
    assert metric(after, "vllm:e2e_request_latency_seconds_bucket", le="+Inf") == 3

    # vLLM's bucket edges, so dashboards and quantiles built for vLLM read the sim the same way.
    def edges(name: str) -> list[float]:
        return sorted(float(dict(labels)["le"]) for sample, labels in after if sample == name)

    assert edges("vllm:time_to_first_token_seconds_bucket")[:4] == [0.001, 0.005, 0.01, 0.02]
    assert edges("vllm:inter_token_latency_seconds_bucket")[:4] == [0.01, 0.025, 0.05, 0.075]
    assert edges("vllm:e2e_request_latency_seconds_bucket")[:4] == [0.3, 0.5, 0.8, 1.0]


@pytest.mark.asyncio
async def test_two_sims_keep_separate_metrics(start_sim: StartSim) -> None:
    busy, idle = await start_sim(), await start_sim()
    await busy.client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2)
    assert metric(await busy.metrics(), "vllm:generation_tokens_total") == 2
    assert metric(await idle.metrics(), "vllm:generation_tokens_total") == 0


@pytest.mark.asyncio
async def test_ttft_delays_first_chunk_and_is_measured(start_sim: StartSim) -> None:
    sim = await start_sim(ttft_ms=200, itl_ms=10)
    started = time.perf_counter()
    stream = await sim.client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=3, stream=True
    )
    # While the first token is pending the request shows as running.
    assert metric(await sim.metrics(), "vllm:num_requests_running") == 1
    first = None
    async for _ in stream:
        first = first or time.perf_counter()
    assert first is not None and first - started >= 0.19
    samples = await sim.metrics()
    assert metric(samples, "vllm:num_requests_running") == 0
    assert metric(samples, "vllm:time_to_first_token_seconds_sum") >= 0.19
    assert metric(samples, "vllm:time_to_first_token_seconds_bucket", le="0.1") == 0
    assert metric(samples, "vllm:inter_token_latency_seconds_count") == 2
    assert metric(samples, "vllm:inter_token_latency_seconds_sum") >= 0.018


@pytest.mark.asyncio
async def test_non_streaming_waits_as_long_as_the_stream(start_sim: StartSim) -> None:
    sim = await start_sim(ttft_ms=50, itl_ms=30)
    started = time.perf_counter()
    await sim.client.completions.create(model=MODEL, prompt="x", max_tokens=6)
    assert time.perf_counter() - started >= 0.05 + 5 * 0.03 - 0.01


@pytest.mark.asyncio
async def test_client_disconnect_mid_stream_counts_as_abort(start_sim: StartSim) -> None:
    sim = await start_sim(itl_ms=50)
    body = {"model": MODEL, "messages": USER, "max_tokens": 50, "stream": True}
    async with (
        aiohttp.ClientSession() as http,
        http.post(sim.url + "/v1/chat/completions", json=body) as resp,
    ):
        await resp.content.readuntil(b"\n\n")
    for _ in range(50):
        samples = await sim.metrics()
        if metric(samples, "vllm:request_success_total", finished_reason="abort") == 1:
            break
        await asyncio.sleep(0.05)
    assert metric(samples, "vllm:request_success_total", finished_reason="abort") == 1
    assert metric(samples, "vllm:num_requests_running") == 0
    assert metric(samples, "vllm:generation_tokens_total") < 50


@pytest.mark.asyncio
async def test_requests_beyond_max_num_seqs_wait_in_a_queue(start_sim: StartSim) -> None:
    """As vLLM's scheduler: `max_num_seqs` run at once, the rest wait (num_requests_waiting)
    and their time in the queue is measured."""
    sim = await start_sim(max_num_seqs=2, ttft_ms=300)
    replies = [asyncio.create_task(sim.client.completions.create(
        model=MODEL, prompt="x", max_tokens=1)) for _ in range(5)]  # fmt: skip
    await asyncio.sleep(0.15)
    samples = await sim.metrics()
    assert metric(samples, "vllm:num_requests_running") == 2
    assert metric(samples, "vllm:num_requests_waiting") == 3
    assert 0 < metric(samples, "vllm:kv_cache_usage_perc") < 1
    started = time.perf_counter()
    await asyncio.gather(*replies)
    assert time.perf_counter() - started >= 0.5  # three more rounds of 300 ms behind two slots
    samples = await sim.metrics()
    assert metric(samples, "vllm:num_requests_waiting") == 0
    assert metric(samples, "vllm:kv_cache_usage_perc") == 0
    queued = metric(samples, "vllm:request_queue_time_seconds_count")
    assert queued == 5 and metric(samples, "vllm:request_queue_time_seconds_sum") > 0.5


@pytest.mark.asyncio
async def test_a_cached_prompt_prefix_is_counted_and_answers_sooner(start_sim: StartSim) -> None:
    """vLLM's automatic prefix caching: blocks of 16 tokens (64 characters), found by a
    chained hash; a hit skips their prefill, so the first token comes sooner."""
    sim = await start_sim(prefill_ms_per_token=5)
    prompt = " ".join(f"word{i}" for i in range(64))  # 64 tokens, 437 characters: six blocks

    async def ttft() -> float:
        started = time.perf_counter()
        await sim.client.completions.create(model=MODEL, prompt=prompt, max_tokens=1)
        return time.perf_counter() - started

    cold, warm = await ttft(), await ttft()
    samples = await sim.metrics()
    assert metric(samples, "vllm:prefix_cache_queries_total") == 128
    assert metric(samples, "vllm:prefix_cache_hits_total") == 64 * 384 // 437  # six blocks
    assert cold >= 0.3 and warm < 0.2  # 64 x 5 ms of prefill, then 8 x 5 ms


@pytest.mark.asyncio
async def test_prefills_take_turns_on_one_server(start_sim: StartSim) -> None:
    """One compute budget per server: two uncached prompts arriving together are prefilled
    one after the other, so the second waits for the first (what makes cache misses costly
    under load)."""
    sim = await start_sim(prefill_ms_per_token=5)

    async def ttft(tag: str) -> float:
        started = time.perf_counter()
        prompt = " ".join(f"{tag}{i}" for i in range(64))
        await sim.client.completions.create(model=MODEL, prompt=prompt, max_tokens=1)
        return time.perf_counter() - started

    first, second = sorted(await asyncio.gather(ttft("a"), ttft("b")))
    # Each prefill takes >= 0.3 s; side by side they would end together. Lower bounds only:
    # a loaded machine makes both later, never the second's wait shorter.
    assert first >= 0.3 and second >= 0.6 and second - first >= 0.2, (first, second)


# -- sleep mode -------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_requests_wait_while_asleep_and_are_served_after_waking(start_sim: StartSim) -> None:
    """As vLLM does (seen with vLLM 0.32): no 503, the request is held until /wake_up."""
    sim = await start_sim(wake_ms=100)
    assert (await sim.request("POST", "/sleep?level=3"))[0] == 400
    assert (await sim.request("POST", "/sleep?level=1"))[1] == {"status": "sleeping", "level": 1}
    assert (await sim.request("GET", "/is_sleeping"))[1] == {"is_sleeping": True}
    assert (await sim.request("GET", "/health"))[0] == 200  # the process is fine
    held = asyncio.create_task(sim.client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=2))  # fmt: skip
    await asyncio.sleep(0.3)
    assert not held.done()
    samples = await sim.metrics()
    assert metric(samples, "vllm:engine_sleep_state", sleep_state="weights_offloaded") == 1
    assert metric(samples, "vllm:engine_sleep_state", sleep_state="awake") == 0

    started = time.perf_counter()
    assert (await sim.request("POST", "/wake_up"))[1] == {"status": "awake", "tags": None}
    assert time.perf_counter() - started >= 0.09
    assert (await asyncio.wait_for(held, 5)).usage.completion_tokens == 2
    assert (await sim.request("GET", "/is_sleeping"))[1] == {"is_sleeping": False}
    samples = await sim.metrics()
    assert metric(samples, "vllm:engine_sleep_state", sleep_state="awake") == 1


@pytest.mark.asyncio
async def test_level_two_needs_its_weights_reloaded_before_it_answers_sense(sim: Sim) -> None:
    async def text() -> str:
        reply = await sim.client.completions.create(model=MODEL, prompt="x", max_tokens=4)
        return reply.choices[0].text

    sane = await text()
    await sim.request("POST", "/sleep?level=2")
    assert (await sim.request("POST", "/wake_up"))[0] == 200
    assert await text() != sane  # a plain /wake_up after level 2: garbage, as in vLLM
    assert (await sim.request("POST", "/collective_rpc", json={"method": "reload_weights"}))[
        1] == {"results": [None]}  # fmt: skip
    assert await text() == sane

    # vLLM's sequence: weights, reload, then the KV cache; asleep until the last tag wakes
    await sim.request("POST", "/sleep?level=2")
    assert (await sim.request("POST", "/wake_up?tags=weights"))[1] == {
        "status": "sleeping", "tags": ["weights"]}  # fmt: skip
    assert (await sim.request("GET", "/is_sleeping"))[1] == {"is_sleeping": True}
    await sim.request("POST", "/collective_rpc", json={"method": "reload_weights"})
    assert (await sim.request("POST", "/wake_up?tags=kv_cache"))[1]["status"] == "awake"
    assert await text() == sane


# -- faults -----------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_error_rate_fault_and_clearing_it(sim: Sim) -> None:
    status, body, _ = await sim.request(
        "POST", "/sim/faults", json={"error_rate": 1.0, "status": 503}
    )
    assert (status, body) == (200, {"error_rate": 1.0, "status": 503})
    assert (await sim.request("GET", "/sim/faults"))[1] == {"error_rate": 1.0, "status": 503}
    with pytest.raises(openai.APIStatusError) as caught:
        await sim.client.chat.completions.create(model=MODEL, messages=USER)
    assert caught.value.status_code == 503
    assert caught.value.response.headers["x-sim-version"] == "v7"
    with pytest.raises(openai.APIStatusError) as caught:
        await sim.client.embeddings.create(model=MODEL, input="x")
    assert caught.value.status_code == 503

    status, body, _ = await sim.request("DELETE", "/sim/faults")
    assert (status, body) == (200, {})
    assert (await sim.request("GET", "/sim/faults"))[1] == {}
    reply = await sim.client.chat.completions.create(model=MODEL, messages=USER, max_tokens=1)
    assert reply.choices[0].finish_reason == "length"


@pytest.mark.asyncio
async def test_partial_error_rate_fails_some_requests(sim: Sim) -> None:
    await sim.request("POST", "/sim/faults", json={"error_rate": 0.5})
    statuses = [
        (await sim.request("POST", "/v1/completions", json={"prompt": "x", "max_tokens": 1}))[0]
        for _ in range(100)
    ]
    assert set(statuses) == {200, 500}
    assert 20 < statuses.count(500) < 80


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"explode": True}, "explode"),
        ({"error_rate": 1.5}, "error_rate"),
        ({"error_rate": "half"}, "error_rate"),
        ({"status": 200}, "status"),
        ({"status": "503"}, "status"),
        ({"ttft_ms": -1}, "ttft_ms"),
        ({"itl_ms": "slow"}, "itl_ms"),
        ({"hang": "yes"}, "hang"),
        ({"status": 502, "error_rate": 2}, "error_rate"),  # one bad key rejects the whole body
    ],
)
async def test_bad_fault_bodies_are_rejected_and_change_nothing(
    sim: Sim, body: dict[str, Any], field: str
) -> None:
    assert (await sim.request("POST", "/sim/faults", json={"ttft_ms": 1}))[0] == 200
    status, reply, _ = await sim.request("POST", "/sim/faults", json=body)
    assert status == 400
    assert reply["error"]["field"] == field
    assert reply["error"]["type"] == "invalid_request_error"
    assert field in reply["error"]["message"]
    assert (await sim.request("GET", "/sim/faults"))[1] == {"ttft_ms": 1}


@pytest.mark.asyncio
async def test_latency_faults_add_to_the_configured_latency(start_sim: StartSim) -> None:
    sim = await start_sim(ttft_ms=100)
    await sim.request("POST", "/sim/faults", json={"ttft_ms": 150})
    started = time.perf_counter()
    await sim.client.chat.completions.create(model=MODEL, messages=USER, max_tokens=1)
    assert time.perf_counter() - started >= 0.24


@pytest.mark.asyncio
async def test_hang_fault_until_cleared(sim: Sim) -> None:
    await sim.request("POST", "/sim/faults", json={"hang": True})
    with pytest.raises(openai.APITimeoutError):
        await sim.client.chat.completions.create(
            model=MODEL, messages=USER, max_tokens=1, timeout=0.3
        )
    # A request hanging when the fault is cleared is answered, and so are new ones.
    pending = asyncio.create_task(
        sim.client.chat.completions.create(model=MODEL, messages=USER, max_tokens=1)
    )
    await asyncio.sleep(0.2)
    assert not pending.done()
    assert (await sim.request("DELETE", "/sim/faults"))[:2] == (200, {})
    assert (await pending).usage.completion_tokens == 1
    reply = await sim.client.chat.completions.create(model=MODEL, messages=USER, max_tokens=1)
    assert reply.usage.completion_tokens == 1


@pytest.mark.asyncio
async def test_shutdown_does_not_wait_for_hanging_requests(start_sim: StartSim) -> None:
    sim = await start_sim()
    await sim.request("POST", "/sim/faults", json={"hang": True})
    pending = asyncio.create_task(
        sim.client.chat.completions.create(model=MODEL, messages=USER, max_tokens=1)
    )
    await asyncio.sleep(0.2)
    # aiohttp would otherwise wait its 60 s shutdown timeout for the hanging handler.
    await asyncio.wait_for(sim.runner.cleanup(), timeout=10)
    with pytest.raises(openai.APIStatusError) as caught:
        await pending
    assert caught.value.status_code == 503
    assert "shutting down" in caught.value.message


# -- LoRA adapters: limits, metrics, faults of one adapter --------------------------------------


def _adapter_dir(tmp_path: Path, name: str) -> str:
    path = tmp_path / name
    path.mkdir(exist_ok=True)
    (path / "adapter_config.json").write_text("{}")
    return str(path)


async def _load(sim: Sim, tmp_path: Path, name: str) -> tuple[int, Any]:
    body = {"lora_name": name, "lora_path": _adapter_dir(tmp_path, name)}
    status, reply, _ = await sim.request("POST", "/v1/load_lora_adapter", json=body)
    return status, reply


def lora_info(samples: dict[Any, float]) -> dict[str, str]:
    """The labels of vLLM's lora_requests_info series with the newest time: the present."""
    series = [(value, dict(labels)) for (name, labels), value in samples.items()
              if name == "vllm:lora_requests_info"]  # fmt: skip
    return max(series, key=lambda pair: pair[0])[1]


@pytest.mark.asyncio
async def test_a_full_server_refuses_one_more_adapter_until_one_is_unloaded(
    start_sim: StartSim, tmp_path
) -> None:
    sim = await start_sim(max_loras=2)
    assert (await _load(sim, tmp_path, "a"))[0] == 200
    assert (await _load(sim, tmp_path, "b"))[0] == 200
    status, body = await _load(sim, tmp_path, "c")
    assert status == 400
    assert body["error"]["message"] == (
        "Cannot load LoRA adapter 'c': 2 adapters are loaded, the most this server holds "
        "(max_loras 2). Unload one first.")  # fmt: skip
    listed = [m["id"] for m in (await sim.request("GET", "/v1/models"))[1]["data"]]
    assert listed == [MODEL, "a", "b"]  # the refused one is not half there
    with pytest.raises(openai.NotFoundError):
        await sim.client.completions.create(model="c", prompt="x", max_tokens=1)
    await sim.request("POST", "/v1/unload_lora_adapter", json={"lora_name": "a"})
    assert (await _load(sim, tmp_path, "c"))[0] == 200
    reply = await sim.client.completions.create(model="c", prompt="x", max_tokens=1)
    assert reply.model == "c"


@pytest.mark.asyncio
async def test_an_adapter_is_not_served_before_its_load_is_done(
    start_sim: StartSim, tmp_path
) -> None:
    sim = await start_sim(lora_load_ms=400)
    loading = asyncio.create_task(_load(sim, tmp_path, "slow"))
    await asyncio.sleep(0.15)
    with pytest.raises(openai.NotFoundError):
        await sim.client.completions.create(model="slow", prompt="x", max_tokens=1)
    assert (await _load(sim, tmp_path, "slow"))[0] == 400  # already being loaded
    assert (await loading)[0] == 200
    reply = await sim.client.completions.create(model="slow", prompt="x", max_tokens=1)
    assert reply.model == "slow"


@pytest.mark.asyncio
async def test_lora_requests_info_names_the_adapters_running_and_waiting(
    start_sim: StartSim, tmp_path
) -> None:
    sim = await start_sim(max_loras=3, max_num_seqs=1, ttft_ms=300)
    assert lora_info(await sim.metrics()) == {
        "max_lora": "3", "running_lora_adapters": "", "waiting_lora_adapters": ""}  # fmt: skip
    await _load(sim, tmp_path, "alpha")
    await _load(sim, tmp_path, "beta")
    first = asyncio.create_task(
        sim.client.completions.create(model="alpha", prompt="x", max_tokens=1))  # fmt: skip
    await asyncio.sleep(0.1)
    second = asyncio.create_task(
        sim.client.completions.create(model="beta", prompt="x", max_tokens=1))  # fmt: skip
    await asyncio.sleep(0.1)
    assert lora_info(await sim.metrics()) == {
        "max_lora": "3", "running_lora_adapters": "alpha",
        "waiting_lora_adapters": "beta"}  # fmt: skip
    await asyncio.gather(first, second)
    assert lora_info(await sim.metrics())["running_lora_adapters"] == ""


@pytest.mark.asyncio
async def test_a_fault_of_one_adapter_leaves_the_base_and_the_others_serving(
    sim: Sim, tmp_path
) -> None:
    await _load(sim, tmp_path, "good")
    await _load(sim, tmp_path, "bad")
    status, body, _ = await sim.request(
        "POST", "/sim/faults", json={"adapter": "bad", "error_rate": 1.0, "status": 503})
    assert (status, body) == (200, {"error_rate": 1.0, "status": 503})
    assert (await sim.request("GET", "/sim/faults"))[1] == {
        "adapters": {"bad": {"error_rate": 1.0, "status": 503}}}  # fmt: skip
    for _ in range(5):
        with pytest.raises(openai.APIStatusError) as caught:
            await sim.client.completions.create(model="bad", prompt="x", max_tokens=1)
        assert caught.value.status_code == 503
        assert (await sim.client.completions.create(model=MODEL, prompt="x",
                                                    max_tokens=1)).model == MODEL  # fmt: skip
        assert (await sim.client.completions.create(model="good", prompt="x",
                                                    max_tokens=1)).model == "good"  # fmt: skip
    # A hang of the adapter holds its requests only, until cleared.
    await sim.request("DELETE", "/sim/faults?adapter=bad")
    await sim.request("POST", "/sim/faults", json={"adapter": "bad", "hang": True})
    held = asyncio.create_task(
        sim.client.completions.create(model="bad", prompt="x", max_tokens=1))  # fmt: skip
    await asyncio.sleep(0.3)
    assert not held.done()
    await sim.client.completions.create(model=MODEL, prompt="x", max_tokens=1)
    assert (await sim.request("DELETE", "/sim/faults?adapter=bad"))[0] == 200
    assert (await held).model == "bad"
    assert (await sim.request("GET", "/sim/faults"))[1] == {}


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"adapter": "nowhere", "error_rate": 1.0}, 404, "adapter"),
        ({"adapter": "loaded", "sleep_ms": 10}, 400, "sleep_ms"),
        ({"adapter": "loaded", "error_rate": 3}, 400, "error_rate"),
    ],
)
async def test_bad_adapter_faults_are_refused_and_change_nothing(
    sim: Sim, tmp_path, body: dict[str, Any], status: int, field: str
) -> None:
    await _load(sim, tmp_path, "loaded")
    got, reply, _ = await sim.request("POST", "/sim/faults", json=body)
    assert (got, reply["error"]["field"]) == (status, field)
    assert (await sim.request("GET", "/sim/faults"))[1] == {}
    assert (await sim.client.completions.create(model="loaded", prompt="x",
                                                max_tokens=1)).model == "loaded"  # fmt: skip
