"""The response contract has one definition: ``service/schemas.py``.

Every route declares its answer; the encodings of ``sketch/``'s results are JSON without NaN;
each domain error reaches the client as its problem+json; the client's parsers read exactly
the schema's fields and refuse a document that lacks one.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from pydantic import BaseModel, ValidationError

from clients import results
from service import analysis as an
from service import schemas
from service.app import create_app
from service.domain_errors import (
    BusyError,
    CannotAnalyseError,
    DomainError,
    InvalidUploadError,
    NotFoundError,
    ShuttingDownError,
    StepIncompleteError,
    StepNotReadyError,
    TooLargeError,
)
from service.errors import domain_problem
from service.settings import Settings
from sketch.blocks import block_statistics
from sketch.entropy import entropy_change
from sketch.kernel import kernel_from_rows
from sketch.sequences import StepSequences
from sketch.spectrum import spectrum

STATUS = schemas.StepStatus.model_validate(
    schemas.StepStatus.model_config["json_schema_extra"]["examples"][0]  # type: ignore[index]
)


def _step(rng: np.random.Generator, with_after: bool = True) -> tuple[StepSequences, np.ndarray]:
    n = 6
    logprob = rng.normal(-20, 3, size=n)
    after = logprob + rng.normal(scale=0.01, size=n)
    after[0] = np.nan  # unknown for one row
    seqs = StepSequences(
        ids=[f"s{i}" for i in range(n)],
        prompt_ids=["a", "a", "a", "b", "b", "b"],
        logprob=logprob,
        advantage=rng.normal(size=n),
        num_tokens=np.full(n, 10),
        role=["update"] * 4 + ["entropy"] * 2,
        logprob_after=after if with_after else None,
    )
    return seqs, kernel_from_rows(rng.normal(size=(n, 8)))


# ------------------------------------------------------------------ every route declares it
def test_every_json_route_declares_its_answer(client: TestClient) -> None:
    """No route answers an undocumented shape: each has a response_model (or no body)."""
    for route in client.app.routes:  # type: ignore[attr-defined]
        if isinstance(route, APIRoute) and route.include_in_schema:
            assert route.response_model is not None or route.status_code == 204, route.path
    document = client.get("/openapi.json").json()
    for path, item in document["paths"].items():
        for method, operation in item.items():
            for code, response in operation["responses"].items():
                if not code.startswith("2") or code == "204":
                    continue
                schema = response["content"]["application/json"]["schema"]
                named = json.dumps(schema)
                assert "$ref" in named, f"{method.upper()} {path} {code}: {schema}"


# ------------------------------------------------------------------ sketch -> schema encodings
def test_entropy_answer_is_json_without_nan() -> None:
    rng = np.random.default_rng(9)
    seqs, K = _step(rng)
    out = entropy_change(K, seqs, 0.1, k_applied=rng.normal(size=seqs.n), group_kernels={"all": K})
    text = schemas.EntropyOut.from_change(out).model_dump_json()
    assert "NaN" not in text and "Infinity" not in text
    d = json.loads(text)
    assert list(d) == list(schemas.EntropyOut.model_fields)  # every member, in the same order
    assert d["estimator"] == "independent"
    assert set(d["decomposition"]["pair_types"]) == {"diagonal", "same_prompt", "cross_prompt"}
    assert len(d["decomposition"]["quadrants"]) == 4
    assert len(d["per_sequence"]) == seqs.n and d["per_sequence"][0]["role"] == "update"
    assert d["realized"]["source"] == "logprob_after"
    assert d["ratio"] == pytest.approx(out.realized.delta_h / out.delta_h1)  # type: ignore[union-attr]
    # the history row is built from the same answer
    row = schemas.RunEntropyRow.from_entropy(3, schemas.EntropyOut.model_validate_json(text), [])
    assert row.delta_h1 == d["delta_h1"] and row.realized == d["realized"]["delta_h"]
    assert row.ratio_low == d["ratio_interval"]["low"] and row.regime == d["taylor"]["regime"]


def test_blocks_and_spectrum_answers() -> None:
    Y = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    blocks = json.loads(
        schemas.BlocksOut.from_blocks(block_statistics(kernel_from_rows(Y), ["a", "a", "b"]))
        .model_dump_json()
        .encode()
    )
    assert blocks["prompt_matrix"]["mean_k"][1][1] is None  # one row of b: NaN -> null
    assert blocks["same_prompt"]["count"] == 2
    plain = json.loads(schemas.SpectrumOut.from_spectrum(spectrum(Y=Y)).to_json())
    assert "eigenvectors" not in plain  # only when asked for (top > 0)
    top = json.loads(schemas.SpectrumOut.from_spectrum(spectrum(Y=Y, top=1)).to_json())
    assert len(top["eigenvectors"]) == 1


# ------------------------------------------------------------------ domain errors -> problems
PROBLEMS: list[tuple[DomainError, int, str, dict[str, Any]]] = [
    (NotFoundError("run 'r' has no step 3"), 404, "Not Found", {}),
    (StepNotReadyError("2 uploads still queued", STATUS), 409, "Step not ready", {}),
    (
        StepIncompleteError("1 sequences have no sketched rows", ["a"], [], []),
        409,
        "Step incomplete",
        {"missing_rows": ["a"], "rows_without_metadata": []},
    ),
    (StepIncompleteError("the step has no sequence metadata yet"), 409, "Step incomplete", {}),
    (TooLargeError("5000 sequences exceed KERNELSCOPE_MAX_SEQUENCES"), 422, "", {}),
    (CannotAnalyseError("the step has no 'entropy' sequences"), 422, "", {}),
    (ShuttingDownError("the service is shutting down"), 503, "Service Unavailable", {}),
    (BusyError("uploads in flight would hold more"), 503, "Service Unavailable", {}),
    (InvalidUploadError(415, "content type not accepted"), 415, "Unsupported Media Type", {}),
    (InvalidUploadError(422, "missing rows", missing_ids=["x"]), 422, "", {"missing_ids": ["x"]}),
]


@pytest.mark.parametrize(("error", "status", "title", "extra"), PROBLEMS)
def test_a_domain_error_raised_in_analysis_reaches_the_client_as_its_problem(
    client: TestClient,
    monkeypatch: pytest.MonkeyPatch,
    error: DomainError,
    status: int,
    title: str,
    extra: dict[str, Any],
) -> None:
    assert client.post(
        "/v1/runs", json={"run_id": "de", "sketch": {"kind": "countsketch", "dim": 8}}
    ).is_success

    async def refuse(q: an.StepQuery) -> Any:
        raise error

    monkeypatch.setattr(an, "ready_step", refuse)
    answer = client.get("/v1/runs/de/steps/0/kernel/spectrum")
    assert answer.status_code == status
    assert answer.headers["content-type"].startswith("application/problem+json")
    body = answer.json()
    want = domain_problem(error, retry_after_s=1)
    assert body["status"] == status and body["detail"] == error.detail
    assert body["title"] == want.title and body["type"] == want.type
    if title:
        assert body["title"] == title
        assert body["type"].endswith("/" + title.lower().replace(" ", "-"))
    for key, value in extra.items():
        assert body[key] == value
    if isinstance(error, StepNotReadyError):
        assert body["step_status"] == STATUS.model_dump(mode="json")
    if status == 503:
        assert answer.headers["Retry-After"] == "1"
    else:
        assert "Retry-After" not in answer.headers


def test_settings_bound_the_wait_and_the_retry_after(settings: Settings) -> None:
    tight = settings.model_copy(update={"max_wait_s": 2.0, "retry_after_s": 7})
    with TestClient(create_app(tight)) as api:
        spec = {"run_id": "w", "sketch": {"kind": "countsketch", "dim": 8}}
        assert api.post("/v1/runs", json=spec).is_success
        assert api.get("/v1/runs/w/steps/0/kernel?wait=3").status_code == 422
        assert api.get("/v1/runs/w/steps/0/kernel?wait=0").status_code == 404
        tight_app = api.app
        tight_app.state.draining.set()  # type: ignore[attr-defined]
        api.post("/v1/runs/w/steps/0/sequences", json={"learning_rate": 0.1, "sequences": []})
        stopping = api.get("/v1/runs/w/steps/0/kernel?wait=1")
        tight_app.state.draining.clear()  # type: ignore[attr-defined]
    assert stopping.status_code == 503 and stopping.headers["Retry-After"] == "7"


# ------------------------------------------------------------------ the client reads the same
PAIRS: list[tuple[type[BaseModel], type[BaseModel]]] = [
    (schemas.StepStatus, results.StepStatus),
    (schemas.UploadError, results.UploadError),
    (schemas.RunDetail, results.RunInfo),
    (schemas.SpectrumOut, results.Spectrum),
    (schemas.BlocksOut, results.Blocks),
    (schemas.PairStatsOut, results.PairStats),
    (schemas.PromptMatrixOut, results.PromptMatrix),
    (schemas.EntropyOut, results.EntropyReport),
    (schemas.RunEntropyRow, results.HistoryRow),
    (schemas.RunEntropyOut, results.EntropyHistory),
    (schemas.KernelOut, results.Kernel),
    (schemas.DiagonalEntry, results.DiagonalEntry),
    (schemas.TokensOut, results.TokensReport),
    (schemas.TokenShareOut, results.TokenShare),
    (schemas.TokenSequenceTotal, results.TokenSequenceTotal),
    (schemas.CovarianceOut, results.CovarianceComparison),
]


@pytest.mark.parametrize(("served", "parsed"), PAIRS, ids=lambda c: c.__name__)
def test_the_client_reads_exactly_the_schema_fields(
    served: type[BaseModel], parsed: type[BaseModel]
) -> None:
    assert list(parsed.model_fields) == list(served.model_fields)


def test_the_client_parses_a_served_answer_and_refuses_a_missing_field() -> None:
    rng = np.random.default_rng(3)
    seqs, K = _step(rng)
    entropy = schemas.EntropyOut.from_change(entropy_change(K, seqs, 0.1))
    document = json.loads(entropy.model_dump_json())
    report = results.EntropyReport.from_json(document)
    assert report.delta_h1 == entropy.delta_h1 and report.raw is document
    assert report.realized_delta == pytest.approx(entropy.realized.delta_h)  # type: ignore[union-attr]
    row = schemas.RunEntropyRow.from_entropy(0, entropy, [2.0, 1.0])
    history = results.EntropyHistory.from_json(
        json.loads(schemas.RunEntropyOut(run_id="r", steps=[row]).model_dump_json())
    )
    np.testing.assert_array_equal(history.steps[0].spectrum_head, [2.0, 1.0])
    status = results.StepStatus.from_json(STATUS.model_dump(mode="json"))
    assert status.state == "ready" and status.ranks_reported == (0,)

    for parser, doc in (
        (results.EntropyReport, document),
        (results.StepStatus, STATUS.model_dump(mode="json")),
        (results.HistoryRow, json.loads(row.model_dump_json())),
    ):
        for key in doc:
            if key == "steps":
                continue
            broken = {k: v for k, v in doc.items() if k != key}
            with pytest.raises(ValidationError):
                parser.from_json(broken)  # type: ignore[attr-defined]
    with pytest.raises(ValidationError):
        results.StepStatus.from_json({**STATUS.model_dump(mode="json"), "state": "done"})
    with pytest.raises(ValidationError):
        results.Diagonal.from_json([{"id": "a", "value": 1.0}])
