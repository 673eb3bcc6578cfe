"""The public listener is the OpenAI API and nothing else (CONTRACT section 2), with real
Envoy: a backend's own admin surface (vLLM's /sleep, /collective_rpc, the simulator's faults)
shares its port with the OpenAI API, and only Envoy's routes keep it private.

Each request goes out byte for byte as written (http.client, no client-side normalising), so
path tricks reach Envoy as an attacker would send them. A recording backend (a `url` version)
shows what Envoy forwards.
"""

from __future__ import annotations

import http.client
import http.server
import json
import threading
import urllib.request
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Running, switchyard, two_version_models, wait_until

PREVIEW_TOKEN = "preview-token-for-tests-0123456789"
OPENAI_PATHS = {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"}
EXTRA_PATH = "/v1/rerank"
BACKEND_ADMIN_PATHS = [
    "/sleep?level=1",
    "/wake_up",
    "/collective_rpc",
    "/reset_prefix_cache",
    "/sim/faults",
    "/metrics",
    "/v1/load_lora_adapter",
    "/v1/unload_lora_adapter",
]
# Ways to spell an admin path that a naive prefix or exact match would let through.
PATH_TRICKS = [
    "{path}",
    "/v1/..{path}",
    "/v1/completions/../..{path}",
    "/{path}",
    "/v1%2F..{path}",
    "/v1/%2e%2e{path}",
    "/v1/completions%2F..%2F..{path}",
    "/./{path}",
    "/v1\\..\\..{path}",
]


class RecordingBackend(http.server.BaseHTTPRequestHandler):
    """An OpenAI-ish backend that records every request Envoy forwards (method, path,
    headers), whatever the method. Envoy marks what it proxies with `x-request-id`; its
    health checks and the controller's own probes and scrapes carry none."""

    protocol_version = "HTTP/1.1"
    seen: list[tuple[str, str, dict]] = []

    def parse_request(self) -> bool:
        ok = super().parse_request()
        headers = {name.lower(): value for name, value in self.headers.items()} if ok else {}
        if "x-request-id" in headers:
            self.seen.append((self.command, self.path, headers))
        return ok

    def __getattr__(self, name: str):
        if name.startswith("do_"):
            return self._answer
        raise AttributeError(name)

    def _answer(self) -> None:
        self._read_body()
        body = json.dumps({"id": "rec", "object": "text_completion", "model": "recorder",
                           "choices": []}).encode()  # fmt: skip
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _read_body(self) -> None:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                self.rfile.read(size + 2)
                if size == 0:
                    return
        self.rfile.read(int(self.headers.get("content-length") or 0))

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def recorder() -> Iterator[type[RecordingBackend]]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RecordingBackend)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    RecordingBackend.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield RecordingBackend
    finally:
        server.shutdown()
        server.server_close()


def _models(recorder_url: str) -> list[dict]:
    recorded = {"name": "recorder",
                "versions": [{"name": "v1", "weight": 100, "backend": {"url": recorder_url}}]}
    return [*two_version_models(), recorded]  # fmt: skip


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, recorder) -> Iterator[Running]:
    """A stack with a preview token, an extra path and a small body limit."""
    proxy = {"preview_token": PREVIEW_TOKEN, "extra_paths": [EXTRA_PATH],
             "max_request_bytes": 64 * 1024}  # fmt: skip
    with switchyard("up", tmp_path_factory.mktemp("guarded"), _models(recorder.url),
                    proxy=proxy) as running:  # fmt: skip
        wait_until(lambda: send(running, "POST", "/v1/completions", model="recorder")[0] == 200,
                   20, message="the recorder to be routed")  # fmt: skip
        yield running


def send(
    stack: Running, method: str, path: str, body: bytes | None = None,
    headers: dict | None = None, model: str = "llama-3-8b",
) -> tuple[int, dict, bytes]:  # fmt: skip
    """One request exactly as written (no normalising): status, headers, body."""
    if body is None:
        body = json.dumps({"model": model, "prompt": "x", "max_tokens": 1}).encode()
    host, port = stack.config["listen"]["proxy"].rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        connection.putheader("host", "switchyard")
        for name, value in {"content-type": "application/json", **(headers or {})}.items():
            connection.putheader(name, value)
        connection.putheader("content-length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def endpoint_of(stack: Running, model: str, version: str) -> str:
    _, body = stack.api("GET", f"/v1/models/{model}")
    return next(v for v in body["versions"] if v["name"] == version)["endpoints"][0]


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def assert_refused_by_envoy(status: int, headers: dict, body: bytes) -> None:
    """404 in the OpenAI shape, answered by Envoy itself (no upstream took part)."""
    assert status == 404, body
    assert "x-envoy-upstream-service-time" not in headers
    assert "x-switchyard-version" not in headers
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith("Not found")


@pytest.mark.parametrize("trick", PATH_TRICKS)
@pytest.mark.parametrize("admin_path", BACKEND_ADMIN_PATHS)
def test_backend_admin_paths_are_404_from_envoy(guarded, recorder, admin_path, trick):
    path = trick.format(path=admin_path)
    for model in ("llama-3-8b", "recorder"):
        assert_refused_by_envoy(*send(guarded, "POST", path, model=model))
        assert_refused_by_envoy(*send(guarded, "GET", path, model=model))
    forwarded = [(method, p) for method, p, _ in recorder.seen
                 if urlsplit(p).path not in OPENAI_PATHS | {EXTRA_PATH}]  # fmt: skip
    assert forwarded == []


def test_the_simulator_behind_stays_untouched(guarded):
    """The attack of the issue: a POST /sleep with a valid body used to put v1 to sleep."""
    for trick in PATH_TRICKS:
        send(guarded, "POST", trick.format(path="/sleep?level=1"))
        faults = json.dumps({"model": "llama-3-8b", "error_rate": 1.0, "status": 500}).encode()
        send(guarded, "POST", trick.format(path="/sim/faults"), body=faults)
    for version in ("v1", "v2"):
        endpoint = endpoint_of(guarded, "llama-3-8b", version)
        assert get_json(f"{endpoint}/is_sleeping") == {"is_sleeping": False}
        assert get_json(f"{endpoint}/sim/faults") == {}  # no fault set
    status, _, _ = send(guarded, "POST", "/v1/completions")
    assert status == 200


def test_openai_paths_and_extra_paths_reach_the_backend(guarded, recorder):
    for path in [*sorted(OPENAI_PATHS), EXTRA_PATH, "/v1//completions", "/v1/./completions",
                 "/v1/%63ompletions?x=1"]:  # fmt: skip
        recorder.seen.clear()
        status, headers, _ = send(guarded, "POST", path, model="recorder")
        assert status == 200, path
        assert headers["x-switchyard-version"] == "v1"
        [(method, forwarded, _)] = recorder.seen
        assert method == "POST"
        # What the backend gets is what Envoy matched: the normalised path.
        assert urlsplit(forwarded).path in OPENAI_PATHS | {EXTRA_PATH}


def test_models_list_is_the_only_get(guarded, recorder):
    status, headers, body = send(guarded, "GET", "/v1/models", body=b"")
    assert status == 200
    assert "x-envoy-upstream-service-time" not in headers
    assert {model["id"] for model in json.loads(body)["data"]} == {
        "llama-3-8b", "qwen-2-7b", "recorder"}  # fmt: skip
    for method in ("GET", "PUT", "DELETE", "PATCH", "OPTIONS"):
        assert_refused_by_envoy(*send(guarded, method, "/v1/chat/completions", model="recorder"))


def test_a_body_over_the_limit_is_413_in_the_openai_shape(guarded, recorder):
    recorder.seen.clear()
    prompt = "x" * (64 * 1024)
    body = json.dumps({"model": "recorder", "prompt": prompt}).encode()
    status, _, answer = send(guarded, "POST", "/v1/completions", body=body)
    assert status == 413
    error = json.loads(answer)["error"]
    assert error["code"] == "request_too_large"
    assert "max_request_bytes" in error["message"]
    assert recorder.seen == []
    small = json.dumps({"model": "recorder", "prompt": "x" * 60_000}).encode()
    assert send(guarded, "POST", "/v1/completions", body=small)[0] == 200


@pytest.mark.parametrize("model", [7, 1.5, True, None, ["recorder"], {"id": "recorder"}])
def test_a_model_that_is_not_a_string_is_400(guarded, recorder, model):
    recorder.seen.clear()
    body = json.dumps({"model": model, "prompt": "x"}).encode()
    status, _, answer = send(guarded, "POST", "/v1/completions", body=body)
    assert status == 400
    assert json.loads(answer)["error"]["param"] == "model"
    assert recorder.seen == []


def test_a_pin_needs_the_preview_token(guarded, recorder):
    pin = {"x-switchyard-version": "v2"}
    for headers in (pin, {**pin, "x-switchyard-preview-token": "wrong"},
                    {**pin, "x-switchyard-preview-token": ""}):  # fmt: skip
        status, _, body = send(guarded, "POST", "/v1/completions", headers=headers)
        assert status == 403
        error = json.loads(body)["error"]
        assert error["code"] == "preview_forbidden"
        assert error["param"] == "x-switchyard-version"
    with_token = {**pin, "x-switchyard-preview-token": PREVIEW_TOKEN}
    status, headers, _ = send(guarded, "POST", "/v1/completions", headers=with_token)
    assert status == 200
    assert headers["x-switchyard-version"] == "v2"
    # Without a pin no token is needed; the token never reaches a backend.
    assert send(guarded, "POST", "/v1/completions")[1]["x-switchyard-version"] == "v1"
    recorder.seen.clear()
    status, _, _ = send(guarded, "POST", "/v1/completions", model="recorder",
                        headers={"x-switchyard-version": "v1",
                                 "x-switchyard-preview-token": PREVIEW_TOKEN})  # fmt: skip
    assert status == 200
    assert "x-switchyard-preview-token" not in recorder.seen[-1][2]


def test_blue_green_preview_and_promote_with_the_token(guarded):
    spec = {"model": "llama-3-8b", "to": "v2", "strategy": "blue_green"}
    status, rollout = guarded.api("POST", "/v1/rollouts", spec)
    assert status == 201, rollout
    try:
        preview = {"x-switchyard-version": "v2", "x-switchyard-preview-token": PREVIEW_TOKEN}
        status, headers, _ = send(guarded, "POST", "/v1/completions", headers=preview)
        assert (status, headers["x-switchyard-version"]) == (200, "v2")
        assert send(guarded, "POST", "/v1/completions",
                    headers={"x-switchyard-version": "v2"})[0] == 403  # fmt: skip
        assert send(guarded, "POST", "/v1/completions")[1]["x-switchyard-version"] == "v1"
        status, promoted = guarded.api("POST", f"/v1/rollouts/{rollout['id']}/promote")
        assert status == 200, promoted
        wait_until(lambda: guarded.api("GET", f"/v1/rollouts/{rollout['id']}")[1]["phase"]
                   == "succeeded", 20, message="the promotion")  # fmt: skip
        assert send(guarded, "POST", "/v1/completions")[1]["x-switchyard-version"] == "v2"
    finally:
        guarded.api("POST", "/v1/rollback", {"model": "llama-3-8b", "to": "v1"})


def test_the_token_can_come_from_the_environment(tmp_path):
    with switchyard("up", tmp_path, two_version_models(),
                    env={"SWITCHYARD_PREVIEW_TOKEN": PREVIEW_TOKEN}) as running:  # fmt: skip
        pin = {"x-switchyard-version": "v2"}
        wait_until(lambda: send(running, "POST", "/v1/completions")[0] == 200, 20)
        assert send(running, "POST", "/v1/completions", headers=pin)[0] == 403
        with_token = {**pin, "x-switchyard-preview-token": PREVIEW_TOKEN}
        status, headers, _ = send(running, "POST", "/v1/completions", headers=with_token)
        assert (status, headers["x-switchyard-version"]) == (200, "v2")


# -- fuzzing: whatever is sent, Envoy answers (no 5xx) and forwards only the OpenAI API --------

SEGMENTS = st.sampled_from(
    ["v1", "chat", "completions", "embeddings", "responses", "models", "rerank", "sleep",
     "wake_up", "collective_rpc", "sim", "faults", "metrics", "..", ".", "", "%2F", "%2f",
     "%2e%2e", "%2E", "%5C", "\\", ";x", "%00", "%63ompletions", "V1", "health", "is_sleeping",
     "load_lora_adapter", "%252F", "~", "*"]
)  # fmt: skip
QUERIES = st.sampled_from(["", "?level=1", "?x=/../sleep", "#frag"])
PATHS = st.one_of(
    # Random segments...
    st.builds(lambda parts, query: "/" + "/".join(parts) + query,
              st.lists(SEGMENTS, min_size=0, max_size=6), QUERIES),
    # ...and real paths, as they are or with segments around them, so that some requests
    # are valid calls and the others are near misses.
    st.builds(lambda before, path, after, query: "/".join([*before, path, *after]) + query,
              st.one_of(st.just([]), st.lists(SEGMENTS, max_size=2)),
              st.one_of(st.sampled_from([*sorted(OPENAI_PATHS), EXTRA_PATH]),
                        st.sampled_from(BACKEND_ADMIN_PATHS)),
              st.one_of(st.just([]), st.lists(SEGMENTS, max_size=2)), QUERIES),
)  # fmt: skip
METHODS = st.one_of(
    st.just("POST"),
    st.sampled_from(["POST", "GET", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE"]),
)
VALID_BODY = json.dumps({"model": "recorder", "prompt": "x"}).encode()
BODIES = st.one_of(
    st.just(VALID_BODY),
    st.builds(lambda model: json.dumps({"model": model, "prompt": "x"}).encode(),
              st.sampled_from(["recorder", "llama-3-8b", "nope", 3, None])),
    st.binary(max_size=200),
    st.just(b""),
)  # fmt: skip
CONTENT_TYPES = st.sampled_from(
    ["application/json", "text/plain", "", "application/x-www-form-urlencoded",
     "multipart/form-data"]
)  # fmt: skip


def test_fuzzed_requests_never_reach_a_backend_outside_the_openai_api(guarded, recorder):
    recorder.seen.clear()

    @settings(max_examples=400, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(method=METHODS, path=PATHS, body=BODIES, content_type=CONTENT_TYPES,
           pin=st.sampled_from([False, False, False, True]))  # fmt: skip
    def one_request(method, path, body, content_type, pin):
        headers = {"content-type": content_type} if content_type else {}
        if pin:
            headers["x-switchyard-version"] = "v1"  # refused: no preview token
        try:
            status, _, _ = send(guarded, method, path, body=body, headers=headers)
        except http.client.HTTPException:
            return  # Envoy closed a request it could not parse: nothing was forwarded
        assert status < 500, (method, path, body)

    one_request()
    # Some fuzzed requests were valid calls: else this would prove nothing.
    assert len(recorder.seen) >= 5, recorder.seen
    for method, path, headers in recorder.seen:
        assert method == "POST"
        assert urlsplit(path).path in OPENAI_PATHS | {EXTRA_PATH}, path
        assert "x-switchyard-version" not in headers  # a pin without the token is refused
