"""The benchmarks' ``kernelscope serve`` (``bench/processes.py``) leaves nothing behind in a
shared Redis: the keys under its prefix are deleted when it stops."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest
import redis as redis_sync

REPO = Path(__file__).resolve().parents[2]


def test_serve_deletes_its_keys_from_a_shared_redis(
    redis_url: str, key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_URL", redis_url)
    sys.path.insert(0, str(REPO / "bench"))
    try:
        from processes import serve
    finally:
        sys.path.remove(str(REPO / "bench"))
    client = redis_sync.Redis.from_url(redis_url)
    try:
        with serve(key_prefix) as url:
            spec = {"kind": "countsketch", "dim": 8, "seed": 0}
            httpx.post(f"{url}/v1/runs", json={"run_id": "r", "sketch": spec}).raise_for_status()
            assert list(client.scan_iter(match=f"{key_prefix}:*"))
        assert list(client.scan_iter(match=f"{key_prefix}:*")) == []
    finally:
        client.close()


def test_trl_step_prints_what_it_measured_when_stopped(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``bench/gpu.sh`` runs ``bench/trl_step.py`` under ``timeout``: its SIGTERM, here during
    the second mode, ends the run with the table of the modes measured so far (before, the
    stage's output had no numbers at all) and a failing exit status."""
    import contextlib
    import os
    import signal

    sys.path.insert(0, str(REPO / "bench"))
    try:
        import trl_step
    finally:
        sys.path.remove(str(REPO / "bench"))
    calls: list[str] = []

    def run_child(mode: str, size: str, url: str, args: object) -> dict[str, object]:
        calls.append(mode)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return {
            "mode": mode,
            "size": size,
            "parameters": 1e6,
            "sequences": 4,
            "step_s": 1.0,
            "train_s": 0.5,
            "peak_mib": 600.0,
            "bytes_per_step": 0.0,
            "log_s": None,
        }

    monkeypatch.setattr(trl_step, "run_child", run_child)
    monkeypatch.setattr(trl_step, "serve", lambda prefix: contextlib.nullcontext("http://x"))
    previous = signal.getsignal(signal.SIGTERM)
    try:
        status = trl_step.main(["--quick", "--modes", "countsketch,kronecker"])
    finally:
        signal.signal(signal.SIGTERM, previous)
    out, err = capsys.readouterr()
    assert status == 1 and calls == ["off", "countsketch"]
    assert "| 1M (1.0M) | off | 1.00 |" in out
    assert "countsketch" not in out  # the interrupted mode has no row
    assert "failed: the rest (stopped)" in err
