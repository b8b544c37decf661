"""RFC 9457 problem details: every error the API returns is ``application/problem+json``.

Body: ``{"type", "title", "status", "detail"}`` plus optional extension members (for example
``missing_ids`` or the step ``status`` of a 409) and ``request_id``, the id of the request
(``X-Request-ID``, see :class:`RequestIdMiddleware`).  FastAPI's own 404/405/422 answers are
converted by the handlers installed with :func:`install_problem_handlers`.

Redis being unreachable (connection refused or lost, timeouts, a server still loading its
data, a read-only replica, ``maxmemory`` reached) is not a bug of the request: it answers
**503** with ``Retry-After`` so that clients retry, instead of a 500.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from contextvars import ContextVar
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError, RedisClusterException, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.domain_errors import (
    BusyError,
    CannotAnalyseError,
    DomainError,
    InvalidUploadError,
    NotFoundError,
    ShuttingDownError,
    StepIncompleteError,
    StepNotReadyError,
    TooLargeError,
)

PROBLEM_JSON = "application/problem+json"
_TYPE_BASE = "https://kernelscope.invalid/problems/"
log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-ID"
#: A client's ``X-Request-ID`` is kept when it is this short and made of these characters
#: (it goes into log lines and headers verbatim); anything else is replaced by a fresh id.
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
#: The id of the request being served, for log records and problem bodies ("-" outside one).
request_id_var: ContextVar[str | None] = ContextVar("kernelscope_request_id", default=None)
#: Error replies of a reachable Redis that mean "not now" rather than "bad command".
_TRANSIENT_REPLY = ("OOM", "LOADING", "MISCONF", "BUSY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN")


class ProblemError(Exception):
    """An error that becomes a problem+json response with ``status``."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        title: str | None = None,
        type_: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status = int(status)
        self.detail = detail
        self.title = title or HTTPStatus(self.status).phrase
        self.type = type_ or _TYPE_BASE + self.title.lower().replace(" ", "-")
        self.headers = headers or {}
        self.extra = extra

    def body(self) -> dict[str, Any]:
        """The problem document (with ``request_id`` when served inside a request)."""
        body = {
            "type": self.type,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            **self.extra,
        }
        request_id = request_id_var.get()
        if request_id is not None:
            body.setdefault("request_id", request_id)
        return body


def problem_response(problem: ProblemError) -> JSONResponse:
    """Render ``problem`` with the problem+json media type and its headers."""
    return JSONResponse(
        problem.body(), status_code=problem.status, media_type=PROBLEM_JSON, headers=problem.headers
    )


def domain_problem(exc: DomainError, retry_after_s: int) -> ProblemError:
    """The problem+json answer of a domain error (the one place that maps them)."""
    retry = {"Retry-After": str(retry_after_s)}
    match exc:
        case NotFoundError():
            return ProblemError(404, exc.detail)
        case StepNotReadyError():
            return ProblemError(
                409,
                exc.detail,
                title="Step not ready",
                step_status=exc.status.model_dump(mode="json"),
            )
        case StepIncompleteError(missing_rows=None):
            return ProblemError(409, exc.detail, title="Step incomplete")
        case StepIncompleteError():
            return ProblemError(
                409,
                exc.detail,
                title="Step incomplete",
                missing_rows=exc.missing_rows,
                rows_without_metadata=exc.rows_without_metadata,
                update_rows_without_update_role=exc.update_rows_without_update_role,
            )
        case TooLargeError() | CannotAnalyseError():
            return ProblemError(422, exc.detail)
        case ShuttingDownError() | BusyError():
            return ProblemError(503, exc.detail, title="Service Unavailable", headers=retry)
        case InvalidUploadError():
            return ProblemError(exc.status, exc.detail, **exc.extra)
    raise TypeError(f"no problem mapping for {type(exc).__name__}")  # a new DomainError class


def _retry_after_s(app: Any) -> int:
    """``Settings.retry_after_s`` of the app serving the request."""
    return int(app.state.settings.retry_after_s)


def _validation_detail(exc: RequestValidationError) -> tuple[str, list[dict[str, Any]]]:
    errors = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()))
        errors.append(
            {"loc": loc, "msg": str(err.get("msg", "")), "type": str(err.get("type", ""))}
        )
    detail = "; ".join(f"{e['loc']}: {e['msg']}" for e in errors) or "invalid request"
    return detail, errors


def install_problem_handlers(app: FastAPI) -> None:
    """Route every exception FastAPI may raise through :func:`problem_response`."""

    @app.exception_handler(ProblemError)
    async def _problem(_: Request, exc: ProblemError) -> JSONResponse:
        return problem_response(exc)

    @app.exception_handler(DomainError)
    async def _domain(request: Request, exc: DomainError) -> JSONResponse:
        return problem_response(domain_problem(exc, _retry_after_s(request.app)))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        headers = dict(exc.headers) if exc.headers else None
        return problem_response(ProblemError(exc.status_code, detail, headers=headers))

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        detail, errors = _validation_detail(exc)
        return problem_response(ProblemError(422, detail, errors=errors))

    @app.exception_handler(RedisError)
    @app.exception_handler(RedisClusterException)
    async def _redis(request: Request, exc: Exception) -> JSONResponse:
        problem = redis_problem(exc, _retry_after_s(request.app))
        if problem is None:  # a reachable Redis refused a command: a bug, not an outage
            log.error("Redis error: %s: %s", type(exc).__name__, exc)
            problem = ProblemError(500, f"internal error: {type(exc).__name__}")
        else:
            log.warning("Redis unavailable: %s: %s", type(exc).__name__, exc)
        return problem_response(problem)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return problem_response(ProblemError(500, f"internal error: {type(exc).__name__}"))


def redis_problem(exc: BaseException, retry_after_s: int) -> ProblemError | None:
    """The 503 problem for an error that means Redis is unavailable, else ``None``.

    Unavailable: connection refused, reset or timed out (``ConnectionError``,
    ``TimeoutError``, ``OSError``), a read-only replica, a cluster that cannot be reached
    (``RedisClusterException``), and the transient error replies (``OOM`` under
    ``maxmemory``, ``LOADING``, ``MISCONF``, ``BUSY``, ``CLUSTERDOWN``, ...).
    """
    transient = isinstance(
        exc,
        RedisConnectionError | RedisTimeoutError | ReadOnlyError | RedisClusterException | OSError,
    ) or (isinstance(exc, ResponseError) and str(exc).startswith(_TRANSIENT_REPLY))
    if not transient:
        return None
    return ProblemError(
        503,
        f"Redis unavailable ({type(exc).__name__}: {str(exc)[:200]}); retry later",
        title="Service Unavailable",
        headers={"Retry-After": str(retry_after_s)},
    )


def current_request_id() -> str:
    """The id of the request being served, or ``"-"`` outside a request."""
    return request_id_var.get() or "-"


def install_request_id_logging() -> None:
    """Give every log record a ``request_id`` attribute (``"-"`` outside a request).

    Done with the record factory rather than a handler filter so that it holds for every
    handler and logger (uvicorn's, the root's, a deployment's own), and log formats can use
    ``%(request_id)s``.  Idempotent.
    """
    current = logging.getLogRecordFactory()
    if getattr(current, "_kernelscope_request_id", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = current(*args, **kwargs)
        record.request_id = current_request_id()
        return record

    factory._kernelscope_request_id = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


class RequestIdMiddleware:
    """Pure ASGI middleware: the request id, and the last line of defence against a 500.

    * The id is the client's ``X-Request-ID`` when it is a sane token, else a fresh random
      one; it is set in :data:`request_id_var` for the request's log records and problem
      bodies and returned in the ``X-Request-ID`` response header.
    * An exception that escapes every handler becomes a logged 500 problem (or a 503 when it
      means Redis is unavailable) carrying the id, instead of Starlette's outer error page.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), "")
        request_id = given if _REQUEST_ID_RE.fullmatch(given) else secrets.token_hex(8)
        token = request_id_var.set(request_id)
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            if started:  # the answer is already on its way: nothing sensible left to send
                log.exception("error after the response started")
                raise
            problem = redis_problem(exc, _retry_after_s(scope["app"]))
            if problem is None:
                log.exception("unhandled error")
                problem = ProblemError(500, f"internal error: {type(exc).__name__}")
            else:
                log.warning("Redis unavailable: %s: %s", type(exc).__name__, exc)
            await problem_response(problem)(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)


#: The documented shape of every error body (RFC 9457 plus the extension members used here).
PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "type": "object",
    "description": "RFC 9457 problem details; extension members depend on the error.",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "request_id": {"type": "string", "description": "the X-Request-ID of the request"},
        "errors": {
            "type": "array",
            "items": {"type": "object"},
            "description": "422 of request validation: one entry per field",
        },
    },
    "additionalProperties": True,
}
_PROBLEM_CONTENT = {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}}
#: Errors any route may answer (400 malformed input, 404/405 routing, 422 validation, 500);
#: ``/v1`` routes add 401 (token) and 503 (Redis unavailable).
_COMMON_ERRORS = {
    "400": "malformed request",
    "404": "unknown run, step or route",
    "422": "invalid fields, parameters or content",
    "500": "internal error (a bug: report it)",
}
_V1_ERRORS = {"401": "missing or wrong bearer token", "503": "Redis unavailable; retry later"}


def install_problem_openapi(app: FastAPI) -> None:
    """Document every error response as ``application/problem+json`` (``Problem``).

    FastAPI's generated schema says 422 is ``application/json`` ``HTTPValidationError``
    (``detail`` a list), which the handlers above never send; a client generated from the
    schema, or a schema-based fuzzer, would reject every real error.  This rewrites each
    operation's 4xx/5xx responses to the problem document and adds the ones every route can
    give, so ``/openapi.json`` describes what the API answers.
    """
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = original()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components["Problem"] = PROBLEM_SCHEMA
        for path, item in schema.get("paths", {}).items():
            for operation in item.values():
                responses = operation.setdefault("responses", {})
                extra = {**_COMMON_ERRORS, **(_V1_ERRORS if path.startswith("/v1") else {})}
                for code, description in extra.items():
                    responses.setdefault(code, {"description": description})
                for code, response in responses.items():
                    if code.isdigit() and int(code) >= 400 and not _documented_body(response):
                        response["content"] = dict(_PROBLEM_CONTENT)
                        if response.get("description") in (None, "", "Validation Error"):
                            response["description"] = extra.get(code, "error (problem details)")
        for unused in ("HTTPValidationError", "ValidationError"):
            if unused not in json.dumps(schema["paths"]):
                components.pop(unused, None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _documented_body(response: dict[str, Any]) -> bool:
    """Whether a route documented its own non-problem error body (``/healthz``'s 503)."""
    content = response.get("content") or {}
    if not content:
        return False
    refs = json.dumps(content)
    return "HTTPValidationError" not in refs and "Problem" not in refs
