"""Tiny causal LMs built from configs (no downloads) and batches for the client tests."""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn

from clients.capture import SequenceBatch

VOCAB = 40


def tiny_gpt2(seed: int = 0, dropout: float = 0.0) -> nn.Module:
    """GPT-2 (Conv1D layers, tied wte/lm_head, LayerNorms with biases), ~10k parameters."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=16,
        vocab_size=VOCAB,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
    )
    model = GPT2LMHeadModel(config)
    # Non-trivial biases and norm parameters, so that every gradient term is exercised.
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


#: the sizes and token ids the tiny decoders share
_TINY_DECODER: dict[str, Any] = {
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "vocab_size": VOCAB,
    "max_position_embeddings": 64,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def tiny_llama(seed: int = 0, **overrides: Any) -> nn.Module:
    """Llama-style (nn.Linear without bias, RMSNorm, GQA, untied head, padding_idx 0);
    ``overrides``: other ``LlamaConfig`` values (sizes, layers)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    values: dict[str, Any] = {
        **_TINY_DECODER,
        "intermediate_size": 24,
        "num_attention_heads": 4,
        **overrides,
    }
    config = LlamaConfig(**values)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


MODELS: dict[str, Callable[[], nn.Module]] = {"gpt2": tiny_gpt2, "llama": tiny_llama}


@contextlib.contextmanager
def fsdp2_llama(
    rank: int, world: int, init: str, shard_head: bool = True
) -> Iterator[tuple[nn.Module, nn.Module]]:
    """In one of ``world`` processes: a gloo process group (``init`` its ``init_method``) and
    :func:`tiny_llama` sharded by torch's FSDP2 (``fully_shard`` of each decoder layer, then of
    the root; ``shard_head=False`` leaves the head a plain tensor), with an unsharded copy made
    before; the group is destroyed after the block."""
    import copy

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model = tiny_llama()
        plain = copy.deepcopy(model)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model, ignored_params=None if shard_head else {model.lm_head.weight})
        yield model, plain
    finally:
        dist.destroy_process_group()


def exit_without_teardown() -> None:
    """Leave a rank's process without the interpreter's teardown.  After a finished run a rank
    can abort in the static destructors of torch's C++ threads (gloo's, the rank-0 store's):
    "terminate called without an active exception", SIGABRT, even with the process group
    destroyed first (seen in CI: once in ``trl_fsdp.py``, in 1 of 14 of its runs here, and on
    2026-12-07 in ``test_hook_captures_on_a_model_sharded_by_fsdp2``'s spawned ranks)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


#: transformers' MoE families of the tests: (config, model, their sizes); every one routes the
#: ``[n * L, hidden]`` tokens with a router module returning logits, weights and experts, and
#: keeps its experts as 3-D parameters (Qwen2-MoE also has a shared expert on those tokens)
MOE_FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        {"intermediate_size": 24, "moe_intermediate_size": 8, "num_experts": 4, "head_dim": 8},
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        {
            "intermediate_size": 24,
            "moe_intermediate_size": 8,
            "shared_expert_intermediate_size": 12,
            "num_experts": 4,
        },
    ),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        {"intermediate_size": 8, "num_local_experts": 4, "head_dim": 8},
    ),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", {"intermediate_size": 8, "num_experts": 4}),
}


def tiny_moe(seed: int = 0, family: str = "qwen3_moe", **overrides: Any) -> nn.Module:
    """A two-layer mixture-of-experts LM of ``family`` (:data:`MOE_FAMILIES`): every MLP a
    sparse block of 4 experts, top-2 routing, transformers' default grouped-matmul experts;
    ``overrides``: other config values."""
    import transformers

    config_name, model_name, sizes = MOE_FAMILIES[family]
    torch.manual_seed(seed)
    values: dict[str, Any] = {
        **_TINY_DECODER,
        "num_experts_per_tok": 2,
        "num_attention_heads": 2,
        "tie_word_embeddings": False,
        **sizes,
        **overrides,
    }
    config = getattr(transformers, config_name)(**values)
    model = getattr(transformers, model_name)(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith("mlp.gate.weight"):  # routers start at zero: route by something
                p.normal_(0.0, 0.5)
    return model


def make_batch(seed: int = 1, n: int = 5, pad_token_id: int = 0) -> SequenceBatch:
    """``n`` sequences with different prompt and response lengths (so there is padding).

    Token 0 (Llama's padding_idx) also occurs inside real sequences on purpose.
    """
    g = torch.Generator().manual_seed(seed)
    prompts, responses = [], []
    for i in range(n):
        lp = 1 + (i * 2) % 5
        lr = 2 + (i * 3) % 6
        prompts.append(torch.randint(0, VOCAB, (lp,), generator=g))
        responses.append(torch.randint(0, VOCAB, (lr,), generator=g))
    prompts[0][0] = 0
    responses[1][0] = 0
    return SequenceBatch.from_pairs(prompts, responses, pad_token_id=pad_token_id)


@pytest.fixture(params=sorted(MODELS))
def model_name(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def model(model_name: str) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return MODELS[model_name]()


@pytest.fixture
def batch() -> SequenceBatch:
    return make_batch()


# The live service (uvicorn + worker subprocesses on a real Redis) and its helpers come from
# the service tests' conftest; importing the fixtures here makes them visible to this folder.
from tests.service.conftest import (  # noqa: E402, F401
    LiveService,
    free_port,
    key_prefix,
    live_service,
    redis_url,
)
