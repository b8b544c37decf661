"""The entropy gradient from the sequences' entropy sums (math.md §3 "From the entropy sums").

``H(p) = E_t[Hs(t)]`` with ``Hs(t) = sum_s H_s(t_<s)``, the summed entropy of the full
next-token distributions along a response (the chain rule of entropy: ``E[Hs] = -E[S]``).
Differentiating that form gives

    grad H(p) = E_t[grad Hs(t)] + E_t[(Hs(t) - b) w_t],

a pathwise term plus a score-function term whose "reward" is ``Hs`` instead of ``-S``.  Per
sampled row ``j`` of prompt ``p``:

    grad_hat H = sum_j alpha_j w_j + beta_j z_j,
    alpha_j = (Hs_j - Hsbar_{p,-j}) / (B M_p),   beta_j = 1 / (B M_p),   z_j = grad Hs_j,

with the leave-one-out baseline of math.md §3, so it is unbiased at every ``M_p`` as the
score-only ``h_j = -(S_j - Sbar_{p,-j}) / (B M_p)`` is.  ``Hs`` is ``-S`` with each token's
surprisal replaced by its expectation given the prefix (a Rao-Blackwellisation), and most of
what ``w_j`` carries of a single draw's luck is in ``z_j`` as an exact conditional
expectation: on exact enumeration the estimate of ``eta <grad H, g_hat>`` varies 80-110 times
less at 4 and 8 samples per prompt (docs/validation.md §17).  The price is one more row per
entropy sequence, ``z_j``.

Nothing here reads rows: the estimators work on kernels (:mod:`sketch.entropy`), so ``z_j``
enters as its kernels against the score rows, the update rows and itself
(:class:`EntropySumKernels`), and ``grad_hat H`` as the coefficient pair ``(alpha, beta)``.
Why not a library: the estimator is this project's own (Rao-Blackwellised REINFORCE with a
pathwise term, cf. Mohamed et al. 2020, "Monte Carlo gradient estimation in ML", §4-5).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np
from numpy.typing import NDArray

from sketch.cross_fit import per_half
from sketch.kernel import FloatArray, check_kernel
from sketch.sequences import (
    BoolArray,
    StepSequences,
    centred_coefficients,
    prompt_mean_weights,
)


class EntropyGradient(str, Enum):
    """Which estimate of ``grad H`` a step's ``dH1`` uses (math.md §3)."""

    SCORE = "score"  # h_j = -(S_j - Sbar_{p,-j}) / (B M_p): score rows only
    ENTROPY_SUM = "entropy_sum"  # (alpha, beta): score rows and the entropy sums' gradients


@dataclass(frozen=True)
class EntropySumKernels:
    """The rows ``z_j = grad entropy_sum_j`` against the others, in the kernel's geometry
    (``z_j^T P x`` in ``adam``).

    ``cross``: float64 ``[n, n]``, ``<z_j, u_i>`` (the update rows; ``c_i <z_j, w_i>`` for a
    sequence without one); ``score``: float64 ``[n, n]``, ``<z_j, w_j'>``; ``gram``: float64
    ``[n, n]``, ``<z_j, z_j'>``; ``has_row``: bool ``[n]``, the sequences with a ``z`` row
    (the others' rows and columns are 0); ``applied``: float64 ``[n]``, ``<z_j, u>`` with the
    applied update row, or None; ``groups``: ``{group: [n, n] cross}`` of each parameter
    group's part of ``cross``, or None.
    """

    cross: FloatArray
    score: FloatArray
    gram: FloatArray
    has_row: BoolArray
    applied: FloatArray | None = None
    groups: Mapping[str, FloatArray] | None = field(default=None)

    def checked(self, n: int) -> EntropySumKernels:
        """Shapes checked: every matrix ``[n, n]`` finite, ``has_row`` ``[n]``."""
        has_row = np.asarray(self.has_row, dtype=bool).reshape(-1)
        if has_row.shape != (n,):
            raise ValueError(f"has_row must have {n} entries")
        applied = None
        if self.applied is not None:
            applied = np.asarray(self.applied, dtype=np.float64).reshape(-1)
            if applied.shape != (n,) or not np.all(np.isfinite(applied)):
                raise ValueError(f"<z_j, u> must be {n} finite values")
        return EntropySumKernels(
            cross=_finite_square(self.cross, n),
            score=_finite_square(self.score, n),
            gram=check_kernel(self.gram, n),
            has_row=has_row,
            applied=applied,
            groups=None
            if self.groups is None
            else {g: _finite_square(m, n) for g, m in self.groups.items()},
        )


def _finite_square(matrix: NDArray[Any], n: int) -> FloatArray:
    out = np.asarray(matrix, dtype=np.float64)
    if out.shape != (n, n) or not np.all(np.isfinite(out)):
        raise ValueError(f"expected a finite [{n}, {n}] matrix, got shape {out.shape}")
    return out


def uses_entropy_sums(
    seqs: StepSequences, ent: BoolArray, kernels: EntropySumKernels | None
) -> bool:
    """Whether the step's entropy gradient comes from the entropy sums: every row of ``E`` has
    its ``entropy_sum`` and its ``z`` row (a mix would change the baselines' meaning)."""
    if kernels is None or not ent.any():
        return False
    return bool(np.all(kernels.has_row[ent]) and np.all(np.isfinite(seqs.entropy_sum[ent])))


def _alpha(seqs: StepSequences, mask: BoolArray) -> FloatArray:
    """``(Hs_j - Hsbar_{p,-j}) / (B M_p)`` over ``mask`` (0 elsewhere)."""
    return centred_coefficients(seqs, seqs.entropy_sum, mask)


def _beta(seqs: StepSequences, mask: BoolArray) -> FloatArray:
    """``1 / (B M_p)`` over ``mask`` (0 elsewhere)."""
    return prompt_mean_weights(seqs, mask)[0]


def entropy_sum_coefficients(
    seqs: StepSequences, mask: BoolArray, halves: NDArray[np.int8] | None = None
) -> tuple[FloatArray, FloatArray]:
    """``(alpha, beta)``, float64 ``[n]`` each (0 outside ``mask``): ``grad_hat H = sum_j
    alpha_j w_j + beta_j z_j``; with ``halves`` (``cross_fit``) each half's own estimate
    (:func:`sketch.cross_fit.per_half`).  Needs ``entropy_sum`` on every row of ``mask``."""
    keep = np.asarray(mask, dtype=bool)
    if not np.all(np.isfinite(seqs.entropy_sum[keep])):
        raise ValueError("the entropy-sum gradient needs entropy_sum on every entropy row")
    if halves is None:
        return _alpha(seqs, keep), _beta(seqs, keep)
    return per_half(_alpha, seqs, keep, halves), per_half(_beta, seqs, keep, halves)


@dataclass(frozen=True)
class EntropySide:
    """``grad_hat H = sum_j alpha_j w_j + beta_j z_j`` and its products with the other rows
    (``beta`` is None for the score-only ``h_j`` of math.md §3, where ``alpha = h``)."""

    alpha: FloatArray
    beta: FloatArray | None = None
    kernels: EntropySumKernels | None = None

    def scaled(self, alpha: FloatArray, scale: float) -> EntropySide:
        """The same ``z`` part times ``scale`` with ``alpha`` replaced (the token mean's
        ``(h_j - T l_j) / Lbar``, whose ``z`` part is ``beta_j / Lbar``)."""
        beta = None if self.beta is None else self.beta * scale
        return EntropySide(alpha, beta, self.kernels)

    def cross(self, C: FloatArray, D: FloatArray | None = None) -> FloatArray:
        """float64 ``[n, n]``: ``<e_j, u_i>`` with ``e_j = alpha_j w_j + beta_j z_j``, from
        ``C(j, i) = <w_j, u_i>`` and ``D(j, i) = <z_j, u_i>`` (default the kernels' cross)."""
        out = self.alpha[:, None] * C
        if self.beta is not None:
            assert self.kernels is not None
            out = out + self.beta[:, None] * (self.kernels.cross if D is None else D)
        return out

    def applied(self, k_applied: FloatArray, z_applied: FloatArray | None) -> FloatArray:
        """float64 ``[n]``: ``<e_j, u>`` from ``<w_j, u>`` and ``<z_j, u>``."""
        out = self.alpha * k_applied
        if self.beta is not None:
            if z_applied is None:
                raise ValueError("the entropy-sum rows need their product with the applied update")
            out = out + self.beta * z_applied
        return out

    def gram(self, K: FloatArray) -> FloatArray:
        """float64 ``[n, n]``: ``<e_j, e_j'>`` from the score kernel ``K``."""
        a = self.alpha
        out = a[:, None] * K * a[None, :]
        if self.beta is not None:
            assert self.kernels is not None
            b = self.beta
            zw = b[:, None] * self.kernels.score * a[None, :]  # <beta z_j, alpha w_j'>
            out = out + zw + zw.T + b[:, None] * self.kernels.gram * b[None, :]
        return out


__all__ = [
    "EntropyGradient",
    "EntropySide",
    "EntropySumKernels",
    "entropy_sum_coefficients",
    "uses_entropy_sums",
]
