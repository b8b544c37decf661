"""Embedded mode: ``kernelscope serve`` with no REDIS_URL, and ``embedded_service`` from Python.

The subprocess test is the README's "run" path end to end: start, push a step, SIGTERM, start
again on the same data directory, and find the run, the step and the same kernel (the rows
were persisted by the embedded Redis's AOF / RDB, not recomputed).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis as redis_sync
import torch
from safetensors.torch import save as save_safetensors

from service import embedded as embedded_module
from service.embedded import (
    EmbeddedRedis,
    EmbeddedServiceError,
    _process_alive,
    embedded_service,
)
from service.settings import Settings

REPO = Path(__file__).resolve().parents[2]
PARAMETERS = {"w": [3, 4], "b": [5]}
N_PARAMS = 17


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _clean_env(data_dir: Path) -> dict[str, str]:
    """The test's environment without any Redis setting: embedded mode."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KERNELSCOPE_")}
    env.pop("REDIS_URL", None)
    env.update({"KERNELSCOPE_DATA_DIR": str(data_dir), "PYTHONPATH": str(REPO)})
    return env


def _start_serve(port: int, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    out = open(log, "ab")  # noqa: SIM115 - the child writes to it; closed with the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "serve", "--port", str(port), "--log-level", "warning"],
        cwd=REPO,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    out.close()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"serve did not answer /healthz:\n{log.read_text()}")


def _stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def _gradients(n: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn((n, *shape), generator=gen) for name, shape in PARAMETERS.items()}


def _flat(grads: dict[str, torch.Tensor]) -> np.ndarray:
    """Rows in the run's declared parameter order, float64 ``[n, N]``."""
    return (
        torch.cat([grads[k].reshape(grads[k].shape[0], -1) for k in PARAMETERS], 1).double().numpy()
    )


def _wait_ready(api: httpx.Client, run_id: str, step: int) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = api.get(f"/v1/runs/{run_id}/steps/{step}").json()
        if status["state"] != "pending":
            return dict(status)
        time.sleep(0.05)
    raise AssertionError(f"step not ready: {status}")


def test_serve_embedded_survives_restart(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    env = _clean_env(data_dir)
    port = _free_port()
    log = tmp_path / "serve.log"
    ids = ["a0", "a1", "b0", "b1"]
    grads = _gradients(len(ids), seed=3)
    W = _flat(grads)

    proc = _start_serve(port, env, log)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as api:
            run = {
                "run_id": "persist",
                "sketch": {"kind": "exact", "dim": 1},
                "parameters": PARAMETERS,
            }
            assert api.post("/v1/runs", json=run).status_code == 201
            seqs = [
                {
                    "id": i,
                    "prompt_id": i[0],
                    "logprob": -3.0 - k,
                    "advantage": (-1) ** k,
                    "num_tokens": 4,
                }
                for k, i in enumerate(ids)
            ]
            r = api.post(
                "/v1/runs/persist/steps/5/sequences", json={"learning_rate": 0.1, "sequences": seqs}
            )
            assert r.status_code == 200, r.text
            body = save_safetensors(grads, metadata={"sequence_ids": json.dumps(ids)})
            r = api.post(
                "/v1/runs/persist/steps/5/gradients",
                content=body,
                headers={"Content-Type": "application/octet-stream"},
            )
            assert r.status_code == 201, r.text  # serve runs a worker: sketched on receipt
            status = _wait_ready(api, "persist", 5)
            assert status["state"] == "ready" and status["rows"] == len(ids)
            kernel = api.get("/v1/runs/persist/steps/5/kernel").json()
        assert kernel["ids"] == ids
        # The exact sketch's kernel is W W^T (float32 rows, float64 products).
        np.testing.assert_allclose(np.array(kernel["matrix"]), W @ W.T, rtol=1e-5, atol=1e-5)
    finally:
        code = _stop(proc)
    output = log.read_text()
    assert code == 0, output
    assert f"serving at http://127.0.0.1:{port}" in output and "stopped" in output
    # Persistence on: the append-only file and the final snapshot are in the data directory.
    assert (data_dir / "appendonly.aof").stat().st_size > 0
    assert (data_dir / "kernelscope.rdb").stat().st_size > 0

    proc = _start_serve(port, env, log)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as api:
            assert [r["run_id"] for r in api.get("/v1/runs").json()] == ["persist"]
            status = api.get("/v1/runs/persist/steps/5").json()
            assert status["state"] == "ready" and status["rows"] == len(ids)
            again = api.get("/v1/runs/persist/steps/5/kernel").json()
        assert again == kernel
    finally:
        assert _stop(proc) == 0, log.read_text()


def test_embedded_service_context_manager(tmp_path: Path) -> None:
    settings = Settings(redis_url=None, data_dir=tmp_path / "ks", key_prefix="embtest")
    with embedded_service(settings, port=0, workers=1, device="cpu") as svc:
        assert svc.data_dir == (tmp_path / "ks").resolve()
        assert svc.redis_url.startswith("unix://")
        assert svc.settings.redis_url == svc.redis_url
        assert svc.url == f"http://127.0.0.1:{svc.settings.port}" and svc.settings.port > 0
        health = httpx.get(f"{svc.url}/healthz", timeout=10).json()
        assert health["redis"] is True
        client = redis_sync.Redis.from_url(svc.redis_url)
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("port") == {"port": "0"}  # unix socket only, no TCP
        pid = int(client.info("server")["process_id"])
        client.close()
        # The data directory is locked while the service runs.
        with (
            pytest.raises(EmbeddedServiceError, match="in use"),
            embedded_service(settings, port=0),
        ):
            pass
    assert not _process_alive(pid), "the embedded redis-server outlived the context"


def test_stop_waits_until_the_server_has_exited(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``stop()`` polls the server's own pid until the process is gone.  It used to read the
    pid after dropping its client (0), so it returned as soon as ``SHUTDOWN SAVE`` closed the
    connection, while ``redis-server`` could still be exiting: the context-manager test above
    once saw the server outlive the context (CI, 2026-12-06)."""
    embedded = EmbeddedRedis(tmp_path / "ks")
    embedded.start()
    pid = embedded.pid
    assert pid > 0
    polled: list[int] = []

    def recording(p: int) -> bool:
        polled.append(p)
        return _process_alive(p)

    monkeypatch.setattr(embedded_module, "_process_alive", recording)
    embedded.stop()
    assert polled and set(polled) == {pid}
    assert not _process_alive(pid)


def test_embedded_service_with_external_redis(
    redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    settings = Settings(redis_url=redis_url, key_prefix=key_prefix, data_dir=tmp_path / "unused")
    with embedded_service(settings, port=0, workers=0) as svc:
        assert svc.redis_url == redis_url and svc.data_dir is None
        assert httpx.get(f"{svc.url}/healthz", timeout=10).json()["redis"] is True
    assert not (tmp_path / "unused").exists()


def test_dead_worker_thread_is_restarted(
    redis_url: str, key_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error that escapes the worker loop kills its thread; the embedded service logs it and
    starts a new worker thread, which sketches the queued upload.  It used to be logged once
    and never restarted, with ``/healthz`` still 200 and uploads never sketched."""
    import threading

    from service.queue import Queue

    real = Queue.read
    armed = threading.Event()  # set once the service is up (start-up failures are reported)
    calls = {"n": 0, "failed": 0}

    async def fails_once(self: Queue, *args: Any) -> Any:
        calls["n"] += 1
        if armed.is_set() and not calls["failed"]:
            calls["failed"] = calls["n"]
            raise RuntimeError("a bug outside any job")
        return await real(self, *args)

    monkeypatch.setattr(Queue, "read", fails_once)
    settings = Settings(
        redis_url=redis_url,
        key_prefix=key_prefix,
        data_dir=tmp_path / "unused",
        worker_block_ms=100,
        sketch_on_receipt=False,  # the upload must wait in the queue for the new thread
    )
    with (
        embedded_service(settings, port=0, workers=1, device="cpu") as svc,
        httpx.Client(base_url=svc.url, timeout=60) as http,
    ):
        armed.set()
        deadline = time.monotonic() + 30
        while not calls["failed"] and time.monotonic() < deadline:  # the thread has died
            time.sleep(0.05)
        assert calls["failed"]
        spec = {"run_id": "r", "sketch": {"kind": "countsketch", "dim": 8, "seed": 0}}
        assert http.post("/v1/runs", json=spec).status_code == 201
        ids = ["a", "b"]
        seqs = [
            {"id": i, "prompt_id": "p", "logprob": -1.0, "advantage": a, "num_tokens": 2}
            for i, a in zip(ids, (1.0, -1.0), strict=True)
        ]
        assert (
            http.post(
                "/v1/runs/r/steps/0/sequences", json={"learning_rate": 0.1, "sequences": seqs}
            ).status_code
            == 200
        )
        body = save_safetensors(
            {"w": torch.randn(2, 5)}, metadata={"sequence_ids": json.dumps(ids)}
        )
        headers = {"Content-Type": "application/octet-stream"}
        assert (
            http.post("/v1/runs/r/steps/0/gradients", content=body, headers=headers).status_code
            == 202
        )
        status = http.get("/v1/runs/r/steps/0", params={"wait": 30}).json()
        deadline = time.monotonic() + 30
        while status["state"] != "ready" and time.monotonic() < deadline:
            time.sleep(0.2)
            status = http.get("/v1/runs/r/steps/0").json()
        assert status["state"] == "ready", status
    assert calls["failed"] and calls["n"] > calls["failed"]  # a new thread ran the loop again
