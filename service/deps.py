"""FastAPI dependencies, in one place: settings, Redis client, store, auth, path parameters."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Header, Path, Request
from redis.asyncio import Redis

from service.auth import check_bearer
from service.errors import ProblemError
from service.keys import ID_PATTERN
from service.settings import Settings
from service.store import Store

RunId = Annotated[str, Path(pattern=ID_PATTERN, description="run id, [A-Za-z0-9._:-]{1,128}")]
StepNo = Annotated[int, Path(ge=0, le=1 << 53, description="optimisation step, >= 0")]


def get_settings(request: Request) -> Settings:
    """The app's settings (``app.state.settings``)."""
    settings: Settings = request.app.state.settings
    return settings


def get_redis(request: Request) -> Redis:
    """The app's binary-safe Redis client (``app.state.redis``)."""
    redis: Redis = request.app.state.redis
    return redis


def get_store(request: Request) -> Store:
    """The app's :class:`service.store.Store`."""
    store: Store = request.app.state.store
    return store


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[Store, Depends(get_store)]


async def require_token(
    settings: SettingsDep,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> None:
    """401 unless the bearer token matches (only when ``KERNELSCOPE_TOKEN`` is set)."""
    check_bearer(authorization, settings.token)


async def get_run(run_id: RunId, store: StoreDep) -> dict[str, Any]:
    """The stored run, or a 404 problem."""
    run = await store.get_run(run_id)
    if run is None:
        raise ProblemError(404, f"unknown run {run_id!r}")
    return run


RunDep = Annotated[dict[str, Any], Depends(get_run)]
