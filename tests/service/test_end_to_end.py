"""End to end over real HTTP with a real worker process: exact per-sequence gradients of a
tiny GPT-2 give K = W W^T and the core's dH1; countsketch gives the core's sketch; sharded
uploads (two ranks, by parameter and by @offset slice, out of order, metadata last) give the
same kernel as one upload, and a re-sent upload changes nothing."""

from __future__ import annotations

import io
import time
from typing import Any

import httpx
import numpy as np
import pytest
import redis as redis_sync
import torch

from service.schemas import BlocksOut, EntropyOut, SpectrumOut
from sketch.blocks import block_statistics
from sketch.crossed import bilinear_error_bar
from sketch.entropy import (
    Estimator,
    entropy_change,
    entropy_coefficients,
    estimator_sets,
    pair_weights,
    update_coefficients,
)
from sketch.kronecker import KroneckerSketch
from sketch.sequences import StepSequences
from sketch.spec import sketcher_for
from sketch.spectrum import spectrum
from tests.service.conftest import (
    LIVE_MAX_BODY_MB,
    OCTET,
    LiveService,
    StepData,
    assert_kernel_close,
    safetensors_body,
    store_dump,
)

WAIT = {"wait": 120}


def create(http: httpx.Client, run_id: str, kind: str, dim: int, **extra: Any) -> dict[str, Any]:
    spec = {"run_id": run_id, "sketch": {"kind": kind, "dim": dim, "seed": 11}, **extra}
    response = http.post("/v1/runs", json=spec)
    assert response.status_code == 201, response.text
    run: dict[str, Any] = response.json()
    return run


def post_sequences(http: httpx.Client, run_id: str, data: StepData) -> None:
    body = {"learning_rate": data.learning_rate, "sequences": data.sequences}
    response = http.post(f"/v1/runs/{run_id}/steps/0/sequences", json=body)
    assert response.status_code == 200 and response.json()["sequences"] == len(data.ids)


def upload(
    http: httpx.Client, run_id: str, tensors: dict[str, torch.Tensor], ids: list[str]
) -> dict[str, Any]:
    response = http.post(
        f"/v1/runs/{run_id}/steps/0/gradients",
        content=safetensors_body(tensors, ids),
        headers=OCTET,
    )
    assert response.status_code == 202, response.text
    body: dict[str, Any] = response.json()
    return body


def kernel(http: httpx.Client, run_id: str, **params: Any) -> tuple[list[str], np.ndarray]:
    response = http.get(f"/v1/runs/{run_id}/steps/0/kernel", params={**WAIT, **params})
    assert response.status_code == 200, response.text
    return response.json()["ids"], np.array(response.json()["matrix"])


def expected_entropy(data: StepData, K: np.ndarray, variance_factor: float) -> dict[str, Any]:
    seqs = StepSequences.from_records(data.sequences)
    return EntropyOut.from_change(
        entropy_change(
            K,
            seqs,
            data.learning_rate,
            normalization="dr_grpo",
            sketch_variance_factor=variance_factor,
        )
    ).model_dump(mode="json")


def test_exact_and_countsketch_end_to_end(live_service: LiveService, step_data: StepData) -> None:
    data = step_data
    WWt = data.W @ data.W.T
    with httpx.Client(base_url=live_service.base_url, timeout=150) as http:
        exact = create(http, "exact", "exact", 1, parameters=data.parameters)
        assert exact["k"] == data.W.shape[1]
        post_sequences(http, "exact", data)
        assert upload(http, "exact", data.grads, data.ids)["rows"] == len(data.ids)

        ids, K = kernel(http, "exact")
        assert ids == data.ids
        np.testing.assert_allclose(K, WWt, rtol=1e-6, atol=1e-9 * np.abs(WWt).max())

        npy = http.get(
            "/v1/runs/exact/steps/0/kernel",
            params=WAIT,
            headers={"Accept": "application/octet-stream"},
        )
        assert npy.headers["content-type"] == "application/octet-stream"
        np.testing.assert_array_equal(np.load(io.BytesIO(npy.content), allow_pickle=False), K)

        entropy = http.get("/v1/runs/exact/steps/0/entropy", params=WAIT).json()
        want = expected_entropy(data, WWt, 0.0)
        assert entropy["estimator"] == want["estimator"] == "u_statistic"
        for field in ("delta_h1", "se_sampling", "delta_h1_diag", "cov_baseline"):
            assert entropy[field] == pytest.approx(want[field], rel=1e-6, abs=1e-12), field
        assert entropy["se_sketch"] == 0.0
        assert [r["a"] for r in entropy["per_sequence"]] == pytest.approx(
            [r["a"] for r in want["per_sequence"]], rel=1e-6, abs=1e-12
        )
        plugin = http.get("/v1/runs/exact/steps/0/entropy", params={"estimator": "plugin"}).json()
        assert plugin["estimator"] == "plugin"

        diag = http.get("/v1/runs/exact/steps/0/kernel/diagonal").json()
        assert [d["id"] for d in diag] == data.ids
        assert [d["value"] for d in diag] == pytest.approx(np.diag(WWt).tolist(), rel=1e-6)
        spec = http.get("/v1/runs/exact/steps/0/kernel/spectrum", params={"top": 2}).json()
        want_spec = SpectrumOut.from_spectrum(spectrum(K=WWt, top=2)).model_dump(mode="json")
        assert spec["eigenvalues"] == pytest.approx(want_spec["eigenvalues"], rel=1e-5, abs=1e-9)
        assert len(spec["eigenvectors"]) == 2
        blocks = http.get("/v1/runs/exact/steps/0/kernel/blocks").json()
        prompts = [s["prompt_id"] for s in data.sequences]
        want_blocks = BlocksOut.from_blocks(block_statistics(WWt, prompts)).model_dump(mode="json")
        assert blocks["same_prompt"]["mean_k"] == pytest.approx(
            want_blocks["same_prompt"]["mean_k"], rel=1e-6
        )
        history = http.get("/v1/runs/exact/entropy").json()["steps"]
        assert [h["step"] for h in history] == [0]
        assert history[0]["delta_h1"] == pytest.approx(want["delta_h1"], rel=1e-6, abs=1e-12)

        # countsketch: the service's rows are the core's sketch of the same gradients
        cs = create(http, "cs", "countsketch", 64)
        post_sequences(http, "cs", data)
        upload(http, "cs", data.grads, data.ids)
        sketcher = sketcher_for(cs["sketch"], cs.get("parameters"))
        Y = sketcher.sketch(data.grads).double().numpy()
        _, Kcs = kernel(http, "cs")
        assert_kernel_close(Kcs, Y @ Y.T)
        entropy_cs = http.get("/v1/runs/cs/steps/0/entropy", params=WAIT).json()
        want_cs = expected_entropy(data, Y @ Y.T, sketcher.variance_factor())
        assert entropy_cs["delta_h1"] == pytest.approx(want_cs["delta_h1"], rel=1e-5, abs=1e-12)
        assert entropy_cs["se_sketch"] == pytest.approx(want_cs["se_sketch"], rel=1e-5)
        assert entropy_cs["se_sketch"] > 0

        status = http.get("/v1/runs/cs/steps/0").json()
        assert status["state"] == "ready" and status["rows"] == status["sequences"] == 6

        # over real HTTP, the body limit holds by Content-Length and for a chunked stream
        limit = LIVE_MAX_BODY_MB << 20
        url = "/v1/runs/cs/steps/0/gradients"
        chunks = (b"\0" * 65536 for _ in range(limit // 65536 + 1))
        for body in (b"\0" * (limit + 1), chunks):
            refused = http.post(url, content=body, headers=OCTET)
            assert refused.status_code == 413
            assert refused.headers["content-type"] == "application/problem+json"
        assert http.get("/v1/runs/cs/steps/0").json() == status
        assert http.delete("/v1/runs/cs").status_code == 204
        assert http.get("/v1/runs/cs").status_code == 404


def shards(data: StepData) -> list[tuple[dict[str, torch.Tensor], list[str]]]:
    """Four uploads from two ranks: rank 0 holds the embeddings and block 0, rank 1 the rest;
    the token embedding is cut into two flat slices held by different ranks."""
    n = len(data.ids)
    names = list(data.grads)
    wte = data.grads["transformer.wte.weight"].reshape(n, -1)
    cut = 300
    rank0 = [m for m in names if ".h.1." not in m and m != "transformer.wte.weight"]
    rank1 = [m for m in names if ".h.1." in m]
    half = len(rank1) // 2
    return [
        ({m: data.grads[m] for m in rank1[half:]}, data.ids),
        ({"transformer.wte.weight@0": wte[:, :cut].contiguous()}, data.ids),
        (
            {
                f"transformer.wte.weight@{cut}": wte[:, cut:].contiguous(),
                **{m: data.grads[m] for m in rank1[:half]},
            },
            data.ids,
        ),
        ({m: data.grads[m].reshape(n, -1) for m in rank0}, data.ids),
    ]


def test_sharded_uploads_equal_one_upload(
    live_service: LiveService, step_data: StepData, redis_client: redis_sync.Redis, key_prefix: str
) -> None:
    data = step_data
    parts = shards(data)
    covered = sum(t[0].numel() for p, _ in parts for t in p.values())
    assert covered == data.W.shape[1]  # the four uploads tile the gradient exactly
    with httpx.Client(base_url=live_service.base_url, timeout=150) as http:
        for run_id in ("whole", "sharded"):
            create(http, run_id, "countsketch", 48, parameters=data.parameters)
        post_sequences(http, "whole", data)
        upload(http, "whole", data.grads, data.ids)
        answers = [upload(http, "sharded", tensors, ids) for tensors, ids in parts]
        assert len({a["upload_id"] for a in answers}) == 4
        post_sequences(http, "sharded", data)  # metadata last
        _, K_whole = kernel(http, "whole")
        _, K_sharded = kernel(http, "sharded")
        assert_kernel_close(K_sharded, K_whole)

        prefix = f"{key_prefix}:{{r:sharded}}"
        before = store_dump(redis_client, prefix)
        again = upload(http, "sharded", *parts[1])
        assert again == {**answers[1], "queued": False}
        assert store_dump(redis_client, prefix) == before
        _, K_again = kernel(http, "sharded")
        np.testing.assert_array_equal(K_again, K_sharded)
        status = http.get("/v1/runs/sharded/steps/0").json()
        assert status["uploads"] == 4 and status["rows"] == 6 and status["state"] == "ready"


def test_step_of_two_ranks_is_ready_when_both_reported(
    live_service: LiveService, step_data: StepData
) -> None:
    """A run of ``ranks = 2``: each rank pushes its own sequences' rows, then its sequences
    with its ``rank``.  After rank 0 the step stays pending (analyses answer 409 naming the
    missing rank) although its rows are sketched; after rank 1 it is ready and its kernel is
    the one-rank run's.  A push without ``rank``, or with one out of range, is a 422."""
    data = step_data
    half = len(data.ids) // 2
    sides = [slice(0, half), slice(half, None)]
    with httpx.Client(base_url=live_service.base_url, timeout=150) as http:
        create(http, "one", "countsketch", 48, parameters=data.parameters)
        create(http, "two", "countsketch", 48, parameters=data.parameters, ranks=2)
        again = http.post(
            "/v1/runs",
            json={"run_id": "two", "sketch": {"kind": "countsketch", "dim": 48, "seed": 11}},
        )
        assert again.status_code == 409  # another number of ranks is another spec
        post_sequences(http, "one", data)
        upload(http, "one", data.grads, data.ids)

        def push(rank: int | None, side: slice) -> httpx.Response:
            body: dict[str, Any] = {
                "learning_rate": data.learning_rate,
                "sequences": data.sequences[side],
            }
            if rank is not None:
                body["rank"] = rank
            return http.post("/v1/runs/two/steps/0/sequences", json=body)

        for side in sides:
            upload(http, "two", {m: g[side] for m, g in data.grads.items()}, data.ids[side])
        for bad in (None, 2):
            answer = push(bad, sides[0])
            assert answer.status_code == 422
            assert answer.headers["content-type"] == "application/problem+json"
        assert push(0, sides[0]).status_code == 200
        deadline = time.monotonic() + 120
        while http.get("/v1/runs/two/steps/0").json()["pending_uploads"]:
            assert time.monotonic() < deadline, "uploads not sketched in 120 s"
            time.sleep(0.1)
        waited = http.get("/v1/runs/two/steps/0/kernel", params={"wait": 1})
        assert waited.status_code == 409
        problem = waited.json()
        assert "1 of 2 ranks" in problem["detail"]
        status = problem["step_status"]
        assert status["state"] == "pending" and status["pending_uploads"] == 0
        assert status["ranks_expected"] == 2 and status["ranks_reported"] == [0]
        assert push(1, sides[1]).status_code == 200
        assert push(1, sides[1]).status_code == 200  # a re-sent push is harmless
        ids_two, K_two = kernel(http, "two")
        ids_one, K_one = kernel(http, "one")
        assert ids_two == ids_one
        assert_kernel_close(K_two, K_one)
        status = http.get("/v1/runs/two/steps/0").json()
        assert status["state"] == "ready" and status["ranks_reported"] == [0, 1]
        assert http.get("/v1/runs/one/steps/0").json()["ranks_reported"] == [0]


def test_kronecker_run_estimates_its_sketch_error_from_the_rows(
    live_service: LiveService, step_data: StepData
) -> None:
    """A kronecker run's ``se_sketch`` is ``|eta| bilinear_error_bar`` of its own rows with the
    estimator's pair weights (sketch/crossed.py), not the variance-factor bound."""
    data = step_data
    with httpx.Client(base_url=live_service.base_url, timeout=150) as http:
        run = create(http, "kr", "kronecker", 64, parameters=data.parameters)
        post_sequences(http, "kr", data)
        upload(http, "kr", data.grads, data.ids)
        entropy = http.get("/v1/runs/kr/steps/0/entropy", params=WAIT).json()
    sketcher = sketcher_for(run["sketch"], run.get("parameters"))
    assert isinstance(sketcher, KroneckerSketch)
    Y = sketcher.sketch(data.grads).double().numpy()
    seqs = StepSequences.from_records(data.sequences)
    est = Estimator(entropy["estimator"])
    ent, _, _ = estimator_sets(seqs, est)
    c = update_coefficients(seqs, "dr_grpo")
    weights = pair_weights(entropy_coefficients(seqs, ent), seqs, ent, est)
    shape = (sketcher.k_out, sketcher.k_in)
    expected = data.learning_rate * bilinear_error_bar(Y, c[:, None] * Y, weights, shape)
    assert entropy["se_sketch"] == pytest.approx(expected, rel=1e-4)
    bound = expected_entropy(data, Y @ Y.T, sketcher.variance_factor())["se_sketch"]
    assert entropy["se_sketch"] != pytest.approx(bound, rel=1e-2)
