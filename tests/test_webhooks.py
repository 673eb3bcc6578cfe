"""Webhooks: rollout events reach the configured URL in order, retried when the receiver
fails; a dead receiver costs the controller one task and a bounded queue."""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from aiohttp import web

from controlplane.config import Webhook
from controlplane.events import EventBus
from controlplane.metrics import REGISTRY
from controlplane.notify import Notifier
from tests.conftest import switchyard, two_version_models, wait_until


class Receiver(ThreadingHTTPServer):
    """Answers 500 to its first POST, then 200; keeps what it received."""

    def __init__(self) -> None:
        self.received: list[dict] = []
        self.attempts = 0
        super().__init__(("127.0.0.1", 0), Handler)


class Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.attempts += 1
        status = 500 if self.server.attempts == 1 else 200
        if status == 200:
            self.server.received.append(body)
        self.send_response(status)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def receiver():
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_rollout_events_are_posted_and_retried(tmp_path, receiver):
    url = f"http://127.0.0.1:{receiver.server_address[1]}/hook"
    hooks = {"webhooks": [{"url": url, "events": ["rollout.*"]}]}
    with switchyard("up", tmp_path, two_version_models(), notifications=hooks) as running:
        status, rollout = running.api(
            "POST", "/v1/rollouts", {"model": "llama-3-8b", "to": "v2", "strategy": "immediate"}
        )
        assert status == 201
        wait_until(
            lambda: {"rollout.started", "rollout.succeeded"}
            <= {e["type"] for e in receiver.received},
            timeout=15, message="rollout.started (retried) and rollout.succeeded webhooks",
        )  # fmt: skip
        running.api("PUT", "/v1/models/llama-3-8b/weights", {"weights": {"v1": 100}})
    types = [event["type"] for event in receiver.received]
    assert receiver.attempts == len(types) + 1  # the refused first delivery was retried
    # In order: nothing overtook the retried first event.
    assert types == ["rollout.started", "rollout.step", "rollout.succeeded"], types
    assert "rollout.started" in types and "rollout.step" in types
    assert all(t.startswith("rollout.") for t in types)  # weights.changed was filtered out
    succeeded = next(e for e in receiver.received if e["type"] == "rollout.succeeded")
    assert succeeded["id"] == rollout["id"] and succeeded["weights"] == {"v1": 0, "v2": 100}
    # The event's own id travels beside the rollout's, for deduplication.
    assert isinstance(succeeded["event_id"], int) and succeeded["event_id"] != rollout["id"]


def test_a_bad_webhook_url_is_a_config_error(tmp_path):
    from controlplane.config import parse_config
    from controlplane.errors import ConfigError

    with pytest.raises(ConfigError, match=r"notifications.webhooks\[0\].url"):
        parse_config({"notifications": {"webhooks": [{"url": "mailto:x"}]}})


class DeadThenAlive:
    """A receiver on a real port that accepts connections and answers nothing while `dead`
    is set, then 200 to everything; keeps the ids it got, in arrival order."""

    def __init__(self) -> None:
        self.alive = asyncio.Event()
        self.ids: list[int] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        await self.alive.wait()
        self.ids.append((await request.json())["event_id"])
        return web.Response()

    async def __aenter__(self) -> DeadThenAlive:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.runner = web.AppRunner(app, shutdown_timeout=1)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}/hook"
        return self

    async def __aexit__(self, *exc) -> None:
        self.alive.set()
        await self.runner.cleanup()


def dropped(reason: str) -> float:
    labels = {"reason": reason}
    return REGISTRY.get_sample_value("switchyard_webhook_events_dropped_total", labels) or 0.0


async def test_a_dead_receiver_costs_one_task_and_a_bounded_queue_and_gets_the_newest_in_order():
    bus = EventBus()
    async with DeadThenAlive() as receiver:
        notifier = Notifier(bus, [Webhook(url=receiver.url)], queue_size=50, timeout_s=30)
        notifier.start()
        await asyncio.sleep(0.05)
        tasks_before, drops_before = len(asyncio.all_tasks()), dropped("queue_full")
        published = []
        for _ in range(40):  # 2,000 events while the receiver hangs on the first
            published += [bus.publish("rollout.step", n=len(published)).id for _ in range(50)]
            await asyncio.sleep(0)
        assert len(asyncio.all_tasks()) <= tasks_before + 2  # aiohttp's own, not one per event
        lost = dropped("queue_full") - drops_before
        assert lost >= len(published) - 50 - 1  # the queue holds 50, one is being delivered

        receiver.alive.set()  # it comes back: what was kept arrives, oldest first, then new ones
        await asyncio.wait_for(_until(lambda: published[-1] in receiver.ids), 10)
        assert receiver.ids == sorted(receiver.ids)
        assert len(receiver.ids) + lost == len(published)
        after = bus.publish("rollout.succeeded").id
        await asyncio.wait_for(_until(lambda: receiver.ids[-1] == after), 10)
        await notifier.stop()


async def _until(predicate) -> None:
    while not predicate():
        await asyncio.sleep(0.01)
