"""Pydantic request and response models of REST API v1 (architecture.md), with OpenAPI examples.

This module is the one definition of every answer: the routes declare these models, the
cached analysis answers are encoded from them, and the ``from_*`` classmethods are the one
place where ``sketch/``'s dataclasses become API documents.  Field names are the contract
shared with clients and tests; math.md defines every number.  A float the core reports as
NaN or Inf is sent as ``null`` (pydantic's JSON encoding).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from service.keys import APPLIED_UPDATE_ID, ID_PATTERN
from sketch.base import SketchKind
from sketch.blocks import Blocks
from sketch.entropy import EntropyChange, Estimator
from sketch.rao_blackwell import EntropyGradient
from sketch.realized import RealizedEstimator
from sketch.sequences import Geometry, Normalization, Role
from sketch.spectrum import Spectrum
from sketch.taylor import Regime
from sketch.token_covariance import CovarianceComparison
from sketch.token_mean import Target

if TYPE_CHECKING:
    from service.store import StepCounts

RoleQuery = Literal["update", "entropy", "all"]
StepState = Literal["pending", "ready", "failed"]
RealizedSource = Literal["logprob_after", "entropy_sum", "posted", "given"]


class GroupIn(BaseModel):
    """One parameter group of a grouped sketch: names matching ``pattern`` get their own ``dim``."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=ID_PATTERN)
    pattern: str = Field(min_length=1, max_length=1024)
    dim: int = Field(gt=0, le=1 << 20)


class SketchSpecIn(BaseModel):
    """The sketch of a run (math.md §7); fixed for the run's lifetime."""

    model_config = ConfigDict(extra="forbid")
    kind: SketchKind
    dim: int = Field(gt=0, le=1 << 20, description="k, the sketch width (ignored by exact)")
    seed: int = Field(default=0, ge=0, lt=1 << 63)
    groups: list[GroupIn] | None = None


class RunCreate(BaseModel):
    """Body of ``POST /v1/runs``."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "run_id": "grpo-demo",
                    "sketch": {"kind": "countsketch", "dim": 1024, "seed": 0},
                    "normalization": "dr_grpo",
                    "geometry": "sgd",
                    "parameters": {"lm_head.weight": [50257, 768]},
                }
            ]
        },
    )
    run_id: str | None = Field(default=None, pattern=ID_PATTERN)
    sketch: SketchSpecIn
    normalization: Normalization = Normalization.DR_GRPO
    geometry: Geometry = Geometry.SGD
    parameters: dict[str, list[int]] | None = Field(
        default=None, description="Declared parameter shapes {name: shape}; enables shape checks."
    )
    ranks: int = Field(
        default=1,
        ge=1,
        le=1 << 16,
        description="Trainer processes that push each step (data-parallel ranks); a step is "
        "ready once every rank has posted its sequences.",
    )
    applied_includes_step: bool = Field(
        default=False,
        description="The applied update is learning_rate times the step's g_hat (the sum of "
        "its update rows) plus a part that is not a function of the step's sequences "
        "(momentum of earlier steps, weight decay): delta_h1_applied then pairs the step's "
        "own part as delta_h1 does, unbiased when the entropy and update sequences are the "
        "same (math.md §4).",
    )

    @field_validator("parameters")
    @classmethod
    def _shapes(cls, value: dict[str, list[int]] | None) -> dict[str, list[int]] | None:
        if value is None:
            return value
        if not value:
            raise ValueError("parameters, when given, must name at least one parameter")
        for name, shape in value.items():
            if not name or len(name) > 1024 or "@" in name:
                raise ValueError(f"bad parameter name {name[:80]!r} (1..1024 chars, no '@')")
            if any(s < 0 for s in shape):
                raise ValueError(f"parameter {name!r}: negative dimension in {shape}")
        return value

    @model_validator(mode="after")
    def _needs_parameters(self) -> RunCreate:
        if self.sketch.kind in (SketchKind.EXACT, SketchKind.KRONECKER) and self.parameters is None:
            raise ValueError(f"sketch kind {self.sketch.kind.value!r} needs declared parameters")
        return self


class Run(BaseModel):
    """A run as stored: its spec and creation time."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "run_id": "grpo-demo",
                    "sketch": {"kind": "countsketch", "dim": 1024, "seed": 0, "groups": None},
                    "normalization": "dr_grpo",
                    "geometry": "sgd",
                    "parameters": None,
                    "k": 1024,
                    "created_at": 1764111600.0,
                }
            ]
        }
    )
    run_id: str
    sketch: SketchSpecIn
    normalization: Normalization
    geometry: Geometry
    parameters: dict[str, list[int]] | None
    ranks: int = Field(default=1, description="Trainer processes that push each step.")
    applied_includes_step: bool = Field(
        default=False, description="The applied update is learning_rate * g_hat plus the rest."
    )
    k: int = Field(description="Total sketch width of a row (sum over groups; N for exact).")
    created_at: float


class SequenceIn(BaseModel):
    """Metadata of one sampled response (math.md §1)."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(pattern=ID_PATTERN)
    prompt_id: str | int
    logprob: float = Field(description="S_i, the sum of the response's token log-probs")
    advantage: float
    num_tokens: int = Field(ge=1)
    role: Role = Role.UPDATE
    weight: float | None = None
    logprob_after: float | None = None
    entropy_sum: float | None = Field(
        default=None,
        ge=0,
        description="sum over the response's positions of the full next-token entropy H_t "
        "before the step (math.md §8): the token-mean entropy trainers log",
    )
    entropy_sum_after: float | None = Field(
        default=None, ge=0, description="the same sum after the step, at the same tokens"
    )

    @field_validator("id")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value == APPLIED_UPDATE_ID:
            raise ValueError(f"{APPLIED_UPDATE_ID!r} is reserved for the applied-update row")
        return value


class TokenSequenceIn(BaseModel):
    """One update sequence's tokens and their exact shares of ``dH1`` (math.md §9)."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(pattern=ID_PATTERN, description="an update-role sequence of the step")
    token_ids: list[int] = Field(min_length=1, description="its response tokens, in order")
    tokens: list[str] | None = Field(
        default=None, description="the decoded text of each token (optional)"
    )
    logprobs: list[float] = Field(description="log pi(y_t | p, y_<t) of each token")
    shares: list[float] = Field(
        description="a_{i,t} = eta c_{i,t} <grad_hat H, grad log pi(y_{i,t})>, each token's "
        "exact part of the step's dH1"
    )

    @model_validator(mode="after")
    def _aligned(self) -> TokenSequenceIn:
        n = len(self.token_ids)
        lengths = {len(self.logprobs), len(self.shares)}
        if self.tokens is not None:
            lengths.add(len(self.tokens))
        if lengths != {n}:
            raise ValueError(
                f"sequence {self.id!r}: token_ids, logprobs, shares (and tokens) must have "
                f"one length, got {sorted(lengths | {n})}"
            )
        values = self.logprobs + self.shares
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"sequence {self.id!r}: logprobs and shares must be finite")
        return self


class TokensIn(BaseModel):
    """Body of ``POST /v1/runs/{run_id}/steps/{step}/tokens``: the exact token shares of
    update sequences (upsert by id; every push of a step names the same estimator, target and
    learning rate)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "estimator": "independent",
                    "target": "sequence",
                    "learning_rate": 1e-6,
                    "sequences": [
                        {
                            "id": "p0-r0",
                            "token_ids": [318, 257],
                            "tokens": [" is", " a"],
                            "logprobs": [-0.7, -2.3],
                            "shares": [-1.2e-4, 3.1e-5],
                        }
                    ],
                }
            ]
        },
    )
    estimator: Estimator = Field(
        default=Estimator.INDEPENDENT,
        description=(
            "the estimator whose grad_hat H gave the shares (independent with entropy-role"
            " sequences; cross_fit or u_statistic without)"
        ),
    )
    target: Target = Target.SEQUENCE
    learning_rate: float = Field(description="eta of the shares")
    sequences: list[TokenSequenceIn] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> TokensIn:
        if not math.isfinite(self.learning_rate):
            raise ValueError("learning_rate must be finite")
        ids = [s.id for s in self.sequences]
        if len(set(ids)) != len(ids):
            raise ValueError("sequence ids must be unique within a push")
        return self


class TokensRecorded(BaseModel):
    """Answer of ``POST .../tokens``."""

    run_id: str
    step: int
    upserted: int = Field(description="sequences in this push")
    sequences: int = Field(description="sequences of the step with token shares now")


class TokenShareOut(BaseModel):
    """One token: its exact share of ``dH1`` and its Cui et al. covariance score."""

    sequence_id: str
    position: int = Field(description="its index among the sequence's response tokens")
    token_id: int
    token: str | None
    share: float
    cov_score: float = Field(description="(A - mean A)(log pi - mean log pi) over the step")
    logprob: float
    advantage: float


class TokenSequenceTotal(BaseModel):
    """A sequence's tokens summed: its ``a_i``."""

    id: str
    prompt_id: str
    num_tokens: int
    total: float


class CovarianceOut(BaseModel):
    """Cui et al.'s token covariance held against the exact shares (math.md §9)."""

    num_tokens: int
    kl_cov_ratio: float
    k: int = Field(description="KL-Cov's selection, max(1, int(num_tokens * kl_cov_ratio))")
    precision_at_k: float = Field(
        description="fraction of KL-Cov's k tokens among the k that push entropy down most"
    )
    spearman: float | None = Field(description="rank correlation of cov_score with -share")
    selected_sum: float
    selected_share: float | None = Field(description="part of dH1 KL-Cov's tokens carry")
    clip_cov_ratio: float
    clip_cov_lb: float
    clip_cov_ub: float
    clip_k: int
    clip_candidates: int
    clip_candidate_share: float | None

    @classmethod
    def from_comparison(cls, comparison: CovarianceComparison) -> CovarianceOut:
        return cls.model_validate(comparison, from_attributes=True)


class TokensOut(BaseModel):
    """``GET .../steps/{step}/tokens``: the tokens that move the entropy (math.md §9)."""

    run_id: str
    step: int
    estimator: Estimator
    target: Target
    learning_rate: float
    num_sequences: int
    num_tokens: int
    total: float = Field(description="the sum of every share: dH1 of the pushed sequences")
    down: list[TokenShareOut] = Field(description="the tokens pushing entropy down most")
    up: list[TokenShareOut] = Field(description="the tokens pushing entropy up most")
    sequences: list[TokenSequenceTotal]
    sequence: list[TokenShareOut] | None = Field(
        default=None, description="every token of ?sequence=ID, in order"
    )
    covariance: CovarianceOut


class SequencesIn(BaseModel):
    """Body of ``POST /v1/runs/{run_id}/steps/{step}/sequences`` (upsert by id)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "learning_rate": 1e-6,
                    "max_length": 512,
                    "sequences": [
                        {
                            "id": "p0-r0",
                            "prompt_id": "p0",
                            "logprob": -42.1,
                            "advantage": 0.5,
                            "num_tokens": 37,
                        },
                        {
                            "id": "p0-r1",
                            "prompt_id": "p0",
                            "logprob": -55.0,
                            "advantage": -0.5,
                            "num_tokens": 51,
                            "logprob_after": -55.3,
                        },
                    ],
                }
            ]
        },
    )
    learning_rate: float = Field(ge=0, allow_inf_nan=False)
    max_length: int | None = Field(default=None, ge=1)
    rank: int | None = Field(
        default=None,
        ge=0,
        description="The pushing trainer process, 0 <= rank < the run's ranks (required when "
        "ranks > 1; default 0). Each rank posts its sequences after its rows.",
    )
    sequences: list[SequenceIn] = Field(max_length=1 << 16)

    @model_validator(mode="after")
    def _unique(self) -> SequencesIn:
        counts = Counter(s.id for s in self.sequences)  # linear: 2^16 ids in milliseconds
        if len(counts) != len(self.sequences):
            dup = sorted(i for i, c in counts.items() if c > 1)
            raise ValueError(f"duplicate sequence ids in one request: {dup[:10]}")
        return self


class SequencesOut(BaseModel):
    """Answer of a sequences upsert."""

    run_id: str
    step: int
    upserted: int
    sequences: int = Field(description="metadata rows of the step after the upsert")


class RealizedIn(BaseModel):
    """Body of ``POST .../realized``: the trainer's measured entropies (nats, math.md §3)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"entropy_before": 41.7, "entropy_after": 41.2}]},
    )
    entropy_before: float = Field(allow_inf_nan=False)
    entropy_after: float = Field(allow_inf_nan=False)


class RealizedRecorded(BaseModel):
    """Answer of ``POST .../realized``: the entropies recorded for the step."""

    run_id: str
    step: int
    entropy_before: float
    entropy_after: float


class UploadAccepted(BaseModel):
    """Answer of a gradient or sketch upload: 202 (stored, queued for a worker) or 201 (stored
    and sketched on receipt, by an API that runs workers of its own)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"upload_id": "u5f1c0e9d2b7a4c3e8f6a1b2c3d4e5f60", "rows": 8, "queued": True}
            ]
        }
    )
    upload_id: str
    rows: int
    queued: bool = Field(description="false when the same upload was already stored (re-send)")


class UploadError(BaseModel):
    """A dead-lettered upload and why it failed."""

    upload_id: str
    error: str
    attempts: int


class StepStatus(BaseModel):
    """``GET /v1/runs/{run_id}/steps/{step}``.

    ``pending``: some upload is queued (not yet sketched), no sketched row / no metadata yet, or
    fewer than ``ranks_expected`` trainer ranks have posted their sequences; ``failed``: an
    upload was dead-lettered (see ``errors``); else ``ready``.
    """

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "run_id": "grpo-demo",
                    "step": 3,
                    "state": "ready",
                    "sequences": 8,
                    "rows": 8,
                    "pending_uploads": 0,
                    "uploads": 2,
                    "applied_update": False,
                    "learning_rate": 1e-6,
                    "errors": [],
                    "ranks_expected": 1,
                    "ranks_reported": [0],
                }
            ]
        }
    )
    run_id: str
    step: int
    state: StepState
    sequences: int
    rows: int
    pending_uploads: int
    uploads: int
    applied_update: bool
    learning_rate: float | None
    errors: list[UploadError]
    ranks_expected: int = Field(description="the run's ranks")
    ranks_reported: list[int] = Field(description="ranks that posted sequences, ascending")
    token_sequences: int = Field(
        default=0, description="sequences with token shares (GET .../tokens answers when > 0)"
    )

    @classmethod
    def from_counts(cls, counts: StepCounts, run_id: str, step: int) -> StepStatus:
        """The status document of a step from the store's counts."""
        return cls(
            run_id=run_id,
            step=step,
            state=cast(StepState, counts.state),  # validated against StepState here
            sequences=counts.sequences,
            rows=counts.rows,
            pending_uploads=counts.pending_uploads,
            uploads=counts.uploads,
            applied_update=counts.applied_update,
            learning_rate=counts.learning_rate,
            errors=[UploadError.model_validate(e) for e in counts.errors],
            ranks_expected=counts.ranks_expected,
            ranks_reported=counts.ranks_reported,
            token_sequences=counts.token_sequences,
        )


class RunDetail(Run):
    """One run with the status of each of its steps."""

    steps: list[StepStatus]


class KernelOut(BaseModel):
    """The Fisher kernel K(i, j) = <w_i, w_j> (or its cosine with ``normalize=true``)."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"ids": ["a", "b"], "matrix": [[2.0, 0.5], [0.5, 1.0]]}]}
    )
    ids: list[str]
    matrix: list[list[float]]


class DiagonalEntry(BaseModel):
    """K(i, i) = |w_i|^2 of one sequence."""

    id: str
    prompt_id: str | int
    value: float


class SpectrumOut(BaseModel):
    """Eigen-structure of K (math.md §5)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "eigenvalues": [3.2, 1.1, 0.2],
                    "trace": 4.5,
                    "effective_rank": 2.1,
                    "participation_ratio": 1.8,
                }
            ]
        }
    )
    eigenvalues: list[float]
    trace: float
    effective_rank: float
    participation_ratio: float
    eigenvectors: list[list[float]] | None = None

    @classmethod
    def from_spectrum(cls, spectrum: Spectrum) -> SpectrumOut:
        vectors = spectrum.eigenvectors
        return cls(
            eigenvalues=np.asarray(spectrum.eigenvalues, dtype=np.float64).tolist(),
            trace=float(spectrum.trace),
            effective_rank=float(spectrum.effective_rank),
            participation_ratio=float(spectrum.participation_ratio),
            eigenvectors=None if vectors is None else np.asarray(vectors).tolist(),
        )

    def to_json(self) -> bytes:
        """The answer's JSON; ``eigenvectors`` only when they were asked for (``top > 0``)."""
        return self.model_dump_json(
            exclude={"eigenvectors"} if self.eigenvectors is None else None
        ).encode()


class _FromSketch(BaseModel):
    """A document read from a ``sketch/`` dataclass by its attribute names."""

    model_config = ConfigDict(from_attributes=True)


class PairStatsOut(_FromSketch):
    """Statistics of one pair type (math.md §5); ``null`` where the type has no pairs."""

    count: int
    mean_k: float | None
    mean_abs_k: float | None
    mean_rho: float | None
    mean_abs_rho: float | None
    share_frobenius: float | None = Field(description="sum of K^2 over these pairs / |K|_F^2")


class PromptMatrixOut(BaseModel):
    """``B x B`` means per prompt pair (rows and columns in the order of ``prompts``); a
    prompt's own cell averages over ``i != j`` (``null`` for a prompt with one sequence)."""

    prompts: list[str]
    mean_k: list[list[float | None]]
    mean_rho: list[list[float | None]]


class BlocksOut(BaseModel):
    """Pair-type statistics and the prompt matrix of ``GET .../kernel/blocks`` (math.md §5)."""

    diagonal: PairStatsOut
    same_prompt: PairStatsOut
    cross_prompt: PairStatsOut
    prompt_matrix: PromptMatrixOut

    @classmethod
    def from_blocks(cls, blocks: Blocks) -> BlocksOut:
        pm = blocks.prompt_matrix
        return cls(
            diagonal=PairStatsOut.model_validate(blocks.diagonal),
            same_prompt=PairStatsOut.model_validate(blocks.same_prompt),
            cross_prompt=PairStatsOut.model_validate(blocks.cross_prompt),
            prompt_matrix=PromptMatrixOut(
                prompts=list(pm.prompts), mean_k=pm.mean_k.tolist(), mean_rho=pm.mean_rho.tolist()
            ),
        )


class PairTypeValue(_FromSketch):
    """One pair type's part of ``delta_h1`` and its share (``null`` when ``delta_h1 = 0``)."""

    value: float
    share: float | None


class QuadrantOut(_FromSketch):
    """Sum of ``a_i`` and count of the update sequences in one advantage x logprob quadrant."""

    advantage: Literal["positive", "negative"]
    logprob: Literal["above_mean", "below_mean"]
    sum: float
    count: int


class DecompositionOut(_FromSketch):
    """What drives ``delta_h1``: pair types, quadrants, parameter groups (grouped sketches)."""

    pair_types: dict[str, PairTypeValue]
    quadrants: list[QuadrantOut]
    groups: dict[str, float | None] | None = None


class SequenceContributionOut(_FromSketch):
    """One sequence's part of ``delta_h1`` (``a`` as an update row, ``b`` as an entropy row)."""

    id: str
    prompt_id: str
    role: Role
    advantage: float
    logprob: float
    num_tokens: int
    a: float | None
    b: float | None
    c: float | None
    h: float | None


class NoiseScaleOut(_FromSketch):
    """Gradient noise scale and its ingredients (``null`` where not estimable)."""

    tr_sigma: float | None
    g_norm2: float | None
    b_simple: float | None
    num_prompts: int


class RealizedChangeOut(_FromSketch):
    """The realized entropy change (math.md §6) and how it was obtained."""

    delta_h: float
    source: RealizedSource
    entropy_before: float | None = None
    entropy_after: float | None = None
    num_sequences: int = 0
    num_prompts: int = 0
    estimator: RealizedEstimator | None = None
    se: float | None = None
    delta_h_snis: float | None = None
    kl: float | None = None
    kl_se: float | None = None


class RatioIntervalOut(_FromSketch):
    """``realized / delta_h1`` with its Fieller interval at ``z`` standard errors."""

    value: float | None
    low: float | None
    high: float | None
    estimable: bool
    z: float
    correlation: float


class TaylorOut(_FromSketch):
    """The step's size ``KL(pi || pi')`` and whether a Taylor prediction can hold."""

    regime: Regime
    kl: float | None
    kl_se: float | None
    h2_ratio: float | None
    reasons: list[str]


class EntropyOut(_FromSketch):
    """``GET .../steps/{step}/entropy``: ``delta_h1`` with error bars, its decomposition and
    the step's diagnostics (math.md §4 and §6; docs/estimators.md defines every member)."""

    delta_h1: float
    estimator: Estimator
    se_sampling: float
    se_sketch: float
    decomposition: DecompositionOut
    per_sequence: list[SequenceContributionOut]
    delta_h1_diag: float | None
    cov_baseline: float | None
    noise_scale: NoiseScaleOut
    learning_rate: float
    step_norm: float
    normalization: Normalization
    num_update: int
    num_entropy: int
    num_prompts: int
    delta_h1_applied: float | None = None
    se_applied: float | None = Field(
        default=None,
        description="standard error of delta_h1_applied with the update held fixed: grad_hat "
        "H's sampling error and the sketch's (math.md §4)",
    )
    delta_h2: float | None = None
    delta_h1_plus_h2: float | None = None
    realized: RealizedChangeOut | None = None
    ratio: float | None = None
    ratio_interval: RatioIntervalOut | None = None
    taylor: TaylorOut | None = None
    target: Target = Field(
        default=Target.SEQUENCE,
        description="sequence: H, nats per response (math.md §3); token_mean: T, nats per "
        "token, the entropy trainers log (§8)",
    )
    entropy_gradient: EntropyGradient = Field(
        default=EntropyGradient.SCORE,
        description="how grad_hat H was estimated (math.md §3): score, from the score rows "
        "alone; entropy_sum, from the entropy sums and their gradients' rows (rows "
        "'entropy_sum'), when every entropy-side sequence has both",
    )

    @classmethod
    def from_change(cls, change: EntropyChange) -> EntropyOut:
        return cls.model_validate(change)


class RunEntropyRow(BaseModel):
    """One step of ``GET /v1/runs/{run_id}/entropy`` (math.md §4 and §6)."""

    step: int
    target: Target = Target.SEQUENCE
    delta_h1: float
    se_sampling: float
    se_sketch: float
    estimator: Estimator
    entropy_gradient: EntropyGradient = EntropyGradient.SCORE
    realized: float | None = Field(
        default=None, description="the realized change (math.md §6; control-variate estimate)"
    )
    realized_se: float | None = Field(
        default=None, description="its standard error (null when posted or not estimable)"
    )
    realized_source: RealizedSource | None = None
    realized_snis: float | None = Field(
        default=None, description="the self-normalised estimate, biased by (M-1)/M; comparison"
    )
    ratio: float | None = Field(default=None, description="realized / delta_h1 (as in the step)")
    ratio_low: float | None = Field(
        default=None, description="Fieller interval of the ratio at 2 s.e. (null: not estimable)"
    )
    ratio_high: float | None = None
    ratio_estimable: bool | None = Field(
        default=None, description="false when |delta_h1| <= 2 s.e.: the ratio is noise"
    )
    kl: float | None = Field(default=None, description="KL(pi || pi') of the step, nats")
    kl_se: float | None = None
    regime: Regime | None = Field(
        default=None, description="first_order, second_order, outside or unknown (math.md §6)"
    )
    regime_reasons: list[str] = Field(
        default_factory=list, description="the thresholds the step passed, one sentence each"
    )
    delta_h1_applied: float | None = None
    se_applied: float | None = Field(default=None, description="its standard error")
    delta_h2: float | None = None
    delta_h1_plus_h2: float | None = None
    spectrum_head: list[float] = Field(default_factory=list)

    @classmethod
    def from_entropy(
        cls, step: int, entropy: EntropyOut, spectrum_head: list[float]
    ) -> RunEntropyRow:
        """The step's history row: the entropy answer's headline numbers."""
        realized, interval, taylor = entropy.realized, entropy.ratio_interval, entropy.taylor
        return cls(
            step=step,
            target=entropy.target,
            delta_h1=entropy.delta_h1,
            estimator=entropy.estimator,
            entropy_gradient=entropy.entropy_gradient,
            se_sampling=entropy.se_sampling,
            se_sketch=entropy.se_sketch,
            realized=None if realized is None else realized.delta_h,
            realized_se=None if realized is None else realized.se,
            realized_source=None if realized is None else realized.source,
            realized_snis=None if realized is None else realized.delta_h_snis,
            ratio=entropy.ratio,
            ratio_low=None if interval is None else interval.low,
            ratio_high=None if interval is None else interval.high,
            ratio_estimable=None if interval is None else interval.estimable,
            kl=None if taylor is None else taylor.kl,
            kl_se=None if taylor is None else taylor.kl_se,
            regime=None if taylor is None else taylor.regime,
            regime_reasons=[] if taylor is None else list(taylor.reasons),
            delta_h1_applied=entropy.delta_h1_applied,
            se_applied=entropy.se_applied,
            delta_h2=entropy.delta_h2,
            delta_h1_plus_h2=entropy.delta_h1_plus_h2,
            spectrum_head=spectrum_head,
        )


class RunEntropyOut(BaseModel):
    """A run's entropy history, one row per analysed step."""

    run_id: str
    steps: list[RunEntropyRow]


class Health(BaseModel):
    """Liveness and Redis reachability."""

    status: Literal["ok", "degraded"]
    redis: bool
    detail: str | None = None


class Ready(BaseModel):
    """Readiness: Redis answers and the job queue is served."""

    status: Literal["ready", "not_ready"]
    redis: bool
    queue_depth: int | None = Field(default=None, description="jobs not finished yet")
    live_workers: int | None = Field(
        default=None, description="workers that touched the queue within worker_stale_s"
    )
    detail: str | None = None


JSONDict = dict[str, Any]
