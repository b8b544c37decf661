"""The stream worker: sketch queued uploads into partial sketches (architecture.md, step 4).

One loop, arq-like::

    reclaim jobs idle past claim_idle_ms (XAUTOCLAIM)   -- a crashed worker's jobs
    else read new jobs (XREADGROUP, group "workers", up to worker_batch, blocking)
    group them by (run, step); per group: one run spec and sketcher; raw bodies fetched one
    job ahead (at most two in memory)
    per job: sketch in a thread -> store the part, mark done, unlink raw, XACK (one MULTI)
             failure -> retried by whoever reclaims it; after max_attempts deliveries -> dead letter

Any number of workers on any hosts may share one Redis: the consumer group hands each job to
one consumer, a part is keyed by its upload id (a job done twice writes the same value), and
consumer names are unique (host-pid-random).  SIGTERM / SIGINT set the stop event: the job in
hand finishes, the rest of the batch is handed back to the queue (idle, its delivery to this
worker not counted), and the worker exits; ``kernelscope worker`` gives the job in hand
``shutdown_timeout_s``, after which it stays queued for the next worker.

Run: ``kernelscope worker --redis-url redis://... --device auto|cpu|cuda`` (``service/cli.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from redis import Redis as SyncRedis
from redis.asyncio import Redis
from redis.exceptions import RedisError
from safetensors.torch import load as load_safetensors

from service.keys import GROUP
from service.metrics import (
    record_job,
    record_rows_sketched,
    record_worker_heartbeat,
)
from service.parts import Part, encode_part, read_metadata, read_rows
from service.settings import Settings
from service.store import REDIS_DOWN, UPLOAD_QUEUED, Store, connect
from sketch.base import Sketcher
from sketch.spec import sketcher_for

log = logging.getLogger("kernelscope.worker")

Entry = tuple[bytes, dict[bytes, bytes]]


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available else CPU; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but torch sees no CUDA device")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    return torch.device(device)


def consumer_name() -> str:
    """A consumer name unique across hosts and restarts: ``host-pid-random``."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


def sketch_upload(body: bytes, kind: str, sketcher: Sketcher, device: torch.device) -> bytes:
    """Turn an upload the API has validated into its partial sketch (:mod:`service.parts`).

    ``gradients``: every tensor (``param`` or ``param@offset``) is moved to ``device`` and
    sketched; the sum over tensors is ``[n, k]``.  ``sketches``: the client's ``sketch``
    ``[n, k]`` as float32.  The part keeps the upload's row ids and row kind.
    """
    ids, row_kind = read_rows(read_metadata(body))
    tensors = load_safetensors(body)
    if kind == "sketches":
        rows = tensors["sketch"].to(torch.float32)
    else:
        with torch.no_grad():
            rows = sketcher.sketch({k: v.to(device) for k, v in tensors.items()})
    rows = rows.to(device="cpu", dtype=torch.float32).contiguous()
    if rows.shape != (len(ids), sketcher.dim):
        raise ValueError(
            f"sketch has shape {list(rows.shape)}, expected [{len(ids)}, {sketcher.dim}]"
        )
    if not torch.isfinite(rows).all():
        raise ValueError("the sketch of this upload is not finite (overflow in float32?)")
    return encode_part(Part(ids, rows.numpy(), row_kind))


def _job_key(fields: dict[bytes, bytes]) -> tuple[str, int]:
    """``(run_id, step)`` of a job entry; KeyError / ValueError (a ``UnicodeDecodeError`` too)
    when it names no job, so that ``_process`` can read every field without failing."""
    for name in (b"run_id", b"step", b"upload_id", b"kind"):
        if name not in fields:
            raise KeyError(f"no {name.decode()!r} field")
    for name in (b"upload_id", b"kind"):
        fields[name].decode()
    return fields[b"run_id"].decode(), int(fields[b"step"])


class Worker:
    """A consumer of the job stream.

    ``Worker(settings, device="auto").run(stop)`` processes jobs until ``stop`` is set (then
    finishes the job in hand and hands the rest of its batch back).  Pass ``redis`` to share a
    client (embedded mode); otherwise one is opened from ``settings.redis_url`` and closed on
    exit.
    """

    def __init__(
        self,
        settings: Settings,
        device: str = "auto",
        *,
        redis: Redis | None = None,
        name: str | None = None,
    ) -> None:
        self.settings = settings
        self.device = resolve_device(device)
        self.name = name or consumer_name()
        self._redis = redis
        self.processed = 0
        self.failed = 0
        self._stop = asyncio.Event()
        self._in_hand: bytes | None = None  # the job being processed, for _release

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Process jobs until ``stop`` is set."""
        stop = stop or asyncio.Event()
        self._stop = stop
        redis = self._redis
        bulk: SyncRedis | None = None
        if redis is None:
            if not self.settings.redis_url:
                raise RuntimeError("the worker needs a Redis: set REDIS_URL or --redis-url")
            # Every command bounded; the blocking read gets its block time on top. Raw bodies
            # are read with the blocking client in a thread (Store.raw_body).
            redis, bulk = connect(self.settings, self.settings.worker_block_ms / 1000)
        store = Store(
            redis,
            self.settings.key_prefix,
            self.settings.raw_ttl_s,
            bulk=bulk,
            dead_max=self.settings.dead_letter_max,
            shards=self.settings.shards,
        )
        # Not the loop's default executor, which the loop's close waits for: a sketch cut
        # short at the shutdown deadline must not hold the exit up.
        self._sketching = ThreadPoolExecutor(1, thread_name_prefix=f"sketch-{self.name}")
        try:
            if await self._register(store, stop):
                streams = store.keys.streams
                where = streams[0] if len(streams) == 1 else f"{len(streams)} job streams"
                log.info("worker %s on %s reading %s", self.name, self.device, where)
            while not stop.is_set():
                record_worker_heartbeat(self.name)
                try:
                    await self._iteration(store)
                except REDIS_DOWN as exc:
                    # Redis restarting or unreachable: jobs in hand stay pending and are
                    # reclaimed; a Redis that lost the group (no persistence) gets it back.
                    log.warning("redis error (%s: %s); retrying in 1 s", type(exc).__name__, exc)
                    await asyncio.sleep(1.0)
                    with contextlib.suppress(*REDIS_DOWN):
                        await store.ensure_group()
        finally:
            self._sketching.shutdown(wait=False, cancel_futures=True)
            await self._leave(store)
            if self._redis is None:
                await redis.aclose()
            if bulk is not None:
                bulk.close()

    async def _register(self, store: Store, stop: asyncio.Event) -> bool:
        """Create the group and register this consumer, waiting for Redis if it is down.

        A worker started before its Redis (compose, a restart) must not exit. Registering
        up front (XREADGROUP on an empty stream does not) lets operators and tests see a live
        worker in XINFO CONSUMERS before it gets its first job. False if stopped first.
        """
        while not stop.is_set():
            try:
                await store.ensure_group()
                for stream in store.keys.streams:
                    await store.redis.xgroup_createconsumer(stream, GROUP, self.name)
                return True
            except REDIS_DOWN as exc:
                log.warning("redis unreachable (%s: %s); retrying in 1 s", type(exc).__name__, exc)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=1.0)
        return False

    async def _iteration(self, store: Store) -> None:
        """Read one batch from each job stream that has work, and process it.  Once the
        worker is asked to stop, only the first batch's first job is finished; every other
        job read goes straight back to the queue."""
        for index, (stream, entries) in enumerate(await self._next_batches(store)):
            if index and self._stop.is_set():
                await self._release(store, stream, {entry_id for entry_id, _ in entries})
                continue
            await self._batch(store, stream, entries)

    async def _batch(self, store: Store, stream: str, entries: list[Entry]) -> None:
        """Group a batch of ``stream`` by (run, step) and process each group.  Every job of
        the batch is kept claimed until it is finished or has failed: a job waiting behind
        others is not a lost one, and must not be reclaimed (each claim counts a delivery)."""
        held = {entry_id for entry_id, _ in entries}
        keep = asyncio.create_task(self._keep_claimed(store, stream, held))
        try:
            if self.settings.worker_stall_s:
                await asyncio.sleep(self.settings.worker_stall_s)
            groups: dict[tuple[str, int], list[Entry]] = defaultdict(list)
            for entry_id, fields in entries:
                try:
                    key = _job_key(fields)
                except (KeyError, ValueError) as exc:  # not a job: dead letter, not the loop
                    error = f"malformed job entry ({type(exc).__name__}: {exc})"
                    log.error("dead-lettering stream entry %s: %s", entry_id, error)
                    await store.dead_letter_entry(stream, entry_id, fields, error)
                    record_job(0.0, "dead_letter")
                    held.discard(entry_id)
                    continue
                groups[key].append((entry_id, fields))
            for (run_id, step), jobs in groups.items():
                await self._process(store, stream, run_id, step, jobs, held)
                if self._stop.is_set():
                    break
        finally:
            keep.cancel()
            if held:  # stopped, or cut short at the shutdown deadline: back to the queue
                with contextlib.suppress(*REDIS_DOWN):
                    await self._release(store, stream, held)

    async def _release(self, store: Store, stream: str, held: set[bytes]) -> None:
        """Hand jobs this worker holds back to the queue, idle as long as an abandoned job
        (XCLAIM IDLE claim_idle_ms) so that the next worker reclaims them at once.  A job
        not started gets its delivery to this worker uncounted (RETRYCOUNT): no attempt was
        made.  The job cut short keeps it, so that one that never finishes is dead-lettered."""
        ids = sorted(held)
        deliveries = await self._deliveries(store, stream, ids)
        async with store.redis.pipeline(transaction=False) as pipe:
            for entry_id, delivered in zip(ids, deliveries, strict=True):
                attempted = entry_id == self._in_hand
                pipe.xclaim(
                    stream,
                    GROUP,
                    self.name,
                    0,
                    [entry_id],
                    idle=self.settings.claim_idle_ms,
                    retrycount=delivered if attempted else max(delivered - 1, 0),
                    justid=True,
                )
            await pipe.execute()
        log.info("stopping: handed %d held jobs back to the queue", len(ids))

    async def _leave(self, store: Store) -> None:
        """Remove this consumer from the group of each stream where it holds no job
        (DELCONSUMER would drop them; a crashed worker's jobs stay for XAUTOCLAIM)."""
        for stream in store.keys.streams:
            try:
                pending = await store.redis.xpending_range(
                    stream, GROUP, "-", "+", 1, consumername=self.name
                )
                if not pending:
                    await store.redis.xgroup_delconsumer(stream, GROUP, self.name)
            except Exception as exc:  # best effort on the way out
                log.warning("could not leave the consumer group of %s: %s", stream, exc)

    async def _next_batches(self, store: Store) -> list[tuple[str, list[Entry]]]:
        """Reclaimed jobs first (they are the oldest), else new ones (blocking read), per
        job stream.  On a cluster the streams live in different slots, so there is no
        multi-stream XREADGROUP: the blocking reads run side by side, one per stream."""
        s = self.settings
        streams = store.keys.streams
        found: list[tuple[str, list[Entry]]] = []
        for stream in streams:
            claimed = await store.redis.xautoclaim(
                stream, GROUP, self.name, s.claim_idle_ms, "0-0", count=s.worker_batch
            )
            entries = [(e[0], e[1]) for e in claimed[1] if e and e[1]]
            if entries:
                log.info("reclaimed %d idle jobs", len(entries))
                found.append((stream, entries))
        if found:
            return found
        reads: list[Any] = await asyncio.gather(
            *(
                store.redis.xreadgroup(
                    GROUP, self.name, {stream: ">"}, count=s.worker_batch, block=s.worker_block_ms
                )
                for stream in streams
            )
        )
        for stream, read in zip(streams, reads, strict=True):
            entries = [(e[0], e[1]) for _, batch in read or [] for e in batch if e[1]]
            if entries:
                found.append((stream, entries))
        return found

    async def _deliveries(self, store: Store, stream: str, entry_ids: list[bytes]) -> list[int]:
        """How often each entry was delivered (XPENDING): crashes and failures both count."""
        async with store.redis.pipeline(transaction=False) as pipe:
            for entry_id in entry_ids:
                pipe.xpending_range(stream, GROUP, entry_id, entry_id, 1)
            answers = await pipe.execute()
        return [int(a[0]["times_delivered"]) if a else 1 for a in answers]

    async def _process(
        self,
        store: Store,
        stream: str,
        run_id: str,
        step: int,
        jobs: list[Entry],
        held: set[bytes],
    ) -> None:
        upload_ids = [fields[b"upload_id"].decode() for _, fields in jobs]
        deliveries = await self._deliveries(store, stream, [entry_id for entry_id, _ in jobs])
        try:
            run = await store.get_run(run_id)
        except REDIS_DOWN:
            raise
        except Exception as exc:  # an unreadable run spec fails these jobs, not the loop
            for (entry_id, _), upload_id, delivered in zip(
                jobs, upload_ids, deliveries, strict=True
            ):
                await self._failed(store, run_id, step, upload_id, entry_id, delivered, exc)
                held.discard(entry_id)
            return

        def fetch(index: int) -> asyncio.Task[bytes | None] | None:
            if run is None or index >= len(jobs):
                return None
            return asyncio.create_task(store.raw_body(run_id, step, upload_ids[index]))

        # Raw bodies are fetched one job ahead: the next one arrives while this one is being
        # sketched, and at most two bodies are held whatever worker_batch is.
        upcoming = fetch(0)
        try:
            for index, ((entry_id, fields), upload_id, delivered) in enumerate(
                zip(jobs, upload_ids, deliveries, strict=True)
            ):
                body = None if upcoming is None else await upcoming
                upcoming = fetch(index + 1)
                self._in_hand = entry_id
                try:
                    await self._process_job(
                        store, run, run_id, step, entry_id, fields, upload_id, body, delivered
                    )
                except REDIS_DOWN:
                    raise  # the loop waits for Redis; the job stays pending
                except Exception as exc:  # this job's failure, never the loop's
                    await self._failed(store, run_id, step, upload_id, entry_id, delivered, exc)
                # finished, dead-lettered, or failed (reclaimable after claim_idle_ms)
                held.discard(entry_id)
                self._in_hand = None
                del body
                if self._stop.is_set():  # the job in hand is done; the rest goes back
                    break  # not held while the next job's body is awaited
        finally:
            if upcoming is not None:
                upcoming.cancel()

    async def _process_job(
        self,
        store: Store,
        run: dict[str, Any] | None,
        run_id: str,
        step: int,
        entry_id: bytes,
        fields: dict[bytes, bytes],
        upload_id: str,
        body: bytes | None,
        delivered: int,
    ) -> None:
        record = await store.upload_record(run_id, step, upload_id) if run else None
        if run is None or record is None or record["state"] != UPLOAD_QUEUED:
            await store.ack(run_id, entry_id)  # run deleted, or the job was already finished
            return
        if delivered > self.settings.max_attempts:
            last = record.get("last_error") or "the worker was lost while processing it"
            await self._dead(store, run_id, step, upload_id, entry_id, delivered - 1, last)
            return
        if body is None:
            error = "raw upload expired or deleted before it was sketched (raw_ttl_s)"
            await self._dead(store, run_id, step, upload_id, entry_id, delivered, error)
            return
        started = time.perf_counter()
        sketcher = sketcher_for(run["sketch"], run.get("parameters"))
        part = await asyncio.get_running_loop().run_in_executor(
            self._sketching, sketch_upload, body, fields[b"kind"].decode(), sketcher, self.device
        )
        await store.complete_upload(run_id, step, upload_id, entry_id, part)
        record_rows_sketched(int(record["rows"]))
        record_job(time.perf_counter() - started, "ok")
        self.processed += 1
        log.info("sketched upload %s of %s/%d (%s)", upload_id, run_id, step, self.name)

    async def _failed(
        self,
        store: Store,
        run_id: str,
        step: int,
        upload_id: str,
        entry_id: bytes,
        delivered: int,
        exc: Exception,
    ) -> None:
        """A job failed (bad data, a bug, a sketcher error): retried by whoever reclaims it
        after claim_idle_ms, dead-lettered after max_attempts deliveries."""
        error = f"{type(exc).__name__}: {exc}"[:2000]
        log.warning("job %s (upload %s) failed: %s", entry_id, upload_id, error)
        if delivered >= self.settings.max_attempts:
            await self._dead(store, run_id, step, upload_id, entry_id, delivered, error)
        else:  # stays pending; reclaimed after claim_idle_ms by any worker
            await store.record_error(run_id, step, upload_id, error)
            record_job(0.0, "retry")

    async def _keep_claimed(self, store: Store, stream: str, held: set[bytes]) -> None:
        """While jobs are held (being sketched, or waiting in the batch), reset their idle time
        (XCLAIM JUSTID to ourselves, which does not count as a delivery) so that they are not
        taken over by another worker as if this one had died."""
        period = max(self.settings.claim_idle_ms / 3000.0, 0.05)
        while True:
            await asyncio.sleep(period)
            if not held:
                continue
            with contextlib.suppress(RedisError):  # a missed beat only risks a duplicate run
                await store.redis.xclaim(stream, GROUP, self.name, 0, list(held), justid=True)

    async def _dead(
        self,
        store: Store,
        run_id: str,
        step: int,
        upload_id: str,
        entry_id: bytes,
        attempts: int,
        error: str,
    ) -> None:
        log.error("dead-lettering upload %s of %s/%d: %s", upload_id, run_id, step, error)
        self.failed += 1
        record_job(0.0, "dead_letter")
        await store.dead_letter(run_id, step, upload_id, entry_id, error, attempts)


async def run_until_stopped(worker: Worker, stop: asyncio.Event, timeout_s: float) -> None:
    """``worker.run(stop)``, cancelled when it has not returned ``timeout_s`` after ``stop``
    is set: a job cut short is not acknowledged, so it stays queued (at-least-once)."""
    running = asyncio.ensure_future(worker.run(stop))
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({running, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not running.done():
            await asyncio.wait({running}, timeout=timeout_s)
        if not running.done():
            log.warning("still busy %.0f s after the stop; its job stays queued", timeout_s)
            running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
    finally:
        stopped.cancel()
