"""The Fisher kernel ``K(j, i) = <w_j, w_i>`` from sketched rows (math.md §4, §5).

All kernel algebra is done in float64: sketch rows arrive as float32 and the n x n sums of
the estimators cancel heavily (advantages have mean zero per prompt).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]


def as_float64(x: torch.Tensor | NDArray[Any]) -> FloatArray:
    """A float64 numpy copy/view of a tensor (any device/dtype) or array."""
    if isinstance(x, torch.Tensor):
        return np.asarray(x.detach().to(device="cpu", dtype=torch.float64).numpy())
    return np.asarray(x, dtype=np.float64)


def kernel_from_rows(Y: torch.Tensor | NDArray[Any]) -> FloatArray:
    """``K = Y Y^T`` for a sketch matrix ``Y`` ``[n, k]``; returns float64 ``[n, n]``.

    The product is accumulated in float64 (rows are upcast first), and the result is
    symmetrised exactly so that later eigen-decompositions see a symmetric matrix.
    """
    rows = as_float64(Y)
    if rows.ndim != 2:
        raise ValueError(f"sketch matrix must be 2-D [n, k], got shape {rows.shape}")
    if not np.all(np.isfinite(rows)):
        raise ValueError("sketch matrix contains NaN or Inf")
    K = rows @ rows.T
    return np.asarray(0.5 * (K + K.T), dtype=np.float64)


def check_kernel(K: NDArray[Any], n: int | None = None) -> FloatArray:
    """Validate a kernel: float64 ``[n, n]``, finite. Returns it as float64."""
    mat = np.asarray(K, dtype=np.float64)
    if mat.ndim != 2 or mat.shape[0] != mat.shape[1]:
        raise ValueError(f"kernel must be square [n, n], got shape {mat.shape}")
    if n is not None and mat.shape[0] != n:
        raise ValueError(f"kernel has {mat.shape[0]} rows, expected {n}")
    if not np.all(np.isfinite(mat)):
        raise ValueError("kernel contains NaN or Inf")
    return mat


def diagonal(K: NDArray[Any]) -> FloatArray:
    """``K(i, i) = |w_i|^2``, float64 ``[n]`` (a copy)."""
    return np.array(np.diag(check_kernel(K)), dtype=np.float64)


def cosine(K: NDArray[Any]) -> FloatArray:
    """``rho(i, j) = K(i, j) / sqrt(K(i, i) K(j, j))``, float64 ``[n, n]``, clipped to [-1, 1].

    Convention for zero-norm rows (``K(i, i) <= 0``, e.g. a sequence whose gradient is exactly
    zero): every ``rho`` involving that row, including ``rho(i, i)``, is 0 — the row is
    orthogonal to everything and carries no direction.
    """
    mat = check_kernel(K)
    d = np.diag(mat).copy()
    norms = np.sqrt(np.clip(d, 0.0, None))
    positive = norms > 0
    inv = np.zeros_like(norms)
    inv[positive] = 1.0 / norms[positive]
    rho = mat * inv[:, None] * inv[None, :]
    return np.asarray(np.clip(rho, -1.0, 1.0), dtype=np.float64)


def block_sums(X: NDArray[Any], codes: NDArray[np.int64], num_groups: int) -> FloatArray:
    """``S(p, q) = sum_{codes[i] = p, codes[j] = q} X(i, j)``, float64 ``[num_groups, num_groups]``.

    ``codes``: int64 ``[n]`` group of each row in ``0 .. num_groups - 1``, or -1 to leave the
    row out.  Cost ``O(n^2)`` (rows are sorted by group and summed with ``reduceat``), not the
    ``O(n^2 B)`` of ``Z^T X Z``.
    """
    mat = np.asarray(X, dtype=np.float64)
    keep = np.flatnonzero(codes >= 0)
    out = np.zeros((num_groups, num_groups), dtype=np.float64)
    if keep.size == 0:
        return out
    order = keep[np.argsort(codes[keep], kind="stable")]
    sorted_codes = codes[order]
    starts = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]])
    present = sorted_codes[starts]
    # rows already grouped (GRPO pushes each prompt's group together): no n x n copy
    in_order = keep.size == mat.shape[0] and bool(np.all(order == np.arange(mat.shape[0])))
    sub = mat if in_order else mat[np.ix_(order, order)]
    summed = np.add.reduceat(np.add.reduceat(sub, starts, axis=0), starts, axis=1)
    out[np.ix_(present, present)] = summed
    return out
