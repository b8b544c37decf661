"""Kronecker sketch error bars from the rows themselves (sketch/crossed.py): the variance
unbiased for a crossed design, its kurtosis-corrected degrees of freedom and t-scaling against
exact values, and on the accuracy table's row families the reported error bar valid (2 s.e.
cover at least 90% of the errors) and tight (within 2x of the observed error), where the
variance-factor bound is 2x (token outer products) to 5.7x (rank-8 + noise) too wide."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sketch.crossed import (
    KURTOSIS_CEILING,
    KURTOSIS_FLOOR,
    bilinear_error_bar,
    bilinear_variance,
    crossed_dof,
    crossed_error_bar,
    crossed_variance,
    t_scale,
)
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


def test_t_scale_is_the_t_quantile_over_two() -> None:
    """``t_2`` has the closed-form quantile ``(2p - 1) / sqrt(2 p (1 - p))``; the scale is 1 in
    the normal limit and grows as the degrees of freedom shrink."""
    p = 0.5 * (1.0 + math.erf(2.0 / math.sqrt(2.0)))  # Phi(2)
    assert t_scale(2.0) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)) / 2, rel=1e-9)
    assert t_scale(1e9) == pytest.approx(1.0, abs=1e-6)
    assert t_scale(4.0) > t_scale(8.0) > t_scale(30.0) > 1.0
    with pytest.raises(ValueError):
        t_scale(0.0)


def test_crossed_dof_counts_the_kurtosis_of_each_factor() -> None:
    """Row means ``+-1`` (excess kurtosis -2, floored) and column means with one spike among
    ``n = 32`` (excess kurtosis ``(n^2 - 3n + 3) / (n - 1) - 3``, about 27: capped): the degrees
    of freedom are ``min_j 2 / (2 / (n_j - 1) + kappa_j / n_j)`` with the clipped kurtosis."""
    k1, k2 = 16, 32
    rows = np.where(np.arange(k1) % 2 == 0, 1.0, -1.0)
    cols = np.zeros(k2)
    cols[5] = 10.0
    cells = rows[:, None] + cols[None, :]
    dof_rows = 2 / (2 / (k1 - 1) + KURTOSIS_FLOOR / k1)
    dof_cols = 2 / (2 / (k2 - 1) + KURTOSIS_CEILING / k2)
    assert crossed_dof(cells) == pytest.approx(min(dof_rows, dof_cols), rel=1e-12)
    # a sample kurtosis inside the clip range is used as it is
    mid = np.zeros(k2)
    mid[:4] = [3.0, -3.0, 1.0, -1.0]  # excess kurtosis about 10
    d = mid - mid.mean()
    kappa = float(np.mean(d**4) / np.mean(d**2) ** 2 - 3)
    assert KURTOSIS_FLOOR < kappa < KURTOSIS_CEILING
    dof_mid = 2 / (2 / (k2 - 1) + kappa / k2)
    rows_mid = np.array([0.0, 1.0, -1.0, 0.0])  # excess kurtosis -1 (floored)
    assert crossed_dof(rows_mid[:, None] + mid[None, :]) == pytest.approx(
        min(dof_mid, 2 / (2 / 3 + KURTOSIS_FLOOR / 4)), rel=1e-12
    )
    assert crossed_dof(cells.T) == crossed_dof(cells)
    bar = crossed_error_bar(cells)
    assert bar == pytest.approx(math.sqrt(crossed_variance(cells)) * t_scale(crossed_dof(cells)))
    with pytest.raises(ValueError):
        crossed_dof(np.zeros((1, 4)))


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
    error bar (:func:`bilinear_error_bar`), and the same ratio for the variance-factor bound (for
    ``h^T K c = sum_ij h_i c_j <w_i, w_j>`` with fixed random ``h``, ``c``)."""
    n = next(iter(rows.values())).shape[0]
    gen = torch.Generator().manual_seed(99)
    h = torch.randn(n, generator=gen, dtype=torch.float64).numpy()
    c = torch.randn(n, generator=gen, dtype=torch.float64).numpy()
    flat = torch.cat([r.reshape(n, -1) for r in rows.values()], dim=1).numpy()
    u, v = flat.T @ h, flat.T @ c
    exact = float(u @ v)
    W = np.outer(h, c)
    errors, bars = [], []
    bound = 0.0
    for seed in range(seeds):
        sketcher = KroneckerSketch(dim, seed, parameters)
        y = sketcher.sketch({k: r.float() for k, r in rows.items()}).double().numpy()
        errors.append(float(h @ (y @ y.T) @ c) - exact)
        shape = (sketcher.k_out, sketcher.k_in)
        bars.append(bilinear_error_bar(y, y, W, shape))
        assert bars[-1] >= math.sqrt(bilinear_variance(y, y, W, shape))
        bound = sketcher.variance_factor() * (float(u @ u) * float(v @ v) + exact**2)
    err, se = np.asarray(errors), np.asarray(bars)
    coverage = float(np.mean(np.abs(err) <= 2 * se))
    rms_err = math.sqrt(float(np.mean(err**2)))
    return coverage, math.sqrt(float(np.mean(se**2))) / rms_err, math.sqrt(bound) / rms_err


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
