"""How the code is laid out, measured: what issue 15 asked to track before and after.

- the longest modules of ``sketch/``, ``service/`` and ``clients/`` (lines);
- the project modules one upload passes through (the POST, the worker's job, the stored
  part) and the ones one cold entropy query passes through (a fresh app: no memo, no cached
  answer), found by profiling every call made in every thread;
- the lines of ``clients/http.py``.

The duplicated-code pairs are counted with the tool library's ``duplicates`` (not part of
the project), and the places an answer field is defined by reading the code.

    REDIS_URL=redis://127.0.0.1:6379/0 python bench/structure.py

Needs a real Redis (``REDIS_URL``); writes only keys under a fresh prefix and unlinks them.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sys
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import FrameType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PACKAGES = ("sketch", "service", "clients")


class ModuleTrace:
    """The project modules whose code runs while ``recording``: a profile hook in every
    thread (threads started after ``install`` inherit it through ``threading.setprofile``)."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.recording = False
        self._roots = tuple(str(REPO / p) + os.sep for p in PACKAGES)

    def _hook(self, frame: FrameType, event: str, arg: Any) -> None:
        if self.recording and event == "call":
            name = frame.f_code.co_filename
            if name.startswith(self._roots):
                self.seen.add(str(Path(name).relative_to(REPO)))

    def install(self) -> None:
        sys.setprofile(self._hook)
        threading.setprofile(self._hook)

    def remove(self) -> None:
        sys.setprofile(None)
        threading.setprofile(None)

    async def record(self, work: Callable[[], Awaitable[None]]) -> list[str]:
        self.seen = set()
        self.recording = True
        try:
            await work()
        finally:
            self.recording = False
        return sorted(self.seen)


def longest_modules(top: int = 5) -> list[tuple[str, int]]:
    sizes = [
        (str(path.relative_to(REPO)), len(path.read_text().splitlines()))
        for package in PACKAGES
        for path in (REPO / package).rglob("*")
        if path.suffix in (".py", ".js")
    ]
    return sorted(sizes, key=lambda s: -s[1])[:top]


async def trace_paths(redis_url: str) -> tuple[list[str], list[str]]:
    import httpx
    import torch
    from safetensors.torch import save

    from service.app import create_app
    from service.settings import Settings
    from service.worker import Worker

    prefix = f"ksbench-structure-{secrets.token_hex(3)}"
    settings = Settings(redis_url=redis_url, key_prefix=prefix)
    trace = ModuleTrace()
    trace.install()
    try:
        ids = [f"s{i}" for i in range(8)]
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as api:
                run = {
                    "run_id": "r",
                    "sketch": {"kind": "countsketch", "dim": 64, "seed": 0},
                    "parameters": {"w": [32, 16]},
                }
                assert (await api.post("/v1/runs", json=run)).status_code == 201
                seqs = [
                    {
                        "id": s,
                        "prompt_id": f"p{i // 4}",
                        "logprob": -3.0,
                        "advantage": (-1.0) ** i,
                        "num_tokens": 4,
                    }
                    for i, s in enumerate(ids)
                ]
                r = await api.post(
                    "/v1/runs/r/steps/1/sequences",
                    json={"learning_rate": 0.1, "sequences": seqs},
                )
                assert r.status_code == 200, r.text
                body = save(
                    {"w": torch.randn(len(ids), 32, 16)},
                    metadata={"sequence_ids": json.dumps(ids)},
                )
                worker = Worker(settings, device="cpu")
                stop = asyncio.Event()

                async def upload() -> None:
                    r = await api.post(
                        "/v1/runs/r/steps/1/gradients",
                        content=body,
                        headers={"Content-Type": "application/octet-stream"},
                    )
                    assert r.status_code in (201, 202), r.text
                    if r.status_code == 202:
                        running = asyncio.create_task(worker.run(stop))
                        for _ in range(600):
                            trace.recording = False  # the polls are not the upload's path
                            status = (await api.get("/v1/runs/r/steps/1")).json()
                            trace.recording = True
                            if status["state"] == "ready":
                                break
                            await asyncio.sleep(0.05)
                        stop.set()
                        await running

                upload_modules = await trace.record(upload)
        cold = create_app(settings)  # a fresh app: an empty matrix memo
        async with cold.router.lifespan_context(cold):
            transport = httpx.ASGITransport(app=cold)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as api:

                async def entropy() -> None:
                    r = await api.get("/v1/runs/r/steps/1/entropy")
                    assert r.status_code == 200, r.text

                entropy_modules = await trace.record(entropy)
    finally:
        trace.remove()
        import redis

        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.unlink(*keys)
        client.close()
    return upload_modules, entropy_modules


def main() -> None:
    redis_url = os.environ.get("REDIS_URL")
    if not redis_url:
        sys.exit("set REDIS_URL to a Redis server this benchmark may write keys to")
    upload, entropy = asyncio.run(trace_paths(redis_url))
    print("| measure | value |\n|---|---|")
    longest = longest_modules()
    for name, lines in longest:
        print(f"| lines in {name} | {lines} |")
    if "clients/http.py" not in dict(longest):
        http = REPO / "clients" / "http.py"
        print(f"| lines in clients/http.py | {len(http.read_text().splitlines())} |")
    print(f"| modules one upload passes through | {len(upload)} |")
    print(f"| modules one cold entropy query passes through | {len(entropy)} |")
    print("\nupload:", ", ".join(upload))
    print("entropy:", ", ".join(entropy))


if __name__ == "__main__":
    main()
