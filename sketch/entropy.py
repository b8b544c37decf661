"""First-order entropy change ``dH1`` of a policy-gradient step and its diagnostics (math.md §2-4).

Everything is computed from the step's kernel ``K`` (float64 ``[n, n]``, rows in the order of
``StepSequences``) and the per-sequence metadata:

* ``c_i = lambda_i A_i`` (:func:`update_coefficients`, math.md §2): ``g_hat = sum_i c_i w_i``;
* ``h_j = -(S_j - Sbar_{p,-j}) / (B M_p)`` (:func:`entropy_coefficients`, math.md §3):
  ``grad_hat H = sum_j h_j w_j``; or, with the rows ``z_j`` of the entropy sums' gradients,
  ``sum_j alpha_j w_j + beta_j z_j`` (:mod:`sketch.rao_blackwell`), every pair sum below then
  running over ``e_j = alpha_j w_j + beta_j z_j`` in place of ``h_j w_j``;
* ``dH1 = eta sum_{j in E, i in U} h_j W(j, i) K(j, i) c_i`` (math.md §4) with

  - ``independent``: E = entropy-role rows, U = update-role rows, W = 1 (E, U disjoint);
  - ``u_statistic``: E = U = update-role rows, W = 0 for ``j = i``, ``M_p / (M_p - 1)`` for
    ``j != i`` of the same prompt (U-statistic normalisation, see :func:`pair_products`;
    math.md's plain ``j != i`` sum is biased by ``(M_p - 1) / M_p`` on that part), 1 across
    prompts;
  - ``plugin``: E = U = update-role rows, W = 1 (``j = i`` included: biased);
  - ``cross_fit``: E = U = update-role rows, each prompt's split into two halves
    (:mod:`sketch.cross_fit`), ``h`` estimated from each half alone, W = 1 for pairs of
    different halves and 0 otherwise.

See docs/estimators.md for every returned number, its conventions and edge cases.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import sparse

from sketch.cross_fit import cross_fit_halves, cross_half_pairs, per_half
from sketch.crossed import bilinear_error_bar, crossed_error_bar
from sketch.kernel import FloatArray, check_kernel
from sketch.noise_scale import NoiseScale, noise_scale
from sketch.rao_blackwell import (
    EntropyGradient,
    EntropySide,
    EntropySumKernels,
    entropy_sum_coefficients,
    uses_entropy_sums,
)
from sketch.ratio import RatioInterval, fieller_interval
from sketch.realized import (
    Realized,
    RealizedEstimator,
    RealizedParts,
    realized_from_entropies,
    realized_parts,
)
from sketch.second_order import delta_h2 as second_order_delta_h2
from sketch.second_order import displacement
from sketch.sequences import (
    BoolArray,
    Normalization,
    Role,
    StepSequences,
    centred_coefficients,
    group_sizes,
    per_prompt_covariance,
)
from sketch.taylor import TaylorCheck, taylor_check
from sketch.token_mean import (
    Target,
    leave_one_out_levels,
    length_coefficients,
    level_influence,
    realized_token_mean,
    token_mean_coefficients,
)


class Estimator(str, Enum):
    """Which pairs ``(j in E, i in U)`` enter ``dH1`` (math.md §4)."""

    INDEPENDENT = "independent"
    U_STATISTIC = "u_statistic"
    PLUGIN = "plugin"
    CROSS_FIT = "cross_fit"


# ----------------------------------------------------------------------------- coefficients


def update_coefficients(
    seqs: StepSequences,
    normalization: Normalization | str = Normalization.DR_GRPO,
    max_length: int | None = None,
) -> FloatArray:
    """``c_i = lambda_i A_i``, float64 ``[n]``, zero for non-update rows (math.md §2).

    ``B`` = number of distinct prompts among update rows, ``G_p`` = update rows of prompt ``p``:

    * ``dr_grpo``: ``lambda_i = 1 / (B G_p L_max(p))`` with ``L_max(p) = max_length`` when given,
      else the largest ``n_i`` among the update rows of ``p``;
    * ``grpo``: ``lambda_i = 1 / (B G_p n_i)``;
    * ``sequence_mean``: ``lambda_i = 1 / (B G_p)``;
    * a finite per-sequence ``weight`` overrides ``lambda_i``.

    Raises ``ValueError`` when a needed length is 0 (a zero divisor).
    """
    norm = Normalization(normalization)
    upd = seqs.update_mask
    codes, prompts = seqs.prompt_index(upd)
    c = np.zeros(seqs.n, dtype=np.float64)
    if not prompts:
        return c
    B = float(len(prompts))
    G = group_sizes(codes).astype(np.float64)
    idx = np.flatnonzero(upd)
    # Only rows without an explicit weight need the normalisation's lengths.
    default = idx[np.isnan(seqs.weight[idx])]
    lam = np.full(seqs.n, np.nan)
    if norm is Normalization.SEQUENCE_MEAN:
        lam[default] = 1.0 / (B * G[default])
    elif norm is Normalization.GRPO:
        lengths = seqs.num_tokens[default].astype(np.float64)
        if np.any(lengths <= 0):
            raise ValueError("grpo normalisation needs num_tokens >= 1 for every update sequence")
        lam[default] = 1.0 / (B * G[default] * lengths)
    else:
        if max_length is not None:
            if max_length <= 0:
                raise ValueError(f"max_length must be positive, got {max_length}")
            L = np.full(seqs.n, float(max_length))
        else:
            per_prompt = np.zeros(len(prompts))
            np.maximum.at(per_prompt, codes[idx], seqs.num_tokens[idx].astype(np.float64))
            L = np.zeros(seqs.n)
            L[idx] = per_prompt[codes[idx]]
        if np.any(L[default] <= 0):
            raise ValueError("dr_grpo normalisation needs a positive max length for every prompt")
        lam[default] = 1.0 / (B * G[default] * L[default])
    explicit = idx[~np.isnan(seqs.weight[idx])]
    lam[explicit] = seqs.weight[explicit]
    c[idx] = lam[idx] * seqs.advantage[idx]
    return c


def entropy_coefficients(seqs: StepSequences, mask: NDArray[Any]) -> FloatArray:
    """``h_j = -(S_j - Sbar_{p,-j}) / (B M_p)``, float64 ``[n]``, 0 outside ``mask`` (math.md §3).

    ``B`` = number of distinct prompts among the masked rows, ``M_p`` = masked rows of prompt
    ``p``; ``Sbar_{p,-j}`` is the leave-one-out mean (0 when ``M_p = 1``).
    """
    return centred_coefficients(seqs, -seqs.logprob, mask)


def default_estimator(seqs: StepSequences) -> Estimator:
    """``independent`` when the step has entropy-role rows, else ``u_statistic``."""
    return Estimator.INDEPENDENT if seqs.entropy_mask.any() else Estimator.U_STATISTIC


def estimator_sets(
    seqs: StepSequences, estimator: Estimator | str
) -> tuple[BoolArray, BoolArray, bool]:
    """``(E mask, U mask, exclude_diagonal)`` for an estimator (math.md §4 table)."""
    est = Estimator(estimator)
    upd = seqs.update_mask
    if est is Estimator.INDEPENDENT:
        return seqs.entropy_mask, upd, False
    return upd.copy(), upd, est in (Estimator.U_STATISTIC, Estimator.CROSS_FIT)


def estimator_halves(seqs: StepSequences, estimator: Estimator | str) -> NDArray[np.int8] | None:
    """``cross_fit``'s half of every update row (-1 elsewhere, :func:`cross_fit_halves`);
    ``None`` for the other estimators."""
    if Estimator(estimator) is not Estimator.CROSS_FIT:
        return None
    return cross_fit_halves(seqs.ids, seqs.prompt_ids, seqs.update_mask)


def estimator_entropy_coefficients(seqs: StepSequences, estimator: Estimator | str) -> FloatArray:
    """The ``h_j`` that ``estimator`` pairs with the update rows, float64 ``[n]``:
    :func:`entropy_coefficients` over its E set, and for ``cross_fit`` over each half alone
    (:func:`sketch.cross_fit.per_half`).  A trainer's token shares of the estimator
    (math.md §9) use these."""
    ent, _, _ = estimator_sets(seqs, estimator)
    halves = estimator_halves(seqs, estimator)
    if halves is None:
        return entropy_coefficients(seqs, ent)
    return per_half(entropy_coefficients, seqs, ent, halves)


# ----------------------------------------------------------------------------- result types


@dataclass(frozen=True)
class PairTypeValue:
    """One pair type's part of ``dH1`` and its share ``value / dH1`` (``None`` when dH1 = 0)."""

    value: float
    share: float | None


@dataclass(frozen=True)
class Quadrant:
    """``sum`` of ``a_i`` and ``count`` of update sequences in one quadrant.

    ``advantage``: ``"positive"`` (``A_i > 0``) or ``"negative"`` (``A_i <= 0``; ``A_i = 0`` has
    ``a_i = 0`` and only adds to the count).  ``logprob``: ``"above_mean"`` (``S_i`` > the mean
    of ``S`` over its prompt's update rows) or ``"below_mean"`` (``<=``, so a prompt's single
    sequence is ``below_mean``).
    """

    advantage: str
    logprob: str
    sum: float
    count: int


@dataclass(frozen=True)
class Decomposition:
    """What drives ``dH1``: pair types, quadrants of update sequences, parameter groups."""

    pair_types: dict[str, PairTypeValue]
    quadrants: list[Quadrant]
    groups: dict[str, float] | None = None


@dataclass(frozen=True)
class SequenceContribution:
    """One sequence's part of ``dH1``.

    ``a``: ``a_i = eta c_i sum_j h_j K(j, i)`` when it is an update row of the estimator (else
    ``None``); ``b``: ``b_j = eta h_j sum_i K(j, i) c_i`` when it is an entropy row of the
    estimator (else ``None``); ``u_statistic`` leaves out ``j = i`` in both sums.  ``c`` and
    ``h`` are its coefficients (``None`` outside U / E).
    """

    id: str
    prompt_id: str
    role: str
    advantage: float
    logprob: float
    num_tokens: int
    a: float | None
    b: float | None
    c: float | None
    h: float | None


@dataclass(frozen=True)
class EntropyChange:
    """The answer of ``GET .../steps/{step}/entropy`` (architecture.md), see docs/estimators.md.

    ``delta_h1_plus_h2`` adds ``delta_h2`` to the first-order change along the same update
    (``delta_h1_applied`` when the applied update is known, else ``delta_h1``).
    ``ratio = realized.delta_h / delta_h1``: how many times the linear prediction the step really
    moved (math.md §6); ``None`` without a realized change or when
    ``delta_h1`` is 0.  ``ratio_interval``: its Fieller interval (:mod:`sketch.ratio`) from
    ``se_sampling``, ``se_sketch``, ``realized.se`` and the covariance of the two estimates;
    ``taylor``: the step's size ``KL(pi || pi')`` and whether a Taylor prediction can hold
    (:mod:`sketch.taylor`).
    """

    delta_h1: float
    estimator: Estimator
    se_sampling: float
    se_sketch: float
    decomposition: Decomposition
    per_sequence: list[SequenceContribution]
    delta_h1_diag: float | None
    cov_baseline: float | None
    noise_scale: NoiseScale
    learning_rate: float
    step_norm: float
    normalization: Normalization
    num_update: int
    num_entropy: int
    num_prompts: int
    delta_h1_applied: float | None = None
    se_applied: float | None = None
    delta_h2: float | None = None
    delta_h1_plus_h2: float | None = None
    realized: Realized | None = None
    ratio: float | None = None
    ratio_interval: RatioInterval | None = None
    taylor: TaylorCheck | None = None
    target: Target = Target.SEQUENCE
    entropy_gradient: EntropyGradient = EntropyGradient.SCORE


# ----------------------------------------------------------------------------- helpers


def _share(value: float, total: float) -> float | None:
    return value / total if total != 0.0 else None


@dataclass(frozen=True)
class UpdateKernels:
    """The step's update rows against the score rows (math.md §4 "Update rows").

    The step is ``g_hat = sum_{i in U} u_i``; ``u_i = c_i w_i`` for a plain policy-gradient
    loss, or any per-sequence update row a trainer sends (``u_i = sum_t c_{i,t} grad log
    pi(y_{i,t})`` for a loss built from token log-probs).

    ``cross``: float64 ``[n, n]``, ``cross[j, i] = <w_j, u_i>`` (0 in the columns of rows
    outside ``U``); ``gram``: float64 ``[n, n]``, ``gram[i, i'] = <u_i, u_i'>``.  Both in the
    kernel's geometry (``w_j^T P u_i`` in ``adam``).
    """

    cross: FloatArray
    gram: FloatArray


def coefficient_updates(K: FloatArray, c: FloatArray) -> UpdateKernels:
    """``u_i = c_i w_i``: ``cross = K diag(c)``, ``gram = diag(c) K diag(c)``."""
    coef = np.asarray(c, dtype=np.float64)
    return UpdateKernels(cross=K * coef[None, :], gram=coef[:, None] * K * coef[None, :])


def row_updates(
    Y: NDArray[Any], c: NDArray[Any], U: NDArray[Any], has_row: NDArray[Any]
) -> UpdateKernels:
    """Update kernels from sketched rows: ``Y`` float ``[n, k]`` score rows, ``U`` float
    ``[n, k]`` update rows, valid where ``has_row`` (bool ``[n]``); the other rows take
    ``u_i = c_i w_i`` (``c`` float64 ``[n]``, 0 outside ``U``)."""
    Yd = np.asarray(Y, dtype=np.float64)
    V = update_row_matrix(Yd, c, U, has_row)
    return UpdateKernels(cross=Yd @ V.T, gram=V @ V.T)


def update_row_matrix(
    Y: NDArray[Any], c: NDArray[Any], U: NDArray[Any] | None, has_row: NDArray[Any] | None
) -> FloatArray:
    """The update rows as float64 ``[n, k]``: ``U_i`` where ``has_row``, else ``c_i Y_i``
    (``u_i = c_i w_i``; every row when ``U`` is None)."""
    V = np.asarray(c, dtype=np.float64)[:, None] * np.asarray(Y, dtype=np.float64)
    if U is None or has_row is None:
        return V
    return np.where(np.asarray(has_row, dtype=bool)[:, None], np.asarray(U, dtype=np.float64), V)


@dataclass(frozen=True)
class PairProducts:
    """Pair sums of ``h_j W(j, i) C(j, i)`` (without ``eta``) for one estimator, with the
    cross kernel ``C(j, i) = <w_j, u_i>`` (``K(j, i) c_i`` for ``u_i = c_i w_i``).

    ``W(j, i)`` is the estimator's pair weight (math.md §4 and docs/estimators.md): 1 for every
    pair in ``independent`` and ``plugin``; in ``u_statistic`` 0 for ``j = i`` and
    ``M_p / (M_p - 1)`` for ``j != i`` of the same prompt (the U-statistic normalisation that
    makes the same-prompt part unbiased, see :func:`pair_products`), 1 across prompts.

    ``row_b[j] = sum_i W(j, i) C(j, i)`` and ``row_a[i] = sum_j h_j W(j, i) C(j, i)``
    (float64 ``[n]``; ``b_j = eta h_j row_b[j]``, ``a_i = eta row_a[i]``), and the totals by
    pair type.  ``row_b_centre[j]``: the mean over the entropy rows ``k`` of ``j``'s prompt of
    ``h_k sum_i W(j, i) C(k, i)``, row ``k`` paired as ``j`` is; ``h_j row_b[j] -
    row_b_centre[j]`` is row ``j``'s part of the estimate's error (see :func:`_se_sampling`).
    """

    row_b: FloatArray
    row_a: FloatArray
    diagonal: float
    same_prompt: float
    cross_prompt: float
    row_b_centre: FloatArray

    @property
    def total(self) -> float:
        return self.diagonal + self.same_prompt + self.cross_prompt


def _same_prompt_factor(M: NDArray[Any], rows: NDArray[Any]) -> float:
    """``u_statistic``'s weight ``M_p / (M_p - 1)`` of a prompt's ``j != i`` pairs (``M_p`` its
    entropy rows; 0 when ``M_p < 2``: no same-prompt pair), see :func:`pair_products`."""
    m = int(M[rows][M[rows] > 0].max(initial=0))
    return m / (m - 1) if m >= 2 else 0.0


def pair_products(
    C: FloatArray,
    h: FloatArray,
    seqs: StepSequences,
    ent: BoolArray,
    estimator: Estimator,
) -> PairProducts:
    """The pair sums of ``dH1 / eta`` for ``estimator``, by per-prompt blocks (cost ``sum G_p^2``).

    Why ``M_p / (M_p - 1)`` in ``u_statistic``: ``h`` and ``u`` each carry ``1 / M_p`` (mean over
    the prompt's samples), so the ``M_p^2`` same-prompt pairs estimate the product of two means;
    dropping the ``M_p`` diagonal pairs leaves ``M_p (M_p - 1)`` pairs, whose plain sum has
    expectation ``(M_p - 1) / M_p`` times the target.  Rescaling by ``M_p / (M_p - 1)`` is the
    usual U-statistic ``1 / (M (M - 1))`` normalisation.  A prompt with ``M_p = 1`` has no
    same-prompt pair in ``u_statistic`` (its same-prompt part cannot be estimated; see
    docs/estimators.md).
    """
    if estimator is Estimator.CROSS_FIT:
        return _cross_fit_products(C, h, seqs)
    codes_all, _ = seqs.prompt_index()
    codes_ent, _ = seqs.prompt_index(ent)
    M = group_sizes(codes_ent)
    ustat = estimator is Estimator.U_STATISTIC
    C1 = C.sum(axis=1)
    row_b = C1.copy()
    row_a = C.T @ h
    centre = np.zeros(seqs.n)
    diagonal = 0.0
    same = 0.0
    within_total = 0.0
    for p in np.unique(codes_all):
        rows = np.flatnonzero(codes_all == p)
        hp = h[rows]
        if not hp.any():  # no entropy row of this prompt: no same-prompt pair
            continue
        block = C[np.ix_(rows, rows)]
        s_c = block.sum(axis=1)  # sum over i in p of C(j, i), j = i included
        s_h = block.T @ hp
        dblock = np.diag(block)
        within = float(hp @ s_c)
        diag_here = float(np.sum(hp * dblock))
        within_total += within
        if ustat:
            factor = _same_prompt_factor(M, rows)
            row_b[rows] += (factor - 1.0) * s_c - factor * dblock
            row_a[rows] += (factor - 1.0) * s_h - factor * dblock * hp
            same += factor * (within - diag_here)
            # j's weights exclude i = j: the prompt's rows k paired as j is differ by C(k, j)
            inside = ent[rows]
            count = max(int(inside.sum()), 1)
            level = float(hp @ (C1[rows] + (factor - 1.0) * s_c)) / count
            centre[rows] = np.where(inside, level - factor * s_h / count, 0.0)
        else:
            diagonal += diag_here
            same += within - diag_here
    cross = float(h @ C1) - within_total
    return PairProducts(
        row_b=row_b,
        row_a=row_a,
        diagonal=diagonal,
        same_prompt=same,
        cross_prompt=cross,
        row_b_centre=centre,
    )


def _cross_fit_products(C: FloatArray, h: FloatArray, seqs: StepSequences) -> PairProducts:
    """:func:`pair_products` of ``cross_fit``: every pair of rows of different halves, weight
    1 (each half's ``h`` already carries its own ``1 / (B M_{X,p})``).  Matrix-vector products
    over the whole kernel and per-prompt blocks for the same-prompt part, as
    :func:`pair_products` does: no ``[n, n]`` temporary beside ``C``."""
    halves = cross_fit_halves(seqs.ids, seqs.prompt_ids, seqs.update_mask)
    in_half = [(halves == half).astype(np.float64) for half in (0, 1)]
    # a row of half X pairs with the rows of half 1 - X; rows outside both pair with nothing
    to_half = [C @ m for m in in_half]
    from_half = [C.T @ (h * m) for m in in_half]
    row_b = in_half[0] * to_half[1] + in_half[1] * to_half[0]
    row_a = in_half[0] * from_half[1] + in_half[1] * from_half[0]
    codes, _ = seqs.prompt_index()
    same = 0.0
    centre = np.zeros(seqs.n)
    for p in np.unique(codes):
        rows = np.flatnonzero(codes == p)
        other = cross_half_pairs(halves[rows])
        same += float(h[rows] @ np.where(other, C[np.ix_(rows, rows)], 0.0).sum(axis=1))
        # a row of half X is paired with half 1 - X: so are the prompt's rows k in its centre
        inside = halves[rows] >= 0
        count = max(int(inside.sum()), 1)
        level = [float(h[rows] @ to_half[1 - x][rows]) / count for x in (0, 1)]
        centre[rows] = np.where(inside, np.where(halves[rows] == 1, level[1], level[0]), 0.0)
    total = float(h @ row_b)
    return PairProducts(
        row_b=row_b,
        row_a=row_a,
        diagonal=0.0,
        same_prompt=same,
        cross_prompt=total - same,
        row_b_centre=centre,
    )


def pair_weights(
    h: FloatArray, seqs: StepSequences, ent: BoolArray, estimator: Estimator
) -> FloatArray:
    """``h_j W(j, i)`` of :class:`PairProducts` as a float64 ``[n, n]`` matrix: ``dH1 / eta =
    sum_{j, i} pair_weights[j, i] C(j, i)`` for the cross kernel ``C`` (what
    :func:`pair_products` sums block by block)."""
    weights = np.repeat(np.asarray(h, dtype=np.float64)[:, None], seqs.n, axis=1)
    if estimator is Estimator.CROSS_FIT:
        halves = cross_fit_halves(seqs.ids, seqs.prompt_ids, seqs.update_mask)
        return weights * cross_half_pairs(halves)
    if estimator is not Estimator.U_STATISTIC:
        return weights
    codes_all, _ = seqs.prompt_index()
    codes_ent, _ = seqs.prompt_index(ent)
    M = group_sizes(codes_ent)
    for p in np.unique(codes_all):
        rows = np.flatnonzero(codes_all == p)
        weights[np.ix_(rows, rows)] *= _same_prompt_factor(M, rows)
        weights[rows, rows] = 0.0
    return weights


def _pair_weight_factors(
    seqs: StepSequences, ent: BoolArray, estimator: Estimator
) -> tuple[sparse.csr_array, FloatArray, FloatArray | None]:
    """:func:`pair_weights` without ``h`` as ``W = Q D Q^T - diag(f)``: ``Q`` an ``[n, m]``
    sparse 0/1 matrix, ``D`` float64 ``[m, m]`` symmetric, ``f`` float64 ``[n]`` (None for
    0).  Every pair weight 1: ``Q = 1``, ``D = 1``; ``cross_fit``: ``Q = [half 0, half 1]``,
    ``D`` the swap (pairs of different halves); ``u_statistic``: ``Q = [1, prompt
    indicators]``, ``D = diag(1, f_p - 1)`` and ``f`` each row's ``f_p`` (same prompt: ``f_p``
    off the diagonal, 0 on it)."""
    n = seqs.n
    if estimator is Estimator.CROSS_FIT:
        halves = cross_fit_halves(seqs.ids, seqs.prompt_ids, seqs.update_mask)
        inside = np.flatnonzero(halves >= 0)
        Q = sparse.csr_array(
            (np.ones(inside.size), (inside, halves[inside].astype(np.int64))), shape=(n, 2)
        )
        return Q, np.array([[0.0, 1.0], [1.0, 0.0]]), None
    ones = sparse.csr_array(np.ones((n, 1)))
    if estimator is not Estimator.U_STATISTIC:
        return ones, np.ones((1, 1)), None
    codes, prompts = seqs.prompt_index()
    M = group_sizes(seqs.prompt_index(ent)[0])
    f = np.array([_same_prompt_factor(M, np.flatnonzero(codes == p)) for p in range(len(prompts))])
    indicators = sparse.csr_array((np.ones(n), (np.arange(n), codes)), shape=(n, len(prompts)))
    Q = sparse.hstack([ones, indicators], format="csr")
    return Q, np.diag(np.concatenate([[1.0], f - 1.0])), f[codes]


def bilinear_sketch_variance(
    K: FloatArray,
    C: FloatArray,
    G: FloatArray,
    h: FloatArray,
    seqs: StepSequences,
    ent: BoolArray,
    estimator: Estimator,
) -> float:
    """``tr(M^T K M G) + tr((M C^T)^2)`` with ``M = diag(h) W`` (``W`` the estimator's pair
    weights): ``Var(dH1 / eta) / c`` for a sketch with ``Var(<Phi a, Phi b>) = c (|a|^2 |b|^2
    + <a, b>^2)`` (exact for a Gaussian sketch, a bound for the others).  ``dH1 / eta = sum_{j,
    i} M(j, i) <Phi w_j, Phi u_i>`` is a quadratic form ``(1/k) sum_r phi_r^T A phi_r`` of the
    sketch's rows with ``A = sum M(j, i) w_j u_i^T``, whose variance is ``(tr(A A^T) +
    tr(A^2)) / k``.  ``K``: the score kernel, ``C``: the cross kernel ``<w_j, u_i>``, ``G``:
    the update rows' Gram matrix, all float64 ``[n, n]``, ``K`` and ``G`` symmetric.  With
    every pair weight 1 it is ``|u|^2 |v|^2 + <u, v>^2`` with ``u = grad_hat H``, ``v =
    g_hat``; ``u_statistic``'s and ``cross_fit``'s excluded pairs change it (the spread over
    Gaussian sketches was 1.75x and 0.61x that form's error bar:
    tests/sketch/test_stats_sketch_error.py).

    ``W = Q D Q^T - F`` (:func:`_pair_weight_factors`, ``Q`` sparse with at most two entries
    a row) keeps it to a few ``O(n^2)`` passes over the ``n x n`` matrices where the plain
    products cost ``O(n^3)``.  Hand-written: no library has the variance of a sketched
    bilinear form."""
    Q, D, f = _pair_weight_factors(seqs, ent, estimator)
    diagonal = not np.any(D - np.diag(np.diagonal(D)))

    def times_d(X: FloatArray) -> FloatArray:  # X D, O(n m) when D is diagonal
        return X * np.diagonal(D)[None, :] if diagonal else X @ D

    # Sparse on the left of C-ordered dense matrices: scipy's ``dense @ sparse`` copies the
    # transposed dense matrix, most of this function's time at n = 2048.
    HQt = Q.T.multiply(h[None, :]).tocsr()  # (diag(h) Q)^T, [m, n]
    Qt = Q.T.tocsr()
    HQK = (HQt @ K).T  # K HQ, K symmetric
    GQ = (Qt @ G).T  # G symmetric
    Ct = np.ascontiguousarray(C.T)
    CQ = (Qt @ Ct).T
    # T1 = tr(W P W G), P = diag(h) K diag(h), W = Q D Q^T - F
    t1 = float(np.sum((D @ (HQt @ HQK) @ D) * (Qt @ GQ)))
    # T2 = tr(Z^2), Z = diag(h) W C^T = HQ Y^T - diag(h f) C^T, Y = C Q D^T = C Q D
    Y = times_d(CQ)
    YX = HQt @ Y  # HQ^T Y = (Y^T HQ)^T
    t2 = float(np.sum(YX * YX.T))
    if f is not None:
        hf = h * f
        # - 2 tr(Q D Q^T P F G) + tr(F P F G); Q^T P = (HQK h)^T, F G Q = f GQ
        t1 -= 2.0 * float(np.sum((HQK * h[:, None]) * times_d(GQ * f[:, None])))
        t1 += float(hf @ np.einsum("ij,ij,j->i", K, G, hf))  # one pass, no n x n temporary
        # - 2 tr(Y^T diag(hf) C^T HQ) + tr(diag(hf) C^T diag(hf) C^T)
        t2 -= 2.0 * float(np.sum(Y * ((HQt @ C).T * hf[:, None])))
        t2 += float(hf @ np.einsum("ij,ij,j->i", Ct, C, hf))
    return t1 + t2


@dataclass(frozen=True)
class SketchCells:
    """The sketched rows behind a Kronecker-sketched kernel, for ``se_sketch`` from the rows
    themselves (:mod:`sketch.crossed`) instead of the variance-factor bound.

    ``Y``: float ``[n, k]`` score rows; ``V``: float ``[n, k]`` update rows ``u_i`` (``c_i Y_i``
    where a sequence has none); ``shape``: ``(k_out, k_in)``, both at least 2; ``Z``: float
    ``[n, k]`` the entropy sums' gradient rows ``z_j`` (:mod:`sketch.rao_blackwell`; 0 where a
    sequence has none), or None.
    """

    Y: FloatArray
    V: FloatArray
    shape: tuple[int, int]
    Z: FloatArray | None = None

    def entropy_rows(self, side: EntropySide) -> FloatArray:
        """float64 ``[n, k]``: ``alpha_j Y_j + beta_j Z_j``, the rows of ``grad_hat H``."""
        rows = side.alpha[:, None] * np.asarray(self.Y, dtype=np.float64)
        if side.beta is not None:
            if self.Z is None:
                raise ValueError("the entropy-sum gradient needs the Z rows of the sketch cells")
            rows = rows + side.beta[:, None] * np.asarray(self.Z, dtype=np.float64)
        return rows


def first_order_change(
    K: NDArray[Any],
    seqs: StepSequences,
    learning_rate: float,
    estimator: Estimator | str | None = None,
    normalization: Normalization | str = Normalization.DR_GRPO,
    max_length: int | None = None,
    update: UpdateKernels | None = None,
    entropy_sums: EntropySumKernels | None = None,
) -> float:
    """Only ``dH1`` (the ``delta_h1`` of :func:`entropy_change`), without the diagnostics."""
    mat = check_kernel(K, seqs.n)
    est = default_estimator(seqs) if estimator is None else Estimator(estimator)
    ent, upd = _checked_sets(seqs, est)
    sums = None if entropy_sums is None else entropy_sums.checked(seqs.n)
    side = entropy_side(seqs, est, ent, sums)
    if update is None:
        step = coefficient_updates(mat, update_coefficients(seqs, normalization, max_length))
    else:
        step = _checked_update(update, seqs.n, upd)
    cross = side.cross(step.cross, None if sums is None else sums.cross * upd[None, :])
    return float(learning_rate) * pair_products(cross, ent.astype(np.float64), seqs, ent, est).total


def entropy_side(
    seqs: StepSequences,
    estimator: Estimator,
    mask: BoolArray,
    sums: EntropySumKernels | None,
    *,
    whole_prompts: bool = False,
) -> EntropySide:
    """``grad_hat H`` over the rows of ``mask`` as ``estimator`` forms it: from the entropy
    sums (:mod:`sketch.rao_blackwell`) when every row has its sum and its ``z`` row, else from
    the score rows alone (``h_j``, math.md §3); ``cross_fit`` per half unless
    ``whole_prompts``."""
    halves = None if whole_prompts else estimator_halves(seqs, estimator)
    if uses_entropy_sums(seqs, mask, sums):
        alpha, beta = entropy_sum_coefficients(seqs, mask, halves)
        return EntropySide(alpha, beta, sums)
    if halves is None:
        return EntropySide(entropy_coefficients(seqs, mask))
    return EntropySide(per_half(entropy_coefficients, seqs, mask, halves))


def _checked_update(update: UpdateKernels, n: int, upd: BoolArray) -> UpdateKernels:
    """``update`` with its shapes checked and the rows outside ``U`` zeroed (only update-role
    sequences drive the step)."""
    cross = check_kernel(update.cross, n) * upd[None, :]
    gram = check_kernel(update.gram, n) * (upd[:, None] & upd[None, :])
    return UpdateKernels(cross=cross, gram=gram)


def _checked_sets(seqs: StepSequences, est: Estimator) -> tuple[BoolArray, BoolArray]:
    ent, upd, _ = estimator_sets(seqs, est)
    if not upd.any():
        raise ValueError("the step has no update-role sequences: nothing drives the step")
    if not ent.any():
        raise ValueError(
            "the independent estimator needs entropy-role sequences;"
            " use u_statistic, cross_fit or plugin"
        )
    return ent, upd


def covariance_baseline(seqs: StepSequences) -> float | None:
    """``-(1/B) sum_p Cov_{i in p}(S_i, A_i)`` over update rows (Cui et al. 2025, Thm. 2).

    Sample covariance with ``ddof = 1`` per prompt; prompts with a single update row have no
    covariance and contribute 0 but still count in ``B``.  ``None`` without update rows.
    """
    upd = seqs.update_mask
    codes, prompts = seqs.prompt_index(upd)
    if not prompts:
        return None
    total = 0.0
    for p in range(len(prompts)):
        rows = codes == p
        if rows.sum() < 2:
            continue
        S = seqs.logprob[rows]
        A = seqs.advantage[rows]
        total += float(np.sum((S - S.mean()) * (A - A.mean())) / (S.size - 1))
    return -total / len(prompts)


def _quadrants(seqs: StepSequences, a: FloatArray, upd: BoolArray) -> list[Quadrant]:
    codes, prompts = seqs.prompt_index(upd)
    sums = np.bincount(codes[upd], weights=seqs.logprob[upd], minlength=len(prompts))
    sizes = np.bincount(codes[upd], minlength=len(prompts))
    mean = np.zeros(seqs.n)
    mean[upd] = sums[codes[upd]] / sizes[codes[upd]]
    positive = seqs.advantage > 0
    above = seqs.logprob > mean
    out = []
    for adv_name, adv in (("positive", positive), ("negative", ~positive)):
        for lp_name, lp in (("above_mean", above), ("below_mean", ~above)):
            rows = upd & adv & lp
            out.append(Quadrant(adv_name, lp_name, float(a[rows].sum()), int(rows.sum())))
    return out


def _se_sampling(seqs: StepSequences, b: FloatArray, ent: BoolArray) -> float:
    """``sqrt(sum_p M_p var_{j in E ∩ p}(b_j))`` with the unbiased sample variance (ddof = 1);
    prompts with ``M_p = 1`` have no within-prompt spread and contribute 0.  Under
    ``cross_fit`` too the groups are whole prompts, both halves together: grouped by prompt
    and half instead, the estimate came out 26-28% low at M = 4 (halves of 2 rows) and 2-4%
    low at M = 8 on exact enumeration, against 16-18% and 0-2% (docs/validation.md §15)."""
    variance = per_prompt_covariance(b, b, seqs.prompt_index(ent)[0])
    return 0.0 if variance is None else math.sqrt(max(variance, 0.0))


def _ratio(
    parts: tuple[FloatArray, BoolArray] | None,
    real: Realized,
    delta_h1: float,
    var_h1: float,
    b: FloatArray,
    seqs: StepSequences,
    ent: BoolArray,
) -> RatioInterval | None:
    """``realized / dH1`` with its Fieller interval (math.md §6).

    ``parts``: the realized estimate's per-row parts and the rows it used, ``None`` for a
    posted or given change (taken as exact: variance 0, no covariance).  The covariance of the
    two estimates is the per-prompt covariance of their per-row parts over the rows both use
    (the entropy-role rows with ``logprob_after`` by default).
    """
    if delta_h1 == 0.0:
        return None
    var_x = 0.0 if real.se is None else real.se**2
    cov = 0.0
    if parts is not None and real.se is not None:
        delta, mask = parts
        cov = per_prompt_covariance(delta, b, seqs.prompt_index(ent & mask)[0]) or 0.0
    return fieller_interval(real.delta_h, delta_h1, var_x, var_h1, cov)


# ----------------------------------------------------------------------------- entry point


def entropy_change(
    K: NDArray[Any],
    seqs: StepSequences,
    learning_rate: float,
    *,
    estimator: Estimator | str | None = None,
    normalization: Normalization | str = Normalization.DR_GRPO,
    max_length: int | None = None,
    k_applied: NDArray[Any] | None = None,
    sketch_variance_factor: float = 0.0,
    group_kernels: Mapping[str, NDArray[Any] | UpdateKernels] | None = None,
    update: UpdateKernels | None = None,
    realized: Realized | float | None = None,
    entropy_before: float | None = None,
    entropy_after: float | None = None,
    sketch_cells: SketchCells | None = None,
    target: Target | str = Target.SEQUENCE,
    applied_row: NDArray[Any] | None = None,
    applied_includes_step: bool = False,
    entropy_sums: EntropySumKernels | None = None,
) -> EntropyChange:
    """Predict the first-order entropy change of the step and explain it (math.md §2–§6).

    Parameters
    ----------
    K: float64 ``[n, n]`` kernel over the step's sequences in ``seqs`` order (``K = Y Y^T``).
    seqs: the step's sequences.
    learning_rate: ``eta``.
    estimator: ``independent`` / ``u_statistic`` / ``plugin``; default
        :func:`default_estimator`.  ``independent`` without entropy-role rows raises.
    normalization, max_length: how ``lambda_i`` is set (math.md §2).
    k_applied: float64 ``[n]``, ``K(j, u) = <w_j, u>`` with the applied update row ``u``.
    applied_row: the sketched applied update row itself (``[k]``), for the sketch part of
        ``se_applied`` (its norm, or with ``sketch_cells`` its Kronecker cells); without it
        that part is 0.
    applied_includes_step: the applied update is ``eta g_hat`` (``eta`` this call's
        ``learning_rate``, ``g_hat`` the sum of the update rows) plus a part that is not a
        function of this step's sequences (the run's ``applied_includes_step``): then
        ``delta_h1_applied = delta_h1 + <grad_hat H, u - eta g_hat>``, unbiased where
        ``<grad_hat H, u>`` is not (math.md §4).
    sketch_variance_factor: the sketch's ``c`` in ``Var(<Phi a, Phi b>) <= c (|a|^2 |b|^2 +
        <a, b>^2)`` (``1/k`` for dense kinds, 0 for ``exact``).
    group_kernels: ``{group: K_g}`` with ``sum_g K_g = K`` for the per-group split of dH1; with
        update rows, ``{group: UpdateKernels}`` of the group's columns (``sum_g`` of the cross
        kernels is ``update.cross``).
    update: the step's update rows (:class:`UpdateKernels`, math.md §4 "Update rows"); default
        ``u_i = c_i w_i`` (:func:`coefficient_updates`).
    realized: an explicit realized change (a :class:`Realized` or a number); else the posted
        ``entropy_before`` / ``entropy_after`` when both are given; else the estimate from
        ``logprob_after`` (:func:`sketch.realized.realized_parts`) when available.  The step's
        KL (:mod:`sketch.taylor`) comes from ``logprob_after`` whatever the realized source.
    sketch_cells: the Kronecker-sketched rows (:class:`SketchCells`): ``se_sketch`` is then
        estimated from them (:func:`sketch.crossed.bilinear_error_bar`: the crossed cells'
        unbiased variance, scaled so that ``2 s.e.`` is a 95.45% t-interval with
        kurtosis-corrected degrees of freedom) rather than bounded with
        ``sketch_variance_factor``.
    entropy_sums: the rows ``z_j = grad entropy_sum_j`` against the others
        (:class:`sketch.rao_blackwell.EntropySumKernels`): when every row of E has its
        ``entropy_sum`` and its ``z`` row, ``grad_hat H = sum_j alpha_j w_j + beta_j z_j``
        (math.md §3 "From the entropy sums"; ``entropy_gradient = entropy_sum``), else the
        score rows' ``h_j`` (``entropy_gradient = score``).  Every number below then runs over
        ``e_j = alpha_j w_j + beta_j z_j`` where it ran over ``h_j w_j``.
    target: ``sequence`` (math.md §3-6) or ``token_mean``, the entropy trainers log
        (:mod:`sketch.token_mean`, math.md §8): every number is then about ``T`` in nats per
        token; ``delta_h2`` is not derived for it (``None``), the realized change comes from
        ``entropy_sum`` / ``entropy_sum_after`` (or ``realized``), and ``entropy_before`` /
        ``entropy_after`` (sequence entropies) are not used.

    Raises ``ValueError`` on shape mismatches, non-finite inputs, a step without update-role
    rows, or ``independent`` without entropy-role rows.
    """
    eta = float(learning_rate)
    if not math.isfinite(eta):
        raise ValueError("learning_rate must be finite")
    if not (math.isfinite(sketch_variance_factor) and sketch_variance_factor >= 0):
        raise ValueError("sketch_variance_factor must be finite and >= 0")
    mat = check_kernel(K, seqs.n)
    est = default_estimator(seqs) if estimator is None else Estimator(estimator)
    norm = Normalization(normalization)
    tgt = Target(target)
    token_mean = tgt is Target.TOKEN_MEAN
    ent, upd = _checked_sets(seqs, est)

    c = update_coefficients(seqs, norm, max_length)
    halves = estimator_halves(seqs, est)
    sums = None if entropy_sums is None else entropy_sums.checked(seqs.n)
    # grad_hat H = sum_j alpha_j w_j + beta_j z_j (beta = 0 without the entropy sums' rows):
    # every pair sum below runs over e_j = alpha_j w_j + beta_j z_j with unit weights on E.
    side_sequence = entropy_side(seqs, est, ent, sums)
    gradient = EntropyGradient.SCORE if side_sequence.beta is None else EntropyGradient.ENTROPY_SUM
    side = side_sequence
    if token_mean:
        fitted = None if halves is None else per_half(length_coefficients, seqs, ent, halves)
        h_tm, lengths, lv = token_mean_coefficients(seqs, ent, side_sequence.alpha, fitted)
        side = side_sequence.scaled(h_tm, 1.0 / lv.length)
    h = side.alpha
    ones = ent.astype(np.float64)
    step = coefficient_updates(mat, c) if update is None else _checked_update(update, seqs.n, upd)
    C = step.cross
    D = None if sums is None else sums.cross * upd[None, :]
    Ce = Ce_sequence = side_sequence.cross(C, D)  # <e_j, u_i> of grad_hat H
    if token_mean and est is not Estimator.INDEPENDENT:
        # E = U: row i's pairs take levels without row i, which its update row would bias
        # (the levels' part of dT1 is a product of two estimates from the same rows).
        level_h, level_l = leave_one_out_levels(seqs, ent)
        Ce = Ce_sequence / level_l[None, :] - lengths[:, None] * C * (level_h / level_l**2)[None, :]
    elif token_mean:
        Ce = side.cross(C, D)
    pairs = pair_products(Ce, ones, seqs, ent, est)
    b = eta * ones * pairs.row_b
    # Per-row parts of dH1's error for its sampling error: b_j less what row j's pairs
    # estimate (rows pair with different update rows in u_statistic and cross_fit), plus for
    # the token mean the rows' influence through the estimated levels (delta method,
    # sketch.token_mean).
    influence = b - eta * pairs.row_b_centre
    if token_mean:
        d_entropy = eta * pair_products(Ce_sequence, ones, seqs, ent, est).total
        d_length = eta * pair_products(C, lengths, seqs, ent, est).total
        influence = influence + level_influence(lv, d_entropy, d_length)
    a = eta * pairs.row_a
    delta_h1 = eta * pairs.total
    pair_types = {
        name: PairTypeValue(value, _share(value, delta_h1))
        for name, value in (
            ("diagonal", eta * pairs.diagonal),
            ("same_prompt", eta * pairs.same_prompt),
            ("cross_prompt", eta * pairs.cross_prompt),
        )
    }

    groups: dict[str, float] | None = None
    if group_kernels is not None:
        if side.beta is not None and (sums is None or sums.groups is None):
            raise ValueError("the entropy-sum gradient's group split needs each group's z cross")
        groups = {}
        for name, part in group_kernels.items():
            cross = (
                _checked_update(part, seqs.n, upd).cross
                if isinstance(part, UpdateKernels)
                else coefficient_updates(check_kernel(part, seqs.n), c).cross
            )
            z_cross = None
            if side.beta is not None:
                assert sums is not None and sums.groups is not None
                z_cross = sums.groups[str(name)] * upd[None, :]
            part_cross = side.cross(cross, z_cross)
            groups[str(name)] = eta * pair_products(part_cross, ones, seqs, ent, est).total

    # Diagonal-kernel approximation, always with grad_hat H over the update rows.
    side_upd = entropy_side(seqs, Estimator.PLUGIN, upd, sums)
    if token_mean:
        h_upd, _, lv_upd = token_mean_coefficients(seqs, upd, side_upd.alpha)
        side_upd = side_upd.scaled(h_upd, 1.0 / lv_upd.length)
    diagonal = side_upd.alpha * np.diag(C)
    if side_upd.beta is not None:
        assert D is not None
        diagonal = diagonal + side_upd.beta * np.diag(D)
    delta_h1_diag = eta * float(np.sum(diagonal))

    # Sketch error bar (sketched units): the estimator's bilinear form of the rows, or the
    # crossed cells of Kronecker rows.  u2 = |grad_hat H|^2 is also the applied change's; v2 =
    # |g_hat|^2 gives the step's norm.
    C1 = C.sum(axis=1)
    Ke = side.gram(mat)
    u2 = max(float(ones @ (Ke @ ones)), 0.0)
    v2 = max(float(step.gram.sum()), 0.0)
    if sketch_cells is None:
        se_sketch = 0.0
        if sketch_variance_factor > 0:
            if est in (Estimator.INDEPENDENT, Estimator.PLUGIN):  # every pair weight 1
                variance = u2 * v2 + float(Ce.sum()) ** 2
            else:
                variance = bilinear_sketch_variance(Ke, Ce, step.gram, ones, seqs, ent, est)
            se_sketch = abs(eta) * math.sqrt(sketch_variance_factor * max(variance, 0.0))
    else:
        weights = pair_weights(ones, seqs, ent, est)
        se_sketch = abs(eta) * bilinear_error_bar(
            sketch_cells.entropy_rows(side), sketch_cells.V, weights, sketch_cells.shape
        )

    delta_h1_applied: float | None = None
    se_applied: float | None = None
    if k_applied is not None:
        applied = np.asarray(k_applied, dtype=np.float64).reshape(-1)
        if applied.shape != (seqs.n,) or not np.all(np.isfinite(applied)):
            raise ValueError(f"k_applied must be {seqs.n} finite values")
        # With u = eta g_hat + r (applied_includes_step), pairing every e_j with the step's
        # own part would pair a sequence with its own update row, as plugin does (biased when
        # E and U share sequences): the own part is paired as delta_h1 pairs it, the rest r
        # (momentum of earlier steps, weight decay) with every e_j.
        rest = applied - eta * C1 if applied_includes_step else applied
        z_rest = None
        if side.beta is not None:
            assert sums is not None and D is not None
            if sums.applied is None:
                raise ValueError("the entropy-sum gradient needs <z_j, u> with the applied update")
            z_rest = sums.applied - eta * D.sum(axis=1) if applied_includes_step else sums.applied
        # A fixed direction is paired with grad_hat H of all of E: cross_fit's per-half
        # estimates, summed over both halves, would count it twice.
        seq_fixed, side_fixed, u2_fixed = side_sequence, side, u2
        if token_mean:
            lengths_fixed, lv_fixed = lengths, lv
        if est is Estimator.CROSS_FIT:
            seq_fixed = side_fixed = entropy_side(seqs, est, ent, sums, whole_prompts=True)
            if token_mean:
                h_tm_fixed, lengths_fixed, lv_fixed = token_mean_coefficients(
                    seqs, ent, seq_fixed.alpha
                )
                side_fixed = seq_fixed.scaled(h_tm_fixed, 1.0 / lv_fixed.length)
            u2_fixed = max(float(ones @ (side_fixed.gram(mat) @ ones)), 0.0)
        # Its error with r held fixed: grad_hat H's sampling error (per-row parts <e_j, r>,
        # plus the levels' influence for the token mean; plus delta_h1's own parts) and the
        # sketch's.
        applied_influence = side_fixed.applied(rest, z_rest)
        delta_h1_applied = float(applied_influence.sum())
        if token_mean:
            applied_influence = applied_influence + level_influence(
                lv_fixed,
                float(seq_fixed.applied(rest, z_rest).sum()),
                float(lengths_fixed @ rest),
            )
        if applied_includes_step:
            delta_h1_applied += delta_h1
            applied_influence = applied_influence + influence
        applied_sketch = 0.0
        if applied_row is not None:
            row = np.asarray(applied_row, dtype=np.float64).reshape(-1)
            if sketch_cells is None:
                norm2 = float(row @ row)
                applied_sketch = math.sqrt(
                    sketch_variance_factor * (u2_fixed * norm2 + delta_h1_applied**2)
                )
            else:  # cells of sum_j <e_j, u> over the sketch's k_out x k_in
                k_out, k_in = sketch_cells.shape
                cells = sketch_cells.entropy_rows(side_fixed).sum(axis=0) * row * (k_out * k_in)
                applied_sketch = crossed_error_bar(cells.reshape(k_out, k_in))
        se_applied = math.hypot(_se_sampling(seqs, applied_influence, ent), applied_sketch)

    d = eta * C1 if k_applied is None else displacement(mat, c, eta, k_applied)
    dh2 = None if token_mean else second_order_delta_h2(seqs, ent, d)
    first = delta_h1_applied if delta_h1_applied is not None else delta_h1
    total = None if dh2 is None else first + dh2

    log_parts = realized_parts(seqs)
    estimated, parts = _estimated_realized(seqs, log_parts, token_mean)
    if isinstance(realized, Realized):
        real: Realized | None = realized
    elif realized is not None:
        real = Realized(delta_h=float(realized), source="given")
    elif entropy_before is not None and entropy_after is not None and not token_mean:
        real = realized_from_entropies(entropy_before, entropy_after)
    else:
        real = estimated
    se_sampling = _se_sampling(seqs, influence, ent)
    var_h1 = se_sampling**2 + se_sketch**2
    ratio_interval = None
    if real is not None:
        own = parts if real is estimated else None
        ratio_interval = _ratio(own, real, delta_h1, var_h1, influence, seqs, ent)
    taylor = taylor_check(
        None if log_parts is None else log_parts.realized.kl,
        None if log_parts is None else log_parts.realized.kl_se,
        delta_h1,
        math.sqrt(var_h1),
        dh2,
    )

    per_sequence = [
        SequenceContribution(
            id=seqs.ids[i],
            prompt_id=seqs.prompt_ids[i],
            role=seqs.role[i].value,
            advantage=float(seqs.advantage[i]),
            logprob=float(seqs.logprob[i]),
            num_tokens=int(seqs.num_tokens[i]),
            a=float(a[i]) if upd[i] else None,
            b=float(b[i]) if ent[i] else None,
            c=float(c[i]) if upd[i] else None,
            h=float(h[i]) if ent[i] else None,
        )
        for i in range(seqs.n)
    ]

    return EntropyChange(
        delta_h1=delta_h1,
        estimator=est,
        se_sampling=se_sampling,
        se_sketch=se_sketch,
        decomposition=Decomposition(
            pair_types=pair_types, quadrants=_quadrants(seqs, a, upd), groups=groups
        ),
        per_sequence=per_sequence,
        delta_h1_diag=delta_h1_diag,
        cov_baseline=covariance_baseline(seqs),
        noise_scale=noise_scale(step.gram, upd.astype(np.float64), seqs.prompt_ids, upd),
        learning_rate=eta,
        step_norm=abs(eta) * math.sqrt(v2),
        normalization=norm,
        num_update=int(upd.sum()),
        num_entropy=int(ent.sum()),
        num_prompts=len(seqs.prompt_index(upd)[1]),
        delta_h1_applied=delta_h1_applied,
        se_applied=se_applied,
        delta_h2=dh2,
        delta_h1_plus_h2=total,
        realized=real,
        ratio=None if ratio_interval is None else ratio_interval.value,
        ratio_interval=ratio_interval,
        taylor=taylor,
        target=tgt,
        entropy_gradient=gradient,
    )


def _estimated_realized(
    seqs: StepSequences, log_parts: RealizedParts | None, token_mean: bool
) -> tuple[Realized | None, tuple[FloatArray, BoolArray] | None]:
    """The realized change the step's sequences give, with its per-row parts: from
    ``logprob_after`` (math.md §6), or for the token mean from ``entropy_sum`` /
    ``entropy_sum_after`` too (§8)."""
    if not token_mean:
        if log_parts is None:
            return None, None
        return log_parts.realized, (log_parts.delta, log_parts.mask)
    found = realized_token_mean(seqs)
    if found is None:
        return None, None
    real = Realized(
        delta_h=found.delta,
        source="entropy_sum",
        entropy_before=found.before,
        entropy_after=found.after,
        num_sequences=found.num_sequences,
        num_prompts=found.num_prompts,
        estimator=RealizedEstimator.CONTROL_VARIATE,
        se=found.se,
        kl=None if log_parts is None else log_parts.realized.kl,
        kl_se=None if log_parts is None else log_parts.realized.kl_se,
    )
    return real, (found.influence, found.mask)


__all__ = [
    "Decomposition",
    "EntropyChange",
    "Estimator",
    "PairTypeValue",
    "Quadrant",
    "Role",
    "SequenceContribution",
    "SketchCells",
    "Target",
    "UpdateKernels",
    "coefficient_updates",
    "covariance_baseline",
    "default_estimator",
    "entropy_change",
    "entropy_coefficients",
    "estimator_entropy_coefficients",
    "estimator_halves",
    "estimator_sets",
    "first_order_change",
    "pair_products",
    "pair_weights",
    "row_updates",
    "update_coefficients",
    "update_row_matrix",
]
