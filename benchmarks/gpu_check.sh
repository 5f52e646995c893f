#!/usr/bin/env bash
# One command for a machine with a CUDA GPU (about 5-8 minutes): the CUDA tests, then benchmarks/gpu_check.py
# (HVP cost of CIFAR ResNet-32 with and without BN at 1 and 10 probes in float32, TF32 and bfloat16, and a timed,
# extrapolated part of a full-size SLQ), written to gpu_check.md for benchmarks/RESULTS.md.
#   benchmarks/gpu_check.sh                      # on a GPU machine
#   benchmarks/gpu_check.sh --device cpu --tiny  # smoke test of the script (run by the test suite)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
OUT="${GPU_CHECK_OUT:-gpu_check.md}"
DEVICE=cuda
TINY=()
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --tiny) TINY=(--tiny); shift ;;
    --out) OUT="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
if [ "$DEVICE" != "cpu" ]; then
  # The tests that exercise CUDA (placements with prefetching, bases off the device, materialize to CUDA).
  timeout 240 "$PY" -m pytest -q -x -k cuda tests/test_placement.py tests/test_basis_placement.py tests/test_datasets.py \
    | tee "$OUT.tests.txt"
fi
timeout 300 "$PY" benchmarks/gpu_check.py --device "$DEVICE" --out "$OUT" "${TINY[@]}"
