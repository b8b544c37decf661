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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from sketch.kernel import FloatArray, block_sums, check_kernel, cosine


def _none_if_nan(x: float) -> float | None:
    return None if not np.isfinite(x) else float(x)


@dataclass(frozen=True)
class PairStats:
    """Statistics over one pair type (``None`` where the type has no pairs or ``K = 0``)."""

    count: int
    mean_k: float | None
    mean_abs_k: float | None
    mean_rho: float | None
    mean_abs_rho: float | None
    share_frobenius: float | None  # sum of K^2 over these pairs / |K|_F^2

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PairStats:
        """The inverse of :meth:`to_dict` (the API's JSON; clients read it back with this)."""

        def opt(key: str) -> float | None:
            value = data.get(key)
            return None if value is None else float(value)

        return cls(
            count=int(data.get("count", 0)),
            mean_k=opt("mean_k"),
            mean_abs_k=opt("mean_abs_k"),
            mean_rho=opt("mean_rho"),
            mean_abs_rho=opt("mean_abs_rho"),
            share_frobenius=opt("share_frobenius"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "count": int(self.count),
            "mean_k": self.mean_k,
            "mean_abs_k": self.mean_abs_k,
            "mean_rho": self.mean_rho,
            "mean_abs_rho": self.mean_abs_rho,
            "share_frobenius": self.share_frobenius,
        }


@dataclass(frozen=True)
class PromptMatrix:
    """``B x B`` means per prompt pair, rows/columns in the order of ``prompts``.

    Diagonal blocks ``(p, p)`` average over ``i != j`` only, so that they measure how much the
    sequences of one prompt align with *each other*; a prompt with a single row therefore has
    NaN there (``None`` in :meth:`to_dict`).  Off-diagonal blocks average over all pairs.
    """

    prompts: list[str]
    mean_k: FloatArray
    mean_rho: FloatArray

    def to_dict(self) -> dict[str, Any]:
        def rows(mat: FloatArray) -> list[list[float | None]]:
            return [[_none_if_nan(float(x)) for x in row] for row in mat]

        return {
            "prompts": list(self.prompts),
            "mean_k": rows(self.mean_k),
            "mean_rho": rows(self.mean_rho),
        }


@dataclass(frozen=True)
class Blocks:
    """The answer of ``GET .../kernel/blocks``."""

    diagonal: PairStats
    same_prompt: PairStats
    cross_prompt: PairStats
    prompt_matrix: PromptMatrix

    def to_dict(self) -> dict[str, Any]:
        return {
            "diagonal": self.diagonal.to_dict(),
            "same_prompt": self.same_prompt.to_dict(),
            "cross_prompt": self.cross_prompt.to_dict(),
            "prompt_matrix": self.prompt_matrix.to_dict(),
        }


def _pair_stats(
    K: FloatArray, rho: FloatArray, mask: NDArray[np.bool_], total_sq: float
) -> PairStats:
    count = int(mask.sum())
    if count == 0:
        return PairStats(0, None, None, None, None, None)
    k = K[mask]
    r = rho[mask]
    share = float(np.sum(k * k) / total_sq) if total_sq > 0 else None
    return PairStats(
        count=count,
        mean_k=float(k.mean()),
        mean_abs_k=float(np.abs(k).mean()),
        mean_rho=float(r.mean()),
        mean_abs_rho=float(np.abs(r).mean()),
        share_frobenius=share,
    )


def block_statistics(K: NDArray[Any], prompt_ids: Sequence[str]) -> Blocks:
    """Pair-type statistics and the per-prompt-pair matrix of a kernel.

    Parameters
    ----------
    K: float64 ``[n, n]`` kernel over the chosen rows (e.g. the update-role rows).
    prompt_ids: ``n`` prompt ids aligned with the rows; prompts are ordered by first appearance.
    """
    mat = check_kernel(K, len(prompt_ids))
    n = mat.shape[0]
    rho = cosine(mat)
    lookup: dict[str, int] = {}
    codes = np.array([lookup.setdefault(str(p), len(lookup)) for p in prompt_ids], dtype=np.int64)
    same = codes[:, None] == codes[None, :]
    eye = np.eye(n, dtype=bool)
    total_sq = float(np.sum(mat * mat))
    B = len(lookup)
    off = ~eye
    sum_k = block_sums(np.where(off, mat, 0.0), codes, B)
    sum_rho = block_sums(np.where(off, rho, 0.0), codes, B)
    sizes = np.bincount(codes, minlength=B).astype(np.float64)
    pairs = np.outer(sizes, sizes) - np.diag(sizes)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_k = np.where(pairs > 0, sum_k / np.where(pairs > 0, pairs, 1.0), np.nan)
        mean_rho = np.where(pairs > 0, sum_rho / np.where(pairs > 0, pairs, 1.0), np.nan)
    return Blocks(
        diagonal=_pair_stats(mat, rho, eye, total_sq),
        same_prompt=_pair_stats(mat, rho, same & off, total_sq),
        cross_prompt=_pair_stats(mat, rho, ~same, total_sq),
        prompt_matrix=PromptMatrix(prompts=list(lookup), mean_k=mean_k, mean_rho=mean_rho),
    )
