"""``grad_hat H`` from the entropy sums (math.md §3, :mod:`sketch.rao_blackwell`) against exact
enumeration (tests/enumeration.py): unbiased at 4 and 8 samples per prompt for every estimator,
its error bars calibrated, and its spread a fraction of the score-only estimate's.

The sampled steps index the enumerated sequences, so ``S``, ``entropy_sum``, ``w`` and ``z =
grad entropy_sum`` are exact and only the sampling is random (seeded generators).
docs/validation.md §17 records the numbers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from sketch.cross_fit import cross_fit_halves
from sketch.crossed import bilinear_error_bar
from sketch.entropy import EntropyChange, SketchCells, UpdateKernels, entropy_change
from sketch.rao_blackwell import EntropyGradient, EntropySumKernels
from sketch.sequences import Role, StepSequences
from tests.enumeration import ExactPolicy, ToyConfig, dr_grpo_coefficients, grpo_advantages

CONFIG = ToyConfig()
L = CONFIG.response_length
B = len(CONFIG.prompts)
REWARD_TOKEN = 2
DRAWS = 600


@dataclass(frozen=True)
class Truth:
    """Every enumerated sequence's exact values, rows ``p * R + r``: ``logprob``,
    ``entropy_sum`` float64 ``[B * R]``; ``W``, ``Z`` float64 ``[B * R, N]`` (score rows and
    the entropy sums' gradients); ``grad_h`` ``[N]`` the exact ``grad H``."""

    policy: ExactPolicy
    logprob: np.ndarray
    entropy_sum: np.ndarray
    W: np.ndarray
    Z: np.ndarray
    grad_h: np.ndarray


@pytest.fixture(scope="module")
def truth() -> Truth:
    policy = ExactPolicy(CONFIG)
    return Truth(
        policy=policy,
        logprob=policy.log_probs().detach().numpy().reshape(-1),
        entropy_sum=policy.token_entropies().sum(-1).detach().numpy().reshape(-1),
        W=policy.all_score_gradients().reshape(-1, policy.numel).numpy(),
        Z=policy.all_entropy_sum_gradients().reshape(-1, policy.numel).numpy(),
        grad_h=policy.entropy_gradient().numpy(),
    )


def test_the_two_forms_of_grad_h_agree(truth: Truth) -> None:
    """``grad H = (1/B) sum_p E[grad Hs + Hs w]`` (math.md §3 "From the entropy sums") is the
    exact gradient: the identity the estimator rests on, checked by enumeration."""
    pi = np.exp(truth.logprob)
    both = (pi[:, None] * (truth.Z + truth.entropy_sum[:, None] * truth.W)).sum(0) / B
    np.testing.assert_allclose(both, truth.grad_h, rtol=1e-10, atol=1e-12)


@dataclass(frozen=True)
class Drawn:
    seqs: StepSequences
    K: np.ndarray
    update: UpdateKernels
    sums: EntropySumKernels
    target: float  # eta <grad H, g_hat>, exact
    W: np.ndarray
    Z: np.ndarray
    U: np.ndarray


def draw(
    truth: Truth,
    M: int,
    gen: torch.Generator,
    eta: float,
    entropy_m: int = 0,
    applied: np.ndarray | None = None,
) -> Drawn:
    """``M`` update samples per prompt with GRPO advantages (and ``entropy_m`` entropy-role
    samples per prompt), their exact kernels and the exact target."""
    policy = truth.policy
    up_p, up_r = policy.sample_step(M, gen)
    advantage = grpo_advantages(policy.reward(up_r, REWARD_TOKEN), up_p)
    c = dr_grpo_coefficients(advantage, up_p, B, L).numpy()
    prompts, responses = [up_p], [up_r]
    roles = [Role.UPDATE] * up_p.numel()
    if entropy_m:
        en_p, en_r = policy.sample_step(entropy_m, gen)
        prompts.append(en_p)
        responses.append(en_r)
        roles += [Role.ENTROPY] * en_p.numel()
        c = np.concatenate([c, np.zeros(en_p.numel())])
        advantage = torch.cat([advantage, torch.zeros(en_p.numel(), dtype=advantage.dtype)])
    p = torch.cat(prompts).numpy()
    flat = p * policy.num_responses + torch.cat(responses).numpy()
    seqs = StepSequences(
        ids=[f"s{i:03d}" for i in range(flat.size)],
        prompt_ids=[f"p{q}" for q in p],
        logprob=truth.logprob[flat],
        advantage=advantage.numpy().astype(np.float64),
        num_tokens=np.full(flat.size, L),
        role=roles,
        entropy_sum=truth.entropy_sum[flat],
    )
    W, Z = truth.W[flat], truth.Z[flat]
    U = c[:, None] * W
    sums = EntropySumKernels(
        cross=Z @ U.T,
        score=Z @ W.T,
        gram=Z @ Z.T,
        has_row=np.ones(flat.size, dtype=bool),
        applied=None if applied is None else Z @ applied,
    )
    target = eta * float(truth.grad_h @ U.sum(0))
    return Drawn(seqs, W @ W.T, UpdateKernels(W @ U.T, U @ U.T), sums, target, W, Z, U)


def predict(d: Drawn, eta: float, estimator: str, rb: bool, **kwargs: object) -> EntropyChange:
    return entropy_change(
        d.K,
        d.seqs,
        eta,
        estimator=estimator,
        max_length=L,
        update=d.update,
        entropy_sums=d.sums if rb else None,
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    ("estimator", "M"),
    [
        ("u_statistic", 4),
        ("u_statistic", 8),
        ("cross_fit", 4),
        ("cross_fit", 8),
        ("independent", 4),
    ],
)
def test_entropy_sum_gradient_is_unbiased_and_varies_less(
    truth: Truth, estimator: str, M: int
) -> None:
    """Over 600 draws of ``M`` samples per prompt (GRPO advantages; ``independent`` with 4
    entropy-role samples per prompt beside 8 update samples), each draw's ``delta_h1`` against
    its own exact ``eta <grad H, g_hat>``: from the entropy sums the mean error is within 3
    standard errors of 0, the RMS ``se_sampling`` within 25% of the spread, and the spread
    less than half the score-only estimate's (whose own bias stays within 3 standard
    errors)."""
    eta = 0.1
    gen = torch.Generator().manual_seed(170 + M + len(estimator))
    errors: dict[bool, list[float]] = {False: [], True: []}
    reported: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(DRAWS):
        d = (
            draw(truth, 8, gen, eta, entropy_m=M)
            if estimator == "independent"
            else draw(truth, M, gen, eta)
        )
        for rb in (False, True):
            result = predict(d, eta, estimator, rb)
            assert result.entropy_gradient is (
                EntropyGradient.ENTROPY_SUM if rb else EntropyGradient.SCORE
            )
            errors[rb].append(result.delta_h1 - d.target)
            reported[rb].append(result.se_sampling)
    summary = {}
    for rb in (False, True):
        err = np.asarray(errors[rb])
        bias, se = float(err.mean()), float(err.std(ddof=1) / np.sqrt(err.size))
        spread = float(err.std(ddof=1))
        rms = float(np.sqrt(np.mean(np.square(reported[rb]))))
        summary[rb] = (bias, se, spread, rms / spread)
        assert abs(bias) <= 3 * se, (rb, bias, se)
    print(
        f"\n{estimator} M={M}: score-only bias {summary[False][0]:.4g} +- {summary[False][1]:.2g},"
        f" spread {summary[False][2]:.4g}, rms se/spread {summary[False][3]:.3f};"
        f" entropy sums bias {summary[True][0]:.4g} +- {summary[True][1]:.2g},"
        f" spread {summary[True][2]:.4g}, rms se/spread {summary[True][3]:.3f};"
        f" variance ratio {(summary[False][2] / summary[True][2]) ** 2:.1f}"
    )
    assert 0.75 <= summary[True][3] <= 1.25, summary[True]
    assert summary[True][2] < 0.5 * summary[False][2], summary


@pytest.mark.parametrize("estimator", ["u_statistic", "cross_fit", "plugin", "independent"])
def test_entropy_sum_gradient_is_the_pair_sum_of_its_rows(truth: Truth, estimator: str) -> None:
    """One draw against a direct evaluation from the rows: ``delta_h1 = eta sum_{j, i} W(j, i)
    <alpha_j w_j + beta_j z_j, u_i>`` with the estimator's pair weights, the applied change
    ``<grad_hat H, u>`` (and its declared form), the group split, and the decompositions
    adding up."""
    eta = 0.1
    gen = torch.Generator().manual_seed(7)
    applied = np.linspace(-1e-3, 1e-3, truth.W.shape[1])
    d = draw(truth, 4, gen, eta, entropy_m=4 if estimator == "independent" else 0, applied=applied)
    seqs = d.seqs
    ent = seqs.entropy_mask if estimator == "independent" else seqs.update_mask
    codes, prompts = seqs.prompt_index(ent)
    n = seqs.n
    weights = np.zeros((n, n))

    def coefficients(parts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """``alpha``, ``beta`` by loops, each row's baseline and count over its part."""
        alpha, beta = np.zeros(n), np.zeros(n)
        for rows in parts:
            codes_x, _ = seqs.prompt_index(rows)
            for j in np.flatnonzero(rows):
                mates = np.flatnonzero(codes_x == codes_x[j])
                others = mates[mates != j]
                base = seqs.entropy_sum[others].mean() if others.size else 0.0
                beta[j] = 1.0 / (len(prompts) * mates.size)
                alpha[j] = (seqs.entropy_sum[j] - base) * beta[j]
        return alpha, beta

    half = None
    if estimator == "cross_fit":
        half = cross_fit_halves(seqs.ids, seqs.prompt_ids, seqs.update_mask)
        alpha, beta = coefficients([ent & (half == x) for x in (0, 1)])
    else:
        alpha, beta = coefficients([ent])
    upd = seqs.update_mask
    for j in np.flatnonzero(ent):
        for i in np.flatnonzero(upd):
            if estimator == "u_statistic":
                same = codes[j] == codes[i]
                m = int((codes == codes[j]).sum())
                weights[j, i] = 0.0 if j == i else (m / (m - 1) if same else 1.0)
            elif estimator == "cross_fit":
                assert half is not None
                weights[j, i] = float(half[j] != half[i])
            else:
                weights[j, i] = 1.0
    E = alpha[:, None] * d.W + beta[:, None] * d.Z
    direct = eta * float(np.sum(weights * (E @ d.U.T)))
    cut = d.W.shape[1] // 2
    parts_w = {"first": slice(0, cut), "second": slice(cut, None)}
    group_kernels = {
        g: UpdateKernels(d.W[:, sl] @ d.U[:, sl].T, d.U[:, sl] @ d.U[:, sl].T)
        for g, sl in parts_w.items()
    }
    sums = EntropySumKernels(
        cross=d.sums.cross,
        score=d.sums.score,
        gram=d.sums.gram,
        has_row=d.sums.has_row,
        applied=d.sums.applied,
        groups={g: d.Z[:, sl] @ d.U[:, sl].T for g, sl in parts_w.items()},
    )
    k_applied = d.W @ applied
    answer = functools.partial(
        entropy_change,
        d.K,
        seqs,
        eta,
        estimator=estimator,
        max_length=L,
        update=d.update,
        entropy_sums=sums,
    )
    result = answer(k_applied=k_applied, group_kernels=group_kernels)
    assert result.delta_h1 == pytest.approx(direct, rel=1e-10)
    assert result.entropy_gradient is EntropyGradient.ENTROPY_SUM
    # Kronecker cells: the crossed error bar of the rows e_j against the update rows
    width = -(-d.W.shape[1] // 8)
    pad = 8 * width - d.W.shape[1]

    def padded(rows: np.ndarray) -> np.ndarray:
        return np.pad(rows, ((0, 0), (0, pad)))

    cells = SketchCells(Y=padded(d.W), V=padded(d.U), shape=(8, width), Z=padded(d.Z))
    with_cells = answer(sketch_cells=cells)
    expected = eta * bilinear_error_bar(padded(E), padded(d.U), weights, (8, width))
    assert with_cells.se_sketch == pytest.approx(expected, rel=1e-9)
    if estimator == "cross_fit":  # the applied update pairs with the whole-prompt estimate
        alpha, beta = coefficients([ent])
        E = alpha[:, None] * d.W + beta[:, None] * d.Z
    assert result.delta_h1_applied == pytest.approx(float(E.sum(0) @ applied), rel=1e-10)
    declared = answer(k_applied=k_applied, applied_includes_step=True)
    rest = applied - eta * d.U.sum(0)  # the part of u that is not eta g_hat
    assert declared.delta_h1_applied == pytest.approx(
        result.delta_h1 + float(E.sum(0) @ rest), rel=1e-9
    )
    assert result.decomposition.groups is not None
    assert sum(result.decomposition.groups.values()) == pytest.approx(result.delta_h1, rel=1e-9)
    per = result.per_sequence
    for total in (
        sum(v.value for v in result.decomposition.pair_types.values()),
        sum(s.a for s in per if s.a is not None),
        sum(s.b for s in per if s.b is not None),
        sum(q.sum for q in result.decomposition.quadrants),
    ):
        assert total == pytest.approx(result.delta_h1, rel=1e-9, abs=1e-15)


def test_a_step_without_every_sum_keeps_the_score_gradient(truth: Truth) -> None:
    """A row of E without its ``z`` row, or without its ``entropy_sum``, leaves the whole step on
    the score-only ``h_j`` (mixing the two would change what the baselines mean)."""
    eta = 0.1
    d = draw(truth, 4, torch.Generator().manual_seed(3), eta)
    plain = predict(d, eta, "u_statistic", rb=False)
    missing_row = EntropySumKernels(
        cross=d.sums.cross,
        score=d.sums.score,
        gram=d.sums.gram,
        has_row=np.r_[False, np.ones(d.seqs.n - 1, dtype=bool)],
    )
    for sums, seqs in (
        (missing_row, d.seqs),
        (d.sums, d.seqs.subset(np.arange(d.seqs.n))),
    ):
        if sums is d.sums:
            seqs.entropy_sum[0] = np.nan
        result = entropy_change(
            d.K,
            seqs,
            eta,
            estimator="u_statistic",
            max_length=L,
            update=d.update,
            entropy_sums=sums,
        )
        assert result.entropy_gradient is EntropyGradient.SCORE
        assert result.delta_h1 == pytest.approx(plain.delta_h1, rel=1e-12)
