"""The service's fast paths give the same answers as the plain ones.

* ``read_body``: one preallocated buffer from ``Content-Length`` (or a growing one for chunked
  bodies), the limit enforced while streaming, the body hashed chunk by chunk into the same
  upload id as hashing it whole;
* ``check_finite``: the blocked exponent scan finds a NaN/Inf anywhere, in every dtype;
* the analysis memo: one assembled matrix and one kernel per data version, shared by the
  routes, never served once the version changed or the run was deleted and re-created;
* the spectrum route: eigenvalues only for ``top = 0``, the same values with ``top > 0``;
* no dependency of an API route runs in FastAPI's thread pool (a ``def`` dependency does).
"""

from __future__ import annotations

import hashlib
import inspect
import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from starlette.requests import Request

from service import analysis as an
from service.domain_errors import InvalidUploadError
from service.schemas import SpectrumOut
from service.settings import Settings
from service.uploads import (
    FINITE_CHECK_BLOCK,
    check_finite,
    read_body,
    read_header,
    upload_hash,
    upload_id_for,
    upload_id_from,
)
from sketch.kernel import kernel_from_rows
from sketch.spectrum import spectrum
from tests.service.conftest import OCTET, safetensors_body
from tests.service.test_analysis import drain

K = 6


# ------------------------------------------------------------------------------ read_body
def _request(chunks: list[bytes], content_length: int | None) -> Request:
    """A Starlette request whose body arrives as ``chunks`` (ASGI ``http.request`` events)."""
    headers = [] if content_length is None else [(b"content-length", str(content_length).encode())]
    events = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ] or [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> dict[str, Any]:
        return events.pop(0)

    scope = {"type": "http", "method": "POST", "path": "/", "headers": headers}
    return Request(scope, receive)


def _read(chunks: list[bytes], content_length: int | None, limit: int = 1000) -> bytearray:
    import anyio

    async def go() -> bytearray:
        return await read_body(_request(chunks, content_length), limit)

    return anyio.run(go)


BODY = bytes(range(256)) * 3


def _dependency_calls(dependant: Any) -> Iterator[tuple[str, Any]]:
    for sub in dependant.dependencies:
        if sub.call is not None:
            yield getattr(sub.call, "__qualname__", repr(sub.call)), sub.call
        yield from _dependency_calls(sub)


def test_no_route_dependency_runs_in_the_thread_pool() -> None:
    # Each ``def`` dependency costs a thread hand-off per request; an upload had four.
    from service.routers import analysis, dashboard, health, metrics, runs, steps, tokens, uploads

    modules = (analysis, dashboard, health, metrics, runs, steps, tokens, uploads)
    routes = [r for m in modules for r in m.router.routes if isinstance(r, APIRoute)]
    assert any(r.path.endswith("/gradients") for r in routes)
    sync = {
        name
        for route in routes
        for name, call in _dependency_calls(route.dependant)
        if not inspect.iscoroutinefunction(call)
    }
    assert sorted(sync) == []


@pytest.mark.parametrize("declared", [len(BODY), None], ids=["content-length", "chunked"])
def test_read_body_returns_the_body_and_feeds_the_digest(declared: int | None) -> None:
    import anyio

    chunks = [BODY[:100], BODY[100:101], BODY[101:]]
    digest = upload_hash("gradients", None)

    async def go() -> bytearray:
        return await read_body(_request(chunks, declared), 1000, digest)

    body = anyio.run(go)
    assert isinstance(body, bytearray) and body == BODY
    expected = hashlib.sha256(b"gradients\0" + b"body\0" + BODY).hexdigest()[:40]
    assert upload_id_from(digest) == "u" + expected == upload_id_for("gradients", BODY, None)


@pytest.mark.parametrize(
    ("chunks", "declared", "status"),
    [
        ([BODY], len(BODY) - 1, 400),  # longer than declared
        ([BODY[:10]], len(BODY), 400),  # shorter than declared
        ([BODY], 1001, 413),  # declared over the limit: refused before reading
        ([BODY, BODY], None, 413),  # chunked, over the limit while streaming
        ([BODY], -1, 400),
    ],
    ids=["long", "short", "declared-over", "chunked-over", "negative"],
)
def test_read_body_refuses(chunks: list[bytes], declared: int | None, status: int) -> None:
    with pytest.raises(InvalidUploadError) as info:
        _read(chunks, declared)
    assert info.value.status == status


def test_chunked_upload_gets_the_same_id_as_with_content_length(client: TestClient) -> None:
    spec = {"run_id": "cs", "sketch": {"kind": "countsketch", "dim": K, "seed": 3}}
    assert client.post("/v1/runs", json=spec).status_code == 201
    body = safetensors_body({"x": torch.randn(2, 40_000)}, ["a", "b"])  # 320 kB, many chunks

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(body), 65536):
            yield body[i : i + 65536]

    url = "/v1/runs/cs/steps/0/gradients"
    first = client.post(url, content=chunks(), headers=OCTET)
    assert first.status_code == 202, first.text
    again = client.post(url, content=body, headers=OCTET)
    assert again.status_code == 202
    assert first.json()["upload_id"] == again.json()["upload_id"]
    assert first.json()["upload_id"] == upload_id_for("gradients", body, None)
    assert first.json()["queued"] is True and again.json()["queued"] is False


# --------------------------------------------------------------------------- check_finite
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_check_finite_finds_a_bad_value_past_the_first_block(
    dtype: torch.dtype, bad: float
) -> None:
    n = FINITE_CHECK_BLOCK + 1000
    values = torch.ones(2, n // 2 + 7, dtype=dtype)
    flat = values.view(-1)
    where = FINITE_CHECK_BLOCK + 17
    flat[where] = bad
    flat[where + 3] = bad
    body = safetensors_body({"ok": torch.ones(2, 3, dtype=dtype), "w": values}, ["a", "b"])
    tensors, _ = read_header(body)
    with pytest.raises(InvalidUploadError) as info:
        check_finite(bytearray(body), tensors)
    assert info.value.status == 422
    assert f"first at flat index {where}" in info.value.detail
    assert "(2 values" in info.value.detail
    # the largest finite value is not flagged
    flat[where] = flat[where + 3] = torch.finfo(dtype).max
    body = safetensors_body({"w": values}, ["a", "b"])
    check_finite(body, read_header(body)[0])


# ---------------------------------------------------------------------------- the memo
def _post_step(
    client: TestClient, settings: Settings, run_id: str, Y: np.ndarray, seed: int
) -> None:
    n = Y.shape[0]
    ids = [f"s{i}" for i in range(n)]
    rng = np.random.default_rng(seed)
    seqs = [
        {
            "id": sid,
            "prompt_id": f"p{i // 2}",
            "logprob": -3.0,
            "advantage": float(rng.standard_normal()),
            "num_tokens": 3,
        }
        for i, sid in enumerate(ids)
    ]
    url = f"/v1/runs/{run_id}/steps/0"
    assert client.post(
        f"{url}/sequences", json={"learning_rate": 0.1, "sequences": seqs}
    ).is_success
    body = safetensors_body({"sketch": torch.from_numpy(Y.astype(np.float32))}, ids)
    assert client.post(f"{url}/sketches", content=body, headers=OCTET).status_code == 202
    drain(settings)


def _load(client: TestClient, run_id: str) -> an.StepMatrix:
    store = client.app.state.store  # type: ignore[attr-defined]
    assert client.portal is not None
    settings = client.app.state.settings  # type: ignore[attr-defined]
    matrix: an.StepMatrix = client.portal.call(an.load_matrix, store, settings, run_id, 0)
    return matrix


def redis_token(client: TestClient, run_id: str, version: int) -> str:
    store = client.app.state.store  # type: ignore[attr-defined]
    assert client.portal is not None
    raw = client.portal.call(store.cache_get, run_id, 0, version, "matrix.token")
    assert raw is not None
    return str(raw.decode())


def test_one_matrix_and_one_kernel_per_version(client: TestClient, settings: Settings) -> None:
    spec = {"run_id": "memo", "sketch": {"kind": "countsketch", "dim": K, "seed": 1}}
    assert client.post("/v1/runs", json=spec).status_code == 201
    Y = np.random.default_rng(0).normal(size=(8, K))
    _post_step(client, settings, "memo", Y, 0)
    m = _load(client, "memo")
    assert _load(client, "memo") is m  # memo hit: not fetched and assembled again
    # another API process (an empty memo) assembles its own copy under the same token
    store = client.app.state.store  # type: ignore[attr-defined]
    token = redis_token(client, "memo", m.version)
    an._MEMOS.pop(store)
    other = _load(client, "memo")
    assert other is not m and redis_token(client, "memo", m.version) == token
    np.testing.assert_array_equal(other.Y, m.Y)
    assert an.matrix_memo(store, settings.memo_matrices).get(token) is other
    m = other
    _, K_all = m.kernel("all")
    assert m.kernel("update")[1] is K_all  # every row is an update row: the same array
    np.testing.assert_allclose(K_all, kernel_from_rows(m.Y), rtol=1e-14)
    assert not K_all.flags.writeable
    # the routes use the memoised matrix: their answers equal the direct computations
    url = "/v1/runs/memo/steps/0"
    got = client.get(f"{url}/kernel/spectrum").json()
    want = SpectrumOut.from_spectrum(spectrum(Y=Y.astype(np.float32))).model_dump(mode="json")
    np.testing.assert_allclose(got["eigenvalues"], want["eigenvalues"], rtol=1e-6, atol=1e-9)
    assert m.eigen_summary("update") is m.eigen_summary("update")
    got_top = client.get(f"{url}/kernel/spectrum?top=2").json()
    np.testing.assert_allclose(got_top["eigenvalues"], got["eigenvalues"], rtol=1e-10)
    assert len(got_top["eigenvectors"]) == 2 and "eigenvectors" not in got
    entropy = client.get(f"{url}/entropy").json()
    row = client.get("/v1/runs/memo/entropy").json()["steps"][0]
    assert row["delta_h1"] == entropy["delta_h1"]
    assert row["spectrum_head"] == pytest.approx(got["eigenvalues"][: an.SPECTRUM_HEAD])

    # new data: a new version, a new matrix
    Y2 = np.random.default_rng(1).normal(size=(8, K))
    body = safetensors_body({"sketch": torch.from_numpy(Y2.astype(np.float32))}, m.seqs.ids)
    assert client.post(f"{url}/sketches", content=body, headers=OCTET).status_code == 202
    drain(settings)
    m2 = _load(client, "memo")
    assert m2 is not m and m2.version > m.version
    np.testing.assert_allclose(m2.Y, (Y + Y2).astype(np.float32).astype(np.float64), rtol=1e-6)


def test_memo_is_not_served_for_a_recreated_run(client: TestClient, settings: Settings) -> None:
    spec = {"run_id": "again", "sketch": {"kind": "countsketch", "dim": K, "seed": 1}}
    assert client.post("/v1/runs", json=spec).status_code == 201
    Y = np.random.default_rng(2).normal(size=(6, K))
    _post_step(client, settings, "again", Y, 0)
    first = _load(client, "again")
    assert client.delete("/v1/runs/again").status_code in (200, 204)
    # same id, same number of writes (so the same version number), other data
    assert client.post("/v1/runs", json=spec).status_code == 201
    Y_new = np.random.default_rng(3).normal(size=(6, K))
    _post_step(client, settings, "again", Y_new, 0)
    second = _load(client, "again")
    assert second.version == first.version
    assert second is not first
    np.testing.assert_allclose(second.Y, Y_new.astype(np.float32).astype(np.float64))
    npy = {"Accept": "application/octet-stream"}
    kernel = np.load(io.BytesIO(client.get("/v1/runs/again/steps/0/kernel", headers=npy).content))
    np.testing.assert_allclose(kernel, kernel_from_rows(Y_new.astype(np.float32)), rtol=1e-12)


def test_spectrum_with_a_given_kernel_equals_the_plain_one() -> None:
    rng = np.random.default_rng(4)
    for n, k in ((5, 9), (9, 5)):
        Y = rng.normal(size=(n, k))
        plain = spectrum(Y=Y, top=3)
        given = spectrum(Y=Y, K=kernel_from_rows(Y), top=3)
        values_only = spectrum(Y=Y)
        np.testing.assert_allclose(given.eigenvalues, plain.eigenvalues, atol=1e-10)
        np.testing.assert_allclose(values_only.eigenvalues, plain.eigenvalues, atol=1e-10)
        assert values_only.eigenvectors is None
        assert given.eigenvectors is not None and plain.eigenvectors is not None
        np.testing.assert_allclose(given.eigenvectors, plain.eigenvectors, atol=1e-8)
