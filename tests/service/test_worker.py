"""Worker pieces that the end-to-end tests do not isolate: devices, consumer names, the part
it stores, the sketcher memo, and the claim heartbeat that keeps a slow job from being taken
over."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch
from redis.asyncio import Redis

from service.keys import GROUP
from service.parts import PartFormatError, decode_part
from service.settings import Settings
from service.store import Store
from service.worker import Worker, consumer_name, resolve_device, sketch_upload
from sketch.spec import SketchSpec, sketcher_for
from tests.service.conftest import safetensors_body


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    auto = resolve_device("auto")
    assert auto.type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="auto, cpu or cuda"):
        resolve_device("tpu")


def test_consumer_names_are_unique() -> None:
    names = {consumer_name() for _ in range(100)}
    assert len(names) == 100
    assert all(n.count("-") >= 2 for n in names)


def test_sketch_upload_stores_a_part_the_analysis_reads() -> None:
    """The part keeps the upload's row ids and row kind, and its rows are the sketch."""
    grads = {"w": torch.randn(3, 4, 5), "b": torch.randn(3, 5)}
    sketcher = sketcher_for({"kind": "countsketch", "dim": 8, "seed": 7})
    for rows, kind in ((None, "score"), ("update", "update")):
        body = safetensors_body(grads, ["a", "b", "c"], rows=rows)
        part = decode_part(sketch_upload(body, "gradients", sketcher, torch.device("cpu")))
        assert part.ids == ["a", "b", "c"] and part.kind == kind
        torch.testing.assert_close(torch.from_numpy(part.rows), sketcher.sketch(grads))
    with pytest.raises(PartFormatError):
        decode_part(safetensors_body({"other": torch.ones(3, 8)}, ["a", "b", "c"]))
    with pytest.raises(PartFormatError):
        decode_part(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")  # no metadata


def test_sketcher_is_built_once_per_spec() -> None:
    """Equal specs (as dicts or as SketchSpec) share one sketcher; the parameter order is part
    of the spec (the exact kind's column layout)."""
    spec = {"kind": "exact", "dim": 1, "seed": 0}
    one = sketcher_for(spec, {"w": [2, 3], "b": [3]})
    assert sketcher_for(SketchSpec.from_dict(spec), {"w": (2, 3), "b": (3,)}) is one
    assert sketcher_for(spec, {"b": [3], "w": [2, 3]}) is not one
    assert sketcher_for({**spec, "seed": 1}, {"w": [2, 3], "b": [3]}) is not one


def test_keep_claimed_resets_idle_without_counting_a_delivery(settings: Settings) -> None:
    """While a job is in hand the worker re-claims it to itself (XCLAIM JUSTID): its idle
    time stays below claim_idle_ms and its delivery count stays 1; once it stops, idle grows."""

    async def go() -> None:
        idle_ms = 600
        redis = Redis.from_url(str(settings.redis_url))
        store = Store(redis, settings.key_prefix)
        await store.queue.ensure_group()
        worker = Worker(settings.model_copy(update={"claim_idle_ms": idle_ms}), device="cpu")
        worker.store, worker.queue = store, store.queue
        async with redis.pipeline(transaction=True) as pipe:
            store.queue.enqueue(pipe, "r", 0, "u1", "gradients")
            await pipe.execute()
        [batch] = await store.queue.read(worker.name, 1, 10, idle_ms)
        [job] = batch.jobs
        entry_id = job.entry_id

        async def pending() -> dict[str, Any]:
            [info] = await redis.xpending_range(job.stream, GROUP, entry_id, entry_id, 1)
            return dict(info)

        keep = asyncio.create_task(worker._keep_claimed({job}))
        try:
            for _ in range(6):  # 6 x 0.5 s: well past claim_idle_ms in total
                await asyncio.sleep(0.5)
                info = await pending()
                assert info["time_since_delivered"] < idle_ms
                assert info["times_delivered"] == 1
                assert info["consumer"].decode() == worker.name
        finally:
            keep.cancel()
        await asyncio.sleep(idle_ms / 1000 + 0.2)
        assert (await pending())["time_since_delivered"] > idle_ms  # now reclaimable
        await redis.aclose()

    asyncio.run(go())


def test_worker_waits_for_an_unreachable_redis_and_stops_cleanly(settings: Settings) -> None:
    """A worker started before its Redis (compose, restarts) keeps retrying instead of exiting,
    and still stops promptly when asked."""
    from tests.service.conftest import free_port

    down = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})

    async def go() -> None:
        stop = asyncio.Event()
        worker = Worker(down, device="cpu")
        task = asyncio.create_task(worker.run(stop))
        await asyncio.sleep(2.5)
        assert not task.done(), "the worker gave up while Redis was unreachable"
        stop.set()
        await asyncio.wait_for(task, timeout=5.0)
        assert worker.processed == 0

    asyncio.run(go())


def test_worker_against_a_redis_that_never_answers_stops_cleanly(settings: Settings) -> None:
    """A Redis that accepts connections and never answers (a hung server, a black-holed
    proxy): the worker's commands time out after ``redis_timeout_s`` (0.5 s here), it keeps
    retrying, and it stops within a few seconds of being asked.  Without its own timeouts
    each command waited for redis-py's default (5 s in redis-py 8; none in older versions),
    twice on the way out."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    accepted: list[socket.socket] = []
    done = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not done.is_set():
            try:
                accepted.append(server.accept()[0])  # never reads nor writes
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    silent = settings.model_copy(
        update={
            "redis_url": f"redis://127.0.0.1:{server.getsockname()[1]}/0",
            "redis_timeout_s": 0.5,
            "worker_block_ms": 100,
        }
    )

    async def go() -> None:
        stop = asyncio.Event()
        worker = Worker(silent, device="cpu")
        task = asyncio.create_task(worker.run(stop))
        await asyncio.sleep(2.5)
        assert not task.done(), "the worker gave up"
        stop.set()
        await asyncio.wait_for(task, timeout=3.0)

    try:
        asyncio.run(go())
        assert accepted, "the worker connected"
    finally:
        done.set()
        thread.join()
        for conn in accepted:
            conn.close()
        server.close()
