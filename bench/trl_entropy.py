"""The entropy TRL logs, next to kernelscope's prediction of its change (math.md §8).

A real ``GRPOTrainer`` (``KernelscopeGRPOTrainer``) on a Qwen2 decoder built from a config
(``bench/trl_step.py``'s ``--size``, default 1M), AdamW, ``--prompts`` prompts x
``--generations`` completions of up to ``--tokens`` tokens, logging every step.  Per optimizer
step ``s`` it prints TRL's own logged ``entropy`` (the token mean over the step's completions),
kernelscope's ``target=token_mean`` answer for the step (``delta_h1``: the change due to this
step's sequences at Adam's share of the rate; ``delta_h1_applied``: first order along the update
AdamW really took, momentum included; the realized change measured on the same completions from
their entropy sums, with its standard error), and the change of TRL's logged value to the next
step, which is measured on the *next* step's completions: a fresh sample, so it carries that
sample's noise on top of the step's effect.

    python bench/trl_entropy.py                 # 1M, 8 steps: a few minutes on 2 cores
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from processes import serve  # noqa: E402  (bench/processes.py)
from trl_step import SIZES, build_model, build_tokenizer, random_prompts, reward  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1M", choices=sorted(SIZES))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--kind", default="exact", help="the run's sketch kind (exact: raw rows, no sketch error)"
    )
    parser.add_argument("--dim", type=int, default=4096)
    args = parser.parse_args(argv)

    import torch
    from datasets import Dataset
    from trl import GRPOConfig

    from clients.http import Client
    from clients.trl import KernelscopeConfig, KernelscopeGRPOTrainer

    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    vocab = SIZES[args.size]["vocab"]
    prompts = random_prompts(vocab, args.prompts)
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-entropy-"),
        per_device_train_batch_size=args.prompts * args.generations,
        gradient_accumulation_steps=1,
        num_generations=args.generations,
        max_completion_length=args.tokens,
        max_steps=args.steps + 1,  # the last step's logged entropy closes the table
        learning_rate=args.learning_rate,
        optim="adamw_torch",
        report_to="none",
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        logging_steps=1,
        seed=0,
    )
    with serve("ksbench-trl-entropy") as url:
        trainer = KernelscopeGRPOTrainer(
            model=build_model(args.size),
            reward_funcs=reward,
            args=config,
            train_dataset=Dataset.from_dict({"prompt": prompts * (args.steps + 2)}),
            processing_class=build_tokenizer(vocab),
            kernelscope=KernelscopeConfig(
                url=url, sketch={"kind": args.kind, "dim": args.dim, "seed": 0}
            ),
        )
        trainer.train()
        logged = {
            int(e["step"]): float(e["entropy"]) for e in trainer.state.log_history if "entropy" in e
        }
        rows: list[tuple[Any, ...]] = []
        with Client(url) as client:
            for step in range(args.steps):
                client.wait_ready(trainer.kernelscope_run_id, step, timeout=120)
                answer = client.entropy(trainer.kernelscope_run_id, step, target="token_mean")
                realized = answer.realized or {}
                rows.append((step, answer, realized))
    print(
        "| step | TRL entropy (logged) | T before (kernelscope) | dT1 | dT1_applied | "
        "realized dT | next logged - logged |"
    )
    print("|---|---|---|---|---|---|---|")
    for step, answer, realized in rows:
        now, later = logged.get(step + 1), logged.get(step + 2)
        se = (answer.se_sampling**2 + answer.se_sketch**2) ** 0.5
        before = realized.get("entropy_before")
        delta = realized.get("delta_h")
        print(
            f"| {step} | {now:.4f} | "
            + ("—" if before is None else f"{before:.4f}")
            + f" | {answer.delta_h1:+.4f} ± {se:.4f} | "
            + ("—" if answer.delta_h1_applied is None else f"{answer.delta_h1_applied:+.4f}")
            + " | "
            + ("—" if delta is None else f"{delta:+.4f} ± {realized.get('se') or 0:.4f}")
            + " | "
            + ("—" if now is None or later is None else f"{later - now:+.4f}")
            + " |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
