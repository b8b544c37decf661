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

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from enum import Enum
from typing import ClassVar

import torch

from sketch.hashing import Stream, Workspace
from sketch.names import parse_tensor_name

Shape = tuple[int, ...]


class SketchKind(str, Enum):
    """The sketch families of math.md §7."""

    EXACT = "exact"
    COUNTSKETCH = "countsketch"
    GAUSSIAN = "gaussian"
    RADEMACHER = "rademacher"
    KRONECKER = "kronecker"


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
            None
            if parameters is None
            else {k: tuple(int(s) for s in v) for k, v in parameters.items()}
        )

    @abstractmethod
    def sketch_slice(self, name: str, values: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Sketch a flat slice of one parameter for a batch of rows.

        ``values``: ``[n, d]`` (any float dtype, any device), the flat entries
        ``offset .. offset + d - 1`` of parameter ``name`` for ``n`` rows.
        Returns ``[n, dim]`` float32 on ``values.device``.
        """

    def sketch_scaled_slice(
        self, name: str, values: torch.Tensor, scale: torch.Tensor, offset: int = 0
    ) -> torch.Tensor:
        """:meth:`sketch_slice` of ``values * scale`` (``scale`` ``[d]``, one factor per column:
        an ``adam``-geometry ``sqrt(P)`` slice), the product rounded in ``values``' dtype.

        ``values`` may be overwritten with the product (the caller owns it: a formed block of
        per-sequence gradients is not copied); kinds that can fold the factor into their own
        pass (CountSketch) leave it untouched.
        """
        return self.sketch_slice(name, values.mul_(scale.to(values.device, values.dtype)), offset)

    def sketch_slices(
        self,
        name: str,
        values: torch.Tensor,
        offsets: Sequence[int],
        scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The sum of the sketches of ``m`` slices of one parameter: ``values`` ``[n, m, d]``,
        slice ``j`` the flat entries ``offsets[j] .. offsets[j] + d - 1`` (the rows of an
        embedding's tokens present in a batch), times ``scale[j]`` (``[m, d]``) when given.
        Returns ``[n, dim]`` float32; ``values`` may be overwritten, as by
        :meth:`sketch_scaled_slice`.  CountSketch sketches every slice in one pass."""
        self.check_slices(name, values, offsets)
        out = torch.zeros(values.shape[0], self.dim, dtype=torch.float32, device=values.device)
        for j, offset in enumerate(offsets):
            part = values[:, j]
            if scale is None:
                out += self.sketch_slice(name, part, offset)
            else:
                out += self.sketch_scaled_slice(name, part, scale[j], offset)
        return out

    def sketch(self, gradient: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Sketch a (partial) gradient given as named tensors.

        Keys are ``param`` (values ``[n, *shape]`` or ``[n, numel]``) or ``param@offset``
        (a flat slice ``[n, d]``).  Returns the sum of the per-tensor sketches, ``[n, dim]``
        float32, added in the order of ``(param, offset)``: the rows do not depend on the
        mapping's order, so a trainer's sketch and the service's sketch of the same rows (read
        back from safetensors, whose tensor order is its own) are equal bit for bit.
        """
        out: torch.Tensor | None = None
        for key, values in sorted(gradient.items(), key=lambda kv: parse_tensor_name(kv[0])):
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

    def numel(self, name: str) -> int | None:
        """Declared number of elements of parameter ``name`` (``None`` without declarations).

        Raises ``KeyError`` for a name outside the declared parameters.
        """
        if self.parameters is None:
            return None
        if name not in self.parameters:
            raise KeyError(f"parameter {name!r} is not among the declared parameters")
        return math.prod(self.parameters[name])

    def check_slices(self, name: str, values: torch.Tensor, offsets: Sequence[int]) -> None:
        """Validate ``[n, m, d]`` slices for :meth:`sketch_slices`: one per offset, each as
        :meth:`check_slice` checks it."""
        if values.dim() != 3 or values.shape[1] != len(offsets):
            raise ValueError(f"{name}: expected values [n, {len(offsets)}, d]")
        for offset in offsets:
            self.check_slice(name, values[:, 0], offset)

    def check_slice(self, name: str, values: torch.Tensor, offset: int) -> torch.Tensor:
        """Validate a slice for :meth:`sketch_slice`; returns ``values`` as a 2-D tensor.

        Checks: 2-D floating ``[n, d]``, ``offset >= 0`` and, when shapes are declared,
        ``offset + d <= numel(name)``.
        """
        if values.dim() != 2:
            raise ValueError(f"{name}: expected values [n, d], got shape {tuple(values.shape)}")
        if not values.is_floating_point():
            raise TypeError(f"{name}: expected a floating dtype, got {values.dtype}")
        if offset < 0:
            raise ValueError(f"{name}: negative offset {offset}")
        size = self.numel(name)
        if size is not None and offset + values.shape[1] > size:
            raise ValueError(
                f"{name}: slice [{offset}, {offset + values.shape[1]}) exceeds numel {size}"
            )
        return values


#: Entries of the random matrix generated per block by the dense kinds (a speed/memory
#: trade-off only: results do not depend on it beyond float rounding of the sums).
BLOCK_ENTRIES = 1 << 18


class DenseSketcher(Sketcher):
    """Shared loop of the dense kinds: ``y = scale * sum_blocks X_block @ E_block``.

    Subclasses name the generator of their unscaled entries ``E[c, r]`` (``Phi[r, c] =
    scale * E[c, r]``) of a run of consecutive coordinates, :attr:`entries`
    (:mod:`sketch.hashing`), and its hash :attr:`stream`.  The matrix is generated in
    blocks of ``max(1, block_entries // dim)`` coordinates and multiplied into the rows at
    once (TRAK-style amortisation over the ``n`` rows), so memory stays ``O(block_entries)``
    whatever the parameter size.
    """

    #: the hash stream of the kind's entries (``sketch.hashing.Stream``)
    stream: ClassVar[Stream]

    #: the kind's generator of unscaled entries, ``(seed, name, stream, start, count, rows,
    #: device, allow_compile, ws) -> [count, rows]`` float32 (``sketch.hashing.gaussian_columns``,
    #: ``sign_columns``)
    entries: ClassVar[Callable[..., torch.Tensor]]

    def __init__(
        self,
        dim: int,
        seed: int,
        parameters: Mapping[str, Sequence[int]] | None = None,
        block_entries: int = BLOCK_ENTRIES,
    ):
        super().__init__(dim, seed, parameters)
        self.block_coords = max(1, int(block_entries) // self.dim)
        self.scale = 1.0 / math.sqrt(self.dim)

    def columns(
        self,
        name: str,
        start: int,
        count: int,
        device: torch.device,
        workspace: Workspace | None = None,
    ) -> torch.Tensor:
        """Unscaled entries for flat indices ``start .. start + count - 1`` of ``name``.

        Returns ``[count, dim]`` float32 on ``device``: row ``c`` is column
        ``start + c`` of ``Phi`` divided by ``scale`` (a view into ``workspace`` when given,
        valid until its next use), made by the kind's :attr:`entries` from its :attr:`stream`.
        """
        # only full blocks take the compiled path: one compiled shape per sketcher
        full = count == self.block_coords
        return self.entries(
            self.seed, name, self.stream, start, count, self.dim, device, full, workspace
        )

    def variance_factor(self) -> float:
        return 1.0 / self.dim

    def matrix(
        self, name: str, start: int, count: int, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """``Phi[:, start:start + count]`` for parameter ``name``: ``[dim, count]`` float32."""
        return (self.columns(name, start, count, torch.device(device)) * self.scale).T

    def sketch_slice(self, name: str, values: torch.Tensor, offset: int = 0) -> torch.Tensor:
        values = self.check_slice(name, values, offset)
        n, d = values.shape
        out = torch.zeros(n, self.dim, dtype=torch.float32, device=values.device)
        workspace = Workspace()
        for c0 in range(0, d, self.block_coords):
            c1 = min(d, c0 + self.block_coords)
            block = self.columns(name, offset + c0, c1 - c0, values.device, workspace)
            out.addmm_(values[:, c0:c1].to(torch.float32), block)
        return out.mul_(self.scale)
