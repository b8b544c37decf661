"""CPU = CUDA: the same spec gives the same sketches on a CUDA device.

Bit-identical for the random matrices of every kind (integer hashing) and for the outputs of
``exact`` and ``countsketch`` (float64 scatter-add); to float rounding for the GEMM-based
kinds (``gaussian``, ``rademacher``, ``kronecker``: cuBLAS and the CPU BLAS add in different
orders).  Skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch

from sketch import hashing as hs
from sketch.countsketch import CountSketch
from sketch.gaussian import GaussianSketch
from sketch.kronecker import KroneckerSketch
from sketch.rademacher import RademacherSketch
from sketch.spec import GroupSpec, SketchSpec, build_sketcher

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

PARAMS = {"w": (64, 96), "conv": (8, 4, 3, 3), "b": (96,), "big": (200_003,)}
CUDA = torch.device("cuda")


def _grad(n: int = 16) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(n, *v, generator=gen) for k, v in PARAMS.items()}


def test_hashes_and_tables_bit_identical() -> None:
    for start in (0, (1 << 32) - 100):
        cpu = hs.coord_hash(9, "w", hs.Stream.GAUSSIAN, start, 1000)
        gpu = hs.coord_hash(9, "w", hs.Stream.GAUSSIAN, start, 1000, CUDA)
        assert torch.equal(cpu, gpu.cpu())
    assert torch.equal(hs.gaussian_table(), hs.gaussian_table(CUDA).cpu())
    assert torch.equal(hs.sign_table(), hs.sign_table(CUDA).cpu())


@pytest.mark.parametrize("cls", [GaussianSketch, RademacherSketch])
def test_dense_matrices_bit_identical(cls: type[GaussianSketch]) -> None:
    sketcher = cls(1000, 123)
    cpu = sketcher.matrix("w", 17, 300)
    gpu = sketcher.matrix("w", 17, 300, CUDA)
    assert torch.equal(cpu, gpu.cpu())


def test_countsketch_and_kronecker_factors_bit_identical() -> None:
    cs = CountSketch(1000, 5)
    for a, b in zip(
        cs.buckets_signs("w", 3, 5000), cs.buckets_signs("w", 3, 5000, CUDA), strict=True
    ):
        assert torch.equal(a, b.cpu())
    kr = KroneckerSketch(1024, 5, PARAMS)
    for a, b in zip(kr.factors("w"), kr.factors("w", CUDA), strict=True):
        assert torch.equal(a, b.cpu())


@pytest.mark.parametrize("kind", ["exact", "countsketch"])
def test_exact_and_countsketch_outputs_bit_identical(kind: str) -> None:
    sketcher = build_sketcher(SketchSpec(kind, 512, 11), PARAMS)
    grad = _grad()
    cpu = sketcher.sketch(grad)
    gpu = sketcher.sketch({k: v.to(CUDA) for k, v in grad.items()})
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float32
    assert torch.equal(cpu, gpu.cpu())


@pytest.mark.parametrize("kind", ["gaussian", "rademacher", "kronecker"])
def test_dense_outputs_equal_to_rounding(kind: str) -> None:
    sketcher = build_sketcher(SketchSpec(kind, 1024, 11), PARAMS)
    grad = _grad()
    cpu = sketcher.sketch(grad)
    gpu = sketcher.sketch({k: v.to(CUDA) for k, v in grad.items()})
    assert gpu.device.type == "cuda"
    scale = float(cpu.abs().max())
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-5 * scale)


def test_grouped_and_sliced_on_cuda() -> None:
    spec = SketchSpec("countsketch", 256, 1, (GroupSpec("mats", "w|conv", 128),))
    sketcher = build_sketcher(spec, PARAMS)
    grad = _grad(4)
    flat = grad["big"].to(CUDA)
    parts = sketcher.sketch({"big": flat[:, :70_000]}) + sketcher.sketch(
        {"big@70000": flat[:, 70_000:]}
    )
    torch.testing.assert_close(parts.cpu(), sketcher.sketch({"big": grad["big"]}))
    assert torch.equal(
        sketcher.sketch({"w": grad["w"].to(CUDA)}).cpu(), sketcher.sketch({"w": grad["w"]})
    )
