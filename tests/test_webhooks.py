"""Webhooks: rollout events reach the configured URL, retried when the receiver fails."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

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
    assert "rollout.started" in types and "rollout.step" in types
    assert all(t.startswith("rollout.") for t in types)  # weights.changed was filtered out
    succeeded = next(e for e in receiver.received if e["type"] == "rollout.succeeded")
    assert succeeded["id"] == rollout["id"] and succeeded["weights"] == {"v1": 0, "v2": 100}


def test_a_bad_webhook_url_is_a_config_error(tmp_path):
    from controlplane.config import parse_config
    from controlplane.errors import ConfigError

    with pytest.raises(ConfigError, match=r"notifications.webhooks\[0\].url"):
        parse_config({"notifications": {"webhooks": [{"url": "mailto:x"}]}})
