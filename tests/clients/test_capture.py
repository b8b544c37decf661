"""Exact per-sequence capture: against autograd of each S_i computed alone."""

from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from clients.capture import (
    SequenceBatch,
    capture_gradients,
    capture_sketches,
    forward_logits,
    iter_captured_chunks,
    sequence_logprobs,
    sequence_logprobs_and_entropy_sums,
)
from clients.filters import ParameterFilter
from clients.http import Client
from sketch.spec import SketchSpec, build_sketcher
from tests.clients.conftest import VOCAB, LiveService, make_batch, tiny_gpt2


def _reference(
    model: nn.Module, batch: SequenceBatch, i: int
) -> tuple[float, dict[str, torch.Tensor]]:
    """S_i and dS_i/dtheta of sequence i alone: unpadded, summed token by token in float64."""
    length = int(batch.attention_mask[i].sum())
    ids = batch.input_ids[i, :length]
    model.eval()
    logits = forward_logits(model, ids.unsqueeze(0))[0]
    s = torch.zeros((), dtype=torch.float64)
    for t in range(1, length):
        if batch.response_mask[i, t]:
            s = s + torch.log_softmax(logits[t - 1].double(), dim=-1)[ids[t]]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(s, params, allow_unused=True)
    out = {
        n: (torch.zeros_like(p) if g is None else g)
        for n, p, g in zip(names, params, grads, strict=True)
    }
    return float(s.detach()), out


@pytest.mark.parametrize("method", ["vmap", "loop"])
def test_exact_gradients_equal_autograd_of_each_sequence(
    model: nn.Module, batch: SequenceBatch, method: str
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        captured = capture_gradients(model, batch, method=method, chunk_size=2)  # type: ignore[arg-type]
    assert captured.method == method
    assert set(captured.gradients) == {n for n, _ in model.named_parameters()}
    for i in range(batch.size):
        s_ref, g_ref = _reference(model, batch, i)
        assert captured.logprobs[i].item() == pytest.approx(s_ref, rel=1e-5, abs=1e-5)
        for name, g in g_ref.items():
            torch.testing.assert_close(captured.gradients[name][i], g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_entropy_sums_are_the_response_positions_full_entropies(
    model: nn.Module, batch: SequenceBatch, temperature: float
) -> None:
    """``entropy_sum`` is ``sum_t H_t`` over exactly the response positions, ``H_t`` the
    entropy of the tempered distribution that drew token ``t`` (``torch.distributions``, one
    sequence at a time, unpadded); the log-probs of the same forward are ``sequence_logprobs``."""
    logprobs, sums = sequence_logprobs_and_entropy_sums(model, batch, temperature=temperature)
    torch.testing.assert_close(logprobs, sequence_logprobs(model, batch, temperature=temperature))
    for i in range(batch.size):
        length = int(batch.attention_mask[i].sum())
        ids = batch.input_ids[i, :length]
        with torch.no_grad():
            logits = forward_logits(model, ids[None])[0].double() / temperature
        expected = sum(
            float(torch.distributions.Categorical(logits=logits[t - 1]).entropy())
            for t in range(1, length)
            if batch.response_mask[i, t]
        )
        assert sums[i].item() == pytest.approx(expected, rel=1e-5)
        assert 0 < expected < float(batch.num_tokens[i]) * np.log(VOCAB) + 1e-9


def test_logprob_is_response_tokens_only(model: nn.Module, batch: SequenceBatch) -> None:
    s = sequence_logprobs(model, batch)
    whole = []
    for i in range(batch.size):
        s_ref, _ = _reference(model, batch, i)
        assert s[i].item() == pytest.approx(s_ref, rel=1e-5)
        # the sum over every predicted token (prompt included) is a different number
        length = int(batch.attention_mask[i].sum())
        ids = batch.input_ids[i, :length]
        with torch.no_grad():
            logp = torch.log_softmax(forward_logits(model, ids[None])[0, :-1].double(), -1)
        whole.append(float(logp.gather(-1, ids[1:, None]).sum()))
    prompt_lengths = batch.lengths - batch.num_tokens
    for i in range(batch.size):
        if prompt_lengths[i] > 1:
            assert whole[i] < s[i].item() - 1e-3


@pytest.mark.parametrize("method", ["vmap", "loop"])
def test_padding_tokens_change_nothing(model: nn.Module, batch: SequenceBatch, method: str) -> None:
    pad = batch.attention_mask == 0
    assert pad.any()
    scrambled = batch.input_ids.clone()
    scrambled[pad] = torch.randint(1, VOCAB, (int(pad.sum()),))
    other = SequenceBatch(scrambled, batch.attention_mask, batch.response_mask)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = capture_gradients(model, batch, method=method)  # type: ignore[arg-type]
        b = capture_gradients(model, other, method=method)  # type: ignore[arg-type]
    torch.testing.assert_close(a.logprobs, b.logprobs, rtol=0, atol=1e-6)
    for name in a.gradients:
        torch.testing.assert_close(a.gradients[name], b.gradients[name], rtol=1e-5, atol=1e-7)


def test_left_padding_is_repacked(model: nn.Module, batch: SequenceBatch) -> None:
    """A left-padded batch gives the same S_i as the right-padded one."""
    n, width = batch.input_ids.shape
    ids = torch.full_like(batch.input_ids, 7)
    att = torch.zeros_like(batch.attention_mask)
    resp = torch.zeros_like(batch.response_mask)
    for i in range(n):
        length = int(batch.lengths[i])
        ids[i, width - length :] = batch.input_ids[i, :length]
        att[i, width - length :] = 1
        resp[i, width - length :] = batch.response_mask[i, :length]
    repacked = SequenceBatch.from_padded(ids, att, resp)
    assert torch.equal(repacked.attention_mask, batch.attention_mask)
    assert torch.equal(repacked.response_mask, batch.response_mask)
    real = batch.attention_mask.bool()
    assert torch.equal(repacked.input_ids[real], batch.input_ids[real])
    torch.testing.assert_close(sequence_logprobs(model, repacked), sequence_logprobs(model, batch))


class _ItemModel(nn.Module):
    """A model vmap cannot handle (``.item()`` in forward); ``forward(ids)`` -> logits."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.proj = nn.Linear(8, VOCAB)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        scale = 1.0 + 0.0 * float(input_ids.float().mean().item())
        h = torch.cumsum(self.embed(input_ids), dim=1) * scale
        out: torch.Tensor = self.proj(torch.tanh(h))
        return out


def test_vmap_runs_with_transformers_input_grad_hooks(
    model: nn.Module, batch: SequenceBatch
) -> None:
    """transformers' ``enable_input_require_grads`` (which TRL calls for its default gradient
    checkpointing, twice in some versions) and its copies hook the embeddings to call
    ``requires_grad_``, which vmap refuses: the capture lifts those hooks for its pass, takes
    the same rows by vmap, and puts them back.  Before, every TRL run fell back to the
    per-sequence loop."""
    model.enable_input_require_grads()
    model.enable_input_require_grads()

    def make_inputs_require_grad(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
        output.requires_grad_(True)  # the copy in TRL's experimental trainers' preparation

    model.get_input_embeddings().register_forward_hook(make_inputs_require_grad)
    hooks = {id(m): dict(m._forward_hooks) for m in model.modules()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.filterwarnings("error", "kernelscope: vmap capture failed", RuntimeWarning)
        captured = capture_gradients(model, batch, method="auto", chunk_size=3)
    assert captured.method == "vmap"
    assert {id(m): dict(m._forward_hooks) for m in model.modules()} == hooks
    assert sum(len(h) for h in hooks.values()) == 3
    for i in range(batch.size):
        s_ref, g_ref = _reference(model, batch, i)
        assert captured.logprobs[i].item() == pytest.approx(s_ref, rel=1e-5, abs=1e-5)
        for name, g in g_ref.items():
            torch.testing.assert_close(captured.gradients[name][i], g, rtol=1e-4, atol=1e-6)


def _left_padded(batch: SequenceBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batch's rows left-padded to its width, as TRL lays a micro-batch out: ids,
    attention mask and response mask, and each row's padding is its first position."""
    width = batch.input_ids.shape[1]
    ids = torch.zeros_like(batch.input_ids)
    attention = torch.zeros_like(batch.attention_mask)
    response = torch.zeros_like(batch.response_mask)
    for i, length in enumerate(batch.lengths.tolist()):
        ids[i, width - length :] = batch.input_ids[i, :length]
        attention[i, width - length :] = 1
        response[i, width - length :] = batch.response_mask[i, :length]
    return ids, attention, response


@pytest.mark.parametrize("method", ["auto", "loop"])
def test_position_offsets_reproduce_a_left_padded_forward(
    model: nn.Module, model_name: str, method: str
) -> None:
    """TRL runs the model on left-padded rows without position ids, so a model with absolute
    position embeddings (GPT-2) sees each row's tokens at ``padding + t``.  The right-padded
    batch with ``position_offsets`` = that padding gives the same ``S_i`` and ``dS_i/dtheta``
    as autograd of each left-padded row (by the loop, which ``auto`` takes: transformers
    checks position ids with data-dependent control flow, which vmap cannot run; and the
    forward of ``sequence_logprobs``); without the offsets GPT-2's differ, a rotary model's do
    not."""
    ids, attention, response = _left_padded(make_batch())
    batch = SequenceBatch.from_padded(ids, attention, response)
    offsets = ids.shape[1] - batch.lengths
    shifted = replace(batch, position_offsets=offsets)
    model.eval()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        captured = capture_gradients(model, shifted, method=method, chunk_size=3)  # type: ignore[arg-type]
    assert captured.method == "loop"
    with pytest.raises(ValueError, match="vmap capture cannot take position_offsets"):
        capture_gradients(model, shifted, method="vmap")
    plain = sequence_logprobs(model, batch)
    for i in range(batch.size):
        logits = model(ids[i : i + 1], attention_mask=attention[i : i + 1]).logits[0].double()
        logp = torch.log_softmax(logits[:-1], dim=-1).gather(1, ids[i, 1:, None])[:, 0]
        s = logp[response[i, 1:]].sum()
        grads = torch.autograd.grad(s, params, allow_unused=True)
        assert captured.logprobs[i].item() == pytest.approx(float(s), rel=1e-5, abs=1e-5)
        for name, g in zip(names, grads, strict=True):
            expected = torch.zeros_like(captured.gradients[name][i]) if g is None else g.float()
            torch.testing.assert_close(captured.gradients[name][i], expected, rtol=1e-4, atol=1e-6)
        if model_name == "gpt2" and int(offsets[i]):
            assert abs(float(plain[i]) - float(s)) > 1e-4
        else:
            assert float(plain[i]) == pytest.approx(float(s), rel=1e-4, abs=1e-4)
    torch.testing.assert_close(sequence_logprobs(model, shifted), captured.logprobs)


def test_position_offsets_travel_with_the_rows() -> None:
    """``select``, ``trimmed``, ``concat`` and ``to`` keep each row's offset; a batch without
    offsets joined to one with them gets 0 (the model's own positions of a right-padded row);
    an offset per row is required, and model inputs of its own exclude them."""
    batch = make_batch(n=4)
    shifted = replace(batch, position_offsets=torch.tensor([3, 0, 2, 1]))
    assert shifted.select([2, 0]).position_offsets.tolist() == [2, 3]  # type: ignore[union-attr]
    assert shifted.select(slice(1, 3)).trimmed().position_offsets.tolist() == [0, 2]  # type: ignore[union-attr]
    joined = SequenceBatch.concat([batch.select([0]), shifted.select([2])])
    assert joined.position_offsets.tolist() == [0, 2]  # type: ignore[union-attr]
    assert SequenceBatch.concat([batch, batch]).position_offsets is None
    assert shifted.to("cpu").position_offsets.tolist() == [3, 0, 2, 1]  # type: ignore[union-attr]
    positions = shifted.positions()
    assert positions is not None and positions[0, :3].tolist() == [3, 4, 5]
    with pytest.raises(ValueError, match="position_offsets must be"):
        replace(batch, position_offsets=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="model inputs"):
        replace(
            batch,
            model_inputs={"pixel_values": torch.zeros(1)},
            position_offsets=torch.zeros(4, dtype=torch.long),
        )


def test_auto_falls_back_to_loop_when_vmap_fails() -> None:
    torch.manual_seed(0)
    model = _ItemModel()
    batch = make_batch(n=4)
    with pytest.warns(RuntimeWarning, match="per-sequence loop"):
        auto = capture_gradients(model, batch, method="auto")
    assert auto.method == "loop"
    with pytest.raises(RuntimeError):
        capture_gradients(model, batch, method="vmap")
    for i in range(batch.size):
        s_ref, g_ref = _reference(model, batch, i)
        assert auto.logprobs[i].item() == pytest.approx(s_ref, rel=1e-5)
        for name, g in g_ref.items():
            torch.testing.assert_close(auto.gradients[name][i], g, rtol=1e-4, atol=1e-6)


def test_eval_mode_is_used_and_restored() -> None:
    model = tiny_gpt2(dropout=0.5)
    model.train()
    batch = make_batch(n=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = capture_gradients(model, batch, method="vmap")
        b = capture_gradients(model, batch, method="loop")
    assert model.training and all(m.training for m in model.modules())
    torch.testing.assert_close(a.logprobs, b.logprobs, rtol=1e-5, atol=1e-5)


def test_parameter_filter_selects_the_captured_subset(
    model: nn.Module, batch: SequenceBatch
) -> None:
    names = [n for n, _ in model.named_parameters()]
    matrices = ParameterFilter(min_ndim=2, exclude_regex=r"(wte|embed_tokens|lm_head)")
    captured = capture_gradients(model, batch, parameter_filter=matrices, method="loop")
    expected = [
        n
        for n, p in model.named_parameters()
        if p.ndim >= 2 and not any(s in n for s in ("wte", "embed_tokens", "lm_head"))
    ]
    assert list(captured.gradients) == expected
    assert captured.parameters == matrices.declared_parameters(model)
    full = capture_gradients(model, batch, method="loop")
    for name in expected:
        torch.testing.assert_close(captured.gradients[name], full.gradients[name])
    assert captured.flat().shape == (
        batch.size,
        sum(model.get_parameter(n).numel() for n in expected),
    )
    one = ParameterFilter(include=[names[-1]])
    assert list(one.named_parameters(model)) == [names[-1]]
    with pytest.raises(ValueError, match="selects no parameter"):
        capture_gradients(model, batch, parameter_filter=ParameterFilter(lora_only=True))


def test_lora_only_filter_keeps_adapter_parameters() -> None:
    class Adapted(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.base = nn.Linear(4, 4)
            self.lora_A = nn.Linear(4, 2, bias=False)
            self.lora_B = nn.Linear(2, 4, bias=False)

    model = Adapted()
    model.base.requires_grad_(False)
    assert list(ParameterFilter(lora_only=True).named_parameters(model)) == [
        "lora_A.weight",
        "lora_B.weight",
    ]
    assert ParameterFilter(trainable_only=False).declared_parameters(model)["base.weight"] == [4, 4]
    assert ParameterFilter().declared_parameters(model) == {
        "lora_A.weight": [2, 4],
        "lora_B.weight": [4, 2],
    }


def test_batch_validation() -> None:
    with pytest.raises(ValueError, match="at least one token"):
        SequenceBatch.from_pairs([[]], [[1, 2]])
    ids = torch.ones(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="first token"):
        SequenceBatch(ids, torch.ones_like(ids), torch.tensor([[True, True, False]]))
    with pytest.raises(ValueError, match="padded"):
        SequenceBatch(ids, torch.tensor([[1, 1, 0]]), torch.tensor([[False, True, True]]))
    with pytest.raises(ValueError, match="right-padded"):
        SequenceBatch(ids, torch.tensor([[0, 1, 1]]), torch.tensor([[False, False, True]]))
    b = SequenceBatch.from_pairs([[1], [2, 3]], [[4, 5, 6], [7]])
    assert b.num_tokens.tolist() == [3, 1]
    assert b.lengths.tolist() == [4, 3]


def token_coefficients(batch: SequenceBatch, seed: int = 3) -> torch.Tensor:
    """Random per-token coefficients ``c_{i,t}`` at response positions (0 elsewhere, NaN on
    padding to show it never counts)."""
    g = torch.Generator().manual_seed(seed)
    coef = torch.randn(batch.input_ids.shape, generator=g)
    coef = torch.where(batch.response_mask, coef, torch.zeros_like(coef))
    return torch.where(batch.attention_mask.bool(), coef, torch.full_like(coef, float("nan")))


@pytest.mark.parametrize("entropy", [False, True], ids=["logprob", "with_entropy"])
@pytest.mark.parametrize("method", ["vmap", "loop"])
def test_update_rows_from_token_coefficients(
    model: nn.Module, batch: SequenceBatch, method: str, entropy: bool
) -> None:
    """``token_coefficients`` give the update rows ``u_i = sum_t c_{i,t} grad log pi_{i,t}``
    (math.md §4 "Update rows") of each sequence, against autograd token by token, plus ``sum_t
    e_{i,t} grad H_{i,t}`` with ``entropy_coefficients`` (an entropy bonus); coefficients equal
    to 1 on the response give the score rows back."""
    coef = token_coefficients(batch)
    ecoef = token_coefficients(batch, seed=5) if entropy else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        captured = capture_gradients(
            model,
            batch,
            method=method,  # type: ignore[arg-type]
            chunk_size=2,
            token_coefficients=coef,
            entropy_coefficients=ecoef,
        )
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    model.eval()
    for i in range(batch.size):
        length = int(batch.attention_mask[i].sum())
        ids = batch.input_ids[i, :length]
        logits = forward_logits(model, ids.unsqueeze(0))[0]
        value = torch.zeros((), dtype=torch.float64)
        for t in range(1, length):
            if batch.response_mask[i, t]:
                logp = torch.log_softmax(logits[t - 1].double(), dim=-1)
                value = value + float(coef[i, t]) * logp[ids[t]]
                if ecoef is not None:
                    value = value - float(ecoef[i, t]) * (logp.exp() * logp).sum()
        grads = torch.autograd.grad(value, params, allow_unused=True)
        assert captured.logprobs[i].item() == pytest.approx(
            float(value.detach()), rel=1e-5, abs=1e-5
        )
        for name, g in zip(names, grads, strict=True):
            want = torch.zeros_like(captured.gradients[name][i]) if g is None else g.float()
            torch.testing.assert_close(captured.gradients[name][i], want, rtol=1e-4, atol=1e-6)
    ones = batch.response_mask.float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        as_scores = capture_gradients(model, batch, method=method, token_coefficients=ones)  # type: ignore[arg-type]
        scores = capture_gradients(model, batch, method=method)  # type: ignore[arg-type]
    for name, g in scores.gradients.items():
        torch.testing.assert_close(as_scores.gradients[name], g)
    with pytest.raises(ValueError, match="laid out like input_ids"):
        capture_gradients(model, batch, token_coefficients=coef[:, :-1])


@pytest.mark.parametrize("kind", ["countsketch", "gaussian", "rademacher", "kronecker"])
def test_trainer_side_sketches_are_the_services_bit_for_bit(
    live_service: LiveService, kind: str
) -> None:
    """Rows sketched on the trainer (:func:`capture_sketches`, one chunk at a time) equal the
    service's sketch of the same raw rows bit for bit: run ``raw`` gets each chunk's exact
    gradients (one upload per chunk), run ``trainer`` the chunks' trainer-side sketches, and
    the two kernels are identical arrays."""
    model = tiny_gpt2().eval()
    batch = make_batch(n=6)
    parameters = {n: list(p.shape) for n, p in model.named_parameters()}
    spec = {"kind": kind, "dim": 64, "seed": 3}
    sketcher = build_sketcher(SketchSpec.from_dict(spec), parameters)
    ids = [f"s{i}" for i in range(batch.size)]
    records = [
        {"id": i, "prompt_id": "p0", "logprob": -1.0, "advantage": 1.0, "num_tokens": 1}
        for i in ids
    ]
    captured = capture_sketches(model, batch, sketcher, chunk_size=4)
    with Client(live_service.base_url) as client:
        kernels = {}
        for run in ("raw", "trainer"):
            run_id = f"{kind}-{run}"
            client.create_run(run_id, sketch=spec, parameters=parameters)
            for span, _, rows, _ in iter_captured_chunks(model, batch, chunk_size=4):
                if run == "raw":
                    client.push_gradients(run_id, 0, rows, ids[span])
                else:
                    sketched = sketcher.sketch(rows)
                    torch.testing.assert_close(sketched, captured.sketch[span], rtol=0, atol=0)
                    client.push_sketches(run_id, 0, sketched, ids[span])
            client.push_sequences(run_id, 0, 0.1, records)
            kernels[run] = client.kernel(run_id, 0, wait=60).matrix
        np.testing.assert_array_equal(kernels["trainer"], kernels["raw"])


def test_sketches_of_any_chunking_agree_and_scale_rows() -> None:
    """Chunk size changes only float rounding; ``row_scale`` multiplies the rows before the
    sketch (the sketch of ``sqrt(P) w_i``)."""
    model = tiny_gpt2().eval()
    batch = make_batch(n=5)
    parameters = {n: list(p.shape) for n, p in model.named_parameters()}
    sketcher = build_sketcher(
        SketchSpec.from_dict({"kind": "gaussian", "dim": 32, "seed": 0}), parameters
    )
    one = capture_sketches(model, batch, sketcher, chunk_size=5)
    two = capture_sketches(model, batch, sketcher, chunk_size=2)
    torch.testing.assert_close(two.sketch, one.sketch, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(two.logprobs, one.logprobs)
    scale = {n: torch.rand_like(p) + 0.5 for n, p in model.named_parameters()}
    scaled = capture_sketches(model, batch, sketcher, chunk_size=5, row_scale=scale)
    exact = capture_gradients(model, batch, chunk_size=5)
    expected = sketcher.sketch({n: g * scale[n] for n, g in exact.gradients.items()})
    torch.testing.assert_close(scaled.sketch, expected, rtol=1e-5, atol=1e-6)


def test_logits_of_the_response_window_alone(model: nn.Module) -> None:
    """The LM head runs on the positions from the one before the earliest response token
    (``logits_to_keep``, as TRL's own forward), and the log-probs, entropy sums, hooked rows and
    token derivatives are those of the full logits; logits that miss a response token are
    refused."""
    from clients.capture import (
        forward_logits,
        response_entropy_sums,
        response_logprobs,
        response_window,
        sequence_logprobs_and_entropy_sums,
    )
    from clients.factorised import HookedCapture
    from clients.token_shares import token_derivatives

    g = torch.Generator().manual_seed(3)
    lengths = [(3, 4), (5, 2), (4, 3), (3, 5)]  # (prompt, response): prompts of 3 or more
    batch = SequenceBatch.from_pairs(
        [torch.randint(1, VOCAB, (p,), generator=g) for p, _ in lengths],
        [torch.randint(1, VOCAB, (r,), generator=g) for _, r in lengths],
    )
    width = batch.input_ids.shape[1]
    first = int(torch.nonzero(batch.response_mask.any(0)).min())
    keep = response_window(batch.response_mask)
    assert keep == width - (first - 1) < width
    assert response_window(torch.zeros_like(batch.response_mask)) == width
    seen: list[int] = []
    head = model.get_output_embeddings()
    handle = head.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    try:
        with torch.no_grad():
            full = forward_logits(model, batch.input_ids, batch.attention_mask)
            cut = forward_logits(model, batch.input_ids, batch.attention_mask, logits_to_keep=keep)
        assert seen == [width, keep]
        torch.testing.assert_close(cut, full[:, -keep:], rtol=1e-5, atol=1e-5)
        mask, ids = batch.response_mask, batch.input_ids
        torch.testing.assert_close(
            response_logprobs(cut, ids, mask), response_logprobs(full, ids, mask)
        )
        torch.testing.assert_close(
            response_entropy_sums(cut, mask), response_entropy_sums(full, mask)
        )
        with pytest.raises(ValueError, match="do not reach"):
            response_logprobs(full[:, -(keep - 1) :], ids, mask)
        seen.clear()
        logprobs, _ = sequence_logprobs_and_entropy_sums(model, batch)
        hooked = HookedCapture(model, {"kind": "countsketch", "dim": 32, "seed": 1})
        captured = hooked(batch)
        v = {n: torch.randn_like(p) for n, p in model.named_parameters()}
        found = token_derivatives(model, batch, v)
        assert seen == [keep, keep, keep]
    finally:
        handle.remove()
    torch.testing.assert_close(logprobs, response_logprobs(full, ids, mask))
    torch.testing.assert_close(captured.logprobs, logprobs, rtol=1e-5, atol=1e-5)
    # the derivatives off the window are zero, as off the response positions
    assert not found.logprob[:, : width - keep + 1].any()
