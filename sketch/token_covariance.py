"""Cui et al. 2025's token covariance held against the exact token shares (math.md §9).

Cui et al. (2025, "The Entropy Mechanism of Reinforcement Learning for Reasoning Language
Models") show that under an identity kernel a token's effect on the entropy is proportional to
``-Cov(log pi(y_t), A)``, and their KL-Cov and Clip-Cov losses (verl's ``kl_cov`` /
``clip_cov`` policy losses, ``verl/trainer/ppo/core_algos.py``) act on the tokens with the
largest centred product over a micro-batch's valid tokens,

    cov_{i,t} = (A_{i,t} - mean A) (log pi(y_{i,t}) - mean log pi),

means over all valid tokens.  KL-Cov penalises the ``max(1, int(n * kl_cov_ratio))`` tokens of
largest ``cov``; Clip-Cov detaches a random ``max(1, int(n * clip_cov_ratio))`` of the tokens
with ``clip_cov_lb < cov < clip_cov_ub`` (verl's defaults: ratios ``0.0002``, bounds 1 and 5).
kernelscope has the exact share ``a_{i,t}`` of every token in the step's ``dH1``
(``clients.token_shares``), so it can say whether the covariance picks the tokens that really
push the entropy down, and how much of ``dH1`` it holds.

Inputs are flat float64 arrays over the step's update tokens (shapes ``[n]``); no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]

#: verl's defaults for ``kl_cov`` / ``clip_cov``.
KL_COV_RATIO = 0.0002
CLIP_COV_RATIO = 0.0002
CLIP_COV_LB = 1.0
CLIP_COV_UB = 5.0


@dataclass(frozen=True)
class CovarianceOptions:
    """KL-Cov's and Clip-Cov's knobs (verl's defaults); ratios in ``(0, 1]``, ``lb < ub``."""

    kl_cov_ratio: float = KL_COV_RATIO
    clip_cov_ratio: float = CLIP_COV_RATIO
    clip_cov_lb: float = CLIP_COV_LB
    clip_cov_ub: float = CLIP_COV_UB

    def __post_init__(self) -> None:
        ratios = (self.kl_cov_ratio, self.clip_cov_ratio)
        if not (all(0 < r <= 1 for r in ratios) and self.clip_cov_lb < self.clip_cov_ub):
            raise ValueError("ratios must be in (0, 1] and clip_cov_lb < clip_cov_ub")


def covariance_scores(logprob: FloatArray, advantage: FloatArray) -> FloatArray:
    """verl's ``cov_all``: ``(A - mean A)(log pi - mean log pi)`` over the tokens, ``[n]``."""
    return (advantage - advantage.mean()) * (logprob - logprob.mean())


def selected_count(num_tokens: int, ratio: float) -> int:
    """verl's ``max(1, int(n * ratio))``."""
    return max(1, int(num_tokens * ratio))


@dataclass(frozen=True)
class CovarianceComparison:
    """How Cui et al.'s token covariance compares with the exact shares of one step.

    ``k``: KL-Cov's selection size ``max(1, int(n kl_cov_ratio))``; ``precision_at_k``: the
    fraction of KL-Cov's ``k`` tokens among the ``k`` tokens whose share pushes the entropy
    down most (most negative ``a``); ``spearman``: rank correlation of ``cov`` with ``-a`` over
    all tokens (``None`` when either is constant); ``selected_share``: the part of the step's
    ``dH1`` (the sum of all shares) that KL-Cov's tokens carry, ``selected_sum`` its value;
    ``clip_candidates``: Clip-Cov's candidate tokens (``lb < cov < ub``), ``clip_k`` how many it
    detaches at random among them, ``clip_candidate_share`` the part of ``dH1`` the candidates
    carry (a random ``clip_k`` of them carries ``clip_k / clip_candidates`` of it on average).
    """

    num_tokens: int
    kl_cov_ratio: float
    k: int
    precision_at_k: float
    spearman: float | None
    selected_sum: float
    selected_share: float | None
    clip_cov_ratio: float
    clip_cov_lb: float
    clip_cov_ub: float
    clip_k: int
    clip_candidates: int
    clip_candidate_share: float | None


def compare_covariance(
    shares: FloatArray,
    logprob: FloatArray,
    advantage: FloatArray,
    options: CovarianceOptions | None = None,
) -> CovarianceComparison:
    """Compare KL-Cov's and Clip-Cov's token choices with the exact shares ``a_{i,t}``.

    ``shares``, ``logprob`` (each token's ``log pi(y_{i,t} | ...)``) and ``advantage`` (its
    ``A_{i,t}``; a sequence's ``A_i`` on each of its tokens in GRPO): float64 ``[n]``, ``n >= 1``,
    finite.  Ties in the rankings are broken by token order (stable sorts).
    """
    a = np.asarray(shares, dtype=np.float64).reshape(-1)
    lp = np.asarray(logprob, dtype=np.float64).reshape(-1)
    adv = np.asarray(advantage, dtype=np.float64).reshape(-1)
    n = a.size
    if n == 0 or lp.shape != (n,) or adv.shape != (n,):
        raise ValueError("shares, logprob and advantage must be non-empty and of one length")
    if not (np.isfinite(a).all() and np.isfinite(lp).all() and np.isfinite(adv).all()):
        raise ValueError("shares, logprob and advantage must be finite")
    o = options or CovarianceOptions()
    cov = covariance_scores(lp, adv)
    k = min(selected_count(n, o.kl_cov_ratio), n)
    chosen = np.argsort(-cov, kind="stable")[:k]
    truth = np.argsort(a, kind="stable")[:k]
    total = float(a.sum())
    selected_sum = float(a[chosen].sum())
    spearman: float | None = None
    if np.ptp(cov) > 0 and np.ptp(a) > 0:
        # imported here: scipy.stats costs every API and worker process half a second at start
        from scipy.stats import spearmanr

        rho = float(spearmanr(cov, -a).statistic)
        spearman = rho if math.isfinite(rho) else None
    candidates = (cov > o.clip_cov_lb) & (cov < o.clip_cov_ub)
    return CovarianceComparison(
        num_tokens=n,
        kl_cov_ratio=o.kl_cov_ratio,
        k=k,
        precision_at_k=len(set(chosen.tolist()) & set(truth.tolist())) / k,
        spearman=spearman,
        selected_sum=selected_sum,
        selected_share=selected_sum / total if total != 0.0 else None,
        clip_cov_ratio=o.clip_cov_ratio,
        clip_cov_lb=o.clip_cov_lb,
        clip_cov_ub=o.clip_cov_ub,
        clip_k=selected_count(n, o.clip_cov_ratio),
        clip_candidates=int(candidates.sum()),
        clip_candidate_share=float(a[candidates].sum()) / total if total != 0.0 else None,
    )


__all__ = [
    "CLIP_COV_LB",
    "CLIP_COV_RATIO",
    "CLIP_COV_UB",
    "KL_COV_RATIO",
    "CovarianceComparison",
    "CovarianceOptions",
    "compare_covariance",
    "covariance_scores",
    "selected_count",
]
