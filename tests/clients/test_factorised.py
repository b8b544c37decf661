"""Factorised (hook) kronecker capture == the server's kronecker sketch of explicit gradients."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from clients.capture import SequenceBatch, capture_gradients
from clients.factorised import FactorisedCapture, HookedCapture
from clients.filters import ParameterFilter
from sketch.countsketch import CountSketch
from sketch.kronecker import KroneckerSketch
from tests.clients.conftest import _TINY_DECODER, VOCAB, make_batch, tiny_gpt2, tiny_llama

DIM, SEED = 48, 11


def _explicit(model: nn.Module, batch: SequenceBatch) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return capture_gradients(model, batch, method="loop").gradients


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal to float32 rounding of the sums involved (relative to the row scale)."""
    scale = float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * max(scale, 1e-12))


def test_factorised_equals_kronecker_sketch_per_sequence(
    model: nn.Module, batch: SequenceBatch
) -> None:
    capture = FactorisedCapture(model, dim=DIM, seed=SEED)
    # every parameter is covered: matrices by hooks, vectors exactly then CountSketch
    assert capture.parameters == {n: list(p.shape) for n, p in model.named_parameters()}
    result = capture(batch)
    grads = _explicit(model, batch)
    server = KroneckerSketch(DIM, SEED, capture.parameters)
    assert result.sketch.shape == (batch.size, DIM)
    for i in range(batch.size):
        row_i = server.sketch({k: g[i : i + 1] for k, g in grads.items()})
        _close(result.sketch[i : i + 1], row_i)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = capture_gradients(model, batch, method="loop").logprobs
    torch.testing.assert_close(result.logprobs, s, rtol=1e-5, atol=1e-5)
    assert torch.equal(result.num_tokens, batch.num_tokens)


def test_factorised_equals_kronecker_sketch_parameter_by_parameter(
    model: nn.Module, batch: SequenceBatch
) -> None:
    """Each parameter alone (Conv1D/Linear, tied embedding, biases, norms, padding_idx).

    Layer 1 repeats layer 0's kinds of parameters: it is skipped to keep the test short.
    """
    grads = _explicit(model, batch)
    for name in [n for n in grads if ".1." not in n]:
        capture = FactorisedCapture(
            model, dim=DIM, seed=SEED, parameter_filter=ParameterFilter(include=[name])
        )
        assert list(capture.parameters) == [name]
        server = KroneckerSketch(DIM, SEED, capture.parameters)
        want = server.sketch({name: grads[name]})
        assert float(want.abs().max()) > 0, name
        _close(capture(batch).sketch, want)


def test_non_matrix_exclude_covers_matrices_only(model: nn.Module, batch: SequenceBatch) -> None:
    capture = FactorisedCapture(model, dim=DIM, seed=SEED, non_matrix="exclude")
    matrices = {n: list(p.shape) for n, p in model.named_parameters() if p.ndim == 2}
    assert capture.parameters == matrices
    grads = _explicit(model, batch)
    want = KroneckerSketch(DIM, SEED, matrices).sketch({k: grads[k] for k in matrices})
    _close(capture(batch).sketch, want)


def test_padding_changes_nothing_and_no_grad_is_written(
    model: nn.Module, batch: SequenceBatch
) -> None:
    capture = FactorisedCapture(model, dim=DIM, seed=SEED)
    pad = batch.attention_mask == 0
    scrambled = batch.input_ids.clone()
    scrambled[pad] = torch.randint(1, VOCAB, (int(pad.sum()),))
    a = capture(batch)
    b = capture(SequenceBatch(scrambled, batch.attention_mask, batch.response_mask))
    torch.testing.assert_close(a.sketch, b.sketch, rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())


def test_sub_batches_give_the_same_rows(model: nn.Module) -> None:
    """A row depends on its own sequence only: capturing in two halves changes nothing."""
    batch = make_batch(n=6, seed=4)
    capture = FactorisedCapture(model, dim=DIM, seed=SEED)
    whole = capture(batch).sketch
    halves = torch.cat(
        [capture(batch.select(slice(0, 3))).sketch, capture(batch.select(slice(3, 6))).sketch]
    )
    torch.testing.assert_close(whole, halves, rtol=1e-4, atol=1e-5 * float(whole.abs().max()))


class _Scaled(nn.Module):
    """A module with a raw parameter and a child: no hook can capture ``gain``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.gain = nn.Parameter(torch.ones(8))
        self.head = nn.Linear(8, VOCAB)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        h = torch.cumsum(self.embed(input_ids), dim=1) * self.gain
        out: torch.Tensor = self.head(torch.tanh(h))
        return out


def test_uncapturable_parameters_are_left_out_or_refused() -> None:
    torch.manual_seed(0)
    model = _Scaled()
    with pytest.warns(RuntimeWarning, match="leaves out 1 parameter"):
        capture = FactorisedCapture(model, dim=DIM, seed=SEED)
    assert "gain" not in capture.parameters
    batch = make_batch(n=3)
    grads = _explicit(model, batch)
    want = KroneckerSketch(DIM, SEED, capture.parameters).sketch(
        {k: grads[k] for k in capture.parameters}
    )
    _close(capture(batch).sketch, want)
    with pytest.raises(ValueError, match="gain"):
        FactorisedCapture(model, dim=DIM, seed=SEED, strict=True)


class _Prefixed(nn.Module):
    """A linear layer fed by a learned prefix, not by the embeddings: its output is not
    upstream of any embedding output, so the capture must fall back to a full backward."""

    def __init__(self, broadcast: bool = False) -> None:
        super().__init__()
        self.broadcast = broadcast
        self.embed = nn.Embedding(VOCAB, 8)
        self.prefix = nn.Parameter(torch.randn(1, 1, 8))
        self.prefix_proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, VOCAB)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        prefix = self.prefix if self.broadcast else self.prefix.expand(input_ids.shape[0], 1, 8)
        h = torch.cumsum(self.embed(input_ids), dim=1) + self.prefix_proj(prefix)
        out: torch.Tensor = self.head(torch.tanh(h))
        return out


def test_outputs_off_the_embedding_paths_and_frozen_embeddings() -> None:
    torch.manual_seed(0)
    batch = make_batch(n=3)
    prefixed = _Prefixed()
    with pytest.warns(RuntimeWarning, match="prefix"):
        capture = FactorisedCapture(prefixed, dim=DIM, seed=SEED)
    assert "prefix_proj.weight" in capture.parameters
    grads = _explicit(prefixed, batch)
    want = KroneckerSketch(DIM, SEED, capture.parameters).sketch(
        {k: grads[k] for k in capture.parameters}
    )
    _close(capture(batch).sketch, want)
    with pytest.warns(RuntimeWarning, match="prefix"):
        broadcasting = FactorisedCapture(_Prefixed(broadcast=True), dim=DIM, seed=SEED)
    with pytest.raises(RuntimeError, match="broadcast"):  # one row for the whole batch
        broadcasting(batch)

    model = tiny_gpt2()  # LoRA-like: embeddings frozen, so no embedding output needs a gradient
    model.get_parameter("transformer.wte.weight").requires_grad_(False)
    model.get_parameter("transformer.wpe.weight").requires_grad_(False)
    capture = FactorisedCapture(model, dim=DIM, seed=SEED)
    assert "transformer.wte.weight" not in capture.parameters
    grads = _explicit(model, batch)
    want = KroneckerSketch(DIM, SEED, capture.parameters).sketch(
        {k: grads[k] for k in capture.parameters}
    )
    _close(capture(batch).sketch, want)


@pytest.mark.parametrize("entropy", [False, True], ids=["logprob", "with_entropy"])
def test_factorised_update_rows_from_token_coefficients(
    model: nn.Module, batch: SequenceBatch, entropy: bool
) -> None:
    """One forward and two backwards: the score sketches as without coefficients, and the
    update rows' sketches equal the kronecker sketch of the explicit ``u_i`` (math.md §4),
    also with an entropy term (``entropy_coefficients``)."""
    from tests.clients.test_capture import token_coefficients

    coef = token_coefficients(batch)
    ecoef = token_coefficients(batch, seed=5) if entropy else None
    capture = FactorisedCapture(model, dim=DIM, seed=SEED)
    result = capture(batch, token_coefficients=coef, entropy_coefficients=ecoef)
    plain = capture(batch)
    _close(result.sketch, plain.sketch)
    assert result.update_sketch is not None and plain.update_sketch is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        explicit = capture_gradients(
            model, batch, method="loop", token_coefficients=coef, entropy_coefficients=ecoef
        )
    server = KroneckerSketch(DIM, SEED, capture.parameters)
    for i in range(batch.size):
        row_i = server.sketch({k: g[i : i + 1] for k, g in explicit.gradients.items()})
        _close(result.update_sketch[i : i + 1], row_i)


@pytest.mark.parametrize("coefficients", [False, True], ids=["score", "with_update_rows"])
def test_entropy_sum_rows_from_the_same_forward(
    model: nn.Module, batch: SequenceBatch, coefficients: bool
) -> None:
    """``entropy_sum_rows``: one more backward over the capture's forward gives the sketches of
    ``z_i = grad sum_t H_t`` (math.md §3 "From the entropy sums"), equal to the kronecker sketch
    of the explicit rows (``capture_gradients`` with the response mask as entropy
    coefficients), beside unchanged score (and update) rows; by hooks in ``adam`` geometry
    too."""
    from tests.clients.test_capture import token_coefficients

    coef = token_coefficients(batch) if coefficients else None
    capture = FactorisedCapture(model, dim=DIM, seed=SEED)
    result = capture(batch, token_coefficients=coef, entropy_sum_rows=True)
    plain = capture(batch, token_coefficients=coef)
    _close(result.sketch, plain.sketch)
    if coefficients:
        assert result.update_sketch is not None and plain.update_sketch is not None
        _close(result.update_sketch, plain.update_sketch)
    assert result.entropy_sum_sketch is not None and plain.entropy_sum_sketch is None
    mask = batch.response_mask.float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        explicit = capture_gradients(model, batch, method="loop", entropy_coefficients=mask)
    server = KroneckerSketch(DIM, SEED, capture.parameters)
    _close(
        result.entropy_sum_sketch,
        server.sketch({k: explicit.gradients[k] for k in capture.parameters}),
    )
    hooked = HookedCapture(model, {"kind": "countsketch", "dim": DIM, "seed": SEED})
    scale = {k: torch.rand_like(p) for k, p in model.named_parameters() if k in hooked.parameters}
    rows = hooked.capture(batch, row_scale=scale, entropy_sum_rows=True).entropy_sum_sketch
    scaled = {k: explicit.gradients[k] * scale[k] for k in hooked.parameters}
    assert rows is not None
    _close(rows, CountSketch(DIM, SEED).sketch(scaled))


@pytest.mark.parametrize("dim", [256, 1024])
def test_kronecker_error_bars_from_the_rows_on_captured_gradients(dim: int) -> None:
    """On real per-sequence gradients (the tiny GPT-2: 2-D weights Kronecker-sketched, biases
    and norms count-sketched, all in the same cells), 2 s.e. of the error bar from the rows
    (:func:`sketch.crossed.bilinear_error_bar`) cover at least 90% of the errors of ``h^T K c``
    over 300 sketch seeds, for each of five directions ``(h, c)`` (four random, and ``h = c =
    1``: the squared norm of the summed gradient), and stay within 2x of the observed error
    (measured: coverage 92-100%, RMS 1.5-1.7x at k = 256, 92-98% and 1.2-1.3x at k = 1024).
    The unbiased variance alone (``sqrt(bilinear_variance)``, the estimator before the
    t-scaling) is as tight as the error (0.9-1.05x) but covers 83-95% (k = 256) and 88-96%
    (k = 1024): its row term is far noisier than its ``k_out - 1`` degrees of freedom say, and
    low exactly when the error is (docs/sketch.md §3)."""
    from sketch.crossed import bilinear_error_bar, bilinear_variance
    from sketch.kronecker import KroneckerSketch

    model = tiny_gpt2().eval()
    captured = capture_gradients(model, make_batch(n=12))
    rows = captured.gradients
    n = captured.logprobs.shape[0]
    flat = captured.flat().double().numpy()
    gen = np.random.default_rng(3)
    directions = [(gen.normal(size=n), gen.normal(size=n)) for _ in range(4)]
    directions.append((np.ones(n), np.ones(n)))
    seeds = 300
    errors = np.zeros((len(directions), seeds))
    bars, unscaled = np.zeros_like(errors), np.zeros_like(errors)
    for seed in range(seeds):
        sketcher = KroneckerSketch(dim, seed, captured.parameters)
        shape = (sketcher.k_out, sketcher.k_in)
        y = sketcher.sketch(rows).double().numpy()
        for d, (h, c) in enumerate(directions):
            errors[d, seed] = float((h @ y) @ (c @ y)) - float((h @ flat) @ (c @ flat))
            bars[d, seed] = bilinear_error_bar(y, y, np.outer(h, c), shape)
            unscaled[d, seed] = np.sqrt(bilinear_variance(y, y, np.outer(h, c), shape))
    coverage = np.mean(np.abs(errors) <= 2 * bars, axis=1)
    ratio = np.sqrt(np.mean(bars**2, axis=1) / np.mean(errors**2, axis=1))
    assert np.all(coverage >= 0.9), coverage
    assert np.all((ratio >= 0.5) & (ratio <= 2.0)), ratio
    assert np.min(np.mean(np.abs(errors) <= 2 * unscaled, axis=1)) < 0.9  # what the t-scaling fixes


#: ``kronecker-grouped``: a kronecker spec whose attention weights have a group of their own
#: (factors of a group's sketcher, written into its columns).
HOOKED_KINDS = ["countsketch", "gaussian", "rademacher", "kronecker", "kronecker-grouped"]


@pytest.mark.parametrize("kind", HOOKED_KINDS)
@pytest.mark.parametrize("rows", ["score", "update", "update_entropy_adam"])
@pytest.mark.parametrize("chunk_bytes", [1, 1 << 24])
def test_hooked_capture_equals_the_sketch_of_exact_rows(
    model: nn.Module, batch: SequenceBatch, kind: str, rows: str, chunk_bytes: int
) -> None:
    """:class:`HookedCapture` (per-layer per-sequence gradients formed in the hooks, sketched at
    once; embedding rows by token slice) gives the run's sketch of the exact per-sequence rows
    (:func:`capture_sketches`, chunks of exact gradients): score rows, update rows from token
    coefficients, and update rows with an entropy term in ``adam`` geometry (``row_scale``),
    for GPT-2 (Conv1D, tied embedding, LayerNorm) and Llama (Linear, RMSNorm, padding_idx).
    A chunk budget of one byte forms one row of a weight at a time for every sequence, the
    default budget whole weights at once.  Under
    ``kronecker`` matrix weights are sketched as ``A G_i B^T`` and embedding rows as rows of
    the matrix, with the factors of :class:`KroneckerSketch` (the service's sketch)."""
    from clients.capture import capture_sketches, sequence_logprobs_and_entropy_sums
    from clients.factorised import HookedCapture
    from sketch.spec import sketcher_for
    from tests.clients.test_capture import token_coefficients

    spec: dict[str, Any] = {"kind": kind.removesuffix("-grouped"), "dim": 64, "seed": 5}
    if kind.endswith("-grouped"):
        spec["groups"] = [{"name": "attention", "pattern": r".*(attn|attention).*", "dim": 36}]
    hooked = HookedCapture(model, spec, strict=True, chunk_bytes=chunk_bytes)
    assert hooked.parameters == {n: list(p.shape) for n, p in model.named_parameters()}
    # kronecker: the hooks' factor products, not the generic slice sketch, made the rows
    assert bool(hooked._kronecker_weights) == kind.startswith("kronecker")
    coef = ecoef = scale = None
    if rows != "score":
        coef = token_coefficients(batch)
    if rows == "update_entropy_adam":
        ecoef = token_coefficients(batch, seed=5)
        g = torch.Generator().manual_seed(2)
        scale = {n: torch.rand(p.shape, generator=g) + 0.5 for n, p in model.named_parameters()}
    got = hooked(batch, token_coefficients=coef, entropy_coefficients=ecoef, row_scale=scale)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = capture_sketches(
            model,
            batch,
            sketcher_for(spec, hooked.parameters),  # the service's sketcher of the run
            method="loop",
            token_coefficients=coef,
            entropy_coefficients=ecoef,
            row_scale=scale,
        )
    if coef is None:
        _close(got.sketch, want.sketch)
        torch.testing.assert_close(got.logprobs, want.logprobs, rtol=1e-5, atol=1e-5)
        # the entropy sums of the capture's own forward are those of a forward of their own
        _, sums = sequence_logprobs_and_entropy_sums(model, batch)
        assert got.entropy_sums is not None
        torch.testing.assert_close(got.entropy_sums, sums, rtol=1e-5, atol=1e-5)
    else:
        assert got.update_sketch is not None
        _close(got.update_sketch, want.sketch)


def test_captures_leave_nothing_alive(model: nn.Module, batch: SequenceBatch) -> None:
    """A capture's graph and sketch cores are freed when it returns: its hooks live on the
    graph's outputs and its accumulator held the graph, a cycle Python's collector cannot see
    through autograd (it kept about one parameter copy per training step alive)."""
    import gc

    from clients.factorised import HookedCapture, _Accumulator
    from tests.clients.test_capture import token_coefficients

    def alive() -> int:
        gc.collect()
        # type(), not isinstance(): gc.get_objects() can hold a weakref proxy whose referent
        # is gone (from earlier tests), and isinstance() on it raises ReferenceError
        return sum(type(o) is _Accumulator for o in gc.get_objects())

    before = alive()
    for capture in (
        FactorisedCapture(model, dim=DIM, seed=SEED),
        HookedCapture(model, {"kind": "countsketch", "dim": DIM, "seed": SEED}),
        HookedCapture(model, {"kind": "kronecker", "dim": DIM, "seed": SEED}),
    ):
        for _ in range(3):
            capture(batch, token_coefficients=token_coefficients(batch))
    assert alive() == before


@pytest.mark.parametrize("capture_kind", ["factorised", "countsketch-adam", "kronecker-adam"])
def test_entropy_directions_from_the_score_backward(model: nn.Module, capture_kind: str) -> None:
    """:class:`EntropyDirections`: the ``h``-weighted sums of the per-sequence score gradients
    that the capture's own score backward adds up (two directions, each over half of the rows,
    ``h`` computed from the forward's ``S``, two captures of three sequences adding into the
    same totals) equal :func:`entropy_gradient`'s ``v`` (a forward and a backward of its own)
    to float precision, unscaled in ``adam`` geometry; the rows are those of a capture without
    directions, and the update backward adds nothing."""
    from clients.factorised import EntropyDirections, HookedCapture
    from clients.token_shares import entropy_gradient
    from tests.clients.test_capture import token_coefficients

    batch = make_batch(n=6)
    scale = None
    if capture_kind == "factorised":
        capture: Any = FactorisedCapture(model, dim=DIM, seed=SEED)
    else:
        kind = capture_kind.removesuffix("-adam")
        capture = HookedCapture(model, {"kind": kind, "dim": DIM, "seed": SEED}, chunk_bytes=256)
        g = torch.Generator().manual_seed(2)
        scale = {n: torch.rand(p.shape, generator=g) + 0.5 for n, p in model.named_parameters()}
    halves = torch.tensor([0, 1, 1, 0, 1, 0])
    seen: list[torch.Tensor] = []

    def coefficients(logprobs: torch.Tensor) -> torch.Tensor:
        h = -(logprobs - logprobs.mean()) / 3.0
        seen.append(h)
        rows = halves[: len(h)] if len(seen) == 1 else halves[3:]
        return torch.stack([torch.where(rows == d, h, torch.zeros_like(h)) for d in (0, 1)])

    directions = EntropyDirections(coefficients)
    kwargs: dict[str, Any] = {} if scale is None else {"row_scale": scale}
    for part in (slice(0, 3), slice(3, 6)):
        sub = batch.select(part)
        coef = token_coefficients(sub)
        got = capture(sub, token_coefficients=coef, directions=directions, **kwargs)
        plain = capture(sub, token_coefficients=coef, **kwargs)
        _close(got.sketch, plain.sketch)
        assert got.update_sketch is not None and plain.update_sketch is not None
        _close(got.update_sketch, plain.update_sketch)
    h = torch.cat(seen)
    assert len(directions.totals) == 2
    for d in (0, 1):
        rows = torch.nonzero(halves == d).flatten().tolist()
        want = entropy_gradient(model, batch.select(rows), h[rows], parameters=capture.parameters)
        assert set(directions.totals[d]) == set(capture.parameters)
        for name, total in directions.totals[d].items():
            assert total.shape == want[name].shape, name
            torch.testing.assert_close(
                total, want[name], rtol=1e-4, atol=1e-5 * float(want[name].abs().max()) + 1e-9
            )


def test_entropy_directions_on_a_rerun_backward_count_each_hook_once() -> None:
    """A model whose hooked output is off the embedding paths: the capture's first backward
    stops at the embeddings, and a full one follows; the directions still get each hook's
    part once."""
    from clients.factorised import EntropyDirections
    from clients.token_shares import entropy_gradient

    torch.manual_seed(0)
    batch = make_batch(n=3)
    model = _Prefixed()
    with pytest.warns(RuntimeWarning, match="prefix"):
        capture = FactorisedCapture(model, dim=DIM, seed=SEED)
    h = torch.tensor([0.5, -1.0, 2.0])
    directions = EntropyDirections(lambda s: h[None])
    capture(batch, directions=directions)
    want = entropy_gradient(model, batch, h, parameters=capture.parameters)
    for name, total in directions.totals[0].items():
        torch.testing.assert_close(total, want[name], rtol=1e-4, atol=1e-6)


class _SummedGain(nn.Module):
    """``y = x * sum(weight)``: a parameter reduced before it is broadcast, for which one copy
    per sequence would add up every sequence's copy (the generic path must not use them)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.sum()


class _CheckedScale(nn.Module):
    """``y = x * weight`` behind an assertion on the weight's shape, which a copy per sequence
    fails: the generic path must fall back to ``vmap`` rather than raise."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.weight.ndim == 1, "a vector weight"
        return x * self.weight


class _Normed(nn.Module):
    """Embedding, an RMSNorm, a summed gain and a checked scale (generic modules), a head."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        self.embed = nn.Embedding(VOCAB, 8)
        self.norm = LlamaRMSNorm(8)
        self.gain = _SummedGain(8)
        self.checked = _CheckedScale(8)
        self.head = nn.Linear(8, VOCAB)
        with torch.no_grad():
            self.norm.weight.add_(0.1 * torch.randn(8))

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        h = torch.cumsum(self.embed(input_ids), dim=1)
        out: torch.Tensor = self.head(torch.tanh(self.checked(self.gain(self.norm(h)))))
        return out


def test_generic_modules_use_one_parameter_copy_per_sequence_where_it_agrees(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Parameters of modules without a formula of their own (RMSNorm) get their per-sequence
    gradients from one re-run with a copy per sequence, after the first call has checked the
    copies against ``vmap``; a module that reduces its parameter keeps ``vmap``, and so does one
    whose code refuses the copies (an assertion).  The rows are the sketch of the exact rows on
    every call."""
    import clients.factorised as factorised
    from clients.capture import capture_sketches
    from clients.factorised import HookedCapture
    from sketch.spec import sketcher_for

    torch.manual_seed(0)
    model = _Normed()
    vmapped: list[str] = []
    real_vmap = factorised.vmap

    def counting(fn: Any, *args: Any, **kwargs: Any) -> Any:
        vmapped.append(fn.__qualname__)
        return real_vmap(fn, *args, **kwargs)

    monkeypatch.setattr(factorised, "vmap", counting)
    spec = {"kind": "countsketch", "dim": DIM, "seed": SEED}
    hooked = HookedCapture(model, spec, strict=True)
    assert {"norm.weight", "gain.weight", "checked.weight"} <= set(hooked.parameters)
    # one sequence cannot tell the copies apart: the three modules are checked again on the
    # next call, whose verdict the third call follows
    one = SequenceBatch.from_pairs([torch.tensor([3, 4])], [torch.tensor([5, 6, 7])])
    for n, calls in ((1, 3), (3, 3), (4, 2)):
        batch = one if n == 1 else make_batch(n=n, seed=n)
        vmapped.clear()
        got = hooked(batch)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want = capture_sketches(
                model, batch, sketcher_for(spec, hooked.parameters), method="loop"
            )
        _close(got.sketch, want.sketch)
        assert len(vmapped) == calls  # the third time the summed gain's and the checked scale's


def _sharded_capture_rank(rank: int, world: int, init: str, out: str) -> None:
    """One rank of :func:`test_hook_captures_on_a_model_sharded_by_fsdp2`: the captures of this
    rank's batch on the ``fully_shard`` model and on an unsharded copy, then a training
    backward on both, saved to ``out/rank.pt``."""
    import torch.distributed as dist

    from clients.factorised import HookedCapture
    from clients.shards import whole
    from tests.clients.conftest import exit_without_teardown, fsdp2_llama

    warnings.simplefilter("ignore")
    with fsdp2_llama(rank, world, init) as (model, plain):
        batch = make_batch(n=4, seed=10 + rank)
        result: dict[str, torch.Tensor] = {}
        for name, make in [
            ("factorised", lambda m: FactorisedCapture(m, dim=DIM, seed=SEED)),
            (
                "countsketch",
                lambda m: HookedCapture(m, {"kind": "countsketch", "dim": DIM, "seed": SEED}),
            ),
        ]:
            result[f"{name}_sharded"] = make(model)(batch).sketch
            result[f"{name}_plain"] = make(plain)(batch).sketch
        for m, tag in ((model, "sharded"), (plain, "plain")):
            logits = m(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            logits.float().square().mean().backward()
            grad = m.get_parameter("model.layers.0.mlp.up_proj.weight").grad
            assert grad is not None
            result[f"grad_{tag}"] = whole(grad)
        # the sharded model's gradient is the mean over the ranks' batches (FSDP reduces it)
        dist.all_reduce(result["grad_plain"])
        result["grad_plain"] /= world
        torch.save(result, f"{out}/{rank}.pt")
    exit_without_teardown()


def test_hook_captures_on_a_model_sharded_by_fsdp2(tmp_path: Any) -> None:
    """Under torch's FSDP2 (``fully_shard`` per decoder layer and at the root, two gloo
    processes on the CPU), the hook captures of a rank's sequences (factorised kronecker rows,
    count-sketched rows from hooks; ``sgd`` geometry) equal those of the unsharded model: the
    hooks see each rank's whole activations while FSDP gathers the weights around them.  The
    training backward after a capture still gives FSDP's reduced gradient."""
    import torch.multiprocessing as mp

    world = 2
    init = f"file://{tmp_path}/init"
    mp.spawn(_sharded_capture_rank, args=(world, init, str(tmp_path)), nprocs=world)
    for rank in range(world):
        result = torch.load(tmp_path / f"{rank}.pt")
        for name in ("factorised", "countsketch"):
            _close(result[f"{name}_sharded"], result[f"{name}_plain"])
        _close(result["grad_sharded"], result["grad_plain"])


def _saved_bytes(run: Callable[[], torch.Tensor], saved: list[int]) -> torch.Tensor:
    """``run()``, appending to ``saved`` the bytes of the distinct tensors autograd saved for
    the backward while it ran, outside checkpointed layers (a checkpoint's own hooks take the
    saves inside them)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    saved.append(sum(storages.values()))
    return out


@pytest.mark.parametrize("mode", ["non_reentrant", "reentrant", "capture_off"])
@pytest.mark.parametrize("capture_kind", ["factorised", "countsketch-adam"])
def test_capture_checkpoints_as_the_training_forward_does(capture_kind: str, mode: str) -> None:
    """With activation checkpointing on (``Trainer``'s ``gradient_checkpointing``, TRL's
    default), the capture's forward checkpoints the same layers as training does: the rows,
    update rows (with an entropy term), entropy sums and directions are those of the same
    model without checkpointing, from one forward (no fallback), while the activations its
    forward keeps for the backward are a fraction of them.  Reentrant checkpointing cannot
    serve ``torch.autograd.grad``: there the capture keeps every activation, as before, and
    so it does when told not to checkpoint (``checkpointing = False``)."""
    import copy

    from clients.factorised import EntropyDirections, HookedCapture
    from tests.clients.conftest import tiny_llama
    from tests.clients.test_capture import token_coefficients

    plain = tiny_llama(hidden_size=32, intermediate_size=64, num_hidden_layers=4)
    checkpointed = copy.deepcopy(plain)
    checkpointed.activation_checkpointing_enable({"use_reentrant": mode == "reentrant"})
    checkpointed.train()
    batch = make_batch(n=6)
    coef, ecoef = token_coefficients(batch), token_coefficients(batch, seed=5)
    results = {}
    for name, model in (("plain", plain), ("checkpointed", checkpointed)):
        kwargs: dict[str, Any] = {}
        if capture_kind == "factorised":
            capture: Any = FactorisedCapture(model, dim=DIM, seed=SEED)
        else:
            capture = HookedCapture(model, {"kind": "countsketch", "dim": DIM, "seed": SEED})
            g = torch.Generator().manual_seed(2)
            scale = {n: torch.rand(p.shape, generator=g) + 0.5 for n, p in model.named_parameters()}
            kwargs["row_scale"] = scale
        capture.checkpointing = mode != "capture_off"
        saved: list[int] = []
        forward = capture._forward
        capture._forward = functools.partial(_saved_bytes_of, forward, saved)
        directions = EntropyDirections(lambda s: torch.stack([s - s.mean(), (s - s.mean()) ** 2]))
        result = capture(
            batch,
            token_coefficients=coef,
            entropy_coefficients=ecoef,
            directions=directions,
            **kwargs,
        )
        assert len(saved) == 1  # one forward: no fallback to a second one
        results[name] = (result, saved[0], directions.totals)
    (got, got_saved, got_dirs), (want, want_saved, want_dirs) = (
        results["checkpointed"],
        results["plain"],
    )
    _close(got.sketch, want.sketch)
    _close(got.update_sketch, want.update_sketch)
    torch.testing.assert_close(got.entropy_sums, want.entropy_sums)
    torch.testing.assert_close(got.logprobs, want.logprobs)
    for d in (0, 1):
        assert set(got_dirs[d]) == set(want_dirs[d])
        for name, total in want_dirs[d].items():
            _close(got_dirs[d][name], total)
    if mode != "non_reentrant":
        assert got_saved == want_saved
    else:
        assert got_saved < 0.2 * want_saved, (got_saved, want_saved)  # 0.078
    assert all(m.training for m in checkpointed.modules())  # its modes are given back


def _saved_bytes_of(
    forward: Callable[[SequenceBatch], torch.Tensor], saved: list[int], batch: SequenceBatch
) -> torch.Tensor:
    return _saved_bytes(lambda: forward(batch), saved)


@pytest.mark.parametrize(
    ("family", "kind", "select", "checkpointing"),
    [
        ("qwen3_moe", "countsketch", "all", False),
        ("qwen3_moe", "countsketch", "all", True),
        ("qwen3_moe", "kronecker", "all", True),
        ("qwen3_moe", "countsketch", "router", False),
        ("qwen3_moe", "factorised", "all", True),
        ("qwen2_moe", "countsketch", "all", True),
        ("mixtral", "countsketch", "all", True),
        ("olmoe", "countsketch", "all", True),
    ],
)
def test_moe_layers_are_captured_per_sequence(
    family: str, kind: str, select: str, checkpointing: bool
) -> None:
    """Mixture-of-experts models of four transformers families
    (:func:`tests.clients.conftest.tiny_moe`): their routers (modules with three outputs:
    logits, routing weights, chosen experts) and experts (3-D parameters used by a grouped
    matmul on the tokens each expert was routed; Qwen2-MoE's shared expert besides) run on the
    batch's tokens flattened to ``[n * L, hidden]``.  Each sequence's gradient of them comes
    from a re-run on that sequence's rows, with the routing the forward chose; the rows, update
    rows with an entropy term in ``adam`` geometry and the directions equal those of the
    exact per-sequence gradients, with the layers checkpointed as in training or not.  Before,
    the experts could not be captured by hooks at all, and the router's rows were silently
    zero (its output is a tuple)."""
    from clients.capture import capture_sketches
    from clients.factorised import EntropyDirections, HookedCapture
    from sketch.spec import sketcher_for
    from tests.clients.conftest import tiny_moe
    from tests.clients.test_capture import token_coefficients

    model = tiny_moe(family=family)
    if checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
        model.train()
    selected = ParameterFilter(include_regex=r".*mlp\.gate\..*") if select == "router" else None
    batch = make_batch(n=4)
    coef, ecoef = token_coefficients(batch), token_coefficients(batch, seed=5)
    kwargs: dict[str, Any] = {}
    if kind == "factorised":
        capture: Any = FactorisedCapture(model, dim=DIM, seed=SEED, strict=True)
        spec: dict[str, Any] = capture.spec
        ecoef = None
    else:
        spec = {"kind": kind, "dim": 64, "seed": 5}
        capture = HookedCapture(model, spec, parameter_filter=selected, strict=True)
        g = torch.Generator().manual_seed(2)
        kwargs["row_scale"] = {
            n: torch.rand(p.shape, generator=g) + 0.5
            for n, p in model.named_parameters()
            if n in capture.parameters
        }
    names = {n for n in capture.parameters}
    assert any("experts" in n for n in names) == (select == "all")
    assert any("mlp.gate" in n for n in names)
    directions = EntropyDirections(lambda s: torch.stack([s - s.mean(), (s - s.mean()) ** 2]))
    got = capture(
        batch, token_coefficients=coef, entropy_coefficients=ecoef, directions=directions, **kwargs
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sketcher = sketcher_for(spec, capture.parameters)
        scale = kwargs.get("row_scale")
        want = capture_sketches(
            model, batch, sketcher, method="loop", parameter_filter=selected, row_scale=scale
        )
        want_u = capture_sketches(
            model,
            batch,
            sketcher,
            method="loop",
            parameter_filter=selected,
            token_coefficients=coef,
            entropy_coefficients=ecoef,
            row_scale=scale,
        )
        exact = capture_gradients(model, batch, method="loop", parameter_filter=selected)
    assert float(want.sketch.abs().max()) > 0
    _close(got.sketch, want.sketch)
    _close(got.update_sketch, want_u.sketch)
    h = directions.coefficients(got.logprobs)
    for d in (0, 1):
        for name, rows in exact.gradients.items():
            total = torch.tensordot(h[d].double(), rows.double(), dims=1).float()
            _close(directions.totals[d].get(name, torch.zeros_like(total)), total)


class _GatheringExperts(nn.Module):
    """An older-style MoE MLP: ``nn.Linear`` experts run on the tokens routed to them, picked
    by index from the flattened ``[n * L, hidden]`` tokens.  Expert 0 takes every token in
    reverse order, expert 1 the first ``n`` tokens: as many rows as the batch has tokens or
    sequences, but not theirs."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.experts = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        flat = x.flatten(0, 1)
        out = torch.zeros_like(flat)
        for expert, index in zip(
            self.experts, (torch.arange(flat.shape[0]).flip(0), torch.arange(n)), strict=True
        ):
            out = out.index_add(0, index, expert(flat[index]))
        return out.view_as(x)


def test_linear_experts_on_gathered_tokens_are_refused() -> None:
    """A ``nn.Linear`` run on tokens picked by index has rows that are no sequence's, even when
    there are as many as the batch's tokens or sequences: the hook capture refuses it (before,
    such rows were taken as the batch's, silently), and a capture without those experts works."""
    from clients.factorised import HookedCapture
    from tests.clients.conftest import tiny_llama

    model = tiny_llama()
    for layer in model.model.layers:
        layer.mlp = _GatheringExperts(16)
    batch = make_batch(n=4)
    spec = {"kind": "countsketch", "dim": 64, "seed": 5}
    with pytest.raises(RuntimeError, match="gathers their tokens"):
        HookedCapture(model, spec, strict=True)(batch)
    without = ParameterFilter(exclude_regex=r".*experts.*")
    got = HookedCapture(model, spec, parameter_filter=without, strict=True)(batch)
    assert float(got.sketch.abs().max()) > 0


class _ScaledLookup(nn.Embedding):
    """An embedding whose forward scales the lookup, as Gemma's ``ScaledWordEmbedding``."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return super().forward(input) * 3.0


class _ShiftedLookup(nn.Embedding):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return super().forward(input) + 1.0


class _DoubledInputLinear(nn.Linear):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(2.0 * input, self.weight, self.bias)


class _MatmulLinear(nn.Linear):
    """A forward of its own that computes what ``nn.Linear``'s does (Falcon's ``FalconLinear``)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        out = input @ self.weight.T
        return out if self.bias is None else out + self.bias


def _kinds(capture: Any) -> dict[str, str]:
    """``{parameter: kind of the hook that captures it}`` of a capture's current plan."""
    return {name: kind for _, kind, own in capture._plan for name in own.values()}


def tiny_gemma3(seed: int = 0) -> nn.Module:
    """Gemma 3's text model: a scaled embedding (times sqrt(hidden)) tied to the LM head,
    RMSNorms of ``1 + weight``, a sliding-window layer."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        **{**_TINY_DECODER, "bos_token_id": 1},
        intermediate_size=24,
        num_attention_heads=4,
        head_dim=4,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
    )
    return Gemma3ForCausalLM(config)


@pytest.mark.parametrize("model_name", ["gemma3", "subclassed-llama"])
@pytest.mark.parametrize("capture_kind", ["hooked", "factorised"])
def test_modules_with_a_forward_of_their_own_are_captured_as_it_runs(
    model_name: str, capture_kind: str, batch: SequenceBatch
) -> None:
    """A module the hooks know (``nn.Embedding``, ``nn.Linear``) whose forward is its own, by
    its class or set on the instance: an embedding that scales its lookup (Gemma's
    ``ScaledWordEmbedding``, and one here that triples it) gets its factor in its rows, read
    from its first call and checked; a linear layer whose first call returns what
    ``nn.Linear``'s forward would (Falcon's ``FalconLinear``) keeps the linear hook, and one
    that doubles its input (by its class, or by a forward set on the instance) is re-run per
    sequence like any module.  Rows equal the sketch of exact rows; before, the embedding and
    the instance's forward took the base class's gradient (Gemma's embedding rows were
    ``1/sqrt(hidden)`` of the truth).  A lookup that is not a scaled one is refused."""
    from clients.factorised import HookedCapture

    rerun: set[str] = set()
    if model_name == "gemma3":
        model = tiny_gemma3()
    else:
        model = tiny_llama()
        model.model.embed_tokens.__class__ = _ScaledLookup
        model.model.layers[0].mlp.down_proj.__class__ = _DoubledInputLinear
        model.model.layers[1].mlp.up_proj.__class__ = _MatmulLinear
        up = model.model.layers[0].mlp.up_proj
        up.forward = lambda x: nn.functional.linear(2.0 * x, up.weight, up.bias)
        # a zero weight: both forwards return zeros, and the check cannot tell them apart
        zeroed = model.model.layers[1].mlp.down_proj
        zeroed.__class__ = _DoubledInputLinear
        with torch.no_grad():
            zeroed.weight.zero_()
        rerun = {
            "model.layers.0.mlp.down_proj.weight",
            "model.layers.0.mlp.up_proj.weight",
            "model.layers.1.mlp.down_proj.weight",
        }
    spec: dict[str, Any] = {"kind": "kronecker", "dim": DIM, "seed": SEED}
    if capture_kind == "hooked":
        spec = {"kind": "countsketch", "dim": 64, "seed": 5}

    def capture_of(m: nn.Module) -> Any:
        if capture_kind == "factorised":
            return FactorisedCapture(m, dim=DIM, seed=SEED, strict=True)
        return HookedCapture(m, spec, strict=True)

    capture = capture_of(model)
    assert capture.parameters == {n: list(p.shape) for n, p in model.named_parameters()}
    _close(capture(batch).sketch, _exact_sketch(model, batch, capture))
    kinds = _kinds(capture)
    assert {n for n, kind in kinds.items() if kind == "generic" and ".mlp." in n} == rerun
    if model_name != "gemma3":
        assert kinds["model.layers.1.mlp.up_proj.weight"] == "linear"
        model.model.embed_tokens.__class__ = _ShiftedLookup
        with pytest.raises(RuntimeError, match="not a scaled lookup"):
            capture_of(model)(batch)


def test_a_head_cast_to_float32_keeps_its_hook(batch: SequenceBatch) -> None:
    """TRL's ``cast_lm_head_to_fp32`` sets a forward on the LM head's instance that runs it in
    float32 on the bfloat16 model's hidden states: its first call returns what ``nn.Linear``'s
    forward does (to bfloat16 rounding), so the head keeps its linear hook instead of a
    per-sequence re-run of a ``[L, vocab]`` projection, and its rows are right."""
    from clients.factorised import HookedCapture

    model = tiny_llama().to(torch.bfloat16)
    head = model.lm_head.float()
    model.lm_head = head
    head.forward = lambda h: nn.functional.linear(h.float(), head.weight.float(), None)
    for capture in (
        HookedCapture(model, {"kind": "countsketch", "dim": 64, "seed": 5}, strict=True),
        FactorisedCapture(model, dim=DIM, seed=SEED, strict=True),
    ):
        got = capture(batch).sketch.float()
        want = _exact_sketch(model, batch, capture).float()
        assert _kinds(capture)["lm_head.weight"] == "linear"
        assert float((got - want).norm() / want.norm()) < 1e-2


@pytest.mark.parametrize("variant", ["lora", "dora", "rslora", "trainable_tokens"])
def test_peft_adapters_are_captured_as_exact_rows(variant: str, batch: SequenceBatch) -> None:
    """peft's adapters: LoRA (``lora_only``; rsLoRA; DoRA, its magnitude vectors too) and the
    deltas of trainable token rows (a wrapper of the embedding, re-run whole per sequence).
    DoRA runs each adapter on an identity matrix for a weight norm it detaches, a call on rows
    that are not the batch's, which the loss does not depend on (before, the capture refused
    it); the magnitude's module takes the adapters as arguments and is re-run per sequence.
    With and without the training forward's activation checkpointing, whose re-run of a layer
    calls the adapters on the identity again (before, refused as a module run twice in one
    layer)."""
    peft = pytest.importorskip("peft")
    from clients.factorised import HookedCapture

    torch.manual_seed(0)
    extra: dict[str, Any] = {
        "dora": {"use_dora": True},
        "rslora": {"use_rslora": True},
        "trainable_tokens": {"trainable_token_indices": {"embed_tokens": [1, 2, 3, 5]}},
    }.get(variant, {})
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], **extra
    )
    model = peft.get_peft_model(tiny_llama(), config)
    with torch.no_grad():  # lora_B starts at zero
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    adapters = ParameterFilter(lora_only=True)
    if variant == "trainable_tokens":  # rows of the embedding wrapper's delta, re-run whole
        adapters = ParameterFilter(include_regex=[r"lora_", r"\.trainable_tokens_delta\."])
    trained = {n: list(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    assert any("magnitude" in n for n in trained) == (variant == "dora")
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": False})
            model.train()
        for capture in (
            HookedCapture(
                model, {"kind": "countsketch", "dim": 64, "seed": 5}, parameter_filter=adapters
            ),
            FactorisedCapture(model, dim=DIM, seed=SEED, parameter_filter=adapters),
        ):
            assert capture.parameters == trained
            _close(capture(batch).sketch, _exact_sketch(model, batch, capture, adapters))


#: a gated delta net beside a full attention layer (Qwen3.5, Qwen3-Next)
_GATED_DELTA: dict[str, Any] = {
    "head_dim": 4,
    "linear_num_value_heads": 2,
    "linear_num_key_heads": 2,
    "linear_key_head_dim": 4,
    "linear_value_head_dim": 4,
    "linear_conv_kernel_dim": 2,
    "layer_types": ["linear_attention", "full_attention"],
}

#: transformers' decoder families (``model_type``) with the config values their tiny build needs
#: beyond ``_TINY_DECODER``'s sizes
FAMILIES: dict[str, dict[str, Any]] = {
    **{
        family: {}
        for family in (
            "llama",
            "mistral",
            "qwen2",
            "qwen3",
            "gemma",
            "gemma2",
            "gemma3_text",
            "phi3",
            "olmo2",
            "gpt_neox",
            "falcon",
            "stablelm",
            "granite",
            "cohere",
            "starcoder2",
            "smollm3",
            "glm4",
        )
    },
    # attention sinks: a parameter of the attention module itself; MoE experts with biases
    "gpt_oss": {
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "head_dim": 4,
        "sliding_window": 4,
        "layer_types": ["sliding_attention", "full_attention"],
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    },
    # Mamba mixers that hand their conv1d's and dt_proj's weights to their own kernels
    "jamba": {
        "num_experts": 2,
        "num_experts_per_tok": 1,
        "attn_layer_period": 2,
        "attn_layer_offset": 1,
        "expert_layer_period": 2,
        "expert_layer_offset": 1,
        "mamba_d_state": 4,
        "mamba_d_conv": 2,
        "mamba_expand": 2,
        "use_mamba_kernels": False,
    },
    "falcon_h1": {
        "mamba_d_ssm": 16,
        "mamba_n_heads": 4,
        "mamba_d_head": 4,
        "mamba_n_groups": 1,
        "mamba_d_state": 4,
        "mamba_d_conv": 2,
        "head_dim": 4,
    },
    # a short convolution whose weight its block hands to a kernel
    "lfm2": {"conv_L_cache": 2, "layer_types": ["conv", "full_attention"], "block_ff_dim": 24},
    # gated delta nets: the conv1d's weight in a kernel, a gated norm on [n * L * heads] rows
    "qwen3_5_text": _GATED_DELTA,
    "qwen3_next": {
        **_GATED_DELTA,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 8,
        "shared_expert_intermediate_size": 8,
    },
    "olmo_hybrid": {},
    # Kimi delta attention (a short convolution in a kernel) beside latent attention, MoE
    "kimi_linear": {
        "head_dim": 4,
        "linear_attn_config": {
            "kda_layers": [1],
            "full_attn_layers": [2],
            "num_heads": 2,
            "head_dim": 4,
            "short_conv_kernel_size": 2,
        },
        "num_experts": 4,
        "num_experts_per_token": 2,
        "moe_intermediate_size": 8,
        "first_k_dense_replace": 1,
        "kv_lora_rank": 8,
        "q_lora_rank": 8,
        "qk_rope_head_dim": 4,
        "qk_nope_head_dim": 4,
        "v_head_dim": 4,
        "num_key_value_heads": 4,
    },
    # latent attention; a router that flattens its [n, L, hidden] input itself
    "deepseek_v3": {
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 8,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,
        "kv_lora_rank": 8,
        "q_lora_rank": 8,
        "qk_rope_head_dim": 4,
        "qk_nope_head_dim": 4,
        "v_head_dim": 4,
        "n_group": 1,
        "topk_group": 1,
        "num_key_value_heads": 4,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    },
}


def _exact_sketch(
    model: nn.Module, batch: SequenceBatch, capture: Any, parameter_filter: Any = None
) -> torch.Tensor:
    """The run's sketch (``capture``'s spec) of exact per-sequence rows (chunks of a loop)."""
    from clients.capture import capture_sketches
    from sketch.spec import sketcher_for

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return capture_sketches(
            model,
            batch,
            sketcher_for(capture.spec, capture.parameters),
            method="loop",
            parameter_filter=parameter_filter,
        ).sketch


def tiny_family(family: str, values: dict[str, Any] | None = None) -> nn.Module:
    """A tiny causal LM of a transformers family (``values``: its config values beyond the
    shared sizes; default those of :data:`FAMILIES`), its 1-D parameters moved off their
    initial values (norm weights of 1, biases of 0)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = {**_TINY_DECODER, "intermediate_size": 24, "num_attention_heads": 4}
    config = AutoConfig.for_model(family, **{**sizes, **(values or FAMILIES[family])})
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_transformers_families_are_captured_as_exact_rows(
    family: str, batch: SequenceBatch
) -> None:
    """Every parameter of a tiny model of each family, captured by hooks (count-sketched rows
    formed in the hooks, and the factorised kronecker capture), equals the run's sketch of its
    exact per-sequence rows.  Before 2026-12-06 Gemma's rows were wrong (its scaled embedding),
    GPT-OSS's attention sinks had no hook (the trainer fell back to exact chunks) and
    DeepSeek-V3's router failed in the backward."""
    from clients.factorised import HookedCapture

    model = tiny_family(family)
    for capture in (
        HookedCapture(model, {"kind": "countsketch", "dim": 64, "seed": 5}, strict=True),
        FactorisedCapture(model, dim=DIM, seed=SEED, strict=True),
    ):
        assert capture.parameters == {n: list(p.shape) for n, p in model.named_parameters()}
        _close(capture(batch).sketch, _exact_sketch(model, batch, capture))


def test_attention_sinks_are_captured_by_a_rerun_of_their_attention() -> None:
    """GPT-OSS's sinks alone (a parameter of the attention module, whose projections are its
    children): the attention re-run per sequence gives each sequence's gradient, with and
    without the training forward's activation checkpointing."""
    from clients.factorised import HookedCapture

    model = tiny_family("gpt_oss")
    batch = make_batch()
    sinks = ParameterFilter(include_regex=r"\.sinks$")
    spec = {"kind": "gaussian", "dim": 64, "seed": 5}
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": False})
            model.train()
        capture = HookedCapture(model, spec, parameter_filter=sinks, strict=True)
        assert len(capture.parameters) == 2
        want = _exact_sketch(model, batch, capture, sinks)
        assert float(want.abs().max()) > 0
        _close(capture(batch).sketch, want)


class _Body(nn.Module):
    """A block, and a forward that also reads the block's weight without calling it: the
    weight's module's parent is the block, whose call does not contain that use; this body,
    its grandparent, does."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(8, 8))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.block(h) + h @ self.block[0].weight.T)


class _ReadsAWeight(nn.Module):
    """The body inside a model (``inside=True``), or its forward in the model's own."""

    def __init__(self, inside: bool) -> None:
        super().__init__()
        self.inside = inside
        self.embed = nn.Embedding(VOCAB, 8)
        self.body = _Body()
        self.head = nn.Linear(8, VOCAB)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        h = self.embed(input_ids)
        block = self.body.block
        h = self.body(h) if self.inside else torch.tanh(block(h) + h @ block[0].weight.T)
        out: torch.Tensor = self.head(h)
        return out


@pytest.mark.parametrize("capture_kind", ["hooked", "factorised"])
def test_parameters_used_outside_their_module(capture_kind: str, batch: SequenceBatch) -> None:
    """A studied parameter that the forward uses outside a call of its own module has a part of
    its gradient no hook sees.  Where every such use is inside a call of the module's parent
    (Jamba's mixer hands ``conv1d.weight`` to its kernel and multiplies by ``dt_proj.weight``
    itself), the first capture gives the parameter to the parent, re-run per sequence, and
    the rows equal exact rows (before 2026-12-06 those parameters' rows were off by up to their
    whole size); likewise a grandparent's; where the use is in the model's own forward (whose
    re-run per sequence would be the loop capture), it is refused by name."""
    from clients.factorised import HookedCapture

    def capture_of(model: nn.Module) -> Any:
        if capture_kind == "factorised":
            return FactorisedCapture(model, dim=DIM, seed=SEED, strict=True)
        return HookedCapture(model, {"kind": "countsketch", "dim": 64, "seed": 5}, strict=True)

    model = tiny_family("jamba")
    mixer = model.model.layers[0].mamba
    capture = capture_of(model)
    want = _exact_sketch(model, batch, capture)
    _close(capture(batch).sketch, want)
    own = next(own for m, _, own in capture._plan if m is mixer)
    assert {"conv1d.weight", "dt_proj.weight", "A_log", "D"} <= set(own)
    _close(capture(batch).sketch, want)  # a second capture, on the plan the first made

    torch.manual_seed(0)
    model = _ReadsAWeight(inside=True)  # the use is in the weight's module's grandparent
    capture = capture_of(model)
    _close(capture(batch).sketch, _exact_sketch(model, batch, capture))
    assert any(m is model.body and "block.0.weight" in own for m, _, own in capture._plan)
    model.inside = False  # the use is in the model's own forward: refused
    with pytest.raises(RuntimeError, match=r"used outside a call of their own module.*block"):
        capture_of(model)(batch)
