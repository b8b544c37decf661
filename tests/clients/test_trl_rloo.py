"""kernelscope inside TRL's ``RLOOTrainer`` (:class:`clients.trl.KernelscopeRLOOTrainer`).

RLOO's loss is built on the sequences' log-probs, as GRPO's is: the same token coefficients
give its gradient (``sum_i u_i = -grad L``, the Trainer's division by the accumulation steps
included), and a real run keeps ``plugin dH1 = delta_h1_applied`` on every step, a later
clipped pass included.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("trl")
pytestmark = pytest.mark.trl

from datasets import Dataset  # noqa: E402
from trl import RLOOConfig, RLOOTrainer  # noqa: E402
from trl.trainer.utils import shuffle_sequence_dict, split_tensor_dict  # noqa: E402

from clients import trl as trl_module  # noqa: E402
from clients.capture import capture_gradients, repack  # noqa: E402
from clients.http import Client  # noqa: E402
from clients.trl import (  # noqa: E402
    KernelscopeConfig,
    KernelscopeRLOOTrainer,
    has_loss_of_its_own,
    trl_sequence_weights,
    trl_token_coefficients,
)
from tests.clients.conftest import LiveService  # noqa: E402
from tests.clients.test_trl import (  # noqa: E402
    PROMPTS,
    SGD_STEPS,
    SKETCH_512,
    LowPrecisionSampler,
    _perturbed_logps,
    assert_plugin_is_applied,
    char_tokenizer,
    first_char_reward,
    micro_capture_batch,
    tiny_llama,
    tiny_moe,
    trainer_arg_values,
)


def rloo_args(tmp_path: Path, **overrides: Any) -> RLOOConfig:
    """The GRPO tests' batch (two micro-batches of four completions, groups of four, six
    completion tokens) as an RLOO run, with plain SGD: the applied update is ``-eta grad L``."""
    values: dict[str, Any] = {
        **trainer_arg_values(tmp_path),
        **SGD_STEPS,
        "beta": 0.0,  # else TRL loads a reference model by the policy's hub id
        **overrides,
    }
    return RLOOConfig(**values)


def rloo_trainer(tmp_path: Path, trainer_class: type = RLOOTrainer, **kwargs: Any) -> Any:
    """An RLOO trainer (``trainer_class``) of the tiny Llama on the test prompts, with
    ``args`` (an ``RLOOConfig``, or overrides of :func:`rloo_args`); other ``kwargs`` go to
    the constructor."""
    args = kwargs.pop("args", {})
    return trainer_class(
        model=kwargs.pop("model", None) or tiny_llama(),
        reward_funcs=first_char_reward,
        args=args if isinstance(args, RLOOConfig) else rloo_args(tmp_path, **args),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS * 4}),
        processing_class=char_tokenizer(),
        **kwargs,
    )


@pytest.mark.parametrize("later_pass", [False, True], ids=["on_policy", "later_pass_clipped"])
def test_rloo_token_coefficients_reproduce_its_loss_gradient(
    tmp_path: Path, later_pass: bool
) -> None:
    """On a real RLOO micro-batch: ``sum_i u_i``, ``u_i`` from the token coefficients of RLOO's
    own ``compute_loss``, equals ``-grad`` of that loss divided by the accumulation steps (the
    Trainer's division, which RLOO's loss leaves to it).  On policy the coefficients are
    ``weight_i A_i`` with ``luspo``'s weights ``1 / (b GA)``; on a later pass (``old_logps`` of
    an earlier policy, ``epsilon = 0.02``) the clipping changes them."""
    trainer = rloo_trainer(tmp_path, args={"epsilon": 0.02})
    model = trainer.model
    model.train()
    rows = [{"prompt": p} for p in PROMPTS[:2] for _ in range(4)]  # RepeatSampler order
    torch.manual_seed(0)
    generation = shuffle_sequence_dict(trainer._generate_and_score_completions(rows))
    trainer.current_gradient_accumulation_steps = 2
    micro = dict(split_tensor_dict(generation, 2)[0])
    mask = micro["completion_mask"]
    if later_pass:
        earlier = _perturbed_logps(trainer, micro, 0.05, seed=1)
        micro["old_logps"] = (earlier * mask).sum(1)
    coefficients, entropy, router = trl_token_coefficients(trainer, model, micro)
    assert entropy is None and router == 0.0
    assert all(p.grad is None for p in model.parameters())
    (trainer.compute_loss(model, micro) / 2).backward()
    trl_grad = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    weights = trl_sequence_weights("luspo", mask, gradient_accumulation_steps=2)
    on_policy = (weights * micro["advantages"].double())[:, None].float() * mask
    assert torch.allclose(coefficients, on_policy, rtol=1e-5, atol=1e-7) != later_pass

    batch, attention = micro_capture_batch(micro)
    zeros = torch.zeros_like(micro["prompt_mask"]).float()
    captured = capture_gradients(
        model, batch, token_coefficients=repack(torch.cat([zeros, coefficients], 1), attention)
    )
    for name, rows_u in captured.gradients.items():
        expected = -trl_grad.get(name, torch.zeros_like(rows_u[0]))
        torch.testing.assert_close(rows_u.sum(0), expected, rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_rloo_run_keeps_the_identity(
    live_service: LiveService, tmp_path: Path, beta: float
) -> None:
    """A real RLOO run of two SGD steps on one generation batch (``num_iterations=2``): the
    first on policy, the second a later pass on which the clipping holds back some of the
    sequences, not all (``epsilon = 0.2``: RLOO's ratio is the sequence's, and moves more than a
    token's; update rows).  With ``beta = 0.1`` the KL penalty to a reference model (TRL
    loads it from the policy's path: saved here) is in the rewards, so in the advantages the
    trainer reads: the identity holds the same.
    Both steps are ready with the applied update and keep ``plugin dH1 = delta_h1_applied``;
    step 1 holds step 0's completions (the same ids) and only it pushed update rows."""
    config = KernelscopeConfig(url=live_service.base_url, sketch=SKETCH_512)
    model = None
    if beta:
        model = str(tmp_path / "policy")
        tiny_llama().save_pretrained(model)
    trainer = rloo_trainer(
        tmp_path,
        KernelscopeRLOOTrainer,
        args={"num_iterations": 2, "epsilon": 0.2, "learning_rate": 0.05, "beta": beta},
        kernelscope=config,
        model=model,
    )
    assert (trainer.ref_model is not None) == bool(beta)
    assert not has_loss_of_its_own(KernelscopeRLOOTrainer)
    trainer.train()
    clipped = trainer.state.log_history[1]["clip_ratio/region_mean"]  # step 1's sequences
    assert 0.0 < clipped < 1.0
    run_id = trainer.kernelscope_run_id
    with Client(live_service.base_url) as client:
        assert client.get_run(run_id).normalization == "sequence_mean"
        assert_plugin_is_applied(client, run_id, (0, 1))
        ids = [sorted(client.diagonal(run_id, step).ids) for step in (0, 1)]
        assert ids[0] == ids[1] and len(ids[0]) == 8
        # step 0's token coefficients are weight_i A_i: no update rows; step 1's are not,
        # one upload of update rows per micro-batch
        uploads = [client.step_status(run_id, step).uploads for step in (0, 1)]
        assert uploads[1] == uploads[0] + 2, uploads


def test_rloo_token_shares_add_up_to_the_services_dh1(
    live_service: LiveService, tmp_path: Path
) -> None:
    """``token_shares=True`` on an RLOO run (exact kernel, the second step a later clipped
    pass with update rows): each step's token shares sum, per sequence, to the service's
    ``cross_fit`` ``a_i`` and in total to its ``delta_h1``."""
    exact = {"kind": "exact", "dim": 1}
    trainer = rloo_trainer(
        tmp_path,
        KernelscopeRLOOTrainer,
        args={"num_iterations": 2, "epsilon": 0.2, "learning_rate": 0.05},
        kernelscope=KernelscopeConfig(url=live_service.base_url, sketch=exact, token_shares=True),
    )
    trainer.train()
    run_id = trainer.kernelscope_run_id
    with Client(live_service.base_url) as client:
        for step in (0, 1):
            client.wait_ready(run_id, step, timeout=60)
            report = client.entropy(run_id, step, estimator="cross_fit")
            tokens = client.tokens(run_id, step, top=5)
            assert report.delta_h1 != 0.0 and tokens.num_tokens > 0
            assert tokens.total == pytest.approx(report.delta_h1, rel=1e-3, abs=1e-9)
            a = {s["id"]: s["a"] for s in report.per_sequence if s["a"] is not None}
            for row in tokens.sequences:
                assert row.total == pytest.approx(a[row.id], rel=1e-3, abs=1e-9)


@pytest.mark.parametrize(
    ("args", "coefficients"),
    [
        # one generation batch per optimizer step: every micro-batch on policy
        ({"optim": "adamw_torch", "adam_beta1": 0.0, "learning_rate": 1e-3}, 0),
        # a generation batch over two optimizer steps: step 1's two micro-batches come after
        # step 0 moved the policy, so their coefficients are taken (and differ)
        (
            {
                "learning_rate": 0.05,
                "steps_per_generation": 4,
                "epsilon": 0.2,
            },
            2,
        ),
    ],
    ids=["generation_per_step", "generation_over_two_steps"],
)
def test_rloo_takes_the_weights_until_the_policy_moves(
    live_service: LiveService,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    args: dict[str, Any],
    coefficients: int,
) -> None:
    """RLOO's inputs do not tell whether the policy has moved since their ``old_logps``: its
    micro-batch counter does.  Until it moves the trainer takes ``luspo``'s weights without
    the forward of the token coefficients (AdamW, ``beta1 = 0``); after an optimizer step
    within one generation batch (``steps_per_generation = 4``, two micro-batches per step) it
    takes the coefficients.  Both runs keep ``plugin dH1 = delta_h1_applied`` on both steps."""
    calls: list[int] = []
    original = trl_module.trl_token_coefficients

    def counted(*a: Any, **kw: Any) -> Any:
        calls.append(1)
        return original(*a, **kw)

    monkeypatch.setattr(trl_module, "trl_token_coefficients", counted)
    trainer = rloo_trainer(
        tmp_path,
        KernelscopeRLOOTrainer,
        args=args,
        kernelscope=KernelscopeConfig(url=live_service.base_url, sketch=SKETCH_512),
    )
    trainer.train()
    assert len(calls) == coefficients
    with Client(live_service.base_url) as client:
        assert_plugin_is_applied(client, trainer.kernelscope_run_id, (0, 1))


def test_rloo_without_its_micro_batch_counter_takes_the_coefficients(
    live_service: LiveService, tmp_path: Path
) -> None:
    """RLOO's on-policy test reads TRL's private ``_step``: a TRL without it makes the trainer
    take the token coefficients (always right) instead of failing or guessing."""
    trainer = rloo_trainer(
        tmp_path,
        KernelscopeRLOOTrainer,
        args={"num_iterations": 2},
        kernelscope=KernelscopeConfig(url=live_service.base_url, sketch=SKETCH_512),
    )
    inputs = {"advantages": torch.zeros(4)}
    assert trainer._kernelscope_plain_on_policy(inputs)  # micro-batch 0 of a fresh generation
    trainer._step = 3  # step 1's second micro-batch, on step 0's completions (GA 2, 2 passes)
    assert not trainer._kernelscope_plain_on_policy(inputs)
    del trainer._step
    assert not trainer._kernelscope_plain_on_policy(inputs)


def test_rloo_moe_run_with_its_router_loss(live_service: LiveService, tmp_path: Path) -> None:
    """An RLOO run of a mixture-of-experts policy with AdamW (``beta1 = 0``) and its
    load-balancing loss (``router_aux_loss_coef = 0.5``, which RLOO adds to its loss before
    the Trainer divides it by the accumulation steps), rows from hooks, the second step a
    later clipped pass: every micro-batch pushes update rows carrying the router loss's part,
    and ``plugin dH1 = delta_h1_applied`` on both steps."""
    trainer = rloo_trainer(
        tmp_path,
        KernelscopeRLOOTrainer,
        args={
            "optim": "adamw_torch",
            "adam_beta1": 0.0,
            "learning_rate": 1e-3,
            "num_iterations": 2,
            "epsilon": 0.02,
            "router_aux_loss_coef": 0.5,
        },
        kernelscope=KernelscopeConfig(
            url=live_service.base_url, sketch=SKETCH_512, sketch_on="trainer"
        ),
        model=tiny_moe(),
    )
    assert trainer.kernelscope_geometry == "adam" and trainer._hooked is not None
    assert trainer.aux_loss_enabled
    trainer.train()
    assert trainer._hooked is not None  # no fallback to exact chunks
    with Client(live_service.base_url) as client:
        assert_plugin_is_applied(client, trainer.kernelscope_run_id, (0, 1))


def test_rloo_run_with_a_vllm_sampler(live_service: LiveService, tmp_path: Path) -> None:
    """RLOO's vLLM path (``use_vllm``), fed through TRL's own code as GRPO's test feeds it
    (:class:`~tests.clients.test_trl.LowPrecisionSampler`, here as the trainer's
    ``vllm_generation``): a bfloat16 copy of the policy, synced by TRL when the step changes, draws
    every completion.  RLOO ignores the sampler's log-probs (no importance-sampling
    correction), so its loss and the rows are the trainer's policy's alone: on a run of two
    SGD steps on one generation batch, the second a later clipped pass, both steps keep
    ``plugin dH1 = delta_h1_applied``, and only step 1 pushes update rows."""
    sampler = LowPrecisionSampler()
    trainer = rloo_trainer(
        tmp_path,
        KernelscopeRLOOTrainer,
        args={"num_iterations": 2, "epsilon": 0.2, "learning_rate": 0.05},
        kernelscope=KernelscopeConfig(url=live_service.base_url, sketch=SKETCH_512),
        model=tiny_llama(initializer_range=0.2),
    )
    sampler.attach(trainer)
    trainer.train()
    assert sampler.syncs == 1  # one generation batch, two passes
    run_id = trainer.kernelscope_run_id
    with Client(live_service.base_url) as client:
        assert_plugin_is_applied(client, run_id, (0, 1))
        uploads = [client.step_status(run_id, step).uploads for step in (0, 1)]
        assert uploads[1] == uploads[0] + 2, uploads
