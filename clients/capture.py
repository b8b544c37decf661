"""Exact per-sequence score gradients of a causal language model (math.md §1).

For sequence ``i`` = prompt tokens followed by response tokens,

    S_i = sum over response positions t of log pi(x_t | x_<t),     w_i = dS_i / dtheta,

the sum of the response tokens' log-probs only (the prompt conditions them but its own
log-probs are not in ``S_i``; padding is neither conditioned on nor counted).

Two ways to get every ``w_i``:

* ``vmap``: ``torch.func.vmap(grad(S))`` over the sequences with ``functional_call``, in
  chunks of ``chunk_size`` sequences (one vectorised forward/backward per chunk);
* ``loop``: one forward/backward per sequence, each trimmed to its own length.

``vmap`` is tried first; if the model cannot be vmapped (data-dependent control flow,
``.item()``, random ops) the capture falls back to the loop and says so with a warning.
Under ``vmap`` no attention mask is passed: with right padding and a causal model the padded
positions come after every real token, so they cannot change a real token's logits, and the
loss ignores them (batches are always re-packed to right padding, see :class:`SequenceBatch`).

The gradients come back as named tensors ``{param_name: [n, *shape]}`` (float32), ready for
``Client.push_gradients``.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from clients.filters import ParameterFilter, select_parameters
from clients.shards import resharded
from sketch.base import Sketcher

Method = Literal["auto", "vmap", "loop"]


class UnsplittableBatchError(ValueError):
    """A batch with model inputs of its own (:attr:`SequenceBatch.model_inputs`) was to be
    split into sequences or joined with another: only a model knows which of those inputs'
    rows are a sequence's."""


@dataclass(frozen=True)
class SequenceBatch:
    """A right-padded batch of ``n`` (prompt, response) sequences.

    Attributes
    ----------
    input_ids:
        ``[n, L]`` int64 token ids, real tokens first, padding after them.
    attention_mask:
        ``[n, L]`` int64, 1 on real tokens (prompt and response), 0 on padding.
    response_mask:
        ``[n, L]`` bool, True at the positions whose token's log-prob is in ``S_i``
        (the response tokens); always False at position 0 and on padding.
    model_inputs:
        the model's other inputs for the whole batch, passed to every forward of it by name:
        a vision-language model's ``pixel_values``, ``image_grid_thw``, ``mm_token_type_ids``
        (``[n, L]`` ones laid out like ``input_ids``) ...  Their rows are not the sequences'
        (a model's patches or images, in its own layout), so a batch that has them is never
        split or joined (:class:`UnsplittableBatchError`); empty for a text model.
    position_offsets:
        ``[n]`` int64 or None: each sequence's first position id, its tokens at ``offset, offset
        + 1, ...`` (:meth:`positions`).  None: the model's own positions (``0, 1, ...`` for
        right-padded rows).  A trainer that runs the model on left-padded rows without position
        ids (TRL) gives a model with absolute position embeddings (GPT-2) positions shifted by
        the padding: these offsets reproduce them.  Not with ``model_inputs``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    model_inputs: Mapping[str, torch.Tensor] = field(default_factory=dict)
    position_offsets: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [n, L], got {tuple(self.input_ids.shape)}")
        shape = self.input_ids.shape
        if self.attention_mask.shape != shape or self.response_mask.shape != shape:
            raise ValueError("input_ids, attention_mask and response_mask must have one shape")
        mask = self.attention_mask
        if bool((mask[:, 1:] > mask[:, :-1]).any()):
            raise ValueError(
                "the batch is not right-padded (a real token after padding): build it with "
                "SequenceBatch.from_padded, which re-packs any padding"
            )
        if bool(self.response_mask[:, 0].any()):
            raise ValueError("the first token of a sequence cannot be a response token")
        if bool((self.response_mask & ~self.attention_mask.bool()).any()):
            raise ValueError("response_mask marks padded positions")
        if self.position_offsets is not None:
            if tuple(self.position_offsets.shape) != (shape[0],):
                raise ValueError(
                    f"position_offsets must be [n] = [{shape[0]}], "
                    f"got {tuple(self.position_offsets.shape)}"
                )
            if self.model_inputs:
                raise ValueError("position_offsets cannot go with model inputs of its own")

    def positions(self) -> torch.Tensor | None:
        """``[n, L]`` int64 position ids ``offset_i + t``, or None without offsets."""
        if self.position_offsets is None:
            return None
        width = self.input_ids.shape[1]
        steps = torch.arange(width, device=self.input_ids.device)
        return self.position_offsets.to(self.input_ids.device)[:, None] + steps

    @property
    def size(self) -> int:
        """The number of sequences ``n``."""
        return int(self.input_ids.shape[0])

    @property
    def lengths(self) -> torch.Tensor:
        """``[n]`` int64: real tokens per sequence (prompt + response)."""
        return self.attention_mask.sum(dim=1)

    @property
    def num_tokens(self) -> torch.Tensor:
        """``[n]`` int64: response tokens per sequence (``num_tokens`` of the API)."""
        return self.response_mask.sum(dim=1)

    def to(self, device: torch.device | str) -> SequenceBatch:
        """The same batch on ``device``."""
        return SequenceBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.response_mask.to(device),
            {k: v.to(device) for k, v in self.model_inputs.items()},
            None if self.position_offsets is None else self.position_offsets.to(device),
        )

    def _check_splittable(self, what: str) -> None:
        if self.model_inputs:
            raise UnsplittableBatchError(
                f"cannot {what} a batch with model inputs of its own "
                f"({', '.join(sorted(self.model_inputs))}): their rows are not its sequences"
            )

    def select(self, rows: slice | Sequence[int] | torch.Tensor) -> SequenceBatch:
        """A sub-batch of the given rows (padding columns kept)."""
        self._check_splittable("split")
        offsets = self.position_offsets
        return SequenceBatch(
            self.input_ids[rows],
            self.attention_mask[rows],
            self.response_mask[rows],
            position_offsets=None if offsets is None else offsets[rows],
        )

    def trimmed(self) -> SequenceBatch:
        """The same rows without the padding columns they all share at the end (a sub-batch
        of short sequences, selected from a batch as wide as its longest one)."""
        self._check_splittable("trim")
        width = int(self.lengths.max()) if self.size else 0
        return SequenceBatch(
            self.input_ids[:, :width],
            self.attention_mask[:, :width],
            self.response_mask[:, :width],
            position_offsets=self.position_offsets,
        )

    @classmethod
    def concat(cls, batches: Sequence[SequenceBatch]) -> SequenceBatch:
        """The rows of ``batches`` in order, right-padded to the widest (token 0)."""
        if not batches:
            raise ValueError("need at least one batch")
        for b in batches:
            b._check_splittable("join")
        width = max(int(b.input_ids.shape[1]) for b in batches)

        def padded(t: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.pad(t, (0, width - int(t.shape[1])))

        offsets = None
        if any(b.position_offsets is not None for b in batches):
            offsets = torch.cat(
                [
                    torch.zeros(b.size, dtype=torch.long, device=b.input_ids.device)
                    if b.position_offsets is None
                    else b.position_offsets
                    for b in batches
                ]
            )
        return cls(
            torch.cat([padded(b.input_ids) for b in batches]),
            torch.cat([padded(b.attention_mask) for b in batches]),
            torch.cat([padded(b.response_mask) for b in batches]),
            position_offsets=offsets,
        )

    @classmethod
    def from_pairs(
        cls,
        prompts: Sequence[torch.Tensor | Sequence[int]],
        responses: Sequence[torch.Tensor | Sequence[int]],
        pad_token_id: int = 0,
    ) -> SequenceBatch:
        """Right-pad ``prompts[i] + responses[i]`` (1-D token ids) into one batch."""
        if len(prompts) != len(responses) or not prompts:
            raise ValueError("need as many prompts as responses, at least one")
        rows = []
        for prompt, response in zip(prompts, responses, strict=True):
            p = torch.as_tensor(prompt, dtype=torch.long).reshape(-1)
            r = torch.as_tensor(response, dtype=torch.long).reshape(-1)
            if p.numel() == 0:
                raise ValueError("every prompt needs at least one token (e.g. BOS)")
            rows.append((p, r))
        width = max(p.numel() + r.numel() for p, r in rows)
        n = len(rows)
        input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
        attention = torch.zeros((n, width), dtype=torch.long)
        response_mask = torch.zeros((n, width), dtype=torch.bool)
        for i, (p, r) in enumerate(rows):
            lp, lr = p.numel(), r.numel()
            input_ids[i, :lp] = p
            input_ids[i, lp : lp + lr] = r
            attention[i, : lp + lr] = 1
            response_mask[i, lp : lp + lr] = True
        return cls(input_ids, attention, response_mask)

    @classmethod
    def from_padded(
        cls,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        response_mask: torch.Tensor,
    ) -> SequenceBatch:
        """Re-pack an arbitrarily padded batch (left, right or mixed) to right padding.

        ``response_mask`` marks response tokens in the input layout; the real tokens of each
        row keep their order.
        """
        real = attention_mask.bool()
        return cls(
            repack(input_ids.long(), real),
            repack(real.long(), real),
            repack(response_mask.bool() & real, real),
        )


def repack(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``values`` ``[n, L]`` laid out as :meth:`SequenceBatch.from_padded` lays out the tokens
    of a batch with this ``attention_mask``: each row's real positions first, in their order
    (e.g. per-token coefficients that follow their tokens)."""
    # Stable sort moves real tokens to the front, in their order: right padding.
    order = torch.sort((~attention_mask.bool()).to(torch.int8), dim=1, stable=True).indices
    return torch.gather(values, 1, order)


def logits_of(output: Any) -> torch.Tensor:
    """The ``[n, L, V]`` logits of a model output (a tensor or an object with ``.logits``)."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, (tuple, list)):
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        raise TypeError("the model output has no logits")
    return logits


def response_window(response_mask: torch.Tensor) -> int:
    """How many trailing positions' logits a batch's response log-probs need: from the
    position before its earliest response token to the end (what TRL passes as
    ``logits_to_keep``); the whole width ``L`` when no row has a response token."""
    width = int(response_mask.shape[1])
    columns = torch.nonzero(response_mask.any(dim=0)).flatten()
    if columns.numel() == 0:
        return width
    return width - max(0, int(columns[0]) - 1)


def takes_logits_to_keep(model: nn.Module) -> bool:
    """Whether ``model``'s forward (or, for a PEFT wrapper, its base model's) names
    ``logits_to_keep``: transformers' causal LMs then run the LM head on the kept positions
    alone, and the prompt positions cost no LM-head product or softmax over the vocabulary."""
    base = model
    unwrap = getattr(model, "get_base_model", None)
    if callable(unwrap):
        base = unwrap()
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def forward_logits(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    logits_to_keep: int = 0,
    position_ids: torch.Tensor | None = None,
    model_inputs: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``model(input_ids, attention_mask)`` logits ``[n, L, V]``; no KV cache for HF models;
    ``position_ids`` and ``model_inputs`` (:attr:`SequenceBatch.model_inputs`) passed on when
    given.

    ``logits_to_keep`` ``> 0``: the last ``logits_to_keep`` positions' logits only (``[n,
    logits_to_keep, V]``), computed alone where the model supports it
    (:func:`takes_logits_to_keep`) and sliced otherwise; :func:`response_logprobs` and
    :func:`response_entropy_sums` take such logits (:func:`response_window`)."""
    return forward_outputs(
        model,
        input_ids,
        attention_mask,
        logits_to_keep=logits_to_keep,
        position_ids=position_ids,
        model_inputs=model_inputs,
    )[0]


def forward_outputs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    logits_to_keep: int = 0,
    position_ids: torch.Tensor | None = None,
    router_loss: bool = False,
    model_inputs: Mapping[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`forward_logits` and, with ``router_loss``, the scalar load-balancing loss of a
    mixture-of-experts model over the batch's real tokens (transformers' ``aux_loss`` with
    ``output_router_logits=True``: what TRL adds to its loss), in the forward's graph."""
    kwargs: dict[str, Any] = dict(model_inputs or {})
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if hasattr(model, "config"):  # transformers: a cache is useless here and breaks vmap
        kwargs["use_cache"] = False
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    if 0 < logits_to_keep < input_ids.shape[1] and takes_logits_to_keep(model):
        kwargs["logits_to_keep"] = logits_to_keep
    if router_loss:
        kwargs["output_router_logits"] = True
    output = model(input_ids, **kwargs)
    logits = logits_of(output)
    if 0 < logits_to_keep < logits.shape[1]:
        logits = logits[:, -logits_to_keep:]
    aux = None
    if router_loss:
        aux = getattr(output, "aux_loss", None)
        if not isinstance(aux, torch.Tensor):
            raise TypeError(
                f"{type(model).__name__} returned no aux_loss with output_router_logits=True: "
                "it has no router loss to capture"
            )
    return logits, aux


def _logits_offset(logits: torch.Tensor, response_mask: torch.Tensor) -> int:
    """How many leading positions ``logits`` lack (0, or ``L - L'`` when they hold the last
    ``L'`` positions alone: ``logits_to_keep``); ``ValueError`` when a response token's
    log-prob would need a logit that was not kept."""
    offset = int(response_mask.shape[1]) - int(logits.shape[1])
    if offset < 0 or (offset > 0 and bool(response_mask[:, : offset + 1].any())):
        raise ValueError(
            f"logits of {logits.shape[1]} positions do not reach every response token of a "
            f"batch of width {response_mask.shape[1]} (see response_window)"
        )
    return offset


def response_logprobs(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    response_mask: torch.Tensor,
    weights: torch.Tensor | None = None,
    temperature: float = 1.0,
    entropy_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """``S_i = sum_t log softmax(logits[i, t-1] / T)[input_ids[i, t]]`` over response positions.

    ``logits`` ``[n, L, V]``, ``input_ids`` ``[n, L]``, ``response_mask`` ``[n, L]`` bool.
    ``weights`` ``[n, L]`` float (optional): ``sum_t weights[i, t] log pi(input_ids[i, t] |
    ...)`` instead, whose gradient is the update row ``u_i`` when the weights are the loss's
    token coefficients ``c_{i,t} = -dL/d log pi_{i,t}`` (math.md §4 "Update rows").
    ``entropy_weights`` ``[n, L]`` float (optional) adds ``sum_t entropy_weights[i, t] H_t``,
    ``H_t`` the full next-token entropy of the distribution that drew ``input_ids[i, t]``: the
    term an entropy bonus puts in the update row (``e_{i,t} = -dL/dH_{i,t}``).
    ``temperature`` ``T``: the tempered policy a trainer samples from and trains (TRL divides
    its logits by ``T``); 1 is the model's own softmax.
    Returns ``[n]`` float32.  Masked positions are removed with ``where`` (not a product), so
    a non-finite logit on a padded position cannot leak into ``S_i`` or its gradient.
    ``logits`` may hold the last ``L' < L`` positions alone (``logits_to_keep``,
    :func:`response_window`): the other arguments are cut to them.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    offset = _logits_offset(logits, response_mask)
    if offset:
        input_ids, response_mask = input_ids[:, offset:], response_mask[:, offset:]
        weights = None if weights is None else weights[:, offset:]
        entropy_weights = None if entropy_weights is None else entropy_weights[:, offset:]
    scaled = logits[:, :-1].float()
    logp = torch.log_softmax(scaled / temperature if temperature != 1.0 else scaled, dim=-1)
    token_logp = logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    mask = response_mask[:, 1:]
    zeros = torch.zeros_like(token_logp)
    if weights is not None:  # padded weights may hold anything: zero them before the product
        token_logp = token_logp * torch.where(mask, weights[:, 1:].float(), zeros)
    if entropy_weights is not None:
        entropy = -(logp.exp() * logp).sum(dim=-1)
        token_logp = token_logp + entropy * torch.where(mask, entropy_weights[:, 1:].float(), zeros)
    return torch.where(mask, token_logp, zeros).sum(dim=-1)


@contextlib.contextmanager
def eval_mode(
    model: nn.Module, enabled: bool = True, *, training: Sequence[nn.Module] = ()
) -> Iterator[None]:
    """Switch dropout & co. off for the block (the score function of the deterministic policy).

    ``training``: modules that stay in training mode themselves, their children not (the
    layers that checkpoint their activations, :func:`checkpointing_layers`, so that they
    checkpoint in the block too)."""
    if not enabled:
        yield
        return
    modes = {m: m.training for m in model.modules()}
    model.eval()
    for layer in training:
        layer.training = True
    try:
        yield
    finally:
        for module, mode in modes.items():
            module.training = mode


def checkpointing_layers(model: nn.Module) -> list[nn.Module]:
    """The layers of ``model`` that checkpoint their activations in training: transformers'
    ``GradientCheckpointingLayer`` modules with gradient checkpointing on (``Trainer`` turns it
    on with ``gradient_checkpointing``, TRL's default), non-reentrant (transformers' default
    from 5.0).  Such a layer keeps only its input for the backward and runs its forward again
    there.  Reentrant checkpointing (``use_reentrant=True``; TRL forces it for PEFT under ZeRO
    3) cannot differentiate with ``torch.autograd.grad``, which the capture uses: those
    layers are left out, and a capture then keeps their activations as without
    checkpointing."""
    if "transformers" not in sys.modules:  # then no layer is one of its (importing it is slow)
        return []
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:
        return []
    layers: list[nn.Module] = []
    for module in model.modules():
        if not isinstance(module, GradientCheckpointingLayer) or not module.gradient_checkpointing:
            continue
        function = getattr(module, "_gradient_checkpointing_func", None)
        keywords = getattr(function, "keywords", None) or {}
        if keywords.get("use_reentrant") is False:
            layers.append(module)
    return layers


def response_window_logits(model: nn.Module, batch: SequenceBatch) -> torch.Tensor:
    """The logits of the positions ``batch``'s response log-probs need (:func:`response_window`),
    from one forward of the whole batch with its model inputs."""
    return forward_logits(
        model,
        batch.input_ids,
        batch.attention_mask,
        logits_to_keep=response_window(batch.response_mask),
        position_ids=batch.positions(),
        model_inputs=batch.model_inputs,
    )


def sequence_logprobs(
    model: nn.Module,
    batch: SequenceBatch,
    *,
    use_eval_mode: bool = True,
    temperature: float = 1.0,
) -> torch.Tensor:
    """``[n]`` float32 ``S_i`` of every sequence, without gradients (e.g. ``logprob_after``)."""
    with torch.no_grad(), eval_mode(model, use_eval_mode), resharded(model):
        logits = response_window_logits(model, batch)
        return response_logprobs(
            logits, batch.input_ids, batch.response_mask, temperature=temperature
        )


def response_entropy_sums(
    logits: torch.Tensor,
    response_mask: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """``sum_t H_t`` over each sequence's response positions, ``H_t`` the entropy of the full
    (tempered) next-token distribution that drew its token ``t``: ``[n]`` float32.

    ``logits`` ``[n, L, V]``, ``response_mask`` ``[n, L]`` bool, as in
    :func:`response_logprobs` (also for the last positions' logits alone).  Its mean over a
    batch's tokens is the entropy TRL logs, and its expectation is the sequence entropy
    (math.md §8).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    response_mask = response_mask[:, _logits_offset(logits, response_mask) :]
    scaled = logits[:, :-1].float()
    logp = torch.log_softmax(scaled / temperature if temperature != 1.0 else scaled, dim=-1)
    entropy = -(logp.exp() * logp).sum(dim=-1)
    mask = response_mask[:, 1:]
    return torch.where(mask, entropy, torch.zeros_like(entropy)).sum(dim=-1)


def sequence_logprobs_and_entropy_sums(
    model: nn.Module,
    batch: SequenceBatch,
    *,
    use_eval_mode: bool = True,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S_i, sum_t H_t)`` of every sequence from one forward without gradients: two ``[n]``
    float32 tensors (``logprob_after`` and ``entropy_sum_after``, or ``entropy_sum``)."""
    with torch.no_grad(), eval_mode(model, use_eval_mode), resharded(model):
        logits = response_window_logits(model, batch)
        logprobs = response_logprobs(
            logits, batch.input_ids, batch.response_mask, temperature=temperature
        )
        return logprobs, response_entropy_sums(logits, batch.response_mask, temperature)


@dataclass
class CapturedGradients:
    """Per-sequence score gradients.

    Attributes
    ----------
    logprobs:
        ``[n]`` float32 ``S_i`` (detached).
    gradients:
        ``{param_name: [n, *shape]}`` float32, ``w_i`` restricted to the selected parameters.
    num_tokens:
        ``[n]`` int64 response lengths.
    method:
        ``"vmap"`` or ``"loop"``: what actually ran.
    """

    logprobs: torch.Tensor
    gradients: dict[str, torch.Tensor]
    num_tokens: torch.Tensor
    method: str

    def flat(self) -> torch.Tensor:
        """``[n, N]``: the rows ``w_i`` with parameters concatenated in ``gradients`` order."""
        n = self.logprobs.shape[0]
        return torch.cat([g.reshape(n, -1) for g in self.gradients.values()], dim=1)

    @property
    def parameters(self) -> dict[str, list[int]]:
        """``{name: shape}`` of the captured parameters (``create_run``'s ``parameters``)."""
        return {k: list(v.shape[1:]) for k, v in self.gradients.items()}


#: the names of the hooks that make the input embeddings' output require grad: transformers'
#: ``enable_input_require_grads`` and the copies of it in TRL's and others' code
_INPUT_GRAD_HOOKS = frozenset({"make_inputs_require_grads", "make_inputs_require_grad"})


@contextlib.contextmanager
def without_input_grad_hooks(model: nn.Module) -> Iterator[None]:
    """transformers' ``enable_input_require_grads`` (gradient checkpointing, adapters; TRL turns
    it on, sometimes more than once, and some trainers register a copy of it) hooks the input
    embeddings to call ``requires_grad_`` on their output, which a functorch transform refuses
    (the vmap capture, the token shares' forward-mode passes).  The hook only matters for a
    backward through reentrant checkpoints, so its registrations are lifted for the transform
    and put back after (``disable_input_require_grads`` would remove only the last one).  Before
    2026-12-07 every TRL run (``gradient_checkpointing=True`` by default) fell back from vmap to
    the per-sequence loop."""
    lifted: list[tuple[dict[int, Callable[..., object]], int, Callable[..., object]]] = []
    for module in model.modules():
        hooks = module._forward_hooks
        for key, hook in list(hooks.items()):
            if getattr(hook, "__name__", "") in _INPUT_GRAD_HOOKS:
                lifted.append((hooks, key, hook))
                del hooks[key]
    try:
        yield
    finally:
        for hooks, key, hook in lifted:
            hooks[key] = hook


def _vmap_chunk(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    batch: SequenceBatch,
    weights: torch.Tensor,
    temperature: float,
    entropy_weights: torch.Tensor | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    from torch.func import functional_call, grad_and_value, vmap

    def score(
        p: dict[str, torch.Tensor],
        ids: torch.Tensor,
        rmask: torch.Tensor,
        w: torch.Tensor,
        *e: torch.Tensor,
    ) -> torch.Tensor:
        logits = logits_of(
            functional_call(model, p, (ids.unsqueeze(0),), {"use_cache": False})
            if hasattr(model, "config")
            else functional_call(model, p, (ids.unsqueeze(0),))
        )
        return response_logprobs(
            logits,
            ids.unsqueeze(0),
            rmask.unsqueeze(0),
            w.unsqueeze(0),
            temperature,
            e[0].unsqueeze(0) if e else None,
        )[0]

    detached = {k: v.detach() for k, v in params.items()}
    mapped = [batch.input_ids, batch.response_mask, weights]
    if entropy_weights is not None:
        mapped.append(entropy_weights)
    with without_input_grad_hooks(model):
        grads, values = vmap(grad_and_value(score), in_dims=(None, *[0] * len(mapped)))(
            detached, *mapped
        )
    return values.detach(), {k: g.detach().float() for k, g in grads.items()}


def _loop_chunk(
    model: nn.Module,
    params: Mapping[str, nn.Parameter],
    batch: SequenceBatch,
    weights: torch.Tensor,
    temperature: float,
    entropy_weights: torch.Tensor | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    names = list(params)
    tensors = [params[k] for k in names]
    values = []
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in names}
    positions = batch.positions()
    for i in range(batch.size):
        length = int(batch.attention_mask[i].sum())
        ids = batch.input_ids[i : i + 1, :length]
        logits = forward_logits(
            model, ids, position_ids=None if positions is None else positions[i : i + 1, :length]
        )
        s = response_logprobs(
            logits,
            ids,
            batch.response_mask[i : i + 1, :length],
            weights[i : i + 1, :length],
            temperature,
            None if entropy_weights is None else entropy_weights[i : i + 1, :length],
        )[0]
        grads = torch.autograd.grad(s, tensors, allow_unused=True)
        values.append(s.detach())
        for name, t, g in zip(names, tensors, grads, strict=True):
            rows[name].append(torch.zeros_like(t) if g is None else g.detach())
    return torch.stack(values), {k: torch.stack(v).float() for k, v in rows.items()}


def token_layout(batch: SequenceBatch, values: torch.Tensor, what: str) -> torch.Tensor:
    """``values`` as ``[n, L]`` float32 on the batch's device; ``ValueError`` naming ``what``
    unless laid out like ``batch.input_ids``."""
    out = values.to(device=batch.input_ids.device, dtype=torch.float32)
    if out.shape != batch.input_ids.shape:
        raise ValueError(
            f"{what}: shape {tuple(out.shape)}, expected {tuple(batch.input_ids.shape)} "
            "(laid out like input_ids)"
        )
    return out


def iter_captured_chunks(
    model: nn.Module,
    batch: SequenceBatch,
    *,
    parameter_filter: ParameterFilter | None = None,
    method: Method = "auto",
    chunk_size: int = 8,
    use_eval_mode: bool = True,
    token_coefficients: torch.Tensor | None = None,
    temperature: float = 1.0,
    row_scale: Mapping[str, torch.Tensor] | None = None,
    entropy_coefficients: torch.Tensor | None = None,
) -> Iterator[tuple[slice, torch.Tensor, dict[str, torch.Tensor], str]]:
    """:func:`capture_gradients` one chunk of ``chunk_size`` sequences at a time: yields
    ``(rows, logprobs [c], {name: [c, *shape]} float32, method used)``.

    Only one chunk's per-sequence gradients exist at a time (plus what the caller keeps), so
    memory is ``chunk_size x N`` floats whatever ``n``.  ``row_scale`` (``{name: sqrt(P)}``,
    the parameter's shape) multiplies every row elementwise (``adam`` geometry,
    :mod:`clients.geometry`).
    """
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    entropy = (
        None
        if entropy_coefficients is None
        else token_layout(batch, entropy_coefficients, "entropy_coefficients")
    )
    if token_coefficients is not None:
        weights = token_layout(batch, token_coefficients, "token_coefficients")
    elif entropy is not None:  # an entropy term alone
        weights = torch.zeros_like(entropy)
    else:  # score rows
        weights = batch.response_mask.float()
    params = select_parameters(model, parameter_filter)
    if row_scale is not None and set(row_scale) != set(params):
        raise KeyError("row_scale must have one entry per selected parameter")
    used: str = method
    if batch.position_offsets is not None:
        # transformers checks position ids for packed sequences with data-dependent control
        # flow, which vmap cannot run
        if method == "vmap":
            raise ValueError("vmap capture cannot take position_offsets: use the loop")
        used = "loop"
    with eval_mode(model, use_eval_mode):
        for start in range(0, batch.size, chunk_size):
            span = slice(start, min(start + chunk_size, batch.size))
            chunk, w = batch.select(span), weights[span]
            e = None if entropy is None else entropy[span]
            if used in ("auto", "vmap"):
                try:
                    s, g = _vmap_chunk(model, params, chunk, w, temperature, e)
                    used = "vmap"
                except Exception as exc:  # any vmap failure means "this model cannot be vmapped"
                    if method == "vmap":
                        raise
                    warnings.warn(
                        f"kernelscope: vmap capture failed for {type(model).__name__} "
                        f"({type(exc).__name__}: {str(exc)[:200]}); using the per-sequence loop",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                    used = "loop"
                    s, g = _loop_chunk(model, params, chunk, w, temperature, e)
            else:
                s, g = _loop_chunk(model, params, chunk, w, temperature, e)
            if row_scale is not None:
                g = {k: v * row_scale[k].to(device=v.device, dtype=v.dtype) for k, v in g.items()}
            yield span, s, g, used


def capture_gradients(
    model: nn.Module,
    batch: SequenceBatch,
    *,
    parameter_filter: ParameterFilter | None = None,
    method: Method = "auto",
    chunk_size: int = 8,
    use_eval_mode: bool = True,
    token_coefficients: torch.Tensor | None = None,
    temperature: float = 1.0,
    row_scale: Mapping[str, torch.Tensor] | None = None,
    entropy_coefficients: torch.Tensor | None = None,
) -> CapturedGradients:
    """Per-sequence score gradients ``w_i = dS_i/dtheta`` of the selected parameters, or update
    rows ``u_i`` (math.md §4 "Update rows").

    Parameters
    ----------
    model:
        a causal LM: ``model(input_ids[, attention_mask])`` returns ``[n, L, V]`` logits or an
        object with ``.logits`` (transformers).  Its parameters are not modified and no
        ``.grad`` is written.
    batch:
        the sequences, right-padded (:class:`SequenceBatch`), on the model's device.
    method:
        ``"vmap"`` (``torch.func``, chunks of ``chunk_size`` sequences), ``"loop"`` (one
        backward per sequence), or ``"auto"``: vmap, falling back to the loop with a warning
        when the model cannot be vmapped.
    use_eval_mode:
        run the model in eval mode (no dropout), restoring its modes afterwards.
    token_coefficients:
        ``[n, L]`` float, laid out like ``input_ids``: ``c_{i,t} = -dL/d log pi(input_ids[i,
        t] | ...)`` of the trainer's loss at every response position (autograd on the loss
        with the token log-probs as leaves; 0 elsewhere).  The rows are then the update rows
        ``u_i = sum_t c_{i,t} grad log pi_{i,t}``, to push with ``rows="update"``, and
        ``logprobs`` holds ``sum_t c_{i,t} log pi_{i,t}``.
    entropy_coefficients:
        ``[n, L]`` float, laid out like ``input_ids``: ``e_{i,t} = -dL/dH_{i,t}`` of a loss
        with an entropy term (an entropy bonus), ``H_{i,t}`` the full next-token entropy at the
        position that drew ``input_ids[i, t]``; the update rows then also carry ``sum_t
        e_{i,t} grad H_{i,t}`` (math.md §4 "Update rows").
    temperature:
        capture the tempered policy ``softmax(logits / T)`` that the trainer samples from and
        trains (TRL's ``temperature``); its entropy is then the one predicted.
    row_scale:
        ``{name: sqrt(P)}``: rows ``sqrt(P) w_i`` (``adam`` geometry, :mod:`clients.geometry`).

    Returns
    -------
    :class:`CapturedGradients` with ``gradients[name]`` ``[n, *param.shape]`` float32.  It holds
    all ``n x N`` floats: for large models use :func:`capture_sketches`.
    """
    values: list[torch.Tensor] = []
    parts: dict[str, list[torch.Tensor]] = {}
    used: str = method
    for _, s, g, method_used in iter_captured_chunks(
        model,
        batch,
        parameter_filter=parameter_filter,
        method=method,
        chunk_size=chunk_size,
        use_eval_mode=use_eval_mode,
        token_coefficients=token_coefficients,
        temperature=temperature,
        row_scale=row_scale,
        entropy_coefficients=entropy_coefficients,
    ):
        used = method_used
        values.append(s)
        for k, v in g.items():
            parts.setdefault(k, []).append(v)
    return CapturedGradients(
        logprobs=torch.cat(values).float(),
        gradients={k: torch.cat(v) for k, v in parts.items()},
        num_tokens=batch.num_tokens,
        method=used,
    )


@dataclass
class CapturedSketches:
    """Per-sequence sketched rows made on the trainer (:func:`capture_sketches`).

    Attributes
    ----------
    logprobs:
        ``[n]`` float32 ``S_i`` (or ``sum_t c_{i,t} log pi_{i,t}`` for update rows).
    sketch:
        ``[n, k]`` float32, ``Phi w_i`` with the run's sketch: push with
        ``Client.push_sketches``.
    num_tokens:
        ``[n]`` int64 response lengths.
    method:
        ``"vmap"`` or ``"loop"``.
    """

    logprobs: torch.Tensor
    sketch: torch.Tensor
    num_tokens: torch.Tensor
    method: str


def capture_sketches(
    model: nn.Module, batch: SequenceBatch, sketcher: Sketcher, **options: Any
) -> CapturedSketches:
    """:func:`capture_gradients` (same keyword ``options``), sketched on the trainer one chunk at
    a time.

    ``sketcher`` is the run's (``sketch.spec.build_sketcher(spec, parameters)``): every column
    of ``Phi`` is a pure function of the seed, the parameter name and the coordinate, so the
    rows are those the service would make from the raw rows (bit for bit for the same chunk of
    rows, ``tests/clients/test_capture.py``), and only ``k`` floats per sequence leave the
    trainer.  At most ``chunk_size`` sequences' gradients exist at a time.
    """
    values: list[torch.Tensor] = []
    rows: list[torch.Tensor] = []
    used = ""
    for _, s, g, method_used in iter_captured_chunks(model, batch, **options):
        used = method_used
        values.append(s)
        rows.append(sketcher.sketch(g))
        del g
    return CapturedSketches(
        logprobs=torch.cat(values).float(),
        sketch=torch.cat(rows),
        num_tokens=batch.num_tokens,
        method=used,
    )
