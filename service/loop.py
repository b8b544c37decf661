"""The event loop of the service's own threads and processes.

uvloop where it is installed (``uvicorn[standard]`` brings it), as ``uvicorn.run`` picks with
``loop="auto"``; the standard asyncio loop otherwise.  The API serves upload bodies of tens
of megabytes: on the standard loop, reading one from the socket took 2-3x as long (about
190 MB/s against 460 MB/s end to end for 16 MB uploads, bench/service.py's set-up).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar, cast

T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """``uvloop.new_event_loop`` where importable, else ``None`` (asyncio's default)."""
    try:
        import uvloop
    except ImportError:
        return None
    return cast(Callable[[], asyncio.AbstractEventLoop], uvloop.new_event_loop)


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on the loop of :func:`loop_factory`."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)
