"""A vision-language GRPO run under ``accelerate launch`` (one process per rank), for
``test_trl_vision.py::test_vision_language_run_on_two_ranks``.

Usage: ``accelerate launch --multi_gpu --num_processes 2 tests/clients/trl_vision_ranks.py URL
OUT`` (the run has ``use_cpu``: gloo DDP on the CPU).  The main process writes the run id to
``OUT/run_id``.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

from clients.trl import KernelscopeConfig
from tests.clients.test_trl import SKETCH_512, adam_later_pass_args
from tests.clients.test_trl_vision import _trainer
from tests.clients.trl_ranks import exit_without_teardown


def main(url: str, out: Path) -> None:
    warnings.simplefilter("ignore")
    # 3 completions per rank and micro-batch, groups of 4: one group spans the two ranks; step
    # 1 re-trains step 0's completions at ratio != 1 with clipping (update rows)
    args = adam_later_pass_args(
        out, per_device_train_batch_size=3, num_generations=4, ddp_backend="gloo"
    )
    config = KernelscopeConfig(url=url, sketch=SKETCH_512, sketch_on="trainer")
    trainer = _trainer(args, config)
    trainer.train()
    if trainer.accelerator.is_main_process:
        (out / "run_id").write_text(trainer.kernelscope_run_id)
    trainer.accelerator.end_training()
    exit_without_teardown()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
