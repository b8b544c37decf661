"""How far a Taylor prediction of the entropy change holds, against the step's KL (exact).

On the exact-enumeration policy of ``tests/enumeration.py`` (a tiny GPT-2, 3 prompts, 625
responses each), for GRPO update directions ``g_hat`` (8 samples per prompt, reward = count of a
token; generator seeds x reward tokens) and step sizes ``eta``, everything is exact: the
realized change ``H(theta + eta g) - H(theta)``, its first- and second-order Taylor terms, and
``KL(pi || pi')``.  The table gives, per KL bin, how much the first-order and the second-order
prediction miss the realized change (median and 90th percentile of ``|pred - realized| /
|realized|``) and the median ``|dH2| / |dH1|``; then the same errors binned by ``|dH2| /
|dH1|``.  ``sketch/taylor.py`` takes its thresholds from this table (docs/validation.md).

    python bench/taylor_regime.py            # 8 seeds x 5 tokens x 8 step sizes: ~2 min
    python bench/taylor_regime.py --quick    # 2 seeds: ~30 s
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from sketch.taylor import KL_FIRST_ORDER, KL_SECOND_ORDER  # noqa: E402
from tests.enumeration import (  # noqa: E402
    ExactPolicy,
    dr_grpo_coefficients,
    grpo_advantages,
)

ETAS = (0.01, 0.03, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2)
KL_BINS = (0.0, 0.003, 0.01, KL_FIRST_ORDER, 0.1, KL_SECOND_ORDER, 1.0, 3.0, np.inf)
RATIO_BINS = (0.0, 0.1, 0.25, 0.5, 1.0, np.inf)


def scan(seeds: int, tokens: int) -> np.ndarray:
    """Rows ``(kl, err1, err12, |h2/h1|)``, one per (update draw, step size)."""
    policy = ExactPolicy()
    B, L = policy.num_prompts, policy.response_length
    S = policy.log_probs().detach().numpy()
    pi = np.exp(S)
    rows = []
    for seed in range(seeds):
        for token in range(tokens):
            gen = torch.Generator().manual_seed(seed)
            prompt_idx, response_idx = policy.sample_step(8, gen)
            advantages = grpo_advantages(policy.reward(response_idx, token), prompt_idx)
            c = dr_grpo_coefficients(advantages, prompt_idx, B, L)
            g = policy.policy_gradient(prompt_idx, response_idx, c)
            for eta in ETAS:
                u = eta * g
                realized = policy.realized_change(u)
                first, second = policy.entropy_taylor(u)
                after = policy.log_probs(policy.shifted(u)).detach().numpy()
                kl = float(np.mean(np.sum(pi * (S - after), -1)))
                rows.append(
                    (
                        kl,
                        abs(first - realized) / abs(realized),
                        abs(first + second - realized) / abs(realized),
                        abs(second / first),
                    )
                )
    return np.asarray(rows)


def _table(rows: np.ndarray, column: int, bins: tuple[float, ...], name: str) -> list[str]:
    lines = [
        f"| {name} | steps | first order: median, p90 | second order: median, p90"
        r" | median \|dH2/dH1\| |",
        "|---|---|---|---|---|",
    ]
    for lo, hi in itertools.pairwise(bins):
        inside = (rows[:, column] >= lo) & (rows[:, column] < hi)
        if not inside.any():
            continue
        r = rows[inside]
        lines.append(
            f"| [{lo:g}, {hi:g}) | {int(inside.sum())} "
            f"| {np.median(r[:, 1]):.1%}, {np.quantile(r[:, 1], 0.9):.1%} "
            f"| {np.median(r[:, 2]):.1%}, {np.quantile(r[:, 2], 0.9):.1%} "
            f"| {np.median(r[:, 3]):.3f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 seeds instead of 8")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    rows = scan(2 if args.quick else 8, 5)
    print(f"{len(rows)} exact steps in {time.perf_counter() - started:.0f} s\n")
    print("\n".join(_table(rows, 0, KL_BINS, "KL(pi‖pi') bin")))
    print()
    print("\n".join(_table(rows, 3, RATIO_BINS, "\\|dH2/dH1\\| bin")))
    print()
    small = rows[rows[:, 0] <= KL_SECOND_ORDER]
    print(f"steps with KL <= {KL_SECOND_ORDER}:\n")
    print("\n".join(_table(small, 3, RATIO_BINS, "\\|dH2/dH1\\| bin")))
    print()
    for lo, hi, column, label in (
        (0.0, KL_FIRST_ORDER, 1, "first order"),
        (KL_FIRST_ORDER, KL_SECOND_ORDER, 2, "second order"),
        (KL_SECOND_ORDER, 1.0, 2, "second order"),
        (1.0, np.inf, 2, "second order"),
    ):
        inside = (rows[:, 0] >= lo) & (rows[:, 0] < hi)
        if inside.any():
            err = rows[inside, column]
            print(
                f"KL in [{lo:g}, {hi:g}): {label} misses by a median {np.median(err):.1%},"
                f" 90th percentile {np.quantile(err, 0.9):.1%} ({int(inside.sum())} steps)"
            )


if __name__ == "__main__":
    main()
