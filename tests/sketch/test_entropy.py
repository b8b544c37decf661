"""Known-answer tests of sketch/entropy.py against brute-force loops written from math.md §2–§4."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pytest

from sketch.cross_fit import cross_fit_halves
from sketch.crossed import bilinear_error_bar
from sketch.entropy import (
    Estimator,
    SketchCells,
    default_estimator,
    entropy_change,
    entropy_coefficients,
    estimator_sets,
    first_order_change,
    pair_weights,
    row_updates,
    update_coefficients,
)
from sketch.realized import Realized
from sketch.sequences import Role, StepSequences

# ----------------------------------------------------------------------------- fixtures


def make_step(
    rng: np.random.Generator,
    sizes: list[int],
    entropy_sizes: list[int] | None = None,
    dim: int = 6,
) -> tuple[StepSequences, np.ndarray]:
    """A random step: ``sizes[p]`` update rows and ``entropy_sizes[p]`` entropy rows per prompt,
    interleaved (not grouped) so that nothing relies on the row order; K = W W^T."""
    rows: list[dict[str, object]] = []
    for p, g in enumerate(sizes):
        for k in range(g):
            rows.append({"prompt_id": f"p{p}", "role": "update", "k": k})
        for k in range((entropy_sizes or [0] * len(sizes))[p]):
            rows.append({"prompt_id": f"p{p}", "role": "entropy", "k": k})
    order = rng.permutation(len(rows))
    rows = [rows[i] for i in order]
    n = len(rows)
    records = [
        {
            "id": f"s{i}",
            "prompt_id": r["prompt_id"],
            "role": r["role"],
            "logprob": float(-rng.uniform(5.0, 40.0)),
            "advantage": float(rng.normal()),
            "num_tokens": int(rng.integers(3, 30)),
        }
        for i, r in enumerate(rows)
    ]
    W = rng.normal(size=(n, dim))
    return StepSequences.from_records(records), W @ W.T


def ref_c(seqs: StepSequences, normalization: str, max_length: int | None = None) -> np.ndarray:
    """math.md §2 by loops."""
    upd = [i for i in range(seqs.n) if seqs.role[i] is Role.UPDATE]
    prompts = sorted({seqs.prompt_ids[i] for i in upd})
    B = len(prompts)
    G = {p: sum(1 for i in upd if seqs.prompt_ids[i] == p) for p in prompts}
    Lmax = {p: max(seqs.num_tokens[i] for i in upd if seqs.prompt_ids[i] == p) for p in prompts}
    c = np.zeros(seqs.n)
    for i in upd:
        p = seqs.prompt_ids[i]
        if normalization == "dr_grpo":
            L = max_length if max_length is not None else Lmax[p]
            lam = 1.0 / (B * G[p] * L)
        elif normalization == "grpo":
            lam = 1.0 / (B * G[p] * seqs.num_tokens[i])
        else:
            lam = 1.0 / (B * G[p])
        if not math.isnan(seqs.weight[i]):
            lam = seqs.weight[i]
        c[i] = lam * seqs.advantage[i]
    return c


def ref_h(seqs: StepSequences, E: list[int]) -> np.ndarray:
    """math.md §3 by loops, leave-one-out baseline."""
    prompts = {seqs.prompt_ids[j] for j in E}
    B = len(prompts)
    h = np.zeros(seqs.n)
    for j in E:
        p = seqs.prompt_ids[j]
        others = [k for k in E if seqs.prompt_ids[k] == p and k != j]
        M = len(others) + 1
        base = np.mean([seqs.logprob[k] for k in others]) if others else 0.0
        h[j] = -(seqs.logprob[j] - base) / (B * M)
    return h


def ref_sets(seqs: StepSequences, estimator: str) -> tuple[list[int], list[int]]:
    upd = [i for i in range(seqs.n) if seqs.role[i] is Role.UPDATE]
    ent = [i for i in range(seqs.n) if seqs.role[i] is Role.ENTROPY]
    return (ent if estimator == "independent" else upd), upd


def ref_weight(seqs: StepSequences, E: list[int], estimator: str, j: int, i: int) -> float:
    """Pair weight: u_statistic drops j = i and uses M/(M-1) on same-prompt pairs."""
    if estimator != "u_statistic":
        return 1.0
    if j == i:
        return 0.0
    p = seqs.prompt_ids[j]
    if seqs.prompt_ids[i] != p:
        return 1.0
    M = sum(1 for k in E if seqs.prompt_ids[k] == p)
    return M / (M - 1)


def ref_all(
    K: np.ndarray,
    seqs: StepSequences,
    eta: float,
    estimator: str,
    norm: str,
    cross: np.ndarray | None = None,
) -> dict:
    """dH1, a_i, b_j, pair types, quadrants, dH1_diag by double loops; ``cross[j, i] = <w_j,
    u_i>`` (default ``K(j, i) c_i``)."""
    E, U = ref_sets(seqs, estimator)
    c = ref_c(seqs, norm)
    h = ref_h(seqs, E)
    C = K * c[None, :] if cross is None else cross
    total = 0.0
    a: defaultdict[int, float] = defaultdict(float)
    b: defaultdict[int, float] = defaultdict(float)
    parts = {"diagonal": 0.0, "same_prompt": 0.0, "cross_prompt": 0.0}
    for j in E:
        for i in U:
            term = eta * h[j] * C[j, i] * ref_weight(seqs, E, estimator, j, i)
            total += term
            a[i] += term
            b[j] += term
            if j == i:
                parts["diagonal"] += term
            elif seqs.prompt_ids[j] == seqs.prompt_ids[i]:
                parts["same_prompt"] += term
            else:
                parts["cross_prompt"] += term
    hU = ref_h(seqs, U)
    diag = sum(eta * hU[i] * C[i, i] for i in U)
    quads: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])
    for i in U:
        p = seqs.prompt_ids[i]
        mean = np.mean([seqs.logprob[k] for k in U if seqs.prompt_ids[k] == p])
        key = (
            "positive" if seqs.advantage[i] > 0 else "negative",
            "above_mean" if seqs.logprob[i] > mean else "below_mean",
        )
        quads[key][0] += a[i]
        quads[key][1] += 1
    return {"total": total, "a": a, "b": b, "parts": parts, "diag": diag, "quads": quads, "h": h}


# ----------------------------------------------------------------------------- normalisations


def test_normalisations_by_hand() -> None:
    # Two prompts; prompt a has 2 update rows (lengths 4, 10), prompt b one (length 5) plus
    # one entropy row that must not count in B or G_p.
    seqs = StepSequences.from_records(
        [
            {"id": "1", "prompt_id": "a", "logprob": -3, "advantage": 2.0, "num_tokens": 4},
            {"id": "2", "prompt_id": "a", "logprob": -5, "advantage": -1.0, "num_tokens": 10},
            {"id": "3", "prompt_id": "b", "logprob": -4, "advantage": 3.0, "num_tokens": 5},
            {
                "id": "4",
                "prompt_id": "b",
                "logprob": -6,
                "advantage": 7.0,
                "num_tokens": 8,
                "role": "entropy",
            },
        ]
    )
    # dr_grpo: B = 2; L_max(a) = 10, L_max(b) = 5 (the entropy row's 8 does not count).
    np.testing.assert_allclose(
        update_coefficients(seqs, "dr_grpo"),
        [2.0 / (2 * 2 * 10), -1.0 / (2 * 2 * 10), 3.0 / (2 * 1 * 5), 0.0],
    )
    np.testing.assert_allclose(
        update_coefficients(seqs, "dr_grpo", max_length=20),
        [2.0 / (2 * 2 * 20), -1.0 / (2 * 2 * 20), 3.0 / (2 * 1 * 20), 0.0],
    )
    np.testing.assert_allclose(
        update_coefficients(seqs, "grpo"),
        [2.0 / (2 * 2 * 4), -1.0 / (2 * 2 * 10), 3.0 / (2 * 1 * 5), 0.0],
    )
    np.testing.assert_allclose(
        update_coefficients(seqs, "sequence_mean"), [2.0 / 4, -1.0 / 4, 3.0 / 2, 0.0]
    )


def test_weight_override_and_random_normalisations() -> None:
    rng = np.random.default_rng(1)
    seqs, _ = make_step(rng, [3, 1, 4], [2, 0, 1])
    weights = np.full(seqs.n, np.nan)
    weights[[0, 3]] = [0.25, 3.0]
    seqs = StepSequences(
        ids=seqs.ids,
        prompt_ids=seqs.prompt_ids,
        logprob=seqs.logprob,
        advantage=seqs.advantage,
        num_tokens=seqs.num_tokens,
        role=seqs.role,
        weight=weights,
    )
    for norm in ("dr_grpo", "grpo", "sequence_mean"):
        np.testing.assert_allclose(update_coefficients(seqs, norm), ref_c(seqs, norm), rtol=1e-13)
    np.testing.assert_allclose(
        update_coefficients(seqs, "dr_grpo", max_length=64),
        ref_c(seqs, "dr_grpo", max_length=64),
        rtol=1e-13,
    )
    upd = seqs.update_mask
    for i in (0, 3):
        if upd[i]:
            assert update_coefficients(seqs, "grpo")[i] == pytest.approx(
                weights[i] * seqs.advantage[i]
            )


def test_zero_length_is_rejected_for_length_normalisations() -> None:
    seqs = StepSequences.from_records(
        [{"id": "1", "prompt_id": "a", "logprob": -1, "advantage": 1.0, "num_tokens": 0}]
    )
    with pytest.raises(ValueError):
        update_coefficients(seqs, "grpo")
    with pytest.raises(ValueError):
        update_coefficients(seqs, "dr_grpo")
    assert update_coefficients(seqs, "sequence_mean")[0] == 1.0


# ----------------------------------------------------------------------------- baseline


def test_leave_one_out_baseline_by_hand() -> None:
    # Prompt a: S = -1, -2, -6 (M = 3); prompt b: a single row (M = 1, baseline 0).  B = 2.
    seqs = StepSequences.from_records(
        [
            {"id": "1", "prompt_id": "a", "logprob": -1, "advantage": 0, "num_tokens": 1},
            {"id": "2", "prompt_id": "a", "logprob": -2, "advantage": 0, "num_tokens": 1},
            {"id": "3", "prompt_id": "a", "logprob": -6, "advantage": 0, "num_tokens": 1},
            {"id": "4", "prompt_id": "b", "logprob": -5, "advantage": 0, "num_tokens": 1},
        ]
    )
    h = entropy_coefficients(seqs, np.ones(4, dtype=bool))
    expected = [
        -(-1 - (-2 - 6) / 2) / (2 * 3),
        -(-2 - (-1 - 6) / 2) / (2 * 3),
        -(-6 - (-1 - 2) / 2) / (2 * 3),
        -(-5 - 0.0) / (2 * 1),
    ]
    np.testing.assert_allclose(h, expected, rtol=1e-14)
    # Masking out row 2: prompt a now has M = 2.
    mask = np.array([True, True, False, True])
    h2 = entropy_coefficients(seqs, mask)
    np.testing.assert_allclose(h2, [-(-1 + 2) / 4, -(-2 + 1) / 4, 0.0, 5 / 2], rtol=1e-14)


# ----------------------------------------------------------------------------- estimator algebra


@pytest.mark.parametrize("estimator", ["independent", "u_statistic", "plugin"])
@pytest.mark.parametrize("norm", ["dr_grpo", "grpo", "sequence_mean"])
def test_estimators_against_double_loops(estimator: str, norm: str) -> None:
    rng = np.random.default_rng(hash((estimator, norm)) % 2**32)
    # Includes a prompt with a single update row and a prompt with a single entropy row.
    seqs, K = make_step(rng, [4, 1, 3, 2], [2, 1, 3, 0])
    eta = 0.37
    ref = ref_all(K, seqs, eta, estimator, norm)
    out = entropy_change(K, seqs, eta, estimator=estimator, normalization=norm)
    assert out.estimator is Estimator(estimator)
    assert out.delta_h1 == pytest.approx(ref["total"], rel=1e-11, abs=1e-15)
    assert first_order_change(K, seqs, eta, estimator, norm) == pytest.approx(
        ref["total"], rel=1e-11
    )
    parts = out.decomposition.pair_types
    for name, value in ref["parts"].items():
        assert parts[name].value == pytest.approx(value, rel=1e-10, abs=1e-14)
        assert parts[name].share == pytest.approx(value / ref["total"], rel=1e-9, abs=1e-12)
    if estimator != "plugin":
        assert parts["diagonal"].value == 0.0
    assert sum(p.value for p in parts.values()) == pytest.approx(out.delta_h1, rel=1e-11)

    by_id = {s.id: s for s in out.per_sequence}
    a_sum = b_sum = 0.0
    E, U = ref_sets(seqs, estimator)
    for idx, sid in enumerate(seqs.ids):
        row = by_id[sid]
        if idx in U:
            assert row.a is not None
            assert row.a == pytest.approx(ref["a"][idx], rel=1e-10, abs=1e-15)
            a_sum += row.a
        else:
            assert row.a is None
        if idx in E:
            assert row.b is not None
            assert row.b == pytest.approx(ref["b"][idx], rel=1e-10, abs=1e-15)
            assert row.h == pytest.approx(ref["h"][idx], rel=1e-12)
            b_sum += row.b
        else:
            assert row.b is None
    assert a_sum == pytest.approx(out.delta_h1, rel=1e-11)
    assert b_sum == pytest.approx(out.delta_h1, rel=1e-11)

    quads = {(q.advantage, q.logprob): q for q in out.decomposition.quadrants}
    assert len(quads) == 4
    assert sum(q.count for q in quads.values()) == len(U)
    assert sum(q.sum for q in quads.values()) == pytest.approx(out.delta_h1, rel=1e-10)
    for key, q in quads.items():
        ref_sum, ref_count = ref["quads"].get(key, [0.0, 0])
        assert q.count == ref_count
        assert q.sum == pytest.approx(ref_sum, rel=1e-10, abs=1e-15)

    assert out.delta_h1_diag == pytest.approx(ref["diag"], rel=1e-11)


def test_plugin_diagonal_equals_dh1_diag_and_ustat_relation() -> None:
    rng = np.random.default_rng(7)
    seqs, K = make_step(rng, [3, 3, 3])
    eta = 1.3
    plug = entropy_change(K, seqs, eta, estimator="plugin")
    ustat = entropy_change(K, seqs, eta, estimator="u_statistic")
    assert plug.decomposition.pair_types["diagonal"].value == pytest.approx(plug.delta_h1_diag)
    # With M_p = 3 everywhere: ustat same-prompt = (3/2) * plugin same-prompt; cross equal.
    pt_p, pt_u = plug.decomposition.pair_types, ustat.decomposition.pair_types
    assert pt_u["cross_prompt"].value == pytest.approx(pt_p["cross_prompt"].value, rel=1e-12)
    assert pt_u["same_prompt"].value == pytest.approx(1.5 * pt_p["same_prompt"].value, rel=1e-12)


def test_applied_update_groups_and_sketch_error() -> None:
    rng = np.random.default_rng(3)
    n_dim = 9
    seqs, _ = make_step(rng, [3, 2, 4], [2, 2, 2], dim=n_dim)
    W = rng.normal(size=(seqs.n, n_dim))
    K = W @ W.T
    u = rng.normal(size=n_dim)
    k_applied = W @ u
    groups = {"attn": W[:, :4] @ W[:, :4].T, "mlp": W[:, 4:] @ W[:, 4:].T}
    eta = 0.05
    for est in ("independent", "u_statistic", "plugin"):
        out = entropy_change(
            K,
            seqs,
            eta,
            estimator=est,
            k_applied=k_applied,
            group_kernels=groups,
            sketch_variance_factor=1 / 64,
        )
        E, _ = ref_sets(seqs, est)
        h = ref_h(seqs, E)
        c = ref_c(seqs, "dr_grpo")
        # dH1_applied = sum_j h_j <w_j, u> = <grad_hat H, u>, no eta.
        assert out.delta_h1_applied == pytest.approx(float((h @ W) @ u), rel=1e-12)
        assert out.decomposition.groups is not None
        assert set(out.decomposition.groups) == {"attn", "mlp"}
        assert sum(out.decomposition.groups.values()) == pytest.approx(out.delta_h1, rel=1e-10)
        for name, Kg in groups.items():
            ref_g = ref_all(Kg, seqs, eta, est, "dr_grpo")["total"]
            assert out.decomposition.groups[name] == pytest.approx(ref_g, rel=1e-10)
        gu = h @ W  # grad_hat H
        gv = c @ W  # g_hat
        # dH1 / eta = sum_{j,i} h_j weight(j, i) c_i <w_j, w_i> = tr(A) for A = sum h_j
        # weight c_i w_j w_i^T; a Gaussian sketch's variance of it is (tr(A A^T) + tr(A^2)) / k
        # (with every weight 1, |grad_hat H|^2 |g_hat|^2 + <grad_hat H, g_hat>^2)
        M = np.array(
            [[ref_weight(seqs, E, est, j, i) for i in range(seqs.n)] for j in range(seqs.n)]
        )
        A = W.T @ (h[:, None] * M * c[None, :]) @ W
        expected = eta * math.sqrt((np.trace(A @ A.T) + np.trace(A @ A)) / 64)
        if est != "u_statistic":
            every_pair = eta * math.sqrt((gu @ gu * (gv @ gv) + (gu @ gv) ** 2) / 64)
            assert expected == pytest.approx(every_pair, rel=1e-12)
        assert out.se_sketch == pytest.approx(expected, rel=1e-12)
        assert out.step_norm == pytest.approx(eta * np.linalg.norm(gv), rel=1e-12)
    exact = entropy_change(K, seqs, eta)
    assert exact.se_sketch == 0.0
    assert exact.delta_h1_applied is None and exact.decomposition.groups is None


def test_se_sampling_by_hand() -> None:
    """``se_sampling = sqrt(sum_p M_p var_j(x_j))`` over each entropy row's part of the error,
    ``x_j = b_j - mean_{k in p} eta h_k sum_i W(j, i) K(k, i) c_i`` (its pairs' estimate less
    the prompt's rows paired as ``j`` is), by loops over explicit pair weights ``W``; in
    ``u_statistic`` and ``cross_fit`` rows of one prompt pair with different update rows, and
    ``x_j`` differs from ``b_j`` by more than a per-prompt constant."""
    rng = np.random.default_rng(5)
    seqs, K = make_step(rng, [3, 2, 4], [4, 1, 3])
    eta = 0.2
    c = update_coefficients(seqs, "dr_grpo")
    prompt = np.array(seqs.prompt_ids)
    for est in ("independent", "u_statistic", "plugin", "cross_fit"):
        out = entropy_change(K, seqs, eta, estimator=est)
        h = np.array([0.0 if s.h is None else s.h for s in out.per_sequence])
        ent = np.array([s.b is not None for s in out.per_sequence])
        upd = seqs.update_mask
        halves = cross_fit_halves(seqs.ids, seqs.prompt_ids, upd)
        W = np.zeros((seqs.n, seqs.n))
        for j in np.flatnonzero(ent):
            m = int((ent & (prompt == prompt[j])).sum())
            for i in np.flatnonzero(upd):
                if est == "u_statistic":
                    same = prompt[i] == prompt[j]
                    W[j, i] = 0.0 if i == j else (m / (m - 1) if same else 1.0)
                elif est == "cross_fit":
                    W[j, i] = float(halves[i] != halves[j])
                else:
                    W[j, i] = 1.0
        C = K * c[None, :]
        b = eta * h * (W * C).sum(axis=1)
        np.testing.assert_allclose(b[ent], [s.b for s in out.per_sequence if s.b is not None])
        by_prompt: dict[str, list[float]] = defaultdict(list)
        for j in np.flatnonzero(ent):
            mates = np.flatnonzero(ent & (prompt == prompt[j]))
            centre = np.mean([eta * h[k] * (W[j] * C[k]).sum() for k in mates])
            by_prompt[prompt[j]].append(b[j] - centre)
        var = sum(len(v) * np.var(v, ddof=1) for v in by_prompt.values() if len(v) >= 2)
        assert out.se_sampling == pytest.approx(math.sqrt(var), rel=1e-10), est


def test_cov_baseline_by_hand() -> None:
    rng = np.random.default_rng(11)
    seqs, K = make_step(rng, [4, 1, 3], [2, 2, 2])
    upd = seqs.update_mask
    prompts = sorted({seqs.prompt_ids[i] for i in range(seqs.n) if upd[i]})
    total = 0.0
    for p in prompts:
        rows = [i for i in range(seqs.n) if upd[i] and seqs.prompt_ids[i] == p]
        if len(rows) >= 2:
            total += np.cov(seqs.logprob[rows], seqs.advantage[rows], ddof=1)[0, 1]
    out = entropy_change(K, seqs, 1.0)
    assert out.cov_baseline == pytest.approx(-total / len(prompts), rel=1e-12)
    # Identity kernel, sequence_mean, single prompt: plugin dH1 relates to the covariance.
    # (1/M) sum_i h_i c_i with h_i = -(S_i - Sbar_{-i})/M = -(S_i - Sbar) / (M - 1).
    one = StepSequences.from_records(
        [
            {"id": str(i), "prompt_id": "a", "logprob": s, "advantage": a, "num_tokens": 1}
            for i, (s, a) in enumerate([(-1.0, 1.0), (-3.0, -0.5), (-2.0, 0.2), (-7.0, -0.7)])
        ]
    )
    res = entropy_change(np.eye(4), one, 1.0, estimator="plugin", normalization="sequence_mean")
    S, A = one.logprob, one.advantage
    assert res.delta_h1 == pytest.approx(-np.sum((S - S.mean()) * A) / (3 * 4), rel=1e-12)
    assert res.cov_baseline == pytest.approx(-np.cov(S, A, ddof=1)[0, 1], rel=1e-12)


# ----------------------------------------------------------------------------- edge cases


def test_default_estimator_and_errors() -> None:
    rng = np.random.default_rng(2)
    seqs, K = make_step(rng, [2, 2], [1, 1])
    assert default_estimator(seqs) is Estimator.INDEPENDENT
    assert entropy_change(K, seqs, 1.0).estimator is Estimator.INDEPENDENT
    only_upd, K2 = make_step(rng, [2, 2])
    assert default_estimator(only_upd) is Estimator.U_STATISTIC
    with pytest.raises(ValueError, match="entropy-role"):
        entropy_change(K2, only_upd, 1.0, estimator="independent")
    only_ent = StepSequences.from_records(
        [
            {"id": "1", "prompt_id": "a", "logprob": -1, "advantage": 1, "num_tokens": 1},
        ]
    )
    only_ent = StepSequences(
        ids=only_ent.ids,
        prompt_ids=only_ent.prompt_ids,
        logprob=only_ent.logprob,
        advantage=only_ent.advantage,
        num_tokens=only_ent.num_tokens,
        role=[Role.ENTROPY],
    )
    with pytest.raises(ValueError, match="update-role"):
        entropy_change(np.eye(1), only_ent, 1.0)
    with pytest.raises(ValueError):
        entropy_change(np.eye(3), seqs, 1.0)  # wrong kernel size
    with pytest.raises(ValueError):
        entropy_change(K, seqs, float("nan"))
    bad = K.copy()
    bad[0, 0] = np.inf
    with pytest.raises(ValueError):
        entropy_change(bad, seqs, 1.0)


def test_zero_kernel_single_prompt_singletons() -> None:
    rng = np.random.default_rng(4)
    seqs, K = make_step(rng, [3])
    out = entropy_change(np.zeros_like(K), seqs, 1.0)
    assert out.delta_h1 == 0.0 and out.se_sampling == 0.0 and out.se_sketch == 0.0
    assert all(p.share is None for p in out.decomposition.pair_types.values())
    assert out.noise_scale.b_simple is None  # a single prompt: no noise scale
    assert out.ratio is None and out.realized is None
    # Every prompt with one update row: u_statistic has no pairs within prompts.
    single, K1 = make_step(rng, [1, 1, 1])
    res = entropy_change(K1, single, 1.0, estimator="u_statistic")
    assert res.decomposition.pair_types["same_prompt"].value == 0.0
    assert res.delta_h1 == pytest.approx(res.decomposition.pair_types["cross_prompt"].value)
    # h_j with M_p = 1 uses baseline 0: h_j = -S_j / B.
    h_values = np.array([s.h for s in res.per_sequence], dtype=np.float64)
    np.testing.assert_allclose(h_values, -single.logprob / 3)


def test_realized_precedence() -> None:
    rng = np.random.default_rng(12)
    seqs, K = make_step(rng, [3, 3])
    seqs = StepSequences(
        ids=seqs.ids,
        prompt_ids=seqs.prompt_ids,
        logprob=seqs.logprob,
        advantage=seqs.advantage,
        num_tokens=seqs.num_tokens,
        role=seqs.role,
        logprob_after=seqs.logprob - 0.1,
    )
    auto = entropy_change(K, seqs, 1.0)
    assert auto.realized is not None and auto.realized.source == "logprob_after"
    posted = entropy_change(K, seqs, 1.0, entropy_before=10.0, entropy_after=9.5)
    assert posted.realized is not None and posted.realized.delta_h == pytest.approx(-0.5)
    assert posted.ratio == pytest.approx(-0.5 / posted.delta_h1)
    given = entropy_change(K, seqs, 1.0, realized=0.25, entropy_before=1.0, entropy_after=2.0)
    assert given.realized == Realized(delta_h=0.25, source="given")


# ----------------------------------------------------------------------------- unbiasedness


def test_unbiasedness_on_gaussian_score_model() -> None:
    """Synthetic model with a known expectation (math.md §4 "property" column).

    Per prompt p: w ~ N(0, I_d) (so E[w] = 0 like a score), S = s0_p + <beta_p, w> + noise,
    A = <alpha_p, w> + noise, independent across samples.  With sequence_mean weights,
    E[grad_hat H] = -(1/B) sum_p beta_p and E[g_hat] = (1/B) sum_p alpha_p, so the target is
    eta <-(1/B) sum beta, (1/B) sum alpha>.  u_statistic and independent are unbiased; plugin
    adds the diagonal terms, whose expectation is -(1/B^2) sum_p (d + 1)/M <alpha_p, beta_p>
    (E[<beta,w><alpha,w>|w|^2] = (d + 2) <alpha, beta>, minus the 1/M share of the unbiased
    same-prompt part that the diagonal replaces).
    """
    rng = np.random.default_rng(2024)
    B, M, d, reps, eta = 2, 3, 3, 1500, 1.0
    # Same-prompt dominated target: alpha_p = beta_p, the two prompts orthogonal.
    alpha = np.array([[1.2, 0.0, 0.0], [0.0, 0.9, 0.4]])
    beta = alpha.copy()
    s0 = np.array([-20.0, -35.0])
    target = eta * float(-(beta.sum(0) / B) @ (alpha.sum(0) / B))
    plugin_bias = -eta * (d + 1) / M * float(np.sum(alpha * beta)) / B**2
    pidx = np.repeat(np.arange(B), M)
    ids = [f"u{i}" for i in range(B * M)] + [f"e{i}" for i in range(B * M)]
    pids = [f"p{p}" for p in pidx] * 2
    roles = [Role.UPDATE] * (B * M) + [Role.ENTROPY] * (B * M)
    vals: dict[str, list[float]] = {"u_statistic": [], "plugin": [], "independent": []}
    for _ in range(reps):
        W = rng.normal(size=(2 * B * M, d))
        p2 = np.concatenate([pidx, pidx])
        S = s0[p2] + np.sum(beta[p2] * W, 1) + 0.3 * rng.normal(size=2 * B * M)
        A = np.sum(alpha[p2] * W, 1) + 0.3 * rng.normal(size=2 * B * M)
        seqs = StepSequences(
            ids=ids,
            prompt_ids=pids,
            logprob=S,
            advantage=A,
            num_tokens=np.ones(2 * B * M, dtype=np.int64),
            role=roles,
        )
        K = W @ W.T
        for est in vals:
            vals[est].append(first_order_change(K, seqs, eta, est, "sequence_mean"))
    stats = {k: (np.mean(v), np.std(v, ddof=1) / math.sqrt(reps)) for k, v in vals.items()}
    for est in ("u_statistic", "independent"):
        mean, se = stats[est]
        assert abs(mean - target) < 4 * se, (est, mean, target, se)
    mean, se = stats["plugin"]
    assert abs(mean - (target + plugin_bias)) < 4 * se, (mean, target + plugin_bias, se)
    assert abs(mean - target) > 4 * se  # the bias is real and detected
    # The plain j != i sum with 1/M^2 weights (no M/(M-1) factor) would be biased here by
    # -(1/M) of the same-prompt part, i.e. target/M; check the test can tell the difference.
    mean_u, se_u = stats["u_statistic"]
    assert abs(mean_u - target * (M - 1) / M) > 4 * se_u


# ----------------------------------------------------------------------------- update rows


def factor(K: np.ndarray) -> np.ndarray:
    """Rows ``Y`` with ``Y Y^T = K`` (to rounding), from the eigen-decomposition."""
    lam, V = np.linalg.eigh(K)
    return V * np.sqrt(np.clip(lam, 0.0, None))[None, :]


@pytest.mark.parametrize("estimator", ["independent", "u_statistic", "plugin"])
def test_update_rows_against_double_loops(estimator: str) -> None:
    """Arbitrary update rows ``u_i`` (math.md §4 "Update rows"): every number against the
    double loops over ``C(j, i) = <w_j, u_i>``; rows ``u_i = c_i w_i`` give exactly the answer
    of the coefficient path; a row sent for an entropy-role sequence is ignored."""
    rng = np.random.default_rng(17)
    seqs, K = make_step(rng, [3, 4, 2], [3, 2, 4])
    Y = factor(K)
    c = ref_c(seqs, "dr_grpo")
    upd = seqs.update_mask
    eta = 0.3
    plain = entropy_change(K, seqs, eta, estimator=estimator)
    same = entropy_change(
        K, seqs, eta, estimator=estimator, update=row_updates(Y, c, c[:, None] * Y, upd)
    )
    for field in ("delta_h1", "se_sampling", "delta_h1_diag", "step_norm"):
        assert getattr(same, field) == pytest.approx(getattr(plain, field), rel=1e-9), field
    assert same.noise_scale.tr_sigma == pytest.approx(plain.noise_scale.tr_sigma, rel=1e-9)
    for x, y in zip(same.per_sequence, plain.per_sequence, strict=True):
        for mine, theirs in ((x.a, y.a), (x.b, y.b)):
            assert mine == (None if theirs is None else pytest.approx(theirs, abs=1e-12))

    U = rng.normal(size=Y.shape)
    has_row = upd | (rng.random(seqs.n) < 0.5)  # some entropy rows "send" one too: ignored
    rows = row_updates(Y, c, U, has_row)
    out = entropy_change(K, seqs, eta, estimator=estimator, update=rows)
    V = np.where(upd[:, None], U, 0.0)
    ref = ref_all(K, seqs, eta, estimator, "dr_grpo", cross=Y @ V.T)
    assert out.delta_h1 == pytest.approx(ref["total"], rel=1e-9)
    assert out.delta_h1_diag == pytest.approx(ref["diag"], rel=1e-9)
    for name, value in ref["parts"].items():
        assert out.decomposition.pair_types[name].value == pytest.approx(value, abs=1e-12)
    for i, s in enumerate(out.per_sequence):
        if s.a is not None:
            assert s.a == pytest.approx(ref["a"][i], abs=1e-12)
        if s.b is not None:
            assert s.b == pytest.approx(ref["b"][i], abs=1e-12)
    g = V.sum(axis=0)
    assert out.step_norm == pytest.approx(eta * float(np.linalg.norm(g)), rel=1e-9)
    assert first_order_change(K, seqs, eta, estimator, update=rows) == pytest.approx(out.delta_h1)
    # per-group cross kernels add up to the whole
    half = Y.shape[1] // 2
    groups = {
        "a": row_updates(Y[:, :half], c, U[:, :half], has_row),
        "b": row_updates(Y[:, half:], c, U[:, half:], has_row),
    }
    grouped = entropy_change(K, seqs, eta, estimator=estimator, update=rows, group_kernels=groups)
    assert grouped.decomposition.groups is not None
    assert sum(grouped.decomposition.groups.values()) == pytest.approx(out.delta_h1, rel=1e-9)


@pytest.mark.parametrize("estimator", ["independent", "u_statistic", "plugin"])
def test_pair_weights_sum_to_dh1_and_drive_the_cell_error_bar(estimator: str) -> None:
    """``sum pair_weights * C = dH1 / eta`` for every estimator (the matrix form of
    ``pair_products``), and with ``sketch_cells`` the sketch error bar is
    ``|eta| bilinear_error_bar(Y, V, pair_weights)`` of those rows."""
    rng = np.random.default_rng(5)
    seqs, K = make_step(rng, [3, 4, 2], [3, 2, 4])
    Y = factor(K)
    c = ref_c(seqs, "dr_grpo")
    est = Estimator(estimator)
    ent, _, _ = estimator_sets(seqs, est)
    h = entropy_coefficients(seqs, ent)
    U = rng.normal(size=Y.shape)
    upd = seqs.update_mask
    V = np.where(upd[:, None], U, 0.0)
    weights = pair_weights(h, seqs, ent, est)
    eta = 0.3
    out = entropy_change(K, seqs, eta, estimator=est, update=row_updates(Y, c, U, upd))
    assert eta * float(np.sum(weights * (Y @ V.T))) == pytest.approx(out.delta_h1, rel=1e-9)
    pad = 24 - Y.shape[1]  # 4 x 6 cells
    cells = np.concatenate([Y, rng.normal(size=(seqs.n, pad))], axis=1)
    Vc = np.concatenate([V, np.zeros((seqs.n, pad))], axis=1)
    with_cells = entropy_change(
        K,
        seqs,
        eta,
        estimator=est,
        update=row_updates(Y, c, U, upd),
        sketch_cells=SketchCells(Y=cells, V=Vc, shape=(4, 6)),
    )
    expected = eta * bilinear_error_bar(cells, Vc, weights, (4, 6))
    assert with_cells.se_sketch == pytest.approx(expected, rel=1e-12)
    assert with_cells.delta_h1 == out.delta_h1
