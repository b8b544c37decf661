"""Factorised per-sequence ``kronecker`` sketches from forward/backward hooks (math.md §7).

For a linear layer ``y_t = W x_t (+ b)`` with weight ``W`` (``out x in``), the score gradient of
sequence ``i`` is ``G_i = sum_t delta_t x_t^T`` over its tokens, with ``delta_t = dS_i/dy_t``.
The run's ``kronecker`` sketch of that parameter is ``A G_i B^T`` (``A: k_out x out``,
``B: k_in x in``, from :class:`sketch.kronecker.KroneckerSketch`), and

    A G_i B^T = sum_t (A delta_t) (B x_t)^T,

so each token's input and output gradient are projected first (``k_out`` and ``k_in``
numbers) and the per-sequence outer-product sum is done in the small space.  This is the LoGra
construction (Choe et al. 2024, "What is your data worth to GPT?").  One batched backward of
``sum_i S_i`` gives every sequence's sketch, because a causal LM does not mix sequences of a
batch: the output gradient at a token of row ``i`` is the gradient of ``S_i`` alone.  The
``[n, out, in]`` per-sequence gradients are never formed.

Layers and parameters handled:

* ``nn.Linear`` weight (``out x in``): ``A`` acts on ``delta``, ``B`` on ``x``;
* GPT-2's ``transformers.pytorch_utils.Conv1D`` weight, stored ``in x out`` (``y = x W + b``):
  the declared shape is ``[in, out]``, so ``A`` (``k_0 x in``) acts on ``x`` and ``B`` on
  ``delta``, which is exactly the sketch of the declared ``[in, out]`` gradient
  ``sum_t x_t delta_t^T``;
* ``nn.Embedding`` weight (``num x dim``): ``G = sum_t e_{id_t} delta_t^T``, so
  ``A x_t = A[:, id_t]``; tokens equal to ``padding_idx`` get no gradient, as in PyTorch;
* biases of the above: ``sum_t delta_t``, exact per sequence;
* other parameters of modules without children (LayerNorm, RMSNorm, ...): their per-sequence
  gradients are computed from the module's saved input and output gradient, by one re-run of
  the module with a copy of each parameter per sequence (checked once against
  ``torch.func.vjp`` per sequence, which is used where the copies do not apply), then
  sketched by the run's sketcher (``countsketch`` for 1-D parameters inside ``kronecker``),
  unless ``non_matrix="exclude"``.

A parameter used by several modules (GPT-2's ``wte`` tied to ``lm_head``) gets the sum of its
contributions, as the sketch is linear.  Selected parameters that no supported module owns are
left out with a warning (or an error with ``strict=True``); :attr:`FactorisedCapture.parameters`
lists exactly what the rows cover: declare it in ``create_run``.

Padding: batches are right-padded (:class:`clients.capture.SequenceBatch`); the loss ignores
padded positions and a causal model cannot carry them into earlier tokens, so their output
gradients are zero; the hooks also drop padded tokens explicitly (``where`` on the attention
mask), so a non-finite value there cannot leak in.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap
from torch.nn.utils.stateless import _reparametrize_module

from clients.capture import (
    SequenceBatch,
    checkpointing_layers,
    eval_mode,
    forward_outputs,
    response_entropy_sums,
    response_logprobs,
    response_window,
    token_layout,
)
from clients.filters import ParameterFilter, select_parameters
from clients.geometry import OnAccess
from clients.shards import (
    full_shape,
    is_partitioned,
    is_sharded,
    leaf_reductions_suspended,
    whole_value,
)
from sketch.base import Sketcher, SketchKind
from sketch.groups import GroupedSketcher
from sketch.kronecker import KroneckerSketch
from sketch.spec import SketchSpec, build_sketcher

_HFConv1D: type[nn.Module] | None
try:  # GPT-2 family; optional so that the module works without transformers
    from transformers.pytorch_utils import Conv1D as _Conv1D

    _HFConv1D = _Conv1D
except ImportError:  # pragma: no cover - transformers is a declared dependency
    _HFConv1D = None

NonMatrix = Literal["sketch", "exclude"]
#: a module call's positional and keyword arguments (tensors detached)
Call = tuple[tuple[Any, ...], dict[str, Any]]


@dataclass
class FactorisedSketches:
    """Result of one factorised capture.

    Attributes
    ----------
    logprobs:
        ``[n]`` float32 ``S_i``.
    sketch:
        ``[n, k]`` float32, row ``i`` = the run's ``kronecker`` sketch of ``w_i`` restricted to
        :attr:`FactorisedCapture.parameters`; push it with ``Client.push_sketches``.
    num_tokens:
        ``[n]`` int64 response lengths.
    update_sketch:
        ``[n, k]`` float32 sketches of the update rows ``u_i`` (math.md §4 "Update rows") when
        ``token_coefficients`` (or ``entropy_coefficients``) were given; push them with
        ``push_sketches(..., rows="update")``.
    entropy_sums:
        ``[n]`` float32 ``sum_t H_t`` of every sequence
        (:func:`clients.capture.response_entropy_sums`) from the capture's own forward: a
        sequence's ``entropy_sum`` without another forward.
    entropy_sum_sketch:
        ``[n, k]`` float32 sketches of ``z_i = grad sum_t H_t`` (math.md §3 "From the entropy
        sums") when ``entropy_sum_rows`` was asked for; push them with
        ``push_sketches(..., rows="entropy_sum")``.
    """

    logprobs: torch.Tensor
    sketch: torch.Tensor
    num_tokens: torch.Tensor
    update_sketch: torch.Tensor | None = None
    entropy_sums: torch.Tensor | None = None
    entropy_sum_sketch: torch.Tensor | None = None


@dataclass
class EntropyDirections:
    """Gradients ``v_d = sum_j h_{d,j} w_j`` added up by a capture's score backward (math.md
    §9: the direction of the token shares), so that they need no forward and backward pass
    of their own.

    Every hook already holds its layer's per-sequence factors (``delta_t``, ``x_t``) or forms
    the per-sequence gradients ``G_j``; the ``h``-weighted sum over the sequences is one more
    product there.  ``coefficients`` is called with the capture's ``[n]`` float32 ``S_j``
    (detached, after the forward and before the backward: the ``h_j`` of the entropy
    estimators are functions of the ``S`` of the same prompt) and returns ``[m, n]`` float
    ``h_{d,j}``; ``totals`` holds ``m`` dicts ``{name: float32 tensor shaped like the
    parameter}`` (created on first use) that every capture called with it adds into, for the
    parameters the capture covers.  The directions are unscaled (``sum_j h_j w_j``, not
    ``sqrt(P)`` times it) whatever ``row_scale`` the rows get.
    """

    coefficients: Callable[[torch.Tensor], torch.Tensor]
    totals: list[dict[str, torch.Tensor]] = field(default_factory=list)


class _ReplannedError(Exception):
    """The first capture re-planned some hooks (a module whose forward is not its base's,
    parameters moved to an ancestor's re-run): capture again."""


@dataclass
class _Accumulator:
    """Per-capture state the hooks write into."""

    token_mask: torch.Tensor  # [n, L] bool: real tokens
    cores: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [n, k_out, k_in]
    vectors: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [n, numel]
    sketched: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [n, k] rows
    recomputing: bool = False  # a generic module is re-run inside its hook: hooks stay quiet
    registered: int = 0  # tensor hooks registered in the forward pass ...
    fired: int = 0  # ... and run in the backward pass: equal when nothing was missed
    roots: list[torch.Tensor] = field(default_factory=list)  # embedding outputs
    fired_hooks: set[int] = field(default_factory=set)  # registration numbers of those run
    # EntropyDirections: [m, n] h of the score backward (None: nothing to add), their totals,
    # the parameter shapes, and the hooks whose part is in already (skipped on a rerun)
    direction_weights: torch.Tensor | None = None
    directions: EntropyDirections | None = None
    shapes: Mapping[str, list[int]] = field(default_factory=dict)
    directions_added: set[int] = field(default_factory=set)
    hook_adds: bool = False  # the running hook's part is not in the directions yet
    # Inside a layer that checkpoints (non-reentrant) the hooks keep no activation: the
    # backward runs the layer's forward again, where a pre-hook hands each module's input to
    # the hook of its output gradient (which may fire before or after it)
    checkpointed: frozenset[int] = frozenset()  # ids of the modules inside such layers
    in_backward: bool = False  # a backward of the capture is running: a forward is a re-run
    inputs: dict[int, Call] = field(default_factory=dict)  # module id -> re-run call
    # the first capture's forward: (autograd node, parameter, id(module)) for the edges to a
    # studied parameter made inside a call of its own module or of one of that module's
    # ancestors (None: not checking), held against the graph's edges (_check_uses)
    uses: set[tuple[int, str, int]] | None = None
    waiting: list[tuple[int, Callable[[Call], None]]] = field(default_factory=list)
    # modules (by id) whose own forward did not return their base's output
    # (_runs_as_its_base): re-planned as generic before the backward
    not_as_base: set[int] = field(default_factory=set)
    # (autograd node, refusal) of each output of a call on rows that are not the batch's
    # sequences or tokens: refused if the loss depends on it (:meth:`_check_unsplit`)
    unsplit: list[tuple[Any, str]] = field(default_factory=list)

    def gradient_arrived(self, module: int, work: Callable[[Call], None]) -> None:
        """A checkpointed module's output gradient: ``work(call)`` once its call is re-run."""
        self.waiting.append((module, work))
        self.run_waiting()

    def run_waiting(self) -> None:
        """Run the waiting work whose inputs have arrived.  Called from a tensor hook or after
        the backward, never from the pre-hook: that runs inside the layer's re-run, whose
        saved tensors the checkpoint counts, and the work may save some of its own."""
        still = []
        for module, work in self.waiting:
            call = self.inputs.pop(module, None)
            if call is None:
                still.append((module, work))
            else:
                work(call)
        self.waiting = still

    def padding(self, length: int) -> torch.Tensor | None:
        """The ``[n, L]`` real-token mask for an activation of ``length`` tokens per
        sequence, or None when nothing is to be masked: the activation is not laid out per
        token, or the batch has no padded token (then a mask would be a pass for nothing)."""
        if length != self.token_mask.shape[1] or not self.padded:
            return None
        return self.token_mask

    @functools.cached_property
    def padded(self) -> bool:
        """Whether the batch has a padded token."""
        return not bool(self.token_mask.all())

    def clear(self) -> None:
        self.clear_rows()
        self.registered = self.fired = 0
        self.roots.clear()
        self.fired_hooks.clear()
        self.inputs.clear()
        self.waiting.clear()
        self.unsplit.clear()

    def release(self) -> None:
        self.clear()
        self.direction_weights = self.directions = None

    def clear_rows(self) -> None:
        self.cores.clear()
        self.vectors.clear()
        self.sketched.clear()

    def add_core(self, name: str, core: torch.Tensor) -> None:
        self.cores[name] = core if name not in self.cores else self.cores[name] + core

    def add_vector(self, name: str, grads: torch.Tensor) -> None:
        flat = grads.reshape(grads.shape[0], -1).float()
        self.vectors[name] = flat if name not in self.vectors else self.vectors[name] + flat
        self.add_direction(name, self.weighted(flat))

    @property
    def adding(self) -> torch.Tensor | None:
        """The ``[m, n]`` ``h`` when the running hook adds its part to the directions (a score
        backward with directions, and a hook whose part is not in already), else None."""
        return self.direction_weights if self.hook_adds else None

    def weighted(self, rows: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """``[m, ...]`` the directions' ``sum_j h_{d,j} rows_j`` of ``[n, ...]`` rows, or of the
        rows of sequences ``index`` alone (``[len(index), ...]``); empty when no direction is
        being added."""
        weights = self.adding
        if weights is None:
            return rows.new_zeros((0,))
        if index is not None:
            weights = weights[:, index.to(weights.device)]
        return torch.tensordot(weights.to(rows.device), rows.float(), dims=1)

    def direction(self, d: int, name: str, device: torch.device) -> torch.Tensor:
        """Direction ``d``'s total of parameter ``name`` (zeros on first use)."""
        assert self.directions is not None
        total = self.directions.totals[d].get(name)
        if total is None:
            total = torch.zeros(self.shapes[name], dtype=torch.float32, device=device)
            self.directions.totals[d][name] = total
        return total

    def add_direction(self, name: str, part: torch.Tensor, start: int = 0) -> None:
        """Add ``[m, c]`` ``part`` to the directions' flat entries ``[start, start + c)`` of
        parameter ``name``."""
        if self.adding is None:
            return
        for d in range(part.shape[0]):
            flat = self.direction(d, name, part.device).view(-1)
            flat[start : start + part.shape[1]] += part[d]

    def add_direction_rows(self, name: str, index: torch.Tensor, part: torch.Tensor) -> None:
        """Add ``[m, r, dim]`` ``part`` to rows ``index`` (``[r]``) of the directions of the
        ``[num, dim]`` matrix ``name`` (an embedding; repeated indices add up)."""
        if self.adding is None:
            return
        for d in range(part.shape[0]):
            total = self.direction(d, name, part.device)
            total.view(-1, part.shape[-1]).index_add_(0, index.to(part.device), part[d])


@contextlib.contextmanager
def _released(acc: _Accumulator) -> Iterator[None]:
    """Empty ``acc`` when the capture ends.  The tensor hooks that write into it live on the
    graph's outputs, and ``acc.roots`` holds the graph: a cycle through autograd's C++ side that
    Python's collector cannot see, which would keep every capture's graph and cores alive."""
    try:
        yield
    finally:
        acc.release()


def _gradient_node(p: torch.Tensor) -> Any | None:
    """The autograd node that accumulates a leaf parameter's gradient (None without one)."""
    return torch.autograd.graph.get_gradient_edge(p).node if p.requires_grad else None


def _edges_to(roots: Sequence[Any], targets: Mapping[int, str], stop: set[int]) -> Iterator[Any]:
    """``(node, name)`` for every edge of the autograd graph above ``roots`` (nodes) that
    reaches the gradient node of a target parameter (``targets``: node id -> name), without
    walking past the nodes in ``stop`` (ids)."""
    seen: set[int] = set()
    stack = [r for r in roots if r is not None]
    while stack:
        node = stack.pop()
        if id(node) in seen or id(node) in stop:
            continue
        seen.add(id(node))
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            name = targets.get(id(nxt))
            if name is not None:
                yield node, name
            else:
                stack.append(nxt)


def _check_unsplit(acc: _Accumulator, outputs: Sequence[Any]) -> None:
    """Refuse (``RuntimeError``) when the loss depends on the output of a hooked call whose rows
    are not the batch's sequences or tokens (``acc.unsplit``): its gradient would reach the
    hook with no sequence to give it to.  One whose output the loss does not reach is let be."""
    targets = {id(node): message for node, message in acc.unsplit if node is not None}
    roots = [t.grad_fn for t in outputs if isinstance(t, torch.Tensor)]
    for _, message in _edges_to(roots, targets, set()):
        raise RuntimeError(message)


def _first_tensor(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> torch.Tensor | None:
    """A module call's first tensor input, positional or keyword (an attention module gets
    ``hidden_states`` by keyword)."""
    return next((v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)), None)


def _tensors_of(value: Any) -> Iterator[torch.Tensor]:
    """The tensors in a call's arguments (nested in tuples, lists and dicts)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors_of(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors_of(v)


def _tokens(t: torch.Tensor, n: int) -> torch.Tensor:
    """``[n, T, d]`` view of a ``[n, ..., d]`` activation (float32)."""
    return t.reshape(n, -1, t.shape[-1]).float()


def _add_outer_directions(
    acc: _Accumulator, name: str, left: torch.Tensor, right: torch.Tensor
) -> None:
    """Add ``sum_j h_{d,j} G_j`` to every direction, ``G_j = sum_t left_t right_t^T``
    (``left`` ``[n, T, rows]``, ``right`` ``[n, T, cols]``, padded tokens zero): one
    ``[rows, cols]`` product over the batch's tokens per direction, the size of a backward's
    own weight-gradient product."""
    weights = acc.adding
    assert weights is not None
    for d in range(weights.shape[0]):
        scaled = left * weights[d].to(left.device, left.dtype)[:, None, None]
        part = scaled.flatten(0, 1).T @ right.flatten(0, 1)
        acc.direction(d, name, part.device).view(-1).add_(part.reshape(-1))


def _external(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """The part of each output's gradient that comes from outside the module.

    ``pairs``: a module re-run's outputs ``o_j`` with the gradients ``T_j`` their hooks saw.
    When one output is computed from another inside the module (a router's routing weights
    from its logits), ``T`` of the earlier one already holds the path through the later one:
    ``T_j = e_j + sum_k (do_k/do_j)^T e_k`` with ``e`` the outside parts, which are the
    cotangents that give the parameters' gradient once.  Solved from the last outputs back:
    exact after one pass per output beyond the first."""
    outs = [o for o, _ in pairs]
    external = [t for _, t in pairs]
    for _ in range(len(pairs) - 1):
        solved = []
        for j, (o_j, total) in enumerate(pairs):
            others = [k for k in range(len(pairs)) if k != j]
            inside = torch.autograd.grad(
                [outs[k] for k in others],
                [o_j],
                [external[k] for k in others],
                retain_graph=True,
                allow_unused=True,
            )[0]
            solved.append(total if inside is None else total - inside)
        external = solved
    return external


def _embedding_tokens(
    module: nn.Embedding,
    acc: _Accumulator,
    ids: torch.Tensor,
    grad: torch.Tensor,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An embedding call's ``ids [n, T]``, gradients ``[n, T, dim]`` float32 of its looked-up
    rows (the output's times ``scale``, :func:`_lookup_scale`) and the tokens that get a
    gradient ``[n, T]`` bool: real tokens, not ``padding_idx`` (as PyTorch)."""
    n = acc.token_mask.shape[0]
    ids = ids.reshape(n, -1)
    keep = torch.ones_like(ids, dtype=torch.bool)
    if ids.shape[1] == acc.token_mask.shape[1]:
        keep = keep & acc.token_mask
    if module.padding_idx is not None:
        keep = keep & (ids != module.padding_idx)
    ds = _tokens(grad, n)
    return ids, ds if scale == 1.0 else ds * scale, keep


def _own_forward(module: nn.Module, base: type[nn.Module]) -> bool:
    """Whether ``module`` runs a forward other than ``base.forward``: its class overrides it
    (Falcon's ``FalconLinear``, Gemma's scaled embedding), or one is set on the instance (TRL's
    ``cast_lm_head_to_fp32``, accelerate's device hooks).  Then its output need not be the
    base's, nor the gradient that a hook on it passes on to the parameters."""
    return type(module).forward is not base.forward or "forward" in vars(module)


def _whole_parameter(p: torch.Tensor) -> torch.Tensor:
    """A parameter's whole value inside its module's forward, without a copy where it can."""
    if hasattr(p, "full_tensor"):  # FSDP2: every rank reads it here, in the same order
        p = p.full_tensor()
    return whole_value(p, copy=False)


@torch.no_grad()
def _runs_as_its_base(module: nn.Module, kind: str, x: torch.Tensor, output: Any) -> bool:
    """Whether a linear, ``Conv1D`` or layer-norm module whose forward is its own
    (:func:`_own_forward`) returned, on this call, what its base class's forward returns for
    the same input: then the base's hook gives its gradients, and the module is not re-run
    per sequence (a generic module's cost).  Checked on up to 256 rows of the call, in float32,
    to a few units of rounding of the lowest precision involved; a call whose base output is
    zero (a zero weight or input) cannot tell the forwards apart and counts as a difference."""
    if not isinstance(output, torch.Tensor) or output.shape[:-1] != x.shape[:-1]:
        return False
    weight, bias = (
        _whole_parameter(p) if isinstance(p := getattr(module, attr, None), torch.Tensor) else None
        for attr in ("weight", "bias")
    )
    if kind == "layernorm":
        assert isinstance(module, nn.LayerNorm)
        shape, eps = tuple(module.normalized_shape), float(module.eps)
        xs, out = x.reshape(-1, *shape), output.reshape(-1, *shape)
    else:
        xs, out = x.reshape(-1, x.shape[-1]), output.reshape(-1, output.shape[-1])
    picked = torch.linspace(0, xs.shape[0] - 1, min(xs.shape[0], 256), device=xs.device).long()
    xs, out = xs[picked].float(), out[picked].float()

    def f32(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.float()

    if kind == "layernorm":
        want = nn.functional.layer_norm(xs, shape, f32(weight), f32(bias), eps)
    elif kind == "conv1d":  # transformers' Conv1D: weight [in, out]
        assert weight is not None
        want = xs @ weight.float() + (0.0 if bias is None else bias.float())
    else:
        assert weight is not None
        want = nn.functional.linear(xs, weight.float(), f32(bias))
    scale = float(want.abs().max()) if want.numel() else 0.0
    if want.shape != out.shape or scale == 0.0:  # a zero output tells no forward from another
        return False
    involved = [t for t in (x, output, weight) if t is not None and t.is_floating_point()]
    rounding = max(torch.finfo(t.dtype).eps for t in involved)
    return bool(((out - want).abs() <= max(4 * rounding, 1e-5) * scale).all())


def _lookup_scale(module: nn.Embedding, ids: torch.Tensor, output: torch.Tensor) -> float:
    """The factor ``c`` of an embedding whose forward returns ``c * weight[ids]`` (Gemma's
    ``ScaledWordEmbedding``, ``c = sqrt(hidden)``), read from one call's output and checked on
    every entry: then ``dS/dweight[v] = c * sum_{t: id_t = v} dS/doutput_t``.  Any other forward
    raises ``RuntimeError`` (its gradient is not a scaled scatter of the output's)."""
    plain = nn.functional.embedding(ids, _whole_parameter(module.weight)).float()
    out = output.detach().float()
    norm = float((plain * plain).sum())
    scale = float((out * plain).sum()) / norm if norm > 0 else 1.0
    tolerance = 1e-3 * (float(out.abs().max()) if out.numel() else 0.0) + 1e-12
    if out.shape != plain.shape or not bool(((out - scale * plain).abs() <= tolerance).all()):
        raise RuntimeError(
            f"{type(module).__name__}: an embedding whose forward is not a scaled lookup of "
            "its weight; exclude its parameters"
        )
    return scale


def _call(
    module: nn.Module,
    params: Mapping[str, torch.Tensor],
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any] | None = None,
) -> Any:
    """``functional_call(module, params, args, kwargs)``; for a module whose parameters ZeRO 3
    partitions, its ``forward`` alone: DeepSpeed's module hooks would fetch the very parameters
    that ``params`` stand in for (and fail on them)."""
    kwargs = dict(kwargs or {})
    if any(is_partitioned(p) for p in module.parameters(recurse=False)):
        with _reparametrize_module(module, dict(params)):
            return module.forward(*args, **kwargs)
    return functional_call(module, dict(params), args, kwargs)


def _detached(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Call:
    """A module call's arguments with their tensors detached (kept for a re-run)."""

    def one(value: Any) -> Any:
        return value.detach() if isinstance(value, torch.Tensor) else value

    return tuple(one(a) for a in args), {k: one(v) for k, v in kwargs.items()}


def _outputs(output: Any) -> list[Any]:
    """A module's outputs: a tensor, or the items of a tuple (a MoE router returns its logits,
    the routing weights and the chosen experts)."""
    return list(output) if isinstance(output, (tuple, list)) else [output]


def _graded_positions(output: Any) -> list[int]:
    """Which of a module's outputs carry a gradient: floating-point tensors in the graph."""
    return [
        j
        for j, t in enumerate(_outputs(output))
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad
    ]


def _flattened_tokens(t: torch.Tensor, n: int, width: int) -> bool:
    """Whether ``t`` is a view, with rows ``[n * L * k, ...]``, of a tensor shaped ``[n, L,
    ...]`` (``reshape(-1, d)`` of ``[n, L, heads, d]``): each sequence's rows then lie together,
    each token's ``k`` in turn.  Only the view's own record tells: a row-wise module gives the
    same outputs however its rows are cut, so a re-run could not catch a wrong cut."""
    fn = t.grad_fn
    if fn is None or type(fn).__name__ not in ("ViewBackward0", "UnsafeViewBackward0"):
        return False
    sizes = tuple(getattr(fn, "_saved_self_sym_sizes", ()))
    if len(sizes) < 3 or tuple(sizes[:2]) != (n, width):
        return False
    return t.ndim >= 1 and t.shape[0] % (n * width) == 0 and t.shape[0] > n * width


def _gathers_rows(t: torch.Tensor) -> bool:
    """Whether ``t`` was made by picking rows of another tensor by index (``x[idx]``,
    ``index_select`` on dim 0): the tokens an older MoE layer routes to one ``nn.Linear``
    expert.  Its rows are then no batch's sequences or tokens, whatever their number."""
    fn = t.grad_fn
    if fn is None:
        return False
    name = type(fn).__name__
    if name == "IndexBackward0":
        indices = getattr(fn, "_saved_indices", None) or [None]
        return indices[0] is not None
    if name == "IndexSelectBackward0":
        return int(getattr(fn, "_saved_dim", -1)) == 0
    return False


def _per_sequence_copies(
    module: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, grad: torch.Tensor
) -> dict[str, torch.Tensor] | None:
    """``{attr: [n, *shape]}`` per-sequence gradients of ``module``'s ``params`` given its
    batch-first input ``x`` and output gradient ``grad``, from one re-run in which each
    parameter is a ``[n, 1, ..., *shape]`` tensor, one copy per sequence, broadcast against the
    ``[n, ...]`` activations as the parameter itself is (an elementwise scale or shift: every
    norm).  None where the copies do not fit: the output is not a tensor of ``grad``'s shape,
    or the module does more with a parameter than broadcast it (an error of any kind, a
    shape assertion as much as a failed product)."""
    n = x.shape[0]
    copies = {}
    for attr, p in params.items():
        ones = grad.ndim - 1 - p.ndim
        if ones < 0:
            return None
        shape = (n, *([1] * ones), *p.shape)
        copies[attr] = p.reshape(1, *shape[1:]).expand(shape).clone().requires_grad_(True)
    try:
        with torch.enable_grad():
            out = _call(module, copies, (x,))
            if not isinstance(out, torch.Tensor) or out.shape != grad.shape:
                return None
            grads = torch.autograd.grad(out, list(copies.values()), grad, allow_unused=True)
    except Exception:  # any module code may refuse a batched parameter: vmap stays
        return None
    return {
        attr: (torch.zeros_like(copy) if g is None else g).reshape(n, *params[attr].shape)
        for (attr, copy), g in zip(copies.items(), grads, strict=True)
    }


def _agree(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal to the float rounding of two orders of summation, relative to ``want``'s scale."""
    scale = float(want.abs().max()) if want.numel() else 0.0
    return got.shape == want.shape and torch.allclose(got, want, rtol=1e-4, atol=1e-5 * scale)


class FactorisedCapture:
    """Per-sequence ``kronecker`` sketches of a causal LM's score gradients, by hooks.

    Parameters
    ----------
    model:
        a causal LM (``model(input_ids, attention_mask)`` gives ``[n, L, V]`` logits or an
        object with ``.logits``); it must not mix the rows of a batch.
    dim, seed:
        the run's sketch spec ``{"kind": "kronecker", "dim": dim, "seed": seed}``.
    parameter_filter:
        which parameters to study (default: all trainable ones).
    non_matrix:
        ``"sketch"``: vector parameters (biases, norm weights) are captured exactly per
        sequence and sketched by the run's sketcher; ``"exclude"``: left out (rows then cover
        the matrix parameters only; :attr:`parameters` says which).
    strict:
        raise instead of warning when a selected parameter cannot be captured by hooks.
    use_eval_mode:
        run the model in eval mode (no dropout) during the capture.

    Activation checkpointing: the layers that checkpoint in training
    (:func:`clients.capture.checkpointing_layers`: transformers' non-reentrant activation
    checkpointing, which ``Trainer`` turns on with ``gradient_checkpointing``, TRL's default)
    checkpoint in the capture too, so that its forward keeps no more activations than the
    training forward does; the hooks then keep none of a checkpointed layer's activations, and
    each backward runs its layers' forwards again (about one forward more per backward).
    Set :attr:`checkpointing` to False to keep every activation instead.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        dim: int,
        seed: int,
        parameter_filter: ParameterFilter | None = None,
        non_matrix: NonMatrix = "sketch",
        strict: bool = False,
        use_eval_mode: bool = True,
        temperature: float = 1.0,
    ) -> None:
        self._plan_hooks(model, parameter_filter, non_matrix, strict, use_eval_mode, temperature)
        kronecker = KroneckerSketch(dim, seed, self.parameters)
        self._kronecker = kronecker
        self.sketcher: Sketcher = kronecker
        self.dim = int(dim)
        self.seed = int(seed)
        device = next(iter(self.model.parameters())).device
        self._factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for _, kind, own in self._plan:
            if kind in ("linear", "conv1d", "embedding") and "weight" in own:
                name = own["weight"]
                if name not in self._factors:
                    a, b = kronecker.factors(name, device)
                    self._factors[name] = (a.float(), b.float())

    def _plan_hooks(
        self,
        model: nn.Module,
        parameter_filter: ParameterFilter | None,
        non_matrix: NonMatrix,
        strict: bool,
        use_eval_mode: bool,
        temperature: float,
    ) -> None:
        """Which module's hook captures which selected parameter; sets :attr:`parameters`."""
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.model = model
        self.use_eval_mode = use_eval_mode
        #: checkpoint the layers that checkpoint in training (the class docstring)
        self.checkpointing = True
        #: the sampling temperature ``T`` of the policy ``softmax(logits / T)`` (TRL's)
        self.temperature = float(temperature)
        try:
            accepted = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            accepted = {}  # type: ignore[assignment]
        self._takes_position_ids = "position_ids" in accepted and hasattr(model, "config")
        selected = select_parameters(model, parameter_filter)
        canonical = {id(p): n for n, p in selected.items()}
        # (module, kind, {attr: canonical name}) for every supported module owning a selected param
        self._plan: list[tuple[nn.Module, str, dict[str, str]]] = []
        #: generic modules (by id) whose per-sequence parameter copies agreed with vmap or not
        self._copies_agree: dict[int, bool] = {}
        #: embeddings (by id) whose forward scales the lookup: the factor (_lookup_scale)
        self._lookup_scales: dict[int, float] = {}
        #: linear, Conv1D and layer-norm modules (by id) whose forward is their own, not yet
        #: checked against their base's (_runs_as_its_base)
        self._unchecked: set[int] = set()
        #: generic modules (by id) whose calls on flattened tokens were checked to keep the
        #: sequences apart (:meth:`_sequence_grads`)
        self._rows_checked: set[int] = set()
        #: whether a forward's graph was checked for studied parameters used outside a call
        #: of their own module (:meth:`_check_uses`)
        self._uses_checked = False
        #: at most this many bytes of per-sequence gradients of a module at once (HookedCapture's
        #: ``chunk_bytes``)
        self.chunk_bytes = 1 << 24
        covered: set[str] = set()
        for module in model.modules():
            own = {
                attr: canonical[id(p)]
                for attr, p in module.named_parameters(recurse=False)
                if id(p) in canonical
            }
            if not own:
                continue
            kind = self._kind(module)
            if kind in ("generic", "layernorm") and non_matrix == "exclude":
                continue
            # A module whose children hold parameters (GPT-OSS's attention and its sinks) is
            # re-run whole for its own parameters, its children's hooks silent in the re-run;
            # not under ZeRO 3, where the children's parameters are gathered in their own turn,
            # nor the model itself (a re-run of it per sequence is the loop capture).
            inner = [p for c in module.children() for p in c.parameters()]
            if kind == "generic" and inner and (module is model or any(map(is_partitioned, inner))):
                continue
            if non_matrix == "exclude":
                own = {a: n for a, n in own.items() if a == "weight"}
            self._plan.append((module, kind, own))
            covered.update(own.values())
            base = {"linear": nn.Linear, "conv1d": _HFConv1D, "layernorm": nn.LayerNorm}.get(kind)
            if base is not None and _own_forward(module, base):
                self._unchecked.add(id(module))
        missing = [n for n in selected if n not in covered]
        if missing and strict:
            raise ValueError(f"no hook can capture these parameters: {missing}")
        if missing and non_matrix != "exclude":
            warnings.warn(
                f"kernelscope: factorised capture leaves out {len(missing)} parameter(s) that no "
                f"supported module owns: {missing[:8]}",
                RuntimeWarning,
                stacklevel=2,
            )
        #: ``{name: shape}`` of the parameters the sketches cover (``create_run``'s
        #: ``parameters``), in ``named_parameters()`` order.
        self.parameters: dict[str, list[int]] = {
            n: list(full_shape(p)) for n, p in selected.items() if n in covered
        }
        if not self.parameters:
            raise ValueError("the factorised capture covers no parameter of this model")

    @property
    def spec(self) -> dict[str, Any]:
        """The run's sketch spec for ``create_run``."""
        return {"kind": "kronecker", "dim": self.dim, "seed": self.seed}

    @staticmethod
    def _kind(module: nn.Module) -> str:
        # A subclass (or an instance) with a forward of its own gets its base's hook, checked
        # against the base's output on its first call (_runs_as_its_base; an embedding's
        # forward is taken for a scaled lookup, _lookup_scale): re-runs per sequence cost more
        # (an embedding's would form a [vocab, dim] gradient per sequence).
        if isinstance(module, nn.Linear):
            return "linear"
        if _HFConv1D is not None and isinstance(module, _HFConv1D):
            return "conv1d"
        if isinstance(module, nn.Embedding):
            if module.max_norm is not None or module.scale_grad_by_freq or module.sparse:
                return "generic"
            return "embedding"
        if isinstance(module, nn.LayerNorm):
            return "layernorm"
        return "generic"

    # -- hooks -------------------------------------------------------------------------------

    def _linear(self, own: Mapping[str, str], transposed: bool, acc: _Accumulator) -> Callable:
        def on_grad(x: torch.Tensor, grad: torch.Tensor) -> None:
            n = acc.token_mask.shape[0]
            xs, ds = _tokens(x, n), _tokens(grad, n)
            mask = acc.padding(xs.shape[1])
            keep = None if mask is None else mask.unsqueeze(-1)

            def masked(t: torch.Tensor) -> torch.Tensor:
                # on the small projected tensors: cheaper than masking x and delta themselves
                return t if keep is None else torch.where(keep, t, torch.zeros((), dtype=t.dtype))

            if "weight" in own:
                name = own["weight"]
                a, b = self._factors[name]
                if transposed:  # Conv1D: declared [in, out], G = sum_t x_t delta_t^T
                    core = torch.bmm(masked(xs @ a.T).transpose(1, 2), masked(ds @ b.T))
                else:  # Linear: declared [out, in], G = sum_t delta_t x_t^T
                    core = torch.bmm(masked(ds @ a.T).transpose(1, 2), masked(xs @ b.T))
                acc.add_core(name, core)
                if acc.adding is not None:
                    ds = masked(ds)
                    _add_outer_directions(acc, name, *((xs, ds) if transposed else (ds, xs)))
            if "bias" in own:
                acc.add_vector(own["bias"], masked(ds).sum(dim=1))

        return on_grad

    def _embedding(
        self, module: nn.Embedding, own: Mapping[str, str], acc: _Accumulator
    ) -> Callable:
        name = own["weight"]

        def on_grad(ids: torch.Tensor, grad: torch.Tensor) -> None:
            ids, ds, keep = _embedding_tokens(
                module, acc, ids, grad, self._lookup_scales.get(id(module), 1.0)
            )
            ds = torch.where(keep.unsqueeze(-1), ds, torch.zeros_like(ds))
            a, b = self._factors[name]
            ax = a.T[ids]  # [n, T, k_out]: A e_{id_t} = A[:, id_t]
            acc.add_core(name, torch.bmm(ax.transpose(1, 2), ds @ b.T))
            weights = acc.adding
            if weights is not None:
                each = weights.to(ds.device)[:, :, None, None] * ds  # [m, n, T, dim]
                acc.add_direction_rows(name, ids.flatten(), each.flatten(1, 2))

        return on_grad

    def _layernorm(
        self, module: nn.LayerNorm, own: Mapping[str, str], acc: _Accumulator
    ) -> Callable:
        """``y = xhat * weight + bias``: ``dS_i/dweight = sum_t delta_t * xhat_t``, ``dS_i/dbias =
        sum_t delta_t`` (exact, per sequence, without re-running the module under vmap)."""

        def on_grad(x: torch.Tensor, grad: torch.Tensor) -> None:
            n = acc.token_mask.shape[0]
            shape = tuple(module.normalized_shape)
            xhat = torch.nn.functional.layer_norm(x.float(), shape, eps=module.eps)
            xs = xhat.reshape(n, -1, *shape)
            ds = grad.float().reshape(n, -1, *shape)
            mask = acc.padding(xs.shape[1])
            if mask is not None:
                keep = mask.reshape(n, -1, *([1] * len(shape)))
                ds = torch.where(keep, ds, torch.zeros_like(ds))
            if "weight" in own:
                acc.add_vector(own["weight"], (ds * xs).sum(dim=1))
            if "bias" in own:
                acc.add_vector(own["bias"], ds.sum(dim=1))

        return on_grad

    def _generic(self, module: nn.Module, own: Mapping[str, str], acc: _Accumulator) -> Callable:
        """Per-sequence gradients of the parameters of any other module (RMSNorm, a MoE
        router or experts, ...), given its call's arguments and its outputs' gradients.

        A batch-first call of one input and one output (a norm): one re-run of the module on
        the batch with a copy of each parameter per sequence (:func:`_per_sequence_copies`),
        which costs a small forward and backward, or, where that does not apply, ``vmap`` of a
        ``vjp`` per sequence (a few milliseconds per call whatever the module's size: py-spy
        put 7% of the capture of bench/trl_step.py's 10M model in its 13 RMSNorms).  The
        copies are checked against ``vmap`` on the module's first call and used from then on
        only if they agree: a module that reduces over a parameter (``weight.mean()``) would
        mix the sequences' copies.

        Any other call (several inputs or outputs, or rows that are the batch's tokens
        flattened to ``[n * L, ...]``, as a MoE block hands them to its router and experts):
        :meth:`_sequence_grads`, one re-run per sequence on its own rows."""

        def on_grad(
            call: Call,
            grads: tuple[torch.Tensor | None, ...],
            positions: tuple[int, ...],
            values: dict[str, torch.Tensor] | None = None,
        ) -> None:
            n = acc.token_mask.shape[0]
            params = values or {a: module.get_parameter(a).detach() for a in own}
            args, kwargs = call
            lead = next(g for g in grads if g is not None).shape[0]
            simple = (
                lead == n
                and len(grads) == 1
                and len(args) == 1
                and isinstance(args[0], torch.Tensor)
                and not any(isinstance(v, torch.Tensor) for v in kwargs.values())
            )
            if not simple:
                self._sequence_grads(module, own, acc, params, call, grads, positions)
                return
            x, grad = args[0], grads[0]
            assert grad is not None
            if x.shape[0] != n:
                raise RuntimeError(f"{type(module).__name__}: input is not batch-first")
            mask = acc.padding(grad.shape[1]) if grad.ndim >= 2 else None
            if mask is not None:
                keep = mask.reshape(n, -1, *([1] * (grad.ndim - 2)))
                grad = torch.where(keep, grad, torch.zeros_like(grad))

            def one(xi: torch.Tensor, gi: torch.Tensor) -> dict[str, torch.Tensor]:
                pull = vjp(lambda p: _call(module, p, (xi,)), params)[1]
                grads: dict[str, torch.Tensor] = pull(gi)[0]
                return grads

            def by_vmap() -> dict[str, torch.Tensor]:
                xs, gs = x.detach().unsqueeze(1), grad.unsqueeze(1)
                try:
                    return dict(vmap(one)(xs, gs))
                except Exception:  # a module vmap cannot handle: one sequence at a time
                    rows = [one(xs[i], gs[i]) for i in range(n)]
                    return {a: torch.stack([r[a] for r in rows]) for a in own}

            acc.recomputing = True
            try:
                agree = self._copies_agree.get(id(module))
                per_seq = None
                if agree is not False:
                    per_seq = _per_sequence_copies(module, params, x.detach(), grad)
                if agree is None:
                    reference = by_vmap()
                    # one sequence, or gradients all zero, cannot show copies being mixed
                    if n >= 2 and any(bool(reference[a].any()) for a in own):
                        self._copies_agree[id(module)] = per_seq is not None and all(
                            _agree(per_seq[a], reference[a]) for a in own
                        )
                    per_seq = reference
                elif per_seq is None:
                    per_seq = by_vmap()
            finally:
                acc.recomputing = False
            for attr, name in own.items():
                acc.add_vector(name, per_seq[attr])

        return on_grad

    def _sequence_grads(
        self,
        module: nn.Module,
        own: Mapping[str, str],
        acc: _Accumulator,
        params: Mapping[str, torch.Tensor],
        call: Call,
        grads: tuple[torch.Tensor | None, ...],
        positions: tuple[int, ...],
    ) -> None:
        """Each sequence's gradient of ``module``'s parameters from a re-run on that
        sequence's rows alone: argument and output rows ``[i]`` of a batch-first call, or rows
        ``[i L, (i + 1) L)`` of a call on the batch's ``n x L`` tokens flattened (a MoE
        block's router and experts; the routing the forward chose is among the arguments, so
        the re-run routes each token as the forward did).  ``grads`` are the gradients of the
        outputs at ``positions`` (None where none reached an output); padded tokens' rows are
        zeroed.  The first call on flattened tokens is checked against a re-run on the whole
        batch: a module whose rows depend on other sequences' rows (an expert capacity
        shared by the batch) cannot be split into per-sequence gradients."""
        n, width = acc.token_mask.shape
        lead = next(g for g in grads if g is not None).shape[0]
        per_row = lead // n  # 1, L, or L times heads (the forward hook let only these in)

        def tokens_of(i: int) -> torch.Tensor:
            """Sequence ``i``'s real rows ``[per_row]`` bool: each token's rows in turn."""
            return acc.token_mask[i].repeat_interleave(per_row // width)

        args, kwargs = call

        def rows_of(value: Any, i: int) -> Any:
            if isinstance(value, (tuple, list)):  # rotary (cos, sin) of an attention module
                return type(value)(rows_of(v, i) for v in value)
            if isinstance(value, torch.Tensor) and value.ndim:
                if value.shape[0] == lead:
                    return value[i * per_row : (i + 1) * per_row]
                if value.shape[0] == n:  # [n, L, ...] in, flattened inside (DeepSeek's router)
                    return value[i : i + 1]
            return value

        def masked(g: torch.Tensor, i: int) -> torch.Tensor:
            if per_row > 1:
                keep = tokens_of(i).reshape(per_row, *([1] * (g.ndim - 1)))
            elif g.ndim >= 2 and acc.padding(g.shape[1]) is not None:
                keep = acc.token_mask[i : i + 1].reshape(1, width, *([1] * (g.ndim - 2)))
            else:
                return g
            return torch.where(keep.to(g.device), g, torch.zeros((), dtype=g.dtype))

        whole = None
        if per_row > 1 and id(module) not in self._rows_checked:
            with torch.no_grad():
                whole = _outputs(_call(module, params, args, kwargs))
        scales = self._sequence_scales(own)
        size = sum(p.numel() * 4 for p in params.values())
        block = max(1, self.chunk_bytes // max(size, 1))
        pending: list[tuple[int, dict[str, torch.Tensor]]] = []
        acc.recomputing = True
        try:
            for i in range(n):
                cotangents = [None if g is None else masked(rows_of(g, i), i) for g in grads]
                leaves = {a: p.detach().requires_grad_(True) for a, p in params.items()}
                with torch.enable_grad():
                    out = _outputs(
                        _call(
                            module,
                            leaves,
                            tuple(rows_of(a, i) for a in args),
                            {k: rows_of(v, i) for k, v in kwargs.items()},
                        )
                    )
                if whole is not None:
                    for j in positions:
                        want = rows_of(whole[j], i)[tokens_of(i)]
                        if not _agree(out[j].detach()[tokens_of(i)], want):
                            raise RuntimeError(
                                f"{type(module).__name__}: a sequence's rows alone do not give "
                                "the outputs of the whole batch; its parameters' per-sequence "
                                "gradients cannot be separated: exclude them"
                            )
                pairs = [
                    (out[j], c.to(out[j].dtype))
                    for j, c in zip(positions, cotangents, strict=True)
                    if c is not None and out[j].requires_grad
                ]
                if pairs:
                    got = torch.autograd.grad(
                        [o for o, _ in pairs],
                        list(leaves.values()),
                        _external(pairs),
                        allow_unused=True,
                    )
                    pending.append(
                        (
                            i,
                            {
                                a: torch.zeros_like(p) if g is None else g
                                for (a, p), g in zip(leaves.items(), got, strict=True)
                            },
                        )
                    )
                if pending and (len(pending) == block or i == n - 1):
                    rows = [r for r, _ in pending]
                    stacked = {a: torch.stack([g[a] for _, g in pending]) for a in own}
                    self._add_sequences(acc, own, rows, stacked, scales)
                    pending = []
        finally:
            acc.recomputing = False
        if whole is not None:
            self._rows_checked.add(id(module))

    def _sequence_scales(self, own: Mapping[str, str]) -> dict[str, torch.Tensor | None]:
        """The row scales of a module's parameters, for :meth:`_add_sequences` (none here)."""
        return {}

    def _add_sequences(
        self,
        acc: _Accumulator,
        own: Mapping[str, str],
        rows: list[int],
        grads: Mapping[str, torch.Tensor],
        scales: Mapping[str, torch.Tensor | None],
    ) -> None:
        """Add sequences ``rows``' gradients ``{attr: [len(rows), *shape]}`` of a module's
        parameters (``scales``: their row scales, :meth:`_sequence_scales`)."""
        index = torch.tensor(rows)
        for attr, name in own.items():
            flat = grads[attr].reshape(len(rows), -1).float()
            acc.add_direction(name, acc.weighted(flat, index))  # before a scale (in place)
            self._add_block(acc, name, index, flat, scales.get(name))

    def _add_block(
        self,
        acc: _Accumulator,
        name: str,
        index: torch.Tensor,
        flat: torch.Tensor,
        scale: torch.Tensor | None,
    ) -> None:
        """Add the ``[b, numel]`` flat gradients of parameter ``name`` of sequences ``index``
        (exact vectors, sketched with the rest by :meth:`_rows`)."""
        total = acc.vectors.get(name)
        if total is None:
            n = acc.token_mask.shape[0]
            total = acc.vectors[name] = torch.zeros(n, flat.shape[1], device=flat.device)
        total[index.to(total.device)] += flat

    @contextlib.contextmanager
    def _hooks(self, acc: _Accumulator) -> Iterator[None]:
        handles = []
        for module, kind, own in self._plan:
            if kind == "linear":
                on_grad = self._linear(own, False, acc)
            elif kind == "conv1d":
                on_grad = self._linear(own, True, acc)
            elif kind == "embedding":
                assert isinstance(module, nn.Embedding)
                on_grad = self._embedding(module, own, acc)
            elif kind == "layernorm":
                assert isinstance(module, nn.LayerNorm)
                on_grad = self._layernorm(module, own, acc)
            else:
                on_grad = self._generic(module, own, acc)

            partitioned = any(is_partitioned(p) for p in module.parameters(recurse=False))

            def forward_hook(
                mod: nn.Module,
                args: tuple[Any, ...],
                kwargs: dict[str, Any],
                output: Any,
                on_grad: Callable = on_grad,
                kind: str = kind,
                own: Mapping[str, str] = own,
                partitioned: bool = partitioned,
            ) -> None:
                if acc.recomputing or acc.in_backward:  # a checkpoint's re-run: see pre_hook
                    return
                first = _first_tensor(args, kwargs)
                if first is None or (args and first is not args[0]):
                    raise RuntimeError(f"{type(mod).__name__}: expected a tensor input")
                if id(mod) in self._unchecked:
                    self._unchecked.discard(id(mod))
                    if not _runs_as_its_base(mod, kind, first, output):
                        acc.not_as_base.add(id(mod))
                        return
                if kind == "generic":
                    positions = _graded_positions(output)
                elif isinstance(output, torch.Tensor) and output.requires_grad:
                    positions = [0]
                else:
                    positions = []
                if not positions:
                    return
                outs = _outputs(output)
                graded = [outs[j] for j in positions]
                n, width = acc.token_mask.shape
                # rows are the batch's sequences, or its tokens flattened ([n * L, ...]: a MoE
                # block's router and experts, a shared expert; [n * L * heads, ...] made from a
                # [n, L, heads, ...] tensor: Qwen3.5's gated norm); not rows picked by index,
                # even as many (an older MoE's nn.Linear experts on their routed tokens)
                rows = graded[0].shape[0]
                if (
                    rows not in (n, n * width)
                    and not (rows == first.shape[0] and _flattened_tokens(first, n, width))
                ) or _gathers_rows(first):
                    # refused when the loss depends on it (checked after the forward): peft's
                    # DoRA runs its adapters on an identity matrix for a norm it detaches
                    message = (
                        f"{type(mod).__name__} ran on a batch of {rows} rows, not {n} (or its "
                        f"{n * width} tokens): its output is broadcast over the sequences or "
                        "gathers their tokens, so per-sequence gradients cannot be separated; "
                        "exclude its parameters"
                    )
                    acc.unsplit.extend((out.grad_fn, message) for out in graded)
                    return
                if (
                    kind == "embedding"
                    and id(mod) not in self._lookup_scales
                    and _own_forward(mod, nn.Embedding)
                ):
                    assert isinstance(mod, nn.Embedding)
                    self._lookup_scales[id(mod)] = _lookup_scale(mod, first, graded[0])
                # a checkpointed layer's activations are not kept: the re-run hands them over
                call = None if id(mod) in acc.checkpointed else _detached(args, kwargs)
                if not first.requires_grad:
                    acc.roots.extend(graded)
                number = acc.registered

                def arrived(gs: Sequence[torch.Tensor | None]) -> None:
                    acc.fired += 1
                    acc.fired_hooks.add(number)
                    got = tuple(None if g is None else g.detach() for g in gs)
                    if all(g is None for g in got):
                        return
                    # ZeRO 3 partitions a module's parameters outside its forward and backward:
                    # a re-run needs their values, which DeepSpeed has gathered for the
                    # module's backward when its output's gradient arrives (read here, not
                    # kept from the forward: a MoE layer's experts are most of the model)
                    values = (
                        {a: whole_value(mod.get_parameter(a)) for a in own}
                        if kind == "generic" and partitioned
                        else None
                    )

                    def work(c: Call) -> None:
                        acc.hook_adds = number not in acc.directions_added
                        if kind == "generic":
                            on_grad(c, got, tuple(positions), values)
                        else:
                            on_grad(c[0][0], got[0])

                    if call is None:
                        acc.gradient_arrived(id(mod), work)
                    else:
                        work(call)

                # A gradient hook sees dS/d(output) of this very call: a module called twice
                # gets two contributions, which add up like the gradient does.  Several outputs
                # (a router's logits and routing weights) are seen together, once every one
                # that the backward reaches has its gradient.
                if len(graded) == 1:
                    graded[0].register_hook(lambda g: arrived((g,)))
                else:
                    torch.autograd.graph.register_multi_grad_hook(graded, arrived, mode="all")
                acc.registered += 1

            # before DeepSpeed's own forward hook, which wraps a ZeRO 3 module's output in the
            # function that gathers its parameters for the backward: the gradient reaches the
            # output seen here after that gathering, where the hook reads them
            handles.append(
                module.register_forward_hook(forward_hook, prepend=partitioned, with_kwargs=True)
            )
            if id(module) in acc.checkpointed:
                handles.append(
                    module.register_forward_pre_hook(self._rerun_hook(acc), with_kwargs=True)
                )
        planned = {id(m) for m, _, _ in self._plan}
        if acc.uses is not None:
            handles.extend(self._use_hooks(acc))
        for module in self.model.modules():
            if isinstance(module, nn.Embedding) and id(module) not in planned:

                def root_hook(mod: nn.Module, args: tuple[Any, ...], output: Any) -> None:
                    if isinstance(output, torch.Tensor) and output.requires_grad:
                        acc.roots.append(output)

                handles.append(module.register_forward_hook(root_hook))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _ancestors(self) -> dict[int, list[tuple[nn.Module, str]]]:
        """``{id(module): [(ancestor, the module's path in it), ...]}``, innermost first, of each
        planned module: the modules that may re-run it (not the model itself, whose re-run per
        sequence is the loop capture; none under ZeRO 3, whose modules' parameters are gathered
        each in its own turn)."""
        planned = {id(m) for m, _, _ in self._plan}
        found: dict[int, list[tuple[nn.Module, str]]] = {}
        for ancestor in self.model.modules():
            if ancestor is self.model or any(map(is_partitioned, ancestor.parameters())):
                continue
            for path, module in ancestor.named_modules():
                if path and id(module) in planned:
                    found.setdefault(id(module), []).append((ancestor, path))
        for chain in found.values():
            chain.sort(key=lambda item: item[1].count("."))
        return found

    def _use_hooks(self, acc: _Accumulator) -> list[Any]:
        """Forward hooks that record, in ``acc.uses``, the edges to each planned module's
        parameters made inside a call of the module itself or of one of its ancestors
        (:meth:`_check_uses`)."""
        studied: dict[int, list[tuple[torch.Tensor, str]]] = {}  # id(module) -> parameters
        callers: dict[int, nn.Module] = {}
        found = self._ancestors()
        for module, _, own in self._plan:
            for caller in (module, *(a for a, _ in found.get(id(module), []))):
                callers[id(caller)] = caller
                for attr, name in own.items():
                    studied.setdefault(id(caller), []).append((module.get_parameter(attr), name))

        def record(mod: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            if acc.recomputing or acc.in_backward:
                return
            # a leaf's gradient node lives while a graph uses it: read during the forward
            targets = {
                id(node): name
                for p, name in studied[id(mod)]
                if (node := _gradient_node(p)) is not None
            }
            stop = {id(t.grad_fn) for t in _tensors_of((args, kwargs)) if t.grad_fn is not None}
            roots = [t.grad_fn for t in _tensors_of(output) if t.grad_fn is not None]
            assert acc.uses is not None
            acc.uses.update((id(e), name, id(mod)) for e, name in _edges_to(roots, targets, stop))

        return [
            caller.register_forward_hook(record, with_kwargs=True) for caller in callers.values()
        ]

    def _check_uses(self, acc: _Accumulator, outputs: Sequence[Any]) -> None:
        """Check the forward's graph for a studied parameter used outside a call of its own
        module: the hooks see a module's calls, so such a use's part of the gradient would be
        missing from the rows, silently.  A parameter whose every such use is inside a call of
        one of its module's ancestors (transformers' Mamba and gated-delta mixers hand
        ``conv1d.weight`` to their own kernels) is given to the innermost such ancestor,
        re-run per sequence as a generic module, and the capture starts again
        (:class:`_ReplannedError`); any other is refused with ``RuntimeError``.  Once per
        capture: a model's graph keeps its structure."""
        uses = acc.uses
        assert uses is not None
        owner = {n: (m, a) for m, _, own in self._plan for a, n in own.items()}
        owners: dict[str, set[int]] = {}  # a tied weight has two modules (GPT-2's wte, lm_head)
        for module, _, own in self._plan:
            for name in own.values():
                owners.setdefault(name, set()).add(id(module))
        targets = {
            id(node): name
            for name, (module, attr) in owner.items()
            if (node := _gradient_node(module.get_parameter(attr))) is not None
        }
        roots = [t.grad_fn for t in outputs if isinstance(t, torch.Tensor)]
        outside: dict[str, set[int]] = {}  # name -> its edges from outside its modules' calls
        for e, name in _edges_to(roots, targets, set()):
            if not any((id(e), name, m) in uses for m in owners[name]):
                outside.setdefault(name, set()).add(id(e))
        self._uses_checked = True
        if not outside:
            return
        found = self._ancestors()
        home: dict[str, tuple[nn.Module, str]] = {}  # name -> (ancestor, path of the parameter)
        for name, edges in outside.items():
            module, attr = owner[name]
            for ancestor, path in found.get(id(module), []):
                if all((e, name, id(ancestor)) in uses for e in edges):
                    home[name] = (ancestor, f"{path}.{attr}")
                    break
        stuck = sorted(set(outside) - set(home))
        if stuck:
            raise RuntimeError(
                f"{len(stuck)} studied parameter(s) are used outside a call of their own module "
                f"(the first: {stuck[0]}), where no hook sees them: their rows would miss that "
                "part of the gradient; exclude them"
            )
        plan = []
        moved: dict[int, tuple[nn.Module, dict[str, str]]] = {}
        for module, kind, own in self._plan:
            keep = {a: n for a, n in own.items() if n not in home}
            if keep:
                plan.append((module, kind, keep))
        for name, (ancestor, path) in home.items():
            moved.setdefault(id(ancestor), (ancestor, {}))[1][path] = name
        for module, _, own in plan:
            if id(module) in moved:  # an ancestor with parameters of its own (A_log, dt_bias)
                own.update(moved.pop(id(module))[1])
        plan.extend((ancestor, "generic", own) for ancestor, own in moved.values())
        self._plan = plan
        raise _ReplannedError

    @staticmethod
    def _rerun_hook(acc: _Accumulator) -> Callable[..., None]:
        """A forward pre-hook that keeps a checkpointed module's input when the backward runs
        its layer again (a pre-hook: the re-run stops after the layer's last saved tensor,
        which may be before a module's forward returns)."""

        def pre_hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if not acc.in_backward or acc.recomputing:
                return
            first = _first_tensor(args, kwargs)
            n, width = acc.token_mask.shape
            if (
                first is not None
                and first.dim() > 0
                and first.shape[0] not in (n, n * width)
                and not _flattened_tokens(first, n, width)
            ):
                return  # a call on other rows, which got no hook (DoRA's identity matrix)
            if id(mod) in acc.inputs:
                raise RuntimeError(
                    f"{type(mod).__name__} runs twice in one checkpointed layer: its inputs "
                    "cannot be told apart; turn gradient checkpointing off for the capture"
                )
            acc.inputs[id(mod)] = _detached(args, kwargs)

        return pre_hook

    def _backward(
        self,
        acc: _Accumulator,
        output: torch.Tensor,
        targets: list[torch.Tensor],
        retain_graph: bool = False,
    ) -> None:
        """``torch.autograd.grad(output, targets)`` with the hooks told that a forward they see
        is a checkpoint's re-run; the work that waited for re-run inputs is done by its end."""
        acc.in_backward = True
        try:
            torch.autograd.grad(output, targets, allow_unused=True, retain_graph=retain_graph)
        finally:
            acc.in_backward = False
        acc.run_waiting()
        if acc.waiting:
            raise RuntimeError("a checkpointed layer was not run again in the backward")
        acc.inputs.clear()

    # -- capture -----------------------------------------------------------------------------

    def _forward(
        self, batch: SequenceBatch, router_loss: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The logits of the positions the response log-probs need (:func:`response_window`:
        the LM head's product and its hook then skip the prompt positions) and, with
        ``router_loss``, the batch's MoE load-balancing loss (:func:`forward_outputs`)."""
        positions = batch.positions()
        if positions is None and self._takes_position_ids and not batch.model_inputs:
            # Per-row position ids: GPT-2 would otherwise look its position embeddings up once
            # for the whole batch ([1, L]) and broadcast them, summing the rows' gradients.
            # Not with inputs of the model's own: a vision-language model derives its (M-RoPE)
            # positions from them.
            n, width = batch.input_ids.shape
            positions = torch.arange(width, device=batch.input_ids.device).expand(n, width)
        return forward_outputs(
            self.model,
            batch.input_ids,
            batch.attention_mask,
            logits_to_keep=response_window(batch.response_mask),
            position_ids=positions,
            router_loss=router_loss,
            model_inputs=batch.model_inputs,
        )

    def _rows(self, acc: _Accumulator, n: int, device: torch.device) -> torch.Tensor:
        out = torch.zeros(n, self.sketcher.dim, dtype=torch.float32, device=device)
        for core in acc.cores.values():
            # KroneckerSketch lays vec(A G B^T) out row-major: entry (a, b) at a * k_in + b.
            out = out + core.reshape(n, self._kronecker.k_out * self._kronecker.k_in)
        for name, flat in acc.vectors.items():
            out = out + self.sketcher.sketch_slice(name, flat, 0).to(device)
        return out

    def capture(
        self,
        batch: SequenceBatch,
        token_coefficients: torch.Tensor | None = None,
        entropy_coefficients: torch.Tensor | None = None,
        *,
        directions: EntropyDirections | None = None,
        router_coefficient: float = 0.0,
        entropy_sum_rows: bool = False,
    ) -> FactorisedSketches:
        """Sketch every sequence's score gradient with one batched forward and backward.

        ``batch`` is right-padded and on the model's device.  Returns ``[n, k]`` rows equal (to
        float rounding) to ``KroneckerSketch(dim, seed, parameters).sketch(w)`` of the explicit
        per-sequence gradients ``w``.  No ``.grad`` of the model is written.

        ``token_coefficients`` (``[n, L]`` float, laid out like ``input_ids``: the loss's
        ``c_{i,t} = -dL/d log pi_{i,t}`` at response positions) adds the sketches of the update
        rows ``u_i = sum_t c_{i,t} grad log pi_{i,t}`` from one more backward over the same
        forward graph (a sequence's tokens only reach its own rows, so the per-sequence split
        of the hooks holds for any per-token weights).  ``entropy_coefficients`` (same layout,
        ``e_{i,t} = -dL/dH_{i,t}``) adds ``sum_t e_{i,t} grad H_{i,t}`` to them (an entropy
        bonus; :func:`clients.capture.capture_gradients`).  ``directions`` adds this batch's
        ``sum_j h_{d,j} w_j`` to :attr:`EntropyDirections.totals` from the same backward.
        ``router_coefficient`` ``r`` (a mixture-of-experts model; ``-dL/d aux`` of a loss that
        adds the load-balancing loss ``aux`` of this very batch, as TRL's) adds ``r grad
        aux_i`` to the update rows, ``aux_i`` sequence ``i``'s tokens' part of ``aux``: the
        loss's expert counts are constants of the batch, so its gradient at each token reaches
        that token's sequence's rows alone.  ``entropy_sum_rows`` adds the sketches of ``z_i =
        grad sum_t H_t`` (the sequences' entropy sums, math.md §3 "From the entropy sums") from
        one more backward over the same forward.
        """
        once = functools.partial(
            self._capture_once,
            batch,
            token_coefficients,
            entropy_coefficients,
            directions=directions,
            router_coefficient=router_coefficient,
            entropy_sum_rows=entropy_sum_rows,
        )
        # the first capture may re-plan (a forward of its own, parameters used by an
        # ancestor): at most once for each, and then the capture runs on the final plan
        for _ in range(2):
            try:
                return once()
            except _ReplannedError:
                continue
        return once()

    def _capture_once(
        self,
        batch: SequenceBatch,
        token_coefficients: torch.Tensor | None,
        entropy_coefficients: torch.Tensor | None,
        *,
        directions: EntropyDirections | None,
        router_coefficient: float,
        entropy_sum_rows: bool = False,
    ) -> FactorisedSketches:
        acc = _Accumulator(token_mask=batch.attention_mask.bool(), shapes=self.parameters)
        params = [p for p in self.model.parameters() if p.requires_grad]
        entropy = (
            None
            if entropy_coefficients is None
            else token_layout(batch, entropy_coefficients, "entropy_coefficients")
        )
        weights = (
            None
            if token_coefficients is None
            else token_layout(batch, token_coefficients, "token_coefficients")
        )
        if weights is None and (entropy is not None or router_coefficient):
            # an entropy or router term alone: update rows too
            weights = torch.zeros_like(batch.attention_mask, dtype=torch.float32)
        router = bool(router_coefficient)
        # the layers that will checkpoint: in eval mode they are kept in training mode
        layers = [
            layer
            for layer in (checkpointing_layers(self.model) if self.checkpointing else [])
            if self.use_eval_mode or layer.training
        ]
        acc.checkpointed = frozenset(id(m) for layer in layers for m in layer.modules())
        # FSDP2 (which may shard the model after this capture is made) swaps a module's
        # sharded parameters for gathered ones around its forward: the graph's edges are not
        # to the parameters named here, and the check does not apply
        sharded = any(is_sharded(m.get_parameter(a)) for m, _, own in self._plan for a in own)
        if not self._uses_checked and not sharded:
            acc.uses = set()
        with (
            eval_mode(self.model, self.use_eval_mode, training=layers),
            leaf_reductions_suspended(self.model),
            self._hooks(acc),
            _released(acc),
        ):
            logits, aux = self._forward(batch, router) if router else self._forward(batch)
            logprobs = response_logprobs(
                logits, batch.input_ids, batch.response_mask, temperature=self.temperature
            )
            if acc.unsplit:
                _check_unsplit(acc, [logprobs, aux])
            if acc.not_as_base:
                self._plan = [
                    (m, "generic" if id(m) in acc.not_as_base else kind, own)
                    for m, kind, own in self._plan
                ]
            if acc.uses is not None:
                self._check_uses(acc, [logprobs, aux])
            if acc.not_as_base:
                raise _ReplannedError
            if directions is not None:
                weights_h = directions.coefficients(logprobs.detach().float())
                if weights_h.ndim != 2 or weights_h.shape[1] != batch.size:
                    raise ValueError(
                        f"direction coefficients must be [m, {batch.size}], "
                        f"got {tuple(weights_h.shape)}"
                    )
                while len(directions.totals) < weights_h.shape[0]:
                    directions.totals.append({})
                acc.directions = directions
                acc.direction_weights = weights_h.to(logprobs.device, torch.float32)
            # Differentiate to the embedding outputs only: every hooked output lies between
            # them and the loss, and autograd then skips the weight-gradient products (half of
            # a backward).  autograd.grad, not backward(): no parameter's .grad is touched.
            targets: list[torch.Tensor] = list(acc.roots) if acc.roots else list(params)
            keep = weights is not None or entropy_sum_rows
            self._backward(acc, logprobs.sum(), targets, retain_graph=keep)
            if acc.roots and acc.fired != acc.registered:
                # some hooked output is not upstream of an embedding: run the full backward
                # (the same forward registers its hooks in the same order: those that ran
                # have their directions' part in already)
                added = set(acc.fired_hooks)
                acc.clear()
                acc.directions_added = added
                logits, aux = self._forward(batch, router) if router else self._forward(batch)
                logprobs = response_logprobs(
                    logits, batch.input_ids, batch.response_mask, temperature=self.temperature
                )
                targets = list(params)
                self._backward(acc, logprobs.sum(), targets, retain_graph=keep)
            sketch = self._rows(acc, batch.size, logprobs.device)
            with torch.no_grad():
                entropy_sums = response_entropy_sums(
                    logits.detach(), batch.response_mask, self.temperature
                )
            acc.direction_weights = None  # the directions are score gradients only
            update_sketch = None
            if weights is not None:
                acc.clear_rows()
                weighted = response_logprobs(
                    logits, batch.input_ids, batch.response_mask, weights, self.temperature, entropy
                ).sum()
                if aux is not None:
                    weighted = weighted + router_coefficient * aux
                self._backward(acc, weighted, targets, retain_graph=entropy_sum_rows)
                update_sketch = self._rows(acc, batch.size, logprobs.device)
            entropy_sum_sketch = None
            if entropy_sum_rows:
                acc.clear_rows()
                on = batch.response_mask.float()
                sums = response_logprobs(
                    logits,
                    batch.input_ids,
                    batch.response_mask,
                    torch.zeros_like(on),
                    self.temperature,
                    on,
                ).sum()
                self._backward(acc, sums, targets)
                entropy_sum_sketch = self._rows(acc, batch.size, logprobs.device)
        return FactorisedSketches(
            logprobs=logprobs.detach(),
            sketch=sketch,
            num_tokens=batch.num_tokens,
            update_sketch=update_sketch,
            entropy_sums=entropy_sums,
            entropy_sum_sketch=entropy_sum_sketch,
        )

    __call__ = capture


class HookedCapture(FactorisedCapture):
    """Per-sequence rows of any sketch kind from the same hooks, one layer at a time.

    Where :class:`FactorisedCapture` never forms a per-sequence gradient, this class forms each
    layer's per-sequence gradients inside the layer's backward hook and sketches them at once
    with the run's sketcher (``countsketch``, ``gaussian``, ``rademacher``, ``kronecker``,
    grouped specs of these):

    * ``nn.Linear`` / ``Conv1D`` weights: ``G_i = sum_t delta_t x_t^T`` for a block of the
      weight's rows and every sequence at a time (one batched matmul, at most ``chunk_bytes``
      of gradients at once); under ``kronecker`` the (scaled) ``G_i`` is sketched as
      ``A G_i B^T`` with the parameter's factors, generated once per capture object;
    * ``nn.Embedding`` weights: only the rows of the tokens present are nonzero, so each token
      ``v``'s rows ``[n, dim]`` are the slice at offset ``v * dim``, all of them sketched at
      once (:meth:`sketch.base.Sketcher.sketch_slices`); under
      ``kronecker`` that slice is row ``v`` of the matrix, ``A[:, v] (B r)^T``, so the present
      tokens' (scaled) rows ``r`` are projected by ``B`` and combined with their columns of
      ``A`` in two products instead of one slice sketch (and one ``B``) per token;
    * biases and other parameters: as in :class:`FactorisedCapture` (exact vectors).

    The ``kronecker`` kind is here for the ``adam`` geometry: the elementwise ``sqrt(P)`` of a
    row does not factor through ``A delta_t`` and ``B x_t``, so :class:`FactorisedCapture`
    cannot carry it, while the formed ``G_i`` can be scaled before it is sketched.

    One batched forward and backward (down to the embedding outputs) give every sequence's row,
    as in :class:`FactorisedCapture`; the per-sequence weight products take the place of the
    backward's own weight-gradient products.  Rows equal the sketch of the exact per-sequence
    gradients (:func:`clients.capture.capture_sketches`) to float rounding.  Padded tokens are
    dropped.  ``row_scale`` (``{name: sqrt(P)}``, :mod:`clients.geometry`) scales every row
    elementwise before it is sketched (``adam`` geometry).

    Parameters as :class:`FactorisedCapture`, with ``sketch`` (a spec mapping or
    :class:`sketch.spec.SketchSpec`) in place of ``dim`` and ``seed``.
    """

    def __init__(
        self,
        model: nn.Module,
        sketch: Mapping[str, Any] | SketchSpec,
        *,
        parameter_filter: ParameterFilter | None = None,
        non_matrix: NonMatrix = "sketch",
        strict: bool = False,
        use_eval_mode: bool = True,
        temperature: float = 1.0,
        chunk_bytes: int = 1 << 24,
    ) -> None:
        self._plan_hooks(model, parameter_filter, non_matrix, strict, use_eval_mode, temperature)
        self.sketch_spec = (
            sketch if isinstance(sketch, SketchSpec) else SketchSpec.from_dict(sketch)
        )
        self.sketcher = build_sketcher(self.sketch_spec, self.parameters)
        self.chunk_bytes = int(chunk_bytes)
        self._row_scale: Mapping[str, torch.Tensor] | None = None
        self._kronecker_weights = self._kronecker_factors()

    def _kronecker_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, slice]]:
        """``{name: (A, B, columns)}`` of every hooked matrix weight under a ``kronecker``
        sketch (grouped or not): its factors and the output columns of its group.  Generating
        them costs about as much as one sketch of the weight, so they are made once here
        instead of in every hook call (``k_out x out + k_in x in`` floats per weight)."""
        sketcher = self.sketcher
        if sketcher.kind != SketchKind.KRONECKER:
            return {}
        device = next(iter(self.model.parameters())).device
        factors: dict[str, tuple[torch.Tensor, torch.Tensor, slice]] = {}
        for _, kind, own in self._plan:
            name = own.get("weight")
            if kind not in ("linear", "conv1d", "embedding") or name is None or name in factors:
                continue
            if isinstance(sketcher, GroupedSketcher):
                group = sketcher.route(name)
                sub, columns = sketcher.sketchers[group], sketcher.group_slices()[group]
            else:
                sub, columns = sketcher, slice(0, sketcher.dim)
            assert isinstance(sub, KroneckerSketch)
            a, b = sub.factors(name, device)
            factors[name] = (a, b, columns)
        return factors

    @property
    def spec(self) -> dict[str, Any]:
        return self.sketch_spec.to_dict()

    def capture(
        self,
        batch: SequenceBatch,
        token_coefficients: torch.Tensor | None = None,
        entropy_coefficients: torch.Tensor | None = None,
        row_scale: Mapping[str, torch.Tensor] | None = None,
        *,
        directions: EntropyDirections | None = None,
        router_coefficient: float = 0.0,
        entropy_sum_rows: bool = False,
    ) -> FactorisedSketches:
        """:meth:`FactorisedCapture.capture` with the run's sketch; ``row_scale`` ``{name:
        sqrt(P)}`` (one entry per captured parameter) gives ``adam``-geometry rows (the
        ``directions`` stay unscaled)."""
        if row_scale is not None and set(row_scale) != set(self.parameters):
            raise KeyError("row_scale must have one entry per captured parameter")
        self._row_scale = row_scale
        try:
            return super().capture(
                batch,
                token_coefficients,
                entropy_coefficients,
                directions=directions,
                router_coefficient=router_coefficient,
                entropy_sum_rows=entropy_sum_rows,
            )
        finally:
            self._row_scale = None

    __call__ = capture

    def _scale_of(self, name: str, span: tuple[int, int] | None = None) -> torch.Tensor | None:
        """Parameter ``name``'s ``sqrt(P)``, flat, or its flat entries ``span = (start, stop)``
        alone (a lazy ``row_scale``, :class:`clients.geometry.OnAccess`, computes just those);
        None without a row scale."""
        scale = self._row_scale
        if scale is None:
            return None
        if span is None:
            return scale[name].reshape(-1)
        if isinstance(scale, OnAccess):
            return scale.flat_range(name, *span)
        return scale[name].reshape(-1)[span[0] : span[1]]

    @staticmethod
    def _scaled(scale: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
        """``[c, d]`` rows of a parameter times its ``sqrt(P)`` there (``scale`` ``[d]``), in
        place (the hooks own the rows they form: a block of a large weight's per-sequence
        gradients is not allocated twice)."""
        if scale is None:
            return rows
        return rows.mul_(scale.to(device=rows.device, dtype=rows.dtype))

    def _sketched(
        self, name: str, rows: torch.Tensor, scale: torch.Tensor | None, offset: int = 0
    ) -> torch.Tensor:
        """The run's sketch of ``[c, d]`` rows at flat ``offset`` of a parameter, times its
        ``sqrt(P)`` there (``scale`` ``[d]``; CountSketch folds the factor into its scatter,
        other kinds scale the rows in place, which the hooks own)."""
        if scale is None:
            return self.sketcher.sketch_slice(name, rows, offset)
        return self.sketcher.sketch_scaled_slice(name, rows, scale, offset)

    def _add_sketch(
        self, acc: _Accumulator, name: str, part: torch.Tensor, columns: slice = slice(None)
    ) -> None:
        """Add ``[n, *]`` sketch ``part`` of parameter ``name`` (into ``columns``)."""
        rows = acc.sketched.get(name)
        if rows is None and part.shape[1] == self.sketcher.dim:
            acc.sketched[name] = part  # the first block of a weight: fresh from its sketch
            return
        if rows is None:
            n = acc.token_mask.shape[0]
            rows = acc.sketched[name] = torch.zeros(n, self.sketcher.dim, device=part.device)
        rows[:, columns] += part

    def _linear(self, own: Mapping[str, str], transposed: bool, acc: _Accumulator) -> Callable:
        def on_grad(x: torch.Tensor, grad: torch.Tensor) -> None:
            n = acc.token_mask.shape[0]
            xs, ds = _tokens(x, n), _tokens(grad, n)
            mask = acc.padding(xs.shape[1])
            if mask is not None:
                keep = mask.unsqueeze(-1)
                zero = torch.zeros((), dtype=xs.dtype)
                xs, ds = torch.where(keep, xs, zero), torch.where(keep, ds, zero)
            if "weight" in own:
                self._weight_rows(acc, own["weight"], *((xs, ds) if transposed else (ds, xs)))
            if "bias" in own:
                acc.add_vector(own["bias"], ds.sum(dim=1))

        return on_grad

    def _weight_rows(
        self, acc: _Accumulator, name: str, left: torch.Tensor, right: torch.Tensor
    ) -> None:
        """Sketch every sequence's ``G_i = sum_t left_t right_t^T`` (``left`` ``[n, T, rows]``,
        ``right`` ``[n, T, cols]``: the weight's declared layout, ``[out, in]`` for ``Linear``
        from ``delta`` and ``x``, ``[in, out]`` for ``Conv1D`` from ``x`` and ``delta``).

        A block of the weight's rows at a time for all ``n`` sequences (``n x rows_b x cols``
        floats, at most ``chunk_bytes`` or one row): the block is the flat slice at offset
        ``r0 * cols`` of every row, so it is scaled and sketched as ``[n, rows_b * cols]``.
        Blocks of rows
        rather than of sequences: a large weight (an LM head, an MLP projection) would leave a
        chunk of one or two sequences, which the CountSketch scatter runs on one thread and
        without its four-row sweeps (``bench/capture.py --qwen2 100M``: 16 sequences' count-
        sketched Adam rows took 4.1 s with chunks of sequences and a scaling pass, 2.4 s with
        blocks of rows and the scale folded into the scatter).
        Under ``kronecker``, ``A[:, block] G_i[block]`` is accumulated over the blocks and
        multiplied by ``B^T`` once (``A`` first: ``k_out <= k_in``)."""
        n, _, rows = left.shape
        cols = right.shape[-1]
        step = max(1, self.chunk_bytes // (n * cols * 4))
        factors = self._kronecker_weights.get(name)
        mid = None
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            g = torch.bmm(left[:, :, r0:r1].transpose(1, 2), right)  # [n, r1 - r0, cols]
            acc.add_direction(name, acc.weighted(g.view(n, -1)), r0 * cols)  # before scaling
            scale = self._scale_of(name, (r0 * cols, r1 * cols))
            if factors is None:
                self._add_sketch(acc, name, self._sketched(name, g.view(n, -1), scale, r0 * cols))
                continue
            flat = self._scaled(scale, g.view(n, -1))
            part = torch.matmul(factors[0][:, r0:r1], flat.view_as(g))  # [n, k_out, cols]
            mid = part if mid is None else mid.add_(part)
        if factors is not None and mid is not None:
            _, b, columns = factors
            # laid out row-major as KroneckerSketch does: entry (a, b) at a * k_in + b
            self._add_sketch(acc, name, torch.matmul(mid, b.T).reshape(n, -1), columns)

    def _embedding(
        self, module: nn.Embedding, own: Mapping[str, str], acc: _Accumulator
    ) -> Callable:
        name = own["weight"]
        dim = int(module.embedding_dim)

        def on_grad(ids: torch.Tensor, grad: torch.Tensor) -> None:
            ids, ds, keep = _embedding_tokens(
                module, acc, ids, grad, self._lookup_scales.get(id(module), 1.0)
            )
            n = ids.shape[0]
            rows = torch.arange(n, device=ids.device).unsqueeze(1).expand_as(ids)[keep]
            tokens, slot = torch.unique(ids[keep], return_inverse=True)
            # per sequence and token present: that row of the per-sequence gradient
            blocks = torch.zeros(n, tokens.numel(), dim, device=ds.device)
            blocks.index_put_((rows, slot), ds[keep], accumulate=True)
            acc.add_direction_rows(name, tokens, acc.weighted(blocks))
            scale = self._scale_of(name)
            rows_scale = None
            if scale is not None:
                rows_scale = scale.reshape(-1, dim)[tokens.to(scale.device)].to(blocks.device)
            if name in self._kronecker_weights:
                # token v's rows are row v of the [num, dim] matrix: A[:, v] (B r_v)^T, summed
                a, b, columns = self._kronecker_weights[name]
                if rows_scale is not None:
                    blocks = blocks * rows_scale
                core = torch.einsum("ot,ntk->nok", a[:, tokens], torch.matmul(blocks, b.T))
                self._add_sketch(acc, name, core.reshape(n, -1), columns)
                return
            offsets = [token * dim for token in tokens.tolist()]
            part = self.sketcher.sketch_slices(name, blocks, offsets, rows_scale)
            self._add_sketch(acc, name, part)

        return on_grad

    def _sequence_scales(self, own: Mapping[str, str]) -> dict[str, torch.Tensor | None]:
        # once per module call, not per sequence: a lazy row scale computes sqrt(P) on access
        return {name: self._scale_of(name) for name in own.values()}

    def _add_block(
        self,
        acc: _Accumulator,
        name: str,
        index: torch.Tensor,
        flat: torch.Tensor,
        scale: torch.Tensor | None,
    ) -> None:
        """Sketch a block of sequences' gradients at once: a MoE layer's experts are most of a
        model's parameters, which ``n`` rows of would not fit."""
        part = self._sketched(name, flat, scale)
        total = acc.sketched.get(name)
        if total is None:
            n = acc.token_mask.shape[0]
            total = acc.sketched[name] = torch.zeros(n, self.sketcher.dim, device=part.device)
        total[index.to(total.device)] += part.to(total.device)

    def _rows(self, acc: _Accumulator, n: int, device: torch.device) -> torch.Tensor:
        out = torch.zeros(n, self.sketcher.dim, dtype=torch.float32, device=device)
        for name in sorted(set(acc.sketched) | set(acc.vectors)):
            if name in acc.sketched:
                out = out + acc.sketched[name].to(device)
            if name in acc.vectors:
                rows = acc.vectors[name].clone()
                out = out + self._sketched(name, rows, self._scale_of(name)).to(device)
        return out
