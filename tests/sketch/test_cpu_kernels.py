"""The numba CPU loops against the torch path they replace: the same sketch matrices bit for
bit and, for CountSketch, the same sketches bit for bit, whatever the shapes, offsets,
dtypes and thread counts."""

from __future__ import annotations

from collections.abc import Iterator

import numba
import numpy as np
import pytest
import torch

from sketch import cpu_kernels
from sketch.countsketch import CountSketch
from sketch.gaussian import GaussianSketch
from sketch.rademacher import RademacherSketch

pytestmark = pytest.mark.skipif(not cpu_kernels.enabled(), reason="numba loops switched off")


@pytest.fixture
def torch_path() -> Iterator[None]:
    cpu_kernels.use_numba(False)
    try:
        yield
    finally:
        cpu_kernels.use_numba(True)


def _both(fn):  # type: ignore[no-untyped-def]
    """``fn()`` with the numba loops, then with the torch path."""
    fast = fn()
    cpu_kernels.use_numba(False)
    try:
        slow = fn()
    finally:
        cpu_kernels.use_numba(True)
    return fast, slow


@pytest.mark.parametrize(
    ("n", "d", "k", "offset", "dtype"),
    [
        (1, 10, 8, 0, torch.float32),
        (7, 5000, 64, 123, torch.float32),  # rows not a multiple of the four-row sweep
        (64, 70_000, 1024, 0, torch.float32),  # threaded (above PARALLEL_MIN_ENTRIES)
        (9, 40_000, 4096, 0, torch.float64),
        (5, 6000, 256, (1 << 32) - 2500, torch.float32),  # straddles a change of key
    ],
)
def test_countsketch_numba_equals_torch(
    n: int, d: int, k: int, offset: int, dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(n * d + k)
    x = (torch.randn(n, d, generator=gen) * torch.rand(n, d, generator=gen).pow(8) * 1e3).to(dtype)
    sketcher = CountSketch(k, 7)
    fast, slow = _both(lambda: sketcher.sketch_slice("layer.weight", x, offset))
    assert fast.dtype == torch.float32
    assert torch.equal(fast, slow)


@pytest.mark.parametrize(
    ("n", "d", "k", "offset", "dtype"),
    [
        (1, 10, 8, 0, torch.float32),
        (7, 5000, 64, 123, torch.float32),
        (64, 70_000, 1024, 0, torch.float32),
        (9, 40_000, 4096, 0, torch.float64),
        (5, 6000, 256, (1 << 32) - 2500, torch.float32),
    ],
)
def test_countsketch_scaled_scatter_equals_sketch_of_the_product(
    n: int, d: int, k: int, offset: int, dtype: torch.dtype
) -> None:
    """The scatter that multiplies each entry by its factor as it reads it (an ``adam``
    row's ``sqrt(P)``) gives, bit for bit, the sketch of the product formed first: on the
    numba path, on the torch path, and with ``values`` left as they were."""
    gen = torch.Generator().manual_seed(n + d + k)
    x = (torch.randn(n, d, generator=gen) * torch.rand(n, d, generator=gen).pow(8) * 1e3).to(dtype)
    scale = torch.rand(d, generator=gen) * 3 + 1e-3  # float32, as sqrt(P) is
    sketcher = CountSketch(k, 7)
    want = sketcher.sketch_slice("layer.weight", x * scale.to(dtype), offset)
    before = x.clone()
    name = "layer.weight"
    fast, slow = _both(lambda: sketcher.sketch_scaled_slice(name, x.clone(), scale, offset))
    assert torch.equal(fast, want)
    assert torch.equal(slow, want)
    fast_again = sketcher.sketch_scaled_slice("layer.weight", x, scale, offset)
    assert torch.equal(fast_again, want) and torch.equal(x, before)


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_countsketch_slices_in_one_pass_equal_the_whole_row(
    scaled: bool, dtype: torch.dtype
) -> None:
    """``sketch_slices`` (an embedding's rows of the tokens present, one scatter over all of
    them) is bit-equal to the sketch of the whole flat row with those slices in place and
    zeros elsewhere, on the numba and the torch path, scaled or not; offsets straddle a
    change of key."""
    gen = torch.Generator().manual_seed(3)
    n, d, numel = 6, 40, (1 << 32) + 4000
    offsets = [(1 << 32) + o for o in (-4000, -3880, -3600, -20, 40, 3960)]  # ascending
    values = torch.randn(n, len(offsets), d, generator=gen).to(dtype)
    scale = torch.rand(len(offsets), d, generator=gen) + 0.5 if scaled else None
    lo, hi = min(offsets), max(offsets) + d  # the whole row, restricted to the span touched
    row = torch.zeros(n, hi - lo, dtype=dtype)
    factors = torch.zeros(hi - lo)
    for j, offset in enumerate(offsets):
        row[:, offset - lo : offset - lo + d] = values[:, j]
        if scale is not None:
            factors[offset - lo : offset - lo + d] = scale[j]
    sketcher = CountSketch(256, 7, {"emb.weight": [numel]})
    if scale is None:
        want = sketcher.sketch_slice("emb.weight", row, lo)
    else:
        want = sketcher.sketch_slice("emb.weight", row * factors.to(dtype), lo)
    fast, slow = _both(lambda: sketcher.sketch_slices("emb.weight", values.clone(), offsets, scale))
    assert torch.equal(fast, want)
    torch.testing.assert_close(slow, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("start", range(9))
@pytest.mark.parametrize(
    ("n", "dtype"), [(4, torch.float32), (6, torch.float64), (66, torch.float32)]
)
def test_countsketch_numba_unaligned_rows(start: int, n: int, dtype: torch.dtype) -> None:
    """Rows that start at any element (the vector loads are unaligned) and column counts
    that leave a remainder after the eight-coordinate steps; 66 rows take the threaded path
    with a row range that is not a multiple of four."""
    base = torch.randn(n, 4100 + 9, generator=torch.Generator().manual_seed(start), dtype=dtype)
    x = base[:, start : start + 4100 - start]
    sketcher = CountSketch(300, 5)
    fast, slow = _both(lambda: sketcher.sketch_slice("w", x, 3 * start))
    assert torch.equal(fast, slow)


def test_countsketch_numba_handles_strided_rows_and_thread_counts() -> None:
    x = torch.randn(40, 30_000)[:, ::3]  # columns not contiguous
    sketcher = CountSketch(512, 3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = sketcher.sketch_slice("w", x)
        torch.set_num_threads(max(2, threads))
        multi = sketcher.sketch_slice("w", x)
    finally:
        torch.set_num_threads(threads)
    _, slow = _both(lambda: sketcher.sketch_slice("w", x))
    assert torch.equal(single, multi)
    assert torch.equal(single, slow)


def test_countsketch_bfloat16_takes_the_torch_path() -> None:
    x = torch.randn(3, 100).to(torch.bfloat16)
    sketcher = CountSketch(16, 1)
    fast, slow = _both(lambda: sketcher.sketch_slice("w", x))
    assert torch.equal(fast, slow)


@pytest.mark.parametrize("kind", [GaussianSketch, RademacherSketch])
@pytest.mark.parametrize("k", [1, 7, 16, 33, 47, 256])
def test_dense_entries_numba_equal_torch(kind: type, k: int) -> None:
    sketcher = kind(k, 11, block_entries=k * 100)
    cols_fast, cols_slow = _both(
        lambda: sketcher.columns("blocks.0.w", (1 << 32) - 40, 100, torch.device("cpu")).clone()
    )
    assert torch.equal(cols_fast, cols_slow)
    # the same matrix; the products may differ in float32 rounding only (the torch path can
    # hand BLAS a strided block, which changes its summation order)
    x = torch.randn(5, 350)
    fast, slow = _both(lambda: sketcher.sketch_slice("blocks.0.w", x, 17))
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


def test_kernels_compile_without_a_writable_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where numba finds no writable cache directory it refuses ``cache=True`` when the
    function is decorated; the kernels are then compiled per process instead."""
    from numba.core import caching

    impl = getattr(caching, "CacheImpl", None) or caching._CacheImpl  # older numba: _CacheImpl
    monkeypatch.setattr(impl, "_locator_classes", [])
    with pytest.raises(RuntimeError, match="no locator"):
        numba.njit(cache=True)(lambda x: x)  # what the fallback is for

    def double(out, x):  # type: ignore[no-untyped-def]
        for i in range(x.shape[0]):
            out[i] = 2 * x[i]

    fn = cpu_kernels._jit(double)
    x = np.arange(5.0)
    out = np.empty_like(x)
    fn(out, x)
    assert out.tolist() == [0.0, 2.0, 4.0, 6.0, 8.0]
