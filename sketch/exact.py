"""The exact (identity) "sketch": ``y = x`` laid out over all declared parameters.

The output dimension is ``N = sum of the declared numels``; parameter ``p`` occupies the
columns ``base(p) .. base(p) + numel(p) - 1`` where ``base`` is the running sum of the
numels in the declared order (the order of the ``parameters`` mapping).  The ``dim`` a
spec asks for is ignored: ``sketcher.dim`` is ``N``.  A slice ``name@offset`` is copied to
``base(name) + offset``; values are converted to float32 and otherwise untouched, so the
kernel ``Y Y^T`` is exactly ``W W^T`` of the float32 gradients.  Variance 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from sketch.base import Sketcher, SketchKind


class ExactSketch(Sketcher):
    """Identity over the declared parameters; needs ``parameters``; ``dim`` is ignored."""

    kind = SketchKind.EXACT

    def __init__(
        self, dim: int | None, seed: int, parameters: Mapping[str, Sequence[int]] | None = None
    ):
        if parameters is None or len(parameters) == 0:
            raise ValueError("the exact kind needs the declared parameter shapes")
        offsets: dict[str, int] = {}
        total = 0
        for name, shape in parameters.items():
            offsets[name] = total
            total += math.prod(int(s) for s in shape)
        if total == 0:
            raise ValueError("the declared parameters have no elements")
        super().__init__(total, seed, parameters)
        self.offsets = offsets

    def sketch_slice(self, name: str, values: torch.Tensor, offset: int = 0) -> torch.Tensor:
        values = self.check_slice(name, values, offset)
        n, d = values.shape
        out = torch.zeros(n, self.dim, dtype=torch.float32, device=values.device)
        start = self.offsets[name] + offset
        out[:, start : start + d] = values
        return out

    def variance_factor(self) -> float:
        return 0.0
