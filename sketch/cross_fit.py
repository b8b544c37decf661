"""The ``cross_fit`` estimator's halves and coefficients (math.md §4 "cross_fit").

Each prompt's update rows are split into two halves; ``grad_hat H`` is estimated from each half
alone (``v_0``, ``v_1``), and ``dH1 = eta (<v_0, g_1> + <v_1, g_0>)`` pairs every row only with
the rows of the other half, ``g_X = sum_{i in X} u_i``.  ``v_0`` does not depend on the rows
of half 1, so ``E[<v_0, g_1>] = <grad H, E g_1>`` with no self-term to remove (the bias that
``plugin`` carries and ``u_statistic`` removes), and the two terms add up to ``<grad H, E
g>``.  What this buys is cost, not variance: the exact token shares of the estimator
(math.md §9) need one backward pass per half for ``v_0`` and ``v_1`` (none when a hooked
capture of the rows adds them up) and one forward-mode pass of each half along the other half's
``v``, about what ``independent`` costs, where ``u_statistic``'s need a backward and a
forward-mode pass per sequence.

The split is a function of the sequence ids alone, so a trainer and the service that only share
the ids agree on it: within each prompt, the rows sorted by id (Python string order) alternate
halves ``0, 1, 0, 1, ...``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from sketch.kernel import FloatArray
from sketch.sequences import BoolArray, StepSequences


def cross_fit_halves(
    ids: Sequence[str], prompt_ids: Sequence[str], mask: NDArray[Any] | None = None
) -> NDArray[np.int8]:
    """int8 ``[n]``: the half (0 or 1) of every row in ``mask`` (all rows by default), -1
    elsewhere.  Within each prompt the masked rows, sorted by id, alternate ``0, 1, 0, ...``;
    a prompt with one row has it in half 0 (and no pair of its own prompt)."""
    n = len(ids)
    if len(prompt_ids) != n:
        raise ValueError("ids and prompt_ids must have the same length")
    keep = np.ones(n, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    by_prompt: dict[str, list[int]] = {}
    for i in np.flatnonzero(keep).tolist():
        by_prompt.setdefault(str(prompt_ids[i]), []).append(i)
    halves = np.full(n, -1, dtype=np.int8)
    for rows in by_prompt.values():
        for position, i in enumerate(sorted(rows, key=lambda r: str(ids[r]))):
            halves[i] = position % 2
    return halves


def per_half(
    coefficients: Callable[[StepSequences, NDArray[Any]], FloatArray],
    seqs: StepSequences,
    mask: BoolArray,
    halves: NDArray[np.int8],
) -> FloatArray:
    """Score-function coefficients estimated from each half alone, float64 ``[n]``.

    ``coefficients(seqs, rows)`` gives ``x_j / (B_rows M_{rows,p})`` with a leave-one-out
    baseline over ``rows`` (:func:`sketch.entropy.entropy_coefficients`,
    :func:`sketch.token_mean.length_coefficients`); each half's are rescaled to ``B``, the
    prompts of all of ``mask``, so that ``sum_{j in X} coef_j w_j`` estimates the whole
    gradient from half ``X`` (``1 / (B M_{X,p})``).
    """
    B = len(seqs.prompt_index(mask)[1])
    out = np.zeros(seqs.n, dtype=np.float64)
    for half in (0, 1):
        rows = mask & (halves == half)
        if rows.any():
            out += coefficients(seqs, rows) * (len(seqs.prompt_index(rows)[1]) / B)
    return out


def cross_half_pairs(halves: NDArray[np.int8]) -> NDArray[np.bool_]:
    """bool ``[n, n]``: the pairs ``(j, i)`` the estimator sums, rows of different halves."""
    inside = halves >= 0
    return (halves[:, None] != halves[None, :]) & inside[:, None] & inside[None, :]


__all__ = ["cross_fit_halves", "cross_half_pairs", "per_half"]
