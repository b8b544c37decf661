"""``GET /healthz`` (liveness plus a Redis ping) and ``GET /readyz`` (the job queue is served);
``/metrics`` and ``/`` have their own routers."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service.deps import SettingsDep, StoreDep
from service.schemas import Health, Ready
from service.store import REDIS_DOWN

router = APIRouter(tags=["health"])


@router.get(
    "/healthz",
    response_model=Health,
    responses={
        503: {"model": Health, "description": "Redis does not answer (the reason in detail)"}
    },
)
async def healthz(store: StoreDep) -> JSONResponse:
    """200 ``ok`` when Redis answers PING, else 503 ``degraded``."""
    try:
        ok = bool(await store.redis.ping())
        detail = None
    except REDIS_DOWN as exc:
        ok, detail = False, f"{type(exc).__name__}: {exc}"
    body = Health(status="ok" if ok else "degraded", redis=ok, detail=detail)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


@router.get(
    "/readyz",
    response_model=Ready,
    responses={
        503: {"model": Ready, "description": "Redis down, or jobs wait with no live worker"}
    },
)
async def readyz(store: StoreDep, settings: SettingsDep) -> JSONResponse:
    """200 ``ready`` when Redis answers and the job queue is served: nothing waits, or some
    worker touched the queue (read, claim, keep-claimed) within ``worker_stale_s``.  Else 503
    ``not_ready`` with the reason: uploads are accepted but would never be sketched."""
    try:
        stats = await store.queue.stats()
    except REDIS_DOWN as exc:
        body = Ready(status="not_ready", redis=False, detail=f"{type(exc).__name__}: {exc}")
        return JSONResponse(
            body.model_dump(), 503, headers={"Retry-After": str(settings.retry_after_s)}
        )
    live = sum(idle <= settings.worker_stale_s for idle in stats.consumer_idle_s.values())
    ready = stats.depth == 0 or live > 0
    detail = None
    if not ready:
        detail = (
            f"{stats.depth} jobs wait and no worker touched the queue in the last "
            f"{settings.worker_stale_s:g} s"
        )
    body = Ready(
        status="ready" if ready else "not_ready",
        redis=True,
        queue_depth=stats.depth,
        live_workers=live,
        detail=detail,
    )
    headers = None if ready else {"Retry-After": str(settings.retry_after_s)}
    return JSONResponse(body.model_dump(), 200 if ready else 503, headers=headers)
