"""FastAPI dependencies, in one place: settings, store, auth, path parameters.

Every dependency is ``async def``, even those that only read ``app.state``: FastAPI runs a
plain ``def`` dependency in its thread pool, and an upload resolved four of them, four thread
hand-offs per request on the ingest path (``tests/service/test_fast_paths.py`` keeps it so).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Annotated, Any

from fastapi import Depends, Path, Request

from service.errors import ProblemError
from service.keys import ID_PATTERN
from service.settings import Settings
from service.store import Store
from service.worker import ReceiptSketcher

RunId = Annotated[str, Path(pattern=ID_PATTERN, description="run id, [A-Za-z0-9._:-]{1,128}")]
StepNo = Annotated[int, Path(ge=0, le=1 << 53, description="optimisation step, >= 0")]


async def get_settings(request: Request) -> Settings:
    """The app's settings (``app.state.settings``)."""
    settings: Settings = request.app.state.settings
    return settings


async def get_store(request: Request) -> Store:
    """The app's :class:`service.store.Store`."""
    store: Store = request.app.state.store
    return store


async def get_draining(request: Request) -> threading.Event:
    """Set once the server has begun to shut down (``app.state.draining``)."""
    draining: threading.Event = request.app.state.draining
    return draining


async def get_receipt_sketcher(request: Request) -> ReceiptSketcher | None:
    """The sketcher of uploads on receipt (``app.state.receipt_sketcher``): set where this
    process runs stream workers of its own, None where uploads go to the queue."""
    receipt: ReceiptSketcher | None = request.app.state.receipt_sketcher
    return receipt


SettingsDep = Annotated[Settings, Depends(get_settings)]
ReceiptSketcherDep = Annotated[ReceiptSketcher | None, Depends(get_receipt_sketcher)]
StoreDep = Annotated[Store, Depends(get_store)]
DrainingDep = Annotated[threading.Event, Depends(get_draining)]


async def get_run(run_id: RunId, store: StoreDep) -> dict[str, Any]:
    """The stored run, or a 404 problem."""
    run = await store.get_run(run_id)
    if run is None:
        raise ProblemError(404, f"unknown run {run_id!r}")
    return run


RunDep = Annotated[dict[str, Any], Depends(get_run)]


def check_sketch_memory(rows: int, run: Mapping[str, Any], settings: Settings) -> None:
    """422 when an upload of ``rows`` sequences would make a sketch larger than the limit.

    A worker allocates the upload's sketch ``[n, k]`` float32 (``n * k * 4`` bytes, ``k`` the
    run's width) on top of the body; the body limit bounds the body but not ``n * k`` (a
    small body of many one-entry rows on a run with ``k = 2^20`` would ask for gigabytes), so
    this is checked after validation and before anything is stored or queued.
    """
    need = int(rows) * int(run["k"]) * 4
    if need > settings.max_sketch_bytes:
        raise ProblemError(
            422,
            f"{rows} rows x k={run['k']} make a {need / 2**20:.0f} MiB sketch, over the limit "
            f"of {settings.max_sketch_mb:g} MiB (KERNELSCOPE_MAX_SKETCH_MB): send fewer rows "
            "per upload",
        )
