"""The sketch interface shared by every kind (math.md §7).

A gradient is a mapping ``{param_name: values}``; the global coordinate of a value is
``(param_name, flat_index)``.  A sketch of dimension ``k`` maps a gradient to

    y = sum_coords Phi[:, coord] * value,

where every column ``Phi[:, coord]`` is a pure function of ``(seed, param_name, flat_index)``
computed by counter-based integer hashing (``sketch.hashing``).  Consequences the rest of the
project relies on:

* the same rows on every process, machine, CPU or CUDA device;
* sketches of any split of a gradient (by parameter, or by flat slices ``name@offset``)
  add up to the sketch of the whole, in any order;
* the random matrix is regenerated block by block from the seed and never stored.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from enum import Enum

import torch

Shape = tuple[int, ...]


class SketchKind(str, Enum):
    """The sketch families of math.md §7."""

    EXACT = "exact"
    COUNTSKETCH = "countsketch"
    GAUSSIAN = "gaussian"
    RADEMACHER = "rademacher"
    KRONECKER = "kronecker"


_SLICE = re.compile(r"^(?P<name>.+)@(?P<offset>\d+)$")


def parse_tensor_name(key: str) -> tuple[str, int]:
    """Split an upload's tensor name ``param`` or ``param@offset`` into ``(param, offset)``."""
    match = _SLICE.match(key)
    if match is None:
        return key, 0
    return match.group("name"), int(match.group("offset"))


class Sketcher(ABC):
    """A linear map ``Phi: R^N -> R^k`` over named parameters.

    Parameters
    ----------
    dim:
        The sketch dimension ``k``.
    seed:
        The run's seed; with the parameter name and flat index it fixes every column.
    parameters:
        Optional declared shapes ``{name: shape}``.  Required by kinds whose columns
        depend on the shape (``kronecker``) or on the global layout (``exact``).
    """

    kind: SketchKind

    def __init__(self, dim: int, seed: int, parameters: Mapping[str, Sequence[int]] | None = None):
        if dim <= 0:
            raise ValueError(f"sketch dimension must be positive, got {dim}")
        self.dim = int(dim)
        self.seed = int(seed)
        self.parameters: dict[str, Shape] | None = (
            None if parameters is None else {k: tuple(int(s) for s in v) for k, v in parameters.items()}
        )

    @abstractmethod
    def sketch_slice(self, name: str, values: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Sketch a flat slice of one parameter for a batch of rows.

        ``values``: ``[n, d]`` (any float dtype, any device), the flat entries
        ``offset .. offset + d - 1`` of parameter ``name`` for ``n`` rows.
        Returns ``[n, dim]`` float32 on ``values.device``.
        """

    def sketch(self, gradient: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Sketch a (partial) gradient given as named tensors.

        Keys are ``param`` (values ``[n, *shape]`` or ``[n, numel]``) or ``param@offset``
        (a flat slice ``[n, d]``).  Returns the sum of the per-tensor sketches, ``[n, dim]``
        float32.
        """
        out: torch.Tensor | None = None
        for key, values in gradient.items():
            name, offset = parse_tensor_name(key)
            part = self.sketch_slice(name, values.reshape(values.shape[0], -1), offset)
            out = part if out is None else out + part
        if out is None:
            raise ValueError("empty gradient: nothing to sketch")
        return out

    @abstractmethod
    def variance_factor(self) -> float:
        """``c`` such that ``Var(<Phi a, Phi b>) <= c * (|a|^2 |b|^2 + <a, b>^2)``.

        ``1/k`` for the dense kinds, 0 for ``exact``; see each kind's docstring.
        """
