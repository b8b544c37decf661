"""Gradient noise scale ``B_simple = tr(Sigma) / |G|^2`` (McCandlish et al. 2018; math.md §5).

The independent units are prompt groups (GRPO couples the responses of one prompt through
the group baseline).  With ``B`` prompts, per-prompt gradients ``g_p = B sum_{i in p} c_i w_i``
(so that ``g_bar = (1/B) sum_p g_p = g_hat`` and ``E[g_p] = G``), and the Gram matrix
``Gm(p, q) = <g_p, g_q> = B^2 sum_{i in p, j in q} c_i c_j K(i, j)`` (block sums of K):

* ``|G|^2 ~ sum_{p != q} Gm(p, q) / (B (B - 1))`` — unbiased for ``|E g_p|^2`` because
  distinct prompts are independent (the diagonal ``|g_p|^2`` would add the noise);
* ``tr(Sigma) ~ sum_p |g_p - g_bar|^2 / (B - 1) = (tr Gm - 1^T Gm 1 / B) / (B - 1)``;
* ``B_simple = tr(Sigma) / |G|^2``, in units of prompts: the batch size (number of prompts)
  at which the gradient noise equals the signal.

Edge cases: with fewer than 2 prompts nothing is estimable and every number is ``None``.
The ``|G|^2`` estimate can be <= 0 when the noise dominates (it is a difference of
independent inner products); then ``b_simple`` is ``None`` (it would be infinite or negative)
while ``tr_sigma`` and ``g_norm2`` are still reported as measured.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from sketch.kernel import block_sums, check_kernel


@dataclass(frozen=True)
class NoiseScale:
    """Gradient noise scale with its raw ingredients (``None`` where not estimable)."""

    tr_sigma: float | None
    g_norm2: float | None
    b_simple: float | None
    num_prompts: int


def prompt_gram(
    K: NDArray[Any], c: NDArray[Any], prompt_ids: Sequence[str], mask: NDArray[Any] | None = None
) -> tuple[NDArray[np.float64], list[str]]:
    """``Gm(p, q) = <g_p, g_q>`` float64 ``[B, B]`` and the prompt order (first appearance).

    ``c``: float64 ``[n]`` step coefficients (math.md §2); ``mask``: rows that count (default all).
    """
    mat = check_kernel(K, len(prompt_ids))
    n = mat.shape[0]
    coef = np.asarray(c, dtype=np.float64).reshape(-1)
    if coef.shape != (n,):
        raise ValueError(f"c: expected {n} values, got {coef.shape[0]}")
    keep = np.ones(n, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    lookup: dict[str, int] = {}
    rows = np.flatnonzero(keep)
    codes = np.array(
        [lookup.setdefault(str(prompt_ids[int(i)]), len(lookup)) for i in rows], dtype=np.int64
    )
    B = len(lookup)
    # Only the kept rows enter: cut the kernel down first (entropy-role rows can outnumber
    # the update rows by 100x, and the full n x n product would dominate the analysis).  No
    # copy when every row is kept, and no product when every c_i is 1 (the entropy call hands
    # in the update rows' Gram matrix, c already applied).
    sub = mat if rows.size == n else mat[np.ix_(rows, rows)]
    kept = coef[rows]
    if np.any(kept != 1.0):
        sub = kept[:, None] * sub * kept[None, :]
    gram = float(B) ** 2 * block_sums(sub, codes, B)
    return 0.5 * (gram + gram.T), list(lookup)


def noise_scale(
    K: NDArray[Any], c: NDArray[Any], prompt_ids: Sequence[str], mask: NDArray[Any] | None = None
) -> NoiseScale:
    """``B_simple`` with prompts as units, from the kernel ``K`` ``[n, n]`` and ``c`` ``[n]``.

    ``mask`` selects the update-role rows (default: all rows); ``B`` is the number of distinct
    prompts among them (the same ``B`` that :func:`sketch.entropy.update_coefficients` uses).
    """
    gram, prompts = prompt_gram(K, c, prompt_ids, mask)
    B = len(prompts)
    if B < 2:
        return NoiseScale(None, None, None, B)
    total = float(gram.sum())
    trace = float(np.trace(gram))
    g_norm2 = (total - trace) / (B * (B - 1))
    tr_sigma = (trace - total / B) / (B - 1)
    b_simple = tr_sigma / g_norm2 if g_norm2 > 0 else None
    return NoiseScale(tr_sigma=tr_sigma, g_norm2=g_norm2, b_simple=b_simple, num_prompts=B)
