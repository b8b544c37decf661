"""A vision-language policy in a real ``GRPOTrainer``: a Qwen2.5-VL (M-RoPE positions from
``image_grid_thw`` and ``mm_token_type_ids``, patch rows in ``pixel_values``), a Qwen3-VL (the
same, interleaved, and DeepStack: vision features added to a text layer's output) and a Gemma 3
(``token_type_ids`` that make the image tokens attend to each other, one image per row of
``pixel_values``), each built from a config with random weights, with TRL's image path: prompts
that each carry a 56 x 56 image, reaching the text model as 4 image tokens, the processors built
in code on a character tokenizer; nothing is downloaded.

What is checked: the capture's forward gets the micro-batch's image inputs (TRL's log-probs
are reproduced), each sequence's row is its own gradient, the update rows sum to ``-grad`` of
TRL's loss on a later clipped pass, and a run keeps ``plugin dH1 = delta_h1_applied`` over the
language side, the default for such a policy."""

from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("PIL")

import numpy as np
from datasets import Dataset
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3Processor,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessorPil,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
)
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
from trl import GRPOConfig, GRPOTrainer, RLOOConfig
from trl.trainer.utils import (
    shuffle_sequence_dict,
    split_pixel_values_by_grid,
    split_tensor_dict,
    unsplit_pixel_values_by_grid,
)

from clients.capture import (
    SequenceBatch,
    UnsplittableBatchError,
    forward_logits,
    repack,
    response_logprobs,
)
from clients.filters import ParameterFilter
from clients.http import Client
from clients.trl import (
    KernelscopeConfig,
    KernelscopeGRPOTrainer,
    UnsupportedTRLSettingError,
    trl_token_coefficients,
)
from sketch.spec import sketcher_for
from tests.clients.conftest import LiveService
from tests.clients.test_trl import (
    SKETCH_512,
    _perturbed_logps,
    adam_later_pass_args,
    assert_plugin_is_applied,
    char_tokenizer,
    grpo_args,
    launch_two_ranks,
    micro_capture_batch,
)

QWEN_TOKENS = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]
GEMMA_TOKENS = ["<start_of_image>", "<image_soft_token>", "<end_of_image>"]
#: the user's turn: the image (the processor's placeholder), then the text
CHAT_TEMPLATE = (
    "{% for m in messages %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}IMAGE{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endfor %}"
)
TEXTS = ["abc", "bcdef", "cd", "defg"]  # different lengths: TRL left-pads the prompts


def _without_videos(processor: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """A Qwen-VL processor class without its video processor: transformers checks that
    argument's class through a registry that fails without torchvision, which this project
    does not install, and TRL's image path never uses it."""

    class ImagesOnly(processor):  # type: ignore[valid-type, misc]
        @classmethod
        def get_attributes(cls) -> list[str]:
            return ["image_processor", "tokenizer"]

    return ImagesOnly


def _left_padded(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    # The processor pads the prompts, and its per-token type ids with them, on the tokenizer's
    # side; TRL's prompts are left-padded.
    tokenizer.padding_side = "left"
    return tokenizer


def qwen_processor(processor: type[ProcessorMixin] = Qwen2_5_VLProcessor, patch: int = 14) -> Any:
    """A Qwen-VL processor on the character tokenizer: ``patch``-pixel patches merged 2 x 2,
    every image resized to 4 x 4 patches (4 image tokens)."""
    tokenizer = char_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_TOKENS})
    tokenizer.image_token, tokenizer.video_token = QWEN_TOKENS[1], QWEN_TOKENS[3]
    side = 4 * patch
    images = Qwen2VLImageProcessorPil(
        min_pixels=side * side,
        max_pixels=side * side,
        patch_size=patch,
        merge_size=2,
        temporal_patch_size=2,
    )
    template = CHAT_TEMPLATE.replace("IMAGE", "".join(QWEN_TOKENS[:3]))
    return _without_videos(processor)(
        image_processor=images, tokenizer=_left_padded(tokenizer), chat_template=template
    )


def qwen_token_ids(processor: ProcessorMixin) -> dict[str, int]:
    """A Qwen-VL config's ids of its vision tokens, in the processor's vocabulary."""
    ids = processor.tokenizer.convert_tokens_to_ids(QWEN_TOKENS)
    keys = ("vision_start_token_id", "image_token_id", "vision_end_token_id", "video_token_id")
    return dict(zip(keys, ids, strict=True))


def tiny_qwen_vl(processor: ProcessorMixin) -> Qwen2_5_VLForConditionalGeneration:
    """A Qwen2.5-VL of one text layer and one vision block, about 40k parameters."""
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(processor.tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]},
            "max_position_embeddings": 256,
            "tie_word_embeddings": False,
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_heads": 2,
            "out_hidden_size": 32,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "fullatt_block_indexes": [0],
            "window_size": 28,
        },
        **qwen_token_ids(processor),
        bos_token_id=None,
        eos_token_id=1,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(config)


def tiny_qwen3_vl(processor: ProcessorMixin) -> Qwen3VLForConditionalGeneration:
    """A Qwen3-VL of two text layers (interleaved M-RoPE) and two vision blocks, the first's
    features also added to the first text layer's output (DeepStack)."""
    config = Qwen3VLConfig(
        text_config={
            "vocab_size": len(processor.tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [1, 1, 2],
                "mrope_interleaved": True,
            },
            "max_position_embeddings": 256,
            "tie_word_embeddings": False,
        },
        vision_config={
            "depth": 2,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_heads": 2,
            "out_hidden_size": 32,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "deepstack_visual_indexes": [0],
            "num_position_embeddings": 16,
        },
        **qwen_token_ids(processor),
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return Qwen3VLForConditionalGeneration(config)


def gemma_processor() -> Gemma3Processor:
    # Gemma 3's processor frames each image with blank lines: the vocabulary needs "\n".
    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate("abcdefgh\n")}}
    tokens = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tokens.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokens,
        pad_token="<pad>",
        eos_token="<eos>",
        extra_special_tokens=dict(
            zip(("boi_token", "image_token", "eoi_token"), GEMMA_TOKENS, strict=True)
        ),
    )
    images = Gemma3ImageProcessorPil(size={"height": 56, "width": 56}, do_pan_and_scan=False)
    return Gemma3Processor(
        image_processor=images,
        tokenizer=_left_padded(tokenizer),
        chat_template=CHAT_TEMPLATE.replace("IMAGE", GEMMA_TOKENS[0]),
        image_seq_length=4,
    )


def tiny_gemma3(processor: ProcessorMixin) -> Gemma3ForConditionalGeneration:
    """A Gemma 3 of two text layers (one with sliding-window attention) and a one-layer SigLIP
    tower, 4 x 4 patches pooled to 4 image tokens; about 34k parameters."""
    tokenizer = processor.tokenizer
    config = Gemma3Config(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "max_position_embeddings": 256,
            "sliding_window": 8,
            "layer_types": ["sliding_attention", "full_attention"],
            "tie_word_embeddings": False,
        },
        vision_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 56,
            "patch_size": 14,
        },
        mm_tokens_per_image=4,
        boi_token_id=tokenizer.boi_token_id,
        eoi_token_id=tokenizer.convert_tokens_to_ids(GEMMA_TOKENS[2]),
        image_token_id=tokenizer.image_token_id,
        bos_token_id=None,
        eos_token_id=1,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    return Gemma3ForConditionalGeneration(config)


#: family: (processor, model, the micro-batch's image inputs that the test passes itself)
FAMILIES: dict[str, tuple[Any, Any, tuple[str, ...]]] = {
    "qwen2_5_vl": (qwen_processor, tiny_qwen_vl, ("pixel_values", "image_grid_thw")),
    "qwen3_vl": (
        functools.partial(qwen_processor, Qwen3VLProcessor, 16),
        tiny_qwen3_vl,
        ("pixel_values", "image_grid_thw"),
    ),
    "gemma3": (gemma_processor, tiny_gemma3, ("pixel_values",)),
}
#: the per-token inputs, laid out like the tokens
PER_TOKEN = ("mm_token_type_ids", "token_type_ids")


def language_side(model: torch.nn.Module) -> set[str]:
    """The names of the text decoder's and LM head's parameters."""
    ids = {id(p) for p in model.get_decoder().parameters()}
    ids |= {id(p) for p in model.get_output_embeddings().parameters()}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def _prompt(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def image_dataset() -> Dataset:
    """Each text with an image of its own (random pixels), four times over."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)) for _ in TEXTS]
    return Dataset.from_dict({"prompt": [_prompt(t) for t in TEXTS] * 4, "image": images * 4})


def length_reward(completions: list[Any], **_: Any) -> list[float]:
    """The length of the completion (conversational: the assistant's message)."""
    return [float(len(c[0]["content"])) for c in completions]


def _trainer(
    args: GRPOConfig | RLOOConfig,
    kernelscope: KernelscopeConfig | None = None,
    family: str = "qwen2_5_vl",
    trainer_class: type = KernelscopeGRPOTrainer,
) -> Any:
    """A trainer (``trainer_class``, or TRL's plain GRPO without ``kernelscope``) of the
    ``family``'s tiny vision-language model on the image dataset."""
    make_processor, make_model, _ = FAMILIES[family]
    processor = make_processor()
    common: dict[str, Any] = {
        "model": make_model(processor),
        "reward_funcs": length_reward,
        "args": args,
        "train_dataset": image_dataset(),
        "processing_class": processor,
    }
    if kernelscope is None:
        return GRPOTrainer(**common)
    return trainer_class(**common, kernelscope=kernelscope)


@pytest.fixture(autouse=True)
def _quiet() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _image_micro_batch(trainer: GRPOTrainer) -> dict[str, Any]:
    """The first of two micro-batches of a real generation batch with images (two prompts of
    different lengths, four completions each, shuffled with their images as TRL's
    ``_prepare_inputs`` does)."""
    trainer.model.train()
    dataset = image_dataset()
    rows = [dataset[j] for j in (0, 1) for _ in range(4)]  # RepeatSampler order
    torch.manual_seed(0)
    generation = trainer._generate_and_score_completions(rows)
    generation = shuffle_sequence_dict(split_pixel_values_by_grid(generation))
    trainer.current_gradient_accumulation_steps = 2
    micro = dict(unsplit_pixel_values_by_grid(split_tensor_dict(generation, 2)[0]))
    assert micro["prompt_mask"].min() == 0, "want left-padded prompts"
    return micro


def _capture_batch(micro: dict[str, Any], family: str) -> SequenceBatch:
    """The micro-batch as the trainer records it, image inputs included."""
    batch, attention = micro_capture_batch(micro)
    inputs = {k: micro[k] for k in FAMILIES[family][2]}
    inputs.update({k: repack(micro[k], attention) for k in PER_TOKEN if k in micro})
    assert set(inputs) < set(micro)
    return SequenceBatch(batch.input_ids, batch.attention_mask, batch.response_mask, inputs)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("capture_kind", ["hooked", "factorised"])
def test_rows_of_a_vision_language_batch(tmp_path: Path, capture_kind: str, family: str) -> None:
    """On a micro-batch with images at a later clipped pass, rows from hooks over the language
    side: the capture's ``S_i`` are TRL's (its forward gets the image inputs, from which the
    model derives Qwen's M-RoPE positions and Gemma's image attention in the re-packed layout);
    each score row is the gradient of its own ``S_i``, taken by autograd through a forward of
    the whole batch; and the update rows sum to ``-grad`` of TRL's ``compute_loss`` (compared
    through the run's sketch, a linear map), formed in the hooks (gaussian) or factorised
    (kronecker).  Without the image inputs the log-probs are not TRL's."""
    from clients.factorised import FactorisedCapture, HookedCapture

    trainer = _trainer(
        grpo_args(tmp_path, loss_type="dapo", num_iterations=2, epsilon=0.02), family=family
    )
    model = trainer.model
    language = language_side(model)
    micro = _image_micro_batch(trainer)
    micro["old_per_token_logps"] = _perturbed_logps(trainer, micro, 0.05, seed=1)
    coefficients = trl_token_coefficients(trainer, model, micro)
    model.zero_grad(set_to_none=True)
    trainer.compute_loss(model, micro).backward()
    trl_grad = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    assert set(trl_grad) - language  # the images do flow: the vision side has gradients

    batch = _capture_batch(micro, family)
    studied = ParameterFilter(include=tuple(language))
    capture: Any
    if capture_kind == "factorised":
        capture = FactorisedCapture(model, dim=256, seed=3, parameter_filter=studied, strict=True)
        spec = capture.spec
    else:
        spec = {"kind": "gaussian", "dim": 256, "seed": 3}
        capture = HookedCapture(model, spec, parameter_filter=studied, strict=True)
    assert set(capture.parameters) == language
    sketcher = sketcher_for(spec, capture.parameters)
    attention = torch.cat([micro["prompt_mask"], micro["completion_mask"]], dim=1)
    layout = repack(
        torch.cat([torch.zeros_like(micro["prompt_mask"]).float(), coefficients.logprob], 1),
        attention,
    )
    sketches = capture(batch, token_coefficients=layout)
    assert sketches.update_sketch is not None

    with torch.no_grad():
        per_token, _, _ = trainer._get_per_token_logps_and_entropies(
            model,
            torch.cat([micro["prompt_ids"], micro["completion_ids"]], dim=1),
            attention,
            micro["completion_ids"].size(1),
            num_images=micro["num_images"],
            **{k: micro[k] for k in (*FAMILIES[family][2], *PER_TOKEN) if k in micro},
        )
    trl_s = (per_token * micro["completion_mask"]).sum(1)
    torch.testing.assert_close(sketches.logprobs, trl_s, rtol=1e-5, atol=1e-5)
    text_only = SequenceBatch(batch.input_ids, batch.attention_mask, batch.response_mask)
    assert float((capture(text_only).logprobs - trl_s).abs().max()) > 1e-2

    params = {n: p for n, p in model.named_parameters() if n in capture.parameters}
    for i in range(batch.size):  # w_i by autograd, through one forward of the whole batch
        logits = forward_logits(
            model, batch.input_ids, batch.attention_mask, model_inputs=batch.model_inputs
        )
        s = response_logprobs(logits, batch.input_ids, batch.response_mask)[i]
        grads = torch.autograd.grad(s, list(params.values()), allow_unused=True)
        w = {
            n: (torch.zeros_like(p) if g is None else g).unsqueeze(0)
            for (n, p), g in zip(params.items(), grads, strict=True)
        }
        expected = sketcher.sketch(w)[0]
        scale = float(expected.abs().max())
        torch.testing.assert_close(sketches.sketch[i], expected, rtol=1e-4, atol=1e-5 * scale)

    expected = sketcher.sketch(
        {n: -trl_grad.get(n, torch.zeros_like(p)).unsqueeze(0) for n, p in params.items()}
    )[0]
    scale = float(expected.abs().max())
    torch.testing.assert_close(
        sketches.update_sketch.sum(0), expected, rtol=1e-4, atol=1e-5 * scale
    )
    with pytest.raises(UnsplittableBatchError):
        batch.select([0])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_vision_language_run(live_service: LiveService, tmp_path: Path, family: str) -> None:
    """A real GRPO run of a vision-language policy with AdamW (``beta1 = 0``), count-sketched
    rows from hooks and a later clipped pass, the parameter filter left unset: the trainer
    studies the text decoder and LM head (and says so), its log-probs match TRL's on the first
    micro-batch (no warning), and ``plugin dH1 = delta_h1_applied`` on both steps."""
    args = adam_later_pass_args(tmp_path)
    kernelscope = KernelscopeConfig(
        url=live_service.base_url, sketch=SKETCH_512, sketch_on="trainer"
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _trainer(args, kernelscope, family=family)
        assert isinstance(trainer, KernelscopeGRPOTrainer)
        assert trainer._hooked is not None
        studied = trainer._hooked.parameters
        assert set(studied) == language_side(trainer.model)
        assert any("vision-language policy" in str(w.message) for w in caught)
        caught.clear()
        trainer.train()
        assert trainer._ks_checked
        assert not [w for w in caught if "kernelscope" in str(w.message)]
    with Client(live_service.base_url) as client:
        run = client.get_run(trainer.kernelscope_run_id)
        assert run.geometry == "adam" and run.parameters == studied
        assert_plugin_is_applied(client, trainer.kernelscope_run_id, (0, 1))


def test_rloo_vision_language_run(live_service: LiveService, tmp_path: Path) -> None:
    """``KernelscopeRLOOTrainer`` on a vision-language policy (Qwen2.5-VL), AdamW with
    ``beta1 = 0``, the second step a later pass whose sequence ratios are clipped: the
    language side is studied, the log-probs match RLOO's own (no warning), and ``plugin dH1 =
    delta_h1_applied`` on both steps."""
    from clients.trl import KernelscopeRLOOTrainer
    from tests.clients.test_trl_rloo import rloo_args

    args = rloo_args(
        tmp_path,
        learning_rate=1e-3,
        optim="adamw_torch",
        adam_beta1=0.0,
        num_iterations=2,
        epsilon=0.2,
    )
    kernelscope = KernelscopeConfig(
        url=live_service.base_url, sketch=SKETCH_512, sketch_on="trainer"
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _trainer(args, kernelscope, trainer_class=KernelscopeRLOOTrainer)
        assert trainer._hooked is not None
        assert set(trainer._hooked.parameters) == language_side(trainer.model)
        caught.clear()
        trainer.train()
        assert trainer._ks_checked
        assert not [w for w in caught if "kernelscope" in str(w.message)]
    clipped = [h["clip_ratio/region_mean"] for h in trainer.state.log_history[:2]]
    assert clipped[0] == 0.0 and clipped[1] > 0.0
    with Client(live_service.base_url) as client:
        assert_plugin_is_applied(client, trainer.kernelscope_run_id, (0, 1))


def test_vision_language_runs_on_two_ranks(live_service: LiveService, tmp_path: Path) -> None:
    """``accelerate launch --multi_gpu --num_processes 2`` of Qwen2.5-VL GRPO runs (gloo on the
    CPU, AdamW with ``beta1 = 0``, rows from hooks, 3 completions per rank and micro-batch,
    groups of 4, so one group's images and completions span the ranks), under DDP and under
    accelerate's FSDP2.  Each rank captures its micro-batches with their own image inputs, and
    both steps of each run are ready with both ranks' sequences, four per prompt, and
    ``plugin dH1 = delta_h1_applied``, the later clipped pass included.

    Under FSDP2 accelerate puts the LM head in an FSDP unit of its own (it looks for the final
    norm among the backbone's direct children, and a vision-language model's is deeper), which
    TRL's fused LM head reads as a sharded DTensor and gathers with ``full_tensor()``: the
    head's gradient is not averaged over the ranks, each rank's shard trains on that rank's
    completions alone.  The trainer says so on every rank, and the run studies the text
    decoder without the head, where the identity holds.

    Under DeepSpeed ZeRO 3, with every parameter partitioned (the vision tower already as the
    model is built, the rest by the engine), TRL gathers the head for its fused head, and the
    whole language side, head included, keeps the identity."""
    launch_two_ranks("trl_vision_ranks.py", live_service.base_url, tmp_path)
    run_ids = json.loads((tmp_path / "run_ids.json").read_text())
    for rank in (0, 1):
        found = (tmp_path / f"warnings-{rank}").read_text()
        assert "TRL's fused LM head reads ['lm_head.weight'] as a sharded DTensor" in found
    with Client(live_service.base_url) as client:
        for name, run_id in run_ids.items():
            run = client.get_run(run_id)
            assert run.ranks == 2 and run.parameters
            assert ("lm_head.weight" in run.parameters) == (name != "fsdp2")
            for step in (0, 1):
                status = client.wait_ready(run_id, step, timeout=60)
                assert status.ranks_expected == 2 and status.ranks_reported == (0, 1)
                assert status.sequences == status.rows == 12
                groups: dict[str, int] = {}
                for prompt in client.diagonal(run_id, step).prompt_ids:
                    groups[str(prompt)] = groups.get(str(prompt), 0) + 1
                assert sorted(groups.values()) == [4, 4, 4]
            assert_plugin_is_applied(client, run_id, (0, 1))


@pytest.mark.parametrize(
    "setting",
    ["vision_filter", "exact_chunks", "token_shares"],
)
def test_vision_language_refusals(tmp_path: Path, setting: str) -> None:
    """What the capture of a vision-language policy cannot do is refused when the trainer is
    built: studying the vision side, whose modules run on image patches; exact chunks, which
    run sub-batches and would have to split the image inputs; token shares, likewise."""
    config: dict[str, Any] = {"url": "http://127.0.0.1:9", "sketch": SKETCH_512}
    if setting == "vision_filter":
        config.update(sketch_on="trainer", parameter_filter=ParameterFilter())
    elif setting == "exact_chunks":
        config.update(sketch_on="service")
    else:
        config.update(sketch_on="trainer", token_shares=True)
    with pytest.raises(UnsupportedTRLSettingError, match="vision"):
        _trainer(grpo_args(tmp_path), KernelscopeConfig(**config))


def test_a_failed_hook_capture_of_images_is_not_retried_in_chunks(
    live_service: LiveService, tmp_path: Path
) -> None:
    """Where the capture by hooks fails on a text batch, the trainer falls back to exact
    chunks; a batch with image inputs cannot be split into them, so the hooks' own error is
    raised (before, the fallback's ``UnsplittableBatchError`` hid it)."""
    kernelscope = KernelscopeConfig(
        url=live_service.base_url, sketch=SKETCH_512, sketch_on="trainer"
    )
    trainer = _trainer(adam_later_pass_args(tmp_path, max_steps=1), kernelscope)
    assert isinstance(trainer, KernelscopeGRPOTrainer) and trainer._hooked is not None

    def failing(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a module the hooks cannot split")

    trainer._hooked.capture = failing  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="hooks cannot split"):
        trainer.train()
