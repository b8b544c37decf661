"""CountSketch (Charikar, Chen & Farach-Colton 2002): one signed bucket per coordinate.

Coordinate ``c`` (flat index ``i`` of parameter ``name``) has the hash
``h = coord_hash(seed, name, COUNTSKETCH, i)`` (``sketch.hashing``), the bucket
``b(c) = ((h >> 1) * k) >> 31`` in ``[0, k)`` and the sign ``s(c) = 1 - 2 * (h & 1)``;
column ``Phi[:, c]`` is ``s(c) * e_{b(c)}``, and ``y[b] = sum_{c: b(c) = b} s(c) x_c``
(a scatter-add).

Sums are accumulated in float64 (positive and negative terms apart, subtracted at the end)
and rounded to float32 once, so the result does not depend
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

from sketch import cpu_kernels
from sketch.base import Sketcher, SketchKind
from sketch.hashing import Stream, bucket_and_sign, bucket_of, coord_hash, key_chunks

#: Float64 entries (rows x coordinates) widened and scattered per block: 8 MiB.  Speed and
#: memory only; results do not depend on it.  Measured on a 2-core CPU with 64 rows: blocks of
#: 4096 coordinates ran at 6 GB/s, 16384 at 8.2-8.6 GB/s (per-block hashing overhead), 65536 at
#: 4.7 GB/s (the widened block falls out of cache).
BLOCK_ENTRIES = 1 << 20
#: Bounds on the coordinates per block whatever the number of rows.
MIN_BLOCK_COORDS, MAX_BLOCK_COORDS = 1 << 10, 1 << 14


class CountSketch(Sketcher):
    """Signed-bucket sketch ``[n, d] -> [n, k]`` float32 via a float64 scatter-add."""

    kind = SketchKind.COUNTSKETCH

    def __init__(
        self,
        dim: int,
        seed: int,
        parameters: Mapping[str, Sequence[int]] | None = None,
        block_coords: int | None = None,
    ):
        super().__init__(dim, seed, parameters)
        #: None: chosen per call from the number of rows (``BLOCK_ENTRIES``).
        self.block_coords = None if block_coords is None else max(1, int(block_coords))

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
        fast = self._numba(name, values, offset)
        return self._sketch_torch(name, values, offset) if fast is None else fast

    def sketch_scaled_slice(
        self, name: str, values: torch.Tensor, scale: torch.Tensor, offset: int = 0
    ) -> torch.Tensor:
        """The scatter multiplies each entry by its factor as it reads it (the numba path):
        no pass writes the product, and ``values`` is left as it is.  The result is bit-equal
        to :meth:`sketch_slice` of ``values * scale``."""
        values = self.check_slice(name, values, offset)
        fast = self._numba(name, values, offset, scale)
        return super().sketch_scaled_slice(name, values, scale, offset) if fast is None else fast

    def sketch_slices(
        self,
        name: str,
        values: torch.Tensor,
        offsets: Sequence[int],
        scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One scatter over every slice (the numba path): the slices' columns side by side,
        each run of them hashed from its own flat offset, so that a few hundred slices cost
        one call, not one call each.  ``values`` is left as it is."""
        if not self._numba_applies(values):  # the torch path checks the slices itself
            return super().sketch_slices(name, values, offsets, scale)
        self.check_slices(name, values, offsets)
        n, m, d = values.shape
        flat = values.reshape(n, m * d)
        chunks = [
            (j * d + c0, j * d + c1, lo, key)
            for j, offset in enumerate(offsets)
            for c0, c1, lo, key in key_chunks(self.seed, name, Stream.COUNTSKETCH, offset, d)
        ]
        factors = None if scale is None else scale.reshape(m * d)
        return cpu_kernels.countsketch(flat, chunks, self.dim, factors)

    def _numba(
        self, name: str, values: torch.Tensor, offset: int, scale: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """The numba scatter (:func:`sketch.cpu_kernels.countsketch`) where it runs, else None."""
        if not self._numba_applies(values):
            return None
        chunks = key_chunks(self.seed, name, Stream.COUNTSKETCH, offset, values.shape[1])
        return cpu_kernels.countsketch(values, chunks, self.dim, scale)

    @staticmethod
    def _numba_applies(values: torch.Tensor) -> bool:
        """CPU float32 or float64 values, and the loops switched on."""
        return (
            cpu_kernels.enabled()
            and values.device.type == "cpu"
            and values.dtype in (torch.float32, torch.float64)
        )

    def _sketch_torch(self, name: str, values: torch.Tensor, offset: int) -> torch.Tensor:
        n, d = values.shape
        k = self.dim
        # Positive and negative coordinates go to separate halves of a [n, 2k] accumulator
        # (y = plus - minus at the end): the scatter needs no per-entry multiply by the sign,
        # which is about 20% of the time on a CPU.
        acc = torch.zeros(n, 2 * k, dtype=torch.float64, device=values.device)
        block = self.block_coords or min(
            MAX_BLOCK_COORDS, max(MIN_BLOCK_COORDS, BLOCK_ENTRIES // max(n, 1))
        )
        # one float64 buffer reused per block: the widened copy stays in cache
        buffer = torch.empty(n, min(d, block), dtype=torch.float64, device=values.device)
        for c0 in range(0, d, block):
            c1 = min(d, c0 + block)
            hashes = coord_hash(
                self.seed, name, Stream.COUNTSKETCH, offset + c0, c1 - c0, values.device
            )
            target = bucket_of(hashes, k) + (hashes & 1) * k  # bit 0 set: sign -1
            wide = buffer[:, : c1 - c0]
            wide.copy_(values[:, c0:c1])
            acc.index_add_(1, target, wide)
        return (acc[:, :k] - acc[:, k:]).to(torch.float32)

    def variance_factor(self) -> float:
        return 1.0 / self.dim
