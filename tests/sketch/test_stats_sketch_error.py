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


def _step(rng: np.random.Generator, n_upd: int, n_ent: int) -> StepSequences:
    n = n_upd + n_ent
    pids = [f"p{i % 3}" for i in range(n_upd)] + [f"p{i % 3}" for i in range(n_ent)]
    return StepSequences(
        ids=[str(i) for i in range(n)],
        prompt_ids=pids,
        logprob=-rng.uniform(1.0, 30.0, size=n),
        advantage=rng.normal(size=n),
        num_tokens=rng.integers(1, 20, size=n),
        role=[Role.UPDATE] * n_upd + [Role.ENTROPY] * n_ent,
    )


def test_se_sketch_matches_gaussian_sketch_spread() -> None:
    rng = np.random.default_rng(0)
    n_upd, n_ent, N, k, eta = 8, 6, 400, 64, 0.5
    n = n_upd + n_ent
    seqs = _step(rng, n_upd, n_ent)
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


def test_se_applied_sketch_part_matches_gaussian_sketch_spread() -> None:
    """``delta_h1_applied = <Phi grad_hat H, Phi u>`` over 300 Gaussian sketches of the same
    rows and applied update ``u``: the sketch part of ``se_applied`` (its excess over the
    sampling part, the answer without ``applied_row``) matches the spread, about 95% within
    2."""
    rng = np.random.default_rng(1)
    n_upd, n_ent, N, k = 8, 6, 400, 64
    n = n_upd + n_ent
    seqs = _step(rng, n_upd, n_ent)
    W = rng.normal(size=(n, N)) + 2.0 * rng.normal(size=(1, N))
    u = W[:n_upd].sum(axis=0) + rng.normal(size=N)
    exact = entropy_change(W @ W.T, seqs, 0.5, k_applied=W @ u)
    assert exact.delta_h1_applied is not None
    errors, bars = [], []
    for _ in range(300):
        Phi = rng.normal(scale=1.0 / np.sqrt(k), size=(k, N))
        Y, y_u = W @ Phi.T, Phi @ u
        answers = [
            entropy_change(
                kernel_from_rows(Y),
                seqs,
                0.5,
                sketch_variance_factor=1.0 / k,
                k_applied=Y @ y_u,
                applied_row=row,
            ).se_applied
            for row in (y_u, None)  # without the row: the sampling part alone
        ]
        out = entropy_change(kernel_from_rows(Y), seqs, 0.5, k_applied=Y @ y_u)
        total, sampling = answers
        assert out.delta_h1_applied is not None and total is not None and sampling is not None
        errors.append(out.delta_h1_applied - exact.delta_h1_applied)
        bars.append(np.sqrt(total**2 - sampling**2))
    err = np.array(errors)
    assert abs(err.mean()) < 4 * err.std(ddof=1) / np.sqrt(len(err))
    ratio = err.std(ddof=1) / np.sqrt(np.mean(np.square(bars)))
    assert ratio == pytest.approx(1.0, abs=0.2)
    coverage = float(np.mean(np.abs(err) <= 2 * np.array(bars)))
    assert 0.88 <= coverage <= 0.995
