"""Upload bodies: streaming read with a byte limit, and complete safetensors validation.

Everything here runs before anything is stored: a body that fails any check is refused with
a problem (400 malformed, 413 too large, 415 wrong media type, 422 content that does not fit
the run) and leaves the store untouched.

safetensors layout (https://github.com/huggingface/safetensors): 8-byte little-endian header
length ``N``, ``N`` bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [b, e]},
"__metadata__": {str: str}}``, then the data buffer; offsets are relative to the buffer and
the tensors tile it without holes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
from starlette.requests import Request

from service.domain_errors import BusyError, InvalidUploadError
from service.keys import APPLIED_UPDATE_ID, ID_PATTERN, ID_RE
from service.parts import ROW_KINDS, RowKind
from sketch.base import parse_tensor_name

UPLOAD_MEDIA_TYPES = ("application/octet-stream", "application/x-safetensors")
ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2}
# Integer views and exponent masks: a float is NaN or Inf exactly when all exponent bits are 1.
_EXPONENT: dict[str, tuple[np.dtype[Any], int]] = {
    "F32": (np.dtype("<u4"), 0x7F800000),
    "F16": (np.dtype("<u2"), 0x7C00),
    "BF16": (np.dtype("<u2"), 0x7F80),
}
MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_OFFSET = 1 << 62  # keeps offset + index inside int64 for the hashing kinds
UploadKind = Literal["gradients", "sketches"]
#: An upload body: ``read_body`` hands out the bytearray it read into (no copy to ``bytes``).
Body = bytes | bytearray
#: Values checked per pass of :func:`check_finite`: its scratch buffers stay this small (and in
#: cache) instead of two temporaries the size of the whole tensor.
FINITE_CHECK_BLOCK = 1 << 18


def check_media_type(content_type: str | None) -> None:
    """415 unless the body is declared as safetensors bytes."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media not in UPLOAD_MEDIA_TYPES:
        raise InvalidUploadError(
            415,
            f"content type {media or '(none)'!r} not accepted: send the safetensors body as "
            f"{' or '.join(UPLOAD_MEDIA_TYPES)}",
        )


class UploadBudget:
    """The bytes of upload bodies the API holds at once (``KERNELSCOPE_MAX_UPLOADS_MB``).

    Each upload takes its bytes from the budget before they are held (its declared length up
    front, a chunked body chunk by chunk) and gives them back once it is stored or refused; an
    upload that would pass the bound is a 503 with ``Retry-After``, so concurrent uploads
    cannot exhaust the API's memory.  One event loop owns it: no lock is needed.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    @contextlib.contextmanager
    def hold(self) -> Iterator[Callable[[int], None]]:
        """``take(n)`` for one upload; everything it took is given back on exit."""
        taken = 0

        def take(n: int) -> None:
            nonlocal taken
            if self.used + n > self.limit:
                raise BusyError(
                    f"uploads in flight would hold more than {self.limit} bytes "
                    "(KERNELSCOPE_MAX_UPLOADS_MB); retry"
                )
            self.used += n
            taken += n

        try:
            yield take
        finally:
            self.used -= taken


async def read_body(
    request: Request,
    limit: int,
    digest: Digest | None = None,
    take: Callable[[int], None] | None = None,
) -> bytearray:
    """Read the request body as a stream into one buffer, refusing (413) past ``limit`` bytes.

    The buffer grows as bytes arrive (a declared length that is never sent costs nothing; a
    large bytearray grows in place, without copies), the limit is enforced on the declared
    length and on the bytes received, and a body that does not match its declared length is
    refused (400).  ``take``, when given, is charged the declared length before anything is
    read, or each chunk of a chunked body (:class:`UploadBudget`).  ``digest``, when given, is
    fed every chunk (:func:`upload_hash`).
    """
    too_large = InvalidUploadError(
        413, f"body exceeds the limit of {limit} bytes (KERNELSCOPE_MAX_BODY_MB)"
    )
    declared = request.headers.get("content-length")
    size: int | None = None
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise InvalidUploadError(400, f"bad Content-Length {declared[:40]!r}") from None
        if size < 0:
            raise InvalidUploadError(400, f"bad Content-Length {declared[:40]!r}")
        if size > limit:
            raise too_large
        if take is not None:
            take(size)
    buf = bytearray()
    async for chunk in request.stream():
        if size is None and take is not None:
            take(len(chunk))
        buf += chunk
        if size is None and len(buf) > limit:
            raise too_large
        if size is not None and len(buf) > size:
            raise InvalidUploadError(400, f"body longer than its Content-Length of {size} bytes")
        if digest is not None:
            digest.update(chunk)
    if size is not None and len(buf) != size:
        raise InvalidUploadError(400, f"body of {len(buf)} bytes, Content-Length says {size}")
    return buf


class Digest(Protocol):
    """A running hash (``hashlib.sha256()``): fed chunk by chunk."""

    def update(self, data: bytes | bytearray, /) -> None: ...

    def hexdigest(self) -> str: ...


def upload_hash(kind: UploadKind, idempotency_key: str | None) -> Digest:
    """The running hash that names an upload (see :func:`upload_id_for`), fed with the key.

    Without a key the body is still to be fed: :func:`read_body` does it chunk by chunk as
    the body arrives, so the hash overlaps the transfer instead of being a second pass over
    the whole body afterwards (and no step of it blocks the event loop for more than a chunk).
    """
    h = hashlib.sha256(kind.encode() + b"\0")
    if idempotency_key is not None:
        h.update(b"key\0" + idempotency_key.encode())
    else:
        h.update(b"body\0")
    return h


def upload_id_from(digest: Digest) -> str:
    """The upload id of a fed :func:`upload_hash`: ``u`` + 40 hex digits."""
    return "u" + digest.hexdigest()[:40]


def upload_id_for(kind: UploadKind, body: Body, idempotency_key: str | None) -> str:
    """The upload's id: a hash of the ``Idempotency-Key`` header when given, else of the body.

    Hashing keeps the id inside the key alphabet whatever the header holds; the kind is mixed
    in so that a gradient and a sketch upload never collide.
    """
    h = upload_hash(kind, idempotency_key)
    if idempotency_key is None:
        h.update(body)
    return upload_id_from(h)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor entry of a safetensors header; ``start``/``end`` are absolute byte offsets."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class ParsedUpload:
    """A validated upload: its sequence ids (the row order) and tensor entries."""

    ids: list[str]
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]

    @property
    def rows(self) -> int:
        """``n``, the number of rows (sequence ids)."""
        return len(self.ids)


def _bad(detail: str) -> InvalidUploadError:
    return InvalidUploadError(400, f"malformed safetensors body: {detail}")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object that names a key twice is ambiguous (json keeps the last): refuse it."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _bad(f"header names {key!r} twice (duplicate keys)")
        out[key] = value
    return out


def read_header(body: Body) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and check the safetensors framing: header, dtypes, shapes, offsets.

    Returns ``(tensors, metadata)``; raises a 400/422 problem on any defect.
    """
    if len(body) < 8:
        raise _bad(f"{len(body)} bytes, shorter than the 8-byte header length")
    header_len = int.from_bytes(body[:8], "little")
    if header_len < 2 or header_len > min(len(body) - 8, MAX_HEADER_BYTES):
        raise _bad(f"header length {header_len} does not fit a body of {len(body)} bytes")
    try:
        header = json.loads(body[8 : 8 + header_len], object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(f"header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _bad("header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _bad("__metadata__ must map strings to strings")
    data_start = 8 + header_len
    data_len = len(body) - data_start
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise _bad(f"tensor {name!r}: entry needs exactly dtype, shape, data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in ITEMSIZE:
            raise InvalidUploadError(
                422, f"tensor {name!r}: dtype {dtype!r} not accepted (F32, F16 or BF16)"
            )
        if not isinstance(shape, list) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
        ):
            raise _bad(f"tensor {name!r}: shape must be a list of non-negative integers")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_len
        ):
            raise _bad(f"tensor {name!r}: data_offsets {offsets!r} outside the data buffer")
        nbytes = math.prod(shape) * ITEMSIZE[dtype]
        if offsets[1] - offsets[0] != nbytes:
            raise _bad(f"tensor {name!r}: {offsets[1] - offsets[0]} bytes for shape {shape}")
        tensors[name] = TensorInfo(
            name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1]
        )
    # The tensors must tile the buffer exactly: no holes, no overlaps, nothing trailing.
    position = data_start
    for info in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        if info.start != position:
            raise _bad(f"tensor {info.name!r}: data does not follow the previous tensor")
        position = info.end
    if position != len(body):
        raise _bad(f"{len(body) - position} bytes after the last tensor")
    return tensors, metadata


def sequence_ids(metadata: Mapping[str, str]) -> list[str]:
    """The ``sequence_ids`` metadata entry: a JSON list of unique, valid ids (the rows)."""
    if "sequence_ids" not in metadata:
        raise InvalidUploadError(
            422, "__metadata__ needs 'sequence_ids': a JSON list of the row ids"
        )
    try:
        ids = json.loads(metadata["sequence_ids"])
    except json.JSONDecodeError:
        raise InvalidUploadError(422, "__metadata__ 'sequence_ids' is not JSON") from None
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        raise InvalidUploadError(422, "'sequence_ids' must be a non-empty JSON list of strings")
    bad = [i for i in ids if not ID_RE.fullmatch(i)]
    if bad:
        raise InvalidUploadError(422, f"invalid sequence ids {bad[:5]!r}: expected {ID_PATTERN}")
    if len(set(ids)) != len(ids):
        raise InvalidUploadError(422, "'sequence_ids' contains duplicates")
    return ids


def row_kind(metadata: Mapping[str, str]) -> RowKind:
    """The ``rows`` metadata entry: ``score`` (absent), ``update`` (the update rows ``u_i`` of a
    loss built from token log-probs, math.md §4) or ``entropy_sum`` (the gradients of the
    sequences' entropy sums, math.md §3); 422 otherwise."""
    value = metadata.get("rows", "score")
    for known in ROW_KINDS:
        if value == known:
            return known
    raise InvalidUploadError(
        422, f"__metadata__ 'rows' must be one of {list(ROW_KINDS)}, got {value[:40]!r}"
    )


def check_finite(body: Body, tensors: Mapping[str, TensorInfo]) -> None:
    """422 naming the first tensor that holds a NaN or an Inf.

    Integer exponent test on views of the body (a float is NaN or Inf exactly when all its
    exponent bits are 1): no float conversion and no copy of the data, and the only
    temporaries are two scratch buffers of ``FINITE_CHECK_BLOCK`` values reused per block.
    """
    scratch: dict[np.dtype[Any], tuple[np.ndarray, np.ndarray]] = {}
    for info in tensors.values():
        view, mask = _EXPONENT[info.dtype]
        bits = np.frombuffer(
            body, dtype=view, count=(info.end - info.start) // view.itemsize, offset=info.start
        )
        if view not in scratch:
            block = min(FINITE_CHECK_BLOCK, max(bits.size, 1))
            scratch[view] = (np.empty(block, dtype=view), np.empty(block, dtype=bool))
        masked, hit = scratch[view]
        for b0 in range(0, bits.size, masked.size):
            chunk = bits[b0 : b0 + masked.size]
            m, h = masked[: chunk.size], hit[: chunk.size]
            np.bitwise_and(chunk, mask, out=m)
            np.equal(m, mask, out=h)
            if h.any():
                bad = b0 + np.flatnonzero(h)
                bad_total = int(np.count_nonzero((bits & mask) == mask))  # error path only
                raise InvalidUploadError(
                    422,
                    f"tensor {info.name!r} holds NaN or Inf ({bad_total} values, first at "
                    f"flat index {int(bad[0])})",
                    tensor=info.name,
                )


def _check_gradient_shapes(
    tensors: Mapping[str, TensorInfo], n: int, parameters: Mapping[str, Sequence[int]] | None
) -> None:
    for key, info in tensors.items():
        name, offset = parse_tensor_name(key)
        sliced = key != name
        if sliced and len(info.shape) != 2:
            raise InvalidUploadError(422, f"tensor {key!r}: a slice 'param@offset' must be [n, d]")
        if offset >= MAX_OFFSET:
            raise InvalidUploadError(422, f"tensor {key!r}: offset {offset} too large")
        if math.prod(info.shape[1:]) == 0:
            raise InvalidUploadError(422, f"tensor {key!r}: empty rows (shape {list(info.shape)})")
        if parameters is None:
            continue
        if name not in parameters:
            raise InvalidUploadError(
                422, f"tensor {key!r}: unknown parameter {name!r} (not in the run's parameters)"
            )
        declared = tuple(int(s) for s in parameters[name])
        numel = math.prod(declared)
        rest = info.shape[1:]
        if sliced:
            if offset + rest[0] > numel:
                raise InvalidUploadError(
                    422,
                    f"tensor {key!r}: slice {offset}..{offset + rest[0]} exceeds the "
                    f"{numel} entries of {name!r} {list(declared)}",
                )
        elif rest != declared and rest != (numel,) and not (numel == 1 and rest == ()):
            raise InvalidUploadError(
                422,
                f"tensor {key!r}: shape {list(info.shape)} fits neither [n, *{list(declared)}] "
                f"nor [n, {numel}]",
            )


def validate_upload(body: Body, kind: UploadKind, run: Mapping[str, Any]) -> ParsedUpload:
    """Validate a gradient or sketch upload against the run completely (CPU, O(body)).

    * framing, dtypes (F32/F16/BF16), offsets: :func:`read_header`;
    * ``sequence_ids`` metadata: ``n`` unique valid ids, every tensor ``[n, ...]``; ``rows``
      metadata (optional): ``score``, ``update`` or ``entropy_sum`` (:func:`row_kind`);
    * gradients: names ``param`` / ``param@offset`` that fit the declared ``parameters``
      (``[n, *shape]`` or ``[n, numel]``; a slice ``[n, d]`` with ``offset + d <= numel``);
    * sketches: exactly one tensor ``sketch`` ``[n, k]`` with ``k`` the run's width;
    * every value finite.
    """
    tensors, metadata = read_header(body)
    if not tensors:
        raise InvalidUploadError(422, "the upload holds no tensors")
    ids = sequence_ids(metadata)
    rows = row_kind(metadata)
    if rows != "score" and APPLIED_UPDATE_ID in ids:
        raise InvalidUploadError(
            422, f"{APPLIED_UPDATE_ID!r} is a score-kind row: it cannot be sent as {rows} rows"
        )
    n = len(ids)
    for key, info in tensors.items():
        if not info.shape or info.shape[0] != n:
            raise InvalidUploadError(
                422,
                f"tensor {key!r}: shape {list(info.shape)} has "
                f"{info.shape[0] if info.shape else 0} rows, but sequence_ids lists {n}",
            )
    if kind == "sketches":
        if set(tensors) != {"sketch"}:
            raise InvalidUploadError(
                422, f"a sketch upload holds exactly one tensor 'sketch', got {sorted(tensors)}"
            )
        shape = tensors["sketch"].shape
        if len(shape) != 2 or shape[1] != int(run["k"]):
            raise InvalidUploadError(
                422,
                f"tensor 'sketch': shape {list(shape)}, expected [n, {run['k']}] (the run's "
                f"sketch width k)",
            )
    else:
        _check_gradient_shapes(tensors, n, run.get("parameters"))
    check_finite(body, tensors)
    return ParsedUpload(ids=ids, tensors=tensors, metadata=metadata)
