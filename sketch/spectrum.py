"""Spectrum of the Fisher kernel (math.md §5).

``K = Y Y^T`` has the eigenvalues ``s^2`` of the singular values ``s`` of ``Y`` and the left
singular vectors of ``Y`` as eigenvectors.  A ``k``-dimensional sketch has rank
``<= min(k, n)``; when ``k < n`` the thin SVD of the ``n x k`` matrix is both cheaper and more
accurate than ``eigh`` of the ``n x n`` kernel (no roundoff-sized spurious eigenvalues).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from sketch.kernel import FloatArray, as_float64, check_kernel

#: Relative tolerance for negative eigenvalues: ``eigh`` of a PSD matrix returns eigenvalues
#: down to about ``-n * eps * lambda_max``.  Anything in ``[-tol, 0)`` with
#: ``tol = NEGATIVE_TOLERANCE * max(n, 1) * max|lambda|`` is roundoff and clipped to 0; a more
#: negative eigenvalue means the input is not a kernel and raises ``ValueError``.
NEGATIVE_TOLERANCE = 1e-10


@dataclass(frozen=True)
class Spectrum:
    """Eigen-summary of a kernel.

    Attributes
    ----------
    eigenvalues: float64 ``[n]``, descending, >= 0 (zeros past the rank of a thin sketch).
    trace: ``sum_i K(i, i)``.
    effective_rank: ``exp(-sum q log q)``, ``q = lambda / sum lambda`` (0 for the zero kernel).
    participation_ratio: ``(sum lambda)^2 / sum lambda^2`` (0 for the zero kernel).
    eigenvectors: float64 ``[min(top, ...), n]`` (one eigenvector per row, unit norm, sign fixed so
        that its largest-magnitude entry is positive) or ``None`` when ``top == 0``.
    """

    eigenvalues: FloatArray
    trace: float
    effective_rank: float
    participation_ratio: float
    eigenvectors: FloatArray | None = None


def _clip_eigenvalues(values: FloatArray, n: int) -> FloatArray:
    scale = float(np.max(np.abs(values))) if values.size else 0.0
    tol = NEGATIVE_TOLERANCE * max(n, 1) * scale
    if values.size and float(values.min()) < -tol:
        raise ValueError(
            f"kernel is not positive semidefinite: eigenvalue {float(values.min()):.3e} "
            f"below -{tol:.3e}"
        )
    return np.clip(values, 0.0, None)


def _fix_signs(vectors: FloatArray) -> FloatArray:
    """Make the largest-magnitude entry of every column positive (deterministic output)."""
    if vectors.size == 0:
        return vectors
    pivot = vectors[np.argmax(np.abs(vectors), axis=0), np.arange(vectors.shape[1])]
    signs = np.where(pivot < 0, -1.0, 1.0)
    return np.asarray(vectors * signs[None, :], dtype=np.float64)


def spectral_summary(eigenvalues: FloatArray) -> tuple[float, float]:
    """``(effective_rank, participation_ratio)`` of non-negative eigenvalues.

    ``0 log 0 = 0``; both are 0 when every eigenvalue is 0.
    """
    total = float(eigenvalues.sum())
    if total <= 0.0:
        return 0.0, 0.0
    q = eigenvalues / total
    q = q[q > 0]
    effective_rank = float(np.exp(-np.sum(q * np.log(q))))
    participation_ratio = total**2 / float(np.sum(eigenvalues**2))
    return effective_rank, participation_ratio


def spectrum(
    Y: torch.Tensor | NDArray[Any] | None = None,
    K: NDArray[Any] | None = None,
    top: int = 0,
) -> Spectrum:
    """Spectrum of ``K`` (given directly) or of ``K = Y Y^T`` (from the sketch matrix).

    Only what is asked for is computed: with ``top == 0`` no eigenvector is formed (singular
    values only, or ``eigvalsh``: several times faster than a full ``eigh``).

    Parameters
    ----------
    Y: sketch matrix ``[n, k]`` (any float dtype; upcast to float64).  Preferred when given:
        the (thin) SVD of ``Y`` is used when ``k < n``, ``Y Y^T`` otherwise.
    K: kernel ``[n, n]``: used alone when ``Y`` is None; with ``Y`` it must be ``Y Y^T``
        (e.g. a cached kernel) and saves recomputing it when ``k >= n``.
    top: number of leading eigenvectors to return; capped at ``n`` and, on the SVD path,
        at ``k`` (beyond the rank bound the eigenvectors of eigenvalue 0 are arbitrary).
    """
    if top < 0:
        raise ValueError("top must be >= 0")
    vectors: FloatArray | None = None
    if Y is not None:
        rows = as_float64(Y)
        if rows.ndim != 2:
            raise ValueError(f"sketch matrix must be 2-D [n, k], got shape {rows.shape}")
        if not np.all(np.isfinite(rows)):
            raise ValueError("sketch matrix contains NaN or Inf")
        n, k = rows.shape
        trace = float(np.sum(rows * rows))
        if k < n:
            values = np.zeros(n, dtype=np.float64)
            if top > 0:
                vectors, s, _ = np.linalg.svd(rows, full_matrices=False)
                vectors = vectors[:, :top]
            else:
                s = np.linalg.svd(rows, compute_uv=False)
            values[: s.size] = s**2  # already descending; the rest of the rank is exactly 0
        else:
            mat = check_kernel(K, n) if K is not None else rows @ rows.T
            values, vectors = _eigh_descending(0.5 * (mat + mat.T), top)
    elif K is not None:
        mat = check_kernel(K)
        n = mat.shape[0]
        trace = float(np.trace(mat))
        values, vectors = _eigh_descending(0.5 * (mat + mat.T), top)
    else:
        raise ValueError("give the sketch matrix Y or the kernel K")
    values = _clip_eigenvalues(values, n)
    effective_rank, participation_ratio = spectral_summary(values)
    eigenvectors = None
    if top > 0 and vectors is not None:
        # Past the rank bound min(k, n) the eigenvectors of eigenvalue 0 are arbitrary: cap.
        eigenvectors = np.ascontiguousarray(_fix_signs(vectors[:, :top]).T)
    return Spectrum(
        eigenvalues=values,
        trace=trace,
        effective_rank=effective_rank,
        participation_ratio=participation_ratio,
        eigenvectors=eigenvectors,
    )


def _eigh_descending(mat: FloatArray, top: int = 0) -> tuple[FloatArray, FloatArray | None]:
    """All eigenvalues of the symmetric ``mat`` (descending) and its eigenvectors as columns
    (None when ``top == 0``).

    numpy's LAPACK only: ``eigvalsh`` forms no eigenvectors (several times faster than
    ``eigh`` at n in the thousands).  ``scipy.linalg.eigh(subset_by_index=...)`` would form
    only ``top`` vectors, but importing scipy.linalg loads a second OpenBLAS next to numpy's
    whose idle threads spin against numpy's: on a loaded 2-core host that made every
    ``eigvalsh`` here 10-70x slower, so the (rarer) ``top > 0`` query pays a full ``eigh``.
    """
    n = mat.shape[0]
    if n == 0:
        return np.zeros(0), (np.zeros((0, 0)) if top > 0 else None)
    if top == 0:
        return np.asarray(np.linalg.eigvalsh(mat)[::-1], dtype=np.float64), None
    values, vectors = np.linalg.eigh(mat)
    return np.asarray(values[::-1], dtype=np.float64), np.asarray(vectors[:, ::-1])
