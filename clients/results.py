"""Typed answers of the kernelscope API (architecture.md, REST API v1; numbers per math.md).

Each dataclass is built from the JSON answer by ``from_json``; arrays become numpy float64
arrays, and the full JSON stays available as ``raw`` for fields added later.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from sketch.blocks import PairStats

FloatArray = NDArray[np.float64]


def _array(values: Any) -> FloatArray:
    """float64 array; JSON ``null`` (a NaN the server could not encode) becomes NaN."""
    if values is None:
        return np.zeros(0, dtype=np.float64)
    arr = np.asarray(values, dtype=object)
    return np.asarray(np.where(arr == None, np.nan, arr), dtype=np.float64)  # noqa: E711


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


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


@dataclass(frozen=True)
class UploadError:
    """A dead-lettered upload and its error."""

    upload_id: str
    error: str
    attempts: int


@dataclass(frozen=True)
class StepStatus:
    """``GET /v1/runs/{run_id}/steps/{step}``: ``state`` is pending, ready or failed."""

    run_id: str
    step: int
    state: str
    sequences: int
    rows: int
    pending_uploads: int
    uploads: int
    applied_update: bool
    learning_rate: float | None
    errors: tuple[UploadError, ...]
    ranks_expected: int
    ranks_reported: tuple[int, ...]
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StepStatus:
        return cls(
            run_id=str(data.get("run_id", "")),
            step=int(data.get("step", -1)),
            state=str(data["state"]),
            sequences=int(data.get("sequences", 0)),
            rows=int(data.get("rows", 0)),
            pending_uploads=int(data.get("pending_uploads", 0)),
            uploads=int(data.get("uploads", 0)),
            applied_update=bool(data.get("applied_update", False)),
            learning_rate=_opt_float(data.get("learning_rate")),
            errors=tuple(
                UploadError(
                    str(e.get("upload_id", "")), str(e.get("error", "")), int(e.get("attempts", 0))
                )
                for e in data.get("errors") or []
            ),
            ranks_expected=int(data.get("ranks_expected", 1)),
            ranks_reported=tuple(int(r) for r in data.get("ranks_reported") or ()),
            raw=data,
        )


@dataclass(frozen=True)
class RunInfo:
    """A run: its sketch spec, normalisation, geometry, declared parameters, width ``k``."""

    run_id: str
    sketch: dict[str, Any]
    normalization: str
    geometry: str
    parameters: dict[str, list[int]] | None
    ranks: int
    k: int
    created_at: float
    steps: tuple[StepStatus, ...] | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunInfo:
        steps = data.get("steps")
        return cls(
            run_id=str(data["run_id"]),
            sketch=dict(data.get("sketch") or {}),
            normalization=str(data.get("normalization", "")),
            geometry=str(data.get("geometry", "")),
            parameters=data.get("parameters"),
            ranks=int(data.get("ranks", 1)),
            k=int(data.get("k", 0)),
            created_at=float(data.get("created_at", 0.0)),
            steps=None if steps is None else tuple(StepStatus.from_json(s) for s in steps),
            raw=data,
        )


@dataclass(frozen=True)
class Kernel:
    """``K(i, j)`` (or its cosine): ``matrix`` float64 ``[n, n]`` in the order of ``ids``."""

    ids: list[str]
    matrix: FloatArray


@dataclass(frozen=True)
class Diagonal:
    """``K(i, i) = |w_i|^2`` per sequence: ``values`` float64 ``[n]`` aligned with ``ids``."""

    ids: list[str]
    prompt_ids: list[str | int]
    values: FloatArray

    @classmethod
    def from_json(cls, data: list[dict[str, Any]]) -> Diagonal:
        return cls(
            ids=[str(e["id"]) for e in data],
            prompt_ids=[e.get("prompt_id", "") for e in data],
            values=_array([e.get("value") for e in data]),
        )


@dataclass(frozen=True)
class Spectrum:
    """Eigenvalues of K (descending), trace, effective rank, participation ratio.

    ``eigenvectors`` ``[r, n]``, one unit eigenvector per row (the top ``r``), when requested
    with ``top``.
    """

    eigenvalues: FloatArray
    trace: float
    effective_rank: float
    participation_ratio: float
    eigenvectors: FloatArray | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Spectrum:
        vectors = data.get("eigenvectors")
        return cls(
            eigenvalues=_array(data.get("eigenvalues")),
            trace=float(data["trace"]),
            effective_rank=float(data["effective_rank"]),
            participation_ratio=float(data["participation_ratio"]),
            eigenvectors=None if vectors is None else _array(vectors),
            raw=data,
        )


@dataclass(frozen=True)
class Blocks:
    """Pair-type statistics and the ``B x B`` prompt matrices of mean K and mean rho."""

    diagonal: PairStats
    same_prompt: PairStats
    cross_prompt: PairStats
    prompts: list[str]
    prompt_mean_k: FloatArray
    prompt_mean_rho: FloatArray
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Blocks:
        pm = data.get("prompt_matrix") or {}
        return cls(
            diagonal=PairStats.from_dict(data["diagonal"]),
            same_prompt=PairStats.from_dict(data["same_prompt"]),
            cross_prompt=PairStats.from_dict(data["cross_prompt"]),
            prompts=[str(p) for p in pm.get("prompts", [])],
            prompt_mean_k=_array(pm.get("mean_k")),
            prompt_mean_rho=_array(pm.get("mean_rho")),
            raw=data,
        )


@dataclass(frozen=True)
class EntropyReport:
    """``GET .../steps/{step}/entropy``: ``dH1`` with error bars and its decomposition.

    Optional members (``delta_h1_applied``, ``delta_h2``, ``realized``, ``ratio``) are
    ``None`` when the step lacks what they need; ``realized``, ``ratio_interval``, ``taylor``,
    ``decomposition``, ``per_sequence`` and ``noise_scale`` are the JSON objects as sent
    (math.md §6 and docs/estimators.md define their members).
    """

    delta_h1: float
    estimator: str
    se_sampling: float
    se_sketch: float
    delta_h1_diag: float | None
    cov_baseline: float | None
    delta_h1_applied: float | None
    delta_h2: float | None
    realized: Any
    decomposition: dict[str, Any]
    per_sequence: Any
    noise_scale: Any
    ratio: float | None = None
    ratio_interval: dict[str, Any] | None = None
    taylor: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def realized_delta(self) -> float | None:
        """``realized.delta_h``, the realized change (``None`` when unknown)."""
        return _opt_float(self.realized["delta_h"]) if self.realized else None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EntropyReport:
        return cls(
            delta_h1=float(data["delta_h1"]),
            estimator=str(data.get("estimator", "")),
            se_sampling=float(data.get("se_sampling") or 0.0),
            se_sketch=float(data.get("se_sketch") or 0.0),
            delta_h1_diag=_opt_float(data.get("delta_h1_diag")),
            cov_baseline=_opt_float(data.get("cov_baseline")),
            delta_h1_applied=_opt_float(data.get("delta_h1_applied")),
            delta_h2=_opt_float(data.get("delta_h2")),
            realized=data.get("realized"),
            decomposition=dict(data.get("decomposition") or {}),
            per_sequence=data.get("per_sequence"),
            noise_scale=data.get("noise_scale"),
            ratio=_opt_float(data.get("ratio")),
            ratio_interval=data.get("ratio_interval"),
            taylor=data.get("taylor"),
            raw=data,
        )


@dataclass(frozen=True)
class HistoryRow:
    """One step of a run's entropy history: predicted, realized, ratio, error bars, regime
    (the fields of ``RunEntropyRow`` in docs/api.md)."""

    step: int
    delta_h1: float
    se_sampling: float
    se_sketch: float
    estimator: str
    realized: float | None
    ratio: float | None
    delta_h1_applied: float | None
    delta_h2: float | None
    spectrum_head: FloatArray
    realized_se: float | None = None
    ratio_low: float | None = None
    ratio_high: float | None = None
    ratio_estimable: bool | None = None
    kl: float | None = None
    kl_se: float | None = None
    regime: str | None = None
    regime_reasons: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HistoryRow:
        estimable = data.get("ratio_estimable")
        return cls(
            step=int(data["step"]),
            delta_h1=float(data["delta_h1"]),
            se_sampling=float(data.get("se_sampling") or 0.0),
            se_sketch=float(data.get("se_sketch") or 0.0),
            estimator=str(data.get("estimator", "")),
            realized=_opt_float(data.get("realized")),
            ratio=_opt_float(data.get("ratio")),
            delta_h1_applied=_opt_float(data.get("delta_h1_applied")),
            delta_h2=_opt_float(data.get("delta_h2")),
            spectrum_head=_array(data.get("spectrum_head") or []),
            realized_se=_opt_float(data.get("realized_se")),
            ratio_low=_opt_float(data.get("ratio_low")),
            ratio_high=_opt_float(data.get("ratio_high")),
            ratio_estimable=None if estimable is None else bool(estimable),
            kl=_opt_float(data.get("kl")),
            kl_se=_opt_float(data.get("kl_se")),
            regime=data.get("regime"),
            regime_reasons=tuple(data.get("regime_reasons") or ()),
        )


@dataclass(frozen=True)
class EntropyHistory:
    """``GET /v1/runs/{run_id}/entropy``: one row per analysed step."""

    run_id: str
    steps: tuple[HistoryRow, ...]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EntropyHistory:
        return cls(
            run_id=str(data.get("run_id", "")),
            steps=tuple(HistoryRow.from_json(r) for r in data.get("steps", [])),
        )
