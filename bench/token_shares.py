"""Benchmark: what the exact token shares of ``dH1`` cost (math.md §9), against a plain
forward and backward of the same batch, measured in the same process.

A Qwen2 decoder built from a config (``bench/trl_step.py``'s shapes: about 1M, 10M or 100M
parameters), ``--sequences`` update sequences and as many entropy-role sequences of
``--prompt`` + ``--tokens`` tokens.  Timed, each the median of ``--repeats`` runs after a
warm-up:

* ``T_fb``: one forward and backward of the update batch's summed log-probs (what a training
  step costs per batch, the baseline);
* ``independent``: ``clients.token_shares.token_shares`` with entropy-role sequences (one
  backward over them, one forward-mode pass over the update batch);
* ``u_statistic``: ``token_shares_u_statistic`` without them (per-prompt passes, and one
  backward and one forward-mode pass per sequence for its self-term);
* ``cross_fit``: ``token_shares_cross_fit`` without them (a forward and a backward over each
  half's own sequences, one forward-mode pass of each half along the other half's ``v``): what
  the TRL trainer runs when its rows come from exact chunks;
* a ``countsketch`` capture by hooks (``HookedCapture``, ``k = --k``: the rows of a TRL step),
  the same capture adding up ``v_0, v_1`` in its backward (``EntropyDirections``), and
  ``cross_fit`` given those (its forward-mode passes alone): what the TRL trainer runs when
  its rows come from hooks, the shares then costing the difference of the first two plus the
  third.

    python bench/token_shares.py                 # 10M
    python bench/token_shares.py --size 1M       # seconds
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trl_step import SIZES, build_model  # noqa: E402  (bench/trl_step.py)

from clients.capture import (  # noqa: E402
    SequenceBatch,
    forward_logits,
    response_logprobs,
    response_window,
)
from clients.factorised import EntropyDirections, HookedCapture  # noqa: E402
from clients.token_shares import (  # noqa: E402
    token_shares,
    token_shares_cross_fit,
    token_shares_u_statistic,
)
from sketch.cross_fit import cross_fit_halves  # noqa: E402


def batch(vocab: int, n: int, prompt: int, tokens: int, seed: int) -> SequenceBatch:
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(2, vocab, (prompt,), generator=gen) for _ in range(n)]
    responses = [torch.randint(2, vocab, (tokens,), generator=gen) for _ in range(n)]
    return SequenceBatch.from_pairs(prompts, responses)


def timed(work: Callable[[], object], repeats: int) -> float:
    work()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="10M", choices=sorted(SIZES))
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--group", type=int, default=8, help="sequences per prompt")
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--k", type=int, default=4096)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = build_model(args.size).eval()
    vocab = SIZES[args.size]["vocab"]
    update = batch(vocab, args.sequences, args.prompt, args.tokens, 0)
    entropy = batch(vocab, args.sequences, args.prompt, args.tokens, 1)
    coefficients = torch.randn(update.input_ids.shape)
    h = torch.randn(args.sequences) / args.sequences
    prompts = [f"p{i // args.group}" for i in range(args.sequences)]
    ids = [f"s{i}" for i in range(args.sequences)]

    keep = response_window(update.response_mask)  # the LM head as TRL's training forward

    def forward_backward() -> None:
        logits = forward_logits(model, update.input_ids, update.attention_mask, logits_to_keep=keep)
        response_logprobs(logits, update.input_ids, update.response_mask).sum().backward()
        model.zero_grad(set_to_none=True)

    base = timed(forward_backward, args.repeats)
    rows = [("forward + backward (T_fb)", base)]
    rows.append(
        (
            "independent (entropy-role sequences)",
            timed(lambda: token_shares(model, update, coefficients, entropy, h, 1.0), args.repeats),
        )
    )
    rows.append(
        (
            "u_statistic (no entropy-role sequences)",
            timed(
                lambda: token_shares_u_statistic(model, update, prompts, coefficients, h, 1.0),
                args.repeats,
            ),
        )
    )
    rows.append(
        (
            "cross_fit (no entropy-role sequences)",
            timed(
                lambda: token_shares_cross_fit(model, update, ids, prompts, coefficients, h, 1.0),
                args.repeats,
            ),
        )
    )
    hooked = HookedCapture(model, {"kind": "countsketch", "dim": args.k, "seed": 0})
    halves = torch.from_numpy(cross_fit_halves(ids, prompts).astype("int64"))
    weights = torch.stack([torch.where(halves == d, h, torch.zeros_like(h)) for d in (0, 1)])
    found: list[list[dict[str, torch.Tensor]]] = []

    def capture_adding() -> None:
        directions = EntropyDirections(lambda _: weights)
        hooked(update, directions=directions)
        found[:] = [directions.totals]

    rows.append(("countsketch rows by hooks", timed(lambda: hooked(update), args.repeats)))
    rows.append(("the same, adding up v_0, v_1", timed(capture_adding, args.repeats)))
    rows.append(
        (
            "cross_fit given v_0, v_1 (forward-mode passes)",
            timed(
                lambda: token_shares_cross_fit(
                    model, update, ids, prompts, coefficients, h, 1.0, directions=found[0]
                ),
                args.repeats,
            ),
        )
    )
    parameters = sum(p.numel() for p in model.parameters())
    print(
        f"{args.size} Qwen2 ({parameters / 1e6:.1f}M parameters), {args.sequences} sequences of "
        f"{args.prompt} + {args.tokens} tokens, {args.group} per prompt, {args.threads} threads\n"
    )
    print("| work | seconds | / T_fb |\n|---|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.3f} | {seconds / base:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
