"""``/v1/runs/{run_id}/steps/{step}``: sequence metadata, realized entropies, step status,
deletion."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response

from service import analysis as an
from service.deps import RunDep, StepNo, StoreDep
from service.errors import ProblemError
from service.schemas import RealizedIn, RealizedRecorded, SequencesIn, SequencesOut, StepStatus

router = APIRouter(prefix="/v1/runs/{run_id}/steps", tags=["steps"])


@router.post("/{step}/sequences", response_model=SequencesOut)
async def post_sequences(
    run: RunDep, step: StepNo, body: SequencesIn, store: StoreDep
) -> dict[str, Any]:
    """Upsert the step's sequence metadata by id, set its learning rate (math.md §1) and
    record that the pushing rank has reported (a run of several ranks needs ``rank``)."""
    ranks = int(run.get("ranks", 1))
    if body.rank is None and ranks > 1:
        raise ProblemError(
            422, f"run {run['run_id']!r} has {ranks} ranks: every sequences push needs its rank"
        )
    rank = body.rank or 0
    if rank >= ranks:
        raise ProblemError(422, f"rank {rank} out of range: run {run['run_id']!r} has {ranks}")
    total = await store.upsert_sequences(
        run["run_id"],
        step,
        body.learning_rate,
        body.max_length,
        [s.model_dump(mode="json") for s in body.sequences],
        rank=rank,
    )
    return {
        "run_id": run["run_id"],
        "step": step,
        "upserted": len(body.sequences),
        "sequences": total,
    }


@router.delete("/{step}", status_code=204, response_class=Response)
async def delete_step(run: RunDep, step: StepNo, store: StoreDep) -> Response:
    """Delete everything stored for one step: its sequences, rows, uploads, realized
    entropies, token shares and entropy summaries (a trainer that resumes from a checkpoint
    replaces the steps an earlier attempt pushed after it).  404 if the step has no data."""
    if not await store.delete_step(run["run_id"], step):
        raise ProblemError(404, f"run {run['run_id']!r} has no step {step}")
    return Response(status_code=204)


@router.post("/{step}/realized", response_model=RealizedRecorded)
async def post_realized(
    run: RunDep, step: StepNo, body: RealizedIn, store: StoreDep
) -> RealizedRecorded:
    """Record the trainer's measured entropy before and after the step (math.md §6)."""
    await store.set_realized(run["run_id"], step, body.entropy_before, body.entropy_after)
    return RealizedRecorded(run_id=run["run_id"], step=step, **body.model_dump())


@router.get("/{step}", response_model=StepStatus)
async def get_step(run: RunDep, step: StepNo, store: StoreDep) -> StepStatus:
    """``pending`` while uploads are queued, nothing is sketched yet or a rank has not posted
    its sequences; ``failed`` when an upload was dead-lettered (``errors`` says why); else
    ``ready``."""
    return await an.step_status(store, run, step)
