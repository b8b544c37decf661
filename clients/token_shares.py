"""Exact per-token shares of a step's first-order entropy change (issue 16, math.md §9).

For an update token ``(i, t)`` with coefficient ``c_{i,t}`` in the step (``c_{i,t} = -dL/d
log pi(y_{i,t} | ...)``, math.md §4 "Update rows"; ``weight_i A_i`` for every token of a plain
on-policy sequence), its share is

    a_{i,t} = eta c_{i,t} <v, grad log pi(y_{i,t} | p, y_{i,<t})>,   v = grad_hat H,

with ``grad_hat H = sum_j h_j w_j`` over the entropy-role sequences (math.md §3; or the
token-mean coefficients of §8).  Summed over ``t`` they give the sequence's ``a_i`` of the
``independent`` estimator, summed over everything ``dH1``.  Every share comes from one vector:
``v`` is one backward pass of ``sum_j h_j S_j`` over the entropy batch (the ``h_j`` held
constant), or none of its own when the hooks of the capture that makes the rows add it up
(:class:`clients.factorised.EntropyDirections`), and the ``<v, grad log pi(y_{i,t})>`` of
every update token at once are one forward-mode pass (``torch.func.jvp``) of the update
batch's token log-probs along ``v``.  No sketch is involved: the shares are exact, whatever
sketch the run uses for its kernel.

Why not a library: TRAK and LogIX attribute to training examples through sketched per-example
gradients; a forward-mode directional derivative of every token's log-prob is one ``jvp`` here,
and no library exposes it for a causal LM batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from clients.capture import (
    SequenceBatch,
    eval_mode,
    forward_logits,
    logits_of,
    response_logprobs,
    response_window,
    takes_logits_to_keep,
    without_input_grad_hooks,
)
from sketch.cross_fit import cross_fit_halves


@dataclass(frozen=True)
class TokenShares:
    """Per-token results laid out like the update batch's ``input_ids`` (``[n, L]`` float32, 0
    off the response positions): ``shares`` ``a_{i,t}`` and ``logprobs`` ``log pi(y_{i,t} |
    ...)`` (the values the forward-mode pass computed along the way)."""

    shares: torch.Tensor
    logprobs: torch.Tensor


def entropy_gradient(
    model: nn.Module,
    entropy: SequenceBatch,
    h: torch.Tensor,
    *,
    parameters: Collection[str] | None = None,
    temperature: float = 1.0,
    use_eval_mode: bool = True,
    beta: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """``v = grad_hat H = sum_j h_j dS_j/dtheta`` (math.md §3): one forward and one backward pass.

    ``entropy``: the entropy-role sequences; ``h``: ``[m]`` float, their coefficients ``h_j``
    (constants); ``parameters``: the names studied (default: every trainable parameter), as the
    run's kernel covers them.  ``beta`` (``[m]``): ``grad_hat H`` from the entropy sums,
    ``sum_j h_j w_j + beta_j grad Hs_j`` with ``h`` their ``alpha`` (math.md §3 "From the
    entropy sums", :func:`sketch.rao_blackwell.entropy_sum_coefficients`), from the same
    backward.  Returns ``{name: tensor like the parameter}`` float32 (zeros where ``S`` does
    not depend on one).
    """
    if h.shape != (entropy.size,):
        raise ValueError(f"h must have one value per entropy sequence, got {tuple(h.shape)}")
    if beta is not None and beta.shape != (entropy.size,):
        raise ValueError(f"beta must have one value per entropy sequence, got {tuple(beta.shape)}")
    params = {
        n: p
        for n, p in model.named_parameters()
        if p.requires_grad and (parameters is None or n in parameters)
    }
    with eval_mode(model, use_eval_mode):
        keep = response_window(entropy.response_mask)
        logits = forward_logits(
            model,
            entropy.input_ids,
            entropy.attention_mask,
            logits_to_keep=keep,
            position_ids=entropy.positions(),
        )
        on = entropy.response_mask.float()
        weights = h.to(on.device, torch.float32)[:, None] * on
        sums = None if beta is None else beta.to(on.device, torch.float32)[:, None] * on
        total = response_logprobs(
            logits, entropy.input_ids, entropy.response_mask, weights, temperature, sums
        ).sum()
        grads = torch.autograd.grad(total, list(params.values()), allow_unused=True)
    return {
        name: (torch.zeros_like(p) if g is None else g.detach()).float()
        for (name, p), g in zip(params.items(), grads, strict=True)
    }


@dataclass(frozen=True)
class TokenDerivatives:
    """One forward-mode pass's per-token results, ``[n, L]`` float32 laid out like the batch's
    ``input_ids`` (0 off the response positions): ``logprobs`` ``log pi(y_{i,t} | ...)``,
    ``logprob`` ``<v, grad log pi(y_{i,t} | ...)>`` and, when asked for, ``entropy``
    ``<v, grad H_{i,t}>`` (``H_{i,t}`` the full next-token entropy of the distribution that
    drew ``y_{i,t}``, as :func:`clients.capture.response_logprobs` defines it)."""

    logprobs: torch.Tensor
    logprob: torch.Tensor
    entropy: torch.Tensor | None


def token_derivatives(
    model: nn.Module,
    batch: SequenceBatch,
    v: Mapping[str, torch.Tensor],
    *,
    temperature: float = 1.0,
    use_eval_mode: bool = True,
    entropy: bool = False,
) -> TokenDerivatives:
    """The directional derivatives along ``v`` of every response token's log-prob (and with
    ``entropy`` of its position's entropy) in ``batch``: one forward-mode pass (parameters
    missing from ``v`` are held fixed)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    missing = set(v) - set(params)
    if missing:
        raise ValueError(f"v names parameters the model does not have: {sorted(missing)[:3]}")
    moving = {n: params[n] for n in v}
    fixed = {n: p for n, p in params.items() if n not in v}
    tangents = {n: v[n].to(params[n].dtype) for n in v}
    # Backward never differentiates an embedding's padding row (torch zeroes its gradient), so
    # no score gradient, kernel or step moves it: hold it fixed here too.
    for module_name, module in model.named_modules():
        name = f"{module_name}.weight" if module_name else "weight"
        if isinstance(module, nn.Embedding) and module.padding_idx is not None and name in tangents:
            tangents[name] = tangents[name].clone()
            tangents[name][module.padding_idx] = 0
    kwargs: dict[str, object] = {"attention_mask": batch.attention_mask}
    if hasattr(model, "config"):
        kwargs["use_cache"] = False
    if batch.position_offsets is not None:
        kwargs["position_ids"] = batch.positions()
    # the positions from the one before the earliest response token: the LM head and its
    # tangent skip the prompts
    keep = response_window(batch.response_mask)
    offset = batch.input_ids.shape[1] - keep
    if offset and takes_logits_to_keep(model):
        kwargs["logits_to_keep"] = keep

    def logits(values: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[n, keep, V]``: the tempered logits of the kept positions (the last predicts no
        response token: it is dropped after the vocabulary-wide work, which runs faster on
        contiguous tensors than on their slice)."""
        output = functional_call(model, {**fixed, **values}, (batch.input_ids,), kwargs)
        scaled = logits_of(output)[:, -keep:].float()
        return scaled / temperature if temperature != 1.0 else scaled

    # Forward-mode AD has no rule for the fused attention kernels (flash, memory-efficient):
    # the math kernel computes the same attention and has one; nor for the grouped matmul of
    # MoE experts (_eager_experts).
    with (
        torch.no_grad(),
        eval_mode(model, use_eval_mode),
        sdpa_kernel(SDPBackend.MATH),
        without_input_grad_hooks(model),
        _contiguous_head_input(model),
        _eager_experts(model),
    ):
        scaled, scaled_dot = jvp(logits, (moving,), (tangents,))[:2]
        # The log-softmax and entropy tangents in closed form from the logits' tangent s':
        # d log p_y = s'_y - E_p[s'] and dH = -E_p[(log p + H) s'], the weighted sums over the
        # vocabulary in one batched product, where forward-mode AD through log_softmax and the
        # entropy made a dozen passes over the [n, keep, V] logits.
        logp = torch.log_softmax(scaled, -1)
        del scaled
        weights = logp.new_empty((*logp.shape[:-1], 2 if entropy else 1, logp.shape[-1]))
        torch.exp(logp, out=weights[..., 0, :])
        targets = batch.input_ids[:, offset + 1 :].unsqueeze(-1)
        value = logp[:, :-1].gather(-1, targets)[..., 0]
        if entropy:
            torch.mul(weights[..., 0, :], logp, out=weights[..., 1, :])
        del logp
        means = (weights @ scaled_dot.unsqueeze(-1))[:, :-1, :, 0]
        derivative = scaled_dot[:, :-1].gather(-1, targets)[..., 0] - means[..., 0]
        entropy_dot = None
        if entropy:
            h = -weights[:, :-1, 1].sum(-1)
            entropy_dot = -means[..., 1] - h * means[..., 0]
    mask = batch.response_mask[:, offset + 1 :]

    def laid_out(part: torch.Tensor) -> torch.Tensor:
        full = torch.zeros(batch.input_ids.shape, dtype=torch.float32, device=part.device)
        tail = full[:, offset + 1 :]
        full[:, offset + 1 :] = torch.where(mask, part.float(), torch.zeros_like(tail))
        return full

    return TokenDerivatives(
        logprobs=laid_out(value),
        logprob=laid_out(derivative),
        entropy=None if entropy_dot is None else laid_out(entropy_dot),
    )


@contextlib.contextmanager
def _eager_experts(model: nn.Module) -> Iterator[None]:
    """Run transformers' MoE experts with their eager implementation (a matmul per expert) in
    the block: the default grouped matmul has no forward-mode derivative, and both give the
    same outputs.  Nothing to do for a model without such experts."""
    top: Any = next(
        (
            m
            for m in model.modules()
            if hasattr(m, "set_experts_implementation")
            and getattr(getattr(m, "config", None), "_experts_implementation", None)
            not in (None, "eager")
        ),
        None,
    )
    if top is None:
        yield
        return
    before = top.config._experts_implementation
    top.set_experts_implementation("eager")
    try:
        yield
    finally:
        top.set_experts_implementation(before)


@contextlib.contextmanager
def _contiguous_head_input(model: nn.Module) -> Iterator[None]:
    """transformers' causal LMs give the LM head a strided slice of the hidden states (the
    ``logits_to_keep`` window); forward-mode AD's ``matmul`` then runs it and its tangents as a
    batched product against a broadcast weight, at half the speed of one matrix product.  A
    contiguous input folds into one.  (A model without ``get_output_embeddings`` is left as
    it is.)"""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if not isinstance(head, nn.Module):
        yield
        return

    def contiguous(_: nn.Module, args: tuple[object, ...]) -> tuple[object, ...]:
        return tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)

    handle = head.register_forward_pre_hook(contiguous)
    try:
        yield
    finally:
        handle.remove()


def _scaled(
    metric: Mapping[str, torch.Tensor] | None, *directions: dict[str, torch.Tensor]
) -> None:
    """Each ``v`` to ``P v`` in adam geometry (``metric`` = ``sqrt(P)`` per parameter: the
    kernel is ``w^T P w'``), in place (each ``v`` is a fresh gradient its caller owns: a 100M
    model's copy would be 400 MB more); ``P`` once per parameter for all of them (a lazy
    ``metric`` computes it on every read)."""
    if metric is None:
        return
    for name in dict.fromkeys(n for v in directions for n in v):
        square: torch.Tensor | None = None
        for v in directions:
            if name in v:
                if square is None:
                    square = metric[name].to(v[name].device, v[name].dtype).square()
                v[name].mul_(square)


def _weighted(
    update: SequenceBatch,
    coefficients: torch.Tensor,
    found: TokenDerivatives,
    learning_rate: float,
    entropy_coefficients: torch.Tensor | None = None,
) -> TokenShares:
    """``a_{i,t} = eta (c_{i,t} <v_i, grad l_{i,t}> + e_{i,t} <v_i, grad H_{i,t}>)`` from the
    directional derivatives."""
    zeros = torch.zeros_like(found.logprob)

    def on_response(weights: torch.Tensor) -> torch.Tensor:
        return torch.where(update.response_mask, weights.float(), zeros.cpu()).to(zeros.device)

    total = on_response(coefficients) * found.logprob
    if entropy_coefficients is not None:
        assert found.entropy is not None
        total = total + on_response(entropy_coefficients) * found.entropy
    return TokenShares(float(learning_rate) * total, found.logprobs)


def _checked_layouts(
    update: SequenceBatch, coefficients: torch.Tensor, entropy_coefficients: torch.Tensor | None
) -> None:
    for name, layout in (
        ("coefficients", coefficients),
        ("entropy_coefficients", entropy_coefficients),
    ):
        if layout is not None and layout.shape != update.input_ids.shape:
            raise ValueError(f"{name} must be laid out like the update batch's input_ids")


def _into(found: TokenDerivatives, rows: Sequence[int], part: TokenDerivatives) -> None:
    """Set ``rows`` of ``found`` (CPU, :func:`_zeros`) from ``part``, a sub-batch's (as wide,
    or trimmed of padding columns by :meth:`SequenceBatch.trimmed`: the columns past it
    stay 0)."""
    width = part.logprob.shape[1]
    found.logprobs[rows, :width] = part.logprobs.cpu()
    found.logprob[rows, :width] = part.logprob.cpu()
    if found.entropy is not None and part.entropy is not None:
        found.entropy[rows, :width] = part.entropy.cpu()


def _zeros(update: SequenceBatch, entropy: bool) -> TokenDerivatives:
    """Zeros laid out like ``update``'s ``input_ids``, to fill a sub-batch at a time."""
    shape = update.input_ids.shape
    return TokenDerivatives(
        logprobs=torch.zeros(shape),
        logprob=torch.zeros(shape),
        entropy=torch.zeros(shape) if entropy else None,
    )


def token_shares(
    model: nn.Module,
    update: SequenceBatch,
    coefficients: torch.Tensor,
    entropy: SequenceBatch,
    h: torch.Tensor,
    learning_rate: float,
    *,
    parameters: Collection[str] | None = None,
    sqrt_p: Mapping[str, torch.Tensor] | None = None,
    temperature: float = 1.0,
    use_eval_mode: bool = True,
    entropy_coefficients: torch.Tensor | None = None,
) -> TokenShares:
    """``a_{i,t} = eta c_{i,t} <grad_hat H, grad log pi(y_{i,t} | ...)>`` of every update
    token (math.md §9).

    ``coefficients``: ``[n, L]`` the tokens' ``c_{i,t}`` laid out like ``update.input_ids``
    (for a plain on-policy step ``weight_i A_i`` on every response token); ``entropy``, ``h``:
    the entropy-role sequences and their coefficients (:func:`entropy_gradient`);
    ``parameters``: the studied names; ``sqrt_p``: Adam's ``sqrt(P)`` in adam geometry (the
    inner product is then ``v^T P g``); ``entropy_coefficients``: ``[n, L]`` the ``e_{i,t} =
    -dL/dH_{i,t}`` of a loss with an entropy bonus, whose update rows carry ``sum_t e_{i,t}
    grad H_{i,t}`` (:func:`clients.capture.capture_gradients`): each token's share then adds
    ``eta e_{i,t} <grad_hat H, grad H_{i,t}>``, from the same forward-mode pass.  With ``h``
    from the ``independent`` estimator, ``shares.sum(1)`` are the ``a_i`` and ``shares.sum()``
    is ``dH1``, exactly.
    """
    _checked_layouts(update, coefficients, entropy_coefficients)
    v = entropy_gradient(
        model,
        entropy,
        h,
        parameters=parameters,
        temperature=temperature,
        use_eval_mode=use_eval_mode,
    )
    _scaled(sqrt_p, v)
    found = token_derivatives(
        model,
        update,
        v,
        temperature=temperature,
        use_eval_mode=use_eval_mode,
        entropy=entropy_coefficients is not None,
    )
    return _weighted(update, coefficients, found, learning_rate, entropy_coefficients)


def token_shares_u_statistic(
    model: nn.Module,
    update: SequenceBatch,
    prompt_ids: Sequence[str],
    coefficients: torch.Tensor,
    h: torch.Tensor,
    learning_rate: float,
    *,
    parameters: Collection[str] | None = None,
    sqrt_p: Mapping[str, torch.Tensor] | None = None,
    temperature: float = 1.0,
    use_eval_mode: bool = True,
    entropy_coefficients: torch.Tensor | None = None,
) -> TokenShares:
    """The token shares of the ``u_statistic`` estimator, for a step without entropy-role
    sequences (``E = U``, math.md §4 and §9), laid out like :func:`token_shares`'s.

    Token ``(i, t)`` pairs with every other update sequence ``j != i``, same-prompt pairs
    weighted ``f_p = M_p / (M_p - 1)`` (0 when ``M_p < 2``), so its direction is ``v_i = v -
    v_p + f_p (v_p - h_i w_i)`` with ``v_p = sum_{j in p} h_j w_j``: one backward and one
    forward-mode pass per prompt, and the self-term ``h_i <w_i, grad l_{i,t}>`` removed with
    one backward and one forward-mode pass per sequence (the costly part).  ``prompt_ids``:
    the ``n`` sequences' prompts; ``h``: ``[n]`` their ``h_j`` over ``E = U``;
    ``entropy_coefficients`` as in :func:`token_shares`.  Summed over ``t`` they are the
    ``u_statistic`` ``a_i``, and summed over everything its ``dH1``.
    """
    if len(prompt_ids) != update.size or h.shape != (update.size,):
        raise ValueError("prompt_ids and h must have one entry per update sequence")
    _checked_layouts(update, coefficients, entropy_coefficients)
    with_entropy = entropy_coefficients is not None
    groups: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompt_ids):
        groups.setdefault(str(prompt), []).append(i)

    def gradient(batch: SequenceBatch, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        v = entropy_gradient(
            model,
            batch,
            weights,
            parameters=parameters,
            temperature=temperature,
            use_eval_mode=use_eval_mode,
        )
        _scaled(sqrt_p, v)
        return v

    def along(batch: SequenceBatch, v: Mapping[str, torch.Tensor]) -> TokenDerivatives:
        return token_derivatives(
            model,
            batch,
            v,
            temperature=temperature,
            use_eval_mode=use_eval_mode,
            entropy=with_entropy,
        )

    by_prompt = {p: gradient(update.select(rows), h[rows]) for p, rows in groups.items()}
    total = {n: sum(v[n] for v in by_prompt.values()) for n in next(iter(by_prompt.values()))}
    found = _zeros(update, with_entropy)
    for p, rows in groups.items():
        m = len(rows)
        f = m / (m - 1) if m >= 2 else 0.0
        direction = {n: total[n] + (f - 1.0) * by_prompt[p][n] for n in total}
        part = along(update.select(rows), direction)
        for k, i in enumerate(rows):
            own = update.select([i])
            self_term = along(own, gradient(own, torch.ones(1)))
            part.logprob[k] -= f * float(h[i]) * self_term.logprob[0]
            if part.entropy is not None and self_term.entropy is not None:
                part.entropy[k] -= f * float(h[i]) * self_term.entropy[0]
        _into(found, rows, part)
    return _weighted(update, coefficients, found, learning_rate, entropy_coefficients)


def half_directions(
    model: nn.Module,
    update: SequenceBatch,
    members: Sequence[Sequence[int]],
    h: torch.Tensor,
    chunk_size: int,
    *,
    parameters: Collection[str] | None,
    temperature: float,
    use_eval_mode: bool,
    beta: torch.Tensor | None = None,
) -> list[dict[str, torch.Tensor]]:
    """``[v_0, v_1]``, ``v_X = sum_{j in X} h_j w_j`` over half ``X``'s rows (``members``), a
    chunk at a time: one forward and one backward over every row in all (not a backward of the
    whole batch per half with ``h`` zeroed off it, which would cost one more); with ``beta``,
    ``+ beta_j grad Hs_j`` (:func:`entropy_gradient`)."""
    directions: list[dict[str, torch.Tensor]] = [{}, {}]
    for half, total in enumerate(directions):
        for first in range(0, len(members[half]), chunk_size):
            rows = list(members[half][first : first + chunk_size])
            gradient = entropy_gradient(
                model,
                update.select(rows).trimmed(),
                h[rows],
                parameters=parameters,
                temperature=temperature,
                use_eval_mode=use_eval_mode,
                beta=None if beta is None else beta[rows],
            )
            for name, g in gradient.items():
                if name in total:
                    total[name].add_(g)  # in place: these are parameter-sized
                else:
                    total[name] = g
    return directions


def token_shares_cross_fit(
    model: nn.Module,
    update: SequenceBatch,
    ids: Sequence[str],
    prompt_ids: Sequence[str],
    coefficients: torch.Tensor,
    h: torch.Tensor,
    learning_rate: float,
    *,
    parameters: Collection[str] | None = None,
    sqrt_p: Mapping[str, torch.Tensor] | None = None,
    temperature: float = 1.0,
    use_eval_mode: bool = True,
    entropy_coefficients: torch.Tensor | None = None,
    chunk_size: int = 16,
    directions: Sequence[dict[str, torch.Tensor]] | None = None,
    halves: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
) -> TokenShares:
    """The token shares of the ``cross_fit`` estimator (math.md §4 and §9), for a step without
    entropy-role sequences, laid out like :func:`token_shares`'s.

    Each prompt's sequences are split into halves by id (:func:`sketch.cross_fit.
    cross_fit_halves`, as the service splits them); a token of half ``X`` takes its direction
    from the other half alone, ``v_{1-X} = sum_{j in 1-X} h_j w_j``.  That is one forward and
    one backward pass over each half's own sequences (one over the batch in all), and one
    forward-mode pass of each half along the other's ``v``: the cost of :func:`token_shares`,
    where
    :func:`token_shares_u_statistic` needs one backward and one forward-mode pass per sequence.
    ``ids``, ``prompt_ids``: the ``n`` sequences' ids and prompts; ``h``: ``[n]`` the
    estimator's ``h_j`` (:func:`sketch.entropy.estimator_entropy_coefficients`, per half);
    ``entropy_coefficients`` as in :func:`token_shares`.  ``chunk_size``: sequences per pass,
    so that no pass holds more activations than a training micro-batch of that size.  Summed
    over ``t`` they are the ``cross_fit`` ``a_i``, and summed over everything its ``dH1``.

    ``directions``: ``[v_0, v_1]`` already added up (unscaled, one tensor per studied
    parameter), e.g. by the hooks of the capture that made the rows
    (:class:`clients.factorised.EntropyDirections`, weights ``h_j`` on half ``d``'s rows);
    the forward and backward passes are then skipped.  They are scaled in place in ``adam``
    geometry.

    ``halves`` (int ``[n]``, with ``directions``): the sequences' halves when the step has more
    sequences than these (other ranks' of the same prompts): split over all of them, as the
    service splits them, with ``directions`` summed over all of them too.

    ``beta`` (``[n]``, per half as ``h``): the directions from the entropy sums, ``v_X = sum_{j
    in X} alpha_j w_j + beta_j grad Hs_j`` with ``h`` = ``alpha`` (math.md §3 "From the entropy
    sums"): the shares of the service's ``cross_fit`` answer when it has the sequences'
    entropy-sum rows.
    """
    if len(ids) != update.size or len(prompt_ids) != update.size or h.shape != (update.size,):
        raise ValueError("ids, prompt_ids and h must have one entry per update sequence")
    _checked_layouts(update, coefficients, entropy_coefficients)
    with_entropy = entropy_coefficients is not None
    found = _zeros(update, with_entropy)
    if halves is None:
        halves = torch.from_numpy(cross_fit_halves(ids, prompt_ids).astype(np.int64))
        if not bool((halves == 1).any()):  # every prompt has one sequence: no pair of halves
            return _weighted(update, coefficients, found, learning_rate, entropy_coefficients)
    elif directions is None or halves.shape != (update.size,):
        raise ValueError("halves of every update sequence come with the directions of all")
    members = [torch.nonzero(halves == half).flatten().tolist() for half in (0, 1)]
    if directions is None:
        directions = half_directions(
            model,
            update,
            members,
            h,
            chunk_size,
            parameters=parameters,
            temperature=temperature,
            use_eval_mode=use_eval_mode,
            beta=beta,
        )
    elif len(directions) != 2:
        raise ValueError(f"directions must be [v_0, v_1], got {len(directions)}")
    directions = [dict(v) for v in directions]
    _scaled(sqrt_p, *directions)
    for half in (0, 1):
        for first in range(0, len(members[half]), chunk_size):
            rows = members[half][first : first + chunk_size]
            part = token_derivatives(
                model,
                update.select(rows).trimmed(),
                directions[1 - half],
                temperature=temperature,
                use_eval_mode=use_eval_mode,
                entropy=with_entropy,
            )
            _into(found, rows, part)
    return _weighted(update, coefficients, found, learning_rate, entropy_coefficients)


__all__ = [
    "TokenDerivatives",
    "TokenShares",
    "entropy_gradient",
    "half_directions",
    "token_derivatives",
    "token_shares",
    "token_shares_cross_fit",
    "token_shares_u_statistic",
]
