"""Prometheus metrics of the API and the workers (`GET /metrics`).

Two kinds of numbers:

* **Event counters and histograms**, recorded where the event happens (upload route, worker,
  query middleware): module-level ``prometheus_client`` objects.  They are
  multiprocess-safe: when ``PROMETHEUS_MULTIPROC_DIR`` is set *before* ``prometheus_client`` is
  first imported (``kernelscope serve`` / compose set it for the API and the workers alike),
  every process writes its values to memory-mapped files in that directory and
  :func:`metrics_response` sums them over processes, so one scrape of the API also shows the
  rows sketched by separate worker processes.
* **Queue state**, read from Redis at scrape time by :meth:`service.queue.Queue.stats` and
  exposed by :class:`QueueCollector` (stream length, jobs not yet delivered,
  delivered-but-unacknowledged jobs, dead letters, and the idle time of each worker
  consumer).  Being read from the shared
  Redis, these are correct across any number of API replicas and workers without multiprocess
  files.

Metric names (all prefixed ``kernelscope_``):

================================================  =========  ================================
name                                              type       labels
================================================  =========  ================================
``uploads_total``                                 counter    ``kind``, ``outcome``
``upload_bytes_total``                            counter    ``kind``, ``outcome``
``upload_rows_total``                             counter    ``kind``, ``outcome``
``rows_sketched_total``                           counter    --
``jobs_total``                                    counter    ``outcome``
``job_latency_seconds``                           histogram  --
``query_latency_seconds``                         histogram  ``method``, ``endpoint``
``worker_heartbeat_timestamp_seconds``            gauge      ``worker``
``redis_up``                                      gauge      -- (scrape time)
``queue_length``                                  gauge      -- (scrape time, Redis)
``queue_undelivered``                             gauge      -- (scrape time, Redis)
``queue_pending``                                 gauge      -- (scrape time, Redis)
``queue_depth``                                   gauge      -- undelivered + pending
``dead_letters``                                  gauge      -- (scrape time, Redis)
``worker_consumer_idle_seconds``                  gauge      ``consumer`` (scrape time)
================================================  =========  ================================
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from service.queue import QueueStats

NAMESPACE = "kernelscope"

UPLOAD_KINDS = ("gradients", "sketches")
"""``kind`` label values of the upload metrics: the two upload routes."""

uploads_total = Counter(
    "uploads",
    "Uploads received (gradients or client sketches), by outcome (accepted: queued for a worker, "
    "sketched: sketched on receipt, duplicate, or the 4xx reason).",
    ["kind", "outcome"],
    namespace=NAMESPACE,
)
upload_bytes_total = Counter(
    "upload_bytes",
    "Bytes of upload bodies received, by outcome.",
    ["kind", "outcome"],
    namespace=NAMESPACE,
)
upload_rows_total = Counter(
    "upload_rows",
    "Rows (sequences) in upload bodies received, by outcome.",
    ["kind", "outcome"],
    namespace=NAMESPACE,
)
rows_sketched_total = Counter(
    "rows_sketched",
    "Rows sketched (by workers, or by the API on receipt) and stored as partial sketches.",
    namespace=NAMESPACE,
)
jobs_total = Counter(
    "jobs",
    "Stream jobs finished by workers, by outcome (ok, retry, dead_letter).",
    ["outcome"],
    namespace=NAMESPACE,
)
job_latency = Histogram(
    "job_latency_seconds",
    "Seconds a worker spent on one successful job, from taking it up to acknowledging it.",
    namespace=NAMESPACE,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
query_latency = Histogram(
    "query_latency_seconds",
    "Seconds to answer an HTTP request, by method and route template (not the raw path).",
    ["method", "endpoint"],
    namespace=NAMESPACE,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
# "max" keeps the newest beat of each worker label across the per-process files; a worker's
# label is its consumer name, so two processes never share one.
worker_heartbeat = Gauge(
    "worker_heartbeat_timestamp_seconds",
    "Unix time of the last heartbeat (loop iteration) of each worker.",
    ["worker"],
    namespace=NAMESPACE,
    multiprocess_mode="max",
)


_OUTCOME_BY_STATUS = {
    400: "invalid",
    401: "unauthorized",
    404: "unknown_run",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid",
    503: "busy",
}


def upload_outcome(status: int) -> str:
    """The ``outcome`` label of a rejected upload from its HTTP status (a bounded set)."""
    return _OUTCOME_BY_STATUS.get(int(status), "rejected" if 400 <= status < 500 else "error")


def record_upload(outcome: str, nbytes: int, rows: int, kind: str = "gradients") -> None:
    """Count one upload body: ``outcome`` is ``accepted`` (queued), ``sketched`` (sketched on
    receipt: the API's path that skips the queue), ``duplicate`` or a short failure reason
    (``invalid``, ``too_large``, ``unsupported_media_type``, ``unknown_run``, ...);
    ``nbytes`` the body length in bytes; ``rows`` its row count (0 when unreadable);
    ``kind`` ``gradients`` or ``sketches`` (the route)."""
    uploads_total.labels(kind=kind, outcome=outcome).inc()
    upload_bytes_total.labels(kind=kind, outcome=outcome).inc(max(int(nbytes), 0))
    upload_rows_total.labels(kind=kind, outcome=outcome).inc(max(int(rows), 0))


def record_rows_sketched(n: int) -> None:
    """Count ``n`` rows sketched and stored, by a worker or on receipt."""
    rows_sketched_total.inc(max(int(n), 0))


def record_job(seconds: float, outcome: str = "ok") -> None:
    """Record one finished job: its latency (only for ``ok``) and its outcome count."""
    jobs_total.labels(outcome=outcome).inc()
    if outcome == "ok":
        job_latency.observe(max(float(seconds), 0.0))


def record_worker_heartbeat(worker: str, now: float | None = None) -> None:
    """Set the heartbeat gauge of ``worker`` to ``now`` (unix seconds, default the clock)."""
    worker_heartbeat.labels(worker=worker).set(time.time() if now is None else now)


def observe_query(endpoint: str, seconds: float, method: str = "GET") -> None:
    """Record the latency of one request to the route template ``endpoint``."""
    query_latency.labels(method=method, endpoint=endpoint).observe(max(float(seconds), 0.0))


# --- query latency middleware -----------------------------------------------------------------

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

EXCLUDED_PATHS = frozenset({"/metrics"})
"""Paths not timed: a scrape timing itself would only add noise."""


class QueryLatencyMiddleware:
    """Pure ASGI middleware that times every HTTP request into ``query_latency``.

    The ``endpoint`` label is the matched route's template (``/v1/runs/{run_id}/steps/{step}``),
    which Starlette's router writes into ``scope["route"]``; unmatched requests are labelled
    ``unmatched`` so that scanners cannot blow up the label cardinality.  Add it with
    ``app.add_middleware(QueryLatencyMiddleware)``.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http" or scope.get("path") in EXCLUDED_PATHS:
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            observe_query(endpoint, time.perf_counter() - start, scope.get("method", "GET"))


def query_latency_middleware(app: ASGIApp) -> QueryLatencyMiddleware:
    """Factory form of :class:`QueryLatencyMiddleware` (``app = query_latency_middleware(app)``)."""
    return QueryLatencyMiddleware(app)


# --- queue state read from Redis at scrape time -----------------------------------------------


class QueueCollector(Collector):
    """Exposes one :class:`QueueStats` read at scrape time (``None``: Redis unreachable).

    Never registered globally: :func:`render_metrics` adds it to a per-scrape registry.
    """

    def __init__(self, stats: QueueStats | None) -> None:
        self.stats = stats

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily(
            f"{NAMESPACE}_redis_up", "1 when the scrape could read the job queue from Redis."
        )
        up.add_metric([], 0.0 if self.stats is None else 1.0)
        yield up
        stats = self.stats
        if stats is None:
            return
        for name, doc, value in (
            ("queue_length", "Entries in the job stream.", stats.length),
            ("queue_undelivered", "Jobs not yet read by any worker.", stats.undelivered),
            ("queue_pending", "Jobs read by a worker but not acknowledged.", stats.pending),
            ("queue_depth", "Jobs not finished: undelivered + pending.", stats.depth),
            ("dead_letters", "Jobs in the dead-letter stream.", stats.dead),
        ):
            family = GaugeMetricFamily(f"{NAMESPACE}_{name}", doc)
            family.add_metric([], float(value))
            yield family
        idle = GaugeMetricFamily(
            f"{NAMESPACE}_worker_consumer_idle_seconds",
            "Seconds since each worker consumer of the job group last read the stream.",
            labels=["consumer"],
        )
        for consumer, seconds in sorted(stats.consumer_idle_s.items()):
            idle.add_metric([consumer], seconds)
        yield idle


def multiprocess_dir() -> str | None:
    """The multiprocess directory in force, or ``None`` in single-process mode."""
    # prometheus-client also honours the deprecated lower-case spelling
    env = os.environ
    return env.get("PROMETHEUS_MULTIPROC_DIR") or env.get("prometheus_multiproc_dir")


def render_metrics(extra: Iterable[Collector] = ()) -> bytes:
    """The Prometheus text exposition of every metric, plus ``extra`` collectors.

    In multiprocess mode the values are summed over the per-process files (counters and
    histograms add; the heartbeat gauge takes the max); otherwise they come from this
    process's default registry (with the process and GC collectors).
    """
    registry = CollectorRegistry(auto_describe=False)
    for collector in extra:
        registry.register(collector)
    tail = generate_latest(registry)
    if multiprocess_dir() is not None:
        merged = CollectorRegistry(auto_describe=False)
        multiprocess.MultiProcessCollector(merged)
        return generate_latest(merged) + tail
    return generate_latest(REGISTRY) + tail


def metrics_response(extra: Iterable[Collector] = ()) -> tuple[bytes, str]:
    """``(body, content_type)`` of a ``GET /metrics`` answer; see :func:`render_metrics`."""
    return render_metrics(extra), CONTENT_TYPE_LATEST


def mark_process_dead(pid: int | None = None) -> None:
    """Drop a finished process's live gauges from the multiprocess files (call at exit)."""
    if multiprocess_dir() is not None:
        multiprocess.mark_process_dead(os.getpid() if pid is None else pid)
