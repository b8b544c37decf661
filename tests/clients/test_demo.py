"""The demo trainer end to end: a tiny GPT-2 trained by GRPO, every step pushed to a real
service (uvicorn + worker on the test Redis, or the demo's own embedded child service), every
step ending ready with finite numbers.

Besides finiteness, one exact identity checks that the demo, the service and the GRPO loop
agree on the step (normalisation, learning rate, signs): with plain SGD the applied update is
``u = eta * g_hat`` with ``g_hat = sum_i lambda_i A_i w_i`` (math.md §2, ``dr_grpo`` with
``max_length``), and the sketch is linear, so the service's ``delta_h1_applied = <grad_hat H,
u>`` must equal its ``delta_h1 = eta h^T K c`` to float rounding, whatever the sketch kind.
The token-mean columns (math.md §8) must be the service's ``?target=token_mean`` answers.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from rich.console import Console

from clients.demo import DemoConfig, DemoStep, run_demo
from clients.grpo import (
    CopyTask,
    build_tiny_gpt2,
    dr_grpo_loss,
    dr_grpo_weights,
    response_logprobs,
    sample_step,
)
from clients.http import Client
from tests.clients.conftest import LiveService

SMALL = DemoConfig(
    num_prompts=2,
    group_size=4,
    entropy_samples=4,
    n_embd=16,
    n_layer=1,
    sketch_dim=256,
    ready_timeout_s=120.0,
)


def _check_steps(rows: list[DemoStep], steps: int) -> None:
    assert [r.step for r in rows] == list(range(steps))
    for r in rows:
        assert r.state == "ready"
        for name in ("delta_h1", "realized", "ratio", "delta_h1_applied", "entropy"):
            value = getattr(r, name)
            assert value is not None and math.isfinite(value), (r.step, name, value)
        assert r.se_sampling >= 0.0 and math.isfinite(r.se_sampling)
        assert r.se_sketch >= 0.0 and math.isfinite(r.se_sketch)
        assert r.ratio == pytest.approx(r.realized / r.delta_h1)
        # SGD: u = eta * g_hat, and the sketch is linear (module docstring).
        assert r.delta_h1_applied == pytest.approx(r.delta_h1, rel=1e-3, abs=1e-7)
        # The top-3 are the most negative a_i, in order.
        a = [t.a for t in r.top_down]
        assert len(a) == 3 and a == sorted(a)
        # The token mean: predicted and, from the pushed entropy sums, realized.
        for name in ("token_delta_h1", "token_se", "token_realized", "token_realized_se"):
            value = getattr(r, name)
            assert value is not None and math.isfinite(value), (r.step, name, value)


def _check_token_mean(rows: list[DemoStep], url: str, run_id: str) -> None:
    """The demo's token-mean numbers are the service's ``?target=token_mean`` answers."""
    with Client(url) as client:
        for r in rows:
            answer = client.entropy(run_id, r.step, estimator=SMALL.estimator, target="token_mean")
            assert answer.target == "token_mean"
            assert answer.realized is not None and answer.realized["source"] == "entropy_sum"
            assert r.token_delta_h1 == answer.delta_h1
            assert r.token_se == math.hypot(answer.se_sampling, answer.se_sketch)
            assert r.token_realized == answer.realized_delta
            assert r.token_realized_se == answer.realized["se"]
            # The demo's task has no stop token: every response has max_new_tokens tokens, so
            # T = H / L exactly (math.md §8 with l_j = 0 and D_L = 0) and each token-mean
            # number is the sequence one over L, though the service computes it on its own.
            length = SMALL.max_new_tokens
            assert r.token_delta_h1 == pytest.approx(r.delta_h1 / length, rel=1e-6)
            assert r.token_se == pytest.approx(math.hypot(r.se_sampling, r.se_sketch) / length)
            assert r.realized is not None and r.realized_se is not None
            assert r.token_realized == pytest.approx(r.realized / length, rel=1e-6)
            assert r.token_realized_se == pytest.approx(r.realized_se / length, rel=1e-6)


def _console() -> Console:
    return Console(width=160, record=True, force_terminal=False)


def test_demo_against_live_service(
    live_service: LiveService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exact capture (raw rows, server-side countsketch) for 3 steps, then factorised capture
    (client-made kronecker sketches) for 2 steps, on one live service.  The factorised
    capture's forward gives the entropy sums before the step: a separate forward runs only
    after it."""
    console = _console()
    rows = run_demo(
        steps=3,
        url=live_service.base_url,
        keep_alive=False,
        config=SMALL,
        console=console,
        run_id="demo-exact",
    )
    _check_steps(rows, 3)
    _check_token_mean(rows, live_service.base_url, "demo-exact")
    text = console.export_text()
    assert "pred dH1" in text and "realized" in text
    assert "pred dT1" in text and "nats per token" in text
    assert "token-mean entropy over 3 steps (nats per token)" in text  # the summary
    assert "training" in text and "3/3 steps" in text  # the progress bar under the table

    factorised = DemoConfig(
        **{**SMALL.__dict__, "capture": "factorised", "sketch_dim": 64, "token_shares": True}
    )
    import clients.demo as demo_module

    separate = demo_module.sequence_logprobs_and_entropy_sums
    calls: list[int] = []

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return separate(*args, **kwargs)

    monkeypatch.setattr(demo_module, "sequence_logprobs_and_entropy_sums", counted)
    rows = run_demo(
        steps=2,
        url=live_service.base_url,
        keep_alive=False,
        config=factorised,
        console=_console(),
        run_id="demo-factorised",
    )
    _check_steps(rows, 2)
    assert len(calls) == 2  # one per step, after it
    _check_token_mean(rows, live_service.base_url, "demo-factorised")
    # token shares (exact) against the sketched dH1 of the same estimator: within its sketch
    # error, with one share total per update sequence
    with Client(live_service.base_url) as client:
        for row in rows:
            tokens = client.tokens("demo-factorised", row.step)
            assert tokens.num_sequences == SMALL.num_prompts * SMALL.group_size
            assert tokens.estimator == "independent"
            assert abs(tokens.total - row.delta_h1) <= 4 * row.se_sketch + 1e-9


@pytest.mark.parametrize("capture", ["exact", "factorised"])
def test_demo_with_entropy_sum_rows(live_service: LiveService, capture: str) -> None:
    """``entropy_sum_rows``: the demo pushes every response's ``z_i`` beside its score row (raw,
    or made by the factorised capture's extra backward), the service answers every step with
    ``grad H`` from the entropy sums, the SGD identity ``delta_h1_applied = delta_h1`` still
    holds, and on the same steps the score-only error bar is wider."""
    config = DemoConfig(**{**SMALL.__dict__, "capture": capture, "entropy_sum_rows": True})
    console = _console()
    run_id = f"demo-sums-{capture}"
    rows = run_demo(
        steps=2,
        url=live_service.base_url,
        keep_alive=False,
        config=config,
        console=console,
        run_id=run_id,
    )
    _check_steps(rows, 2)
    assert "grad H from the entropy sums" in console.export_text()
    with Client(live_service.base_url) as client:
        for row in rows:
            sums = client.entropy(run_id, row.step, estimator=SMALL.estimator)
            score = client.entropy(
                run_id, row.step, estimator=SMALL.estimator, entropy_gradient="score"
            )
            assert sums.entropy_gradient == "entropy_sum" and sums.delta_h1 == row.delta_h1
            assert score.entropy_gradient == "score"
            assert sums.se_sampling < score.se_sampling


def test_demo_starts_its_own_embedded_service() -> None:
    """``url=None``: the demo runs ``python -m service serve`` (embedded Redis in a temporary
    directory) and stops it afterwards."""
    rows = run_demo(steps=1, keep_alive=False, config=SMALL, console=_console())
    _check_steps(rows, 1)


def test_dr_grpo_loss_gradient_is_the_weighted_score_sum() -> None:
    """The GRPO loop's loss gradient is ``-sum_i lambda_i A_i dS_i/dtheta`` with the weights
    the demo declares (``dr_grpo``, ``L_max = max_new_tokens``), checked against per-sequence
    autograd; and the weights are ``1 / (B G L_max)``."""
    task = CopyTask(vocab_size=6, prompt_length=3, max_new_tokens=4, stop_at_eos=True)
    model = build_tiny_gpt2(vocab_size=6, n_embd=8, n_layer=1, n_positions=8, initializer_range=0.3)
    step = sample_step(model, task, 2, 3, 0, torch.Generator().manual_seed(3))
    weights = dr_grpo_weights(step.update, task.max_new_tokens)
    assert torch.allclose(weights, torch.full_like(weights, 1.0 / (2 * 3 * 4)))
    params = [p for p in model.parameters() if p.requires_grad]
    loss = dr_grpo_loss(model, step.update, step.advantages, weights)
    grads = torch.autograd.grad(loss, params)
    logprobs = response_logprobs(model, step.update)
    expected = [torch.zeros_like(p) for p in params]
    for i in range(len(step.update)):
        w_i = torch.autograd.grad(logprobs[i], params, retain_graph=True, allow_unused=True)
        for acc, g in zip(expected, w_i, strict=True):
            if g is not None:
                acc -= float(weights[i] * step.advantages[i]) * g
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    # Group-normalised advantages sum to zero in every group (Dr. GRPO: no std division).
    for p in step.update.prompt_index.unique():
        assert abs(float(step.advantages[step.update.prompt_index == p].sum())) < 1e-12
