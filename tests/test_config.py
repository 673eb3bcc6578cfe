"""The configuration file: what is accepted, and the one-line message for what is not."""

from __future__ import annotations

from pathlib import Path

import pytest

from controlplane.config import load_config, parse_config
from controlplane.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def _model(*versions: tuple[str, int], backend: dict | None = None) -> dict:
    return {
        "name": "llama",
        "versions": [
            {"name": name, "weight": weight, "backend": backend or {"sim": {}}}
            for name, weight in versions
        ],
    }


def test_the_shipped_config_is_valid():
    config = load_config(ROOT / "switchyard.yaml")
    assert config.listen.proxy == "127.0.0.1:10000"
    assert [m.name for m in config.models] == ["llama-3-8b", "qwen-2-7b", "support-bot"]
    assert config.models[0].versions[1].backend.sim.ttft_ms == 30
    # The adapter the quick start serves, and the one docs/lora.md rolls out, are there for
    # the simulator to load (it reads adapter_config.json, from `make up`'s directory).
    adapter = config.models[2].versions[0].backend.adapter
    assert adapter.base == "llama-3-8b"
    for path in (adapter.path, adapter.path.replace("-v1", "-v2")):
        assert (ROOT / path / "adapter_config.json").is_file(), path


def test_defaults_and_backend_kinds():
    config = parse_config(
        {
            "models": [
                {
                    "name": "meta-llama/Llama-3-8B",
                    "versions": [
                        {"name": "v1", "weight": 60, "backend": {"url": "http://10.0.0.5:8000/"}},
                        {
                            "name": "v2",
                            "weight": 40,
                            "backend": {"vllm": {"model": "/m", "args": ["--x"]}},
                        },
                        {"name": "v3", "weight": 0, "backend": {"sim": None}},
                    ],
                }
            ]
        }
    )
    versions = config.models[0].versions
    assert [v.backend.kind for v in versions] == ["url", "vllm", "sim"]
    assert versions[0].backend.url == "http://10.0.0.5:8000"
    assert config.listen.admin == "127.0.0.1:9000"
    assert config.runtime == "local"


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        (
            {"listen": {"proxy": "127.0.0.1:99999"}},
            "listen.proxy: port must be a number from 1 to 65535",
        ),
        ({"listen": {"admin": "nohost"}}, "listen.admin: expected host:port"),
        ({"listen": {"admin": "127.0.0.1:10000"}}, "both use 127.0.0.1:10000"),
        (
            {"models": [_model(("v1", 60), ("v2", 39))]},
            "models[llama]: weights must sum to 100, got 99",
        ),
        ({"models": [_model(("v1", 50), ("v1", 50))]}, "duplicate version name 'v1'"),
        ({"models": [_model(("v1", 100)), _model(("v1", 100))]}, "duplicate model name 'llama'"),
        ({"models": [_model(("v1", 101))]}, "models[llama].versions[v1].weight"),
        ({"models": [_model(("v1", -1), ("v2", 101))]}, "models[llama].versions[v1].weight"),
        ({"modles": []}, "modles: unknown key"),
        (
            {"models": [_model(("v1", 100), backend={"docker": {}})]},
            "unknown backend kind 'docker'",
        ),
        (
            {"models": [_model(("v1", 100), backend={"sim": {}, "url": "http://a:1"})]},
            "exactly one",
        ),
        (
            {"models": [_model(("v1", 100), backend={"sim": {"ttft": 1}})]},
            "backend.sim.ttft: unknown key",
        ),
        (
            {"models": [_model(("v1", 100), backend={"url": "ftp://x"})]},
            "expected http://host:port",
        ),
        ({"models": [_model((True, 100))]}, "quote it"),
        ({"models": [_model(("v 1", 100))]}, "letters, digits"),
        ({"runtime": "docker"}, "runtime: Input should be 'local' or 'kubernetes'"),
        ({"models": [{"name": "x", "versions": []}]}, "models[x].versions"),
        ({"health": {"stats_flush_seconds": 5}}, "health.stats_flush_seconds"),
        ({"listen": {"picker": "0.0.0.0:18001"}}, "listen.picker: 0.0.0.0:18001: the endpoint"),
        ({"picker": {"transport": "h2"}}, "picker.transport: Input should be 'http' or 'grpc'"),
        ({"picker": {"transport": None}}, "picker.transport: Input should be 'http' or 'grpc'"),
        ({"picker": {"engine": "fast"}},
         "picker.engine: Input should be 'auto', 'native' or 'python'"),
        ({"models": [{**_model(("v1", 100)), "routing": "magic"}]},
         "models[llama].routing: Input should be 'least_request', 'prefix_aware' or"),
        (
            {"models": [{"name": "m", "versions": [
                {"name": "v1", "weight": 100, "replicas": 0, "backend": {"sim": {}}}]}]},
            "models[m].versions[v1].replicas: Input should be greater than or equal to 1",
        ),
        (
            {"models": [{"name": "m", "versions": [
                {"name": "v1", "weight": 100, "replicas": 2,
                 "backend": {"url": ["http://a:1", "http://b:1", "http://c:1"]}}]}]},
            "models[m].versions[v1]: replicas: a url backend has one replica per URL (3 given)",
        ),
        (
            {"models": [_model(("v1", 100), backend={"url": ["http://a:1", "http://a:1/"]})]},
            "models[llama].versions[v1].backend.url: 'http://a:1' is listed twice",
        ),
        (
            {"models": [_model(("v1", 100), backend={"url": []})]},
            "models[llama].versions[v1].backend.url: give at least one URL",
        ),
        (
            {"models": [_model(("v1", 100), backend={"sim": {"max_num_seqs": 0}})]},
            "models[llama].versions[v1].backend.sim.max_num_seqs: Input should be greater",
        ),
    ],
)
def test_invalid_documents_name_the_key(document, expected):
    with pytest.raises(ConfigError) as caught:
        parse_config(document)
    message = caught.value.message
    assert expected in message
    assert "\n" not in message


def test_replicas_default_to_one_and_a_url_list_is_one_replica_per_url():
    config = parse_config({"models": [{"name": "m", "versions": [
        {"name": "v1", "weight": 100, "replicas": 3, "backend": {"sim": {}}},
        {"name": "v2", "weight": 0, "backend": {"url": ["http://a:1/", "http://b:2"]}},
        {"name": "v3", "weight": 0, "backend": {"vllm": {"model": "/m"}}},
    ]}]})  # fmt: skip
    v1, v2, v3 = config.models[0].versions
    assert [v.replica_count for v in (v1, v2, v3)] == [3, 2, 1]
    assert v2.backend.urls == ["http://a:1", "http://b:2"]


def test_envoy_asks_the_picker_over_http_unless_told_grpc():
    assert parse_config({}).picker.transport == "http"
    assert parse_config({"picker": {"transport": "grpc"}}).picker.transport == "grpc"


def test_the_native_picker_engine_is_refused_at_load_where_it_was_not_built(monkeypatch):
    """Not a picker that exits and restarts for ever: `switchyard up` stops at the key."""
    import controlplane.picker

    monkeypatch.setattr(controlplane.picker, "native_missing", lambda: None)  # built
    assert parse_config({"picker": {"engine": "native"}}).picker.engine == "native"
    monkeypatch.setattr(controlplane.picker, "native_missing", lambda: "not built at install")
    with pytest.raises(ConfigError) as caught:
        parse_config({"picker": {"engine": "native"}})
    assert "picker.engine: native: not built at install" in caught.value.message
    assert parse_config({"picker": {"engine": "auto"}}).picker.engine == "auto"


def test_yaml_booleans_are_caught(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(
        "models:\n  - name: m\n    versions:\n      - {name: on, weight: 100, backend: {sim: {}}}\n"
    )
    with pytest.raises(ConfigError, match="quote it"):
        load_config(path)


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_vllm_command_replaces_the_default_vllm_serve():
    config = parse_config(
        {"models": [{"name": "m", "versions": [{"name": "v1", "weight": 100, "backend": {
            "vllm": {"model": "/models/tiny", "command": [
                "python", "-m", "vllm.entrypoints.openai.api_server", "--model", "{model}"]}}}]}]}
    )  # fmt: skip
    vllm = config.models[0].versions[0].backend.vllm
    assert vllm.argv() == ["python", "-m", "vllm.entrypoints.openai.api_server", "--model",
                           "/models/tiny"]  # fmt: skip
    default = parse_config(
        {"models": [{"name": "m", "versions": [{"name": "v1", "weight": 100,
                                                 "backend": {"vllm": {"model": "/m"}}}]}]}
    )  # fmt: skip
    assert default.models[0].versions[0].backend.vllm.argv() == ["vllm", "serve", "/m"]


@pytest.mark.parametrize(
    "path", ["/sleep", "/wake_up", "/collective_rpc", "/sim/faults", "/v1/load_lora_adapter",
             "/metrics", "/v1/../sleep", "//sleep", "/v1/x%2Fy", "/v1/rerank?x=1", "v1/rerank",
             "/v1/chat/completions"],
)  # fmt: skip
def test_extra_paths_cannot_open_a_backend_admin_endpoint(path):
    with pytest.raises(ConfigError, match=r"proxy\.extra_paths"):
        parse_config({"proxy": {"extra_paths": [path]}})


def test_extra_paths_are_routed_beside_the_openai_ones():
    proxy = parse_config({"proxy": {"extra_paths": ["/v1/rerank", "/v1/score"]}}).proxy
    assert proxy.post_paths[-2:] == ("/v1/rerank", "/v1/score")
    assert "/v1/chat/completions" in proxy.post_paths


def test_a_short_preview_token_is_refused_from_the_file_and_the_environment(monkeypatch):
    with pytest.raises(ConfigError, match=r"proxy\.preview_token"):
        parse_config({"proxy": {"preview_token": "short"}})
    monkeypatch.setenv("SWITCHYARD_PREVIEW_TOKEN", "short")
    with pytest.raises(ConfigError, match="SWITCHYARD_PREVIEW_TOKEN"):
        parse_config({}).proxy.effective_preview_token()
    monkeypatch.setenv("SWITCHYARD_PREVIEW_TOKEN", "a-long-enough-token")
    assert parse_config({}).proxy.effective_preview_token() == "a-long-enough-token"
