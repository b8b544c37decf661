"""The sketch specification of a run and the factory that turns it into a :class:`Sketcher`.

A run fixes ``SketchSpec(kind, dim, seed, groups)`` once; every process that builds a
sketcher from the same spec (and the same declared parameter shapes) computes the same
linear map, so :func:`sketcher_for` builds it once per process and spec.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import re2

from sketch.base import Sketcher, SketchKind
from sketch.hashing import check_seed

DEFAULT_GROUP = "default"


def compile_pattern(pattern: str) -> Any:
    """``pattern`` compiled by RE2 (google-re2), whose matching takes time linear in the name
    whatever the pattern: group patterns come from API users and run in the API and in the
    workers, where a backtracking engine's ``(a+)+b`` could hold a thread for minutes.  RE2
    has no backreferences or lookarounds; such a pattern raises ``ValueError``."""
    options = re2.Options()
    options.log_errors = False
    try:
        return re2.compile(pattern, options)
    except re2.error as exc:
        message = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else exc
        raise ValueError(f"invalid pattern {pattern!r} (RE2 syntax): {message}") from None


@dataclass(frozen=True)
class GroupSpec:
    """A parameter group: parameters whose name fully matches ``pattern`` (RE2 syntax,
    :func:`compile_pattern`) get their own sketch of width ``dim`` (ignored by the ``exact``
    kind, whose width is the group's numel)."""

    name: str
    pattern: str
    dim: int
    _regex: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.name or self.name == DEFAULT_GROUP:
            raise ValueError(f"invalid group name {self.name!r} ({DEFAULT_GROUP!r} is reserved)")
        try:
            object.__setattr__(self, "_regex", compile_pattern(self.pattern))
        except ValueError as exc:
            raise ValueError(f"group {self.name!r}: {exc}") from None
        if not isinstance(self.dim, int) or self.dim <= 0:
            raise ValueError(f"group {self.name!r}: dim must be a positive integer")

    def matches(self, param_name: str) -> bool:
        """Whether ``param_name`` (without ``@offset``) belongs to this group's pattern."""
        return self._regex.fullmatch(param_name) is not None


@dataclass(frozen=True)
class SketchSpec:
    """``kind``, ``dim`` (``k``; for ``exact`` ignored), ``seed`` (in ``[0, 2^64)``) and
    optional ``groups``: parameters matching none go to a group named ``"default"`` with
    width ``dim``."""

    kind: SketchKind
    dim: int
    seed: int
    groups: tuple[GroupSpec, ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", SketchKind(self.kind))
        groups = tuple(g if isinstance(g, GroupSpec) else GroupSpec(**dict(g)) for g in self.groups)
        object.__setattr__(self, "groups", groups)
        if not isinstance(self.dim, int) or isinstance(self.dim, bool) or self.dim <= 0:
            raise ValueError(f"sketch dim must be a positive integer, got {self.dim!r}")
        check_seed(self.seed)
        names = [g.name for g in groups]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate group names in {names}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form ``{"kind", "dim", "seed", "groups": [{"name", "pattern", "dim"}]}``."""
        return {
            "kind": self.kind.value,
            "dim": self.dim,
            "seed": self.seed,
            "groups": [{"name": g.name, "pattern": g.pattern, "dim": g.dim} for g in self.groups],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SketchSpec:
        """Inverse of :meth:`to_dict` (``groups`` optional)."""
        return cls(
            kind=SketchKind(data["kind"]),
            dim=int(data["dim"]),
            seed=int(data["seed"]),
            groups=tuple(GroupSpec(**dict(g)) for g in data.get("groups") or ()),
        )


def make_sketcher(
    kind: SketchKind | str, dim: int, seed: int, parameters: Mapping[str, Sequence[int]] | None
) -> Sketcher:
    """One ungrouped sketcher of ``kind``."""
    from sketch.countsketch import CountSketch
    from sketch.exact import ExactSketch
    from sketch.gaussian import GaussianSketch
    from sketch.kronecker import KroneckerSketch
    from sketch.rademacher import RademacherSketch

    classes: dict[SketchKind, type[Sketcher]] = {
        SketchKind.EXACT: ExactSketch,
        SketchKind.COUNTSKETCH: CountSketch,
        SketchKind.GAUSSIAN: GaussianSketch,
        SketchKind.RADEMACHER: RademacherSketch,
        SketchKind.KRONECKER: KroneckerSketch,
    }
    return classes[SketchKind(kind)](dim, seed, parameters)


def build_sketcher(
    spec: SketchSpec, parameters: Mapping[str, Sequence[int]] | None = None
) -> Sketcher:
    """The sketcher of ``spec``: a :class:`~sketch.groups.GroupedSketcher` when the spec has
    groups, else the kind's class.  ``exact`` and ``kronecker`` need ``parameters``
    (``ValueError`` without).  ``sketcher.dim`` is the total output width."""
    if spec.groups:
        from sketch.groups import GroupedSketcher

        return GroupedSketcher(spec, parameters)
    return make_sketcher(spec.kind, spec.dim, spec.seed, parameters)


#: Sketchers kept by :func:`sketcher_for`: one per run spec a process sees, and a process sees
#: few at a time (a worker serves the runs being trained; the API the ones being queried).
MEMO_SKETCHERS = 64

Shapes = tuple[tuple[str, tuple[int, ...]], ...]


def sketcher_for(
    spec: SketchSpec | Mapping[str, Any], parameters: Mapping[str, Sequence[int]] | None = None
) -> Sketcher:
    """:func:`build_sketcher` of ``spec`` (a :class:`SketchSpec` or its :meth:`~SketchSpec.
    to_dict` form) and ``parameters``, memoised per ``(spec, parameters)`` in this process.

    Building can cost far more than sketching one upload (the ``exact`` column layout, the
    ``kronecker`` factors, RE2 group patterns); the result depends on nothing else, and a
    sketcher is a read-only linear map, so one instance serves every caller and thread.
    ``parameters`` keeps its order (it is the ``exact`` kind's column layout).
    """
    if not isinstance(spec, SketchSpec):
        spec = SketchSpec.from_dict(spec)
    shapes = None
    if parameters is not None:
        shapes = tuple(
            (str(name), tuple(int(s) for s in shape)) for name, shape in parameters.items()
        )
    return _memoised_sketcher(spec, shapes)


@lru_cache(maxsize=MEMO_SKETCHERS)
def _memoised_sketcher(spec: SketchSpec, shapes: Shapes | None) -> Sketcher:
    return build_sketcher(spec, None if shapes is None else dict(shapes))
