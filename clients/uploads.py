"""Upload planning: a step's rows cut into uploads that each fit the server's body limit.

Pure (no I/O).  Big gradients are split first by parameter, then by flat slices
``name@offset`` (math.md §7: partial sketches add up, so any split gives the same rows), and by
rows when even one column of all rows is too big.  Each upload gets a deterministic
``Idempotency-Key``: a hash of the run, step, kind, sequence ids and the tensor names/shapes of
that slice, so a retried upload is stored once (``clients.http`` sends them).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import safetensors.torch
import torch

from sketch.names import parse_tensor_name, slice_name

UploadKind = Literal["gradients", "sketches"]
#: Score rows ``w_i = dS_i/dtheta``, update rows ``u_i`` of the step (math.md §4 "Update rows")
#: or the gradients ``z_i`` of the sequences' entropy sums (math.md §3 "From the entropy sums").
RowKind = Literal["score", "update", "entropy_sum"]
_DTYPES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}


@dataclass(frozen=True)
class PlannedUpload:
    """One upload: tensors ``{name or name@offset: [rows, d] view}`` and their sequence ids."""

    kind: UploadKind
    tensors: dict[str, torch.Tensor]
    sequence_ids: list[str]
    key: str
    dtype: torch.dtype
    rows: RowKind = "score"

    @property
    def data_bytes(self) -> int:
        """Bytes of tensor data (the body adds a small header)."""
        return sum(t.numel() for t in self.tensors.values()) * _DTYPES[self.dtype]

    def body(self) -> bytes:
        """The safetensors body (built on demand so only one upload is in memory at a time)."""
        tensors = {
            k: v.detach().to(device="cpu", dtype=self.dtype).contiguous().clone()
            for k, v in self.tensors.items()
        }
        metadata = {"sequence_ids": json.dumps(self.sequence_ids)}
        if self.rows != "score":
            metadata["rows"] = self.rows
        return safetensors.torch.save(tensors, metadata=metadata)


def idempotency_key(
    kind: str,
    run_id: str,
    step: int,
    sequence_ids: Sequence[str],
    tensors: Mapping[str, Sequence[int]],
    salt: str = "",
) -> str:
    """``ks-`` + 40 hex digits of SHA-256 over run, step, kind, ids, tensor names/shapes, salt."""
    doc = json.dumps(
        [
            kind,
            run_id,
            int(step),
            list(sequence_ids),
            sorted((k, list(s)) for k, s in tensors.items()),
            salt,
        ],
        separators=(",", ":"),
    )
    return "ks-" + hashlib.sha256(doc.encode()).hexdigest()[:40]


def _header_bytes(sequence_ids: Sequence[str], names: Iterable[str]) -> int:
    """A generous bound on the safetensors header size for these ids and tensor names."""
    ids_json = json.dumps(json.dumps(list(sequence_ids)))  # metadata is a JSON string in JSON
    per_tensor = sum(len(json.dumps(n)) + 96 for n in names)
    return 8 + len(ids_json) + per_tensor + 256


def plan_uploads(
    kind: UploadKind,
    run_id: str,
    step: int,
    tensors: Mapping[str, torch.Tensor],
    sequence_ids: Sequence[str],
    max_body_bytes: int,
    dtype: torch.dtype = torch.float32,
    salt: str = "",
    row_kind: RowKind = "score",
) -> list[PlannedUpload]:
    """Split named row tensors ``{name: [n, ...]}`` into uploads of at most ``max_body_bytes``.

    ``row_kind``: ``score`` rows ``w_i``, ``update`` rows ``u_i`` (math.md §4 "Update rows") or
    ``entropy_sum`` rows ``z_i`` (math.md §3): the ``rows`` metadata entry, and part of each
    upload's ``Idempotency-Key``.

    Whole parameters are packed together while they fit; a parameter too big for one upload is
    cut into flat column slices ``name@offset`` (an input already named ``name@offset`` keeps
    its offset); when a single column of all ``n`` rows does not fit, the rows are split too.
    The union of the uploads is exactly the input, each value once.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    ids = [str(i) for i in sequence_ids]
    n = len(ids)
    if n == 0:
        raise ValueError("no sequence ids")
    if len(set(ids)) != n:
        raise ValueError("sequence ids must be unique within an upload")
    if not tensors:
        raise ValueError("nothing to upload")
    flat: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if t.ndim < 1 or t.shape[0] != n:
            raise ValueError(f"tensor {name!r}: first dimension {tuple(t.shape)[:1]} != {n} ids")
        if not t.is_floating_point():
            raise TypeError(f"tensor {name!r} is not a float tensor")
        flat[name] = t.detach().reshape(n, -1)
    item = _DTYPES[dtype]
    key_salt = salt if row_kind == "score" else f"{salt}|rows={row_kind}"
    longest_name = max(len(k) for k in flat) + 24
    # Rows per upload: one column of every row plus the header must fit.
    rows_per = n
    while rows_per > 1:
        chunk_ids = ids[:rows_per]
        if _header_bytes(chunk_ids, ["x" * longest_name]) + rows_per * item <= max_body_bytes:
            break
        rows_per = (rows_per + 1) // 2
    if _header_bytes(ids[:1], ["x" * longest_name]) + item > max_body_bytes:
        raise ValueError(f"max_body_bytes={max_body_bytes} cannot hold even one value")

    plans: list[PlannedUpload] = []
    for r0 in range(0, n, rows_per):
        r_ids = ids[r0 : r0 + rows_per]
        rows = len(r_ids)
        current: dict[str, torch.Tensor] = {}

        def flush(current: dict[str, torch.Tensor] = current, r_ids: list[str] = r_ids) -> None:
            if current:
                shapes = {k: list(v.shape) for k, v in current.items()}
                key = idempotency_key(kind, run_id, step, r_ids, shapes, key_salt)
                plans.append(PlannedUpload(kind, dict(current), list(r_ids), key, dtype, row_kind))
                current.clear()

        def used(current: dict[str, torch.Tensor] = current, r_ids: list[str] = r_ids) -> int:
            return _header_bytes(r_ids, [*list(current), "x" * longest_name]) + sum(
                v.numel() * item for v in current.values()
            )

        for name, values in flat.items():
            block = values[r0 : r0 + rows]
            size = block.numel() * item
            if used() + size <= max_body_bytes:
                current[name] = block
                continue
            flush()
            if used() + size <= max_body_bytes:
                current[name] = block
                continue
            base, offset = parse_tensor_name(name)
            width = block.shape[1]
            cols = max(1, (max_body_bytes - used()) // (rows * item))
            for c0 in range(0, width, cols):
                piece = block[:, c0 : c0 + cols]
                if used() + piece.numel() * item > max_body_bytes:
                    flush()
                current[slice_name(base, offset + c0)] = piece
                if piece.shape[1] == cols:
                    flush()
        flush()
    return plans


def plan_sketch_uploads(
    run_id: str,
    step: int,
    sketch: torch.Tensor,
    sequence_ids: Sequence[str],
    max_body_bytes: int,
    key_salt: str = "",
    row_kind: RowKind = "score",
) -> list[PlannedUpload]:
    """:func:`plan_uploads` for a client sketch ``[n, k]``: split by rows only (a sketch row
    cannot be sliced by columns)."""
    plans = plan_uploads(
        "sketches",
        run_id,
        step,
        {"sketch": sketch},
        sequence_ids,
        max_body_bytes,
        torch.float32,
        key_salt,
        row_kind,
    )
    if any(list(p.tensors) != ["sketch"] for p in plans):
        raise ValueError("a sketch row is larger than max_body_bytes")
    return plans
