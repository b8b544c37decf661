"""Benchmark: Adam-geometry predictions against what an AdamW GRPO run really does (CPU).

The 10M Qwen2 of ``bench/trl_step.py`` trained by a real ``KernelscopeGRPOTrainer`` with AdamW
(TRL's default optimizer, betas (0.9, 0.999), weight decay 0) at the learning rates RL
fine-tuning uses, ``--steps`` optimizer steps each, rows count-sketched on the trainer in
``adam`` geometry (the default for Adam).  Per step the service's default entropy answer gives:

* ``delta_h1``: the first-order change due to the step's own batch, ``-lr c (1 - beta1)/(1 -
  beta1^t) P_t g`` (the batch's share of Adam's momentum, ``c`` what clipping at TRL's
  default ``max_grad_norm = 1`` scaled its gradient by; docs/trl.md "Geometry");
* ``delta_h1_applied``: ``<grad H, u>`` of the update really applied (momentum included);
* the realized change, estimated from ``logprob_after`` (math.md §6), with its standard error.

With ``--entropy-sum-rows`` the trainer also pushes the gradients of the sequences' entropy
sums, and both predictions are read twice from the same steps: with ``grad H`` estimated from
the score rows alone (``?entropy_gradient=score``) and from the entropy sums (math.md §3), one
table each, plus their error bars side by side.

Each prediction is compared with the realized change within 2 of their standard errors
combined (``se_sampling`` and ``se_sketch`` for ``delta_h1``, ``se_applied`` for the applied
change; the covariance of the estimates, which share their sequences, is left out).

The table gives, per learning rate, the medians of ``delta_h1 / delta_h1_applied`` and of
``delta_h1_applied / realized``, how many steps have the realized change within 2 s.e. of each
prediction, and the sign agreement; ``--per-step`` adds one row per step.

    python bench/trl_adam.py                     # lr 1e-6 and 1e-5, 20 steps (about 10 min)
    python bench/trl_adam.py --quick             # the 1M model, 4 steps
    python bench/trl_adam.py --entropy-sum-rows  # grad H from the score rows and from the sums
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # before bench/: bench/sketch.py is not `sketch`

from processes import serve  # noqa: E402  (bench/processes.py)
from trl_step import (  # noqa: E402
    SIZES,
    build_model,
    build_tokenizer,
    random_prompts,
    reward,
)


def train(url: str, size: str, lr: float, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One AdamW run; the per-step numbers of the service's entropy answers."""
    from datasets import Dataset
    from trl import GRPOConfig

    from clients.http import Client
    from clients.trl import KernelscopeConfig, KernelscopeGRPOTrainer

    warnings.simplefilter("ignore")
    vocab = SIZES[size]["vocab"]
    prompts = random_prompts(vocab, args.prompts)
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-adam-"),
        per_device_train_batch_size=args.prompts * args.generations // 2,
        gradient_accumulation_steps=2,
        steps_per_generation=2,
        num_generations=args.generations,
        max_completion_length=args.tokens,
        max_steps=args.steps,
        learning_rate=lr,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        weight_decay=0.0,
        report_to="none",
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        logging_steps=1000,
        seed=0,
    )
    trainer = KernelscopeGRPOTrainer(
        model=build_model(size),
        reward_funcs=reward,
        args=config,
        train_dataset=Dataset.from_dict({"prompt": prompts * (args.steps + 1)}),
        processing_class=build_tokenizer(vocab),
        kernelscope=KernelscopeConfig(
            url=url,
            sketch={"kind": "countsketch", "dim": args.k, "seed": 0},
            sketch_on="trainer",
            entropy_sum_rows=args.entropy_sum_rows,
        ),
    )
    assert trainer.kernelscope_geometry == "adam"
    trainer.train()
    gradients = ("score", "entropy_sum") if args.entropy_sum_rows else ("score",)
    rows: dict[str, list[dict[str, Any]]] = {g: [] for g in gradients}
    with Client(url) as client:
        for step in range(args.steps):
            status = client.wait_ready(trainer.kernelscope_run_id, step, timeout=300)
            share = (1 - 0.9) / (1 - 0.9 ** (step + 1))  # beta1 = 0.9, step t = step + 1
            for gradient in gradients:
                report = client.entropy(trainer.kernelscope_run_id, step, entropy_gradient=gradient)
                realized = report.realized or {}
                rows[gradient].append(
                    {
                        "step": step,
                        "dh1": report.delta_h1,
                        "dh1_se": math.hypot(report.se_sampling, report.se_sketch),
                        "applied": report.delta_h1_applied,
                        "applied_se": report.se_applied,
                        "realized": realized.get("delta_h"),
                        "realized_se": realized.get("se"),
                        # what clipping (max_grad_norm 1, TRL's default) scaled the gradient by
                        "clip": status.learning_rate / (lr * share),
                    }
                )
    return rows


def summary(lr: float, gradient: str, rows: list[dict[str, Any]]) -> str:
    def within(pred: str) -> str:
        hits = sum(
            1
            for r in rows
            if abs(r[pred] - r["realized"]) <= 2 * math.hypot(r["realized_se"], r[f"{pred}_se"])
        )
        return f"{hits}/{len(rows)}"

    def same_sign(pred: str) -> str:
        return f"{sum(1 for r in rows if r[pred] * r['realized'] > 0)}/{len(rows)}"

    ratio_pred = statistics.median(r["dh1"] / r["applied"] for r in rows)
    ratio_applied = statistics.median(r["applied"] / r["realized"] for r in rows)
    mean_abs = statistics.mean(abs(r["realized"]) for r in rows)
    clipped = sum(1 for r in rows if r["clip"] < 1 - 1e-6)
    # medians: a few steps with heavy-tailed importance ratios have bars 100x the others'
    median_se = statistics.median(r["dh1_se"] for r in rows)
    median_applied_se = statistics.median(r["applied_se"] for r in rows)
    median_realized_se = statistics.median(r["realized_se"] for r in rows)
    return (
        f"| {lr:g} | {gradient} | {len(rows)} | {clipped}/{len(rows)} | {mean_abs:.3g} | "
        f"{median_realized_se:.2g} | {median_se:.2g} | {median_applied_se:.2g} | "
        f"{ratio_pred:.3f} | "
        f"{ratio_applied:.3f} | {within('dh1')} | {within('applied')} | {same_sign('dh1')} | "
        f"{same_sign('applied')} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="10M")
    parser.add_argument("--lrs", default="1e-6,1e-5")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--per-step", action="store_true")
    parser.add_argument("--entropy-sum-rows", action="store_true")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.steps, args.prompts, args.k = "1M", 4, 4, 512
    results: dict[float, dict[str, list[dict[str, Any]]]] = {}
    with serve(f"bench-adam-{os.getpid()}") as url:
        for lr in (float(v) for v in args.lrs.split(",")):
            print(f"lr {lr:g} ...", file=sys.stderr, flush=True)
            results[lr] = train(url, args.size, lr, args)
    print(
        "| lr | grad H from | steps | clipped | mean abs realized | median s.e. realized | "
        "median s.e. dH1 | median s.e. applied | median dH1 / applied | median applied / "
        "realized | realized within 2 s.e. of dH1 | ... of applied | same sign dH1 | same sign "
        "applied |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for lr, by_gradient in results.items():
        for gradient, rows in by_gradient.items():
            print(summary(lr, gradient, rows))
    if args.per_step:
        print(
            "\n| lr | grad H from | step | clip factor | dH1 | ± s.e. | applied | ± s.e. | "
            "realized | ± s.e. |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
        for lr, by_gradient in results.items():
            for gradient, rows in by_gradient.items():
                for r in rows:
                    print(
                        f"| {lr:g} | {gradient} | {r['step']} | {r['clip']:.3g} | "
                        f"{r['dh1']:.4g} | {r['dh1_se']:.2g} | {r['applied']:.4g} | "
                        f"{r['applied_se']:.2g} | {r['realized']:.4g} | {r['realized_se']:.2g} |"
                    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
