"""Exact-enumeration ground truth for kernelscope's estimators (math.md §§2-6).

A tiny autoregressive policy (a ``transformers`` GPT-2 built from a config, random weights
from a fixed torch seed, float64, dropout off) answers a few short fixed prompts with
responses of fixed length ``L`` over a response vocabulary of ``V`` tokens.  There are only
``R = V ** L`` possible responses per prompt, so every quantity of math.md can be computed
exactly by summing over all of them:

* ``S(t|p)``, the summed response-token log-prob, and ``pi(t|p) = exp S``;
* the sequence entropy ``H = (1/B) sum_p H(p)``, ``H(p) = -sum_t pi(t|p) S(t|p)`` (nats),
  and ``grad H`` by autograd;
* per-sequence score gradients ``w_t = dS_t/dtheta`` (``torch.func.vmap(grad(...))``);
* the entropy after any parameter change, hence the realized change exactly, and the exact
  Taylor coefficients ``dH/ds`` and ``d^2H/ds^2`` along a direction (nested forward mode).

The response-token distribution is the model's softmax restricted to the first ``V`` token
ids (a sampler that masks the other logits), so ``sum_t pi(t|p) = 1`` exactly over the
enumerated responses.  The prompt tokens may use the whole model vocabulary.

Sampling (``torch.Generator``-seeded), a toy reward, GRPO advantages and the Dr. GRPO
coefficients ``c_i = A_i / (B * G_p * L)`` (math.md §2) are provided so that tests build a
trainer step from first principles.  All tensors are float64 unless stated otherwise;
"flat" vectors concatenate the parameters in ``ExactPolicy.names`` order.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.func import functional_call, grad, jvp, vmap
from transformers import GPT2Config, GPT2LMHeadModel

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ToyConfig:
    """Size and seed of the enumerable toy policy.

    ``prompts`` are fixed token lists of one common length (token ids ``< vocab_size``);
    responses have exactly ``response_length`` tokens from ``range(response_vocab)``; with a
    ``stop_token`` (in ``range(response_vocab)``) a response ends at its first stop token, so
    lengths vary from 1 to ``response_length`` (an end-of-sequence token).
    ``initializer_range`` is larger than GPT-2's 0.02 so that the random policy is far from
    uniform (log-probs spread over several nats), as a trained policy would be.
    """

    vocab_size: int = 8
    response_vocab: int = 5
    response_length: int = 4
    prompts: tuple[tuple[int, ...], ...] = ((5, 1, 7), (2, 6, 3), (7, 7, 0))
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 16
    n_positions: int = 16
    initializer_range: float = 0.3
    seed: int = 0
    stop_token: int | None = None


def dr_grpo_coefficients(
    advantages: torch.Tensor, prompt_ids: torch.Tensor, num_prompts: int, max_length: int
) -> torch.Tensor:
    """Update coefficients ``c_i = lambda_i A_i`` with Dr. GRPO's ``lambda_i = 1/(B G_p L)``.

    math.md §2 with a fixed ``max_length = L``.  ``advantages``: ``[n]`` float;
    ``prompt_ids``: ``[n]`` long in ``range(num_prompts)``.  ``G_p`` counts the rows of prompt
    ``p``.  Returns ``[n]`` float64.
    """
    group_sizes = torch.bincount(prompt_ids, minlength=num_prompts).to(torch.float64)
    return advantages.to(torch.float64) / (num_prompts * group_sizes[prompt_ids] * max_length)


def grpo_advantages(
    rewards: torch.Tensor, prompt_ids: torch.Tensor, *, scale_by_std: bool = False
) -> torch.Tensor:
    """GRPO advantages: reward minus its prompt group's mean (optionally divided by its std).

    ``rewards``: ``[n]``; ``prompt_ids``: ``[n]`` long.  The std is the unbiased sample std
    of the group; groups with zero std are left unscaled.  Returns ``[n]`` float64.
    """
    rewards = rewards.to(torch.float64)
    out = torch.empty_like(rewards)
    for p in torch.unique(prompt_ids):
        mask = prompt_ids == p
        group = rewards[mask]
        centred = group - group.mean()
        if scale_by_std and group.numel() > 1:
            std = group.std()
            if std > 0:
                centred = centred / std
        out[mask] = centred
    return out


class ExactPolicy:
    """The toy policy and everything about it that can be computed by enumeration.

    Attributes
    ----------
    model:
        The float64 ``GPT2LMHeadModel`` (eval mode, eager attention); its parameters are never
        modified in place: every "after the step" quantity takes a parameter dict.
    params:
        ``{name: tensor}`` of the current parameters (detached, tied weights listed once).
    names, shapes, numel:
        Parameter order of the flat vectors, their shapes, and ``N`` = total count.
    responses:
        ``[R, L]`` long, every response in lexicographic order; a response is referred to by
        its index ``r`` in ``range(R)``, a sequence by ``(prompt p, response r)``.
    """

    def __init__(self, config: ToyConfig | None = None):
        self.config = config or ToyConfig()
        cfg = self.config
        lengths = {len(p) for p in cfg.prompts}
        if len(lengths) != 1:
            raise ValueError("all prompts must have the same length")
        self.prompt_length = lengths.pop()
        if self.prompt_length + cfg.response_length > cfg.n_positions:
            raise ValueError("prompt + response longer than n_positions")
        if cfg.response_vocab > cfg.vocab_size:
            raise ValueError("response vocabulary larger than the model vocabulary")

        # Passed as a dict: the stubs of GPT2Config do not list every accepted keyword.
        config_kwargs: dict[str, Any] = dict(
            vocab_size=cfg.vocab_size,
            n_positions=cfg.n_positions,
            n_embd=cfg.n_embd,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            summary_first_dropout=0.0,
            initializer_range=cfg.initializer_range,
            bos_token_id=0,
            eos_token_id=0,
            attn_implementation="eager",
        )
        # A forked RNG: the weights depend only on cfg.seed, and the global RNG of the
        # calling test is left untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.model = GPT2LMHeadModel(GPT2Config(**config_kwargs)).double().eval()
        self.params: Params = {
            name: p.detach().clone() for name, p in self.model.named_parameters()
        }
        self.names: list[str] = list(self.params)
        self.shapes: dict[str, tuple[int, ...]] = {
            n: tuple(p.shape) for n, p in self.params.items()
        }
        self.numel = sum(p.numel() for p in self.params.values())

        self.num_prompts = len(cfg.prompts)
        self.response_length = cfg.response_length
        self.response_vocab = cfg.response_vocab
        if cfg.stop_token is not None and not 0 <= cfg.stop_token < cfg.response_vocab:
            raise ValueError("stop_token must be a response token")
        # With a stop token, a response that stops early is padded with the stop token, and
        # the padding is forced (probability 1): each variable-length response appears once.
        self.responses = torch.tensor(
            [
                r
                for r in itertools.product(range(cfg.response_vocab), repeat=cfg.response_length)
                if cfg.stop_token is None
                or cfg.stop_token not in r[:-1]
                or all(t == cfg.stop_token for t in r[r.index(cfg.stop_token) :])
            ],
            dtype=torch.long,
        )
        self.num_responses = self.responses.shape[0]
        prompts = torch.tensor(cfg.prompts, dtype=torch.long)
        # [B, R, P + L]: every prompt followed by every response.
        self.input_ids = torch.cat(
            [
                prompts[:, None, :].expand(-1, self.num_responses, -1),
                self.responses[None].expand(self.num_prompts, -1, -1),
            ],
            dim=-1,
        )
        self._score_gradients: torch.Tensor | None = None
        self._entropy_sum_gradients: torch.Tensor | None = None
        # S at the current parameters, which never change: sampling needs it at every draw.
        with torch.no_grad():
            self._log_probs = self._sequence_logprob(self.params, self.input_ids)

    # ------------------------------------------------------------------ log-probs, entropy
    def _sequence_logprob(
        self, params: Mapping[str, torch.Tensor], ids: torch.Tensor
    ) -> torch.Tensor:
        """``S`` of the sequences ``ids`` (``[..., P + L]`` long) under ``params``: ``[...]``."""
        return self._token_logprobs(params, ids).sum(-1)

    def _token_logprobs(
        self, params: Mapping[str, torch.Tensor], ids: torch.Tensor
    ) -> torch.Tensor:
        """``log pi(y_t | p, y_<t)`` of the response tokens of ``ids`` (``[..., P + L]`` long)
        under ``params``: ``[..., L]``."""
        lead = ids.shape[:-1]
        flat_ids = ids.reshape(-1, ids.shape[-1])
        logits = functional_call(self.model, dict(params), (flat_ids,), {"use_cache": False}).logits
        # Position k predicts token k + 1; keep the predictions of the response tokens and
        # renormalise over the response vocabulary (the sampler masks the other tokens).
        response_logits = logits[:, self.prompt_length - 1 : -1, : self.response_vocab]
        log_probs = torch.log_softmax(response_logits, dim=-1)
        targets = flat_ids[:, self.prompt_length :, None]
        token = log_probs.gather(-1, targets).squeeze(-1)
        return (token * self._live(flat_ids)).reshape(*lead, -1)

    def _live(self, ids: torch.Tensor) -> torch.Tensor:
        """1.0 at the response positions a response really has (up to and including its first
        stop token), 0.0 at its forced padding: float64 ``[..., L]`` for ``ids [..., P + L]``."""
        response = ids[..., self.prompt_length :]
        if self.config.stop_token is None:
            return torch.ones(response.shape, dtype=torch.float64)
        stops = (response == self.config.stop_token).to(torch.long)
        return ((stops.cumsum(-1) - stops) == 0).to(torch.float64)

    def lengths(self) -> torch.Tensor:
        """``n`` of every enumerated response: ``[R]`` float64 (``L`` without a stop token)."""
        return self._live(self.input_ids[0]).sum(-1)

    def token_entropies(self, params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """``H_t``, the entropy of the full next-token distribution (over the response
        vocabulary) at each position of every response, 0 at the padding: ``[B, R, L]``."""
        params = self.params if params is None else params
        ids = self.input_ids.reshape(-1, self.input_ids.shape[-1])
        logits = functional_call(self.model, dict(params), (ids,), {"use_cache": False}).logits
        log_probs = torch.log_softmax(
            logits[:, self.prompt_length - 1 : -1, : self.response_vocab], dim=-1
        )
        entropy = -(log_probs.exp() * log_probs).sum(-1) * self._live(ids)
        return entropy.reshape(self.num_prompts, self.num_responses, -1)

    def token_mean_entropy(self, params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The token-mean entropy ``T = sum_p E_p[sum_t H_t] / sum_p E_p[n]`` (math.md §8): the
        expected ratio trainers log as ``entropy``, a 0-dim tensor (differentiable)."""
        probs = self.probabilities(params)
        per_response = self.token_entropies(params).sum(-1)
        return (probs * per_response).sum() / (probs @ self.lengths()).sum()

    def token_logprobs(
        self,
        prompt_idx: torch.Tensor,
        response_idx: torch.Tensor,
        params: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Per-token log-probs of the sequences ``(prompt_idx[i], response_idx[i])``:
        ``[n, L]`` (differentiable in ``params``; the current parameters by default)."""
        ids = self.input_ids[prompt_idx, response_idx]
        return self._token_logprobs(self.params if params is None else params, ids)

    def update_rows(
        self, prompt_idx: torch.Tensor, response_idx: torch.Tensor, coefficients: torch.Tensor
    ) -> torch.Tensor:
        """Per-sequence update rows ``u_i = sum_t c_{i,t} grad log pi(y_{i,t} | ...)`` (math.md
        §4 "Update rows"): flat ``[n, N]``; ``coefficients`` ``[n, L]``, treated as constants."""
        ids = self.input_ids[prompt_idx, response_idx]

        def one(params: Params, seq: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
            return (self._token_logprobs(params, seq[None])[0] * coef).sum()

        grads = vmap(grad(one), in_dims=(None, 0, 0))(
            self.params, ids, coefficients.detach().to(torch.float64)
        )
        return torch.cat([grads[n].reshape(ids.shape[0], -1) for n in self.names], dim=1)

    def log_probs(self, params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Exact ``S(t|p)`` for every prompt and response: ``[B, R]`` float64.

        ``params=None`` means the current parameters (a cached, non-differentiable copy).
        """
        if params is None:
            return self._log_probs
        return self._sequence_logprob(params, self.input_ids)

    def probabilities(self, params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Exact ``pi(t|p) = exp S(t|p)``: ``[B, R]``, each row sums to 1."""
        return self.log_probs(params).exp()

    def entropy_per_prompt(self, params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """``H(p) = -sum_t pi(t|p) S(t|p)`` in nats: ``[B]``."""
        s = self.log_probs(params)
        return -(s.exp() * s).sum(-1)

    def entropy(self, params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """``H = (1/B) sum_p H(p)`` (math.md §3): a 0-dim tensor (differentiable in params)."""
        return self.entropy_per_prompt(params).mean()

    def entropy_gradient(self) -> torch.Tensor:
        """Exact ``grad H`` by autograd: flat ``[N]``."""
        return self.flatten(grad(lambda params: self.entropy(params))(self.params))

    # ------------------------------------------------------------------ score gradients
    def named_score_gradients(
        self, prompt_idx: torch.Tensor, response_idx: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """``w_i = dS_i/dtheta`` of the sequences ``(prompt_idx[i], response_idx[i])``.

        Returns ``{name: [n, *shape]}`` float64 (the upload format of architecture.md).
        """
        ids = self.input_ids[prompt_idx, response_idx]

        def one(params: Params, seq: torch.Tensor) -> torch.Tensor:
            return self._sequence_logprob(params, seq[None])[0]

        grads: dict[str, torch.Tensor] = vmap(grad(one), in_dims=(None, 0))(self.params, ids)
        return {name: grads[name] for name in self.names}

    def score_gradients(self, prompt_idx: torch.Tensor, response_idx: torch.Tensor) -> torch.Tensor:
        """Flat ``w_i`` rows of the given sequences: ``[n, N]`` float64."""
        named = self.named_score_gradients(prompt_idx, response_idx)
        return torch.cat([named[n].reshape(named[n].shape[0], -1) for n in self.names], dim=1)

    def all_score_gradients(self) -> torch.Tensor:
        """``w`` of every enumerated sequence: ``[B, R, N]`` float64 (computed once, cached)."""
        if self._score_gradients is None:
            responses = torch.arange(self.num_responses)
            rows = [
                self.score_gradients(torch.full_like(responses, p), responses)
                for p in range(self.num_prompts)
            ]
            self._score_gradients = torch.stack(rows)
        return self._score_gradients

    def all_entropy_sum_gradients(self) -> torch.Tensor:
        """``z = grad sum_t H_t`` of every enumerated sequence (the gradient of its entropy sum,
        :meth:`token_entropies` summed over the positions): ``[B, R, N]`` float64, cached."""
        if self._entropy_sum_gradients is None:
            live = self._live

            def one(params: Params, seq: torch.Tensor) -> torch.Tensor:
                ids = seq[None]
                logits = functional_call(self.model, params, (ids,), {"use_cache": False}).logits
                log_probs = torch.log_softmax(
                    logits[:, self.prompt_length - 1 : -1, : self.response_vocab], dim=-1
                )
                return (-(log_probs.exp() * log_probs).sum(-1) * live(ids)).sum()

            flat_ids = self.input_ids.reshape(-1, self.input_ids.shape[-1])
            rows = []
            for chunk in flat_ids.split(128):
                named = vmap(grad(one), in_dims=(None, 0))(self.params, chunk)
                rows.append(
                    torch.cat([named[n].reshape(chunk.shape[0], -1) for n in self.names], 1)
                )
            self._entropy_sum_gradients = torch.cat(rows).reshape(
                self.num_prompts, self.num_responses, -1
            )
        return self._entropy_sum_gradients

    # ------------------------------------------------------------------ flat <-> named
    def flatten(self, named: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate ``{name: tensor of shape}`` in ``names`` order: ``[N]``."""
        return torch.cat([named[n].reshape(-1) for n in self.names])

    def unflatten(self, flat: torch.Tensor) -> Params:
        """Inverse of ``flatten``: ``[N]`` to ``{name: tensor of shape}``."""
        out: Params = {}
        offset = 0
        for name in self.names:
            size = self.params[name].numel()
            out[name] = flat[offset : offset + size].reshape(self.shapes[name])
            offset += size
        return out

    def shifted(self, direction: torch.Tensor) -> Params:
        """Parameters ``theta + direction`` (``direction`` flat ``[N]``), e.g. an SGD step
        ``theta' = theta + eta * g_hat``."""
        delta = self.unflatten(direction)
        return {n: self.params[n] + delta[n] for n in self.names}

    # ------------------------------------------------------------------ sampling, rewards
    def sample_responses(self, prompt: int, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` i.i.d. responses to prompt ``prompt`` drawn from ``pi(.|p)``: ``[n]`` long."""
        probs = self.probabilities()[prompt]
        return torch.multinomial(probs, n, replacement=True, generator=generator)

    def sample_step(
        self, per_prompt: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``per_prompt`` responses for every prompt: ``(prompt_idx [n], response_idx [n])``,
        grouped by prompt."""
        prompt_idx = torch.arange(self.num_prompts).repeat_interleave(per_prompt)
        response_idx = torch.cat(
            [self.sample_responses(p, per_prompt, generator) for p in range(self.num_prompts)]
        )
        return prompt_idx, response_idx

    def reward(self, response_idx: torch.Tensor, token: int = 0) -> torch.Tensor:
        """Toy reward: how often ``token`` occurs in the response. ``[n]`` float64."""
        return (self.responses[response_idx] == token).sum(-1).to(torch.float64)

    def expected_reward(self, token: int = 0) -> torch.Tensor:
        """Exact ``E_pi[reward | p]``: ``[B]``."""
        all_rewards = self.reward(torch.arange(self.num_responses), token)
        return self.probabilities() @ all_rewards

    # ------------------------------------------------------------------ the step
    def policy_gradient(
        self, prompt_idx: torch.Tensor, response_idx: torch.Tensor, coefficients: torch.Tensor
    ) -> torch.Tensor:
        """``g_hat = sum_i c_i w_i`` (math.md §2): flat ``[N]``."""
        w = self.all_score_gradients()[prompt_idx, response_idx]
        return coefficients.to(torch.float64) @ w

    def logprob_after(
        self, direction: torch.Tensor, prompt_idx: torch.Tensor, response_idx: torch.Tensor
    ) -> torch.Tensor:
        """``S'`` of the given sequences under ``theta + direction``: ``[n]``."""
        return self.log_probs(self.shifted(direction))[prompt_idx, response_idx]

    def realized_change(self, direction: torch.Tensor) -> float:
        """Exact ``H(theta + direction) - H(theta)`` (nats)."""
        return float(self.entropy(self.shifted(direction)) - self.entropy())

    def _along(self, direction: torch.Tensor, fn: Callable[[Params], torch.Tensor]) -> Any:
        """``s -> fn(theta + s * direction)`` as a function of a 0-dim tensor ``s``."""
        delta = self.unflatten(direction)

        def at(s: torch.Tensor) -> torch.Tensor:
            return fn({n: self.params[n] + s * delta[n] for n in self.names})

        return at

    def directional_derivatives(self, direction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact ``d_t = <w_t, u>`` and ``q_t = u^T (d^2 S_t) u`` for every sequence.

        ``direction`` = ``u``, flat ``[N]``.  Nested forward mode along ``s -> S(theta + s u)``.
        Returns two ``[B, R]`` tensors.
        """
        along = self._along(direction, self.log_probs)
        zero, one = torch.zeros((), dtype=torch.float64), torch.ones((), dtype=torch.float64)

        def first(s: torch.Tensor) -> torch.Tensor:
            return jvp(along, (s,), (one,))[1]

        value_and_derivative = jvp(first, (zero,), (one,))
        return value_and_derivative[0], value_and_derivative[1]

    def entropy_taylor(self, direction: torch.Tensor) -> tuple[float, float]:
        """Exact first and second order of ``H`` along ``u``: ``(<grad H, u>, u^T (d^2 H) u / 2)``.

        So ``H(theta + u) - H(theta) = first + second + O(|u|^3)`` (math.md §4, second order).
        """
        along = self._along(direction, self.entropy)
        zero, one = torch.zeros((), dtype=torch.float64), torch.ones((), dtype=torch.float64)

        def first(s: torch.Tensor) -> torch.Tensor:
            return jvp(along, (s,), (one,))[1]

        value_and_derivative = jvp(first, (zero,), (one,))
        return float(value_and_derivative[0]), float(value_and_derivative[1]) / 2.0
