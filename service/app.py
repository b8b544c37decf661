"""The FastAPI application: ``create_app(settings) -> FastAPI`` (REST API v1, architecture.md).

Run it with ``python -m uvicorn service.app:create_app --factory`` (settings from the
environment) or through ``kernelscope serve``.

The app starts and keeps answering while Redis is down: every Redis-touching route answers a
503 problem and ``/healthz`` a 503 with the reason, and both recover by themselves when Redis
returns (the client reconnects per command; the job stream's consumer group, which the
lifespan could not create, is created by the first request that finds Redis up).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from redis import Redis as SyncRedis
from redis.asyncio import Redis
from starlette.types import ASGIApp, Receive, Scope, Send

from service.auth import RequestGate
from service.errors import (
    RequestIdMiddleware,
    install_problem_handlers,
    install_problem_openapi,
    install_request_id_logging,
)
from service.metrics import QueryLatencyMiddleware
from service.routers import analysis, dashboard, health, metrics, runs, steps, tokens, uploads
from service.settings import Settings
from service.store import REDIS_DOWN, Store, connect
from service.uploads import UploadBudget
from service.worker import ReceiptSketcher

log = logging.getLogger(__name__)


async def ensure_group_once(app: FastAPI) -> bool:
    """Create the job stream's consumer group unless done already; False while Redis is down."""
    if app.state.group_ready:
        return True
    try:
        await app.state.store.queue.ensure_group()
    except REDIS_DOWN as exc:
        log.warning("Redis unavailable, job stream group not created yet: %s", exc)
        return False
    app.state.group_ready = True
    return True


class _LazyGroupMiddleware:
    """Before a request, create the consumer group if the lifespan could not (Redis down at
    startup).  Costs one attribute test per request once the group exists."""

    def __init__(self, app: ASGIApp, owner: FastAPI) -> None:
        self.app = app
        self.owner = owner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self.owner.state.group_ready:
            await ensure_group_once(self.owner)
        await self.app(scope, receive, send)


def create_app(
    settings: Settings | None = None,
    *,
    redis: Redis | None = None,
    sketch_device: str | None = None,
    sketch_threads: int = 1,
) -> FastAPI:
    """Build the API.

    ``settings`` defaults to ``Settings()`` (environment).  ``redis`` injects a client (embedded
    mode); otherwise one is made from ``settings.redis_url``, which must then be set.
    ``sketch_device``: this process runs ``sketch_threads`` stream workers of its own on that
    device (``kernelscope serve``), so it sketches uploads on receipt (201) unless
    ``settings.sketch_on_receipt`` is off; None (an API beside separate workers): every upload
    is queued (202).
    """
    settings = settings or Settings()
    install_request_id_logging()
    owns_redis = redis is None
    bulk: SyncRedis | None = None
    if redis is None:
        if not settings.redis_url:
            raise RuntimeError(
                "no Redis configured: set REDIS_URL (or run `kernelscope serve` for embedded mode)"
            )
        # Upload bodies go through the blocking client in a thread: no copies (Store.add_upload).
        redis, bulk = connect(settings)
    receipt: ReceiptSketcher | None = None
    if sketch_device is not None and settings.sketch_on_receipt:
        receipt = ReceiptSketcher(sketch_device, sketch_threads)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Never fail startup on Redis: the app answers 503 until Redis is back.
        await ensure_group_once(app)
        yield
        if receipt is not None:
            receipt.close()
        if owns_redis:
            await app.state.redis.aclose()
        if bulk is not None:
            bulk.close()

    app = FastAPI(
        title="kernelscope",
        version="1.0",
        summary="Sketched Fisher kernels and entropy-change predictions of RL fine-tuning steps.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.redis = redis
    app.state.store = Store(
        redis,
        settings.key_prefix,
        settings.raw_ttl_s,
        settings.cache_ttl_s,
        bulk=bulk,
        shards=settings.shards,
    )
    app.state.receipt_sketcher = receipt
    app.state.group_ready = False
    # Set by the server that runs the app when it begins to stop (``kernelscope serve``):
    # long-polls then answer 503 at once instead of holding the shutdown up.
    app.state.draining = threading.Event()
    app.state.upload_budget = UploadBudget(int(settings.max_uploads_mb * 1024 * 1024))
    install_problem_handlers(app)
    # add_middleware wraps outwards: the request id is set before anything else runs.
    app.add_middleware(_LazyGroupMiddleware, owner=app)
    app.add_middleware(RequestGate, token=settings.token, max_json_bytes=settings.max_json_bytes)
    app.add_middleware(QueryLatencyMiddleware)
    app.add_middleware(RequestIdMiddleware)
    for module in (runs, steps, uploads, analysis, tokens, health, metrics, dashboard):
        app.include_router(module.router)
    install_problem_openapi(app)
    return app
