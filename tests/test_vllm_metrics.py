"""The vLLM scraper against real simulators over HTTP, in-process on free ports.

Requests go straight to the sims with the OpenAI SDK; the scraper's `scrape_once()` is called
by hand around them so that every delta is deterministic.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import openai
import pytest_asyncio
from aiohttp import web

from controlplane.config import parse_config
from controlplane.health import vllm_metrics
from controlplane.health.signals import Delta, HealthSignals
from controlplane.health.vllm_metrics import VllmScraper, histogram_delta, parse
from controlplane.sim import SimConfig, make_app
from controlplane.sim.metrics import SimMetrics
from controlplane.state import Endpoint, State

MODEL = "llama-3-8b"
TTFT_MS = 40.0


class Recording(HealthSignals):
    """HealthSignals that also keeps every delta it was given, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[str, str, Delta]] = []

    def add(self, model: str, version: str, delta: Delta) -> None:
        self.log.append((model, version, delta))
        super().add(model, version, delta)

    def of(self, version: str) -> list[Delta]:
        return [delta for _, name, delta in self.log if name == version]


@dataclass
class Sim:
    port: int
    runner: web.AppRunner

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class Sims:
    """Starts sims (optionally on a given port, for restarts) and stops them all at the end."""

    def __init__(self) -> None:
        self.running: list[Sim] = []

    async def start(self, port: int = 0, **config) -> Sim:
        runner = web.AppRunner(make_app(SimConfig(**{"model": MODEL, **config})))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        sim = Sim(runner.addresses[0][1], runner)
        self.running.append(sim)
        return sim

    async def stop(self, sim: Sim) -> None:
        await sim.runner.cleanup()
        self.running.remove(sim)


@pytest_asyncio.fixture
async def sims() -> AsyncIterator[Sims]:
    started = Sims()
    yield started
    for sim in list(started.running):
        await started.stop(sim)


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def make_state(urls: dict[str, str]) -> State:
    """One model whose versions have url backends, all active with one ready endpoint."""
    names = list(urls)
    config = parse_config(
        {
            "models": [
                {
                    "name": MODEL,
                    "versions": [
                        {"name": name, "weight": 100 if i == 0 else 0, "backend": {"url": url}}
                        for i, (name, url) in enumerate(urls.items())
                    ],
                }
            ]
        }
    )
    state = State.from_config(config)
    for name in names:
        version = state.models[MODEL].versions[name]
        version.state = "active"
        version.endpoints = [Endpoint(urls[name])]
    return state


async def send(url: str, count: int) -> None:
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) as client:
        await asyncio.gather(
            *(
                client.completions.create(model=MODEL, prompt="hello", max_tokens=3)
                for _ in range(count)
            )
        )


def since(signals: HealthSignals, version: str, start: float):
    """The window from `start` until now."""
    now = time.time()
    return signals.window(MODEL, version, now - start, now=now)


# -- parsing, without the network ---------------------------------------------------------------


def test_parse_sums_over_other_labels_and_keeps_the_served_model() -> None:
    ours, other = SimMetrics(MODEL), SimMetrics("someone-else")
    ours.running, ours.waiting, other.running = 2, 1, 50
    for value in (0.03, 0.05, 0.2):
        ours.ttft.observe(value)
    other.ttft.observe(9.0, 100)
    text = ours.render().decode()
    # Two engines of one server (vLLM's data parallel labels each with engine="N").
    engines = text + text.replace('engine="0"', 'engine="1"')
    scrape = parse(engines + other.render().decode(), MODEL)
    assert scrape.gauges == {"running": 4.0, "waiting": 2.0, "kv_cache": 0.0}
    assert scrape.asleep is False
    bounds, cumulative = scrape.histograms["ttft_s"]
    assert bounds[:6] == (0.001, 0.005, 0.01, 0.02, 0.04, 0.06)
    assert cumulative[-1] == 6.0  # +Inf: three observations on each engine
    assert {"ttft_s", "itl_s", "e2e_s"} == set(scrape.histograms)
    # A server whose series do not name the model (another served name): all of them count.
    assert parse(text, "not-served-here").gauges == {"running": 2.0, "waiting": 1.0,
                                                     "kv_cache": 0.0}  # fmt: skip


REAL_METRICS = (Path(__file__).parent / "fixtures" / "vllm" / "metrics.txt").read_text()


def test_parse_reads_a_real_vllm_exposition() -> None:
    """vLLM 0.32's own /metrics (tests/fixtures/vllm/capture.py): four chat requests of 4
    tokens (one to a LoRA adapter) and one completion of 2; hundreds of lines we skip."""
    scrape = parse(REAL_METRICS, "tiny")
    assert scrape.gauges == {"running": 0.0, "waiting": 0.0, "kv_cache": 0.0}
    assert scrape.asleep is False
    for field in ("ttft_s", "itl_s", "e2e_s"):
        bounds, cumulative = scrape.histograms[field]
        assert len(cumulative) == len(bounds) + 1 and cumulative == sorted(cumulative)
    assert scrape.histograms["ttft_s"][1][-1] == 5.0  # five requests got a first token
    assert scrape.histograms["itl_s"][1][-1] == 3 * 4 + 1  # tokens after the first
    assert scrape.histograms["ttft_s"][0][:3] == (0.001, 0.005, 0.01)  # vLLM's buckets


def test_parse_falls_back_to_time_per_output_token_of_older_vllm() -> None:
    older = REAL_METRICS.replace("vllm:inter_token_latency_seconds",
                                 "vllm:time_per_output_token_seconds")  # fmt: skip
    assert "vllm:inter_token_latency" not in older
    assert parse(older, "tiny").histograms["itl_s"] == parse(REAL_METRICS, "tiny").histograms[
        "itl_s"]  # fmt: skip


def test_parse_sees_a_sleeping_engine() -> None:
    asleep = REAL_METRICS.replace('sleep_state="awake"} 1.0', 'sleep_state="awake"} 0.0')
    asleep = asleep.replace('sleep_state="weights_offloaded"} 0.0',
                            'sleep_state="weights_offloaded"} 1.0')  # fmt: skip
    assert parse(asleep, "tiny").asleep is True
    assert parse(REAL_METRICS, "tiny").asleep is False


def test_histogram_delta_subtracts_and_survives_resets() -> None:
    bounds = (0.1, 0.2)
    assert histogram_delta((bounds, [1.0, 3.0, 4.0]), (bounds, [1.0, 1.0, 1.0])).counts == [
        0.0,
        2.0,
        1.0,
    ]
    assert histogram_delta((bounds, [1.0, 1.0, 1.0]), (bounds, [1.0, 1.0, 1.0])) is None
    # Lower than before: a restarted backend; all it counted is new.
    assert histogram_delta((bounds, [0.0, 2.0, 2.0]), (bounds, [5.0, 5.0, 9.0])).counts == [
        0.0,
        2.0,
        0.0,
    ]
    assert histogram_delta((bounds, [1.0, 1.0, 2.0]), None).counts == [1.0, 0.0, 1.0]


# -- against real sims --------------------------------------------------------------------------


async def test_scrape_pushes_latency_deltas_and_queue_gauges(sims: Sims, http) -> None:
    sim = await sims.start(ttft_ms=TTFT_MS)
    signals = Recording()
    scraper = VllmScraper(make_state({"v1": sim.url}), signals)
    try:
        await send(sim.url, 5)  # before the first scrape: never counted
        start = time.time()
        await scraper.scrape_once()
        (first,) = signals.of("v1")
        assert first.source == sim.url
        assert (first.running, first.waiting) == (0.0, 0.0)
        assert (first.ttft_s, first.itl_s, first.e2e_s) == (None, None, None)
        assert (first.requests, first.errors) == (0.0, 0.0)

        await send(sim.url, 10)
        await scraper.scrape_once()
        second = signals.of("v1")[-1]
        assert second.ttft_s.total == 10 and second.e2e_s.total == 10
        assert second.itl_s.total == 20  # 3 tokens: two inter-token gaps each
        assert (second.requests, second.errors) == (0.0, 0.0)  # Envoy counts traffic
        window = since(signals, "v1", start)
        assert window.ttft_p95_ms >= TTFT_MS
        assert (window.running, window.waiting) == (0.0, 0.0)

        # A fault adding 300 ms of TTFT: requests in flight show in the running gauge, and
        # once they are done the p95 of the deltas since then is up.
        async with http.post(f"{sim.url}/sim/faults", json={"ttft_ms": 300}) as response:
            assert response.status == 200
        await scraper.scrape_once()
        slow_start = time.time()
        inflight = asyncio.create_task(send(sim.url, 3))
        deadline = time.monotonic() + 2.0
        while signals.of("v1")[-1].running != 3.0:
            assert time.monotonic() < deadline, "3 requests in flight never showed as running"
            await asyncio.sleep(0.02)
            await scraper.scrape_once()
        await inflight
        await scraper.scrape_once()
        assert signals.of("v1")[-1].running == 0.0
        slow = since(signals, "v1", slow_start)
        assert slow.ttft_p95_ms >= TTFT_MS + 300
        assert slow.ttft_p95_ms > window.ttft_p95_ms
    finally:
        await scraper.stop()


async def test_backend_restart_never_gives_negative_counts(sims: Sims) -> None:
    sim = await sims.start(ttft_ms=TTFT_MS)
    port, url = sim.port, sim.url
    signals = Recording()
    scraper = VllmScraper(make_state({"v1": url}), signals)
    try:
        await scraper.scrape_once()
        await send(url, 10)
        await scraper.scrape_once()
        assert signals.of("v1")[-1].ttft_s.total == 10

        await sims.stop(sim)
        await scraper.scrape_once()  # connection refused: only "no answer", nothing raised
        assert len(signals.of("v1")) == 3
        refused = signals.of("v1")[-1]
        assert refused.unanswered == 1.0 and refused.ttft_s is None and refused.running is None

        restarted = await sims.start(port=port, ttft_ms=TTFT_MS)
        await send(restarted.url, 3)
        await scraper.scrape_once()  # counters went 10 -> 3: the 3 are the delta
        after = signals.of("v1")[-1]
        assert (after.ttft_s.total, after.e2e_s.total) == (3, 3)
        for delta in signals.of("v1"):
            for histogram in (delta.ttft_s, delta.itl_s, delta.e2e_s):
                assert histogram is None or min(histogram.counts) >= 0
        await send(restarted.url, 2)
        await scraper.scrape_once()
        assert signals.of("v1")[-1].ttft_s.total == 2
    finally:
        await scraper.stop()


async def test_only_ready_endpoints_of_active_versions_are_scraped(sims: Sims, monkeypatch) -> None:
    monkeypatch.setattr(vllm_metrics, "QUIET_PUSH_S", 0.0)  # every scrape pushes
    one, two, three = [await sims.start() for _ in range(3)]
    signals = Recording()
    state = make_state({"v1": one.url, "v2": two.url, "v3": three.url})
    versions = state.models[MODEL].versions
    versions["v2"].endpoints[0].ready = False
    versions["v3"].state = "sleeping"
    scraper = VllmScraper(state, signals)
    try:
        await scraper.scrape_once()
        assert [version for _, version, _ in signals.log] == ["v1"]
        versions["v2"].endpoints[0].ready = True
        await scraper.scrape_once()
        assert sorted(version for _, version, _ in signals.log) == ["v1", "v1", "v2"]
    finally:
        await scraper.stop()


async def test_a_hung_endpoint_times_out_without_holding_up_the_others(sims: Sims) -> None:
    async def hang(request: web.Request) -> web.Response:
        await asyncio.sleep(10)
        return web.Response()

    app = web.Application()
    app.router.add_get("/metrics", hang)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    hung = f"http://127.0.0.1:{runner.addresses[0][1]}"
    good = await sims.start()
    signals = Recording()
    scraper = VllmScraper(make_state({"v1": good.url, "v2": hung}), signals, timeout=0.2)
    try:
        started = time.monotonic()
        await scraper.scrape_once()
        assert time.monotonic() - started < 1.0
        assert [(version, delta.unanswered) for _, version, delta in signals.log] == [
            ("v1", 0.0), ("v2", 1.0)]  # the hung one is reported as not answering
        assert since(signals, "v2", started - 1).unanswered == 1.0
        assert since(signals, "v1", started - 1).unanswered == 0.0
    finally:
        await scraper.stop()
        await runner.cleanup()


async def test_the_loop_scrapes_every_interval_until_stopped(sims: Sims, monkeypatch) -> None:
    monkeypatch.setattr(vllm_metrics, "QUIET_PUSH_S", 0.0)  # every scrape pushes
    sim = await sims.start()
    signals = Recording()
    state = make_state({"v1": sim.url})
    state.models[MODEL].active_rollout = "r1"  # judged: scraped every round
    scraper = VllmScraper(state, signals, interval=0.1)
    await scraper.start()
    await asyncio.sleep(0.45)
    await scraper.stop()
    rounds = len(signals.log)
    assert 2 <= rounds <= 6
    await asyncio.sleep(0.2)
    assert len(signals.log) == rounds  # stopped means stopped
    assert scraper._task is None


# -- at fleet size: one GET per address, idle versions quiet, cold ones scraped in turn ----------


class Exposition:
    """A /metrics endpoint serving a fixed vLLM text, counting its GETs."""

    def __init__(self, text: str) -> None:
        self.text, self.gets = text, 0

    async def start(self) -> str:
        async def metrics(request: web.Request) -> web.Response:
            self.gets += 1
            return web.Response(text=self.text)

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        return f"http://127.0.0.1:{self.runner.addresses[0][1]}"


def fleet_state(urls: list[str], models: int) -> State:
    """`models` models, each with v1 on urls[0] and v2 on urls[-1], all active and ready."""
    config = parse_config({"models": [
        {"name": f"m{i}", "versions": [
            {"name": "v1", "weight": 100, "backend": {"url": urls[0]}},
            {"name": "v2", "weight": 0, "backend": {"url": urls[-1]}}]}
        for i in range(models)]})  # fmt: skip
    state = State.from_config(config)
    for model in state.models.values():
        for version in model.versions.values():
            version.state, version.endpoints = "active", [Endpoint(version.backend.url)]
    return state


def exposition(running: float = 0.0, ttft_count: int = 0, model: str = "base") -> str:
    return (
        "# TYPE vllm:num_requests_running gauge\n"
        f'vllm:num_requests_running{{engine="0",model_name="{model}"}} {running}\n'
        "# TYPE vllm:time_to_first_token_seconds histogram\n"
        f'vllm:time_to_first_token_seconds_bucket{{engine="0",le="0.1",model_name="{model}"}} '
        f"{ttft_count}\n"
        f'vllm:time_to_first_token_seconds_bucket{{engine="0",le="+Inf",model_name="{model}"}} '
        f"{ttft_count}\n"
    )


async def test_versions_on_one_address_share_one_scrape_and_one_delta() -> None:
    server = Exposition(exposition(ttft_count=1))
    url = await server.start()
    signals = Recording()
    scraper = VllmScraper(fleet_state([url], 50), signals)
    try:
        await scraper.scrape_once()
        assert server.gets == 1 and len(signals.log) == 100  # 50 models x 2 versions
        server.text = exposition(running=2.0, ttft_count=4)
        await scraper.scrape_once()
        assert server.gets == 2 and len(signals.log) == 200
        deltas = [delta for _, _, delta in signals.log[100:]]
        assert {(d.running, d.ttft_s.total, d.source) for d in deltas} == {(2.0, 3.0, url)}
        assert len({id(d.ttft_s) for d in deltas}) == 1  # computed once for all of them
    finally:
        await scraper.stop()
        await server.runner.cleanup()


async def test_a_quiet_version_pushes_every_few_seconds_a_busy_one_every_round(
    monkeypatch,
) -> None:
    server = Exposition(exposition())
    url = await server.start()
    signals = Recording()
    scraper = VllmScraper(fleet_state([url], 1), signals)
    try:
        await scraper.scrape_once()
        await scraper.scrape_once()
        assert server.gets == 2 and len(signals.of("v1")) == 1  # nothing new: not pushed
        server.text = exposition(running=1.0)
        await scraper.scrape_once()
        await scraper.scrape_once()
        assert [d.running for d in signals.of("v1")] == [0.0, 1.0, 1.0]  # busy: every round
        server.text = exposition()
        await scraper.scrape_once()
        await scraper.scrape_once()
        assert [d.running for d in signals.of("v1")] == [0.0, 1.0, 1.0, 0.0]  # back to 0 once
        monkeypatch.setattr(vllm_metrics, "QUIET_PUSH_S", 0.0)
        await scraper.scrape_once()
        assert len(signals.of("v1")) == 5  # and again after QUIET_PUSH_S
    finally:
        await scraper.stop()
        await server.runner.cleanup()


async def test_cold_addresses_are_scraped_in_turn_hot_ones_every_round() -> None:
    servers = [Exposition(exposition()) for _ in range(2)]
    urls = [await server.start() for server in servers]
    state = fleet_state(urls, 3)  # v1 of every model on urls[0], v2 on urls[1]
    scraper = VllmScraper(state, Recording())
    try:
        for _ in range(2 * vllm_metrics.COLD_EVERY):
            await scraper.scrape_round()
        assert [server.gets for server in servers] == [2, 2]  # nobody judges them
        state.models["m1"].active_rollout = "r1"  # m1's analysis needs both its versions
        for _ in range(vllm_metrics.COLD_EVERY):
            await scraper.scrape_round()
        assert [server.gets for server in servers] == [12, 12]
        state.models["m1"].active_rollout = None
        state.models["m2"].traffic_generation += 1  # a weight change: hot for a while
        for _ in range(vllm_metrics.COLD_EVERY):
            await scraper.scrape_round()
        assert [server.gets for server in servers] == [22, 22]
    finally:
        await scraper.stop()
        for server in servers:
            await server.runner.cleanup()


async def test_endpoints_are_worked_out_again_only_when_the_state_changed() -> None:
    server = Exposition(exposition())
    url = await server.start()
    state = fleet_state([url], 2)
    marker = [object()]  # stands for the controller's snapshot, rebuilt on every change
    scraper = VllmScraper(state, Recording(), changed=lambda: marker[0])
    try:
        await scraper.scrape_once()
        assert server.gets == 1
        for model in state.models.values():
            for version in model.versions.values():
                version.state = "sleeping"  # without a rebuild: not seen yet
        await scraper.scrape_once()
        assert server.gets == 2
        marker[0] = object()  # the rebuild that follows every such change
        await scraper.scrape_once()
        assert server.gets == 2  # nothing active left to scrape
    finally:
        await scraper.stop()
        await server.runner.cleanup()
