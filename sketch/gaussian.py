"""Dense Gaussian sketch (Johnson–Lindenstrauss): ``Phi[r, c] ~ N(0, 1/k)``.

``y = Phi x`` with ``Phi[r, c] = T[u(r, c)] / sqrt(k)`` where ``T`` is the 65536-point
quantile discretisation of N(0, 1) (``sketch.hashing.gaussian_table``: exactly mean 0 and
variance 1, fourth moment ``m4`` about 2.99) and ``u(r, c)`` is 16 bits of the hashed word
``mix32(coord_hash(c) ^ row_key(r // 2))`` (the high half for even ``r``, the low half for
odd ``r``): two entries per 32-bit hash.

Moments (entries i.i.d., mean 0, variance ``1/k``, fourth moment ``m4 / k^2``):

    E <Phi a, Phi b>   = <a, b>
    Var <Phi a, Phi b> = (|a|^2 |b|^2 + <a, b>^2 + (m4 - 3) sum_i a_i^2 b_i^2) / k
                      <= (|a|^2 |b|^2 + <a, b>^2) / k

(Johnson & Lindenstrauss 1984; the row-amortised block generation follows TRAK's
``BasicProjector``, Park et al. 2023, without its dependence on the device.)
"""

from __future__ import annotations

from sketch.base import DenseSketcher, SketchKind
from sketch.hashing import Stream, gaussian_columns


class GaussianSketch(DenseSketcher):
    """Dense ``N(0, 1/k)`` sketch; its unscaled entries are standard normals."""

    kind = SketchKind.GAUSSIAN
    stream = Stream.GAUSSIAN
    entries = staticmethod(gaussian_columns)
