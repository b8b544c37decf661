"""Grouped sketches: routing by pattern (first match wins, the rest to "default"), column
layout, per-group kernels summing to the full kernel, and agreement with the ungrouped
sketcher of each group."""

from __future__ import annotations

import pytest
import torch

from sketch.groups import GroupedSketcher
from sketch.spec import GroupSpec, SketchSpec, build_sketcher, make_sketcher

PARAMS = {
    "model.layers.0.attn.q.weight": (6, 4),
    "model.layers.0.mlp.up.weight": (8, 4),
    "model.layers.0.attn.q.bias": (6,),
    "lm_head.weight": (5, 4),
}
GROUPS = (
    GroupSpec("attn", r".*\.attn\..*", 8),
    GroupSpec("mlp", r".*\.mlp\..*|.*attn.*", 12),  # attn names match "attn" first
)


def _grad(n: int = 4) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(n, *v, generator=gen) for k, v in PARAMS.items()}


@pytest.mark.parametrize("kind", ["exact", "countsketch", "gaussian", "rademacher", "kronecker"])
def test_group_kernels_sum_to_full_kernel(kind: str) -> None:
    sketcher = build_sketcher(SketchSpec(kind, 16, 3, GROUPS), PARAMS)
    assert isinstance(sketcher, GroupedSketcher)
    grad = _grad()
    y = sketcher.sketch(grad).double()
    slices = sketcher.group_slices()
    assert list(slices) == ["attn", "mlp", "default"]
    assert sketcher.dim == sketcher.total_dim == y.shape[1] == max(s.stop for s in slices.values())
    full = y @ y.T
    parts = sum(y[:, s] @ y[:, s].T for s in slices.values())
    torch.testing.assert_close(parts, full)
    # each group's columns are that group's own sketch of its parameters
    for group, members in [
        ("attn", ["model.layers.0.attn.q.weight", "model.layers.0.attn.q.bias"]),
        ("mlp", ["model.layers.0.mlp.up.weight"]),
        ("default", ["lm_head.weight"]),
    ]:
        dim = {"attn": 8, "mlp": 12, "default": 16}[group]
        own = make_sketcher(kind, dim, 3, {m: PARAMS[m] for m in members})
        expected = own.sketch({m: grad[m] for m in members}).double()
        torch.testing.assert_close(y[:, slices[group]], expected)


def test_routing_first_match_and_default() -> None:
    sketcher = build_sketcher(SketchSpec("countsketch", 16, 0, GROUPS), PARAMS)
    assert isinstance(sketcher, GroupedSketcher)
    assert sketcher.route("model.layers.0.attn.q.weight") == "attn"
    assert sketcher.route("model.layers.0.mlp.up.weight") == "mlp"
    assert sketcher.route("lm_head.weight") == "default"
    # fullmatch, not search: a pattern matching only a substring does not route
    partial = build_sketcher(SketchSpec("countsketch", 4, 0, (GroupSpec("g", "attn", 4),)))
    assert isinstance(partial, GroupedSketcher)
    assert partial.route("x.attn.y") == "default" and partial.route("attn") == "g"
    assert sketcher.group_slices() == {
        "attn": slice(0, 8),
        "mlp": slice(8, 20),
        "default": slice(20, 36),
    }


def test_grouped_slices_add_up_and_land_in_their_group() -> None:
    sketcher = build_sketcher(SketchSpec("gaussian", 16, 3, GROUPS), PARAMS)
    assert isinstance(sketcher, GroupedSketcher)
    grad = _grad()
    name = "model.layers.0.mlp.up.weight"
    flat = grad[name].reshape(4, -1)
    whole = sketcher.sketch({name: grad[name]})
    parts = sketcher.sketch({name: flat[:, :10]}) + sketcher.sketch({f"{name}@10": flat[:, 10:]})
    torch.testing.assert_close(parts, whole)
    outside = [s for g, s in sketcher.group_slices().items() if g != "mlp"]
    assert all(whole[:, s].abs().sum() == 0 for s in outside)


@pytest.mark.parametrize("kind", ["exact", "countsketch", "gaussian", "kronecker"])
def test_scaled_slices_are_the_sketch_of_the_product(kind: str) -> None:
    """``sketch_scaled_slice`` (an ``adam`` row's ``sqrt(P)`` per column) equals the sketch of
    the scaled slice, bit for bit, through the group's own sketcher and into its columns."""
    sketcher = build_sketcher(SketchSpec(kind, 16, 3, GROUPS), PARAMS)
    name = "model.layers.0.mlp.up.weight"
    values = _grad()[name].reshape(4, -1)[:, 5:]
    scale = torch.rand(values.shape[1], generator=torch.Generator().manual_seed(1)) + 0.5
    want = sketcher.sketch_slice(name, values * scale, 5)
    got = sketcher.sketch_scaled_slice(name, values.clone(), scale, 5)
    assert torch.equal(got, want)


@pytest.mark.parametrize("kind", ["exact", "countsketch", "gaussian", "kronecker"])
@pytest.mark.parametrize("scaled", [False, True])
def test_slices_at_once_are_the_sum_of_their_sketches(kind: str, scaled: bool) -> None:
    """``sketch_slices`` (several slices of one parameter: an embedding's present rows) is the
    sum of the slices' own sketches, through the group's sketcher and into its columns."""
    sketcher = build_sketcher(SketchSpec(kind, 16, 3, GROUPS), PARAMS)
    name = "model.layers.0.mlp.up.weight"
    gen = torch.Generator().manual_seed(2)
    values = torch.randn(4, 3, 4, generator=gen)
    offsets = [0, 8, 28]
    scale = torch.rand(3, 4, generator=gen) + 0.5 if scaled else None
    want = sum(
        sketcher.sketch_slice(name, values[:, j] * (1.0 if scale is None else scale[j]), offset)
        for j, offset in enumerate(offsets)
    )
    got = sketcher.sketch_slices(name, values.clone(), offsets, scale)
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError):
        sketcher.sketch_slices(name, values, offsets[:2])


def test_exact_groups_use_numels_and_variance_factors() -> None:
    exact = build_sketcher(SketchSpec("exact", 1, 0, GROUPS), PARAMS)
    assert isinstance(exact, GroupedSketcher)
    assert exact.group_slices() == {
        "attn": slice(0, 30),
        "mlp": slice(30, 62),
        "default": slice(62, 82),
    }
    assert exact.variance_factor() == 0.0
    dense = build_sketcher(SketchSpec("gaussian", 16, 0, GROUPS), PARAMS)
    assert isinstance(dense, GroupedSketcher)
    assert dense.group_variance_factors() == {"attn": 1 / 8, "mlp": 1 / 12, "default": 1 / 16}
    assert dense.variance_factor() == 1 / 8


def test_exact_group_without_members_is_empty() -> None:
    spec = SketchSpec("exact", 1, 0, (GroupSpec("none", "nothing", 4),))
    sketcher = build_sketcher(spec, {"a": (2, 2)})
    assert isinstance(sketcher, GroupedSketcher)
    assert sketcher.group_slices() == {"none": slice(0, 0), "default": slice(0, 4)}
    y = sketcher.sketch({"a": torch.ones(1, 2, 2)})
    assert torch.equal(y, torch.ones(1, 4))


def test_group_patterns_match_in_linear_time() -> None:
    """Group patterns come from API users and run in the API and the workers: they are
    matched by RE2, in time linear in the name.  ``(a+)+b`` against 40 ``a``s and a ``c``
    takes 2^40 steps in a backtracking engine (Python's ``re``, which this used); here it is
    checked in a child process that must finish well within a minute."""
    import subprocess
    import sys

    code = (
        "from sketch.spec import GroupSpec, SketchSpec\n"
        "from sketch.groups import GroupedSketcher\n"
        "g = GroupSpec('evil', r'(a+)+b', 8)\n"
        "assert not g.matches('a' * 40 + 'c') and g.matches('aaab')\n"
        "spec = SketchSpec('countsketch', 8, 0, (g,))\n"
        "GroupedSketcher(spec, {'a' * 40 + 'c': [3], 'aab': [2]})\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr


def test_patterns_outside_re2_are_refused() -> None:
    """Backreferences and lookarounds need backtracking: refused with the reason."""
    for pattern in (r"(a)\1", r"a(?=b)"):
        with pytest.raises(ValueError, match="RE2"):
            GroupSpec("g", pattern, 8)
