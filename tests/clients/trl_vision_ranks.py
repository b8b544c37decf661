"""Vision-language GRPO runs under ``accelerate launch`` (one process per rank), for
``test_trl_vision.py::test_vision_language_runs_on_two_ranks``.

Usage: ``accelerate launch --multi_gpu --num_processes 2 tests/clients/trl_vision_ranks.py URL
OUT`` (the runs have ``use_cpu``: gloo on the CPU).  The main process writes ``{name: run id}``
to ``OUT/run_ids.json``, and every rank the kernelscope warnings of the FSDP2 run to
``OUT/warnings-RANK``.  The DeepSpeed ZeRO 3 run comes last: ``deepspeed.zero.Init`` patches
``torch.nn.functional`` for the rest of the process.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import deepspeed

from clients.filters import ParameterFilter
from clients.shards import is_partitioned
from clients.trl import KernelscopeConfig
from tests.clients.conftest import exit_without_teardown
from tests.clients.test_trl import SKETCH_512, adam_later_pass_args
from tests.clients.test_trl_vision import _trainer
from tests.clients.trl_fsdp import ADAM_BETA0, fsdp_args
from tests.clients.trl_ranks import finish, rank_args
from tests.clients.trl_zero import ZERO3

#: 3 completions per rank and micro-batch, groups of 4: one group spans the two ranks; step 1
#: re-trains step 0's completions at ratio != 1 with clipping (update rows)
SPLIT: dict[str, Any] = {"per_device_train_batch_size": 3, "num_generations": 4}


def main(url: str, out: Path) -> None:
    warnings.simplefilter("ignore")
    run_ids: dict[str, str] = {}
    args = adam_later_pass_args(out / "ddp", **SPLIT, ddp_backend="gloo")
    trainer = _trainer(args, KernelscopeConfig(url=url, sketch=SKETCH_512, sketch_on="trainer"))
    trainer.train()
    run_ids["ddp"] = trainer.kernelscope_run_id
    # FSDP2: accelerate's tail unit holds the LM head alone (it finds no final norm among the
    # backbone's children), so TRL's fused head trains it without averaging over the ranks;
    # the language side without the head keeps the identity
    args = fsdp_args(out / "fsdp2", 1e-3, **ADAM_BETA0)  # rank_args: the same split
    text_only = ParameterFilter(exclude_regex=[r"^model\.visual\.", r"^lm_head\."])
    config = KernelscopeConfig(
        url=url, sketch=SKETCH_512, sketch_on="trainer", parameter_filter=text_only
    )
    trainer = _trainer(args, config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    rank = trainer.accelerator.process_index
    found = [str(w.message) for w in caught if str(w.message).startswith("kernelscope:")]
    (out / f"warnings-{rank}").write_text("\n".join(found))
    run_ids["fsdp2"] = trainer.kernelscope_run_id
    # ZeRO 3, every parameter partitioned (by the engine; the vision tower, which the model
    # builds with from_config, already under zero.Init): TRL gathers the LM head for its fused
    # head, and the whole language side, head included, keeps the identity.  DeepSpeed's
    # process group wrapper first: accelerate sets it up only when DeepSpeed is the first
    # thing in the process, and zero.Init reads the world size from it
    deepspeed.init_distributed(dist_backend="gloo")
    args = rank_args(out / "zero3", 1e-3, **ADAM_BETA0, deepspeed=ZERO3)
    trainer = _trainer(args, KernelscopeConfig(url=url, sketch=SKETCH_512, sketch_on="trainer"))
    trainer.train()
    assert all(is_partitioned(p) for p in trainer.model.parameters())
    run_ids["zero3"] = trainer.kernelscope_run_id
    finish(out, run_ids)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
    exit_without_teardown()
