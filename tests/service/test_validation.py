"""Bad input answers its 4xx problem and leaves the store byte-for-byte as it was
(architecture.md, "What every part must do with bad input"); auth; 404/405/409 problems."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis as redis_sync
import torch
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from tests.service.conftest import OCTET, safetensors_body, store_dump

PARAMS = {"w": [3, 4], "b": [4]}
IDS = ["s0", "s1"]
K = 8


def create_runs(client: TestClient) -> None:
    exact = {"run_id": "ex", "sketch": {"kind": "exact", "dim": 1, "seed": 0}, "parameters": PARAMS}
    free = {"run_id": "cs", "sketch": {"kind": "countsketch", "dim": K, "seed": 3}}
    declared = {**free, "run_id": "csp", "parameters": PARAMS}
    for spec in (exact, free, declared):
        assert client.post("/v1/runs", json=spec).status_code == 201
    seqs = {
        "learning_rate": 0.1,
        "sequences": [
            {"id": i, "prompt_id": "p", "logprob": -3.0, "advantage": a, "num_tokens": 2}
            for i, a in zip(IDS, (1.0, -1.0), strict=True)
        ],
    }
    assert client.post("/v1/runs/csp/steps/0/sequences", json=seqs).status_code == 200
    good = safetensors_body({"w": torch.ones(2, 3, 4), "b": torch.ones(2, 4)}, IDS)
    assert (
        client.post("/v1/runs/csp/steps/0/gradients", content=good, headers=OCTET).status_code
        == 202
    )


@pytest.fixture
def api(client: TestClient) -> TestClient:
    create_runs(client)
    return client


def problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["status"] == status and body["title"] and body["type"] and body["detail"]
    return body


def header_only(header: dict[str, Any], data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def nan_at(shape: tuple[int, ...], dtype: torch.dtype, value: float) -> torch.Tensor:
    t = torch.zeros(shape, dtype=dtype)
    t.view(-1)[5] = value
    return t


ids2 = json.dumps(IDS)
# (name, run, route, body, status, substring of detail)
BAD: list[tuple[str, str, str, Callable[[], bytes], int, str]] = [
    ("garbage", "csp", "gradients", lambda: b"not safetensors at all", 400, "malformed"),
    ("short", "csp", "gradients", lambda: b"\x01\x02", 400, "shorter"),
    (
        "header-too-long",
        "csp",
        "gradients",
        lambda: struct.pack("<Q", 10**6) + b"{}",
        400,
        "header length",
    ),
    ("header-not-json", "csp", "gradients", lambda: struct.pack("<Q", 3) + b"{x}", 400, "JSON"),
    (
        "trailing-bytes",
        "csp",
        "gradients",
        lambda: safetensors_body({"b": torch.ones(2, 4)}, IDS) + b"\0\0\0\0",
        400,
        "after the last",
    ),
    (
        "offsets-wrong",
        "csp",
        "gradients",
        lambda: header_only(
            {
                "__metadata__": {"sequence_ids": ids2},
                "b": {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 16]},
            },
            bytes(16),
        ),
        400,
        "bytes for shape",
    ),
    (
        "dtype-int",
        "csp",
        "gradients",
        lambda: header_only(
            {
                "__metadata__": {"sequence_ids": ids2},
                "b": {"dtype": "I32", "shape": [2, 4], "data_offsets": [0, 32]},
            },
            bytes(32),
        ),
        422,
        "I32",
    ),
    (
        "nan-f32",
        "csp",
        "gradients",
        lambda: safetensors_body(
            {"b": torch.ones(2, 4), "w": nan_at((2, 3, 4), torch.float32, float("nan"))}, IDS
        ),
        422,
        "'w'",
    ),
    (
        "inf-bf16",
        "csp",
        "gradients",
        lambda: safetensors_body({"b": nan_at((2, 4), torch.bfloat16, float("inf"))}, IDS),
        422,
        "'b'",
    ),
    (
        "inf-f16-sketch",
        "cs",
        "sketches",
        lambda: safetensors_body({"sketch": nan_at((2, K), torch.float16, float("-inf"))}, IDS),
        422,
        "'sketch'",
    ),
    (
        "rows-vs-ids",
        "csp",
        "gradients",
        lambda: safetensors_body({"b": torch.ones(3, 4)}, IDS),
        422,
        "sequence_ids lists 2",
    ),
    (
        "no-sequence-ids",
        "csp",
        "gradients",
        lambda: safetensors_body({"b": torch.ones(2, 4)}, IDS).replace(
            b"sequence_ids", b"sequence_idz"
        ),
        422,
        "sequence_ids",
    ),
    (
        "bad-sequence-id",
        "csp",
        "gradients",
        lambda: safetensors_body({"b": torch.ones(2, 4)}, ["ok", "no/slash"]),
        422,
        "invalid sequence",
    ),
    (
        "duplicate-ids",
        "csp",
        "gradients",
        lambda: safetensors_body({"b": torch.ones(2, 4)}, ["a", "a"]),
        422,
        "duplicates",
    ),
    (
        "shape-vs-declared",
        "csp",
        "gradients",
        lambda: safetensors_body({"w": torch.ones(2, 4, 3)}, IDS),
        422,
        "fits neither",
    ),
    (
        "numel-vs-declared",
        "ex",
        "gradients",
        lambda: safetensors_body({"w": torch.ones(2, 13)}, IDS),
        422,
        "fits neither",
    ),
    (
        "unknown-parameter",
        "ex",
        "gradients",
        lambda: safetensors_body({"v": torch.ones(2, 4)}, IDS),
        422,
        "unknown parameter",
    ),
    (
        "slice-past-end",
        "csp",
        "gradients",
        lambda: safetensors_body({"w@10": torch.ones(2, 3)}, IDS),
        422,
        "exceeds",
    ),
    (
        "slice-not-2d",
        "cs",
        "gradients",
        lambda: safetensors_body({"w@2": torch.ones(2, 3, 1)}, IDS),
        422,
        "[n, d]",
    ),
    (
        "sketch-width",
        "cs",
        "sketches",
        lambda: safetensors_body({"sketch": torch.ones(2, K + 1)}, IDS),
        422,
        f"[n, {K}]",
    ),
    (
        "sketch-extra-tensor",
        "cs",
        "sketches",
        lambda: safetensors_body({"sketch": torch.ones(2, K), "x": torch.ones(2, 1)}, IDS),
        422,
        "exactly one",
    ),
    (
        "unknown-run",
        "nope",
        "gradients",
        lambda: safetensors_body({"b": torch.ones(2, 4)}, IDS),
        404,
        "unknown run",
    ),
]


@pytest.mark.parametrize(
    ("name", "run", "route", "make", "status", "needle"), BAD, ids=[b[0] for b in BAD]
)
def test_bad_upload_is_refused_and_stores_nothing(
    api: TestClient,
    redis_client: redis_sync.Redis,
    key_prefix: str,
    name: str,
    run: str,
    route: str,
    make: Callable[[], bytes],
    status: int,
    needle: str,
) -> None:
    before = store_dump(redis_client, key_prefix)
    response = api.post(f"/v1/runs/{run}/steps/0/{route}", content=make(), headers=OCTET)
    assert needle in problem(response, status)["detail"]
    assert store_dump(redis_client, key_prefix) == before


def test_nan_problem_names_the_tensor(api: TestClient) -> None:
    body = safetensors_body(
        {"b": torch.ones(2, 4), "w": nan_at((2, 3, 4), torch.float32, 1e999)}, IDS
    )
    detail = problem(api.post("/v1/runs/csp/steps/0/gradients", content=body, headers=OCTET), 422)
    assert detail["tensor"] == "w"


def test_body_limit_by_content_length_and_by_stream(
    api: TestClient, redis_client: redis_sync.Redis, key_prefix: str
) -> None:
    limit = 1024 * 1024  # settings fixture: max_body_mb = 1
    before = store_dump(redis_client, key_prefix)
    oversized = b"\0" * (limit + 1)
    problem(api.post("/v1/runs/cs/steps/0/gradients", content=oversized, headers=OCTET), 413)

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is enforced while reading
        for _ in range(limit // 65536 + 2):
            yield b"\0" * 65536

    response = api.post("/v1/runs/cs/steps/0/gradients", content=chunks(), headers=OCTET)
    problem(response, 413)
    assert store_dump(redis_client, key_prefix) == before
    # a body just under the limit is accepted
    near = safetensors_body({"x": torch.ones(2, (limit - 4096) // 8)}, IDS)
    assert limit - 4096 < len(near) <= limit
    assert api.post("/v1/runs/cs/steps/0/gradients", content=near, headers=OCTET).status_code == 202


@pytest.mark.parametrize("content_type", ["text/plain", "application/json", None])
def test_wrong_content_type_is_415(
    api: TestClient, redis_client: redis_sync.Redis, key_prefix: str, content_type: str | None
) -> None:
    body = safetensors_body({"b": torch.ones(2, 4)}, IDS)
    before = store_dump(redis_client, key_prefix)
    headers = {"content-type": content_type} if content_type else {}
    problem(api.post("/v1/runs/csp/steps/0/gradients", content=body, headers=headers), 415)
    assert store_dump(redis_client, key_prefix) == before


def test_x_safetensors_is_accepted(api: TestClient) -> None:
    body = safetensors_body({"b": torch.full((2, 4), 2.0)}, IDS)
    headers = {"content-type": "application/x-safetensors"}
    response = api.post("/v1/runs/csp/steps/0/gradients", content=body, headers=headers)
    assert response.status_code == 202 and response.json()["rows"] == 2


def test_run_spec_conflict_is_409_and_same_spec_is_200(
    api: TestClient, redis_client: redis_sync.Redis, key_prefix: str
) -> None:
    before = store_dump(redis_client, key_prefix)
    same = {"run_id": "cs", "sketch": {"kind": "countsketch", "dim": K, "seed": 3}}
    again = api.post("/v1/runs", json=same)
    assert again.status_code == 200 and again.json()["k"] == K
    other = {"run_id": "cs", "sketch": {"kind": "countsketch", "dim": K, "seed": 4}}
    problem(api.post("/v1/runs", json=other), 409)
    # the declared order is the exact kind's column layout: another order is another spec
    exact = {"run_id": "ex", "sketch": {"kind": "exact", "dim": 1, "seed": 0}}
    assert api.post("/v1/runs", json={**exact, "parameters": PARAMS}).status_code == 200
    swapped = dict(reversed(PARAMS.items()))
    problem(api.post("/v1/runs", json={**exact, "parameters": swapped}), 409)
    assert list(api.get("/v1/runs/ex").json()["parameters"]) == list(PARAMS)
    assert store_dump(redis_client, key_prefix) == before


@pytest.mark.parametrize(
    "spec",
    [
        {"sketch": {"kind": "exact", "dim": 4, "seed": 0}},  # exact needs parameters
        {"sketch": {"kind": "kronecker", "dim": 4, "seed": 0}},
        {"sketch": {"kind": "countsketch", "dim": 0, "seed": 0}},
        {"sketch": {"kind": "nope", "dim": 4, "seed": 0}},
        {"run_id": "bad/id", "sketch": {"kind": "countsketch", "dim": 4}},
        {"run_id": "x", "sketch": {"kind": "countsketch", "dim": 4}, "normalization": "mean"},
    ],
)
def test_bad_run_spec_is_422(
    api: TestClient, redis_client: redis_sync.Redis, key_prefix: str, spec: dict[str, Any]
) -> None:
    before = store_dump(redis_client, key_prefix)
    problem(api.post("/v1/runs", json=spec), 422)
    assert store_dump(redis_client, key_prefix) == before


def test_bad_sequences_are_422_and_store_nothing(
    api: TestClient, redis_client: redis_sync.Redis, key_prefix: str
) -> None:
    seq = {"id": "s9", "prompt_id": "p", "logprob": -1.0, "advantage": 0.0, "num_tokens": 1}
    cases = [
        {"learning_rate": 0.1, "sequences": [{**seq, "id": "__applied_update__"}]},
        {"learning_rate": 0.1, "sequences": [{**seq, "id": "bad id"}]},
        {"learning_rate": 0.1, "sequences": [seq, seq]},
        {"learning_rate": 0.1, "sequences": [{**seq, "role": "other"}]},
        {"learning_rate": -1.0, "sequences": [seq]},
        {"sequences": [seq]},
    ]
    before = store_dump(redis_client, key_prefix)
    for body in cases:
        problem(api.post("/v1/runs/csp/steps/0/sequences", json=body), 422)
    problem(
        api.post(
            "/v1/runs/csp/steps/0/sequences",
            content=b"{",
            headers={"content-type": "application/json"},
        ),
        422,
    )
    assert store_dump(redis_client, key_prefix) == before


def test_not_found_and_method_problems(api: TestClient) -> None:
    problem(api.get("/v1/runs/nope"), 404)
    problem(api.get("/v1/runs/csp/steps/7"), 404)
    problem(api.get("/v1/runs/csp/steps/7/kernel"), 404)
    problem(api.get("/v1/runs/nope/steps/0/entropy"), 404)
    problem(api.delete("/v1/runs/nope"), 404)
    problem(api.get("/v1/nothing-here"), 404)
    problem(api.put("/v1/runs"), 405)
    problem(api.get("/v1/runs/csp/steps/-1"), 422)
    problem(api.get("/v1/runs/csp/steps/0/kernel?wait=301"), 422)


def test_resent_upload_changes_nothing(
    api: TestClient, redis_client: redis_sync.Redis, key_prefix: str
) -> None:
    body = safetensors_body({"b": torch.full((2, 4), 3.0)}, IDS)
    first = api.post("/v1/runs/csp/steps/1/gradients", content=body, headers=OCTET)
    assert first.status_code == 202 and first.json()["queued"] is True
    before = store_dump(redis_client, key_prefix)
    again = api.post("/v1/runs/csp/steps/1/gradients", content=body, headers=OCTET)
    assert again.status_code == 202
    assert again.json() == {**first.json(), "queued": False}
    # same Idempotency-Key, other bytes: the key names the upload
    keyed = {**OCTET, "Idempotency-Key": "rank0-step1"}
    k1 = api.post("/v1/runs/csp/steps/1/gradients", content=body, headers=keyed).json()
    mid = store_dump(redis_client, key_prefix)
    other = safetensors_body({"b": torch.full((2, 4), 4.0)}, IDS)
    k2 = api.post("/v1/runs/csp/steps/1/gradients", content=other, headers=keyed).json()
    assert k1["queued"] and not k2["queued"] and k1["upload_id"] == k2["upload_id"]
    assert store_dump(redis_client, key_prefix) == mid
    assert set(before) < set(mid)


def test_pending_step_analysis_is_409_with_status(api: TestClient) -> None:
    status = api.get("/v1/runs/csp/steps/0").json()
    assert status["state"] == "pending" and status["pending_uploads"] == 1
    assert status["sequences"] == 2 and status["rows"] == 0
    for path in ("kernel", "kernel/diagonal", "kernel/spectrum", "kernel/blocks", "entropy"):
        body = problem(api.get(f"/v1/runs/csp/steps/0/{path}"), 409)
        assert body["step_status"]["state"] == "pending"
    waited = problem(api.get("/v1/runs/csp/steps/0/entropy?wait=0.3"), 409)
    assert waited["step_status"]["pending_uploads"] == 1


def test_auth(settings: Settings) -> None:
    secured = settings.model_copy(update={"token": "s3cret"})
    with TestClient(create_app(secured)) as c:
        assert c.get("/healthz").status_code == 200
        denied = c.get("/v1/runs")
        problem(denied, 401)
        assert denied.headers["www-authenticate"].startswith("Bearer")
        problem(c.get("/v1/runs", headers={"Authorization": "Bearer wrong"}), 401)
        problem(c.get("/v1/runs/nope", headers={"Authorization": "Basic s3cret"}), 401)
        spec = {"run_id": "a", "sketch": {"kind": "countsketch", "dim": 4}}
        problem(c.post("/v1/runs", json=spec), 401)
        ok = {"Authorization": "Bearer s3cret"}
        assert c.post("/v1/runs", json=spec, headers=ok).status_code == 201
        assert [r["run_id"] for r in c.get("/v1/runs", headers=ok).json()] == ["a"]
    with TestClient(create_app(settings)) as c:  # no token: open
        assert c.get("/v1/runs").status_code == 200


CONTRACT = {  # architecture.md, REST API v1
    ("post", "/v1/runs"),
    ("get", "/v1/runs"),
    ("get", "/v1/runs/{run_id}"),
    ("delete", "/v1/runs/{run_id}"),
    ("post", "/v1/runs/{run_id}/steps/{step}/sequences"),
    ("post", "/v1/runs/{run_id}/steps/{step}/gradients"),
    ("post", "/v1/runs/{run_id}/steps/{step}/sketches"),
    ("post", "/v1/runs/{run_id}/steps/{step}/realized"),
    ("get", "/v1/runs/{run_id}/steps/{step}"),
    ("get", "/v1/runs/{run_id}/steps/{step}/kernel"),
    ("get", "/v1/runs/{run_id}/steps/{step}/kernel/diagonal"),
    ("get", "/v1/runs/{run_id}/steps/{step}/kernel/spectrum"),
    ("get", "/v1/runs/{run_id}/steps/{step}/kernel/blocks"),
    ("get", "/v1/runs/{run_id}/steps/{step}/entropy"),
    ("get", "/v1/runs/{run_id}/entropy"),
    ("get", "/healthz"),
}


def test_openapi_has_every_contract_route_with_examples(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    routes = {(m, p) for p, ops in schema["paths"].items() for m in ops}
    assert routes >= CONTRACT
    components = schema["components"]["schemas"]
    for model in ("RunCreate", "SequencesIn", "RealizedIn", "UploadAccepted", "StepStatus"):
        assert components[model].get("examples"), model
    assert client.get("/metrics").status_code == 200 and client.get("/").status_code == 200


@pytest.mark.parametrize(
    "sketch",
    [
        # two groups of 3000 plus the rest: each width is allowed, their sum is not
        {
            "kind": "countsketch",
            "dim": 3000,
            "seed": 0,
            "groups": [
                {"name": "a", "pattern": r"a\..*", "dim": 3000},
                {"name": "b", "pattern": r"b\..*", "dim": 3000},
            ],
        },
        {"kind": "exact", "dim": 1, "seed": 0},  # k = N = 10,000
    ],
    ids=["groups", "exact"],
)
def test_run_wider_than_the_cap_is_422_naming_it(
    settings: Settings,
    redis_client: redis_sync.Redis,
    key_prefix: str,
    sketch: dict[str, Any],
) -> None:
    """The total width of a run (summed over its groups; ``N`` for exact) is capped by
    ``KERNELSCOPE_MAX_WIDTH``, not just each ``dim``: a grouped spec or an exact run over many
    parameters used to pass whatever its width."""
    capped = settings.model_copy(update={"max_width": 8192})
    with TestClient(create_app(capped)) as api:
        before = store_dump(redis_client, key_prefix)
        spec = {"run_id": "wide", "sketch": sketch, "parameters": {"a.w": [100, 50], "b.w": [5000]}}
        body = problem(api.post("/v1/runs", json=spec), 422)
        assert "KERNELSCOPE_MAX_WIDTH=8192" in body["detail"]
        assert store_dump(redis_client, key_prefix) == before


def test_safetensors_header_over_16_mib_is_refused_before_parsing() -> None:
    """The JSON header of an upload is at most 16 MiB (it was 100 MiB of JSON to parse):
    a longer declared header is a 400 from its 8-byte length alone."""
    from service.domain_errors import InvalidUploadError
    from service.uploads import read_header

    header = b"{" + b" " * ((16 << 20) + 16) + b"}"
    body = struct.pack("<Q", len(header)) + header
    with pytest.raises(InvalidUploadError) as refused:
        read_header(body)
    assert refused.value.status == 400


def test_a_step_is_deleted_alone(client: TestClient) -> None:
    """``DELETE /v1/runs/{run}/steps/{step}`` removes that step (204) and nothing else; a step
    without data or an unknown run is a 404 problem."""
    sketch = {"kind": "countsketch", "dim": 8, "seed": 0}
    assert client.post("/v1/runs", json={"run_id": "del", "sketch": sketch}).status_code == 201
    seqs = [{"id": "a", "prompt_id": "p", "logprob": -1.0, "advantage": 1.0, "num_tokens": 2}]
    for step in (0, 1):
        body = {"learning_rate": 0.1, "sequences": seqs}
        assert client.post(f"/v1/runs/del/steps/{step}/sequences", json=body).status_code == 200
    assert client.delete("/v1/runs/del/steps/0").status_code == 204
    assert [s["step"] for s in client.get("/v1/runs/del").json()["steps"]] == [1]
    assert "no step 0" in problem(client.delete("/v1/runs/del/steps/0"), 404)["detail"]
    problem(client.delete("/v1/runs/nope/steps/1"), 404)
