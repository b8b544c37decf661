"""The partial-sketch format: what a worker stores per upload and the analysis sums up.

A part is a safetensors body (the format of the uploads it is made from) holding one tensor
``sketch`` float32 ``[n, k]`` and the ``__metadata__`` entries

* ``sequence_ids``: a JSON list of the ``n`` row ids, in row order;
* ``rows``: ``"update"`` for update rows (math.md §4 "Update rows"), ``"entropy_sum"`` for the
  gradients of the sequences' entropy sums (math.md §3 "From the entropy sums"); absent for
  score rows.

The same two metadata entries name the rows of an upload body, which the API has validated
in full (:mod:`service.uploads`) before it was queued: :func:`read_rows` reads them from
either.  Nothing here is a client's fault any more, so a defect is a :class:`PartFormatError`
(stored data that is not what this service writes), not an HTTP problem.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as load_np
from safetensors.numpy import save as save_np

RowKind = Literal["score", "update", "entropy_sum"]
ROW_KINDS: tuple[RowKind, ...] = ("score", "update", "entropy_sum")


class PartFormatError(ValueError):
    """A stored part (or a queued upload's metadata) is not in the format above."""


@dataclass(frozen=True, slots=True)
class Part:
    """One upload's partial sketch: ``rows`` float32 ``[n, k]``, row ``i`` of ``ids[i]``;
    ``kind`` says which rows they are (:data:`RowKind`)."""

    ids: list[str]
    rows: np.ndarray
    kind: RowKind = "score"


def read_metadata(body: bytes | bytearray) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors body (its header only; the data is not read)."""
    if len(body) < 8:
        raise PartFormatError(f"{len(body)} bytes, shorter than a safetensors header")
    size = int.from_bytes(body[:8], "little")
    try:
        header = json.loads(body[8 : 8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PartFormatError(f"the safetensors header is not JSON ({exc})") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict):
        raise PartFormatError("the safetensors header has no __metadata__")
    return {str(k): str(v) for k, v in metadata.items()}


def read_rows(metadata: Mapping[str, str]) -> tuple[list[str], RowKind]:
    """``(sequence ids, row kind)`` from the ``sequence_ids`` and ``rows`` metadata."""
    try:
        ids = json.loads(metadata["sequence_ids"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise PartFormatError(f"no readable 'sequence_ids' metadata ({exc!r})") from None
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise PartFormatError("'sequence_ids' is not a JSON list of strings")
    kind = metadata.get("rows", "score")
    for known in ROW_KINDS:
        if kind == known:
            return ids, known
    raise PartFormatError(f"'rows' metadata {kind[:40]!r} is none of {list(ROW_KINDS)}")


def encode_part(part: Part) -> bytes:
    """The stored form of ``part`` (its rows as float32)."""
    rows = np.ascontiguousarray(part.rows, dtype=np.float32)
    if rows.ndim != 2 or rows.shape[0] != len(part.ids):
        raise PartFormatError(f"rows of shape {list(rows.shape)} for {len(part.ids)} ids")
    metadata = {"sequence_ids": json.dumps(part.ids)}
    if part.kind != "score":
        metadata["rows"] = part.kind
    return save_np({"sketch": rows}, metadata=metadata)


def decode_part(data: bytes) -> Part:
    """Inverse of :func:`encode_part`; ``rows`` is float32 ``[n, k]``."""
    ids, kind = read_rows(read_metadata(data))
    try:
        rows = load_np(data).get("sketch")
    except SafetensorError as exc:
        raise PartFormatError(f"not a safetensors body ({exc})") from None
    if rows is None or rows.dtype != np.float32 or rows.ndim != 2 or rows.shape[0] != len(ids):
        shape = None if rows is None else [rows.dtype.name, *rows.shape]
        raise PartFormatError(f"tensor 'sketch' {shape} does not hold {len(ids)} float32 rows")
    return Part(ids, rows, kind)
