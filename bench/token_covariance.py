"""Does Cui et al.'s token covariance pick the tokens that drive the entropy?  (math.md §9)

Runs the demo (``clients.demo``: a tiny GPT-2 learning a copy task with Dr. GRPO, plain SGD,
4 prompts x 8 update responses and 32 entropy-role responses per step) for ``--steps`` steps
against an embedded service, with ``token_shares=True``: every update token's exact share
``a_{i,t}`` of ``dH1`` (``independent``) is pushed.  Per step it reads ``GET .../tokens`` at
KL-Cov ratios ``--ratios`` and the entropy answer, and prints:

* ``dH1`` and the shares' total (the same number up to the sketch's error: the kernel is
  count-sketched, the shares are exact);
* per ratio, KL-Cov's ``k``, its precision at ``k`` against the ``k`` tokens of most negative
  share, and the part of ``dH1`` its tokens carry;
* the Spearman correlation of the covariance score with ``-a`` over all tokens;
* the part of ``dH1`` from cross-prompt kernel pairs (``decomposition.pair_types``), which the
  covariance, built from a token's own log-prob and advantage, cannot see.

    python bench/token_covariance.py               # 20 steps, a few minutes on 2 cores
    python bench/token_covariance.py --steps 3     # a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rich.console import Console  # noqa: E402

from clients.demo import DemoConfig, run_demo  # noqa: E402
from clients.http import Client  # noqa: E402
from service.embedded import embedded_service  # noqa: E402
from service.settings import Settings  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--ratios", default="0.0002,0.05,0.2")
    args = parser.parse_args(argv)
    ratios = [float(r) for r in args.ratios.split(",")]
    run_id = "token-covariance"
    with tempfile.TemporaryDirectory() as data:
        settings = Settings(redis_url=None, data_dir=Path(data))
        with embedded_service(settings, port=0, workers=1, device="cpu") as service:
            run_demo(
                steps=args.steps,
                url=service.url,
                keep_alive=False,
                config=DemoConfig(token_shares=True),
                console=Console(quiet=True),
                run_id=run_id,
            )
            rows = []
            with Client(service.url) as client:
                for step in range(args.steps):
                    entropy = client.entropy(run_id, step, estimator="independent")
                    pairs = entropy.decomposition["pair_types"]
                    by_ratio = [client.tokens(run_id, step, kl_cov_ratio=r) for r in ratios]
                    rows.append((step, entropy, pairs["cross_prompt"]["share"], by_ratio))
    head = " | ".join(f"k, precision, share of dH1 @ {r:g}" for r in ratios)
    print(f"| step | dH1 | shares' total | {head} | Spearman(cov, -a) | cross-prompt share |")
    print("|---|---|---|" + "---|" * len(ratios) + "---|---|")
    for step, entropy, cross, by_ratio in rows:
        cells = " | ".join(
            f"{t.covariance.k}, {t.covariance.precision_at_k:.2f}, "
            + (
                "—"
                if t.covariance.selected_share is None
                else f"{t.covariance.selected_share:+.2f}"
            )
            for t in by_ratio
        )
        rho = by_ratio[0].covariance.spearman
        print(
            f"| {step} | {entropy.delta_h1:+.4f} | {by_ratio[0].total:+.4f} | {cells} | "
            + ("—" if rho is None else f"{rho:+.2f}")
            + " | "
            + ("—" if cross is None else f"{cross:+.2f}")
            + " |"
        )
    print()
    for i, ratio in enumerate(ratios):
        precision = [r[3][i].covariance.precision_at_k for r in rows]
        shares = [s for r in rows if (s := r[3][i].covariance.selected_share) is not None]
        print(
            f"KL-Cov at {ratio:g}: median precision at k {statistics.median(precision):.2f}, "
            f"median share of dH1 {statistics.median(shares):+.2f} over {len(rows)} steps"
        )
    rhos = [r for row in rows if (r := row[3][0].covariance.spearman) is not None]
    crosses = [c for row in rows if (c := row[2]) is not None]
    print(
        f"Spearman(cov, -a): median {statistics.median(rhos):+.2f} "
        f"(range {min(rhos):+.2f} to {max(rhos):+.2f}); cross-prompt share of dH1: median "
        f"{statistics.median(crosses):+.2f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
