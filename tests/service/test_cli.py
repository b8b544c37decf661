"""The ``kernelscope`` command line: help texts, and ``runs`` / ``report`` against a live service.

The live service is ``embedded_service`` on the test Redis (``redis_url`` fixture) with a
worker, fed one tiny GPT-2 GRPO step with exact per-sequence gradients (``step_data``), so the
numbers in the report are the ones the real API computes; the tests look them up in the API's
JSON and find them, formatted by ``format_number``, in the printed tables.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as redis_sync
import torch
from typer.testing import CliRunner

from clients.cli import app
from clients.report import format_number, ratio_text, token_text
from service.embedded import embedded_service
from service.settings import Settings
from tests.service.conftest import StepData, safetensors_body

runner = CliRunner()
WIDE = {"COLUMNS": "240", "KERNELSCOPE_URL": "", "KERNELSCOPE_TOKEN": ""}
RUN_ID = "cli-run"
STEP = 3
TOKEN = "s3cret-token"


def invoke(*args: str) -> Any:
    return runner.invoke(app, list(args), env=WIDE)


def test_top_level_help_lists_every_command() -> None:
    result = invoke("--help")
    assert result.exit_code == 0, result.output
    for command in ("serve", "worker", "runs", "report", "demo"):
        assert command in result.output
    assert "KERNELSCOPE_" in result.output and "REDIS_URL" in result.output


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (
            "serve",
            [
                "--host",
                "--port",
                "--workers-in-process",
                "--no-worker",
                "--data-dir",
                "127.0.0.1",
                "8000",
                "embedded",
                "kernelscope serve",
            ],
        ),
        ("worker", ["--device", "--redis-url", "auto", "cuda", "kernelscope worker"]),
        ("runs", ["--url", "--token", "http://127.0.0.1:8000", "kernelscope runs"]),
        (
            "report",
            ["--estimator", "--top", "--head", "--wait", "RUN", "STEP", "kernelscope report"],
        ),
    ],
)
def test_each_command_help_explains_defaults_and_examples(
    command: str, expected: list[str]
) -> None:
    result = invoke(command, "--help")
    assert result.exit_code == 0, result.output
    assert "Example" in result.output
    for text in expected:
        assert text in result.output, (command, text)


def test_worker_without_redis_exits_with_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("REDIS_URL", "KERNELSCOPE_REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    result = invoke("worker", "--device", "cpu")
    assert result.exit_code == 2
    assert "REDIS_URL" in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_worker_on_cuda_without_a_gpu_exits_with_a_clear_error() -> None:
    result = invoke("worker", "--device", "cuda", "--redis-url", "redis://127.0.0.1:1/0")
    assert result.exit_code == 2
    assert "cuda" in result.output.lower()


@dataclass
class Live:
    url: str
    api: httpx.Client


@pytest.fixture(scope="module")
def live(
    redis_url: str, step_data: StepData, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Live]:
    """A service (token-protected) holding one analysed step ``RUN_ID/STEP``."""
    prefix = f"kstest-cli-{secrets.token_hex(4)}"
    settings = Settings(
        redis_url=redis_url,
        key_prefix=prefix,
        token=TOKEN,
        data_dir=tmp_path_factory.mktemp("unused"),
        worker_block_ms=100,
    )
    try:
        with embedded_service(settings, port=0, workers=1, device="cpu") as svc:
            headers = {"Authorization": f"Bearer {TOKEN}"}
            with httpx.Client(base_url=svc.url, headers=headers, timeout=60) as api:
                _push_step(api, step_data)
                yield Live(svc.url, api)
    finally:
        client = redis_sync.Redis.from_url(redis_url)
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.unlink(*keys)
        client.close()


def _push_step(api: httpx.Client, data: StepData) -> None:
    run = {
        "run_id": RUN_ID,
        "sketch": {"kind": "exact", "dim": 1},
        "parameters": data.parameters,
    }
    assert api.post("/v1/runs", json=run).status_code == 201
    # logprob_after gives the realized change and the second-order term a value; the entropy
    # sums the token-mean entropy's realized change.
    sequences = [
        {
            **s,
            "logprob_after": s["logprob"] + 0.01 * (k % 3 - 1),
            "entropy_sum": 2.0 + 0.1 * k,
            "entropy_sum_after": 1.9 + 0.1 * k,
        }
        for k, s in enumerate(data.sequences)
    ]
    body = {"learning_rate": data.learning_rate, "sequences": sequences}
    r = api.post(f"/v1/runs/{RUN_ID}/steps/{STEP}/sequences", json=body)
    assert r.status_code == 200, r.text
    r = api.post(
        f"/v1/runs/{RUN_ID}/steps/{STEP}/gradients",
        content=safetensors_body(data.grads, data.ids),
        headers={"Content-Type": "application/octet-stream"},
    )
    assert r.status_code == 201, r.text  # in-process worker: sketched on receipt
    deadline = time.monotonic() + 60
    while api.get(f"/v1/runs/{RUN_ID}/steps/{STEP}").json()["state"] != "ready":
        assert time.monotonic() < deadline, "the step did not become ready"
        time.sleep(0.05)


def test_runs_lists_the_run(live: Live, step_data: StepData) -> None:
    result = invoke("runs", "--url", live.url, "--token", TOKEN)
    assert result.exit_code == 0, result.output
    n_params = sum(_numel(shape) for shape in step_data.parameters.values())
    for text in (RUN_ID, "exact", str(n_params), "dr_grpo", "sgd"):
        assert text in result.output, text


def _numel(shape: list[int]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def test_runs_needs_the_token(live: Live) -> None:
    result = invoke("runs", "--url", live.url)
    assert result.exit_code == 1
    assert "401" in result.output


def test_report_step_shows_the_api_numbers(live: Live, step_data: StepData) -> None:
    result = invoke("report", RUN_ID, str(STEP), "--url", live.url, "--token", TOKEN, "--top", "6")
    assert result.exit_code == 0, result.output
    out = result.output
    base = f"/v1/runs/{RUN_ID}/steps/{STEP}"
    entropy = live.api.get(f"{base}/entropy").json()
    spectrum = live.api.get(f"{base}/kernel/spectrum").json()
    blocks = live.api.get(f"{base}/kernel/blocks").json()

    expected: dict[str, Any] = {
        "state": "ready",
        "rows": len(step_data.ids),
        "dH1": entropy["delta_h1"],
        "se_sampling": entropy["se_sampling"],
        "dH1_diag": entropy["delta_h1_diag"],
        "cov_baseline": entropy["cov_baseline"],
        "dH2": entropy["delta_h2"],
        "realized": entropy["realized"]["delta_h"],
        "realized se": entropy["realized"]["se"],
        "KL": entropy["taylor"]["kl"],
        "eigenvalue 1": spectrum["eigenvalues"][0],
        "eigenvalue 2": spectrum["eigenvalues"][1],
        "effective rank": spectrum["effective_rank"],
        "participation ratio": spectrum["participation_ratio"],
        "trace": spectrum["trace"],
        "mean K diagonal": blocks["diagonal"]["mean_k"],
        "mean rho cross": blocks["cross_prompt"]["mean_rho"],
        "same-prompt share": blocks["same_prompt"]["share_frobenius"],
    }
    for name, pair in entropy["decomposition"]["pair_types"].items():
        expected[f"pair type {name}"] = pair["value"]
    for quadrant in entropy["decomposition"]["quadrants"]:
        if quadrant["count"]:
            expected[f"quadrant {quadrant['advantage']}/{quadrant['logprob']}"] = quadrant["sum"]
    for name, value in expected.items():
        assert value is not None, f"the API gave no {name}"
        assert format_number(value) in out, f"{name} = {format_number(value)} not in the report"
    # the ratio with its interval, or the flag that replaces it (math.md §6)
    interval = entropy["ratio_interval"]
    cell = ratio_text(
        {
            "ratio": entropy["ratio"],
            "ratio_low": interval["low"],
            "ratio_high": interval["high"],
            "ratio_estimable": interval["estimable"],
            "regime": entropy["taylor"]["regime"],
        }
    )
    assert cell in out and entropy["taylor"]["regime"] in out
    # how grad H was estimated (math.md §3): this step has no entropy-sum rows
    assert entropy["entropy_gradient"] == "score"
    assert any("grad H from" in line and "score" in line for line in out.splitlines())
    # exact sketch: no sketch error
    assert entropy["se_sketch"] == 0.0

    # The "driving entropy down" table starts with the most negative a_i.
    a = [(s["a"], s["id"]) for s in entropy["per_sequence"] if s["a"] is not None]
    worst_a, worst_id = min(a)
    section = out[out.index("driving entropy down") :]
    first_row = next(line for line in section.splitlines() if "p" in line and "-r" in line)
    assert worst_id in first_row and format_number(worst_a) in first_row


def test_report_history_after_analysis(live: Live) -> None:
    # Analyse the step (the summary row is written by the entropy analysis).
    live.api.get(f"/v1/runs/{RUN_ID}/steps/{STEP}/entropy").raise_for_status()
    history = live.api.get(f"/v1/runs/{RUN_ID}/entropy").json()
    row = next(r for r in history["steps"] if r["step"] == STEP)
    result = invoke("report", RUN_ID, "--url", live.url, "--token", TOKEN)
    assert result.exit_code == 0, result.output
    line = next(
        line for line in result.output.splitlines() if format_number(row["delta_h1"]) in line
    )
    assert line.strip("│ ").startswith(str(STEP))
    for key in ("se_sampling", "realized", "realized_se", "kl", "delta_h2"):
        assert format_number(row[key]) in line, key
    assert ratio_text(row) in line


def test_report_token_mean_target(live: Live) -> None:
    """``--target token_mean``: the step report and the history show the service's token-mean
    numbers (math.md §8), labelled as such."""
    entropy = live.api.get(
        f"/v1/runs/{RUN_ID}/steps/{STEP}/entropy", params={"target": "token_mean"}
    ).json()
    assert entropy["target"] == "token_mean"
    result = invoke(
        "report", RUN_ID, str(STEP), "--target", "token_mean", "--url", live.url, "--token", TOKEN
    )
    assert result.exit_code == 0, result.output
    assert format_number(entropy["delta_h1"]) in result.output
    assert "token_mean" in result.output
    history = invoke(
        "report", RUN_ID, "--target", "token_mean", "--url", live.url, "--token", TOKEN
    )
    assert history.exit_code == 0, history.output
    assert "nats per token" in history.output
    assert format_number(entropy["delta_h1"]) in history.output


def test_report_shows_the_token_shares(live: Live, step_data: StepData) -> None:
    """A step without token shares prints no tokens table; once the trainer pushed them, the
    report prints the top tokens down and up as the API answers them (text or ``#id``, share,
    covariance score, in the API's order) and the covariance line, at ``--kl-cov-ratio``."""
    args = ("report", RUN_ID, str(STEP), "--url", live.url, "--token", TOKEN, "--top", "4")
    before = invoke(*args)
    assert before.exit_code == 0, before.output
    assert "tokens pushing entropy" not in before.output and "KL-Cov" not in before.output
    words = [" the", " cat", "\n", " sat", "!"]
    pushed = []
    for k, seq in enumerate(step_data.sequences):
        n = 3 + k % 2
        body: dict[str, Any] = {
            "id": seq["id"],
            "token_ids": [10 + k * 5 + t for t in range(n)],
            "logprobs": [-0.5 - 0.1 * t for t in range(n)],
            "shares": [(-1) ** (k + t) * 1e-3 * (1 + k + 2 * t) for t in range(n)],
        }
        if k < len(step_data.sequences) - 1:  # the last without its text: shown as ids
            body["tokens"] = [words[(k + t) % len(words)] for t in range(n)]
        pushed.append(body)
    body = {"learning_rate": step_data.learning_rate, "sequences": pushed}
    r = live.api.post(f"/v1/runs/{RUN_ID}/steps/{STEP}/tokens", json=body)
    assert r.status_code == 200, r.text
    answer = live.api.get(
        f"/v1/runs/{RUN_ID}/steps/{STEP}/tokens", params={"top": 4, "kl_cov_ratio": 0.2}
    ).json()
    result = invoke(*args, "--kl-cov-ratio", "0.2")
    assert result.exit_code == 0, result.output
    out = result.output
    for side in ("down", "up"):
        section = out[out.index(f"tokens pushing entropy {side}") :]
        rows = [line for line in section.splitlines() if line.startswith("│")]
        assert len(answer[side]) == 4
        for line, token in zip(rows, answer[side], strict=False):
            text = token_text(token)
            assert text.startswith('"') or text == f"#{token['token_id']}"
            cells = [c.strip() for c in line.strip("│").split("│")]
            assert cells == [
                token["sequence_id"],
                str(token["position"]),
                text,
                format_number(token["share"]),
                format_number(token["cov_score"]),
            ]
    assert any(token_text(t).startswith("#") for t in answer["down"] + answer["up"])
    c = answer["covariance"]
    line = next(line for line in out.splitlines() if line.startswith("KL-Cov (ratio 0.2)"))
    assert f"k = {c['k']} of {c['num_tokens']} tokens" in line and c["k"] > 1
    for key in ("precision_at_k", "spearman", "selected_share"):
        assert format_number(c[key]) in line, key
    clip = next(line for line in out.splitlines() if line.startswith("Clip-Cov"))
    assert f"{c['clip_candidates']} candidates" in clip


def test_report_pending_step_shows_only_its_status(live: Live, step_data: StepData) -> None:
    body = {"learning_rate": 0.1, "sequences": step_data.sequences}
    live.api.post(f"/v1/runs/{RUN_ID}/steps/9/sequences", json=body).raise_for_status()
    result = invoke("report", RUN_ID, "9", "--url", live.url, "--token", TOKEN, "--wait", "0.3")
    assert result.exit_code == 0, result.output
    assert "pending" in result.output and "entropy change" not in result.output
    status = live.api.get(f"/v1/runs/{RUN_ID}/steps/9").json()
    assert status["state"] == "pending" and str(status["sequences"]) in result.output


def test_report_unknown_run_is_a_clear_error(live: Live) -> None:
    result = invoke("report", "no-such-run", "1", "--url", live.url, "--token", TOKEN)
    assert result.exit_code == 1
    assert "404" in result.output and "no-such-run" in result.output


def test_report_unreachable_service() -> None:
    result = invoke("runs", "--url", "http://127.0.0.1:9")
    assert result.exit_code == 1
    assert "cannot reach" in result.output


def test_deployment_doc_lists_every_setting() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "deployment.md").read_text()
    for name in Settings.model_fields:
        assert f"KERNELSCOPE_{name.upper()}" in doc, name


def test_kernelscope_redis_url_wins_over_redis_url(monkeypatch: pytest.MonkeyPatch) -> None:
    """The generic REDIS_URL (another program's, say) must not override ours: it used to,
    because the alias ``redis_url`` matched it case-insensitively before ours was looked at."""
    monkeypatch.setenv("REDIS_URL", "redis://generic:6379/0")
    monkeypatch.setenv("KERNELSCOPE_REDIS_URL", "redis://ours:6379/0")
    assert Settings().redis_url == "redis://ours:6379/0"
    assert Settings(redis_url="redis://given:6379/0").redis_url == "redis://given:6379/0"
    monkeypatch.delenv("KERNELSCOPE_REDIS_URL")
    assert Settings().redis_url == "redis://generic:6379/0"


def test_the_service_processes_start_without_scipy_stats() -> None:
    """The API and the worker import nothing from ``scipy.stats`` at start: it cost every one
    of them half a second and 40 MiB (``sketch.crossed`` takes its t quantiles from
    ``scipy.special``; ``spearmanr`` is imported where it is used)."""
    code = (
        "import sys, service.app, service.worker, service.cli; "
        "assert 'scipy.stats' not in sys.modules, 'scipy.stats loaded'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
