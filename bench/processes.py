"""Child processes for the benchmarks (``bench/service.py``, ``bench/load.py``,
``bench/trl_step.py``, ``bench/trl_adam.py``): a free loopback port, a service process that is
stopped on exit, and waiting for it to answer."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def child_process(
    args: Sequence[str], env: dict[str, str], log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """A child process in the repository root, output to ``log``; SIGTERMed (then killed) on
    exit."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(list(args), env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 120.0) -> None:
    """Poll ``url`` until it answers without a 5xx (a 503 ``/healthz`` means Redis is not
    there yet); fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited with {proc.returncode}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, timeout=2.0).status_code < 500:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer in {timeout_s:.0f} s")


@contextlib.contextmanager
def serve(prefix: str) -> Iterator[str]:
    """``kernelscope serve`` (API and an in-process worker) on a free loopback port, its Redis
    at ``REDIS_URL`` or embedded in a temporary directory, keys under ``prefix``; yields its URL
    once it answers, stops it on exit."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as logs:
        env = {**os.environ, "KERNELSCOPE_KEY_PREFIX": prefix}
        args = [sys.executable, "-m", "service", "serve", "--port", str(port)]
        args += ["--data-dir", str(Path(logs) / "data")]
        with child_process(args, env, Path(logs) / "serve.log") as api:
            wait_http(f"{url}/healthz", api)
            yield url
