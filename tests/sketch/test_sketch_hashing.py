"""The counter-based hashing of sketch/hashing.py: test vectors (docs/sketch.md), the torch
implementation against the pure-Python reference, bit balance, and cross-process determinism."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sketch import hashing as hs
from sketch.countsketch import CountSketch
from sketch.gaussian import GaussianSketch
from sketch.rademacher import RademacherSketch

NAME = "layer.weight"


def test_mix32_vectors() -> None:
    assert [hs.mix32_int(x) for x in (0, 1, 2, 0xFFFFFFFF)] == [
        0x0,
        0x86D2FA73,
        0x0DA7F4E7,
        0x99B5E683,
    ]


def test_mix32_torch_matches_python_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 1 << 32, (4096,), dtype=torch.int64, generator=gen)
    x[:4] = torch.tensor([0, 1, 0xFFFFFFFF, 0x80000000])
    got = hs.mix32(x).tolist()
    assert got == [hs.mix32_int(v) for v in x.tolist()]
    assert min(got) >= 0 and max(got) <= 0xFFFFFFFF  # int64 never overflowed into the sign


def test_name_and_key_vectors() -> None:
    assert hs.name_id(NAME) == 0xFB926D0D7D46D9AB
    assert hs.name_id("") == 0xB4B2797457A0A6E4
    assert hs.name_id("ñ") == 0x8EB4717CF45DBBC2
    assert hs.derive_key(42, NAME, hs.Stream.COUNTSKETCH, 0) == 0xD4F89F25
    assert hs.derive_key(42, NAME, hs.Stream.COUNTSKETCH, 1) == 0x2BDFB932
    assert hs.row_keys(2).tolist() == [0x64625032, 0xEB721C8A]


def test_coordinate_hash_bucket_sign_vectors() -> None:
    expected = {0: (0x43EB6860, 265), 1: (0x013D748C, 4), 2: (0x5A70586E, 353)}
    expected[(1 << 32) + 5] = (0x04096B92, 15)
    sketch = CountSketch(1000, 42)
    for index, (hash_value, bucket) in expected.items():
        assert int(hs.coord_hash(42, NAME, hs.Stream.COUNTSKETCH, index, 1)) == hash_value
        b, s = sketch.buckets_signs(NAME, index, 1)
        assert (int(b), float(s)) == (bucket, 1.0)
    # a run of indices crossing 2^32 equals the indices hashed one by one
    run = hs.coord_hash(42, NAME, hs.Stream.COUNTSKETCH, (1 << 32) - 2, 4)
    singles = [int(hs.coord_hash(42, NAME, 1, (1 << 32) - 2 + i, 1)) for i in range(4)]
    assert run.tolist() == singles


def test_gaussian_table_and_entry_vectors() -> None:
    t = hs.gaussian_table()
    assert t[0].item() == pytest.approx(-4.324963092803955, abs=1e-6)
    assert t[12345].item() == pytest.approx(-0.88390052318573, abs=1e-6)
    assert torch.equal(t, -t.flip(0))
    m2, m4 = hs.gaussian_moments()
    assert m2 == pytest.approx(1.0, abs=1e-6) and m4 == pytest.approx(2.99925, abs=1e-4)
    cols = GaussianSketch(4, 42).columns(NAME, 0, 3, torch.device("cpu"))
    expected = [
        [-0.3969307243824005, -0.10051392763853073, 0.311869353055954, -0.3140786290168762],
        [-0.2042234092950821, -0.009504895657300949, 1.0211142301559448, 1.0843522548675537],
        [0.5468022227287292, -1.807652473449707, -0.3394163250923157, -0.6666185259819031],
    ]
    torch.testing.assert_close(cols, torch.tensor(expected), rtol=0, atol=1e-6)


def test_rademacher_entry_vectors_and_bit_recipe() -> None:
    cols = RademacherSketch(40, 42).columns(NAME, 0, 2, torch.device("cpu"))
    first = "++---++++++---+-+--++--++--+-+-" + "-++++--++"
    assert "".join("+" if v > 0 else "-" for v in cols[0].tolist()) == first
    # recipe: entry r of coordinate c is 1 - 2 * bit_{r % 32}(mix32(coord_hash ^ row_key(r // 32)))
    hashes = hs.coord_hash(42, NAME, hs.Stream.RADEMACHER, 0, 2)
    for c in range(2):
        for r in range(40):
            word = hs.mix32_int(int(hashes[c]) ^ hs.mix32_int(r // 32 ^ hs.ROW_SALT))
            assert cols[c, r].item() == 1.0 - 2.0 * ((word >> (r % 32)) & 1)


def test_gaussian_recipe_from_words() -> None:
    cols = GaussianSketch(6, 3).columns("x", 10, 5, torch.device("cpu"))
    table = hs.gaussian_table()
    hashes = hs.coord_hash(3, "x", hs.Stream.GAUSSIAN, 10, 5)
    for c in range(5):
        for r in range(6):
            word = hs.mix32_int(int(hashes[c]) ^ hs.mix32_int(r // 2 ^ hs.ROW_SALT))
            half = word >> 16 if r % 2 == 0 else word & 0xFFFF
            assert cols[c, r].item() == table[half].item()


def test_bits_balanced() -> None:
    h = hs.coord_hash(7, "p", hs.Stream.COUNTSKETCH, 0, 1 << 16)
    bits = ((h[:, None] >> torch.arange(32)) & 1).float().mean(0)
    assert bits.sub(0.5).abs().max().item() < 0.01  # 4 sigma is 0.0078
    words = hs.entry_words(h[:2048], hs.row_keys(32))
    bits = ((words.reshape(-1, 1) >> torch.arange(32)) & 1).float().mean(0)
    assert bits.sub(0.5).abs().max().item() < 0.01


@pytest.mark.parametrize("seed", [-1, 1 << 64, 1.5])
def test_bad_seeds_rejected(seed: object) -> None:
    with pytest.raises(ValueError):
        hs.derive_key(seed, "x", 1)  # type: ignore[arg-type]


_CHILD = textwrap.dedent(
    """
    import json, sys, hashlib, torch
    from sketch.spec import SketchSpec, build_sketcher
    params = {"w": (7, 9), "b": (9,)}
    gen = torch.Generator().manual_seed(5)
    grad = {k: torch.randn(3, *v, generator=gen) for k, v in params.items()}
    out = {}
    for kind in ["exact", "countsketch", "gaussian", "rademacher", "kronecker"]:
        y = build_sketcher(SketchSpec(kind, 16, 2**40 + 3), params).sketch(grad)
        out[kind] = hashlib.sha256(y.contiguous().numpy().tobytes()).hexdigest()
    print(json.dumps(out))
    """
)


def test_identical_across_processes() -> None:
    """A fresh interpreter (another hash salt) computes bit-identical sketches."""
    root = Path(__file__).resolve().parents[2]
    child = subprocess.run(
        [sys.executable, "-c", _CHILD],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "12345", "PATH": "", "PYTHONPATH": str(root)},
    )
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        exec(_CHILD, {})
    here = json.loads(buffer.getvalue())
    assert json.loads(child.stdout) == here
    assert len(set(here.values())) == 5
