"""The sketch error of a Kronecker sketch's bilinear estimate, estimated from its own cells.

A Kronecker sketch (:mod:`sketch.kronecker`) lays every row out as ``k_out x k_in`` cells;
cell ``(r, s)`` of every matrix parameter's part is ``A_p[r] G_p B_p[s]^T / sqrt(k)``, a
function of row ``r`` of the ``A`` factors and row ``s`` of the ``B`` factors only, and those
rows are independent and identically distributed.  A bilinear estimate of the sketched rows,

    T = sum_{i, j} W(i, j) <y_i, v_j> = sum_cells z(r, s),
    z(r, s) = sum_i y_i(r, s) (W v)_i(r, s),

is therefore the mean of ``Z(r, s) = k z(r, s) = f(a_r, b_s)`` over a crossed design of
independent row variables ``a_r`` and column variables ``b_s``.  Its Hoeffding decomposition
``f = mu + f_1(a) + f_2(b) + f_12(a, b)`` gives

    Var(T) = sigma_1^2 / k_out + sigma_2^2 / k_in + sigma_12^2 / (k_out k_in),

and the mean squares of a two-way analysis of variance without replication estimate it without
bias: ``E MS_rows = k_in sigma_1^2 + sigma_12^2``, ``E MS_cols = k_out sigma_2^2 +
sigma_12^2``, ``E MS_resid = sigma_12^2``, hence

    Var(T) ~= (MS_rows + MS_cols - MS_resid) / (k_out k_in).

Unlike :meth:`KroneckerSketch.variance_factor`, a bound attained only by rank-one gradients
(``1/k_out + 1/k_in`` where high-rank rows have about ``1/k``), this uses the rows
themselves, so it is as tight for high-rank as for rank-one gradients.  Parameters with at
most one dimension are count-sketched into single cells; their terms are exchangeable over
the cells, which the same formula counts as ``Var(cell) / k``.  ``docs/sketch.md`` §3 gives
its coverage and its ratio to the observed error; ``tests/sketch/test_crossed.py`` checks
them.

Degrees of freedom.  The estimate is unbiased but far noisier than its normal-theory degrees of
freedom (``k_out - 1`` in the row term) say.  A row effect is a quadratic form of a Gaussian
row, ``f_1(a) = a^T S a``, whose excess kurtosis is ``12 sum lambda^4 / (sum lambda^2)^2``:
up to 12 when one eigenvalue dominates, as it does for per-sequence gradients (sums of a few
rank-one token terms).  The sample variance of ``n`` row means with excess kurtosis
``kappa`` has ``Var(s^2) / sigma^4 = 2 / (n - 1) + kappa / n``, i.e. the ``2 / (2 / (n - 1) +
kappa / n)`` degrees of freedom of a scaled chi-square, 2.3 instead of 15 for ``n = 16`` and
``kappa = 12``.  Worse, a sketch whose rows miss the dominant direction underestimates both
the bilinear form and its variance, so the misses of ``2 s.e.`` all fall on the short tail,
with the variance estimate at 10-20% of the truth (docs/sketch.md §3 has the measurements).
:func:`crossed_error_bar` therefore reports a t-interval: ``2 s.e.`` is the 95.45% quantile of
Student's t with ``nu = min(nu_rows, nu_cols)`` degrees of freedom, ``nu_j = 2 / (2 / (k_j -
1) + kappa_j / k_j)`` and ``kappa_j`` the sample excess kurtosis of that factor's means,
clipped to ``[8, 12]``: 12 is the rank-one maximum, and the floor 8 (an effective rank of 1.5)
stands in for the tail a handful of rows cannot show; it is calibrated, not derived (6 left
89-91% on captured GPT-2 rows, docs/sketch.md §3).  The minimum instead of a Satterthwaite
combination keeps the estimated mean squares out of the degrees of freedom: a sketch that
missed the dominant direction has a small row mean square, and a plug-in combination would
give it more degrees of freedom exactly where it needs fewer.

(Two-way crossed random-effects ANOVA: Searle, Casella & McCulloch, "Variance Components",
ch. 4; generalised U-statistics: Lee, "U-Statistics", ch. 2.)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import NDArray

# scipy.special, not scipy.stats: the same distributions without half a second of import in
# every API and worker process
from scipy import special

KURTOSIS_FLOOR = 8.0
"""The smallest excess kurtosis assumed for a factor's effects (``12 / r`` at an effective rank
``r = 1.5``): calibrated on captured GPT-2 rows (docs/sketch.md §3), where 6 left 89-91%."""
KURTOSIS_CEILING = 12.0
"""The largest excess kurtosis of a Gaussian quadratic form (rank one)."""
TWO_SIGMA = float(special.ndtr(2.0))
"""The one-sided level of ``2 s.e.`` for a normal error (two-sided coverage 95.45%)."""


def crossed_variance(cells: NDArray[Any]) -> float:
    """``Var(mean(cells))`` for ``cells[r, s] = f(a_r, b_s)`` (float ``[k_out, k_in]``, both at
    least 2): ``(MS_rows + MS_cols - MS_resid) / (k_out k_in)``, and at least
    ``MS_resid / (k_out k_in)`` (the interaction term alone: an estimate below it is noise in
    the row and column terms)."""
    z = np.asarray(cells, dtype=np.float64)
    if z.ndim != 2 or min(z.shape) < 2:
        raise ValueError(f"cells must be [k_out, k_in] with both >= 2, got {z.shape}")
    k1, k2 = z.shape
    grand = z.mean()
    rows = z.mean(axis=1)
    cols = z.mean(axis=0)
    ms_rows = k2 * float(np.sum((rows - grand) ** 2)) / (k1 - 1)
    ms_cols = k1 * float(np.sum((cols - grand) ** 2)) / (k2 - 1)
    resid = z - rows[:, None] - cols[None, :] + grand
    ms_resid = float(np.sum(resid**2)) / ((k1 - 1) * (k2 - 1))
    return max(ms_rows + ms_cols - ms_resid, ms_resid) / (k1 * k2)


def _factor_dof(means: NDArray[np.float64]) -> float:
    """Degrees of freedom of the sample variance of one factor's ``n`` means: ``2 / (2 / (n - 1)
    + kappa / n)`` with ``kappa`` their sample excess kurtosis, clipped to the floor and
    ceiling."""
    n = means.size
    d = means - means.mean()
    m2 = float(np.mean(d**2))
    kappa = float(np.mean(d**4)) / (m2 * m2) - 3.0 if m2 > 0 else KURTOSIS_FLOOR
    kappa = min(max(kappa, KURTOSIS_FLOOR), KURTOSIS_CEILING)
    return 2.0 / (2.0 / (n - 1) + kappa / n)


def crossed_dof(cells: NDArray[Any]) -> float:
    """Degrees of freedom of :func:`crossed_variance`: the smaller of the row and the column
    factor's, each corrected for the kurtosis of its means (module docstring)."""
    z = np.asarray(cells, dtype=np.float64)
    if z.ndim != 2 or min(z.shape) < 2:
        raise ValueError(f"cells must be [k_out, k_in] with both >= 2, got {z.shape}")
    return min(_factor_dof(z.mean(axis=1)), _factor_dof(z.mean(axis=0)))


def t_scale(dof: float) -> float:
    """``t_dof(Phi(2)) / 2``: the factor that makes ``2 s.e.`` a t-interval with the normal's
    two-sided level (95.45%); above 1, and 1 in the limit of infinite ``dof``."""
    if not dof > 0:
        raise ValueError(f"dof must be > 0, got {dof}")
    return float(special.stdtrit(dof, TWO_SIGMA)) / 2.0


def crossed_error_bar(cells: NDArray[Any]) -> float:
    """The standard error reported for ``mean(cells)``: ``sqrt(crossed_variance) *
    t_scale(crossed_dof)``, so that ``2 s.e.`` is a t-interval of level 95.45%."""
    return math.sqrt(crossed_variance(cells)) * t_scale(crossed_dof(cells))


def _bilinear_cells(
    Y: NDArray[Any], V: NDArray[Any], W: NDArray[Any], shape: tuple[int, int]
) -> NDArray[np.float64]:
    y = np.asarray(Y, dtype=np.float64)
    v = np.asarray(V, dtype=np.float64)
    k1, k2 = shape
    if y.shape != v.shape or y.shape[1] != k1 * k2:
        raise ValueError(f"Y and V must both be [n, {k1 * k2}], got {y.shape} and {v.shape}")
    cells = (y * (np.asarray(W, dtype=np.float64) @ v)).sum(axis=0) * (k1 * k2)
    return cells.reshape(k1, k2)


def bilinear_variance(
    Y: NDArray[Any], V: NDArray[Any], W: NDArray[Any], shape: tuple[int, int]
) -> float:
    """Sketch variance of ``T = sum_{i, j} W(i, j) <Y_i, V_j>``, estimated from the rows.

    ``Y``, ``V``: float ``[n, k]`` Kronecker-sketched rows (``k = k_out * k_in``, cell ``(r,
    s)`` at ``r * k_in + s``); ``W``: float ``[n, n]``; ``shape``: ``(k_out, k_in)``.
    """
    return crossed_variance(_bilinear_cells(Y, V, W, shape))


def bilinear_error_bar(
    Y: NDArray[Any], V: NDArray[Any], W: NDArray[Any], shape: tuple[int, int]
) -> float:
    """The sketch standard error reported for ``T`` (arguments as :func:`bilinear_variance`):
    ``sqrt(bilinear_variance)`` scaled so that ``2 s.e.`` is a t-interval of level 95.45%
    (:func:`crossed_error_bar`)."""
    return crossed_error_bar(_bilinear_cells(Y, V, W, shape))
