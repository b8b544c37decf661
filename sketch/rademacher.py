"""Dense Rademacher sketch (Achlioptas 2003): ``Phi[r, c] = ±1 / sqrt(k)``.

Entry ``(r, c)`` is ``(1 - 2 * bit_{r mod 32}(w)) / sqrt(k)`` with the hashed word
``w = mix32(coord_hash(c) ^ row_key(r // 32))``: 32 signs per 32-bit hash, expanded a byte
at a time through a ``[256, 8]`` sign table.

Moments (entries i.i.d. ±1/sqrt(k), fourth moment ``1/k^2``):

    E <Phi a, Phi b>   = <a, b>
    Var <Phi a, Phi b> = (|a|^2 |b|^2 + <a, b>^2 - 2 sum_i a_i^2 b_i^2) / k
                      <= (|a|^2 |b|^2 + <a, b>^2) / k

(Achlioptas, "Database-friendly random projections", 2003.)
"""

from __future__ import annotations

from sketch.base import DenseSketcher, SketchKind
from sketch.hashing import Stream, sign_columns


class RademacherSketch(DenseSketcher):
    """Dense ``±1/sqrt(k)`` sketch; its unscaled entries are signs."""

    kind = SketchKind.RADEMACHER
    stream = Stream.RADEMACHER
    entries = staticmethod(sign_columns)
