"""``/v1/runs/{run}/steps/{step}/tokens``: exact token shares and the covariance comparison."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import redis as redis_sync
import torch
from fastapi.testclient import TestClient

from clients.capture import capture_gradients
from clients.results import TokensReport
from clients.token_shares import token_shares
from service.settings import Settings
from sketch.entropy import entropy_coefficients
from sketch.token_covariance import CovarianceOptions, compare_covariance
from tests.clients.conftest import make_batch, tiny_gpt2
from tests.clients.test_token_shares import step_sequences
from tests.service.conftest import OCTET, safetensors_body, store_dump
from tests.service.test_analysis import drain, post

ETA = 0.3
PROBLEM = "application/problem+json"


def _sequences(n_update: int = 3, n_entropy: int = 2) -> list[dict[str, Any]]:
    return [
        {
            "id": f"u{i}",
            "prompt_id": f"p{i % 2}",
            "logprob": -3.0 - i,
            "advantage": (-1.0) ** i,
            "num_tokens": 3,
        }
        for i in range(n_update)
    ] + [
        {
            "id": f"e{j}",
            "prompt_id": f"p{j % 2}",
            "logprob": -2.0 - j,
            "advantage": 0.0,
            "num_tokens": 3,
            "role": "entropy",
        }
        for j in range(n_entropy)
    ]


def _tokens(ids: list[str], seed: int = 0) -> list[dict[str, Any]]:
    gen = np.random.default_rng(seed)
    return [
        {
            "id": sid,
            "token_ids": [int(t) for t in gen.integers(0, 50, 3)],
            "tokens": ["a", "b", "c"],
            "logprobs": [float(v) for v in -gen.random(3) * 3],
            "shares": [float(v) for v in gen.normal(size=3)],
        }
        for sid in ids
    ]


def test_tokens_are_stored_answered_and_compared(client: TestClient) -> None:
    """A push of three update sequences' shares: the answer's total, sequence totals, the
    tokens pushing down / up (sorted), one sequence's tokens in order and the covariance
    comparison (as ``sketch.token_covariance`` computes it, the sequences' advantages on their
    tokens); a re-sent push changes nothing."""
    post(client, "/v1/runs", json={"run_id": "k", "sketch": {"kind": "gaussian", "dim": 8}})
    post(
        client,
        "/v1/runs/k/steps/0/sequences",
        json={"learning_rate": ETA, "sequences": _sequences()},
    )
    body = {"learning_rate": ETA, "sequences": _tokens(["u0", "u1", "u2"])}
    assert client.get("/v1/runs/k/steps/0").json()["token_sequences"] == 0
    for _ in range(2):
        got = post(client, "/v1/runs/k/steps/0/tokens", json=body)
        assert got["upserted"] == 3 and got["sequences"] == 3
    assert client.get("/v1/runs/k/steps/0").json()["token_sequences"] == 3
    answer = client.get(
        "/v1/runs/k/steps/0/tokens", params={"top": 4, "sequence": "u1", "kl_cov_ratio": 0.3}
    ).json()
    shares = np.array([v for s in body["sequences"] for v in s["shares"]])
    logprobs = np.array([v for s in body["sequences"] for v in s["logprobs"]])
    advantage = np.repeat([1.0, -1.0, 1.0], 3)
    assert answer["num_tokens"] == 9 and answer["total"] == pytest.approx(shares.sum())
    assert [s["total"] for s in answer["sequences"]] == pytest.approx(
        [sum(s["shares"]) for s in body["sequences"]]
    )
    down = [t["share"] for t in answer["down"]]
    assert down == sorted(down) and down == pytest.approx(sorted(shares[shares < 0])[:4])
    assert all(t["share"] > 0 for t in answer["up"])
    assert [t["position"] for t in answer["sequence"]] == [0, 1, 2]
    assert [t["token"] for t in answer["sequence"]] == ["a", "b", "c"]
    want = compare_covariance(shares, logprobs, advantage, CovarianceOptions(kl_cov_ratio=0.3))
    cov = answer["covariance"]
    assert cov["k"] == want.k == 2
    for field in ("precision_at_k", "selected_sum", "clip_candidates", "clip_k"):
        assert cov[field] == pytest.approx(getattr(want, field)), field


def test_bad_token_pushes_are_refused_with_nothing_stored(
    client: TestClient, settings: Settings
) -> None:
    """Before the sequences: 409; unknown or entropy-role ids: 422 naming them; misaligned
    lengths or non-finite values: 422; another estimator, target or learning rate than the
    stored shares: 409; every refusal leaves Redis as it was.  No shares: GET 404."""
    post(client, "/v1/runs", json={"run_id": "b", "sketch": {"kind": "gaussian", "dim": 8}})
    good = {"learning_rate": ETA, "sequences": _tokens(["u0"])}
    r = client.post("/v1/runs/b/steps/0/tokens", json=good)
    assert r.status_code == 409 and r.headers["content-type"] == PROBLEM
    post(
        client,
        "/v1/runs/b/steps/0/sequences",
        json={"learning_rate": ETA, "sequences": _sequences()},
    )
    assert client.get("/v1/runs/b/steps/0/tokens").status_code == 404
    bounds = {"clip_cov_lb": 5, "clip_cov_ub": 1}
    r = client.get("/v1/runs/b/steps/0/tokens", params=bounds)
    assert r.status_code == 422 and r.headers["content-type"] == PROBLEM
    post(client, "/v1/runs/b/steps/0/tokens", json=good)
    redis = redis_sync.Redis.from_url(settings.redis_url or "")
    before = store_dump(redis, settings.key_prefix)
    misaligned = _tokens(["u1"])
    misaligned[0]["shares"] = misaligned[0]["shares"][:2]
    infinite = _tokens(["u1"])
    infinite[0]["logprobs"][0] = float("inf")
    cases = [
        (422, {"learning_rate": ETA, "sequences": _tokens(["zz", "e0"])}),
        (422, {"learning_rate": ETA, "sequences": misaligned}),
        (422, {"learning_rate": ETA, "sequences": infinite}),
        (409, {"learning_rate": 2 * ETA, "sequences": _tokens(["u1"])}),
        (409, {"learning_rate": ETA, "target": "token_mean", "sequences": _tokens(["u1"])}),
    ]
    for status, body in cases:
        # json.dumps writes the infinity as ``Infinity``, which Python's JSON parser reads
        r = client.post(
            "/v1/runs/b/steps/0/tokens",
            content=json.dumps(body),
            headers={"Content-Type": "application/json"},
        )
        assert r.status_code == status, (body, r.text)
        assert r.headers["content-type"] == PROBLEM
    r = client.post("/v1/runs/b/steps/0/tokens", json=cases[0][1])
    assert r.json()["unknown_ids"] == ["zz"] and r.json()["not_update_ids"] == ["e0"]
    assert store_dump(redis, settings.key_prefix) == before
    redis.close()


def test_shares_sum_to_the_services_dh1_and_a_i(client: TestClient, settings: Settings) -> None:
    """A tiny GPT-2 step (6 update, 4 entropy-role sequences) sent as exact gradients: the
    token shares from ``clients.token_shares`` summed per sequence are the service's ``a_i``
    of the ``independent`` estimator, and their total is its ``delta_h1``, to float
    precision."""
    model = tiny_gpt2()
    update, entropy = make_batch(seed=1, n=6), make_batch(seed=2, n=4)
    seqs = step_sequences(update, entropy, model)
    n = update.size
    params = {name: list(p.shape) for name, p in model.named_parameters()}
    post(
        client,
        "/v1/runs",
        json={"run_id": "x", "sketch": {"kind": "exact", "dim": 1}, "parameters": params},
    )
    post(
        client,
        "/v1/runs/x/steps/0/sequences",
        json={"learning_rate": ETA, "sequences": seqs.to_records()},
    )
    for batch, ids in ((update, seqs.ids[:n]), (entropy, seqs.ids[n:])):
        grads = capture_gradients(model, batch, chunk_size=batch.size).gradients
        post(
            client,
            "/v1/runs/x/steps/0/gradients",
            content=safetensors_body(grads, ids),
            headers=OCTET,
        )
    assert drain(settings).processed == 2

    h = entropy_coefficients(seqs, seqs.entropy_mask)[n:]
    coefficients = torch.full(update.input_ids.shape, 0.0)
    coefficients += torch.from_numpy(seqs.advantage[:n] * 0.25).float()[:, None]
    result = token_shares(model, update, coefficients, entropy, torch.from_numpy(h).float(), ETA)
    shares, logp = result.shares, result.logprobs
    body = {
        "learning_rate": ETA,
        "sequences": [
            {
                "id": seqs.ids[i],
                "token_ids": update.input_ids[i][update.response_mask[i]].tolist(),
                "logprobs": logp[i][update.response_mask[i]].tolist(),
                "shares": shares[i][update.response_mask[i]].tolist(),
            }
            for i in range(n)
        ],
    }
    post(client, "/v1/runs/x/steps/0/tokens", json=body)
    tokens = client.get("/v1/runs/x/steps/0/tokens").json()
    report = TokensReport.from_json(tokens)  # the client's strict reading of the answer
    assert report.total == tokens["total"] and report.covariance.k == 1
    entropy_answer = client.get(
        "/v1/runs/x/steps/0/entropy", params={"estimator": "independent"}
    ).json()
    a = {s["id"]: s["a"] for s in entropy_answer["per_sequence"] if s["a"] is not None}
    assert tokens["total"] == pytest.approx(entropy_answer["delta_h1"], rel=1e-4)
    for row in tokens["sequences"]:
        assert row["total"] == pytest.approx(a[row["id"]], rel=1e-4, abs=1e-9)
