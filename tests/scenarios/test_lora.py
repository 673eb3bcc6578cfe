"""A LoRA adapter loaded at run time into a version's server and served through Envoy as a
model of its own (a `url` version pointing at that server, whose requests name the adapter).
"""

from __future__ import annotations

import json
import urllib.request

from tests.conftest import wait_until
from tests.scenarios import backends
from tests.scenarios.conftest import MODEL, answer, version_of

ADAPTER = "tiny-support"


def post(url: str, body: dict) -> tuple[int, str]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"content-type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_a_lora_adapter_is_loaded_and_served_as_a_model(tiny, client, models_dir, tmp_path):
    server = version_of(tiny, "v1")["endpoints"][0]
    path = str(backends.adapter_path(models_dir, tmp_path))
    status, text = post(f"{server}/v1/load_lora_adapter", {"lora_name": ADAPTER,
                                                           "lora_path": path})  # fmt: skip
    assert (status, text) == (200, f"Success: LoRA adapter '{ADAPTER}' added successfully.")
    status, text = post(f"{server}/v1/load_lora_adapter", {"lora_name": ADAPTER,
                                                           "lora_path": path})  # fmt: skip
    assert status == 400 and "already been loaded" in text
    with urllib.request.urlopen(f"{server}/v1/models", timeout=10) as response:
        listed = {m["id"]: m for m in json.load(response)["data"]}
    assert listed[ADAPTER]["parent"] == MODEL and listed[ADAPTER]["root"] == path

    status, body = tiny.api("POST", "/v1/models", {"name": ADAPTER, "versions": [
        {"name": "v1", "weight": 100, "backend": {"url": server}}]})  # fmt: skip
    assert status == 201, body
    wait_until(lambda: version_of(tiny, "v1", ADAPTER)["ready"], 20, message="adapter routed")
    raw = client.completions.with_raw_response.create(
        model=ADAPTER, prompt="the quick brown fox", max_tokens=8, temperature=0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    completion = raw.parse()
    assert completion.model == ADAPTER and completion.usage.completion_tokens == 8
    assert raw.headers["x-switchyard-version"] == "v1"
    assert completion.choices[0].text == answer(client, ADAPTER)  # deterministic
    assert completion.choices[0].text != answer(client)  # the adapter changes the weights
