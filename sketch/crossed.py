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

(Two-way crossed random-effects ANOVA: Searle, Casella & McCulloch, "Variance Components",
ch. 4; generalised U-statistics: Lee, "U-Statistics", ch. 2.)
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray


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


def bilinear_variance(
    Y: NDArray[Any], V: NDArray[Any], W: NDArray[Any], shape: tuple[int, int]
) -> float:
    """Sketch variance of ``T = sum_{i, j} W(i, j) <Y_i, V_j>``, estimated from the rows.

    ``Y``, ``V``: float ``[n, k]`` Kronecker-sketched rows (``k = k_out * k_in``, cell ``(r,
    s)`` at ``r * k_in + s``); ``W``: float ``[n, n]``; ``shape``: ``(k_out, k_in)``.
    """
    y = np.asarray(Y, dtype=np.float64)
    v = np.asarray(V, dtype=np.float64)
    k1, k2 = shape
    if y.shape != v.shape or y.shape[1] != k1 * k2:
        raise ValueError(f"Y and V must both be [n, {k1 * k2}], got {y.shape} and {v.shape}")
    cells = (y * (np.asarray(W, dtype=np.float64) @ v)).sum(axis=0) * (k1 * k2)
    return crossed_variance(cells.reshape(k1, k2))
