"""Fused CPU loops (numba) for the two sketch steps that torch runs as many passes.

* **CountSketch scatter.**  ``y[r, b(c)] += s(c) x[r, c]`` with float32 input and a float64
  accumulator.  torch's ``index_add_`` needs one dtype on both sides, so the torch path
  first widens every block to float64 (an extra write and read of twice the input) and
  then scatters along dim 1; here one loop reads the float32 rows and adds into the
  float64 accumulator directly, hashing the coordinates on the way.
* **Dense entries.**  ``mix32(coord_hash ^ row_key)`` and a table lookup per entry, which
  torch evaluates as about a dozen elementwise passes over ``int64 [B, W]`` temporaries,
  run here as one pass that writes the float32 block.

Both compute exactly the recipe of :mod:`sketch.hashing` (integer arithmetic and table
lookups, no floating-point rounding), so the dense kinds get bit-identical matrices, and
the scatter adds in the same order as the torch path (coordinates in increasing order per
row and bucket, positive and negative halves apart), so CountSketch gets bit-identical
sketches; ``tests/sketch/test_cpu_kernels.py`` checks both.  torch
remains the only path on CUDA and for dtypes numpy lacks (bfloat16).

Work is split over threads by rows with ``nogil`` functions rather than numba's
``parallel=True``: its threading layers are either not thread-safe or not fork-safe, and
this module runs inside API threads, forked test servers and worker processes next to
torch's own OpenMP pool.  ``KERNELSCOPE_SKETCH_NUMBA=0`` (or :func:`use_numba`) switches the
loops off; without numba installed they are off.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import cast

import numpy as np
import torch

numba: ModuleType | None
try:
    import numba
except ImportError:  # pragma: no cover - numba is a dependency; this keeps a broken install usable
    numba = None

_enabled = numba is not None and os.environ.get("KERNELSCOPE_SKETCH_NUMBA", "1") != "0"

#: Below this many input entries a call runs on the calling thread (thread hand-off costs
#: tens of microseconds).
PARALLEL_MIN_ENTRIES = 1 << 18
#: Coordinates hashed per block of the scatter loop: the targets (8 bytes each) stay in L1/L2.
SCATTER_BLOCK = 1 << 13
#: Rows added per sweep over a block's coordinates (the kernel is written for four).
SWEEP_ROWS = 4


def enabled() -> bool:
    """Whether the numba loops are in use (numba importable and not switched off)."""
    return _enabled


def use_numba(on: bool) -> None:
    """Switch the numba loops on or off (results are identical either way)."""
    global _enabled
    _enabled = bool(on) and numba is not None


def _jit(fn: Callable[..., None]) -> Callable[..., None]:
    """``numba.njit(nogil=True, cache=True)``; without caching where no cache directory is
    writable (a read-only install and no writable home: numba refuses ``cache=True`` at
    decoration time), so that importing the sketch core never fails for it."""
    assert numba is not None
    try:
        return cast(Callable[..., None], numba.njit(nogil=True, cache=True)(fn))
    except RuntimeError:
        return cast(Callable[..., None], numba.njit(nogil=True)(fn))


if numba is not None:
    _U16 = np.uint64(16)
    _U15 = np.uint64(15)
    _MASK32 = np.uint64(0xFFFFFFFF)
    _MUL1 = np.uint64(0x21F0AAAD)
    _MUL2 = np.uint64(0x735A2D97)

    @numba.njit(inline="always")
    def _mix32(x):  # type: ignore[no-untyped-def]
        x ^= x >> _U16
        x = (x * _MUL1) & _MASK32
        x ^= x >> _U15
        x = (x * _MUL2) & _MASK32
        x ^= x >> _U15
        return x

    @_jit
    def _countsketch_cols(acc, x, lo_start, key, dim, block):  # type: ignore[no-untyped-def]
        n, d = x.shape
        groups = n // SWEEP_ROWS
        # The accumulator of each group of SWEEP_ROWS rows is held interleaved, [2k, rows]:
        # one coordinate's adds for the group land in one cache line instead of one line per
        # row (the [n, 2k] rows outgrow L1 for k >= 1024).  Copied in and out, so the adds
        # happen in the same order as on acc itself.
        inter = np.empty((groups, 2 * dim, SWEEP_ROWS), np.float64)
        for g in range(groups):
            for j in range(SWEEP_ROWS):
                inter[g, :, j] = acc[g * SWEEP_ROWS + j]
        target = np.empty(min(block, d), np.int64)
        one = np.uint64(1)
        k = np.uint64(dim)
        for c0 in range(0, d, block):
            c1 = min(d, c0 + block)
            for c in range(c0, c1):
                h = _mix32(np.uint64(lo_start + c) ^ key)
                bucket = ((h >> one) * k) >> np.uint64(31)
                target[c - c0] = np.int64(bucket + (h & one) * k)
            for g in range(groups):
                a = inter[g]
                r = g * SWEEP_ROWS
                x0, x1, x2, x3 = x[r], x[r + 1], x[r + 2], x[r + 3]
                for c in range(c0, c1):
                    t = target[c - c0]
                    a[t, 0] += x0[c]
                    a[t, 1] += x1[c]
                    a[t, 2] += x2[c]
                    a[t, 3] += x3[c]
            for r in range(groups * SWEEP_ROWS, n):
                row_acc, row = acc[r], x[r]
                for c in range(c0, c1):
                    row_acc[target[c - c0]] += row[c]
        for g in range(groups):
            for j in range(SWEEP_ROWS):
                acc[g * SWEEP_ROWS + j] = inter[g, :, j]

    @_jit
    def _gaussian_block(hashes, keys, table, out):  # type: ignore[no-untyped-def]
        rows = out.shape[1]
        low = np.uint64(0xFFFF)
        for c in range(hashes.shape[0]):
            h = hashes[c]
            for j in range(keys.shape[0]):
                w = _mix32(h ^ keys[j])
                out[c, 2 * j] = table[w >> _U16]
                if 2 * j + 1 < rows:
                    out[c, 2 * j + 1] = table[w & low]

    @_jit
    def _sign_block(hashes, keys, out):  # type: ignore[no-untyped-def]
        rows = out.shape[1]
        one = np.uint64(1)
        for c in range(hashes.shape[0]):
            h = hashes[c]
            for j in range(keys.shape[0]):
                w = _mix32(h ^ keys[j])
                for i in range(min(32, rows - 32 * j)):
                    out[c, 32 * j + i] = np.float32(1.0) - np.float32(2.0) * np.float32(
                        (w >> np.uint64(i)) & one
                    )


_pool: tuple[int, ThreadPoolExecutor] | None = None


def _executor() -> ThreadPoolExecutor:
    # one pool per process: a pool inherited through fork has no threads behind it
    global _pool
    if _pool is None or _pool[0] != os.getpid():
        _pool = (os.getpid(), ThreadPoolExecutor(max(1, torch.get_num_threads())))
    return _pool[1]


def _as_uint64(t: torch.Tensor) -> np.ndarray:
    """A CPU int64 tensor of values in ``[0, 2^32)`` as a uint64 numpy view (no copy)."""
    return t.contiguous().numpy().view(np.uint64)


def countsketch_add(acc: torch.Tensor, values: torch.Tensor, lo_start: int, key: int) -> None:
    """Scatter ``values`` into ``acc`` in place: the numba form of CountSketch's block loop.

    ``acc``: ``[n, 2k]`` float64 CPU, contiguous (positive terms in ``[:, :k]``, negative in
    ``[:, k:]``); ``values``: ``[n, d]`` float32 or float64 CPU, rows contiguous; coordinate
    ``c`` has ``coord_hash = mix32(((lo_start + c) mod 2^32) ^ key)`` (the caller splits at
    multiples of ``2^32``, where the key changes, so ``lo_start + d <= 2^32``).
    """
    n, d = values.shape
    k = acc.shape[1] // 2
    a, x = acc.numpy(), values.detach().numpy()
    key64 = np.uint64(key)
    threads = max(1, torch.get_num_threads())
    if threads == 1 or n * d < PARALLEL_MIN_ENTRIES:
        _countsketch_cols(a, x, lo_start, key64, k, SCATTER_BLOCK)
        return
    # Rows split into one contiguous range per thread (multiples of SWEEP_ROWS): each thread
    # owns its rows of the accumulator and hashes every coordinate itself (hashing is a few
    # percent of the scatter), so the additions happen in exactly the order of the
    # single-thread loop.
    step = -(-n // (SWEEP_ROWS * threads)) * SWEEP_ROWS
    futures = [
        _executor().submit(
            _countsketch_cols, a[r : r + step], x[r : r + step], lo_start, key64, k, SCATTER_BLOCK
        )
        for r in range(step, n, step)
    ]
    # the calling thread takes the first range itself (one hand-off fewer)
    _countsketch_cols(a[:step], x[:step], lo_start, key64, k, SCATTER_BLOCK)
    for f in futures:
        f.result()


def gaussian_block(
    hashes: torch.Tensor, keys: torch.Tensor, table: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """Fill ``out`` (``[B, rows]`` float32 CPU, contiguous) with the Gaussian entries of
    :func:`sketch.hashing.gaussian_entries` for ``hashes`` ``[B]`` and row keys ``[W]``."""
    _gaussian_block(_as_uint64(hashes), _as_uint64(keys), table.numpy(), out.numpy())
    return out


def sign_block(hashes: torch.Tensor, keys: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Fill ``out`` (``[B, rows]`` float32 CPU, contiguous) with the ±1 entries of
    :func:`sketch.hashing.sign_entries` for ``hashes`` ``[B]`` and row keys ``[W]``."""
    _sign_block(_as_uint64(hashes), _as_uint64(keys), out.numpy())
    return out
