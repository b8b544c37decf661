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
