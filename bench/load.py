"""Load benchmark: concurrent simulated trainers against one API and several workers.

    python bench/load.py                 # full: 8 trainers x 20 steps x 64 sequences x 10^5
                                         # fp32 parameters, 2 workers, then the same on 1 worker
    python bench/load.py --quick         # about a minute: 4 trainers x 4 steps x 16 x 10^4
    python bench/load.py --trainers 2 --steps 3 --sequences 8 --parameters 1000 --workers 2

Loopback only: the API (``python -m uvicorn service.app:create_app --factory`` on 127.0.0.1) and
the workers (``kernelscope worker --device cpu``) are separate processes on the Redis at
``REDIS_URL`` (default ``redis://127.0.0.1:6379/0``), under a unique key prefix that is deleted
at the end.  Bounded: ``trainers x steps`` uploads (plus one deliberate re-send per trainer) and
``--max-seconds`` of wall time, after which the run is reported as failed.

Each trainer (a thread with its own HTTP connection) owns one run (countsketch, ``k = 1024``)
and, per step, posts the metadata of ``S`` sequences (``S/8`` prompts of 8 responses) and one
safetensors upload of raw fp32 gradients ``[S, N]`` (four parameters of ``N/4``, seeded by
trainer and step so that they can be rebuilt offline).  Its first upload is sent twice (a
retry: the second must answer ``queued: false``).  After posting step ``t`` it waits for step
``t - 1`` to be ready (not timed) and reads its kernel (npy) and entropy (timed: the query
latency, under the load of the other trainers).

Afterwards every step must be ``ready`` with ``S`` rows, one upload and no error; each step has
exactly one partial sketch in Redis (nothing missing, nothing doubled); and each step's kernel
equals ``Y Y^T`` with ``Y`` the run's sketcher (``sketch.spec.sketcher_for``, what the
workers use) applied offline to the same gradients (float32 rounding tolerance).

Printed: throughput (gradient MB/s and steps/s from the first upload to the last step ready),
p50/p99 upload latency (one POST of a gradient body) and query latency (kernel + entropy of a
ready step), for ``--workers`` and for ``--compare-workers`` (the ratio of throughputs).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from processes import child_process, free_port, wait_http  # bench/processes.py
from safetensors.torch import save as save_torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MB = 1e6
PROMPT_GROUP = 8  # responses per prompt
PARAMS_PER_STEP = 4  # gradient tensors per upload
SKETCH = {"kind": "countsketch", "dim": 1024, "seed": 0}


@dataclass(frozen=True)
class LoadConfig:
    """Sizes of one load run: ``trainers`` runs, each ``steps`` steps of ``sequences`` rows of
    ``parameters`` fp32 gradient entries, served by ``workers`` worker processes."""

    trainers: int = 8
    steps: int = 20
    sequences: int = 64
    parameters: int = 100_000
    workers: int = 2
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_cluster: bool = False
    max_seconds: float = 1800.0
    torch_threads: int = 1


@dataclass
class LoadResult:
    """Measurements and checks of one run (latencies in seconds)."""

    config: LoadConfig
    wall_s: float = 0.0
    upload_bytes: int = 0
    upload_latency: list[float] = field(default_factory=list)
    query_latency: list[float] = field(default_factory=list)
    steps_ready: int = 0
    rows: int = 0
    partials: int = 0
    retries_deduplicated: int = 0
    max_kernel_error: float = 0.0
    failures: list[str] = field(default_factory=list)

    @property
    def mb_per_s(self) -> float:
        return self.upload_bytes / MB / self.wall_s if self.wall_s else 0.0

    @property
    def steps_per_s(self) -> float:
        return self.steps_ready / self.wall_s if self.wall_s else 0.0


# ------------------------------------------------------------------------------ data


def step_gradients(cfg: LoadConfig, trainer: int, step: int) -> dict[str, torch.Tensor]:
    """The gradients of one step: ``PARAMS_PER_STEP`` fp32 tensors ``[S, N/4]``, seeded."""
    gen = torch.Generator().manual_seed(1_000_003 * trainer + step)
    width = cfg.parameters // PARAMS_PER_STEP
    return {
        f"layers.{i}.weight": torch.randn((cfg.sequences, width), generator=gen)
        for i in range(PARAMS_PER_STEP)
    }


def sequence_ids(cfg: LoadConfig, step: int) -> list[str]:
    return [f"s{step}-p{i // PROMPT_GROUP}-r{i % PROMPT_GROUP}" for i in range(cfg.sequences)]


def sequences(cfg: LoadConfig, trainer: int, step: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng([trainer, step])
    return [
        {
            "id": sid,
            "prompt_id": f"p{i // PROMPT_GROUP}",
            "logprob": float(-40.0 + 10.0 * rng.standard_normal()),
            "advantage": float(rng.standard_normal()),
            "num_tokens": int(rng.integers(20, 200)),
        }
        for i, sid in enumerate(sequence_ids(cfg, step))
    ]


def run_id(trainer: int) -> str:
    return f"load-{trainer}"


# ------------------------------------------------------------------------- processes


def redis_client(cfg: LoadConfig) -> Any:
    """A blocking client of the run's Redis (``RedisCluster`` on a cluster)."""
    import redis as redis_sync
    from redis.cluster import RedisCluster

    if cfg.redis_cluster:
        return RedisCluster.from_url(cfg.redis_url)
    return redis_sync.Redis.from_url(cfg.redis_url)


def run_keys(cfg: LoadConfig, prefix: str) -> Any:
    """The key layout of the run (``service.keys.Keys``; sharded on a cluster)."""
    from service.keys import Keys
    from service.settings import Settings

    return Keys(prefix, Settings(redis_cluster=cfg.redis_cluster).shards)


def wait_workers(cfg: LoadConfig, prefix: str, procs: list[subprocess.Popen[bytes]]) -> None:
    """Until every worker's consumer (named ``host-pid-random``) is in the group (bounded)."""
    import redis as redis_sync

    from service.keys import GROUP

    client = redis_client(cfg)
    stream = run_keys(cfg, prefix).streams[-1]  # a worker joins every stream in order
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            for proc in procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"worker exited with {proc.returncode}")
            try:
                names = [c["name"].decode() for c in client.xinfo_consumers(stream, GROUP)]
            except redis_sync.ResponseError:
                names = []
            if all(any(f"-{p.pid}-" in n for n in names) for p in procs):
                return
            time.sleep(0.1)
    finally:
        client.close()
    raise RuntimeError("the workers did not join the consumer group in 120 s")


# ---------------------------------------------------------------------------- trainer


class Trainer(threading.Thread):
    """One simulated trainer: create its run, then push and read back every step."""

    def __init__(
        self,
        cfg: LoadConfig,
        index: int,
        base_url: str,
        deadline: float,
        retry_faults: bool = False,
    ) -> None:
        super().__init__(name=f"trainer-{index}", daemon=True)
        self.cfg, self.index, self.base_url, self.deadline = cfg, index, base_url, deadline
        self.retry_faults = retry_faults
        self.faults_retried = 0
        self.upload_latency: list[float] = []
        self.query_latency: list[float] = []
        self.upload_bytes = 0
        self.deduplicated = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with httpx.Client(base_url=self.base_url, timeout=600) as http:
                self._train(http)
        except BaseException as exc:  # reported by the main thread
            self.error = exc

    def _send(self, http: httpx.Client, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """One request; with ``retry_faults``, re-sent after a connection error or a 5xx (an
        API or Redis restart) until ``deadline``, as a trainer's client would: every write is
        idempotent (uploads by their Idempotency-Key, metadata by sequence id)."""
        while True:
            try:
                r = http.request(method, url, **kwargs)
            except httpx.TransportError:
                if not self.retry_faults:
                    raise
            else:
                if r.status_code < 500 or not self.retry_faults:
                    return r
            if time.monotonic() > self.deadline:
                raise TimeoutError(f"{method} {url}: still failing at --max-seconds")
            self.faults_retried += 1
            time.sleep(0.2)

    def _train(self, http: httpx.Client) -> None:
        rid = run_id(self.index)
        # 200: the same spec exists (a retried create whose first answer was lost)
        self._send(
            http, "POST", "/v1/runs", json={"run_id": rid, "sketch": SKETCH}
        ).raise_for_status()
        for step in range(self.cfg.steps):
            if time.monotonic() > self.deadline:
                raise TimeoutError("--max-seconds reached")
            body = {"learning_rate": 1e-3, "sequences": sequences(self.cfg, self.index, step)}
            url = f"/v1/runs/{rid}/steps/{step}/sequences"
            self._send(http, "POST", url, json=body).raise_for_status()
            grads = step_gradients(self.cfg, self.index, step)
            payload = save_torch(
                grads, metadata={"sequence_ids": json.dumps(sequence_ids(self.cfg, step))}
            )
            del grads
            headers = {
                "content-type": "application/octet-stream",
                "Idempotency-Key": f"{rid}/{step}/grads",
            }
            sends = 2 if step == 0 else 1  # the first upload is retried, as after a timeout
            for _ in range(sends):
                t0 = time.perf_counter()
                url = f"/v1/runs/{rid}/steps/{step}/gradients"
                r = self._send(http, "POST", url, content=payload, headers=headers)
                self.upload_latency.append(time.perf_counter() - t0)
                if r.status_code != 202:
                    raise RuntimeError(f"upload {rid}/{step}: {r.status_code} {r.text[:300]}")
                self.upload_bytes += len(payload)
                if not r.json()["queued"]:
                    self.deduplicated += 1
            if step > 0:
                self._query(http, rid, step - 1)
        self._query(http, rid, self.cfg.steps - 1)

    def _query(self, http: httpx.Client, rid: str, step: int) -> None:
        while self._send(http, "GET", f"/v1/runs/{rid}/steps/{step}").json()["state"] != "ready":
            if time.monotonic() > self.deadline:
                raise TimeoutError(f"step {rid}/{step} not ready by --max-seconds")
            time.sleep(0.05)
        t0 = time.perf_counter()
        kernel = self._send(
            http,
            "GET",
            f"/v1/runs/{rid}/steps/{step}/kernel",
            headers={"accept": "application/octet-stream"},
        )
        entropy = self._send(http, "GET", f"/v1/runs/{rid}/steps/{step}/entropy")
        self.query_latency.append(time.perf_counter() - t0)
        for r in (kernel, entropy):
            if r.status_code != 200:
                raise RuntimeError(f"query {rid}/{step}: {r.status_code} {r.text[:300]}")


# ----------------------------------------------------------------------------- checks


def verify(
    cfg: LoadConfig,
    http: httpx.Client,
    prefix: str,
    result: LoadResult,
    faults: bool = False,
) -> None:
    """Every step ready, complete and not doubled, with the kernel computed offline.  Under
    ``faults`` a retried upload may have landed before its answer was lost, so more re-sends
    than the deliberate ones can be deduplicated."""
    from service.keys import GROUP
    from sketch.spec import sketcher_for

    client = redis_client(cfg)
    try:
        for trainer in range(cfg.trainers):
            rid = run_id(trainer)
            run = http.get(f"/v1/runs/{rid}").json()
            sketcher = sketcher_for(run["sketch"], run.get("parameters"))
            for step in range(cfg.steps):
                status = http.get(f"/v1/runs/{rid}/steps/{step}").json()
                where = f"{rid}/{step}"
                if status["state"] != "ready" or status["errors"] or status["pending_uploads"]:
                    result.failures.append(f"{where}: {status}")
                    continue
                if status["rows"] != cfg.sequences or status["uploads"] != 1:
                    result.failures.append(
                        f"{where}: rows {status['rows']} uploads {status['uploads']}"
                    )
                result.steps_ready += 1
                result.rows += int(status["rows"])
                r = http.get(
                    f"/v1/runs/{rid}/steps/{step}/kernel",
                    headers={"accept": "application/octet-stream"},
                )
                actual = np.load(io.BytesIO(r.content))
                ids = http.get(f"/v1/runs/{rid}/steps/{step}/kernel/diagonal").json()
                if [d["id"] for d in ids] != sequence_ids(cfg, step):
                    result.failures.append(f"{where}: row ids differ from the uploaded ones")
                Y = sketcher.sketch(step_gradients(cfg, trainer, step)).double().numpy()
                expected = Y @ Y.T
                error = float(np.abs(actual - expected).max() / np.abs(expected).max())
                result.max_kernel_error = max(result.max_kernel_error, error)
                if error > 1e-5:
                    result.failures.append(f"{where}: kernel differs from offline by {error:.2e}")
        parts = list(client.scan_iter(match=f"{prefix}:*:part:*", count=1000))
        result.partials = len(parts)
        if result.partials != cfg.trainers * cfg.steps:
            result.failures.append(
                f"{result.partials} partial sketches stored, expected {cfg.trainers * cfg.steps}"
            )
        keys = run_keys(cfg, prefix)
        pending = sum(client.xpending(stream, GROUP)["pending"] for stream in keys.streams)
        if pending or any(client.exists(dead) for dead in keys.deads):
            result.failures.append("jobs left pending or dead-lettered")
        if result.retries_deduplicated < cfg.trainers or (
            result.retries_deduplicated != cfg.trainers and not faults
        ):
            result.failures.append(
                f"{result.retries_deduplicated} retries deduplicated, expected {cfg.trainers}"
            )
    finally:
        client.close()


# -------------------------------------------------------------------------------- run


def run_load(cfg: LoadConfig, logs: Path | None = None) -> LoadResult:
    """One load run on fresh API and worker processes under a unique key prefix (deleted)."""
    prefix = f"ksload-{secrets.token_hex(4)}"
    port = free_port()
    logs = logs or Path(os.environ.get("TMPDIR", "/tmp")) / f"{prefix}-logs"
    logs.mkdir(parents=True, exist_ok=True)
    body_mb = cfg.sequences * cfg.parameters * 4 / 2**20 + 8
    env = {
        **os.environ,
        "KERNELSCOPE_REDIS_URL": cfg.redis_url,
        "KERNELSCOPE_REDIS_CLUSTER": "1" if cfg.redis_cluster else "0",
        "KERNELSCOPE_KEY_PREFIX": prefix,
        "KERNELSCOPE_TOKEN": "",
        "KERNELSCOPE_MAX_BODY_MB": f"{body_mb:.0f}",
        "KERNELSCOPE_WORKER_BLOCK_MS": "200",
        "OMP_NUM_THREADS": str(cfg.torch_threads),
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
    }
    api_args = [sys.executable, "-m", "uvicorn", "service.app:create_app", "--factory"]
    api_args += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    worker_args = [sys.executable, "-m", "service", "worker", "--device", "cpu"]
    result = LoadResult(cfg)
    base_url = f"http://127.0.0.1:{port}"
    try:
        with contextlib.ExitStack() as stack:
            api = stack.enter_context(child_process(api_args, env, logs / "api.log"))
            workers = [
                stack.enter_context(child_process(worker_args, env, logs / f"worker-{i}.log"))
                for i in range(cfg.workers)
            ]
            wait_http(f"{base_url}/healthz", api)
            wait_workers(cfg, prefix, workers)
            deadline = time.monotonic() + cfg.max_seconds
            trainers = [Trainer(cfg, i, base_url, deadline) for i in range(cfg.trainers)]
            t0 = time.perf_counter()
            for t in trainers:
                t.start()
            for t in trainers:
                t.join(max(1.0, deadline - time.monotonic() + 60))
            result.wall_s = time.perf_counter() - t0
            collect(trainers, result)
            if not result.failures:
                with httpx.Client(base_url=base_url, timeout=600) as http:
                    verify(cfg, http, prefix, result)
    finally:
        client = redis_client(cfg)
        for key in list(client.scan_iter(match=f"{prefix}:*", count=1000)):
            client.unlink(key)
        client.close()
    return result


def collect(trainers: Sequence[Trainer], result: LoadResult) -> None:
    """Add the finished trainers' measurements and failures to ``result``."""
    for t in trainers:
        if t.is_alive():
            result.failures.append(f"{t.name} still running at --max-seconds")
        elif t.error is not None:
            result.failures.append(f"{t.name}: {type(t.error).__name__}: {t.error}")
        result.upload_latency += t.upload_latency
        result.query_latency += t.query_latency
        result.upload_bytes += t.upload_bytes
        result.retries_deduplicated += t.deduplicated


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def table(results: Sequence[LoadResult]) -> str:
    """A markdown table of the runs, with the throughput ratio to the first one."""
    lines = [
        "| workers | steps ready | rows | upload MB | wall s | MB/s | steps/s "
        "| upload p50 / p99 ms | query p50 / p99 ms | vs first |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = results[0].mb_per_s if results else 0.0
    for r in results:
        up = " / ".join(f"{1e3 * percentile(r.upload_latency, q):.0f}" for q in (50, 99))
        query = " / ".join(f"{1e3 * percentile(r.query_latency, q):.0f}" for q in (50, 99))
        ratio = r.mb_per_s / base if base else float("nan")
        lines.append(
            f"| {r.config.workers} | {r.steps_ready} | {r.rows} | {r.upload_bytes / MB:.0f} "
            f"| {r.wall_s:.1f} | {r.mb_per_s:.1f} | {r.steps_per_s:.2f} "
            f"| {up} | {query} | {ratio:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 trainers x 4 steps x 16 x 10^4")
    parser.add_argument("--trainers", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--sequences", type=int, default=None)
    parser.add_argument("--parameters", type=int, default=None)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--compare-workers", type=int, default=1, help="0: no comparison run")
    parser.add_argument("--max-seconds", type=float, default=1800.0)
    parser.add_argument(
        "--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    args = parser.parse_args(argv)
    base = (
        LoadConfig(trainers=4, steps=4, sequences=16, parameters=10_000)
        if args.quick
        else LoadConfig()
    )
    sizes = {
        k: v
        for k, v in {
            "trainers": args.trainers,
            "steps": args.steps,
            "sequences": args.sequences,
            "parameters": args.parameters,
        }.items()
        if v is not None
    }
    cfg = LoadConfig(
        **{
            **base.__dict__,
            **sizes,
            "workers": args.workers,
            "redis_url": args.redis_url,
            "max_seconds": args.max_seconds,
        }
    )
    runs = [cfg]
    if args.compare_workers and args.compare_workers != cfg.workers:
        runs.append(LoadConfig(**{**cfg.__dict__, "workers": args.compare_workers}))
    load = os.getloadavg()
    print(
        f"load: {cfg.trainers} trainers x {cfg.steps} steps x {cfg.sequences} sequences x "
        f"{cfg.parameters} fp32 parameters ({cfg.sequences * cfg.parameters * 4 / MB:.1f} MB an "
        f"upload), countsketch k={SKETCH['dim']}; {os.cpu_count()} CPUs, load average "
        f"{load[0]:.1f} at start",
        flush=True,
    )
    results = []
    for c in runs:
        r = run_load(c)
        results.append(r)
        print(
            f"  {c.workers} worker(s): {r.wall_s:.1f} s, "
            f"max kernel error {r.max_kernel_error:.1e}, "
            f"{r.retries_deduplicated} retries deduplicated, {r.partials} partial sketches",
            flush=True,
        )
        for failure in r.failures[:20]:
            print(f"  FAILED: {failure}", flush=True)
    print(table(results))
    print(f"load average at end: {os.getloadavg()[0]:.1f}")
    return 1 if any(r.failures for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
