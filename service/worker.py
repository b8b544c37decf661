"""The stream worker: sketch queued uploads into partial sketches (architecture.md, step 4).

One loop, arq-like, over the job queue (:mod:`service.queue`)::

    read a batch of Jobs: stale ones first (their worker died), else new ones (blocking)
    keep the batch claimed while it is in hand; per job, the next raw body fetched meanwhile:
        process(job): sketch in a thread -> store the part, mark done, unlink raw, ack (one MULTI)
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
import warnings
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from redis import Redis as SyncRedis
from redis.asyncio import Redis
from redis.exceptions import RedisError

from service.metrics import record_job, record_rows_sketched, record_worker_heartbeat
from service.parts import Part, RowKind, encode_part, read_rows
from service.queue import Batch, Job, Queue
from service.settings import Settings
from service.store import REDIS_DOWN, UPLOAD_QUEUED, Store, connect
from service.uploads import ParsedUpload, TensorInfo, read_header
from sketch.base import Sketcher
from sketch.spec import sketcher_for

log = logging.getLogger("kernelscope.worker")


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
    entries, metadata = read_header(body)
    ids, row_kind = read_rows(metadata)
    # views of the body, not safetensors' loader, which would copy the upload once more
    return sketch_tensors(upload_tensors(body, entries), ids, row_kind, kind, sketcher, device)


def sketch_tensors(
    tensors: Mapping[str, torch.Tensor],
    ids: list[str],
    row_kind: RowKind,
    kind: str,
    sketcher: Sketcher,
    device: torch.device,
) -> bytes:
    """:func:`sketch_upload` of an upload's tensors already read (``[n, ...]`` each)."""
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


_TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def upload_tensors(
    body: bytes | bytearray, entries: Mapping[str, TensorInfo]
) -> dict[str, torch.Tensor]:
    """The tensors of a validated upload body as views of it (no copy), from its header's
    ``entries`` (:func:`service.uploads.read_header`).  A worker's body fetched from Redis
    is read-only ``bytes``: torch shares it with a warning that writing would be undefined,
    and nothing here writes."""
    tensors: dict[str, torch.Tensor] = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        for name, info in entries.items():
            dtype = _TORCH_DTYPES[info.dtype]
            count = (info.end - info.start) // dtype.itemsize
            flat = torch.frombuffer(body, dtype=dtype, count=count, offset=info.start)
            tensors[name] = flat.view(info.shape)
    return tensors


class ReceiptSketcher:
    """Sketches uploads in the process that receives them (``Store.accept_upload(sketch=...)``).

    An API process holds one when it runs stream workers of its own on ``device`` (embedded
    mode, ``kernelscope serve`` with in-process workers): sketching the body it has just
    validated then costs less than the claim check's round trip of the body through Redis.
    ``threads`` sketches at once (one per in-process worker: the device's share), in threads
    of their own, so that the API's event loop keeps serving (torch releases the GIL).
    """

    def __init__(self, device: str = "auto", threads: int = 1) -> None:
        self.device = resolve_device(device)
        self._pool = ThreadPoolExecutor(max(threads, 1), thread_name_prefix="sketch-on-receipt")

    async def sketch(
        self, body: bytearray, parsed: ParsedUpload, kind: str, run: Mapping[str, Any]
    ) -> bytes:
        """The stored part of a validated upload of ``run`` (see :func:`sketch_upload`)."""

        def sketch() -> bytes:
            # in the thread: a run's first upload builds its sketcher (a Gaussian's matrices)
            sketcher = sketcher_for(run["sketch"], run.get("parameters"))
            ids, row_kind = read_rows(parsed.metadata)
            tensors = upload_tensors(body, parsed.tensors)
            return sketch_tensors(tensors, ids, row_kind, kind, sketcher, self.device)

        return await asyncio.get_running_loop().run_in_executor(self._pool, sketch)

    def close(self) -> None:
        """Stop the sketch threads (a sketch in progress finishes unobserved)."""
        self._pool.shutdown(wait=False, cancel_futures=True)


class Worker:
    """A consumer of the job queue.

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
        self._in_hand: Job | None = None  # the job being processed, for the hand-back

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Process jobs until ``stop`` is set."""
        stop = stop or asyncio.Event()
        self._stop = stop
        s = self.settings
        redis = self._redis
        bulk: SyncRedis | None = None
        if redis is None:
            if not s.redis_url:
                raise RuntimeError("the worker needs a Redis: set REDIS_URL or --redis-url")
            # Every command bounded; the blocking read gets its block time on top. Raw bodies
            # are read with the blocking client in a thread (Store.raw_body).
            redis, bulk = connect(s, s.worker_block_ms / 1000)
        self.store = Store(
            redis, s.key_prefix, s.raw_ttl_s, bulk=bulk, dead_max=s.dead_letter_max, shards=s.shards
        )
        self.queue: Queue = self.store.queue
        # Not the loop's default executor, which the loop's close waits for: a sketch cut
        # short at the shutdown deadline must not hold the exit up.
        self._sketching = ThreadPoolExecutor(1, thread_name_prefix=f"sketch-{self.name}")
        try:
            if await self._join(stop):
                streams = self.queue.keys.streams
                where = streams[0] if len(streams) == 1 else f"{len(streams)} job streams"
                log.info("worker %s on %s reading %s", self.name, self.device, where)
            while not stop.is_set():
                record_worker_heartbeat(self.name)
                try:
                    batches = await self.queue.read(
                        self.name, s.worker_batch, s.worker_block_ms, s.claim_idle_ms
                    )
                    for index, batch in enumerate(batches):
                        for _ in range(batch.rejected):  # dead-lettered as they were read
                            record_job(0.0, "dead_letter")
                        if index and stop.is_set():  # only the first batch's job in hand
                            await self.queue.hand_back(self.name, batch.jobs, s.claim_idle_ms)
                        elif batch.jobs:
                            await self._batch(batch)
                except REDIS_DOWN as exc:
                    # Redis restarting or unreachable: jobs in hand stay pending and are
                    # reclaimed; a Redis that lost the group (no persistence) gets it back.
                    log.warning("redis error (%s: %s); retrying in 1 s", type(exc).__name__, exc)
                    await asyncio.sleep(1.0)
                    with contextlib.suppress(*REDIS_DOWN):
                        await self.queue.ensure_group()
        finally:
            self._sketching.shutdown(wait=False, cancel_futures=True)
            await self.queue.leave(self.name)
            if self._redis is None:
                await redis.aclose()
            if bulk is not None:
                bulk.close()

    async def _join(self, stop: asyncio.Event) -> bool:
        """Join the consumer group, waiting for Redis if it is down (a worker started before
        its Redis, by compose or a restart, must not exit).  False if stopped first."""
        while not stop.is_set():
            try:
                await self.queue.join(self.name)
                return True
            except REDIS_DOWN as exc:
                log.warning("redis unreachable (%s: %s); retrying in 1 s", type(exc).__name__, exc)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=1.0)
        return False

    async def _batch(self, batch: Batch) -> None:
        """Process a batch's jobs in order, each job's raw body fetched while the one before
        is sketched (at most two bodies in memory, whatever ``worker_batch`` is).

        Every job of the batch is kept claimed until it is finished or has failed: a job
        waiting behind others is not a lost one, and must not be reclaimed (each claim counts
        a delivery).  Once the worker is asked to stop, the job in hand is finished and the
        rest goes back to the queue.
        """
        jobs = batch.jobs
        held = set(jobs)
        keep = asyncio.create_task(self._keep_claimed(held))
        upcoming: asyncio.Task[bytes | None] | None = self._fetch(jobs[0])
        try:
            if self.settings.worker_stall_s:
                await asyncio.sleep(self.settings.worker_stall_s)
            for index, job in enumerate(jobs):
                body = None if upcoming is None else await upcoming
                upcoming = self._fetch(jobs[index + 1]) if index + 1 < len(jobs) else None
                self._in_hand = job
                try:
                    await self.process(job, body)
                except REDIS_DOWN:
                    raise  # the loop waits for Redis; the job stays pending
                except Exception as exc:  # this job's failure, never the loop's
                    await self._failed(job, exc)
                # finished, dead-lettered, or failed (reclaimable after claim_idle_ms)
                held.discard(job)
                self._in_hand = None
                del body
                if self._stop.is_set():
                    break  # not held while the next job's body is awaited
        finally:
            if upcoming is not None:
                upcoming.cancel()
            keep.cancel()
            if held:  # stopped, or cut short at the shutdown deadline: back to the queue
                with contextlib.suppress(*REDIS_DOWN):
                    idle_ms = self.settings.claim_idle_ms
                    await self.queue.hand_back(self.name, held, idle_ms, self._in_hand)

    def _fetch(self, job: Job) -> asyncio.Task[bytes | None]:
        return asyncio.create_task(self.store.raw_body(job.run_id, job.step, job.upload_id))

    async def process(self, job: Job, body: bytes | None) -> None:
        """Settle one job: sketch its upload (``body``, None where the claim check is gone)
        and store the part; or acknowledge a job with nothing left to do (run deleted, upload
        already finished); or dead-letter one past ``max_attempts`` or without its body.
        A failure raises, and the job stays pending for a retry (see :meth:`_failed`)."""
        run, record = await self.store.job_state(job)
        if run is None or record is None or record["state"] != UPLOAD_QUEUED:
            await self.queue.ack(job)
            return
        if job.deliveries > self.settings.max_attempts:
            last = record.get("last_error") or "the worker was lost while processing it"
            await self._dead(job, job.deliveries - 1, last)
            return
        if body is None:
            error = "raw upload expired or deleted before it was sketched (raw_ttl_s)"
            await self._dead(job, job.deliveries, error)
            return
        started = time.perf_counter()
        sketcher = sketcher_for(run["sketch"], run.get("parameters"))
        part = await asyncio.get_running_loop().run_in_executor(
            self._sketching, sketch_upload, body, job.kind, sketcher, self.device
        )
        await self.store.complete_upload(job, part)
        record_rows_sketched(int(record["rows"]))
        record_job(time.perf_counter() - started, "ok")
        self.processed += 1
        log.info("sketched upload %s of %s/%d (%s)", job.upload_id, job.run_id, job.step, self.name)

    async def _failed(self, job: Job, exc: Exception) -> None:
        """A job failed (bad data, a bug, a sketcher error): retried by whoever reclaims it
        after claim_idle_ms, dead-lettered after max_attempts deliveries."""
        error = f"{type(exc).__name__}: {exc}"[:2000]
        log.warning("job %s (upload %s) failed: %s", job.entry_id, job.upload_id, error)
        if job.deliveries >= self.settings.max_attempts:
            await self._dead(job, job.deliveries, error)
        else:  # stays pending; reclaimed after claim_idle_ms by any worker
            await self.store.record_error(job, error)
            record_job(0.0, "retry")

    async def _keep_claimed(self, held: set[Job]) -> None:
        """While jobs are held (being sketched, or waiting in the batch), keep them claimed
        (:meth:`Queue.keep_claimed`, a third of ``claim_idle_ms`` apart) so that they are not
        taken over by another worker as if this one had died."""
        period = max(self.settings.claim_idle_ms / 3000.0, 0.05)
        while True:
            await asyncio.sleep(period)
            if held:
                with contextlib.suppress(RedisError):  # a missed beat only risks a duplicate
                    await self.queue.keep_claimed(self.name, list(held))

    async def _dead(self, job: Job, attempts: int, error: str) -> None:
        log.error(
            "dead-lettering upload %s of %s/%d: %s", job.upload_id, job.run_id, job.step, error
        )
        self.failed += 1
        record_job(0.0, "dead_letter")
        await self.store.dead_letter(job, error, attempts)


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
