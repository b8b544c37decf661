"""Requests cannot hold the API: the work one request does on the event loop is bounded
(issue: hardening).  Against a live uvicorn, so that a blocked loop shows as a blocked
``/healthz``."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from tests.service.conftest import OCTET, LiveService, StepData, safetensors_body


@pytest.mark.parametrize("live_service", [{"workers": 0}], indirect=True)
def test_healthz_answers_while_a_huge_request_with_a_duplicate_is_refused(
    live_service: LiveService,
) -> None:
    """2^16 sequences (the per-request maximum) with one duplicate id: the duplicate check is
    linear (it was quadratic: about a minute at this size, with ``/healthz`` and every other
    request blocked), the answer is a 422 naming the id, and ``/healthz`` answers within a
    bound far below what the quadratic check took."""
    base = live_service.base_url
    run = {"run_id": "big", "sketch": {"kind": "countsketch", "dim": 64, "seed": 0}}
    assert httpx.post(f"{base}/v1/runs", json=run).status_code == 201
    n = 1 << 16
    sequences = [
        {
            "id": f"s{i}",
            "prompt_id": f"p{i // 8}",
            "logprob": -1.0,
            "advantage": 0.0,
            "num_tokens": 4,
        }
        for i in range(n)
    ]
    sequences[-1]["id"] = "s7"
    body = {"learning_rate": 0.1, "sequences": sequences}
    with ThreadPoolExecutor(1) as pool:
        big = pool.submit(
            httpx.post, f"{base}/v1/runs/big/steps/0/sequences", json=body, timeout=300
        )
        time.sleep(1.0)  # the body is on the server: its validation has begun or is over
        health = httpx.get(f"{base}/healthz", timeout=10)
        assert health.status_code == 200
        answer = big.result()
    assert answer.status_code == 422
    assert "s7" in answer.text and answer.headers["content-type"] == "application/problem+json"
    assert httpx.get(f"{base}/v1/runs/big/steps/0").status_code == 404  # nothing stored


def test_analysis_larger_than_its_memory_cap_is_422_naming_it(
    live_service: LiveService, step_data: StepData
) -> None:
    """An analysis loads ``n x k`` float64 rows: above ``KERNELSCOPE_MAX_ANALYSIS_MB`` it is a
    422 naming the limit, checked before any row is loaded, whatever ``n``."""
    live_service.env["KERNELSCOPE_MAX_ANALYSIS_MB"] = "0.0001"  # 105 bytes
    live_service.restart_api()
    base = live_service.base_url
    with httpx.Client(base_url=base, timeout=150) as http:
        spec = {"run_id": "mem", "sketch": {"kind": "countsketch", "dim": 32, "seed": 5}}
        assert http.post("/v1/runs", json=spec).status_code == 201
        meta = {"learning_rate": step_data.learning_rate, "sequences": step_data.sequences}
        assert http.post("/v1/runs/mem/steps/0/sequences", json=meta).status_code == 200
        body = safetensors_body(step_data.grads, step_data.ids)
        assert (
            http.post("/v1/runs/mem/steps/0/gradients", content=body, headers=OCTET).status_code
            == 202
        )
        answer = http.get("/v1/runs/mem/steps/0/kernel", params={"wait": 60})
    assert answer.status_code == 422, answer.text
    assert "KERNELSCOPE_MAX_ANALYSIS_MB" in answer.json()["detail"]


def _memory_mib(pid: int, field: str = "VmHWM") -> float:
    """A process's memory from ``/proc``: ``VmHWM`` (peak RSS) or ``VmRSS`` (now), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field}")


def _send_declared(port: int, head: str, declared: int, send_bytes: int) -> bytes:
    """Send ``head`` with a ``Content-Length: declared`` body, up to ``send_bytes`` of it (the
    server may answer and close before), and return the answer's first bytes."""
    chunk = b"{" + b" " * (1 << 20)
    with socket.create_connection(("127.0.0.1", port), timeout=60) as conn:
        conn.sendall(f"{head}Content-Length: {declared}\r\n\r\n".encode())
        sent = 0
        with contextlib.suppress(OSError):  # the server answered and closed: stop sending
            while sent < send_bytes:
                conn.sendall(chunk)
                sent += len(chunk)
        return conn.recv(4096)


@pytest.mark.parametrize("live_service", [{"workers": 0}], indirect=True)
def test_unauthenticated_huge_body_is_refused_before_it_is_read(
    live_service: LiveService,
) -> None:
    """A token-protected service answers a 1 GiB unauthenticated JSON body with 401 from its
    headers, and an authenticated JSON body declared above ``KERNELSCOPE_MAX_JSON_MB`` with
    413, both without reading it: the API's peak RSS does not grow by anything like the body.
    FastAPI used to read and parse the whole body before the token dependency ran."""
    live_service.env["KERNELSCOPE_TOKEN"] = "s3cret"
    live_service.restart_api()
    assert live_service.api is not None
    pid = live_service.api.pid
    httpx.get(f"{live_service.base_url}/healthz", timeout=10)
    before = _memory_mib(pid)
    head = "POST /v1/runs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    answer = _send_declared(live_service.port, head, 1 << 30, 1 << 30)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert b"application/problem+json" in answer
    authed = head + "Authorization: Bearer s3cret\r\n"
    answer = _send_declared(live_service.port, authed, 1 << 30, 1 << 30)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"KERNELSCOPE_MAX_JSON_MB" in answer
    assert _memory_mib(pid) - before < 200, "the API read the body"
    assert httpx.get(f"{live_service.base_url}/healthz", timeout=10).status_code == 200


def test_json_body_streamed_past_the_limit_is_413() -> None:
    """Without a ``Content-Length`` (chunked), a JSON body is counted as it arrives and cut
    off with a 413 once past the limit; a small one passes the gate."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    settings = Settings(redis_url="redis://127.0.0.1:1/0", max_json_mb=1 / 1024)  # 1 KiB

    def chunks(total: int) -> Iterator[bytes]:
        yield b'{"run_id": "x", "pad": "'
        for _ in range(total // 256):
            yield b"a" * 256
        yield b'"}'

    with TestClient(create_app(settings)) as api:
        big = api.post(
            "/v1/runs", content=chunks(4096), headers={"Content-Type": "application/json"}
        )
        assert big.status_code == 413 and "KERNELSCOPE_MAX_JSON_MB" in big.json()["detail"]
        assert big.headers["content-type"] == "application/problem+json"
        small = api.post(
            "/v1/runs", content=chunks(256), headers={"Content-Type": "application/json"}
        )
        assert small.status_code == 422  # through the gate, refused by validation (extra field)


@pytest.mark.parametrize("live_service", [{"workers": 0}], indirect=True)
def test_readyz_is_503_while_jobs_wait_with_no_live_worker(
    live_service: LiveService, step_data: StepData
) -> None:
    """``/readyz``: 200 with an empty queue; 503 (with the reason and ``Retry-After``) once an
    upload waits and no worker has touched the queue within ``KERNELSCOPE_WORKER_STALE_S``;
    200 again when a worker has sketched it.  ``/healthz`` (liveness) stays 200 throughout."""
    live_service.env["KERNELSCOPE_WORKER_STALE_S"] = "2"
    live_service.restart_api()
    with httpx.Client(base_url=live_service.base_url, timeout=150) as http:
        assert http.get("/readyz").status_code == 200
        spec = {"run_id": "rdy", "sketch": {"kind": "countsketch", "dim": 32, "seed": 5}}
        assert http.post("/v1/runs", json=spec).status_code == 201
        meta = {"learning_rate": step_data.learning_rate, "sequences": step_data.sequences}
        assert http.post("/v1/runs/rdy/steps/0/sequences", json=meta).status_code == 200
        body = safetensors_body(step_data.grads, step_data.ids)
        headers = OCTET
        assert (
            http.post("/v1/runs/rdy/steps/0/gradients", content=body, headers=headers).status_code
            == 202
        )
        answer = http.get("/readyz")
        assert answer.status_code == 503 and answer.headers["retry-after"]
        ready = answer.json()
        assert ready["status"] == "not_ready" and ready["queue_depth"] == 1
        assert ready["live_workers"] == 0 and "no worker" in ready["detail"]
        assert http.get("/healthz").status_code == 200
        live_service.start_worker()
        assert http.get("/v1/runs/rdy/steps/0/kernel", params={"wait": 60}).status_code == 200
        answer = http.get("/readyz")
        assert answer.status_code == 200 and answer.json()["live_workers"] >= 1


@pytest.mark.parametrize("live_service", [{"workers": 0}], indirect=True)
def test_uploads_in_flight_are_bounded_and_allocated_as_they_arrive(
    live_service: LiveService,
) -> None:
    """An upload declaring 300 MiB and sending one KiB holds no memory for the rest (the buffer
    grows as bytes arrive; it used to be allocated, and zero-filled, at the declared size), but
    holds its declared bytes of the ``KERNELSCOPE_MAX_UPLOADS_MB`` budget: a second upload that
    would pass it is a 503 with ``Retry-After``, and is accepted once the first has gone."""
    live_service.env["KERNELSCOPE_MAX_BODY_MB"] = "400"
    live_service.env["KERNELSCOPE_MAX_UPLOADS_MB"] = "310"
    live_service.restart_api()
    assert live_service.api is not None
    pid = live_service.api.pid
    base = live_service.base_url
    with httpx.Client(base_url=base, timeout=60) as http:
        spec = {"run_id": "up", "sketch": {"kind": "countsketch", "dim": 8, "seed": 0}}
        assert http.post("/v1/runs", json=spec).status_code == 201
        url = "/v1/runs/up/steps/0/gradients"
        ids = ["a", "b"]
        body = safetensors_body({"w": torch.randn(2, 4096 * 1024)}, ids)  # 32 MiB
        before = _memory_mib(pid, "VmRSS")
        with socket.create_connection(("127.0.0.1", live_service.port), timeout=60) as slow:
            slow.sendall(
                (
                    f"POST {url} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
                    f"Content-Length: {300 << 20}\r\n\r\n"
                ).encode()
                + b"\0" * 1024
            )
            time.sleep(1.0)  # the API has taken the declared bytes and holds the connection
            assert _memory_mib(pid, "VmRSS") - before < 100, "the declared length was allocated"
            busy = http.post(url, content=body, headers=OCTET)
            assert busy.status_code == 503, busy.text
            assert busy.headers["retry-after"] and "KERNELSCOPE_MAX_UPLOADS_MB" in busy.text
        # the slow client is gone: its bytes are given back
        deadline = time.monotonic() + 30
        answer = http.post(url, content=body, headers=OCTET)
        while answer.status_code == 503 and time.monotonic() < deadline:
            time.sleep(0.2)
            answer = http.post(url, content=body, headers=OCTET)
        assert answer.status_code == 202, answer.text
