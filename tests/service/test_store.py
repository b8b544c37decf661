"""The Redis store on a real Redis: concurrent uploads, sequence upserts, run deletion."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from redis.asyncio import Redis

from service.settings import Settings
from service.store import Store, bulk_client


def with_store(settings: Settings, body: Callable[[Store, Redis], Awaitable[Any]]) -> Any:
    async def go() -> Any:
        redis = Redis.from_url(str(settings.redis_url))
        try:
            return await body(Store(redis, settings.key_prefix), redis)
        finally:
            await redis.aclose()

    return asyncio.run(go())


def test_identical_uploads_racing_store_one(settings: Settings) -> None:
    async def body(store: Store, redis: Redis) -> None:
        results = await asyncio.gather(
            *[store.add_upload("r", 0, "u1", "gradients", ["a"], b"x" * 1000) for _ in range(10)]
        )
        assert sorted(results) == [False] * 9 + [True]
        assert await redis.xlen(store.keys.stream_of("r")) == 1
        assert await redis.hlen(store.keys.uploads("r", 0)) == 1

    with_store(settings, body)


def test_ranks_uploading_at_once_all_land(settings: Settings) -> None:
    async def body(store: Store, redis: Redis) -> None:
        ids = [f"u{i}" for i in range(8)]
        results = await asyncio.gather(
            *[store.add_upload("r", 0, u, "gradients", ["a", "b"], u.encode() * 100) for u in ids]
        )
        assert results == [True] * 8
        assert await redis.xlen(store.keys.stream_of("r")) == 8
        counts = await store.step_counts("r", 0)
        assert counts.pending_uploads == 8 and counts.state == "pending"
        for u in ids:
            assert await redis.get(store.keys.raw("r", 0, u)) == u.encode() * 100

    with_store(settings, body)


def test_sequence_upsert_keeps_first_seen_order_and_replaces(settings: Settings) -> None:
    def seq(i: str, adv: float) -> dict[str, Any]:
        return {"id": i, "prompt_id": "p", "logprob": -1.0, "advantage": adv, "num_tokens": 1}

    async def body(store: Store, redis: Redis) -> None:
        assert await store.upsert_sequences("r", 3, 0.1, None, [seq("b", 1), seq("a", 2)]) == 2
        v1 = await store.version("r", 3)
        assert await store.upsert_sequences("r", 3, 0.2, 7, [seq("c", 3), seq("b", 4)]) == 3
        snap = await store.snapshot("r", 3)
        assert snap.order == ["b", "a", "c"]
        assert snap.sequences["b"]["advantage"] == 4
        assert snap.step_fields == {"learning_rate": "0.2", "max_length": "7"}
        assert snap.version > v1
        assert await store.list_steps("r") == [3]

    with_store(settings, body)


def test_delete_run_removes_only_its_own_keys(settings: Settings) -> None:
    async def body(store: Store, redis: Redis) -> None:
        for run_id in ("a", "ab"):
            run: dict[str, Any] = {"run_id": run_id, "created_at": 1.0, "sketch": {}}
            assert (await store.create_run(run))[1]
            await store.add_upload(run_id, 0, "u1", "gradients", ["x"], b"body")
            await store.put_summary(run_id, 0, {"delta_h1": 1.0})
        assert await store.delete_run("a")
        assert not await store.delete_run("a")
        left = {k async for k in redis.scan_iter(match=f"{settings.key_prefix}:*")}
        assert not any(b"{r:a}" in k for k in left)
        assert sum(b"{r:ab}" in k for k in left) == 5  # spec, steps, summary, uploads, raw
        assert [r["run_id"] for r in await store.list_runs()] == ["ab"]

    with_store(settings, body)


def test_delete_step_removes_only_that_step(settings: Settings) -> None:
    """A step's keys, its entropy summaries and its place among the run's steps go; step 10
    beside step 1, the run's spec and the other steps stay byte for byte."""

    def seq(i: str) -> dict[str, Any]:
        return {"id": i, "prompt_id": "p", "logprob": -1.0, "advantage": 1.0, "num_tokens": 1}

    async def body(store: Store, redis: Redis) -> None:
        run: dict[str, Any] = {"run_id": "r", "created_at": 1.0, "sketch": {}}
        assert (await store.create_run(run))[1]
        for step in (1, 10):
            await store.upsert_sequences("r", step, 0.1, None, [seq("a"), seq("b")])
            await store.add_upload("r", step, "u1", "gradients", ["a", "b"], b"body")
            await store.put_summary("r", step, {"delta_h1": 1.0})
            await store.put_summary("r", step, {"delta_h1": 2.0}, target="token_mean")
            await store.set_realized("r", step, 1.0, 2.0)
        kept = sorted([k async for k in redis.scan_iter(match=store.keys.step_pattern("r", 10))])
        assert await store.delete_step("r", 1)
        assert not await store.delete_step("r", 1)
        assert not [k async for k in redis.scan_iter(match=store.keys.step_pattern("r", 1))]
        assert (
            sorted([k async for k in redis.scan_iter(match=store.keys.step_pattern("r", 10))])
            == kept
        )
        assert await store.list_steps("r") == [10]
        assert list(await store.summaries("r")) == [10]
        assert list(await store.summaries("r", "token_mean")) == [10]
        assert await store.get_run("r") is not None

    with_store(settings, body)


def test_bulk_client_stores_and_reads_bodies_byte_for_byte(settings: Settings) -> None:
    """Upload bodies through the blocking bulk client (Python packer, hiredis reader when
    installed) land and come back unchanged, through both the API's and the worker's path."""
    body = bytearray(np.random.default_rng(0).integers(0, 256, 3_000_017, dtype=np.uint8).tobytes())
    bulk = bulk_client(str(settings.redis_url), timeout_s=10.0)

    async def go(store: Store, redis: Redis) -> None:
        queued = await store.add_upload("r", 0, "u1", "gradients", ["a"], body)
        assert queued
        assert await redis.get(store.keys.raw("r", 0, "u1")) == bytes(body)  # asyncio reader
        assert await store.raw_body("r", 0, "u1") == bytes(body)  # bulk reader
        await store.delete_run("r")

    async def wrapped() -> None:
        redis = Redis.from_url(str(settings.redis_url))
        try:
            await go(Store(redis, settings.key_prefix, bulk=bulk), redis)
        finally:
            await redis.aclose()
            bulk.close()

    asyncio.run(wrapped())


def test_dead_letter_stream_is_capped(settings: Settings) -> None:
    """The dead-letter stream keeps about ``dead_max`` entries (``MAXLEN ~``: Redis trims
    whole nodes of 100 entries), however many jobs fail."""

    async def body(store: Store, redis: Redis) -> None:
        capped = Store(redis, settings.key_prefix, dead_max=10)
        await capped.queue.ensure_group()
        stream = capped.keys.stream_of("r")
        for i in range(400):
            entry = await redis.xadd(stream, {"bad": str(i)})
            await capped.queue.reject(stream, entry, {b"bad": str(i).encode()}, "malformed")
        assert await redis.xlen(capped.keys.dead_of("r")) <= 200
        assert await redis.xlen(stream) == 0

    with_store(settings, body)
