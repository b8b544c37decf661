#!/usr/bin/env bash
# CUDA checks of the sketch operators and of a real TRL step, a few minutes on one GPU:
#   1. the CPU = CUDA tests (pytest -m cuda, tests/sketch/test_cuda.py),
#   2. the sketch benchmark on the device, with the device's own copy bandwidth and matmul
#      rate as baselines (targets: countsketch >= 40% of copy, dense kinds >= 40% of matmul),
#   3. bench/trl_step.py on the device, 100M model: kernelscope's added time per GRPO step
#      (generation included) against the plain step (target: at most 15% of the whole step;
#      anchor: bergson's HF Trainer gradient callback, about 17%); on the GPU the factorised
#      capture's targets are at least 10x faster than the per-sequence loop and at most 1.2x
#      a plain batched backward (bench/capture.py's table on the CPU).
# Without CUDA it still runs: the tests skip and the benchmarks run on the CPU (--quick).
# Usage: bench/gpu.sh [extra bench/sketch.py flags, e.g. --compile]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi

if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    DEVICE=cuda
    "$PY" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"device: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs")'
    SIZE_FLAGS=()
else
    DEVICE=cpu
    echo "no CUDA device: CUDA tests skip, benchmark falls back to --device cpu --quick"
    SIZE_FLAGS=(--quick)
fi

echo "== pytest -m cuda"
# exit code 5 = everything deselected/skipped (no CUDA): not a failure here
"$PY" -m pytest -q -m cuda tests/sketch/test_cuda.py -p no:cacheprovider || [ $? -eq 5 ]

echo "== bench/sketch.py --device $DEVICE"
"$PY" bench/sketch.py --device "$DEVICE" "${SIZE_FLAGS[@]}" "$@"

echo "== bench/trl_step.py --device $DEVICE"
if [ "$DEVICE" = cuda ]; then
    "$PY" bench/trl_step.py --device cuda --sizes 100M
else
    "$PY" bench/trl_step.py --quick
fi
