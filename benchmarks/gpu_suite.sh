#!/usr/bin/env bash
# One command for a bare GPU machine (torch, triton, nvcc, ninja; no network, no vLLM):
#
#     bash benchmarks/gpu_suite.sh OUTDIR
#
# 1. builds the extensions (pip install --no-build-isolation --no-deps -e .)      build.log
# 2. runs the correctness suite on CUDA and Triton, then benchmarks/gpu_check.py  tests.log
# 3. runs the GPU benchmarks (quick set, CUDA events / CUDA-graph replay)          bench.log
#    -> bench-cuda.json (result), bench-cuda.md (table), bench-cuda.png (plot)
# 4. summary.txt: every stage's exit code and seconds, the GPU, the versions.
# At most 7 files, flat, in OUTDIR.  The whole script stays within GPU_SUITE_BUDGET seconds
# (default 570): every stage runs under `timeout`, the benchmark stops starting new cases when
# its share is spent and writes what it measured.  Set STEERKERNEL_GIT_REV to record the
# revision when the checkout has no .git.
set -uo pipefail
OUT=${1:?usage: bash benchmarks/gpu_suite.sh OUTDIR}
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
BUDGET=${GPU_SUITE_BUDGET:-570}
T0=$(date +%s)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1

left() { echo $(( BUDGET - ($(date +%s) - T0) )); }

# stage NAME MAX_SECONDS LOG CMD... : run CMD under timeout min(MAX, time left - reserve)
stage() {
  local name=$1 max=$2 log=$3; shift 3
  local limit; limit=$(left); limit=$(( limit - 15 ))
  (( limit > max )) && limit=$max
  if (( limit < 10 )); then
    echo "$name: skipped (suite budget spent)" | tee -a "$SUMMARY"; return 124
  fi
  local s; s=$(date +%s)
  echo "== $name (limit ${limit}s): $*" >> "$log"
  timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  echo "$name: rc=$rc $(( $(date +%s) - s ))s (limit ${limit}s)" | tee -a "$SUMMARY"
  return $rc
}

{
  echo "steerkernel gpu_suite $(date -u +%Y-%m-%dT%H:%M:%SZ) git=${STEERKERNEL_GIT_REV:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | head -4
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)" 2>&1
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1 | tail -1
  command -v nvcc >/dev/null && nvcc --version | tail -1
} >> "$SUMMARY"

stage build 240 "$OUT/build.log" env STEERKERNEL_BUILD_CUDA=1 \
  "$PY" -m pip install --no-build-isolation --no-deps -e .
tail -3 "$OUT/build.log" >> "$SUMMARY"

tests=()
for t in tests/test_junction.py tests/test_triton_junction.py; do [ -f "$t" ] && tests+=("$t"); done
if (( ${#tests[@]} )); then
  stage tests 150 "$OUT/tests.log" "$PY" -m pytest "${tests[@]}" -q -p no:cacheprovider
  tail -1 "$OUT/tests.log" >> "$SUMMARY"
else
  echo "tests: no tests/test_junction.py or tests/test_triton_junction.py" | tee -a "$SUMMARY"
fi
if [ -f benchmarks/gpu_check.py ]; then
  stage gpu_check 90 "$OUT/tests.log" "$PY" benchmarks/gpu_check.py
else
  echo "gpu_check: benchmarks/gpu_check.py not in this checkout" | tee -a "$SUMMARY"
fi

# the benchmark gets what is left, and stops starting cases 40 s before its own timeout
BENCH=$(( $(left) - 20 ))
stage bench "$BENCH" "$OUT/bench.log" "$PY" -m benchmarks --device cuda --quick \
  --out "$OUT" --name bench-cuda.json --time-budget $(( BENCH > 80 ? BENCH - 40 : BENCH / 2 )) \
  --compile-budget $(( BENCH / 3 )) --label "gpu_suite quick on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
if [ -f "$OUT/bench-cuda.json" ] && [ ! -f "$OUT/bench-cuda.md" ]; then  # cut short: render
  stage report 30 "$OUT/bench.log" "$PY" -m benchmarks report "$OUT/bench-cuda.json" \
    --out "$OUT" --readme none
fi
grep -E "^(copy bandwidth|Kernel vs|wrote)" "$OUT/bench.log" >> "$SUMMARY"
echo "total: $(( $(date +%s) - T0 ))s" | tee -a "$SUMMARY"
ls "$OUT" >> "$SUMMARY"
