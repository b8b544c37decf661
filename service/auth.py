"""Optional bearer-token authentication of the ``/v1`` routes (``KERNELSCOPE_TOKEN``)."""

from __future__ import annotations

import hmac

from service.errors import ProblemError


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
