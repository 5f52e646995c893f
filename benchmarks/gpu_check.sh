#!/usr/bin/env bash
# One command for a machine with a CUDA GPU (at most 8 minutes): the CUDA tests, then benchmarks/gpu_check.py
# (HVP cost of CIFAR ResNet-32 with and without BN at 1 and 10 probes in float32, TF32 and bfloat16, eager, and
# compiled in float32 and bfloat16 at 10 probes; a timed, extrapolated part of a full-size SLQ), written to
# gpu_check.md for benchmarks/RESULTS.md. The compiled cells get what is left of the 8 minutes (see gpu_check.py).
#   benchmarks/gpu_check.sh                      # on a GPU machine
#   benchmarks/gpu_check.sh --device cpu --tiny  # smoke test of the script (run by the test suite)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
OUT="${GPU_CHECK_OUT:-gpu_check.md}"
DEVICE=cuda
TINY=()
TOTAL_S=480
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --tiny) TINY=(--tiny); TOTAL_S=540; shift ;;
    --out) OUT="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
START=$(date +%s)
if [ "$DEVICE" != "cpu" ]; then
  # The tests that exercise CUDA (placements with prefetching, bases off the device, materialize to CUDA).
  timeout 240 "$PY" -m pytest -q -x -k cuda tests/test_placement.py tests/test_basis_placement.py tests/test_datasets.py \
    | tee "$OUT.tests.txt"
fi
LEFT=$((TOTAL_S - ($(date +%s) - START) - 10))
status=0
timeout "$LEFT" "$PY" benchmarks/gpu_check.py --device "$DEVICE" --out "$OUT" --budget-s "$((LEFT - 20))" "${TINY[@]}" \
  || status=$?
if [ "$status" -eq 124 ]; then
  echo "gpu_check.py reached the time limit; $OUT holds what it measured before" >&2
fi
exit "$status"
