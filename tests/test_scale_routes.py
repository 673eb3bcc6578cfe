"""The per-model route layout on real Envoy at fleet size (docs/adr/0004): 200 models, each
with its own scope and route configuration. A weight change reaches Envoy as one small
route configuration and the very next request follows it; every other model keeps its
routes. And an idle fleet does not flood its backends (and Envoy's main thread) with
health checks."""

from __future__ import annotations

import http.server
import json
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from urllib.parse import quote

import pytest

from tests.conftest import Running, switchyard, wait_until

MODELS = 200


class AnyModel(http.server.BaseHTTPRequestHandler):
    """A backend that answers every completion (and its health check) with 200, and counts
    Envoy's health checks."""

    protocol_version = "HTTP/1.1"
    envoy_checks = 0  # a racy count across threads: good enough for a rate

    def do_GET(self) -> None:
        if self.path == "/health" and self.headers.get("user-agent") == "Envoy/HC":
            AnyModel.envoy_checks += 1
        self._answer()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self._answer()

    def _answer(self) -> None:
        body = b'{"object": "text_completion", "choices": []}'
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Iterator[Running]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), AnyModel)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    models = [
        {"name": f"org/model-{i:03d}", "versions": [
            {"name": "v1", "weight": 100, "backend": {"url": url}},
            {"name": "v2", "weight": 0, "backend": {"url": url}}]}
        for i in range(MODELS)
    ]  # fmt: skip
    try:
        with switchyard("up", tmp_path_factory.mktemp("fleet"), models) as running:
            wait_until(lambda: served(running, f"org/model-{MODELS - 1:03d}") == "v1", 60,
                       message="the last model to be routed")  # fmt: skip
            yield running
    finally:
        server.shutdown()
        server.server_close()


def served(stack: Running, model: str) -> str | None:
    request = urllib.request.Request(
        f"{stack.proxy}/v1/completions",
        data=json.dumps({"model": model, "prompt": "x"}).encode(),
        headers={"content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.headers["x-switchyard-version"]
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}: {exc.read()[:200]!r}"
    except OSError as exc:
        return repr(exc)


def pushed_route_bytes(stack: Running) -> float:
    with urllib.request.urlopen(f"{stack.admin}/metrics", timeout=10) as response:
        text = response.read().decode()
    found = re.search(r'^switchyard_xds_pushed_bytes_total\{type="rds"\} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


@pytest.mark.parametrize("index", [0, MODELS // 2, MODELS - 1])
def test_a_weight_change_reaches_envoy_and_the_next_request_follows_it(fleet, index):
    model, neighbour = f"org/model-{index:03d}", f"org/model-{(index + 1) % MODELS:03d}"
    before = pushed_route_bytes(fleet)
    try:
        for weights, version in (({"v1": 0, "v2": 100}, "v2"), ({"v1": 100, "v2": 0}, "v1")):
            path = f"/v1/models/{quote(model, safe='')}/weights"
            status, body = fleet.api("PUT", path, {"weights": weights})
            assert status == 200, body
            assert served(fleet, model) == version  # the request right after the 200
            assert served(fleet, neighbour) == "v1"  # the other models keep their routes
    finally:
        fleet.api("PUT", f"/v1/models/{quote(model, safe='')}/weights",
                  {"weights": {"v1": 100, "v2": 0}})  # fmt: skip
    # Two changes, one Envoy: two route configurations of one model, not 200 models' worth
    # (the whole set is ~560 KB here).
    assert 0 < pushed_route_bytes(fleet) - before < 2 * 8192


def test_unknown_and_malformed_models_keep_their_openai_errors(fleet):
    for body, status, code in (
        ({"model": "org/model-999", "prompt": "x"}, 404, "model_not_found"),
        ({"model": 7, "prompt": "x"}, 400, None),
        ({"prompt": "x"}, 400, None),
    ):
        request = urllib.request.Request(
            f"{fleet.proxy}/v1/completions", data=json.dumps(body).encode(),
            headers={"content-type": "application/json"},
        )  # fmt: skip
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == status
        error = json.loads(refused.value.read())["error"]
        assert error["code"] == code and error["param"] == "model"
    with urllib.request.urlopen(f"{fleet.proxy}/v1/models", timeout=10) as response:
        assert len(json.loads(response.read())["data"]) == MODELS


def test_an_idle_fleet_is_health_checked_gently(fleet):
    """400 versions on one backend, almost none of them called yet: Envoy checks a healthy
    host of a cluster that never had traffic every 10 s, not every second (400 checks a
    second here, 2,000 at 1,000 models, all on Envoy's main thread, delayed its ACKs)."""
    before, start = AnyModel.envoy_checks, time.monotonic()
    time.sleep(11)  # every idle host is checked in any 10 s
    per_second = (AnyModel.envoy_checks - before) / (time.monotonic() - start)
    # ~36 idle (still checked) + ~1 each for the few versions the tests above called; at
    # one check a second each it was 140-400 here, as fast as this backend answered
    assert 5 < per_second < 100, per_second
