"""Counter-based integer hashing: every sketch entry is a pure function of its coordinates.

All random numbers of ``sketch/`` come from one 32-bit mixing function, evaluated with
torch ``int64`` tensors on the device of the data (or with Python integers for the few
per-parameter keys), so that a column ``Phi[:, coord]`` is identical on every process,
machine, CPU or CUDA device, whatever the block size, chunking or GPU size.

The mixer (``mix32``) is the 32-bit "lowbias32"-family permutation found with Chris
Wellons' hash prospector (constants ``0x21F0AAAD``, ``0x735A2D97``, shifts 16, 15, 15)::

    x ^= x >> 16;  x = (x * 0x21F0AAAD) mod 2^32
    x ^= x >> 15;  x = (x * 0x735A2D97) mod 2^32
    x ^= x >> 15

Both multipliers are below ``2^31`` and ``x < 2^32``, so every product is below ``2^63``:
the ``int64`` arithmetic never overflows and no signed-overflow behaviour is relied on.

Keys and coordinates (see docs/sketch.md for the full recipe and test vectors):

* ``name_id(name)`` = the 8-byte BLAKE2b digest of the UTF-8 name, read little-endian.
* ``derive_key(seed, name, stream, hi)`` folds the 32-bit words
  ``seed_lo, seed_hi, name_lo, name_hi, stream, hi`` into one 32-bit key:
  ``h = FOLD_INIT; for w in words: h = mix32(h ^ w)``.
* a coordinate with flat index ``i`` of parameter ``name`` hashes to
  ``coord_hash = mix32((i mod 2^32) ^ derive_key(seed, name, stream, i >> 32))``.
* dense kinds draw one 32-bit word per (coordinate, word index ``j``):
  ``word = mix32(coord_hash ^ row_key(j))`` with ``row_key(j) = mix32(j ^ ROW_SALT)``.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import warnings
from collections.abc import Callable, Iterable
from enum import IntEnum

import torch

from sketch import cpu_kernels

MASK32 = 0xFFFFFFFF
MUL1 = 0x21F0AAAD
MUL2 = 0x735A2D97
FOLD_INIT = 0x6A09E667
ROW_SALT = 0x9E3779B9
MAX_SEED = 1 << 64


class Workspace:
    """Reusable scratch buffers for the per-block generators.

    Generating a block allocates several megabytes of temporaries; reusing them across the
    blocks of one call avoids re-faulting fresh pages for every block (a large share of the
    time on CPU).  Tensors returned through a workspace are views into it, valid until the
    next block is generated.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(
        self, key: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """A tensor of ``shape`` (uninitialised), backed by a buffer reused across calls."""
        numel = math.prod(shape)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            buf = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[key] = buf
        return buf[:numel].view(shape)


def _scratch(
    ws: Workspace | None, key: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    if ws is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return ws.get(key, shape, dtype, device)


class Stream(IntEnum):
    """Independent random streams; a stream id is one of the words folded into a key."""

    COUNTSKETCH = 1
    GAUSSIAN = 2
    RADEMACHER = 3
    KRONECKER_A = 4
    KRONECKER_B = 5


def mix32_int(x: int) -> int:
    """``mix32`` on a Python integer in ``[0, 2^32)`` (the reference implementation)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * MUL1) & MASK32
    x ^= x >> 15
    x = (x * MUL2) & MASK32
    x ^= x >> 15
    return x


def mix32(x: torch.Tensor) -> torch.Tensor:
    """``mix32`` elementwise on an ``int64`` tensor whose values lie in ``[0, 2^32)``.

    Returns a new ``int64`` tensor with values in ``[0, 2^32)``; bit-identical to
    :func:`mix32_int` on every device.
    """
    x = x ^ (x >> 16)
    x = x.mul_(MUL1).bitwise_and_(MASK32)
    x = x.bitwise_xor_(x >> 15)
    x = x.mul_(MUL2).bitwise_and_(MASK32)
    return x.bitwise_xor_(x >> 15)


def name_id(name: str) -> int:
    """Stable 64-bit id of a parameter name: BLAKE2b-64 of its UTF-8 bytes, little-endian.

    Never Python's ``hash()``, which is salted per process.
    """
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def fold_words(words: Iterable[int]) -> int:
    """Fold 32-bit words into one 32-bit key: ``h = FOLD_INIT; h = mix32(h ^ w)`` per word."""
    h = FOLD_INIT
    for w in words:
        if not 0 <= w <= MASK32:
            raise ValueError(f"word {w} is not a 32-bit unsigned integer")
        h = mix32_int(h ^ w)
    return h


def check_seed(seed: int) -> int:
    """Validate a seed: an integer in ``[0, 2^64)``."""
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < MAX_SEED:
        raise ValueError(f"seed must be an integer in [0, 2^64), got {seed!r}")
    return seed


@functools.lru_cache(maxsize=1 << 14)
def derive_key(seed: int, name: str, stream: int, hi: int = 0) -> int:
    """The 32-bit key of ``(seed, name, stream)`` for flat indices ``hi * 2^32 .. + 2^32 - 1``."""
    check_seed(seed)
    nid = name_id(name)
    return fold_words((seed & MASK32, seed >> 32, nid & MASK32, nid >> 32, int(stream), hi))


def key_chunks(
    seed: int, name: str, stream: int, start: int, count: int
) -> list[tuple[int, int, int, int]]:
    """The flat indices ``start .. start + count - 1`` as runs that share one key:
    ``(c0, c1, lo_start, key)`` per run, covering positions ``c0 .. c1 - 1`` of the range,
    whose hashes are ``mix32((lo_start + c - c0) ^ key)`` (the key changes at multiples of
    ``2^32``, so a run never straddles one)."""
    if start < 0 or count < 0:
        raise ValueError("flat indices must be non-negative")
    chunks = []
    pos, end = start, start + count
    while pos < end:
        hi = pos >> 32
        stop = min(end, (hi + 1) << 32)
        chunks.append((pos - start, stop - start, pos & MASK32, derive_key(seed, name, stream, hi)))
        pos = stop
    return chunks


def coord_hash(
    seed: int, name: str, stream: int, start: int, count: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Hashes of the flat indices ``start .. start + count - 1`` of one parameter.

    Returns ``[count]`` ``int64`` with values in ``[0, 2^32)``:
    ``mix32((i mod 2^32) ^ derive_key(seed, name, stream, i >> 32))``.
    """
    parts = [
        mix32(torch.arange(lo, lo + (c1 - c0), dtype=torch.int64, device=device).bitwise_xor_(key))
        for c0, c1, lo, key in key_chunks(seed, name, stream, start, count)
    ]
    if not parts:
        return torch.empty(0, dtype=torch.int64, device=device)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def row_keys(count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``row_key(j) = mix32(j ^ ROW_SALT)`` for ``j = 0 .. count - 1``: ``[count]`` ``int64``."""
    j = torch.arange(count, dtype=torch.int64, device=device)
    return mix32(j.bitwise_xor_(ROW_SALT))


def entry_words(
    coord_hashes: torch.Tensor, keys: torch.Tensor, ws: Workspace | None = None
) -> torch.Tensor:
    """One 32-bit word per (coordinate, row word): ``mix32(coord_hash[c] ^ row_key[j])``.

    ``coord_hashes``: ``[B]`` int64, ``keys``: ``[W]`` int64.  Returns ``[B, W]`` int64
    (a view into ``ws`` when given).
    """
    shape = (coord_hashes.shape[0], keys.shape[0])
    x = _scratch(ws, "words", shape, torch.int64, coord_hashes.device)
    t = _scratch(ws, "words_tmp", shape, torch.int64, coord_hashes.device)
    # mix32's first step x ^ (x >> 16) is linear over XOR, so it is applied to the two
    # operands before they are combined ([B] + [W] work instead of [B, W])
    torch.bitwise_xor(
        (coord_hashes ^ (coord_hashes >> 16))[:, None], (keys ^ (keys >> 16))[None, :], out=x
    )
    # the rest of mix32 in place with one temporary: the block stays in cache
    x.mul_(MUL1).bitwise_and_(MASK32)
    x.bitwise_xor_(torch.bitwise_right_shift(x, 15, out=t)).mul_(MUL2).bitwise_and_(MASK32)
    return x.bitwise_xor_(torch.bitwise_right_shift(x, 15, out=t))


def bucket_and_sign(hashes: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CountSketch bucket and sign of hashed coordinates.

    ``bucket = ((h >> 1) * dim) >> 31`` (a multiply-shift map of the top 31 bits onto
    ``[0, dim)``), ``sign = +1`` if bit 0 of ``h`` is 0, else ``-1``; the two use disjoint
    bits, so they are independent.  Returns ``(bucket int64 [B], sign float32 [B])``.
    """
    sign = 1.0 - 2.0 * (hashes & 1).to(torch.float32)
    return bucket_of(hashes, dim), sign


def bucket_of(hashes: torch.Tensor, dim: int) -> torch.Tensor:
    """The CountSketch bucket alone (see :func:`bucket_and_sign`): int64 ``[B]`` in ``[0, dim)``."""
    if not 0 < dim <= 1 << 31:
        raise ValueError(f"dimension {dim} out of range (0, 2^31]")
    return ((hashes >> 1) * dim) >> 31


# --- tables turning hash bits into entries --------------------------------------------

GAUSSIAN_TABLE_BITS = 16
_gaussian_tables: dict[str, torch.Tensor] = {}
_sign_tables: dict[str, torch.Tensor] = {}


def _gaussian_table_cpu() -> torch.Tensor:
    """The 65536 midpoint quantiles of N(0, 1), rescaled to unit second moment.

    ``q_i = ndtri((i + 0.5) / 65536)`` in float64 for ``i < 32768`` and ``q_i = -q_{65535-i}``
    above (exactly antisymmetric, so the mean is exactly 0); then ``T = float32(q / rms(q))``.
    """
    size = 1 << GAUSSIAN_TABLE_BITS
    half = size // 2
    lower = torch.special.ndtri(
        (torch.arange(half, dtype=torch.float64) + 0.5) / float(size)
    )  # negative quantiles
    q = torch.cat([lower, -lower.flip(0)])
    rms = math.sqrt(float((q * q).mean()))
    return (q / rms).to(torch.float32)


def gaussian_table(device: torch.device | str = "cpu") -> torch.Tensor:
    """``[65536]`` float32 table of discretised standard normal values, cached per device."""
    key = str(torch.device(device))
    table = _gaussian_tables.get(key)
    if table is None:
        cpu = _gaussian_tables.get("cpu")
        if cpu is None:
            cpu = _gaussian_table_cpu()
            _gaussian_tables["cpu"] = cpu
        table = cpu.to(device)
        _gaussian_tables[key] = table
    return table


def gaussian_moments() -> tuple[float, float]:
    """Second and fourth moments of the Gaussian table's distribution (1 and about 2.99)."""
    t = gaussian_table("cpu").to(torch.float64)
    return float((t**2).mean()), float((t**4).mean())


def sign_table(device: torch.device | str = "cpu") -> torch.Tensor:
    """``[256, 8]`` float32: row ``b`` holds ``1 - 2 * bit_i(b)`` for ``i = 0..7``."""
    key = str(torch.device(device))
    table = _sign_tables.get(key)
    if table is None:
        b = torch.arange(256, dtype=torch.int64)[:, None]
        bits = (b >> torch.arange(8, dtype=torch.int64)[None, :]) & 1
        table = (1.0 - 2.0 * bits.to(torch.float32)).to(device)
        _sign_tables[key] = table
    return table


def gaussian_entries(words: torch.Tensor, rows: int, ws: Workspace | None = None) -> torch.Tensor:
    """Standard normal entries from 32-bit words: row ``2j`` from the high 16 bits of word
    ``j``, row ``2j + 1`` from the low 16 bits, through :func:`gaussian_table`.

    ``words``: ``[B, ceil(rows / 2)]`` int64.  Returns ``[B, rows]`` float32.
    """
    b, w = words.shape
    idx = _scratch(ws, "gauss_idx", (b, w, 2), torch.int64, words.device)
    torch.bitwise_right_shift(words, 16, out=idx[:, :, 0])
    torch.bitwise_and(words, 0xFFFF, out=idx[:, :, 1])
    out = _scratch(ws, "entries", (b * 2 * w,), torch.float32, words.device)
    torch.index_select(gaussian_table(words.device), 0, idx.view(-1), out=out)
    return out.view(b, 2 * w)[:, :rows]


def sign_entries(words: torch.Tensor, rows: int, ws: Workspace | None = None) -> torch.Tensor:
    """±1 entries from 32-bit words: row ``32j + i`` is ``1 - 2 * bit_i(word_j)``.

    ``words``: ``[B, ceil(rows / 32)]`` int64.  Returns ``[B, rows]`` float32.
    """
    b, w = words.shape
    shifts = torch.tensor([0, 8, 16, 24], dtype=torch.int64, device=words.device)
    byte = _scratch(ws, "sign_idx", (b, w, 4), torch.int64, words.device)
    torch.bitwise_right_shift(words[:, :, None], shifts, out=byte).bitwise_and_(0xFF)
    out = _scratch(ws, "entries", (b * w * 4, 8), torch.float32, words.device)
    torch.index_select(sign_table(words.device), 0, byte.view(-1), out=out)
    return out.view(b, 32 * w)[:, :rows]


_row_key_cache: dict[tuple[int, str], torch.Tensor] = {}


def cached_row_keys(count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """:func:`row_keys` cached per ``(count, device)`` (they are shared by all parameters)."""
    key = (count, str(torch.device(device)))
    keys = _row_key_cache.get(key)
    if keys is None:
        keys = row_keys(count, device)
        _row_key_cache[key] = keys
    return keys


# --- optional torch.compile of the per-block generators ---------------------------------
#
# The generators below are the eager recipe written as one function, so that inductor can
# fuse hashing and table lookup into a single loop.  Integer arithmetic and table gathers
# are exact, so compiled and eager blocks are bit-identical; compilation is opt-in
# (``KERNELSCOPE_SKETCH_COMPILE=1`` or :func:`use_compile`) because its first call per
# shape takes seconds, and any compilation failure falls back to eager for good.

_compile_enabled = os.environ.get("KERNELSCOPE_SKETCH_COMPILE", "0") == "1"
_compiled: dict[str, Callable[..., torch.Tensor]] = {}


def use_compile(enabled: bool) -> None:
    """Switch the compiled block generators on or off (results are identical either way)."""
    global _compile_enabled
    _compile_enabled = bool(enabled)


def compile_enabled() -> bool:
    """Whether the compiled block generators are in use."""
    return _compile_enabled


def _gaussian_block(hashes: torch.Tensor, keys: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    x = hashes[:, None] ^ keys[None, :]
    x = x ^ (x >> 16)
    x = (x * MUL1) & MASK32
    x = x ^ (x >> 15)
    x = (x * MUL2) & MASK32
    x = x ^ (x >> 15)
    idx = torch.stack((x >> 16, x & 0xFFFF), dim=-1).reshape(hashes.shape[0], -1)
    return table[idx]


def _sign_block(hashes: torch.Tensor, keys: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    x = hashes[:, None] ^ keys[None, :]
    x = x ^ (x >> 16)
    x = (x * MUL1) & MASK32
    x = x ^ (x >> 15)
    x = (x * MUL2) & MASK32
    x = x ^ (x >> 15)
    bits = (x[:, :, None] >> shifts) & 1
    return (1 - 2 * bits).to(torch.float32).reshape(hashes.shape[0], -1)


def _run_compiled(
    name: str, fn: Callable[..., torch.Tensor], *args: torch.Tensor
) -> torch.Tensor | None:
    """``fn(*args)`` through ``torch.compile``; ``None`` (and compile disabled) on failure."""
    global _compile_enabled
    compiled = _compiled.get(name)
    if compiled is None:
        compiled = torch.compile(fn, dynamic=False)
        _compiled[name] = compiled
    try:
        return compiled(*args)
    except Exception as exc:  # no compiler, unsupported device, ...: eager from now on
        warnings.warn(
            f"kernelscope: torch.compile of the sketch generator failed, using eager: {exc}",
            stacklevel=2,
        )
        _compile_enabled = False
        return None


def gaussian_columns(
    seed: int,
    name: str,
    stream: int,
    start: int,
    count: int,
    rows: int,
    device: torch.device | str,
    allow_compile: bool = False,
    ws: Workspace | None = None,
) -> torch.Tensor:
    """Standard normal columns: ``[count, rows]`` float32, row ``c`` belongs to flat index
    ``start + c``; entry ``r`` comes from word ``r // 2`` of that coordinate (high 16 bits
    for even ``r``, low 16 bits for odd ``r``).  ``allow_compile``: use the compiled
    generator when enabled (callers pass it for their fixed-size blocks only)."""
    keys = cached_row_keys((rows + 1) // 2, device)
    if torch.device(device).type == "cpu" and cpu_kernels.enabled():
        block = _scratch(ws, "entries", (count, rows), torch.float32, keys.device)
        chunks = key_chunks(seed, name, stream, start, count)
        return cpu_kernels.gaussian_block(chunks, keys, gaussian_table(keys.device), block)
    hashes = coord_hash(seed, name, stream, start, count, device)
    if _compile_enabled and allow_compile:
        out = _run_compiled("gaussian", _gaussian_block, hashes, keys, gaussian_table(device))
        if out is not None:
            return out[:, :rows]
    return gaussian_entries(entry_words(hashes, keys, ws), rows, ws)


def sign_columns(
    seed: int,
    name: str,
    stream: int,
    start: int,
    count: int,
    rows: int,
    device: torch.device | str,
    allow_compile: bool = False,
    ws: Workspace | None = None,
) -> torch.Tensor:
    """±1 columns: ``[count, rows]`` float32; entry ``r`` is bit ``r % 32`` of word
    ``r // 32`` of the coordinate (``+1`` for a 0 bit).  ``allow_compile`` as in
    :func:`gaussian_columns`."""
    keys = cached_row_keys((rows + 31) // 32, device)
    if torch.device(device).type == "cpu" and cpu_kernels.enabled():
        block = _scratch(ws, "entries", (count, rows), torch.float32, keys.device)
        return cpu_kernels.sign_block(key_chunks(seed, name, stream, start, count), keys, block)
    hashes = coord_hash(seed, name, stream, start, count, device)
    if _compile_enabled and allow_compile:
        shifts = torch.arange(32, dtype=torch.int64, device=hashes.device)
        out = _run_compiled("sign", _sign_block, hashes, keys, shifts)
        if out is not None:
            return out[:, :rows]
    return sign_entries(entry_words(hashes, keys, ws), rows, ws)
