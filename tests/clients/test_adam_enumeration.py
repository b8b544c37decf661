"""Adam geometry (math.md §1, §4; clients/geometry.py) against exact enumeration.

The float64 toy GPT-2 of tests/enumeration.py answers 3 prompts with all 625 responses each,
so ``H``, ``grad H``, every score gradient ``w_t`` and the entropy after any parameter change
are exact.  A GRPO step (8 update samples per prompt, toy reward = count of token 2, Dr. GRPO
coefficients ``c_i``) is taken by a real ``torch.optim.Adam`` (``betas=(0, 0.999)``: momentum
off) on a copy of the policy's model, through the loss ``-J = -sum_i c_i S_i``.  Its state
comes from 3 earlier GRPO steps (other samples) taken at the same ``theta`` (the parameters are
put back after each: the ground truth is at fixed ``theta``), so ``v_hat`` averages four
squared gradients, the current one included, and :func:`adam_preconditioner` read after the
step gives the ``P`` that this step used: the step is ``u = lr * P * g_hat``.

Rows in ``adam`` geometry are ``sqrt(P) * w_t`` (:func:`scale_rows`), passed through the
``exact`` sketch and :func:`kernel_from_rows`; the applied update captured around the step
(:class:`AppliedUpdateCapture`) is appended as the row ``u / sqrt(P)`` (:func:`unscale_update`).
The SGD comparison is a real ``torch.optim.SGD`` step of the same norm, ``eta * g_hat`` with
``eta = |u| / |g_hat|``, on unscaled rows.

"Exact-expectation" predictions weight every enumerated sequence by its probability,
``h_t = -pi_t (S_t - Sbar_p) / B``, and use the kernel of the scaled rows: ``lr h^T K c`` is
then ``lr <grad H, P g_hat>`` with the exact ``grad H``.  The sampled predictions are
:func:`entropy_change` with the ``independent`` estimator over 1000 entropy-role samples per
prompt, averaged over 8 independent draws.  The test docstrings record the observed numbers.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from clients.geometry import (
    AppliedUpdateCapture,
    adam_preconditioner,
    scale_rows,
    unscale_update,
)
from sketch.entropy import EntropyChange, entropy_change
from sketch.exact import ExactSketch
from sketch.kernel import kernel_from_rows
from sketch.sequences import Role, StepSequences
from tests.enumeration import ExactPolicy, ToyConfig, dr_grpo_coefficients, grpo_advantages

CONFIG = ToyConfig()
L = CONFIG.response_length
B = len(CONFIG.prompts)
REWARD_TOKEN = 2
PER_PROMPT = 8  # update samples per prompt
SEED = 0
WARMUP_STEPS = 3  # earlier Adam steps that fill the second-moment state
ADAM_LR = 3e-4
BETAS = (0.0, 0.999)
EPS = 1e-8
ENTROPY_M = 1000  # entropy-role samples per prompt and draw
ENTROPY_DRAWS = 8
FIRST_ORDER_TOLERANCE = 0.05  # |predicted / realized - 1| at this small step
FLOAT32 = 1e-5  # relative tolerance of quantities that went through float32 rows


@dataclass(frozen=True)
class Update:
    """The update-role rows of a GRPO step: sequences, ``c_i`` and ``g_hat`` (flat ``[N]``)."""

    prompt_idx: torch.Tensor
    response_idx: torch.Tensor
    advantage: torch.Tensor
    coefficients: torch.Tensor
    g_hat: torch.Tensor


def sample_update(policy: ExactPolicy, generator: torch.Generator) -> Update:
    prompt_idx, response_idx = policy.sample_step(PER_PROMPT, generator)
    rewards = policy.reward(response_idx, REWARD_TOKEN)
    advantage = grpo_advantages(rewards, prompt_idx)
    c = dr_grpo_coefficients(advantage, prompt_idx, B, L)
    g_hat = policy.policy_gradient(prompt_idx, response_idx, c)
    return Update(prompt_idx, response_idx, advantage, c, g_hat)


def ascent_gradient(policy: ExactPolicy, model: nn.Module, update: Update) -> torch.Tensor:
    """Backpropagate the loss ``-J = -sum_i c_i S_i`` through ``model`` (its ``.grad`` is set)
    and return the flat gradient of ``-J``."""
    model.zero_grad()
    ids = policy.input_ids[update.prompt_idx, update.response_idx]
    S = policy._sequence_logprob(dict(model.named_parameters()), ids)
    (-(update.coefficients * S).sum()).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads)
    return torch.cat([g.detach().reshape(-1) for g in grads if g is not None])


def reset(policy: ExactPolicy, model: nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(policy.params[name])


def moved(policy: ExactPolicy, model: nn.Module) -> torch.Tensor:
    """``theta_after - theta`` in float64, flat ``[N]``."""
    return torch.cat(
        [(p.detach() - policy.params[n]).reshape(-1) for n, p in model.named_parameters()]
    )


def named_rows(policy: ExactPolicy, flat_rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Flat rows ``[n, N]`` as ``{name: [n, *shape]}`` (the gradient upload format)."""
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for name in policy.names:
        size = policy.params[name].numel()
        out[name] = flat_rows[:, offset : offset + size].reshape(-1, *policy.shapes[name])
        offset += size
    return out


@dataclass(frozen=True)
class AdamStep:
    """The real Adam and SGD steps and their kernels (module scope).

    ``gram_adam``: float64 ``[B R + 1, B R + 1]``, the kernel of the ``sqrt(P) w_t`` of every
    enumerated sequence (row ``p R + r``) plus the applied row ``u / sqrt(P)`` last;
    ``gram_sgd``: the same for the rows ``w_t`` and the SGD step's ``u_sgd``.  ``u_adam``,
    ``u_sgd``: the exact float64 steps (flat); ``u_captured``: :class:`AppliedUpdateCapture`'s
    float32 ``u``, flat float64.  ``precond``: ``P`` (flat float64, from ``sqrt_p`` squared).
    """

    policy: ExactPolicy
    rows: torch.Tensor
    grad_h: torch.Tensor
    h_exact: np.ndarray
    update: Update
    loss_gradient: torch.Tensor
    precond: torch.Tensor
    precond_state: torch.Tensor
    u_adam: torch.Tensor
    u_captured: torch.Tensor
    eta_sgd: float
    sgd_loss_gradient: torch.Tensor
    u_sgd: torch.Tensor
    gram_adam: np.ndarray
    gram_sgd: np.ndarray

    def update_flat(self) -> np.ndarray:
        return (
            self.update.prompt_idx * self.policy.num_responses + self.update.response_idx
        ).numpy()


@pytest.fixture(scope="module")
def adam_step() -> AdamStep:
    policy = ExactPolicy(CONFIG)
    rows = policy.all_score_gradients().reshape(-1, policy.numel)
    logprob = policy.log_probs()
    pi = logprob.exp()
    centred = logprob - (pi * logprob).sum(-1, keepdim=True)
    h_exact = (-(pi * centred) / B).reshape(-1).numpy()

    gen = torch.Generator().manual_seed(SEED)
    model = copy.deepcopy(policy.model)
    assert [n for n, _ in model.named_parameters()] == policy.names
    optimizer = torch.optim.Adam(model.parameters(), lr=ADAM_LR, betas=BETAS, eps=EPS)
    for _ in range(WARMUP_STEPS):
        ascent_gradient(policy, model, sample_update(policy, gen))
        optimizer.step()
        reset(policy, model)
    update = sample_update(policy, gen)
    loss_gradient = ascent_gradient(policy, model, update)
    with AppliedUpdateCapture(model) as applied:
        optimizer.step()
    sqrt_p = adam_preconditioner(optimizer, model)
    precond = torch.cat([sqrt_p[n].double().reshape(-1) ** 2 for n in policy.names])
    v = torch.cat([optimizer.state[p]["exp_avg_sq"].reshape(-1) for p in model.parameters()])
    v_hat = v / (1.0 - BETAS[1] ** (WARMUP_STEPS + 1))
    # P = 0 where Adam has no second moment (clients.geometry): there the gradient is 0
    precond_state = (1.0 / (v_hat.sqrt() + EPS)).masked_fill(v == 0, 0.0)
    u_adam = moved(policy, model)
    u_captured = policy.flatten(applied.update).double()

    eta_sgd = float(u_adam.norm() / update.g_hat.norm())
    sgd_model = copy.deepcopy(policy.model)
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=eta_sgd)
    sgd_loss_gradient = ascent_gradient(policy, sgd_model, update)
    sgd.step()
    u_sgd = moved(policy, sgd_model)

    sketcher = ExactSketch(None, seed=0, parameters=policy.shapes)
    named = named_rows(policy, rows)
    y_adam = torch.cat(
        [
            sketcher.sketch(scale_rows(named, sqrt_p)),
            sketcher.sketch(
                {n: v[None] for n, v in unscale_update(applied.update, sqrt_p).items()}
            ),
        ]
    )
    u_sgd_named = policy.unflatten(u_sgd)
    y_sgd = torch.cat(
        [sketcher.sketch(named), sketcher.sketch({n: v[None] for n, v in u_sgd_named.items()})]
    )
    return AdamStep(
        policy=policy,
        rows=rows,
        grad_h=policy.entropy_gradient(),
        h_exact=h_exact,
        update=update,
        loss_gradient=loss_gradient,
        precond=precond,
        precond_state=precond_state,
        u_adam=u_adam,
        u_captured=u_captured,
        eta_sgd=eta_sgd,
        sgd_loss_gradient=sgd_loss_gradient,
        u_sgd=u_sgd,
        gram_adam=kernel_from_rows(y_adam),
        gram_sgd=kernel_from_rows(y_sgd),
    )


@dataclass(frozen=True)
class Draws:
    """``entropy_change`` (``independent``) over independent entropy-role draws, both
    geometries on the same samples: ``{"adam": [...], "sgd": [...]}``."""

    results: dict[str, list[EntropyChange]]

    def values(self, geometry: str, field: str) -> np.ndarray:
        return np.array([getattr(r, field) for r in self.results[geometry]], dtype=np.float64)


def mean_and_se(values: np.ndarray) -> tuple[float, float]:
    return float(values.mean()), float(values.std(ddof=1) / np.sqrt(values.size))


@pytest.fixture(scope="module")
def draws(adam_step: AdamStep) -> Draws:
    policy = adam_step.policy
    update = adam_step.update
    logprob = policy.log_probs().numpy()
    n_update = update.prompt_idx.numel()
    gen = torch.Generator().manual_seed(SEED + 1)
    results: dict[str, list[EntropyChange]] = {"adam": [], "sgd": []}
    for _ in range(ENTROPY_DRAWS):
        en_p, en_r = policy.sample_step(ENTROPY_M, gen)
        p = torch.cat([update.prompt_idx, en_p]).numpy()
        r = torch.cat([update.response_idx, en_r]).numpy()
        seqs = StepSequences(
            ids=[f"s{i}" for i in range(p.size)],
            prompt_ids=[f"p{q}" for q in p],
            logprob=logprob[p, r],
            advantage=np.concatenate([update.advantage.numpy(), np.zeros(en_p.numel())]),
            num_tokens=np.full(p.size, L),
            role=[Role.UPDATE] * n_update + [Role.ENTROPY] * en_p.numel(),
        )
        flat = p * policy.num_responses + r
        for geometry, gram, eta in (
            ("adam", adam_step.gram_adam, ADAM_LR),
            ("sgd", adam_step.gram_sgd, adam_step.eta_sgd),
        ):
            result = entropy_change(
                gram[np.ix_(flat, flat)],
                seqs,
                eta,
                estimator="independent",
                max_length=L,
                k_applied=gram[flat, -1],
            )
            results[geometry].append(result)
    return Draws(results)


def test_the_real_steps_are_lr_p_g_hat_and_eta_g_hat(adam_step: AdamStep) -> None:
    """Premises: the loss ``-J`` backpropagated through the model has gradient ``-g_hat``;
    ``adam_preconditioner`` after the step gives the ``P`` of Adam's state (float32) and Adam's
    step is ``lr * P * g_hat`` (ascent on ``J``); ``AppliedUpdateCapture`` records it to float32
    precision; the SGD step is ``eta * g_hat``."""
    s = adam_step
    g_hat = s.update.g_hat
    torch.testing.assert_close(s.loss_gradient, -g_hat, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(s.sgd_loss_gradient, -g_hat, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(s.precond, s.precond_state, rtol=FLOAT32, atol=0)
    # Adam divides the gradient it was given: u = -lr * P * grad(-J) to float64 rounding ...
    adam = -ADAM_LR * s.precond_state * s.loss_gradient
    torch.testing.assert_close(s.u_adam, adam, rtol=1e-9, atol=1e-18)
    # ... = lr * P * g_hat, up to the 192 coordinates whose gradient is 0 but for rounding
    # (~1e-18: wpe rows of positions 6..15, whose outputs are unused, and the attention key
    # biases, to which the softmax is invariant): there P ~ 1/eps amplifies it to ~1e-13.
    torch.testing.assert_close(s.u_adam, ADAM_LR * s.precond_state * g_hat, rtol=1e-9, atol=1e-12)
    # theta' - theta of float32-rounded parameters (|theta| < 2): absolute float32 rounding.
    torch.testing.assert_close(s.u_captured, s.u_adam, rtol=0, atol=3e-7)
    torch.testing.assert_close(s.u_sgd, s.eta_sgd * g_hat, rtol=1e-9, atol=1e-16)
    assert float(s.u_sgd.norm()) == pytest.approx(float(s.u_adam.norm()), rel=1e-9)
    # Adam's step is not a rescaled SGD step: P changes its direction.
    cosine = float(s.u_adam @ g_hat / (s.u_adam.norm() * g_hat.norm()))
    print(
        f"\nAdam lr={ADAM_LR}: |u|={float(s.u_adam.norm()):.4g}, eta_sgd={s.eta_sgd:.4g},"
        f" cos(u_adam, g_hat)={cosine:.3f}, P in [{float(s.precond.min()):.3g},"
        f" {float(s.precond.max()):.3g}]"
    )
    assert cosine < 0.9


def test_adam_dh1_predicts_an_adam_step_as_well_as_sgd_predicts_sgd(
    adam_step: AdamStep, draws: Draws
) -> None:
    """Claim: with the scaled rows, ``dH1`` predicts the entropy change of a small Adam step
    (momentum off) as well as the SGD version predicts an SGD step of the same norm.

    The exact-expectation ``dH1`` (``lr h_exact^T K c`` with the kernel of the scaled rows)
    equals ``lr <grad H, P g_hat>`` (float32 rows: 1e-5 relative); against the exact realized
    ``H(theta + u) - H(theta)`` both relative errors ``|pred / realized - 1|`` are below 5%,
    and the Adam error is at most ``max(2 x the SGD error, 2%)``.  The sampled ``independent``
    estimates (mean of 8 draws) are within 3 standard errors of the exact-expectation values in
    both geometries, and the unscaled kernel misses the Adam step by more than 50%.

    Observed (|u| = 0.0334, eta_sgd = 0.0240): Adam dH1 0.12564 vs realized 0.12764 (-1.57%),
    sampled 0.12569 +- 0.0013; SGD dH1 0.33913 vs realized 0.33474 (+1.31%), sampled
    0.33912 +- 0.0032; the unscaled prediction 0.339 is 2.7x the Adam step's change.
    """
    s = adam_step
    policy = s.policy
    n_all = s.h_exact.size
    upd = s.update_flat()
    c = s.update.coefficients.numpy()
    g_hat = s.update.g_hat

    pred_adam = ADAM_LR * float(s.h_exact @ s.gram_adam[:n_all, upd] @ c)
    pred_sgd = s.eta_sgd * float(s.h_exact @ s.gram_sgd[:n_all, upd] @ c)
    direct_adam = ADAM_LR * float(s.grad_h @ (s.precond_state * g_hat))
    direct_sgd = s.eta_sgd * float(s.grad_h @ g_hat)
    assert pred_adam == pytest.approx(direct_adam, rel=FLOAT32)
    assert pred_sgd == pytest.approx(direct_sgd, rel=FLOAT32)

    realized_adam = policy.realized_change(s.u_adam)
    realized_sgd = policy.realized_change(s.u_sgd)
    err_adam = pred_adam / realized_adam - 1
    err_sgd = pred_sgd / realized_sgd - 1
    # The scaling matters: the unscaled kernel (the SGD prediction for a step of the same norm)
    # misses the Adam step by far more than 50%.
    assert abs(pred_sgd / realized_adam - 1) > 0.5, (pred_sgd, realized_adam)

    sampled_adam, se_adam = mean_and_se(draws.values("adam", "delta_h1"))
    sampled_sgd, se_sgd = mean_and_se(draws.values("sgd", "delta_h1"))
    rms_se_adam = float(np.sqrt(np.mean(draws.values("adam", "se_sampling") ** 2)))
    print(
        f"\nAdam step: dH1 exact-expectation {pred_adam:.5g}, realized {realized_adam:.5g}"
        f" (error {err_adam:+.3%}); sampled {sampled_adam:.5g} +- {se_adam:.2g}"
        f" ({ENTROPY_DRAWS} draws, rms se_sampling per draw {rms_se_adam:.2g})"
        f"\nSGD step eta={s.eta_sgd:.4g}: dH1 {pred_sgd:.5g}, realized {realized_sgd:.5g}"
        f" (error {err_sgd:+.3%}); sampled {sampled_sgd:.5g} +- {se_sgd:.2g}"
    )
    assert abs(err_adam) < FIRST_ORDER_TOLERANCE, (pred_adam, realized_adam)
    assert abs(err_sgd) < FIRST_ORDER_TOLERANCE, (pred_sgd, realized_sgd)
    assert abs(err_adam) <= max(2 * abs(err_sgd), 0.02), (err_adam, err_sgd)
    assert abs(sampled_adam - pred_adam) <= 3 * se_adam, (sampled_adam, pred_adam, se_adam)
    assert abs(sampled_sgd - pred_sgd) <= 3 * se_sgd, (sampled_sgd, pred_sgd, se_sgd)


def test_applied_update_row_in_adam_geometry_gives_grad_h_dot_u(
    adam_step: AdamStep, draws: Draws
) -> None:
    """Claim: with the applied update sent as ``u / sqrt(P)``, ``dH1_applied`` estimates
    ``<grad H, u>`` with the exact ``grad H``.

    ``<sqrt(P) w_t, u / sqrt(P)>`` from the kernel equals ``<w_t, u>`` for every enumerated
    sequence (float32 tolerance: ``1e-5 |w_t| |u|``); its exact expectation ``h_exact^T k``
    equals ``<grad H, u>``; ``delta_h1_applied`` of ``entropy_change`` averaged over 8 draws of
    1000 entropy-role samples per prompt is within 3 standard errors of ``<grad H, u>``, and
    (momentum off, so ``u = lr P g_hat``) equals ``delta_h1`` of the same draw to 1e-5 (so does
    the SGD step's row ``u`` in sgd geometry).  Observed: ``<grad H, u> = 0.12564``,
    ``delta_h1_applied = 0.12569 +- 0.0013``.
    """
    s = adam_step
    n_all = s.h_exact.size
    k_applied = s.gram_adam[:n_all, -1]
    expected = (s.rows @ s.u_captured).numpy()
    scale = (s.rows.norm(dim=1) * s.u_captured.norm()).numpy()
    assert np.all(np.abs(k_applied - expected) <= FLOAT32 * scale)

    target = float(s.grad_h @ s.u_adam)
    assert float(s.h_exact @ k_applied) == pytest.approx(target, rel=FLOAT32)

    applied = draws.values("adam", "delta_h1_applied")
    np.testing.assert_allclose(applied, draws.values("adam", "delta_h1"), rtol=FLOAT32, atol=0)
    # The same in sgd geometry, where the row is u itself.
    np.testing.assert_allclose(
        draws.values("sgd", "delta_h1_applied"), draws.values("sgd", "delta_h1"), rtol=FLOAT32
    )
    mean, se = mean_and_se(applied)
    print(
        f"\napplied update: <grad H, u> = {target:.5g}; delta_h1_applied {mean:.5g} +- {se:.2g}"
        f" over {ENTROPY_DRAWS} draws (per draw {applied.min():.5g} .. {applied.max():.5g})"
    )
    assert abs(mean - target) <= 3 * se, (mean, target, se)
