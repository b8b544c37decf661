"""Security: the token guards every ``/v1`` operation of the live OpenAPI schema; no pickle or
eval on any input path (a source scan); request ids in responses, problem bodies and log
records; ``kernelscope serve`` refuses a non-loopback bind without a token.

The dashboard sending the token is tested in ``test_dashboard.py``
(``test_dashboard_sends_the_token_the_user_gives``).
"""

from __future__ import annotations

import ast
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from service.app import create_app
from service.cli import app as cli_app
from service.cli import is_loopback
from service.settings import Settings
from tests.service.conftest import OCTET, REPO, free_port

TOKEN = "s3cret-token"
PATH_VALUES = {"run_id": "r1", "step": "0"}


def v1_operations(client: TestClient) -> list[tuple[str, str]]:
    """Every ``(method, path)`` under ``/v1`` of the app's own ``/openapi.json``."""
    schema = client.get("/openapi.json").json()
    ops = [
        (method.upper(), re.sub(r"\{(\w+)\}", lambda m: PATH_VALUES[m.group(1)], path))
        for path, item in schema["paths"].items()
        if path.startswith("/v1")
        for method in item
    ]
    assert len(ops) >= 15  # the contract table of architecture.md
    return ops


def problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    return body


@pytest.fixture
def secured(settings: Settings) -> Any:
    with TestClient(create_app(settings.model_copy(update={"token": TOKEN}))) as c:
        yield c


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer wrong", f"Basic {TOKEN}", f"Bearer {TOKEN}x", f"{TOKEN}"],
)
def test_every_v1_operation_refuses_a_missing_or_wrong_token(
    secured: TestClient, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    for method, path in v1_operations(secured):
        # a body that would be valid or not: the token is checked before it is read
        r = secured.request(method, path, headers={**headers, **OCTET}, content=b"{}")
        body = problem(r, 401)
        assert r.headers["www-authenticate"].startswith("Bearer"), (method, path)
        assert body["request_id"] == r.headers["x-request-id"]
    # the right token gets through (to a 404 of the unknown run, or the empty list)
    ok = {"Authorization": f"Bearer {TOKEN}"}
    assert secured.get("/v1/runs", headers=ok).json() == []
    assert secured.get("/v1/runs/r1", headers=ok).status_code == 404
    # the open routes stay open
    for path in ("/healthz", "/metrics", "/", "/openapi.json"):
        assert secured.get(path).status_code == 200, path


# ------------------------------------------------------------- no pickle, no eval
INPUT_PATH_PACKAGES = ("service", "sketch", "clients")
BANNED_CALLS = {"eval", "exec", "compile", "__import__", "input"}
BANNED_MODULES = {"pickle", "cPickle", "dill", "marshal", "shelve", "cloudpickle", "joblib"}
BANNED_ATTRS = {
    ("torch", "load"),  # unpickles unless weights_only: the service never needs it
    ("yaml", "load"),
    ("yaml", "unsafe_load"),
    ("numpy", "load"),  # only with allow_pickle=True, checked below
}


def _violations(path: Path, source: str | None = None) -> list[str]:
    """What the scan flags in ``path`` (or in ``source``, named after ``path``)."""
    text = path.read_text() if source is None else source
    tree = ast.parse(text, filename=str(path))
    name = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    found = []
    for node in ast.walk(tree):
        where = f"{name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] + (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            )
            found += [f"{where} imports {n}" for n in names if n.split(".")[0] in BANNED_MODULES]
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in BANNED_CALLS:
                found.append(f"{where} calls {func.id}()")
            if isinstance(func, ast.Attribute):
                if func.attr in {"load", "loads"} and any(
                    isinstance(k.value, ast.Constant) and k.value.value is True
                    for k in node.keywords
                    if k.arg == "allow_pickle"
                ):
                    found.append(f"{where} loads with allow_pickle=True")
                base = func.value
                if isinstance(base, ast.Name) and (base.id, func.attr) in BANNED_ATTRS - {
                    ("numpy", "load")
                }:
                    found.append(f"{where} calls {base.id}.{func.attr}()")
                if (
                    func.attr in {"loads", "load"}
                    and isinstance(base, ast.Name)
                    and base.id in BANNED_MODULES
                ):
                    found.append(f"{where} calls {base.id}.{func.attr}()")
    return found


def test_the_security_scan_writes_nothing_into_the_tree(monkeypatch: pytest.MonkeyPatch) -> None:
    """The scan's self-check used to write a probe file into tests/ (a read-only checkout
    failed, and a concurrent run could pick the file up)."""
    real = Path.write_text

    def write_text(path: Path, *args: Any, **kwargs: Any) -> int:
        assert not path.resolve().is_relative_to(REPO), f"writes {path} into the tree"
        return real(path, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    test_no_pickle_or_eval_on_input_paths()


def test_no_pickle_or_eval_on_input_paths() -> None:
    files = [p for pkg in INPUT_PATH_PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))]
    assert len(files) > 20
    violations = [v for f in files for v in _violations(f)]
    assert violations == []
    # the scan finds what it looks for (in memory: nothing is written into the tree)
    probe = (
        "import pickle\nimport numpy as np\nimport torch\n"
        "eval('1')\ntorch.load('x')\nnp.load('x', allow_pickle=True)\npickle.loads(b'')\n"
    )
    assert len(_violations(Path("probe.py"), probe)) == 5
    # and the JavaScript of the dashboard (its ES modules) neither evaluates strings
    modules = sorted((REPO / "service" / "static").glob("*.js"))
    assert len(modules) > 1
    for js in modules:
        assert not re.search(r"\beval\s*\(|new\s+Function\s*\(", js.read_text()), js.name


# --------------------------------------------------------------------- request ids
def test_request_id_is_kept_or_made_and_returned(client: TestClient) -> None:
    r = client.get("/v1/runs/nope", headers={"X-Request-ID": "trainer-7:step-3"})
    assert r.headers["x-request-id"] == "trainer-7:step-3"
    assert problem(r, 404)["request_id"] == "trainer-7:step-3"
    made = client.get("/v1/runs")
    assert re.fullmatch(r"[0-9a-f]{16}", made.headers["x-request-id"])
    other = client.get("/v1/runs")
    assert other.headers["x-request-id"] != made.headers["x-request-id"]
    # an id that could forge log lines or headers is replaced, not echoed
    for bad in (b"a\tb", b"x" * 129, "é".encode(), b"a b"):
        r = client.get("/healthz", headers={b"X-Request-ID": bad})
        assert re.fullmatch(r"[0-9a-f]{16}", r.headers["x-request-id"])
    # FastAPI's own 422 carries it too
    r = client.post("/v1/runs", json={"sketch": {"kind": "nope"}}, headers={"X-Request-ID": "neg"})
    assert problem(r, 422)["request_id"] == "neg"


def test_log_lines_carry_the_request_id(key_prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    # Redis on a port nothing listens on: the API logs the outage inside the request.
    down = Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0", key_prefix=key_prefix)
    with TestClient(create_app(down)) as c, caplog.at_level(logging.WARNING):
        caplog.clear()
        r = c.get("/v1/runs", headers={"X-Request-ID": "req-42"})
        assert problem(r, 503)["request_id"] == "req-42"
    mine = [rec for rec in caplog.records if getattr(rec, "request_id", None) == "req-42"]
    assert mine and any("Redis unavailable" in rec.getMessage() for rec in mine)
    # outside a request the attribute is "-" (so a format with %(request_id)s never fails)
    record = logging.getLogger("x").makeRecord("x", 20, "f", 1, "m", (), None)
    assert getattr(record, "request_id", None) == "-"


# --------------------------------------------------------------- bind and token
@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
        ("10.0.0.5", False),
        ("example.internal", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10"])
def test_serve_refuses_a_public_bind_without_a_token(host: str, tmp_path: Path) -> None:
    env = {
        "KERNELSCOPE_TOKEN": "",
        "KERNELSCOPE_INSECURE": "",
        "KERNELSCOPE_DATA_DIR": str(tmp_path),
    }
    result = CliRunner().invoke(cli_app, ["serve", "--host", host, "--port", "0"], env=env)
    assert result.exit_code == 2
    assert "without a token" in result.output and "--insecure" in result.output
    assert not any(tmp_path.iterdir())  # refused before starting anything


@pytest.mark.parametrize("how", ["insecure", "token"])
def test_serve_binds_a_public_address_with_a_token_or_insecure(
    how: str, redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "KERNELSCOPE_KEY_PREFIX": key_prefix,
        "KERNELSCOPE_TOKEN": TOKEN if how == "token" else "",
        "PYTHONPATH": str(REPO),
    }
    env.pop("KERNELSCOPE_REDIS_URL", None)
    args = ["serve", "--host", "0.0.0.0", "--port", "0", "--no-worker", "--log-level", "warning"]
    if how == "insecure":
        args.append("--insecure")
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service", *args], env=env, stdout=out, stderr=out, cwd=REPO
        )
    try:
        deadline = time.monotonic() + 90
        while "serving at" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.1)
        assert "serving at" in log.read_text(), log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()
