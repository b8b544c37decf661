"""``/v1/runs``: create, list, read and delete runs."""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from fastapi import APIRouter, Response
from starlette.concurrency import run_in_threadpool

from service.analysis import step_status
from service.deps import RunDep, RunId, SettingsDep, StoreDep
from service.errors import ProblemError
from service.schemas import Run, RunCreate, RunDetail
from sketch.spec import sketcher_for

router = APIRouter(prefix="/v1/runs", tags=["runs"])

# Fields that define a run; a second POST with the same id must match them all.
_SPEC_FIELDS = (
    "sketch",
    "normalization",
    "geometry",
    "parameters",
    "ranks",
    "applied_includes_step",
)
# what a run stored before a field existed has
_STORED_DEFAULTS: dict[str, Any] = {"ranks": 1, "applied_includes_step": False}


def _sketch_width(run: dict[str, Any]) -> int:
    try:
        return int(sketcher_for(run["sketch"], run.get("parameters")).dim)
    except (ValueError, TypeError, KeyError) as exc:
        raise ProblemError(422, f"invalid sketch spec for these parameters: {exc}") from None


@router.post(
    "",
    status_code=201,
    response_model=Run,
    responses={200: {"model": Run, "description": "the same spec already exists"}, 409: {}},
)
async def create_run(
    body: RunCreate, store: StoreDep, settings: SettingsDep, response: Response
) -> dict[str, Any]:
    """Create a run: its sketch spec, normalisation, geometry and declared parameters.

    Posting the same spec again under the same id answers 200 with the stored run; another
    spec under an existing id is a 409.  A total sketch width above ``max_width`` is a 422.
    """
    run: dict[str, Any] = body.model_dump(mode="json")
    run["run_id"] = body.run_id or f"run-{secrets.token_hex(6)}"
    run["k"] = await run_in_threadpool(_sketch_width, run)
    if run["k"] > settings.max_width:
        raise ProblemError(
            422,
            f"the sketch is {run['k']} wide (summed over its groups; N for exact), above "
            f"KERNELSCOPE_MAX_WIDTH={settings.max_width}",
        )
    run["created_at"] = time.time()
    stored, created = await store.create_run(run)
    if not created:
        # compared as JSON text: the order of the declared parameters is part of the spec
        if any(
            json.dumps(stored.get(f, _STORED_DEFAULTS.get(f))) != json.dumps(run.get(f))
            for f in _SPEC_FIELDS
        ):
            raise ProblemError(
                409,
                f"run {run['run_id']!r} exists with another spec (a run's spec never changes)",
                existing=stored,
            )
        response.status_code = 200
    return stored


@router.get("", response_model=list[Run])
async def list_runs(store: StoreDep) -> list[dict[str, Any]]:
    """Every run, oldest first."""
    return await store.list_runs()


@router.get("/{run_id}", response_model=RunDetail)
async def get_run(run: RunDep, store: StoreDep) -> dict[str, Any]:
    """One run with the status of each of its steps."""
    steps = [await step_status(store, run, s) for s in await store.list_steps(run["run_id"])]
    return {**run, "steps": [s.model_dump(mode="json") for s in steps]}


@router.delete("/{run_id}", status_code=204, response_class=Response)
async def delete_run(run_id: RunId, store: StoreDep) -> Response:
    """Delete every key of the run (queued jobs of it are dropped by the workers)."""
    if not await store.delete_run(run_id):
        raise ProblemError(404, f"unknown run {run_id!r}")
    return Response(status_code=204)
