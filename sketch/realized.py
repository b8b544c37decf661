"""Realized entropy change of a step and the step's size, to judge the prediction (math.md §6).

From ``logprob_after``: per prompt ``p``, the ``M_p`` sequences ``j`` of that prompt were
sampled from ``pi(.|p)``; ``S_j = log pi(t_j|p)``, ``S'_j = log pi'(t_j|p)`` and the importance
ratios ``r_j = exp(S'_j - S_j) = pi'(t_j|p) / pi(t_j|p)`` give ``E_pi'[f] = E_pi[r f]``.

* ``control_variate`` (the default): ordinary importance sampling with ``E_pi[r] = 1`` as a
  control variate whose coefficient is the leave-one-out mean ``b_{p,-j}`` of ``S`` over the
  prompt's other samples,

      dH(p) ~ -(1/M_p) sum_j [ r_j (S'_j - b_{p,-j}) - (S_j - b_{p,-j}) ].

  Exactly unbiased for every ``M_p >= 1``: ``b_{p,-j}`` does not depend on sample ``j``, so
  ``E[r_j b_{p,-j}] = E[b_{p,-j}]`` and ``E[r_j S'_j] = E_pi'[S']``.  To first order in the
  step it is ``-(1/M_p) sum_j (S'_j - S_j)(1 + S_j - b_{p,-j})``: the sample covariance of
  ``S' - S`` and ``S`` with divisor ``M_p - 1`` instead of SNIS's ``M_p`` (math.md §6).
* ``snis``: self-normalised importance sampling, ``H_after(p) ~ -sum_j r_j S'_j / sum_j r_j``,
  ``H_before(p) ~ -mean_j S_j``.  Consistent but biased toward zero by a factor ``(M_p - 1) /
  M_p`` at first order (0.75 at ``M_p = 4``); kept for comparison as ``delta_h_snis``.

``dH_realized = (1/B) sum_p dH(p)``, with the standard error of a sum of independent per-prompt
means, ``se^2 = sum_p M_p var_{j in p}(x_j)`` over the per-row parts ``x_j`` (ddof 1).

The step's size is ``KL(pi || pi') = (1/B) sum_p E_pi[S - S']``, estimated per prompt by
``mean_j [(r_j - 1) - log r_j]`` (Schulman's "k3": ``mean(S - S')`` plus the zero-mean control
variate ``r - 1``; unbiased, never negative, and of order ``|S' - S|^2`` per sample instead of
``|S' - S|``, so that its standard error is small next to the KL at small steps).

Or the trainer posts ``entropy_before`` / ``entropy_after`` and the change is their difference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy.special import logsumexp

from sketch.sequences import (
    FloatArray,
    StepSequences,
    group_sizes,
    leave_one_out_mean,
    per_prompt_covariance,
)
from sketch.token_mean import entropy_sum_change


class RealizedEstimator(str, Enum):
    """How ``dH_realized`` is estimated from ``logprob_after`` (math.md §6)."""

    CONTROL_VARIATE = "control_variate"
    SNIS = "snis"


@dataclass(frozen=True)
class Realized:
    """A realized entropy change.

    ``source`` is ``"logprob_after"`` (estimated from the sequences' log-probs),
    ``"entropy_sum"`` (from their entropy sums too, math.md §8), ``"posted"`` (the
    trainer's entropy_before / entropy_after) or ``"given"`` (a number passed by the caller).
    ``entropy_before`` / ``entropy_after`` are the prompt-averaged sequence entropies in nats
    (``None`` when only the change is known); ``num_sequences`` / ``num_prompts`` count the
    rows used for the ``logprob_after`` estimate (0 otherwise).

    From ``logprob_after`` only: ``estimator`` (which one gave ``delta_h``), ``se`` (its standard
    error; ``None`` when no prompt has two rows), ``delta_h_snis`` (the self-normalised
    estimate, for comparison), ``kl`` / ``kl_se`` (``KL(pi || pi')`` per prompt, averaged over
    prompts, and its standard error).
    """

    delta_h: float
    source: str
    entropy_before: float | None = None
    entropy_after: float | None = None
    num_sequences: int = 0
    num_prompts: int = 0
    estimator: RealizedEstimator | None = None
    se: float | None = None
    delta_h_snis: float | None = None
    kl: float | None = None
    kl_se: float | None = None


@dataclass(frozen=True)
class RealizedParts:
    """A ``logprob_after`` estimate with its per-row parts (for covariances with other sums).

    ``delta``: float64 ``[n]``, ``x_j`` with ``sum_j x_j = realized.delta_h`` (0 outside
    ``mask``); ``mask``: bool ``[n]``, the rows used.
    """

    realized: Realized
    delta: FloatArray
    mask: NDArray[np.bool_]


def default_realized_mask(seqs: StepSequences) -> NDArray[np.bool_]:
    """The rows used by default: entropy-role rows with ``logprob_after`` if there are any,
    else update-role rows with it.

    Entropy-role rows were not used to build the step, so the importance-sampling estimate of
    ``H_after`` over them is free of the selection effect of the update (the step raised the
    probability of exactly the update samples with positive advantage).
    """
    known = seqs.has_logprob_after
    ent = known & seqs.entropy_mask
    if ent.any():
        return ent
    return known & seqs.update_mask


def realized_parts(
    seqs: StepSequences,
    mask: NDArray[Any] | None = None,
    estimator: RealizedEstimator | str = RealizedEstimator.CONTROL_VARIATE,
) -> RealizedParts | None:
    """``dH_realized`` from ``logprob_after`` over the rows in ``mask``, with its per-row parts.

    ``mask`` defaults to :func:`default_realized_mask`; rows whose ``logprob_after`` is unknown
    are dropped.  ``estimator`` picks ``delta_h``; the SNIS value is always in
    ``delta_h_snis``.  Returns ``None`` when no row is usable.
    """
    est = RealizedEstimator(estimator)
    keep = default_realized_mask(seqs) if mask is None else np.asarray(mask, dtype=bool)
    keep = keep & seqs.has_logprob_after
    if not keep.any():
        return None
    codes, prompts = seqs.prompt_index(keep)
    B = len(prompts)
    M = group_sizes(codes).astype(np.float64)
    idx = np.flatnonzero(keep)
    S = seqs.logprob[idx]
    S_after = seqs.logprob_after[idx]
    log_r = S_after - S
    r = np.exp(log_r)
    base = leave_one_out_mean(seqs.logprob, codes)[idx]
    weight = 1.0 / (B * M[idx])

    # With the trainer's per-sequence entropy sums on every row, the lower-variance estimate
    # of math.md §8 (same unbiasedness); else the log-probs alone.
    sums = bool(np.all(~np.isnan(seqs.entropy_sum[idx]) & ~np.isnan(seqs.entropy_sum_after[idx])))
    cv = np.zeros(seqs.n)
    if sums:
        cv = entropy_sum_change(seqs, keep)
    else:
        cv[idx] = -(r * (S_after - base) - (S - base)) * weight
    kl = np.zeros(seqs.n)
    kl[idx] = (np.expm1(log_r) - log_r) * weight

    snis = 0.0
    for p in range(B):
        rows = codes[idx] == p
        w = np.exp(log_r[rows] - logsumexp(log_r[rows]))
        snis += (-float(np.sum(w * S_after[rows])) + float(S[rows].mean())) / B

    h_before = float(np.sum(seqs.entropy_sum[idx] * weight)) if sums else -float(np.sum(S * weight))
    use_cv = est is RealizedEstimator.CONTROL_VARIATE
    delta = float(cv.sum()) if use_cv else snis
    realized = Realized(
        delta_h=delta,
        source="entropy_sum" if sums and use_cv else "logprob_after",
        entropy_before=h_before,
        entropy_after=h_before + delta,
        num_sequences=int(keep.sum()),
        num_prompts=B,
        estimator=est,
        se=_sqrt(per_prompt_covariance(cv, cv, codes)) if use_cv else None,
        delta_h_snis=snis,
        kl=float(kl.sum()),
        kl_se=_sqrt(per_prompt_covariance(kl, kl, codes)),
    )
    return RealizedParts(realized=realized, delta=cv if use_cv else np.zeros(seqs.n), mask=keep)


def _sqrt(variance: float | None) -> float | None:
    return None if variance is None else math.sqrt(max(variance, 0.0))


def realized_from_logprobs(
    seqs: StepSequences,
    mask: NDArray[Any] | None = None,
    estimator: RealizedEstimator | str = RealizedEstimator.CONTROL_VARIATE,
) -> Realized | None:
    """``dH_realized`` from ``logprob_after`` (see :func:`realized_parts`)."""
    parts = realized_parts(seqs, mask, estimator)
    return None if parts is None else parts.realized


def realized_from_entropies(entropy_before: float, entropy_after: float) -> Realized:
    """``dH_realized = entropy_after - entropy_before`` as posted by the trainer."""
    before = float(entropy_before)
    after = float(entropy_after)
    if not (np.isfinite(before) and np.isfinite(after)):
        raise ValueError("entropy_before and entropy_after must be finite")
    return Realized(
        delta_h=after - before, source="posted", entropy_before=before, entropy_after=after
    )
