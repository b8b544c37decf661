"""Per-step sequence metadata (math.md §1) as aligned numpy arrays.

A :class:`StepSequences` holds, for the ``n`` sequences of one optimisation step and in the
step's sequence order (the row order of the kernel ``K``), everything the estimators of
math.md §2–§6 need besides the kernel: prompt, summed log-probability ``S_i``, advantage
``A_i``, response length ``n_i``, role, optional loss weight ``lambda_i`` and optional
``S'_i`` (log-probability after the step).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
BoolArray = NDArray[np.bool_]


class Role(str, Enum):
    """What a sequence is used for (math.md §1)."""

    UPDATE = "update"  # drives the policy-gradient step g_hat
    ENTROPY = "entropy"  # independent extra sample, used only for the entropy gradient


class Normalization(str, Enum):
    """How the loss weights ``lambda_i`` are set (math.md §2)."""

    DR_GRPO = "dr_grpo"
    GRPO = "grpo"
    SEQUENCE_MEAN = "sequence_mean"


class Geometry(str, Enum):
    """Which inner product the kernel rows carry (math.md §1).

    In ``adam`` geometry the client already scales every row by ``sqrt(P)``, so the kernel is
    ``w_j^T P w_i`` and none of the estimator algebra changes.
    """

    SGD = "sgd"
    ADAM = "adam"


def _float_array(values: Any, n: int, name: str, *, allow_nan: bool) -> FloatArray:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.shape != (n,):
        raise ValueError(f"{name}: expected {n} values, got {arr.shape[0]}")
    bad = np.isinf(arr) if allow_nan else ~np.isfinite(arr)
    if bad.any():
        raise ValueError(f"{name}: non-finite value at position {int(np.flatnonzero(bad)[0])}")
    return arr


@dataclass(frozen=True)
class StepSequences:
    """The sequences of one step, aligned with the rows of the step's kernel.

    All arrays have length ``n``.

    Attributes
    ----------
    ids, prompt_ids:
        Sequence ids (unique) and the id of the prompt each answers (``p(i)``).
    logprob:
        float64 ``[n]``: ``S_i``, the *sum* of the response's token log-probs.
    advantage:
        float64 ``[n]``: ``A_i``.
    num_tokens:
        int64 ``[n]``: ``n_i`` (>= 0).
    role:
        ``Role`` per sequence (default ``update``).
    weight:
        float64 ``[n]``: explicit ``lambda_i``; NaN means "use the normalisation default".
    logprob_after:
        float64 ``[n]``: ``S'_i``; NaN means unknown.
    entropy_sum, entropy_sum_after:
        float64 ``[n]``: ``sum_t H_t`` over the response's positions, ``H_t`` the entropy of
        the full next-token distribution before (after) the step, at the same tokens; NaN
        means unknown (math.md §8).
    """

    ids: list[str]
    prompt_ids: list[str]
    logprob: FloatArray
    advantage: FloatArray
    num_tokens: IntArray
    role: list[Role] = field(default_factory=list)
    weight: FloatArray = field(default_factory=lambda: np.zeros(0))
    logprob_after: FloatArray = field(default_factory=lambda: np.zeros(0))
    entropy_sum: FloatArray = field(default_factory=lambda: np.zeros(0))
    entropy_sum_after: FloatArray = field(default_factory=lambda: np.zeros(0))

    def __post_init__(self) -> None:
        n = len(self.ids)
        # Frozen dataclass: normalise the inputs in place through object.__setattr__.
        set_ = object.__setattr__
        set_(self, "ids", [str(i) for i in self.ids])
        set_(self, "prompt_ids", [str(p) for p in self.prompt_ids])
        if len(self.prompt_ids) != n:
            raise ValueError(f"prompt_ids: expected {n} values, got {len(self.prompt_ids)}")
        if len(set(self.ids)) != n:
            raise ValueError("ids must be unique within a step")
        set_(self, "logprob", _float_array(self.logprob, n, "logprob", allow_nan=False))
        set_(self, "advantage", _float_array(self.advantage, n, "advantage", allow_nan=False))
        tokens = np.asarray(self.num_tokens).reshape(-1)
        if tokens.shape != (n,):
            raise ValueError(f"num_tokens: expected {n} values, got {tokens.shape[0]}")
        if tokens.size and (not np.all(np.isfinite(tokens)) or np.any(tokens < 0)):
            raise ValueError("num_tokens must be finite and >= 0")
        if tokens.size and np.any(tokens != np.round(tokens)):
            raise ValueError("num_tokens must be integers")
        set_(self, "num_tokens", tokens.astype(np.int64))
        roles = list(self.role) if len(self.role) else [Role.UPDATE] * n
        if len(roles) != n:
            raise ValueError(f"role: expected {n} values, got {len(roles)}")
        set_(self, "role", [Role(r) for r in roles])
        weight = self.weight if np.size(self.weight) else np.full(n, np.nan)
        set_(self, "weight", _float_array(weight, n, "weight", allow_nan=True))
        for name in ("logprob_after", "entropy_sum", "entropy_sum_after"):
            values = getattr(self, name)
            values = values if np.size(values) else np.full(n, np.nan)
            set_(self, name, _float_array(values, n, name, allow_nan=True))
        if np.any(self.entropy_sum < 0) or np.any(self.entropy_sum_after < 0):
            raise ValueError("entropy_sum and entropy_sum_after must be >= 0")

    @classmethod
    def from_records(cls, records: Iterable[Mapping[str, Any]]) -> StepSequences:
        """Build from API-style dicts ``{id, prompt_id, logprob, advantage, num_tokens,
        role?, weight?, logprob_after?, entropy_sum?, entropy_sum_after?}`` (missing or
        ``None`` optional fields become the defaults: role ``update``, the others NaN)."""
        rows = list(records)

        def opt(row: Mapping[str, Any], key: str) -> float:
            value = row.get(key)
            return float("nan") if value is None else float(value)

        return cls(
            ids=[str(r["id"]) for r in rows],
            prompt_ids=[str(r["prompt_id"]) for r in rows],
            logprob=np.array([float(r["logprob"]) for r in rows], dtype=np.float64),
            advantage=np.array([float(r["advantage"]) for r in rows], dtype=np.float64),
            num_tokens=np.array([int(r["num_tokens"]) for r in rows], dtype=np.int64),
            role=[Role(r.get("role") or Role.UPDATE) for r in rows],
            weight=np.array([opt(r, "weight") for r in rows], dtype=np.float64),
            logprob_after=np.array([opt(r, "logprob_after") for r in rows], dtype=np.float64),
            entropy_sum=np.array([opt(r, "entropy_sum") for r in rows], dtype=np.float64),
            entropy_sum_after=np.array(
                [opt(r, "entropy_sum_after") for r in rows], dtype=np.float64
            ),
        )

    def to_records(self) -> list[dict[str, Any]]:
        """The inverse of :meth:`from_records` (NaN optional fields become ``None``)."""

        def opt(value: np.float64) -> float | None:
            return None if np.isnan(value) else float(value)

        return [
            {
                "id": self.ids[i],
                "prompt_id": self.prompt_ids[i],
                "logprob": float(self.logprob[i]),
                "advantage": float(self.advantage[i]),
                "num_tokens": int(self.num_tokens[i]),
                "role": self.role[i].value,
                "weight": opt(self.weight[i]),
                "logprob_after": opt(self.logprob_after[i]),
                "entropy_sum": opt(self.entropy_sum[i]),
                "entropy_sum_after": opt(self.entropy_sum_after[i]),
            }
            for i in range(self.n)
        ]

    @property
    def n(self) -> int:
        """Number of sequences."""
        return len(self.ids)

    def role_mask(self, role: Role | str) -> BoolArray:
        """bool ``[n]``: rows with the given role."""
        wanted = Role(role)
        return np.array([r is wanted for r in self.role], dtype=bool)

    @property
    def update_mask(self) -> BoolArray:
        """bool ``[n]``: update-role rows (the set ``U`` of math.md §2)."""
        return self.role_mask(Role.UPDATE)

    @property
    def entropy_mask(self) -> BoolArray:
        """bool ``[n]``: entropy-role rows."""
        return self.role_mask(Role.ENTROPY)

    @property
    def has_logprob_after(self) -> BoolArray:
        """bool ``[n]``: rows whose ``logprob_after`` is known."""
        return ~np.isnan(self.logprob_after)

    def prompt_index(self, mask: BoolArray | None = None) -> tuple[IntArray, list[str]]:
        """Index the prompts of the rows in ``mask`` (all rows by default).

        Returns ``(codes, prompts)``: ``codes`` int64 ``[n]`` with ``codes[i]`` the position of
        ``prompt_ids[i]`` in ``prompts`` for rows in the mask and ``-1`` outside it;
        ``prompts`` lists the distinct prompt ids of the masked rows in order of first
        appearance.  ``len(prompts)`` is the ``B`` of math.md for that set of rows.
        """
        keep = np.ones(self.n, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
        if keep.shape != (self.n,):
            raise ValueError(f"mask: expected shape ({self.n},), got {keep.shape}")
        lookup: dict[str, int] = {}
        codes = np.full(self.n, -1, dtype=np.int64)
        for i, (pid, inside) in enumerate(zip(self.prompt_ids, keep, strict=True)):
            if inside:
                codes[i] = lookup.setdefault(pid, len(lookup))
        return codes, list(lookup)

    def subset(self, mask: BoolArray | Sequence[int]) -> StepSequences:
        """The rows selected by a boolean mask or an index list, in that order."""
        idx = np.asarray(mask)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        sel = [int(i) for i in idx]
        return StepSequences(
            ids=[self.ids[i] for i in sel],
            prompt_ids=[self.prompt_ids[i] for i in sel],
            logprob=self.logprob[sel],
            advantage=self.advantage[sel],
            num_tokens=self.num_tokens[sel],
            role=[self.role[i] for i in sel],
            weight=self.weight[sel],
            logprob_after=self.logprob_after[sel],
            entropy_sum=self.entropy_sum[sel],
            entropy_sum_after=self.entropy_sum_after[sel],
        )


def group_sizes(codes: IntArray) -> IntArray:
    """int64 ``[n]``: the size of each row's group (``M_p`` or ``G_p``); 0 outside (code -1)."""
    inside = codes >= 0
    counts = np.bincount(codes[inside], minlength=int(codes.max(initial=-1)) + 1)
    sizes = np.zeros(codes.shape[0], dtype=np.int64)
    sizes[inside] = counts[codes[inside]]
    return sizes


def leave_one_out_mean(values: FloatArray, codes: IntArray) -> FloatArray:
    """float64 ``[n]``: mean of ``values`` over the *other* rows of the same group (math.md §3).

    ``codes`` from :meth:`StepSequences.prompt_index`.  A group with one row gets baseline 0
    (math.md: "a prompt with M_p = 1 uses baseline 0"); rows outside (code -1) get 0.
    """
    inside = codes >= 0
    sums = np.bincount(
        codes[inside], weights=values[inside], minlength=int(codes.max(initial=-1)) + 1
    )
    sizes = group_sizes(codes)
    out = np.zeros(codes.shape[0], dtype=np.float64)
    several = sizes >= 2
    out[several] = (sums[codes[several]] - values[several]) / (sizes[several] - 1)
    return out


def prompt_mean_weights(seqs: StepSequences, mask: BoolArray) -> tuple[FloatArray, IntArray]:
    """``1 / (B M_p)`` per row of ``mask`` (0 elsewhere; ``B`` its prompts, ``M_p`` its rows of
    prompt ``p``), the weight of a row in ``(1/B) sum_p mean_{j in p}``, and the rows' prompt
    codes (:meth:`StepSequences.prompt_index`)."""
    keep = np.asarray(mask, dtype=bool)
    codes, prompts = seqs.prompt_index(keep)
    weight = np.zeros(seqs.n)
    if prompts:
        weight[keep] = 1.0 / (len(prompts) * group_sizes(codes)[keep].astype(np.float64))
    return weight, codes


def centred_coefficients(seqs: StepSequences, values: FloatArray, mask: BoolArray) -> FloatArray:
    """``(x_j - xbar_{p,-j}) / (B M_p)`` over the rows of ``mask``, float64 ``[n]`` (0
    elsewhere, whatever ``values`` holds there): the score-function coefficients of a per-row
    value ``x`` with the leave-one-out baseline of math.md §3 (``x = -S`` gives ``h_j``, the
    lengths ``l_j``, the entropy sums ``alpha_j``)."""
    weight, codes = prompt_mean_weights(seqs, mask)
    inside = codes >= 0
    x = np.where(inside, values, 0.0)
    return np.where(inside, (x - leave_one_out_mean(x, codes)) * weight, 0.0)


def per_prompt_covariance(x: FloatArray, y: FloatArray, codes: IntArray) -> float | None:
    """``sum_p M_p cov_{j in p}(x_j, y_j)`` (ddof 1) over the rows with ``codes >= 0``.

    The covariance of ``sum_j x_j`` and ``sum_j y_j`` when each prompt's rows are i.i.d. and
    the prompts independent (``x = y``: the variance, math.md §4 "se_sampling").  A prompt with
    one row has no spread and adds 0; ``None`` when no prompt has two rows.
    """
    total = 0.0
    seen = False
    for p in range(int(codes.max(initial=-1)) + 1):
        rows = codes == p
        size = int(rows.sum())
        if size >= 2:
            xp, yp = x[rows], y[rows]
            total += size * float(np.sum((xp - xp.mean()) * (yp - yp.mean()))) / (size - 1)
            seen = True
    return total if seen else None
