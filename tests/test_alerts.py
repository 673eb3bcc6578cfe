"""`health.degraded` / `health.recovered` for serving versions, rollout or not.

The rules run in-process on hand-fed signals; one test drives a real stack: traffic through
Envoy, a fault injected into the simulator, the events read from `GET /v1/events` and from a
webhook.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import aiohttp
import pytest

from controlplane.config import AlertThresholds, Webhook, parse_config
from controlplane.controller import Controller
from controlplane.health.alerts import HealthAlerts, assess
from controlplane.health.signals import Delta, Histogram
from controlplane.notify import wanted
from tests.conftest import InBackground, http_json, switchyard, wait_until
from tests.test_health_analysis import figures

ALERTS = {"max_error_rate": 0.2, "max_latency_p95_ms": 500, "min_requests": 5, "window_seconds": 2}
CONFIG = {
    "models": [
        {
            "name": "chat",
            "alerts": ALERTS,
            "versions": [
                {"name": "v1", "weight": 90, "backend": {"url": "http://127.0.0.1:1"}},
                {"name": "v2", "weight": 10, "backend": {"url": "http://127.0.0.1:2"}},
                {"name": "v3", "weight": 0, "backend": {"url": "http://127.0.0.1:3"}},
            ],
        },
        {"name": "quiet", "versions": [{"name": "v1", "weight": 100, "backend": {"sim": {}}}]},
    ]
}
NOW = 10_000.0


# -- the rule -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "status", "reason"),
    [
        ({}, "ok", "within thresholds over 100 requests"),
        ({"errors": 30.0, "error_rate": 0.3}, "degraded", "error_rate 0.3 > max_error_rate 0.2"),
        (
            {"errors": 30.0, "error_rate": 0.3, "latency_p95_ms": 900.0},
            "degraded",
            "error_rate 0.3 > max_error_rate 0.2; latency_p95_ms 900 > max_latency_p95_ms 500",
        ),
        ({"requests": 4.0, "errors": 4.0, "error_rate": 1.0}, None, "4 requests < min_requests 5"),
        ({"latency_p95_ms": None}, None, "no latency_p95_ms data for max_latency_p95_ms 500"),
        (
            {"errors": 50.0, "error_rate": 0.5, "latency_p95_ms": None},
            "degraded",
            "error_rate 0.5 > max_error_rate 0.2",
        ),
    ],
    ids=["healthy", "errors", "two-breaches", "too-few", "no-data", "breach-beats-no-data"],
)
def test_assess_uses_the_absolute_thresholds(values: dict, status, reason: str) -> None:
    assert assess(figures(**values), AlertThresholds(**ALERTS)) == (status, reason)


def test_health_events_reach_webhooks_that_ask_for_them() -> None:
    hook = "http://127.0.0.1:9/hook"
    assert wanted(Webhook(url=hook, events=["*"]), "health.degraded")
    assert wanted(Webhook(url=hook, events=["health.*"]), "health.recovered")
    assert not wanted(Webhook(url=hook, events=["rollout.*"]), "health.degraded")


# -- the watcher --------------------------------------------------------------------------------


def feed(controller: Controller, version: str, at: float, requests: int, errors: int) -> None:
    latency = Histogram((100.0, 1000.0), [float(requests), 0.0, 0.0])
    delta = Delta(time=at, requests=requests, errors=errors, latency_ms=latency, source="envoy")
    controller.health.add("chat", version, delta)


@pytest.fixture
def watcher(tmp_path):
    controller = Controller(parse_config(CONFIG), tmp_path)
    yield HealthAlerts(controller)
    controller.store.close()


def test_degraded_and_recovered_are_published_once_each(watcher) -> None:
    controller = watcher.controller
    events = controller.events.subscribe()
    feed(controller, "v1", NOW - 0.5, requests=50, errors=0)
    assert watcher.check(NOW) == []  # healthy from the start: nothing to say

    feed(controller, "v1", NOW + 0.5, requests=50, errors=40)
    ((kind, data),) = watcher.check(NOW + 1)
    assert kind == "health.degraded"
    assert data["model"] == "chat" and data["version"] == "v1"
    assert data["reason"] == "error_rate 0.4 > max_error_rate 0.2"
    assert data["figures"]["error_rate"] == 0.4 and data["figures"]["requests"] == 100
    assert data["thresholds"] == ALERTS
    published = events.get_nowait()
    assert (published.type, published.data) == ("health.degraded", data)

    feed(controller, "v1", NOW + 1.5, requests=50, errors=50)
    assert watcher.check(NOW + 2) == []  # still degraded: no repeat
    assert watcher.check(NOW + 4) == []  # no traffic in the window: keeps its status
    assert watcher.status[("chat", "v1")] == "degraded"

    feed(controller, "v1", NOW + 4.5, requests=50, errors=1)
    ((kind, data),) = watcher.check(NOW + 5)
    assert kind == "health.recovered" and data["version"] == "v1"
    assert data["reason"] == "within thresholds over 50 requests"
    assert events.get_nowait().type == "health.recovered" and events.empty()
    assert watcher.check(NOW + 5.5) == []


def test_only_serving_versions_are_watched(watcher) -> None:
    controller = watcher.controller
    for version in ("v2", "v3"):  # v2 serves 10 %, v3 serves nothing
        feed(controller, version, NOW, requests=20, errors=20)
    controller.health.add("quiet", "v1", Delta(time=NOW, requests=20, errors=20))  # no alerts
    assert [(kind, data["version"]) for kind, data in watcher.check(NOW)] == [
        ("health.degraded", "v2")
    ]
    # Out of traffic while degraded: no longer checked, and no false "recovered".
    controller.state.models["chat"].versions["v2"].weight = 0
    feed(controller, "v2", NOW + 1, requests=20, errors=0)
    assert watcher.check(NOW + 1) == []
    assert watcher.status == {("chat", "v2"): "degraded"}


async def test_start_publishes_from_live_signals_and_stop_ends_it(watcher) -> None:
    controller = watcher.controller
    events = controller.events.subscribe()
    watcher.interval = 0.05
    watcher.start()
    try:
        feed(controller, "v1", time.time(), requests=10, errors=10)
        event = await asyncio.wait_for(events.get(), 5)
        assert (event.type, event.data["version"]) == ("health.degraded", "v1")
    finally:
        await watcher.stop()
    assert watcher._task is None


# -- end to end ---------------------------------------------------------------------------------


class Receiver(ThreadingHTTPServer):
    """A webhook receiver that keeps what it gets."""

    def __init__(self) -> None:
        self.received: list[dict] = []
        super().__init__(("127.0.0.1", 0), Handler)


class Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        self.server.received.append(
            json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        )
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


class Traffic(InBackground):
    """About 20 completions a second through Envoy, from a background thread."""

    join_timeout = 10.0

    def __init__(self, proxy: str) -> None:
        self.proxy = proxy
        super().__init__()

    def run(self) -> None:
        body = {"model": "llama-3-8b", "prompt": "x", "max_tokens": 2}
        while not self.stopping.is_set():
            with contextlib.suppress(OSError):
                http_json("POST", f"{self.proxy}/v1/completions", body)
            self.stopping.wait(0.05)


async def _next_event(stream: aiohttp.ClientResponse, kind: str) -> dict:
    """The data of the next Server-Sent Event of type `kind`."""
    current = None
    async for raw in stream.content:
        line = raw.decode().strip()
        if line.startswith("event:"):
            current = line.split(":", 1)[1].strip()
        elif line.startswith("data:") and current == kind:
            return json.loads(line.split(":", 1)[1])
    raise AssertionError(f"the event stream ended before {kind}")


def test_a_failing_serving_version_is_reported_and_then_recovers(tmp_path) -> None:
    receiver = Receiver()
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    hook = f"http://127.0.0.1:{receiver.server_address[1]}/hook"
    models = [
        {
            "name": "llama-3-8b",
            "alerts": {"max_error_rate": 0.2, "min_requests": 5, "window_seconds": 2},
            "versions": [{"name": "v1", "weight": 100, "backend": {"sim": {}}}],
        }
    ]
    notifications = {"webhooks": [{"url": hook, "events": ["health.*"]}]}
    try:
        with (
            switchyard("up", tmp_path, models, notifications=notifications) as stack,
            Traffic(stack.proxy),
        ):
            sim = stack.api("GET", "/v1/models/llama-3-8b")[1]["versions"][0]["endpoints"][0]

            async def watch() -> tuple[dict, dict]:
                async with (
                    aiohttp.ClientSession() as session,
                    session.get(f"{stack.admin}/v1/events") as stream,
                ):
                    assert http_json("POST", f"{sim}/sim/faults", {"error_rate": 1.0})[0] == 200
                    degraded = await _next_event(stream, "health.degraded")
                    assert http_json("DELETE", f"{sim}/sim/faults")[0] == 200
                    return degraded, await _next_event(stream, "health.recovered")

            degraded, recovered = asyncio.run(asyncio.wait_for(watch(), 60))
            wait_until(lambda: len(receiver.received) >= 2, 15, message="both webhooks")
            # An SSE handler notices its closed client only when it writes: give it an event,
            # or stopping the stack waits for its next keep-alive (15 s).
            stack.api("PUT", "/v1/models/llama-3-8b/weights", {"weights": {"v1": 100}})
    finally:
        receiver.shutdown()
        receiver.server_close()
    assert (degraded["model"], degraded["version"]) == ("llama-3-8b", "v1")
    assert degraded["reason"].startswith("error_rate ")
    assert degraded["reason"].endswith("> max_error_rate 0.2")
    assert degraded["figures"]["error_rate"] > 0.2
    assert degraded["thresholds"]["max_error_rate"] == 0.2
    assert recovered["version"] == "v1" and recovered["figures"]["error_rate"] <= 0.2
    assert [(e["type"], e["version"]) for e in receiver.received] == [
        ("health.degraded", "v1"),
        ("health.recovered", "v1"),
    ]
