"""Kronecker (factorised Gaussian) sketch of matrix parameters, as in LoGra.

For a matrix parameter ``G`` of shape ``out x in`` (a parameter with more than two dims is
read as ``shape[0] x prod(shape[1:])``) the sketch is ``vec(A G B^T)``, ``[k_out x k_in]``
flattened row-major (entry ``(a, b)`` at ``a * k_in + b``), with

* ``A: k_out x out``, ``A[a, o] = T[...] / sqrt(k_out)`` (Gaussian stream ``KRONECKER_A``,
  coordinate ``o``: column ``o`` of ``A`` is a pure function of ``(seed, name, "A", o)``),
* ``B: k_in x in``, ``B[b, i] = T[...] / sqrt(k_in)`` (stream ``KRONECKER_B``, coordinate ``i``),

``T`` the discretised N(0, 1) table of ``sketch.gaussian``.  Equivalently
``Phi[:, (o, i)] = A[:, o] (x) B[:, i]``, so a flat slice ``name@offset`` (rows cut
anywhere) is sketched by splitting it into a partial first row, whole rows and a partial
last row.  ``k = k_out * k_in`` with ``k_out`` the largest divisor of ``k`` that is at
most ``sqrt(k)`` (1024 = 32 x 32, 4096 = 64 x 64, 512 = 16 x 32).  Parameters with at most
one dim (biases, norms) go through :class:`~sketch.countsketch.CountSketch` with the same
seed and ``k``.

Moments.  ``E <Phi a, Phi b> = <a, b>``.  For one matrix parameter (``k1 = k_out``,
``k2 = k_in``, ``M = G_a G_b^T``, ``Q = G_b^T G_a``), with exactly Gaussian factors:

    Var = (|M|_F^2 + tr M^2) / k1 + (|Q|_F^2 + tr Q^2) / k2
          + (|M|_F^2 + |Q|_F^2 + |a|^2 |b|^2 + <a, b>^2) / (k1 k2)

(the discretised table has fourth moment below 3, which only lowers it).  Partial-trace
arguments give ``|M|_F^2 + tr M^2 <= |a|^2|b|^2 + <a,b>^2`` (same for ``Q``) and
``|M|_F^2, |Q|_F^2 <= |a|^2 |b|^2``, hence

    Var <= (1/k1 + 1/k2 + 3/(k1 k2)) (|a|^2 |b|^2 + <a, b>^2),

with equality in the first two terms for rank-one ``G_a = G_b`` (the scalar-like case
``Var((chi2_k1 / k1)(chi2_k2 / k2))`` has factor ``1/k1 + 1/k2 + 2/(k1 k2)``).  Over several
parameters ``p`` (independent factors, ``E[y_p(a) y_p(b)^T] = <a_p, b_p> I / k``) the
variance is ``sum_p Var_p + sum_{p != q} (|a_p|^2 |b_q|^2 + <a_p,b_p><a_q,b_q>) / k``; the
cross sum is non-negative and ``1/k`` (also the CountSketch parameters' factor) is below the
bound's factor, so the same bound holds for the whole gradient.
Compared with a dense sketch of the same ``k`` the variance is about ``sqrt(k) / 2`` times
larger: the price of never materialising per-sequence gradients.

(Choe et al. 2024, "What is your data worth to GPT? LLM-scale data valuation with influence
functions" (LoGra); Kronecker-product JL: Jin, Kolda & Ward 2021.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from sketch.base import BLOCK_ENTRIES, Sketcher, SketchKind
from sketch.countsketch import CountSketch
from sketch.hashing import Stream, gaussian_columns


def kronecker_factors(dim: int) -> tuple[int, int]:
    """``(k_out, k_in)``: ``k_out`` the largest divisor of ``dim`` with ``k_out <= sqrt(dim)``."""
    k_out = 1
    for d in range(1, math.isqrt(dim) + 1):
        if dim % d == 0:
            k_out = d
    return k_out, dim // k_out


class KroneckerSketch(Sketcher):
    """``vec(A G B^T)`` for matrix parameters, CountSketch for the others; needs ``parameters``."""

    kind = SketchKind.KRONECKER

    def __init__(
        self,
        dim: int,
        seed: int,
        parameters: Mapping[str, Sequence[int]] | None = None,
        block_entries: int = BLOCK_ENTRIES,
    ):
        if parameters is None:
            raise ValueError("the kronecker kind needs the declared parameter shapes")
        super().__init__(dim, seed, parameters)
        self.k_out, self.k_in = kronecker_factors(self.dim)
        self.block_entries = max(1, int(block_entries))
        self.vector_sketch = CountSketch(self.dim, self.seed, parameters)

    def matrix_shape(self, name: str) -> tuple[int, int] | None:
        """``(out, in)`` of a matrix parameter; ``None`` for one with at most one dim."""
        assert self.parameters is not None
        if name not in self.parameters:
            raise KeyError(f"parameter {name!r} is not among the declared parameters")
        shape = self.parameters[name]
        if len(shape) <= 1:
            return None
        return shape[0], math.prod(shape[1:])

    def factor_columns(
        self, name: str, which: str, start: int, count: int, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """Columns ``start .. start + count - 1`` of factor ``which`` (``"A"`` or ``"B"``),
        transposed: ``[count, k_out]`` or ``[count, k_in]`` float32, already scaled."""
        if which == "A":
            stream, rows = Stream.KRONECKER_A, self.k_out
        elif which == "B":
            stream, rows = Stream.KRONECKER_B, self.k_in
        else:
            raise ValueError(f"factor must be 'A' or 'B', got {which!r}")
        cols = gaussian_columns(self.seed, name, stream, start, count, rows, device)
        return cols.mul_(1.0 / math.sqrt(rows))

    def factors(
        self, name: str, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The explicit factors ``A: [k_out, out]`` and ``B: [k_in, in]`` (float32) of ``name``."""
        shape = self.matrix_shape(name)
        if shape is None:
            raise ValueError(f"{name!r} is not a matrix parameter")
        out_dim, in_dim = shape
        a = self.factor_columns(name, "A", 0, out_dim, device).T
        b = self.factor_columns(name, "B", 0, in_dim, device).T
        return a, b

    def sketch_slice(self, name: str, values: torch.Tensor, offset: int = 0) -> torch.Tensor:
        values = self.check_slice(name, values, offset)
        shape = self.matrix_shape(name)
        if shape is None:
            return self.vector_sketch.sketch_slice(name, values, offset)
        in_dim = shape[1]
        n, d = values.shape
        y = torch.zeros(n, self.k_out, self.k_in, dtype=torch.float32, device=values.device)
        pos, end = offset, offset + d
        while pos < end:
            row, col = divmod(pos, in_dim)
            if col != 0 or end - pos < in_dim:
                # a partial row: columns col .. col + width - 1 of one row
                width = min(in_dim - col, end - pos)
                block = values[:, pos - offset : pos - offset + width].reshape(n, 1, width)
                self._add_rectangle(y, name, row, col, block)
                pos += width
            else:
                rows = (end - pos) // in_dim
                block = values[:, pos - offset : pos - offset + rows * in_dim]
                self._add_rectangle(y, name, row, 0, block.reshape(n, rows, in_dim))
                pos += rows * in_dim
        return y.reshape(n, self.dim)

    def _add_rectangle(
        self, y: torch.Tensor, name: str, row0: int, col0: int, block: torch.Tensor
    ) -> None:
        """``y += A[:, rows] V B[:, cols]^T`` for ``V = block [n, R, C]`` at ``(row0, col0)``,
        in chunks of at most ``block_entries`` generated factor entries and input values."""
        n, rows, cols = block.shape
        col_step = min(cols, max(1, self.block_entries // self.k_in))
        row_step = max(1, self.block_entries // max(1, n * col_step))
        for c0 in range(0, cols, col_step):
            c1 = min(cols, c0 + col_step)
            b_t = self.factor_columns(name, "B", col0 + c0, c1 - c0, block.device)
            for r0 in range(0, rows, row_step):
                r1 = min(rows, r0 + row_step)
                a_t = self.factor_columns(name, "A", row0 + r0, r1 - r0, block.device)
                t = torch.matmul(block[:, r0:r1, c0:c1].to(torch.float32), b_t)  # [n, R, k_in]
                y.add_(torch.matmul(a_t.T, t))  # [k_out, R] @ [n, R, k_in] -> [n, k_out, k_in]

    def variance_factor(self) -> float:
        k1, k2 = self.k_out, self.k_in
        return 1.0 / k1 + 1.0 / k2 + 3.0 / (k1 * k2)
