"""Two-step SGD GRPO run under ``accelerate launch`` (one process per rank), for
``test_trl.py::test_two_ranks_push_one_step_each``.

Usage: ``accelerate launch --multi_gpu --num_processes 2 tests/clients/trl_ranks.py URL OUT``
(the run has ``use_cpu``: gloo DDP on the CPU).
The main process writes the run id to ``OUT_DIR/run_id``, that of a second run with
``token_shares=True`` to ``OUT_DIR/tokens_run_id``, that of a ``KernelscopeRLOOTrainer`` run
to ``OUT_DIR/rloo_run_id``, and for a last run, resumed from its
first checkpoint, ``OUT_DIR/resumed.json``: the run id each attempt used, the id the resumed
trainer drew, and the warnings it gave.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from accelerate.state import PartialState

from clients.http import Client
from clients.trl import KernelscopeConfig, KernelscopeRLOOTrainer
from tests.clients.conftest import exit_without_teardown
from tests.clients.test_trl import SKETCH_512, sgd_args, sgd_trainer
from tests.clients.test_trl_rloo import rloo_args, rloo_trainer


def main(url: str, out: Path) -> None:
    warnings.simplefilter("ignore")
    # 3 completions per rank and micro-batch, groups of 4: group 1 spans the two ranks.  Steps
    # 0 and 1 train on generation 0 (step 1 at ratio != 1, clipped: update rows), step 2 on
    # generation 1.
    args = rank_args(out, 0.05, num_iterations=2, max_steps=3)
    trainer = sgd_trainer(args, KernelscopeConfig(url=url, sketch=SKETCH_512, log_metrics=True))
    trainer.train()
    if trainer.accelerator.is_main_process:
        (out / "run_id").write_text(trainer.kernelscope_run_id)
        # the main process waited for each step, both ranks' sequences, to log its answers
        logged = [
            row["kernelscope/delta_h1"]
            for row in trainer.state.log_history
            if "kernelscope/delta_h1" in row
        ]
        (out / "logged.json").write_text(json.dumps(logged))
    # Token shares over the same split of groups (exact kernel, raw rows), two steps on
    # generation 0: on-policy, then a later clipped pass (update rows); their directions from
    # the entropy sums of every rank's sequences
    args = rank_args(out / "tokens", 0.05, num_iterations=2)
    exact = {"kind": "exact", "dim": 1}
    config = KernelscopeConfig(url=url, sketch=exact, token_shares=True, entropy_sum_rows=True)
    trainer = sgd_trainer(args, config)
    trainer.train()
    if trainer.accelerator.is_main_process:
        (out / "tokens_run_id").write_text(trainer.kernelscope_run_id)
    # RLOO over the same split of groups: steps 0 and 1 on generation 0 (step 1 a later,
    # clipped pass), step 2 on generation 1; each rank pushes its sequences' entropy-sum rows
    rloo = rloo_trainer(
        out / "rloo",
        KernelscopeRLOOTrainer,
        args=rloo_rank_args(out / "rloo", 0.05, num_iterations=2, epsilon=0.2, max_steps=3),
        kernelscope=KernelscopeConfig(url=url, sketch=SKETCH_512, entropy_sum_rows=True),
    )
    rloo.train()
    if rloo.accelerator.is_main_process:
        (out / "rloo_run_id").write_text(rloo.kernelscope_run_id)
    resume(url, out / "resumed")
    trainer.accelerator.end_training()


class _SlowToCreate(Client):
    """Rank 1's client, which creates runs 2 s late: the main process must not delete the
    resumed trainer's drawn run before every rank has created it (else it comes back, empty)."""

    def create_run(self, *args: Any, **kwargs: Any) -> Any:
        time.sleep(2.0)
        return super().create_run(*args, **kwargs)


def resume(url: str, out: Path) -> None:
    """Two steps with a drawn run id and a checkpoint after each; a second trainer resumes
    from the first checkpoint, which names the run."""
    args = rank_args(out, 0.05, save_strategy="steps", save_steps=1)
    config = KernelscopeConfig(url=url, sketch=SKETCH_512)
    first = sgd_trainer(args, config)
    first.train()
    slow = _SlowToCreate(url) if PartialState().process_index == 1 else None
    resumed = sgd_trainer(args, config, kernelscope_client=slow)
    drawn = resumed.kernelscope_run_id
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed.train(resume_from_checkpoint=str(out / "trl" / "checkpoint-1"))
    if resumed.accelerator.is_main_process:
        report = {
            "first": first.kernelscope_run_id,
            "resumed": resumed.kernelscope_run_id,
            "drawn": drawn,
            "warnings": [str(w.message) for w in caught if "kernelscope" in str(w.message)],
        }
        (out.parent / "resumed.json").write_text(json.dumps(report))


def rank_args(out: Path, learning_rate: float, **overrides: Any) -> Any:
    """Plain-SGD ``GRPOConfig`` of the launched runs: 3 completions per rank and micro-batch,
    groups of 4 (one group spans the ranks), gloo."""
    return sgd_args(
        out,
        learning_rate,
        per_device_train_batch_size=3,
        num_generations=4,
        epsilon=0.02,
        ddp_backend="gloo",
        **overrides,
    )


def rloo_rank_args(out: Path, learning_rate: float, **overrides: Any) -> Any:
    """Plain-SGD ``RLOOConfig`` of the launched runs: the split of :func:`rank_args` (3
    completions per rank and micro-batch, groups of 4 spanning the ranks), gloo."""
    values = {"per_device_train_batch_size": 3, "ddp_backend": "gloo", **overrides}
    return rloo_args(out, learning_rate=learning_rate, **values)


def finish(out: Path, results: dict[str, Any]) -> None:
    """The main process writes ``results`` to ``OUT/run_ids.json``; every rank leaves the
    process group."""
    state = PartialState()
    if state.is_main_process:
        (out / "run_ids.json").write_text(json.dumps(results))
    state.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
    exit_without_teardown()
