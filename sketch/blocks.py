"""Block statistics of the Fisher kernel by pair type (math.md §5).

Pairs ``(i, j)`` of the chosen rows are *ordered* (both ``(i, j)`` and ``(j, i)`` count, as in
``|K|_F^2``) and split into

* ``diagonal``: ``j == i``;
* ``same_prompt``: ``j != i``, ``p(j) == p(i)``;
* ``cross_prompt``: ``p(j) != p(i)``.

Counts therefore add up to ``n^2`` and the shares of ``|K|_F^2`` to 1 (when ``K != 0``).

Zero-norm rows: the cosine ``rho`` of any pair involving a row with ``K(i, i) = 0`` is 0
(see :func:`sketch.kernel.cosine`), including its own diagonal entry.  Empty pair types
(e.g. ``same_prompt`` when every prompt has one sequence) have count 0 and ``None`` means.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from sketch.kernel import FloatArray, block_sums, check_kernel, cosine


@dataclass(frozen=True)
class PairStats:
    """Statistics over one pair type (``None`` where the type has no pairs or ``K = 0``)."""

    count: int
    mean_k: float | None
    mean_abs_k: float | None
    mean_rho: float | None
    mean_abs_rho: float | None
    share_frobenius: float | None  # sum of K^2 over these pairs / |K|_F^2


@dataclass(frozen=True)
class PromptMatrix:
    """``B x B`` means per prompt pair, rows/columns in the order of ``prompts``.

    Diagonal blocks ``(p, p)`` average over ``i != j`` only, so that they measure how much the
    sequences of one prompt align with *each other*; a prompt with a single row therefore has
    NaN there.  Off-diagonal blocks average over all pairs.
    """

    prompts: list[str]
    mean_k: FloatArray
    mean_rho: FloatArray


@dataclass(frozen=True)
class Blocks:
    """The answer of ``GET .../kernel/blocks``."""

    diagonal: PairStats
    same_prompt: PairStats
    cross_prompt: PairStats
    prompt_matrix: PromptMatrix


@dataclass(frozen=True)
class _Sums:
    """Sums over a set of ordered pairs: the sufficient statistics of :class:`PairStats`."""

    count: int
    k: float
    abs_k: float
    rho: float
    abs_rho: float
    k_sq: float

    @classmethod
    def of(cls, k: FloatArray, rho: FloatArray) -> _Sums:
        return cls(
            k.size,
            float(k.sum()),
            float(np.abs(k).sum()),
            float(rho.sum()),
            float(np.abs(rho).sum()),
            float(np.dot(k.ravel(), k.ravel())),
        )

    def __sub__(self, other: _Sums) -> _Sums:
        # sums of non-negative terms stay non-negative through the rounding of the difference
        return _Sums(
            self.count - other.count,
            self.k - other.k,
            max(0.0, self.abs_k - other.abs_k),
            self.rho - other.rho,
            max(0.0, self.abs_rho - other.abs_rho),
            max(0.0, self.k_sq - other.k_sq),
        )

    def stats(self, total_sq: float) -> PairStats:
        if self.count == 0:
            return PairStats(0, None, None, None, None, None)
        c = float(self.count)
        return PairStats(
            count=self.count,
            mean_k=self.k / c,
            mean_abs_k=self.abs_k / c,
            mean_rho=self.rho / c,
            mean_abs_rho=self.abs_rho / c,
            share_frobenius=self.k_sq / total_sq if total_sq > 0 else None,
        )


def block_statistics(K: NDArray[Any], prompt_ids: Sequence[str]) -> Blocks:
    """Pair-type statistics and the per-prompt-pair matrix of a kernel.

    Parameters
    ----------
    K: float64 ``[n, n]`` kernel over the chosen rows (e.g. the update-role rows).
    prompt_ids: ``n`` prompt ids aligned with the rows; prompts are ordered by first appearance.
    """
    mat = check_kernel(K, len(prompt_ids))
    rho = cosine(mat)
    lookup: dict[str, int] = {}
    codes = np.array([lookup.setdefault(str(p), len(lookup)) for p in prompt_ids], dtype=np.int64)
    B = len(lookup)
    # Whole-matrix sums, minus the same-prompt pairs (about n * group size entries, gathered
    # by index): cross-prompt sums without masking or copying the n x n matrices.
    everything = _Sums.of(mat, rho)
    same_i, same_j = np.nonzero(codes[:, None] == codes[None, :])
    same_all = _Sums.of(mat[same_i, same_j], rho[same_i, same_j])
    diagonal = _Sums.of(np.diag(mat).copy(), np.diag(rho).copy())
    sum_k = block_sums(mat, codes, B)
    sum_rho = block_sums(rho, codes, B)
    # the prompt matrix averages over i != j: take the diagonal out of the (p, p) blocks
    sum_k[np.diag_indices(B)] -= np.bincount(codes, weights=np.diag(mat), minlength=B)
    sum_rho[np.diag_indices(B)] -= np.bincount(codes, weights=np.diag(rho), minlength=B)
    sizes = np.bincount(codes, minlength=B).astype(np.float64)
    pairs = np.outer(sizes, sizes) - np.diag(sizes)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_k = np.where(pairs > 0, sum_k / np.where(pairs > 0, pairs, 1.0), np.nan)
        mean_rho = np.where(pairs > 0, sum_rho / np.where(pairs > 0, pairs, 1.0), np.nan)
    total_sq = everything.k_sq
    return Blocks(
        diagonal=diagonal.stats(total_sq),
        same_prompt=(same_all - diagonal).stats(total_sq),
        cross_prompt=(everything - same_all).stats(total_sq),
        prompt_matrix=PromptMatrix(prompts=list(lookup), mean_k=mean_k, mean_rho=mean_rho),
    )
