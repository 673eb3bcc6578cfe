"""Envoy stats pushed over the metrics service: generated code, the servicer, real Envoys.

The real-Envoy test runs the whole Stack in this event loop (so the signals can be read),
with simulators as backends, and a second Envoy from `switchyard bootstrap` beside the first.
"""

from __future__ import annotations

import asyncio
import filecmp
import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import grpc

from controlplane._gen.switchyard_metrics import metrics_service_pb2, prometheus_metrics_pb2
from controlplane.config import parse_config
from controlplane.health.envoy_stats import (
    METHOD,
    EnvoyStatsReceiver,
    read_flush,
    read_flush_bytes,
)
from controlplane.health.signals import HealthSignals
from controlplane.service import Stack
from controlplane.xds.resources import stats_name
from controlplane.xds.transport import GrpcServer
from tests.conftest import ROOT, EnvoyProcess, free_ports, write_config

MODEL = "llama-3.1-8b"  # a dot: Envoy would cut the cluster name there
# Envoy's default histogram buckets (ms), as the sink sends them.
BOUNDS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000,
          300000, 600000, 1800000, 3600000)  # fmt: skip
NOW = 1_000_000.0


# -- generated code ------------------------------------------------------------------------


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    """controlplane/_gen is exactly what `make protos` makes of protos/ today."""
    subprocess.run(
        [sys.executable, str(ROOT / "protos" / "generate.py"), str(tmp_path / "_gen")],
        check=True,
        capture_output=True,
    )
    committed = ROOT / "controlplane" / "_gen"

    def files(root: Path) -> set[str]:
        return {
            str(path.relative_to(root))
            for path in root.rglob("*")
            if path.is_file() and "__pycache__" not in path.parts
        }

    fresh = files(tmp_path / "_gen")
    assert files(committed) == fresh, "run `make protos`"
    stale = [name for name in sorted(fresh) if not filecmp.cmp(
        committed / name, tmp_path / "_gen" / name, shallow=False)]  # fmt: skip
    assert not stale, f"stale generated code {stale}: run `make protos`"


def test_service_path_is_envoys() -> None:
    assert METHOD == "/envoy.service.metrics.v3.MetricsService/StreamMetrics"


# -- the servicer, fed by hand over a real gRPC channel ------------------------------------


def family(name: str, cluster: str, value: float, **labels: str):
    found = prometheus_metrics_pb2.MetricFamily(name=name, type=prometheus_metrics_pb2.COUNTER)
    metric = found.metric.add(timestamp_ms=1)
    metric.label.add(name="envoy.cluster_name", value=cluster)
    for key, label_value in labels.items():
        metric.label.add(name=f"envoy.{key}", value=label_value)
    metric.counter.value = value
    return found


def responses(cluster: str, klass: str, count: float, name: str = "cluster.upstream_rq_xx"):
    return family(name, cluster, count, response_code_class=klass)


def latency(cluster: str, samples_ms: list[float], name: str = "cluster.upstream_rq_time"):
    found = prometheus_metrics_pb2.MetricFamily(name=name, type=prometheus_metrics_pb2.HISTOGRAM)
    metric = found.metric.add()
    metric.label.add(name="envoy.cluster_name", value=cluster)
    metric.histogram.sample_count = len(samples_ms)
    metric.histogram.sample_sum = sum(samples_ms)
    for bound in BOUNDS:
        count = sum(1 for sample in samples_ms if sample <= bound)
        metric.histogram.bucket.add(cumulative_count=count, upper_bound=bound)
    return found


def gauge(name: str, cluster: str, value: float):
    found = prometheus_metrics_pb2.MetricFamily(name=name, type=prometheus_metrics_pb2.GAUGE)
    metric = found.metric.add()
    metric.label.add(name="envoy.cluster_name", value=cluster)
    metric.gauge.value = value
    return found


def test_a_flush_read_from_its_bytes_is_read_as_parsed() -> None:
    """At fleet size a flush holds ~19 stats per version cluster whatever its traffic; the
    receiver finds the few it reads in the serialized message instead of parsing them all."""
    idle = [
        factory(f"cluster.{stat}", f"m{i}@v1", 1.0)
        for i in range(50)
        for stat, factory in (("membership_healthy", gauge), ("membership_total", gauge),
                              ("health_check.attempt", family), ("upstream_rq_timeout", family),
                              ("upstream_rq_retry_overflow", family))
    ]  # fmt: skip
    busy = [
        responses("m3@v1", "2", 10), responses("m3@v1", "5", 2), latency("m3@v1", [1, 20, 300]),
        gauge("cluster.upstream_rq_active", "m4@v1", 3), family("cluster.upstream_rq_retry",
        "m3@v1", 1), responses("m3@v1", "2", 99, name="cluster.external.upstream_rq_xx"),
        responses("qwen-2", "2", 4, name="cluster.5@v1.upstream_rq_xx"),
        gauge("cluster.5@v1.membership_healthy", "qwen-2", 1),
    ]  # fmt: skip
    for families in (idle, idle + busy, busy):
        flush = message("envoy-1", *families)
        expected = read_flush(flush.envoy_metrics)
        found = read_flush_bytes(flush.SerializeToString())
        assert found is not None
        assert {name: vars(tally) for name, tally in found.items()} == {
            name: vars(tally) for name, tally in expected.items()
        }
    assert read_flush_bytes(message("envoy-1", *idle).SerializeToString()) == {}
    tallies = read_flush_bytes(message(None, *idle, *busy).SerializeToString())
    assert (tallies["m3@v1"].requests, tallies["m3@v1"].server_errors) == (12, 2)
    assert tallies["m3@v1"].healthy_hosts == 1.0 and tallies["qwen-2.5@v1"].requests == 4
    assert read_flush_bytes(b"\x12\x05garbage.upstream_rq_xx\x18") is None  # parsed instead


def message(node: str | None, *families):
    built = metrics_service_pb2.StreamMetricsMessage(envoy_metrics=families)
    if node:
        built.identifier.node.id = node
        built.identifier.node.cluster = "switchyard"
    return built


async def stream(port: int, *messages) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.stream_unary(
            METHOD,
            request_serializer=metrics_service_pb2.StreamMetricsMessage.SerializeToString,
            response_deserializer=metrics_service_pb2.StreamMetricsResponse.FromString,
        )

        async def requests():
            for item in messages:
                yield item

        await call(requests())


async def test_flushes_become_per_version_deltas_summed_over_envoys() -> None:
    signals = HealthSignals()
    # A State stand-in with a model whose name has ':' (Envoy writes it '_' in stat names).
    state = SimpleNamespace(
        models={"org/m:7b": SimpleNamespace(name="org/m:7b", versions={"v1": None})}
    )
    receiver = EnvoyStatsReceiver(signals, state, clock=lambda: NOW)
    server = GrpcServer(receiver.methods())
    port = await server.start("127.0.0.1", 0)
    try:
        first = message(
            "edge-1",
            responses("m@v1", "2", 8),
            responses("m@v1", "5", 2),
            responses("m@v1", "2", 8, name="cluster.external.upstream_rq_xx"),  # a repeat
            family("cluster.upstream_rq_retry", "m@v1", 3),
            family("cluster.upstream_cx_connect_fail", "m@v1", 9),  # in the 5xx and retries
            # One stream broken after its headers, one close before them (answered 503).
            family("cluster.upstream_cx_protocol_error", "m@v1", 1),
            family("cluster.upstream_cx_destroy_remote_with_active_rq", "m@v1", 2),
            latency("m@v1", [150.0] * 10),
            latency("m@v1", [150.0] * 10, name="cluster.external.upstream_rq_time"),
            # Envoy cuts the cluster-name tag at the first '.': qwen-2.5@v1.2 arrives so.
            responses("qwen-2", "2", 4, name="cluster.5@v1.2.upstream_rq_xx"),
            responses("qwen-2", "2", 4, name="cluster.5@v1.2.external.upstream_rq_xx"),
            responses("org/m_7b@v1", "2", 5),
            responses("switchyard_xds", "2", 7),  # not a model version
            family("http.downstream_rq_xx", "", 99, response_code_class="2"),
            responses("m@v2", "2", 0),  # idle: no delta at all
        )
        later = message(None, responses("m@v1", "2", 5))
        await stream(port, first, later)
        await stream(port, message("edge-2", responses("m@v1", "2", 5), latency("m@v1", [3.0])))
    finally:
        await server.stop()

    v1 = signals.window("m", "v1", 60, now=NOW)
    assert v1.requests == 8 + 2 + 5 + 5
    assert v1.errors == 2 + 1  # 5xx + the stream broken after its headers
    assert v1.retries == 3
    assert 100 < v1.latency_p50_ms <= 250 and v1.latency_p95_ms > 200  # 10 of 11 at 150 ms
    assert signals.window("qwen-2.5", "v1.2", 60, now=NOW).requests == 4
    assert signals.window("org/m:7b", "v1", 60, now=NOW).requests == 5
    assert ("m", "v2") not in signals._deltas
    assert {delta.source for delta in signals._deltas[("m", "v1")]} == {"edge-1", "edge-2"}
    assert receiver.flushes == 3 and receiver.streams == {}


# -- real Envoys ---------------------------------------------------------------------------


async def post_completions(proxy: str, count: int) -> list[int]:
    """`count` completions, each on a new connection (so SO_REUSEPORT spreads them)."""
    connector = aiohttp.TCPConnector(force_close=True)
    timeout = aiohttp.ClientTimeout(total=15)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one() -> int:
            body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
            async with session.post(f"{proxy}/v1/completions", json=body) as response:
                await response.read()
                return response.status

        return list(await asyncio.gather(*(one() for _ in range(count))))


async def settled(signals: HealthSignals, model: str) -> tuple[float, float, float]:
    """A version's (requests, errors, retries) so far, once a flush has added nothing."""
    last = None
    while True:
        figures = signals.window(model, "v1", 600)
        totals = (figures.requests, figures.errors, figures.retries)
        if totals == last:
            return totals
        last = totals
        await asyncio.sleep(1.2)


async def set_faults(sim: str, faults: dict) -> None:
    """Replace the simulator's faults (`{}`: none)."""
    async with aiohttp.ClientSession() as session:
        async with session.delete(f"{sim}/sim/faults") as response:
            assert response.status == 200
        if faults:
            async with session.post(f"{sim}/sim/faults", json=faults) as response:
                assert response.status == 200


async def wait_for(predicate, timeout: float = 10.0, message: str = ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {message or predicate}")


def flush_interval(admin_port: int) -> str:
    """The stats_flush_interval of the bootstrap that Envoy runs, from its config dump."""
    url = f"http://127.0.0.1:{admin_port}/config_dump"
    with urllib.request.urlopen(url, timeout=5) as response:
        dump = json.load(response)
    bootstrap = next(c for c in dump["configs"] if c["@type"].endswith("BootstrapConfigDump"))
    return bootstrap["bootstrap"]["stats_flush_interval"]


def admin_completed(admin_port: int) -> int:
    """One Envoy's own count for llama-3-8b@v1 (cumulative), from its admin port."""
    stat = rf"^cluster\.{re.escape(stats_name(MODEL))}@v1\.upstream_rq_completed$"
    url = f"http://127.0.0.1:{admin_port}/stats?filter={stat}"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return int(text.rsplit(":", 1)[1]) if ":" in text else 0


async def test_real_envoys_stream_counts_errors_latency(tmp_path: Path) -> None:
    models = [
        {"name": MODEL, "versions": [
            {"name": "v1", "weight": 100, "backend": {"sim": {}}},
            {"name": "v2", "weight": 0, "backend": {"sim": {}}},
        ]},
    ]  # fmt: skip
    config_path, raw = write_config(tmp_path, models, health={"stats_flush_seconds": 0.5})
    stack = Stack(parse_config(raw), with_envoy=True, node_id="edge-1")
    extra: EnvoyProcess | None = None
    await stack.start()
    try:
        assert await stack.wait_ready()
        proxy = f"http://{raw['listen']['proxy']}"
        signals = stack.controller.health
        sim = stack.controller.state.models[MODEL].versions["v1"].endpoints[0].url
        await wait_for(
            lambda: "edge-1" in stack.envoy_stats.streams.values(), message="stats stream"
        )
        for _ in range(100):  # routes can arrive after the listener
            if (await post_completions(proxy, 1)) == [200]:
                break
            await asyncio.sleep(0.1)

        async def counted(requests: float, errors: float) -> None:
            def done() -> bool:
                figures = signals.window(MODEL, "v1", 600)
                return figures.requests == requests and figures.errors == errors

            await wait_for(done, 5, f"{requests} requests, {errors} errors")

        # Successes: counted exactly, fast.
        requests, errors, _ = await settled(signals, MODEL)
        started = time.time()
        assert await post_completions(proxy, 20) == [200] * 20
        await counted(requests + 20, errors)
        fast = signals.window(MODEL, "v1", time.time() - started)
        assert fast.requests == 20 and fast.errors == 0 and fast.latency_p95_ms < 100

        # Injected 500s: counted as errors.
        await set_faults(sim, {"error_rate": 1.0, "status": 500})
        assert await post_completions(proxy, 10) == [500] * 10
        await counted(requests + 30, errors + 10)

        # Injected time to first token: the upstream latency follows.
        await set_faults(sim, {"ttft_ms": 200})
        started = time.time()
        assert await post_completions(proxy, 10) == [200] * 10
        await counted(requests + 40, errors + 10)
        slow = signals.window(MODEL, "v1", time.time() - started)
        assert slow.requests == 10 and slow.latency_p95_ms >= 200
        await set_faults(sim, {})

        # A second Envoy from `switchyard bootstrap`, on the same listener port: summed.
        (admin_port,) = free_ports(1)
        extra = await asyncio.to_thread(EnvoyProcess, tmp_path, config_path, "edge-2", admin_port)
        await wait_for(
            lambda: "edge-2" in stack.envoy_stats.streams.values(), 15, "edge-2 stats stream"
        )
        await wait_for(
            lambda: any(
                s.node_id == "edge-2" and s.applied(stack.controller.snapshot)
                for s in stack.controller.xds.streams.values()
            ),
            10,
            "edge-2 to apply the configuration",
        )
        envoy_ports = (int(raw["listen"]["envoy_admin"].rsplit(":", 1)[1]), admin_port)
        # Both Envoys flush as often as the config says (`health.stats_flush_seconds`).
        for port in envoy_ports:
            assert await asyncio.to_thread(flush_interval, port) == "0.500s"
        before = [await asyncio.to_thread(admin_completed, p) for p in envoy_ports]
        assert await post_completions(proxy, 40) == [200] * 40
        await counted(requests + 80, errors + 10)
        after = [await asyncio.to_thread(admin_completed, p) for p in envoy_ports]
        shares = [b - a for a, b in zip(before, after, strict=True)]
        assert sum(shares) == 40 and all(shares), shares  # both Envoys served and reported
    finally:
        if extra is not None:
            extra.stop()
        await stack.stop()


# -- failures Envoy answers itself, and streams that break: each request counted once ------


async def raw_backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """An HTTP/1.1 backend that fails as told by the prompt: a crashing vLLM, in short."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        if head.startswith(b"GET /health "):  # the runtime's probe, Envoy's health check
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            await writer.drain()
            return
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        prompt = json.loads(await reader.readexactly(length))["prompt"]
        if prompt == "close-before-headers":
            return
        if prompt == "close-mid-stream":
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"transfer-encoding: chunked\r\n\r\n6\r\ndata:\n\r\n"
            )
            await writer.drain()
            await asyncio.sleep(0.05)
            return
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
        await writer.drain()
    finally:
        writer.close()


async def post_prompt(proxy: str, model: str, prompt: str) -> int | str:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        body = {"model": model, "prompt": prompt}
        try:
            async with session.post(f"{proxy}/v1/completions", json=body) as response:
                await response.read()
                return response.status
        except aiohttp.ClientPayloadError:
            return "broken"


async def test_real_envoy_counts_each_failed_request_once(tmp_path: Path) -> None:
    backend = await asyncio.start_server(raw_backend, "127.0.0.1", 0)
    port = backend.sockets[0].getsockname()[1]
    (closed,) = free_ports(1)  # nothing listens there: connections are refused
    models = [
        {"name": "raw", "versions": [
            {"name": "v1", "weight": 100, "backend": {"url": f"http://127.0.0.1:{port}"}}]},
        {"name": "refused", "versions": [
            {"name": "v1", "weight": 100, "backend": {"url": f"http://127.0.0.1:{closed}"}}]},
    ]  # fmt: skip
    _, raw = write_config(tmp_path, models)
    stack = Stack(parse_config(raw), with_envoy=True, node_id="edge-1")
    await stack.start()
    try:
        assert await stack.wait_ready()
        proxy = f"http://{raw['listen']['proxy']}"
        for _ in range(100):  # routes can arrive after the listener
            if await post_prompt(proxy, "raw", "ok") == 200:
                break
            await asyncio.sleep(0.1)
        signals = stack.controller.health
        before = await settled(signals, "raw")  # the warm-up's
        assert await post_prompt(proxy, "raw", "ok") == 200
        assert await post_prompt(proxy, "raw", "close-before-headers") == 503
        assert await post_prompt(proxy, "raw", "close-mid-stream") == "broken"
        assert await post_prompt(proxy, "refused", "ok") == 503

        def added(model: str, baseline=(0.0, 0.0, 0.0)) -> tuple[float, ...]:
            figures = signals.window(model, "v1", 600)
            totals = (figures.requests, figures.errors, figures.retries)
            return tuple(now - then for now, then in zip(totals, baseline, strict=True))

        await wait_for(lambda: added("raw", before)[0] == 3, 5, "3 requests")
        await asyncio.sleep(1.2)  # one more flush: nothing may come late
        assert added("raw", before) == (3, 2, 0)  # the 503, the broken stream
        # A url backend that refuses connections never was ready: it is not in EDS at all.
        assert not stack.controller.state.models["refused"].versions["v1"].ready
    finally:
        await stack.stop()
        backend.close()
