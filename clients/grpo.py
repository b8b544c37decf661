"""A minimal, readable GRPO loop for a tiny causal LM (the demo's trainer).

Everything a GRPO step does, in the order it does it, small enough to read in one sitting:

1. sample ``G`` responses per prompt from the current policy (:func:`sample_responses`);
2. score them with a toy reward (:class:`CopyTask`: the fraction of response tokens that
   equal the prompt's first token);
3. group-normalised advantages ``A_i = r_i - mean_{j in p(i)} r_j`` (Dr. GRPO drops the
   division by the group's standard deviation; ``scale="group"`` restores it);
4. the Dr. GRPO loss (Liu et al. 2025, "Understanding R1-Zero-like training"):
   ``L = -(1 / (B G L_max)) sum_i A_i S_i`` with ``S_i`` the *sum* of response ``i``'s token
   log-probs and ``L_max`` the generation budget, i.e. ``lambda_i = 1 / (B G L_max)``
   (math.md §2, ``normalization = "dr_grpo"`` with ``max_length = L_max``);
5. one optimizer step.

On-policy (one optimizer step per batch), so the PPO ratio is 1 and clipping never acts:
the gradient of ``L`` is exactly ``-sum_i lambda_i A_i dS_i/dtheta``.

Token id 0 is the end-of-sequence token; a response stops after it (the EOS token is part of
the response and of ``S_i``), or after ``max_new_tokens`` tokens.  Sequences are laid out
right-padded: ``[prompt | response | pad]``, with a ``response_mask`` marking the tokens
whose log-probs make ``S_i``.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

EOS_TOKEN = 0
PAD_TOKEN = 0


def build_tiny_gpt2(
    vocab_size: int = 8,
    n_embd: int = 32,
    n_layer: int = 2,
    n_head: int = 2,
    n_positions: int = 32,
    seed: int = 0,
    initializer_range: float = 0.02,
) -> GPT2LMHeadModel:
    """A GPT-2 with random weights built from a config (nothing downloaded).

    ``initializer_range`` is the std of the random weights: GPT-2's 0.02 gives an almost
    uniform policy (the entropy at its maximum, where its gradient vanishes); a larger value
    starts from a peaked, lower-entropy policy whose entropy moves at first order.

    Dropout is off everywhere so that the policy that samples, the policy whose gradient is
    captured and the policy the loss differentiates are one and the same function.
    """
    torch.manual_seed(seed)
    config = GPT2Config(  # type: ignore[call-arg]  # attn_implementation: a PretrainedConfig kwarg
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        initializer_range=initializer_range,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=EOS_TOKEN,
        eos_token_id=EOS_TOKEN,
        # No pad_token_id: with one, transformers checks `pad_token_id in input_ids` on every
        # forward without an attention mask, a data-dependent branch that torch.func.vmap (the
        # fast per-sequence capture) cannot trace.  Padding is masked by our own code.
        pad_token_id=None,
        # Plain attention: on a CPU and at these sizes it is several times faster than SDPA,
        # and vmap has batching rules for all of it (none for SDPA's CPU backward).
        attn_implementation="eager",
    )
    model = GPT2LMHeadModel(config)
    model.eval()  # no dropout anyway; eval() also keeps any future stochastic layer off
    return model


@dataclass(frozen=True)
class CopyTask:
    """Toy task: prompts are random token strings; the reward of a response is the fraction
    of its ``max_new_tokens`` budget spent on the prompt's first token.

    Token ids ``1 .. vocab_size-1`` appear in prompts.  With ``stop_at_eos`` token ``0`` ends a
    response (lengths vary); without it (the default) every response has ``max_new_tokens``
    tokens, so the sequence entropy cannot move just because lengths change.  A random policy
    earns about ``1 / vocab_size``; the optimum repeats the first token until the budget
    ends, a low-entropy policy, so training visibly drives entropy down.
    """

    vocab_size: int = 8
    prompt_length: int = 4
    max_new_tokens: int = 6
    stop_at_eos: bool = False

    def sample_prompts(self, num_prompts: int, generator: torch.Generator) -> torch.Tensor:
        """int64 ``[B, prompt_length]`` prompt token ids in ``1 .. vocab_size-1``."""
        return torch.randint(
            1, self.vocab_size, (num_prompts, self.prompt_length), generator=generator
        )

    def reward(self, prompt: torch.Tensor, response: torch.Tensor) -> float:
        """``#{t : response_t = prompt_0} / max_new_tokens`` for one prompt ``[P]`` and one
        response ``[n]`` (int64)."""
        return float((response == prompt[0]).sum().item()) / self.max_new_tokens


@dataclass(frozen=True)
class ResponseBatch:
    """``n`` (prompt, response) pairs, right-padded into one batch.

    Attributes
    ----------
    input_ids:
        int64 ``[n, T]``: prompt, then response, then ``PAD_TOKEN``.
    attention_mask:
        int64 ``[n, T]``: 1 on prompt and response tokens.
    response_mask:
        bool ``[n, T]``: True on response tokens (the tokens whose log-probs make ``S_i``).
    prompt_index:
        int64 ``[n]``: which prompt (row of the step's prompt tensor) each response answers.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    prompt_index: torch.Tensor

    @property
    def num_tokens(self) -> torch.Tensor:
        """int64 ``[n]``: response lengths ``n_i``."""
        return self.response_mask.sum(dim=1)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def responses(self) -> list[torch.Tensor]:
        """The response token ids, one int64 tensor ``[n_i]`` each."""
        return [ids[mask] for ids, mask in zip(self.input_ids, self.response_mask, strict=True)]

    @staticmethod
    def concat(batches: list[ResponseBatch]) -> ResponseBatch:
        """Stack batches (padding the shorter ones on the right)."""
        width = max(b.input_ids.shape[1] for b in batches)

        def pad(x: torch.Tensor, value: int | bool) -> torch.Tensor:
            return nn.functional.pad(x, (0, width - x.shape[1]), value=value)

        return ResponseBatch(
            input_ids=torch.cat([pad(b.input_ids, PAD_TOKEN) for b in batches]),
            attention_mask=torch.cat([pad(b.attention_mask, 0) for b in batches]),
            response_mask=torch.cat([pad(b.response_mask, False) for b in batches]),
            prompt_index=torch.cat([b.prompt_index for b in batches]),
        )


@torch.no_grad()
def sample_responses(
    model: nn.Module,
    prompts: torch.Tensor,
    num_per_prompt: int,
    max_new_tokens: int,
    generator: torch.Generator,
    stop_at_eos: bool = True,
) -> ResponseBatch:
    """Sample ``num_per_prompt`` responses for each prompt at temperature 1.

    With ``stop_at_eos`` a response ends after ``EOS_TOKEN`` (included); without, it always
    has ``max_new_tokens`` tokens.
    ``prompts``: int64 ``[B, P]`` (all prompts the same length, so no left padding).
    Returns a :class:`ResponseBatch` of ``B * num_per_prompt`` rows, grouped by prompt
    (rows ``p*G .. p*G+G-1`` answer prompt ``p``).  Decoding re-runs the whole prefix each
    token (no KV cache): simplest, and the models here are tiny.
    """
    num_prompts, prompt_length = prompts.shape
    ids = prompts.repeat_interleave(num_per_prompt, dim=0)
    n = ids.shape[0]
    finished = torch.zeros(n, dtype=torch.bool)
    lengths = torch.zeros(n, dtype=torch.long)
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids).logits[:, -1, :]
        probs = torch.softmax(logits.double(), dim=-1)
        token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        token = torch.where(finished, torch.full_like(token, PAD_TOKEN), token)
        ids = torch.cat([ids, token[:, None]], dim=1)
        lengths += (~finished).long()
        if stop_at_eos:
            finished |= token == EOS_TOKEN
        if bool(finished.all()):
            break
    positions = torch.arange(ids.shape[1])[None, :]
    response_mask = (positions >= prompt_length) & (positions < prompt_length + lengths[:, None])
    attention_mask = (positions < prompt_length + lengths[:, None]).long()
    return ResponseBatch(
        input_ids=ids,
        attention_mask=attention_mask,
        response_mask=response_mask,
        prompt_index=torch.arange(num_prompts).repeat_interleave(num_per_prompt),
    )


def group_advantages(
    rewards: torch.Tensor, prompt_index: torch.Tensor, scale: str = "none"
) -> torch.Tensor:
    """GRPO advantages ``A_i = r_i - mean_{j: p(j) = p(i)} r_j`` (float64 ``[n]``).

    ``scale="group"`` divides by the group's standard deviation (+1e-4, as TRL does);
    ``"none"`` is Dr. GRPO's choice (no division, so no difficulty bias).
    """
    rewards = rewards.double()
    advantages = torch.zeros_like(rewards)
    for p in prompt_index.unique():
        members = prompt_index == p
        group = rewards[members]
        centred = group - group.mean()
        if scale == "group":
            centred = centred / (group.std(unbiased=True) + 1e-4) if group.numel() > 1 else centred
        elif scale != "none":
            raise ValueError(f"scale must be 'none' or 'group', got {scale!r}")
        advantages[members] = centred
    return advantages


def response_logprobs(model: nn.Module, batch: ResponseBatch) -> torch.Tensor:
    """``S_i = sum_t log pi(y_t | prompt, y_<t)`` over response tokens: float32 ``[n]``,
    differentiable (call under ``torch.no_grad()`` when no gradient is wanted)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    targets = batch.input_ids[:, 1:]
    token_logp = logp.gather(-1, targets[..., None]).squeeze(-1)
    return (token_logp * batch.response_mask[:, 1:]).sum(dim=1)


def dr_grpo_weights(batch: ResponseBatch, max_new_tokens: int) -> torch.Tensor:
    """``lambda_i = 1 / (B * G_p * L_max)`` (math.md §2 ``dr_grpo`` with ``max_length``):
    float64 ``[n]``."""
    prompts, counts = batch.prompt_index.unique(return_counts=True)
    per_prompt = dict(zip(prompts.tolist(), counts.tolist(), strict=True))
    num_prompts = len(per_prompt)
    group_sizes = torch.tensor(
        [per_prompt[int(p)] for p in batch.prompt_index], dtype=torch.float64
    )
    return 1.0 / (num_prompts * group_sizes * max_new_tokens)


def dr_grpo_loss(
    model: nn.Module, batch: ResponseBatch, advantages: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """``L = -sum_i lambda_i A_i S_i`` (scalar).  On-policy, its gradient is
    ``-sum_i lambda_i A_i dS_i/dtheta``; minimising it takes the policy-gradient step."""
    coefficients = (weights * advantages).to(torch.float32)
    return -(coefficients * response_logprobs(model, batch)).sum()


@dataclass
class GRPOBatch:
    """One step's samples.

    ``update`` drives the step (``B * G`` responses, with rewards and advantages);
    ``entropy`` holds extra, independent responses to the same prompts used only to
    estimate the entropy gradient (math.md §3, the ``independent`` estimator).
    """

    prompts: torch.Tensor
    update: ResponseBatch
    rewards: torch.Tensor
    advantages: torch.Tensor
    entropy: ResponseBatch | None


def sample_step(
    model: nn.Module,
    task: CopyTask,
    num_prompts: int,
    group_size: int,
    entropy_samples: int,
    generator: torch.Generator,
    scale: str = "none",
    prompts: torch.Tensor | None = None,
) -> GRPOBatch:
    """Draw ``group_size`` update responses and ``entropy_samples`` entropy responses per
    prompt, and score the update responses.  ``prompts`` (int64 ``[B, P]``): a fixed prompt
    set; None draws ``num_prompts`` fresh ones."""
    if prompts is None:
        prompts = task.sample_prompts(num_prompts, generator)
    update = sample_responses(
        model, prompts, group_size, task.max_new_tokens, generator, task.stop_at_eos
    )
    rewards = torch.tensor(
        [
            task.reward(prompts[int(p)], r)
            for p, r in zip(update.prompt_index, update.responses(), strict=True)
        ],
        dtype=torch.float64,
    )
    advantages = group_advantages(rewards, update.prompt_index, scale)
    entropy = (
        sample_responses(
            model, prompts, entropy_samples, task.max_new_tokens, generator, task.stop_at_eos
        )
        if entropy_samples > 0
        else None
    )
    return GRPOBatch(prompts, update, rewards, advantages, entropy)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: GRPOBatch,
    max_new_tokens: int,
    around_step: AbstractContextManager[Any] | None = None,
) -> float:
    """One Dr. GRPO optimizer step on ``batch.update``; returns the loss before the step.

    ``around_step``: a context manager entered around ``optimizer.step()`` only (e.g.
    ``clients.geometry.AppliedUpdateCapture``, which records ``theta_after - theta_before``).
    """
    weights = dr_grpo_weights(batch.update, max_new_tokens)
    optimizer.zero_grad(set_to_none=True)
    loss = dr_grpo_loss(model, batch.update, batch.advantages, weights)
    loss.backward()
    with around_step if around_step is not None else nullcontext():
        optimizer.step()
    return float(loss.detach())
