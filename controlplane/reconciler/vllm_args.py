"""A VLLMModel's spec and what its pods run: the `vllm serve` command line, or the simulator.

The CRD (manifests/crd.yaml) is the single source of truth for vLLM's parameters: every spec
field maps to one `vllm serve` flag, `extraArgs` are appended verbatim, and `gpuCount` becomes
both the `nvidia.com/gpu` limit and `--tensor-parallel-size`. A spec with `simulator` runs
`python -m controlplane sim` from the Switchyard image instead (no GPU), for clusters without
accelerators and for tests. The defaults here mirror the CRD's, because the API server applies
the CRD defaults but a client reading an older object (or an emulator) may not.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from controlplane.adapters import LORA_NAME
from controlplane.config import VERSION_NAME, AdapterBackend, Backend, SimBackend, VllmBackend
from controlplane.errors import Invalid

GROUP, API_VERSION, PLURAL, KIND = "switchyard.io", "v1alpha1", "vllmmodels", "VLLMModel"
PORT = 8000  # the port vLLM (and the simulator) listens on inside the pod
DEFAULT_VLLM_IMAGE = "vllm/vllm-openai:v0.33.0"
GPU_RESOURCE = "nvidia.com/gpu"


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class SimulatorSpec(_Spec):
    """Run the Switchyard simulator in the pods instead of vLLM (CONTRACT section 5)."""

    ttft_ms: float = Field(0.0, ge=0, alias="ttftMs")
    itl_ms: float = Field(0.0, ge=0, alias="itlMs")
    max_tokens_default: int = Field(16, ge=1, alias="maxTokensDefault")
    wake_ms: float = Field(0.0, ge=0, alias="wakeMs")


class AdapterSpec(_Spec):
    """A LoRA adapter on another VLLMModel's pods (docs/lora.md): no workload of its own."""

    base: str = Field(min_length=1, description="the `model` of the VLLMModels that host it")
    path: str = Field(min_length=1, description="where the base's vLLM reads it")
    lora_name: str | None = Field(None, pattern=LORA_NAME.pattern, alias="loraName")


class ModelSpec(_Spec):
    """`spec` of a VLLMModel (CONTRACT section 6), camelCase as in the CRD."""

    model: str = Field(min_length=1)
    version: str = Field(pattern=VERSION_NAME.pattern)
    # What vLLM loads; not for an adapter, which is loaded on its base's pods instead.
    model_name: str | None = Field(None, min_length=1, alias="modelName")
    served_model_name: str | None = Field(None, alias="servedModelName")
    replicas: int = Field(1, ge=0)
    image: str | None = None
    gpu_count: int = Field(1, ge=0, alias="gpuCount")
    resources: dict[str, dict[str, Any]] | None = None
    max_model_len: int | None = Field(None, ge=1, alias="maxModelLen")
    max_num_batched_tokens: int | None = Field(None, ge=1, alias="maxNumBatchedTokens")
    max_num_seqs: int | None = Field(None, ge=1, alias="maxNumSeqs")
    gpu_memory_utilization: float | None = Field(None, ge=0.01, le=1, alias="gpuMemoryUtilization")
    dtype: Literal["auto", "half", "float16", "bfloat16", "float", "float32"] | None = None
    tool_call_parser: str | None = Field(None, alias="toolCallParser")
    reasoning_parser: str | None = Field(None, alias="reasoningParser")
    enable_chunked_prefill: bool | None = Field(None, alias="enableChunkedPrefill")
    enable_prefix_caching: bool | None = Field(None, alias="enablePrefixCaching")
    enable_auto_tool_choice: bool | None = Field(None, alias="enableAutoToolChoice")
    disable_custom_all_reduce: bool | None = Field(None, alias="disableCustomAllReduce")
    enable_sleep_mode: bool = Field(False, alias="enableSleepMode")
    extra_args: list[str] = Field([], alias="extraArgs")
    simulator: SimulatorSpec | None = None
    adapter: AdapterSpec | None = None

    @model_validator(mode="after")
    def _what_runs(self) -> ModelSpec:
        if self.adapter is None and self.model_name is None:
            raise ValueError("modelName: required (what vLLM loads), unless `adapter` is set")
        if self.adapter is not None and self.simulator is not None:
            raise ValueError("adapter: an adapter runs on its base's pods; drop `simulator`")
        return self


def parse_spec(spec: Any) -> ModelSpec:
    """A CR's spec as a ModelSpec; Invalid names the field at fault."""
    try:
        return ModelSpec.model_validate(spec or {})
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in ("spec", *error["loc"]))
        message = error["msg"].removeprefix("Value error, ")
        raise Invalid(f"{where}: {message}", field=where) from None


# Flags with a value: spec attribute -> vLLM flag.
_VALUE_FLAGS = {
    "max_model_len": "--max-model-len",
    "max_num_batched_tokens": "--max-num-batched-tokens",
    "max_num_seqs": "--max-num-seqs",
    "gpu_memory_utilization": "--gpu-memory-utilization",
    "dtype": "--dtype",
    "tool_call_parser": "--tool-call-parser",
    "reasoning_parser": "--reasoning-parser",
}
# vLLM's on/off switches (`--no-...` turns a default-on feature off).
_SWITCHES = {
    "enable_chunked_prefill": "--enable-chunked-prefill",
    "enable_prefix_caching": "--enable-prefix-caching",
}
# Flags that only exist in their positive form: sent when true.
_FLAGS = {
    "enable_auto_tool_choice": "--enable-auto-tool-choice",
    "disable_custom_all_reduce": "--disable-custom-all-reduce",
    "enable_sleep_mode": "--enable-sleep-mode",
}


def vllm_args(spec: ModelSpec, port: int = PORT) -> list[str]:
    """The arguments after `vllm serve`: the model, then every field that is set.

    The OpenAI name (`model`) is always served, so Envoy's routing by the request's `model`
    reaches this pod; `servedModelName` is added as a second name when it differs.
    """
    served = [spec.model]
    if spec.served_model_name and spec.served_model_name != spec.model:
        served.append(spec.served_model_name)
    args = [spec.model_name, "--host", "0.0.0.0", "--port", str(port)]
    args += ["--served-model-name", *served]
    if spec.gpu_count > 0:
        args += ["--tensor-parallel-size", str(spec.gpu_count)]
    for attr, flag in _VALUE_FLAGS.items():
        value = getattr(spec, attr)
        if value is not None:
            args += [flag, str(value)]
    for attr, flag in _SWITCHES.items():
        value = getattr(spec, attr)
        if value is not None:
            args.append(flag if value else "--no-" + flag.removeprefix("--"))
    for attr, flag in _FLAGS.items():
        if getattr(spec, attr):
            args.append(flag)
    return args + list(spec.extra_args)


def sim_args(spec: ModelSpec, port: int = PORT) -> list[str]:
    """The simulator's arguments (`python -m controlplane sim ...`), as the local runtime's."""
    sim = spec.simulator or SimulatorSpec()
    return [
        "sim", "--host", "0.0.0.0", "--port", str(port), "--model", spec.model,
        "--ttft-ms", str(sim.ttft_ms), "--itl-ms", str(sim.itl_ms),
        "--max-tokens-default", str(sim.max_tokens_default), "--wake-ms", str(sim.wake_ms),
        "--version", spec.version,
    ]  # fmt: skip


def container(spec: ModelSpec, sim_image: str) -> dict[str, Any]:
    """The serving container of a version's pods (a Kubernetes Container as a dict)."""
    probe = {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 5}
    if spec.simulator is not None:
        image = spec.image or sim_image
        command, args = ["python", "-m", "controlplane"], sim_args(spec)
        resources = _quantities(spec.resources or {})
    else:
        image = spec.image or DEFAULT_VLLM_IMAGE
        command, args = ["vllm", "serve"], vllm_args(spec)
        resources = _with_gpus(spec.resources or {}, spec.gpu_count)
    serving = {
        "name": "server",
        "image": image,
        "command": command,
        "args": args,
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        "resources": resources,
        # Loading weights takes minutes: the startup probe allows 30 min before liveness counts.
        "startupProbe": {**probe, "failureThreshold": 360},
        "readinessProbe": {**probe, "failureThreshold": 2},
        "livenessProbe": {**probe, "periodSeconds": 10, "failureThreshold": 6},
    }
    env = []
    if spec.enable_sleep_mode and spec.simulator is None:
        # vLLM serves /sleep, /wake_up and /is_sleeping (and /collective_rpc, which the wake
        # from level 2 needs) only in dev mode. The pod's port is reachable in the cluster
        # only: Envoy never routes those paths, and the NetworkPolicy admits only Envoy, the
        # controller and scrapers (docs/security.md).
        env.append({"name": "VLLM_SERVER_DEV_MODE", "value": "1"})
    if "--enable-lora" in spec.extra_args and spec.simulator is None:
        # LoRA adapter versions on these pods are loaded at run time (/v1/load_lora_adapter),
        # which vLLM serves only with this; same port, same NetworkPolicy as above.
        env.append({"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"})
    if env:
        serving["env"] = env
    return serving


def _quantities(resources: dict[str, dict[str, Any]]) -> dict[str, dict[str, str]]:
    """Resource quantities as the API's strings (`4`, `24Gi`)."""
    return {kind: {name: str(value) for name, value in values.items()}
            for kind, values in resources.items() if values}  # fmt: skip


def _with_gpus(resources: dict[str, dict[str, Any]], gpus: int) -> dict[str, dict[str, str]]:
    resources = _quantities(resources)
    if gpus <= 0:
        return resources
    limits = {**resources.get("limits", {}), GPU_RESOURCE: str(gpus)}
    return {**resources, "limits": limits}


def backend_of(spec: ModelSpec) -> Backend:
    """The controller's Backend for a CR (what the admin API shows for the version)."""
    if spec.adapter is not None:
        adapter = spec.adapter
        return Backend(adapter=AdapterBackend(base=adapter.base, path=adapter.path,
                                              lora_name=adapter.lora_name))  # fmt: skip
    if spec.simulator is not None:
        sim = spec.simulator
        fields = ("ttft_ms", "itl_ms", "max_tokens_default", "wake_ms")
        return Backend(sim=SimBackend(**{name: getattr(sim, name) for name in fields}))
    args = vllm_args(spec)[5:]  # without the model, host and port
    return Backend(vllm=VllmBackend(model=spec.model_name, args=args))


def spec_of(model: str, version: str, backend: Backend) -> dict[str, Any]:
    """A VLLMModel spec for a version added through the admin API (no CR yet).

    `vllm` backends: `model` becomes `modelName`, `args` become `extraArgs` (GPU count and
    image keep their defaults; edit the CR to change them). `sim` backends become a
    `simulator` spec. `url` backends are not Kubernetes workloads.
    """
    if backend.sim is not None:
        sim = backend.sim
        simulator = {"ttftMs": sim.ttft_ms, "itlMs": sim.itl_ms,
                     "maxTokensDefault": sim.max_tokens_default, "wakeMs": sim.wake_ms}  # fmt: skip
        return {"model": model, "version": version, "modelName": model, "gpuCount": 0,
                "simulator": simulator}  # fmt: skip
    if backend.vllm is not None:
        return {"model": model, "version": version, "modelName": backend.vllm.model,
                "extraArgs": list(backend.vllm.args)}  # fmt: skip
    if backend.adapter is not None:  # loaded on the base's pods: a VLLMModel without pods
        adapter = {"base": backend.adapter.base, "path": backend.adapter.path}
        if backend.adapter.lora_name is not None:
            adapter["loraName"] = backend.adapter.lora_name
        return {"model": model, "version": version, "adapter": adapter}
    raise Invalid(
        "runtime kubernetes runs `vllm` and `sim` backends as VLLMModel resources; "
        "a `url` backend is not a Kubernetes workload",
        field="backend",
    )
