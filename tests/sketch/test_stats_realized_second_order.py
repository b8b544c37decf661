"""Realized entropy change (math.md §6) and second order dH2 (math.md §4) on known answers.

The exact reference is a two-token autoregressive softmax policy over a vocabulary of 3
(9 sequences, 12 parameters) whose entropy, gradient and Hessian are computed by enumeration
and autograd.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from sketch.entropy import entropy_change, entropy_coefficients
from sketch.realized import (
    RealizedEstimator,
    default_realized_mask,
    realized_from_entropies,
    realized_from_logprobs,
)
from sketch.second_order import curvature, delta_h2, displacement
from sketch.sequences import Role, StepSequences, leave_one_out_mean

V = 3
SEQS = list(itertools.product(range(V), repeat=2))


def seq_logprobs(theta: torch.Tensor) -> torch.Tensor:
    """``S(t)`` for all 9 sequences: theta[:V] first-token logits, theta[V:] the V x V
    second-token logits given the first token."""
    first = torch.log_softmax(theta[:V], 0)
    second = torch.log_softmax(theta[V:].reshape(V, V), 1)
    return torch.stack([first[a] + second[a, b] for a, b in SEQS])


def entropy(theta: torch.Tensor) -> torch.Tensor:
    S = seq_logprobs(theta)
    return -(S.exp() * S).sum()


def model(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]:
    """(theta, probs, S, W): parameters, sequence probabilities, log-probs and scores [9, 12]."""
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(V + V * V, generator=gen, dtype=torch.float64)
    S = seq_logprobs(theta)
    W = torch.autograd.functional.jacobian(seq_logprobs, theta)
    return theta, S.exp(), S, W.numpy()


# ----------------------------------------------------------------------------- realized


def test_realized_by_hand() -> None:
    """Both estimators of math.md §6 on three rows written out: prompt ``a`` with two rows
    (leave-one-out baselines ``b_1 = S_2``, ``b_2 = S_1``), prompt ``b`` with one (baseline 0);
    and the KL estimate ``mean((r - 1) - log r)``."""
    seqs = StepSequences.from_records(
        [
            {"id": "1", "prompt_id": "a", "logprob": -2.0, "advantage": 0, "num_tokens": 1},
            {"id": "2", "prompt_id": "a", "logprob": -4.0, "advantage": 0, "num_tokens": 1},
            {"id": "3", "prompt_id": "b", "logprob": -1.0, "advantage": 0, "num_tokens": 1},
        ]
    )
    S = seqs.logprob
    after = np.array([-1.5, -4.5, -1.2])
    seqs = with_after(seqs, S, after)
    r = np.exp(after - S)
    # control variate: dH(p) = -mean_j [r_j (S'_j - b_j) - (S_j - b_j)]
    cv_a = -(
        (r[0] * (after[0] - S[1]) - (S[0] - S[1])) + (r[1] * (after[1] - S[0]) - (S[1] - S[0]))
    )
    cv_a /= 2
    cv_b = -(r[2] * after[2] - S[2])
    # snis: -sum r S' / sum r + mean S
    snis_a = -(r[0] * after[0] + r[1] * after[1]) / (r[0] + r[1]) - 3.0
    snis_b = 1.2 - 1.0
    out = realized_from_logprobs(seqs)
    assert out is not None and out.source == "logprob_after"
    assert out.estimator is RealizedEstimator.CONTROL_VARIATE
    assert out.delta_h == pytest.approx((cv_a + cv_b) / 2, rel=1e-13)
    assert out.delta_h_snis == pytest.approx((snis_a + snis_b) / 2, rel=1e-13)
    assert out.entropy_before == pytest.approx((3.0 + 1.0) / 2)
    assert out.entropy_after == pytest.approx(out.entropy_before + out.delta_h)
    assert out.num_prompts == 2 and out.num_sequences == 3
    kl = (np.expm1(after - S) - (after - S)) / np.array([4.0, 4.0, 2.0])
    assert out.kl == pytest.approx(kl.sum(), rel=1e-13)
    # se: only prompt a has two rows; its parts are x_j / (B M_p), M_p var(x) = 2 var(x).
    x = np.array(
        [r[0] * (after[0] - S[1]) - (S[0] - S[1]), r[1] * (after[1] - S[0]) - (S[1] - S[0])]
    )
    assert out.se == pytest.approx(math.sqrt(2 * np.var(-x / 4, ddof=1)), rel=1e-12)
    snis = realized_from_logprobs(seqs, estimator="snis")
    assert snis is not None and snis.delta_h == pytest.approx(out.delta_h_snis, rel=1e-15)
    assert snis.se is None


def test_realized_is_shift_invariant_with_two_rows_per_prompt() -> None:
    """Sequence log-probs of thousands of nats: the estimate moves by rounding only (every
    prompt has a leave-one-out baseline; a prompt with one row has baseline 0, see math.md)."""
    records = [
        {"id": str(i), "prompt_id": "ab"[i // 2], "logprob": lp, "advantage": 0, "num_tokens": 1}
        for i, lp in enumerate([-2.0, -4.0, -1.0, -3.0])
    ]
    seqs = StepSequences.from_records(records)
    after = np.array([-1.5, -4.5, -1.2, -2.0])
    out = realized_from_logprobs(with_after(seqs, seqs.logprob, after))
    far = realized_from_logprobs(with_after(seqs, seqs.logprob - 3000.0, after - 3000.0))
    assert out is not None and far is not None
    assert far.delta_h == pytest.approx(out.delta_h, rel=1e-9)
    assert far.delta_h_snis == pytest.approx(out.delta_h_snis, rel=1e-9)
    assert far.kl == pytest.approx(out.kl, rel=1e-9)


def with_after(seqs: StepSequences, logprob: np.ndarray, after: np.ndarray) -> StepSequences:
    return StepSequences(
        ids=seqs.ids,
        prompt_ids=seqs.prompt_ids,
        logprob=logprob,
        advantage=seqs.advantage,
        num_tokens=seqs.num_tokens,
        logprob_after=after,
    )


def test_realized_default_rows_and_posted() -> None:
    seqs = StepSequences.from_records(
        [
            {"id": "u", "prompt_id": "a", "logprob": -1, "advantage": 1, "num_tokens": 1},
            {
                "id": "e",
                "prompt_id": "a",
                "logprob": -2,
                "advantage": 0,
                "num_tokens": 1,
                "role": "entropy",
                "logprob_after": -2.5,
            },
            {"id": "x", "prompt_id": "a", "logprob": -3, "advantage": 0, "num_tokens": 1},
        ]
    )
    np.testing.assert_array_equal(default_realized_mask(seqs), [False, True, False])
    out = realized_from_logprobs(seqs)
    # one row: plain importance sampling, -(r S' - S); SNIS would say 0.5
    assert out is not None and out.delta_h == pytest.approx(2.5 * math.exp(-0.5) - 2.0)
    assert out.delta_h_snis == pytest.approx(0.5)
    none = StepSequences.from_records(
        [{"id": "u", "prompt_id": "a", "logprob": -1, "advantage": 1, "num_tokens": 1}]
    )
    assert realized_from_logprobs(none) is None
    posted = realized_from_entropies(4.0, 3.25)
    assert posted.delta_h == -0.75 and posted.source == "posted"
    with pytest.raises(ValueError):
        realized_from_entropies(float("nan"), 1.0)


def test_realized_on_known_distribution() -> None:
    """Samples from pi; the estimate of H(pi') - H(pi) is unbiased (control variate)."""
    theta, probs, S_all, _ = model(0)
    gen = torch.Generator().manual_seed(1)
    u = 0.3 * torch.randn(theta.shape, generator=gen, dtype=torch.float64)
    S_after_all = seq_logprobs(theta + u)
    exact = float(entropy(theta + u) - entropy(theta))
    rng = np.random.default_rng(2)
    prompts, M = 40, 400
    per_prompt = []
    records = []
    for p in range(prompts):
        idx = rng.choice(len(SEQS), size=M, p=probs.numpy())
        for k, t in enumerate(idx):
            records.append(
                {
                    "id": f"{p}-{k}",
                    "prompt_id": f"p{p}",
                    "logprob": float(S_all[t]),
                    "advantage": 0.0,
                    "num_tokens": 2,
                    "logprob_after": float(S_after_all[t]),
                }
            )
    seqs = StepSequences.from_records(records)
    total = realized_from_logprobs(seqs)
    assert total is not None and total.num_prompts == prompts
    for p in range(prompts):
        one = realized_from_logprobs(seqs, np.array([pid == f"p{p}" for pid in seqs.prompt_ids]))
        assert one is not None
        per_prompt.append(one.delta_h)
    se = float(np.std(per_prompt, ddof=1) / math.sqrt(prompts))
    assert total.delta_h == pytest.approx(float(np.mean(per_prompt)), rel=1e-12)
    assert abs(total.delta_h - exact) < 4 * se, (total.delta_h, exact, se)
    assert se < 0.1 * abs(exact)  # the check has power


# ----------------------------------------------------------------------------- second order


def test_delta_h2_against_loop() -> None:
    rng = np.random.default_rng(3)
    n = 9
    pids = ["a", "b", "a", "c", "a", "b", "c", "c", "d"]
    roles = [Role.UPDATE] * 6 + [Role.ENTROPY] * 3
    S = -rng.uniform(1, 20, size=n)
    after = S + rng.normal(scale=0.1, size=n)
    seqs = StepSequences(
        ids=[str(i) for i in range(n)],
        prompt_ids=pids,
        logprob=S,
        advantage=rng.normal(size=n),
        num_tokens=np.ones(n, dtype=np.int64),
        role=roles,
        logprob_after=after,
    )
    d = rng.normal(scale=0.1, size=n)
    q = curvature(seqs, d)
    np.testing.assert_allclose(q, 2 * (after - S - d))
    mask = seqs.update_mask
    E = [j for j in range(n) if mask[j]]
    prompts = sorted({pids[j] for j in E})
    total = 0.0
    for p in prompts:
        members = [j for j in E if pids[j] == p]
        for j in members:
            others = [S[k] for k in members if k != j]
            base = np.mean(others) if others else 0.0
            total += (-(d[j] ** 2) - (S[j] - base) * (d[j] ** 2 + q[j])) / len(members)
    assert delta_h2(seqs, mask, d) == pytest.approx(0.5 * total / len(prompts), rel=1e-12)
    # Unknown logprob_after on a row of E: no estimate.
    partial = after.copy()
    partial[0] = np.nan
    seqs_partial = StepSequences(
        ids=seqs.ids,
        prompt_ids=pids,
        logprob=S,
        advantage=seqs.advantage,
        num_tokens=seqs.num_tokens,
        role=roles,
        logprob_after=partial,
    )
    assert delta_h2(seqs_partial, mask, d) is None
    assert delta_h2(seqs_partial, seqs.entropy_mask, d) is not None
    # displacement: eta K c, or k_applied verbatim.
    K = np.diag(np.arange(1.0, n + 1))
    c = np.ones(n)
    np.testing.assert_allclose(displacement(K, c, 0.5), 0.5 * np.arange(1.0, n + 1))
    np.testing.assert_allclose(displacement(K, c, 0.5, k_applied=np.ones(n)), np.ones(n))


def test_second_order_formula_exact_on_two_token_model() -> None:
    """math.md §4: u^T (d^2 H) u = -E[d^2] - E[(S - Sbar)(d^2 + q)] with d = <w, u> and
    q ~ 2 (S' - S - d), by exact enumeration; and dH1 = -E[(S - Sbar) d] = <grad H, u>."""
    theta, probs, S, W = model(4)
    gen = torch.Generator().manual_seed(5)
    u = 0.01 * torch.randn(theta.shape, generator=gen, dtype=torch.float64)
    hess = torch.autograd.functional.hessian(entropy, theta)
    grad = torch.autograd.functional.jacobian(entropy, theta)
    exact_h2 = 0.5 * float(u @ hess @ u)
    exact_h1 = float(grad @ u)
    p = probs.numpy()
    Sn = S.numpy()
    d = W @ u.numpy()
    q = 2 * (seq_logprobs(theta + u).numpy() - Sn - d)
    Sbar = float(p @ Sn)
    formula = 0.5 * float(p @ (-(d**2) - (Sn - Sbar) * (d**2 + q)))
    assert formula == pytest.approx(exact_h2, rel=5e-3)
    assert float(-(p @ ((Sn - Sbar) * d))) == pytest.approx(exact_h1, rel=1e-10)


def test_entropy_change_second_order_on_samples() -> None:
    """Sampled steps of the two-token model: delta_h1_applied and delta_h2 from entropy_change
    estimate <grad H, u> and u^T (d^2 H) u / 2 (Monte Carlo, 4 standard errors)."""
    theta, probs, S_all, W_all = model(6)
    gen = torch.Generator().manual_seed(7)
    u = 0.05 * torch.randn(theta.shape, generator=gen, dtype=torch.float64)
    S_after_all = seq_logprobs(theta + u).numpy()
    p = probs.numpy()
    Sn = S_all.numpy()
    d_all = W_all @ u.numpy()
    q_all = 2 * (S_after_all - Sn - d_all)
    Sbar = float(p @ Sn)
    target_h2 = 0.5 * float(p @ (-(d_all**2) - (Sn - Sbar) * (d_all**2 + q_all)))
    target_h1 = float(-(p @ ((Sn - Sbar) * d_all)))
    rng = np.random.default_rng(8)
    h1, h2 = [], []
    M = 60
    for _ in range(150):
        idx = rng.choice(len(SEQS), size=M, p=p)
        seqs = StepSequences(
            ids=[str(i) for i in range(M)],
            prompt_ids=["p"] * M,
            logprob=Sn[idx],
            advantage=rng.normal(size=M),
            num_tokens=np.full(M, 2, dtype=np.int64),
            logprob_after=S_after_all[idx],
        )
        W = W_all[idx]
        out = entropy_change(W @ W.T, seqs, 1e-3, k_applied=W @ u.numpy())
        assert out.delta_h1_applied is not None and out.delta_h2 is not None
        h = entropy_coefficients(seqs, seqs.update_mask)
        assert out.delta_h1_applied == pytest.approx(float(h @ (W @ u.numpy())), rel=1e-12)
        assert out.delta_h1_plus_h2 == pytest.approx(out.delta_h1_applied + out.delta_h2)
        h1.append(out.delta_h1_applied)
        h2.append(out.delta_h2)
    for values, target in ((h1, target_h1), (h2, target_h2)):
        mean = float(np.mean(values))
        se = float(np.std(values, ddof=1) / math.sqrt(len(values)))
        assert abs(mean - target) < 4 * se, (mean, target, se)
        assert se < 0.25 * abs(target)


def test_leave_one_out_helper() -> None:
    codes = np.array([0, 1, 0, -1, 0, 2], dtype=np.int64)
    values = np.array([1.0, 5.0, 3.0, 100.0, 8.0, 2.0])
    np.testing.assert_allclose(leave_one_out_mean(values, codes), [5.5, 0.0, 4.5, 0.0, 2.0, 0.0])
