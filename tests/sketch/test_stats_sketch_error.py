"""The sketch error bar se_sketch (math.md §4) against the spread of dH1 over random sketches.

A dense Gaussian sketch ``Phi`` with ``N(0, 1/k)`` entries (built here in numpy; the project's
operators are tested elsewhere) satisfies ``Var(<Phi a, Phi b>) = (|a|^2 |b|^2 + <a, b>^2) / k``.
For the ``independent`` estimator ``dH1 = eta <Phi grad_hat H, Phi g_hat>`` is exactly such an
inner product, so se_sketch (computed from each sketched kernel) must match the spread.
"""

from __future__ import annotations

import numpy as np
import pytest

from sketch.entropy import entropy_change
from sketch.kernel import kernel_from_rows
from sketch.sequences import Role, StepSequences


def test_se_sketch_matches_gaussian_sketch_spread() -> None:
    rng = np.random.default_rng(0)
    n_upd, n_ent, N, k, eta = 8, 6, 400, 64, 0.5
    n = n_upd + n_ent
    pids = [f"p{i % 3}" for i in range(n_upd)] + [f"p{i % 3}" for i in range(n_ent)]
    seqs = StepSequences(
        ids=[str(i) for i in range(n)],
        prompt_ids=pids,
        logprob=-rng.uniform(1.0, 30.0, size=n),
        advantage=rng.normal(size=n),
        num_tokens=rng.integers(1, 20, size=n),
        role=[Role.UPDATE] * n_upd + [Role.ENTROPY] * n_ent,
    )
    # Correlated rows so that <u, v> is not negligible against |u| |v|.
    W = rng.normal(size=(n, N)) + 2.0 * rng.normal(size=(1, N))
    exact = entropy_change(W @ W.T, seqs, eta)
    estimates, bars = [], []
    for _ in range(300):
        Phi = rng.normal(scale=1.0 / np.sqrt(k), size=(k, N))
        out = entropy_change(kernel_from_rows(W @ Phi.T), seqs, eta, sketch_variance_factor=1.0 / k)
        estimates.append(out.delta_h1)
        bars.append(out.se_sketch)
    errors = np.array(estimates) - exact.delta_h1
    # Unbiased: E[<Phi a, Phi b>] = <a, b>.
    assert abs(errors.mean()) < 4 * errors.std(ddof=1) / np.sqrt(len(errors))
    # The error bar matches the observed spread (RMS of per-sketch bars vs the std).
    ratio = errors.std(ddof=1) / np.sqrt(np.mean(np.square(bars)))
    assert ratio == pytest.approx(1.0, abs=0.2)
    # Coverage of +-2 se: about 95 % (loose bounds for 300 draws and heavy-ish tails).
    coverage = float(np.mean(np.abs(errors) <= 2 * np.array(bars)))
    assert 0.88 <= coverage <= 0.995
