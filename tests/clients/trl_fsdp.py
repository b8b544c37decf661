"""GRPO runs under accelerate's FSDP2 (one process per rank, gloo on the CPU), for
``test_trl.py::test_fsdp2_ranks_push_steps_with_the_identities_of_one_process``.

Usage: ``accelerate launch --multi_gpu --num_processes 2 tests/clients/trl_fsdp.py URL OUT``.
The main process writes ``{name: run id}`` (and ``refused-NAME``: the error of a refused
setting) to ``OUT/run_ids.json``.

accelerate turns FSDP on only for GPU distributed types, and a ``use_cpu`` run is
``MULTI_CPU``: the script marks the process state ``MULTI_GPU`` before the trainer builds its
``Accelerator``, which then prepares the model with its own FSDP2 code (``fully_shard`` of
every decoder layer and of the root) on the CPU's gloo process group.  Everything after that
is accelerate's, TRL's and torch's own code.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

from accelerate.state import PartialState
from accelerate.utils import DistributedType

from clients.filters import ParameterFilter
from clients.trl import KernelscopeConfig, KernelscopeRLOOTrainer, UnsupportedTRLSettingError
from tests.clients.conftest import exit_without_teardown
from tests.clients.test_trl import KRONECKER_256, SKETCH_512, sgd_trainer, tiny_moe
from tests.clients.test_trl_rloo import rloo_trainer
from tests.clients.trl_ranks import finish, rank_args, rloo_rank_args

FSDP2 = {"fsdp": "full_shard", "fsdp_config": {"fsdp_version": 2}}

ADAM_BETA0 = {"optim": "adamw_torch", "adam_beta1": 0.0, "num_iterations": 2}

#: name -> (learning rate, GRPOConfig overrides, sketch, LoRA): AdamW with beta1 = 0 (every step
#: is -lr P_t g_t) and count-sketched rows from hooks, step 1 a later clipped pass (update rows),
#: of the whole model (its gradient norm clipped to 0.01 on every step), of LoRA adapters on the
#: attention projections, and of the whole model in bf16 (accelerate's FSDP2 policy: parameters
#: and gradient reduction in bf16); plain SGD and factorised kronecker rows; a mixture-of-experts
#: policy (test_trl's ``tiny_moe``) with TRL's load-balancing loss in the update rows; an RLOO
#: run (``KernelscopeRLOOTrainer``, its sequence ratio clipped at epsilon 0.2 on step 1).
RUNS: dict[str, tuple[float, dict[str, Any], dict[str, Any], bool]] = {
    "adam-countsketch": (1e-3, {**ADAM_BETA0, "max_grad_norm": 0.01}, SKETCH_512, False),
    "adam-lora": (1e-2, ADAM_BETA0, SKETCH_512, True),
    "adam-bf16": (1e-3, {**ADAM_BETA0, "bf16": True}, SKETCH_512, False),
    "sgd-kronecker": (0.05, {}, KRONECKER_256, False),
    "adam-moe": (1e-3, {**ADAM_BETA0, "router_aux_loss_coef": 0.5}, SKETCH_512, False),
    "adam-rloo": (1e-3, {**ADAM_BETA0, "epsilon": 0.2}, SKETCH_512, False),
}


#: name -> (fsdp_config, sketch) that the trainer refuses under FSDP: FSDP1's flat shards; exact
#: rows, which only the chunk capture makes.
REFUSED: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "fsdp1": ({"fsdp_version": 1, "sync_module_states": False}, SKETCH_512),
    "exact": ({"fsdp_version": 2}, {"kind": "exact", "dim": 1}),
}


def fsdp_args(out: Path, learning_rate: float, rloo: bool = False, **overrides: Any) -> Any:
    """A ``GRPOConfig`` (an ``RLOOConfig`` with ``rloo``) under accelerate's FSDP on this CPU
    (see the module's docstring)."""
    make = rloo_rank_args if rloo else rank_args
    args = make(out, learning_rate, **{**FSDP2, **overrides})
    _ = args.device  # the process state, MULTI_CPU
    PartialState().distributed_type = DistributedType.MULTI_GPU
    return args


def main(url: str, out: Path) -> None:
    warnings.simplefilter("ignore")
    run_ids: dict[str, str] = {}
    for name, (config, sketch) in REFUSED.items():
        args = fsdp_args(out / name, 0.05, fsdp_config=config)
        try:
            sgd_trainer(args, KernelscopeConfig(url=url, sketch=sketch, sketch_on="trainer"))
        except UnsupportedTRLSettingError as exc:
            run_ids[f"refused-{name}"] = str(exc)
    for name, (learning_rate, overrides, sketch, lora) in RUNS.items():
        rloo = name.endswith("-rloo")
        args = fsdp_args(out / name, learning_rate, rloo, **overrides)
        config = KernelscopeConfig(url=url, sketch=sketch, sketch_on="trainer")
        adapters: dict[str, Any] = {}
        if lora:
            import peft

            config.parameter_filter = ParameterFilter(lora_only=True)
            adapters["peft_config"] = peft.LoraConfig(
                r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0
            )
        model = tiny_moe() if name == "adam-moe" else None
        if rloo:
            trainer = rloo_trainer(
                out / name, KernelscopeRLOOTrainer, args=args, kernelscope=config
            )
        else:
            trainer = sgd_trainer(args, config, model, **adapters)
        assert trainer.accelerator.is_fsdp2
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.train()
        # a text model's LM head shares an FSDP unit with the final norm, which gathers it
        # before TRL's fused head reads it (trl_vision_ranks.py: one that does not)
        assert not [w for w in caught if "fused LM head" in str(w.message)]
        if name == "adam-moe":  # the experts had hooks: no fallback to exact chunks
            assert trainer._hooked is not None and trainer.aux_loss_enabled
        assert trainer._kernelscope_sharded  # the model accelerate prepared holds shards
        run_ids[name] = trainer.kernelscope_run_id
    finish(out, run_ids)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
    exit_without_teardown()
