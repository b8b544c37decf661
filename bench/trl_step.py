"""Benchmark: what attaching kernelscope costs a real TRL ``GRPOTrainer`` step (CPU, fp32).

A Qwen2 decoder (rotary positions, grouped-query attention, SwiGLU) built from a config at
about 10M and about 100M parameters, a word-level tokenizer built in code (nothing is
downloaded), ``--prompts`` prompts x ``--generations`` completions of up to ``--tokens``
tokens per optimizer step (generation included), AdamW at lr 1e-6.  Modes, each in its own
process (so that its peak RSS is its own), against one ``kernelscope serve`` on loopback:

* ``off``: a plain ``trl.GRPOTrainer``;
* ``kronecker``: ``KernelscopeGRPOTrainer`` with factorised kronecker rows made on the
  trainer (``k``, ``geometry="sgd"``);
* ``kronecker-adam``: kronecker rows in Adam geometry (the default for AdamW): exact rows from
  hooks (``HookedCapture``), each layer's ``sqrt(P_t) G_i`` sketched as ``A sqrt(P_t) G_i B^T``;
* ``countsketch``: exact per-sequence rows from hooks (``HookedCapture``: one batched forward
  and backward, each layer's per-sequence gradients formed in its hook), count-sketched on the
  trainer (``k``, Adam geometry, the default for AdamW);
* ``countsketch-chunks``: the same rows from exact per-sequence capture a chunk at a time
  (``capture_method="loop"``: before 2026-12-07 ``vmap`` failed on the forward hook TRL's
  gradient checkpointing adds, so ``auto`` ended up here);
* ``countsketch-vmap``: the same exact chunks by ``torch.func.vmap`` (``capture_method="vmap"``,
  what ``auto`` takes now);
* ``countsketch-keep``: ``countsketch`` with ``capture_checkpointing=False``: the capture
  keeps every activation of a micro-batch instead of checkpointing the layers TRL's gradient
  checkpointing (on by default) checkpoints, and runs no forward again in its backward;
* ``countsketch-shares``: ``countsketch`` plus every update token's exact share of ``dH1``
  (``token_shares=True``, math.md §9: ``cross_fit``, as a TRL step has no entropy-role
  sequences: a forward and a backward per half, and one forward-mode pass over the step's
  sequences, a micro-batch at a time).
* ``countsketch-sums``: ``countsketch`` plus each sequence's ``z_i = grad sum_t H_t``
  (``entropy_sum_rows=True``, math.md §3 "From the entropy sums": one more backward per
  micro-batch over the capture's forward, ``k`` more floats per sequence).
* ``countsketch-logged``: ``countsketch`` with ``log_metrics=True``: after each step the
  trainer waits until the service has the step ready and asks for two analyses, whose answers
  go to the trainer's logs.

Per mode: the median wall time of an optimizer step after the first (warm-up), the peak RSS,
and the bytes pushed per step (request bodies, counted in the client's transport).  ``T_train``
is the plain step's training forward and backward (TRL's ``compute_loss`` plus the
``backward``, summed over the step's micro-batches), timed in every process.  The ``off``
process runs first and again last; the plain step and ``T_train`` are the means of the two.
Added time is reported as a multiple of that ``T_train`` and as a share of the plain step;
ratios come from processes of the same run.  Stopped by SIGTERM (``timeout``, as
``bench/gpu.sh`` runs it), it prints the table of the modes measured so far.

    python bench/trl_step.py                  # 10M and 100M (about half an hour on 2 cores)
    python bench/trl_step.py --sizes 10M      # one size
    python bench/trl_step.py --quick          # a 1M model, 2 prompts: a minute
    python bench/trl_step.py --sizes moe --modes countsketch   # a Qwen3-MoE of 17.6M
    python bench/trl_step.py --device cuda    # on a GPU (bench/gpu.sh): peak = CUDA allocator
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# The repository before bench/ (the script's own directory): bench/sketch.py is not `sketch`.
sys.path.insert(0, str(REPO))

from processes import serve  # noqa: E402  (bench/processes.py)

MODES = (
    "off",
    "kronecker",
    "kronecker-adam",
    "countsketch",
    "countsketch-chunks",
    "countsketch-vmap",
    "countsketch-keep",
    "countsketch-shares",
    "countsketch-sums",
    "countsketch-logged",
)

#: Qwen2 shapes: about 1M (quick), 10M and 100M parameters (untied embeddings).
SIZES: dict[str, dict[str, int]] = {
    "1M": {"vocab": 2048, "hidden": 128, "layers": 2, "intermediate": 512, "heads": 4, "kv": 2},
    "10M": {"vocab": 8192, "hidden": 256, "layers": 6, "intermediate": 1024, "heads": 8, "kv": 2},
    "100M": {
        "vocab": 16384,
        "hidden": 768,
        "layers": 12,
        "intermediate": 2048,
        "heads": 12,
        "kv": 4,
    },
    # bench/capture.py's Qwen3-MoE (4 layers of 8 experts, 2 per token): TRL adds its
    # load-balancing loss, so every micro-batch has update rows
    "moe": {"vocab": 8192},
}


def _peak_mib(device: str) -> float:
    """Peak memory of this process (MiB): RSS high-water mark on the CPU (Linux reports
    ru_maxrss in KiB), torch's allocator peak on CUDA."""
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_model(size: str) -> Any:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if size == "moe":
        from capture import moe_model  # bench/capture.py

        return moe_model(SIZES[size]["vocab"], 256)
    s = SIZES[size]
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=s["vocab"],
        hidden_size=s["hidden"],
        num_hidden_layers=s["layers"],
        intermediate_size=s["intermediate"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv"],
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
    )
    return Qwen2ForCausalLM(config)


def build_tokenizer(vocab: int) -> Any:
    """Word-level: ``<pad>`` 0, ``<eos>`` 1, then words ``w2 .. w{vocab-1}``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, vocab)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=words, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>")


def random_prompts(vocab: int, count: int) -> list[str]:
    """``count`` prompts of 16 random words of the :func:`build_tokenizer` vocabulary (seed 1)."""
    import torch

    rng = torch.Generator().manual_seed(1)
    return [
        " ".join(f"w{int(t)}" for t in torch.randint(2, vocab, (16,), generator=rng))
        for _ in range(count)
    ]


def reward(completions: list[str], **_: Any) -> list[float]:
    """Share of even-numbered words: varies within every group of random completions."""
    out = []
    for text in completions:
        words = text.split()
        even = sum(1 for w in words if w[1:].isdigit() and int(w[1:]) % 2 == 0)
        out.append(even / max(len(words), 1))
    return out


def child(mode: str, size: str, url: str, args: argparse.Namespace) -> dict[str, Any]:
    """One mode in this process: train ``steps + 1`` optimizer steps, time them."""
    import httpx
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from clients.http import Client
    from clients.trl import KernelscopeConfig, KernelscopeGRPOTrainer

    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    model = build_model(size)
    vocab = SIZES[size]["vocab"]
    prompts = random_prompts(vocab, args.prompts)
    micro = args.prompts * args.generations // args.accumulation
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-"),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=args.accumulation,
        steps_per_generation=args.accumulation,
        num_generations=args.generations,
        max_completion_length=args.tokens,
        max_steps=args.steps + 1,
        learning_rate=1e-6,
        optim="adamw_torch",
        report_to="none",
        use_cpu=args.device == "cpu",
        bf16=False,
        save_strategy="no",
        logging_steps=1000,
        seed=0,
    )
    timers = {"train": 0.0}
    steps: list[float] = []
    train_per_step: list[float] = []

    class Timed(TrainerCallback):
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            timers["start"] = time.perf_counter()
            timers["train"] = 0.0

        def on_step_end(self, *a: Any, **k: Any) -> None:
            steps.append(time.perf_counter() - timers["start"])
            train_per_step.append(timers["train"])

    sent = {"bytes": 0}

    class Counting(httpx.HTTPTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            sent["bytes"] += len(request.read())
            return super().handle_request(request)

    common: dict[str, Any] = {
        "model": model,
        "reward_funcs": reward,
        "args": config,
        "train_dataset": Dataset.from_dict({"prompt": prompts * (args.steps + 2)}),
        "processing_class": build_tokenizer(vocab),
        "callbacks": [Timed()],
    }
    if mode == "off":
        trainer: GRPOTrainer = GRPOTrainer(**common)
    else:
        kind, _, how = mode.partition("-")
        sketch = {"kind": kind, "dim": args.k, "seed": 0}
        client = Client(url, transport=Counting())
        config_ks = KernelscopeConfig(
            url=url,
            sketch=sketch,
            sketch_on="trainer",
            capture_method={"chunks": "loop", "vmap": "vmap"}.get(how, "auto"),
            token_shares=how == "shares",
            entropy_sum_rows=how == "sums",
            log_metrics=how == "logged",
            capture_checkpointing=how != "keep",
            # plain kronecker is the factorised capture, which only the sgd geometry allows
            geometry="sgd" if mode == "kronecker" else "auto",
        )
        trainer = KernelscopeGRPOTrainer(**common, kernelscope=config_ks, kernelscope_client=client)
    # T_train: TRL's compute_loss plus the backward of its loss, per micro-batch, in every
    # mode (KernelscopeGRPOTrainer.compute_loss records the micro-batch, then calls this one).
    plain_loss = GRPOTrainer.compute_loss
    backward = trainer.accelerator.backward

    def timed_loss(self: GRPOTrainer, *a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        out = plain_loss(self, *a, **k)
        timers["train"] += time.perf_counter() - t0
        return out

    def timed_backward(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        out = backward(*a, **k)
        timers["train"] += time.perf_counter() - t0
        return out

    GRPOTrainer.compute_loss = timed_loss  # type: ignore[method-assign]
    trainer.accelerator.backward = timed_backward  # type: ignore[method-assign]
    logging: list[float] = []  # log_metrics: the wait for the step and its two analyses
    if isinstance(trainer, KernelscopeGRPOTrainer):
        log = trainer._kernelscope_log

        def timed_log(step: int) -> None:
            t0 = time.perf_counter()
            log(step)
            logging.append(time.perf_counter() - t0)

        trainer._kernelscope_log = timed_log  # type: ignore[method-assign]
    parameters = sum(p.numel() for p in model.parameters())
    start_bytes = sent["bytes"]
    trainer.train()
    measured = steps[1:]
    return {
        "mode": mode,
        "size": size,
        "parameters": parameters,
        "sequences": args.prompts * args.generations,
        "step_s": statistics.median(measured),
        "train_s": statistics.median(train_per_step[1:]),
        "peak_mib": _peak_mib(args.device),
        "bytes_per_step": (sent["bytes"] - start_bytes) / len(steps),
        "log_s": statistics.median(logging[1:]) if len(logging) > 1 else None,
    }


def run_child(mode: str, size: str, url: str, args: argparse.Namespace) -> dict[str, Any]:
    argv = [sys.executable, __file__, "--child", mode, "--size", size, "--url", url]
    names = ("prompts", "generations", "tokens", "accumulation", "steps", "k", "threads", "device")
    for name in names:
        argv += [f"--{name}", str(getattr(args, name))]
    # the repository first, then whatever the caller had (bench/gpu.sh: carried wheels)
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} {size} failed:\n{done.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def table(results: list[dict[str, Any]], k: int) -> str:
    """The Markdown table.  The plain step and its ``T_train`` are the means of the ``off``
    processes run first and last (both rows are shown: this machine's speed drifts between
    processes, the plain ``T_train`` of one code ranged 7.6-15.7 s over a day at 100M);
    ``T_train`` of the other rows is their own process's, for reference only."""
    lines = [
        "| model | mode | step (s) | T_train (s) | added / T_train | added / plain step | "
        "peak RSS (MiB) | RSS / plain | bytes per step | bytes / (8 n k) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for size in dict.fromkeys(r["size"] for r in results):
        rows = [r for r in results if r["size"] == size]
        plains = [r for r in rows if r["mode"] == "off"]
        if not plains:  # no plain step to compare with (it failed: main says so)
            continue
        step = statistics.mean(r["step_s"] for r in plains)
        t_train = statistics.mean(r["train_s"] for r in plains)
        peak = statistics.mean(r["peak_mib"] for r in plains)
        for r in rows:
            added = r["step_s"] - step
            bound = 8 * r["sequences"] * k
            plain = r["mode"] == "off"
            lines.append(
                f"| {size} ({r['parameters'] / 1e6:.1f}M) | {r['mode']} | {r['step_s']:.2f} | "
                f"{r['train_s']:.2f} | "
                + ("—" if plain else f"{added / t_train:.2f}x")
                + " | "
                + ("—" if plain else f"{added / step:.0%}")
                + f" | {r['peak_mib']:.0f} | {r['peak_mib'] / peak:.2f}x | "
                + ("—" if plain else f"{r['bytes_per_step'] / 1e6:.2f} MB")
                + " | "
                + ("—" if plain else f"{r['bytes_per_step'] / bound:.2f}")
                + " |"
            )
    return "\n".join(lines)


def _interrupted(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10M,100M")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--accumulation", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="measured steps after a warm-up")
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--modes", default=",".join(MODES), help="off is always run")
    parser.add_argument("--child", choices=MODES)
    parser.add_argument("--size", default="10M")
    parser.add_argument("--url")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.size, args.url, args)))
        return 0
    if args.quick:
        args.sizes, args.prompts, args.steps, args.k = "1M", 2, 2, 256
    results: list[dict[str, Any]] = []
    failed: list[str] = []
    # bench/gpu.sh runs this under `timeout`: its SIGTERM ends the run with the table of the
    # modes measured so far (the plain step first), not with nothing
    signal.signal(signal.SIGTERM, _interrupted)
    try:
        with serve(f"bench-trl-{os.getpid()}") as url:
            for size in args.sizes.split(","):
                # off first and last: the plain step is their mean, and their difference shows
                # how far the machine's speed moved while the modes ran
                modes = [m for m in args.modes.split(",") if m != "off"]
                for mode in ["off", *modes, *(["off"] if modes else [])]:
                    print(f"{size} {mode} ...", file=sys.stderr, flush=True)
                    try:
                        results.append(run_child(mode, size, url, args))
                    except RuntimeError as exc:  # one failing mode leaves the others' rows
                        print(exc, file=sys.stderr, flush=True)
                        failed.append(f"{size} {mode}")
    except KeyboardInterrupt:
        failed.append("the rest (stopped)")
    print(table(results, args.k))
    for r in results:
        if r.get("log_s") is not None:
            print(f"\n{r['size']} {r['mode']}: log_metrics took {r['log_s']:.3f} s per step")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
