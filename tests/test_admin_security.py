"""The admin API's edges, as an unauthenticated caller meets them (docs/security.md): only the
documented public routes answer without the token, none of them names a backend, no spelling
of a path turns a guarded route into a public one, and an oversized body is refused before
it is read."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator

import pytest

from tests.conftest import Running, http_json, switchyard, two_version_models, wait_for_proxy

TOKEN = "admin-security-token"
PUBLIC = ["/healthz", "/readyz", "/metrics", "/openapi.json", "/ui/", "/ui/app.js"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Running]:
    env = {"SWITCHYARD_ADMIN_TOKEN": TOKEN}
    with switchyard("up", tmp_path_factory.mktemp("admin"), two_version_models(),
                    env=env) as running:  # fmt: skip
        wait_for_proxy(running.proxy)
        yield running


def raw(stack: Running, method: str, path: str, body: bytes = b"", token: str | None = None):
    """One request exactly as written: status and body text."""
    host, port = stack.config["listen"]["admin"].rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        headers = {"content-type": "application/json", "content-length": str(len(body))}
        if token:
            headers["authorization"] = f"Bearer {token}"
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        connection.close()


def backend_ports(stack: Running) -> set[str]:
    _, body = stack.api("GET", "/v1/models")
    return {endpoint.rsplit(":", 1)[1] for model in body["models"]
            for version in model["versions"] for endpoint in version["endpoints"]}  # fmt: skip


def test_service_discovery_needs_the_token(stack):
    status, body = raw(stack, "GET", "/sd/backends")
    assert status == 401, body
    status, body = raw(stack, "GET", "/sd/backends", token=TOKEN)
    assert status == 200
    targets = {target for group in json.loads(body) for target in group["targets"]}
    assert {target.rsplit(":", 1)[1] for target in targets} == backend_ports(stack)


def test_no_public_answer_names_a_backend(stack):
    ports = backend_ports(stack)
    for path in PUBLIC:
        status, body = raw(stack, "GET", path)
        assert status == 200, (path, body)
        assert not any(f"127.0.0.1:{port}" in body for port in ports), path


@pytest.mark.parametrize(
    "path",
    ["/v1/models", "//v1/models", "/v1//models", "/v1/./models", "/ui/../v1/models",
     "/v1/%6dodels", "/v1%2Fmodels", "/sd/backends", "/sd//backends", "/healthz/../sd/backends",
     "/v1/models/llama-3-8b", "/v1/envoys", "/v1/rollouts", "/v1/events"],
)  # fmt: skip
def test_no_spelling_of_a_guarded_path_answers_without_the_token(stack, path):
    status, body = raw(stack, "GET", path)
    # 401, or 404 where the spelling matches no route; never the data.
    assert status in (401, 404), (path, status, body)
    assert "endpoints" not in body and "targets" not in body and "envoys" not in body


def test_an_oversized_body_is_413_and_changes_nothing(stack):
    before = stack.api("GET", "/v1/models/llama-3-8b")[1]
    huge = json.dumps({"weights": {"v1": 0, "v2": 100}, "pad": "x" * 400_000}).encode()
    status, body = raw(stack, "PUT", "/v1/models/llama-3-8b/weights", body=huge, token=TOKEN)
    assert status == 413, body
    error = json.loads(body)["error"]
    assert error["type"] == "request_too_large"
    assert "bytes" in error["message"]
    assert stack.api("GET", "/v1/models/llama-3-8b")[1]["versions"] == before["versions"]
    # Unauthenticated, the token is checked first: 401, the body is never read.
    status, _ = raw(stack, "PUT", "/v1/models/llama-3-8b/weights", body=huge)
    assert status == 401


def test_a_wrong_token_of_any_length_is_refused(stack):
    for token in ("", "x", TOKEN[:-1], TOKEN + "x", TOKEN.upper(), "a" * 4096):
        status, body = http_json("GET", f"{stack.admin}/v1/models", token=token or None)
        assert status == 401, (token, body)
