"""The dashboard in a real browser: headless Debian Chromium driven by Python Playwright.

A live service (uvicorn and a worker as subprocesses, on the test Redis) is filled by a short
run: five GRPO-shaped steps of client-made sketches with sequence metadata (update and
entropy-role sequences), an applied-update row, and either ``logprob_after`` (the service
estimates the realized change with its s.e. and the step's KL) or the trainer's realized
entropy change.  The steps cover each case the pages tell apart: first order, a posted change,
a ratio that is not estimable, second order, outside the Taylor regime.  The tests then check,
against the API's own answers, that every chart on the run and step pages is drawn with the
expected number of SVG points, cells, bars and error bars, that a ratio is drawn with its
interval only where it is estimable and inside the Taylor regime (else a marker), that the
tables and headline numbers say what ``kernelscope report`` prints, that the sequence table
sorts, that no text inside a chart overlaps another at 1280x800 and 1920x1080, that the console
stays free of errors, and that a step pushed during the test appears without a reload.
Every page is also loaded on its own, and must fetch every ES module of ``service/static/`` as
JavaScript, finish its refreshes, and log no console error or uncaught exception.
Screenshots of both pages at both sizes go to ``artifacts/dashboard/`` (look at them).

Skipped when Playwright or ``/usr/bin/chromium`` is missing (``apt-get install chromium``,
``pip install playwright``; never ``playwright install``).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from clients.report import ratio_text
from sketch.entropy import update_coefficients
from sketch.sequences import StepSequences
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
STATIC = Path(__file__).resolve().parents[2] / "service" / "static"
MODULES = sorted(p.name for p in STATIC.glob("*.js"))
VIEWPORTS = [(1280, 800), (1920, 1080)]
PROMPTS, GROUP, ENTROPY_GROUP, K = 4, 4, 4, 64
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
@dataclass(frozen=True)
class StepPlan:
    """How one step of the test run is made (:func:`make_step`).

    ``signal``: how strongly the log-prob drives both the reward and a shared direction of the
    score gradients (0: the step has no entropy signal, so ``|dH1| <= 2 s.e.``);
    ``logprob_after``: whether the sequences carry ``S'`` (then the service estimates the
    realized change with its s.e. and the step's KL), else the trainer posts the change;
    ``entropy_sums``: whether they carry ``entropy_sum`` / ``entropy_sum_after`` too (then the
    token-mean entropy has a realized change, math.md §8).
    """

    signal: float
    learning_rate: float
    logprob_after: bool
    entropy_sums: bool = False


# every kind of step the pages distinguish; the test checks the regimes against the API first
PLANS = {
    0: StepPlan(1.0, 0.05, True),  # first order: realized ± se, KL, a ratio with its interval
    1: StepPlan(1.0, 0.05, False),  # realized posted by the trainer: no s.e., regime unknown
    2: StepPlan(0.0, 0.05, True),  # no signal: the ratio is not estimable
    3: StepPlan(2.0, 0.05, True),  # second order: 0.03 < KL <= 0.3
    4: StepPlan(2.0, 0.12, True),  # outside the Taylor regime: KL > 0.3
    5: StepPlan(1.0, 0.05, False),  # pushed while the page is open; realized posted later
}
FIRST_STEPS = 5  # steps 0..4 before the browser opens
# a run for the target switch: the token-mean entropy's realized change comes from the entropy
# sums, so steps 0 and 1 have one and step 2 (logprob_after only) has none
TOKEN_PLANS = {
    0: StepPlan(1.0, 0.05, True, entropy_sums=True),
    1: StepPlan(2.0, 0.05, True, entropy_sums=True),
    2: StepPlan(1.0, 0.05, True),
}


def make_step(
    step: int, seed: int, plan: StepPlan = PLANS[0]
) -> tuple[dict[str, Any], list[str], torch.Tensor]:
    """Metadata and client sketches ``[n + 1, K]`` (last row: the applied update) of one step.

    Each prompt has ``GROUP`` update and ``ENTROPY_GROUP`` entropy-role sequences.  Rows share
    a prompt direction plus noise, so the prompt heatmaps have structure, and a direction ``v``
    along which sequences with a high log-prob within their prompt lie (``plan.signal``); the
    rewards follow the log-prob as well, so the step moves the entropy.  The applied update is
    ``eta * g_hat`` (the service's ``c``) perturbed by 20 % per coordinate, as momentum or
    clipping would; ``logprob_after`` is ``S + <w, u>``, the first-order change of the update.
    With ``plan.entropy_sums`` each sequence's ``entropy_sum`` is its length times a per-token
    entropy near 1.2 nats and ``entropy_sum_after`` that sum shrunk by about 3 % (drawn from a
    generator of their own, so the other numbers of a step do not depend on the flag).
    """
    rng = np.random.default_rng(seed)
    prompt_dirs = rng.normal(size=(PROMPTS, K))
    v = rng.normal(size=K)
    rows: list[np.ndarray] = []
    sequences: list[dict[str, Any]] = []
    for p in range(PROMPTS):
        for role, size in (("update", GROUP), ("entropy", ENTROPY_GROUP)):
            logprob = -20 + 4 * rng.normal(size=size)
            z = (logprob - logprob.mean()) / 4
            rewards = rng.uniform(size=size) + plan.signal * z
            advantage = rewards - rewards.mean() if role == "update" else np.zeros(size)
            for r in range(size):
                rows.append(
                    prompt_dirs[p] + plan.signal * np.tanh(2 * z[r]) * v + 0.6 * rng.normal(size=K)
                )
                sequences.append(
                    {
                        "id": f"s{step}-p{p}-{role[0]}{r}",
                        "prompt_id": f"prompt-{p}",
                        "logprob": float(logprob[r]),
                        "advantage": float(advantage[r]),
                        "num_tokens": int(rng.integers(5, 40)),
                        "role": role,
                    }
                )
    Y = np.asarray(rows)
    c = update_coefficients(StepSequences.from_records(sequences), "dr_grpo")
    applied = plan.learning_rate * (c @ Y) * (1 + 0.2 * rng.normal(size=K))
    if plan.logprob_after:
        for seq, d in zip(sequences, Y @ applied, strict=True):
            seq["logprob_after"] = float(seq["logprob"] + d)
    if plan.entropy_sums:
        sums = np.random.default_rng(seed + 10_000)
        for seq in sequences:
            n = int(seq["num_tokens"])
            before = n * sums.uniform(0.8, 1.6)
            seq["entropy_sum"] = float(before)
            seq["entropy_sum_after"] = float(
                max(0.0, 0.97 * before + 0.1 * np.sqrt(n) * sums.normal())
            )
    sketch = torch.tensor(np.vstack([Y, applied]), dtype=torch.float32)
    ids = [str(s["id"]) for s in sequences] + [APPLIED]
    return {"learning_rate": plan.learning_rate, "sequences": sequences}, ids, sketch


def push_step(base: str, run_id: str, step: int, plans: dict[int, StepPlan] = PLANS) -> None:
    """Sequences and the sketch upload of one step (made by its plan in ``plans``)."""
    meta, ids, sketch = make_step(step, seed=100 + step, plan=plans[step])
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
    meta, _, _ = make_step(0, seed=7, plan=PLANS[1])  # no S': random gradients below
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


WORDS = [" the", " entropy", " falls", ",", " then", " rises", " again", ".", " so", " we", " wait"]


def push_token_shares(
    base: str, run_id: str, step: int, plans: dict[int, StepPlan] = PLANS
) -> dict[str, Any]:
    """Exact token shares of the step's update sequences (``POST .../tokens``), one token per
    ``num_tokens`` of each, of both signs; the last sequence is pushed without its text (the
    pages show its token ids).  Returns the body pushed."""
    meta, _, _ = make_step(step, seed=100 + step, plan=plans[step])
    gen = np.random.default_rng(500 + step)
    update = [s for s in meta["sequences"] if s["role"] == "update"]
    sequences = []
    for index, seq in enumerate(update):
        n = int(seq["num_tokens"])
        token_ids = [int(v) for v in gen.integers(0, len(WORDS), n)]
        body: dict[str, Any] = {
            "id": seq["id"],
            "token_ids": token_ids,
            "logprobs": [float(v) for v in -3 * gen.random(n)],
            "shares": [float(v) for v in 1e-3 * gen.standard_t(3, n)],
        }
        if index < len(update) - 1:
            body["tokens"] = [WORDS[t] for t in token_ids]
        sequences.append(body)
    pushed = {"learning_rate": plans[step].learning_rate, "sequences": sequences}
    r = httpx.post(f"{base}/v1/runs/{run_id}/steps/{step}/tokens", json=pushed, timeout=30)
    assert r.status_code == 200, r.text
    return pushed


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


def console_errors(into: list[str]) -> Any:
    """A console listener that keeps the page's errors in ``into`` (a step without token
    shares is not asked for them: its status says ``token_sequences: 0``)."""

    def on_console(m: Any) -> None:
        if m.type == "error":
            into.append(m.text)

    return on_console


def js_fmt(v: float) -> str:
    """The dashboard's ``fmt`` (dom.js): 3 significant digits, exponent form below 1e-3 and
    from 1e5."""
    if v == 0:
        return "0"
    if abs(v) >= 1e5 or abs(v) < 1e-3:
        mantissa, exponent = f"{v:.2e}".split("e")
        mantissa = mantissa.rstrip("0").rstrip(".")
        return f"{mantissa}e{int(exponent)}"
    text = repr(float(f"{v:.3g}"))
    return text[:-2] if text.endswith(".0") else text


# ------------------------------------------------------------------ the modules, served
IMPORT_RE = re.compile(r'^import \{([^}]*)\} from "\./([\w-]+\.js)";$', re.MULTILINE)
EXPORT_RE = re.compile(r"^export (?:async )?(?:function|const|class) (\w+)", re.MULTILINE)


def test_dashboard_serves_its_modules_as_javascript(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script type="module" src="/static/app.js"></script>' in page.text
    # the page runs its own modules only: no inline script or style, nothing from elsewhere
    policy = dict(
        d.strip().split(" ", 1) for d in page.headers["content-security-policy"].split(";")
    )
    assert policy["script-src"] == policy["style-src"] == policy["connect-src"] == "'self'"
    assert policy["default-src"] == policy["frame-ancestors"] == "'none'"
    assert "api.js" in MODULES and "chart.js" in MODULES and len(MODULES) >= 6
    for name in MODULES:
        r = client.get(f"/static/{name}")
        assert r.status_code == 200, name
        # a module script with any other type is refused by the browser
        assert r.headers["content-type"] == "text/javascript; charset=utf-8", name
        assert r.headers["cache-control"] == "no-cache", name
        assert r.headers["x-content-type-options"] == "nosniff", name
    assert client.get("/static/style.css").headers["content-type"].startswith("text/css")
    for name in ("nope.js", "..%2Fapp.py", "__init__.py"):
        assert client.get(f"/static/{name}").status_code == 404, name
    # every import names a served module and what it exports; every module is reached from the
    # entry (a module nothing imports is dead code or a forgotten page)
    exports = {name: set(EXPORT_RE.findall((STATIC / name).read_text())) for name in MODULES}
    reached, todo = {"app.js"}, ["app.js"]
    while todo:
        source = (STATIC / todo.pop()).read_text()
        assert "require(" not in source
        for names, target in IMPORT_RE.findall(source):
            assert target in exports, target
            wanted = {n.strip() for n in names.split(",")}
            assert wanted <= exports[target], (target, wanted - exports[target])
            if target not in reached:
                reached.add(target)
                todo.append(target)
    assert reached == set(MODULES)


def page_problems(
    browser: Any, url: str, broken: str | None = None, wait_ms: int = 20_000
) -> list[str]:
    """Open ``url`` in a fresh page and wait for its second successful refresh; return every
    console error, uncaught exception, module that did not come back as JavaScript, and a note
    when the refreshes never happened (``broken``: a module answered with a 404, to show that
    this check sees a module that fails to load)."""
    problems: list[str] = []
    modules: dict[str, tuple[int, str]] = {}
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    if broken is not None:
        page.route(f"**/static/{broken}", lambda route: route.fulfill(status=404, body=""))

    def on_response(r: Any) -> None:
        if r.url.endswith(".js"):
            modules[r.url.rsplit("/", 1)[1]] = (r.status, r.headers.get("content-type", ""))

    page.on("console", console_errors(problems))
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
    page.on("response", on_response)
    try:
        page.goto(url)
        try:
            # a selector, not wait_for_function: Playwright evaluates a function given as a
            # string inside the page, which the page's Content-Security-Policy refuses
            page.wait_for_selector("body[data-loaded]:not([data-loaded='1'])", timeout=wait_ms)
        except Exception:  # playwright's TimeoutError
            problems.append("no refresh finished")
        for name in MODULES:
            status, media = modules.get(name, (0, ""))
            if status != 200 or not media.startswith("text/javascript"):
                problems.append(f"module {name}: {status} {media}")
    finally:
        page.close()
    return problems


@needs_browser
@pytest.mark.browser
@pytest.mark.timeout(300)
def test_every_page_loads_its_modules_without_console_errors(
    dashboard_service: LiveService,
) -> None:
    from playwright.sync_api import sync_playwright

    base = dashboard_service.base_url
    run_id = "modules-run"
    create_run(base, run_id)
    # a realized change from logprob_after and the entropy sums, then a posted one (which
    # the token-mean entropy does not take: no realized change of T)
    push_step(base, run_id, 0, TOKEN_PLANS)
    push_step(base, run_id, 1)
    wait_ready(base, run_id, 0)
    post_realized(base, run_id, 1)
    # step 0 has token shares (its tokens card and sequence views), step 1 none
    pushed = push_token_shares(base, run_id, 0, TOKEN_PLANS)["sequences"]
    seq_view = f"/?poll=300#/runs/{run_id}/steps/0/sequences"
    pages = [
        "/?poll=300",
        f"/?poll=300#/runs/{run_id}",
        f"/?poll=300#/runs/{run_id}/steps/0",
        f"/?poll=300#/runs/{run_id}/steps/0?target=sequence&kl_cov_ratio=0.05",
        f"{seq_view}/{pushed[0]['id']}?target=sequence&kl_cov_ratio=0.05",
        f"{seq_view}/{pushed[-1]['id']}",  # pushed without its text
        f"/?poll=300#/runs/{run_id}/steps/1",
        f"/runs/{run_id}?poll=300",  # a path-style link
        f"/?poll=300#/runs/{run_id}?target=token_mean",
        f"/?poll=300#/runs/{run_id}/steps/0?target=token_mean",
        f"/?poll=300#/runs/{run_id}/steps/1?target=token_mean",
        f"/runs/{run_id}?poll=300&target=token_mean",
        f"/?poll=300#/runs/{run_id}/steps/7",  # no such step: a problem shown, not thrown
    ]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            for path in pages[:-1]:
                assert page_problems(browser, base + path) == [], path
            # an unknown step: the browser's notes of the 404 answers, and no refresh finishes,
            # but nothing is thrown (the page shows the problem's detail instead)
            missing = set(page_problems(browser, base + pages[-1], wait_ms=3000))
            note = "Failed to load resource: the server responded with a status of 404 (Not Found)"
            assert missing == {note, "no refresh finished"}, missing
            # the check sees a module that fails to load: the page never refreshes
            broken = page_problems(browser, base + pages[2], broken="chart.js", wait_ms=3000)
            assert "no refresh finished" in broken and "module chart.js: 404 " in broken
        finally:
            browser.close()


# ------------------------------------------------------------------ the test
REGIME_LABELS = {
    "first_order": "first order",
    "second_order": "second order",
    "outside": "outside Taylor",
    "unknown": "unknown",
}


def flat_ratio(entropy: dict[str, Any]) -> dict[str, Any]:
    """The ratio fields of a step's entropy answer, flat as ``clients.report.ratio_text``
    reads them (as ``report.entropy_table`` does)."""
    interval = entropy.get("ratio_interval") or {}
    return {
        "ratio": entropy.get("ratio"),
        "ratio_low": interval.get("low"),
        "ratio_high": interval.get("high"),
        "ratio_estimable": interval.get("estimable"),
        "regime": (entropy.get("taylor") or {}).get("regime"),
    }


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
    steps = range(FIRST_STEPS)
    for step in steps:
        push_step(base, run_id, step)
    for step in steps:
        if PLANS[step].logprob_after:
            wait_ready(base, run_id, step)
        else:
            post_realized(base, run_id, step)
    entropy = {
        s: httpx.get(f"{base}/v1/runs/{run_id}/steps/{s}/entropy?wait=30", timeout=60).json()
        for s in steps
    }
    history = {
        row["step"]: row
        for row in httpx.get(f"{base}/v1/runs/{run_id}/entropy", timeout=60).json()["steps"]
    }
    # the run holds every kind of step the pages tell apart
    assert [entropy[s]["taylor"]["regime"] for s in steps] == [
        "first_order",
        "unknown",
        "first_order",
        "second_order",
        "outside",
    ]
    assert entropy[0]["ratio_interval"]["estimable"] and entropy[0]["ratio_interval"]["low"]
    assert entropy[0]["realized"]["se"] is not None and entropy[0]["taylor"]["kl"] is not None
    assert entropy[1]["realized"]["source"] == "posted" and entropy[1]["realized"]["se"] is None
    assert entropy[2]["ratio"] is not None and entropy[2]["ratio_interval"]["estimable"] is False
    # the history's rows are the step answers' fields, flattened (what the page merges)
    for s in steps:
        assert ratio_text(history[s]) == ratio_text(flat_ratio(entropy[s])), s
    step = 0  # the step page: realized with its s.e., KL, a ratio with its interval
    spectrum = httpx.get(f"{base}/v1/runs/{run_id}/steps/{step}/kernel/spectrum", timeout=60).json()
    blocks = httpx.get(f"{base}/v1/runs/{run_id}/steps/{step}/kernel/blocks", timeout=60).json()
    diagonal = httpx.get(f"{base}/v1/runs/{run_id}/steps/{step}/kernel/diagonal", timeout=60).json()

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            # bypass_csp: wait_for_function evaluates its string predicates inside the page,
            # which the page's policy refuses; the pages under their policy are checked in
            # test_every_page_loads_its_modules_without_console_errors
            page = browser.new_page(viewport={"width": 1280, "height": 800}, bypass_csp=True)
            page.on("console", console_errors(errors))
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))

            def count(selector: str) -> int:
                return int(page.locator(selector).count())

            def tips(selector: str) -> list[str]:
                found: list[str] = page.eval_on_selector_all(
                    f"{selector} title", "els => els.map(e => e.textContent)"
                )
                return found

            def n_steps(predicate: Any) -> int:
                return sum(bool(predicate(entropy[s])) for s in steps)

            # ---- runs list
            page.goto(f"{base}/?poll=500")
            page.wait_for_selector(f"a[href='#/runs/{run_id}']")
            last_step = page.locator("td[data-key=last]").first.inner_text()
            assert last_step == str(FIRST_STEPS - 1)
            assert f"gaussian k={K} seed=7" in page.locator("td[data-key=spec]").first.inner_text()

            # ---- run page
            page.goto(f"{base}/?poll=500#/runs/{run_id}")
            pred = "[data-chart=entropy] circle.pt[data-series=predicted]"
            page.wait_for_function(f"document.querySelectorAll('{pred}').length === {FIRST_STEPS}")
            assert count("[data-chart=entropy] circle.pt[data-series=realized]") == FIRST_STEPS
            assert count("[data-chart=entropy] circle.pt[data-series=applied]") == FIRST_STEPS
            n_baseline = n_steps(lambda e: e["cov_baseline"] is not None)
            assert n_baseline == FIRST_STEPS
            assert count("[data-chart=baseline] circle.pt[data-series=baseline]") == n_baseline
            assert count("[data-chart=step-norm] circle.pt[data-series=step-norm]") == FIRST_STEPS
            assert count("[data-chart=entropy] g.errbar[data-series=predicted]") == FIRST_STEPS
            # realized ± 2 s.e. where the service estimated it (a posted change has no s.e.)
            n_real_se = n_steps(lambda e: e["realized"]["se"] is not None)
            assert n_real_se == 4
            assert count("[data-chart=entropy] g.errbar[data-series=realized]") == n_real_se
            n_h2 = n_steps(lambda e: e["delta_h1_plus_h2"] is not None)
            assert count("[data-chart=entropy] circle.pt[data-series=second-order]") == n_h2
            n_noise = n_steps(lambda e: e["noise_scale"]["b_simple"] is not None)
            assert count("[data-chart=noise] circle.pt[data-series=noise]") == n_noise
            # the drawn predicted values are the API's (tooltips carry them)
            for s, tip in zip(steps, tips(pred), strict=True):
                assert tip.startswith(f"step {s}: dH1 = "), tip
            # the ratio: a point with its interval only where it is estimable and inside the
            # Taylor regime; the not-estimable step and the outside step get their markers
            shown = [
                s
                for s in steps
                if entropy[s]["taylor"]["regime"] != "outside"
                and entropy[s]["ratio_interval"]["estimable"]
            ]
            first = [s for s in shown if entropy[s]["taylor"]["regime"] != "second_order"]
            second = [s for s in shown if entropy[s]["taylor"]["regime"] == "second_order"]
            assert first == [0, 1] and second == [3]
            ratio_pts = "[data-chart=ratio] .pt[data-series=ratio]"
            assert tips(ratio_pts) == [
                f"step {s}: realized / dH1 = {ratio_text(flat_ratio(entropy[s]))}" for s in first
            ]
            assert count("[data-chart=ratio] g.errbar[data-series=ratio]") == len(first)
            second_pts = "[data-chart=ratio] rect.pt[data-series=ratio-second-order]"
            assert tips(second_pts) == [
                f"step {s}: realized / dH1 = {ratio_text(flat_ratio(entropy[s]))}" for s in second
            ]
            assert tips(second_pts)[0].endswith("(2nd order)")
            assert count("[data-chart=ratio] g.errbar[data-series=ratio-second-order]") == 1
            not_est = tips("[data-chart=ratio] .flag[data-series=not-estimable]")
            assert len(not_est) == 1 and not_est[0].startswith("step 2: ratio not estimable")
            outside = tips("[data-chart=ratio] .flag[data-series=outside]")
            assert len(outside) == 1 and outside[0].startswith("step 4: outside the Taylor")
            legend = page.locator("[data-chart=ratio] .legend").inner_text()
            assert "not estimable" in legend and "outside Taylor regime" in legend
            subtitle = page.locator("[data-chart=ratio] .sub").inner_text()
            assert "Fieller interval at ±2 s.e." in subtitle
            # the step's KL with ±2 s.e. and the two thresholds of the Taylor regimes
            n_kl = n_steps(lambda e: e["taylor"]["kl"] is not None)
            assert n_kl == 4
            assert count("[data-chart=kl] circle.pt[data-series=kl]") == n_kl
            n_kl_se = n_steps(lambda e: e["taylor"]["kl_se"] is not None)
            assert count("[data-chart=kl] g.errbar[data-series=kl]") == n_kl_se
            assert count("[data-chart=kl] line.ref") == 2
            legend = page.locator("[data-chart=kl] .legend").inner_text()
            assert "first-order limit 0.03" in legend and "second-order limit 0.3" in legend
            for s, tip in zip([0, 2, 3, 4], tips("[data-chart=kl] .pt"), strict=True):
                assert tip.startswith(f"step {s}: KL = "), tip
            # the steps table: realized ± s.e., the ratio as the report writes it, KL, regime
            cells = page.eval_on_selector_all(
                "[data-chart=steps] tbody tr",
                """trs => trs.map(tr => Object.fromEntries([...tr.querySelectorAll('td')].map(
                    td => [td.dataset.key, {text: td.innerText, value: td.dataset.value}])))""",
            )
            assert len(cells) == FIRST_STEPS
            for row in cells:
                s = int(row["step"]["text"])
                e, h = entropy[s], history[s]
                assert row["ratio"]["text"] == ratio_text(h), (s, row["ratio"])
                assert float(row["realized"]["value"]) == pytest.approx(e["realized"]["delta_h"])
                assert ("±" in row["realized"]["text"]) == (e["realized"]["se"] is not None)
                kl = e["taylor"]["kl"]
                assert (row["kl"]["value"] is None) == (kl is None), (s, row["kl"])
                if kl is not None:
                    assert float(row["kl"]["value"]) == pytest.approx(kl)
                    assert "±" in row["kl"]["text"]
                label = REGIME_LABELS[e["taylor"]["regime"]]
                assert row["regime"]["text"] == label, (s, row["regime"])
            for w, h in VIEWPORTS:
                page.set_viewport_size({"width": w, "height": h})
                page.wait_for_timeout(400)  # the resize redraw is debounced by 150 ms
                assert page.evaluate(OVERLAPS_JS) == []
                page.screenshot(path=str(ARTIFACTS / f"run-{w}x{h}.png"), full_page=True)
            page.set_viewport_size({"width": 1280, "height": 800})

            # ---- a new step pushed now appears without a reload
            page.evaluate("window.__no_reload_marker = 42")
            live = FIRST_STEPS
            push_step(base, run_id, live)
            post_realized(base, run_id, live)
            page.wait_for_function(
                f"document.querySelectorAll('{pred}').length === {live + 1}", timeout=90_000
            )
            # the realized change, posted after the step was analysed, follows on a later poll
            real = "[data-chart=entropy] circle.pt[data-series=realized]"
            page.wait_for_function(
                f"document.querySelectorAll('{real}').length === {live + 1}", timeout=90_000
            )
            ratio_sel = "[data-chart=ratio] .pt[data-series=ratio]"
            page.wait_for_function(
                f"document.querySelectorAll('{ratio_sel}').length === {len(first) + 1}",
                timeout=90_000,
            )
            assert page.evaluate("window.__no_reload_marker") == 42

            # ---- step page
            page.goto(f"{base}/?poll=500#/runs/{run_id}/steps/{step}")
            page.wait_for_selector("[data-chart=sequences] tbody tr")
            # this run pushed no token shares: the tokens card is one line
            hint = page.locator("[data-card=tokens] #tokens-none").inner_text()
            assert hint.startswith("No token shares at this step")
            assert count("[data-card=tokens] table") == 0
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

            # the headline numbers: realized ± s.e. with its estimator and the SNIS value, the
            # ratio with its interval, KL ± s.e. and the regime
            def kpi(key: str) -> dict[str, Any]:
                found: dict[str, Any] = page.eval_on_selector(
                    f"[data-kpi={key}]",
                    """k => ({value: k.dataset.value, se: k.dataset.se,
                        text: k.querySelector('.kpi-v').innerText,
                        label: k.querySelector('.kpi-k').innerText,
                        note: (k.querySelector('.kpi-n') || {}).innerText || ''})""",
                )
                return found

            realized = kpi("realized")
            assert float(realized["value"]) == pytest.approx(e["realized"]["delta_h"])
            assert float(realized["se"]) == pytest.approx(e["realized"]["se"])
            assert "± 1 s.e." in realized["label"] and "±" in realized["text"]
            assert e["realized"]["estimator"].replace("_", " ") in realized["note"]
            assert "SNIS" in realized["note"] and e["realized"]["delta_h_snis"] is not None
            # dH1 names its estimator and how grad H was estimated (math.md §3)
            assert f"estimator {e['estimator']}" in kpi("dh1")["note"]
            assert "from the score rows" in kpi("dh1")["note"]
            assert e["entropy_gradient"] == "score"
            ratio = kpi("ratio")
            assert ratio["text"] == ratio_text(flat_ratio(e)) and "[" in ratio["text"]
            assert "Fieller" in ratio["note"]
            kl = kpi("kl")
            assert float(kl["value"]) == pytest.approx(e["taylor"]["kl"])
            assert float(kl["se"]) == pytest.approx(e["taylor"]["kl_se"])
            assert kpi("regime")["text"] == REGIME_LABELS[e["taylor"]["regime"]]
            assert float(kpi("dh1-dh2")["value"]) == pytest.approx(e["delta_h1_plus_h2"])
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

            # ---- the flagged steps: the flag instead of a ratio, the regime with its reasons
            for s, flag in ((2, "not estimable"), (4, "outside Taylor")):
                page.goto(f"{base}/?poll=500#/runs/{run_id}/steps/{s}")
                page.wait_for_selector("[data-kpi=ratio]")
                assert kpi("ratio")["text"] == flag == ratio_text(flat_ratio(entropy[s]))
                regime = kpi("regime")
                assert regime["text"] == REGIME_LABELS[entropy[s]["taylor"]["regime"]]
                for reason in entropy[s]["taylor"]["reasons"]:
                    assert reason in regime["note"]
                assert page.evaluate(OVERLAPS_JS) == []
            page.screenshot(path=str(ARTIFACTS / "step-outside-1280x800.png"), full_page=True)

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
def test_target_switch_shows_the_token_mean(dashboard_service: LiveService) -> None:
    """The run and step pages' target switch: under ``token_mean`` every drawn value, table
    cell and headline number is the API's ``?target=token_mean`` answer, the labels say nats
    per token, the target rides in the address (a link reproduces the view), and switching back
    shows the sequence entropy's numbers again."""
    from playwright.sync_api import sync_playwright

    base = dashboard_service.base_url
    run_id = "browser-tokens"
    create_run(base, run_id)
    for step in TOKEN_PLANS:
        push_step(base, run_id, step, TOKEN_PLANS)
    for step in TOKEN_PLANS:
        wait_ready(base, run_id, step)
    url = f"{base}/v1/runs/{run_id}"
    answer = {
        target: {
            s: httpx.get(f"{url}/steps/{s}/entropy?wait=30&target={target}", timeout=60).json()
            for s in TOKEN_PLANS
        }
        for target in ("sequence", "token_mean")
    }
    history = {
        target: {
            row["step"]: row
            for row in httpx.get(f"{url}/entropy?target={target}", timeout=60).json()["steps"]
        }
        for target in ("sequence", "token_mean")
    }
    tm, seq = answer["token_mean"], answer["sequence"]
    # the run holds what the switch tells apart: T realized from the entropy sums (0, 1), T
    # predicted only (2, no sums); the sequence entropy realized at every step
    assert all(tm[s]["target"] == "token_mean" for s in TOKEN_PLANS)
    assert [tm[s]["realized"] and tm[s]["realized"]["source"] for s in TOKEN_PLANS] == [
        "entropy_sum",
        "entropy_sum",
        None,
    ]
    assert [seq[s]["realized"]["source"] for s in TOKEN_PLANS] == [
        "entropy_sum",
        "entropy_sum",
        "logprob_after",
    ]
    assert all(tm[s]["delta_h1"] != seq[s]["delta_h1"] for s in TOKEN_PLANS)
    assert all(tm[s]["delta_h1_plus_h2"] is None for s in TOKEN_PLANS)
    n = len(TOKEN_PLANS)

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            # bypass_csp: see test_dashboard_pages_render_sort_and_update_live
            page = browser.new_page(viewport={"width": 1280, "height": 800}, bypass_csp=True)
            page.on("console", console_errors(errors))
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))

            def count(selector: str) -> int:
                return int(page.locator(selector).count())

            def drawn(series: str) -> dict[int, float]:
                """The entropy chart's points of ``series``: step -> value drawn."""
                found: list[list[str]] = page.eval_on_selector_all(
                    f"[data-chart=entropy] .pt[data-series={series}]",
                    "els => els.map(e => [e.dataset.x, e.dataset.y])",
                )
                return {int(x): float(y) for x, y in found}

            def current() -> str:
                return str(
                    page.get_attribute("#target-switch a[aria-current]", "data-target") or ""
                )

            def switch(target: str) -> None:
                page.click(f"#target-switch a[data-target={target}]")
                page.wait_for_selector(f"#target-switch a[data-target={target}][aria-current]")

            def text(selector: str) -> str:
                return str(page.locator(selector).inner_text())

            def svg_text(selector: str) -> str:  # SVG elements have no innerText
                return str(page.locator(selector).text_content())

            def check_run_page(target: str) -> None:
                want = answer[target]
                pred = "[data-chart=entropy] .pt[data-series=predicted]"
                page.wait_for_function(f"document.querySelectorAll('{pred}').length === {n}")
                assert current() == target
                assert drawn("predicted") == pytest.approx({s: want[s]["delta_h1"] for s in want})
                realized = {s: e["realized"]["delta_h"] for s, e in want.items() if e["realized"]}
                assert drawn("realized") == pytest.approx(realized)
                n_se = sum(bool(e["realized"] and e["realized"]["se"]) for e in want.values())
                assert count("[data-chart=entropy] g.errbar[data-series=realized]") == n_se
                applied = {s: e["delta_h1_applied"] for s, e in want.items()}
                assert drawn("applied") == pytest.approx(applied)
                second = {
                    s: e["delta_h1_plus_h2"]
                    for s, e in want.items()
                    if e["delta_h1_plus_h2"] is not None
                }
                assert drawn("second-order") == pytest.approx(second)
                # the ratio's flags name the target's prediction
                d1 = "dT1" if target == "token_mean" else "dH1"
                flags: list[str] = page.eval_on_selector_all(
                    "[data-chart=ratio] .flag[data-series=not-estimable] title",
                    "els => els.map(e => e.textContent)",
                )
                noise = [
                    s
                    for s, e in want.items()
                    if e["ratio"] is not None
                    and e["ratio_interval"]["estimable"] is False
                    and e["taylor"]["regime"] != "outside"
                ]
                assert [f.split(",")[0] for f in flags] == [
                    f"step {s}: ratio not estimable" for s in noise
                ]
                assert all(f"|{d1}| = " in f for f in flags), flags
                unit = "nats per token" if target == "token_mean" else "nats per response"
                assert unit in text("[data-chart=entropy] h3")
                assert unit in svg_text("[data-chart=entropy] svg .axis-label >> nth=1")
                cells = page.eval_on_selector_all(
                    "[data-chart=steps] tbody tr",
                    """trs => trs.map(tr => Object.fromEntries([...tr.querySelectorAll('td')].map(
                        td => [td.dataset.key, {text: td.innerText, value: td.dataset.value,
                        href: (td.querySelector('a') || {}).hash}])))""",
                )
                assert len(cells) == n
                for row in cells:
                    s = int(row["step"]["text"])
                    h = history[target][s]
                    assert h["target"] == target
                    assert row["step"]["href"] == f"#/runs/{run_id}/steps/{s}?target={target}"
                    assert float(row["dh1"]["value"]) == pytest.approx(want[s]["delta_h1"])
                    assert float(row["dh1"]["value"]) == pytest.approx(h["delta_h1"])
                    if h["realized"] is None:
                        assert row["realized"]["value"] is None and row["realized"]["text"] == "–"
                    else:
                        assert float(row["realized"]["value"]) == pytest.approx(h["realized"])
                        assert "±" in row["realized"]["text"]
                    # no ratio: the page's dash for a missing number, the report's em dash
                    cell = ratio_text(h).replace("—", "–")
                    assert row["ratio"]["text"] == cell, (s, row["ratio"])
                header = text("[data-chart=steps] th[data-key=dh1]")
                assert header.startswith(
                    "dT1 (nats/token)" if target == "token_mean" else "dH1 (nats)"
                ), header

            # ---- run page: the sequence entropy by default, then the token mean
            page.goto(f"{base}/?poll=500#/runs/{run_id}")
            check_run_page("sequence")
            switch("token_mean")
            assert page.url.endswith(f"#/runs/{run_id}?target=token_mean")
            check_run_page("token_mean")
            assert "dT1 + dT2" not in text("[data-chart=entropy] .legend")
            for w, h in VIEWPORTS:
                page.set_viewport_size({"width": w, "height": h})
                page.wait_for_timeout(400)
                assert page.evaluate(OVERLAPS_JS) == []
                page.screenshot(path=str(ARTIFACTS / f"run-token-mean-{w}x{h}.png"), full_page=True)
            page.set_viewport_size({"width": 1280, "height": 800})
            # a link reproduces the view: the address alone, in a fresh page
            other = browser.new_page(viewport={"width": 1280, "height": 800}, bypass_csp=True)
            other.goto(page.url)
            other.wait_for_selector("#target-switch a[data-target=token_mean][aria-current]")
            other.wait_for_selector("[data-chart=entropy] .pt[data-series=predicted]")
            first = other.get_attribute("[data-chart=entropy] .pt[data-series=predicted]", "data-y")
            assert float(first or "nan") == pytest.approx(tm[0]["delta_h1"])
            other.close()

            # ---- step page, opened from the table: it keeps the target
            page.click("[data-chart=steps] td[data-key=step] a[href$='/steps/0?target=token_mean']")
            page.wait_for_selector("[data-chart=sequences] tbody tr")
            assert page.url.endswith(f"#/runs/{run_id}/steps/0?target=token_mean")
            assert current() == "token_mean"
            crumb = page.get_attribute(f"#crumbs a[href^='#/runs/{run_id}']", "href")
            assert crumb == f"#/runs/{run_id}?target=token_mean"

            def kpi(key: str) -> dict[str, Any]:
                found: dict[str, Any] = page.eval_on_selector(
                    f"[data-kpi={key}]",
                    """k => ({value: k.dataset.value, se: k.dataset.se,
                        text: k.querySelector('.kpi-v').innerText,
                        label: k.querySelector('.kpi-k').innerText,
                        note: (k.querySelector('.kpi-n') || {}).innerText || ''})""",
                )
                return found

            def check_step_page(e: dict[str, Any], target: str) -> None:
                unit = "nats per token" if target == "token_mean" else "nats per response"
                dh1 = kpi("dh1")
                assert float(dh1["value"]) == pytest.approx(e["delta_h1"])
                se = float(np.hypot(e["se_sampling"], e["se_sketch"]))
                assert float(dh1["se"]) == pytest.approx(se)
                assert unit in dh1["label"]
                assert dh1["label"].startswith("dT1" if target == "token_mean" else "dH1")
                realized = kpi("realized")
                assert unit in realized["label"]
                if e["realized"] is None:
                    assert realized["value"] is None and realized["text"] == "–"
                else:
                    assert float(realized["value"]) == pytest.approx(e["realized"]["delta_h"])
                    assert float(realized["se"]) == pytest.approx(e["realized"]["se"])
                assert "entropy_sum" in realized["note"]
                assert kpi("ratio")["text"] == ratio_text(flat_ratio(e)).replace("—", "–")
                applied = kpi("applied")
                assert float(applied["value"]) == pytest.approx(e["delta_h1_applied"])
                assert float(applied["se"]) == pytest.approx(e["se_applied"])
                assert e["se_applied"] > 0
                bars = page.eval_on_selector_all(
                    "[data-chart=pairs] rect.hbar",
                    "els => els.map(e => [e.dataset.label, Number(e.dataset.value)])",
                )
                pairs = {
                    k.replace("_", " "): v["value"]
                    for k, v in e["decomposition"]["pair_types"].items()
                    if v["value"] is not None
                }
                assert dict(bars) == pytest.approx(pairs)
                assert unit in svg_text("[data-chart=pairs] svg .axis-label")
                cells = page.locator("[data-chart=sequences] tbody td[data-key=contribution]")
                shown = sorted(
                    float(cells.nth(i).get_attribute("data-value") or "nan")
                    for i in range(cells.count())
                )
                contributions = [
                    p["a"] if p["a"] is not None else p["b"]
                    for p in e["per_sequence"]
                    if p["a"] is not None or p["b"] is not None
                ]
                assert len(contributions) <= 100  # the table shows them all
                assert shown == pytest.approx(sorted(contributions))

            check_step_page(tm[0], "token_mean")
            second = kpi("dh1-dh2")
            assert second["value"] is None and "not derived" in second["note"]
            assert "T " in kpi("realized")["note"]  # the levels of T before and after
            for w, h in VIEWPORTS:
                page.set_viewport_size({"width": w, "height": h})
                page.wait_for_timeout(400)
                assert page.evaluate(OVERLAPS_JS) == []
                page.screenshot(
                    path=str(ARTIFACTS / f"step-token-mean-{w}x{h}.png"), full_page=True
                )
            page.set_viewport_size({"width": 1280, "height": 800})

            # ---- back to the sequence entropy on the step page
            switch("sequence")
            assert page.url.endswith(f"#/runs/{run_id}/steps/0?target=sequence")
            page.wait_for_selector("[data-chart=sequences] tbody tr")
            check_step_page(seq[0], "sequence")
            assert float(kpi("dh1-dh2")["value"]) == pytest.approx(seq[0]["delta_h1_plus_h2"])

            # ---- a step without entropy sums: T is predicted, its realized change is missing
            page.goto(f"{base}/?poll=500#/runs/{run_id}/steps/2?target=token_mean")
            page.wait_for_selector("[data-chart=sequences] tbody tr")
            check_step_page(tm[2], "token_mean")
        finally:
            browser.close()
    assert errors == [], errors


RGB_RE = re.compile(r"rgb\((\d+), (\d+), (\d+)\)")


@needs_browser
@pytest.mark.browser
@pytest.mark.timeout(300)
def test_tokens_card_and_sequence_view(dashboard_service: LiveService) -> None:
    """A step with token shares: the step page's tokens card lists the API's top tokens down
    and up (sequence, position, text, share, covariance score) and its covariance comparison,
    also under a KL-Cov ratio the user types in (kept through a redraw before it is applied:
    before, the redraw on a resize reset it, and the test failed when the resize of its
    full-page screenshot landed between typing and the click); a click on a token opens its
    sequence's view, whose tokens carry the API's text (or id), share, colour side (vermillion
    down, blue up), hover text and covariance bar, under a legend of the scale's values.  The
    pages run under their Content-Security-Policy and log no console error."""
    from playwright.sync_api import sync_playwright

    base = dashboard_service.base_url
    run_id = "browser-shares"
    create_run(base, run_id)
    push_step(base, run_id, 0)
    wait_ready(base, run_id, 0)
    pushed = push_token_shares(base, run_id, 0)["sequences"]
    url = f"{base}/v1/runs/{run_id}/steps/0/tokens"
    tokens = httpx.get(url, timeout=30).json()
    assert tokens["num_tokens"] == sum(len(p["shares"]) for p in pushed)
    assert tokens["covariance"]["k"] == 1  # verl's ratio on a small run
    ratio = 0.05
    wider = httpx.get(f"{url}?kl_cov_ratio={ratio}", timeout=30).json()
    assert wider["covariance"]["k"] == int(tokens["num_tokens"] * ratio) > 1

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))

            def cells(side: str, key: str, attr: str | None = None) -> list[Any]:
                sel = f"[data-card=tokens] [data-side={side}] tbody td[data-key={key}]"
                if attr is None:
                    found: list[Any] = page.eval_on_selector_all(
                        sel, "els => els.map(e => e.textContent)"
                    )
                else:
                    found = page.eval_on_selector_all(
                        sel, f"els => els.map(e => Number(e.getAttribute('{attr}')))"
                    )
                return found

            def check_card(answer: dict[str, Any]) -> None:
                for side in ("down", "up"):
                    rows = answer[side]
                    assert rows and len(rows) == 20
                    text = [
                        r["token"] if r["token"] is not None else f"#{r['token_id']}" for r in rows
                    ]
                    assert cells(side, "sequence_id") == [r["sequence_id"] for r in rows]
                    assert cells(side, "position", "data-value") == [r["position"] for r in rows]
                    assert cells(side, "token") == text
                    assert cells(side, "share", "data-value") == [r["share"] for r in rows]
                    assert cells(side, "cov_score", "data-value") == [r["cov_score"] for r in rows]
                assert all(r["share"] < 0 for r in answer["down"])
                cov = answer["covariance"]
                for key, field in [
                    ("precision", "precision_at_k"),
                    ("spearman", "spearman"),
                    ("selected", "selected_share"),
                    ("clip", "clip_candidates"),
                    ("clip-share", "clip_candidate_share"),
                ]:
                    kpi = page.locator(f"[data-card=tokens] [data-kpi={key}]")
                    assert float(kpi.get_attribute("data-value") or "nan") == cov[field], key
                precision = page.locator("[data-card=tokens] [data-kpi=precision]").inner_text()
                assert f"precision at k = {cov['k']}" in precision
                assert f"ratio {cov['kl_cov_ratio']} of {cov['num_tokens']}" in precision

            # ---- the step page's tokens card, at verl's ratio and at one typed in
            page.goto(f"{base}/?poll=500#/runs/{run_id}/steps/0")
            page.wait_for_selector("[data-card=tokens] [data-side=up] tbody tr")
            check_card(tokens)
            page.screenshot(path=str(ARTIFACTS / "step-tokens-1280x800.png"), full_page=True)
            # the full-page screenshot resizes the page, which redraws it 150 ms later: typing
            # into the field while it is replaced would mix old and new text
            page.wait_for_timeout(400)
            page.fill("#kl-cov-ratio", str(ratio))
            # a redraw after the user typed (a resize) keeps the typed ratio and the focus
            page.evaluate("window.dispatchEvent(new Event('resize'))")
            page.wait_for_timeout(400)
            assert page.input_value("#kl-cov-ratio") == str(ratio)
            assert page.evaluate("document.activeElement.id") == "kl-cov-ratio"
            page.click(".ratio-form button")
            page.wait_for_selector(
                f"[data-kpi=precision] >> text=precision at k = {wider['covariance']['k']}"
            )
            assert page.url.endswith(f"?target=sequence&kl_cov_ratio={ratio}")
            check_card(wider)

            # ---- a click on the down table's first token opens its sequence
            first = wider["down"][0]
            page.click("[data-card=tokens] [data-side=down] tbody tr >> nth=0 >> a.tok-cell")
            page.wait_for_selector(".tokens-text .tok")
            assert f"/sequences/{first['sequence_id']}?" in page.url
            assert f"kl_cov_ratio={ratio}" in page.url
            for sid in (first["sequence_id"], pushed[-1]["id"]):
                if sid != first["sequence_id"]:
                    page.goto(f"{base}/?poll=500#/runs/{run_id}/steps/0/sequences/{sid}")
                    page.wait_for_selector(f"[data-card=sequence] h2 >> text=Sequence {sid}")
                    page.wait_for_selector(".tokens-text .tok")
                answer = httpx.get(f"{url}?sequence={sid}&top=1", timeout=30).json()
                seq = answer["sequence"]
                stored = next(p for p in pushed if p["id"] == sid)
                assert [t["share"] for t in seq] == stored["shares"]
                shown = page.eval_on_selector_all(
                    ".tokens-text .tok",
                    """els => els.map(e => ({
                        text: e.querySelector('.tok-text').textContent,
                        share: Number(e.dataset.share),
                        cov: Number(e.dataset.cov),
                        side: e.dataset.side,
                        title: e.getAttribute('title'),
                        colour: getComputedStyle(e.querySelector('.tok-text')).backgroundColor,
                        bar: e.querySelector('.cov-bar').getBoundingClientRect().height,
                    }))""",
                )
                assert len(shown) == len(seq)
                bars = max(b["bar"] for b in shown)
                max_cov = max(abs(t["cov_score"]) for t in seq)
                for got, want in zip(shown, seq, strict=True):
                    text = want["token"] if want["token"] is not None else f"#{want['token_id']}"
                    assert got["text"] == text
                    assert got["share"] == want["share"] and got["cov"] == want["cov_score"]
                    r, _, b = (int(v) for v in RGB_RE.fullmatch(got["colour"]).groups())  # type: ignore[union-attr]
                    if want["share"] < 0:
                        assert got["side"] == "down" and r > b, got
                    elif want["share"] > 0:
                        assert got["side"] == "up" and b > r, got
                    assert f"share {js_fmt(want['share'])} nats" in got["title"]
                    assert f"covariance score {js_fmt(want['cov_score'])}" in got["title"]
                    assert f"log-prob {js_fmt(want['logprob'])}" in got["title"]
                    assert f"position {want['position']} of {sid}" in got["title"]
                    # the bar's height is the score's size against the sequence's largest
                    assert got["bar"] == pytest.approx(
                        bars * abs(want["cov_score"]) / max_cov, abs=2.5
                    )
                # the legend: from -max to +max |share| of the step, vermillion to blue
                scale = max(
                    abs(answer["down"][0]["share"]),
                    abs(answer["up"][0]["share"]),
                    *(abs(t["share"]) for t in seq),
                )
                legend = page.eval_on_selector_all(
                    ".share-legend-item",
                    """els => els.map(e => [e.querySelector('.share-legend-cell'), e]).map(
                      ([c, e]) => ({
                        value: Number(c.dataset.value),
                        label: e.querySelector('.share-legend-label').textContent,
                        colour: getComputedStyle(c).backgroundColor,
                    }))""",
                )
                assert [x["value"] for x in legend] == pytest.approx(
                    [scale * t for t in (-1, -0.75, -0.5, -0.25, 0, 0.25, 0.5, 0.75, 1)]
                )
                assert [x["label"] for x in legend][::4] == [js_fmt(-scale), "0", js_fmt(scale)]
                assert legend[0]["colour"] == "rgb(213, 94, 0)"
                assert legend[4]["colour"] == "rgb(255, 255, 255)"
                assert legend[-1]["colour"] == "rgb(0, 114, 178)"
                ends = page.locator(".share-legend-end").all_inner_texts()
                assert ends == ["pushes entropy down ←", "→ pushes entropy up"]
                name = "sequence" if sid == first["sequence_id"] else "sequence-ids"
                page.screenshot(path=str(ARTIFACTS / f"{name}-1280x800.png"), full_page=True)
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
                urls: list[str] = []
                page.on("request", lambda r: urls.append(r.url))
                page.goto(f"{base}/?poll=500")
                page.wait_for_selector("text=needs an API token")
                page.fill("#token-input", token)
                page.click("#token-form button")
                page.wait_for_selector("a[href='#/runs/token-run']")
                stored = page.evaluate("[sessionStorage.length, localStorage.length]")
                assert stored == [1, 0]  # this tab's session only
                # a token in the address (an old link) is dropped from it and not used: the
                # token stays out of URLs, hence out of access logs and history
                other = browser.new_context().new_page()
                other.on("request", lambda r: urls.append(r.url))
                other.goto(f"{base}/?poll=500&token={token}#/runs/token-run")
                other.wait_for_selector("text=needs an API token")
                assert token not in other.url and other.url.endswith("/?poll=500#/runs/token-run")
                # no request carried it but the one navigation we typed it into
                assert sum(token in u for u in urls) == 1
            finally:
                browser.close()
    # the only console errors are the browser's own notes of the 401 answers before the token
    assert errors and all("401" in e for e in errors), errors
