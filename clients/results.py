"""Typed answers of the kernelscope API (architecture.md, REST API v1; numbers per math.md).

Each answer class has exactly the fields of the service's response document (the models
of ``service/schemas.py``, which this package does not import: it talks HTTP) and is built by
``from_json``, which refuses a document that lacks a field or has one of the wrong type
(``pydantic.ValidationError``).  Arrays become numpy float64 arrays (a JSON ``null``, a
NaN the server could not encode, becomes NaN); the document as received stays available as
``raw``.  Members the service may add later are ignored here and kept in ``raw``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal, Self

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, PlainValidator, PrivateAttr, TypeAdapter


def _array(values: Any) -> NDArray[np.float64]:
    """float64 array; JSON ``null`` (a NaN the server could not encode) becomes NaN."""
    arr = np.asarray(values, dtype=object)
    return np.asarray(np.where(arr == None, np.nan, arr), dtype=np.float64)  # noqa: E711


FloatArray = Annotated[NDArray[np.float64], PlainValidator(_array)]


class _Answer(BaseModel):
    """An answer document: frozen, validated field by field, the JSON kept as ``raw``."""

    model_config = ConfigDict(frozen=True, extra="ignore", arbitrary_types_allowed=True)
    _raw: Any = PrivateAttr(default=None)

    @classmethod
    def from_json(cls, data: Any) -> Self:
        """Parse the JSON document ``data``; ``pydantic.ValidationError`` if it does not fit."""
        answer = cls.model_validate(data)
        answer._raw = data
        return answer

    @property
    def raw(self) -> Any:
        """The document as received (``None`` for an answer built in the client)."""
        return self._raw


@dataclass(frozen=True)
class UploadReceipt:
    """202 answer of one upload: ``upload_id``, rows, and whether it was newly ``queued``."""

    upload_id: str
    rows: int
    queued: bool
    idempotency_key: str
    tensors: tuple[str, ...]
    bytes: int


@dataclass(frozen=True)
class PushResult:
    """What a ``push_gradients`` / ``push_sketches`` call sent: one receipt per upload."""

    uploads: tuple[UploadReceipt, ...]

    @property
    def bytes(self) -> int:
        """Body bytes sent (last attempt of each upload)."""
        return sum(u.bytes for u in self.uploads)

    @property
    def queued(self) -> int:
        """Uploads the server queued (re-sent uploads it already had are not counted)."""
        return sum(1 for u in self.uploads if u.queued)


class UploadError(_Answer):
    """A dead-lettered upload and its error."""

    upload_id: str
    error: str
    attempts: int


class StepStatus(_Answer):
    """``GET /v1/runs/{run_id}/steps/{step}``: ``state`` is pending, ready or failed."""

    run_id: str
    step: int
    state: Literal["pending", "ready", "failed"]
    sequences: int
    rows: int
    pending_uploads: int
    uploads: int
    applied_update: bool
    learning_rate: float | None
    errors: tuple[UploadError, ...]
    ranks_expected: int
    ranks_reported: tuple[int, ...]
    token_sequences: int


class RunInfo(_Answer):
    """A run: its sketch spec, normalisation, geometry, declared parameters, width ``k``;
    ``steps`` (their status) only from ``GET /v1/runs/{run_id}``."""

    run_id: str
    sketch: dict[str, Any]
    normalization: str
    geometry: str
    parameters: dict[str, list[int]] | None
    ranks: int
    applied_includes_step: bool = False
    k: int
    created_at: float
    steps: tuple[StepStatus, ...] | None = None


class Kernel(_Answer):
    """``K(i, j)`` (or its cosine): ``matrix`` float64 ``[n, n]`` in the order of ``ids``."""

    ids: list[str]
    matrix: FloatArray


class DiagonalEntry(_Answer):
    """``K(i, i)`` of one sequence."""

    id: str
    prompt_id: str | int
    value: float | None


_ENTRIES = TypeAdapter(list[DiagonalEntry])


@dataclass(frozen=True)
class Diagonal:
    """``K(i, i) = |w_i|^2`` per sequence: ``values`` float64 ``[n]`` aligned with ``ids``."""

    ids: list[str]
    prompt_ids: list[str | int]
    values: NDArray[np.float64]

    @classmethod
    def from_json(cls, data: Any) -> Diagonal:
        """Parse the answer, a JSON list of ``{"id", "prompt_id", "value"}``."""
        entries = _ENTRIES.validate_python(data)
        return cls(
            ids=[e.id for e in entries],
            prompt_ids=[e.prompt_id for e in entries],
            values=_array([e.value for e in entries]),
        )


class Spectrum(_Answer):
    """Eigenvalues of K (descending), trace, effective rank, participation ratio.

    ``eigenvectors`` ``[r, n]``, one unit eigenvector per row (the top ``r``), only when
    requested with ``top``.
    """

    eigenvalues: FloatArray
    trace: float
    effective_rank: float
    participation_ratio: float
    eigenvectors: FloatArray | None = None


class PairStats(_Answer):
    """Statistics over one pair type (``None`` where the type has no pairs or ``K = 0``)."""

    count: int
    mean_k: float | None
    mean_abs_k: float | None
    mean_rho: float | None
    mean_abs_rho: float | None
    share_frobenius: float | None


class PromptMatrix(_Answer):
    """``B x B`` means per prompt pair, rows and columns in the order of ``prompts``."""

    prompts: list[str]
    mean_k: FloatArray
    mean_rho: FloatArray


class Blocks(_Answer):
    """Pair-type statistics and the ``B x B`` prompt matrices of mean K and mean rho."""

    diagonal: PairStats
    same_prompt: PairStats
    cross_prompt: PairStats
    prompt_matrix: PromptMatrix

    @property
    def prompts(self) -> list[str]:
        return self.prompt_matrix.prompts

    @property
    def prompt_mean_k(self) -> NDArray[np.float64]:
        return self.prompt_matrix.mean_k

    @property
    def prompt_mean_rho(self) -> NDArray[np.float64]:
        return self.prompt_matrix.mean_rho


class EntropyReport(_Answer):
    """``GET .../steps/{step}/entropy``: ``dH1`` with error bars and its decomposition.

    Optional members (``delta_h1_applied``, ``delta_h2``, ``realized``, ``ratio``, ...) are
    ``None`` when the step lacks what they need; ``decomposition``, ``per_sequence``,
    ``noise_scale``, ``realized``, ``ratio_interval`` and ``taylor`` are the JSON objects as
    sent (math.md §6 and docs/estimators.md define their members).
    """

    delta_h1: float
    estimator: str
    se_sampling: float
    se_sketch: float
    decomposition: dict[str, Any]
    per_sequence: list[dict[str, Any]]
    delta_h1_diag: float | None
    cov_baseline: float | None
    noise_scale: dict[str, Any]
    learning_rate: float
    step_norm: float
    normalization: str
    num_update: int
    num_entropy: int
    num_prompts: int
    delta_h1_applied: float | None
    se_applied: float | None
    delta_h2: float | None
    delta_h1_plus_h2: float | None
    realized: dict[str, Any] | None
    ratio: float | None
    ratio_interval: dict[str, Any] | None
    taylor: dict[str, Any] | None
    target: Literal["sequence", "token_mean"]
    entropy_gradient: Literal["score", "entropy_sum"]

    @property
    def realized_delta(self) -> float | None:
        """``realized.delta_h``, the realized change (``None`` when unknown)."""
        return None if self.realized is None else float(self.realized["delta_h"])


class HistoryRow(_Answer):
    """One step of a run's entropy history: predicted, realized, ratio, error bars, regime
    (the fields of ``RunEntropyRow`` in docs/api.md)."""

    step: int
    target: Literal["sequence", "token_mean"]
    delta_h1: float
    se_sampling: float
    se_sketch: float
    estimator: str
    entropy_gradient: Literal["score", "entropy_sum"]
    realized: float | None
    realized_se: float | None
    realized_source: Literal["logprob_after", "entropy_sum", "posted", "given"] | None
    realized_snis: float | None
    ratio: float | None
    ratio_low: float | None
    ratio_high: float | None
    ratio_estimable: bool | None
    kl: float | None
    kl_se: float | None
    regime: str | None
    regime_reasons: tuple[str, ...]
    delta_h1_applied: float | None
    se_applied: float | None
    delta_h2: float | None
    delta_h1_plus_h2: float | None
    spectrum_head: FloatArray


class EntropyHistory(_Answer):
    """``GET /v1/runs/{run_id}/entropy``: one row per analysed step."""

    run_id: str
    steps: tuple[HistoryRow, ...]


class TokenShare(_Answer):
    """One token of ``GET .../tokens``: its exact share of ``dH1`` and covariance score."""

    sequence_id: str
    position: int
    token_id: int
    token: str | None
    share: float
    cov_score: float
    logprob: float
    advantage: float


class TokenSequenceTotal(_Answer):
    """A sequence's token shares summed (its ``a_i``)."""

    id: str
    prompt_id: str
    num_tokens: int
    total: float


class CovarianceComparison(_Answer):
    """Cui et al.'s token covariance against the exact shares (math.md §9)."""

    num_tokens: int
    kl_cov_ratio: float
    k: int
    precision_at_k: float
    spearman: float | None
    selected_sum: float
    selected_share: float | None
    clip_cov_ratio: float
    clip_cov_lb: float
    clip_cov_ub: float
    clip_k: int
    clip_candidates: int
    clip_candidate_share: float | None


class TokensReport(_Answer):
    """``GET .../steps/{step}/tokens``: the tokens that move the entropy."""

    run_id: str
    step: int
    estimator: str
    target: Literal["sequence", "token_mean"]
    learning_rate: float
    num_sequences: int
    num_tokens: int
    total: float
    down: tuple[TokenShare, ...]
    up: tuple[TokenShare, ...]
    sequences: tuple[TokenSequenceTotal, ...]
    sequence: tuple[TokenShare, ...] | None
    covariance: CovarianceComparison
