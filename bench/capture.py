"""Benchmark: per-sequence gradient capture against one plain batched backward (CPU).

A GPT-2 of about 10M parameters built from a config (no download), ``n`` sequences of a
16-token prompt and a ``T``-token response (default n = 32, T = 64).  Methods:

* ``plain``: one batched forward + backward of ``sum_i S_i`` (what a trainer does anyway; the
  LM head on the response positions alone, ``logits_to_keep``, as TRL runs it);
* ``loop``: ``capture_gradients(method="loop")``, one backward per sequence;
* ``vmap``: ``capture_gradients(method="vmap")``, ``torch.func`` in chunks;
* ``factorised``: ``FactorisedCapture`` (kronecker sketch of width ``k`` from hooks, one
  batched backward; vector parameters captured exactly and count-sketched);
* ``hooked-kronecker``, ``hooked-countsketch``: ``HookedCapture`` of that kind in ``adam``
  geometry (each layer's per-sequence ``G_i`` formed in its hook, scaled by a fixed
  ``sqrt(P)`` and sketched): what a kronecker run costs when Adam's preconditioner is wanted,
  against the factorised capture and the count sketch.

``--checkpointing`` turns transformers' activation checkpointing on (non-reentrant, what
``Trainer`` does with ``gradient_checkpointing``, TRL's default) and puts the model in training
mode: ``plain`` is then the checkpointed training forward and backward, and the captures
checkpoint the same layers (``clients.capture.checkpointing_layers``).  ``--tokens T`` sets the
response length, for the long completions where activations, not parameters, fill memory.

Peak memory: each method runs once in its own subprocess, and the table reports its RSS
high-water mark (``ru_maxrss``; tracemalloc does not see torch's allocations) above the RSS
after building the model and batch.  Times: one subprocess runs all methods interleaved,
round by round (one warm-up round, then ``--repeats``), so that load from other processes
hits every method alike; the table gives the best and the median round, with one torch
thread by default.  Ratios are against ``plain`` measured in the same process.  On a GPU
(``--device cuda``, ``bench/gpu.sh``) every run is timed to ``torch.cuda.synchronize()``, and
the peak is the CUDA allocator's above the model and batch, reset before each run, so that one
process measures both.

    python bench/capture.py            # the full setting
    python bench/capture.py --quick    # a small model, n = 8, T = 16: seconds
    python bench/capture.py --qwen2 100M --methods plain,hooked-countsketch --threads 2
    python bench/capture.py --device cuda --qwen2 100M   # the GPU targets (bench/gpu.sh)
    python bench/capture.py --qwen2 100M --tokens 512 --checkpointing --methods plain,factorised
    python bench/capture.py --moe --methods plain,loop,hooked-countsketch
    python bench/capture.py --hybrid --methods plain,loop,hooked-countsketch
    python bench/capture.py --falcon --methods plain,loop,factorised,hooked-countsketch
    python bench/capture.py --gpt-oss --methods plain,loop,hooked-countsketch

``--moe`` takes a Qwen3-MoE of 17.6M parameters (4 layers, 8 experts of which 2 per token,
the experts 6.3M of them) and a micro-batch of 16 sequences of up to 24 response
tokens: its routers and experts are captured by a re-run per sequence (docs/clients.md), and
before 2026-12-06 such a model fell back to ``loop``.  ``--hybrid`` takes a Qwen3.5 text
model (three gated delta nets and one full attention) and the same micro-batch: each mixer
is re-run per sequence for its own parameters and its ``conv1d`` weight, which it hands to a
kernel without calling the module (before 2026-12-06 such a model failed in the hooks).
``--falcon`` takes a Falcon, whose ``nn.Linear`` subclass keeps the linear hooks once its
first call is checked; ``--gpt-oss`` a GPT-OSS, whose attention sinks make the hooks re-run
each attention per sequence.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# first, before bench/ (the script's own directory): bench/sketch.py is not `sketch`
sys.path.insert(0, str(REPO))

METHODS = ("plain", "loop", "vmap", "factorised", "hooked-kronecker", "hooked-countsketch")


#: ``--moe``, ``--hybrid``, ``--falcon``: a model of another family, its name in the table
FAMILIES = {"moe": "Qwen3-MoE", "hybrid": "Qwen3.5", "falcon": "Falcon", "gpt-oss": "GPT-OSS"}


def _config(quick: bool, qwen2: str | None = None, family: str | None = None) -> dict[str, Any]:
    if family is not None:
        return {"family": family, "vocab": 8192, "n": 16, "T": 24, "k": 4096}
    if qwen2 is not None:  # bench/trl_step.py's model and one of its micro-batches
        from trl_step import SIZES  # bench/trl_step.py

        return {"qwen2": qwen2, "vocab": SIZES[qwen2]["vocab"], "n": 16, "T": 24, "k": 4096}
    if quick:
        return {"n_embd": 64, "n_layer": 2, "n_head": 4, "vocab": 2048, "n": 8, "T": 16, "k": 256}
    return {"n_embd": 256, "n_layer": 6, "n_head": 8, "vocab": 16384, "n": 32, "T": 64, "k": 4096}


def _rss_mib() -> float:
    """Current resident set size (MiB), from /proc."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib() -> float:
    """RSS high-water mark of this process (MiB); Linux reports ru_maxrss in KiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _synchronize(device: str) -> None:
    """Wait for the device's queued work (a CUDA run returns before its kernels finish)."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _setup(cfg: dict[str, Any], seed: int, threads: int, device: str) -> tuple[Any, Any]:
    """The model (GPT-2, or the Qwen2 of ``--qwen2``; eval mode) and a right-padded batch of
    ``n`` sequences, on ``device``."""
    import torch

    from clients.capture import SequenceBatch

    warnings.simplefilter("ignore")
    if threads > 0:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    prompt_len = 16
    if "qwen2" in cfg:
        from trl_step import build_model  # bench/trl_step.py

        model = build_model(cfg["qwen2"]).eval()
    elif cfg.get("family") is not None:
        build = {
            "moe": moe_model,
            "hybrid": hybrid_model,
            "falcon": falcon_model,
            "gpt-oss": gpt_oss_model,
        }[cfg["family"]]
        model = build(cfg["vocab"], prompt_len + cfg["T"] + 8).eval()
    else:
        model = _gpt2(cfg, prompt_len)
    if cfg.get("checkpointing"):  # as Trainer turns it on; dropout is 0 in both models
        model.activation_checkpointing_enable({"use_reentrant": False})
        model.train()
    g = torch.Generator().manual_seed(seed + 1)
    prompts = [torch.randint(0, cfg["vocab"], (prompt_len,), generator=g) for _ in range(cfg["n"])]
    # response lengths between T/2 and T, so that there is padding as in a real batch
    lengths = [cfg["T"] - (i * 7) % (cfg["T"] // 2) for i in range(cfg["n"])]
    responses = [torch.randint(0, cfg["vocab"], (t,), generator=g) for t in lengths]
    return model.to(device), SequenceBatch.from_pairs(prompts, responses).to(device)


def _gpt2(cfg: dict[str, Any], prompt_len: int) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_embd=cfg["n_embd"],
        n_layer=cfg["n_layer"],
        n_head=cfg["n_head"],
        vocab_size=cfg["vocab"],
        n_positions=prompt_len + cfg["T"] + 8,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config).eval()


def moe_model(vocab: int, positions: int) -> Any:
    """A Qwen3-MoE of 17.6M parameters at vocabulary 8192 (4 layers of 8 experts, 2 per
    token), from a config: transformers' MoE layers (a router returning logits, routing weights
    and chosen experts; experts as 3-D parameters, grouped matmul)."""
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=vocab,
        hidden_size=256,
        intermediate_size=512,
        moe_intermediate_size=512,
        num_experts=8,
        num_experts_per_tok=2,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=positions,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
    )
    model = Qwen3MoeForCausalLM(config)
    with torch.no_grad():  # the routers start at zero: route by something
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.1)
    return model


def _from_config(model_type: str, vocab: int, **values: Any) -> Any:
    """A causal LM of a transformers ``model_type`` from a config (seed 0): hidden size 256,
    vocabulary ``vocab``, token id 1 to begin and end and 0 to pad, and ``values``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        model_type,
        vocab_size=vocab,
        hidden_size=256,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
        **values,
    )
    return AutoModelForCausalLM.from_config(config)


def hybrid_model(vocab: int, positions: int) -> Any:
    """A Qwen3.5 text model (gated delta nets, three in four layers, beside full attention)
    from a config, at vocabulary 8192: its mixers hand their ``conv1d`` weight to a kernel
    and run a gated norm on each token's heads, so the hooks re-run each mixer per sequence."""
    return _from_config(
        "qwen3_5_text",
        vocab,
        intermediate_size=768,
        num_hidden_layers=4,
        layer_types=["linear_attention"] * 3 + ["full_attention"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        linear_num_value_heads=4,
        linear_num_key_heads=2,
        linear_key_head_dim=64,
        linear_value_head_dim=64,
        max_position_embeddings=positions,
        tie_word_embeddings=False,
    )


def falcon_model(vocab: int, positions: int) -> Any:
    """A Falcon (Falcon-7B's layout: parallel attention and MLP, one key-value head) of 4.9M
    parameters at vocabulary 8192, from a config: its projections are ``FalconLinear``, an
    ``nn.Linear`` subclass with a forward of its own, checked on the first capture against
    ``nn.Linear``'s and then given the linear hooks (before 2026-12-06: re-run per sequence).
    Falcon has no position limit to set (rotary), so ``positions`` is unused."""
    del positions
    return _from_config(
        "falcon",
        vocab,
        num_hidden_layers=4,
        num_attention_heads=4,
        new_decoder_architecture=False,
        multi_query=True,
        parallel_attn=True,
        bias=False,
    )


def gpt_oss_model(vocab: int, positions: int) -> Any:
    """A GPT-OSS of 4 layers (sliding and full attention in turn, hidden 256, 8 experts of
    which 2 per token) at vocabulary 8192, from a config: each attention holds its sinks beside
    its projections, so the hooks re-run the attention whole per sequence for them, and the
    MoE layers' routers and experts are re-run per sequence too."""
    import torch

    model = _from_config(
        "gpt_oss",
        vocab,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        num_local_experts=8,
        num_experts_per_tok=2,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention"] * 2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        max_position_embeddings=positions,
        tie_word_embeddings=False,
    )
    with torch.no_grad():  # the routers and sinks start at zero: route and attend by something
        for name, p in model.named_parameters():
            if name.endswith(("router.weight", "sinks")):
                p.normal_(0.0, 0.1)
    return model


def _runner(method: str, model: Any, batch: Any, cfg: dict[str, Any]) -> Callable[[], object]:
    """A closure running ``method`` once on the batch."""
    import torch

    from clients.capture import (
        capture_gradients,
        forward_logits,
        response_logprobs,
        response_window,
    )
    from clients.factorised import FactorisedCapture, HookedCapture

    if method == "plain":
        # the LM head on the response positions alone, as TRL's training forward runs it
        keep = response_window(batch.response_mask)

        def plain() -> None:
            model.zero_grad(set_to_none=True)
            logits = forward_logits(
                model, batch.input_ids, batch.attention_mask, logits_to_keep=keep
            )
            response_logprobs(logits, batch.input_ids, batch.response_mask).sum().backward()

        return plain
    if method == "loop":
        return lambda: capture_gradients(model, batch, method="loop")
    if method == "vmap":
        return lambda: capture_gradients(model, batch, method="vmap", chunk_size=8)
    if method == "factorised":
        capture = FactorisedCapture(model, dim=cfg["k"], seed=0)
        return lambda: capture(batch)
    if method.startswith("hooked-"):
        spec = {"kind": method.removeprefix("hooked-"), "dim": cfg["k"], "seed": 0}
        hooked = HookedCapture(model, spec)
        g = torch.Generator().manual_seed(1)
        params = dict(model.named_parameters())
        scale = {
            n: (torch.rand(params[n].shape, generator=g) + 0.5).to(params[n].device)
            for n in hooked.parameters
        }
        return lambda: hooked(batch, row_scale=scale)
    raise ValueError(f"unknown method {method!r}")


def run_memory(method: str, cfg: dict[str, Any], seed: int, threads: int) -> dict[str, Any]:
    """Peak RSS of one method, alone in this process, above the RSS of model + batch."""
    model, batch = _setup(cfg, seed, threads, "cpu")
    base = _rss_mib()
    _runner(method, model, batch, cfg)()
    return {"method": method, "peak_mib": _peak_mib() - base}


def run_timing(
    methods: list[str], cfg: dict[str, Any], repeats: int, seed: int, threads: int, device: str
) -> dict[str, Any]:
    """Times of every method, interleaved round by round in one process (one warm-up round),
    so that load from other processes hits all methods alike."""
    import torch

    model, batch = _setup(cfg, seed, threads, device)
    runners = {m: _runner(m, model, batch, cfg) for m in methods}
    times: dict[str, list[float]] = {m: [] for m in methods}
    peaks = dict.fromkeys(methods, 0.0)  # CUDA only: MiB above what the run started with
    for round_ in range(repeats + 1):
        for m in methods:
            _synchronize(device)
            if device == "cuda":
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            runners[m]()
            _synchronize(device)
            if round_ > 0:
                times[m].append(time.perf_counter() - t0)
            if device == "cuda":
                peak = (torch.cuda.max_memory_allocated() - base) / 2**20
                peaks[m] = max(peaks[m], peak)
    return {
        "peaks": peaks if device == "cuda" else None,
        "times": times,
        "params": sum(p.numel() for p in model.parameters()),
        "n": cfg["n"],
        "T": cfg["T"],
        "k": cfg["k"],
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "CPU",
    }


def _subprocess(args: list[str]) -> dict[str, Any] | None:
    out = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, check=False, cwd=REPO
    )
    if out.returncode != 0:
        print(f"{args}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
        return None
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small model and batch")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads per run (0: torch's default)"
    )
    parser.add_argument(
        "--qwen2",
        choices=("1M", "10M", "100M"),
        help="bench/trl_step.py's Qwen2 of that size and a micro-batch of it (n = 16, T = 24)",
    )
    parser.add_argument(
        "--moe",
        dest="family",
        action="store_const",
        const="moe",
        help="a Qwen3-MoE of 17.6M parameters",
    )
    parser.add_argument(
        "--hybrid",
        dest="family",
        action="store_const",
        const="hybrid",
        help="a Qwen3.5 (gated delta nets) from a config",
    )
    parser.add_argument(
        "--gpt-oss",
        dest="family",
        action="store_const",
        const="gpt-oss",
        help="a GPT-OSS (attention sinks, MoE) from a config",
    )
    parser.add_argument(
        "--falcon",
        dest="family",
        action="store_const",
        const="falcon",
        help="a Falcon (its own nn.Linear subclass) from a config",
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--tokens", type=int, default=None, help="response length T")
    parser.add_argument(
        "--checkpointing", action="store_true", help="activation checkpointing, training mode"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cfg = _config(args.quick, args.qwen2, args.family)
    if args.tokens is not None:
        cfg["T"] = args.tokens
    cfg["checkpointing"] = args.checkpointing
    methods = args.methods.split(",")
    if args.worker == "timing":
        timing = run_timing(methods, cfg, args.repeats, args.seed, args.threads, args.device)
        print(json.dumps(timing))
        return 0
    if args.worker is not None:
        print(json.dumps(run_memory(args.worker, cfg, args.seed, args.threads)))
        return 0

    common = ["--seed", str(args.seed), "--threads", str(args.threads), "--device", args.device]
    common += ["--quick"] if args.quick else []
    common += ["--qwen2", args.qwen2] if args.qwen2 else []
    common += [f"--{args.family}"] if args.family else []
    common += ["--tokens", str(cfg["T"])]
    common += ["--checkpointing"] if args.checkpointing else []
    timing = _subprocess(
        ["--worker", "timing", "--methods", args.methods, "--repeats", str(args.repeats), *common]
    )
    if timing is None:
        return 1
    memory: dict[str, float] = timing["peaks"] or {}
    if timing["peaks"] is None:  # RSS: one process per method
        for m in methods:
            row = _subprocess(["--worker", m, *common])
            memory[m] = float("nan") if row is None else row["peak_mib"]
    best = {m: min(t) for m, t in timing["times"].items()}
    family = FAMILIES.get(args.family or "")
    print(
        f"{family or ('Qwen2' if args.qwen2 else 'GPT-2')} "
        f"{timing['params'] / 1e6:.1f}M parameters, "
        f"n = {timing['n']} sequences, "
        f"response <= {timing['T']} tokens (+16 prompt), kronecker k = {timing['k']}, "
        f"{timing['threads']} torch thread(s), {timing['device']}, "
        f"activation checkpointing {'on' if args.checkpointing else 'off'}; "
        f"best of {args.repeats} interleaved rounds"
    )
    plain = best.get("plain", float("nan"))
    loop = best.get("loop", float("nan"))
    print(
        f"{'method':<12}{'best s':>9}{'median s':>10}{'x plain':>9}{'loop / it':>11}"
        f"{'peak MiB':>10}"
    )
    rows = []
    for m in methods:
        med = statistics.median(timing["times"][m])
        print(
            f"{m:<12}{best[m]:>9.3f}{med:>10.3f}{best[m] / plain:>9.2f}{loop / best[m]:>11.2f}"
            f"{memory[m]:>10.0f}"
        )
        rows.append({"method": m, "seconds": best[m], "median_seconds": med, "peak_mib": memory[m]})
    if args.json is not None:
        args.json.write_text(json.dumps({"config": cfg, "timing": timing, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
