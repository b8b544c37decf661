"""What a ``/v1`` request must pass before any of its body is read: the optional bearer token
(``KERNELSCOPE_TOKEN``) and, for JSON bodies, their size (``KERNELSCOPE_MAX_JSON_MB``).

FastAPI parses a JSON body before the route's dependencies run, so a token check in a
dependency comes after the whole body was read and parsed: :class:`RequestGate` checks both in
an ASGI middleware, on the headers, before the app reads anything.
"""

from __future__ import annotations

import hmac

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import ProblemError, problem_response
from service.uploads import UPLOAD_MEDIA_TYPES


def check_bearer(authorization: str | None, token: str | None) -> None:
    """Raise a 401 problem unless ``authorization`` is ``Bearer <token>`` (or no token is set).

    The comparison is constant-time (``hmac.compare_digest``) over UTF-8 bytes.
    """
    if not token:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode(), token.encode()
    ):
        raise ProblemError(
            401,
            "missing or wrong bearer token (Authorization: Bearer <KERNELSCOPE_TOKEN>)",
            headers={"WWW-Authenticate": 'Bearer realm="kernelscope"'},
        )


class RequestGate:
    """ASGI middleware for ``/v1``: a wrong or missing bearer token is a 401 before any body
    byte is read; a JSON body (anything but the upload media types, which have their own
    limit) declared larger than ``max_json_bytes`` is a 413 at once, and one that streams past
    it without a ``Content-Length`` is cut off with a 413."""

    def __init__(self, app: ASGIApp, token: str | None, max_json_bytes: int) -> None:
        self.app = app
        self.token = token
        self.max_json_bytes = max_json_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        media_type = headers.get("content-type", "").split(";")[0].strip().lower()
        limit = None if media_type in UPLOAD_MEDIA_TYPES else self.max_json_bytes
        try:
            check_bearer(headers.get("authorization"), self.token)
            declared = headers.get("content-length", "")
            if limit is not None and declared.isdigit() and int(declared) > limit:
                raise _too_large(limit)
        except ProblemError as problem:
            await problem_response(problem)(scope, receive, send)
            return
        if limit is None:
            await self.app(scope, receive, send)
            return
        seen = 0

        async def bounded() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    # FastAPI re-raises an HTTPException met while reading the body: a 413
                    problem = _too_large(limit)
                    raise HTTPException(413, problem.detail)
            return message

        await self.app(scope, bounded, send)


def _too_large(limit: int) -> ProblemError:
    return ProblemError(
        413, f"JSON body larger than KERNELSCOPE_MAX_JSON_MB ({limit / 2**20:g} MiB)"
    )
