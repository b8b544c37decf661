"""Requests cannot hold the API: the work one request does on the event loop is bounded
(issue: hardening).  Against a live uvicorn, so that a blocked loop shows as a blocked
``/healthz``."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

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
