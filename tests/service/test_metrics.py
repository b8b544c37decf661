"""``service.metrics`` and ``GET /metrics``: counters move by exactly what was recorded.

Every check parses the exposition with prometheus-client's own text parser and compares the
values before and after a known event, so counts left by other tests in the same process do
not matter.  The queue gauges are read from a real Redis (the ``redis_url`` fixture) under a
key prefix unique to the test; the multiprocess test runs separate Python processes that share
one ``PROMETHEUS_MULTIPROC_DIR``.  The end-to-end test pushes a known upload through a live
service and scrapes it before and after.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

import httpx
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.keys import Keys
from service.metrics import (
    QueryLatencyMiddleware,
    QueueCollector,
    record_job,
    record_rows_sketched,
    record_upload,
    record_worker_heartbeat,
    render_metrics,
    upload_outcome,
)
from service.queue import Queue
from tests.service.conftest import OCTET, LiveService, safetensors_body
from tests.service.test_dashboard import dashboard_service

ROOT = Path(__file__).resolve().parents[2]
__all__ = ["dashboard_service"]  # the fixture, imported for its use below

Sample = tuple[str, frozenset[tuple[str, str]]]


def parse(text: str | bytes) -> dict[Sample, float]:
    """Every sample of an exposition as ``{(sample name, labels): value}``."""
    if isinstance(text, bytes):
        text = text.decode()
    out: dict[Sample, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = float(s.value)
    return out


def value(samples: Mapping[Sample, float], name: str, **labels: str) -> float:
    """One sample's value, 0 when absent (a labelled child not created yet)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_record_upload_moves_each_counter_by_exactly_the_recorded_amount() -> None:
    before = parse(render_metrics())
    record_upload("accepted", 1234, 7, kind="sketches")
    record_upload("too_large", 99, 0, kind="sketches")
    after = parse(render_metrics())

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("kernelscope_uploads_total", kind="sketches", outcome="accepted") == 1
    assert delta("kernelscope_upload_bytes_total", kind="sketches", outcome="accepted") == 1234
    assert delta("kernelscope_upload_rows_total", kind="sketches", outcome="accepted") == 7
    assert delta("kernelscope_uploads_total", kind="sketches", outcome="too_large") == 1
    assert delta("kernelscope_upload_bytes_total", kind="sketches", outcome="too_large") == 99
    assert delta("kernelscope_uploads_total", kind="gradients", outcome="accepted") == 0


def test_rows_jobs_and_heartbeat() -> None:
    before = parse(render_metrics())
    record_rows_sketched(5)
    record_job(0.2)
    record_job(3.0, outcome="dead_letter")
    record_worker_heartbeat("w-test", now=1234.5)
    after = parse(render_metrics())

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("kernelscope_rows_sketched_total") == 5
    assert delta("kernelscope_jobs_total", outcome="ok") == 1
    assert delta("kernelscope_jobs_total", outcome="dead_letter") == 1
    # only successful jobs enter the latency histogram: 0.2 s lies in (0.1, 0.25]
    assert delta("kernelscope_job_latency_seconds_count") == 1
    assert delta("kernelscope_job_latency_seconds_sum") == pytest.approx(0.2)
    assert delta("kernelscope_job_latency_seconds_bucket", le="0.1") == 0
    assert delta("kernelscope_job_latency_seconds_bucket", le="0.25") == 1
    assert value(after, "kernelscope_worker_heartbeat_timestamp_seconds", worker="w-test") == 1234.5


def test_upload_outcome_labels_are_a_bounded_set() -> None:
    assert upload_outcome(413) == "too_large"
    assert upload_outcome(415) == "unsupported_media_type"
    assert upload_outcome(422) == "invalid"
    assert upload_outcome(400) == "invalid"
    assert upload_outcome(418) == "rejected"
    assert upload_outcome(503) == "busy"  # the in-flight upload budget
    assert upload_outcome(500) == "error"


def test_query_latency_is_labelled_by_route_template_not_raw_path() -> None:
    app = FastAPI()

    @app.get("/v1/things/{thing_id}")
    def thing(thing_id: str) -> dict[str, str]:
        return {"id": thing_id}

    app.add_middleware(QueryLatencyMiddleware)
    before = parse(render_metrics())
    with TestClient(app) as client:
        assert client.get("/v1/things/abc").status_code == 200
        assert client.get("/v1/things/def").status_code == 200
        assert client.get("/no/such/path").status_code == 404
    after = parse(render_metrics())
    name = "kernelscope_query_latency_seconds_count"
    routed = {"method": "GET", "endpoint": "/v1/things/{thing_id}"}
    assert value(after, name, **routed) - value(before, name, **routed) == 2
    unmatched = {"method": "GET", "endpoint": "unmatched"}
    assert value(after, name, **unmatched) - value(before, name, **unmatched) == 1
    assert not any("abc" in dict(labels).get("endpoint", "") for _, labels in after)


def test_queue_gauges_read_from_redis(redis_url: str) -> None:
    from redis.asyncio import Redis

    prefix = f"h7test-{uuid.uuid4().hex[:12]}"
    keys = Keys(prefix)
    stream, dead, group = keys.streams[0], keys.deads[0], "workers"

    async def scenario() -> tuple[object, object]:
        client = Redis.from_url(redis_url)
        try:
            empty = await Queue(client, keys).stats()
            await client.xgroup_create(stream, group, id="0", mkstream=True)
            for i in range(3):
                await client.xadd(stream, {"job": str(i)})
            # one worker reads one job and does not acknowledge it: 1 pending, 2 undelivered
            await client.xreadgroup(group, "worker-a", {stream: ">"}, count=1)
            await client.xadd(dead, {"job": "x", "error": "boom"})
            return empty, await Queue(client, keys).stats()
        finally:
            await client.delete(stream, dead)
            await client.aclose()

    empty, stats = asyncio.run(scenario())
    assert (empty.length, empty.undelivered, empty.pending, empty.dead) == (0, 0, 0, 0)  # type: ignore[attr-defined]
    samples = parse(render_metrics([QueueCollector(stats)]))  # type: ignore[arg-type]
    assert value(samples, "kernelscope_redis_up") == 1
    assert value(samples, "kernelscope_queue_length") == 3
    assert value(samples, "kernelscope_queue_undelivered") == 2
    assert value(samples, "kernelscope_queue_pending") == 1
    assert value(samples, "kernelscope_queue_depth") == 3
    assert value(samples, "kernelscope_dead_letters") == 1
    assert value(samples, "kernelscope_worker_consumer_idle_seconds", consumer="worker-a") >= 0
    down = parse(render_metrics([QueueCollector(None)]))
    assert value(down, "kernelscope_redis_up") == 0
    assert ("kernelscope_queue_depth", frozenset()) not in down


RECORD = textwrap.dedent(
    """
    from service.metrics import record_rows_sketched, record_upload
    record_upload("accepted", 100, 2, kind="gradients")
    record_rows_sketched(3)
    """
)
RENDER = textwrap.dedent(
    """
    import sys
    from service.metrics import render_metrics
    sys.stdout.write(render_metrics().decode())
    """
)


def test_multiprocess_mode_sums_over_processes(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    for _ in range(2):  # e.g. the API and one worker, each its own process
        subprocess.run([sys.executable, "-c", RECORD], env=env, check=True, timeout=60)
    out = subprocess.run(
        [sys.executable, "-c", RENDER], env=env, check=True, timeout=60, capture_output=True
    ).stdout
    samples = parse(out)
    grad = {"kind": "gradients", "outcome": "accepted"}
    assert value(samples, "kernelscope_uploads_total", **grad) == 2
    assert value(samples, "kernelscope_upload_bytes_total", **grad) == 200
    assert value(samples, "kernelscope_upload_rows_total", **grad) == 4
    assert value(samples, "kernelscope_rows_sketched_total") == 6
    assert len(list(tmp_path.glob("counter_*.db"))) >= 2  # one file per writing process


def test_metrics_endpoint_counts_a_known_push_exactly(
    dashboard_service: LiveService,
) -> None:
    """Through a live API and a separate worker process sharing ``PROMETHEUS_MULTIPROC_DIR``:
    one accepted sketch upload of ``n`` rows and one rejected upload move every counter by
    exactly their size, and the queue drains."""
    base = dashboard_service.base_url
    run_id = "metrics-run"
    k, n = 6, 5
    r = httpx.post(
        f"{base}/v1/runs",
        json={"run_id": run_id, "sketch": {"kind": "gaussian", "dim": k, "seed": 1}},
        timeout=30,
    )
    assert r.status_code == 201, r.text
    url = f"{base}/v1/runs/{run_id}/steps/0"
    ids = [f"m{i}" for i in range(n)]
    sequences = [
        {
            "id": i,
            "prompt_id": f"p{j % 2}",
            "logprob": -3.0 - j,
            "advantage": 0.5 - 0.25 * j,
            "num_tokens": 4,
        }
        for j, i in enumerate(ids)
    ]
    r = httpx.post(f"{url}/sequences", json={"learning_rate": 0.1, "sequences": sequences})
    assert r.status_code == 200, r.text
    body = safetensors_body({"sketch": torch.randn(n, k)}, ids)

    def scrape() -> dict[Sample, float]:
        answer = httpx.get(f"{base}/metrics", timeout=30)
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/plain")
        return parse(answer.text)

    before = scrape()
    r = httpx.post(f"{url}/sketches", content=body, headers=OCTET, timeout=30)
    assert r.status_code == 202, r.text
    bad = b"not a safetensors body"
    r = httpx.post(f"{url}/sketches", content=bad, headers={"content-type": "text/plain"})
    assert r.status_code == 415, r.text
    deadline = time.monotonic() + 60
    while httpx.get(url, timeout=30).json()["state"] != "ready":
        assert time.monotonic() < deadline, "the upload was not sketched within 60 s"
        time.sleep(0.1)
    after = scrape()

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    ok = {"kind": "sketches", "outcome": "accepted"}
    assert delta("kernelscope_uploads_total", **ok) == 1
    assert delta("kernelscope_upload_bytes_total", **ok) == len(body)
    assert delta("kernelscope_upload_rows_total", **ok) == n
    rejected = {"kind": "sketches", "outcome": "unsupported_media_type"}
    assert delta("kernelscope_uploads_total", **rejected) == 1
    assert delta("kernelscope_upload_bytes_total", **rejected) == len(bad)
    # recorded by the worker process, summed in by the API's scrape
    assert delta("kernelscope_rows_sketched_total") == n
    assert delta("kernelscope_jobs_total", outcome="ok") == 1
    assert delta("kernelscope_job_latency_seconds_count") == 1
    route = {"method": "POST", "endpoint": "/v1/runs/{run_id}/steps/{step}/sketches"}
    assert delta("kernelscope_query_latency_seconds_count", **route) == 2
    assert value(after, "kernelscope_redis_up") == 1
    assert value(after, "kernelscope_queue_depth") == 0
    assert value(after, "kernelscope_dead_letters") == 0
    beats = [
        v
        for (name, _), v in after.items()
        if name == "kernelscope_worker_heartbeat_timestamp_seconds"
    ]
    assert beats and max(beats) > 0
    idle = [name for name, _ in after if name == "kernelscope_worker_consumer_idle_seconds"]
    assert len(idle) == 1

    # a re-sent upload is counted as a duplicate and queues no job
    r = httpx.post(f"{url}/sketches", content=body, headers=OCTET, timeout=30)
    assert r.status_code == 202 and r.json()["queued"] is False, r.text
    again = scrape()
    dup = {"kind": "sketches", "outcome": "duplicate"}
    assert (
        value(again, "kernelscope_uploads_total", **dup)
        - value(after, "kernelscope_uploads_total", **dup)
        == 1
    )
    assert value(again, "kernelscope_uploads_total", **ok) == value(
        after, "kernelscope_uploads_total", **ok
    )
    assert value(again, "kernelscope_jobs_total", outcome="ok") == value(
        after, "kernelscope_jobs_total", outcome="ok"
    )
