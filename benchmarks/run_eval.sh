#!/usr/bin/env bash
# The evaluation figures of the README, measured on this machine with the embedded
# SmolLM2-135M-Instruct and its built-in emotion bank:
#   1. steerkernel calibrate calm,desperate  (dose-response, recommended strengths; the record is
#      what ships as steerkernel/data/calibrated_strengths.json)
#   2. steerkernel probe                      (behavioural A/B probe, desperate and calm)
#   3. steerkernel space                      (concept space per layer vs valence/arousal)
# Results: benchmarks/results/eval-*-<machine>-<time>.json; plots: docs/img/.
#   PYTHON=.venv/bin/python bash benchmarks/run_eval.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-.venv/bin/python}
tag="$("$PY" - <<'PYEOF'
import os, re
cpu = "cpu"
try:
    for ln in open("/proc/cpuinfo"):
        if ln.startswith("model name"):
            cpu = ln.split(":", 1)[1]
            break
except OSError:
    pass
words = re.sub(r"[^A-Za-z0-9 ]", " ", cpu).split()[:2]
print("-".join(words) + f"-{os.cpu_count()}c")
PYEOF
)-$(date -u +%Y%m%dT%H%M)"
out=benchmarks/results
t0=$(date +%s)
"$PY" -m steerkernel calibrate --concepts calm,desperate --out "$out/eval-calibrate-$tag.json" \
  --plot docs/img/eval_dose_response.png --record steerkernel/data/calibrated_strengths.json
t1=$(date +%s)
"$PY" -m steerkernel probe --out "$out/eval-probe-$tag.json" --plot docs/img/eval_probe.png
t2=$(date +%s)
"$PY" -m steerkernel space --out "$out/eval-space-$tag.json" --plot docs/img/concept_space_by_layer.png
t3=$(date +%s)
echo "seconds: calibrate $((t1 - t0)), probe $((t2 - t1)), space $((t3 - t2))"
