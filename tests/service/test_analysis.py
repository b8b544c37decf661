"""Analysis routes with an in-process worker (``service.worker.Worker``, as the embedded mode
runs it): applied-update row, parameter groups, entropy-role rows, realized entropies,
cache invalidation, incomplete steps, the size limit, and the run's entropy history."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np
import pytest
import redis as redis_sync
import torch
from fastapi.testclient import TestClient
from redis.asyncio import Redis

from service.analysis import ANALYSIS_REVISION
from service.app import create_app
from service.keys import APPLIED_UPDATE_ID, Keys
from service.schemas import EntropyOut
from service.settings import Settings
from service.worker import Worker
from sketch.entropy import entropy_change, row_updates, update_coefficients, update_row_matrix
from sketch.groups import GroupedSketcher
from sketch.kernel import kernel_from_rows
from sketch.rao_blackwell import EntropySumKernels
from sketch.realized import realized_from_entropies
from sketch.sequences import StepSequences
from sketch.spec import sketcher_for
from tests.service.conftest import OCTET, StepData, assert_kernel_close, safetensors_body


def drain(settings: Settings) -> Worker:
    """Run one in-process worker until the job stream is empty (every job acked)."""

    async def go() -> Worker:
        stop = asyncio.Event()
        worker = Worker(settings.model_copy(update={"worker_block_ms": 50}), device="cpu")
        task = asyncio.create_task(worker.run(stop))
        redis = Redis.from_url(str(settings.redis_url))
        try:
            for _ in range(1200):
                if task.done() or await redis.xlen(Keys(settings.key_prefix).streams[0]) == 0:
                    break
                await asyncio.sleep(0.05)
        finally:
            stop.set()
            await task
            await redis.aclose()
        return worker

    return asyncio.run(go())


def post(api: TestClient, path: str, **kwargs: Any) -> dict[str, Any]:
    response = api.post(path, **kwargs)
    assert response.status_code in (200, 201, 202), response.text
    body: dict[str, Any] = response.json()
    return body


GROUPS = [{"name": "attn", "pattern": r".*\.attn\..*", "dim": 24}]


def test_entropy_with_groups_applied_update_entropy_role_and_realized(
    client: TestClient, settings: Settings, step_data: StepData
) -> None:
    data = step_data
    n = len(data.ids)
    run = post(
        client,
        "/v1/runs",
        json={
            "run_id": "g",
            "sketch": {"kind": "gaussian", "dim": 40, "seed": 2, "groups": GROUPS},
        },
    )
    sketcher = sketcher_for(run["sketch"], run.get("parameters"))
    assert isinstance(sketcher, GroupedSketcher)
    assert run["k"] == sketcher.dim == 64
    # the last prompt's responses become entropy-role samples; logprob_after on all
    seqs = [dict(s) for s in data.sequences]
    for i, s in enumerate(seqs):
        s["logprob_after"] = s["logprob"] + 0.01 * (i - 2)
        if s["prompt_id"] == "p1":
            s["role"] = "entropy"
    gen = torch.Generator().manual_seed(9)
    u = {k: 1e-3 * torch.randn(v.shape[1:], generator=gen) for k, v in data.grads.items()}
    post(client, "/v1/runs/g/steps/4/sequences", json={"learning_rate": 0.05, "sequences": seqs})
    post(client, "/v1/runs/g/steps/4/realized", json={"entropy_before": 10.0, "entropy_after": 9.5})
    post(
        client,
        "/v1/runs/g/steps/4/gradients",
        content=safetensors_body(data.grads, data.ids),
        headers=OCTET,
    )
    post(
        client,
        "/v1/runs/g/steps/4/gradients",
        content=safetensors_body({k: v[None] for k, v in u.items()}, [APPLIED_UPDATE_ID]),
        headers=OCTET,
    )
    assert drain(settings).processed == 2
    status = client.get("/v1/runs/g/steps/4").json()
    assert status["state"] == "ready" and status["rows"] == n and status["applied_update"]

    got = client.get("/v1/runs/g/steps/4/entropy", params={"estimator": "independent"}).json()
    Y = sketcher.sketch(data.grads).double().numpy()
    y_u = sketcher.sketch({k: v[None] for k, v in u.items()}).double().numpy()[0]
    groups = {g: kernel_from_rows(Y[:, sl]) for g, sl in sketcher.group_slices().items()}
    want = EntropyOut.from_change(
        entropy_change(
            kernel_from_rows(Y),
            StepSequences.from_records(seqs),
            0.05,
            estimator="independent",
            k_applied=Y @ y_u,
            sketch_variance_factor=sketcher.variance_factor(),
            group_kernels=groups,
            entropy_before=10.0,
            entropy_after=9.5,
            applied_row=y_u,
        )
    ).model_dump(mode="json")
    assert want["se_applied"] > 0
    fields = ("delta_h1", "delta_h1_applied", "se_applied", "se_sampling", "se_sketch", "ratio")
    for field in fields:
        assert got[field] == pytest.approx(want[field], rel=1e-5), field
    assert got["realized"]["delta_h"] == pytest.approx(realized_from_entropies(10.0, 9.5).delta_h)
    # a posted change is taken as exact: the interval carries only the prediction's error
    assert got["realized"]["se"] is None and got["ratio_interval"]["correlation"] == 0.0
    interval, expected = got["ratio_interval"], want["ratio_interval"]
    assert interval["estimable"] is expected["estimable"]
    for field in ("low", "high"):
        value = expected[field]
        assert interval[field] == (None if value is None else pytest.approx(value, rel=1e-4))
    # the step's KL comes from logprob_after even when the realized change was posted
    assert got["taylor"]["kl"] == pytest.approx(want["taylor"]["kl"], rel=1e-9)
    assert got["taylor"]["kl"] > 0 and got["taylor"]["regime"] == want["taylor"]["regime"]
    assert set(got["decomposition"]["groups"]) == {"attn", "default"}
    assert got["decomposition"]["groups"] == pytest.approx(
        want["decomposition"]["groups"], rel=1e-5
    )
    assert sum(got["decomposition"]["groups"].values()) == pytest.approx(got["delta_h1"], rel=1e-6)

    kernel_update = client.get("/v1/runs/g/steps/4/kernel", params={"role": "update"}).json()
    assert kernel_update["ids"] == [
        i for i, s in zip(data.ids, seqs, strict=True) if s.get("role") != "entropy"
    ]
    every = client.get("/v1/runs/g/steps/4/kernel", params={"role": "all", "normalize": True})
    rho = np.array(every.json()["matrix"])
    np.testing.assert_allclose(np.diag(rho), 1.0, rtol=1e-9)

    # the history analyses a ready step nobody queried yet, with the default estimator
    history = client.get("/v1/runs/g/entropy").json()["steps"]
    first = client.get("/v1/runs/g/steps/4/entropy").json()
    assert history[0]["step"] == 4 and history[0]["delta_h1"] == first["delta_h1"]
    assert history[0]["realized"] == pytest.approx(-0.5)
    assert history[0]["realized_source"] == "posted" and history[0]["realized_se"] is None
    for field, value in (
        ("ratio", first["ratio"]),
        ("ratio_low", first["ratio_interval"]["low"]),
        ("ratio_high", first["ratio_interval"]["high"]),
        ("ratio_estimable", first["ratio_interval"]["estimable"]),
        ("kl", first["taylor"]["kl"]),
        ("kl_se", first["taylor"]["kl_se"]),
        ("regime", first["taylor"]["regime"]),
        ("regime_reasons", first["taylor"]["reasons"]),
        ("delta_h1_plus_h2", first["delta_h1_plus_h2"]),
    ):
        assert history[0][field] == value, field
    assert len(history[0]["spectrum_head"]) == min(8, 3)
    # new metadata invalidates the cache, and the history refreshes its stale row by itself
    seqs[0] = {**seqs[0], "advantage": seqs[0]["advantage"] + 1.0}
    post(
        client, "/v1/runs/g/steps/4/sequences", json={"learning_rate": 0.05, "sequences": seqs[:1]}
    )
    refreshed = client.get("/v1/runs/g/entropy").json()["steps"][0]
    second = client.get("/v1/runs/g/steps/4/entropy").json()
    assert second["delta_h1"] != first["delta_h1"]
    assert refreshed["delta_h1"] == second["delta_h1"]
    detail = client.get("/v1/runs/g").json()
    assert [s["step"] for s in detail["steps"]] == [4] and detail["k"] == 64

    # a row written by an older analysis (before an upgrade that added fields) is recomputed
    # rather than served without them, although the step's data did not change; the upgraded
    # service has no cached answer yet (its cache names carry the revision)
    redis = redis_sync.Redis.from_url(str(settings.redis_url))
    keys = Keys(settings.key_prefix)
    row = json.loads(redis.hget(keys.summary("g"), "4"))
    old = {k: v for k, v in row.items() if k not in ("kl", "regime", "revision")}
    redis.hset(keys.summary("g"), "4", json.dumps(old))
    redis.unlink(keys.cache("g", 4))
    upgraded = client.get("/v1/runs/g/entropy").json()["steps"][0]
    assert upgraded["kl"] == second["taylor"]["kl"] and upgraded["regime"] is not None
    assert json.loads(redis.hget(keys.summary("g"), "4"))["revision"] == ANALYSIS_REVISION
    redis.close()


def test_incomplete_step_names_the_missing_ids(
    client: TestClient, settings: Settings, step_data: StepData
) -> None:
    data = step_data
    post(client, "/v1/runs", json={"run_id": "m", "sketch": {"kind": "countsketch", "dim": 16}})
    seqs = [*data.sequences[:4], {**data.sequences[0], "id": "extra"}]
    post(client, "/v1/runs/m/steps/0/sequences", json={"learning_rate": 0.1, "sequences": seqs})
    rows = slice(1, 6)  # p0-r1 .. p1-r2: p0-r0 and "extra" have no rows, p1-r1, p1-r2 no metadata
    post(
        client,
        "/v1/runs/m/steps/0/gradients",
        content=safetensors_body({k: v[rows] for k, v in data.grads.items()}, data.ids[rows]),
        headers=OCTET,
    )
    drain(settings)
    assert client.get("/v1/runs/m/steps/0").json()["state"] == "ready"
    response = client.get("/v1/runs/m/steps/0/kernel")
    assert response.status_code == 409
    body = response.json()
    assert body["missing_rows"] == ["p0-r0", "extra"]
    assert body["rows_without_metadata"] == ["p1-r1", "p1-r2"]


def test_too_many_sequences_is_422(settings: Settings, step_data: StepData) -> None:
    small = settings.model_copy(update={"max_sequences": 4})
    with TestClient(create_app(small)) as api:
        post(api, "/v1/runs", json={"run_id": "big", "sketch": {"kind": "countsketch", "dim": 8}})
        post(
            api,
            "/v1/runs/big/steps/0/sequences",
            json={"learning_rate": 0.1, "sequences": step_data.sequences},
        )
        post(
            api,
            "/v1/runs/big/steps/0/gradients",
            content=safetensors_body(step_data.grads, step_data.ids),
            headers=OCTET,
        )
        drain(small)
        response = api.get("/v1/runs/big/steps/0/kernel")
        assert (
            response.status_code == 422 and "KERNELSCOPE_MAX_SEQUENCES" in response.json()["detail"]
        )


def test_client_sketch_upload_adds_to_gradient_rows(
    client: TestClient, settings: Settings, step_data: StepData
) -> None:
    """A client-made sketch of some parameters plus raw rows of the others give the sketch of
    the whole gradient (math.md §7)."""
    data = step_data
    run = post(
        client, "/v1/runs", json={"run_id": "mix", "sketch": {"kind": "rademacher", "dim": 32}}
    )
    sketcher = sketcher_for(run["sketch"], run.get("parameters"))
    names = list(data.grads)
    client_part = sketcher.sketch({k: data.grads[k] for k in names[:5]})
    post(
        client,
        "/v1/runs/mix/steps/0/sketches",
        content=safetensors_body({"sketch": client_part}, data.ids),
        headers=OCTET,
    )
    post(
        client,
        "/v1/runs/mix/steps/0/gradients",
        content=safetensors_body({k: data.grads[k] for k in names[5:]}, data.ids),
        headers=OCTET,
    )
    post(
        client,
        "/v1/runs/mix/steps/0/sequences",
        json={"learning_rate": 0.1, "sequences": data.sequences},
    )
    drain(settings)
    K = np.array(client.get("/v1/runs/mix/steps/0/kernel").json()["matrix"])
    Y = sketcher.sketch(data.grads).double().numpy()
    assert_kernel_close(K, Y @ Y.T)
    # an estimator the step cannot support is a 422 problem, not a 500
    refused = client.get("/v1/runs/mix/steps/0/entropy", params={"estimator": "independent"})
    assert refused.status_code == 422 and "entropy-role" in refused.json()["detail"]


def test_health_metrics_dashboard_and_delete(client: TestClient, settings: Settings) -> None:
    assert client.get("/healthz").json() == {"status": "ok", "redis": True, "detail": None}
    post(client, "/v1/runs", json={"run_id": "d", "sketch": {"kind": "countsketch", "dim": 4}})
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and "kernelscope_queue_length" in metrics.text
    assert client.get("/").status_code == 200
    assert client.delete("/v1/runs/d").status_code == 204
    assert client.get("/v1/runs").json() == []


def test_update_rows_drive_the_prediction(
    client: TestClient, settings: Settings, step_data: StepData
) -> None:
    """Update rows ``u_i`` next to the score rows (math.md §4 "Update rows", the ``rows``
    metadata entry): the answer is ``sketch.entropy`` with :func:`row_updates` of the sketched
    rows, for raw gradient uploads and for client sketches; a sequence without an update row
    keeps ``u_i = c_i w_i``; bad row kinds and contradictions are refused."""
    data = step_data
    run = post(client, "/v1/runs", json={"run_id": "u", "sketch": {"kind": "gaussian", "dim": 48}})
    sketcher = sketcher_for(run["sketch"], run.get("parameters"))
    seqs = [dict(s) for s in data.sequences]
    seqs[-1]["role"] = "entropy"
    body = {"learning_rate": 0.05, "sequences": seqs}
    post(client, "/v1/runs/u/steps/0/sequences", json=body)
    post(
        client,
        "/v1/runs/u/steps/0/gradients",
        content=safetensors_body(data.grads, data.ids),
        headers=OCTET,
    )
    gen = torch.Generator().manual_seed(4)
    updates = {k: 1e-2 * torch.randn(v.shape, generator=gen) for k, v in data.grads.items()}
    with_rows = data.ids[:-2]  # the last update row is left out: u_i = c_i w_i there
    raw = {k: v[: len(with_rows)] for k, v in updates.items()}
    half = len(with_rows) // 2
    post(
        client,
        "/v1/runs/u/steps/0/gradients",
        content=safetensors_body({k: v[:half] for k, v in raw.items()}, with_rows[:half], "update"),
        headers=OCTET,
    )
    client_sketch = sketcher.sketch({k: v[half:] for k, v in raw.items()})
    post(
        client,
        "/v1/runs/u/steps/0/sketches",
        content=safetensors_body({"sketch": client_sketch}, with_rows[half:], "update"),
        headers=OCTET,
    )
    assert drain(settings).processed == 3
    got = client.get("/v1/runs/u/steps/0/entropy").json()

    Y = sketcher.sketch(data.grads).double().numpy()
    U = np.zeros_like(Y)
    U[: len(with_rows)] = sketcher.sketch(raw).double().numpy()
    has_row = np.arange(len(data.ids)) < len(with_rows)
    records = StepSequences.from_records(seqs)
    c = update_coefficients(records, "dr_grpo")
    want = EntropyOut.from_change(
        entropy_change(
            kernel_from_rows(Y),
            records,
            0.05,
            sketch_variance_factor=sketcher.variance_factor(),
            update=row_updates(Y, c, U, has_row),
        )
    ).model_dump(mode="json")
    plain = EntropyOut.from_change(
        entropy_change(
            kernel_from_rows(Y), records, 0.05, sketch_variance_factor=sketcher.variance_factor()
        )
    ).model_dump(mode="json")
    for field in ("delta_h1", "se_sampling", "se_sketch", "step_norm", "delta_h1_diag"):
        assert got[field] == pytest.approx(want[field], rel=1e-5), field
    assert got["delta_h1"] != pytest.approx(plain["delta_h1"], rel=1e-3)

    bad = safetensors_body({k: v[:1] for k, v in raw.items()}, with_rows[:1], "updates")
    refused = client.post("/v1/runs/u/steps/0/gradients", content=bad, headers=OCTET)
    assert refused.status_code == 422 and "'rows'" in refused.json()["detail"]
    applied = safetensors_body({k: v[:1] for k, v in raw.items()}, [APPLIED_UPDATE_ID], "update")
    refused = client.post("/v1/runs/u/steps/0/gradients", content=applied, headers=OCTET)
    assert refused.status_code == 422
    # an update row for an entropy-role sequence contradicts its metadata: 409, nothing lost
    last = {k: v[-1:] for k, v in updates.items()}
    post(
        client,
        "/v1/runs/u/steps/0/gradients",
        content=safetensors_body(last, data.ids[-1:], "update"),
        headers=OCTET,
    )
    drain(settings)
    conflict = client.get("/v1/runs/u/steps/0/entropy")
    assert conflict.status_code == 409
    assert conflict.json()["update_rows_without_update_role"] == [data.ids[-1]]


def test_entropy_sum_rows_give_the_entropy_gradient(
    client: TestClient, settings: Settings, step_data: StepData
) -> None:
    """Rows ``z_i = grad entropy_sum_i`` (``rows: entropy_sum``, math.md §3 "From the entropy
    sums") beside score rows, an update row and the applied update, raw and client-sketched:
    the answer is ``sketch.entropy`` with :class:`EntropySumKernels` of the sketched rows and
    says ``entropy_gradient: entropy_sum``, in the history row too; a step where one entropy
    sequence lacks its ``z`` row keeps the score-only gradient (and ``?entropy_gradient=
    entropy_sum`` is 422 there), ``?entropy_gradient=score`` forces it (outside the history);
    the applied update's id as a
    ``z`` row is refused (422) and a ``z`` row of an unknown sequence leaves the step
    incomplete (409)."""
    data = step_data
    run = post(client, "/v1/runs", json={"run_id": "z", "sketch": {"kind": "gaussian", "dim": 48}})
    sketcher = sketcher_for(run["sketch"], run.get("parameters"))
    seqs = [dict(s) for s in data.sequences]
    for i, s in enumerate(seqs):
        s["entropy_sum"] = 2.0 + 0.3 * i
    post(client, "/v1/runs/z/steps/0/sequences", json={"learning_rate": 0.05, "sequences": seqs})
    post(
        client,
        "/v1/runs/z/steps/0/gradients",
        content=safetensors_body(data.grads, data.ids),
        headers=OCTET,
    )
    gen = torch.Generator().manual_seed(8)
    z = {k: 0.3 * torch.randn(v.shape, generator=gen) for k, v in data.grads.items()}
    u = {k: 1e-2 * torch.randn(v.shape, generator=gen) for k, v in data.grads.items()}
    applied = {
        k: 1e-3 * torch.randn(v.shape[1:], generator=gen)[None] for k, v in data.grads.items()
    }
    half = len(data.ids) // 2
    post(
        client,
        "/v1/runs/z/steps/0/gradients",
        content=safetensors_body(
            {k: v[:half] for k, v in z.items()}, data.ids[:half], "entropy_sum"
        ),
        headers=OCTET,
    )
    post(
        client,
        "/v1/runs/z/steps/0/sketches",
        content=safetensors_body(
            {"sketch": sketcher.sketch({k: v[half:-1] for k, v in z.items()})},
            data.ids[half:-1],
            "entropy_sum",
        ),
        headers=OCTET,
    )
    post(
        client,
        "/v1/runs/z/steps/0/gradients",
        content=safetensors_body({k: v[:1] for k, v in u.items()}, data.ids[:1], "update"),
        headers=OCTET,
    )
    post(
        client,
        "/v1/runs/z/steps/0/gradients",
        content=safetensors_body(applied, [APPLIED_UPDATE_ID]),
        headers=OCTET,
    )
    assert drain(settings).processed == 5
    # the last sequence has no z row yet: the score-only gradient
    partial = client.get("/v1/runs/z/steps/0/entropy").json()
    assert partial["entropy_gradient"] == "score"
    forced = client.get("/v1/runs/z/steps/0/entropy", params={"entropy_gradient": "entropy_sum"})
    assert forced.status_code == 422 and "entropy_sum" in forced.json()["detail"]

    last = {k: v[-1:] for k, v in z.items()}
    post(
        client,
        "/v1/runs/z/steps/0/gradients",
        content=safetensors_body(last, data.ids[-1:], "entropy_sum"),
        headers=OCTET,
    )
    drain(settings)
    got = client.get("/v1/runs/z/steps/0/entropy").json()
    assert got["entropy_gradient"] == "entropy_sum"

    Y = sketcher.sketch(data.grads).double().numpy()
    Z = sketcher.sketch(z).double().numpy()
    U = np.zeros_like(Y)
    U[:1] = sketcher.sketch({k: v[:1] for k, v in u.items()}).double().numpy()
    has_u = np.arange(len(data.ids)) < 1
    a = sketcher.sketch(applied).double().numpy()[0]
    records = StepSequences.from_records(seqs)
    c = update_coefficients(records, "dr_grpo")
    V = update_row_matrix(Y, c, U, has_u)
    sums = EntropySumKernels(
        cross=Z @ V.T,
        score=Z @ Y.T,
        gram=Z @ Z.T,
        has_row=np.ones(len(data.ids), dtype=bool),
        applied=Z @ a,
    )
    want = entropy_change(
        kernel_from_rows(Y),
        records,
        0.05,
        sketch_variance_factor=sketcher.variance_factor(),
        update=row_updates(Y, c, U, has_u),
        k_applied=Y @ a,
        applied_row=a,
        entropy_sums=sums,
    )
    for field in ("delta_h1", "se_sampling", "se_sketch", "delta_h1_applied", "se_applied"):
        assert got[field] == pytest.approx(getattr(want, field), rel=1e-5), field
    assert got["delta_h1"] != pytest.approx(partial["delta_h1"], rel=1e-3)
    history = client.get("/v1/runs/z/entropy").json()
    assert history["steps"][0]["entropy_gradient"] == "entropy_sum"
    # ?entropy_gradient=score leaves the rows out: the score-only answer, not in the history
    score = client.get("/v1/runs/z/steps/0/entropy", params={"entropy_gradient": "score"}).json()
    assert score["entropy_gradient"] == "score"
    assert score["delta_h1"] == pytest.approx(partial["delta_h1"], rel=1e-9)
    history = client.get("/v1/runs/z/entropy").json()
    assert history["steps"][0]["entropy_gradient"] == "entropy_sum"

    refused = client.post(
        "/v1/runs/z/steps/0/gradients",
        content=safetensors_body(applied, [APPLIED_UPDATE_ID], "entropy_sum"),
        headers=OCTET,
    )
    assert refused.status_code == 422 and "entropy_sum" in refused.json()["detail"]
    post(
        client,
        "/v1/runs/z/steps/0/gradients",
        content=safetensors_body(last, ["nobody"], "entropy_sum"),
        headers=OCTET,
    )
    drain(settings)
    incomplete = client.get("/v1/runs/z/steps/0/entropy")
    assert incomplete.status_code == 409
    assert incomplete.json()["rows_without_metadata"] == ["nobody"]


def test_token_mean_target_and_its_history(
    client: TestClient, settings: Settings, step_data: StepData
) -> None:
    """``?target=token_mean`` answers ``sketch.entropy`` with ``target = token_mean`` on the
    stored sequences, their ``entropy_sum`` / ``entropy_sum_after`` included (math.md §8); the
    run history keeps one row per step and target; negative entropy sums are refused with
    nothing stored."""
    data = step_data
    run = post(client, "/v1/runs", json={"run_id": "t", "sketch": {"kind": "gaussian", "dim": 32}})
    sketcher = sketcher_for(run["sketch"], run.get("parameters"))
    seqs = [dict(s) for s in data.sequences]
    for i, s in enumerate(seqs):
        s["role"] = "entropy" if s["prompt_id"] == "p1" else "update"
        s["logprob_after"] = s["logprob"] + 0.02 * (i % 3 - 1)
        s["entropy_sum"] = 1.5 + 0.1 * i
        s["entropy_sum_after"] = 1.4 + 0.12 * i
    bad = [dict(s) for s in seqs]
    bad[0]["entropy_sum"] = -1.0
    r = client.post("/v1/runs/t/steps/0/sequences", json={"learning_rate": 0.05, "sequences": bad})
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
    assert client.get("/v1/runs/t/steps/0").status_code == 404
    post(client, "/v1/runs/t/steps/0/sequences", json={"learning_rate": 0.05, "sequences": seqs})
    post(
        client,
        "/v1/runs/t/steps/0/gradients",
        content=safetensors_body(data.grads, data.ids),
        headers=OCTET,
    )
    assert drain(settings).processed == 1

    Y = sketcher.sketch(data.grads).double().numpy()
    stored = StepSequences.from_records(seqs)
    for target in ("sequence", "token_mean"):
        got = client.get("/v1/runs/t/steps/0/entropy", params={"target": target}).json()
        want = entropy_change(
            kernel_from_rows(Y),
            stored,
            0.05,
            sketch_variance_factor=sketcher.variance_factor(),
            target=target,
        )
        assert got["target"] == target
        for field in ("delta_h1", "se_sampling", "se_sketch", "ratio"):
            assert got[field] == pytest.approx(getattr(want, field), rel=1e-5), (target, field)
        assert want.realized is not None
        assert got["realized"]["source"] == want.realized.source == "entropy_sum"
        assert got["realized"]["delta_h"] == pytest.approx(want.realized.delta_h, rel=1e-9)
    token = client.get("/v1/runs/t/entropy", params={"target": "token_mean"}).json()
    sequence = client.get("/v1/runs/t/entropy").json()
    assert [row["target"] for row in token["steps"]] == ["token_mean"]
    assert [row["target"] for row in sequence["steps"]] == ["sequence"]
    assert token["steps"][0]["delta_h1"] != pytest.approx(sequence["steps"][0]["delta_h1"])
    assert client.get("/v1/runs/t/entropy", params={"target": "tokens"}).status_code == 422


def test_applied_change_of_a_run_that_declares_its_update_includes_the_step(
    client: TestClient, settings: Settings, step_data: StepData
) -> None:
    """A run created with ``applied_includes_step``: its spec keeps the flag (the same id
    with another value is a 409), and the step's ``delta_h1_applied`` is ``delta_h1`` plus
    ``<grad_hat H, u - eta g_hat>`` (math.md §4), the service's answer equal to
    ``entropy_change`` with the flag and different from ``<grad_hat H, u>`` under
    ``u_statistic``."""
    data = step_data
    spec = {"sketch": {"kind": "gaussian", "dim": 48, "seed": 3}, "applied_includes_step": True}
    run = post(client, "/v1/runs", json={"run_id": "own", **spec})
    assert run["applied_includes_step"] is True
    again = client.post("/v1/runs", json={"run_id": "own", **spec, "applied_includes_step": False})
    assert again.status_code == 409
    assert client.get("/v1/runs/own").json()["applied_includes_step"] is True
    sketcher = sketcher_for(run["sketch"], None)
    seqs = StepSequences.from_records(data.sequences)
    eta = 0.05
    Y = sketcher.sketch(data.grads).double().numpy()
    c = update_coefficients(seqs, "dr_grpo", None)
    gen = torch.Generator().manual_seed(4)
    # the step's own update eta g_hat = eta sum_i c_i w_i, plus a momentum carried in
    weights = torch.tensor(c, dtype=torch.float32).reshape(-1, 1)
    u = {}
    for name, rows in data.grads.items():
        own = eta * (weights * rows.reshape(rows.shape[0], -1)).sum(0)
        momentum = 1e-3 * torch.randn(own.shape, generator=gen)
        u[name] = (own + momentum).reshape(rows.shape[1:])
    post(
        client,
        "/v1/runs/own/steps/0/sequences",
        json={"learning_rate": eta, "sequences": data.sequences},
    )
    for body, ids in (
        (data.grads, data.ids),
        ({k: v[None] for k, v in u.items()}, [APPLIED_UPDATE_ID]),
    ):
        content = safetensors_body(body, ids)
        post(client, "/v1/runs/own/steps/0/gradients", content=content, headers=OCTET)
    drain(settings)
    got = client.get("/v1/runs/own/steps/0/entropy", params={"estimator": "u_statistic"}).json()
    y_u = sketcher.sketch({k: v[None] for k, v in u.items()}).double().numpy()[0]
    common: dict[str, Any] = {
        "estimator": "u_statistic",
        "k_applied": Y @ y_u,
        "sketch_variance_factor": sketcher.variance_factor(),
        "applied_row": y_u,
    }
    K = kernel_from_rows(Y)
    declared = entropy_change(K, seqs, eta, applied_includes_step=True, **common)
    undeclared = entropy_change(K, seqs, eta, **common)
    assert declared.delta_h1_applied is not None and undeclared.delta_h1_applied is not None
    assert got["delta_h1_applied"] == pytest.approx(declared.delta_h1_applied, rel=1e-5)
    assert got["se_applied"] == pytest.approx(declared.se_applied, rel=1e-5)
    gap = abs(declared.delta_h1_applied - undeclared.delta_h1_applied)
    assert gap > 1e-3 * abs(undeclared.delta_h1_applied)
