"""Fused CPU loops (numba) for the two sketch steps that torch runs as many passes.

* **CountSketch scatter.**  ``y[r, b(c)] += s(c) x[r, c]`` with float32 input and a float64
  accumulator.  torch's ``index_add_`` needs one dtype on both sides, so the torch path
  first widens every block to float64 (an extra write and read of twice the input) and
  then scatters along dim 1; here one loop reads the float32 rows and adds into the
  float64 accumulator directly, four rows at a time as one 4-wide vector add per
  coordinate (an LLVM intrinsic, since LLVM does not vectorise the scatter by itself), and
  writes the float32 result, so no ``[n, 2k]`` float64 array is copied or subtracted in
  torch afterwards.  With a per-column factor ``f(c)`` (an ``adam`` row's ``sqrt(P)``) it
  adds ``fl(x[r, c] f(c))``, the product rounded in the rows' dtype as a separate scaling
  pass would round it, without writing that pass.
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
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import cast

import numpy as np
import torch

numba: ModuleType | None
try:
    import numba
    from llvmlite import ir as llvm_ir
    from numba.core import types
    from numba.extending import intrinsic
except ImportError:  # pragma: no cover - numba is a dependency; this keeps a broken install usable
    numba = None

_enabled = numba is not None and os.environ.get("KERNELSCOPE_SKETCH_NUMBA", "1") != "0"

#: Below this many input entries a call runs on the calling thread (thread hand-off costs
#: tens of microseconds).
PARALLEL_MIN_ENTRIES = 1 << 18
#: Coordinates hashed per block of the scatter loop (their targets, 4 bytes each, stream
#: through L2 while one group's accumulator stays there).  Speed only, not results.
SCATTER_BLOCK = 1 << 17
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

    _I32 = llvm_ir.IntType(32)

    def _scatter_8_codegen(scaled: bool):  # type: ignore[no-untyped-def]
        """Codegen of :func:`_add_8_coords` (``scaled``: of :func:`_add_8_coords_scaled`)."""

        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            def data(pos):  # type: ignore[no-untyped-def]
                array = context.make_array(signature.args[pos])(context, builder, args[pos])
                return array.data

            def shuffle(a, b, mask):  # type: ignore[no-untyped-def]
                lanes = llvm_ir.Constant(
                    llvm_ir.VectorType(_I32, len(mask)), [llvm_ir.Constant(_I32, m) for m in mask]
                )
                return builder.shuffle_vector(a, b, lanes)

            wide = signature.args[2].dtype == types.float32
            start = args[-1]
            element = llvm_ir.FloatType() if wide else llvm_ir.DoubleType()
            row8 = llvm_ir.VectorType(element, 8)
            sum4 = llvm_ir.VectorType(llvm_ir.DoubleType(), 4)

            def load8(pos):  # type: ignore[no-untyped-def]
                # unaligned: a row may start anywhere (align = the element's own size)
                pointer = builder.bitcast(builder.gep(data(pos), [start]), row8.as_pointer())
                return builder.load(pointer, align=4 if wide else 8)

            rows = [load8(p) for p in range(2, 6)]
            if scaled:  # the product in the rows' own dtype, as values * scale rounds it
                factor = load8(6)
                rows = [builder.fmul(r, factor) for r in rows]
            # interleave rows 0/1 and 2/3, coordinates 0-3 and 4-7: [a0 b0 a1 b1 a2 b2 a3 b3]
            low, high = [0, 8, 1, 9, 2, 10, 3, 11], [4, 12, 5, 13, 6, 14, 7, 15]
            pairs = [
                (shuffle(rows[0], rows[1], low), shuffle(rows[2], rows[3], low)),
                (shuffle(rows[0], rows[1], high), shuffle(rows[2], rows[3], high)),
            ]
            acc_data, target_data = data(0), data(1)
            for c in range(8):
                front, back = pairs[c // 4]
                j = 2 * (c % 4)
                column = shuffle(front, back, [j, j + 1, 8 + j, 9 + j])
                if wide:
                    column = builder.fpext(column, sum4)
                t = builder.load(
                    builder.gep(target_data, [builder.add(start, llvm_ir.Constant(start.type, c))])
                )
                slot = builder.mul(builder.zext(t, start.type), llvm_ir.Constant(start.type, 4))
                where = builder.bitcast(builder.gep(acc_data, [slot]), sum4.as_pointer())
                builder.store(builder.fadd(builder.load(where, align=8), column), where, align=8)
            return context.get_dummy_value()

        return codegen

    @intrinsic
    def _add_8_coords(typingctx, acc, target, x0, x1, x2, x3, i):  # type: ignore[no-untyped-def]
        """``acc[target[c], j] += x_j[c]`` for ``c`` in ``i .. i + 7`` and rows ``j = 0..3``.

        LLVM does not vectorise this scatter on its own (it cannot prove that ``acc`` and the
        rows do not overlap), so it is spelled out in IR: one unaligned 8-wide load per row,
        a 4 x 8 transpose by shuffles, and per coordinate one 4-wide float64 load, add and
        store at ``acc[target[c]]`` (the four rows' sums sit next to each other).  The same
        IEEE additions in the same order as the scalar loop, so results are bit-identical.
        ``acc``: ``[2k, 4]`` float64 C-contiguous; ``target``: uint32; rows: float32 or
        float64 with unit stride (the caller checks).
        """
        return types.void(acc, target, x0, x1, x2, x3, i), _scatter_8_codegen(False)

    @intrinsic
    def _add_8_coords_scaled(typingctx, acc, target, x0, x1, x2, x3, scale, i):  # type: ignore[no-untyped-def]
        """:func:`_add_8_coords` of ``x_j[c] * scale[c]`` (the product rounded in the rows'
        dtype, then widened: the same value as scaling the rows first)."""
        return types.void(acc, target, x0, x1, x2, x3, scale, i), _scatter_8_codegen(True)

    @_jit
    def _countsketch_scatter(inter, tail, x, scale, scaled, lo_start, key, dim, block):  # type: ignore[no-untyped-def]
        n, d = x.shape
        groups = inter.shape[0]
        target = np.empty(min(block, d), np.uint32)
        one = np.uint64(1)
        k = np.uint64(dim)
        for c0 in range(0, d, block):
            c1 = min(d, c0 + block)
            m = c1 - c0
            m8 = m - m % 8
            for c in range(c0, c1):
                h = _mix32(np.uint64(lo_start + c) ^ key)
                bucket = ((h >> one) * k) >> np.uint64(31)
                target[c - c0] = np.uint32(bucket + (h & one) * k)
            s = scale[c0:c1]
            # Group by group over the whole block: a group's accumulator ([2k, 4] float64,
            # 256 KiB at k = 4096) is brought into L2 once per block, not once per small block.
            for g in range(groups):
                a = inter[g]
                r = SWEEP_ROWS * g
                x0, x1, x2, x3 = x[r, c0:c1], x[r + 1, c0:c1], x[r + 2, c0:c1], x[r + 3, c0:c1]
                if scaled:
                    for i in range(0, m8, 8):
                        _add_8_coords_scaled(a, target, x0, x1, x2, x3, s, i)  # type: ignore[call-arg]
                    for i in range(m8, m):
                        t = target[i]
                        a[t, 0] += x0[i] * s[i]
                        a[t, 1] += x1[i] * s[i]
                        a[t, 2] += x2[i] * s[i]
                        a[t, 3] += x3[i] * s[i]
                    continue
                for i in range(0, m8, 8):
                    _add_8_coords(a, target, x0, x1, x2, x3, i)  # type: ignore[call-arg]
                for i in range(m8, m):
                    t = target[i]
                    a[t, 0] += x0[i]
                    a[t, 1] += x1[i]
                    a[t, 2] += x2[i]
                    a[t, 3] += x3[i]
            for r in range(SWEEP_ROWS * groups, n):
                row_acc, row = tail[r - SWEEP_ROWS * groups], x[r, c0:c1]
                for i in range(m):
                    row_acc[target[i]] += row[i] * s[i] if scaled else row[i]

    @_jit
    def _countsketch_finish(inter, tail, out):  # type: ignore[no-untyped-def]
        dim = out.shape[1]
        for g in range(inter.shape[0]):
            for j in range(SWEEP_ROWS):
                row = out[SWEEP_ROWS * g + j]
                for b in range(dim):
                    row[b] = np.float32(inter[g, b, j] - inter[g, dim + b, j])
        for r in range(tail.shape[0]):
            row = out[SWEEP_ROWS * inter.shape[0] + r]
            for b in range(dim):
                row[b] = np.float32(tail[r, b] - tail[r, dim + b])

    def _splat32(value: int) -> llvm_ir.Constant:
        return llvm_ir.Constant(llvm_ir.VectorType(_I32, 8), [llvm_ir.Constant(_I32, value)] * 8)

    @intrinsic
    def _gaussian_16(typingctx, row, table, h, keys, j0):  # type: ignore[no-untyped-def]
        """``row[2j] = table[w >> 16]``, ``row[2j + 1] = table[w & 0xFFFF]`` with
        ``w = mix32(h ^ keys[j])`` for the eight words ``j = j0 .. j0 + 7``.

        mix32 on eight uint32 lanes (LLVM leaves the scalar loop, with its table lookups,
        unvectorised), sixteen table loads, one interleaving shuffle and one 16-wide
        unaligned store.  Integer arithmetic and copies only: bit-identical to the scalar
        recipe.  ``row``: float32 contiguous; ``table``: the 65536 float32 of
        :func:`sketch.hashing.gaussian_table`; ``h``: uint32; ``keys``: uint32.
        """
        sig = types.void(row, table, h, keys, j0)

        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            def data(pos):  # type: ignore[no-untyped-def]
                array = context.make_array(signature.args[pos])(context, builder, args[pos])
                return array.data

            row_data, table_data, key_data = data(0), data(1), data(3)
            j0 = args[4]
            lanes8 = llvm_ir.VectorType(_I32, 8)
            words = builder.load(
                builder.bitcast(builder.gep(key_data, [j0]), lanes8.as_pointer()), align=4
            )
            x = builder.insert_element(
                llvm_ir.Constant(lanes8, llvm_ir.Undefined), args[2], llvm_ir.Constant(_I32, 0)
            )
            x = builder.shuffle_vector(x, x, _splat32(0))
            x = builder.xor(x, words)
            # mix32 (sketch.hashing): 32-bit wrapping multiplies, as the integer recipe
            x = builder.xor(x, builder.lshr(x, _splat32(16)))
            x = builder.mul(x, _splat32(int(_MUL1)))
            x = builder.xor(x, builder.lshr(x, _splat32(15)))
            x = builder.mul(x, _splat32(int(_MUL2)))
            x = builder.xor(x, builder.lshr(x, _splat32(15)))
            index = [builder.lshr(x, _splat32(16)), builder.and_(x, _splat32(0xFFFF))]
            entries16 = llvm_ir.VectorType(llvm_ir.FloatType(), 16)
            out = llvm_ir.Constant(entries16, llvm_ir.Undefined)
            i64 = llvm_ir.IntType(64)
            for lane in range(16):  # entry 2j + half: half 0 the high 16 bits, 1 the low
                half, j = lane % 2, lane // 2
                idx = builder.extract_element(index[half], llvm_ir.Constant(_I32, j))
                value = builder.load(builder.gep(table_data, [builder.zext(idx, i64)]))
                out = builder.insert_element(out, value, llvm_ir.Constant(_I32, lane))
            first = builder.gep(row_data, [builder.mul(j0, llvm_ir.Constant(j0.type, 2))])
            builder.store(out, builder.bitcast(first, entries16.as_pointer()), align=4)
            return context.get_dummy_value()

        return sig, codegen

    @_jit
    def _gaussian_block(lo_start, key, keys32, table, out):  # type: ignore[no-untyped-def]
        rows = out.shape[1]
        low = np.uint64(0xFFFF)
        vector_words = (rows // 16) * 8  # words whose 16 entries all exist
        for c in range(out.shape[0]):
            h = _mix32(np.uint64(lo_start + c) ^ key)
            row = out[c]
            for j in range(0, vector_words, 8):
                _gaussian_16(row, table, np.uint32(h), keys32, j)  # type: ignore[call-arg]
            for j in range(vector_words, keys32.shape[0]):
                w = _mix32(h ^ np.uint64(keys32[j]))
                row[2 * j] = table[w >> _U16]
                if 2 * j + 1 < rows:
                    row[2 * j + 1] = table[w & low]

    @_jit
    def _sign_block(lo_start, key, keys, out):  # type: ignore[no-untyped-def]
        rows = out.shape[1]
        one = np.uint64(1)
        for c in range(out.shape[0]):
            h = _mix32(np.uint64(lo_start + c) ^ key)
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


def _countsketch_rows(
    x: np.ndarray,
    scale: np.ndarray | None,
    chunks: Sequence[tuple[int, int, int, int]],
    out: np.ndarray,
) -> None:
    """Rows ``x`` ``[m, d]`` (times ``scale`` ``[d]``) into ``out`` ``[m, k]``: scatter every
    chunk, then finish."""
    m, dim = out.shape
    groups = m // SWEEP_ROWS
    inter = np.zeros((groups, 2 * dim, SWEEP_ROWS), np.float64)
    tail = np.zeros((m - SWEEP_ROWS * groups, 2 * dim), np.float64)
    # unscaled: any array of the rows' dtype stands in (the kernel does not read it)
    factors = x[0] if scale is None else scale
    for c0, c1, lo_start, key in chunks:
        _countsketch_scatter(
            inter,
            tail,
            x[:, c0:c1],
            factors[c0:c1],
            scale is not None,
            lo_start,
            np.uint64(key),
            dim,
            SCATTER_BLOCK,
        )
    _countsketch_finish(inter, tail, out)


def _split_rows(n: int, entries: int, run: Callable[[int, int], object]) -> None:
    """``run(r0, r1)`` over ``[0, n)``: one contiguous range per torch thread (a multiple of
    ``SWEEP_ROWS`` rows each), or in one call below ``PARALLEL_MIN_ENTRIES`` entries.  The
    calling thread takes the first range itself (one hand-off fewer)."""
    threads = max(1, torch.get_num_threads())
    if threads == 1 or entries < PARALLEL_MIN_ENTRIES or n <= SWEEP_ROWS:
        run(0, n)
        return
    step = -(-n // (SWEEP_ROWS * threads)) * SWEEP_ROWS
    futures = [_executor().submit(run, r, min(n, r + step)) for r in range(step, n, step)]
    run(0, min(n, step))
    for f in futures:
        f.result()


def countsketch(
    values: torch.Tensor,
    chunks: Sequence[tuple[int, int, int, int]],
    dim: int,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """CountSketch of ``values`` (``[n, d]`` float32 or float64 CPU; rows without unit column
    stride are copied first) to ``[n, dim]`` float32: the numba form of
    :meth:`sketch.countsketch.CountSketch.sketch_slice`.  ``scale`` (``[d]``) sketches
    ``values * scale`` instead, the product rounded in ``values``' dtype as torch rounds it
    (:meth:`~sketch.countsketch.CountSketch.sketch_scaled_slice`), without writing it.

    ``chunks``: ``(c0, c1, lo_start, key)`` covering the columns in order; column ``c`` of a
    chunk has ``coord_hash = mix32((lo_start + c - c0) ^ key)`` (the caller splits at
    multiples of ``2^32`` of the flat index, where the key changes).  Each row's positive and
    negative terms are summed apart in float64, in increasing coordinate order, and the
    difference is rounded to float32, as on the torch path.
    """
    if values.stride(1) != 1:  # the vector loads read eight neighbouring columns
        values = values.contiguous()
    x = values.detach().numpy()
    factors = None
    if scale is not None:
        factors = scale.detach().to(values.dtype).contiguous().numpy()
        if factors.shape != (x.shape[1],):
            raise ValueError(f"scale must be [{x.shape[1]}], got {tuple(scale.shape)}")
    out = np.empty((x.shape[0], dim), np.float32)
    # Each thread owns its rows' accumulators and hashes every coordinate itself (hashing is
    # a few percent of the scatter), so the additions happen in exactly the order of one
    # thread.
    _split_rows(
        x.shape[0],
        x.size,
        lambda r0, r1: _countsketch_rows(x[r0:r1], factors, chunks, out[r0:r1]),
    )
    return torch.from_numpy(out)


def gaussian_block(
    chunks: Sequence[tuple[int, int, int, int]],
    keys: torch.Tensor,
    table: torch.Tensor,
    out: torch.Tensor,
) -> torch.Tensor:
    """Fill ``out`` (``[B, rows]`` float32 CPU, contiguous) with the Gaussian entries of
    :func:`sketch.hashing.gaussian_entries` for row keys ``[W]`` and the coordinates of
    ``chunks`` (:func:`sketch.hashing.key_chunks`; the coordinate hashes are computed here).

    One thread: the block is multiplied by torch's ``addmm`` next, whose OpenMP workers
    spin-wait on the other cores between calls; splitting the entries over threads made the
    dense sketches 5-19% slower with two threads (1.2-1.4x faster only with
    ``OMP_WAIT_POLICY=PASSIVE``, which slows the GEMM itself)."""
    k32, t, o = _as_uint64(keys).astype(np.uint32), table.numpy(), out.numpy()
    for c0, c1, lo_start, key in chunks:
        _gaussian_block(lo_start, np.uint64(key), k32, t, o[c0:c1])
    return out


def sign_block(
    chunks: Sequence[tuple[int, int, int, int]], keys: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """Fill ``out`` (``[B, rows]`` float32 CPU, contiguous) with the ±1 entries of
    :func:`sketch.hashing.sign_entries` for row keys ``[W]`` and the coordinates of
    ``chunks`` (one thread, as :func:`gaussian_block`)."""
    k, o = _as_uint64(keys), out.numpy()
    for c0, c1, lo_start, key in chunks:
        _sign_block(lo_start, np.uint64(key), k, o[c0:c1])
    return out
