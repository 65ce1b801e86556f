#!/usr/bin/env bash
# One command for a short GPU lease (torch, triton, nvcc, ninja, compute-sanitizer; no network,
# no vLLM), built to finish within GPU_SUITE_BUDGET seconds (default 300):
#
#     bash benchmarks/gpu_suite.sh OUTDIR             # on the GPU machine
#     bash benchmarks/gpu_suite.sh --dry-run OUTDIR   # rehearsal on a CPU machine
#
# 1. build      pip install --no-build-isolation --no-deps -e . (CUDA op forced)   build.log
# 2. in parallel, each under its own timeout:
#    tests      the op's test files on CUDA and Triton                             tests.log
#    check      benchmarks/gpu_check.py: every kernel variant vs the fp64 reference
#               (shape matrix, x aliasing residual, strided scores, side stream, CUDA graph
#               replays with tables and latch changed between replays)    check.log, gpu_check.json
#    sanitize   compute-sanitizer memcheck and racecheck on small cases        sanitize.log
# 3. bench      `python -m benchmarks --device cuda --quick` (graph replay at decode sizes, %
#               of measured copy bandwidth, vs plain fused add+RMSNorm and torch.compile)
#               -> bench-cuda.json / .md / .png                                    bench.log
# 4. summary.txt: each stage's exit code and seconds, the GPU, the versions; the last lines
#    printed are the short table (the device tool returns the tail of the output).
#
# --dry-run runs every stage that can run without a GPU: no pip build (the checkout's own
# build is used), the CPU backend and the Triton interpreter in tests and check, the
# sanitizer stage skipped, the smoke benchmark set on the CPU.  Set STEERKERNEL_GIT_REV to
# record the revision when the checkout has no .git.
set -uo pipefail
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT=${1:?usage: bash benchmarks/gpu_suite.sh [--dry-run] OUTDIR}
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
BUDGET=${GPU_SUITE_BUDGET:-300}
T0=$(date +%s)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
if [ "$DRY" = 1 ]; then export TRITON_INTERPRET=1; DEV=cpu; else DEV=cuda; fi

left() { echo $(( BUDGET - ($(date +%s) - T0) )); }

# stage NAME MAX_SECONDS LOG CMD... : run CMD under timeout min(MAX, time left - reserve)
stage() {
  local name=$1 max=$2 log=$3; shift 3
  local limit; limit=$(left); limit=$(( limit - 10 ))
  (( limit > max )) && limit=$max
  if (( limit < 5 )); then
    echo "$name: skipped (suite budget spent)" >> "$SUMMARY"; return 124
  fi
  local s; s=$(date +%s)
  echo "== $name (limit ${limit}s): $*" >> "$log"
  timeout --kill-after=5 "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  echo "$name: rc=$rc $(( $(date +%s) - s ))s (limit ${limit}s)" >> "$SUMMARY"
  return $rc
}

{
  echo "steerkernel gpu_suite $( [ "$DRY" = 1 ] && echo DRY-RUN ) $(date -u +%Y-%m-%dT%H:%M:%SZ) git=${STEERKERNEL_GIT_REV:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | head -4
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)" 2>&1
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1 | tail -1
  command -v nvcc >/dev/null && nvcc --version | tail -1
} >> "$SUMMARY"

# ---- 1. build
if [ "$DRY" = 1 ]; then
  if "$PY" -c "import steerkernel; from steerkernel.backends import native; native.load('_C')" >> "$OUT/build.log" 2>&1; then
    echo "build: dry run, using the checkout's build" >> "$SUMMARY"
  else
    echo "build: dry run, the checkout's build does not load (see build.log)" >> "$SUMMARY"
  fi
else
  MAX_JOBS=${MAX_JOBS:-$(nproc)} stage build 150 "$OUT/build.log" env STEERKERNEL_BUILD_CUDA=1 \
    "$PY" -m pip install --no-build-isolation --no-deps -e .
  tail -2 "$OUT/build.log" >> "$SUMMARY"
fi

# ---- 2. tests, check, sanitize in parallel
tests=()
if [ "$DRY" = 1 ]; then candidates="tests/test_junction.py"  # the interpreter is slow
else candidates="tests/test_junction.py tests/test_triton_junction.py tests/test_batch_invariance.py"; fi
for t in $candidates; do [ -f "$t" ] && tests+=("$t"); done
# the CUDA path-equality test (not the nvcc compile checks, which CPU CI runs)
[ "$DRY" = 0 ] && [ -f tests/test_cuda_compile.py ] && tests+=("tests/test_cuda_compile.py::test_cuda_paths_give_the_same_bits")
stage tests 150 "$OUT/tests.log" "$PY" -m pytest "${tests[@]}" -q -x -p no:cacheprovider &
P_TESTS=$!
if [ "$DRY" = 1 ]; then
  stage check 150 "$OUT/check.log" "$PY" benchmarks/gpu_check.py --dry-run --out "$OUT" --budget "${GPU_CHECK_BUDGET:-60}" &
else
  stage check 150 "$OUT/check.log" "$PY" benchmarks/gpu_check.py --out "$OUT" --budget 130 &
fi
P_CHECK=$!
if [ "$DRY" = 0 ] && command -v compute-sanitizer >/dev/null; then
  (
    stage memcheck 100 "$OUT/sanitize.log" compute-sanitizer --tool memcheck --error-exitcode 9 \
      "$PY" benchmarks/gpu_check.py --small --budget 80
    stage racecheck 100 "$OUT/sanitize.log" compute-sanitizer --tool racecheck --error-exitcode 9 \
      "$PY" benchmarks/gpu_check.py --small --budget 80
  ) &
  P_SAN=$!
else
  echo "sanitize: skipped ($( [ "$DRY" = 1 ] && echo 'dry run' || echo 'no compute-sanitizer'))" >> "$SUMMARY"
  P_SAN=
fi
wait $P_TESTS $P_CHECK ${P_SAN:+$P_SAN}

# ---- 3. benchmark: what is left, stopping new cases 30 s before its own timeout
BENCH=$(( $(left) - 10 ))
if [ "$DRY" = 1 ]; then
  stage bench "$BENCH" "$OUT/bench.log" "$PY" -m benchmarks --device cpu --size smoke \
    --no-compile --out "$OUT" --name bench-cpu-dry.json --time-budget 30 --label "gpu_suite dry run"
else
  stage bench "$BENCH" "$OUT/bench.log" "$PY" -m benchmarks --device cuda --quick \
    --out "$OUT" --name bench-cuda.json --time-budget $(( BENCH > 60 ? BENCH - 30 : BENCH / 2 )) \
    --compile-budget $(( BENCH / 4 )) \
    --label "gpu_suite quick on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
fi

# ---- 4. summary (the last lines are what a short reply shows)
{
  tail -1 "$OUT/tests.log" 2>/dev/null | sed 's/^/tests: /'
  grep -E "^gpu_check:" "$OUT/check.log" 2>/dev/null
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$OUT/sanitize.log" 2>/dev/null
  grep -E "^(copy bandwidth|Kernel vs|wrote)" "$OUT/bench.log" 2>/dev/null
  echo "total: $(( $(date +%s) - T0 ))s"
  ls "$OUT"
} >> "$SUMMARY"
cat "$SUMMARY"
