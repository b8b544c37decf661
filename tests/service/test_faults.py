"""Faults with real processes: a worker killed mid-job, a poison upload, an expired claim
check, the API restarted with jobs queued, SIGTERM finishing the job in hand."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pytest
import redis as redis_sync
import torch

from service.keys import GROUP, Keys
from sketch.spec import sketcher_for
from tests.service.conftest import (
    OCTET,
    LiveService,
    StepData,
    assert_kernel_close,
    safetensors_body,
)

WAIT = {"wait": 120}


def until(check: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> Any:
    """Poll ``check`` until it returns a truthy value (bounded; not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def setup_run(http: httpx.Client, run_id: str, data: StepData) -> dict[str, Any]:
    spec = {"run_id": run_id, "sketch": {"kind": "countsketch", "dim": 32, "seed": 5}}
    run: dict[str, Any] = http.post("/v1/runs", json=spec).json()
    body = {"learning_rate": data.learning_rate, "sequences": data.sequences}
    assert http.post(f"/v1/runs/{run_id}/steps/0/sequences", json=body).status_code == 200
    return run


def push(http: httpx.Client, run_id: str, tensors: dict[str, torch.Tensor], ids: list[str]) -> str:
    r = http.post(
        f"/v1/runs/{run_id}/steps/0/gradients",
        content=safetensors_body(tensors, ids),
        headers=OCTET,
    )
    assert r.status_code == 202, r.text
    upload_id: str = r.json()["upload_id"]
    return upload_id


def expected_kernel(run: dict[str, Any], data: StepData) -> np.ndarray:
    Y = sketcher_for(run["sketch"], run.get("parameters")).sketch(data.grads).double().numpy()
    return Y @ Y.T


def kernel(http: httpx.Client, run_id: str) -> np.ndarray:
    r = http.get(f"/v1/runs/{run_id}/steps/0/kernel", params=WAIT)
    assert r.status_code == 200, r.text
    return np.array(r.json()["matrix"])


def pending_consumers(redis_client: redis_sync.Redis, keys: Keys) -> dict[str, int]:
    if not redis_client.exists(keys.streams[0]):
        return {}
    info = redis_client.xpending(keys.streams[0], GROUP)
    return {c["name"].decode(): int(c["pending"]) for c in info["consumers"]}


def test_killed_worker_job_is_finished_by_another(
    live_service: LiveService, step_data: StepData, redis_client: redis_sync.Redis, key_prefix: str
) -> None:
    keys = Keys(key_prefix)
    assert live_service.stop_worker(live_service.workers[0]) == 0  # SIGTERM: clean exit
    stalled = live_service.start_worker(worker_stall_s="300")
    with httpx.Client(base_url=live_service.base_url, timeout=150) as http:
        run = setup_run(http, "crash", step_data)
        upload_id = push(http, "crash", step_data.grads, step_data.ids)
        until(lambda: pending_consumers(redis_client, keys), what="the job to be delivered")
        live_service.stop_worker(stalled, signal.SIGKILL)  # dies holding the job
        assert http.get("/v1/runs/crash/steps/0").json()["state"] == "pending"
        live_service.start_worker(claim_idle_ms="300")
        assert_kernel_close(kernel(http, "crash"), expected_kernel(run, step_data))
        status = http.get("/v1/runs/crash/steps/0").json()
        assert status["uploads"] == 1 and status["rows"] == 6 and status["errors"] == []
    parts = list(redis_client.scan_iter(match=f"{key_prefix}:*:part:*"))
    assert [p.decode().rsplit(":", 1)[1] for p in parts] == [upload_id]  # nothing doubled
    assert redis_client.xpending(keys.streams[0], GROUP)["pending"] == 0
    assert not redis_client.exists(keys.deads[0])
    assert not redis_client.exists(keys.raw("crash", 0, upload_id))


@pytest.mark.parametrize("live_service", [{"workers": 0}], indirect=True)
def test_poison_upload_goes_to_the_dead_letter(
    live_service: LiveService, step_data: StepData, redis_client: redis_sync.Redis, key_prefix: str
) -> None:
    keys = Keys(key_prefix)
    live_service.start_worker(max_attempts="2", claim_idle_ms="200")
    n = len(step_data.ids)
    with httpx.Client(base_url=live_service.base_url, timeout=150) as http:
        setup_run(http, "poison", step_data)
        good = push(http, "poison", step_data.grads, step_data.ids)
        # Finite float32 values whose sketch is not: passes the API, fails in the worker.
        huge = torch.full((n, 4096), 3.0e38)
        bad = push(http, "poison", {"x": huge}, step_data.ids)
        status = until(
            lambda: (s := http.get("/v1/runs/poison/steps/0").json())["state"] == "failed" and s,
            what="the dead letter",
        )
        assert status["pending_uploads"] == 0 and status["rows"] == n
        [error] = status["errors"]
        assert error["upload_id"] == bad and error["attempts"] == 2
        assert "not finite" in error["error"]
        refused = http.get("/v1/runs/poison/steps/0/entropy", params={"wait": 1})
        assert refused.status_code == 409
        assert refused.json()["step_status"]["errors"] == [error]
    dead: Any = redis_client.xrange(keys.deads[0])
    [(_, fields)] = dead
    assert fields[b"upload_id"].decode() == bad and b"not finite" in fields[b"error"]
    assert redis_client.xpending(keys.streams[0], GROUP)["pending"] == 0
    assert good != bad


@pytest.mark.parametrize("live_service", [{"workers": 0}], indirect=True)
def test_expired_claim_check_is_dead_lettered_and_resend_retries(
    live_service: LiveService, step_data: StepData, redis_client: redis_sync.Redis, key_prefix: str
) -> None:
    keys = Keys(key_prefix)
    with httpx.Client(base_url=live_service.base_url, timeout=150) as http:
        run = setup_run(http, "expired", step_data)
        upload_id = push(http, "expired", step_data.grads, step_data.ids)
        assert redis_client.unlink(keys.raw("expired", 0, upload_id)) == 1  # as if its TTL ran out
        live_service.start_worker()
        status = until(
            lambda: (s := http.get("/v1/runs/expired/steps/0").json())["state"] == "failed" and s,
            what="the dead letter",
        )
        assert "expired" in status["errors"][0]["error"]
        assert push(http, "expired", step_data.grads, step_data.ids) == upload_id  # retry
        assert_kernel_close(kernel(http, "expired"), expected_kernel(run, step_data))
        assert http.get("/v1/runs/expired/steps/0").json()["errors"] == []


@pytest.mark.parametrize("live_service", [{"workers": 0}], indirect=True)
def test_api_restart_with_jobs_queued_loses_none(
    live_service: LiveService, step_data: StepData
) -> None:
    half = len(step_data.ids) // 2
    with httpx.Client(base_url=live_service.base_url, timeout=150) as http:
        run = setup_run(http, "restart", step_data)
        for rows in (slice(0, half), slice(half, None)):
            push(
                http,
                "restart",
                {k: v[rows] for k, v in step_data.grads.items()},
                step_data.ids[rows],
            )
        assert http.get("/v1/runs/restart/steps/0").json()["pending_uploads"] == 2
    live_service.restart_api()
    live_service.start_worker()
    with httpx.Client(base_url=live_service.base_url, timeout=150) as http:
        assert_kernel_close(kernel(http, "restart"), expected_kernel(run, step_data))


@pytest.mark.parametrize("live_service", [{"workers": 0}], indirect=True)
def test_sigterm_finishes_the_job_in_hand(
    live_service: LiveService, step_data: StepData, redis_client: redis_sync.Redis, key_prefix: str
) -> None:
    keys = Keys(key_prefix)
    slow = live_service.start_worker(worker_stall_s="1.5")
    with httpx.Client(base_url=live_service.base_url, timeout=150) as http:
        run = setup_run(http, "term", step_data)
        push(http, "term", step_data.grads, step_data.ids)
        until(lambda: pending_consumers(redis_client, keys), what="the job to be delivered")
        assert live_service.stop_worker(slow, signal.SIGTERM) == 0
        # no worker is left: the job was finished by the one that got SIGTERM
        assert http.get("/v1/runs/term/steps/0").json()["state"] == "ready"
        assert_kernel_close(kernel(http, "term"), expected_kernel(run, step_data))


@pytest.mark.parametrize("live_service", [{"workers": 0}], indirect=True)
def test_sigterm_hands_the_rest_of_the_batch_back(
    live_service: LiveService, step_data: StepData, redis_client: redis_sync.Redis, key_prefix: str
) -> None:
    """A worker that gets SIGTERM with three jobs in its batch finishes the first and hands
    the other two back: idle past ``claim_idle_ms`` (the next worker takes them at once, not a
    minute later) and with the delivery uncounted (with ``max_attempts = 1`` a counted one
    would be dead-lettered).  Before, it finished the whole batch, which could outlast the
    stop's grace period."""
    keys = Keys(key_prefix)
    with httpx.Client(base_url=live_service.base_url, timeout=150) as http:
        run = setup_run(http, "handback", step_data)
        for i in (0, 2, 4):
            rows = slice(i, i + 2)
            push(
                http,
                "handback",
                {k: v[rows] for k, v in step_data.grads.items()},
                step_data.ids[rows],
            )
        slow = live_service.start_worker(worker_stall_s="1.5", max_attempts="1")
        until(lambda: pending_consumers(redis_client, keys), what="the batch to be delivered")
        assert live_service.stop_worker(slow, signal.SIGTERM) == 0
        status = http.get("/v1/runs/handback/steps/0").json()
        assert status["pending_uploads"] == 2 and status["rows"] == 2
        pending = redis_client.xpending_range(keys.streams[0], GROUP, "-", "+", 10)
        assert len(pending) == 2
        assert all(p["times_delivered"] == 0 for p in pending)
        assert all(p["time_since_delivered"] >= 60_000 for p in pending)
        started = time.monotonic()
        live_service.start_worker(max_attempts="1")
        assert_kernel_close(kernel(http, "handback"), expected_kernel(run, step_data))
        assert time.monotonic() - started < 30
        assert http.get("/v1/runs/handback/steps/0").json()["errors"] == []
    assert not redis_client.exists(keys.deads[0])


@pytest.mark.parametrize("live_service", [{"workers": 0}], indirect=True)
def test_jobs_waiting_in_a_batch_are_not_reclaimed(
    live_service: LiveService, step_data: StepData, redis_client: redis_sync.Redis, key_prefix: str
) -> None:
    """Two slow workers (each stalls 4 s after reading a batch), three jobs queued before they
    start, so one worker reads all three in one batch.  Every job of the batch is kept claimed,
    so the other worker (claim_idle_ms 300) never takes one over; with ``max_attempts = 1`` a
    single takeover would be dead-lettered as a lost worker.  Every row is stored once."""
    keys = Keys(key_prefix)
    with httpx.Client(base_url=live_service.base_url, timeout=150) as http:
        run = setup_run(http, "batch", step_data)
        uploads = [
            push(http, "batch", {k: v[i : i + 2] for k, v in step_data.grads.items()}, ids)
            for i, ids in (
                (0, step_data.ids[0:2]),
                (2, step_data.ids[2:4]),
                (4, step_data.ids[4:6]),
            )
        ]
        slow = {"worker_stall_s": "4", "claim_idle_ms": "300", "max_attempts": "1"}
        workers = [live_service.start_worker(wait=False, **slow) for _ in range(2)]
        for proc in workers:
            live_service.wait_worker(proc)
        assert_kernel_close(kernel(http, "batch"), expected_kernel(run, step_data))
        status = http.get("/v1/runs/batch/steps/0").json()
        assert status["state"] == "ready" and status["errors"] == []
        assert status["uploads"] == 3 and status["rows"] == 6
    parts = sorted(
        p.decode().rsplit(":", 1)[1] for p in redis_client.scan_iter(match=f"{key_prefix}:*:part:*")
    )
    assert parts == sorted(uploads)
    assert not redis_client.exists(keys.deads[0])


def test_malformed_stream_entries_are_dead_lettered_and_the_worker_goes_on(
    live_service: LiveService,
    step_data: StepData,
    redis_client: redis_sync.Redis,
    key_prefix: str,
) -> None:
    """Stream entries that name no job (a field missing, a step that is not a number) go to
    the dead letter with their fields; they used to raise out of the worker loop and kill
    every worker that claimed them.  The worker lives on and sketches the next upload; a run
    whose spec cannot be read fails its own jobs only."""
    keys = Keys(key_prefix)
    worker = live_service.workers[0]
    redis_client.xadd(keys.streams[0], {"run_id": "nobody"})
    redis_client.xadd(
        keys.streams[0], {"run_id": "nobody", "step": "x", "upload_id": "u", "kind": "gradients"}
    )
    with httpx.Client(base_url=live_service.base_url, timeout=150) as http:
        run = setup_run(http, "after", step_data)
        push(http, "after", step_data.grads, step_data.ids)
        assert_kernel_close(kernel(http, "after"), expected_kernel(run, step_data))
    dead = redis_client.xrange(keys.deads[0])
    assert len(dead) == 2
    assert all(b"malformed job entry" in fields[b"error"] for _, fields in dead)
    assert b"nobody" in dead[0][1][b"fields"]
    assert worker.poll() is None, "the worker died"
    assert redis_client.xpending(keys.streams[0], GROUP)["pending"] == 0
