"""The sketch error bar se_sketch (math.md §4) against the spread of dH1 over random sketches.

A dense Gaussian sketch ``Phi`` with ``N(0, 1/k)`` entries (built here in numpy; the project's
operators are tested elsewhere) satisfies ``Var(<Phi a, Phi b>) = (|a|^2 |b|^2 + <a, b>^2) / k``.
For the ``independent`` estimator ``dH1 = eta <Phi grad_hat H, Phi g_hat>`` is exactly such an
inner product, so se_sketch (computed from each sketched kernel) must match the spread.
"""

from __future__ import annotations

import numpy as np
import pytest

from sketch.entropy import (
    EntropyChange,
    Estimator,
    bilinear_sketch_variance,
    entropy_change,
    estimator_entropy_coefficients,
    estimator_sets,
    pair_weights,
    update_coefficients,
)
from sketch.kernel import kernel_from_rows
from sketch.rao_blackwell import EntropyGradient, EntropySumKernels
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


@pytest.mark.parametrize(
    ("estimator", "n_upd", "n_ent"),
    [("independent", 8, 6), ("u_statistic", 16, 0), ("cross_fit", 16, 0), ("plugin", 16, 0)],
)
def test_se_sketch_matches_gaussian_sketch_spread(estimator: str, n_upd: int, n_ent: int) -> None:
    """Each estimator's ``se_sketch`` against 300 Gaussian sketches of the same rows, with
    entropy-role rows (``independent``) and without (the others, ``E = U``): unbiased, the
    spread within 20% of the rms bar, about 95% of errors within 2 bars.  With the
    every-pair form ``|u|^2 |v|^2 + <u, v>^2`` the spread read 1.75x the bar for
    ``u_statistic`` (coverage 75%) and 0.61x for ``cross_fit``: their excluded pairs change
    the sketched bilinear form's variance (``sketch.entropy.bilinear_sketch_variance``)."""
    rng = np.random.default_rng(0)
    N, k, eta = 400, 64, 0.5
    n = n_upd + n_ent
    seqs = _step(rng, n_upd, n_ent)
    # Correlated rows so that <u, v> is not negligible against |u| |v|.
    W = rng.normal(size=(n, N)) + 2.0 * rng.normal(size=(1, N))
    exact = entropy_change(W @ W.T, seqs, eta, estimator=estimator)
    estimates, bars = [], []
    for _ in range(300):
        Phi = rng.normal(scale=1.0 / np.sqrt(k), size=(k, N))
        out = entropy_change(
            kernel_from_rows(W @ Phi.T),
            seqs,
            eta,
            sketch_variance_factor=1.0 / k,
            estimator=estimator,
        )
        estimates.append(out.delta_h1)
        bars.append(out.se_sketch)
    errors = np.array(estimates) - exact.delta_h1
    # Unbiased: E[<Phi a, Phi b>] = <a, b>.
    assert abs(errors.mean()) < 4 * errors.std(ddof=1) / np.sqrt(len(errors))
    # The error bar matches the observed spread (RMS of per-sketch bars vs the std).
    ratio = errors.std(ddof=1) / np.sqrt(np.mean(np.square(bars)))
    coverage = float(np.mean(np.abs(errors) <= 2 * np.array(bars)))
    print(f"\n{estimator}: spread / rms se_sketch {ratio:.3f}, coverage {coverage:.3f}")
    assert ratio == pytest.approx(1.0, abs=0.2)
    # Coverage of +-2 se: about 95 % (loose bounds for 300 draws and heavy-ish tails).
    assert 0.88 <= coverage <= 0.995


@pytest.mark.parametrize(
    ("estimator", "n_upd", "n_ent"),
    [("independent", 8, 6), ("u_statistic", 16, 0), ("cross_fit", 16, 0)],
)
def test_se_sketch_from_the_entropy_sums_matches_gaussian_sketch_spread(
    estimator: str, n_upd: int, n_ent: int
) -> None:
    """With ``grad_hat H = sum_j alpha_j w_j + beta_j z_j`` (the entropy sums' rows ``z_j``,
    :mod:`sketch.rao_blackwell`) the sketched form runs over ``e_j = alpha_j w_j + beta_j z_j``:
    ``se_sketch`` and the sketch part of ``se_applied`` against 300 Gaussian sketches of the
    rows ``w``, ``z`` and the applied update: unbiased, the spread within 20% of the rms bar,
    about 95% within 2 bars."""
    rng = np.random.default_rng(2)
    N, k, eta = 400, 64, 0.5
    n = n_upd + n_ent
    seqs = _step(rng, n_upd, n_ent)
    seqs.entropy_sum[:] = rng.uniform(1.0, 20.0, size=n)
    common = rng.normal(size=(1, N))
    W = rng.normal(size=(n, N)) + 2.0 * common
    Z = rng.normal(size=(n, N)) - 1.5 * common
    u = W[:n_upd].sum(axis=0) + rng.normal(size=N)
    c = update_coefficients(seqs)

    def answer(Y: np.ndarray, Yz: np.ndarray, y_u: np.ndarray, factor: float) -> EntropyChange:
        V = c[:, None] * Y
        sums = EntropySumKernels(
            cross=Yz @ V.T,
            score=Yz @ Y.T,
            gram=Yz @ Yz.T,
            has_row=np.ones(n, dtype=bool),
            applied=Yz @ y_u,
        )
        return entropy_change(
            kernel_from_rows(Y),
            seqs,
            eta,
            estimator=estimator,
            sketch_variance_factor=factor,
            k_applied=Y @ y_u,
            applied_row=y_u if factor else None,
            entropy_sums=sums,
        )

    exact = answer(W, Z, u, 0.0)
    assert exact.entropy_gradient is EntropyGradient.ENTROPY_SUM
    errors, bars, applied_errors, applied_bars = [], [], [], []
    for _ in range(300):
        Phi = rng.normal(scale=1.0 / np.sqrt(k), size=(k, N))
        out = answer(W @ Phi.T, Z @ Phi.T, Phi @ u, 1.0 / k)
        sampling = answer(W @ Phi.T, Z @ Phi.T, Phi @ u, 0.0).se_applied
        assert out.delta_h1_applied is not None and exact.delta_h1_applied is not None
        assert out.se_applied is not None and sampling is not None
        errors.append(out.delta_h1 - exact.delta_h1)
        bars.append(out.se_sketch)
        applied_errors.append(out.delta_h1_applied - exact.delta_h1_applied)
        applied_bars.append(np.sqrt(max(out.se_applied**2 - sampling**2, 0.0)))
    for name, err_list, bar_list in (
        ("delta_h1", errors, bars),
        ("applied", applied_errors, applied_bars),
    ):
        err = np.array(err_list)
        assert abs(err.mean()) < 4 * err.std(ddof=1) / np.sqrt(len(err)), name
        ratio = err.std(ddof=1) / np.sqrt(np.mean(np.square(bar_list)))
        coverage = float(np.mean(np.abs(err) <= 2 * np.array(bar_list)))
        print(f"\n{estimator} {name}: spread / rms bar {ratio:.3f}, coverage {coverage:.3f}")
        assert ratio == pytest.approx(1.0, abs=0.2), name
        assert 0.88 <= coverage <= 0.995, name


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


@pytest.mark.parametrize("estimator", ["independent", "u_statistic", "cross_fit", "plugin"])
def test_bilinear_sketch_variance_equals_the_dense_traces(estimator: str) -> None:
    """``bilinear_sketch_variance`` (factored pair weights, sparse products) equals the plain
    ``tr(M^T K M G) + tr((M C^T)^2)`` with ``M = diag(h) W`` from ``pair_weights``, on a step
    with uneven prompts (1 to 6 rows), entropy-role rows and update rows of their own."""
    rng = np.random.default_rng(5)
    sizes = [1, 2, 3, 6, 4]
    prompt_ids = [f"p{p}" for p, m in enumerate(sizes) for _ in range(m)]
    n = len(prompt_ids)
    roles = [Role.ENTROPY if i % 4 == 3 else Role.UPDATE for i in range(n)]
    if estimator != "independent":
        roles = [Role.UPDATE] * n
    seqs = StepSequences(
        ids=[f"s{i}" for i in range(n)],
        prompt_ids=prompt_ids,
        logprob=-rng.uniform(1.0, 30.0, size=n),
        advantage=rng.normal(size=n),
        num_tokens=rng.integers(1, 20, size=n),
        role=roles,
    )
    W, V = rng.normal(size=(n, 30)), rng.normal(size=(n, 30))
    V[np.array(roles) == Role.ENTROPY] = 0.0  # entropy rows have no update row
    K, C, G = W @ W.T, W @ V.T, V @ V.T
    est = Estimator(estimator)
    ent, _, _ = estimator_sets(seqs, est)
    h = estimator_entropy_coefficients(seqs, est)
    M = pair_weights(h, seqs, ent, est)
    dense = np.trace(M.T @ K @ M @ G) + np.trace((M @ C.T) @ (M @ C.T))
    got = bilinear_sketch_variance(K, C, G, h, seqs, ent, est)
    assert got == pytest.approx(dense, rel=1e-10)
