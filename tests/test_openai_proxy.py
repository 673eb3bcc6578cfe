"""What an OpenAI client sees through Envoy (CONTRACT section 2), with the real `openai` SDK."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import http_json


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.proxy}/v1", api_key="unused", max_retries=0)


def test_chat_completion_carries_the_serving_version(client):
    raw = client.chat.completions.with_raw_response.create(
        model="llama-3-8b", messages=[{"role": "user", "content": "hello there"}], max_tokens=4
    )
    completion = raw.parse()
    assert raw.headers["x-switchyard-version"] == "v1"
    assert completion.model == "llama-3-8b"
    assert completion.usage.completion_tokens == 4
    assert completion.choices[0].message.content


def test_streaming_chat_arrives_in_chunks_with_usage(client):
    stream = client.chat.completions.create(
        model="llama-3-8b",
        messages=[{"role": "user", "content": "count"}],
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) == 6
    assert text.strip()
    assert chunks[-1].usage.completion_tokens == 6


def test_completions_streaming_and_not(client):
    completion = client.completions.create(model="llama-3-8b", prompt="once upon", max_tokens=3)
    assert completion.choices[0].text
    assert completion.usage.completion_tokens == 3
    streamed = list(
        client.completions.create(model="llama-3-8b", prompt="a", max_tokens=5, stream=True)
    )
    assert sum(1 for chunk in streamed if chunk.choices and chunk.choices[0].text) == 5


def test_models_list_shows_every_configured_model(client):
    assert sorted(model.id for model in client.models.list()) == ["llama-3-8b", "qwen-2-7b"]


def test_unknown_model_is_openai_not_found(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    error = caught.value.body
    assert error["code"] == "model_not_found"
    assert error["param"] == "model"
    assert "gpt-9" in error["message"]


def test_second_model_routes_independently(client, set_weights):
    set_weights("llama-3-8b", v1=0, v2=100)
    raw = client.completions.with_raw_response.create(model="qwen-2-7b", prompt="x", max_tokens=1)
    assert raw.headers["x-switchyard-version"] == "v1"
    assert raw.parse().model == "qwen-2-7b"
    raw = client.completions.with_raw_response.create(model="llama-3-8b", prompt="x", max_tokens=1)
    assert raw.headers["x-switchyard-version"] == "v2"


def test_version_header_pins_a_version_whatever_the_weights(client):
    for _ in range(20):
        raw = client.completions.with_raw_response.create(
            model="llama-3-8b",
            prompt="x",
            max_tokens=1,
            extra_headers={"x-switchyard-version": "v2"},
        )
        assert raw.headers["x-switchyard-version"] == "v2"


def test_pinning_an_unknown_version_is_a_clear_404(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(
            model="llama-3-8b",
            prompt="x",
            max_tokens=1,
            extra_headers={"x-switchyard-version": "v7"},
        )
    assert "v7" in caught.value.body["message"]


@pytest.mark.parametrize(
    ("raw", "content_type", "status", "fragment"),
    [
        (b"not json at all", "application/json", 400, "not valid JSON"),
        (b'{"messages": []}', "application/json", 400, "`model`"),
        # curl -d without -H sends form-urlencoded: still read as JSON.
        (
            b'{"model": "llama-3-8b", "prompt": "x", "max_tokens": 1}',
            "application/x-www-form-urlencoded",
            200,
            None,
        ),
        (b"", "application/json", 400, "`model`"),
    ],
)
def test_bodies_without_a_usable_model_get_openai_style_errors(
    stack, raw, content_type, status, fragment
):
    import urllib.request

    request = urllib.request.Request(f"{stack.proxy}/v1/completions", data=raw, method="POST")
    request.add_header("Content-Type", content_type)
    got_status, body = _send(request)
    assert got_status == status, body
    if fragment:
        assert body["error"]["type"] == "invalid_request_error"
        assert fragment in body["error"]["message"]


def _send(request):
    import json
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_embeddings_are_routed_by_model(stack):
    status, body = http_json(
        "POST", f"{stack.proxy}/v1/embeddings", {"model": "qwen-2-7b", "input": "hi"}
    )
    assert status == 200, body
    assert body["data"][0]["embedding"]
