"""Second-order entropy change along the step (math.md §4 "Second order").

For an update ``u`` (the applied-update row when sent, else ``eta * g_hat``), with
``d_t = <w_t, u>`` (first-order change of ``S_t``) and ``q_t = u^T (d^2 S_t) u``:

    u^T (d^2 H) u = -E_t[d_t^2] - E_t[(S_t - Sbar)(d_t^2 + q_t)].

``d_j`` comes from the kernel (``K(j, u)`` or ``eta (K c)_j``), and ``q_j`` from the measured
log-prob change: ``S'_j - S_j = d_j + q_j / 2 + O(|u|^3)``, so ``q_j ~ 2 (S'_j - S_j - d_j)``.
The reported number, with the leave-one-out baseline of math.md §3, is

    dH2 = (1/2) (1/B) sum_p (1/M_p) sum_{j in E ∩ p} [-d_j^2 - (S_j - Sbar_{p,-j}) (d_j^2 + q_j)].

In ``adam`` geometry ``eta (K c)_j = w_j^T P (eta g_hat)`` is already ``<w_j, delta_theta>`` of
the preconditioned step (momentum ignored), so nothing changes here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from sketch.kernel import FloatArray, check_kernel
from sketch.sequences import StepSequences, group_sizes, leave_one_out_mean


def displacement(
    K: NDArray[Any],
    c: NDArray[Any],
    learning_rate: float,
    k_applied: NDArray[Any] | None = None,
) -> FloatArray:
    """``d_j = <w_j, u>``, float64 ``[n]``: ``k_applied`` when given, else ``eta (K c)_j``."""
    if k_applied is not None:
        return np.asarray(k_applied, dtype=np.float64).reshape(-1).copy()
    mat = check_kernel(K)
    return np.asarray(float(learning_rate) * (mat @ np.asarray(c, dtype=np.float64)))


def curvature(seqs: StepSequences, d: NDArray[Any]) -> FloatArray:
    """``q_j ~ 2 (S'_j - S_j - d_j)``, float64 ``[n]`` (NaN where ``logprob_after`` is unknown)."""
    return np.asarray(2.0 * (seqs.logprob_after - seqs.logprob - np.asarray(d, dtype=np.float64)))


def delta_h2(seqs: StepSequences, mask: NDArray[Any], d: NDArray[Any]) -> float | None:
    """``dH2`` over the entropy-gradient rows ``mask`` (the estimator's ``E``).

    ``B`` = number of distinct prompts in the mask, ``M_p`` = rows of prompt ``p`` in it.
    Returns ``None`` when the mask is empty or any of its rows lacks ``logprob_after``
    (dropping those rows would change the baselines and ``M_p``).
    """
    keep = np.asarray(mask, dtype=bool)
    if not keep.any() or not np.all(seqs.has_logprob_after[keep]):
        return None
    disp = np.asarray(d, dtype=np.float64).reshape(-1)
    if disp.shape != (seqs.n,):
        raise ValueError(f"d: expected {seqs.n} values, got {disp.shape[0]}")
    codes, prompts = seqs.prompt_index(keep)
    B = len(prompts)
    M = group_sizes(codes)
    base = leave_one_out_mean(seqs.logprob, codes)
    q = curvature(seqs, disp)
    idx = np.flatnonzero(keep)
    centred = seqs.logprob[idx] - base[idx]
    dj = disp[idx]
    terms = (-(dj**2) - centred * (dj**2 + q[idx])) / M[idx]
    return float(0.5 * terms.sum() / B)
