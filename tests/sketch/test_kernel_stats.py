"""Known-answer tests of the kernel statistics (math.md §5): kernel, spectrum, blocks, noise."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sketch.blocks import block_statistics
from sketch.kernel import cosine, diagonal, kernel_from_rows
from sketch.noise_scale import noise_scale, prompt_gram
from sketch.spectrum import spectrum

# ----------------------------------------------------------------------------- kernel


def test_kernel_from_rows_accumulates_in_float64() -> None:
    rng = np.random.default_rng(0)
    Y32 = torch.from_numpy(rng.normal(size=(5, 4000)).astype(np.float32))
    K = kernel_from_rows(Y32)
    assert K.dtype == np.float64 and K.shape == (5, 5)
    Y64 = Y32.double().numpy()
    np.testing.assert_allclose(K, Y64 @ Y64.T, rtol=1e-13)
    assert np.array_equal(K, K.T)
    np.testing.assert_allclose(kernel_from_rows(Y64), K, rtol=1e-13)
    with pytest.raises(ValueError):
        kernel_from_rows(np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError):
        kernel_from_rows(np.ones(3))


def test_cosine_and_diagonal_with_zero_row() -> None:
    Y = np.array([[3.0, 4.0], [0.0, 0.0], [-6.0, -8.0], [4.0, -3.0]])
    K = kernel_from_rows(Y)
    np.testing.assert_allclose(diagonal(K), [25.0, 0.0, 100.0, 25.0])
    rho = cosine(K)
    expected = np.array(
        [[1, 0, -1, 0], [0, 0, 0, 0], [-1, 0, 1, 0], [0, 0, 0, 1]], dtype=np.float64
    )
    np.testing.assert_allclose(rho, expected, atol=1e-15)


# ----------------------------------------------------------------------------- spectrum


def test_spectrum_identity() -> None:
    s = spectrum(K=np.eye(5))
    np.testing.assert_allclose(s.eigenvalues, np.ones(5))
    assert s.trace == 5.0
    assert s.effective_rank == pytest.approx(5.0)
    assert s.participation_ratio == pytest.approx(5.0)


def test_spectrum_rank_one_and_top_vector() -> None:
    v = np.array([1.0, -2.0, 2.0, 0.0])  # |v|^2 = 9
    s = spectrum(K=np.outer(v, v), top=1)
    np.testing.assert_allclose(s.eigenvalues, [9.0, 0.0, 0.0, 0.0], atol=1e-12)
    assert s.trace == pytest.approx(9.0)
    assert s.effective_rank == pytest.approx(1.0)
    assert s.participation_ratio == pytest.approx(1.0)
    assert s.eigenvectors is not None and s.eigenvectors.shape == (1, 4)
    # Sign convention: the largest-magnitude entry is positive (|-2| and |2| tie up to
    # roundoff, so only that property and the magnitudes are checked).
    np.testing.assert_allclose(np.abs(s.eigenvectors[0]), np.abs(v) / 3.0, atol=1e-12)
    assert s.eigenvectors[0][np.argmax(np.abs(s.eigenvectors[0]))] > 0


def test_spectrum_block_diagonal_closed_form() -> None:
    # Blocks: 3 x 3 all-ones (eigenvalues 3, 0, 0) and 2 x 2 [[2, 1], [1, 2]] (3, 1).
    K = np.zeros((5, 5))
    K[:3, :3] = 1.0
    K[3:, 3:] = [[2.0, 1.0], [1.0, 2.0]]
    s = spectrum(K=K)
    np.testing.assert_allclose(s.eigenvalues, [3, 3, 1, 0, 0], atol=1e-12)
    q = np.array([3, 3, 1]) / 7
    assert s.effective_rank == pytest.approx(math.exp(-np.sum(q * np.log(q))))
    assert s.participation_ratio == pytest.approx(49 / 19)
    assert s.trace == pytest.approx(7.0)


def test_spectrum_zero_kernel_and_not_psd() -> None:
    s = spectrum(K=np.zeros((3, 3)))
    assert s.trace == 0.0 and s.effective_rank == 0.0 and s.participation_ratio == 0.0
    with pytest.raises(ValueError, match="positive semidefinite"):
        spectrum(K=np.diag([1.0, -0.5]))
    with pytest.raises(ValueError):
        spectrum()


@pytest.mark.parametrize("k", [3, 12])
def test_svd_path_equals_eigh_path(k: int) -> None:
    rng = np.random.default_rng(k)
    n = 7
    Y = rng.normal(size=(n, k)).astype(np.float32)
    from_rows = spectrum(Y=torch.from_numpy(Y), top=3)
    K = kernel_from_rows(Y)
    from_kernel = spectrum(K=K, top=3)
    assert from_rows.eigenvalues.shape == (n,)
    np.testing.assert_allclose(from_rows.eigenvalues, from_kernel.eigenvalues, atol=1e-10)
    if k < n:
        assert np.all(from_rows.eigenvalues[k:] == 0.0)  # exact zeros past the rank
    assert from_rows.trace == pytest.approx(from_kernel.trace, rel=1e-12)
    assert from_rows.effective_rank == pytest.approx(from_kernel.effective_rank, rel=1e-9)
    assert from_rows.participation_ratio == pytest.approx(from_kernel.participation_ratio, rel=1e-9)
    assert from_rows.eigenvectors is not None and from_kernel.eigenvectors is not None
    np.testing.assert_allclose(from_rows.eigenvectors, from_kernel.eigenvectors, atol=1e-8)
    # Eigen-equation K v = lambda v.
    for lam, vec in zip(from_rows.eigenvalues[:3], from_rows.eigenvectors, strict=True):
        np.testing.assert_allclose(K @ vec, lam * vec, atol=1e-9)


def test_top_is_capped_at_rank_bound_of_thin_sketch() -> None:
    Y = np.random.default_rng(1).normal(size=(6, 2))
    s = spectrum(Y=Y, top=5)
    assert s.eigenvectors is not None and s.eigenvectors.shape == (2, 6)


# ----------------------------------------------------------------------------- blocks


def test_blocks_known_kernel() -> None:
    # Prompts a, a, b.  Rows: w0 = (1, 0), w1 = (1, 1), w2 = (0, 0) (zero norm).
    Y = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    K = kernel_from_rows(Y)  # [[1, 1, 0], [1, 2, 0], [0, 0, 0]]
    out = block_statistics(K, ["a", "a", "b"])
    total_sq = 1 + 1 + 1 + 4
    r01 = 1 / math.sqrt(2)
    assert out.diagonal.count == 3
    assert out.diagonal.mean_k == pytest.approx(1.0)  # (1 + 2 + 0) / 3
    assert out.diagonal.mean_rho == pytest.approx(2 / 3)  # zero row: rho = 0
    assert out.diagonal.share_frobenius == pytest.approx(5 / total_sq)
    assert out.same_prompt.count == 2  # ordered pairs (0, 1), (1, 0)
    assert out.same_prompt.mean_k == pytest.approx(1.0)
    assert out.same_prompt.mean_rho == pytest.approx(r01)
    assert out.same_prompt.mean_abs_rho == pytest.approx(r01)
    assert out.same_prompt.share_frobenius == pytest.approx(2 / total_sq)
    assert out.cross_prompt.count == 4
    assert out.cross_prompt.mean_k == 0.0 and out.cross_prompt.mean_rho == 0.0
    assert out.cross_prompt.share_frobenius == 0.0
    pm = out.prompt_matrix
    assert pm.prompts == ["a", "b"]
    np.testing.assert_allclose(pm.mean_k[0], [1.0, 0.0])
    assert np.isnan(pm.mean_k[1, 1])  # prompt b has one row: no i != j pair


@pytest.mark.parametrize(
    "prompts",
    [
        ["x", "y", "x", "z", "y", "x"],  # interleaved: block sums permute the rows
        ["x", "x", "x", "y", "y", "z"],  # grouped, as GRPO pushes them: no permutation
    ],
)
def test_blocks_random_against_loops(prompts: list[str]) -> None:
    rng = np.random.default_rng(3)
    Y = rng.normal(size=(6, 4))
    K = kernel_from_rows(Y)
    rho = cosine(K)
    out = block_statistics(K, prompts)
    groups: dict[str, list[tuple[float, float]]] = {"d": [], "s": [], "c": []}
    for i in range(6):
        for j in range(6):
            key = "d" if i == j else ("s" if prompts[i] == prompts[j] else "c")
            groups[key].append((K[i, j], rho[i, j]))
    fro = np.sum(K**2)
    for key, stats in (("d", out.diagonal), ("s", out.same_prompt), ("c", out.cross_prompt)):
        ks = np.array([g[0] for g in groups[key]])
        rs = np.array([g[1] for g in groups[key]])
        assert stats.count == len(ks)
        assert stats.mean_k == pytest.approx(ks.mean())
        assert stats.mean_abs_k == pytest.approx(np.abs(ks).mean())
        assert stats.mean_rho == pytest.approx(rs.mean())
        assert stats.mean_abs_rho == pytest.approx(np.abs(rs).mean())
        assert stats.share_frobenius == pytest.approx(np.sum(ks**2) / fro)
    order = out.prompt_matrix.prompts
    assert order == ["x", "y", "z"]
    for p, pp in enumerate(order):
        for q, qq in enumerate(order):
            vals = [
                K[i, j]
                for i in range(6)
                for j in range(6)
                if prompts[i] == pp and prompts[j] == qq and i != j
            ]
            if vals:
                assert out.prompt_matrix.mean_k[p, q] == pytest.approx(np.mean(vals))


# ----------------------------------------------------------------------------- noise scale


def test_noise_scale_rank_one_closed_form() -> None:
    # Every w_i = v: g_p = B s_p v with s_p = sum_{i in p} c_i, so
    # <g_p, g_q> = B^2 s_p s_q |v|^2, |G|^2 = B^2 |v|^2 sum_{p != q} s_p s_q / (B (B - 1)),
    # tr(Sigma) = B^2 |v|^2 sum_p (s_p - sbar)^2 / (B - 1).
    v2 = 4.0
    K = np.full((5, 5), v2)
    c = np.array([0.5, 0.25, -0.1, 0.3, 0.2])
    prompts = ["a", "a", "b", "c", "c"]
    s = np.array([0.75, -0.1, 0.5])
    B = 3
    g_norm2 = B**2 * v2 * (s.sum() ** 2 - np.sum(s**2)) / (B * (B - 1))
    tr_sigma = B**2 * v2 * np.sum((s - s.mean()) ** 2) / (B - 1)
    out = noise_scale(K, c, prompts)
    assert out.num_prompts == 3
    assert out.g_norm2 == pytest.approx(g_norm2)
    assert out.tr_sigma == pytest.approx(tr_sigma)
    assert out.b_simple == pytest.approx(tr_sigma / g_norm2)


def test_noise_scale_orthogonal_prompts_and_masks() -> None:
    # Identity kernel: prompt gradients are orthogonal, |G|^2 = 0 -> b_simple None.
    c = np.array([1.0, 2.0, -1.0, 3.0])
    out = noise_scale(np.eye(4), c, ["a", "b", "c", "d"])
    assert out.g_norm2 == 0.0 and out.b_simple is None
    # tr(Sigma) = (tr Gm - sum Gm / B) / (B - 1), Gm = B^2 diag(c^2).
    assert out.tr_sigma == pytest.approx(16 * (15 - 15 / 4) / 3)
    # One prompt: nothing estimable.
    single = noise_scale(np.eye(2), np.ones(2), ["a", "a"])
    assert single.b_simple is None and single.tr_sigma is None and single.num_prompts == 1
    # A mask drops rows (entropy rows) and their prompts.
    gram, order = prompt_gram(np.eye(4), c, ["a", "b", "c", "d"], np.array([1, 1, 0, 0], bool))
    assert order == ["a", "b"]
    np.testing.assert_allclose(gram, 4 * np.diag([1.0, 4.0]))


def test_noise_scale_random_against_vectors() -> None:
    rng = np.random.default_rng(8)
    W = rng.normal(size=(7, 5))
    c = rng.normal(size=7)
    prompts = ["a", "b", "a", "c", "b", "c", "d"]
    out = noise_scale(W @ W.T, c, prompts)
    order = ["a", "b", "c", "d"]
    B = 4
    g = np.array([B * sum(c[i] * W[i] for i in range(7) if prompts[i] == p) for p in order])
    g_bar = g.mean(0)
    g_norm2 = sum(g[p] @ g[q] for p in range(B) for q in range(B) if p != q) / (B * (B - 1))
    tr_sigma = sum(np.sum((g[p] - g_bar) ** 2) for p in range(B)) / (B - 1)
    assert out.g_norm2 == pytest.approx(g_norm2)
    assert out.tr_sigma == pytest.approx(tr_sigma)
    np.testing.assert_allclose(g_bar, c @ W, rtol=1e-12)  # g_bar is g_hat
