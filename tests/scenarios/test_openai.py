"""What an OpenAI client sees through Envoy, whatever serves the model (simulator or vLLM)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import openai
import pytest

from tests.scenarios.conftest import IDLE_MODEL, MODEL, version_of

# Random weights may draw the end-of-sequence token at any step: ask for exact lengths.
EXACT = {"ignore_eos": True}


def test_chat_completion_through_envoy(client):
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "hello there"}], max_tokens=4,
        extra_body=EXACT,
    )  # fmt: skip
    completion = raw.parse()
    assert raw.headers["x-switchyard-version"] == "v1"
    assert completion.model == MODEL
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 4
    assert completion.usage.prompt_tokens > 0


def test_streaming_chat_arrives_in_chunks_and_usage_only_when_asked(client):
    def stream(**options):
        return list(client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "count"}], max_tokens=6,
            stream=True, extra_body=EXACT, **options,
        ))  # fmt: skip

    chunks = stream(stream_options={"include_usage": True})
    assert chunks[-1].usage.completion_tokens == 6 and not chunks[-1].choices
    finished = [c.choices[0].finish_reason for c in chunks if c.choices]
    # Streamed, not one blob at the end. Not one chunk per token: a busy vLLM merges the
    # tokens its engine made between two turns of its API server into one chunk (CI saw 4
    # chunks for 6 tokens on a loaded machine).
    assert finished[-1] == "length" and len(finished) >= 2
    # vLLM 0.32 sends usage in a stream only with include_usage: `{}` means no usage
    assert all(c.usage is None for c in stream(stream_options={}))
    assert all(c.usage is None for c in stream())


def test_completions_streaming_and_not(client):
    completion = client.completions.create(model=MODEL, prompt="once upon", max_tokens=3,
                                           extra_body=EXACT)  # fmt: skip
    assert completion.usage.completion_tokens == 3
    assert completion.choices[0].finish_reason == "length"
    streamed = list(client.completions.create(model=MODEL, prompt="a", max_tokens=5,
                                              stream=True, extra_body=EXACT))  # fmt: skip
    assert streamed[-1].choices[0].finish_reason == "length"


def test_the_same_prompt_at_temperature_zero_gets_the_same_answer(client):
    def answer() -> str:
        return client.completions.create(model=MODEL, prompt="the quick brown", max_tokens=8,
                                         temperature=0, extra_body=EXACT).choices[0].text

    assert answer() == answer()


def test_models_list_and_unknown_model(client):
    # every configured model (a scenario may have added one at run time)
    assert {MODEL, IDLE_MODEL} <= {model.id for model in client.models.list()}
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    assert caught.value.body["code"] == "model_not_found"


def test_a_backends_own_errors_pass_through_in_vllms_shape(stack, client):
    """A request the backend refuses (more tokens than its context window) reaches the
    client as vLLM's 400, through Envoy, from the version that refused it."""
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt="x", max_tokens=100_000)
    error = caught.value.body
    assert (error["code"], error["param"], error["type"]) == (400, "max_tokens", "BadRequestError")
    assert error["message"].startswith("max_tokens=100000 cannot be greater than max_model_len=")
    assert caught.value.response.headers["x-switchyard-version"] == "v1"


def test_a_backend_answers_vllms_version_and_404(stack):
    endpoint = version_of(stack, "v1")["endpoints"][0]
    with urllib.request.urlopen(f"{endpoint}/version", timeout=10) as response:
        version = json.load(response)["version"]
    assert version[0].isdigit() and "." in version  # a vLLM release number, as vLLM says
    request = urllib.request.Request(
        f"{endpoint}/v1/completions", method="POST", headers={"content-type": "application/json"},
        data=json.dumps({"model": "nope", "prompt": "x"}).encode(),
    )  # fmt: skip
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    body = json.load(caught.value)
    assert caught.value.code == 404
    assert body["error"]["type"] == "NotFoundError" and body["error"]["code"] == 404
    assert body["error"]["message"].startswith("The model `nope` does not exist.")
