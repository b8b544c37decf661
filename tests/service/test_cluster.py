"""kernelscope on a real Redis Cluster: three masters that the tests start (``redis_cluster``).

On a cluster a transaction must stay within one hash slot.  Storing an upload and finishing a
job write a run's keys and its job stream in one transaction, so the runs are spread over
``KERNELSCOPE_QUEUE_SHARDS`` slot tags, each with its own job stream that every worker reads
(``service/keys.py``).  Here: the key layout keeps every transaction in one slot; the service
end to end (several runs on several nodes, sharded uploads, deletion); a worker SIGKILLed
holding a job; and bench/load.py and bench/chaos.py at CI size, with the same checks as on
one Redis.
"""

from __future__ import annotations

import signal
import sys
from typing import Any

import httpx
import numpy as np
import pytest
from redis.crc import key_slot

from service.keys import GROUP, Keys
from tests.service.conftest import (
    REPO,
    LiveService,
    StepData,
    assert_kernel_close,
    safetensors_body,
)
from tests.service.test_faults import WAIT, expected_kernel, kernel, setup_run, until

CLUSTER = [{"cluster": True}]
CLUSTER_NO_WORKER = [{"cluster": True, "workers": 0}]


def _slot(key: str) -> int:
    return int(key_slot(key.encode()))


def test_every_transaction_stays_in_one_slot() -> None:
    """The keys that share a transaction (upload: raw, uploads, steps, stream; finish: the
    same plus part, version, cache, dead letter; status: seqs, ranks, step) hash to one slot,
    and the runs spread over the shards."""
    keys = Keys("ks", 16)
    shards = set()
    for i in range(200):
        run = f"run-{i}"
        together = [
            keys.spec(run),
            keys.steps(run),
            keys.raw(run, 3, "u1"),
            keys.uploads(run, 3),
            keys.part(run, 3, "u1"),
            keys.version(run, 3),
            keys.cache(run, 3),
            keys.seqs(run, 3),
            keys.order(run, 3),
            keys.ranks(run, 3),
            keys.step(run, 3),
            keys.summary(run),
            keys.stream_of(run),
            keys.dead_of(run),
        ]
        assert len({_slot(k) for k in together}) == 1, run
        shards.add(keys.shard(run))
    assert shards == set(range(16))
    assert len({_slot(s) for s in keys.streams}) == 16
    # A run id that extends another's does not share its keys (the SCAN pattern ends at '>').
    assert not keys.spec("a:b").startswith(keys.run_pattern("a").replace("\\", "")[:-1])


def _push_half(http: httpx.Client, run_id: str, data: StepData, rows: slice) -> None:
    tensors = {k: v[rows] for k, v in data.grads.items()}
    r = http.post(
        f"/v1/runs/{run_id}/steps/0/gradients",
        content=safetensors_body(tensors, data.ids[rows]),
        headers={"content-type": "application/octet-stream"},
    )
    assert r.status_code == 202, r.text


@pytest.mark.parametrize("live_service", CLUSTER, indirect=True)
def test_end_to_end_on_a_cluster(live_service: LiveService, step_data: StepData) -> None:
    """Six runs (on more than one master), each step sent as two uploads (sharded by rows):
    every kernel equals the offline sketch's; the run list, the status, the entropy, the
    metrics and readiness work; deleting a run removes its keys only."""
    runs = [f"c{i}" for i in range(6)]
    half = len(step_data.ids) // 2
    client = live_service.redis()
    keys = live_service.keys
    with httpx.Client(base_url=live_service.base_url, timeout=150) as http:
        specs = {run_id: setup_run(http, run_id, step_data) for run_id in runs}
        for run_id in runs:
            _push_half(http, run_id, step_data, slice(0, half))
            _push_half(http, run_id, step_data, slice(half, None))
        for run_id in runs:
            assert_kernel_close(kernel(http, run_id), expected_kernel(specs[run_id], step_data))
            status = http.get(f"/v1/runs/{run_id}/steps/0").json()
            assert status["state"] == "ready" and status["uploads"] == 2
            assert status["rows"] == len(step_data.ids) and status["errors"] == []
            entropy = http.get(f"/v1/runs/{run_id}/steps/0/entropy", params=WAIT)
            assert entropy.status_code == 200 and np.isfinite(entropy.json()["delta_h1"])
        nodes = {client.get_node_from_key(keys.spec(run_id)).name for run_id in runs}
        assert len(nodes) >= 2, nodes
        assert sorted(r["run_id"] for r in http.get("/v1/runs").json()) == runs
        assert http.get("/readyz").status_code == 200
        assert "kernelscope_queue_depth 0.0" in http.get("/metrics").text

        assert http.delete("/v1/runs/c0").status_code == 204
        prefix = live_service.env["KERNELSCOPE_KEY_PREFIX"]
        left = [k.decode() for k in client.scan_iter(match=f"{prefix}:*")]
        assert not [k for k in left if "<r:c0>" in k]
        assert len([k for k in left if k.endswith(":spec")]) == 5
        assert http.get("/v1/runs/c1/steps/0/kernel").status_code == 200
    parts = [k for k in left if ":part:" in k]
    assert len(parts) == 2 * 5  # one partial sketch per upload, nothing doubled
    assert sum(client.xpending(s, GROUP)["pending"] for s in keys.streams) == 0
    assert not any(client.exists(d) for d in keys.deads)
    client.close()


@pytest.mark.parametrize("live_service", CLUSTER_NO_WORKER, indirect=True)
def test_killed_worker_job_is_finished_by_another_on_a_cluster(
    live_service: LiveService, step_data: StepData
) -> None:
    client = live_service.redis()
    keys = live_service.keys
    stalled = live_service.start_worker(worker_stall_s="300")

    def delivered() -> bool:
        return any(client.xpending(s, GROUP)["pending"] for s in keys.streams)

    with httpx.Client(base_url=live_service.base_url, timeout=150) as http:
        run = setup_run(http, "crash", step_data)
        _push_half(http, "crash", step_data, slice(None))
        until(delivered, what="the job to be delivered")
        live_service.stop_worker(stalled, signal.SIGKILL)  # dies holding the job
        assert http.get("/v1/runs/crash/steps/0").json()["state"] == "pending"
        live_service.start_worker(claim_idle_ms="300")
        assert_kernel_close(kernel(http, "crash"), expected_kernel(run, step_data))
        status = http.get("/v1/runs/crash/steps/0").json()
        assert status["uploads"] == 1 and status["errors"] == []
    assert not delivered()
    assert not any(client.exists(d) for d in keys.deads)
    client.close()


def _bench(name: str) -> Any:
    sys.path.insert(0, str(REPO / "bench"))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(REPO / "bench"))


@pytest.mark.slow
def test_load_benchmark_on_a_cluster(redis_cluster: Any, tmp_path: Any) -> None:
    """bench/load.py on the cluster at CI size: the same checks as on one Redis."""
    load = _bench("load")
    cfg = load.LoadConfig(
        trainers=3,
        steps=3,
        sequences=16,
        parameters=4000,
        workers=2,
        redis_url=redis_cluster.url,
        redis_cluster=True,
        max_seconds=300,
    )
    result = load.run_load(cfg, logs=tmp_path)
    assert result.failures == []
    assert result.steps_ready == cfg.trainers * cfg.steps
    assert result.partials == cfg.trainers * cfg.steps
    assert result.retries_deduplicated == cfg.trainers


@pytest.mark.slow
def test_chaos_on_a_cluster(tmp_path: Any) -> None:
    """bench/chaos.py on clusters of three masters of its own: a master SIGKILLed and
    restarted instead of the one Redis, the rest as on one node."""
    load, chaos = _bench("load"), _bench("chaos")
    cfg = load.LoadConfig(trainers=3, steps=6, sequences=16, parameters=4000, workers=2)
    clean = chaos.run_chaos(cfg, inject=False, logs=tmp_path / "clean", masters=3)
    faulty = chaos.run_chaos(cfg, inject=True, logs=tmp_path / "chaos", seed=2, masters=3)
    assert clean.load.failures == [] and faulty.load.failures == []
    assert len(faulty.faults) == 5, faulty.faults
    for result in (clean, faulty):
        figures = chaos.figures(result)
        assert figures.rows_lost == 0 and figures.steps_failed == 0 and figures.duplicates == 0
    assert chaos.kernel_difference(clean, faulty) == 0.0


def test_cluster_fixture_is_a_cluster(redis_cluster: Any) -> None:
    from redis.cluster import RedisCluster

    client = RedisCluster.from_url(redis_cluster.url)
    assert len(client.get_primaries()) == 3
    assert client.cluster_info()["cluster_state"] == "ok"
    client.close()


def test_api_answers_503_while_the_cluster_is_unreachable() -> None:
    """A cluster client that finds no node raises RedisClusterException, which is not a
    RedisError: the API must still start, and answer 503 problems (it used to crash)."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings
    from tests.service.conftest import free_port

    settings = Settings(
        redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_cluster=True, redis_timeout_s=0.5
    )
    with TestClient(create_app(settings)) as client:
        assert client.get("/healthz").status_code == 503
        r = client.get("/v1/runs")
        assert r.status_code == 503, r.text
        assert r.headers["content-type"] == "application/problem+json"
        assert "retry-after" in r.headers


def test_stream_reads_side_by_side_survive_a_master_restart(redis_cluster: Any) -> None:
    """A worker's side-by-side XREADGROUPs, on the service's loop (uvloop), across a restart
    of the seed master: every failure is one the worker's loop waits out (``REDIS_DOWN``),
    and the reads work again after it.  (The full-size chaos run on a cluster also met
    uvloop's RuntimeError 'the handler is closed' there, which killed its workers before
    ``store._ClusterConnection``; this test does not reproduce that race every time.)"""
    import asyncio

    from service import loop as service_loop
    from service.settings import Settings
    from service.store import REDIS_DOWN, connect

    settings = Settings(redis_url=redis_cluster.url, redis_cluster=True, redis_timeout_s=5)
    names = [f"restart-test:{{t{i}}}" for i in range(12)]  # slots on every master

    async def read_all(redis: Any) -> list[Any]:
        """Side by side, as a worker reads its job streams; retried while Redis is down,
        as the worker's loop does (anything else escapes and fails the test)."""
        for _ in range(20):
            try:
                return list(
                    await asyncio.gather(
                        *(redis.xreadgroup("g", "c", {name: ">"}, count=1) for name in names)
                    )
                )
            except REDIS_DOWN:
                await asyncio.sleep(0.2)
        raise AssertionError("the cluster did not come back")

    async def scenario() -> list[Any]:
        redis, _ = connect(settings)
        try:
            for name in names:
                await redis.xgroup_create(name, "g", id="0", mkstream=True)
            await read_all(redis)  # the connections used to route XREADGROUP exist now
            redis_cluster.crash(0)  # the seed node; blocks the loop: the test's own doing
            await asyncio.sleep(0.5)  # the loop sees the old connections closed
            return await read_all(redis)
        finally:
            for name in names:
                await redis.delete(name)
            await redis.aclose()

    assert service_loop.run(scenario()) == [[] for _ in names]
