"""The token-mean entropy trainers log, its first-order change and its realized change (math.md §8).

TRL's ``entropy`` and verl's ``actor/entropy`` are the mean, over a batch's generated tokens, of
the full next-token distribution's entropy ``H_t`` at each position.  Its expectation over the
batch's prompts is the ratio

    T = sum_p E_p[sum_t H_t] / sum_p E_p[n] = Hbar / Lbar,

where ``E_p[sum_t H_t] = H(p)`` is the sequence entropy (the chain rule of entropy; math.md §3)
and ``Lbar = (1/B) sum_p E_p[n]`` the mean expected response length.  Hence

    grad T = (grad Hbar - T grad Lbar) / Lbar,   grad Lbar = (1/B) sum_p E_p[(n - b) w],

and the first-order change ``dT1 = eta <grad_hat T, g_hat>`` is the estimator of math.md §4
with the entropy-side coefficients

    h~_j = (h_j - T^ l_j) / Lbar^,   l_j = (n_j - nbar_{p,-j}) / (B M_p),

``h_j`` the sequence-entropy coefficients of §3 and ``T^ = Hbar^ / Lbar^`` the batch's levels
estimated from the same rows.  Every pair weight, decomposition and sketch error of §4 carries
over unchanged, because they are linear in the coefficients.

The levels are ratio estimates pooled over the batch's ``sum_p M_p`` rows, so ``dT1`` is
unbiased up to a term of relative order ``1 / sum_p M_p`` (not ``1 / M_p``); the standard error
adds the levels' uncertainty by the delta method (per-row influence values, grouped by prompt
like ``se_sampling``).

``Hbar^`` uses ``sum_t H_t`` per sequence where the trainer sent it (``entropy_sum``; an
unbiased, lower-variance stand-in for ``-S_j``: it averages the sampled token's surprisal over
the whole next-token distribution), else ``-S_j``.

The realized change needs, on the same rows, ``logprob_after`` (for the importance ratios
``r_j``) and ``entropy_sum`` / ``entropy_sum_after``.  Per prompt, with leave-one-out baselines
as in math.md §6,

    D_H(p) = mean_j [ r_j (Hs'_j - b_{-j}) - (Hs_j - b_{-j}) ]   (unbiased for H'(p) - H(p)),
    D_L(p) = mean_j [ (r_j - 1) (n_j - nb_{-j}) ]                (unbiased for L'(p) - L(p)),

and ``dT = (Hbar + D_H) / (Lbar + D_L) - Hbar / Lbar``, a ratio of unbiased pooled sums.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np
from numpy.typing import NDArray

from sketch.sequences import (
    FloatArray,
    StepSequences,
    centred_coefficients,
    group_sizes,
    leave_one_out_mean,
    per_prompt_covariance,
    prompt_mean_weights,
)


class Target(str, Enum):
    """Which entropy a prediction is about."""

    SEQUENCE = "sequence"  # H = (1/B) sum_p H(p), nats per response (math.md §3)
    TOKEN_MEAN = "token_mean"  # T = Hbar / Lbar, nats per token: what trainers log (§8)


@dataclass(frozen=True)
class Levels:
    """The batch's entropy and length levels over a set of rows.

    ``entropy``: ``Hbar^ = (1/B) sum_p mean_{j in p} H_j``, ``H_j`` = ``entropy_sum`` where
    known, else ``-S_j`` (nats per response); ``length``: ``Lbar^`` (tokens per response);
    ``token_mean``: ``T^ = entropy / length`` (nats per token).  ``entropy_parts`` /
    ``length_parts``: float64 ``[n]``, the per-row terms that sum to them (0 outside the rows).
    """

    entropy: float
    length: float
    entropy_parts: FloatArray
    length_parts: FloatArray

    @property
    def token_mean(self) -> float:
        return self.entropy / self.length


def sequence_entropies(seqs: StepSequences) -> FloatArray:
    """``H_j``: ``entropy_sum`` where the trainer sent it, else ``-S_j``; float64 ``[n]``.

    Both are unbiased for ``H(p)`` at a sampled response; ``entropy_sum`` replaces each
    token's surprisal by its conditional expectation given the prefix, so it varies less.
    """
    return np.where(np.isnan(seqs.entropy_sum), -seqs.logprob, seqs.entropy_sum)


def levels(seqs: StepSequences, mask: NDArray[Any]) -> Levels:
    """:class:`Levels` over the rows in ``mask``; raises ``ValueError`` when they are empty or
    have no tokens."""
    weight, _ = prompt_mean_weights(seqs, mask)
    if not weight.any():
        raise ValueError("no rows to estimate the token-mean entropy from")
    entropy_parts = sequence_entropies(seqs) * weight
    length_parts = seqs.num_tokens.astype(np.float64) * weight
    length = float(length_parts.sum())
    if length <= 0:
        raise ValueError("the rows have no tokens: the token-mean entropy is undefined")
    return Levels(float(entropy_parts.sum()), length, entropy_parts, length_parts)


def length_coefficients(seqs: StepSequences, mask: NDArray[Any]) -> FloatArray:
    """``l_j = (n_j - nbar_{p,-j}) / (B M_p)``, float64 ``[n]`` (0 outside ``mask``): with
    ``grad_hat Lbar = sum_j l_j w_j``, the score-function gradient of the mean expected length,
    a leave-one-out baseline as in math.md §3."""
    return centred_coefficients(seqs, seqs.num_tokens.astype(np.float64), mask)


def token_mean_coefficients(
    seqs: StepSequences, mask: NDArray[Any], h: FloatArray, lengths: FloatArray | None = None
) -> tuple[FloatArray, FloatArray, Levels]:
    """``(h~, l, levels)``: the token-mean coefficients ``h~_j = (h_j - T^ l_j) / Lbar^`` from
    the sequence-entropy coefficients ``h`` (float64 ``[n]``, math.md §3) over ``mask``;
    ``lengths``: the ``l_j`` when the estimator makes its own (``cross_fit``: per half), else
    :func:`length_coefficients` over ``mask``."""
    lv = levels(seqs, mask)
    g = length_coefficients(seqs, mask) if lengths is None else lengths
    return (h - lv.token_mean * g) / lv.length, g, lv


def leave_one_out_levels(seqs: StepSequences, mask: NDArray[Any]) -> tuple[FloatArray, FloatArray]:
    """``(Hbar^_{-i}, Lbar^_{-i})``, float64 ``[n]`` each: :func:`levels` over ``mask`` without
    row ``i`` (a prompt left without rows drops out of ``B``); the full levels where ``i`` is
    outside ``mask`` or is its only row.  For an update row that is also an entropy row (``E
    = U``): levels that do not depend on it, as its pairs' coefficients do not."""
    keep = np.asarray(mask, dtype=bool)
    lv = levels(seqs, keep)
    codes, prompts = seqs.prompt_index(keep)
    M = group_sizes(codes).astype(np.float64)
    B = float(len(prompts))
    H = sequence_entropies(seqs)
    n = seqs.num_tokens.astype(np.float64)
    entropy = np.full(seqs.n, lv.entropy)
    length = np.full(seqs.n, lv.length)
    sums_h = np.bincount(codes[keep], weights=H[keep], minlength=len(prompts))
    sums_n = np.bincount(codes[keep], weights=n[keep], minlength=len(prompts))
    for i in np.flatnonzero(keep):
        p, m = codes[i], M[i]
        if m >= 2:  # the prompt's mean without i
            entropy[i] = lv.entropy + ((sums_h[p] - H[i]) / (m - 1) - sums_h[p] / m) / B
            length[i] = lv.length + ((sums_n[p] - n[i]) / (m - 1) - sums_n[p] / m) / B
        elif B >= 2:  # the prompt drops out
            entropy[i] = (lv.entropy * B - sums_h[p]) / (B - 1)
            length[i] = (lv.length * B - sums_n[p]) / (B - 1)
    return entropy, length


def level_influence(lv: Levels, delta_entropy: float, delta_length: float) -> FloatArray:
    """Per-row influence of the levels on ``dT1 = (D_H - T D_L) / Lbar``, float64 ``[n]``.

    ``delta_entropy`` = ``D_H`` (the first-order change of ``Hbar``), ``delta_length`` = ``D_L``
    (of ``Lbar``).  Delta method: ``dT1 = D_H / Lbar - Hbar D_L / Lbar^2`` varies with ``Hbar``
    at ``-D_L / Lbar^2`` and with ``Lbar`` at ``-D_H / Lbar^2 + 2 Hbar D_L / Lbar^3``.
    """
    L = lv.length
    by_entropy = -delta_length / L**2
    by_length = -delta_entropy / L**2 + 2.0 * lv.entropy * delta_length / L**3
    return by_entropy * lv.entropy_parts + by_length * lv.length_parts


@dataclass(frozen=True)
class RealizedTokenMean:
    """The realized change of the token-mean entropy over a step (nats per token).

    ``before`` / ``after``: ``T`` before and after; ``delta`` = ``after - before``; ``se``: its
    standard error (``None`` when no prompt has two rows); ``delta_sequence``: the sequence
    entropy's change from the same rows (``D_H``, unbiased; the lower-variance alternative to
    math.md §6's estimate from log-probs alone); ``delta_sequence_se``; ``delta_length``: the
    mean expected length's change ``D_L``; ``num_sequences`` / ``num_prompts``: rows used.
    ``influence``: float64 ``[n]``, each row's first-order part of ``delta`` (0 outside
    ``mask``), for covariances with other per-row sums; ``mask``: bool ``[n]``, the rows used.
    """

    delta: float
    before: float
    after: float
    se: float | None
    delta_sequence: float
    delta_sequence_se: float | None
    delta_length: float
    num_sequences: int
    num_prompts: int
    influence: FloatArray
    mask: NDArray[np.bool_]


def _knows_the_step(seqs: StepSequences) -> NDArray[np.bool_]:
    """bool ``[n]``: rows with ``logprob_after``, ``entropy_sum`` and ``entropy_sum_after``."""
    return seqs.has_logprob_after & ~np.isnan(seqs.entropy_sum) & ~np.isnan(seqs.entropy_sum_after)


def _importance_ratios(seqs: StepSequences, keep: NDArray[np.bool_]) -> FloatArray:
    """``r_j = exp(S'_j - S_j)`` on the rows in ``keep``, 1 elsewhere: float64 ``[n]``."""
    return np.where(keep, np.exp(np.where(keep, seqs.logprob_after - seqs.logprob, 0.0)), 1.0)


def default_token_mean_mask(seqs: StepSequences) -> NDArray[np.bool_]:
    """Rows with ``logprob_after``, ``entropy_sum`` and ``entropy_sum_after`` known: the
    entropy-role ones if any, else the update-role ones (math.md §6's choice)."""
    known = _knows_the_step(seqs)
    ent = known & seqs.entropy_mask
    return ent if ent.any() else known & seqs.update_mask


def entropy_sum_change(seqs: StepSequences, mask: NDArray[Any]) -> FloatArray:
    """Per-row parts of ``D_H``, the sequence entropy's realized change from ``entropy_sum`` /
    ``entropy_sum_after`` (math.md §8): float64 ``[n]``, 0 outside ``mask``, whose sum is

        (1/B) sum_p mean_j [ r_j Hs'_j - b'_{-j} (r_j - 1) - Hs_j ],

    ``b'_{-j}`` the leave-one-out mean of ``Hs'`` over the prompt's other rows.  Unbiased at
    every ``M_p``: ``E[r_j Hs'_j] = H'(p)`` (chain rule under ``pi'``), ``E[Hs_j] = H(p)``, and
    ``b'_{-j}`` is independent of row ``j`` while ``E[r_j - 1] = 0``.  The control variate's
    coefficient is the *after* level, which ``Hs'`` scatters around, so the product
    ``(r_j - 1)(Hs'_j - b'_{-j})`` stays small even when the step moves the entropy a lot.
    Rows in ``mask`` must know ``logprob_after``, ``entropy_sum`` and ``entropy_sum_after``.
    """
    keep = np.asarray(mask, dtype=bool)
    weight, codes = prompt_mean_weights(seqs, keep)
    return _entropy_sum_parts(seqs, keep, weight, codes, _importance_ratios(seqs, keep))


def _entropy_sum_parts(
    seqs: StepSequences,
    keep: NDArray[np.bool_],
    weight: FloatArray,
    codes: NDArray[np.int64],
    r: FloatArray,
) -> FloatArray:
    """:func:`entropy_sum_change` from the rows' weights, prompt codes and ratios."""
    hs = np.where(keep, seqs.entropy_sum, 0.0)
    hs_after = np.where(keep, seqs.entropy_sum_after, 0.0)
    base = leave_one_out_mean(hs_after, codes)
    return (r * hs_after - base * (r - 1.0) - hs) * weight


def _ratio_of_sums(
    x: FloatArray, y: FloatArray, codes: NDArray[np.int64]
) -> tuple[float, FloatArray]:
    """``sum x / sum y`` with its second-order bias removed, and its per-row influence.

    ``E[X / Y] ~ mu_X / mu_Y + (mu_X Var Y / mu_Y - Cov(X, Y)) / mu_Y^2`` for sums ``X``, ``Y`` of
    per-row parts (Tin 1965), with the variances estimated per prompt like ``se_sampling``: the
    bias drops from order ``1 / sum_p M_p`` to its square.  ``influence = (x - R y) / sum y``.
    """
    X, Y = float(x.sum()), float(y.sum())
    R = X / Y
    var_y = per_prompt_covariance(y, y, codes) or 0.0
    cov_xy = per_prompt_covariance(x, y, codes) or 0.0
    return R - (R * var_y - cov_xy) / Y**2, (x - R * y) / Y


def realized_token_mean(
    seqs: StepSequences, mask: NDArray[Any] | None = None
) -> RealizedTokenMean | None:
    """The realized token-mean entropy change from the rows in ``mask`` (default
    :func:`default_token_mean_mask`); ``None`` when no row has what it needs or no tokens.

    ``T = X / Y`` before and after, ``X = (1/B) sum_p mean_j Hs_j`` (+ ``D_H`` after, from
    :func:`entropy_sum_change`), ``Y = (1/B) sum_p mean_j n_j`` (+ ``D_L`` after, ``D_L`` =
    ``(1/B) sum_p mean_j (r_j - 1)(n_j - nbar_{p,-j})``, unbiased), each ratio corrected for its
    second-order bias; ``se`` by the delta method over the rows' influence values.
    """
    chosen = default_token_mean_mask(seqs) if mask is None else np.asarray(mask, bool)
    keep = chosen & _knows_the_step(seqs)
    if not keep.any():
        return None
    weight, codes = prompt_mean_weights(seqs, keep)
    n = seqs.num_tokens.astype(np.float64)
    if float((n * weight).sum()) <= 0:
        return None
    r = _importance_ratios(seqs, keep)
    entropy_parts = np.where(keep, seqs.entropy_sum, 0.0) * weight
    length_parts = n * weight
    dh_parts = _entropy_sum_parts(seqs, keep, weight, codes, r)
    dl_parts = (r - 1.0) * (n - leave_one_out_mean(n, codes)) * weight
    before, before_influence = _ratio_of_sums(entropy_parts, length_parts, codes)
    after, after_influence = _ratio_of_sums(
        entropy_parts + dh_parts, length_parts + dl_parts, codes
    )
    influence = after_influence - before_influence
    return RealizedTokenMean(
        delta=after - before,
        before=before,
        after=after,
        se=_sqrt(per_prompt_covariance(influence, influence, codes)),
        delta_sequence=float(dh_parts.sum()),
        delta_sequence_se=_sqrt(per_prompt_covariance(dh_parts, dh_parts, codes)),
        delta_length=float(dl_parts.sum()),
        num_sequences=int(keep.sum()),
        num_prompts=int(codes.max()) + 1,
        influence=influence,
        mask=keep,
    )


def _sqrt(variance: float | None) -> float | None:
    return None if variance is None else math.sqrt(max(variance, 0.0))


__all__ = [
    "Levels",
    "RealizedTokenMean",
    "Target",
    "default_token_mean_mask",
    "entropy_sum_change",
    "leave_one_out_levels",
    "length_coefficients",
    "level_influence",
    "levels",
    "realized_token_mean",
    "sequence_entropies",
    "token_mean_coefficients",
]
