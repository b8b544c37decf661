"""The job queue (service/queue.py) on the real Redis: enqueue, read, ack, reclaim, hand back,
dead letters, statistics; and the parsing of stream entries into jobs."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from service.keys import GROUP, Keys
from service.queue import Job, MalformedJobError, Queue

IDLE_MS = 60_000  # long: nothing is reclaimed in a test unless it is handed back idle
BLOCK_MS = 10


def with_queue(
    redis_url: str, prefix: str, body: Callable[[Queue, Redis], Awaitable[Any]], shards: int = 0
) -> Any:
    async def go() -> Any:
        redis = Redis.from_url(redis_url)
        try:
            queue = Queue(redis, Keys(prefix, shards), dead_max=100)
            await queue.ensure_group()
            return await body(queue, redis)
        finally:
            await redis.aclose()

    return asyncio.run(go())


async def enqueue(queue: Queue, run_id: str, step: int, upload_id: str, kind: str) -> None:
    async with queue.redis.pipeline(transaction=True) as pipe:
        queue.enqueue(pipe, run_id, step, upload_id, kind)
        await pipe.execute()


async def read_one(queue: Queue, consumer: str, claim_idle_ms: int = IDLE_MS) -> Job:
    [batch] = await queue.read(consumer, 10, BLOCK_MS, claim_idle_ms)
    [job] = batch.jobs
    return job


async def pending(queue: Queue, job: Job) -> dict[str, Any]:
    [info] = await queue.redis.xpending_range(job.stream, GROUP, job.entry_id, job.entry_id, 1)
    return dict(info)


def test_enqueue_read_ack_round_trip(redis_url: str, key_prefix: str) -> None:
    async def body(queue: Queue, redis: Redis) -> None:
        await enqueue(queue, "r1", 3, "u1", "sketches")
        job = await read_one(queue, "a")
        assert (job.run_id, job.step, job.upload_id, job.kind) == ("r1", 3, "u1", "sketches")
        assert job.stream == queue.keys.stream_of("r1") and job.deliveries == 1
        assert await queue.read("a", 10, BLOCK_MS, IDLE_MS) == []  # delivered once only
        assert (await pending(queue, job))["consumer"] == b"a"
        await queue.ack(job)
        assert await redis.xlen(job.stream) == 0  # acknowledged and deleted
        assert (await redis.xpending(job.stream, GROUP))["pending"] == 0

    with_queue(redis_url, key_prefix, body)


def test_jobs_of_a_sharded_queue_are_read_from_every_stream(
    redis_url: str, key_prefix: str
) -> None:
    """With shards each run's jobs go to its own stream, and a consumer reads them all."""

    async def body(queue: Queue, redis: Redis) -> None:
        runs = [f"run-{i}" for i in range(12)]
        for run_id in runs:
            await enqueue(queue, run_id, 0, "u", "gradients")
        assert len({queue.keys.stream_of(r) for r in runs}) == 4
        batches = await queue.read("a", 10, BLOCK_MS, IDLE_MS)
        assert len(batches) == 4
        jobs = [job for batch in batches for job in batch.jobs]
        assert sorted(job.run_id for job in jobs) == sorted(runs)
        assert all(job.stream == queue.keys.stream_of(job.run_id) for job in jobs)

    with_queue(redis_url, key_prefix, body, shards=4)


def test_a_stale_job_is_reclaimed_with_its_delivery_count(redis_url: str, key_prefix: str) -> None:
    """A job whose consumer went silent past claim_idle_ms is taken over by the next reader,
    before any new job, and counts its second delivery."""

    async def body(queue: Queue, redis: Redis) -> None:
        await enqueue(queue, "r", 0, "u1", "gradients")
        lost = await read_one(queue, "crashed")
        await enqueue(queue, "r", 0, "u2", "gradients")
        await asyncio.sleep(0.15)
        taken = await read_one(queue, "b", claim_idle_ms=100)
        assert taken.entry_id == lost.entry_id and taken.upload_id == "u1"
        assert taken.deliveries == 2
        assert (await pending(queue, taken))["consumer"] == b"b"
        assert (await read_one(queue, "b", claim_idle_ms=100)).upload_id == "u2"

    with_queue(redis_url, key_prefix, body)


def test_keep_claimed_stops_a_reclaim_without_counting_a_delivery(
    redis_url: str, key_prefix: str
) -> None:
    async def body(queue: Queue, redis: Redis) -> None:
        await enqueue(queue, "r", 0, "u1", "gradients")
        job = await read_one(queue, "a")
        await asyncio.sleep(0.15)
        await queue.keep_claimed("a", [job])
        assert await queue.read("b", 10, BLOCK_MS, 100) == []
        info = await pending(queue, job)
        assert info["consumer"] == b"a" and info["times_delivered"] == 1

    with_queue(redis_url, key_prefix, body)


def test_hand_back_makes_jobs_claimable_at_once(redis_url: str, key_prefix: str) -> None:
    """Handed back, a job is as idle as an abandoned one: the next reader takes it at once.
    The untouched one's delivery is not counted; the one cut short keeps its attempt."""

    async def body(queue: Queue, redis: Redis) -> None:
        for upload_id in ("u1", "u2"):
            await enqueue(queue, "r", 0, upload_id, "gradients")
        [batch] = await queue.read("a", 10, BLOCK_MS, IDLE_MS)
        started, untouched = batch.jobs
        await queue.hand_back("a", batch.jobs, IDLE_MS, attempted=started)
        [again] = await queue.read("b", 10, BLOCK_MS, IDLE_MS)
        deliveries = {job.upload_id: job.deliveries for job in again.jobs}
        assert deliveries == {started.upload_id: 2, untouched.upload_id: 1}

    with_queue(redis_url, key_prefix, body)


def test_dead_letter_and_ack_in_one_transaction(redis_url: str, key_prefix: str) -> None:
    async def body(queue: Queue, redis: Redis) -> None:
        await enqueue(queue, "r", 2, "u1", "gradients")
        job = await read_one(queue, "a")
        async with redis.pipeline(transaction=True) as pipe:
            queue.dead_letter_in(pipe, job, "ValueError: boom", 3)
            queue.ack_in(pipe, job)
            await pipe.execute()
        [(_, fields)] = await redis.xrange(queue.keys.dead_of("r"))
        assert fields[b"run_id"] == b"r" and fields[b"step"] == b"2"
        assert fields[b"upload_id"] == b"u1" and fields[b"attempts"] == b"3"
        assert fields[b"error"] == b"ValueError: boom"
        assert fields[b"entry_id"] == job.entry_id
        assert await redis.xlen(job.stream) == 0

    with_queue(redis_url, key_prefix, body)


def test_an_entry_that_names_no_job_is_dead_lettered_as_it_is_read(
    redis_url: str, key_prefix: str
) -> None:
    async def body(queue: Queue, redis: Redis) -> None:
        stream = queue.keys.stream_of("r")
        await redis.xadd(stream, {"run_id": "r", "step": "x"})
        await enqueue(queue, "r", 0, "u1", "gradients")
        [batch] = await queue.read("a", 10, BLOCK_MS, IDLE_MS)
        assert batch.rejected == 1 and [job.upload_id for job in batch.jobs] == ["u1"]
        [(_, fields)] = await redis.xrange(queue.keys.dead_of("r"))
        assert b"malformed job entry" in fields[b"error"]
        assert b'"step": "x"' in fields[b"fields"]
        assert (await redis.xpending(stream, GROUP))["pending"] == 1  # the good job only

    with_queue(redis_url, key_prefix, body)


def test_statistics(redis_url: str, key_prefix: str) -> None:
    async def body(queue: Queue, redis: Redis) -> None:
        empty = await Queue(redis, Keys(f"{key_prefix}:none")).stats()
        assert (empty.length, empty.undelivered, empty.pending, empty.dead) == (0, 0, 0, 0)
        await queue.join("idle-worker")
        for i in range(4):
            await enqueue(queue, "r", 0, f"u{i}", "gradients")
        first = await queue.read("a", 2, BLOCK_MS, IDLE_MS)
        dead = first[0].jobs[0]
        async with redis.pipeline(transaction=True) as pipe:
            queue.dead_letter_in(pipe, dead, "boom", 1)
            queue.ack_in(pipe, dead)
            await pipe.execute()
        stats = await queue.stats()
        assert stats.length == 3 and stats.undelivered == 2 and stats.pending == 1
        assert stats.depth == 3 and stats.dead == 1
        assert set(stats.consumer_idle_s) == {"a", "idle-worker"}

    with_queue(redis_url, key_prefix, body)


def test_leave_keeps_a_consumer_that_holds_jobs(redis_url: str, key_prefix: str) -> None:
    async def body(queue: Queue, redis: Redis) -> None:
        await queue.join("holder")
        await queue.join("empty")
        await enqueue(queue, "r", 0, "u1", "gradients")
        await read_one(queue, "holder")
        await queue.leave("holder")
        await queue.leave("empty")
        stream = queue.keys.stream_of("r")
        names = [c["name"] for c in await redis.xinfo_consumers(stream, GROUP)]
        assert names == [b"holder"]  # its job stays pending, reclaimable

    with_queue(redis_url, key_prefix, body)


GOOD = {b"run_id": b"r", b"step": b"4", b"upload_id": b"u1", b"kind": b"gradients"}


def test_job_parses_an_entry_once() -> None:
    job = Job.parse("s", b"1-0", GOOD, deliveries=2)
    assert job == Job("s", b"1-0", "r", 4, "u1", "gradients", 2)
    with pytest.raises(AttributeError):
        job.step = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    "fields",
    [
        {b"run_id": b"r"},  # fields missing
        {**GOOD, b"step": b"x"},
        {**GOOD, b"step": b"-1"},
        {**GOOD, b"kind": b"weights"},
        {**GOOD, b"run_id": b"a b"},  # not an id: it would name keys outside its run
        {**GOOD, b"upload_id": b"\xff"},  # not UTF-8
    ],
)
def test_job_parse_refuses_a_malformed_entry(fields: dict[bytes, bytes]) -> None:
    with pytest.raises(MalformedJobError, match="malformed job entry"):
        Job.parse("s", b"1-0", fields)
