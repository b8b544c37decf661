"""``GET /healthz``: liveness plus a Redis ping (``/metrics`` and ``/`` have their own routers)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError

from service.deps import StoreDep
from service.schemas import Health

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
    except (RedisError, OSError) as exc:
        ok, detail = False, f"{type(exc).__name__}: {exc}"
    body = Health(status="ok" if ok else "degraded", redis=ok, detail=detail)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)
