"""HTTP client of the kernelscope REST API v1 (architecture.md), sync and async.

Every endpoint is written once, in :class:`Endpoints`, as a *flow*: a generator that yields
the :class:`Request` s it needs (and the :class:`Sleep` s between retries or polls), receives
each answer, and returns the parsed result, without doing any I/O itself.  :class:`Client`
runs a flow with a blocking ``httpx.Client``; :class:`AsyncClient` runs the same flow with an
``httpx.AsyncClient``, so its methods are the same, as coroutines.  Retries, error mapping
(``clients.errors``) and answer parsing (``clients.results``) are therefore identical in both.

Gradient uploads are safetensors bodies planned by ``clients.uploads``: big gradients are split
into several uploads that each stay under the server's body limit (``KERNELSCOPE_MAX_BODY_MB``
on the server; tell the client with ``max_body_bytes``).  Every upload carries a deterministic
``Idempotency-Key``, so the client retries an upload with the same key after a dropped
connection, a 5xx or a 429 (exponential backoff, ``Retry-After`` honoured) and the data is
counted exactly once.  A consequence worth knowing: re-pushing *different* values for the same
run, step, ids and slice is ignored as a duplicate; pass ``key_salt`` to make it a new upload.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import io
import random
import time
from collections.abc import Callable, Coroutine, Generator, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar, cast, overload

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
    TokensReport,
    UploadReceipt,
)
from clients.uploads import PlannedUpload, RowKind, plan_sketch_uploads, plan_uploads
from sketch.names import APPLIED_UPDATE_ID

DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
"""64 MiB: below the server's default limit (``KERNELSCOPE_MAX_BODY_MB``, 256)."""
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})

P = ParamSpec("P")
T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of transport errors, 5xx and 429: ``attempts`` tries in all.

    The wait before retry ``r`` (1-based) is ``min(max_backoff_s, backoff_s * 2^(r-1))`` times
    a random factor in ``[0.5, 1]`` (jitter), or the server's ``Retry-After`` when larger.

    A request that timed out is retried only when ``GET /healthz`` answers 200 within
    ``probe_timeout_s`` seconds: a service that hangs then costs one timeout and one probe,
    not ``attempts`` timeouts; one that is only slow with this request is retried as before.
    ``None`` retries timeouts like the other transport errors.
    """

    attempts: int = 6
    backoff_s: float = 0.2
    max_backoff_s: float = 8.0
    probe_timeout_s: float | None = 5.0

    def delay(self, retry: int, retry_after: str | None = None) -> float:
        base = min(self.max_backoff_s, self.backoff_s * 2 ** (retry - 1))
        wait = base * (0.5 + 0.5 * random.random())
        if retry_after is not None:
            with suppress(ValueError):
                wait = max(wait, min(float(retry_after), self.max_backoff_s * 4))
        return wait


# --------------------------------------------------------------------------------------------
# what a flow asks its client to do


@dataclass(frozen=True)
class Request:
    """One HTTP request of a flow; the client answers with the ``httpx.Response`` or throws
    the ``httpx.TransportError`` into the flow."""

    method: str
    path: str
    params: Mapping[str, Any] | None = None
    json: Any = None
    content: bytes | None = None
    headers: Mapping[str, str] | None = None
    timeout: float | None = None  # seconds; None: the client's


@dataclass(frozen=True)
class Sleep:
    """A pause of a flow (retry backoff, polling); the client answers ``None``."""

    seconds: float


#: A flow: yields requests and sleeps, receives their answers, returns ``T``.
Flow = Generator[Request | Sleep, httpx.Response | None, T]


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
# the endpoints, once


class endpoint(Generic[P, T]):  # noqa: N801 - used as a decorator, like property
    """An endpoint method written as a flow; read from a client, it is the method that runs it.

    On a :class:`Client` the method returns ``T``; on an :class:`AsyncClient` a coroutine of
    ``T``.  On the class it is the endpoint itself, whose ``flow`` other flows ``yield from``.
    """

    def __init__(self, flow: Callable[Concatenate[Endpoints, P], Flow[T]]) -> None:
        self.flow = flow
        self.__doc__ = flow.__doc__

    @overload
    def __get__(self, client: None, owner: type[Any]) -> endpoint[P, T]: ...
    @overload
    def __get__(self, client: Client, owner: type[Any]) -> Callable[P, T]: ...
    @overload
    def __get__(
        self, client: AsyncClient, owner: type[Any]
    ) -> Callable[P, Coroutine[Any, Any, T]]: ...
    def __get__(self, client: Endpoints | None, owner: type[Any]) -> Any:
        if client is None:
            return self
        flow = self.flow

        @functools.wraps(flow)
        def method(*args: P.args, **kwargs: P.kwargs) -> Any:
            return client._drive(flow(client, *args, **kwargs))

        return method


class Endpoints:
    """The REST API v1, one method per endpoint, shared by :class:`Client` and
    :class:`AsyncClient` (which differ only in ``_drive``: how requests are sent and how a
    flow sleeps)."""

    retry: RetryPolicy
    max_body_bytes: int

    def _drive(self, flow: Flow[Any]) -> Any:
        raise NotImplementedError

    # -- transport ---------------------------------------------------------------------------

    def _send(
        self,
        method: str,
        path: str,
        *,
        retry: bool = True,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Flow[httpx.Response]:
        """One request with retries; raises the problem's exception on an error answer."""
        request = Request(method, path, params, json, content, headers)
        attempts = self.retry.attempts if retry else 1
        last: Exception | None = None
        for attempt in range(1, attempts + 1):
            try:
                response = yield request
            except httpx.TransportError as exc:
                last = exc
                probe = self.retry.probe_timeout_s
                if (
                    attempt < attempts
                    and isinstance(exc, httpx.TimeoutException)
                    and probe is not None
                    and not (yield from Endpoints.reachable.flow(self, probe))
                ):
                    raise TransportError(
                        0,
                        type(exc).__name__,
                        f"{method} {path}: {exc}; not retried: GET /healthz did not answer "
                        f"within {probe} s either",
                    ) from exc
                if attempt < attempts:
                    yield Sleep(self.retry.delay(attempt))
                    continue
                raise TransportError(0, type(exc).__name__, f"{method} {path}: {exc}") from exc
            assert response is not None
            if response.status_code in RETRY_STATUSES and attempt < attempts:
                yield Sleep(self.retry.delay(attempt, response.headers.get("retry-after")))
                continue
            if response.status_code >= 400:
                raise error_from_response(response)
            return response
        raise TransportError(0, "retries exhausted", f"{method} {path}: {last}")  # pragma: no cover

    def _json(self, method: str, path: str, **kwargs: Any) -> Flow[Any]:
        return (yield from self._send(method, path, **kwargs)).json()

    # -- runs --------------------------------------------------------------------------------

    @endpoint
    def reachable(self, timeout: float = 5.0) -> Flow[bool]:
        """Whether ``GET /healthz`` answers 200 within ``timeout`` seconds, in one try (no
        retries): a cheap probe of a service that stopped answering, before pushes that would
        each wait for the full timeout and retries."""
        try:
            response = yield Request("GET", "/healthz", timeout=timeout)
        except httpx.TransportError:
            return False
        assert response is not None
        return bool(response.status_code == 200)

    @endpoint
    def health(self) -> Flow[dict[str, Any]]:
        """``GET /healthz``."""
        data: dict[str, Any] = yield from self._json("GET", "/healthz")
        return data

    @endpoint
    def create_run(
        self,
        run_id: str | None = None,
        *,
        sketch: Any,
        normalization: str = "dr_grpo",
        geometry: str = "sgd",
        parameters: Mapping[str, Sequence[int]] | None = None,
        ranks: int = 1,
        applied_includes_step: bool = False,
    ) -> Flow[RunInfo]:
        """``POST /v1/runs``.  ``sketch``: ``{"kind", "dim", "seed", "groups"?}`` or a spec object.

        ``parameters`` (``{name: shape}``, e.g. ``ParameterFilter.declared_parameters(model)``
        or ``FactorisedCapture.parameters``) is required by ``exact`` and ``kronecker``.
        ``ranks``: trainer processes that push each step (each with ``push_sequences(rank=)``).
        ``applied_includes_step``: each step's applied update is its ``learning_rate`` times
        the sum of its update rows plus a part that does not depend on its sequences (plain
        SGD; Adam or AdamW in ``adam`` geometry with the rate ``lr c (1 - beta1) / (1 -
        beta1^t)``): ``delta_h1_applied`` then pairs that own part as ``delta_h1`` does
        (math.md §4).
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
        if applied_includes_step:
            body["applied_includes_step"] = True
        # Without a run id a retried POST could create two runs: retry only with an id.
        data = yield from self._json("POST", "/v1/runs", json=body, retry=run_id is not None)
        return RunInfo.from_json(data)

    @endpoint
    def runs(self) -> Flow[list[RunInfo]]:
        """``GET /v1/runs``."""
        data = yield from self._json("GET", "/v1/runs")
        items = data.get("runs", data) if isinstance(data, dict) else data
        return [RunInfo.from_json(r) for r in items]

    @endpoint
    def get_run(self, run_id: str) -> Flow[RunInfo]:
        """``GET /v1/runs/{run_id}``: the run and the status of each step."""
        return RunInfo.from_json((yield from self._json("GET", f"/v1/runs/{run_id}")))

    @endpoint
    def delete_run(self, run_id: str) -> Flow[None]:
        """``DELETE /v1/runs/{run_id}``: all of its data."""
        yield from self._send("DELETE", f"/v1/runs/{run_id}")

    @endpoint
    def delete_step(self, run_id: str, step: int) -> Flow[None]:
        """``DELETE /v1/runs/{run_id}/steps/{step}``: everything stored for that step."""
        yield from self._send("DELETE", f"/v1/runs/{run_id}/steps/{int(step)}")

    # -- step inputs -------------------------------------------------------------------------

    @endpoint
    def push_sequences(
        self,
        run_id: str,
        step: int,
        learning_rate: float,
        sequences: Sequence[Mapping[str, Any] | Any],
        max_length: int | None = None,
        rank: int | None = None,
    ) -> Flow[dict[str, Any]]:
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
        data: dict[str, Any] = yield from self._json(
            "POST", _step_path(run_id, step, "/sequences"), json=body
        )
        return data

    @endpoint
    def push_tokens(
        self,
        run_id: str,
        step: int,
        learning_rate: float,
        sequences: Sequence[Mapping[str, Any]],
        *,
        estimator: str = "independent",
        target: str = "sequence",
    ) -> Flow[dict[str, Any]]:
        """``POST .../tokens``: the exact token shares of update sequences (``id``,
        ``token_ids``, ``logprobs``, ``shares``, optional ``tokens``; math.md §9), after the
        step's sequences; :func:`clients.token_shares.token_shares` computes them."""
        body = {
            "estimator": estimator,
            "target": target,
            "learning_rate": float(learning_rate),
            "sequences": [dict(s) for s in sequences],
        }
        data: dict[str, Any] = yield from self._json(
            "POST", _step_path(run_id, step, "/tokens"), json=body
        )
        return data

    def _push(
        self, plans: list[PlannedUpload], run_id: str, step: int, progress: bool
    ) -> Flow[PushResult]:
        receipts = []
        total = sum(p.data_bytes for p in plans)
        with _progress_bar(progress, total, f"{run_id} step {step}") as advance:
            for plan in plans:
                body = plan.body()
                response = yield from self._send(
                    "POST",
                    _step_path(run_id, step, f"/{plan.kind}"),
                    content=body,
                    headers=_upload_headers(plan),
                )
                receipts.append(_receipt(plan, response, len(body)))
                if advance is not None:
                    advance(plan.data_bytes)
        return PushResult(tuple(receipts))

    @endpoint
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
    ) -> Flow[PushResult]:
        """``POST .../gradients``: raw rows ``{param or param@offset: [n, ...]}``.

        Split into uploads of at most ``max_body_bytes`` (default: the client's), each retried
        with its own deterministic ``Idempotency-Key``.  ``progress`` shows a rich bar.
        ``rows="update"`` sends update rows ``u_i`` instead of score rows (math.md §4),
        ``rows="entropy_sum"`` the gradients ``z_i`` of the sequences' entropy sums (math.md §3
        "From the entropy sums": ``capture_gradients(..., entropy_coefficients=mask)``).
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
        return (yield from self._push(plans, run_id, step, progress))

    @endpoint
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
    ) -> Flow[PushResult]:
        """``POST .../sketches``: client-made rows ``[n, k]`` (the run's spec; partials add up);
        ``rows="update"`` for update rows (math.md §4), ``"entropy_sum"`` for the entropy sums'
        gradients (math.md §3)."""
        plans = plan_sketch_uploads(
            run_id,
            step,
            sketch,
            sequence_ids,
            max_body_bytes or self.max_body_bytes,
            key_salt,
            rows,
        )
        return (yield from self._push(plans, run_id, step, progress=False))

    @endpoint
    def push_applied_update(
        self,
        run_id: str,
        step: int,
        update: Mapping[str, torch.Tensor] | None = None,
        *,
        sketch: torch.Tensor | None = None,
        max_body_bytes: int | None = None,
        key_salt: str = "",
    ) -> Flow[PushResult]:
        """The applied-update row (id ``__applied_update__``).

        ``update``: ``{name: tensor of the parameter's shape}`` (``u``, or ``u / sqrt(P)`` in
        adam geometry; see ``clients.geometry``), sent as raw gradient rows; or ``sketch``:
        its ``[k]`` client-made sketch.
        """
        if (update is None) == (sketch is None):
            raise ValueError("give exactly one of update and sketch")
        if sketch is not None:
            return (
                yield from Endpoints.push_sketches.flow(
                    self,
                    run_id,
                    step,
                    sketch.reshape(1, -1),
                    [APPLIED_UPDATE_ID],
                    key_salt=key_salt,
                )
            )
        assert update is not None
        rows = {k: v.unsqueeze(0) for k, v in update.items()}
        return (
            yield from Endpoints.push_gradients.flow(
                self,
                run_id,
                step,
                rows,
                [APPLIED_UPDATE_ID],
                max_body_bytes=max_body_bytes,
                key_salt=key_salt,
            )
        )

    @endpoint
    def post_realized(
        self, run_id: str, step: int, entropy_before: float, entropy_after: float
    ) -> Flow[dict[str, Any]]:
        """``POST .../realized``: the trainer's measured entropies (nats)."""
        body = {"entropy_before": float(entropy_before), "entropy_after": float(entropy_after)}
        data: dict[str, Any] = yield from self._json(
            "POST", _step_path(run_id, step, "/realized"), json=body
        )
        return data

    # -- step status -------------------------------------------------------------------------

    @endpoint
    def step_status(self, run_id: str, step: int) -> Flow[StepStatus]:
        """``GET /v1/runs/{run_id}/steps/{step}``."""
        return StepStatus.from_json((yield from self._json("GET", _step_path(run_id, step))))

    @endpoint
    def wait_ready(
        self, run_id: str, step: int, timeout: float = 60.0, poll: float = 0.1
    ) -> Flow[StepStatus]:
        """Poll the step until ``ready``; :class:`StepFailedError` / :class:`StepTimeoutError`."""
        deadline = time.monotonic() + timeout
        while True:
            status = yield from Endpoints.step_status.flow(self, run_id, step)
            if _check_step(status):
                return status
            if time.monotonic() >= deadline:
                raise StepTimeoutError(
                    0,
                    "step not ready",
                    f"run {run_id!r} step {step} still {status.state} after {timeout} s",
                    extra={"status": status.raw},
                )
            yield Sleep(min(poll, max(0.0, deadline - time.monotonic())))
            poll = min(poll * 1.5, 2.0)

    # -- analyses ----------------------------------------------------------------------------

    @endpoint
    def kernel(
        self,
        run_id: str,
        step: int,
        *,
        role: str | None = None,
        normalize: bool = False,
        wait: float | None = None,
    ) -> Flow[Kernel]:
        """``GET .../kernel`` as npy (``Accept: application/octet-stream``) and its row ids.

        ``matrix`` float64 ``[n, n]`` in the step's sequence order for ``role``.
        """
        params = _analysis_params(role, wait, normalize=str(normalize).lower())
        response = yield from self._send(
            "GET",
            _step_path(run_id, step, "/kernel"),
            params=params,
            headers={"Accept": "application/octet-stream"},
        )
        matrix = _load_npy(response.content)
        ids = (yield from Endpoints.diagonal.flow(self, run_id, step, role=role)).ids
        if len(ids) != matrix.shape[0]:
            raise KernelscopeError(0, "inconsistent answer", "kernel and diagonal sizes differ")
        return Kernel(ids=ids, matrix=matrix)

    @endpoint
    def kernel_json(
        self, run_id: str, step: int, *, role: str | None = None, normalize: bool = False
    ) -> Flow[Kernel]:
        """``GET .../kernel`` as JSON ``{"ids", "matrix"}`` (small kernels)."""
        params = _analysis_params(role, None, normalize=str(normalize).lower())
        data = yield from self._json("GET", _step_path(run_id, step, "/kernel"), params=params)
        return Kernel(ids=[str(i) for i in data["ids"]], matrix=np.asarray(data["matrix"], float))

    @endpoint
    def diagonal(
        self, run_id: str, step: int, *, role: str | None = None, wait: float | None = None
    ) -> Flow[Diagonal]:
        """``GET .../kernel/diagonal``: ``K(i, i)`` per sequence."""
        data = yield from self._json(
            "GET", _step_path(run_id, step, "/kernel/diagonal"), params=_analysis_params(role, wait)
        )
        return Diagonal.from_json(data["diagonal"] if isinstance(data, dict) else data)

    @endpoint
    def spectrum(
        self,
        run_id: str,
        step: int,
        *,
        role: str | None = None,
        top: int | None = None,
        wait: float | None = None,
    ) -> Flow[Spectrum]:
        """``GET .../kernel/spectrum`` (``top``: how many eigenvectors to return)."""
        params = _analysis_params(role, wait, top=top)
        data = yield from self._json(
            "GET", _step_path(run_id, step, "/kernel/spectrum"), params=params
        )
        return Spectrum.from_json(data)

    @endpoint
    def blocks(
        self, run_id: str, step: int, *, role: str | None = None, wait: float | None = None
    ) -> Flow[Blocks]:
        """``GET .../kernel/blocks``: pair-type statistics and prompt matrices."""
        data = yield from self._json(
            "GET", _step_path(run_id, step, "/kernel/blocks"), params=_analysis_params(role, wait)
        )
        return Blocks.from_json(data)

    @endpoint
    def entropy(
        self,
        run_id: str,
        step: int,
        *,
        estimator: str | None = None,
        target: str | None = None,
        wait: float | None = None,
        entropy_gradient: str | None = None,
    ) -> Flow[EntropyReport]:
        """``GET .../entropy``: ``dH1`` and everything math.md §4 reports with it;
        ``target="token_mean"``: about the token-mean entropy trainers log (math.md §8);
        ``entropy_gradient``: ``"score"`` or ``"entropy_sum"`` forces that estimate of
        ``grad H`` (math.md §3; default: from the entropy sums where the step has them)."""
        params = _analysis_params(
            None, wait, estimator=estimator, target=target, entropy_gradient=entropy_gradient
        )
        data = yield from self._json("GET", _step_path(run_id, step, "/entropy"), params=params)
        return EntropyReport.from_json(data)

    @endpoint
    def tokens(
        self,
        run_id: str,
        step: int,
        *,
        top: int | None = None,
        sequence: str | None = None,
        kl_cov_ratio: float | None = None,
    ) -> Flow[TokensReport]:
        """``GET .../tokens``: the tokens pushing the entropy down and up, per-sequence totals,
        one ``sequence``'s tokens and Cui et al.'s covariance against the shares."""
        params = _analysis_params(None, None, top=top, sequence=sequence, kl_cov_ratio=kl_cov_ratio)
        data = yield from self._json("GET", _step_path(run_id, step, "/tokens"), params=params)
        return TokensReport.from_json(data)

    @endpoint
    def history(self, run_id: str, *, target: str | None = None) -> Flow[EntropyHistory]:
        """``GET /v1/runs/{run_id}/entropy``: predicted and realized change per step (of the
        token-mean entropy with ``target="token_mean"``)."""
        params = {} if target is None else {"target": target}
        return EntropyHistory.from_json(
            (yield from self._json("GET", f"/v1/runs/{run_id}/entropy", params=params))
        )


# --------------------------------------------------------------------------------------------
# the two ways of sending


class Client(Endpoints):
    """Synchronous client: every method of :class:`Endpoints`, blocking.

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

    def _drive(self, flow: Flow[T]) -> T:
        answer: httpx.Response | None = None
        failure: httpx.TransportError | None = None
        while True:
            try:
                op = flow.send(answer) if failure is None else flow.throw(failure)
            except StopIteration as done:
                return cast(T, done.value)
            answer, failure = None, None
            if isinstance(op, Sleep):
                time.sleep(op.seconds)
                continue
            try:
                answer = self._http.request(
                    op.method,
                    op.path,
                    params=op.params,
                    json=op.json,
                    content=op.content,
                    headers=op.headers,
                    timeout=httpx.USE_CLIENT_DEFAULT if op.timeout is None else op.timeout,
                )
            except httpx.TransportError as exc:
                failure = exc


class AsyncClient(Endpoints):
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

    async def _drive(self, flow: Flow[T]) -> T:
        answer: httpx.Response | None = None
        failure: httpx.TransportError | None = None
        while True:
            try:
                op = flow.send(answer) if failure is None else flow.throw(failure)
            except StopIteration as done:
                return cast(T, done.value)
            answer, failure = None, None
            if isinstance(op, Sleep):
                await asyncio.sleep(op.seconds)
                continue
            try:
                answer = await self._http.request(
                    op.method,
                    op.path,
                    params=op.params,
                    json=op.json,
                    content=op.content,
                    headers=op.headers,
                    timeout=httpx.USE_CLIENT_DEFAULT if op.timeout is None else op.timeout,
                )
            except httpx.TransportError as exc:
                failure = exc


__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "AsyncClient",
    "Client",
    "Endpoints",
    "RetryPolicy",
    "sketch_spec_dict",
]
