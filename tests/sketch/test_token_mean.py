"""The token-mean entropy (math.md §8) against exact enumeration.

The toy policy of tests/enumeration.py with a stop token (``ToyConfig(stop_token=1)``): a
response ends at its first stop token, so lengths vary from 1 to 4 (expected lengths about
3.1) over 341 possible responses per prompt.  The per-position entropies ``H_t``, the expected
lengths, the token-mean entropy ``T = sum_p E_p[sum_t H_t] / sum_p E_p[n]``, its gradient and
its value after any step are exact.  Steps are drawn with seeded generators at the sample
sizes users have (4 and 8 responses per prompt).  docs/validation.md §13 records the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch
from torch.func import grad

from sketch.entropy import entropy_change, update_coefficients
from sketch.rao_blackwell import EntropySumKernels
from sketch.realized import realized_parts
from sketch.sequences import Role, StepSequences
from sketch.token_mean import Target, realized_token_mean
from tests.enumeration import ExactPolicy, ToyConfig, dr_grpo_coefficients, grpo_advantages

CONFIG = ToyConfig(stop_token=1)
B = len(CONFIG.prompts)
L_MAX = CONFIG.response_length
REWARD_TOKEN = 2
DRAWS = 600


@dataclass(frozen=True)
class Truth:
    """Exact values over every response: ``logprob``, ``entropy_sum`` (``sum_t H_t``) float64
    ``[B, R]``; ``lengths`` ``[R]``; ``rows`` ``[B * R, N]`` score gradients and ``gram`` their
    Gram matrix; ``grad_t`` ``[N]`` the exact ``grad T``; ``token_mean`` the exact ``T``."""

    policy: ExactPolicy
    logprob: np.ndarray
    entropy_sum: np.ndarray
    lengths: np.ndarray
    rows: torch.Tensor
    gram: np.ndarray
    grad_t: torch.Tensor
    token_mean: float
    z_rows: np.ndarray  # [B * R, N]: grad sum_t H_t of every response


@pytest.fixture(scope="module")
def truth() -> Truth:
    policy = ExactPolicy(CONFIG)
    rows = policy.all_score_gradients().reshape(-1, policy.numel)
    grad_t = policy.flatten(grad(lambda p: policy.token_mean_entropy(p))(policy.params))
    with torch.no_grad():
        entropy_sum = policy.token_entropies().sum(-1).numpy()
    return Truth(
        policy=policy,
        logprob=policy.log_probs().numpy(),
        entropy_sum=entropy_sum,
        lengths=policy.lengths().numpy(),
        rows=rows,
        gram=(rows @ rows.T).numpy(),
        grad_t=grad_t,
        token_mean=float(policy.token_mean_entropy()),
        z_rows=policy.all_entropy_sum_gradients().reshape(-1, policy.numel).numpy(),
    )


@dataclass(frozen=True)
class Update:
    """A sampled GRPO update: its rows and the exact ``g_hat`` (flat ``[N]``)."""

    prompt_idx: torch.Tensor
    response_idx: torch.Tensor
    advantage: torch.Tensor
    g_hat: torch.Tensor


def sample_update(truth: Truth, per_prompt: int, seed: int) -> Update:
    gen = torch.Generator().manual_seed(seed)
    prompt_idx, response_idx = truth.policy.sample_step(per_prompt, gen)
    advantage = grpo_advantages(truth.policy.reward(response_idx, REWARD_TOKEN), prompt_idx)
    coefficients = dr_grpo_coefficients(advantage, prompt_idx, B, L_MAX)
    g_hat = truth.policy.policy_gradient(prompt_idx, response_idx, coefficients)
    return Update(prompt_idx, response_idx, advantage, g_hat)


@dataclass(frozen=True)
class After:
    """Exact values after a step ``theta + direction``: ``logprob``, ``entropy_sum`` ``[B, R]``
    and the token-mean and sequence entropies."""

    logprob: np.ndarray
    entropy_sum: np.ndarray
    token_mean: float
    sequence: float


def after_step(truth: Truth, direction: torch.Tensor) -> After:
    policy = truth.policy
    params = policy.shifted(direction)
    with torch.no_grad():
        return After(
            logprob=policy.log_probs(params).numpy(),
            entropy_sum=policy.token_entropies(params).sum(-1).numpy(),
            token_mean=float(policy.token_mean_entropy(params)),
            sequence=float(policy.entropy(params)),
        )


def make_step(
    truth: Truth,
    update: Update,
    entropy_rows: tuple[torch.Tensor, torch.Tensor],
    *,
    with_entropy_sum: bool = True,
    after: After | None = None,
) -> tuple[np.ndarray, StepSequences]:
    """The step's exact kernel and sequences: the update rows, then the entropy-role rows."""
    en_p, en_r = entropy_rows
    p = torch.cat([update.prompt_idx, en_p]).numpy()
    r = torch.cat([update.response_idx, en_r]).numpy()
    n_update = update.prompt_idx.numel()
    flat = p * truth.policy.num_responses + r
    seqs = StepSequences(
        ids=[f"s{i}" for i in range(p.size)],
        prompt_ids=[f"p{q}" for q in p],
        logprob=truth.logprob[p, r],
        advantage=np.concatenate([update.advantage.numpy(), np.zeros(en_p.numel())]),
        num_tokens=truth.lengths[r],
        role=[Role.UPDATE] * n_update + [Role.ENTROPY] * en_p.numel(),
        logprob_after=np.zeros(0) if after is None else after.logprob[p, r],
        entropy_sum=truth.entropy_sum[p, r] if with_entropy_sum else np.zeros(0),
        entropy_sum_after=np.zeros(0) if after is None else after.entropy_sum[p, r],
    )
    return truth.gram[np.ix_(flat, flat)], seqs


def mean_and_se(values: np.ndarray) -> tuple[float, float]:
    return float(values.mean()), float(values.std(ddof=1) / np.sqrt(values.size))


def rms(values: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(values))))


def test_enumeration_obeys_the_chain_rule(truth: Truth) -> None:
    """``E_p[sum_t H_t] = H(p)`` (the chain rule of entropy with a stop token), lengths vary,
    and ``T`` is the ratio of expected sums."""
    pi = np.exp(truth.logprob)
    np.testing.assert_allclose(pi.sum(-1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(
        (pi * truth.entropy_sum).sum(-1), -(pi * truth.logprob).sum(-1), rtol=1e-10
    )
    expected_length = pi @ truth.lengths
    assert set(np.unique(truth.lengths)) == {1.0, 2.0, 3.0, 4.0}
    assert 2.5 < expected_length.min() < expected_length.max() < 3.5
    expected_entropy = (pi * truth.entropy_sum).sum(-1)
    assert truth.token_mean == pytest.approx(expected_entropy.sum() / expected_length.sum())


@pytest.mark.parametrize("with_entropy_sum", [True, False])
@pytest.mark.parametrize("M", [4, 8])
def test_token_mean_prediction_is_unbiased_and_calibrated(
    truth: Truth, M: int, with_entropy_sum: bool
) -> None:
    """``independent``, the update fixed (8 responses per prompt), ``M`` entropy-role responses
    per prompt drawn 600 times: the mean ``delta_h1`` of ``target = token_mean`` is within 3 SE
    of the exact ``eta <grad T, g_hat>``, and the RMS of its ``se_sampling`` (which includes
    the estimated levels' uncertainty) is within 25% of its spread; with and without the
    trainer's ``entropy_sum``."""
    eta = 0.1
    update = sample_update(truth, 8, seed=3)
    target = eta * float(truth.grad_t @ update.g_hat)
    sampler = torch.Generator().manual_seed(1000 + M)
    estimates, reported = np.zeros(DRAWS), np.zeros(DRAWS)
    for k in range(DRAWS):
        K, seqs = make_step(
            truth,
            update,
            truth.policy.sample_step(M, sampler),
            with_entropy_sum=with_entropy_sum,
        )
        result = entropy_change(
            K, seqs, eta, estimator="independent", max_length=L_MAX, target="token_mean"
        )
        assert result.target is Target.TOKEN_MEAN
        estimates[k], reported[k] = result.delta_h1, result.se_sampling
    mean, se = mean_and_se(estimates)
    spread = float(estimates.std(ddof=1))
    print(
        f"\ntoken mean, M={M}, entropy_sum={with_entropy_sum}: exact {target:.5g}, mean"
        f" {mean:.5g} +- {se:.2g} (ratio {mean / target:.3f}); spread {spread:.4g}, rms se"
        f" {rms(reported):.4g} ({rms(reported) / spread:.3f})"
    )
    assert abs(mean - target) <= 3 * se, (mean, target, se)
    assert 0.75 <= rms(reported) / spread <= 1.25, (rms(reported), spread)


def test_cross_fit_token_mean_prediction_is_unbiased_and_calibrated(truth: Truth) -> None:
    """``cross_fit`` without entropy-role rows (``E = U``: 8 GRPO update responses per prompt,
    redrawn 600 times, each draw against its own exact ``eta <grad T, g_hat>``): the mean error
    of ``target = token_mean`` is within 3 SE of 0 and the RMS of its ``se_sampling`` within 25%
    of the errors' spread, with the length coefficients cross-fitted like ``h``."""
    eta = 0.1
    sampler = torch.Generator().manual_seed(77)
    errors, reported = np.zeros(DRAWS), np.zeros(DRAWS)
    nothing = (torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    for k in range(DRAWS):
        update = sample_update(truth, 8, seed=int(torch.randint(0, 2**31, (1,), generator=sampler)))
        K, seqs = make_step(truth, update, nothing)
        result = entropy_change(
            K, seqs, eta, estimator="cross_fit", max_length=L_MAX, target="token_mean"
        )
        errors[k] = result.delta_h1 - eta * float(truth.grad_t @ update.g_hat)
        reported[k] = result.se_sampling
    bias, se = mean_and_se(errors)
    spread = float(errors.std(ddof=1))
    print(
        f"\ntoken mean, cross_fit, M=8: bias {bias:.4g} +- {se:.2g}; spread {spread:.4g},"
        f" rms se {rms(reported):.4g} ({rms(reported) / spread:.3f})"
    )
    assert abs(bias) <= 3 * se, (bias, se)
    assert 0.75 <= rms(reported) / spread <= 1.25, (rms(reported), spread)


@pytest.mark.parametrize(
    ("estimator", "M"), [("u_statistic", 4), ("cross_fit", 8), ("independent", 4)]
)
def test_token_mean_prediction_from_the_entropy_sums(truth: Truth, estimator: str, M: int) -> None:
    """``grad_hat T`` with ``grad_hat Hbar`` from the entropy sums (their rows ``z_j``, math.md
    §3 "From the entropy sums"; the length part stays ``l_j w_j``): 600 draws (GRPO updates of
    ``M`` responses per prompt, each against its own exact ``eta <grad T, g_hat>``; for
    ``independent`` a fixed update of 8 and ``M`` entropy-role responses): the mean error within
    3 SE of 0 (the levels left out of each update row's pairs, math.md §8), the RMS
    ``se_sampling`` within 25% of the spread (each row's part centred, math.md §4, before the
    levels' influence is added: 1.8x and 2.2x the spread when the levels' influence replaced
    the centred parts), the spread below a quarter of the score-only estimate's."""
    eta = 0.1
    sampler = torch.Generator().manual_seed(300 + M)
    nothing = (torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    fixed = sample_update(truth, 8, seed=5)
    errors = {False: np.zeros(DRAWS), True: np.zeros(DRAWS)}
    reported = {False: np.zeros(DRAWS), True: np.zeros(DRAWS)}
    for k in range(DRAWS):
        if estimator == "independent":
            update, entropy_rows = fixed, truth.policy.sample_step(M, sampler)
        else:
            seed = int(torch.randint(0, 2**31, (1,), generator=sampler))
            update, entropy_rows = sample_update(truth, M, seed=seed), nothing
        K, seqs = make_step(truth, update, entropy_rows)
        p = torch.cat([update.prompt_idx, entropy_rows[0]]).numpy()
        r = torch.cat([update.response_idx, entropy_rows[1]]).numpy()
        flat = p * truth.policy.num_responses + r
        W, Z = truth.rows.numpy()[flat], truth.z_rows[flat]
        V = update_coefficients(seqs, "dr_grpo", max_length=L_MAX)[:, None] * W
        sums = EntropySumKernels(
            cross=Z @ V.T, score=Z @ W.T, gram=Z @ Z.T, has_row=np.ones(seqs.n, dtype=bool)
        )
        target = eta * float(truth.grad_t @ update.g_hat)
        for rb in (False, True):
            result = entropy_change(
                K,
                seqs,
                eta,
                estimator=estimator,
                max_length=L_MAX,
                target="token_mean",
                entropy_sums=sums if rb else None,
            )
            errors[rb][k] = result.delta_h1 - target
            reported[rb][k] = result.se_sampling
    spreads = {}
    for rb in (False, True):
        bias, se = mean_and_se(errors[rb])
        spreads[rb] = float(errors[rb].std(ddof=1))
        ratio = rms(reported[rb]) / spreads[rb]
        print(
            f"\ntoken mean, {estimator}, M={M}, entropy sums={rb}: bias {bias:.4g} +- {se:.2g};"
            f" spread {spreads[rb]:.4g}, rms se {rms(reported[rb]):.4g} ({ratio:.3f})"
        )
        assert abs(bias) <= 3 * se, (rb, bias, se)
        assert 0.75 <= ratio <= 1.25, (rb, ratio)
    assert spreads[True] < 0.25 * spreads[False], spreads


def test_token_mean_prediction_tracks_the_exact_change_at_a_small_step(truth: Truth) -> None:
    """At ``eta = 0.01`` the exact ``T(theta + eta g_hat) - T(theta)`` is within 5% of
    ``eta <grad T, g_hat>``, and the mean prediction from 8 entropy-role responses per prompt
    (200 draws) is within 3 SE of the exact change."""
    eta = 0.01
    update = sample_update(truth, 8, seed=3)
    linear = eta * float(truth.grad_t @ update.g_hat)
    exact_change = after_step(truth, eta * update.g_hat).token_mean - truth.token_mean
    sampler = torch.Generator().manual_seed(7)
    estimates = np.array(
        [
            entropy_change(
                *make_step(truth, update, truth.policy.sample_step(8, sampler)),
                eta,
                estimator="independent",
                max_length=L_MAX,
                target="token_mean",
            ).delta_h1
            for _ in range(200)
        ]
    )
    mean, se = mean_and_se(estimates)
    print(
        f"\nsmall step: exact change {exact_change:.5g}, linear {linear:.5g}, mean prediction"
        f" {mean:.5g} +- {se:.2g}"
    )
    assert abs(exact_change - linear) <= 0.05 * abs(linear)
    assert abs(mean - exact_change) <= 3 * se


@pytest.mark.parametrize("M", [4, 8])
@pytest.mark.parametrize("eta", [0.03, 0.1])
def test_realized_token_mean_change_is_unbiased_and_calibrated(
    truth: Truth, eta: float, M: int
) -> None:
    """The realized token-mean change from ``logprob_after``, ``entropy_sum`` and
    ``entropy_sum_after`` of ``M`` entropy-role responses per prompt (600 draws) is within 3 SE
    of the exact ``T' - T``, at a step that moves the sequence entropy by 9% (``eta = 0.03``)
    and by 25% (``eta = 0.1``); its ``se`` is calibrated within 25% at the first (at the second
    the importance ratios are heavy-tailed and the RMS se is about 0.7 of the spread at M = 8:
    printed, and in docs/validation.md).  The sequence entropy's
    change from the entropy sums (``delta_sequence``; what ``realized_parts`` now uses) is
    unbiased and calibrated too, with a smaller spread than the log-prob estimate of math.md §6
    on the same draws (printed: the variance it saves)."""
    update = sample_update(truth, 8, seed=3)
    after = after_step(truth, eta * update.g_hat)
    exact_token = after.token_mean - truth.token_mean
    exact_sequence = after.sequence - float(truth.policy.entropy())
    sampler = torch.Generator().manual_seed(2000 + M)
    names = ("token", "token_se", "sequence", "sequence_se", "logprob_only")
    draws = {name: np.zeros(DRAWS) for name in names}
    for k in range(DRAWS):
        _, seqs = make_step(truth, update, truth.policy.sample_step(M, sampler), after=after)
        found = realized_token_mean(seqs)
        with_sums = realized_parts(seqs)
        log_only = realized_parts(replace(seqs, entropy_sum=np.zeros(0)))
        assert found is not None and found.se is not None and found.delta_sequence_se is not None
        assert log_only is not None and with_sums is not None
        assert with_sums.realized.source == "entropy_sum"
        assert with_sums.realized.delta_h == pytest.approx(found.delta_sequence, rel=1e-12)
        assert found.num_sequences == B * M  # the entropy-role rows by default
        draws["token"][k], draws["token_se"][k] = found.delta, found.se
        draws["sequence"][k] = found.delta_sequence
        draws["sequence_se"][k] = found.delta_sequence_se
        draws["logprob_only"][k] = log_only.realized.delta_h
    token, token_se = mean_and_se(draws["token"])
    sequence, sequence_se = mean_and_se(draws["sequence"])
    spread = float(draws["token"].std(ddof=1))
    seq_spread = float(draws["sequence"].std(ddof=1))
    log_spread = float(draws["logprob_only"].std(ddof=1))
    print(
        f"\nrealized, M={M}: token mean exact {exact_token:.5g}, estimate {token:.5g} +-"
        f" {token_se:.2g}, spread {spread:.4g}, rms se {rms(draws['token_se']):.4g};"
        f" sequence exact {exact_sequence:.5g}, from entropy_sum {sequence:.5g} +-"
        f" {sequence_se:.2g}, spread {seq_spread:.4g} vs {log_spread:.4g} from log-probs"
        f" (variance ratio {(seq_spread / log_spread) ** 2:.3f})"
    )
    assert abs(token - exact_token) <= 3 * token_se, (token, exact_token, token_se)
    assert abs(sequence - exact_sequence) <= 3 * sequence_se, (sequence, exact_sequence)
    assert seq_spread < log_spread
    if eta < 0.1:
        assert 0.75 <= rms(draws["token_se"]) / spread <= 1.25
        assert 0.75 <= rms(draws["sequence_se"]) / seq_spread <= 1.25


def test_token_mean_answer_carries_the_realized_change_and_its_ratio(truth: Truth) -> None:
    """With the after-step fields, ``entropy_change(target="token_mean")`` reports the realized
    token-mean change (``source = "entropy_sum"``) with a Fieller ratio interval; the
    per-sequence ``a_i`` and the pair types add up to its ``delta_h1``; no second order."""
    eta = 0.1
    update = sample_update(truth, 8, seed=3)
    after = after_step(truth, eta * update.g_hat)
    sampler = torch.Generator().manual_seed(5)
    K, seqs = make_step(truth, update, truth.policy.sample_step(8, sampler), after=after)
    result = entropy_change(K, seqs, eta, max_length=L_MAX, target="token_mean")
    assert result.realized is not None and result.realized.source == "entropy_sum"
    assert result.ratio_interval is not None and result.delta_h2 is None
    found = realized_token_mean(seqs)
    assert found is not None and result.realized.delta_h == found.delta
    total_a = sum(s.a for s in result.per_sequence if s.a is not None)
    assert total_a == pytest.approx(result.delta_h1, rel=1e-9)
    pair_sum = sum(v.value for v in result.decomposition.pair_types.values())
    assert pair_sum == pytest.approx(result.delta_h1, rel=1e-9)
    sequence = entropy_change(K, seqs, eta, max_length=L_MAX)
    assert sequence.target is Target.SEQUENCE and sequence.realized is not None
    assert sequence.realized.source == "entropy_sum"
    assert sequence.realized.delta_h == pytest.approx(found.delta_sequence, rel=1e-12)
    assert sequence.delta_h2 is not None
