"""Adam geometry, the applied update and logprob_after."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from torch import nn

from clients.capture import SequenceBatch, capture_gradients, response_logprobs, sequence_logprobs
from clients.geometry import (
    AppliedUpdateCapture,
    OnAccess,
    adam_applied_update,
    adam_gradient_share,
    adam_preconditioner,
    adam_step_counts,
    adam_step_preconditioner,
    adam_taken_preconditioner,
    is_adam,
    logprob_after,
    scale_rows,
    unscale_update,
    unscaled,
)
from tests.clients.conftest import make_batch, tiny_gpt2


def _loss_backward(
    model: nn.Module, batch: SequenceBatch, optimizer: torch.optim.Optimizer
) -> None:
    """The gradient of a policy-gradient-like loss (a weighted sum of the S_i, maximised) in
    ``.grad``, the optimizer's earlier gradients zeroed."""
    optimizer.zero_grad()
    out = model(batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    s = response_logprobs(out, batch.input_ids, batch.response_mask)
    weights = torch.linspace(-1.0, 1.0, s.shape[0])
    (-(weights * s).sum()).backward()


def _loss_step(model: nn.Module, batch: SequenceBatch, optimizer: torch.optim.Optimizer) -> None:
    """One policy-gradient-like step: :func:`_loss_backward`, then the optimizer's step."""
    _loss_backward(model, batch, optimizer)
    optimizer.step()


@pytest.mark.parametrize("amsgrad", [False, True])
def test_preconditioner_is_the_denominator_adam_divides_by(amsgrad: bool) -> None:
    """With beta1 = 0 and no weight decay Adam's step is exactly -lr * P * g."""
    model = tiny_gpt2().eval()
    batch = make_batch(n=4)
    lr = 1e-2
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.0, 0.99), eps=1e-6, amsgrad=amsgrad)
    for _ in range(2):
        _loss_step(model, make_batch(seed=5, n=4), opt)
    opt.zero_grad()
    out = model(batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    (-response_logprobs(out, batch.input_ids, batch.response_mask).sum()).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    with AppliedUpdateCapture(model) as applied:
        opt.step()
    sqrt_p = adam_preconditioner(opt, model)
    assert set(sqrt_p) == set(grads)
    params = dict(model.named_parameters())
    for name, g in grads.items():
        # u = theta' - theta is exact up to the float32 rounding of theta' (half an ulp of theta)
        ulp = float(params[name].detach().abs().max()) * 2.0**-23
        expected = -lr * sqrt_p[name] ** 2 * g
        torch.testing.assert_close(applied.update[name], expected, rtol=1e-4, atol=ulp)


def _check_flat_ranges(lazy: Mapping[str, torch.Tensor], full: Mapping[str, torch.Tensor]) -> None:
    """A lazy preconditioner's flat ranges (computed from those entries of the gradient and
    state alone, as a hook scaling one block of a weight's rows reads them) are bit-equal to
    the same entries of the whole value."""
    assert isinstance(lazy, OnAccess)
    for name, value in full.items():
        flat = value.reshape(-1)
        for start, stop in (
            (0, flat.numel()),
            (3, min(11, flat.numel())),
            (flat.numel() - 1, flat.numel()),
        ):
            assert torch.equal(lazy.flat_range(name, start, stop), flat[start:stop]), name


@pytest.mark.parametrize(
    ("cls", "amsgrad", "decay"),
    [
        (torch.optim.AdamW, False, 0.0),
        (torch.optim.Adam, True, 0.0),
        (torch.optim.Adam, False, 0.1),  # coupled decay: g + lambda theta
    ],
)
def test_step_preconditioner_is_what_the_next_step_divides_by(
    cls: type[torch.optim.Adam], amsgrad: bool, decay: float
) -> None:
    """Before each of three steps (the first from an empty state), ``sqrt(P_t)`` computed from
    ``.grad`` and the state gives the step exactly: ``delta theta = -lr P_t g`` (beta1 = 0)."""
    model = tiny_gpt2().eval()
    lr = 1e-2
    opt = cls(
        model.parameters(), lr=lr, betas=(0.0, 0.99), eps=1e-6, amsgrad=amsgrad, weight_decay=decay
    )
    assert is_adam(opt) and not is_adam(torch.optim.SGD(model.parameters(), lr=0.1))
    params = dict(model.named_parameters())
    for seed in range(3):
        batch = make_batch(seed=seed, n=4)
        _loss_backward(model, batch, opt)
        sqrt_p = adam_step_preconditioner(opt, params)
        lazy = adam_step_preconditioner(opt, params, lazy=True)
        assert list(lazy) == list(params) and all(torch.equal(lazy[k], sqrt_p[k]) for k in lazy)
        _check_flat_ranges(lazy, sqrt_p)
        before = {k: p.detach().clone() for k, p in params.items()}
        grads = {k: p.grad.detach().clone() + decay * before[k] for k, p in params.items()}
        opt.step()
        taken = adam_taken_preconditioner(opt, params, lazy=True)  # read back after the step
        _check_flat_ranges(taken, adam_taken_preconditioner(opt, params))
        for k, p in params.items():
            expected = -lr * sqrt_p[k] ** 2 * grads[k]
            torch.testing.assert_close(p.detach() - before[k], expected, rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(taken[k], sqrt_p[k], rtol=1e-5, atol=0.0)
        assert adam_gradient_share(opt, params) == 1.0  # beta1 = 0: all of the step's gradient


@pytest.mark.parametrize(
    ("cls", "options"),
    [
        (torch.optim.AdamW, {"weight_decay": 0.1}),
        (torch.optim.AdamW, {"weight_decay": 0.1, "foreach": True}),
        (torch.optim.Adam, {"amsgrad": True}),
        (torch.optim.Adam, {"weight_decay": 0.1, "maximize": True}),  # coupled decay
    ],
)
@pytest.mark.parametrize("lr", [1e-2, 1e-6])
def test_applied_update_from_adam_state_is_the_step_taken(
    cls: type[torch.optim.Adam], options: dict[str, object], lr: float
) -> None:
    """Read after each of three steps (beta1 = 0.9, the first from an empty state), the update
    rebuilt from Adam's state is ``theta_after - theta_before`` up to the rounding of
    ``theta_after`` (half an ulp per coordinate), also at lr 1e-6 where that rounding is a few
    percent of a coordinate's step; a parameter without a gradient (skipped by the step) gets
    zeros."""
    model = tiny_gpt2().eval()
    params = dict(model.named_parameters())
    opt = cls(model.parameters(), lr=lr, betas=(0.9, 0.99), eps=1e-8, **options)  # type: ignore[arg-type]
    skipped = "transformer.wte.weight"
    for step in range(3):
        batch = make_batch(seed=step, n=4)
        _loss_backward(model, batch, opt)
        if step == 1:
            params[skipped].grad = None
        counts = adam_step_counts(opt, params)
        before = {k: p.detach().clone() for k, p in params.items()}
        opt.step()
        rebuilt = dict(adam_applied_update(opt, params, counts))
        assert list(rebuilt) == list(params)
        for k, p in params.items():
            taken = p.detach() - before[k]
            if step == 1 and k == skipped:
                assert not taken.any() and not rebuilt[k].any()
            ulp = float(before[k].abs().max()) * 2.0**-23
            torch.testing.assert_close(rebuilt[k], taken, rtol=1e-4, atol=ulp, msg=k)


def _deepspeed_adam(kind: str, model: nn.Module, decay: float) -> torch.optim.Optimizer:
    """DeepSpeed's ``FusedAdam`` or ``DeepSpeedCPUAdam`` over ``model`` (betas 0.9 / 0.99),
    as its engine builds them, or the CPU Adam accelerate puts in place of torch's ``Adam``
    under ZeRO-Offload (``map_pytorch_optim_to_deepspeed``: torch's param groups, whose
    ``decoupled_weight_decay`` the CPU Adam does not read)."""
    pytest.importorskip("deepspeed")
    from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam

    params = model.parameters()
    options = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": decay}
    if kind == "accelerate":
        from accelerate.utils.deepspeed import map_pytorch_optim_to_deepspeed

        torch_adam = torch.optim.Adam(params, **options)  # type: ignore[arg-type]
        for group in torch_adam.param_groups:
            group["decoupled_weight_decay"] = True  # what accelerate copies, not what runs
        mapped: torch.optim.Optimizer = map_pytorch_optim_to_deepspeed(torch_adam)
        assert type(mapped) is DeepSpeedCPUAdam and not mapped.adam_w_mode  # type: ignore[attr-defined]
        return mapped
    name, adamw, correct = kind.split("-")
    if name == "fused":  # one tensor per group, as ZeRO's flat partitions (is_adam_optimizer)
        flat = [{"params": [p]} for p in params]
        assert not is_adam(FusedAdam(model.parameters()))
        return FusedAdam(
            flat, bias_correction=correct == "corrected", adam_w_mode=adamw == "adamw", **options
        )
    return DeepSpeedCPUAdam(
        params, bias_correction=correct == "corrected", adamw_mode=adamw == "adamw", **options
    )


@pytest.mark.parametrize(
    "kind",
    [
        "fused-adamw-corrected",
        "fused-adam-uncorrected",  # coupled decay, no bias correction
        "cpu-adamw-uncorrected",
        "cpu-adam-corrected",
        "accelerate",  # torch's Adam replaced by the CPU Adam under ZeRO-Offload
    ],
)
def test_deepspeed_adams_are_read_as_torch_adam_is(kind: str) -> None:
    """DeepSpeed's own Adams (its ``FusedAdam``, and ``DeepSpeedCPUAdam``, which ZeRO-Offload
    steps with), AdamW or Adam (coupled) with weight decay 0.1, with or without bias
    correction, over three steps with ``beta1 = 0.9``: ``sqrt(P_t)`` computed before each step
    is the one read back from the state after it, the update rebuilt from the state is
    ``theta_after - theta_before``, and the step's share of the gradient is ``(1 - beta1)``
    over the bias correction.  Read with torch's rules (AdamW's switch in the group, bias
    correction always on) the coupled-decay steps' ``sqrt(P_t)`` and the uncorrected updates
    would not match."""
    model = tiny_gpt2().eval()
    params = dict(model.named_parameters())
    opt = _deepspeed_adam(kind, model, decay=0.1)
    assert is_adam(opt)
    correct = not kind.endswith("uncorrected")
    for step in range(1, 4):
        batch = make_batch(seed=step, n=4)
        _loss_backward(model, batch, opt)
        sqrt_p = adam_step_preconditioner(opt, params)
        counts = adam_step_counts(opt, params)
        before = {k: p.detach().clone() for k, p in params.items()}
        opt.step()
        taken = adam_taken_preconditioner(opt, params)
        rebuilt = dict(adam_applied_update(opt, params, counts))
        for k, p in params.items():
            # their kernels round v_t differently from torch's order of operations, which
            # adam_step_preconditioner follows: a few float32 ulps, more where g + lambda theta
            # cancels
            torch.testing.assert_close(taken[k], sqrt_p[k], rtol=1e-4, atol=0.0)
            ulp = float(before[k].abs().max()) * 2.0**-23
            torch.testing.assert_close(rebuilt[k], p.detach() - before[k], rtol=1e-4, atol=ulp)
        share = 0.1 / (1 - 0.9**step) if correct else 0.1
        assert adam_gradient_share(opt, params) == pytest.approx(share)


def test_gradient_share_of_adam_momentum() -> None:
    """``(1 - beta1) / (1 - beta1^t)`` after step ``t``: 1 at the first step."""
    model = tiny_gpt2().eval()
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999))
    with pytest.raises(ValueError):
        adam_gradient_share(opt, params)
    for t in (1, 2, 3):
        _loss_step(model, make_batch(seed=t, n=4), opt)
        assert adam_gradient_share(opt, params) == pytest.approx(0.1 / (1 - 0.9**t))


def test_preconditioner_formula_from_state() -> None:
    model = tiny_gpt2()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    for seed in range(3):
        _loss_step(model, make_batch(seed=seed, n=3), opt)
    sqrt_p = adam_preconditioner(opt, model)
    for name, p in model.named_parameters():
        state = opt.state[p]
        v_hat = state["exp_avg_sq"].double() / (1 - 0.95 ** float(state["step"]))
        expected = (1.0 / (v_hat.sqrt() + 1e-8)).sqrt().masked_fill(v_hat == 0, 0.0)
        torch.testing.assert_close(sqrt_p[name].double(), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_step_preconditioner_in_place_is_bit_equal_to_the_formula(amsgrad: bool) -> None:
    """``adam_step_preconditioner`` computes ``sqrt(P_t)`` in place on one buffer; its values
    are bit-equal to the plain expressions ``g^2 (1 - beta2) + beta2 v``, ``/ (1 - beta2^t)``,
    ``(1 / (sqrt(.) + eps))^(1/2)`` evaluated one temporary at a time (0 where ``v = 0``)."""
    model = tiny_gpt2()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.95), amsgrad=amsgrad)
    for seed in range(2):
        _loss_step(model, make_batch(seed=seed, n=3), opt)
    opt.zero_grad()
    out = model(make_batch(seed=7, n=3).input_ids).logits
    out.square().mean().backward()
    params = dict(model.named_parameters())
    got = adam_step_preconditioner(opt, params)
    for name, p in params.items():
        state = opt.state[p]
        assert p.grad is not None
        v = p.grad * p.grad * (1.0 - 0.95)
        v = v + 0.95 * state["exp_avg_sq"]
        if amsgrad:
            v = torch.maximum(v, state["max_exp_avg_sq"])
        v_hat = v / (1.0 - 0.95 ** (float(state["step"]) + 1.0))
        expected = (1.0 / (v_hat.sqrt() + 1e-8)).sqrt().masked_fill(v == 0, 0.0)
        assert torch.equal(got[name], expected), name


@pytest.mark.parametrize("decay", [0.0, 0.1])
def test_preconditioner_is_zero_where_adam_has_no_second_moment(decay: float) -> None:
    """Where Adam's second moment is 0 (embedding rows of tokens no batch has had, and here a
    coordinate whose gradient is 0 from its first step on, as a bf16 reduction can make one),
    ``sqrt(P)`` is 0 instead of ``1 / sqrt(eps)``, in the step's and the taken preconditioner
    alike, and nowhere else; there the applied row ``u / sqrt(P)`` is 0 (``u`` is AdamW's
    weight decay alone), not inf.  A row that is not 0 there, as rows whose sum the trainer's
    rounded gradient cancels, then adds nothing to the kernel instead of ``|w|^2 / eps``."""
    model = tiny_gpt2()
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=decay)
    _loss_step(model, make_batch(seed=0, n=4), opt)
    opt.zero_grad()
    out = model(make_batch(seed=1, n=4).input_ids).logits
    out.square().mean().backward()
    head = next(n for n, p in params.items() if p.ndim == 2 and p.shape[0] > p.shape[1])
    grad = params[head].grad
    assert grad is not None
    grad.view(-1)[:1] = 0.0  # a rounded gradient, on a coordinate with no history
    opt.state[params[head]]["exp_avg_sq"].view(-1)[:1] = 0.0
    opt.state[params[head]]["exp_avg"].view(-1)[:1] = 0.0
    step = adam_step_preconditioner(opt, params)
    counts = adam_step_counts(opt, params)
    opt.step()
    taken = adam_taken_preconditioner(opt, params)
    update = dict(adam_applied_update(opt, params, counts))
    for name, p in params.items():
        v = opt.state[p]["exp_avg_sq"]
        torch.testing.assert_close(step[name], taken[name], rtol=1e-5, atol=0.0)
        assert torch.equal(step[name] == 0, v == 0), name
        row = unscaled(update[name], taken[name])
        assert torch.isfinite(row).all()
        assert torch.equal(row[v == 0], torch.zeros_like(row[v == 0]))
        torch.testing.assert_close(row * taken[name], update[name].masked_fill(v == 0, 0.0))
    assert bool((opt.state[params[head]]["exp_avg_sq"].view(-1)[:1] == 0).all())
    assert float(step[head].view(-1)[0]) == 0.0


def test_preconditioner_needs_a_state() -> None:
    model = tiny_gpt2()
    with pytest.raises(ValueError, match="no Adam state"):
        adam_preconditioner(torch.optim.Adam(model.parameters()), model)
    with pytest.raises(TypeError, match="Adam-family"):
        sgd = torch.optim.SGD(model.parameters(), lr=0.1)
        adam_preconditioner(sgd, model)


def test_scaled_rows_give_the_preconditioned_kernel() -> None:
    model = tiny_gpt2()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    _loss_step(model, make_batch(seed=3, n=3), opt)
    batch = make_batch(n=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        captured = capture_gradients(model, batch, method="loop")
    sqrt_p = adam_preconditioner(opt, model)
    scaled = scale_rows(captured.gradients, sqrt_p)
    n = batch.size
    rows = torch.cat([scaled[k].reshape(n, -1) for k in captured.gradients], 1).double()
    kernel = rows @ rows.T
    W = captured.flat().double()
    P = torch.cat([sqrt_p[k].reshape(-1) ** 2 for k in captured.gradients]).double()
    direct = torch.stack(
        [torch.stack([(W[i] * P * W[j]).sum() for j in range(n)]) for i in range(n)]
    )
    torch.testing.assert_close(kernel, direct, rtol=1e-5, atol=0)
    # the applied-update row in adam geometry keeps inner products with the rows: <w, u>, over
    # the coordinates with a second moment (P = 0 elsewhere: tokens the step had not seen)
    assert bool((P == 0).any()) and bool((W[:, P == 0] != 0).any())
    u = {k: torch.randn_like(v) for k, v in sqrt_p.items()}
    u_row = torch.cat([v.reshape(-1) for v in unscale_update(u, sqrt_p).values()]).double()
    u_flat = torch.cat([u[k].reshape(-1) for k in captured.gradients]).double()
    torch.testing.assert_close(rows @ u_row, W @ (u_flat * (P > 0)), rtol=1e-5, atol=1e-9)


def test_applied_update_is_theta_after_minus_theta_before() -> None:
    model = tiny_gpt2()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    batch = make_batch(n=3)
    with AppliedUpdateCapture(model) as applied:
        _loss_step(model, batch, opt)
    after = dict(model.named_parameters())
    assert set(applied.update) == set(before)
    for name, u in applied.update.items():
        torch.testing.assert_close(u, after[name].detach() - before[name], rtol=0, atol=0)
    assert any(bool(u.abs().max() > 0) for u in applied.update.values())
    sgd = torch.optim.SGD(model.parameters(), lr=0.5)
    model.zero_grad()
    out = model(batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    (-response_logprobs(out, batch.input_ids, batch.response_mask).sum()).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    assert len(grads) == len(before)
    with AppliedUpdateCapture(model) as applied_sgd:
        sgd.step()
    for name, g in grads.items():  # g is the gradient of the loss -sum S_i: u = -lr * g
        ulp = float(after[name].detach().abs().max()) * 2.0**-23
        torch.testing.assert_close(applied_sgd.values()[name], -0.5 * g, rtol=1e-5, atol=ulp)


def test_logprob_after_is_the_same_sequences_after_the_step() -> None:
    model = tiny_gpt2()
    batch = make_batch(n=4)
    before = sequence_logprobs(model, batch)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.zero_grad()
    model.eval()
    out = model(batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    (-response_logprobs(out, batch.input_ids, batch.response_mask).sum()).backward()
    opt.step()
    after = logprob_after(model, batch)
    assert bool((after > before).all())  # a step up the gradient of sum S_i raises every S_i here
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(after, capture_gradients(model, batch, method="loop").logprobs)


def _sharded_adam_rank(rank: int, world: int, init: str, out: str) -> None:
    """One rank of :func:`test_adam_geometry_of_a_model_sharded_by_fsdp2`: three AdamW steps on
    the ``fully_shard`` model and on an unsharded copy, every rank on the same batches (so
    FSDP's mean gradient is the copy's), saving the step's ``sqrt(P_t)`` before the last step,
    and after it the taken ``sqrt(P_t)``, the applied update and its sketches; between them,
    ``logprob_after``'s forward."""
    from clients.shards import GatheredOnAccess, is_sharded, sketch_of_whole, whole
    from sketch.spec import SketchSpec, build_sketcher
    from tests.clients.conftest import exit_without_teardown, fsdp2_llama

    warnings.simplefilter("ignore")
    # the head stays a plain tensor, whole on every rank (FSDP leaves it alone)
    with fsdp2_llama(rank, world, init, shard_head=False) as (model, plain):
        assert is_sharded(model.model.embed_tokens.weight) and not is_sharded(model.lm_head.weight)
        models = {"sharded": model, "plain": plain}
        optimizers = {
            tag: torch.optim.AdamW(m.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
            for tag, m in models.items()
        }
        result: dict[str, torch.Tensor] = {}
        steps: dict[str, dict[str, float]] = {}
        for step in range(3):
            batch = make_batch(n=4, seed=20 + step)
            for tag, m in models.items():
                optimizers[tag].zero_grad()
                out_ = m(batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
                s = response_logprobs(out_.logits, batch.input_ids, batch.response_mask)
                (-(torch.linspace(-1.0, 1.0, 4) * s).sum()).backward()
                if step == 2:
                    params = dict(m.named_parameters())
                    sqrt_p = GatheredOnAccess(
                        adam_step_preconditioner(optimizers[tag], params, lazy=True)
                    )
                    last = None
                    for name in sorted(params):
                        result[f"{tag}/step/{name}"] = sqrt_p[name].clone()
                        assert sqrt_p[name] is sqrt_p[name]  # read again: not gathered again
                        # one parameter's whole value held at a time
                        assert last is None or last() is None
                        last = weakref.ref(sqrt_p[name])
                    steps[tag] = adam_step_counts(optimizers[tag], params)
                optimizers[tag].step()
        # a forward without a backward leaves the shards registered (FSDP's root would not)
        logprob_after(model, make_batch(n=2, seed=30))
        assert all(is_sharded(p) for n, p in model.named_parameters() if n != "lm_head.weight")
        for tag, m in models.items():
            params = {n: p for n, p in sorted(m.named_parameters())}
            taken = adam_taken_preconditioner(optimizers[tag], params)
            update = dict(adam_applied_update(optimizers[tag], params, steps[tag]))
            for name in params:
                result[f"{tag}/taken/{name}"] = whole(taken[name])
                result[f"{tag}/update/{name}"] = whole(update[name])
            declared = {n: list(p.shape) for n, p in params.items()}
            for kind in ("countsketch", "kronecker"):
                spec = SketchSpec.from_dict({"kind": kind, "dim": 64, "seed": 3})
                sketcher = build_sketcher(spec, declared)
                result[f"{tag}/{kind}"] = sketch_of_whole(sketcher, list(update.items()))
        torch.save(result, f"{out}/{rank}.pt")
    exit_without_teardown()


def test_adam_geometry_of_a_model_sharded_by_fsdp2(tmp_path: Path) -> None:
    """Under torch's FSDP2 (three gloo processes, so that the shards are uneven, the head
    left unsharded), Adam's ``sqrt(P_t)`` of the step about to be taken, the ``sqrt(P_t)`` of
    the step taken and the applied update, each computed from this rank's shards of the
    gradient, state and parameters and then gathered (the first one parameter at a time as
    it is read, :class:`clients.shards.GatheredOnAccess`), equal those of the unsharded model;
    and the sketch of the applied update made from the ranks' shards (``name@offset`` slices
    added up by one all-reduce), countsketch and kronecker, equals the sketch of the whole
    update on every rank.  ``logprob_after`` leaves the model's shards registered as its parameters
    (FSDP's root keeps its gathered copies after a forward without a backward)."""
    import torch.multiprocessing as mp

    world = 3
    init = f"file://{tmp_path}/init"
    mp.spawn(_sharded_adam_rank, args=(world, init, str(tmp_path)), nprocs=world)
    results = [torch.load(tmp_path / f"{rank}.pt") for rank in range(world)]
    names = {key.split("/", 2)[2] for key in results[0] if key.startswith("plain/step/")}
    assert names and any(name.startswith("model.layers.") for name in names)
    for result in results:
        for what in ("step", "taken", "update"):
            for name in names:
                want = result[f"plain/{what}/{name}"]
                got = result[f"sharded/{what}/{name}"]
                scale = float(want.abs().max())
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * scale)
        for kind in ("countsketch", "kronecker"):
            want = result[f"plain/{kind}"]
            scale = float(want.abs().max())
            got = result[f"sharded/{kind}"]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * scale)
