"""Analysis of a step: the kernel, its diagonal, spectrum and blocks, and the entropy change.

Every route answers 409 with the step status while the step is not ``ready`` unless
``?wait=SECONDS`` (<= 300) lets it wait; results are cached per data version.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Response
from starlette.concurrency import run_in_threadpool

from service import analysis as an
from service.deps import DrainingDep, RunDep, SettingsDep, StepNo, StoreDep
from service.errors import ProblemError
from service.schemas import (
    DiagonalEntry,
    Estimator,
    KernelOut,
    RoleQuery,
    RunEntropyOut,
    SpectrumOut,
)
from service.settings import Settings
from service.store import Store
from sketch.spec import sketcher_for

router = APIRouter(prefix="/v1/runs/{run_id}", tags=["analysis"])

Wait = Annotated[
    float,
    Query(ge=0, le=an.MAX_WAIT_S, description="seconds to wait for a pending step (<= 300)"),
]
RoleQ = Annotated[RoleQuery, Query(description="rows: update (default), entropy or all")]
NPY = "application/octet-stream"
_409: dict[int | str, dict[str, Any]] = {
    409: {"description": "step not ready (problem with step_status)"}
}


@dataclass(frozen=True)
class StepQuery:
    """What every analysis of one step needs: where the data is, the limits, the shutdown
    signal, the run and step, and how long a pending step may be waited for."""

    store: Store
    settings: Settings
    draining: threading.Event
    run: dict[str, Any]
    step: int
    wait: float = 0.0


def step_query(
    run: RunDep,
    step: StepNo,
    store: StoreDep,
    settings: SettingsDep,
    draining: DrainingDep,
    wait: Wait = 0.0,
) -> StepQuery:
    return StepQuery(store, settings, draining, run, step, wait)


StepQ = Annotated[StepQuery, Depends(step_query)]


async def _answer(
    q: StepQuery,
    query: str,
    compute: Callable[[an.StepMatrix], bytes],
    media_type: str = "application/json",
    after: Callable[[an.StepMatrix, bytes], Any] | None = None,
) -> Response:
    limits = q.settings
    await an.ready_step(
        q.store,
        q.run,
        q.step,
        q.wait,
        limits.max_sequences,
        limits.max_analysis_bytes,
        q.draining,
    )
    body = await an.cached_result(q.store, q.run["run_id"], q.step, query, compute, after)
    return Response(content=body, media_type=media_type)


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
        return await _answer(
            q,
            f"kernel.npy|{role}|{normalize}",
            lambda m: an.kernel_npy(m, role, normalize),
            NPY,
        )
    return await _answer(
        q, f"kernel|{role}|{normalize}", lambda m: an.kernel_json(m, role, normalize)
    )


@router.get("/steps/{step}/kernel/diagonal", response_model=list[DiagonalEntry], responses=_409)
async def kernel_diagonal(q: StepQ, role: RoleQ = "update") -> Response:
    """``K(i, i) = |w_i|^2`` per sequence of ``role``."""
    return await _answer(q, f"diagonal|{role}", lambda m: an.diagonal_json(m, role))


@router.get("/steps/{step}/kernel/spectrum", response_model=SpectrumOut, responses=_409)
async def kernel_spectrum(
    q: StepQ,
    role: RoleQ = "update",
    top: Annotated[int, Query(ge=0, le=256, description="eigenvectors to return")] = 0,
) -> Response:
    """Eigenvalues (descending), trace, effective rank, participation ratio (math.md §5)."""
    return await _answer(q, f"spectrum|{role}|{top}", lambda m: an.spectrum_json(m, role, top))


@router.get("/steps/{step}/kernel/blocks", responses=_409)
async def kernel_blocks(q: StepQ, role: RoleQ = "update") -> Response:
    """Pair-type statistics (diagonal, same_prompt, cross_prompt) and the prompt matrix."""
    return await _answer(q, f"blocks|{role}", lambda m: an.blocks_json(m, role))


@router.get("/steps/{step}/entropy", responses=_409)
async def step_entropy(
    q: StepQ,
    estimator: Annotated[Estimator | None, Query(description="default: see math.md §4")] = None,
) -> Response:
    """First-order entropy change ``dH1`` with decomposition and error bars (math.md §4).

    A query with the default estimator also records the step's row of
    ``GET /v1/runs/{run_id}/entropy``."""
    run = q.run

    async def keep_summary(m: an.StepMatrix, body: bytes) -> None:
        # the summary needs the update kernel's eigenvalues: CPU work, off the event loop
        summary = await run_in_threadpool(an.entropy_summary, m, json.loads(body))
        await q.store.put_summary(run["run_id"], q.step, summary)

    return await _answer(
        q,
        f"entropy|{estimator}|r{an.ANALYSIS_REVISION}",
        lambda m: an.entropy_json(
            m, run, sketcher_for(run["sketch"], run.get("parameters")), estimator
        ),
        after=keep_summary if estimator is None else None,
    )


@router.get("/entropy", response_model=RunEntropyOut)
async def run_entropy(
    run: RunDep, store: StoreDep, settings: SettingsDep, draining: DrainingDep
) -> dict[str, Any]:
    """One row per analysed step: predicted ``delta_h1``, realized change, ratio, error bars.

    Rows are the steps' default-estimator entropy analyses, kept without TTL.  A ready step
    without a row, or whose data changed since its row was written, is analysed now, so the
    history never depends on which steps someone happened to query.  Steps that cannot be
    analysed (pending, failed, incomplete) keep their last row, if any."""
    run_id = run["run_id"]
    summaries = await store.summaries(run_id)
    for step in await store.list_steps(run_id):
        row = summaries.get(step)
        if (
            row is not None
            and row.get("revision") == an.ANALYSIS_REVISION
            and row.get("version") == await store.version(run_id, step)
        ):
            continue
        try:
            await step_entropy(StepQuery(store, settings, draining, run, step))
        except ProblemError as exc:
            if exc.status not in (409, 422):
                raise
    summaries = await store.summaries(run_id)
    return {
        "run_id": run["run_id"],
        "steps": [{"step": s, **summaries[s]} for s in sorted(summaries)],
    }
