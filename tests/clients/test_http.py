"""The HTTP client against the live service (uvicorn + worker on a real Redis).

Includes a TCP proxy test double in front of the real server that cuts the first attempt of
every gradient upload (mid-body, or after the server answered), to show that retries with the
deterministic Idempotency-Key store each upload exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import subprocess
import sys
import threading
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import httpx
import numpy as np
import pytest
import safetensors.torch
import torch

from clients.capture import capture_gradients
from clients.errors import (
    AuthenticationError,
    ConflictError,
    KernelscopeError,
    NotFoundError,
    PayloadTooLargeError,
    TransportError,
    ValidationError,
)
from clients.factorised import FactorisedCapture
from clients.http import AsyncClient, Client, RetryPolicy, sketch_spec_dict
from clients.uploads import plan_uploads
from service.uploads import read_header
from tests.clients.conftest import LiveService, free_port, make_batch, tiny_gpt2

FAST_RETRY = RetryPolicy(attempts=5, backoff_s=0.01, max_backoff_s=0.05)


# ------------------------------------------------------------------------------ helpers
def _captured(n: int = 5) -> tuple[dict[str, torch.Tensor], np.ndarray, list[dict[str, Any]], Any]:
    """Exact gradients of a tiny GPT-2 for ``n`` sequences, W [n, N] float64, metadata."""
    model = tiny_gpt2()
    batch = make_batch(n=n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cap = capture_gradients(model, batch, method="loop")
    W = cap.flat().double().numpy()
    seqs = [
        {
            "id": f"s{i}",
            "prompt_id": f"p{i % 2}",
            "logprob": float(cap.logprobs[i]),
            "advantage": float((-1) ** i) * (0.5 + 0.1 * i),
            "num_tokens": int(cap.num_tokens[i]),
        }
        for i in range(n)
    ]
    return cap.gradients, W, seqs, cap


def _reassemble(plans: list[Any], shapes: dict[str, int], ids: list[str]) -> dict[str, np.ndarray]:
    out = {k: np.full((len(ids), d), np.nan) for k, d in shapes.items()}
    for plan in plans:
        rows = [ids.index(i) for i in plan.sequence_ids]
        for key, t in plan.tensors.items():
            name, _, off = key.partition("@")
            o = int(off or 0)
            block = out[name][rows, o : o + t.shape[1]]
            assert np.isnan(block).all(), f"{key} written twice"
            out[name][np.ix_(rows, range(o, o + t.shape[1]))] = t.double().numpy()
    return out


# ------------------------------------------------------------------ upload planning (pure)
def test_plan_uploads_splits_by_parameter_slice_and_row() -> None:
    g = torch.Generator().manual_seed(0)
    ids = [f"seq-{i}" for i in range(6)]
    tensors = {
        "a.weight": torch.randn(6, 30, 20, generator=g),
        "b.bias": torch.randn(6, 7, generator=g),
        "c.weight": torch.randn(6, 500, generator=g),
    }
    shapes = {k: v[0].numel() for k, v in tensors.items()}
    for limit in (1 << 20, 8000, 3000, 900, 470):
        plans = plan_uploads("gradients", "run", 3, tensors, ids, limit)
        for plan in plans:
            assert len(plan.body()) <= limit
        got = _reassemble(plans, shapes, ids)
        for k, v in tensors.items():
            np.testing.assert_array_equal(got[k], v.reshape(6, -1).double().numpy())
        keys = [p.key for p in plans]
        assert len(set(keys)) == len(keys)
        assert keys == [p.key for p in plan_uploads("gradients", "run", 3, tensors, ids, limit)]
        assert keys != [p.key for p in plan_uploads("gradients", "run", 4, tensors, ids, limit)]
        if limit == 1 << 20:
            assert len(plans) == 1
        if limit <= 3000:
            assert any("@" in k for p in plans for k in p.tensors)
        if limit == 470:  # one column of all six rows plus the ids does not fit: rows split
            assert any(len(p.sequence_ids) < 6 for p in plans)
    # an input slice keeps its offset when cut further
    sliced = plan_uploads("gradients", "r", 0, {"w@100": torch.ones(2, 300)}, ["x", "y"], 1500)
    offsets = sorted(int(k.split("@")[1]) for p in sliced for k in p.tensors)
    assert offsets[0] == 100 and len(offsets) > 1
    body = safetensors.torch.load(sliced[0].body())
    assert all(t.dtype == torch.float32 for t in body.values())


def test_update_rows_carry_their_kind_and_their_own_keys() -> None:
    """``row_kind="update"`` (math.md §4 "Update rows") and ``"entropy_sum"`` (§3) write their
    kind into each body's metadata and give keys of their own: rows of the same ids and shapes
    as the score rows, or as each other, are a different upload, never a re-send of them."""
    tensors = {"w": torch.ones(2, 8)}
    plans = {
        kind: plan_uploads("gradients", "r", 0, tensors, ["x", "y"], 1 << 20, row_kind=kind)
        for kind in ("score", "update", "entropy_sum")
    }
    keys = [{p.key for p in kind_plans} for kind_plans in plans.values()]
    assert sum(len(k) for k in keys) == len(set().union(*keys))
    for kind in ("update", "entropy_sum"):
        assert read_header(plans[kind][0].body())[1]["rows"] == kind
    assert "rows" not in read_header(plans["score"][0].body())[1]


def test_sketch_spec_dict_accepts_dicts_and_objects() -> None:
    from dataclasses import dataclass

    from sketch.base import SketchKind

    @dataclass
    class Spec:
        kind: SketchKind
        dim: int
        seed: int
        groups: list[dict[str, Any]] | None = None

    assert sketch_spec_dict(Spec(SketchKind.GAUSSIAN, 64, 3)) == {
        "kind": "gaussian",
        "dim": 64,
        "seed": 3,
    }
    assert sketch_spec_dict({"kind": "exact", "dim": 1, "seed": 0}) == {
        "kind": "exact",
        "dim": 1,
        "seed": 0,
    }


def test_importing_the_client_does_not_load_numba() -> None:
    """The client parses ``name@offset`` with ``sketch.names``, not through the operators,
    whose numba loops cost a trainer seconds of import (and compile) time."""
    code = "import clients.http, sys; assert 'numba' not in sys.modules, 'numba loaded'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_sync_and_async_clients_retry_alike() -> None:
    """Both clients run the same flows: a dropped connection and a 503 are retried, a 404
    becomes ``NotFoundError`` after one attempt, with the same requests on the wire."""

    def answers() -> tuple[list[str], Any]:
        seen: list[str] = []

        def handle(request: httpx.Request) -> httpx.Response:
            seen.append(f"{request.method} {request.url.path}?{request.url.query.decode()}")
            if len(seen) == 1:
                raise httpx.ConnectError("refused", request=request)
            if len(seen) == 2:
                return httpx.Response(503, headers={"Retry-After": "0"})
            if request.url.path.endswith("/spectrum"):
                return httpx.Response(
                    200,
                    json={
                        "eigenvalues": [2.0, 1.0],
                        "trace": 3.0,
                        "effective_rank": 1.9,
                        "participation_ratio": 1.8,
                    },
                )
            return httpx.Response(404, json={"title": "Not Found", "detail": "no run 'x'"})

        return seen, handle

    sync_seen, sync_handle = answers()
    with Client(retry=FAST_RETRY, transport=httpx.MockTransport(sync_handle)) as client:
        spectrum = client.spectrum("r", 2, top=1)
        with pytest.raises(NotFoundError):
            client.get_run("x")

    async_seen, async_handle = answers()

    async def scenario() -> Any:
        transport = httpx.MockTransport(async_handle)
        async with AsyncClient(retry=FAST_RETRY, transport=transport) as client:
            got = await client.spectrum("r", 2, top=1)
            with pytest.raises(NotFoundError):
                await client.get_run("x")
            return got

    async_spectrum = asyncio.run(scenario())
    assert (
        sync_seen
        == async_seen
        == [
            *["GET /v1/runs/r/steps/2/kernel/spectrum?top=1"] * 3,
            "GET /v1/runs/x?",
        ]
    )
    assert spectrum.eigenvalues.tolist() == async_spectrum.eigenvalues.tolist() == [2.0, 1.0]


# ----------------------------------------------------------------------- live service
def test_end_to_end_exact_kernel_with_split_uploads(live_service: LiveService) -> None:
    grads, W, seqs, cap = _captured()
    ids = [s["id"] for s in seqs]
    with Client(live_service.base_url, retry=FAST_RETRY) as client:
        run = client.create_run(
            "h6-exact", sketch={"kind": "exact", "dim": 1, "seed": 0}, parameters=cap.parameters
        )
        assert run.run_id == "h6-exact" and run.k == W.shape[1]
        client.push_sequences("h6-exact", 0, 0.01, seqs)
        # largest parameter: 40 x 16 floats x 5 rows = 12.8 kB; a 6 kB limit forces @offset slices
        pushed = client.push_gradients(
            "h6-exact", 0, grads, ids, max_body_bytes=6000, progress=True
        )
        assert len(pushed.uploads) >= 4
        assert all(u.bytes <= 6000 for u in pushed.uploads)
        assert any("@" in t for u in pushed.uploads for t in u.tensors)
        status = client.wait_ready("h6-exact", 0, timeout=60)
        assert status.rows == len(ids) and status.sequences == len(ids)
        assert status.uploads == len(pushed.uploads)

        kernel = client.kernel("h6-exact", 0)
        assert kernel.ids == ids
        np.testing.assert_allclose(kernel.matrix, W @ W.T, rtol=1e-5, atol=1e-8)
        assert client.kernel_json("h6-exact", 0).ids == ids
        cosine = client.kernel("h6-exact", 0, normalize=True).matrix
        np.testing.assert_allclose(np.diag(cosine), 1.0, rtol=1e-6)

        diag = client.diagonal("h6-exact", 0)
        np.testing.assert_allclose(diag.values, (W * W).sum(1), rtol=1e-5)
        spec = client.spectrum("h6-exact", 0, top=2)
        np.testing.assert_allclose(
            spec.eigenvalues, np.linalg.eigvalsh(W @ W.T)[::-1], rtol=1e-4, atol=1e-6
        )
        assert spec.eigenvectors is not None and spec.eigenvectors.shape == (2, len(ids))
        top = spec.eigenvectors[0]
        np.testing.assert_allclose((W @ W.T) @ top, spec.eigenvalues[0] * top, rtol=1e-4, atol=1e-6)
        assert math.isfinite(spec.effective_rank) and math.isfinite(spec.participation_ratio)
        blocks = client.blocks("h6-exact", 0)
        assert blocks.diagonal.count == len(ids)
        assert blocks.prompts == ["p0", "p1"] and np.isfinite(blocks.prompt_mean_k).all()
        report = client.entropy("h6-exact", 0)
        assert math.isfinite(report.delta_h1) and math.isfinite(report.se_sampling)
        assert report.se_sketch == 0.0
        client.post_realized("h6-exact", 0, 10.0, 9.5)
        history = client.history("h6-exact")
        assert [r.step for r in history.steps] == [0]
        assert any(r.run_id == "h6-exact" for r in client.runs())
        assert client.get_run("h6-exact").steps is not None

        # re-sending the same uploads is harmless: same keys, nothing queued, same kernel
        again = client.push_gradients("h6-exact", 0, grads, ids, max_body_bytes=6000)
        assert again.queued == 0
        client.wait_ready("h6-exact", 0, timeout=60)
        np.testing.assert_allclose(
            client.kernel("h6-exact", 0).matrix, W @ W.T, rtol=1e-5, atol=1e-8
        )

        # the applied update row: <w_i, u> against every sequence
        u = {k: torch.randn(v.shape[1:]) for k, v in grads.items()}
        client.push_applied_update("h6-exact", 0, u)
        status = client.wait_ready("h6-exact", 0, timeout=60)
        assert status.applied_update
        u_flat = np.concatenate([u[k].reshape(-1).double().numpy() for k in grads])
        report = client.entropy("h6-exact", 0)
    # dH1_applied = sum_j h_j <w_j, u>, h_j = -(S_j - Sbar_{p,-j}) / (B M_p) (math.md §3-4)
    S = np.array([s["logprob"] for s in seqs])
    prompts = [s["prompt_id"] for s in seqs]
    B = len(set(prompts))
    h = np.zeros(len(seqs))
    for j, p in enumerate(prompts):
        others = [S[i] for i in range(len(seqs)) if prompts[i] == p and i != j]
        h[j] = -(S[j] - np.mean(others)) / (B * (len(others) + 1))
    assert report.delta_h1_applied is not None
    assert report.delta_h1_applied == pytest.approx(float(h @ (W @ u_flat)), rel=1e-4, abs=1e-8)


def test_reachable_is_one_short_try(live_service: LiveService) -> None:
    """``reachable`` is True for a service that answers ``/healthz`` and False at once for a
    port nothing listens on (no retries), for both clients."""
    closed = f"http://127.0.0.1:{free_port()}"
    with Client(live_service.base_url) as up, Client(closed) as down:
        assert up.reachable() and not down.reachable(timeout=1.0)

    async def both() -> tuple[bool, bool]:
        async with AsyncClient(live_service.base_url) as up, AsyncClient(closed) as down:
            return await up.reachable(), await down.reachable(timeout=1.0)

    assert asyncio.run(both()) == (True, False)


class _Hanging:
    """An HTTP server that reads each request and never answers it: a service that hangs (a
    stuck event loop, a stopped container behind a live proxy).  With ``healthz`` it answers
    ``GET /healthz`` and hangs on the rest.  ``requests`` lists each request line's method and
    path, in order."""

    def __init__(self, *, healthz: bool) -> None:
        self.healthz = healthz
        self.requests: list[str] = []
        self._stop = threading.Event()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self._sock.accept()
                threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            head = b""
            while b"\r\n\r\n" not in head and (chunk := conn.recv(65536)):
                head += chunk
            method, path = head.split(b" ")[:2]
            self.requests.append(f"{method.decode()} {path.decode()}")
            if self.healthz and path == b"/healthz":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
                return
            self._stop.wait()

    def close(self) -> None:
        self._stop.set()
        self._sock.close()


@pytest.mark.parametrize("flavour", ["sync", "async"])
@pytest.mark.parametrize(
    ("healthz", "probe", "expected"),
    [
        # hung everywhere: one timeout and one probe, not six timeouts
        (False, 0.3, ["GET /v1/runs/r/steps/0", "GET /healthz"]),
        # slow with this request only: retried after each probe that answers
        (True, 0.3, ["GET /v1/runs/r/steps/0", "GET /healthz"] * 2 + ["GET /v1/runs/r/steps/0"]),
        # probing turned off: every attempt waits for its timeout
        (False, None, ["GET /v1/runs/r/steps/0"] * 3),
    ],
    ids=["hung", "slow-request", "no-probe"],
)
def test_a_timed_out_request_is_retried_only_when_the_service_answers(
    flavour: str, healthz: bool, probe: float | None, expected: list[str]
) -> None:
    """``RetryPolicy.probe_timeout_s``: after a timeout the client probes ``GET /healthz``
    and gives up at once when that does not answer either, so a hung service costs a push one
    timeout, not ``attempts`` of them (the TRL trainer's first failed push)."""
    server = _Hanging(healthz=healthz)
    attempts = 6 if probe is not None and not healthz else 3
    retry = RetryPolicy(attempts=attempts, backoff_s=0.01, probe_timeout_s=probe)
    try:
        with pytest.raises(TransportError) as err:
            if flavour == "sync":
                with Client(server.url, timeout=0.3, retry=retry) as client:
                    client.step_status("r", 0)
            else:

                async def status() -> None:
                    async with AsyncClient(server.url, timeout=0.3, retry=retry) as client:
                        await client.step_status("r", 0)

                asyncio.run(status())
    finally:
        server.close()
    assert server.requests == expected
    assert ("did not answer" in str(err.value)) == (probe is not None and not healthz)


def test_problem_details_surface_as_exceptions(live_service: LiveService) -> None:
    grads, _, seqs, cap = _captured(n=2)
    ids = [s["id"] for s in seqs]
    with Client(live_service.base_url, retry=FAST_RETRY) as client:
        with pytest.raises(NotFoundError) as err:
            client.step_status("no-such-run", 0)
        assert err.value.status == 404 and err.value.title and err.value.detail
        assert err.value.type
        client.create_run(
            "h6-err",
            sketch={"kind": "countsketch", "dim": 16, "seed": 1},
            parameters=cap.parameters,
        )
        with pytest.raises(ConflictError) as conflict:
            client.create_run("h6-err", sketch={"kind": "countsketch", "dim": 32, "seed": 1})
        assert conflict.value.status == 409
        client.push_sequences("h6-err", 0, 0.1, seqs)
        name = next(iter(grads))
        with pytest.raises(ValidationError) as bad_shape:
            client.push_gradients("h6-err", 0, {name: torch.zeros(2, 3, 3)}, ids)
        assert bad_shape.value.status == 422 and name in bad_shape.value.detail
        nan = {name: torch.full_like(grads[name], float("nan"))}
        with pytest.raises(KernelscopeError) as bad_values:
            client.push_gradients("h6-err", 0, nan, ids)
        assert bad_values.value.status in (400, 422) and name in bad_values.value.detail
        with pytest.raises(ValidationError):
            client.push_sketches("h6-err", 0, torch.zeros(2, 5), ids)
        # an analysis of a step without rows: 409 with the step status as an extension member
        with pytest.raises(ConflictError) as pending:
            client.kernel("h6-err", 0)
        assert pending.value.status == 409
        assert pending.value.extra  # e.g. the step status, kept as sent


def test_factorised_sketches_equal_server_sketched_gradients(live_service: LiveService) -> None:
    """Client-made kronecker sketches (hooks) and raw gradients sketched by the workers agree."""
    model = tiny_gpt2()
    batch = make_batch(n=4)
    capture = FactorisedCapture(model, dim=64, seed=5)
    rows = capture(batch).sketch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        grads = capture_gradients(model, batch, method="loop").gradients
    ids = [f"q{i}" for i in range(batch.size)]
    seqs = [
        {"id": i, "prompt_id": "p", "logprob": -1.0 - k, "advantage": 0.5 - k % 2, "num_tokens": 3}
        for k, i in enumerate(ids)
    ]
    with Client(live_service.base_url, retry=FAST_RETRY) as client:
        client.create_run("h6-kron", sketch=capture.spec, parameters=capture.parameters)
        for step in (0, 1):
            client.push_sequences("h6-kron", step, 0.1, seqs)
        client.push_sketches("h6-kron", 0, rows, ids)
        client.push_gradients("h6-kron", 1, grads, ids, max_body_bytes=8000)
        client.wait_ready("h6-kron", 0, timeout=60)
        client.wait_ready("h6-kron", 1, timeout=60)
        k0 = client.kernel("h6-kron", 0).matrix
        k1 = client.kernel("h6-kron", 1).matrix
    r = rows.double().numpy()
    np.testing.assert_allclose(k0, r @ r.T, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(k1, k0, rtol=1e-4, atol=1e-6 * float(np.abs(k0).max()))


def test_async_client_same_surface(live_service: LiveService) -> None:
    grads, W, seqs, cap = _captured(n=3)
    ids = [s["id"] for s in seqs]

    async def scenario() -> np.ndarray:
        async with AsyncClient(live_service.base_url, retry=FAST_RETRY) as client:
            await client.create_run(
                "h6-async", sketch={"kind": "exact", "dim": 1, "seed": 0}, parameters=cap.parameters
            )
            await client.push_sequences("h6-async", 2, 0.01, seqs)
            await client.push_gradients("h6-async", 2, grads, ids, max_body_bytes=7000)
            await client.wait_ready("h6-async", 2, timeout=60)
            spectrum = await client.spectrum("h6-async", 2)
            assert np.isfinite(spectrum.eigenvalues).all()
            report = await client.entropy("h6-async", 2)
            assert math.isfinite(report.delta_h1)
            return (await client.kernel("h6-async", 2)).matrix

    np.testing.assert_allclose(asyncio.run(scenario()), W @ W.T, rtol=1e-5, atol=1e-8)


# ---------------------------------------------------- retries through a dropping proxy
class DroppingProxy:
    """TCP proxy to the real server that sabotages the first attempt of each gradient upload.

    ``mode="request"``: forward the headers and part of the body, then close both sides (the
    server never gets the whole upload).  ``mode="response"``: forward the whole request, wait
    for the server's answer, and drop the connection instead of relaying it (the server stored
    the upload; only the retry's Idempotency-Key keeps it from being stored twice).
    """

    def __init__(self, upstream_port: int, mode: Literal["request", "response"]) -> None:
        self.upstream_port = upstream_port
        self.mode = mode
        self.attempts: Counter[str] = Counter()
        self.cuts = 0
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._closed = True
        self._server.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _shut(*socks: socket.socket) -> None:
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def _responses(
        self, upstream: socket.socket, client: socket.socket, state: dict[str, bool]
    ) -> None:
        try:
            while True:
                chunk = upstream.recv(65536)
                if not chunk:
                    break
                if state["drop"]:
                    break  # the server answered: drop the answer and the connection
                client.sendall(chunk)
        except OSError:
            pass
        self._shut(client, upstream)

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        state = {"drop": False}
        threading.Thread(
            target=self._responses, args=(upstream, client, state), daemon=True
        ).start()
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    chunk = client.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                head, _, rest = buf.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                headers = {
                    k.strip().lower(): v.strip()
                    for k, _, v in (ln.partition(":") for ln in lines[1:])
                }
                length = int(headers.get("content-length", "0"))
                while len(rest) < length:
                    chunk = client.recv(65536)
                    if not chunk:
                        return
                    rest += chunk
                body, buf = rest[:length], rest[length:]
                request = head + b"\r\n\r\n" + body
                key = headers.get("idempotency-key")
                first = False
                if key is not None and "/gradients" in lines[0]:
                    with self._lock:
                        first = self.attempts[key] == 0
                        self.attempts[key] += 1
                        self.cuts += int(first)
                if first and self.mode == "request":
                    upstream.sendall(request[: len(head) + 4 + length // 2])
                    self._shut(client, upstream)
                    return
                if first and self.mode == "response":
                    state["drop"] = True
                    upstream.sendall(request)
                    return  # the response thread drops the answer and closes both sides
                upstream.sendall(request)
        except OSError:
            self._shut(client, upstream)


@pytest.mark.parametrize("mode", ["request", "response"])
def test_dropped_uploads_are_retried_and_stored_exactly_once(
    live_service: LiveService, mode: str
) -> None:
    grads, W, seqs, cap = _captured(n=4)
    ids = [s["id"] for s in seqs]
    proxy = DroppingProxy(live_service.port, mode)  # type: ignore[arg-type]
    run_id = f"h6-retry-{mode}"
    try:
        with Client(proxy.base_url, retry=FAST_RETRY) as client:
            client.create_run(
                run_id, sketch={"kind": "exact", "dim": 1, "seed": 0}, parameters=cap.parameters
            )
            client.push_sequences(run_id, 0, 0.01, seqs)
            pushed = client.push_gradients(run_id, 0, grads, ids, max_body_bytes=5000)
            assert len(pushed.uploads) >= 3
            # every upload was cut once and then sent again with the same key
            assert proxy.cuts == len(pushed.uploads)
            assert all(proxy.attempts[u.idempotency_key] == 2 for u in pushed.uploads)
            if mode == "response":  # the server had stored the first attempt
                assert all(not u.queued for u in pushed.uploads)
            status = client.wait_ready(run_id, 0, timeout=60)
            assert status.rows == len(ids)
            assert status.uploads == len(pushed.uploads)
            kernel = client.kernel(run_id, 0).matrix
    finally:
        proxy.close()
    # stored exactly once: a duplicated slice would add its contribution twice
    np.testing.assert_allclose(kernel, W @ W.T, rtol=1e-5, atol=1e-8)


def test_bearer_token_and_body_limit(tmp_path: Path, redis_url: str, key_prefix: str) -> None:
    """A service with KERNELSCOPE_TOKEN and a small KERNELSCOPE_MAX_BODY_MB (API only)."""
    import os

    svc = LiveService(
        env={
            "KERNELSCOPE_REDIS_URL": redis_url,
            "KERNELSCOPE_KEY_PREFIX": key_prefix,
            "KERNELSCOPE_TOKEN": "s3cret",
            "KERNELSCOPE_MAX_BODY_MB": "0.01",
            "PYTHONPATH": os.getcwd(),
        },
        port=free_port(),
        logs=tmp_path,
    )
    svc.start_api()
    try:
        spec = {"kind": "countsketch", "dim": 8, "seed": 0}
        with Client(svc.base_url, retry=FAST_RETRY) as anonymous:
            with pytest.raises(AuthenticationError) as err:
                anonymous.create_run("h6-auth", sketch=spec)
            assert err.value.status == 401
        with Client(svc.base_url, token="s3cret", retry=FAST_RETRY) as client:
            client.create_run("h6-auth", sketch=spec)
            big = {"w": torch.ones(2, 4000)}  # 32 kB > 0.01 MiB
            with pytest.raises(PayloadTooLargeError) as too_large:
                client.push_gradients("h6-auth", 0, big, ["a", "b"], max_body_bytes=1 << 20)
            assert (
                too_large.value.status == 413
                and "KERNELSCOPE_MAX_BODY_MB" in too_large.value.detail
            )
            # under the limit the same data goes through, split into several uploads
            ok = client.push_gradients("h6-auth", 0, big, ["a", "b"], max_body_bytes=10000)
            assert len(ok.uploads) >= 4
    finally:
        svc.stop_all()
