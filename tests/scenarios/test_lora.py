"""A LoRA adapter as a model version (`backend: {adapter: {base, path}}`): Switchyard loads it
on the base model's server at run time, Envoy rewrites the body's `model` to its lora name,
and a rollout to another adapter version unloads the old one from the server.

On real vLLM the base runs with --enable-lora --max-loras 2 --max-lora-rank 8
(tests/scenarios/backends.py), and the local runtime gives it
VLLM_ALLOW_RUNTIME_LORA_UPDATING=True for that (nothing else sets it); the adapter is a tiny
one made with peft for the generated model.
"""

from __future__ import annotations

import json
import urllib.request

from tests.conftest import wait_until
from tests.scenarios import backends
from tests.scenarios.conftest import MODEL, READY_TIMEOUT_S, answer, version_of

ADAPTER = "tiny-support"


def listed(server: str) -> dict[str, dict]:
    """What the base's server serves (vLLM's /v1/models): the model and its adapters."""
    with urllib.request.urlopen(f"{server}/v1/models", timeout=10) as response:
        return {entry["id"]: entry for entry in json.load(response)["data"]}


def test_an_adapter_version_is_loaded_on_its_base_served_and_unloaded_after_a_rollout(
    tiny, client, models_dir, tmp_path
):
    path = str(backends.adapter_path(models_dir, tmp_path))
    server = version_of(tiny, "v1")["endpoints"][0]
    adapter = {"adapter": {"base": MODEL, "path": path}}
    status, body = tiny.api("POST", "/v1/models", {"name": ADAPTER, "versions": [
        {"name": "v1", "weight": 100, "backend": adapter}]})  # fmt: skip
    assert status == 201, body
    wait_until(lambda: version_of(tiny, "v1", ADAPTER)["ready"], READY_TIMEOUT_S,
               interval=0.2, message="adapter loaded on the base's server")  # fmt: skip
    entry = listed(server)[f"{ADAPTER}--v1"]
    assert (entry["parent"], entry["root"]) == (MODEL, path)
    assert version_of(tiny, "v1", ADAPTER)["endpoints"] == [server]

    raw = client.completions.with_raw_response.create(
        model=ADAPTER, prompt="the quick brown fox", max_tokens=8, temperature=0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    completion = raw.parse()
    # The public name in, vLLM's name for the adapter out (the response's `model`).
    assert completion.model == f"{ADAPTER}--v1" and completion.usage.completion_tokens == 8
    assert raw.headers["x-switchyard-version"] == "v1"
    assert completion.choices[0].text == answer(client, ADAPTER)  # deterministic
    assert completion.choices[0].text != answer(client)  # the adapter changes the weights
    assert ADAPTER in [m.id for m in client.models.list()]

    # v2: the same weights under another lora name. A rollout to it unloads v1.
    status, body = tiny.api("POST", f"/v1/models/{ADAPTER}/versions",
                            {"name": "v2", "backend": adapter})  # fmt: skip
    assert status == 201, body
    wait_until(lambda: version_of(tiny, "v2", ADAPTER)["ready"], READY_TIMEOUT_S,
               interval=0.2, message="v2 loaded")  # fmt: skip
    status, rollout = tiny.api("POST", "/v1/rollouts", {"model": ADAPTER, "to": "v2",
                                                        "strategy": "immediate"})  # fmt: skip
    assert status == 201, rollout
    wait_until(lambda: version_of(tiny, "v1", ADAPTER)["state"] == "stopped", 60,
               interval=0.2, message="v1 parked")  # fmt: skip
    assert f"{ADAPTER}--v1" not in listed(server) and f"{ADAPTER}--v2" in listed(server)
    again = client.completions.with_raw_response.create(
        model=ADAPTER, prompt="the quick brown fox", max_tokens=8, temperature=0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert again.headers["x-switchyard-version"] == "v2"
    assert again.parse().model == f"{ADAPTER}--v2"
    assert again.parse().choices[0].text == completion.choices[0].text  # the same adapter
