"""Cui et al.'s token covariance (sketch/token_covariance.py) against verl's own selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sketch.token_covariance import CovarianceOptions, compare_covariance, covariance_scores


def verl_kl_cov_selection(
    logprob: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, ratio: float
) -> set[int]:
    """verl's ``compute_policy_loss_kl_cov`` selection, transcribed: the flat indices (over the
    valid tokens, in order) of the ``max(1, int(n * ratio))`` largest centred products."""
    valid = mask > 0
    adv = advantages[valid].reshape(-1)
    logp = logprob[valid].reshape(-1)
    cov = (adv - adv.mean()) * (logp - logp.mean())
    k = max(1, int(len(cov) * ratio))
    return set(torch.topk(cov, k, largest=True).indices.tolist())


def test_kl_cov_selection_and_scores_are_verls() -> None:
    """On a padded micro-batch (8 sequences, GRPO advantages on every token), the scores are
    verl's ``cov_all`` over the valid tokens and KL-Cov's chosen tokens are verl's, at its
    default ratio and at a ratio that picks many."""
    gen = torch.Generator().manual_seed(0)
    logprob = -torch.rand(8, 12, generator=gen, dtype=torch.float64) * 4
    lengths = torch.randint(3, 13, (8,), generator=gen)
    mask = (torch.arange(12)[None] < lengths[:, None]).double()
    advantages = torch.randn(8, 1, generator=gen, dtype=torch.float64).expand(8, 12)
    valid = mask > 0
    lp, adv = logprob[valid].numpy(), advantages[valid].numpy()
    shares = np.random.default_rng(1).normal(size=lp.size)
    for ratio in (0.0002, 0.2):
        got = compare_covariance(shares, lp, adv, CovarianceOptions(kl_cov_ratio=ratio))
        chosen = verl_kl_cov_selection(logprob, advantages, mask, ratio)
        assert got.k == len(chosen)
        ours = set(np.argsort(-covariance_scores(lp, adv), kind="stable")[: got.k].tolist())
        assert ours == chosen
        assert got.selected_sum == pytest.approx(shares[sorted(chosen)].sum())


def test_comparison_on_a_known_case() -> None:
    """Shares that are exactly minus the covariance: precision 1 and Spearman 1; shares of the
    opposite sign: precision 0 and Spearman -1.  Clip-Cov's candidates are the tokens with
    ``lb < cov < ub``."""
    lp = np.array([-0.1, -3.0, -0.5, -4.0, -1.0, -2.0])
    adv = np.array([1.0, 1.0, -1.0, -1.0, 2.0, -2.0])
    cov = covariance_scores(lp, adv)
    options = CovarianceOptions(kl_cov_ratio=0.5, clip_cov_lb=0.5, clip_cov_ub=5)
    agree = compare_covariance(-cov, lp, adv, options)
    assert agree.k == 3 and agree.precision_at_k == 1.0
    assert agree.spearman == pytest.approx(1.0)
    assert agree.clip_candidates == int(((cov > 0.5) & (cov < 5)).sum())
    assert agree.selected_share == pytest.approx(-np.sort(cov)[::-1][:3].sum() / -cov.sum())
    oppose = compare_covariance(cov, lp, adv, CovarianceOptions(kl_cov_ratio=0.5))
    assert oppose.precision_at_k == 0.0 and oppose.spearman == pytest.approx(-1.0)


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError):
        compare_covariance(np.zeros(0), np.zeros(0), np.zeros(0))
    with pytest.raises(ValueError):
        compare_covariance(np.ones(2), np.array([0.0, np.nan]), np.ones(2))
    with pytest.raises(ValueError):
        CovarianceOptions(kl_cov_ratio=0.0)
    with pytest.raises(ValueError):
        CovarianceOptions(clip_cov_lb=5.0, clip_cov_ub=1.0)
