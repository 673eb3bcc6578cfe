"""Envoy absorbs a bad canary (issue #16, docs/reliability.md): during a rollout a candidate's
5xx or reset before the first response byte is retried on stable; a request that hears
nothing for `retries.idle_timeout_seconds` is retried (or ends) instead of waiting for the
fault to clear; and nothing is ever sent twice once a byte reached the client. Real Envoy,
real simulators and hand-written backends that fail in exactly one way."""

from __future__ import annotations

import http.client
import http.server
import json
import socket
import threading
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator

import pytest

from tests.conftest import Running, switchyard, wait_for_proxy, wait_until

MODEL = "llama-3-8b"
CANARY = {"model": MODEL, "to": "v2", "strategy": "canary",
          "steps": [{"set_weight": 50}, {"pause": {}}]}  # fmt: skip


def complete(stack: Running, stream: bool = False, timeout: float = 20) -> tuple[int, str, bytes]:
    """Status, the version that answered, and the body (a failure is a status, not raised)."""
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2, "stream": stream}
    request = urllib.request.Request(
        f"{stack.proxy}/v1/completions", data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.headers["x-switchyard-version"], response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("x-switchyard-version"), exc.read()


def endpoint(stack: Running, version: str) -> str:
    model = stack.api("GET", f"/v1/models/{MODEL}")[1]
    return next(v for v in model["versions"] if v["name"] == version)["endpoints"][0]


def fault(stack: Running, version: str, faults: dict | None) -> None:
    url = f"{endpoint(stack, version)}/sim/faults"
    data = json.dumps(faults).encode() if faults else None
    request = urllib.request.Request(url, data=data, method="POST" if faults else "DELETE")
    urllib.request.urlopen(request, timeout=5).read()


def start_canary(stack: Running) -> str:
    status, rollout = stack.api("POST", "/v1/rollouts", CANARY)
    assert status == 201, rollout
    wait_until(lambda: stack.api("GET", f"/v1/rollouts/{rollout['id']}")[1]["phase"] == "paused",
               20, message="the canary to reach its pause")  # fmt: skip
    return rollout["id"]


def models(**retries) -> list[dict]:
    sim = {"sim": {"ttft_ms": 5}}
    return [{"name": MODEL, "retries": retries, "versions": [
        {"name": "v1", "weight": 100, "backend": sim},
        {"name": "v2", "weight": 0, "backend": sim}]}]  # fmt: skip


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Running]:
    with switchyard("up", tmp_path_factory.mktemp("canary"), models(idle_timeout_seconds=1)) as s:
        wait_for_proxy(s.proxy)
        yield s


@pytest.fixture
def canary(stack) -> Iterator[str]:
    rollout = start_canary(stack)
    try:
        yield rollout
    finally:
        fault(stack, "v2", None)
        stack.api("POST", f"/v1/rollouts/{rollout}/abort")


def test_a_failing_canary_costs_clients_nothing_during_a_rollout(stack, canary):
    fault(stack, "v2", {"error_rate": 1.0, "status": 500})
    answers = Counter(complete(stack)[:2] for _ in range(60))
    assert answers == Counter({(200, "v1"): 60})  # v2's share was retried on stable


def test_outside_a_rollout_5xx_are_the_clients_to_see(stack):
    """The default retries 5xx only while a rollout runs (a fleet-wide 5xx retried would
    double the load on an overloaded fleet); a plain 50/50 split shows v2's errors."""
    try:
        assert stack.api("PUT", f"/v1/models/{MODEL}/weights",
                         {"weights": {"v1": 50, "v2": 50}})[0] == 200  # fmt: skip
        # A canary test before this one may have left v2 ejected by outlier detection, which
        # sends its share to stable until the ejection ends: first see v2 answer again.
        wait_until(lambda: complete(stack)[1] == "v2", 30, message="v2 to answer again")
        fault(stack, "v2", {"error_rate": 1.0, "status": 500})
        statuses = Counter(complete(stack)[0] for _ in range(60))
        assert statuses[500] > 0 and statuses[200] > 0, statuses
    finally:
        fault(stack, "v2", None)
        stack.api("PUT", f"/v1/models/{MODEL}/weights", {"weights": {"v1": 100, "v2": 0}})


def test_a_hung_candidate_is_retried_on_stable_after_the_idle_timeout(stack, canary):
    fault(stack, "v2", {"hang": True})
    # Every request ends while the hang is still on: none waits for the fault to clear.
    answers = Counter(complete(stack, timeout=15)[:2] for _ in range(20))
    assert answers == Counter({(200, "v1"): 20})


# -- backends that fail in one precise way -----------------------------------------------


class Breaking(http.server.BaseHTTPRequestHandler):
    """`before`: closes the connection without answering; `after`: sends the response
    headers and one SSE chunk, then closes. Counts the requests it gets."""

    protocol_version = "HTTP/1.1"
    mode = "before"
    posts = 0

    def do_GET(self) -> None:  # health checks
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        type(self).posts += 1
        if self.mode == "after":
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.end_headers()
            self.wfile.write(b'data: {"choices": [{"text": "half"}]}\n\n')
            self.wfile.flush()
        self.connection.shutdown(socket.SHUT_RDWR)
        self.close_connection = True

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def breaking(tmp_path) -> Iterator[tuple[Running, type[Breaking]]]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Breaking)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Breaking.posts = 0
    versions = [
        {"name": "v1", "weight": 100, "backend": {"sim": {}}},
        {"name": "v2", "weight": 0, "backend": {"url": f"http://127.0.0.1:{server.server_address[1]}"}},
    ]  # fmt: skip
    try:
        with switchyard("up", tmp_path, [{"name": MODEL, "versions": versions}]) as stack:
            wait_for_proxy(stack.proxy)
            start_canary(stack)
            yield stack, Breaking
    finally:
        server.shutdown()
        server.server_close()


def test_a_reset_before_the_first_byte_is_retried_on_stable(breaking):
    stack, backend = breaking
    backend.mode = "before"
    answers = Counter(complete(stack)[:2] for _ in range(40))
    assert answers == Counter({(200, "v1"): 40})
    assert backend.posts > 0  # v2 took its share, and each of those was retried on v1


def test_nothing_is_sent_twice_once_a_byte_reached_the_client(breaking):
    stack, backend = breaking
    backend.mode = "after"
    cut = 0
    for _ in range(40):
        try:
            _, version, body = complete(stack, stream=True)
        except (OSError, http.client.HTTPException):
            cut += 1  # the stream broke after its first chunk: the client saw it break
            continue
        if version == "v2":
            cut += 1
            assert b"half" in body
    # Every request v2 took reached it once, and was never sent again (to v1 or v2).
    assert cut == backend.posts > 0
