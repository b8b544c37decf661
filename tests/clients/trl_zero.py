"""GRPO runs under accelerate's DeepSpeed ZeRO stages 1, 2 and 3 (one process per rank, gloo
on the CPU), for ``test_trl.py::test_zero_ranks_push_steps_with_the_identities_of_one_process``.

Usage: ``accelerate launch --multi_gpu --num_processes 2 tests/clients/trl_zero.py URL OUT``.
The main process writes ``{name: run id}``, ``refused-NAME`` (the error of a refused setting)
``sqrt_p-NAME`` (per step, the largest difference between the ``sqrt(P_t)`` computed before
the step, from the reduced gradient, and the one the step divided by, read from its state
after it, relative to the largest value), ``update-NAME`` (ZeRO 1/2, per step:
:func:`record_sqrt_p`), ``grad_norm-NAME`` (per step, the gradient norm ``Trainer`` logged),
``kl-NAME`` (TRL's logged KL to the reference model, with ``beta != 0``) and
``optimizer-NAME`` (the class of the torch optimizer that stepped) to ``OUT/run_ids.json``.

A ``GRPOConfig`` with a ``deepspeed`` config makes ``Trainer`` build its ``Accelerator`` with
DeepSpeed, which prepares the model with ``deepspeed.initialize`` (DeepSpeed's CPU
accelerator, gloo): everything is DeepSpeed's, accelerate's, TRL's and torch's own code.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import peft
import torch
from accelerate.state import PartialState
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from clients.filters import ParameterFilter
from clients.geometry import (
    adam_applied_update,
    adam_states,
    adam_step_counts,
    adam_step_preconditioner,
    adam_taken_preconditioner,
)
from clients.shards import is_partitioned
from clients.trl import (
    KernelscopeConfig,
    KernelscopeGRPOTrainer,
    KernelscopeRLOOTrainer,
    UnsupportedTRLSettingError,
)
from clients.zero import zero_optimizer
from tests.clients.conftest import exit_without_teardown
from tests.clients.test_trl import (
    KRONECKER_256,
    SKETCH_512,
    sgd_trainer,
    tiny_llama_config,
    tiny_moe,
)
from tests.clients.test_trl_rloo import rloo_trainer
from tests.clients.trl_ranks import finish, rank_args, rloo_rank_args

ADAM_BETA0 = {"optim": "adamw_torch", "adam_beta1": 0.0, "num_iterations": 2}


def zero(stage: int, **extra: Any) -> dict[str, Any]:
    """A DeepSpeed config of ZeRO ``stage``, the batch sizes and clipping from the Trainer's."""
    return {
        "zero_optimization": {"stage": stage, **extra},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": True,
    }


#: ZeRO 3 with every parameter partitioned (DeepSpeed keeps those under the threshold whole)
ZERO3 = zero(3, stage3_param_persistence_threshold=0)

#: ZeRO-Offload of the optimizer: accelerate replaces the trainer's AdamW by DeepSpeed's CPU Adam
OFFLOAD = {"offload_optimizer": {"device": "cpu"}}

#: a DeepSpeed optimizer section: the engine builds its own AdamW (``FusedAdam``), the values
#: filled in from the trainer's arguments
FUSED_ADAMW = {
    "type": "AdamW",
    "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
}

#: name -> (learning rate, GRPOConfig overrides, sketch): AdamW with beta1 = 0 (every step is
#: -lr P_t g_t) and count-sketched rows from hooks, step 1 a later clipped pass (update rows),
#: under ZeRO 2 and, with the gradient norm clipped on every step, ZeRO 1 and a linear decay
#: of the rate, and ZeRO 3 (the model of odd sizes, :func:`odd_llama`); plain SGD with
#: factorised kronecker rows under ZeRO 2 and ZeRO 3 (the matrices alone); AdamW over LoRA
#: adapters of the tiny Llama under ZeRO 3 (built whole, partitioned by the engine); AdamW
#: with token shares (exact kernel) under ZeRO 2, before the ZeRO 3 runs:
#: ``deepspeed.zero.Init`` replaces ``torch.nn.functional.linear`` in the whole process with
#: a function that forward-mode AD cannot run.  DeepSpeed's own Adams: ZeRO-Offload (its CPU
#: Adam) under ZeRO 2 and, clipped, ZeRO 3; a config optimizer section (``FusedAdam``) with
#: decoupled weight decay 0.1.  bf16 (the engine's bf16 parameters, fp32 master values) under
#: ZeRO 2 and ZeRO 3, and under ZeRO 1 with fp32 gradient accumulation and clipping, where the
#: engine steps with its ``BF16_Optimizer``.  A mixture-of-experts policy (test_trl's
#: ``tiny_moe``: its routers and 3-D experts captured per sequence) with TRL's load-balancing
#: loss in the update rows, under ZeRO 2 and ZeRO 3 (built whole, partitioned by the engine).
RUNS: dict[str, tuple[float, dict[str, Any], dict[str, Any]]] = {
    "zero2-adam": (1e-3, {**ADAM_BETA0, "deepspeed": zero(2)}, SKETCH_512),
    "zero1-adam-clipped": (
        1e-3,
        {
            **ADAM_BETA0,
            "deepspeed": zero(1),
            "max_grad_norm": 0.01,
            "lr_scheduler_type": "linear",
        },
        SKETCH_512,
    ),
    "zero2-sgd-kronecker": (0.05, {"deepspeed": zero(2)}, KRONECKER_256),
    "zero2-adam-tokens": (1e-3, {**ADAM_BETA0, "deepspeed": zero(2)}, {"kind": "exact", "dim": 1}),
    "zero2-adam-offload": (1e-3, {**ADAM_BETA0, "deepspeed": zero(2, **OFFLOAD)}, SKETCH_512),
    "zero2-adam-bf16": (
        1e-3,
        {**ADAM_BETA0, "bf16": True, "deepspeed": {**zero(2), "bf16": {"enabled": "auto"}}},
        SKETCH_512,
    ),
    "zero1-adam-bf16-fp32acc-clipped": (
        1e-3,
        {
            **ADAM_BETA0,
            "bf16": True,
            "max_grad_norm": 0.01,
            "deepspeed": {
                **zero(1),
                "bf16": {"enabled": "auto"},
                "data_types": {"grad_accum_dtype": "fp32"},
            },
        },
        SKETCH_512,
    ),
    "zero2-fusedadam-decay": (
        1e-3,
        {**ADAM_BETA0, "weight_decay": 0.1, "deepspeed": {**zero(2), "optimizer": FUSED_ADAMW}},
        SKETCH_512,
    ),
    "zero3-adam-clipped": (
        1e-3,
        {**ADAM_BETA0, "deepspeed": ZERO3, "max_grad_norm": 0.01, "beta": 0.04},
        SKETCH_512,
    ),
    "zero3-sgd-kronecker": (0.05, {"deepspeed": ZERO3}, KRONECKER_256),
    "zero3-adam-lora": (1e-2, {**ADAM_BETA0, "deepspeed": ZERO3}, SKETCH_512),
    "zero3-adam-bf16": (
        1e-3,
        {**ADAM_BETA0, "bf16": True, "deepspeed": {**ZERO3, "bf16": {"enabled": "auto"}}},
        SKETCH_512,
    ),
    "zero3-adam-offload-clipped": (
        1e-3,
        {
            **ADAM_BETA0,
            "deepspeed": zero(3, stage3_param_persistence_threshold=0, **OFFLOAD),
            "max_grad_norm": 0.01,
        },
        SKETCH_512,
    ),
    "zero2-adam-moe": (
        1e-3,
        {**ADAM_BETA0, "deepspeed": zero(2), "router_aux_loss_coef": 0.5},
        SKETCH_512,
    ),
    "zero3-adam-moe": (
        1e-3,
        {**ADAM_BETA0, "deepspeed": ZERO3, "router_aux_loss_coef": 0.5},
        SKETCH_512,
    ),
    # KernelscopeRLOOTrainer: DeepSpeed scales RLOO's loss for the accumulation steps in the
    # Trainer's backward, not in the loss (RLOO's sequence ratio: epsilon 0.2 clips some);
    # under ZeRO 3 the model of odd sizes, partitioned from its construction
    "zero2-adam-rloo": (1e-3, {**ADAM_BETA0, "deepspeed": zero(2), "epsilon": 0.2}, SKETCH_512),
    "zero3-adam-rloo": (1e-3, {**ADAM_BETA0, "deepspeed": ZERO3, "epsilon": 0.2}, SKETCH_512),
}

#: name -> (GRPOConfig overrides, KernelscopeConfig fields) that the trainer refuses.
REFUSED: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "zero3-exact": ({"deepspeed": ZERO3}, {"sketch": {"kind": "exact"}}),
    "zero3-partial-offload": (
        {**ADAM_BETA0, "deepspeed": zero(3, offload_optimizer={"device": "cpu", "ratio": 0.5})},
        {"sketch": SKETCH_512},
    ),
    "zero3-token-shares": ({"deepspeed": ZERO3}, {"sketch": SKETCH_512, "token_shares": True}),
}


def odd_llama(checkpoint: Path | None = None) -> Any:
    """A one-layer Llama whose MLP and norm parameters have odd sizes (hidden 15 in three
    heads of 8, MLP 33: ZeRO 3 pads their last partition), built by ``from_config``, which
    under a ZeRO 3 config partitions it as it is made (``deepspeed.zero.Init``): the trainer
    sees it partitioned.  With ``checkpoint`` the model is saved there instead and its path
    returned: TRL loads it with ``from_pretrained`` (partitioned as it loads, and so is the
    reference model TRL makes from the same path when ``beta != 0``)."""
    torch.manual_seed(0)
    config = tiny_llama_config(
        hidden_size=15,
        head_dim=8,
        intermediate_size=33,
        num_attention_heads=3,
        num_key_value_heads=3,
    )
    if checkpoint is None:
        return AutoModelForCausalLM.from_config(config)
    state = PartialState()
    if state.is_main_process:
        LlamaForCausalLM(config).save_pretrained(checkpoint)  # not under zero.Init: whole
    state.wait_for_everyone()
    return str(checkpoint)


def _largest_gap(a: dict[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """The largest ``|a - b|`` over every parameter, relative to the largest ``|b|``."""
    top = max(float(b[n].abs().max()) for n in a)
    return max(float((a[n] - b[n]).abs().max()) for n in a) / top


def _ulps(
    a: dict[str, torch.Tensor], b: Mapping[str, torch.Tensor], theta: Mapping[str, torch.Tensor]
) -> float:
    """The largest ``|a - b|`` of a parameter, in float32 units in the last place of its
    largest value ``theta``: a change of the parameter is exact up to that rounding."""
    return max(
        float((a[n] - b[n]).abs().max()) / (float(theta[n].abs().max()) * 2.0**-23) for n in a
    )


def record_sqrt_p(
    trainer: KernelscopeGRPOTrainer, gaps: list[float], update_gaps: list[float]
) -> None:
    """Wrap the trainer's step so that each step appends to ``gaps`` the largest relative
    difference between ``sqrt(P_t)`` before the step and the one the step used and, under
    ZeRO 1/2, to ``update_gaps`` that between the update rebuilt from the Adam state and the
    change of the fp32 master values (gathered whole from the partitions before and after), in
    units in the last place of the parameter's largest value."""
    before_step, after_step = trainer._kernelscope_before_step, trainer._kernelscope_after_step
    predicted: dict[str, Any] = {}
    master: dict[str, torch.Tensor] = {}
    counts: dict[str, float] = {}

    def before() -> None:
        selected = trainer._kernelscope_selected()
        assert trainer.optimizer is not None
        lazy = adam_step_preconditioner(trainer.optimizer, selected, lazy=True)
        predicted.update({n: lazy[n].clone() for n in sorted(selected)})
        if not trainer._kernelscope_stage3:
            states = adam_states(trainer.optimizer)
            master.update({n: states.value(selected[n]).clone() for n in sorted(selected)})
            counts.update(adam_step_counts(trainer.optimizer, selected))
        before_step()

    def after() -> None:
        selected = trainer._kernelscope_selected()
        assert trainer.optimizer is not None
        taken = adam_taken_preconditioner(trainer.optimizer, selected, lazy=True)
        gaps.append(_largest_gap(predicted, taken))
        if master:
            states = adam_states(trainer.optimizer)
            moved = {n: states.value(selected[n]) - master[n] for n in sorted(selected)}
            rebuilt = dict(adam_applied_update(trainer.optimizer, selected, counts))
            update_gaps.append(_ulps(rebuilt, moved, master))
        after_step()

    trainer._kernelscope_before_step = before  # type: ignore[method-assign]
    trainer._kernelscope_after_step = after  # type: ignore[method-assign]


def main(url: str, out: Path) -> None:
    warnings.simplefilter("ignore")
    results: dict[str, Any] = {}
    for name, (overrides, fields) in REFUSED.items():
        args = rank_args(out / name, 1e-3, **overrides)
        try:
            sgd_trainer(args, KernelscopeConfig(url=url, sketch_on="trainer", **fields))
        except UnsupportedTRLSettingError as exc:
            results[f"refused-{name}"] = str(exc)
    for name, (learning_rate, overrides, sketch) in RUNS.items():
        # the arguments before the model: their DeepSpeed config makes transformers build a
        # ZeRO 3 model partitioned (deepspeed.zero.Init)
        make = rloo_rank_args if name.endswith("-rloo") else rank_args
        args = make(out / name, learning_rate, **overrides)
        stage3 = name.startswith("zero3")
        tokens = name.endswith("-tokens")  # exact rows, raw: the shares add up to dH1
        config = KernelscopeConfig(
            url=url,
            sketch=sketch,
            sketch_on="service" if tokens else "trainer",
            token_shares=tokens,
        )
        adapters: dict[str, Any] = {}
        if name == "zero3-sgd-kronecker":  # the matrices alone: a filter on the whole shapes
            config.parameter_filter = ParameterFilter(min_ndim=2)
        if name == "zero3-adam-lora":
            config.parameter_filter = ParameterFilter(lora_only=True)
            adapters["peft_config"] = peft.LoraConfig(
                r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0
            )
        model = None
        if name.endswith("-moe"):
            model = tiny_moe()
        elif name == "zero3-adam-clipped":  # from a checkpoint, with TRL's reference model
            model = odd_llama(out / name / "checkpoint")
        elif stage3 and name != "zero3-adam-lora":  # LoRA: the tiny Llama, built whole
            model = odd_llama()
        if name.endswith("-rloo"):
            trainer = rloo_trainer(
                out / name, KernelscopeRLOOTrainer, args=args, kernelscope=config, model=model
            )
        else:
            trainer = sgd_trainer(args, config, model, **adapters)
        assert trainer._kernelscope_deepspeed and trainer._kernelscope_stage3 == stage3
        declared = trainer._kernelscope_parameters
        if name == "zero3-adam-clipped":  # partitioned from the start, declared whole
            assert not trainer.model.get_parameter("model.norm.weight").numel()
            assert declared["model.layers.0.mlp.down_proj.weight"] == [15, 33]
            assert "model.norm.weight" in declared
        if name == "zero3-sgd-kronecker":
            assert "model.norm.weight" not in declared and len(declared) == 9
        if name == "zero3-adam-lora":
            assert len(declared) == 4 and all("lora_" in n for n in declared)
            # built before the trainer, outside zero.Init: deepspeed.initialize partitions it
            assert not any(is_partitioned(p) for p in trainer.model.parameters())
        gaps: list[float] = []
        update_gaps: list[float] = []
        if trainer.kernelscope_geometry == "adam":
            record_sqrt_p(trainer, gaps, update_gaps)
        trainer.train()
        if name.endswith("-moe"):  # the experts had hooks: no fallback to exact chunks
            assert trainer._hooked is not None and trainer.aux_loss_enabled
        if "-fp32acc" in name:  # bf16 with fp32 accumulation under ZeRO 1: not ZeRO's own
            assert type(zero_optimizer(trainer.optimizer)).__name__ == "BF16_Optimizer"
        # ZeRO 3's partitions are shards: a failed hook capture must not fall back to exact
        # chunks, which call the model functionally with its parameters
        assert trainer._kernelscope_sharded == stage3
        assert all(is_partitioned(p) for p in trainer.model.parameters()) == stage3
        results[name] = trainer.kernelscope_run_id
        results[f"sqrt_p-{name}"] = gaps
        results[f"update-{name}"] = update_gaps
        # DeepSpeed's global norm before clipping, one per step
        results[f"grad_norm-{name}"] = [
            h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h
        ]
        results[f"kl-{name}"] = [h["kl"] for h in trainer.state.log_history if "kl" in h]
        assert trainer.optimizer is not None
        results[f"optimizer-{name}"] = type(adam_states(trainer.optimizer).optimizer).__name__
    finish(out, results)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
    exit_without_teardown()
