"""Per-group sketches: ``y = [y_g1 | y_g2 | ... | y_default]`` so that ``K = sum_g K_g``.

Each parameter is routed to the first group (in spec order) whose pattern (RE2) fully matches
its name; names matching none go to the implicit last group ``"default"`` of width
``spec.dim``.  Group ``g`` is sketched by its own sketcher of the spec's kind, width
``g.dim`` and the spec's seed (for ``exact``: the group's parameters in declared order), and
occupies the columns ``group_slices()[g]`` of the output, so the per-group kernels
``K_g = Y[:, s_g] Y[:, s_g]^T`` add up to ``K = Y Y^T``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from sketch.base import Sketcher, SketchKind
from sketch.spec import DEFAULT_GROUP, SketchSpec, make_sketcher


class GroupedSketcher(Sketcher):
    """Concatenation of per-group sketches; ``dim`` = ``total_dim`` = sum of group widths."""

    def __init__(self, spec: SketchSpec, parameters: Mapping[str, Sequence[int]] | None = None):
        self.spec = spec
        self.kind = spec.kind
        self._routes: dict[str, str] = {}
        group_dims = {g.name: g.dim for g in spec.groups}
        group_dims[DEFAULT_GROUP] = spec.dim
        members: dict[str, dict[str, tuple[int, ...]] | None] = {
            name: (None if parameters is None else {}) for name in group_dims
        }
        if parameters is not None:
            for pname, shape in parameters.items():
                group = members[self.route(pname)]
                assert group is not None
                group[pname] = tuple(int(s) for s in shape)
        self.sketchers: dict[str, Sketcher | None] = {}
        self._slices: dict[str, slice] = {}
        start = 0
        for name, dim in group_dims.items():
            params = members[name]
            if spec.kind == SketchKind.EXACT and params is not None and not params:
                sub: Sketcher | None = None  # an exact group without parameters has width 0
            else:
                sub = make_sketcher(spec.kind, dim, spec.seed, params)
            width = 0 if sub is None else sub.dim
            self.sketchers[name] = sub
            self._slices[name] = slice(start, start + width)
            start += width
        self.total_dim = start
        super().__init__(start, spec.seed, parameters)

    def route(self, param_name: str) -> str:
        """The group of a parameter (its name without ``@offset``)."""
        group = self._routes.get(param_name)
        if group is None:
            group = next((g.name for g in self.spec.groups if g.matches(param_name)), DEFAULT_GROUP)
            self._routes[param_name] = group
        return group

    def group_slices(self) -> dict[str, slice]:
        """Column range of each group in the output (spec order, ``"default"`` last)."""
        return dict(self._slices)

    def sketch_slice(self, name: str, values: torch.Tensor, offset: int = 0) -> torch.Tensor:
        values = self.check_slice(name, values, offset)
        return self._placed(name, values, lambda sub: sub.sketch_slice(name, values, offset))

    def sketch_scaled_slice(
        self, name: str, values: torch.Tensor, scale: torch.Tensor, offset: int = 0
    ) -> torch.Tensor:
        values = self.check_slice(name, values, offset)
        return self._placed(
            name, values, lambda sub: sub.sketch_scaled_slice(name, values, scale, offset)
        )

    def sketch_slices(
        self,
        name: str,
        values: torch.Tensor,
        offsets: Sequence[int],
        scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self._placed(
            name, values, lambda sub: sub.sketch_slices(name, values, offsets, scale)
        )

    def _placed(
        self, name: str, values: torch.Tensor, sketch: Callable[[Sketcher], torch.Tensor]
    ) -> torch.Tensor:
        """``[n, dim]``: ``sketch`` by the group of ``name``, in that group's columns."""
        group = self.route(name)
        sub = self.sketchers[group]
        assert sub is not None  # only an exact group without declared members is empty
        out = torch.zeros(values.shape[0], self.dim, dtype=torch.float32, device=values.device)
        out[:, self._slices[group]] = sketch(sub)
        return out

    def group_variance_factors(self) -> dict[str, float]:
        """Each non-empty group's :meth:`Sketcher.variance_factor`."""
        return {g: s.variance_factor() for g, s in self.sketchers.items() if s is not None}

    def variance_factor(self) -> float:
        """The largest group factor: per-group variances add, and the per-group
        ``|a_g|^2 |b_g|^2 + <a_g, b_g>^2`` sum to at most ``|a|^2 |b|^2 + <a, b>^2``."""
        return max(self.group_variance_factors().values(), default=0.0)
