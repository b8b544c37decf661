"""Analysis of a step: assemble its sketch matrix from the stored parts and call ``sketch/``.

The matrix ``Y`` (float64 ``[n, k]``, rows in the step's sequence order) is the sum of the
partial sketches of every sketched upload, per sequence id (math.md §7: partial sketches add
up).  ``K = Y Y^T`` is the Fisher kernel.  Everything CPU-heavy here is synchronous and is run
by the routes in a worker thread (``run_in_threadpool``) so that the event loop stays free.

Results are cached in Redis under the step's data version (see :mod:`service.store`), so a
repeated query is a hash lookup and any new part or metadata invalidates it.  The assembled
matrix and what is derived from it (the kernel, the eigenvalues) are kept in this process
(:class:`MatrixMemo`), so the routes of one step share one kernel per version.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import secrets
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import orjson
from pydantic import TypeAdapter, ValidationError
from starlette.concurrency import run_in_threadpool

from service.domain_errors import (
    CannotAnalyseError,
    InvalidUploadError,
    NotFoundError,
    ShuttingDownError,
    StepIncompleteError,
    StepNotReadyError,
    TooLargeError,
)
from service.keys import APPLIED_UPDATE_ID
from service.parts import decode_part
from service.schemas import (
    BlocksOut,
    CovarianceOut,
    DiagonalEntry,
    EntropyOut,
    RunEntropyOut,
    RunEntropyRow,
    SpectrumOut,
    StepStatus,
    TokenSequenceTotal,
    TokenShareOut,
    TokensIn,
    TokensOut,
    TokensRecorded,
)
from service.settings import Settings
from service.store import StepCounts, StepSnapshot, Store, TokenMetaConflictError
from sketch.base import Sketcher
from sketch.blocks import block_statistics
from sketch.entropy import (
    Estimator,
    SketchCells,
    entropy_change,
    row_updates,
    update_coefficients,
    update_row_matrix,
)
from sketch.groups import GroupedSketcher
from sketch.kernel import cosine, kernel_from_rows
from sketch.kronecker import KroneckerSketch
from sketch.rao_blackwell import EntropyGradient, EntropySumKernels
from sketch.sequences import StepSequences
from sketch.spec import sketcher_for
from sketch.spectrum import Spectrum, spectrum
from sketch.token_covariance import CovarianceOptions, compare_covariance, covariance_scores
from sketch.token_mean import Target

#: Bumped whenever an analysis answer gains or changes fields: cached answers and history rows
#: of an older revision are recomputed instead of served (their data version alone would not
#: change across an upgrade).
ANALYSIS_REVISION = 9
SPECTRUM_HEAD = 8


@dataclass
class StepMatrix:
    """A step's assembled data at one version.

    ``Y``: float64 ``[n, k]``, row ``i`` the summed sketch of ``seqs.ids[i]``; ``applied``:
    float64 ``[k]`` sketch of the applied update ``u`` (id ``__applied_update__``) or None;
    ``U``: float64 ``[n, k]`` summed update rows (math.md §4 "Update rows"), valid where
    ``has_update``, or None when the step has none; ``Z``: float64 ``[n, k]`` summed rows of the
    entropy sums' gradients (math.md §3 "From the entropy sums"), valid where ``has_z``, or None.

    Derived values (the kernel, the eigenvalues per role) are computed at most once per
    matrix, i.e. per data version, and shared by all routes (:meth:`kernel`,
    :meth:`eigen_summary`); they are read-only arrays.
    """

    version: int
    seqs: StepSequences
    Y: np.ndarray
    applied: np.ndarray | None
    learning_rate: float
    max_length: int | None
    entropy_before: float | None
    entropy_after: float | None
    U: np.ndarray | None = None
    has_update: np.ndarray | None = None
    Z: np.ndarray | None = None
    has_z: np.ndarray | None = None
    #: ``Settings.eigen_blas_threads``: the BLAS threads of its eigen-decompositions.
    eigen_blas_threads: int = 1
    _derived: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    # Routes run in threadpool threads: two requests must not both build the same value.  One
    # lock per value, so that a long eigen-decomposition does not hold up the blocks' kernel.
    _locks: dict[str, threading.Lock] = field(default_factory=dict, repr=False, compare=False)
    _locks_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def role_rows(self, role: str) -> np.ndarray:
        """Row indices of ``role`` (``update``, ``entropy`` or ``all``), in step order."""
        if role == "all":
            return np.arange(self.seqs.n)
        return np.flatnonzero(self.seqs.role_mask(role))

    def _once(self, key: str, make: Callable[[], Any]) -> Any:
        with self._locks_lock:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            if key not in self._derived:
                self._derived[key] = make()
            return self._derived[key]

    def kernel(self, role: str) -> tuple[np.ndarray, np.ndarray]:
        """``(rows, K)``: the role's row indices and ``K = Y Y^T`` over them (float64
        ``[r, r]``, read-only).  ``Y Y^T`` of all rows is formed once; a role's kernel is its
        sub-matrix (an entry ``<y_i, y_j>`` does not depend on the other rows)."""
        rows = self.role_rows(role)
        if rows.size == 0:
            raise CannotAnalyseError(f"the step has no {role!r} sequences")

        def full() -> np.ndarray:
            K = kernel_from_rows(self.Y)
            K.flags.writeable = False  # shared by every route: nobody may change it
            return K

        K_all = self._once("kernel", full)
        if rows.size == self.seqs.n:
            return rows, K_all

        def sub() -> np.ndarray:
            K = K_all[np.ix_(rows, rows)]
            K.flags.writeable = False
            return K

        return rows, self._once(f"kernel|{role}", sub)

    def eigen_summary(self, role: str) -> Spectrum:
        """The role's spectrum without eigenvectors (eigenvalues, trace, effective rank,
        participation ratio), computed once; see :func:`role_spectrum`."""
        summary: Spectrum = self._once(f"spectrum|{role}", lambda: role_spectrum(self, role, 0))
        return summary


# The BLAS thread count is process-wide: the lock keeps concurrent eigen-decompositions from
# restoring each other's limits out of order (which could leave it at 1 for good).
_EIGEN_LOCK = threading.Lock()
try:
    from threadpoolctl import ThreadpoolController

    _BLAS: ThreadpoolController | None = ThreadpoolController()
except ImportError:  # optional: without it LAPACK keeps its default thread count
    _BLAS = None


def role_spectrum(m: StepMatrix, role: str, top: int) -> Spectrum:
    """``sketch.spectrum.spectrum`` of the role's kernel with ``top`` eigenvectors.

    ``k < n``: the SVD of the role's rows of ``Y`` (singular values only when ``top == 0``);
    ``k >= n``: the eigenvalues of the cached kernel (``eigvalsh``; a full ``eigh`` only when
    ``top > 0``).  LAPACK runs on ``m.eigen_blas_threads`` threads: the reduction to
    tridiagonal form is memory-bound and synchronises its threads at every column (measured
    on a shared 2-core host, ``eigvalsh`` of a 2048 x 2048 kernel took 0.24 s with 2 threads
    and 0.4 s with 1 when idle, but 16-26 s with 2 threads whenever another process held a
    core).
    """
    rows = m.role_rows(role)
    if rows.size == 0:
        raise CannotAnalyseError(f"the step has no {role!r} sequences")
    Y = m.Y if rows.size == m.seqs.n else m.Y[rows]
    K = m.kernel(role)[1] if Y.shape[1] >= Y.shape[0] else None
    with _EIGEN_LOCK:
        if _BLAS is None:
            return spectrum(Y=Y, K=K, top=min(top, int(rows.size)))
        with _BLAS.limit(limits=m.eigen_blas_threads, user_api="blas"):
            return spectrum(Y=Y, K=K, top=min(top, int(rows.size)))


class MatrixMemo:
    """The last ``size`` (``Settings.memo_matrices``) assembled matrices of this process, by
    cache token: the analysis routes of one step (kernel, spectrum, blocks, entropy) are
    usually asked one after the other, and each would otherwise fetch and decode ``Y`` from
    Redis and rebuild ``K`` again.

    A token is a random name written into the step's Redis cache hash
    (``{version}|matrix.token``) by the first process that assembled that version.  That hash
    is unlinked on every version bump and with the run, so a token names exactly one data
    state: a memo entry is found only while its data is current, even across a run deleted
    and re-created under the same id.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[str, StepMatrix] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, token: str) -> StepMatrix | None:
        with self._lock:
            matrix = self._entries.get(token)
            if matrix is not None:
                self._entries.move_to_end(token)
            return matrix

    def put(self, token: str, matrix: StepMatrix) -> None:
        with self._lock:
            self._entries[token] = matrix
            self._entries.move_to_end(token)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)


# One memo per store (per app): tests run several apps with their own Redis side by side.
_MEMOS: weakref.WeakKeyDictionary[Store, MatrixMemo] = weakref.WeakKeyDictionary()


def matrix_memo(store: Store, size: int) -> MatrixMemo:
    """The in-process memo of ``store``'s assembled matrices (``size`` of them)."""
    memo = _MEMOS.get(store)
    if memo is None:
        memo = _MEMOS[store] = MatrixMemo(size)
    return memo


def assemble(snapshot: StepSnapshot, eigen_blas_threads: int = 1) -> StepMatrix:
    """Sum the parts per sequence id and align them with the metadata.

    Raises :class:`StepIncompleteError` listing ``missing_rows`` (metadata without sketched data)
    and ``rows_without_metadata`` (sketched ids without metadata); both may still arrive.
    """
    sums: dict[str, np.ndarray] = {}
    updates: dict[str, np.ndarray] = {}
    entropy_sums: dict[str, np.ndarray] = {}
    by_kind = {"score": sums, "update": updates, "entropy_sum": entropy_sums}
    for data in snapshot.parts.values():
        part = decode_part(data)
        target = by_kind[part.kind]
        for i, seq_id in enumerate(part.ids):
            row = part.rows[i].astype(np.float64)
            if seq_id in target:
                target[seq_id] += row
            else:
                target[seq_id] = row
    ids = [i for i in snapshot.order if i in snapshot.sequences]
    missing = [i for i in ids if i not in sums]
    orphans = sorted(
        i
        for i in set(sums) | set(updates) | set(entropy_sums)
        if i not in snapshot.sequences and i != APPLIED_UPDATE_ID
    )
    not_update = sorted(
        i
        for i in updates
        if i in snapshot.sequences and (snapshot.sequences[i].get("role") or "update") != "update"
    )
    if missing or orphans or not_update:
        parts = []
        if missing:
            parts.append(f"{len(missing)} sequences have no sketched rows: {missing[:20]}")
        if orphans:
            parts.append(f"{len(orphans)} sketched ids have no metadata: {orphans[:20]}")
        if not_update:
            parts.append(
                f"{len(not_update)} update rows belong to sequences that are not update-role:"
                f" {not_update[:20]}"
            )
        raise StepIncompleteError(
            "; ".join(parts) + " (post them, then ask again)",
            missing_rows=missing,
            rows_without_metadata=orphans,
            update_rows_without_update_role=not_update,
        )
    if not ids:
        raise StepIncompleteError("the step has no sequence metadata yet")
    seqs = StepSequences.from_records([snapshot.sequences[i] for i in ids])
    f = snapshot.step_fields
    zero = np.zeros(next(iter(sums.values())).shape[0])
    return StepMatrix(
        version=snapshot.version,
        seqs=seqs,
        Y=np.stack([sums[i] for i in ids]),
        applied=sums.get(APPLIED_UPDATE_ID),
        learning_rate=float(f.get("learning_rate", "0")),
        max_length=int(f["max_length"]) if "max_length" in f else None,
        entropy_before=float(f["entropy_before"]) if "entropy_before" in f else None,
        entropy_after=float(f["entropy_after"]) if "entropy_after" in f else None,
        U=np.stack([updates.get(i, zero) for i in ids]) if updates else None,
        has_update=np.array([i in updates for i in ids]) if updates else None,
        Z=np.stack([entropy_sums.get(i, zero) for i in ids]) if entropy_sums else None,
        has_z=np.array([i in entropy_sums for i in ids]) if entropy_sums else None,
        eigen_blas_threads=eigen_blas_threads,
    )


@dataclass(frozen=True)
class StepQuery:
    """What every analysis of one step needs: where the data is, the limits, the shutdown
    signal, the run and step, and how long a pending step may be waited for."""

    store: Store
    settings: Settings
    draining: threading.Event
    run: Mapping[str, Any]
    step: int
    wait: float = 0.0

    @property
    def run_id(self) -> str:
        return str(self.run["run_id"])


async def step_status(store: Store, run: Mapping[str, Any], step: int) -> StepStatus:
    """The status of an existing step of ``run``; :class:`NotFoundError` if it has none."""
    run_id = str(run["run_id"])
    counts = await store.step_counts(run_id, step, int(run.get("ranks", 1)))
    if not counts.exists:
        raise NotFoundError(f"run {run_id!r} has no step {step}")
    return StepStatus.from_counts(counts, run_id, step)


async def ready_step(q: StepQuery) -> StepCounts:
    """The step's counts once it is ``ready``; polls up to ``q.wait`` seconds.

    :class:`NotFoundError` if the step does not exist; :class:`StepNotReadyError` with the
    status when it is ``failed`` or still not ready after ``wait`` (0 = answer at once);
    :class:`TooLargeError` when it has more than ``max_sequences`` sequences or its rows
    would take more than ``max_analysis_bytes`` (``n x k x 8``; both checked before anything
    is loaded); :class:`ShuttingDownError` as soon as ``q.draining`` is set while it waits
    (the service is stopping: a long-poll must not hold the shutdown up, and the client
    retries against the restarted service).
    """
    run, step, limits = q.run, q.step, q.settings
    run_id = q.run_id
    max_sequences, max_bytes = limits.max_sequences, limits.max_analysis_bytes
    deadline = time.monotonic() + max(q.wait, 0.0)
    while True:
        counts = await q.store.step_counts(run_id, step, int(run.get("ranks", 1)))
        if not counts.exists:
            raise NotFoundError(f"run {run_id!r} has no step {step}")
        state = counts.state
        if state == "ready":
            if counts.sequences > max_sequences:
                raise TooLargeError(
                    f"{counts.sequences} sequences exceed KERNELSCOPE_MAX_SEQUENCES="
                    f"{max_sequences} for an n x n analysis",
                )
            need = counts.sequences * int(run["k"]) * 8
            if need > max_bytes:
                raise TooLargeError(
                    f"{counts.sequences} sequences x k={run['k']} x 8 bytes = "
                    f"{need / 2**20:.0f} MiB exceed KERNELSCOPE_MAX_ANALYSIS_MB="
                    f"{max_bytes / 2**20:g}",
                )
            return counts
        remaining = deadline - time.monotonic()
        if state == "failed" or remaining <= 0:
            if state == "failed":
                detail = "an upload of this step failed (see errors); re-send it to retry"
            elif counts.pending_uploads:
                detail = f"{counts.pending_uploads} uploads still queued; retry or use ?wait="
            elif counts.sequences and counts.ranks_missing:
                detail = (
                    f"{len(counts.ranks_reported)} of {counts.ranks_expected} ranks have posted "
                    "their sequences; retry or use ?wait="
                )
            else:
                detail = "the step has no sketched rows or no sequence metadata yet"
            raise StepNotReadyError(detail, StepStatus.from_counts(counts, run_id, step))
        if q.draining.is_set():
            raise ShuttingDownError("the service is shutting down; retry in a moment")
        await asyncio.sleep(min(0.1, remaining))


async def load_matrix(store: Store, settings: Settings, run_id: str, step: int) -> StepMatrix:
    """The step's assembled matrix at its current version.

    From this process's memo when the version's token names an entry, else assembled from
    the parts and memoised under the version's token.  Assembling (the float32 parts and one
    sum per row) costs about what fetching and decoding a cached float64 copy of ``Y`` would,
    so ``Y`` itself is not cached in Redis: only the small token is.
    """
    version = await store.version(run_id, step)
    memo = matrix_memo(store, settings.memo_matrices)
    token = await store.cache_get(run_id, step, version, "matrix.token")
    if token is not None:
        hit = memo.get(token.decode())
        if hit is not None:
            return hit
    snapshot = await store.snapshot(run_id, step)
    matrix = await run_in_threadpool(assemble, snapshot, settings.eigen_blas_threads)
    # The first process to assemble a version names it; the others memoise under that name.
    token = await store.cache_put_once(
        run_id, step, matrix.version, "matrix.token", secrets.token_hex(16).encode()
    )
    memo.put(token.decode(), matrix)
    return matrix


Answer = TypeVar("Answer")


async def cached_result(
    q: StepQuery,
    query: str,
    compute: Callable[[StepMatrix], Answer],
    encode: Callable[[Answer], bytes],
    after: Callable[[StepMatrix, Answer], Awaitable[None]] | None = None,
) -> bytes:
    """``encode(compute(matrix))`` at the step's current version, from the cache when possible.

    ``after`` runs once per freshly computed answer (the entropy history row); the matrix
    comes from :func:`load_matrix`, so the routes share its kernel and spectrum.
    """
    store, run_id, step = q.store, q.run_id, q.step
    version = await store.version(run_id, step)
    cached = await store.cache_get(run_id, step, version, query)
    if cached is not None:
        return cached
    matrix = await load_matrix(store, q.settings, run_id, step)

    def answer() -> tuple[Answer, bytes]:
        value = compute(matrix)
        return value, encode(value)

    try:
        value, body = await run_in_threadpool(answer)
    except ValidationError:  # a ValueError too, but an answer that misses its schema is a bug
        raise
    except ValueError as exc:  # the core refuses inputs it cannot analyse (sketch/ docstrings)
        raise CannotAnalyseError(f"cannot compute {query.split('|')[0]}: {exc}") from None
    await store.cache_put(run_id, step, matrix.version, query, body)
    if after is not None:
        await after(matrix, value)
    return body


async def step_answer(
    q: StepQuery,
    query: str,
    compute: Callable[[StepMatrix], Answer],
    encode: Callable[[Answer], bytes],
) -> bytes:
    """One analysis of a ready step (:func:`ready_step`), cached per data version."""
    await ready_step(q)
    return await cached_result(q, query, compute, encode)


async def step_entropy(
    q: StepQuery,
    estimator: Estimator | None,
    target: Target = Target.SEQUENCE,
    gradient: EntropyGradient | None = None,
) -> bytes:
    """The step's ``EntropyOut`` JSON (math.md §4; §8 for the token mean), cached per data
    version; ``gradient`` forces one estimate of ``grad H`` (default: from the entropy sums
    where the step has them).

    With the default estimator and gradient a fresh answer also writes the step's row of the
    run's entropy history of that target (:func:`run_history`), built from the same answer.
    """
    await ready_step(q)

    async def keep_history_row(m: StepMatrix, entropy: EntropyOut) -> None:
        # the row needs the update kernel's eigenvalues: CPU work, off the event loop
        row = await run_in_threadpool(history_row, m, q.step, entropy)
        await q.store.put_summary(q.run_id, q.step, row, target.value)

    def compute(m: StepMatrix) -> EntropyOut:
        # in the worker thread: a run's first analysis may build its sketcher's matrices
        sketcher = sketcher_for(q.run["sketch"], q.run.get("parameters"))
        return entropy_answer(m, q.run, sketcher, estimator, target, gradient)

    default = estimator is None and gradient is None
    return await cached_result(
        q,
        f"entropy|{None if estimator is None else estimator.value}|{target.value}"
        f"|{None if gradient is None else gradient.value}|r{ANALYSIS_REVISION}",
        compute,
        lambda answer: answer.model_dump_json().encode(),
        after=keep_history_row if default else None,
    )


async def run_history(
    store: Store,
    settings: Settings,
    draining: threading.Event,
    run: Mapping[str, Any],
    target: Target = Target.SEQUENCE,
) -> RunEntropyOut:
    """One row per analysed step: the steps' default-estimator entropy analyses of ``target``.

    A ready step without a row, or whose data changed since its row was written, is analysed
    now, so the history never depends on which steps someone happened to query.  Steps that
    cannot be analysed (pending, failed, incomplete, too large) keep their last row, if any.
    """
    run_id = str(run["run_id"])
    rows = await store.summaries(run_id, target.value)
    for step in await store.list_steps(run_id):
        row = rows.get(step)
        if (
            row is not None
            and row.get("revision") == ANALYSIS_REVISION
            and row.get("version") == await store.version(run_id, step)
        ):
            continue
        unanalysable = (StepNotReadyError, StepIncompleteError, TooLargeError, CannotAnalyseError)
        with contextlib.suppress(*unanalysable):
            await step_entropy(StepQuery(store, settings, draining, run, step), None, target)
    rows = await store.summaries(run_id, target.value)
    return RunEntropyOut(
        run_id=run_id,
        steps=[RunEntropyRow.model_validate({"step": s, **rows[s]}) for s in sorted(rows)],
    )


# --------------------------------------------------------------------------- computations
# Each returns the answer's schema model (or the bytes of a large answer), computed in a
# worker thread and encoded there.

_DIAGONAL = TypeAdapter(list[DiagonalEntry])


def kernel_matrix(m: StepMatrix, role: str, normalize: bool) -> tuple[list[str], np.ndarray]:
    """``(ids, K)`` over ``role``, or the cosine ``rho`` with ``normalize``."""
    rows, K = m.kernel(role)
    return [m.seqs.ids[i] for i in rows], (cosine(K) if normalize else K)


def kernel_json(m: StepMatrix, role: str, normalize: bool) -> bytes:
    """The ``KernelOut`` document.  n^2 floats: written by orjson straight from the float64
    array (about 10x faster than pydantic or json on ``K.tolist()`` at n = 2048, the same
    shortest round-trip repr); its two members are ``KernelOut``'s."""
    ids, K = kernel_matrix(m, role, normalize)
    # orjson would write NaN as null: a kernel must be finite, so refuse it instead
    if not np.isfinite(K).all():
        raise ValueError("the kernel holds NaN or Inf")
    matrix = np.ascontiguousarray(K, dtype=np.float64)
    return orjson.dumps({"ids": ids, "matrix": matrix}, option=orjson.OPT_SERIALIZE_NUMPY)


def kernel_npy(m: StepMatrix, role: str, normalize: bool) -> bytes:
    """``K`` as an .npy body (``numpy.save``, float64 ``[n, n]``)."""
    _, K = kernel_matrix(m, role, normalize)
    buf = io.BytesIO()
    np.save(buf, K, allow_pickle=False)
    return buf.getvalue()


def diagonal_answer(m: StepMatrix, role: str) -> list[DiagonalEntry]:
    rows = m.role_rows(role)
    values = np.einsum("ij,ij->i", m.Y[rows], m.Y[rows])
    return [
        DiagonalEntry(id=m.seqs.ids[i], prompt_id=m.seqs.prompt_ids[i], value=float(v))
        for i, v in zip(rows, values, strict=True)
    ]


def encode_diagonal(entries: list[DiagonalEntry]) -> bytes:
    return _DIAGONAL.dump_json(entries)


def spectrum_answer(m: StepMatrix, role: str, top: int) -> SpectrumOut:
    """The role's spectrum; eigenvectors are only computed for ``top > 0``."""
    if top == 0:
        return SpectrumOut.from_spectrum(m.eigen_summary(role))
    return SpectrumOut.from_spectrum(role_spectrum(m, role, top))


def blocks_answer(m: StepMatrix, role: str) -> BlocksOut:
    rows, K = m.kernel(role)
    return BlocksOut.from_blocks(block_statistics(K, [m.seqs.prompt_ids[i] for i in rows]))


def entropy_answer(
    m: StepMatrix,
    run: Mapping[str, Any],
    sketcher: Sketcher,
    estimator: Estimator | None,
    target: Target = Target.SEQUENCE,
    gradient: EntropyGradient | None = None,
) -> EntropyOut:
    """``sketch.entropy.entropy_change`` on the step (math.md §4; §8 for the token mean);
    ``gradient``: ``score`` leaves the entropy sums' rows out, ``entropy_sum`` raises
    :class:`CannotAnalyseError` where the step cannot use them (default: use them where it
    can)."""
    _, K = m.kernel("all")
    group_kernels: dict[str, Any] | None = None
    update = None
    c = update_coefficients(m.seqs, run["normalization"], m.max_length)
    if m.U is not None and m.has_update is not None:  # update rows (math.md §4)
        update = row_updates(m.Y, c, m.U, m.has_update)
    if isinstance(sketcher, GroupedSketcher):  # K = sum_g K_g over the groups' columns
        slices = sketcher.group_slices().items()
        if update is None:
            group_kernels = {g: kernel_from_rows(m.Y[:, sl]) for g, sl in slices}
        else:
            assert m.U is not None and m.has_update is not None
            group_kernels = {
                g: row_updates(m.Y[:, sl], c, m.U[:, sl], m.has_update) for g, sl in slices
            }
    k_applied = None if m.applied is None else m.Y @ m.applied
    result = entropy_change(
        K,
        m.seqs,
        m.learning_rate,
        estimator=estimator,
        normalization=run["normalization"],
        max_length=m.max_length,
        k_applied=k_applied,
        sketch_variance_factor=float(sketcher.variance_factor()),
        group_kernels=group_kernels,
        update=update,
        entropy_before=m.entropy_before,
        entropy_after=m.entropy_after,
        sketch_cells=kronecker_cells(m, c, sketcher),
        target=target,
        applied_row=m.applied,
        applied_includes_step=bool(run.get("applied_includes_step", False)),
        entropy_sums=None
        if gradient is EntropyGradient.SCORE
        else entropy_sum_kernels(m, c, sketcher),
    )
    if gradient is EntropyGradient.ENTROPY_SUM and result.entropy_gradient is not gradient:
        raise CannotAnalyseError(
            "the step cannot estimate grad H from the entropy sums: every entropy-side sequence"
            " needs its entropy_sum and its 'entropy_sum' rows (math.md §3)"
        )
    return EntropyOut.from_change(result)


def entropy_sum_kernels(
    m: StepMatrix, c: np.ndarray, sketcher: Sketcher
) -> EntropySumKernels | None:
    """The rows of the entropy sums' gradients against the score rows, the update rows
    (``c_i Y_i`` where a sequence has none), themselves and the applied update (math.md §3
    "From the entropy sums"), per parameter group too; None without such rows."""
    if m.Z is None or m.has_z is None:
        return None
    V = update_row_matrix(m.Y, c, m.U, m.has_update)
    groups = None
    if isinstance(sketcher, GroupedSketcher):
        groups = {g: m.Z[:, sl] @ V[:, sl].T for g, sl in sketcher.group_slices().items()}
    return EntropySumKernels(
        cross=m.Z @ V.T,
        score=m.Z @ m.Y.T,
        gram=m.Z @ m.Z.T,
        has_row=m.has_z,
        applied=None if m.applied is None else m.Z @ m.applied,
        groups=groups,
    )


def kronecker_cells(m: StepMatrix, c: np.ndarray, sketcher: Sketcher) -> SketchCells | None:
    """The rows of an ungrouped Kronecker run (``c``: the update coefficients), whose
    ``se_sketch`` is estimated from them (sketch/crossed.py); None for other kinds (their
    variance factor is tight)."""
    if not isinstance(sketcher, KroneckerSketch) or min(sketcher.k_out, sketcher.k_in) < 2:
        return None
    V = update_row_matrix(m.Y, c, m.U, m.has_update)
    return SketchCells(Y=m.Y, V=V, shape=(sketcher.k_out, sketcher.k_in), Z=m.Z)


def history_row(m: StepMatrix, step: int, entropy: EntropyOut) -> dict[str, Any]:
    """The step's row of ``GET /v1/runs/{run_id}/entropy`` as stored (without TTL), with the
    data ``version`` and ``revision`` it was computed at.

    CPU work (the update kernel's eigenvalues, shared with the spectrum route): run it in a
    worker thread.
    """
    head: list[float] = []
    if m.role_rows("update").size:
        head = [float(x) for x in m.eigen_summary("update").eigenvalues[:SPECTRUM_HEAD]]
    row = RunEntropyRow.from_entropy(step, entropy, head)
    stored: dict[str, Any] = json.loads(row.model_dump_json())  # NaN -> null, enums -> values
    return {**stored, "version": m.version, "revision": ANALYSIS_REVISION}


# --------------------------------------------------------------------------- token shares


async def record_tokens(
    store: Store, run: Mapping[str, Any], step: int, body: TokensIn
) -> TokensRecorded:
    """Store the exact token shares of update sequences of the step (math.md §9).

    The step's sequences must be stored first (409 otherwise): the shares belong to
    update-role sequences it knows (422 naming the others), and every push of a step names one
    estimator, target and learning rate (409 otherwise)."""
    run_id = str(run["run_id"])
    known = await store.sequence_records(run_id, step)
    if not known:
        raise InvalidUploadError(
            409, f"step {step} of run {run_id!r} has no sequences yet: push them first"
        )
    unknown = [s.id for s in body.sequences if s.id not in known]
    not_update = [
        s.id for s in body.sequences if s.id in known and known[s.id].get("role") != "update"
    ]
    if unknown or not_update:
        raise InvalidUploadError(
            422,
            "token shares belong to update-role sequences of the step",
            unknown_ids=unknown[:20],
            not_update_ids=not_update[:20],
        )
    meta = {
        "estimator": body.estimator.value,
        "target": body.target.value,
        "learning_rate": body.learning_rate,
    }
    records = {
        s.id: s.model_dump(mode="json", include={"token_ids", "tokens", "logprobs", "shares"})
        for s in body.sequences
    }
    try:
        count = await store.put_tokens(run_id, step, meta, records)
    except TokenMetaConflictError as exc:
        raise InvalidUploadError(
            409, f"the step holds token shares of another push: {exc.stored}", stored=exc.stored
        ) from None
    return TokensRecorded(run_id=run_id, step=step, upserted=len(records), sequences=count)


async def step_tokens(
    store: Store,
    run: Mapping[str, Any],
    step: int,
    *,
    top: int,
    sequence: str | None,
    options: CovarianceOptions,
) -> TokensOut:
    """The step's tokens that move the entropy, and Cui et al.'s covariance against them."""
    run_id = str(run["run_id"])
    meta, records = await store.tokens(run_id, step)
    if meta is None:
        raise NotFoundError(f"step {step} of run {run_id!r} has no token shares")
    if sequence is not None and sequence not in records:
        raise NotFoundError(f"sequence {sequence!r} of step {step} has no token shares")
    known = await store.sequence_records(run_id, step)
    return await run_in_threadpool(
        tokens_answer,
        run_id,
        step,
        meta,
        records,
        known,
        top=top,
        sequence=sequence,
        options=options,
    )


def tokens_answer(
    run_id: str,
    step: int,
    meta: Mapping[str, Any],
    records: Mapping[str, Mapping[str, Any]],
    known: Mapping[str, Mapping[str, Any]],
    *,
    top: int,
    sequence: str | None,
    options: CovarianceOptions,
) -> TokensOut:
    """``TokensOut`` from the stored shares (sequences in id order, tokens in order)."""
    ids = sorted(records)
    owner = [sid for sid in ids for _ in records[sid]["shares"]]
    position = [t for sid in ids for t in range(len(records[sid]["shares"]))]
    token_ids = [tok for sid in ids for tok in records[sid]["token_ids"]]
    texts = [
        text
        for sid in ids
        for text in (records[sid]["tokens"] or [None] * len(records[sid]["shares"]))
    ]
    share = np.array([v for sid in ids for v in records[sid]["shares"]], dtype=np.float64)
    logprob = np.array([v for sid in ids for v in records[sid]["logprobs"]], dtype=np.float64)
    # a sequence deleted from the step since keeps its shares but no advantage: 0
    advantage = np.array([float(known.get(sid, {}).get("advantage", 0.0)) for sid in owner])
    cov = covariance_scores(logprob, advantage)
    comparison = compare_covariance(share, logprob, advantage, options)

    def token(i: int) -> TokenShareOut:
        return TokenShareOut(
            sequence_id=owner[i],
            position=position[i],
            token_id=token_ids[i],
            token=texts[i],
            share=float(share[i]),
            cov_score=float(cov[i]),
            logprob=float(logprob[i]),
            advantage=float(advantage[i]),
        )

    order = np.argsort(share, kind="stable")
    down = [token(int(i)) for i in order[:top] if share[i] < 0]
    up = [token(int(i)) for i in order[::-1][:top] if share[i] > 0]
    totals = [
        TokenSequenceTotal(
            id=sid,
            prompt_id=str(known.get(sid, {}).get("prompt_id", "")),
            num_tokens=len(records[sid]["shares"]),
            total=float(sum(records[sid]["shares"])),
        )
        for sid in ids
    ]
    return TokensOut(
        run_id=run_id,
        step=step,
        estimator=meta["estimator"],
        target=meta["target"],
        learning_rate=float(meta["learning_rate"]),
        num_sequences=len(ids),
        num_tokens=int(share.size),
        total=float(share.sum()),
        down=down,
        up=up,
        sequences=totals,
        sequence=None
        if sequence is None
        else [token(i) for i in range(share.size) if owner[i] == sequence],
        covariance=CovarianceOut.from_comparison(comparison),
    )
