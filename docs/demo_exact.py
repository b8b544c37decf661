"""Check the demo's entropy numbers against exact enumeration of the whole response space.

    .venv/bin/python docs/demo_exact.py [--steps 20] [--steps-to-check 0 1 3 6 11 18 19]

Runs the demo (``clients.demo.run_demo``, its own embedded service, the default
``DemoConfig``) and, after each checked step, enumerates every response of every prompt: the
demo's policy answers each of its 4 prompts with exactly ``max_new_tokens = 6`` tokens out
of a vocabulary of 8 (``CopyTask`` without EOS stopping), so ``8^6 = 262,144`` responses per
prompt, and ``S(t|p)`` is the sum of the response tokens' log-probs over the full
vocabulary (``clients.capture.sequence_logprobs``).  In float64, on a copy of the model, it
computes

* the sequence entropy ``H = (1/B) sum_p H(p)``, ``H(p) = -sum_t pi(t|p) S(t|p)``
  (docs/math.md §3) before the step (``params_before``) and after it (the trained model), so
  the exact realized change ``H_after - H_before``;
* the exact first-order change ``<grad H, u>``, ``u = theta_after - theta_before`` (plain
  SGD: the applied update), with ``grad H`` by autograd accumulated over batches of
  responses; the central difference ``(H(theta + eps u) - H(theta - eps u)) / (2 eps)``
  checks it;
* the exact second-order term ``u^T (d^2 H) u / 2`` by the central second difference of
  ``H`` along ``u`` (``--no-second-order`` skips it);
* the step's ``KL(pi || pi') = (1/B) sum_p sum_t pi(t|p) (S - S')``.

The response space is a tree: one forward pass over ``prompt + 5`` response tokens gives
the log-probs of all 8 sixth tokens at once, so the 262,144 responses of a prompt cost
32,768 forward sequences.  Then it prints one row per checked step: the demo's ``dH1 ± se``
(``se = sqrt(se_sampling^2 + se_sketch^2)``) against the exact first order, the demo's
realized change (importance sampling with a control variate, ``± realized_se``) and its old
self-normalised estimate against the exact realized change, the demo's ratio interval
against the exact ratio (exact realized / exact first order), the demo's KL against the
exact one; and, over the checked steps, the estimates' errors in units of their standard
errors.  The run is deterministic (the demo's seeds), so it checks the numbers docs/demo.md
shows.

Last, a sampling study: from each checked step's exact ``S`` and ``S'`` of every response, it
draws ``M`` responses per prompt (``--study-sizes``, default 8, 32 and 128) 2000 times and runs
the service's own estimator (``sketch.realized``) on each draw, to show the realized change's
and the KL's bias, spread, and how often the 2-s.e. interval covers the exact change at the
demo's sample sizes (docs/validation.md).
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from torch import nn
from torch.func import functional_call

from clients.demo import DemoConfig, DemoStep, StepContext, run_demo
from sketch.realized import realized_parts
from sketch.sequences import Role, StepSequences

Params = dict[str, torch.Tensor]

DEFAULT_STEPS_TO_CHECK = (0, 1, 3, 6, 11, 18, 19)


@dataclass(frozen=True)
class ExactStep:
    """One step's exact numbers (nats of sequence entropy, float64 enumeration)."""

    step: int
    entropy_before: float
    entropy_after: float
    first_order: float
    first_order_fd: float | None
    second_order: float | None
    kl: float
    mass_error: float
    seconds: float
    logprob_before: np.ndarray = field(repr=False, compare=False)
    logprob_after: np.ndarray = field(repr=False, compare=False)

    @property
    def realized(self) -> float:
        """The exact realized change ``H_after - H_before``."""
        return self.entropy_after - self.entropy_before

    @property
    def ratio(self) -> float:
        """Exact realized / exact first order."""
        return self.realized / self.first_order


@dataclass
class _Totals:
    """Running sums over batches of responses (each already divided by ``B``)."""

    entropy_before: float = 0.0
    entropy_after: float = 0.0
    entropy_plus: float = 0.0
    entropy_minus: float = 0.0
    kl: float = 0.0


def response_prefixes(vocab_size: int, length: int) -> torch.Tensor:
    """Every token string of ``length`` tokens, int64 ``[vocab_size**length, length]``."""
    index = torch.arange(vocab_size**length)
    powers = vocab_size ** torch.arange(length - 1, -1, -1)
    return (index[:, None] // powers[None, :]) % vocab_size


def completed_logprobs(
    net: nn.Module, params: Params, inputs: torch.Tensor, prompt_length: int
) -> torch.Tensor:
    """``S`` of every completion of ``inputs`` by one more token: float64 ``[b, V]``.

    ``inputs``: ``[b, prompt_length + L - 1]``, a prompt then ``L - 1`` response tokens; the
    log-probs are over the full vocabulary, as in ``clients.capture.response_logprobs``.
    """
    logits = functional_call(net, params, (inputs,), {"use_cache": False}).logits
    logp = torch.log_softmax(logits[:, prompt_length - 1 :], dim=-1)
    prefix = inputs[:, prompt_length:]
    s_prefix = logp[:, :-1].gather(-1, prefix.unsqueeze(-1)).squeeze(-1).sum(dim=-1)
    return s_prefix.unsqueeze(-1) + logp[:, -1]


def entropy_part(logprobs: torch.Tensor) -> torch.Tensor:
    """``-sum pi S`` over the given responses (a scalar)."""
    return -(logprobs.exp() * logprobs).sum()


def shifted(params: Params, direction: Params, scale: float) -> Params:
    """``params + scale * direction``."""
    return {n: p + scale * direction[n] for n, p in params.items()}


def exact_step(
    ctx: StepContext,
    batch_size: int = 32768,
    epsilon: float = 1e-3,
    second_order: bool = True,
) -> ExactStep:
    """Enumerate the step's whole response space in float64 (see the module docstring).

    ``batch_size``: responses per batch (``batch_size / V`` forward sequences);
    ``epsilon``: the step of the central differences along ``u``.
    """
    started = time.monotonic()
    net = copy.deepcopy(ctx.model).double().eval()
    before = {n: p.detach().double() for n, p in ctx.params_before.items()}
    after = {n: p.detach().double() for n, p in net.named_parameters()}
    update = {n: after[n] - before[n] for n in before}
    plus, minus = shifted(before, update, epsilon), shifted(before, update, -epsilon)
    leaves = {n: p.clone().requires_grad_(True) for n, p in before.items()}
    gradient = {n: torch.zeros_like(p) for n, p in before.items()}

    config = ctx.config
    num_prompts, prompt_length = ctx.prompts.shape
    vocab = config.vocab_size
    prefixes = response_prefixes(vocab, config.max_new_tokens - 1)
    rows = max(1, batch_size // vocab)
    totals = _Totals()
    mass_error = 0.0
    all_before: list[list[torch.Tensor]] = []
    all_after: list[list[torch.Tensor]] = []
    for prompt in ctx.prompts:
        mass = 0.0
        all_before.append([])
        all_after.append([])
        for start in range(0, prefixes.shape[0], rows):
            chunk = prefixes[start : start + rows]
            inputs = torch.cat([prompt.expand(chunk.shape[0], -1), chunk], dim=1)
            s_before = completed_logprobs(net, leaves, inputs, prompt_length)
            part = entropy_part(s_before) / num_prompts
            grads = torch.autograd.grad(part, list(leaves.values()))
            for name, g in zip(leaves, grads, strict=True):
                gradient[name] += g
            with torch.no_grad():
                s_before = s_before.detach()
                s_after = completed_logprobs(net, after, inputs, prompt_length)
                pi = s_before.exp()
                all_before[-1].append(s_before.reshape(-1))
                all_after[-1].append(s_after.reshape(-1))
                mass += float(pi.sum())
                totals.entropy_before += float(part)
                totals.entropy_after += float(entropy_part(s_after)) / num_prompts
                totals.kl += float((pi * (s_before - s_after)).sum()) / num_prompts
                if second_order:
                    s_plus = completed_logprobs(net, plus, inputs, prompt_length)
                    s_minus = completed_logprobs(net, minus, inputs, prompt_length)
                    totals.entropy_plus += float(entropy_part(s_plus)) / num_prompts
                    totals.entropy_minus += float(entropy_part(s_minus)) / num_prompts
        mass_error = max(mass_error, abs(mass - 1.0))

    first_order = float(sum((gradient[n] * update[n]).sum() for n in gradient))
    fd_first = fd_second = None
    if second_order:
        fd_first = (totals.entropy_plus - totals.entropy_minus) / (2 * epsilon)
        curvature = (
            totals.entropy_plus - 2 * totals.entropy_before + totals.entropy_minus
        ) / epsilon**2
        fd_second = curvature / 2
    return ExactStep(
        step=ctx.row.step,
        entropy_before=totals.entropy_before,
        entropy_after=totals.entropy_after,
        first_order=first_order,
        first_order_fd=fd_first,
        second_order=fd_second,
        kl=totals.kl,
        mass_error=mass_error,
        seconds=time.monotonic() - started,
        logprob_before=torch.stack([torch.cat(rows) for rows in all_before]).numpy(),
        logprob_after=torch.stack([torch.cat(rows) for rows in all_after]).numpy(),
    )


def checker(
    steps_to_check: Sequence[int],
    results: dict[int, ExactStep],
    console: Console,
    batch_size: int,
    epsilon: float,
    second_order: bool,
) -> Callable[[StepContext], None]:
    """The demo's observer: enumerate the chosen steps, store their :class:`ExactStep`."""

    def observe(ctx: StepContext) -> None:
        if ctx.row.step not in steps_to_check:
            return
        result = exact_step(ctx, batch_size, epsilon, second_order)
        results[ctx.row.step] = result
        console.print(
            f"step {result.step}: exact H {result.entropy_before:.4f} -> "
            f"{result.entropy_after:.4f}, enumerated in {result.seconds:.1f} s"
        )

    return observe


def _fmt(value: float | None, spec: str = "+.4f") -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return format(value, spec)


def _se(row: DemoStep) -> float:
    return math.hypot(row.se_sampling, row.se_sketch)


def _demo_ratio(row: DemoStep) -> str:
    if row.ratio_estimable is False:
        return "not estimable"
    text = _fmt(row.ratio, ".2f")
    if row.ratio_low is not None and row.ratio_high is not None:
        text += f" [{row.ratio_low:.2f}, {row.ratio_high:.2f}]"
    if row.regime not in (None, "first_order"):
        text += f" ({row.regime})"
    return text


def _covers(row: DemoStep, exact: ExactStep) -> str:
    if row.ratio_low is None or row.ratio_high is None or row.ratio_estimable is False:
        return "-"
    return "yes" if row.ratio_low <= exact.ratio <= row.ratio_high else "NO"


def comparison_table(rows: dict[int, DemoStep], exact: dict[int, ExactStep]) -> Table:
    """One row per checked step: the demo's estimates next to the exact values."""
    table = Table(
        title="demo estimates vs exact enumeration (nats of sequence entropy)",
        header_style="bold",
        caption=escape(
            "dH1: first order <grad H, u>;  dH2: u^T d2H u / 2;  realized: H_after - H_before;"
            "  ratio: realized / dH1 (demo: its estimate [low, high]);  KL(pi || pi')"
        ),
    )
    for name in (
        "step",
        "exact H",
        "demo dH1 ± se",
        "exact dH1",
        "demo dH2",
        "exact dH2",
        "exact dH1+dH2",
        "demo realized ± se",
        "demo SNIS",
        "exact realized",
        "demo ratio",
        "exact ratio",
        "covers",
        "demo KL",
        "exact KL",
    ):
        table.add_column(name, justify="right")
    for step, e in sorted(exact.items()):
        r = rows[step]
        realized = _fmt(r.realized) + ("" if r.realized_se is None else f"±{r.realized_se:.4f}")
        table.add_row(
            str(step),
            f"{e.entropy_before:.3f}",
            f"{_fmt(r.delta_h1)}±{_se(r):.4f}",
            _fmt(e.first_order),
            _fmt(r.delta_h2),
            _fmt(e.second_order),
            _fmt(None if e.second_order is None else e.first_order + e.second_order),
            realized,
            _fmt(r.realized_snis),
            _fmt(e.realized),
            _demo_ratio(r),
            _fmt(e.ratio, ".3f"),
            _covers(r, e),
            _fmt(r.kl, ".4f"),
            f"{e.kl:.4f}",
        )
    return table


def _z_line(label: str, errors: list[tuple[int, float | None, float | None]]) -> str:
    """``label``: per step ``error / se``, and their root mean square."""
    z = [(s, err / se) for s, err, se in errors if err is not None and se]
    cells = ", ".join(f"{s}: {v:+.2f}" for s, v in z)
    rms = math.sqrt(sum(v * v for _, v in z) / len(z)) if z else float("nan")
    return f"{label}: {cells}   (rms {rms:.2f}, |z| > 2 at {sum(abs(v) > 2 for _, v in z)})"


def summary_lines(rows: dict[int, DemoStep], exact: dict[int, ExactStep]) -> list[str]:
    """The estimates' errors in units of their standard errors, and the enumeration checks."""
    steps = sorted(exact)

    def error(value: float | None, truth: float) -> float | None:
        return None if value is None else value - truth

    lines = [
        _z_line(
            "(demo realized - exact realized) / realized_se",
            [(s, error(rows[s].realized, exact[s].realized), rows[s].realized_se) for s in steps],
        ),
        _z_line(
            "(demo SNIS - exact realized) / realized_se",
            [
                (s, error(rows[s].realized_snis, exact[s].realized), rows[s].realized_se)
                for s in steps
            ],
        ),
        _z_line(
            "(demo dH1 - exact dH1) / se",
            [(s, error(rows[s].delta_h1, exact[s].first_order), _se(rows[s])) for s in steps],
        ),
    ]
    fd = [
        abs(e.first_order_fd - e.first_order) / abs(e.first_order)
        for e in exact.values()
        if e.first_order_fd is not None
    ]
    if fd:
        lines.append(
            f"autograd first order vs central difference: largest relative difference {max(fd):.1e}"
        )
    worst = max(e.mass_error for e in exact.values())
    lines.append(f"enumeration: largest |sum_t pi(t|p) - 1| {worst:.1e}")
    return lines


def sampling_study(
    exact: dict[int, ExactStep], sizes: Sequence[int], draws: int, seed: int = 0
) -> Table:
    """The realized-change and KL estimators at ``M`` samples per prompt, over ``draws``
    independent draws from each checked step's exact ``pi`` (its enumerated ``S`` and ``S'``):
    how often the estimate lands within 2 of its reported s.e. of the exact value, and the
    mean and median over the draws against the exact value (sketch/realized.py, the same code
    the service runs)."""
    rng = np.random.default_rng(seed)
    table = Table(
        title=f"the realized-change and KL estimators over {draws} draws per cell, from the"
        " exact policy of each step",
        header_style="bold",
        caption=escape(
            "cv: control variate (default); snis: self-normalised; covered: |cv - exact| <= 2 se;"
            "  k3 = mean((r-1) - log r) (reported KL), k1 = mean(S - S');  ÷ exact"
        ),
    )
    for name in (
        "step",
        "M",
        "exact realized",
        "cv mean ÷",
        "cv median ÷",
        "cv sd",
        "rms se ÷ sd",
        "covered",
        "snis mean ÷",
        "exact KL",
        "k3 mean ÷",
        "k3 median ÷",
        "k1 mean ÷",
        "k1 median ÷",
    ):
        table.add_column(name, justify="right")
    for step, e in sorted(exact.items()):
        S, S_after = e.logprob_before, e.logprob_after
        num_prompts = S.shape[0]
        # inverse-CDF sampling: O(M log R) a draw instead of rng.choice's O(R) with p=
        cdf = np.cumsum(np.exp(S), axis=1)
        cdf /= cdf[:, -1:]
        for M in sizes:
            cv: list[float] = []
            se: list[float] = []
            snis: list[float] = []
            k3: list[float] = []
            k1: list[float] = []
            for _ in range(draws):
                idx = np.stack([np.searchsorted(row, rng.random(M), side="right") for row in cdf])
                idx = np.minimum(idx, S.shape[1] - 1)
                before = np.take_along_axis(S, idx, 1).reshape(-1)
                after = np.take_along_axis(S_after, idx, 1).reshape(-1)
                seqs = StepSequences(
                    ids=[str(i) for i in range(before.size)],
                    prompt_ids=[str(p) for p in np.repeat(np.arange(num_prompts), M)],
                    logprob=before,
                    advantage=np.zeros(before.size),
                    num_tokens=np.full(before.size, 1),
                    role=[Role.ENTROPY] * before.size,
                    logprob_after=after,
                )
                parts = realized_parts(seqs)
                assert parts is not None
                real = parts.realized
                cv.append(real.delta_h)
                se.append(real.se or 0.0)
                snis.append(float(real.delta_h_snis or 0.0))
                k3.append(float(real.kl or 0.0))
                k1.append(float(np.mean(before - after)))
            cv_a, se_a = np.asarray(cv), np.asarray(se)
            sd = float(cv_a.std(ddof=1))
            table.add_row(
                str(step),
                str(M),
                _fmt(e.realized),
                f"{cv_a.mean() / e.realized:.2f}",
                f"{np.median(cv_a) / e.realized:.2f}",
                f"{sd:.4f}",
                f"{np.sqrt(np.mean(se_a**2)) / sd:.2f}",
                f"{np.mean(np.abs(cv_a - e.realized) <= 2 * se_a):.0%}",
                f"{np.mean(snis) / e.realized:.2f}",
                f"{e.kl:.4f}",
                f"{np.mean(k3) / e.kl:.2f}",
                f"{np.median(k3) / e.kl:.2f}",
                f"{np.mean(k1) / e.kl:.2f}",
                f"{np.median(k1) / e.kl:.2f}",
            )
    return table


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="length of the demo run")
    parser.add_argument(
        "--steps-to-check",
        type=int,
        nargs="+",
        default=list(DEFAULT_STEPS_TO_CHECK),
        help="the steps to enumerate (0-based)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=32768, help="responses per enumeration batch"
    )
    parser.add_argument(
        "--epsilon", type=float, default=1e-3, help="central-difference step along u"
    )
    parser.add_argument(
        "--no-second-order",
        dest="second_order",
        action="store_false",
        help="skip the second-order term (two fewer forward passes per batch)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--study-sizes",
        type=int,
        nargs="*",
        default=[8, 32, 128],
        help="samples per prompt of the sampling study (none: skip it)",
    )
    parser.add_argument("--study-draws", type=int, default=2000, help="draws per study cell")
    parser.add_argument(
        "--entropy-samples",
        type=int,
        default=DemoConfig().entropy_samples,
        help="the demo's entropy-role responses per prompt (docs/validation.md §11 also ran 8)",
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    console = Console() if sys.stdout.isatty() else Console(width=220)
    checked = sorted({s for s in args.steps_to_check if 0 <= s < args.steps})
    results: dict[int, ExactStep] = {}
    observer = checker(
        checked,
        results,
        console,
        batch_size=args.batch_size,
        epsilon=args.epsilon,
        second_order=args.second_order,
    )
    started = time.monotonic()
    demo_rows = run_demo(
        args.steps,
        keep_alive=False,
        config=DemoConfig(entropy_samples=args.entropy_samples),
        console=console,
        observer=observer,
    )
    total = time.monotonic() - started

    rows = {r.step: r for r in demo_rows}
    console.print()
    console.print(comparison_table(rows, results))
    for line in summary_lines(rows, results):
        console.print(line)
    if args.study_sizes and results:
        console.print()
        console.print(sampling_study(results, args.study_sizes, args.study_draws))
    enumeration = [results[s].seconds for s in sorted(results)]
    console.print(
        f"run: {total:.0f} s in all, {sum(enumeration):.0f} s of it enumerating "
        f"({len(enumeration)} steps; per step: "
        + ", ".join(f"{s} {t:.0f} s" for s, t in zip(sorted(results), enumeration, strict=True))
        + ")"
    )


if __name__ == "__main__":
    main()
