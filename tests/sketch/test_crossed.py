"""Kronecker sketch error bars from the rows themselves (sketch/crossed.py): unbiased for a
crossed design, and on the accuracy table's row families valid (2 s.e. cover at least 90% of
the errors) and tight (within 2x of the observed error; measured 1.03-1.07x), where the
variance-factor bound is 2x (token outer products) to 5.7x (rank-8 + noise) too wide."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sketch.crossed import bilinear_variance, crossed_variance
from sketch.kronecker import KroneckerSketch


def test_crossed_variance_is_unbiased() -> None:
    """``cells[r, s] = a_r + b_s + a_r b_s + e_rs``: Var(mean) = 1/k1 + 4/k2 + (1 + 0.25)/(k1 k2)
    (a ~ N(0, 1), b ~ N(0, 4), e ~ N(0, 0.25)); the estimate averages to it."""
    rng = np.random.default_rng(0)
    k1, k2 = 8, 16
    truth = 1.0 / k1 + 4.0 / k2 + (4.0 + 0.25) / (k1 * k2)
    estimates, means = [], []
    for _ in range(4000):
        a = rng.normal(size=(k1, 1))
        b = rng.normal(scale=2.0, size=(1, k2))
        cells = a + b + a * b + rng.normal(scale=0.5, size=(k1, k2))
        estimates.append(crossed_variance(cells))
        means.append(cells.mean())
    assert np.mean(estimates) == pytest.approx(truth, rel=0.03)
    assert np.var(means) == pytest.approx(truth, rel=0.06)
    with pytest.raises(ValueError):
        crossed_variance(np.zeros((1, 4)))


def row_families(n: int, out: int, inn: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """The accuracy table's rows (bench/sketch.py ``workloads``), ``[n, out * inn]`` float64."""
    rank = 8
    left = torch.randn(n, rank, generator=gen, dtype=torch.float64) * 0.7 ** torch.arange(rank)
    right = torch.randn(rank, out * inn, generator=gen, dtype=torch.float64)
    low_rank = left @ right + 0.3 * torch.randn(n, out * inn, generator=gen, dtype=torch.float64)
    tokens, shared = 16, 4
    d_shared = torch.randn(shared, out, generator=gen, dtype=torch.float64)
    x_shared = torch.randn(shared, inn, generator=gen, dtype=torch.float64)
    rows = []
    for _ in range(n):
        mix_d = torch.randn(tokens, shared, generator=gen, dtype=torch.float64)
        mix_x = torch.randn(tokens, shared, generator=gen, dtype=torch.float64)
        deltas = mix_d @ d_shared + torch.randn(tokens, out, generator=gen, dtype=torch.float64)
        xs = mix_x @ x_shared + torch.randn(tokens, inn, generator=gen, dtype=torch.float64)
        rows.append((deltas.T @ xs).reshape(-1))
    return {"rank-8 + noise": low_rank, "16 token outer products": torch.stack(rows)}


def error_bar_study(
    rows: dict[str, torch.Tensor], parameters: dict[str, list[int]], dim: int, seeds: int
) -> tuple[float, float, float]:
    """Over ``seeds`` sketches: the coverage of 2 s.e., RMS(s.e.) / RMS(error) for the rows'
    estimate, and the same ratio for the variance-factor bound (for
    ``h^T K c = sum_ij h_i c_j <w_i, w_j>`` with fixed random ``h``, ``c``)."""
    n = next(iter(rows.values())).shape[0]
    gen = torch.Generator().manual_seed(99)
    h = torch.randn(n, generator=gen, dtype=torch.float64).numpy()
    c = torch.randn(n, generator=gen, dtype=torch.float64).numpy()
    flat = torch.cat([r.reshape(n, -1) for r in rows.values()], dim=1).numpy()
    u, v = flat.T @ h, flat.T @ c
    exact = float(u @ v)
    W = np.outer(h, c)
    errors, variances = [], []
    bound = 0.0
    for seed in range(seeds):
        sketcher = KroneckerSketch(dim, seed, parameters)
        y = sketcher.sketch({k: r.float() for k, r in rows.items()}).double().numpy()
        errors.append(float(h @ (y @ y.T) @ c) - exact)
        variances.append(bilinear_variance(y, y, W, (sketcher.k_out, sketcher.k_in)))
        bound = sketcher.variance_factor() * (float(u @ u) * float(v @ v) + exact**2)
    err, var = np.asarray(errors), np.asarray(variances)
    coverage = float(np.mean(np.abs(err) <= 2 * np.sqrt(var)))
    rms_err = math.sqrt(float(np.mean(err**2)))
    return coverage, math.sqrt(float(np.mean(var))) / rms_err, math.sqrt(bound) / rms_err


@pytest.mark.parametrize("dim", [256, 1024])
@pytest.mark.parametrize("family", ["rank-8 + noise", "16 token outer products"])
def test_error_bars_from_the_rows_are_valid_and_tight(family: str, dim: int) -> None:
    rows = row_families(32, 64, 96, torch.Generator().manual_seed(0))
    coverage, ratio, bound_ratio = error_bar_study(
        {"layer.weight": rows[family].reshape(32, 64, 96)}, {"layer.weight": [64, 96]}, dim, 300
    )
    assert coverage >= 0.9
    assert 0.5 <= ratio <= 2.0
    assert bound_ratio > 1.8  # the variance-factor bound: 2x (token outer products) to 5.7x
