"""Issue 15, section 4: an API with stream workers of its own sketches an upload on receipt
(201, only the part stored, the raw body never in Redis); an API beside separate workers keeps
the claim check (202).  Re-sends are harmless on both paths, and a sketch that fails stores
nothing of its own."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import numpy as np
import pytest
import redis as redis_sync
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from service.app import create_app
from service.keys import Keys
from service.settings import Settings
from service.store import UPLOAD_DONE, Store
from service.worker import ReceiptSketcher
from sketch.spec import sketcher_for
from tests.service.conftest import (
    OCTET,
    StepData,
    assert_kernel_close,
    safetensors_body,
    store_dump,
)
from tests.service.test_analysis import drain

SPEC = {"run_id": "r", "sketch": {"kind": "countsketch", "dim": 32, "seed": 5}}
STEP = "/v1/runs/r/steps/0"


@pytest.fixture
def receiving(settings: Settings) -> Iterator[TestClient]:
    """The app as ``kernelscope serve`` builds it with in-process workers on the CPU."""
    with TestClient(create_app(settings, sketch_device="cpu")) as c:
        yield c


def _setup(api: TestClient, data: StepData) -> dict[str, Any]:
    run: dict[str, Any] = api.post("/v1/runs", json=SPEC).json()
    body = {"learning_rate": data.learning_rate, "sequences": data.sequences}
    assert api.post(f"{STEP}/sequences", json=body).status_code == 200
    return run


def _expected(run: dict[str, Any], data: StepData) -> np.ndarray:
    Y = sketcher_for(run["sketch"], run.get("parameters")).sketch(data.grads).double().numpy()
    return Y @ Y.T


def _kernel(api: TestClient) -> np.ndarray:
    r = api.get(f"{STEP}/kernel")
    assert r.status_code == 200, r.text
    return np.array(r.json()["matrix"])


def _keys(redis_client: redis_sync.Redis, prefix: str, kind: str) -> list[bytes]:
    """The keys of one kind (``raw``, ``part``) under ``prefix`` (docs/keys.md)."""
    found = redis_client.scan_iter(match=f"{prefix}:*", count=1000)
    return [k for k in found if f":{kind}:".encode() in k]


def test_sketched_on_receipt_answers_201_ready_without_a_worker(
    receiving: TestClient,
    settings: Settings,
    step_data: StepData,
    redis_client: redis_sync.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def no_claim_check(*_: Any, **__: Any) -> bool:
        raise AssertionError("the raw body went to Redis")

    def sketched() -> float:
        labels = {"kind": "gradients", "outcome": "sketched"}
        return REGISTRY.get_sample_value("kernelscope_uploads_total", labels) or 0.0

    monkeypatch.setattr(Store, "add_upload", no_claim_check)
    run = _setup(receiving, step_data)
    body = safetensors_body(step_data.grads, step_data.ids)
    counted = sketched()
    first = receiving.post(f"{STEP}/gradients", content=body, headers=OCTET)
    assert first.status_code == 201, first.text
    assert sketched() == counted + 1  # the metrics tell the two paths apart
    assert first.json()["queued"] is True and first.json()["rows"] == len(step_data.ids)
    # ready at once: no worker runs, nothing is queued, the raw body never was in Redis
    status = receiving.get(STEP).json()
    assert status["state"] == "ready" and status["pending_uploads"] == 0, status
    keys = Keys(settings.key_prefix)
    assert redis_client.xlen(keys.streams[0]) == 0
    assert _keys(redis_client, settings.key_prefix, "raw") == []
    assert_kernel_close(_kernel(receiving), _expected(run, step_data))
    # a re-send (same body: same upload id) is harmless: 201, one part, the same kernel
    version = int(redis_client.get(keys.version("r", 0)) or 0)
    again = receiving.post(f"{STEP}/gradients", content=body, headers=OCTET)
    assert again.status_code == 201 and again.json() == {**first.json(), "queued": False}
    assert len(_keys(redis_client, settings.key_prefix, "part")) == 1
    assert int(redis_client.get(keys.version("r", 0)) or 0) == version
    assert_kernel_close(_kernel(receiving), _expected(run, step_data))


def test_client_sketches_are_stored_on_receipt_too(
    receiving: TestClient, settings: Settings, step_data: StepData, redis_client: redis_sync.Redis
) -> None:
    run = _setup(receiving, step_data)
    rows = sketcher_for(run["sketch"], run.get("parameters")).sketch(step_data.grads)
    body = safetensors_body({"sketch": rows}, step_data.ids)
    headers = {**OCTET, "Idempotency-Key": "rank0-step0"}
    r = receiving.post(f"{STEP}/sketches", content=body, headers=headers)
    assert r.status_code == 201, r.text
    assert _keys(redis_client, settings.key_prefix, "raw") == []
    assert_kernel_close(_kernel(receiving), _expected(run, step_data))


def test_an_api_beside_separate_workers_keeps_the_claim_check(
    client: TestClient, settings: Settings, step_data: StepData, redis_client: redis_sync.Redis
) -> None:
    run = _setup(client, step_data)
    body = safetensors_body(step_data.grads, step_data.ids)
    first = client.post(f"{STEP}/gradients", content=body, headers=OCTET)
    assert first.status_code == 202 and first.json()["queued"] is True, first.text
    assert client.get(STEP).json()["state"] == "pending"
    assert len(_keys(redis_client, settings.key_prefix, "raw")) == 1
    assert drain(settings).processed == 1
    assert client.get(STEP).json()["state"] == "ready"
    again = client.post(f"{STEP}/gradients", content=body, headers=OCTET)
    assert again.status_code == 202 and again.json() == {**first.json(), "queued": False}
    assert drain(settings).processed == 0
    assert len(_keys(redis_client, settings.key_prefix, "part")) == 1
    assert_kernel_close(_kernel(client), _expected(run, step_data))


def test_a_failed_sketch_on_receipt_goes_to_the_queue(
    receiving: TestClient,
    settings: Settings,
    step_data: StepData,
    redis_client: redis_sync.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A sketcher that raises stores nothing of its own: the upload takes the claim-check
    path (202, queued), the worker's retry completes it, and a re-send is then a 201."""
    real = ReceiptSketcher.sketch

    async def broken(self: ReceiptSketcher, *args: Any) -> bytes:
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(ReceiptSketcher, "sketch", broken)
    run = _setup(receiving, step_data)
    body = safetensors_body(step_data.grads, step_data.ids)
    first = receiving.post(f"{STEP}/gradients", content=body, headers=OCTET)
    assert first.status_code == 202 and first.json()["queued"] is True, first.text
    assert _keys(redis_client, settings.key_prefix, "part") == []
    assert receiving.get(STEP).json()["state"] == "pending"
    assert drain(settings).processed == 1
    assert receiving.get(STEP).json()["state"] == "ready"
    assert_kernel_close(_kernel(receiving), _expected(run, step_data))
    monkeypatch.setattr(ReceiptSketcher, "sketch", real)
    again = receiving.post(f"{STEP}/gradients", content=body, headers=OCTET)
    assert again.status_code == 201 and again.json()["queued"] is False
    assert len(_keys(redis_client, settings.key_prefix, "part")) == 1


@contextlib.asynccontextmanager
async def _receiving_store(
    settings: Settings, body: bytes
) -> AsyncIterator[tuple[Store, Callable[[], Awaitable[bytes]]]]:
    """A store on the test's Redis and a sketch of ``body`` on receipt (the API's path)."""
    from service.uploads import validate_upload

    redis = Redis.from_url(str(settings.redis_url))
    receipt = ReceiptSketcher("cpu")
    run = {**SPEC, "k": 32}
    parsed = validate_upload(bytearray(body), "gradients", run)

    async def sketch() -> bytes:
        return await receipt.sketch(bytearray(body), parsed, "gradients", run)

    try:
        yield Store(redis, settings.key_prefix), sketch
    finally:
        receipt.close()
        await redis.aclose()


def test_a_crash_mid_sketch_stores_nothing_and_the_retry_completes_it(
    settings: Settings, step_data: StepData, redis_client: redis_sync.Redis
) -> None:
    """The request dies while its body is sketched (cancelled: a client gone, a process
    stopped): nothing is stored, and the client's re-send sketches and stores it."""
    body = safetensors_body(step_data.grads, step_data.ids)
    ids = step_data.ids

    async def go() -> None:
        async with _receiving_store(settings, body) as (store, sketch):
            before = store_dump(redis_client, settings.key_prefix)

            async def crash() -> bytes:
                await asyncio.sleep(0)
                raise asyncio.CancelledError

            with pytest.raises(asyncio.CancelledError):
                await store.accept_upload("r", 0, "u1", "gradients", ids, body, crash)
            assert store_dump(redis_client, settings.key_prefix) == before
            stored = await store.accept_upload("r", 0, "u1", "gradients", ids, body, sketch)
            assert stored.new and stored.sketched
            assert await store.upload_state("r", 0, "u1") == UPLOAD_DONE
            again = await store.accept_upload("r", 0, "u1", "gradients", ids, body, sketch)
            assert not again.new and again.sketched

    asyncio.run(go())
    assert _keys(redis_client, settings.key_prefix, "raw") == []
    assert len(_keys(redis_client, settings.key_prefix, "part")) == 1


def test_two_identical_uploads_sketched_at_once_store_it_once(
    settings: Settings, step_data: StepData, redis_client: redis_sync.Redis
) -> None:
    """Two identical uploads (a client's re-send racing its first try) that both find the
    upload unknown and sketch it at the same time: one is stored (new, the step's version up
    by one), the other is answered as a re-send (not new) and writes nothing."""
    body = safetensors_body(step_data.grads, step_data.ids)
    ids = step_data.ids

    async def go() -> None:
        async with _receiving_store(settings, body) as (store, sketch):
            both_checked, both_sketched = asyncio.Barrier(2), asyncio.Barrier(2)

            async def racing() -> bytes:
                await both_checked.wait()  # both have seen the upload unknown
                part = await sketch()
                await both_sketched.wait()  # and both store at once
                return part

            version = await store.version("r", 0)
            first, second = await asyncio.gather(
                store.accept_upload("r", 0, "u1", "gradients", ids, body, racing),
                store.accept_upload("r", 0, "u1", "gradients", ids, body, racing),
            )
            assert sorted([first.new, second.new]) == [False, True]
            assert first.sketched and second.sketched
            assert await store.version("r", 0) == version + 1

    asyncio.run(go())
    assert len(_keys(redis_client, settings.key_prefix, "part")) == 1
