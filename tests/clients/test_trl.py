"""TRL integration: the weights reproduce TRL's own loss gradient, unsupported settings are
refused, and a real ``GRPOTrainer`` (our subclass) pushes two steps a live service holds.

Models are tiny Llamas built from configs (rotary positions, so TRL's left-padded prompts and
the capture's re-packed right padding give the same log-probs), the tokenizer a character-level
``PreTrainedTokenizerFast`` built in code; nothing is downloaded.  ``bf16=False`` everywhere:
TRL defaults to bf16 autocast even on the CPU, which would make the identities hold only to
bf16 precision.
"""

from __future__ import annotations

import collections
import copy
import functools
import json
import math
import os
import re
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

pytest.importorskip("trl")
pytestmark = pytest.mark.trl

from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)
from trl import GRPOConfig, GRPOTrainer  # noqa: E402
from trl.trainer.utils import shuffle_sequence_dict, split_tensor_dict  # noqa: E402

from clients.capture import (  # noqa: E402
    SequenceBatch,
    capture_gradients,
    checkpointing_layers,
    repack,
)
from clients.errors import TransportError  # noqa: E402
from clients.http import Client, RetryPolicy  # noqa: E402
from clients.trl import (  # noqa: E402
    RUN_ID_FILE,
    SUPPORTED_LOSS_TYPES,
    KernelscopeConfig,
    KernelscopeGRPOTrainer,
    UnsupportedTRLSettingError,
    check_supported,
    has_loss_of_its_own,
    trl_sequence_weights,
    trl_token_coefficients,
)
from tests.clients.conftest import LiveService  # noqa: E402
from tests.service.conftest import free_port  # noqa: E402

CHARS = "abcdefgh"
PROMPTS = ["abc", "bcdef", "cd", "defg"]  # different lengths: TRL left-pads them


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character of ``CHARS``, plus ``<pad>`` (0) and ``<eos>`` (1)."""
    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>")


def tiny_llama_config(**overrides: Any) -> LlamaConfig:
    """The one-layer Llama of the tests over the character vocabulary (``overrides``: sizes)."""
    values: dict[str, Any] = {
        "vocab_size": len(CHARS) + 2,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "bos_token_id": 1,
        "eos_token_id": 1,
        "pad_token_id": 0,
        **overrides,
    }
    return LlamaConfig(**values)


def tiny_llama(seed: int = 0, initializer_range: float = 0.02) -> LlamaForCausalLM:
    """``initializer_range`` 0.2 instead of 0.02: peaked next-token distributions (the default
    gives near-uniform ones)."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(initializer_range=initializer_range))


def tiny_moe(seed: int = 0) -> Any:
    """A one-layer Qwen3-MoE over the character vocabulary (4 experts, top 2): TRL adds its
    load-balancing loss with the architecture's ``router_aux_loss_coef`` (0.001) by default."""
    from tests.clients.conftest import tiny_moe as moe

    return moe(seed, vocab_size=len(CHARS) + 2, num_hidden_layers=1, bos_token_id=1, eos_token_id=1)


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """Absolute position embeddings: TRL's left padding shifts them (see the logprob check)."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(CHARS) + 2,
        n_positions=32,
        n_embd=16,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
    )
    return GPT2LMHeadModel(config)


def _absolute_positions_family(family: str, dropout: float = 0.0) -> Any:
    """A one- or two-layer model of another family with learned position embeddings over the
    character vocabulary, its dropout ``dropout``: GPT-Neo, GPT-BigCode and BioGPT take
    their positions from the token index (TRL's left padding shifts them), OPT from the
    attention mask (it does not)."""
    from transformers import (
        BioGptConfig,
        BioGptForCausalLM,
        GPTBigCodeConfig,
        GPTBigCodeForCausalLM,
        GPTNeoConfig,
        GPTNeoForCausalLM,
        OPTConfig,
        OPTForCausalLM,
    )

    torch.manual_seed(0)
    common = {"vocab_size": len(CHARS) + 2, "bos_token_id": 1, "eos_token_id": 1, "pad_token_id": 0}
    configs: dict[str, tuple[type, type, dict[str, Any]]] = {
        "gpt_neo": (
            GPTNeoConfig,
            GPTNeoForCausalLM,
            {
                "hidden_size": 16,
                "num_layers": 2,
                "num_heads": 2,
                "attention_types": [[["global", "local"], 1]],
                "window_size": 8,
                "max_position_embeddings": 64,
                "resid_dropout": dropout,
                "embed_dropout": dropout,
                "attention_dropout": dropout,
            },
        ),
        "gpt_bigcode": (
            GPTBigCodeConfig,
            GPTBigCodeForCausalLM,
            {
                "n_embd": 16,
                "n_layer": 1,
                "n_head": 2,
                "n_positions": 64,
                "resid_pdrop": dropout,
                "embd_pdrop": dropout,
                "attn_pdrop": dropout,
            },
        ),
        "biogpt": (
            BioGptConfig,
            BioGptForCausalLM,
            {
                "hidden_size": 16,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "intermediate_size": 32,
                "max_position_embeddings": 64,
                "hidden_dropout_prob": dropout,
                "attention_probs_dropout_prob": dropout,
                "activation_dropout": dropout,
                "layerdrop": 0.0,
            },
        ),
        "opt": (
            OPTConfig,
            OPTForCausalLM,
            {
                "hidden_size": 16,
                "num_hidden_layers": 1,
                "ffn_dim": 32,
                "num_attention_heads": 2,
                "max_position_embeddings": 64,
                "word_embed_proj_dim": 16,
                "dropout": dropout,
                "attention_dropout": dropout,
            },
        ),
    }
    config_class, model_class, values = configs[family]
    return model_class(config_class(**common, **values))


def first_char_reward(completions: list[str], prompts: list[str], **_: Any) -> list[float]:
    """How often the completion repeats the prompt's first character, plus a length term so
    that rewards (hence advantages) vary within every group."""
    return [c.count(p[0]) + 0.1 * len(c) for c, p in zip(completions, prompts, strict=True)]


def trainer_arg_values(tmp_path: Path) -> dict[str, Any]:
    """The tests' TRL arguments, GRPO's and RLOO's: two micro-batches of four completions per
    optimizer step, groups of four, up to six completion tokens, one step, fp32 on the CPU."""
    return {
        "output_dir": str(tmp_path / "trl"),
        "per_device_train_batch_size": 4,
        "num_generations": 4,
        "gradient_accumulation_steps": 2,
        "steps_per_generation": 2,
        "max_completion_length": 6,
        "max_steps": 1,
        "report_to": "none",
        "use_cpu": True,
        "bf16": False,
        "save_strategy": "no",
        "logging_steps": 1,
        "seed": 0,
    }


def grpo_args(tmp_path: Path, **overrides: Any) -> GRPOConfig:
    return GRPOConfig(**{**trainer_arg_values(tmp_path), **overrides})


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _plain_trainer(
    tmp_path: Path, model: Any = None, rollout_func: Any = None, **overrides: Any
) -> GRPOTrainer:
    return GRPOTrainer(
        model=tiny_llama() if model is None else model,
        reward_funcs=first_char_reward,
        args=grpo_args(tmp_path, **overrides),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS * 4}),
        processing_class=char_tokenizer(),
        rollout_func=rollout_func,
    )


class LowPrecisionSampler:
    """vLLM's place in a TRL run, in process: a separate bfloat16 copy of the policy, synced
    from the trainer's weights when TRL syncs vLLM's (``sync_weights``), samples every
    completion and reports the sampled tokens' log-probs under *its* weights (vLLM's
    ``processed_logprobs``: tempered).  It is fed through TRL's own code: passed as
    ``rollout_func`` (TRL's hook for custom generation backends) and, on the built trainer,
    ``use_vllm`` and ``vllm_importance_sampling_correction`` switched on (``use_vllm=True`` in
    the config would start vLLM itself).  TRL's ``_generate_and_score_completions`` then
    computes ``sampling_per_token_logps``, the old log-probs and the truncated or masked
    importance-sampling ratio exactly as it does for a vLLM server.  RLOO has no
    ``rollout_func`` route: there it is the trainer's ``vllm_generation``, whose ``generate``
    TRL's ``_generate_single_turn`` calls (:meth:`generate`)."""

    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.trainer: GRPOTrainer | None = None
        self.copy: torch.nn.Module | None = None
        self.syncs = 0

    def attach(self, trainer: Any) -> Any:
        self.trainer = trainer
        trainer.use_vllm = True
        trainer.vllm_importance_sampling_correction = True
        trainer.vllm_generation = self  # TRL calls its sync_weights() when the step changes
        trainer._last_loaded_step = -1
        return trainer

    def sync_weights(self) -> None:
        """Load the trainer's weights into the sampler's own model, as vLLM's engine does (not
        a deepcopy: TRL's fused-head patch would route the copy's forward to the original)."""
        assert self.trainer is not None
        from transformers import AutoModelForCausalLM

        policy = self.trainer.accelerator.unwrap_model(self.trainer.model)
        if self.copy is None:
            self.copy = AutoModelForCausalLM.from_config(policy.config).eval()
        self.copy.load_state_dict(policy.state_dict())
        self.copy.to(torch.bfloat16)
        self.syncs += 1

    def __call__(self, prompts: list[str], trainer: GRPOTrainer) -> dict[str, Any]:
        """GRPO's route: TRL's ``rollout_func``, given the prompts' text."""
        prompt_ids = [trainer.processing_class(text=p)["input_ids"] for p in prompts]
        completions, logprobs = self._sample(prompt_ids)
        return {"prompt_ids": prompt_ids, "completion_ids": completions, "logprobs": logprobs}

    def generate(
        self, prompts: list[list[int]], images: Any, num_generations: int, profiler: Any = None
    ) -> tuple[list[list[int]], list[list[int]], list[list[list[float]]], None]:
        """RLOO's route: ``VLLMGeneration.generate``'s signature and answer, one completion
        per prompt (TRL's sampler has already repeated each prompt ``num_generations``
        times), its log-probs in vLLM's ``(completion, token, 1)`` layout."""
        assert images is None
        completions, logprobs = self._sample(prompts)
        return prompts, completions, [[[lp] for lp in row] for row in logprobs], None

    def _sample(self, prompt_ids: list[list[int]]) -> tuple[list[list[int]], list[list[float]]]:
        assert self.copy is not None, "TRL syncs the weights before it generates"
        trainer = self.trainer
        assert trainer is not None
        completions, logprobs = [], []
        for ids in prompt_ids:
            sequence, out, lps = list(ids), [], []
            for _ in range(int(trainer.max_completion_length)):
                with torch.no_grad():
                    logits = self.copy(torch.tensor([sequence]), use_cache=False).logits[0, -1]
                logp = torch.log_softmax(logits.float() / float(trainer.temperature), dim=-1)
                token = int(torch.multinomial(logp.exp(), 1, generator=self.generator))
                sequence.append(token)
                out.append(token)
                lps.append(float(logp[token]))
                if token in trainer.eos_token_ids:
                    break
            completions.append(out)
            logprobs.append(lps)
        return completions, logprobs


def _first_micro_batch(trainer: GRPOTrainer) -> dict[str, Any]:
    """The first of two micro-batches of a real generation batch (two prompts, four
    completions each, shuffled as TRL does), the model in training mode and TRL's step
    counter at two accumulation steps."""
    trainer.model.train()
    rows = [{"prompt": p} for p in PROMPTS[:2] for _ in range(4)]  # RepeatSampler order
    torch.manual_seed(0)
    generation = shuffle_sequence_dict(trainer._generate_and_score_completions(rows))
    trainer.current_gradient_accumulation_steps = 2
    return dict(split_tensor_dict(generation, 2)[0])


def micro_capture_batch(micro: dict[str, Any]) -> tuple[SequenceBatch, torch.Tensor]:
    """A TRL micro-batch as the capture takes it (re-packed to right padding), and TRL's
    ``[n, P + C]`` attention mask that :func:`repack` lays per-token values out by."""
    mask = micro["completion_mask"]
    attention = torch.cat([micro["prompt_mask"], mask], dim=1)
    batch = SequenceBatch.from_padded(
        torch.cat([micro["prompt_ids"], micro["completion_ids"]], dim=1),
        attention,
        torch.cat([torch.zeros_like(micro["prompt_mask"]), mask], dim=1).bool(),
    )
    return batch, attention


@pytest.mark.parametrize("loss_type", SUPPORTED_LOSS_TYPES)
def test_weights_reproduce_trl_loss_gradient(tmp_path: Path, loss_type: str) -> None:
    """``-sum_i weight_i A_i dS_i/dtheta`` equals the gradient of TRL's own ``compute_loss``
    on one micro-batch of a real generation batch (gradient accumulation 2, two micro-batches
    per generation, mixed prompt lengths), at the first step where the PPO ratio is 1."""
    extra = {"importance_sampling_level": "sequence"} if loss_type == "luspo" else {}
    trainer = _plain_trainer(tmp_path, loss_type=loss_type, **extra)
    model = trainer.model
    micro = _first_micro_batch(trainer)

    model.zero_grad(set_to_none=True)
    trainer.compute_loss(model, micro).backward()
    trl_grad = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    lengths = micro["completion_mask"].sum(1)
    assert lengths.unique().numel() > 1, "want completions of different lengths"
    assert micro["prompt_mask"].min() == 0, "want left-padded prompts"
    batch, _ = micro_capture_batch(micro)
    captured = capture_gradients(model, batch)
    weights = trl_sequence_weights(
        loss_type,
        micro["completion_mask"],
        gradient_accumulation_steps=2,
        max_completion_length=6,
        num_items_in_batch=float(micro["num_items_in_batch"]),
        steps_per_generation=2,
        epsilon_high=float(trainer.epsilon_high),
    )
    coefficients = (weights * micro["advantages"].double()).float()
    assert coefficients.abs().max() > 0
    for name, rows_w in captured.gradients.items():
        predicted = -torch.einsum("i,i...->...", coefficients, rows_w)
        expected = trl_grad.get(name, torch.zeros_like(predicted))
        torch.testing.assert_close(predicted, expected, rtol=1e-4, atol=1e-7, msg=name)
    # Such a micro-batch is recognised as plain on-policy from its inputs (no update rows and
    # no forward to find out), rightly: TRL's token coefficients are weight_i A_i.
    assert KernelscopeGRPOTrainer._kernelscope_plain_on_policy(trainer, micro)  # type: ignore[arg-type]
    token, entropy, _ = trl_token_coefficients(trainer, model, micro)
    assert entropy is None
    torch.testing.assert_close(
        token.double(),
        coefficients.double()[:, None] * micro["completion_mask"],
        rtol=1e-5,
        atol=1e-9,
    )


def _perturbed_logps(
    trainer: GRPOTrainer, micro: dict[str, Any], scale: float, seed: int
) -> torch.Tensor:
    """TRL's per-token log-probs of the micro-batch's completions under the model with its
    parameters moved by ``scale`` times Gaussian noise: an earlier policy (a later PPO pass) or
    a reference policy for the KL term."""
    import copy

    other = copy.deepcopy(trainer.model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            other,
            torch.cat([micro["prompt_ids"], micro["completion_ids"]], dim=1),
            torch.cat([micro["prompt_mask"], micro["completion_mask"]], dim=1),
            micro["completion_ids"].size(1),
        )
    return logps.detach()


# Settings beyond the on-policy case, injected the way TRL's own code feeds them to
# ``_compute_loss``: the trainer attribute or config field that turns them on, and the input
# that ``_generate_and_score_completions`` would have produced (an earlier policy's
# ``old_per_token_logps`` on a later PPO pass, the reference ``ref_per_token_logps`` for beta,
# a ``tool_mask``, the vLLM sampler's ``importance_sampling_ratio``; ``last_entropy`` sets the
# adaptive entropy controller's last window entropy, under its target so that the bonus applies).
UPDATE_ROW_SETTINGS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "later_pass_clipped": ("grpo", {"num_iterations": 2}, {"old": 0.05}),
    "kl_beta": ("grpo", {}, {"beta": 0.04, "ref": 0.05}),
    "kl_beta_later_pass_dapo": ("dapo", {}, {"beta": 0.04, "ref": 0.05, "old": 0.05}),
    "two_sided_delta": ("bnpo", {"delta": 1.02}, {"old": 0.05}),
    "entropy_mask": ("dapo", {"top_entropy_quantile": 0.5}, {}),
    "off_policy_mask": ("dapo", {"off_policy_mask_threshold": 0.0}, {"old": 0.05}),
    "tool_mask": ("dr_grpo", {}, {"tool_mask": True}),
    "vllm_is_correction": ("grpo", {}, {"is_ratio": True}),
    "sequence_level_sapo": ("sapo", {}, {"old": 0.05}),
    "temperature": ("dapo", {"temperature": 0.7}, {"old": 0.05}),
    "entropy_bonus": ("grpo", {"entropy_coef": 0.05}, {}),
    "entropy_bonus_masked_later_pass": (
        "dapo",
        {"entropy_coef": 0.05, "top_entropy_quantile": 0.5, "temperature": 0.7},
        {"old": 0.05},
    ),
    "adaptive_entropy": (
        "bnpo",
        {"use_adaptive_entropy": True, "entropy_coef": 0.02, "entropy_target": 5.0},
        {"last_entropy": 0.1},
    ),
}


@pytest.mark.parametrize("setting", sorted(UPDATE_ROW_SETTINGS))
def test_update_rows_reproduce_trl_loss_gradient(tmp_path: Path, setting: str) -> None:
    """``sum_i u_i``, with ``u_i = sum_t c_{i,t} grad log pi_{i,t}`` and ``c`` from
    :func:`trl_token_coefficients`, equals ``-grad`` of TRL's own ``compute_loss`` on a real
    micro-batch, for settings whose gradient is not ``sum_i weight_i A_i dS_i``: a later PPO
    pass with clipping, the KL term, two-sided clipping, the entropy and off-policy masks, a tool
    mask, the vLLM importance-sampling correction and the entropy bonus, static or adaptive
    (``u_i`` then also carries ``sum_t e_{i,t} grad H_{i,t}``)."""
    loss_type, config, inject = UPDATE_ROW_SETTINGS[setting]
    trainer = _plain_trainer(tmp_path, loss_type=loss_type, **config)
    micro = _first_micro_batch(trainer)
    mask = micro["completion_mask"]
    if "old" in inject:
        micro["old_per_token_logps"] = _perturbed_logps(trainer, micro, inject["old"], seed=1)
    if "ref" in inject:
        trainer.beta = inject["beta"]
        micro["ref_per_token_logps"] = _perturbed_logps(trainer, micro, inject["ref"], seed=2)
    if inject.get("tool_mask"):
        tool = torch.ones_like(mask)
        tool[:, 1::3] = 0  # every third completion token came from a tool: not trained on
        micro["tool_mask"] = tool
    if inject.get("is_ratio"):
        trainer.use_vllm = True
        trainer.vllm_importance_sampling_correction = True
        g = torch.Generator().manual_seed(3)
        micro["importance_sampling_ratio"] = torch.rand(mask.shape, generator=g) * 1.5 + 0.25
    if "last_entropy" in inject:
        trainer._last_world_entropy = inject["last_entropy"]
    _assert_update_rows_are_trl_gradient(trainer, micro)


def _assert_update_rows_are_trl_gradient(trainer: GRPOTrainer, micro: dict[str, Any]) -> None:
    """``sum_i u_i = -grad`` of TRL's ``compute_loss`` on ``micro``, with ``u_i`` captured from
    :func:`trl_token_coefficients`, which differ from the on-policy ``weight_i A_i``."""
    model = trainer.model
    mask = micro["completion_mask"]
    model.zero_grad(set_to_none=True)
    # First: TRL's loss then moves its adaptive entropy controller, which this call must not.
    coefficients, entropy, router = trl_token_coefficients(trainer, model, micro)
    assert router == 0.0  # a dense model: no router loss
    assert all(p.grad is None for p in model.parameters())
    trainer.compute_loss(model, micro).backward()
    trl_grad = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    assert (entropy is not None) == (trainer.entropy_coef != 0 or trainer.use_adaptive_entropy)
    plain = trl_sequence_weights(
        trainer.loss_type,
        mask,
        gradient_accumulation_steps=2,
        max_completion_length=6,
        num_items_in_batch=float(micro["num_items_in_batch"]),
        steps_per_generation=2,
        epsilon_high=float(trainer.epsilon_high),
    )
    on_policy = (plain * micro["advantages"].double())[:, None].float() * mask
    changed = not torch.allclose(coefficients, on_policy, atol=1e-6)
    assert changed or (entropy is not None and entropy.abs().max() > 0), (
        "the setting changes nothing"
    )

    batch, attention = micro_capture_batch(micro)

    def layout(values: torch.Tensor) -> torch.Tensor:
        return repack(
            torch.cat([torch.zeros_like(micro["prompt_mask"]).float(), values], 1), attention
        )

    captured = capture_gradients(
        model,
        batch,
        token_coefficients=layout(coefficients),
        entropy_coefficients=None if entropy is None else layout(entropy),
        temperature=float(trainer.temperature),
    )
    for name, rows_u in captured.gradients.items():
        predicted = rows_u.sum(0)
        expected = -trl_grad.get(name, torch.zeros_like(predicted))
        torch.testing.assert_close(predicted, expected, rtol=1e-4, atol=1e-7, msg=name)


_WINDOW = {
    "vllm_importance_sampling_clip_min": 0.9997,
    "vllm_importance_sampling_clip_max": 1.0003,
}
#: TRL's four vLLM importance-sampling modes, each with a window narrow enough that it acts,
#: and the KL term, whose gradient TRL weights by the same ratio (``use_bias_correction_kl``)
VLLM_MODES: dict[str, dict[str, Any]] = {
    "token_truncate": {"vllm_importance_sampling_clip_max": 1.0002},
    "token_mask": _WINDOW,
    "sequence_truncate": _WINDOW,
    "sequence_mask": _WINDOW,
    "token_truncate-kl": {"vllm_importance_sampling_clip_max": 1.0002},
}


@pytest.mark.parametrize("mode", sorted(VLLM_MODES))
def test_vllm_sampler_path_reproduces_trl_loss_gradient(tmp_path: Path, mode: str) -> None:
    """The vLLM path through TRL's own code: completions and their log-probs come from a
    separate bfloat16 copy of the policy (:class:`LowPrecisionSampler`), TRL's
    ``_generate_and_score_completions`` turns them into ``importance_sampling_ratio``
    (per token, truncated; or per sequence, masked outside a window), and ``sum_i u_i`` from
    :func:`trl_token_coefficients` equals ``-grad`` of TRL's ``compute_loss`` on the result.
    The windows are narrow enough that truncation and masking both act, in each of TRL's four
    modes, and with the KL term, which TRL also weights by the ratio."""
    sampler = LowPrecisionSampler()
    trainer = sampler.attach(
        _plain_trainer(
            tmp_path,
            rollout_func=sampler,
            loss_type="dapo",
            vllm_importance_sampling_mode=mode.removesuffix("-kl"),
            **VLLM_MODES[mode],
        )
    )
    if mode.endswith("-kl"):  # a reference policy near the trainer's, as TRL's code uses it
        trainer.beta = 0.04
        trainer.ref_model = copy.deepcopy(trainer.model).eval()
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for p in trainer.ref_model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    trainer.model.train()
    rows = [{"prompt": p} for p in PROMPTS[:2] for _ in range(4)]
    generation = trainer._generate_and_score_completions(rows)
    assert sampler.syncs == 1
    ratio = generation["importance_sampling_ratio"]
    sampled = generation["sampling_per_token_logps"]
    mask = generation["completion_mask"].bool()
    gap = (generation["old_per_token_logps"] - sampled)[mask].abs()
    assert 1e-4 < float(gap.max()) < 0.01, "bf16 sampler: close to the trainer's policy"
    if mode.startswith("token_truncate"):
        assert float(ratio[mask].max()) == pytest.approx(1.0002) and float(ratio[mask].min()) < 1
    elif mode == "token_mask":
        assert ratio.shape == mask.shape and (ratio[mask] == 0).any() and (ratio[mask] != 0).any()
    elif mode == "sequence_truncate":
        bounds = torch.tensor([0.9997, 1.0003])
        assert ratio.shape[1] == 1 and torch.isclose(ratio, bounds).any()
    else:
        assert ratio.shape[1] == 1 and (ratio == 0).any() and (ratio != 0).any()
    if mode.endswith("-kl"):
        assert trainer.args.use_bias_correction_kl and "ref_per_token_logps" in generation
    micro = dict(split_tensor_dict(shuffle_sequence_dict(generation), 2)[0])
    trainer.current_gradient_accumulation_steps = 2
    _assert_update_rows_are_trl_gradient(trainer, micro)
    if mode.endswith("-kl"):  # the KL term weighs in the coefficients
        with_kl = trl_token_coefficients(trainer, trainer.model, micro).logprob
        trainer.beta = 0.0
        without = trl_token_coefficients(trainer, trainer.model, micro).logprob
        assert not torch.allclose(with_kl, without, atol=1e-6)


@pytest.mark.parametrize(
    ("later_pass", "capture_kind"),
    [(False, "hooked"), (True, "hooked"), (True, "factorised")],
    ids=["on_policy", "later_pass", "later_pass-factorised"],
)
def test_moe_router_loss_is_in_the_update_rows(
    tmp_path: Path, later_pass: bool, capture_kind: str
) -> None:
    """A mixture-of-experts policy, whose load-balancing loss TRL adds to its loss (the
    architecture's coefficient, raised to 0.5 here so that it weighs): its coefficient ``r =
    -dL/d aux`` comes from TRL's own ``compute_loss`` with ``aux`` a leaf, and the update rows
    from hooks with ``r grad aux_i`` sum to ``-grad`` of TRL's loss (compared through the
    run's sketch, a linear map), on policy and on a later clipped pass, with rows formed in
    the hooks (gaussian) or factorised (kronecker).  Without the router term they do not."""
    from clients.factorised import FactorisedCapture, HookedCapture
    from sketch.spec import sketcher_for

    trainer = _plain_trainer(tmp_path, model=tiny_moe(), loss_type="dapo", router_aux_loss_coef=0.5)
    assert trainer.aux_loss_enabled
    check_supported(trainer)
    model = trainer.model
    micro = _first_micro_batch(trainer)
    if later_pass:
        micro["old_per_token_logps"] = _perturbed_logps(trainer, micro, 0.05, seed=1)
    coefficients = trl_token_coefficients(trainer, model, micro)
    assert coefficients.router == pytest.approx(-0.5 / 2)  # -coef / accumulation steps
    model.zero_grad(set_to_none=True)
    trainer.compute_loss(model, micro).backward()
    trl_grad = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    batch, attention = micro_capture_batch(micro)
    layout = repack(
        torch.cat([torch.zeros_like(micro["prompt_mask"]).float(), coefficients.logprob], 1),
        attention,
    )
    capture: Any
    if capture_kind == "factorised":
        capture = FactorisedCapture(model, dim=256, seed=3, strict=True)
        spec = capture.spec
    else:
        spec = {"kind": "gaussian", "dim": 256, "seed": 3}
        capture = HookedCapture(model, spec, strict=True)
    assert any("experts" in n for n in capture.parameters)
    sketcher = sketcher_for(spec, capture.parameters)
    expected = sketcher.sketch(
        {n: -trl_grad.get(n, torch.zeros_like(p)).unsqueeze(0) for n, p in model.named_parameters()}
    )[0]
    got = {}
    for router in (coefficients.router, 0.0):
        sketches = capture(batch, token_coefficients=layout, router_coefficient=router)
        assert sketches.update_sketch is not None
        got[router] = sketches.update_sketch.sum(0)
    scale = float(expected.abs().max())
    torch.testing.assert_close(got[coefficients.router], expected, rtol=1e-4, atol=1e-5 * scale)
    assert float((got[0.0] - expected).abs().max()) > 1e-3 * scale


def test_token_coefficients_leave_trl_state_alone(tmp_path: Path) -> None:
    """The extra run of TRL's loss inside :func:`trl_token_coefficients` logs no metric and
    does not move the adaptive entropy controller (at a window's end TRL's loss raises or lowers
    ``entropy_coef``; twice per micro-batch would double its pace)."""
    trainer = _plain_trainer(
        tmp_path, loss_type="grpo", use_adaptive_entropy=True, entropy_coef=0.02
    )
    trainer.model.train()
    rows = [{"prompt": p} for p in PROMPTS[:2] for _ in range(4)]
    micro = dict(split_tensor_dict(trainer._generate_and_score_completions(rows), 2)[0])
    trainer.current_gradient_accumulation_steps = 2
    trainer._last_world_entropy = 0.1
    assert trainer.accelerator.sync_gradients  # a window's end: TRL updates the controller
    logged = {k: list(v) for k, v in trainer._metrics["train"].items()}
    _, entropy, _ = trl_token_coefficients(trainer, trainer.model, micro)
    assert entropy is not None and entropy.abs().max() > 0
    assert trainer.entropy_coef == 0.02 and trainer._last_world_entropy == 0.1
    assert trainer._entropy_window_stats is None
    assert {k: list(v) for k, v in trainer._metrics["train"].items()} == logged
    GRPOTrainer.compute_loss(trainer, trainer.model, micro)
    # TRL's own call moves it, by one delta
    assert abs(trainer.entropy_coef - 0.02) == pytest.approx(trainer.args.entropy_coef_delta)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"num_iterations": 2, "steps_per_generation": 1}, "same completions twice"),
    ],
)
def test_unsupported_settings_are_refused(
    tmp_path: Path, overrides: dict[str, Any], fragment: str
) -> None:
    trainer = _plain_trainer(tmp_path, **overrides)
    with pytest.raises(UnsupportedTRLSettingError, match=fragment):
        check_supported(trainer)


@pytest.mark.parametrize(
    "overrides",
    [
        {"num_iterations": 2},
        {"top_entropy_quantile": 0.5},
        {"steps_per_generation": 4},
        {"off_policy_mask_threshold": 0.1},
        {"delta": 1.5},
        {"temperature": 0.7},
    ],
)
def test_settings_covered_by_update_rows_are_accepted(
    tmp_path: Path, overrides: dict[str, Any]
) -> None:
    check_supported(_plain_trainer(tmp_path, **overrides))


def test_off_policy_inputs_are_not_plain(tmp_path: Path) -> None:
    """A KL term, an earlier policy's log-probs or a token mask each make a micro-batch need
    its token coefficients (update rows)."""
    trainer = _plain_trainer(tmp_path)
    rows = [{"prompt": p} for p in PROMPTS[:2] for _ in range(4)]
    micro = split_tensor_dict(trainer._generate_and_score_completions(rows), 2)[0]
    plain = KernelscopeGRPOTrainer._kernelscope_plain_on_policy
    assert plain(trainer, micro)  # type: ignore[arg-type]
    old = micro["completion_mask"].float()
    for extra in ({"old_per_token_logps": old}, {"tool_mask": micro["completion_mask"]}):
        assert not plain(trainer, {**micro, **extra})  # type: ignore[arg-type]
    trainer.beta = 0.04
    assert not plain(trainer, micro)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ({"capture_method": "loop", "sketch_on": "trainer"}, "exact chunks"),
        ({"sketch_on": "service"}, "exact chunks"),
        ({"sketch_on": "trainer", "token_shares": True}, "no completion token"),
    ],
    ids=["exact_chunks", "raw_rows", "token_shares"],
)
def test_moe_router_loss_needs_rows_from_hooks(
    live_service: LiveService, tmp_path: Path, config: dict[str, Any], fragment: str
) -> None:
    """The router loss splits into sequences with the micro-batch's expert counts, which the
    capture by hooks has and exact chunks do not; its part of the step is no token's share.
    With ``router_aux_loss_coef=0`` the same trainers are built."""
    for coefficient in (None, 0.0):
        kernelscope = KernelscopeConfig(url=live_service.base_url, sketch=SKETCH_512, **config)
        args = grpo_args(tmp_path, router_aux_loss_coef=coefficient)
        build = functools.partial(sgd_trainer, args, kernelscope, model=tiny_moe())
        if coefficient is None:
            with pytest.raises(UnsupportedTRLSettingError, match=fragment):
                build()
        else:
            build()


def test_kl_term_is_accepted(tmp_path: Path) -> None:
    # A real beta > 0 makes TRL load a reference model by name (a download); the check reads
    # the trainer's attribute, so set it on a built trainer.
    trainer = _plain_trainer(tmp_path)
    trainer.beta = 0.04
    check_supported(trainer)


#: (model, whether TRL's left padding shifts its positions, whether the check still warns)
_POSITION_FAMILIES: dict[str, tuple[Any, bool, bool]] = {
    "llama": (tiny_llama, False, False),
    "gpt2": (tiny_gpt2, True, False),
    "gpt_neo": (functools.partial(_absolute_positions_family, "gpt_neo"), True, False),
    "gpt_bigcode": (functools.partial(_absolute_positions_family, "gpt_bigcode"), True, False),
    "biogpt": (functools.partial(_absolute_positions_family, "biogpt"), True, False),
    "opt": (functools.partial(_absolute_positions_family, "opt"), False, False),
    # OPT applies its config's dropout functionally, where TRL's disable_dropout (which zeroes
    # nn.Dropout modules) does not reach: TRL's forward has dropout, the capture's does not
    "opt_config_dropout": (
        functools.partial(_absolute_positions_family, "opt", dropout=0.5),
        False,
        True,
    ),
}


@pytest.mark.parametrize(
    ("family", "prompts"),
    [
        *((family, 2) for family in _POSITION_FAMILIES),
        ("llama", 1),
        ("gpt2", 1),
    ],
    ids=lambda value: str(value) if isinstance(value, str) else ("padded", "one_length")[2 - value],
)
def test_logprob_check_places_positions_as_trls_forward_does(
    tmp_path: Path, family: str, prompts: int
) -> None:
    """Rotary positions (Llama) survive TRL's left padding; GPT-2's absolute positions do not:
    TRL's forward places each row's tokens after its padding.  The first micro-batch's check
    finds that the capture matches TRL with those positions (and not without them) and turns
    them on for the run, without a warning; it does so also when that micro-batch's prompts
    are all of one length, with no padding to show it (the check adds a column of its own).
    Before 2026-12-07 GPT-2 only got a warning, and its rows were not TRL's gradient.  The same
    for GPT-Neo, GPT-BigCode and BioGPT; OPT, which takes its positions from the attention
    mask, needs no shift.  What positions cannot explain (dropout in TRL's forward) is still
    named."""
    make_model, shifted, warns = _POSITION_FAMILIES[family]
    trainer = _plain_trainer(tmp_path, model=make_model())
    trainer.model.train()
    rows = [{"prompt": p} for p in PROMPTS[:prompts] for _ in range(4)]
    micro = split_tensor_dict(trainer._generate_and_score_completions(rows), 2)[0]
    assert (micro["prompt_mask"].min() == 0) == (prompts == 2)
    batch, _ = micro_capture_batch(micro)
    # The check only reads the model and TRL's log-prob helper: run it on the plain trainer.
    trainer._ks_exact_method = "vmap"  # configured: it cannot take position ids
    trainer._ks_padded_positions = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        KernelscopeGRPOTrainer._kernelscope_check_logprobs(trainer, micro, batch)
    assert bool([w for w in caught if "captured log-probs differ" in str(w.message)]) == warns
    assert trainer._ks_padded_positions == shifted
    assert trainer._ks_exact_method == ("loop" if shifted else "vmap")


def test_weights_unknown_loss_type() -> None:
    with pytest.raises(UnsupportedTRLSettingError):
        trl_sequence_weights("made_up", torch.ones(2, 3), gradient_accumulation_steps=1)


SKETCH_512 = {"kind": "countsketch", "dim": 512, "seed": 1}


#: two steps of plain SGD (constant rate, no gradient clipping, no weight decay)
SGD_STEPS: dict[str, Any] = {
    "max_steps": 2,
    "optim": "sgd",
    "lr_scheduler_type": "constant",
    "max_grad_norm": 0.0,
    "weight_decay": 0.0,
}


def sgd_args(tmp_path: Path, learning_rate: float, **overrides: Any) -> GRPOConfig:
    """Two steps (unless overridden) of plain SGD (constant rate, no gradient clipping, no
    weight decay): the applied update is exactly ``-eta grad L``, so ``plugin dH1 =
    delta_h1_applied``."""
    return grpo_args(tmp_path, **{**SGD_STEPS, "learning_rate": learning_rate, **overrides})


def adam_later_pass_args(tmp_path: Path, **overrides: Any) -> GRPOConfig:
    """Two steps of AdamW with ``beta1 = 0`` (each step ``-lr c P_t g_t``, so ``plugin dH1 =
    delta_h1_applied`` on both), the second a later PPO pass at ratio != 1 with clipping."""
    values: dict[str, Any] = {
        "learning_rate": 1e-3,
        "optim": "adamw_torch",
        "adam_beta1": 0.0,
        "num_iterations": 2,
        "epsilon": 0.02,
        **overrides,
    }
    return sgd_args(tmp_path, **values)


def sgd_trainer(
    args: GRPOConfig,
    kernelscope: KernelscopeConfig,
    model: Any = None,
    trainer_class: type[KernelscopeGRPOTrainer] = KernelscopeGRPOTrainer,
    **kwargs: Any,
) -> KernelscopeGRPOTrainer:
    """A kernelscope trainer (``trainer_class``) of the tiny Llama on the test prompts
    (``kwargs``: e.g. LoRA)."""
    return trainer_class(
        model=tiny_llama() if model is None else model,
        reward_funcs=first_char_reward,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS * 4}),
        processing_class=char_tokenizer(),
        kernelscope=kernelscope,
        **kwargs,
    )


def assert_run_holds(client: Client, run_id: str, steps: tuple[int, ...]) -> None:
    """The run holds exactly ``steps``, each whole with the identity
    (:func:`assert_plugin_is_applied`)."""
    assert_plugin_is_applied(client, run_id, steps)
    held = [s.step for s in client.get_run(run_id).steps or ()]
    assert sorted(held) == list(steps)


def assert_plugin_is_applied(client: Client, run_id: str, steps: tuple[int, ...]) -> None:
    """Each step is ready with its applied update, and its ``plugin`` prediction (nonzero)
    equals ``delta_h1_applied`` to 1e-3: the identity of a plain-SGD step without clipping."""
    for step in steps:
        status = client.wait_ready(run_id, step, timeout=60)
        assert status.state == "ready" and status.applied_update
        report = client.entropy(run_id, step, estimator="plugin")
        assert report.delta_h1 != 0.0
        assert report.delta_h1_applied == pytest.approx(report.delta_h1, rel=1e-3)


@pytest.mark.parametrize(
    "overrides",
    [
        {"eval_strategy": "steps", "eval_steps": 1, "per_device_eval_batch_size": 4},
        {"num_iterations": 2, "epsilon": 0.02},
        {"entropy_coef": 0.1},
    ],
    ids=["on_policy_with_evaluation", "later_pass_clipped", "entropy_bonus"],
)
def test_trainer_pushes_two_steps(
    live_service: LiveService, tmp_path: Path, overrides: dict[str, Any]
) -> None:
    """A real GRPO run (dapo loss, accumulation 2) with plain SGD and no gradient clipping: the
    service holds both steps, ready, with every generated sequence; and since the applied update
    is then exactly ``-eta grad L``, the service's ``plugin`` prediction (built from the pushed
    rows and learning rate) equals ``<grad_hat H, u>`` computed from the real parameter change.
    With ``num_iterations = 2`` the second step trains again on the first step's completions,
    at PPO ratio != 1 with clipping, and an entropy bonus adds ``e_{i,t} grad H_{i,t}`` terms:
    the identity then holds only through the update rows.  An evaluation after each step
    (TRL generates and scores completions of the evaluation prompts in eval mode) pushes
    nothing: each step holds its training completions alone.  Exact chunks run under vmap with
    TRL's gradient checkpointing on."""
    args = sgd_args(tmp_path, learning_rate=0.05, **overrides)
    evaluation = Dataset.from_dict({"prompt": PROMPTS}) if "eval_strategy" in overrides else None
    trainer = sgd_trainer(
        args,
        KernelscopeConfig(url=live_service.base_url, sketch=SKETCH_512),
        eval_dataset=evaluation,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    # TRL's activation checkpointing hooks the embeddings with requires_grad_, which the
    # capture lifts for vmap (before: vmap failed once per run, then the loop)
    assert not [w for w in caught if "vmap capture failed" in str(w.message)]
    if evaluation is not None:
        assert sum("eval_reward" in h for h in trainer.state.log_history) == 2
    generated = args.per_device_train_batch_size * args.steps_per_generation
    with Client(live_service.base_url) as client:
        run = client.get_run(trainer.kernelscope_run_id)
        assert run.sketch["kind"] == "countsketch" and run.k == 512
        # dapo's weights are not a service normalisation: every row carries its own weight.
        assert run.parameters is not None
        assert sum(math.prod(s) for s in run.parameters.values()) == sum(
            p.numel() for p in trainer.model.parameters()
        )
        for step in (0, 1):
            status = client.wait_ready(trainer.kernelscope_run_id, step, timeout=60)
            assert status.state == "ready"
            assert status.sequences == generated
            assert status.rows == generated  # the applied update is not counted as a row
            assert status.applied_update
            assert status.learning_rate == pytest.approx(0.05)
            report = client.entropy(trainer.kernelscope_run_id, step, estimator="plugin")
            for value in (report.delta_h1, report.delta_h1_applied, report.se_sampling):
                assert value is not None and math.isfinite(value)
            assert isinstance(report.realized, dict) and math.isfinite(report.realized["delta_h"])
            assert report.delta_h1 != 0.0
            assert report.delta_h1_applied == pytest.approx(report.delta_h1, rel=1e-3)
            default = client.entropy(trainer.kernelscope_run_id, step)
            assert math.isfinite(default.delta_h1)


@pytest.mark.parametrize("run_id", ["resumed", None], ids=["configured_id", "drawn_id"])
def test_a_resumed_run_replaces_the_steps_after_its_checkpoint(
    live_service: LiveService, tmp_path: Path, run_id: str | None
) -> None:
    """A run saves a checkpoint after every step; a second trainer resumes from the first
    checkpoint into the same run: the configured ``run_id``, or the drawn one, which each
    checkpoint names (the second trainer's own drawn run, still empty, is deleted).  The steps
    the first attempt pushed after that checkpoint are deleted (with a warning) and pushed
    again: each holds exactly this attempt's sequences, ready, with ``plugin dH1 =
    delta_h1_applied``, and no sequence id repeats across the run's steps.  Before, the
    resumed steps mixed both attempts' sequences (their ids began again at ``s0``), and a
    drawn run id was not kept: the resumed attempt opened a run of its own."""
    args = sgd_args(tmp_path, learning_rate=0.05, max_steps=3, save_strategy="steps", save_steps=1)
    generated = args.per_device_train_batch_size * args.steps_per_generation
    config = KernelscopeConfig(url=live_service.base_url, sketch=SKETCH_512, run_id=run_id)
    first = sgd_trainer(args, config)
    first.train()
    checkpoint = tmp_path / "trl" / "checkpoint-1"
    assert json.loads((checkpoint / RUN_ID_FILE).read_text())["run_id"] == first.kernelscope_run_id
    resumed = sgd_trainer(args, config)
    drawn = resumed.kernelscope_run_id
    with pytest.warns(UserWarning, match=r"resumed at step 1: deleted steps \[1, 2\]"):
        resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 3
    run = resumed.kernelscope_run_id
    assert run == first.kernelscope_run_id
    with Client(live_service.base_url) as client:
        runs = {r.run_id for r in client.runs()}
        assert run in runs and (drawn == run or drawn not in runs)
        seen: set[str] = set()
        for step in (0, 1, 2):
            status = client.wait_ready(run, step, timeout=60)
            assert status.state == "ready" and status.applied_update
            assert status.sequences == generated and status.rows == generated
            ids = set(client.diagonal(run, step).ids)
            assert len(ids) == generated and not ids & seen
            seen |= ids
        assert_plugin_is_applied(client, run, (1, 2))


class _Unreachable(httpx.HTTPTransport):
    """The service's transport, with the requests that ``refused`` picks refused as a dropped
    connection; ``seen`` counts every request by its path."""

    def __init__(self, refused: Callable[[httpx.Request], bool]) -> None:
        super().__init__()
        self.refused = refused
        self.seen: collections.Counter[str] = collections.Counter()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.seen[request.url.path] += 1
        if self.refused(request):
            raise httpx.ConnectError("connection refused", request=request)
        return super().handle_request(request)


@pytest.mark.parametrize("on_push_error", ["warn", "raise"])
def test_a_step_the_service_does_not_take_leaves_training_alone(
    live_service: LiveService, tmp_path: Path, on_push_error: str
) -> None:
    """The service unreachable while step 1's sequences are pushed (every retry refused),
    after its rows and applied update were stored: by default the trainer warns once and
    trains on; steps 0 and 2 are whole and keep ``plugin dH1 = delta_h1_applied``, and step
    1's rows, which would wait forever for this rank's sequences, are deleted once the service
    answers again (after step 2's pushes).  Before, step 1 stayed pending in the run.  With
    ``on_push_error="raise"`` the client's error ends the training step."""
    args = sgd_args(tmp_path, learning_rate=0.05, max_steps=3)
    config = KernelscopeConfig(
        url=live_service.base_url,
        sketch=SKETCH_512,
        on_push_error=on_push_error,  # type: ignore[arg-type]
    )
    client = Client(
        live_service.base_url,
        transport=_Unreachable(lambda r: r.url.path.endswith("/steps/1/sequences")),
        retry=RetryPolicy(attempts=2, backoff_s=0.01),
    )
    trainer = sgd_trainer(args, config, kernelscope_client=client)
    if on_push_error == "raise":
        with pytest.raises(TransportError):
            trainer.train()
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    lost = [str(w.message) for w in caught if "not pushed (" in str(w.message)]
    assert len(lost) == 1 and "step 1 of run" in lost[0]
    back = [str(w.message) for w in caught if "answers again" in str(w.message)]
    assert len(back) == 1 and "at step 2" in back[0]
    assert trainer.state.global_step == 3 and not trainer._ks_lost
    with Client(live_service.base_url) as reader:
        assert_run_holds(reader, trainer.kernelscope_run_id, (0, 2))


def test_an_outage_costs_each_step_one_probe(live_service: LiveService, tmp_path: Path) -> None:
    """The service stops answering during step 1 and comes back at step 4: step 1's push fails
    after the client's retries; steps 2 and 3 each probe ``GET /healthz`` once (refused) and
    send nothing else, so that a hung service costs a step one short probe, not the client's
    timeout times its retries; step 4's probe answers, step 4 is pushed whole with the
    identity, and steps 1-3 are deleted (step 1 had stored its rows).  Before, every step
    of the outage retried each of its pushes."""
    probes = {"refused": 0}

    def down(request: httpx.Request) -> bool:
        if request.url.path == "/healthz" and probes["refused"] < 2:
            probes["refused"] += 1
            return True
        return request.url.path.endswith("/steps/1/sequences")

    transport = _Unreachable(down)
    client = Client(
        live_service.base_url, transport=transport, retry=RetryPolicy(attempts=2, backoff_s=0.01)
    )
    args = sgd_args(tmp_path, learning_rate=0.05, max_steps=5)
    config = KernelscopeConfig(url=live_service.base_url, sketch=SKETCH_512)
    trainer = sgd_trainer(args, config, kernelscope_client=client)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    messages = [str(w.message) for w in caught if str(w.message).startswith("kernelscope:")]
    assert sum("not pushed (" in m for m in messages) == 1
    back = [m for m in messages if "answers again" in m]
    assert len(back) == 1 and "at step 4" in back[0] and "steps [1, 2, 3]" in back[0]
    assert transport.seen["/healthz"] == 3
    assert not any(f"/steps/{step}/" in path for path in transport.seen for step in (2, 3))
    assert not trainer._ks_lost and not trainer._ks_down
    with Client(live_service.base_url) as reader:
        assert_run_holds(reader, trainer.kernelscope_run_id, (0, 4))


def test_every_n_steps_captures_those_steps_alone(
    live_service: LiveService, tmp_path: Path
) -> None:
    """``every_n_steps=3`` over four AdamW steps (``beta1 = 0``; steps 1 and 3 later clipped
    PPO passes): steps 0 and 3 are pushed whole, with ``plugin dH1 = delta_h1_applied`` (step
    3's ``sqrt(P)`` read from the state that steps 1 and 2 left), and steps 1 and 2 send the
    service nothing."""
    transport = _Unreachable(lambda request: False)
    client = Client(live_service.base_url, transport=transport)
    config = KernelscopeConfig(url=live_service.base_url, sketch=SKETCH_512, every_n_steps=3)
    trainer = sgd_trainer(
        adam_later_pass_args(tmp_path, max_steps=4), config, kernelscope_client=client
    )
    recorded: list[int] = []  # the capture's entry point, one call per recorded micro-batch
    record = trainer._kernelscope_record

    def counted(inputs: Any) -> None:
        recorded.append(int(trainer.state.global_step))
        record(inputs)

    trainer._kernelscope_record = counted  # type: ignore[method-assign]
    trainer.train()
    assert trainer.state.global_step == 4 and set(recorded) == {0, 3}
    sent = {path.split("/steps/")[1].split("/")[0] for path in transport.seen if "/steps/" in path}
    assert sent == {"0", "3"}
    with Client(live_service.base_url) as reader:
        assert_run_holds(reader, trainer.kernelscope_run_id, (0, 3))


@pytest.mark.parametrize(
    "live_service",
    [{}, {"env": {"KERNELSCOPE_MAX_WAIT_S": "5"}}],
    ids=["service_waits", "shorter_waits"],
    indirect=True,
)
def test_log_metrics_puts_each_steps_answers_in_the_trainers_logs(
    live_service: LiveService, tmp_path: Path
) -> None:
    """``log_metrics=True``: each step's ``kernelscope/...`` metrics are in the trainer's log
    of that step (``state.log_history``, what ``report_to`` receives), beside TRL's
    ``entropy``, and equal the service's answers of the step, of both targets; also from a
    service that refuses waits as long as ``LOG_WAIT_S`` (the trainer then polls)."""
    config = KernelscopeConfig(url=live_service.base_url, sketch=SKETCH_512, log_metrics=True)
    trainer = sgd_trainer(sgd_args(tmp_path, learning_rate=0.05), config)
    trainer.train()
    logged = {row["step"]: row for row in trainer.state.log_history if "entropy" in row}
    assert sorted(logged) == [1, 2]  # TRL logs step s's metrics at global_step s + 1
    with Client(live_service.base_url) as reader:
        for step in (0, 1):
            row = logged[step + 1]
            for prefix, target in (
                ("kernelscope/", "sequence"),
                ("kernelscope/token_mean/", "token_mean"),
            ):
                report = reader.entropy(trainer.kernelscope_run_id, step, target=target)
                assert report.realized is not None and report.delta_h1_applied is not None
                assert row[prefix + "delta_h1"] == pytest.approx(report.delta_h1, rel=1e-9)
                assert row[prefix + "se_sampling"] == pytest.approx(report.se_sampling, rel=1e-9)
                assert row[prefix + "se_sketch"] == pytest.approx(report.se_sketch, rel=1e-9)
                assert row[prefix + "delta_h1_applied"] == pytest.approx(report.delta_h1_applied)
                assert row[prefix + "realized"] == pytest.approx(report.realized["delta_h"])
                assert row[prefix + "realized_se"] == pytest.approx(report.realized["se"])


def test_answers_the_service_does_not_give_are_not_logged(
    live_service: LiveService, tmp_path: Path
) -> None:
    """``log_metrics=True`` with the analyses refused: a warning per step, training goes on,
    the steps are pushed whole and nothing of kernelscope's is logged."""
    client = Client(
        live_service.base_url,
        transport=_Unreachable(lambda r: r.url.path.endswith("/entropy")),
        retry=RetryPolicy(attempts=2, backoff_s=0.01),
    )
    config = KernelscopeConfig(url=live_service.base_url, sketch=SKETCH_512, log_metrics=True)
    trainer = sgd_trainer(sgd_args(tmp_path, learning_rate=0.05), config, kernelscope_client=client)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    messages = [str(w.message) for w in caught if "answers are not logged" in str(w.message)]
    assert len(messages) == 2 and "step 0 of run" in messages[0]
    assert not any(
        key.startswith("kernelscope/") for row in trainer.state.log_history for key in row
    )
    with Client(live_service.base_url) as reader:
        assert_plugin_is_applied(reader, trainer.kernelscope_run_id, (0, 1))


@pytest.mark.parametrize("value", [0, -2, 1.5, True])
def test_every_n_steps_and_chunk_size_are_counts(value: Any) -> None:
    for name in ("every_n_steps", "chunk_size"):
        with pytest.raises(ValueError, match=f"KernelscopeConfig.{name} must be an integer"):
            KernelscopeConfig(url="http://127.0.0.1:1", **{name: value})


class _DoubledLoss(GRPOTrainer):
    """A user's GRPO trainer with a loss of its own: twice TRL's."""

    def compute_loss(self, *args: Any, **kwargs: Any) -> Any:
        return 2.0 * super().compute_loss(*args, **kwargs)


class _KernelscopeBeforeDoubled(KernelscopeGRPOTrainer, _DoubledLoss):
    """kernelscope mixed into the user's trainer: its loss comes after in the MRO."""


class _DoubledKernelscope(KernelscopeGRPOTrainer):
    """The user's trainer as a subclass of kernelscope's: its loss comes first."""

    def compute_loss(self, *args: Any, **kwargs: Any) -> Any:
        return 2.0 * super().compute_loss(*args, **kwargs)


@pytest.mark.parametrize("trainer_class", [_KernelscopeBeforeDoubled, _DoubledKernelscope])
def test_a_trainer_with_a_loss_of_its_own_is_captured_with_it(
    live_service: LiveService, tmp_path: Path, trainer_class: type[KernelscopeGRPOTrainer]
) -> None:
    """A subclass's own ``compute_loss`` (twice TRL's, on policy), before or after
    kernelscope's trainer in the MRO: the update rows come from that loss, not TRL's, so a
    two-step SGD run keeps ``plugin dH1 = delta_h1_applied``.  Before, the coefficients were
    TRL's own loss's, and an on-policy micro-batch skipped them: the prediction was half the
    applied change."""
    config = KernelscopeConfig(url=live_service.base_url, sketch=SKETCH_512)
    trainer = sgd_trainer(sgd_args(tmp_path, 0.05), config, trainer_class=trainer_class)
    assert has_loss_of_its_own(trainer_class) and not has_loss_of_its_own(KernelscopeGRPOTrainer)
    trainer.train()
    with Client(live_service.base_url) as client:
        assert_plugin_is_applied(client, trainer.kernelscope_run_id, (0, 1))


@pytest.mark.parametrize("num_iterations", [1, 2], ids=["on_policy", "later_pass_clipped"])
def test_trls_gmpo_trainer_composed_with_kernelscopes(
    live_service: LiveService, tmp_path: Path, num_iterations: int
) -> None:
    """A loss of its own from TRL itself: ``trl.experimental.gmpo.GMPOTrainer`` (the geometric
    mean of the clipped token ratios, per sequence; a ``_compute_loss`` of its own on TRL's
    log-probs), composed as docs/trl.md says (``class Mine(KernelscopeGRPOTrainer,
    GMPOTrainer)``).  On a two-step SGD run, on policy (GMPO's coefficients at ratio 1 are
    ``A_i / |o_i|`` per token, not the ``dapo`` weights of the arguments) or with the second
    step a later pass whose log-ratios GMPO clips, ``plugin dH1 = delta_h1_applied`` on both
    steps: the update rows carry GMPO's coefficients."""
    gmpo = pytest.importorskip("trl.experimental.gmpo")

    class KernelscopeGMPOTrainer(KernelscopeGRPOTrainer, gmpo.GMPOTrainer):  # type: ignore[misc]
        pass

    assert has_loss_of_its_own(KernelscopeGMPOTrainer)
    config = KernelscopeConfig(url=live_service.base_url, sketch=SKETCH_512)
    args = sgd_args(tmp_path, 0.05, num_iterations=num_iterations, epsilon=0.02)
    trainer = sgd_trainer(args, config, trainer_class=KernelscopeGMPOTrainer)
    trainer.train()
    clipped = [h["clip_ratio/region_mean"] for h in trainer.state.log_history[:2]]
    assert clipped[0] == 0.0 and (clipped[1] > 0.0) == (num_iterations == 2)
    with Client(live_service.base_url) as client:
        assert_plugin_is_applied(client, trainer.kernelscope_run_id, (0, 1))


def test_a_truncated_sampler_is_named_when_the_trainer_is_built(
    live_service: LiveService, tmp_path: Path
) -> None:
    """Nucleus or top-k sampling (in TRL's config or its ``generation_kwargs``) draws the
    completions from another distribution than the policy's: the trainer says so, once, when
    it is built; TRL's defaults and a top-k of -1 (vLLM's "off") say nothing."""
    config = KernelscopeConfig(url=live_service.base_url, sketch=SKETCH_512)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="kernelscope: completions are sampled")
        sgd_trainer(sgd_args(tmp_path, 0.05), config)
        sgd_trainer(sgd_args(tmp_path, 0.05, top_k=-1), config)  # vLLM's "off"
    args = sgd_args(tmp_path, 0.05, top_p=0.9, generation_kwargs={"top_k": 5, "do_sample": True})
    with pytest.warns(UserWarning, match=r"sampled with top_p=0\.9, top_k=5, not from the policy"):
        sgd_trainer(args, config)


KRONECKER_256 = {"kind": "kronecker", "dim": 256, "seed": 2}


@pytest.mark.parametrize(
    ("beta1", "method", "sketch", "max_grad_norm"),
    [
        (0.0, "auto", SKETCH_512, 0.0),
        (0.9, "auto", SKETCH_512, 0.0),
        (0.0, "loop", SKETCH_512, 0.0),
        (0.0, "auto", KRONECKER_256, 0.0),
        (0.9, "auto", KRONECKER_256, 0.0),
        (0.0, "auto", SKETCH_512, 0.01),
    ],
    ids=[
        "countsketch-beta0",
        "countsketch-beta0.9",
        "countsketch-loop",
        "kronecker-beta0",
        "kronecker-beta0.9",
        "countsketch-clipped",
    ],
)
def test_adam_geometry_with_rows_sketched_on_the_trainer(
    live_service: LiveService,
    tmp_path: Path,
    beta1: float,
    method: str,
    sketch: dict[str, Any],
    max_grad_norm: float,
) -> None:
    """A real GRPO run with AdamW (no weight decay) and rows sketched on the trainer: the run
    is in ``adam`` geometry (the default for Adam), the rows are ``sqrt(P_t) w_i`` with the
    preconditioner of the step being taken (also the first, from an empty state), and the
    pushed rate is ``lr c (1 - beta1) / (1 - beta1^t)``, the step's own gradient's share of
    Adam's momentum, ``c`` what clipping scaled the gradient by (``min(1, max_grad_norm /
    (norm + 1e-6))``; 1 unclipped; ``max_grad_norm = 0.01`` clips both steps).  The first
    step is exactly ``-lr c P_1 g_1`` for any ``beta1``, so there ``plugin dH1 =
    delta_h1_applied``; with ``beta1 = 0`` every step is ``-lr c P_t g_t`` and the identity
    holds on the second step too, a later pass at ratio != 1 (update rows).
    Rows come from the hook capture (``auto``) or from exact chunks (``loop``); with
    ``kind="kronecker"`` from the hook capture too (each layer's ``sqrt(P_t) G_i`` sketched as
    ``A sqrt(P_t) G_i B^T``), and so is the applied update ``u / sqrt(P_t)``."""
    lr = 1e-3
    args = sgd_args(
        tmp_path,
        learning_rate=lr,
        optim="adamw_torch",
        adam_beta1=beta1,
        num_iterations=2,
        epsilon=0.02,
        max_grad_norm=max_grad_norm,
    )
    kernelscope = KernelscopeConfig(
        url=live_service.base_url,
        sketch=sketch,
        sketch_on="trainer",
        capture_method=method,  # type: ignore[arg-type]
    )
    trainer = sgd_trainer(args, kernelscope)
    assert trainer.kernelscope_geometry == "adam" and trainer.kernelscope_sketcher is not None
    assert (trainer._hooked is not None) == (method == "auto")
    assert trainer._factorised is None
    trainer.train()
    if trainer._hooked is not None:  # TRL's default gradient checkpointing: so is the capture
        assert trainer._hooked.checkpointing
        policy = trainer._kernelscope_policy()
        assert len(checkpointing_layers(policy)) == policy.config.num_hidden_layers
    norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    with Client(live_service.base_url) as client:
        run = client.get_run(trainer.kernelscope_run_id)
        assert run.geometry == "adam" and run.sketch["kind"] == sketch["kind"]
        assert run.applied_includes_step  # -lr c P_t m_hat_t: eta P_t g_hat plus momentum
        for step in (0, 1):
            status = client.wait_ready(trainer.kernelscope_run_id, step, timeout=60)
            assert status.state == "ready" and status.applied_update
            share = (1 - beta1) / (1 - beta1 ** (step + 1))
            clip = min(1.0, max_grad_norm / (norms[step] + 1e-6)) if max_grad_norm else 1.0
            assert clip < 0.1 if max_grad_norm else clip == 1.0
            assert status.learning_rate == pytest.approx(lr * clip * share)
            report = client.entropy(trainer.kernelscope_run_id, step, estimator="plugin")
            assert report.delta_h1 != 0.0
            if step == 0 or beta1 == 0.0:
                assert report.delta_h1_applied == pytest.approx(report.delta_h1, rel=1e-3)


@pytest.mark.parametrize("checkpointing", [True, False], ids=["checkpointed", "kept"])
def test_moe_run_with_its_router_loss(
    live_service: LiveService, tmp_path: Path, checkpointing: bool
) -> None:
    """A real GRPO run of a mixture-of-experts policy with AdamW (``beta1 = 0``), its
    load-balancing loss in TRL's loss (``router_aux_loss_coef = 0.5``), rows from hooks
    (router, 3-D experts and all, checkpointed as TRL's forward or not) and a later clipped
    pass: every micro-batch pushes update rows carrying the router loss's part, and
    ``plugin dH1 = delta_h1_applied`` on both steps."""
    args = adam_later_pass_args(
        tmp_path, router_aux_loss_coef=0.5, gradient_checkpointing=checkpointing
    )
    kernelscope = KernelscopeConfig(
        url=live_service.base_url, sketch=SKETCH_512, sketch_on="trainer"
    )
    trainer = sgd_trainer(args, kernelscope, model=tiny_moe())
    assert trainer.kernelscope_geometry == "adam" and trainer._hooked is not None
    assert any("experts" in n for n in trainer._hooked.parameters)
    pushed: list[str] = []
    push = trainer.kernelscope_client.push_sketches

    def counted(*a: Any, **kw: Any) -> Any:
        pushed.append(kw.get("rows", "score"))
        return push(*a, **kw)

    trainer.kernelscope_client.push_sketches = counted  # type: ignore[method-assign]
    trainer.train()
    assert trainer._hooked is not None  # no fallback to exact chunks
    assert pushed.count("update") == pushed.count("score") > 0
    with Client(live_service.base_url) as client:
        for step in (0, 1):
            status = client.wait_ready(trainer.kernelscope_run_id, step, timeout=60)
            assert status.state == "ready" and status.applied_update
            report = client.entropy(trainer.kernelscope_run_id, step, estimator="plugin")
            assert report.delta_h1 != 0.0
            assert report.delta_h1_applied == pytest.approx(report.delta_h1, rel=1e-3)


#: family: (the module class re-run per sequence, one of the parameters that re-run takes)
REREAD_FAMILIES = {
    "qwen3_5_text": ("Qwen3_5GatedDeltaNet", "conv1d.weight"),
    "gpt_oss": ("GptOssAttention", "sinks"),
}


@pytest.mark.parametrize("family", sorted(REREAD_FAMILIES))
def test_runs_of_families_whose_modules_are_re_run(
    live_service: LiveService, tmp_path: Path, family: str
) -> None:
    """Real GRPO runs, checkpointed as TRL's forward, with AdamW (``beta1 = 0``), rows from
    hooks and a later clipped pass, of a Qwen3.5 (a gated delta net, whose ``conv1d`` weight
    the first capture gives to its mixer: its kernel reads it without calling the module) and
    of a GPT-OSS (attention sinks, re-run with their attention; MoE with TRL's router loss):
    no micro-batch falls back to exact chunks, and ``plugin dH1 = delta_h1_applied`` on both
    steps."""
    from tests.clients.test_factorised import FAMILIES, tiny_family

    values = {
        **FAMILIES[family],
        "vocab_size": len(CHARS) + 2,
        "bos_token_id": 1,
        "eos_token_id": 1,
    }
    args = adam_later_pass_args(tmp_path)
    kernelscope = KernelscopeConfig(
        url=live_service.base_url, sketch=SKETCH_512, sketch_on="trainer"
    )
    trainer = sgd_trainer(args, kernelscope, model=tiny_family(family, values))
    assert trainer._hooked is not None
    assert trainer.aux_loss_enabled == (family == "gpt_oss")
    trainer.train()
    hooked = trainer._hooked
    assert hooked is not None and hooked.checkpointing  # no fallback to exact chunks
    module, parameter = REREAD_FAMILIES[family]
    owners = [own for m, _, own in hooked._plan if type(m).__name__ == module]
    assert owners and all(parameter in own for own in owners)
    with Client(live_service.base_url) as client:
        assert_plugin_is_applied(client, trainer.kernelscope_run_id, (0, 1))


@pytest.mark.parametrize(
    "overrides",
    [{"cast_lm_head_to_fp32": True}, {"torch_compile": True, "torch_compile_backend": "aot_eager"}],
    ids=["lm_head_in_float32", "torch_compile"],
)
def test_runs_with_what_trainers_do_to_the_model(
    live_service: LiveService, tmp_path: Path, overrides: dict[str, Any]
) -> None:
    """Real GRPO runs (AdamW, ``beta1 = 0``, a later clipped pass, rows from hooks) where the
    trainer changes the model it trains: TRL's ``cast_lm_head_to_fp32`` sets a forward on the
    LM head's instance, which keeps its linear hook (its first call returns ``nn.Linear``'s);
    ``torch_compile`` trains a compiled model (dynamo, here with the ``aot_eager`` backend,
    which skips code generation) while the capture runs the eager one.  ``plugin dH1 =
    delta_h1_applied`` on both steps."""
    args = adam_later_pass_args(tmp_path, **overrides)
    kernelscope = KernelscopeConfig(
        url=live_service.base_url, sketch=SKETCH_512, sketch_on="trainer"
    )
    trainer = sgd_trainer(args, kernelscope)
    trainer.train()
    hooked = trainer._hooked
    assert hooked is not None and hooked.checkpointing
    kinds = {name: kind for _, kind, own in hooked._plan for name in own.values()}
    assert kinds["lm_head.weight"] == "linear"
    if "torch_compile" in overrides:
        assert isinstance(trainer.model_wrapped, torch._dynamo.eval_frame.OptimizedModule)
    else:
        assert "forward" in vars(trainer._kernelscope_policy().lm_head)
    with Client(live_service.base_url) as client:
        assert_plugin_is_applied(client, trainer.kernelscope_run_id, (0, 1))


def test_kronecker_with_adam_takes_exact_rows(live_service: LiveService, tmp_path: Path) -> None:
    """``kind="kronecker"`` in ``adam`` geometry (refused before): asked for, or the default
    with AdamW, it is accepted, and its rows are exact rows from hooks sketched with the run's
    kronecker sketch on the trainer (under ``sketch_on="auto"`` too, for this model below the
    size threshold); ``geometry="sgd"`` keeps the factorised capture."""
    from clients.factorised import FactorisedCapture, HookedCapture
    from sketch.kronecker import KroneckerSketch

    for geometry in ("adam", "auto"):
        config = KernelscopeConfig(
            url=live_service.base_url,
            sketch=KRONECKER_256,
            geometry=geometry,
        )
        adamw = sgd_trainer(grpo_args(tmp_path), config)
        assert adamw.kernelscope_geometry == "adam" and adamw._factorised is None
        assert isinstance(adamw._hooked, HookedCapture)
        assert isinstance(adamw._hooked.sketcher, KroneckerSketch)
        assert isinstance(adamw.kernelscope_sketcher, KroneckerSketch)
        with Client(live_service.base_url) as client:
            assert client.get_run(adamw.kernelscope_run_id).geometry == "adam"
    config = KernelscopeConfig(url=live_service.base_url, sketch=KRONECKER_256, geometry="sgd")
    factorised = sgd_trainer(grpo_args(tmp_path), config)
    assert factorised.kernelscope_geometry == "sgd" and factorised._hooked is None
    assert isinstance(factorised._factorised, FactorisedCapture)
    with Client(live_service.base_url) as client:
        # AdamW's update is not the pushed rate times g_hat in sgd geometry
        assert not client.get_run(factorised.kernelscope_run_id).applied_includes_step


def test_factorised_kronecker_run(live_service: LiveService, tmp_path: Path) -> None:
    """``kind="kronecker"`` under plain SGD (``sgd`` geometry): factorised rows, update rows (a
    later pass at ratio != 1, with an entropy bonus) and the applied update all sketched on the
    trainer, and the identity ``plugin dH1 = delta_h1_applied`` holds."""
    args = sgd_args(tmp_path, learning_rate=0.05, num_iterations=2, epsilon=0.02, entropy_coef=0.1)
    config = KernelscopeConfig(url=live_service.base_url, sketch=KRONECKER_256)
    trainer = sgd_trainer(args, config)
    assert trainer.kernelscope_geometry == "sgd" and trainer._factorised is not None
    trainer.train()
    with Client(live_service.base_url) as client:
        assert client.get_run(trainer.kernelscope_run_id).applied_includes_step  # plain SGD
        assert_plugin_is_applied(client, trainer.kernelscope_run_id, steps=(0, 1))


def test_grouped_kronecker_run_takes_exact_rows(live_service: LiveService, tmp_path: Path) -> None:
    """A grouped ``kind="kronecker"`` spec under plain SGD: every group has factors of its own,
    which the factorised capture (one ``dim``, one ``seed``) cannot make, so the rows are exact
    rows from hooks sketched with the run's grouped sketcher, and ``plugin dH1 =
    delta_h1_applied`` holds (the factorised capture's rows had the wrong width for the run)."""
    from clients.factorised import HookedCapture

    spec = {
        **KRONECKER_256,
        "groups": [{"name": "attention", "pattern": r".*(attn|attention).*", "dim": 64}],
    }
    args = sgd_args(tmp_path, learning_rate=0.05)
    trainer = sgd_trainer(args, KernelscopeConfig(url=live_service.base_url, sketch=spec))
    assert trainer.kernelscope_geometry == "sgd" and trainer._factorised is None
    assert isinstance(trainer._hooked, HookedCapture)
    trainer.train()
    with Client(live_service.base_url) as client:
        assert_plugin_is_applied(client, trainer.kernelscope_run_id, steps=(0, 1))


@pytest.mark.parametrize(
    ("sketch", "method", "optim"),
    [
        (SKETCH_512, "auto", "adamw_torch"),
        (SKETCH_512, "loop", "adamw_torch"),
        (KRONECKER_256, "auto", "sgd"),
    ],
    ids=["countsketch-hooks-adam", "countsketch-loop-adam", "kronecker-factorised-sgd"],
)
def test_entropy_sum_rows_give_the_services_entropy_gradient(
    live_service: LiveService, tmp_path: Path, sketch: dict[str, Any], method: str, optim: str
) -> None:
    """``entropy_sum_rows=True``: every sequence's ``z_i = grad sum_t H_t`` is pushed beside its
    score rows (from the hooks' forward, from exact chunks, or factorised), so the service
    answers with ``entropy_gradient = entropy_sum`` (math.md §3) on both steps of a run whose
    second step is a later clipped pass; ``plugin dH1 = delta_h1_applied`` still holds (AdamW
    with ``beta1 = 0``, or SGD); the configuration refuses it without entropy sums."""
    args = sgd_args(
        tmp_path,
        learning_rate=1e-3 if optim != "sgd" else 0.05,
        optim=optim,
        adam_beta1=0.0,
        num_iterations=2,
        epsilon=0.02,
    )
    kernelscope = KernelscopeConfig(
        url=live_service.base_url,
        sketch=sketch,
        sketch_on="trainer",
        capture_method=method,  # type: ignore[arg-type]
        entropy_sum_rows=True,
    )
    trainer = sgd_trainer(args, kernelscope)
    trainer.train()
    with Client(live_service.base_url) as client:
        assert_plugin_is_applied(client, trainer.kernelscope_run_id, steps=(0, 1))
        for step in (0, 1):
            answer = client.entropy(trainer.kernelscope_run_id, step)
            assert answer.entropy_gradient == "entropy_sum"
    with pytest.raises(ValueError, match="entropy_sum_rows"):
        KernelscopeConfig(url=live_service.base_url, entropy_sum_rows=True, push_entropy_sums=False)


def test_entropy_sums_before_the_step_come_from_the_capture_forward(
    live_service: LiveService, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With rows captured by hooks, each sequence's ``entropy_sum`` comes from the logits of
    the capture's own forward: the separate forward runs only after the step (for
    ``logprob_after`` and ``entropy_sum_after``), and every sequence has both sums."""
    import inspect

    import clients.trl as trl_module

    callers: list[str] = []
    separate = trl_module.sequence_logprobs_and_entropy_sums

    def counted(*args: Any, **kwargs: Any) -> Any:
        callers.append(inspect.stack()[1].function)
        return separate(*args, **kwargs)

    monkeypatch.setattr(trl_module, "sequence_logprobs_and_entropy_sums", counted)
    config = KernelscopeConfig(url=live_service.base_url, sketch=KRONECKER_256)
    trainer = sgd_trainer(sgd_args(tmp_path, learning_rate=0.05, max_steps=1), config)
    assert trainer._factorised is not None
    trainer.train()
    assert callers and "_kernelscope_before_step" not in callers
    with Client(live_service.base_url) as client:
        client.wait_ready(trainer.kernelscope_run_id, 0, timeout=60)
        answer = client.entropy(trainer.kernelscope_run_id, 0, target="token_mean")
        assert answer.realized is not None and answer.realized["source"] == "entropy_sum"


def test_vllm_sampler_run(live_service: LiveService, tmp_path: Path) -> None:
    """A two-step run of a peaked policy whose completions come from the bfloat16 sampler
    through TRL's vLLM path (:class:`LowPrecisionSampler`; per-token importance ratios of
    0.98-1.02, truncated at 1.005): TRL syncs the sampler once per step, and with plain SGD
    ``plugin dH1 = delta_h1_applied`` holds through the update rows that carry the correction,
    and misses without them."""
    results = {}
    for update_rows in (None, False):
        sampler = LowPrecisionSampler()
        args = sgd_args(
            tmp_path,
            learning_rate=0.05,
            loss_type="dapo",
            vllm_importance_sampling_mode="token_truncate",
            vllm_importance_sampling_clip_max=1.005,
        )
        kernelscope = KernelscopeConfig(
            url=live_service.base_url, sketch=SKETCH_512, update_rows=update_rows
        )
        trainer = sgd_trainer(
            args, kernelscope, model=tiny_llama(initializer_range=0.2), rollout_func=sampler
        )
        sampler.attach(trainer)
        trainer.train()
        assert sampler.syncs == 2
        results[update_rows] = trainer.kernelscope_run_id
    with Client(live_service.base_url) as client:
        assert_plugin_is_applied(client, results[None], steps=(0, 1))
        without = [client.entropy(results[False], s, estimator="plugin") for s in (0, 1)]
        # measured: 1.6e-3 and 3.6e-3 relative without update rows, 1e-7 with them
        assert all(
            abs(r.delta_h1 - r.delta_h1_applied) > 1e-3 * abs(r.delta_h1_applied) for r in without
        )


@pytest.mark.parametrize(
    ("sketch", "fields"),
    [
        (SKETCH_512, {}),
        (SKETCH_512, {"sketch_on": "trainer"}),
        (KRONECKER_256, {}),
        ({"kind": "exact", "dim": 1}, {"token_shares": True}),
    ],
    ids=["exact_chunks", "hooks", "factorised", "token_shares"],
)
def test_gpt2_run_with_left_padded_prompts_keeps_the_identity(
    live_service: LiveService, tmp_path: Path, sketch: dict[str, Any], fields: dict[str, Any]
) -> None:
    """A GPT-2 policy (absolute position embeddings) on prompts of different lengths, which
    TRL left-pads: with the positions TRL's forward gives (``SequenceBatch.position_offsets``)
    every capture (exact chunks, hooks, the factorised kronecker capture, token shares) takes
    TRL's gradient, and a two-step SGD run keeps ``plugin dH1 = delta_h1_applied`` (token
    shares: they add up to the ``cross_fit`` ``dH1``)."""
    config = KernelscopeConfig(url=live_service.base_url, sketch=sketch, **fields)
    trainer = sgd_trainer(sgd_args(tmp_path, 0.05), config, model=tiny_gpt2())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert trainer._ks_padded_positions
    assert not [w for w in caught if "kernelscope" in str(w.message)]
    run_id = trainer.kernelscope_run_id
    with Client(live_service.base_url) as client:
        assert_plugin_is_applied(client, run_id, (0, 1))
        if fields.get("token_shares"):
            for step in (0, 1):
                fit = client.entropy(run_id, step, estimator="cross_fit")
                tokens = client.tokens(run_id, step, top=5)
                assert tokens.total == pytest.approx(fit.delta_h1, rel=1e-3, abs=1e-9)


@pytest.mark.parametrize("variant", ["adapters", "adapters_and_head", "dora"])
def test_lora_run_pushes_adapter_rows(
    live_service: LiveService, tmp_path: Path, variant: str
) -> None:
    """A real GRPO run with a ``peft`` LoRA adapter on the attention projections and
    ``ParameterFilter(lora_only=True)``: only the adapter parameters are declared, captured and
    updated, and the identity of the one-process test holds over them (plain SGD, no gradient
    clipping: the ``plugin`` prediction equals ``delta_h1_applied`` from the real change of the
    adapter parameters), also on a later pass at ratio != 1 with clipping (update rows).
    With ``modules_to_save=["lm_head"]`` peft also trains a whole copy of the head, which
    ``lora_only`` leaves out: the trainer says so when it is built; a filter that takes the
    copy too studies every parameter the step moves, with the same identity.  DoRA's
    magnitude vectors are adapter parameters too, captured by hooks, checkpointed as TRL's
    forward, with rows sketched on the trainer (before 2026-12-06 DoRA fell back to exact
    chunks)."""
    peft = pytest.importorskip("peft")
    from clients.filters import ParameterFilter

    args = sgd_args(tmp_path, learning_rate=0.5, num_iterations=2, epsilon=0.02)
    lora = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        lora_dropout=0.0,
        modules_to_save=["lm_head"] if variant == "adapters_and_head" else None,
        use_dora=variant == "dora",
    )
    head = variant == "adapters_and_head"

    def trainer_with(parameter_filter: ParameterFilter) -> KernelscopeGRPOTrainer:
        config = KernelscopeConfig(
            url=live_service.base_url,
            sketch={"kind": "countsketch", "dim": 256, "seed": 1},
            parameter_filter=parameter_filter,
            sketch_on="trainer" if variant == "dora" else "auto",
        )
        return sgd_trainer(args, config, peft_config=lora)

    marker, studied = "lora_", ParameterFilter(lora_only=True)
    if head:
        with pytest.warns(UserWarning, match=r"1 trainable parameters .*modules_to_save"):
            trainer_with(studied)
        marker = r"lora_|\.modules_to_save\."
        studied = ParameterFilter(include_regex=marker)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="kernelscope: .* not studied")
        trainer = trainer_with(studied)
    trainer.train()
    if variant == "dora":  # rows from hooks, no fallback to exact chunks
        assert trainer._hooked is not None and trainer._hooked.checkpointing
    with Client(live_service.base_url) as client:
        run = client.get_run(trainer.kernelscope_run_id)
        assert run.parameters is not None and run.parameters
        assert all(re.search(marker, name) for name in run.parameters)
        assert any("magnitude" in name for name in run.parameters) == (variant == "dora")
        trained = [p for p in trainer.model.parameters() if p.requires_grad]
        assert sum(math.prod(s) for s in run.parameters.values()) == sum(p.numel() for p in trained)
        assert_plugin_is_applied(client, trainer.kernelscope_run_id, steps=(0, 1))


def launch_two_ranks(script: str, url: str, out: Path) -> None:
    """``accelerate launch --multi_gpu --num_processes 2 tests/clients/SCRIPT URL OUT`` (the
    scripts' runs have ``use_cpu``: gloo on the CPU; accelerate 1.15's ``--cpu`` launches
    several processes only through mpirun), which must succeed."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        str(Path(__file__).with_name(script)), url, str(out),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]


def test_two_ranks_push_one_step_each(live_service: LiveService, tmp_path: Path) -> None:
    """``accelerate launch --multi_gpu --num_processes 2`` of a real GRPO run with ``use_cpu``
    (gloo DDP on the CPU: accelerate 1.15's ``--cpu`` launches several processes only through
    mpirun) and plain SGD: each rank pushes its own completions (3 per micro-batch, generation
    groups of 4, so one group spans the ranks), the main process pushes the applied update
    once, and every step is ready with both ranks' sequences: 12 per step, four per prompt.
    Step 1 re-trains step 0's completions (same ids) at ratio != 1 with clipping (update
    rows); step 2's are new ids.  The one-process identity holds on every step:
    ``plugin dH1 = delta_h1_applied`` from the DDP-averaged update.

    A second run with ``token_shares=True`` and ``entropy_sum_rows=True`` (exact kernel, the
    same split of groups over the ranks): each rank pushes its own sequences' token shares,
    with the ``cross_fit`` halves and directions of all ranks' sequences (from their entropy
    sums, as the service's ``grad_hat H``), and every step's shares add up, per sequence, to
    the service's ``cross_fit`` ``a_i`` and in total to its ``delta_h1``, as with one
    process.

    A third run, with a drawn id, is resumed on both ranks from its first checkpoint: every
    rank continues the run the checkpoint names, the resumed trainer's own drawn run is gone,
    the main process deletes step 1 (once, with a warning), and the new step 1 holds both
    ranks' fresh completions (ids unlike step 0's) with the identity.

    The first run logs its answers (``log_metrics``): the main process's log of each step
    holds that step's ``dH1`` of both ranks' sequences.  An RLOO run over the same split
    (``KernelscopeRLOOTrainer``, step 1 a later clipped pass) has every step ready with both
    ranks' sequences and the same identity, and with every rank's entropy-sum rows
    (``entropy_sum_rows=True``) the service estimates ``grad H`` from the entropy sums."""
    launch_two_ranks("trl_ranks.py", live_service.base_url, tmp_path)
    run_id = (tmp_path / "run_id").read_text()
    logged = json.loads((tmp_path / "logged.json").read_text())
    with Client(live_service.base_url) as client:
        assert client.get_run(run_id).ranks == 2
        # log_metrics: the main process logged each whole step's dH1
        assert logged == pytest.approx([client.entropy(run_id, s).delta_h1 for s in (0, 1, 2)])
        ids: list[list[str]] = []
        for step in (0, 1, 2):
            status = client.wait_ready(run_id, step, timeout=60)
            assert status.state == "ready"
            assert status.ranks_expected == 2 and status.ranks_reported == (0, 1)
            assert status.sequences == status.rows == 12
            assert status.applied_update
            diagonal = client.diagonal(run_id, step)
            ids.append(sorted(diagonal.ids))
            groups: dict[str, int] = {}
            for prompt in diagonal.prompt_ids:
                groups[prompt] = groups.get(prompt, 0) + 1
            assert sorted(groups.values()) == [4, 4, 4]
            report = client.entropy(run_id, step, estimator="plugin")
            assert report.delta_h1 != 0.0
            assert report.delta_h1_applied == pytest.approx(report.delta_h1, rel=1e-3)
        assert len(set(ids[0])) == 12 and ids[1] == ids[0]
        assert not set(ids[2]) & set(ids[0])
        tokens_run = (tmp_path / "tokens_run_id").read_text()
        for step in (0, 1):
            client.wait_ready(tokens_run, step, timeout=60)
            report = client.entropy(tokens_run, step, estimator="cross_fit")
            tokens = client.tokens(tokens_run, step, top=5)
            assert tokens.estimator == "cross_fit" and len(tokens.sequences) == 12
            assert report.entropy_gradient == "entropy_sum"
            assert report.delta_h1 != 0.0
            assert tokens.total == pytest.approx(report.delta_h1, rel=1e-3, abs=1e-9)
            a = {s["id"]: s["a"] for s in report.per_sequence if s["a"] is not None}
            for row in tokens.sequences:
                assert row.total == pytest.approx(a[row.id], rel=1e-3, abs=1e-9)
        rloo_run = (tmp_path / "rloo_run_id").read_text()
        for step in (0, 1, 2):
            status = client.wait_ready(rloo_run, step, timeout=60)
            assert status.ranks_reported == (0, 1) and status.sequences == 12
            prompts = collections.Counter(client.diagonal(rloo_run, step).prompt_ids)
            assert sorted(prompts.values()) == [4, 4, 4]
            # both ranks' entropy-sum rows: grad H from the entropy sums
            assert client.entropy(rloo_run, step).entropy_gradient == "entropy_sum"
        assert_plugin_is_applied(client, rloo_run, (0, 1, 2))
        resumed = json.loads((tmp_path / "resumed.json").read_text())
        run_id = resumed["first"]
        assert resumed["resumed"] == run_id and resumed["drawn"] != run_id
        assert resumed["drawn"] not in {r.run_id for r in client.runs()}
        deleted = [w for w in resumed["warnings"] if "resumed at step 1" in w]
        assert len(deleted) == 1 and "deleted steps [1]" in deleted[0]
        before = set(client.diagonal(run_id, 0).ids)
        status = client.wait_ready(run_id, 1, timeout=60)
        assert status.ranks_reported == (0, 1) and status.sequences == status.rows == 12
        assert len(set(client.diagonal(run_id, 1).ids) - before) == 12
        assert_plugin_is_applied(client, run_id, (1,))


def test_fsdp2_ranks_push_steps_with_the_identities_of_one_process(
    live_service: LiveService, tmp_path: Path
) -> None:
    """Six real GRPO and RLOO runs under accelerate's own FSDP2 (``fsdp_version=2``:
    ``fully_shard`` of each decoder layer and of the root; two gloo processes on the CPU, see
    ``trl_fsdp.py`` for the one line that lets accelerate shard on a CPU), each rank's
    parameters, gradients and Adam state a shard: AdamW with ``beta1 = 0`` and count-sketched
    rows from hooks (``adam`` geometry: each rank gathers ``sqrt(P_t)`` for its sequences'
    rows), step 1 a later clipped pass (update rows), of the whole model, of ``peft`` LoRA
    adapters (``ParameterFilter(lora_only=True)``), of the whole model in bf16 and of a
    mixture-of-experts model with TRL's load-balancing loss; plain SGD with factorised kronecker
    rows; AdamW on an RLOO run (``KernelscopeRLOOTrainer``), its sequence ratio clipped on step
    1.

    Every step is ready with both ranks' sequences, the applied update (sketched from the
    ranks' shards and added up) is there, and ``plugin dH1 = delta_h1_applied``, the identity
    of one process, holds on both steps (to 2% in bf16, whose reduced gradient cancels to
    exactly 0 in a few coordinates where the rows' sum does not: with ``P = 1 / eps`` there
    instead of 0, the first step read -0.315 against an applied 0.185).  Step 1 also shows
    that ``logprob_after``'s forward without a backward leaves FSDP's shards as the next step's
    ``zero_grad`` expects them.
    FSDP1 and exact rows are refused with their reasons."""
    launch_two_ranks("trl_fsdp.py", live_service.base_url, tmp_path)
    run_ids = json.loads((tmp_path / "run_ids.json").read_text())
    assert "fsdp_version=2" in run_ids.pop("refused-fsdp1")
    assert "captured by hooks" in run_ids.pop("refused-exact")
    assert set(run_ids) == {
        "adam-countsketch",
        "adam-lora",
        "adam-bf16",
        "sgd-kronecker",
        "adam-moe",
        "adam-rloo",
    }
    with Client(live_service.base_url) as client:
        for name, run_id in run_ids.items():
            run = client.get_run(run_id)
            assert run.ranks == 2 and run.geometry == name.split("-")[0]
            assert run.parameters
            assert all(("lora_" in p) == (name == "adam-lora") for p in run.parameters)
            for step in (0, 1):
                status = client.wait_ready(run_id, step, timeout=60)
                assert status.ranks_expected == 2 and status.ranks_reported == (0, 1)
                assert status.sequences == status.rows == 12
                assert status.applied_update
                report = client.entropy(run_id, step, estimator="plugin")
                assert report.delta_h1 != 0.0
                # bf16: the trainer's gradient is rounded where the rows' sum is not
                rel = 2e-2 if name == "adam-bf16" else 1e-3
                assert report.delta_h1_applied == pytest.approx(report.delta_h1, rel=rel)


@pytest.mark.parametrize(
    ("bonus", "moe", "trainer_class", "sums"),
    [
        ({}, False, KernelscopeGRPOTrainer, False),
        ({"entropy_coef": 0.1}, False, KernelscopeGRPOTrainer, False),
        ({"router_aux_loss_coef": 0.0}, True, KernelscopeGRPOTrainer, False),
        ({}, False, _DoubledKernelscope, False),
        ({}, False, KernelscopeGRPOTrainer, True),
    ],
    ids=["plain", "entropy_bonus", "moe", "own_loss", "entropy_sums"],
)
def test_token_shares_add_up_to_the_services_dh1(
    live_service: LiveService,
    tmp_path: Path,
    bonus: dict[str, float],
    moe: bool,
    trainer_class: type[KernelscopeGRPOTrainer],
    sums: bool,
) -> None:
    """``token_shares=True`` on a real GRPO run (exact kernel, plain SGD, accumulation 2, the
    first step on-policy, the second a later clipped PPO pass with update rows), without and
    with an entropy bonus (whose ``e_{i,t} grad H_{i,t}`` terms are in the update rows), of a
    mixture-of-experts policy (its experts' grouped matmul has no forward-mode derivative: the
    shares' pass runs their eager implementation), and of a trainer with a loss of its own
    (twice TRL's: the shares take its coefficients, as the rows do): each step's token shares
    sum, per sequence, to the service's ``cross_fit`` ``a_i`` and in total to its
    ``delta_h1``; the tokens carry their text and the covariance comparison is answered.  With
    ``entropy_sum_rows`` the shares take their directions from the entropy sums, as the
    service's ``grad_hat H`` then does (math.md §3), and add up to that answer."""
    args = sgd_args(tmp_path, learning_rate=0.05, num_iterations=2, epsilon=0.02, **bonus)
    exact = {"kind": "exact", "dim": 1}
    config = KernelscopeConfig(
        url=live_service.base_url, sketch=exact, token_shares=True, entropy_sum_rows=sums
    )
    trainer = sgd_trainer(
        args, config, model=tiny_moe() if moe else None, trainer_class=trainer_class
    )
    trainer.train()
    with Client(live_service.base_url) as client:
        for step in (0, 1):
            client.wait_ready(trainer.kernelscope_run_id, step, timeout=60)
            report = client.entropy(trainer.kernelscope_run_id, step, estimator="cross_fit")
            assert report.entropy_gradient == ("entropy_sum" if sums else "score")
            tokens = client.tokens(trainer.kernelscope_run_id, step, top=5)
            assert tokens.estimator == "cross_fit" and tokens.num_tokens > 0
            assert tokens.total == pytest.approx(report.delta_h1, rel=1e-3, abs=1e-9)
            a = {s["id"]: s["a"] for s in report.per_sequence if s["a"] is not None}
            for row in tokens.sequences:
                assert row.total == pytest.approx(a[row.id], rel=1e-3, abs=1e-9)
            assert all(isinstance(t.token, str) for t in tokens.down)
            assert tokens.covariance.k >= 1
        # and the rows the shares add up to are those of the loss trained on
        assert_plugin_is_applied(client, trainer.kernelscope_run_id, (0, 1))


@pytest.mark.parametrize(
    ("optim", "sketch", "bonus"),
    [
        ("adamw_torch", SKETCH_512, {}),
        ("adamw_torch", SKETCH_512, {"entropy_coef": 0.1}),
        ("sgd", KRONECKER_256, {}),
        ("adamw_torch", SKETCH_512, {"router_aux_loss_coef": 0.0}),
    ],
    ids=["countsketch-adam", "countsketch-adam-entropy_bonus", "kronecker-sgd", "moe"],
)
def test_token_shares_take_their_directions_from_the_rows_backward(
    live_service: LiveService,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    optim: str,
    sketch: dict[str, Any],
    bonus: dict[str, float],
) -> None:
    """``token_shares=True`` with rows captured by hooks (countsketch rows in ``adam``
    geometry; factorised kronecker rows with SGD): the ``cross_fit`` directions ``v_0, v_1``
    are added up by the rows' own backward, over capture batches of whole prompts (TRL's
    micro-batches split them), and the token shares along them equal those of the forward and
    backward passes of their own, step by step (the first on-policy, the second a later
    clipped PPO pass with update rows); also for a mixture-of-experts policy, whose routers'
    and experts' directions come from their per-sequence re-runs."""
    import clients.trl as trl_module

    original = trl_module.token_shares_cross_fit
    compared: list[float] = []

    def both(*args: Any, directions: Any = None, **kwargs: Any) -> Any:
        assert directions is not None, "the hooks did not add the directions up"
        want = original(*args, **kwargs)  # first: the call below scales directions in place
        got = original(*args, directions=directions, **kwargs)
        scale = float(want.shares.abs().max())
        assert scale > 0.0
        torch.testing.assert_close(got.shares, want.shares, rtol=1e-3, atol=1e-4 * scale)
        torch.testing.assert_close(got.logprobs, want.logprobs)
        compared.append(scale)
        return got

    monkeypatch.setattr(trl_module, "token_shares_cross_fit", both)
    args = sgd_args(
        tmp_path, learning_rate=1e-3, optim=optim, num_iterations=2, epsilon=0.02, **bonus
    )
    kernelscope = KernelscopeConfig(
        url=live_service.base_url, sketch=sketch, sketch_on="trainer", token_shares=True
    )
    moe = "router_aux_loss_coef" in bonus
    trainer = sgd_trainer(args, kernelscope, model=tiny_moe() if moe else None)
    assert (trainer._hooked is not None) or (trainer._factorised is not None)
    trainer.train()
    assert len(compared) == 2
    with Client(live_service.base_url) as client:
        for step in (0, 1):
            client.wait_ready(trainer.kernelscope_run_id, step, timeout=60)
            tokens = client.tokens(trainer.kernelscope_run_id, step, top=5)
            assert tokens.estimator == "cross_fit" and tokens.num_tokens > 0


def test_zero_ranks_push_steps_with_the_identities_of_one_process(
    live_service: LiveService, tmp_path: Path
) -> None:
    """Seventeen real GRPO and RLOO runs under accelerate's DeepSpeed (two gloo processes on
    DeepSpeed's CPU accelerator, ``trl_zero.py``), where the reduced gradient and Adam's state
    are flat partitions and the step is taken inside accelerate's ``backward``, before
    ``Trainer``'s ``on_pre_optimizer_step``: AdamW with ``beta1 = 0`` and count-sketched rows
    from hooks under ZeRO 2, step 1 a later clipped pass (update rows); the same under ZeRO 1
    with the gradient norm clipped to 0.01 on every step and a linear decay of the rate; plain
    SGD with factorised kronecker rows under ZeRO 2.  Under ZeRO 3, with every parameter
    partitioned from the model's construction on (``deepspeed.zero.Init``; odd sizes, so the
    last partitions are padded): the AdamW run clipped to 0.01, loaded from a checkpoint with
    ``beta = 0.04`` (TRL's reference model from the same path), the SGD kronecker run over the
    matrix parameters alone (a filter on the whole shapes), and AdamW over ``peft`` LoRA
    adapters (``ParameterFilter(lora_only=True)``).  Under ZeRO 2, AdamW with token shares
    (exact kernel): both ranks' shares add up to the service's ``cross_fit`` ``delta_h1``.
    DeepSpeed's own Adams: ZeRO-Offload, where accelerate puts DeepSpeed's CPU Adam in place of
    the trainer's AdamW (ZeRO 2, and ZeRO 3 clipped), and an ``AdamW`` optimizer section, from
    which the engine builds ``FusedAdam`` (ZeRO 2, weight decay 0.1).  bf16 under ZeRO 2 and
    ZeRO 3, and under ZeRO 1 with fp32 gradient accumulation, where the engine steps with its
    ``BF16_Optimizer`` (clipped).  A mixture-of-experts policy with TRL's load-balancing loss
    under ZeRO 2 and ZeRO 3, where accelerate makes each MoE block a ZeRO 3 leaf module whose
    gradient reduction hook fired in the capture's backward too (it set ``.grad`` and the step
    failed; ``clients.shards.leaf_reductions_suspended``).  RLOO runs
    (``KernelscopeRLOOTrainer``) under ZeRO 2 and ZeRO 3, whose loss DeepSpeed's backward
    scales for the accumulation steps.

    Every step is ready with both ranks' sequences and the applied update.  ``sqrt(P_t)``
    computed before the step from the gathered partitions equals the one the step divided by
    (read back from its state) to float32 rounding, clipping included.  Under ZeRO 1/2 the
    update rebuilt from the Adam state is the change of the fp32 master values to their
    rounding.  ``plugin dH1 = delta_h1_applied`` holds as with one process (to 2% in bf16),
    also clipped: the pushed rate is the step's own, read before the engine's step (which
    steps a DeepSpeed scheduler), times DeepSpeed's clip factor ``0.01 / (norm + 1e-6)``.
    Before, the capture ran after the step: ``delta_h1_applied`` read 0; an offloaded
    optimizer was refused in ``adam`` geometry, and an optimizer section failed at the first
    step, as did ``BF16_Optimizer``; under ZeRO 1/2 in bf16 the update was the difference
    of the bf16 parameters (2.5% off on step 0).  Exact rows and token shares under ZeRO 3,
    and a partly offloaded optimizer under ZeRO 3 in ``adam`` geometry, are refused with their
    reasons."""
    pytest.importorskip("deepspeed")
    launch_two_ranks("trl_zero.py", live_service.base_url, tmp_path)
    results = json.loads((tmp_path / "run_ids.json").read_text())
    assert "stage 3 rows are captured by hooks" in results.pop("refused-zero3-exact")
    assert "forward-mode" in results.pop("refused-zero3-token-shares")
    assert "second Adam" in results.pop("refused-zero3-partial-offload")
    names = (
        "zero2-adam",
        "zero1-adam-clipped",
        "zero2-sgd-kronecker",
        "zero3-adam-clipped",
        "zero3-sgd-kronecker",
        "zero3-adam-lora",
        "zero2-adam-tokens",
        "zero2-adam-offload",
        "zero2-fusedadam-decay",
        "zero3-adam-offload-clipped",
        "zero2-adam-bf16",
        "zero3-adam-bf16",
        "zero1-adam-bf16-fp32acc-clipped",
        "zero2-adam-moe",
        "zero3-adam-moe",
        "zero2-adam-rloo",
        "zero3-adam-rloo",
    )
    # ZeRO-Offload: accelerate replaced the trainer's AdamW by DeepSpeed's CPU Adam; an
    # optimizer section: the engine built its own
    for name in ("zero2-adam-offload", "zero3-adam-offload-clipped"):
        assert results[f"optimizer-{name}"] == "DeepSpeedCPUAdam"
    assert results["optimizer-zero2-fusedadam-decay"] == "FusedAdam"
    assert results["optimizer-zero2-adam"] == "AdamW"
    with Client(live_service.base_url) as client:
        for name in names:
            run = client.get_run(results[name])
            assert run.ranks == 2 and run.geometry == ("sgd" if "sgd" in name else "adam")
            gaps, norms = results[f"sqrt_p-{name}"], results[f"grad_norm-{name}"]
            # the ZeRO 3 clipped run loads a checkpoint and trains with beta = 0.04 against
            # TRL's reference model (partitioned too): the KL term is in its update rows
            assert (len(results[f"kl-{name}"]) == 2) == (name == "zero3-adam-clipped")
            assert len(gaps) == (0 if run.geometry == "sgd" else 2)
            assert all(gap < 1e-5 for gap in gaps)
            # ZeRO 1/2: the update rebuilt from the Adam state (decoupled decay undone from
            # the fp32 master value) is the change of the fp32 master values, up to their
            # rounding (half a unit in the last place with torch's AdamW; DeepSpeed's kernels
            # round their own step differently)
            updates = results[f"update-{name}"]
            assert len(updates) == (2 if run.geometry == "adam" and "zero3" not in name else 0)
            ulps = 4.0 if results[f"optimizer-{name}"] != "AdamW" else 0.51
            assert all(gap <= ulps for gap in updates)
            for step in (0, 1):
                status = client.wait_ready(results[name], step, timeout=60)
                assert status.ranks_expected == 2 and status.ranks_reported == (0, 1)
                assert status.sequences == status.rows == 12
                assert status.applied_update
                if name.endswith("-clipped"):  # the pushed rate has DeepSpeed's clip factor
                    clip = 1.0 / ((norms[step] + 1e-6) / 0.01)
                    decay = 1 - step / 2 if name == "zero1-adam-clipped" else 1.0
                    assert clip < 0.1
                    assert status.learning_rate == pytest.approx(clip * 1e-3 * decay)
                report = client.entropy(results[name], step, estimator="plugin")
                assert report.delta_h1 != 0.0
                if name.endswith("-decay"):  # the update has the decay too
                    continue
                # bf16: the rows and the trainer's gradient are rounded differently
                bf16 = {"rel": 2e-2, "abs": 1e-3} if "-bf16" in name else {}
                assert report.delta_h1_applied == pytest.approx(
                    report.delta_h1, **{"rel": 1e-3, **bf16}
                )
                if name.endswith("-tokens"):  # every rank's shares, along the summed directions
                    fit = client.entropy(results[name], step, estimator="cross_fit")
                    tokens = client.tokens(results[name], step, top=5)
                    assert len(tokens.sequences) == 12
                    assert tokens.total == pytest.approx(fit.delta_h1, rel=1e-3, abs=1e-9)
