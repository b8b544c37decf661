"""``GET /metrics``: the Prometheus text exposition (see :mod:`service.metrics`).

Not behind the bearer token, as Prometheus scrapers usually are not given one; it exposes
counts and latencies only, never run ids or data.  The queue gauges are read from the app's
Redis (``app.state.redis``) at scrape time; if Redis does not answer within a second the scrape
still succeeds with ``kernelscope_redis_up 0``.
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Request
from fastapi.responses import Response

from service.metrics import QueueCollector, metrics_response
from service.queue import QueueStats

router = APIRouter(include_in_schema=False)
log = logging.getLogger(__name__)

SCRAPE_REDIS_TIMEOUT_S = 1.0


async def queue_stats_of(request: Request) -> QueueStats | None:
    """The app's job-queue state, or ``None`` when Redis cannot be read."""
    store = getattr(request.app.state, "store", None)
    if store is None:
        return None
    try:  # the queue of the layout the app stores with (sharded on a cluster)
        return await asyncio.wait_for(store.queue.stats(), SCRAPE_REDIS_TIMEOUT_S)
    except Exception as exc:  # a scrape must answer even when Redis is down
        log.warning("metrics scrape could not read the job queue: %s", exc)
        return None


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Every kernelscope metric (multiprocess-merged when ``PROMETHEUS_MULTIPROC_DIR`` is set)."""
    stats = await queue_stats_of(request)
    body, content_type = metrics_response([QueueCollector(stats)])
    return Response(body, media_type=content_type)
