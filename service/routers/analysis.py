"""Analysis of a step: the kernel, its diagonal, spectrum and blocks, and the entropy change.

Every route answers 409 with the step status while the step is not ``ready`` unless
``?wait=SECONDS`` (<= ``KERNELSCOPE_MAX_WAIT_S``) lets it wait; results are cached per data
version.  The routes call :mod:`service.analysis` only; the cached answers are JSON bytes
encoded from the ``response_model`` each route declares.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Response

from service import analysis as an
from service.deps import DrainingDep, RunDep, SettingsDep, StepNo, StoreDep
from service.errors import ProblemError
from service.schemas import (
    BlocksOut,
    DiagonalEntry,
    EntropyOut,
    KernelOut,
    RoleQuery,
    RunEntropyOut,
    SpectrumOut,
)
from sketch.entropy import Estimator
from sketch.rao_blackwell import EntropyGradient
from sketch.token_mean import Target

router = APIRouter(prefix="/v1/runs/{run_id}", tags=["analysis"])

TargetQuery = Annotated[
    Target,
    Query(
        description="sequence: the sequence entropy (nats per response, math.md §3); "
        "token_mean: the token-mean entropy trainers log (nats per token, math.md §8)"
    ),
]

Wait = Annotated[
    float,
    Query(
        ge=0,
        description="seconds to wait for a pending step (<= KERNELSCOPE_MAX_WAIT_S, default 300)",
    ),
]
RoleQ = Annotated[RoleQuery, Query(description="rows: update (default), entropy or all")]
NPY = "application/octet-stream"
JSON = "application/json"
_409: dict[int | str, dict[str, Any]] = {
    409: {"description": "step not ready (problem with step_status)"}
}


async def step_query(
    run: RunDep,
    step: StepNo,
    store: StoreDep,
    settings: SettingsDep,
    draining: DrainingDep,
    wait: Wait = 0.0,
) -> an.StepQuery:
    if wait > settings.max_wait_s:
        raise ProblemError(
            422, f"wait: at most {settings.max_wait_s:g} s (KERNELSCOPE_MAX_WAIT_S), got {wait:g}"
        )
    return an.StepQuery(store, settings, draining, run, step, wait)


StepQ = Annotated[an.StepQuery, Depends(step_query)]


def _bytes(body: bytes) -> bytes:
    return body


@router.get(
    "/steps/{step}/kernel",
    response_model=KernelOut,
    responses={200: {"content": {NPY: {}}}, **_409},
)
async def kernel(
    q: StepQ,
    role: RoleQ = "update",
    normalize: Annotated[bool, Query(description="cosine rho instead of K")] = False,
    accept: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Response:
    """``K(i, j) = <w_i, w_j>`` over ``role`` (JSON ``{ids, matrix}``; ``Accept:
    application/octet-stream`` gives a float64 ``.npy``, row order as in the JSON ``ids``)."""
    if accept and NPY in accept:
        body = await an.step_answer(
            q,
            f"kernel.npy|{role}|{normalize}",
            lambda m: an.kernel_npy(m, role, normalize),
            _bytes,
        )
        return Response(content=body, media_type=NPY)
    body = await an.step_answer(
        q, f"kernel|{role}|{normalize}", lambda m: an.kernel_json(m, role, normalize), _bytes
    )
    return Response(content=body, media_type=JSON)


@router.get("/steps/{step}/kernel/diagonal", response_model=list[DiagonalEntry], responses=_409)
async def kernel_diagonal(q: StepQ, role: RoleQ = "update") -> Response:
    """``K(i, i) = |w_i|^2`` per sequence of ``role``."""
    body = await an.step_answer(
        q, f"diagonal|{role}", lambda m: an.diagonal_answer(m, role), an.encode_diagonal
    )
    return Response(content=body, media_type=JSON)


@router.get("/steps/{step}/kernel/spectrum", response_model=SpectrumOut, responses=_409)
async def kernel_spectrum(
    q: StepQ,
    role: RoleQ = "update",
    top: Annotated[int, Query(ge=0, le=256, description="eigenvectors to return")] = 0,
) -> Response:
    """Eigenvalues (descending), trace, effective rank, participation ratio (math.md §5)."""
    body = await an.step_answer(
        q, f"spectrum|{role}|{top}", lambda m: an.spectrum_answer(m, role, top), SpectrumOut.to_json
    )
    return Response(content=body, media_type=JSON)


@router.get("/steps/{step}/kernel/blocks", response_model=BlocksOut, responses=_409)
async def kernel_blocks(q: StepQ, role: RoleQ = "update") -> Response:
    """Pair-type statistics (diagonal, same_prompt, cross_prompt) and the prompt matrix."""
    body = await an.step_answer(
        q,
        f"blocks|{role}|r{an.ANALYSIS_REVISION}",
        lambda m: an.blocks_answer(m, role),
        lambda blocks: blocks.model_dump_json().encode(),
    )
    return Response(content=body, media_type=JSON)


@router.get("/steps/{step}/entropy", response_model=EntropyOut, responses=_409)
async def step_entropy(
    q: StepQ,
    estimator: Annotated[Estimator | None, Query(description="default: see math.md §4")] = None,
    target: TargetQuery = Target.SEQUENCE,
    entropy_gradient: Annotated[
        EntropyGradient | None,
        Query(
            description="how to estimate grad H (math.md §3): default entropy_sum where every "
            "entropy-side sequence has its entropy_sum and its 'entropy_sum' rows, else score"
        ),
    ] = None,
) -> Response:
    """First-order entropy change ``dH1`` with decomposition and error bars (math.md §4).

    A query with the default estimator and gradient also records the step's row of
    ``GET /v1/runs/{run_id}/entropy`` (of the same target)."""
    body = await an.step_entropy(q, estimator, target, entropy_gradient)
    return Response(content=body, media_type=JSON)


@router.get("/entropy", response_model=RunEntropyOut)
async def run_entropy(
    run: RunDep,
    store: StoreDep,
    settings: SettingsDep,
    draining: DrainingDep,
    target: TargetQuery = Target.SEQUENCE,
) -> RunEntropyOut:
    """One row per analysed step: predicted ``delta_h1``, realized change, ratio, error bars.

    Rows are the steps' default-estimator entropy analyses, kept without TTL.  A ready step
    without a row, or whose data changed since its row was written, is analysed now, so the
    history never depends on which steps someone happened to query.  Steps that cannot be
    analysed (pending, failed, incomplete) keep their last row, if any."""
    return await an.run_history(store, settings, draining, run, target)
