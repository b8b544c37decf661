"""HTTP client of the kernelscope REST API v1 (architecture.md), sync and async.

:class:`Client` and :class:`AsyncClient` have the same methods (the async ones are
coroutines).  Gradient uploads are safetensors bodies; big gradients are split into several
uploads that each stay under the server's body limit (``KERNELSCOPE_MAX_BODY_MB`` on the
server; tell the client with ``max_body_bytes``), first by parameter, then by flat slices
``name@offset`` (math.md §7: partial sketches add up, so any split gives the same rows), and
by rows when even one column of all rows is too big.

Every upload carries a deterministic ``Idempotency-Key``: a hash of the run, step, kind,
sequence ids and the tensor names/shapes of that slice.  The server stores an upload once per
key, so the client retries an upload with the same key after a dropped connection, a 5xx or a
429 (exponential backoff, ``Retry-After`` honoured) and the data is counted exactly once.  A
consequence worth knowing: re-pushing *different* values for the same run, step, ids and
slice is ignored as a duplicate; pass ``key_salt`` to make it a new upload.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import torch

from clients.errors import (
    KernelscopeError,
    StepFailedError,
    StepTimeoutError,
    TransportError,
    error_from_response,
)
from clients.results import (
    Blocks,
    Diagonal,
    EntropyHistory,
    EntropyReport,
    Kernel,
    PushResult,
    RunInfo,
    Spectrum,
    StepStatus,
    UploadReceipt,
)
from clients.uploads import PlannedUpload, RowKind, plan_sketch_uploads, plan_uploads
from sketch.names import APPLIED_UPDATE_ID

DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
"""64 MiB: below the server's default limit (``KERNELSCOPE_MAX_BODY_MB``, 256)."""
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of transport errors, 5xx and 429: ``attempts`` tries in all.

    The wait before retry ``r`` (1-based) is ``min(max_backoff_s, backoff_s * 2^(r-1))`` times
    a random factor in ``[0.5, 1]`` (jitter), or the server's ``Retry-After`` when larger.
    """

    attempts: int = 6
    backoff_s: float = 0.2
    max_backoff_s: float = 8.0

    def delay(self, retry: int, retry_after: str | None = None) -> float:
        base = min(self.max_backoff_s, self.backoff_s * 2 ** (retry - 1))
        wait = base * (0.5 + 0.5 * random.random())
        if retry_after is not None:
            with suppress(ValueError):
                wait = max(wait, min(float(retry_after), self.max_backoff_s * 4))
        return wait


def sketch_spec_dict(sketch: Any) -> dict[str, Any]:
    """A sketch spec as the API's JSON object, from a dict, a dataclass or an object."""
    if isinstance(sketch, Mapping):
        spec = dict(sketch)
    elif hasattr(sketch, "to_dict"):
        spec = dict(sketch.to_dict())
    elif dataclasses.is_dataclass(sketch) and not isinstance(sketch, type):
        spec = dataclasses.asdict(sketch)
    else:
        spec = {
            a: getattr(sketch, a) for a in ("kind", "dim", "seed", "groups") if hasattr(sketch, a)
        }
    kind = spec.get("kind")
    if kind is not None and hasattr(kind, "value"):
        spec["kind"] = kind.value
    groups = spec.get("groups")
    if groups is not None:
        spec["groups"] = [
            g
            if isinstance(g, Mapping)
            else sketch_spec_dict(g)
            if hasattr(g, "to_dict")
            else vars(g)
            for g in groups
        ]
    else:
        spec.pop("groups", None)
    return spec


def _sequence_dict(seq: Any) -> dict[str, Any]:
    if isinstance(seq, Mapping):
        out = dict(seq)
    elif dataclasses.is_dataclass(seq) and not isinstance(seq, type):
        out = dataclasses.asdict(seq)
    else:
        raise TypeError("a sequence must be a mapping or a dataclass with the API's fields")
    return {
        k: (float(v) if isinstance(v, (np.floating, torch.Tensor)) else v)
        for k, v in out.items()
        if v is not None
    }


def _upload_headers(plan: PlannedUpload) -> dict[str, str]:
    """A safetensors body with the upload's deterministic idempotency key (retries reuse it)."""
    return {"Content-Type": "application/octet-stream", "Idempotency-Key": plan.key}


def _step_path(run_id: str, step: int, tail: str = "") -> str:
    return f"/v1/runs/{run_id}/steps/{int(step)}{tail}"


def _analysis_params(role: str | None, wait: float | None, **extra: Any) -> dict[str, Any]:
    params: dict[str, Any] = {k: v for k, v in extra.items() if v is not None}
    if role is not None:
        params["role"] = role
    if wait is not None:
        params["wait"] = wait
    return params


def _is_retryable(response: httpx.Response) -> bool:
    return response.status_code in RETRY_STATUSES


def _receipt(plan: PlannedUpload, response: httpx.Response, size: int) -> UploadReceipt:
    data = response.json()
    return UploadReceipt(
        upload_id=str(data.get("upload_id", "")),
        rows=int(data.get("rows", len(plan.sequence_ids))),
        queued=bool(data.get("queued", True)),
        idempotency_key=plan.key,
        tensors=tuple(plan.tensors),
        bytes=size,
    )


def _load_npy(content: bytes) -> np.ndarray:
    return np.asarray(np.load(io.BytesIO(content), allow_pickle=False), dtype=np.float64)


@contextmanager
def _progress_bar(enabled: bool, total: int, label: str) -> Iterator[Any]:
    """A rich progress bar over ``total`` bytes, or a no-op."""
    if not enabled:
        yield None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    ) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


def _headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _check_step(status: StepStatus) -> bool:
    if status.state == "failed":
        raise StepFailedError(
            0,
            "step failed",
            f"run {status.run_id!r} step {status.step}: "
            + "; ".join(f"{e.upload_id}: {e.error}" for e in status.errors),
            extra={"status": status.raw},
        )
    return status.state == "ready"


# --------------------------------------------------------------------------------------------
# sync client


class Client:
    """Synchronous client.

    Parameters
    ----------
    base_url:
        the service root, e.g. ``http://127.0.0.1:8000``.
    token:
        bearer token (the server's ``KERNELSCOPE_TOKEN``), sent as ``Authorization``.
    max_body_bytes:
        largest upload body; keep it at or under the server's ``KERNELSCOPE_MAX_BODY_MB``.
    timeout:
        per-request timeout in seconds.
    retry:
        the :class:`RetryPolicy` of transport errors, 5xx and 429.
    transport:
        an ``httpx`` transport (tests: ``httpx.ASGITransport`` / ``MockTransport``).
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        token: str | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        timeout: float = 120.0,
        retry: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.max_body_bytes = int(max_body_bytes)
        self.retry = retry or RetryPolicy()
        self._http = httpx.Client(
            base_url=self.base_url, headers=_headers(token), timeout=timeout, transport=transport
        )

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport ---------------------------------------------------------------------------

    def _send(self, method: str, path: str, *, retry: bool = True, **kwargs: Any) -> httpx.Response:
        """One request with retries; raises the problem's exception on an error answer."""
        attempts = self.retry.attempts if retry else 1
        last: Exception | None = None
        for attempt in range(1, attempts + 1):
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                last = exc
                if attempt < attempts:
                    time.sleep(self.retry.delay(attempt))
                    continue
                raise TransportError(0, type(exc).__name__, f"{method} {path}: {exc}") from exc
            if _is_retryable(response) and attempt < attempts:
                time.sleep(self.retry.delay(attempt, response.headers.get("retry-after")))
                continue
            if response.status_code >= 400:
                raise error_from_response(response)
            return response
        raise TransportError(0, "retries exhausted", f"{method} {path}: {last}")  # pragma: no cover

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._send(method, path, **kwargs).json()

    # -- runs --------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """``GET /healthz``."""
        data: dict[str, Any] = self._json("GET", "/healthz")
        return data

    def create_run(
        self,
        run_id: str | None = None,
        *,
        sketch: Any,
        normalization: str = "dr_grpo",
        geometry: str = "sgd",
        parameters: Mapping[str, Sequence[int]] | None = None,
        ranks: int = 1,
    ) -> RunInfo:
        """``POST /v1/runs``.  ``sketch``: ``{"kind", "dim", "seed", "groups"?}`` or a spec object.

        ``parameters`` (``{name: shape}``, e.g. ``ParameterFilter.declared_parameters(model)``
        or ``FactorisedCapture.parameters``) is required by ``exact`` and ``kronecker``.
        ``ranks``: trainer processes that push each step (each with ``push_sequences(rank=)``).
        """
        body: dict[str, Any] = {
            "sketch": sketch_spec_dict(sketch),
            "normalization": normalization,
            "geometry": geometry,
        }
        if run_id is not None:
            body["run_id"] = run_id
        if parameters is not None:
            body["parameters"] = {k: [int(s) for s in v] for k, v in parameters.items()}
        if ranks != 1:
            body["ranks"] = int(ranks)
        # Without a run id a retried POST could create two runs: retry only with an id.
        return RunInfo.from_json(
            self._json("POST", "/v1/runs", json=body, retry=run_id is not None)
        )

    def runs(self) -> list[RunInfo]:
        """``GET /v1/runs``."""
        data = self._json("GET", "/v1/runs")
        items = data.get("runs", data) if isinstance(data, dict) else data
        return [RunInfo.from_json(r) for r in items]

    def get_run(self, run_id: str) -> RunInfo:
        """``GET /v1/runs/{run_id}``: the run and the status of each step."""
        return RunInfo.from_json(self._json("GET", f"/v1/runs/{run_id}"))

    def delete_run(self, run_id: str) -> None:
        """``DELETE /v1/runs/{run_id}``: all of its data."""
        self._send("DELETE", f"/v1/runs/{run_id}")

    # -- step inputs -------------------------------------------------------------------------

    def push_sequences(
        self,
        run_id: str,
        step: int,
        learning_rate: float,
        sequences: Sequence[Mapping[str, Any] | Any],
        max_length: int | None = None,
        rank: int | None = None,
    ) -> dict[str, Any]:
        """``POST .../sequences``: metadata rows (``id``, ``prompt_id``, ``logprob``,
        ``advantage``, ``num_tokens``, optional ``role``, ``weight``, ``logprob_after``).
        ``rank``: the pushing trainer process in a run of several ``ranks``, sent after that
        rank's rows (the step is ready once every rank has reported)."""
        body: dict[str, Any] = {
            "learning_rate": float(learning_rate),
            "sequences": [_sequence_dict(s) for s in sequences],
        }
        if max_length is not None:
            body["max_length"] = int(max_length)
        if rank is not None:
            body["rank"] = int(rank)
        data: dict[str, Any] = self._json("POST", _step_path(run_id, step, "/sequences"), json=body)
        return data

    def _push(
        self, plans: list[PlannedUpload], run_id: str, step: int, progress: bool
    ) -> PushResult:
        receipts = []
        total = sum(p.data_bytes for p in plans)
        with _progress_bar(progress, total, f"{run_id} step {step}") as advance:
            for plan in plans:
                body = plan.body()
                response = self._send(
                    "POST",
                    _step_path(run_id, step, f"/{plan.kind}"),
                    content=body,
                    headers=_upload_headers(plan),
                )
                receipts.append(_receipt(plan, response, len(body)))
                if advance is not None:
                    advance(plan.data_bytes)
        return PushResult(tuple(receipts))

    def push_gradients(
        self,
        run_id: str,
        step: int,
        gradients: Mapping[str, torch.Tensor],
        sequence_ids: Sequence[str],
        *,
        max_body_bytes: int | None = None,
        progress: bool = False,
        dtype: torch.dtype = torch.float32,
        key_salt: str = "",
        rows: RowKind = "score",
    ) -> PushResult:
        """``POST .../gradients``: raw rows ``{param or param@offset: [n, ...]}``.

        Split into uploads of at most ``max_body_bytes`` (default: the client's), each retried
        with its own deterministic ``Idempotency-Key``.  ``progress`` shows a rich bar.
        ``rows="update"`` sends update rows ``u_i`` instead of score rows (math.md §4).
        """
        plans = plan_uploads(
            "gradients",
            run_id,
            step,
            gradients,
            sequence_ids,
            max_body_bytes or self.max_body_bytes,
            dtype,
            key_salt,
            rows,
        )
        return self._push(plans, run_id, step, progress)

    def push_sketches(
        self,
        run_id: str,
        step: int,
        sketch: torch.Tensor,
        sequence_ids: Sequence[str],
        *,
        max_body_bytes: int | None = None,
        key_salt: str = "",
        rows: RowKind = "score",
    ) -> PushResult:
        """``POST .../sketches``: client-made rows ``[n, k]`` (the run's spec; partials add up);
        ``rows="update"`` for update rows (math.md §4)."""
        plans = plan_sketch_uploads(
            run_id,
            step,
            sketch,
            sequence_ids,
            max_body_bytes or self.max_body_bytes,
            key_salt,
            rows,
        )
        return self._push(plans, run_id, step, progress=False)

    def push_applied_update(
        self,
        run_id: str,
        step: int,
        update: Mapping[str, torch.Tensor] | None = None,
        *,
        sketch: torch.Tensor | None = None,
        max_body_bytes: int | None = None,
        key_salt: str = "",
    ) -> PushResult:
        """The applied-update row (id ``__applied_update__``).

        ``update``: ``{name: tensor of the parameter's shape}`` (``u``, or ``u / sqrt(P)`` in
        adam geometry; see ``clients.geometry``), sent as raw gradient rows; or ``sketch``:
        its ``[k]`` client-made sketch.
        """
        if (update is None) == (sketch is None):
            raise ValueError("give exactly one of update and sketch")
        if sketch is not None:
            return self.push_sketches(
                run_id, step, sketch.reshape(1, -1), [APPLIED_UPDATE_ID], key_salt=key_salt
            )
        assert update is not None
        rows = {k: v.unsqueeze(0) for k, v in update.items()}
        return self.push_gradients(
            run_id,
            step,
            rows,
            [APPLIED_UPDATE_ID],
            max_body_bytes=max_body_bytes,
            key_salt=key_salt,
        )

    def post_realized(
        self, run_id: str, step: int, entropy_before: float, entropy_after: float
    ) -> dict[str, Any]:
        """``POST .../realized``: the trainer's measured entropies (nats)."""
        body = {"entropy_before": float(entropy_before), "entropy_after": float(entropy_after)}
        data: dict[str, Any] = self._json("POST", _step_path(run_id, step, "/realized"), json=body)
        return data

    # -- step status -------------------------------------------------------------------------

    def step_status(self, run_id: str, step: int) -> StepStatus:
        """``GET /v1/runs/{run_id}/steps/{step}``."""
        return StepStatus.from_json(self._json("GET", _step_path(run_id, step)))

    def wait_ready(
        self, run_id: str, step: int, timeout: float = 60.0, poll: float = 0.1
    ) -> StepStatus:
        """Poll the step until ``ready``; :class:`StepFailedError` / :class:`StepTimeoutError`."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.step_status(run_id, step)
            if _check_step(status):
                return status
            if time.monotonic() >= deadline:
                raise StepTimeoutError(
                    0,
                    "step not ready",
                    f"run {run_id!r} step {step} still {status.state} after {timeout} s",
                    extra={"status": status.raw},
                )
            time.sleep(min(poll, max(0.0, deadline - time.monotonic())))
            poll = min(poll * 1.5, 2.0)

    # -- analyses ----------------------------------------------------------------------------

    def kernel(
        self,
        run_id: str,
        step: int,
        *,
        role: str | None = None,
        normalize: bool = False,
        wait: float | None = None,
    ) -> Kernel:
        """``GET .../kernel`` as npy (``Accept: application/octet-stream``) and its row ids.

        ``matrix`` float64 ``[n, n]`` in the step's sequence order for ``role``.
        """
        params = _analysis_params(role, wait, normalize=str(normalize).lower())
        response = self._send(
            "GET",
            _step_path(run_id, step, "/kernel"),
            params=params,
            headers={"Accept": "application/octet-stream"},
        )
        matrix = _load_npy(response.content)
        ids = self.diagonal(run_id, step, role=role).ids
        if len(ids) != matrix.shape[0]:
            raise KernelscopeError(0, "inconsistent answer", "kernel and diagonal sizes differ")
        return Kernel(ids=ids, matrix=matrix)

    def kernel_json(
        self, run_id: str, step: int, *, role: str | None = None, normalize: bool = False
    ) -> Kernel:
        """``GET .../kernel`` as JSON ``{"ids", "matrix"}`` (small kernels)."""
        params = _analysis_params(role, None, normalize=str(normalize).lower())
        data = self._json("GET", _step_path(run_id, step, "/kernel"), params=params)
        return Kernel(ids=[str(i) for i in data["ids"]], matrix=np.asarray(data["matrix"], float))

    def diagonal(
        self, run_id: str, step: int, *, role: str | None = None, wait: float | None = None
    ) -> Diagonal:
        """``GET .../kernel/diagonal``: ``K(i, i)`` per sequence."""
        data = self._json(
            "GET", _step_path(run_id, step, "/kernel/diagonal"), params=_analysis_params(role, wait)
        )
        return Diagonal.from_json(data["diagonal"] if isinstance(data, dict) else data)

    def spectrum(
        self,
        run_id: str,
        step: int,
        *,
        role: str | None = None,
        top: int | None = None,
        wait: float | None = None,
    ) -> Spectrum:
        """``GET .../kernel/spectrum`` (``top``: how many eigenvectors to return)."""
        params = _analysis_params(role, wait, top=top)
        return Spectrum.from_json(
            self._json("GET", _step_path(run_id, step, "/kernel/spectrum"), params=params)
        )

    def blocks(
        self, run_id: str, step: int, *, role: str | None = None, wait: float | None = None
    ) -> Blocks:
        """``GET .../kernel/blocks``: pair-type statistics and prompt matrices."""
        return Blocks.from_json(
            self._json(
                "GET",
                _step_path(run_id, step, "/kernel/blocks"),
                params=_analysis_params(role, wait),
            )
        )

    def entropy(
        self, run_id: str, step: int, *, estimator: str | None = None, wait: float | None = None
    ) -> EntropyReport:
        """``GET .../entropy``: ``dH1`` and everything math.md §4 reports with it."""
        params = _analysis_params(None, wait, estimator=estimator)
        return EntropyReport.from_json(
            self._json("GET", _step_path(run_id, step, "/entropy"), params=params)
        )

    def history(self, run_id: str) -> EntropyHistory:
        """``GET /v1/runs/{run_id}/entropy``: predicted and realized change per step."""
        return EntropyHistory.from_json(self._json("GET", f"/v1/runs/{run_id}/entropy"))


# --------------------------------------------------------------------------------------------
# async client


class AsyncClient:
    """Asynchronous client: the methods of :class:`Client`, as coroutines."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        token: str | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        timeout: float = 120.0,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.max_body_bytes = int(max_body_bytes)
        self.retry = retry or RetryPolicy()
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=_headers(token), timeout=timeout, transport=transport
        )

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _send(
        self, method: str, path: str, *, retry: bool = True, **kwargs: Any
    ) -> httpx.Response:
        attempts = self.retry.attempts if retry else 1
        last: Exception | None = None
        for attempt in range(1, attempts + 1):
            try:
                response = await self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                last = exc
                if attempt < attempts:
                    await asyncio.sleep(self.retry.delay(attempt))
                    continue
                raise TransportError(0, type(exc).__name__, f"{method} {path}: {exc}") from exc
            if _is_retryable(response) and attempt < attempts:
                await asyncio.sleep(self.retry.delay(attempt, response.headers.get("retry-after")))
                continue
            if response.status_code >= 400:
                raise error_from_response(response)
            return response
        raise TransportError(0, "retries exhausted", f"{method} {path}: {last}")  # pragma: no cover

    async def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return (await self._send(method, path, **kwargs)).json()

    async def health(self) -> dict[str, Any]:
        """``GET /healthz``."""
        data: dict[str, Any] = await self._json("GET", "/healthz")
        return data

    async def create_run(
        self,
        run_id: str | None = None,
        *,
        sketch: Any,
        normalization: str = "dr_grpo",
        geometry: str = "sgd",
        parameters: Mapping[str, Sequence[int]] | None = None,
        ranks: int = 1,
    ) -> RunInfo:
        """See :meth:`Client.create_run`."""
        body: dict[str, Any] = {
            "sketch": sketch_spec_dict(sketch),
            "normalization": normalization,
            "geometry": geometry,
        }
        if run_id is not None:
            body["run_id"] = run_id
        if parameters is not None:
            body["parameters"] = {k: [int(s) for s in v] for k, v in parameters.items()}
        if ranks != 1:
            body["ranks"] = int(ranks)
        data = await self._json("POST", "/v1/runs", json=body, retry=run_id is not None)
        return RunInfo.from_json(data)

    async def runs(self) -> list[RunInfo]:
        """``GET /v1/runs``."""
        data = await self._json("GET", "/v1/runs")
        items = data.get("runs", data) if isinstance(data, dict) else data
        return [RunInfo.from_json(r) for r in items]

    async def get_run(self, run_id: str) -> RunInfo:
        """``GET /v1/runs/{run_id}``."""
        return RunInfo.from_json(await self._json("GET", f"/v1/runs/{run_id}"))

    async def delete_run(self, run_id: str) -> None:
        """``DELETE /v1/runs/{run_id}``."""
        await self._send("DELETE", f"/v1/runs/{run_id}")

    async def push_sequences(
        self,
        run_id: str,
        step: int,
        learning_rate: float,
        sequences: Sequence[Mapping[str, Any] | Any],
        max_length: int | None = None,
        rank: int | None = None,
    ) -> dict[str, Any]:
        """See :meth:`Client.push_sequences`."""
        body: dict[str, Any] = {
            "learning_rate": float(learning_rate),
            "sequences": [_sequence_dict(s) for s in sequences],
        }
        if max_length is not None:
            body["max_length"] = int(max_length)
        if rank is not None:
            body["rank"] = int(rank)
        data: dict[str, Any] = await self._json(
            "POST", _step_path(run_id, step, "/sequences"), json=body
        )
        return data

    async def _push(
        self, plans: list[PlannedUpload], run_id: str, step: int, progress: bool
    ) -> PushResult:
        receipts = []
        total = sum(p.data_bytes for p in plans)
        with _progress_bar(progress, total, f"{run_id} step {step}") as advance:
            for plan in plans:
                body = plan.body()
                response = await self._send(
                    "POST",
                    _step_path(run_id, step, f"/{plan.kind}"),
                    content=body,
                    headers=_upload_headers(plan),
                )
                receipts.append(_receipt(plan, response, len(body)))
                if advance is not None:
                    advance(plan.data_bytes)
        return PushResult(tuple(receipts))

    async def push_gradients(
        self,
        run_id: str,
        step: int,
        gradients: Mapping[str, torch.Tensor],
        sequence_ids: Sequence[str],
        *,
        max_body_bytes: int | None = None,
        progress: bool = False,
        dtype: torch.dtype = torch.float32,
        key_salt: str = "",
        rows: RowKind = "score",
    ) -> PushResult:
        """See :meth:`Client.push_gradients`."""
        plans = plan_uploads(
            "gradients",
            run_id,
            step,
            gradients,
            sequence_ids,
            max_body_bytes or self.max_body_bytes,
            dtype,
            key_salt,
            rows,
        )
        return await self._push(plans, run_id, step, progress)

    async def push_sketches(
        self,
        run_id: str,
        step: int,
        sketch: torch.Tensor,
        sequence_ids: Sequence[str],
        *,
        max_body_bytes: int | None = None,
        key_salt: str = "",
        rows: RowKind = "score",
    ) -> PushResult:
        """See :meth:`Client.push_sketches`."""
        plans = plan_sketch_uploads(
            run_id,
            step,
            sketch,
            sequence_ids,
            max_body_bytes or self.max_body_bytes,
            key_salt,
            rows,
        )
        return await self._push(plans, run_id, step, progress=False)

    async def push_applied_update(
        self,
        run_id: str,
        step: int,
        update: Mapping[str, torch.Tensor] | None = None,
        *,
        sketch: torch.Tensor | None = None,
        max_body_bytes: int | None = None,
        key_salt: str = "",
    ) -> PushResult:
        """See :meth:`Client.push_applied_update`."""
        if (update is None) == (sketch is None):
            raise ValueError("give exactly one of update and sketch")
        if sketch is not None:
            return await self.push_sketches(
                run_id, step, sketch.reshape(1, -1), [APPLIED_UPDATE_ID], key_salt=key_salt
            )
        assert update is not None
        rows = {k: v.unsqueeze(0) for k, v in update.items()}
        return await self.push_gradients(
            run_id,
            step,
            rows,
            [APPLIED_UPDATE_ID],
            max_body_bytes=max_body_bytes,
            key_salt=key_salt,
        )

    async def post_realized(
        self, run_id: str, step: int, entropy_before: float, entropy_after: float
    ) -> dict[str, Any]:
        """See :meth:`Client.post_realized`."""
        body = {"entropy_before": float(entropy_before), "entropy_after": float(entropy_after)}
        data: dict[str, Any] = await self._json(
            "POST", _step_path(run_id, step, "/realized"), json=body
        )
        return data

    async def step_status(self, run_id: str, step: int) -> StepStatus:
        """See :meth:`Client.step_status`."""
        return StepStatus.from_json(await self._json("GET", _step_path(run_id, step)))

    async def wait_ready(
        self, run_id: str, step: int, timeout: float = 60.0, poll: float = 0.1
    ) -> StepStatus:
        """See :meth:`Client.wait_ready`."""
        deadline = time.monotonic() + timeout
        while True:
            status = await self.step_status(run_id, step)
            if _check_step(status):
                return status
            if time.monotonic() >= deadline:
                raise StepTimeoutError(
                    0,
                    "step not ready",
                    f"run {run_id!r} step {step} still {status.state} after {timeout} s",
                    extra={"status": status.raw},
                )
            await asyncio.sleep(min(poll, max(0.0, deadline - time.monotonic())))
            poll = min(poll * 1.5, 2.0)

    async def kernel(
        self,
        run_id: str,
        step: int,
        *,
        role: str | None = None,
        normalize: bool = False,
        wait: float | None = None,
    ) -> Kernel:
        """See :meth:`Client.kernel`."""
        params = _analysis_params(role, wait, normalize=str(normalize).lower())
        response = await self._send(
            "GET",
            _step_path(run_id, step, "/kernel"),
            params=params,
            headers={"Accept": "application/octet-stream"},
        )
        matrix = _load_npy(response.content)
        ids = (await self.diagonal(run_id, step, role=role)).ids
        if len(ids) != matrix.shape[0]:
            raise KernelscopeError(0, "inconsistent answer", "kernel and diagonal sizes differ")
        return Kernel(ids=ids, matrix=matrix)

    async def kernel_json(
        self, run_id: str, step: int, *, role: str | None = None, normalize: bool = False
    ) -> Kernel:
        """See :meth:`Client.kernel_json`."""
        params = _analysis_params(role, None, normalize=str(normalize).lower())
        data = await self._json("GET", _step_path(run_id, step, "/kernel"), params=params)
        return Kernel(ids=[str(i) for i in data["ids"]], matrix=np.asarray(data["matrix"], float))

    async def diagonal(
        self, run_id: str, step: int, *, role: str | None = None, wait: float | None = None
    ) -> Diagonal:
        """See :meth:`Client.diagonal`."""
        data = await self._json(
            "GET", _step_path(run_id, step, "/kernel/diagonal"), params=_analysis_params(role, wait)
        )
        return Diagonal.from_json(data["diagonal"] if isinstance(data, dict) else data)

    async def spectrum(
        self,
        run_id: str,
        step: int,
        *,
        role: str | None = None,
        top: int | None = None,
        wait: float | None = None,
    ) -> Spectrum:
        """See :meth:`Client.spectrum`."""
        params = _analysis_params(role, wait, top=top)
        return Spectrum.from_json(
            await self._json("GET", _step_path(run_id, step, "/kernel/spectrum"), params=params)
        )

    async def blocks(
        self, run_id: str, step: int, *, role: str | None = None, wait: float | None = None
    ) -> Blocks:
        """See :meth:`Client.blocks`."""
        return Blocks.from_json(
            await self._json(
                "GET",
                _step_path(run_id, step, "/kernel/blocks"),
                params=_analysis_params(role, wait),
            )
        )

    async def entropy(
        self, run_id: str, step: int, *, estimator: str | None = None, wait: float | None = None
    ) -> EntropyReport:
        """See :meth:`Client.entropy`."""
        params = _analysis_params(None, wait, estimator=estimator)
        return EntropyReport.from_json(
            await self._json("GET", _step_path(run_id, step, "/entropy"), params=params)
        )

    async def history(self, run_id: str) -> EntropyHistory:
        """See :meth:`Client.history`."""
        return EntropyHistory.from_json(await self._json("GET", f"/v1/runs/{run_id}/entropy"))


__all__ = [
    "APPLIED_UPDATE_ID",
    "DEFAULT_MAX_BODY_BYTES",
    "AsyncClient",
    "Client",
    "RetryPolicy",
    "sketch_spec_dict",
]
