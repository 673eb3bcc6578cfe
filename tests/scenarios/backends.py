"""What the scenarios run behind Envoy: Switchyard's simulator, or real vLLM.

`make test` runs the scenarios against the simulator; `make test-vllm` sets
SWITCHYARD_TEST_BACKEND=vllm and runs the same scenarios against real vLLM servers (the CPU
build, in its own virtual environment, scripts/vllm-env.sh) serving a tiny random Llama that
is generated here on first use (tests/scenarios/make_tiny_model.py), so that every difference
between the two is a failing test.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KIND = os.environ.get("SWITCHYARD_TEST_BACKEND", "sim")
if KIND not in ("sim", "vllm"):
    raise RuntimeError(f"SWITCHYARD_TEST_BACKEND must be sim or vllm, not {KIND!r}")
REAL = KIND == "vllm"

VLLM_VENV = Path(os.environ.get("SWITCHYARD_VLLM_VENV", ROOT / ".venv-vllm"))
CACHE = ROOT / ".vllm-test"  # the generated model and adapter, vLLM's compile cache
GENERATOR = Path(__file__).with_name("make_tiny_model.py")
# Small and fast: no CUDA graphs or compilation, a 512-token context, a 1 GiB KV cache.
VLLM_ARGS = [
    "--enforce-eager", "--max-model-len", "512", "--max-num-seqs", "16",
    "--enable-lora", "--max-loras", "2", "--max-lora-rank", "8",
    # The CPU platform refuses --enable-sleep-mode; its sleep endpoints (dev mode) still
    # pause and resume the engine, which is what these scenarios exercise.
    "--no-enable-sleep-mode",
]  # fmt: skip
VLLM_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # one process per server: starts fastest
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB
    "VLLM_NO_USAGE_STATS": "1",
    "HF_HUB_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",  # several servers share two cores
}


def tiny_model() -> Path:
    """The directory holding `model/` and `adapter/`, made once per generator version (and
    the vLLM environment installed first, when missing)."""
    subprocess.run([str(ROOT / "scripts" / "vllm-env.sh"), str(VLLM_VENV)], check=True)
    digest = hashlib.sha256(GENERATOR.read_bytes()).hexdigest()[:12]
    target = CACHE / f"tiny-{digest}"
    CACHE.mkdir(exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two pytest processes never write one model
        if not (target / "adapter" / "adapter_config.json").exists():
            subprocess.run([str(VLLM_VENV / "bin" / "python"), str(GENERATOR), str(target)],
                           check=True, capture_output=True)  # fmt: skip
    return target


def backend(models_dir: Path | None, **sim) -> dict:
    """One version's `backend` in switchyard.yaml. `sim` options apply to the simulator only
    (real vLLM has its own latencies)."""
    if not REAL:
        return {"sim": sim}
    assert models_dir is not None
    command = [str(VLLM_VENV / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server",
               "--model", "{model}"]  # fmt: skip
    return {"vllm": {"model": str(models_dir / "model"), "command": command, "args": VLLM_ARGS}}


def environment() -> dict[str, str]:
    """What `switchyard up` needs in its environment (its backends inherit it)."""
    if not REAL:
        return {}
    return {**VLLM_ENV, "VLLM_CACHE_ROOT": str(CACHE / "vllm-cache")}


def adapter_path(models_dir: Path | None, scratch: Path) -> Path:
    """A LoRA adapter for the served model: the generated one for real vLLM; for the
    simulator, a directory that looks like one (it checks the path, not the weights)."""
    if REAL:
        assert models_dir is not None
        return models_dir / "adapter"
    path = scratch / "adapter"
    path.mkdir(exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    return path


def pid_of(state_dir: Path, model: str, version: str) -> int:
    """The pid of a version's backend process (the local runtime's pid file)."""
    return int((state_dir / "pids" / f"{KIND}-{model}@{version}.pid").read_text())


def log_of(state_dir: Path, model: str, version: str) -> str:
    """What a version's backend process wrote (vLLM logs every sleep and wake call)."""
    path = state_dir / "logs" / f"{KIND}-{model}@{version}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def woke_with_reload(log: str) -> bool:
    """Did the backend's last wake-up reload the weights (vLLM's sequence after level 2)?"""
    if not REAL:
        return "sim weights reloaded" in log.rsplit("sim sleeping", 1)[-1]
    last = log.rsplit("POST /sleep", 1)[-1]  # vLLM's access log: after the last sleep
    steps = ["wake up the engine with tags: ['weights']", '"POST /collective_rpc HTTP/1.1" 200',
             "wake up the engine with tags: ['kv_cache']"]  # fmt: skip
    positions = [last.find(step) for step in steps]
    return -1 not in positions and positions == sorted(positions)
