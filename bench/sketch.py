"""Benchmark of the sketch operators: speed against baselines measured in the same run, and
accuracy against the exact kernel next to the variance formulas' predictions.

    python bench/sketch.py [--quick] [--device cpu|cuda] [--threads T]

Speed: rows/s and GB/s of fp32 input for every kind at N in {1e5, 1e6, 1e7}, k in
{256, 1024, 4096}, n = 64 rows, against
  * ``read``: a torch reduction over the same bytes (memory-read limit; on CUDA also a copy),
  * ``matmul``: X @ P with a pre-built P [N, k] where it fits in memory (arithmetic limit),
  * TRAK's ``BasicProjector`` (normal, rademacher) for the dense kinds (skipped if ``traker``
    is missing),
  * ``scipy.linalg.clarkson_woodruff_transform`` for countsketch.
Large configurations are timed on a prefix of the N columns (the throughput per input byte
does not depend on N beyond cache effects); such rows say ``prefix``.

Accuracy: rows W = low-rank + noise (correlated, like per-sequence gradients of one step),
exact K = W W^T; per kind and k the relative Frobenius error of the sketched K and the
error of a bilinear form h^T K c (as in dH1) in units of its predicted standard error.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sketch import hashing
from sketch.base import Sketcher, SketchKind
from sketch.crossed import bilinear_error_bar
from sketch.kronecker import KroneckerSketch
from sketch.spec import SketchSpec, build_sketcher

KINDS = ["countsketch", "gaussian", "rademacher", "kronecker"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCK: Callable[[], float] = time.perf_counter


def best_time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Best time of ``repeats`` calls after one warm-up (robust to a shared machine).

    The clock is wall time, or with ``--clock cpu`` (one CPU thread only) the process's CPU
    time, which other processes competing for the cores do not inflate.
    """
    fn()
    sync(device)
    best = math.inf
    for _ in range(repeats):
        start = CLOCK()
        fn()
        sync(device)
        best = min(best, CLOCK() - start)
    return best


def matrix_shape(n_params: int) -> tuple[int, int]:
    """A near-square (out, in) for a Kronecker parameter of ``n_params`` elements."""
    out = math.isqrt(n_params)
    while n_params % out:
        out -= 1
    return out, n_params // out


def make_sketcher(kind: str, dim: int, n_params: int) -> Sketcher:
    params = {"p": matrix_shape(n_params) if kind == "kronecker" else (n_params,)}
    return build_sketcher(SketchSpec(SketchKind(kind), dim, 1), params)


def fmt_rate(seconds: float | None, n: int, cols: int) -> str:
    if seconds is None:
        return "-"
    return f"{n * cols * 4 / seconds / 1e9:.3f}"


def speed(args: argparse.Namespace, device: torch.device) -> None:
    n = 64
    sizes = [10**5, 10**6] if args.quick else [10**5, 10**6, 10**7]
    dims = [256, 1024] if args.quick else [256, 1024, 4096]
    # most matrix entries (cols * k) one timed call may generate, and what baselines may take
    dense_cap = 3 * 10**7 if args.quick else 2 * 10**9
    trak_cap = 3 * 10**7 if args.quick else 10**9
    matmul_bytes = 2 * 2**30
    if device.type == "cuda":  # fast enough to run every configuration in full
        dense_cap = trak_cap = 10**11
        free, _ = torch.cuda.mem_get_info(device)
        matmul_bytes = free // 4
    try:
        from trak.projectors import BasicProjector, ProjectionType

        have_trak = True
    except ImportError:
        have_trak = False
    from scipy.linalg import clarkson_woodruff_transform

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    clock = "CPU time" if CLOCK is time.process_time else "wall time"
    print(f"## Speed ({where}, {torch.get_num_threads()} threads, {clock}, n = {n} rows, fp32)\n")
    print("read = a torch reduction over the input (cpu) or a device copy of it (cuda).")
    print("GB/s of fp32 input (rows x columns x 4 bytes) per second; ratio = kind / baseline.\n")
    header = (
        "| N | k | read/copy GB/s | matmul GB/s | kind | cols timed | GB/s | rows/s "
        "| / read | / matmul | baseline | baseline GB/s | / baseline |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    baselines: dict[tuple[str, int, int], tuple[str, float | None, int]] = {}
    for size in sizes:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(n, size, generator=gen).to(device)
        repeats = 2 if args.quick or size > 10**6 else 3
        t_read = best_time(functools.partial(torch.sum, x), device, repeats)
        if device.type == "cuda":
            # on a GPU the memory baseline is a device copy of the same bytes (input bytes/s)
            t_read = best_time(functools.partial(torch.clone, x), device, repeats)
        for dim in dims:
            t_mm: float | None = None
            if size * dim * 4 <= matmul_bytes:
                proj = torch.randn(size, dim, generator=gen).to(device)
                t_mm = best_time(functools.partial(torch.matmul, x, proj), device, repeats)
                del proj
            variants = [(kind, False) for kind in KINDS if kind in args.kinds]
            if args.compile:
                variants += [(k, True) for k in ("gaussian", "rademacher") if k in args.kinds]
            for kind, compiled in variants:
                hashing.use_compile(compiled)
                sketcher = make_sketcher(kind, dim, size)
                dense = kind in ("gaussian", "rademacher")
                cols = size
                if dense or kind == "kronecker":
                    cols = min(size, max(dense_cap // dim, 1))
                if kind == "kronecker" and cols < size:
                    _, inn = matrix_shape(size)
                    cols = max(1, cols // inn) * inn
                xs = x[:, :cols]
                t = best_time(
                    functools.partial(sketcher.sketch_slice, "p", xs),
                    device,
                    1 if cols * dim > 10**9 else repeats,
                )
                hashing.use_compile(False)
                cached = baselines.get((kind, size, dim))
                if cached is not None:
                    base_name, t_base, base_cols = cached
                else:
                    base_name, t_base, base_cols = "-", None, cols
                    if kind == "countsketch" and device.type == "cpu":
                        base_name = "scipy CWT"
                        arr = xs.numpy().T  # [N, n], sketched along N
                        t_base = best_time(
                            functools.partial(clarkson_woodruff_transform, arr, dim, seed=0),
                            device,
                            1,
                        )
                    elif dense and have_trak:
                        ptype = (
                            ProjectionType.normal
                            if kind == "gaussian"
                            else ProjectionType.rademacher
                        )
                        base_name = f"TRAK {ptype.value}"
                        base_cols = min(cols, max(trak_cap // dim, 1))
                        if base_cols * 100 * 4 <= 2**31:
                            proj = BasicProjector(
                                base_cols, dim, 0, ptype, device, dtype=torch.float32
                            )
                            xb = xs[:, :base_cols].contiguous()
                            t_base = best_time(functools.partial(proj.project, xb, 0), device, 1)
                            del proj
                        else:
                            base_name += " (skipped: 4N x 100 B matrix)"
                    baselines[(kind, size, dim)] = (base_name, t_base, base_cols)
                ratio_base = "-"
                if t_base is not None:
                    rate = n * cols / t
                    rate_base = n * base_cols / t_base
                    ratio_base = f"{rate / rate_base:.2f}"
                note = f"{cols:.0e}" + (" prefix" if cols < size else "")
                gbs = n * cols * 4 / t / 1e9
                read_gbs = n * size * 4 / t_read / 1e9
                mm_gbs = None if t_mm is None else n * size * 4 / t_mm / 1e9
                print(
                    f"| {size:.0e} | {dim} | {read_gbs:.2f} | "
                    f"{'-' if mm_gbs is None else f'{mm_gbs:.3f}'} | "
                    f"{kind + (' (compiled)' if compiled else '')} | {note} | "
                    f"{gbs:.3f} | {n * cols / t:.3g} | {gbs / read_gbs:.3f} | "
                    f"{'-' if mm_gbs is None else f'{gbs / mm_gbs:.2f}'} | {base_name} | "
                    f"{fmt_rate(t_base, n, base_cols)} | {ratio_base} |",
                    flush=True,
                )
        del x


def workloads(n: int, size: int, gen: torch.Generator) -> list[tuple[str, torch.Tensor]]:
    """Two kinds of correlated rows [n, size] (float64), normalised to unit mean norm."""
    rank = 8
    # low rank with a decaying spectrum plus isotropic noise
    left = torch.randn(n, rank, generator=gen, dtype=torch.float64) * (
        0.7 ** torch.arange(rank, dtype=torch.float64)
    )
    right = torch.randn(rank, size, generator=gen, dtype=torch.float64)
    low_rank = left @ right + 0.3 * torch.randn(n, size, generator=gen, dtype=torch.float64)
    # per-sequence gradients of one linear layer: sums of T token outer products delta x^T,
    # tokens sharing a few directions across sequences (the case the Kronecker bound is for)
    out, inn = matrix_shape(size)
    tokens, shared = 16, 4
    d_shared = torch.randn(shared, out, generator=gen, dtype=torch.float64)
    x_shared = torch.randn(shared, inn, generator=gen, dtype=torch.float64)
    rows = []
    for _ in range(n):
        mix_d = torch.randn(tokens, shared, generator=gen, dtype=torch.float64)
        mix_x = torch.randn(tokens, shared, generator=gen, dtype=torch.float64)
        deltas = mix_d @ d_shared + torch.randn(tokens, out, generator=gen, dtype=torch.float64)
        xs = mix_x @ x_shared + torch.randn(tokens, inn, generator=gen, dtype=torch.float64)
        rows.append((deltas.T @ xs).reshape(-1))
    outer = torch.stack(rows)
    result = []
    for name, w in [("rank-8 + noise", low_rank), ("16 token outer products", outer)]:
        result.append((name, w / w.norm(dim=1).mean()))
    return result


def accuracy(args: argparse.Namespace, device: torch.device) -> None:
    n = 64
    size = 10_000 if args.quick else 100_000
    dims = [256, 1024] if args.quick else [256, 1024, 4096]
    seeds = range(3 if args.quick else args.seeds)
    gen = torch.Generator().manual_seed(0)
    print(f"\n## Accuracy (n = {n} rows, N = {size}, {len(seeds)} seeds)\n")
    print("rel err K = |K_hat - K|_F / |K|_F (mean over seeds); predicted RMS from the variance")
    print("formula with c = variance_factor() (for kronecker c is the bound). z = error of the")
    print("bilinear form h^T K c (as in dH1, random h, c) over its predicted standard error")
    print("sqrt(c (|u|^2|v|^2 + <u,v>^2)), u = W^T h, v = W^T c; for a normal error and an exact")
    print("formula the mean |z| is 0.80, below that the formula overstates the error.  For")
    print("kronecker the service estimates the error bar from the rows (sketch/crossed.py):")
    print("'rows s.e. / RMS err' is its RMS over the observed RMS error, 'cover' the share of")
    print("errors within 2 of those s.e.\n")
    columns = ["rows", "kind", "k", "rel err K", "predicted RMS", "mean abs(z)"]
    columns += ["rows s.e. / RMS err", "cover"]
    print("| " + " | ".join(columns) + " |")
    print("|---|---|---|---|---|---|---|---|")
    shape = matrix_shape(size)
    for label, w in workloads(n, size, gen):
        kernel = w @ w.T
        h = torch.randn(n, generator=gen, dtype=torch.float64)
        c = torch.randn(n, generator=gen, dtype=torch.float64)
        exact_form = float(h @ kernel @ c)
        u, v = w.T @ h, w.T @ c
        form_scale = float(u @ u) * float(v @ v) + float(u @ v) ** 2
        k_scale = float(torch.trace(kernel)) ** 2 + float((kernel * kernel).sum())
        wf = w.to(torch.float32).to(device)
        weights = np.outer(h.numpy(), c.numpy())
        for kind in ["exact", *KINDS]:
            for dim in [dims[0]] if kind == "exact" else dims:
                errs, zs, signed, rows_var = [], [], [], []
                factor = 0.0
                for seed in seeds:
                    params = {"p": shape if kind == "kronecker" else (size,)}
                    sketcher = build_sketcher(SketchSpec(SketchKind(kind), dim, seed), params)
                    factor = sketcher.variance_factor()
                    y = sketcher.sketch_slice("p", wf).double().cpu()
                    est = y @ y.T
                    errs.append(float((est - kernel).norm() / kernel.norm()))
                    se = math.sqrt(factor * form_scale)
                    err = float(h @ est @ c) - exact_form
                    zs.append(abs(err) / se if se > 0 else abs(err))
                    signed.append(err)
                    if isinstance(sketcher, KroneckerSketch):
                        yn = y.numpy()
                        cells = (sketcher.k_out, sketcher.k_in)
                        rows_var.append(bilinear_error_bar(yn, yn, weights, cells) ** 2)
                predicted = math.sqrt(factor * k_scale) / float(kernel.norm())
                rows_cols = "- | -"
                if rows_var:
                    err_arr, var_arr = np.asarray(signed), np.asarray(rows_var)
                    ratio = math.sqrt(var_arr.mean() / np.mean(err_arr**2))
                    cover = float(np.mean(np.abs(err_arr) <= 2 * np.sqrt(var_arr)))
                    rows_cols = f"{ratio:.2f} | {cover:.0%}"
                print(
                    f"| {label} | {kind} | {'N' if kind == 'exact' else dim} | "
                    f"{np.mean(errs):.4f} | {predicted:.4f} | {np.mean(zs):.2f} | {rows_cols} |",
                    flush=True,
                )


def cpu_name() -> str:
    """``cpu: <model>, <cores> cores``; the project's VMs change model between days, and the
    ratios (more than the rates) depend on it."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu: {model}, {os.cpu_count()} cores"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="CI-sized run (about a minute)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (falls back to cpu)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument(
        "--compile", action="store_true", help="also time the torch.compile'd dense generators"
    )
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: time by process CPU time (needs --threads 1; for a shared machine)",
    )
    parser.add_argument("--kinds", nargs="+", default=KINDS, choices=KINDS, help="kinds to time")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--seeds", type=int, default=10, help="sketch seeds of the accuracy part")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    global CLOCK
    if args.clock == "cpu":
        if torch.get_num_threads() != 1 or args.device != "cpu":
            parser.error("--clock cpu needs --threads 1 and --device cpu")
        CLOCK = time.process_time
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available: running on cpu", file=sys.stderr)
        device = torch.device("cpu")
    start = time.perf_counter()
    if not args.skip_speed:
        speed(args, device)
    if not args.skip_accuracy:
        accuracy(args, device)
    print(f"\n(total {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
