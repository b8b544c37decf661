"""Gradient and sketch uploads: streamed safetensors bodies, validated, then sketched on
receipt (201) where this process runs workers of its own, else queued (202)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any

import anyio.to_thread
from fastapi import APIRouter, Depends, Header, Request, Response

from service.deps import (
    ReceiptSketcherDep,
    RunDep,
    SettingsDep,
    StepNo,
    StoreDep,
    check_sketch_memory,
)
from service.domain_errors import BusyError, InvalidUploadError
from service.errors import ProblemError
from service.metrics import record_rows_sketched, record_upload, upload_outcome
from service.schemas import UploadAccepted
from service.store import Store
from service.uploads import (
    UploadBudget,
    UploadKind,
    check_media_type,
    read_body,
    upload_hash,
    upload_id_from,
    validate_upload,
)
from service.worker import ReceiptSketcher

router = APIRouter(prefix="/v1/runs/{run_id}/steps", tags=["uploads"])

_BODY_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "application/x-safetensors": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
_SKETCHED_DOC = {
    "description": "Stored and sketched on receipt (the API runs workers of its own): the "
    "step counts the rows at once, nothing is queued. 202: stored and queued for a worker.",
    "model": UploadAccepted,
}
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        max_length=256,
        description="Names the upload: a re-send with the same key is a no-op.",
    ),
]


@dataclass(frozen=True)
class UploadRequest:
    """What both upload routes take: the request (its body is streamed), the answer (its
    status is set), the run and step, and where the upload goes."""

    request: Request
    response: Response
    run: dict[str, Any]
    step: int
    store: Store
    receipt: ReceiptSketcher | None
    limit: int


async def upload_request(
    request: Request,
    response: Response,
    run: RunDep,
    step: StepNo,
    store: StoreDep,
    receipt: ReceiptSketcherDep,
    settings: SettingsDep,
) -> UploadRequest:
    return UploadRequest(request, response, run, step, store, receipt, settings.max_body_bytes)


UploadDep = Annotated[UploadRequest, Depends(upload_request)]


async def _accept(
    kind: UploadKind, upload: UploadRequest, idempotency_key: str | None
) -> dict[str, Any]:
    request, response, run, step = upload.request, upload.response, upload.run, upload.step
    store, receipt, limit = upload.store, upload.receipt, upload.limit
    body = bytearray()
    budget: UploadBudget = request.app.state.upload_budget
    with budget.hold() as take:  # the body's bytes count until it is stored or refused
        try:
            check_media_type(request.headers.get("content-type"))
            # The id hashes the body (without an Idempotency-Key) chunk by chunk as it arrives.
            digest = upload_hash(kind, idempotency_key)
            body = await read_body(
                request, limit, digest if idempotency_key is None else None, take
            )
            # Parsing and the finiteness scan are O(body) CPU: off the event loop.
            parsed = await anyio.to_thread.run_sync(validate_upload, body, kind, run)
            check_sketch_memory(parsed.rows, run, request.app.state.settings)
        except (InvalidUploadError, BusyError, ProblemError) as exc:
            # an unread body (415, 413, 503) is counted by its declared length
            declared = request.headers.get("content-length", "")
            nbytes = len(body) or (int(declared) if declared.isdigit() else 0)
            status = 503 if isinstance(exc, BusyError) else exc.status
            record_upload(upload_outcome(status), nbytes, 0, kind)
            raise
        upload_id = upload_id_from(digest)
        # the body, held in the budget, is sketched in place where this process can
        sketch = None if receipt is None else partial(receipt.sketch, body, parsed, kind, run)
        stored = await store.accept_upload(
            run["run_id"], step, upload_id, kind, parsed.ids, body, sketch
        )
    # a re-sent upload (same id) is harmless and stores nothing: count it apart
    outcome = "duplicate" if not stored.new else "sketched" if stored.sketched else "accepted"
    record_upload(outcome, len(body), parsed.rows, kind)
    if outcome == "sketched":
        record_rows_sketched(parsed.rows)
    response.status_code = 201 if stored.sketched else 202
    # "queued" keeps its contract meaning, false only for a re-send, on both paths
    return {"upload_id": upload_id, "rows": parsed.rows, "queued": stored.new}


@router.post(
    "/{step}/gradients",
    status_code=202,
    response_model=UploadAccepted,
    openapi_extra=_BODY_DOC,
    responses={201: _SKETCHED_DOC, 400: {}, 413: {}, 415: {}, 422: {}},
)
async def post_gradients(
    upload: UploadDep, idempotency_key: IdempotencyKey = None
) -> dict[str, Any]:
    """Per-sequence gradients (raw rows) as safetensors: tensors ``param`` ``[n, *shape]`` /
    ``[n, numel]`` or ``param@offset`` ``[n, d]``; ``__metadata__`` ``sequence_ids``."""
    return await _accept("gradients", upload, idempotency_key)


@router.post(
    "/{step}/sketches",
    status_code=202,
    response_model=UploadAccepted,
    openapi_extra=_BODY_DOC,
    responses={201: _SKETCHED_DOC, 400: {}, 413: {}, 415: {}, 422: {}},
)
async def post_sketches(
    upload: UploadDep, idempotency_key: IdempotencyKey = None
) -> dict[str, Any]:
    """Client-made sketches: one tensor ``sketch`` ``[n, k]`` made with the run's spec."""
    return await _accept("sketches", upload, idempotency_key)
