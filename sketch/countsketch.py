"""CountSketch (Charikar, Chen & Farach-Colton 2002): one signed bucket per coordinate.

Coordinate ``c`` (flat index ``i`` of parameter ``name``) has the hash
``h = coord_hash(seed, name, COUNTSKETCH, i)`` (``sketch.hashing``), the bucket
``b(c) = ((h >> 1) * k) >> 31`` in ``[0, k)`` and the sign ``s(c) = 1 - 2 * (h & 1)``;
column ``Phi[:, c]`` is ``s(c) * e_{b(c)}``, and ``y[b] = sum_{c: b(c) = b} s(c) x_c``
(a scatter-add).

Sums are accumulated in float64 and rounded to float32 once, so the result does not depend
on the order of the additions (CPU loop, CUDA atomics, block size) except when a float64
rounding difference straddles a float32 rounding boundary (probability about 1e-8 per
entry): CPU and CUDA agree bit for bit in practice.

Moments (signs pairwise independent, buckets uniform):

    E <Phi a, Phi b>   = <a, b>
    Var <Phi a, Phi b> = (|a|^2 |b|^2 + <a, b>^2 - 2 sum_i a_i^2 b_i^2) / k
                      <= (|a|^2 |b|^2 + <a, b>^2) / k
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from sketch.base import Sketcher, SketchKind
from sketch.hashing import Stream, bucket_and_sign, coord_hash

#: Coordinates hashed and scattered per block (speed/memory only; results do not depend on it).
BLOCK_COORDS = 1 << 12


class CountSketch(Sketcher):
    """Signed-bucket sketch ``[n, d] -> [n, k]`` float32 via a float64 scatter-add."""

    kind = SketchKind.COUNTSKETCH

    def __init__(
        self,
        dim: int,
        seed: int,
        parameters: Mapping[str, Sequence[int]] | None = None,
        block_coords: int = BLOCK_COORDS,
    ):
        super().__init__(dim, seed, parameters)
        self.block_coords = max(1, int(block_coords))

    def buckets_signs(
        self, name: str, start: int, count: int, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Buckets (``[count]`` int64) and signs (``[count]`` float32) of flat indices
        ``start .. start + count - 1`` of ``name``."""
        hashes = coord_hash(self.seed, name, Stream.COUNTSKETCH, start, count, device)
        return bucket_and_sign(hashes, self.dim)

    def matrix(
        self, name: str, start: int, count: int, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """``Phi[:, start:start + count]`` of ``name`` as a dense ``[dim, count]`` float32."""
        bucket, sign = self.buckets_signs(name, start, count, device)
        phi = torch.zeros(self.dim, count, dtype=torch.float32, device=device)
        phi[bucket, torch.arange(count, device=device)] = sign
        return phi

    def sketch_slice(self, name: str, values: torch.Tensor, offset: int = 0) -> torch.Tensor:
        values = self.check_slice(name, values, offset)
        n, d = values.shape
        acc = torch.zeros(n, self.dim, dtype=torch.float64, device=values.device)
        # one float64 buffer reused per block: the signed copy stays in cache
        buffer = torch.empty(
            n, min(d, self.block_coords), dtype=torch.float64, device=values.device
        )
        for c0 in range(0, d, self.block_coords):
            c1 = min(d, c0 + self.block_coords)
            bucket, sign = self.buckets_signs(name, offset + c0, c1 - c0, values.device)
            signed = torch.mul(values[:, c0:c1], sign.to(torch.float64), out=buffer[:, : c1 - c0])
            acc.index_add_(1, bucket, signed)
        return acc.to(torch.float32)

    def variance_factor(self) -> float:
        return 1.0 / self.dim
