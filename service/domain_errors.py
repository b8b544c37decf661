"""What the service's domain code refuses, as exceptions that know nothing of HTTP.

:mod:`service.analysis` and :mod:`service.uploads` raise these; :mod:`service.errors` maps
each class to its problem+json answer (status, title, extension members) in one place.
"""

from __future__ import annotations

from typing import Any

from service.schemas import StepStatus


class DomainError(Exception):
    """A request the service understood but cannot serve; ``detail`` says why."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class NotFoundError(DomainError):
    """The run or step does not exist."""


class StepNotReadyError(DomainError):
    """The step is pending or failed; ``status`` is its status document."""

    def __init__(self, detail: str, status: StepStatus) -> None:
        super().__init__(detail)
        self.status = status


class StepIncompleteError(DomainError):
    """The step's sketched rows and sequence metadata do not match (yet).

    The id lists are ``None`` when the step has no metadata at all."""

    def __init__(
        self,
        detail: str,
        missing_rows: list[str] | None = None,
        rows_without_metadata: list[str] | None = None,
        update_rows_without_update_role: list[str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.missing_rows = missing_rows
        self.rows_without_metadata = rows_without_metadata
        self.update_rows_without_update_role = update_rows_without_update_role


class TooLargeError(DomainError):
    """The step has more sequences (or bytes) than an n x n analysis may load."""


class CannotAnalyseError(DomainError):
    """``sketch/`` refused the step's data (no rows of a role, a non-kernel, ...)."""


class ShuttingDownError(DomainError):
    """The service began to stop while the call waited; the client retries later."""


class BusyError(DomainError):
    """A shared budget (upload bytes in flight) is spent for now; the client retries later."""


class InvalidUploadError(DomainError):
    """An upload body refused: ``status`` 400 (malformed), 413 (too large), 415 (media
    type) or 422 (valid safetensors that does not fit the run); ``extra`` are the problem's
    extension members (e.g. ``missing_ids``)."""

    def __init__(self, status: int, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.extra = extra
