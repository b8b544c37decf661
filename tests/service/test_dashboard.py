"""The dashboard in a real browser: headless Debian Chromium driven by Python Playwright.

A live service (uvicorn and a worker as subprocesses, on the test Redis) is filled by a short
run: three GRPO-shaped steps of client-made sketches with sequence metadata, an applied-update
row and the trainer's realized entropy change.  The tests then check, against the API's own
answers, that every chart on the run and step pages is drawn with the expected number of SVG
points, cells or bars, that the sequence table sorts, that no text inside a chart overlaps
another at 1280x800 and 1920x1080, that the console stays free of errors, and that a step
pushed during the test appears without a reload.  Screenshots of both pages at both sizes go
to ``artifacts/dashboard/`` (look at them).

Skipped when Playwright or ``/usr/bin/chromium`` is missing (``apt-get install chromium``,
``pip install playwright``; never ``playwright install``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from tests.service.conftest import OCTET, LiveService, free_port, safetensors_body

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "dashboard"
VIEWPORTS = [(1280, 800), (1920, 1080)]
PROMPTS, GROUP, K = 4, 4, 12
LEARNING_RATE = 0.5
APPLIED = "__applied_update__"


# ------------------------------------------------------------------ the service under test
@contextlib.contextmanager
def running_dashboard_service(
    redis_url: str, key_prefix: str, logs: Path, token: str = ""
) -> Iterator[LiveService]:
    """The API (uvicorn, ``service.app:create_app``) and one worker as subprocesses, sharing a
    multiprocess metrics directory as a deployment would."""
    metrics_dir = logs / "prom"
    metrics_dir.mkdir()
    env = {
        "KERNELSCOPE_REDIS_URL": redis_url,
        "KERNELSCOPE_KEY_PREFIX": key_prefix,
        "KERNELSCOPE_WORKER_BLOCK_MS": "200",
        "KERNELSCOPE_TOKEN": token,
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
    }
    svc = LiveService(env=env, port=free_port(), logs=logs)
    try:
        svc.start_api()
        svc.start_worker()
        yield svc
    finally:
        svc.stop_all()


@pytest.fixture
def dashboard_service(redis_url: str, key_prefix: str, tmp_path: Path) -> Iterator[LiveService]:
    """:func:`running_dashboard_service` without a token."""
    with running_dashboard_service(redis_url, key_prefix, tmp_path) as svc:
        yield svc


# ------------------------------------------------------------------ a short run
def make_step(step: int, seed: int) -> tuple[dict[str, Any], list[str], torch.Tensor]:
    """Metadata and client sketches ``[n + 1, K]`` (last row: the applied update) of one step.

    Rows share a prompt direction plus noise, so the prompt heatmaps have structure; the
    applied update is ``eta * g_hat`` perturbed by 20 % per coordinate, as momentum or clipping
    would.
    """
    rng = np.random.default_rng(seed)
    prompt_dirs = rng.normal(size=(PROMPTS, K))
    rows: list[np.ndarray] = []
    sequences: list[dict[str, Any]] = []
    for p in range(PROMPTS):
        rewards = rng.uniform(size=GROUP)
        for r in range(GROUP):
            rows.append(prompt_dirs[p] + 0.6 * rng.normal(size=K))
            sequences.append(
                {
                    "id": f"s{step}-p{p}-r{r}",
                    "prompt_id": f"prompt-{p}",
                    "logprob": float(-20 + 4 * rng.normal()),
                    "advantage": float(rewards[r] - rewards.mean()),
                    "num_tokens": int(rng.integers(5, 40)),
                }
            )
    Y = np.asarray(rows)
    c = np.array([s["advantage"] for s in sequences]) / (PROMPTS * GROUP)
    applied = LEARNING_RATE * (c @ Y) * (1 + 0.2 * rng.normal(size=K))
    sketch = torch.tensor(np.vstack([Y, applied]), dtype=torch.float32)
    ids = [str(s["id"]) for s in sequences] + [APPLIED]
    return {"learning_rate": LEARNING_RATE, "sequences": sequences}, ids, sketch


def push_step(base: str, run_id: str, step: int) -> None:
    """Sequences and the sketch upload of one step."""
    meta, ids, sketch = make_step(step, seed=100 + step)
    url = f"{base}/v1/runs/{run_id}/steps/{step}"
    r = httpx.post(f"{url}/sequences", json=meta, timeout=30)
    assert r.status_code == 200, r.text
    body = safetensors_body({"sketch": sketch}, ids)
    r = httpx.post(f"{url}/sketches", content=body, headers=OCTET, timeout=30)
    assert r.status_code == 202, r.text


def wait_ready(base: str, run_id: str, step: int, timeout_s: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        status = httpx.get(f"{base}/v1/runs/{run_id}/steps/{step}", timeout=30).json()
        if status["state"] == "ready":
            return dict(status)
        assert status["state"] != "failed", status
        assert time.monotonic() < deadline, f"step {step} not ready: {status}"
        time.sleep(0.2)


def post_realized(base: str, run_id: str, step: int) -> None:
    """Once the step is analysed, post a realized change near the prediction (1.2 x dH1, as
    curvature typically adds at a moderate step size), so the ratio chart looks like a real
    run's."""
    wait_ready(base, run_id, step)
    url = f"{base}/v1/runs/{run_id}/steps/{step}"
    predicted = httpx.get(f"{url}/entropy?wait=30", timeout=60).json()["delta_h1"]
    before = 30.0 - 0.01 * step
    after = before + 1.2 * predicted + 0.1 * abs(predicted) * (-1) ** step
    r = httpx.post(
        f"{url}/realized", json={"entropy_before": before, "entropy_after": after}, timeout=30
    )
    assert r.status_code == 200, r.text


def create_run(base: str, run_id: str) -> None:
    spec = {"run_id": run_id, "sketch": {"kind": "gaussian", "dim": K, "seed": 7}}
    r = httpx.post(f"{base}/v1/runs", json=spec, timeout=30)
    assert r.status_code == 201, r.text


def push_grouped_run(base: str, run_id: str) -> dict[str, Any]:
    """A run whose sketch has a parameter group, one step of raw gradients (sketched by the
    worker); returns the step's entropy answer."""
    spec = {
        "run_id": run_id,
        "sketch": {
            "kind": "gaussian",
            "dim": 8,
            "seed": 3,
            "groups": [{"name": "attn", "pattern": r"attn\..*", "dim": 6}],
        },
        "parameters": {"attn.w": [3, 4], "mlp.w": [5]},
    }
    r = httpx.post(f"{base}/v1/runs", json=spec, timeout=30)
    assert r.status_code == 201, r.text
    meta, _, _ = make_step(0, seed=7)
    ids = [s["id"] for s in meta["sequences"]]
    url = f"{base}/v1/runs/{run_id}/steps/0"
    r = httpx.post(f"{url}/sequences", json=meta, timeout=30)
    assert r.status_code == 200, r.text
    gen = torch.Generator().manual_seed(5)
    grads = {
        "attn.w": torch.randn(len(ids), 3, 4, generator=gen),
        "mlp.w": torch.randn(len(ids), 5, generator=gen),
    }
    r = httpx.post(
        f"{url}/gradients", content=safetensors_body(grads, ids), headers=OCTET, timeout=30
    )
    assert r.status_code == 202, r.text
    wait_ready(base, run_id, 0)
    answer: dict[str, Any] = httpx.get(f"{url}/entropy?wait=30", timeout=60).json()
    return answer


# ------------------------------------------------------------------ browser helpers
def browser_available() -> bool:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return False
    return os.path.exists(CHROMIUM) and shutil.which(CHROMIUM) is not None


needs_browser = pytest.mark.skipif(
    not browser_available(), reason="needs Python Playwright and Debian's /usr/bin/chromium"
)

OVERLAPS_JS = """
() => {
  // pairs of <text> in one chart whose boxes intersect by more than a pixel each way
  const out = [];
  for (const chart of document.querySelectorAll('[data-chart] svg')) {
    const boxes = [...chart.querySelectorAll('text')]
      .filter(t => t.textContent.trim())
      .map(t => [t.textContent, t.getBoundingClientRect()]);
    for (let i = 0; i < boxes.length; i++) {
      for (let j = i + 1; j < boxes.length; j++) {
        const [ta, a] = boxes[i], [tb, b] = boxes[j];
        const w = Math.min(a.right, b.right) - Math.max(a.left, b.left);
        const h = Math.min(a.bottom, b.bottom) - Math.max(a.top, b.top);
        const name = chart.closest('[data-chart]').dataset.chart;
        if (w > 1 && h > 1) out.push(name + ': ' + ta + ' / ' + tb);
      }
    }
    // every text stays inside its svg
    const r = chart.getBoundingClientRect();
    for (const [t, b] of boxes) {
      const inside = b.left >= r.left - 1 && b.right <= r.right + 1
        && b.top >= r.top - 1 && b.bottom <= r.bottom + 1;
      const name = chart.closest('[data-chart]').dataset.chart;
      if (!inside) out.push(name + ': outside the chart: ' + t);
    }
  }
  return out;
}
"""


# ------------------------------------------------------------------ the test
@needs_browser
@pytest.mark.browser
@pytest.mark.timeout(300)
def test_dashboard_pages_render_sort_and_update_live(
    dashboard_service: LiveService,
) -> None:
    from playwright.sync_api import sync_playwright

    base = dashboard_service.base_url
    run_id = "browser-run"
    create_run(base, run_id)
    for step in range(3):
        push_step(base, run_id, step)
    for step in range(3):
        post_realized(base, run_id, step)
    entropy = {
        s: httpx.get(f"{base}/v1/runs/{run_id}/steps/{s}/entropy?wait=30", timeout=60).json()
        for s in range(3)
    }
    step = 1
    spectrum = httpx.get(f"{base}/v1/runs/{run_id}/steps/{step}/kernel/spectrum", timeout=60).json()
    blocks = httpx.get(f"{base}/v1/runs/{run_id}/steps/{step}/kernel/blocks", timeout=60).json()
    diagonal = httpx.get(f"{base}/v1/runs/{run_id}/steps/{step}/kernel/diagonal", timeout=60).json()

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))

            def count(selector: str) -> int:
                return int(page.locator(selector).count())

            # ---- runs list
            page.goto(f"{base}/?poll=500")
            page.wait_for_selector(f"a[href='#/runs/{run_id}']")
            last_step = page.locator("td[data-key=last]").first.inner_text()
            assert last_step == "2"
            assert "gaussian k=12 seed=7" in page.locator("td[data-key=spec]").first.inner_text()

            # ---- run page
            page.goto(f"{base}/?poll=500#/runs/{run_id}")
            pred = "[data-chart=entropy] circle.pt[data-series=predicted]"
            page.wait_for_function(f"document.querySelectorAll('{pred}').length === 3")
            assert count("[data-chart=entropy] circle.pt[data-series=realized]") == 3
            assert count("[data-chart=entropy] circle.pt[data-series=applied]") == 3
            n_baseline = sum(entropy[s]["cov_baseline"] is not None for s in range(3))
            assert n_baseline == 3
            assert count("[data-chart=baseline] circle.pt[data-series=baseline]") == n_baseline
            assert count("[data-chart=step-norm] circle.pt[data-series=step-norm]") == 3
            assert count("[data-chart=entropy] g.errbar") == 3
            assert count("[data-chart=ratio] circle.pt[data-series=ratio]") == 3
            n_noise = sum(entropy[s]["noise_scale"]["b_simple"] is not None for s in range(3))
            assert count("[data-chart=noise] circle.pt[data-series=noise]") == n_noise
            # the drawn predicted values are the API's (tooltips carry them)
            tips = page.eval_on_selector_all(f"{pred} title", "els => els.map(e => e.textContent)")
            for s, tip in zip(range(3), tips, strict=True):
                assert tip.startswith(f"step {s}: dH1 = "), tip
            for w, h in VIEWPORTS:
                page.set_viewport_size({"width": w, "height": h})
                page.wait_for_timeout(400)  # the resize redraw is debounced by 150 ms
                assert page.evaluate(OVERLAPS_JS) == []
                page.screenshot(path=str(ARTIFACTS / f"run-{w}x{h}.png"), full_page=True)
            page.set_viewport_size({"width": 1280, "height": 800})

            # ---- a new step pushed now appears without a reload
            page.evaluate("window.__no_reload_marker = 42")
            push_step(base, run_id, 3)
            post_realized(base, run_id, 3)
            page.wait_for_function(
                f"document.querySelectorAll('{pred}').length === 4", timeout=90_000
            )
            # the realized change, posted after the step was analysed, follows on a later poll
            real = "[data-chart=entropy] circle.pt[data-series=realized]"
            page.wait_for_function(
                f"document.querySelectorAll('{real}').length === 4", timeout=90_000
            )
            assert page.evaluate("window.__no_reload_marker") == 42

            # ---- step page
            page.goto(f"{base}/?poll=500#/runs/{run_id}/steps/{step}")
            page.wait_for_selector("[data-chart=sequences] tbody tr")
            top = max(spectrum["eigenvalues"])
            positive = sum(v > 1e-10 * top for v in spectrum["eigenvalues"])
            assert positive >= 2
            assert count("[data-chart=spectrum] circle.pt[data-series=eigenvalues]") == positive
            sub = page.locator("[data-chart=spectrum] .sub").inner_text()
            assert "effective rank" in sub and "participation ratio" in sub
            b = len(blocks["prompt_matrix"]["prompts"])
            assert b == PROMPTS
            assert count("[data-chart=heat-k] rect.cell") == b * b
            assert count("[data-chart=heat-rho] rect.cell") == b * b
            n_na = sum(v is None for row in blocks["prompt_matrix"]["mean_k"] for v in row)
            assert count("[data-chart=heat-k] rect.cell.na") == n_na
            assert count("[data-chart=heat-k] .color-legend") == 1
            bars = page.locator("[data-chart=diagonal] rect.bar")
            counts = [
                int(bars.nth(i).get_attribute("data-count") or -1) for i in range(bars.count())
            ]
            assert sum(counts) == len(diagonal) == PROMPTS * GROUP
            e = entropy[step]
            n_pairs = sum(
                v is not None and v["value"] is not None
                for v in e["decomposition"]["pair_types"].values()
            )
            assert count("[data-chart=pairs] rect.hbar") == n_pairs
            assert count("[data-chart=quadrants] rect.hbar") == len(e["decomposition"]["quadrants"])
            contributing = [
                p for p in e["per_sequence"] if p["a"] is not None or p["b"] is not None
            ]
            assert count("[data-chart=sequences] tbody tr") == min(100, len(contributing))

            def column(key: str) -> list[float]:
                cells = page.locator(f"[data-chart=sequences] tbody td[data-key={key}]")
                return [
                    float(cells.nth(i).get_attribute("data-value") or "nan")
                    for i in range(cells.count())
                ]

            # default order: the most negative contribution (entropy collapse) first
            assert column("contribution") == sorted(column("contribution"))
            expected = sorted(p["a"] if p["a"] is not None else p["b"] for p in contributing)
            assert column("contribution") == pytest.approx(expected)
            page.click("[data-chart=sequences] th[data-key=advantage]")
            assert column("advantage") == sorted(column("advantage"), reverse=True)
            page.click("[data-chart=sequences] th[data-key=advantage]")
            assert column("advantage") == sorted(column("advantage"))
            page.click("[data-chart=sequences] th[data-key=tokens]")
            assert column("tokens") == sorted(column("tokens"), reverse=True)
            page.set_viewport_size({"width": 1300, "height": 800})  # a redraw keeps the order
            page.wait_for_timeout(400)
            assert column("tokens") == sorted(column("tokens"), reverse=True)
            for w, h in VIEWPORTS:
                page.set_viewport_size({"width": w, "height": h})
                page.wait_for_timeout(400)
                assert page.evaluate(OVERLAPS_JS) == []
                page.screenshot(path=str(ARTIFACTS / f"step-{w}x{h}.png"), full_page=True)
            page.set_viewport_size({"width": 1280, "height": 800})

            # ---- a run with parameter groups: the per-group decomposition is drawn
            grouped = push_grouped_run(base, "browser-groups")
            groups = grouped["decomposition"]["groups"]
            assert groups and len(groups) >= 2
            page.goto(f"{base}/?poll=500#/runs/browser-groups/steps/0")
            page.wait_for_selector("[data-chart=groups] rect.hbar")
            assert count("[data-chart=groups] rect.hbar") == len(groups)
            # 16 rows of a 14-wide sketch: rank <= 14, the numerical zeros are not drawn
            eig = httpx.get(
                f"{base}/v1/runs/browser-groups/steps/0/kernel/spectrum", timeout=60
            ).json()["eigenvalues"]
            shown = sum(v > 1e-10 * max(eig) for v in eig)
            assert count("[data-chart=spectrum] circle.pt") == shown
            labels = page.locator("[data-chart=groups] rect.hbar")
            drawn = {labels.nth(i).get_attribute("data-label") for i in range(labels.count())}
            assert drawn == set(groups)
            assert page.evaluate(OVERLAPS_JS) == []
            page.screenshot(path=str(ARTIFACTS / "step-groups-1280x800.png"), full_page=True)

            # ---- the runs list shows both runs with their last step
            page.goto(f"{base}/?poll=500#/")
            page.wait_for_selector("a[href='#/runs/browser-groups']")
            assert count("table.data tbody tr") == 2
            page.screenshot(path=str(ARTIFACTS / "runs-1280x800.png"), full_page=True)
        finally:
            browser.close()
    assert errors == [], errors


@needs_browser
@pytest.mark.browser
@pytest.mark.timeout(300)
def test_dashboard_sends_the_token_the_user_gives(
    redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    from playwright.sync_api import sync_playwright

    token = "s3cret-token"
    with running_dashboard_service(redis_url, key_prefix, tmp_path, token=token) as svc:
        base = svc.base_url
        auth = {"Authorization": f"Bearer {token}"}
        spec = {"run_id": "token-run", "sketch": {"kind": "gaussian", "dim": 4, "seed": 0}}
        assert httpx.post(f"{base}/v1/runs", json=spec, headers=auth).status_code == 201
        assert httpx.get(f"{base}/v1/runs").status_code == 401
        # the page and the metrics are not behind the token; the data are
        assert httpx.get(f"{base}/").status_code == 200
        assert httpx.get(f"{base}/static/app.js").status_code == 200
        assert httpx.get(f"{base}/metrics").status_code == 200
        errors: list[str] = []
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
            )
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 800})
                page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
                page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
                page.goto(f"{base}/?poll=500")
                page.wait_for_selector("text=needs an API token")
                page.fill("#token-input", token)
                page.click("#token-form button")
                page.wait_for_selector("a[href='#/runs/token-run']")
                # a fresh browser profile given the token in the address
                other = browser.new_page(viewport={"width": 1280, "height": 800})
                other.goto(f"{base}/?poll=500&token={token}#/runs/token-run")
                other.wait_for_selector("text=gaussian k=4 seed=0")
            finally:
                browser.close()
    # the only console errors are the browser's own notes of the 401 answers before the token
    assert errors and all("401" in e for e in errors), errors
