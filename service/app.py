"""The FastAPI application: ``create_app(settings) -> FastAPI`` (REST API v1, architecture.md).

Run it with ``python -m uvicorn service.app:create_app --factory`` (settings from the
environment) or through ``kernelscope serve``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from redis.asyncio import Redis

from service.errors import install_problem_handlers
from service.metrics import QueryLatencyMiddleware
from service.routers import analysis, dashboard, health, metrics, runs, steps, uploads
from service.settings import Settings
from service.store import Store


def create_app(settings: Settings | None = None, *, redis: Redis | None = None) -> FastAPI:
    """Build the API.

    ``settings`` defaults to ``Settings()`` (environment).  ``redis`` injects a client (embedded
    mode); otherwise one is made from ``settings.redis_url``, which must then be set.
    """
    settings = settings or Settings()
    owns_redis = redis is None
    if redis is None:
        if not settings.redis_url:
            raise RuntimeError(
                "no Redis configured: set REDIS_URL (or run `kernelscope serve` for embedded mode)"
            )
        redis = Redis.from_url(settings.redis_url, decode_responses=False)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await app.state.store.ensure_group()
        yield
        if owns_redis:
            await app.state.redis.aclose()

    app = FastAPI(
        title="kernelscope",
        version="1.0",
        summary="Sketched Fisher kernels and entropy-change predictions of RL fine-tuning steps.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.redis = redis
    app.state.store = Store(redis, settings.key_prefix, settings.raw_ttl_s, settings.cache_ttl_s)
    install_problem_handlers(app)
    app.add_middleware(QueryLatencyMiddleware)
    for module in (runs, steps, uploads, analysis, health, metrics, dashboard):
        app.include_router(module.router)
    return app
