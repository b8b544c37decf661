"""Exceptions of the kernelscope client, carrying the server's RFC 9457 problem details.

Every error answer of the API is ``application/problem+json`` with ``type``, ``title``,
``status`` and ``detail`` (plus extension members such as a 409's step ``status``); the client
raises a :class:`KernelscopeError` subclass chosen by the status code, with those fields as
attributes, so that callers can ``except NotFoundError`` or inspect ``err.status``.
"""

from __future__ import annotations

import json
from typing import Any

import httpx


class KernelscopeError(Exception):
    """An error answer of the service (or a transport failure, ``status`` 0).

    Attributes
    ----------
    status: HTTP status (0 when no answer came back).
    title, detail, type: the problem document's members.
    extra: every other member of the problem document.
    """

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        type_: str = "about:blank",
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.status = int(status)
        self.title = title
        self.detail = detail
        self.type = type_
        self.extra = dict(extra or {})
        super().__init__(
            f"{self.status} {title}: {detail}" if self.status else f"{title}: {detail}"
        )


class BadRequestError(KernelscopeError):
    """400: malformed input (bad safetensors, NaN values, row count mismatch ...)."""


class AuthenticationError(KernelscopeError):
    """401/403: missing or wrong bearer token."""


class NotFoundError(KernelscopeError):
    """404: unknown run or step."""


class ConflictError(KernelscopeError):
    """409: a run id taken by another spec, or an analysis on a step still pending."""


class PayloadTooLargeError(KernelscopeError):
    """413: the upload is over the server's body limit (``KERNELSCOPE_MAX_BODY_MB``)."""


class UnsupportedMediaTypeError(KernelscopeError):
    """415: wrong content type."""


class ValidationError(KernelscopeError):
    """422: a request that does not fit the run (shapes, sketch width, field values)."""


class ServerError(KernelscopeError):
    """5xx after every retry."""


class TransportError(KernelscopeError):
    """No answer: connection refused or dropped, timeouts (after every retry)."""


class StepTimeoutError(KernelscopeError):
    """``wait_ready`` ran out of time; ``extra["status"]`` holds the last step status."""


class StepFailedError(KernelscopeError):
    """``wait_ready`` saw the step fail (a dead-lettered upload); see ``extra["status"]``."""


_BY_STATUS: dict[int, type[KernelscopeError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: AuthenticationError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    415: UnsupportedMediaTypeError,
    422: ValidationError,
}


def error_from_response(response: httpx.Response) -> KernelscopeError:
    """The exception for an error answer, from its problem document when it has one."""
    status = response.status_code
    body: Any = None
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        body = None
    if isinstance(body, dict):
        title = str(body.get("title") or response.reason_phrase or "error")
        detail = body.get("detail")
        detail_text = detail if isinstance(detail, str) else json.dumps(detail)
        extra = {k: v for k, v in body.items() if k not in ("type", "title", "status", "detail")}
        type_ = str(body.get("type") or "about:blank")
    else:
        title = response.reason_phrase or "error"
        detail_text = response.text[:2000]
        extra = {}
        type_ = "about:blank"
    cls = _BY_STATUS.get(status, ServerError if status >= 500 else KernelscopeError)
    return cls(status, title, detail_text, type_, extra)
