"""Realized entropy change of a step, to judge the prediction (math.md §6).

From ``logprob_after``: per prompt, with the sequences ``j`` of that prompt sampled from
``pi(.|p)`` and importance ratios ``r_j = exp(S'_j - S_j) = pi'(t_j|p) / pi(t_j|p)``,

    H_before(p) ~ -mean_j S_j,
    H_after(p)  ~ -sum_j r_j S'_j / sum_j r_j        (self-normalised importance sampling),
    dH_realized = (1/B) sum_p (H_after(p) - H_before(p)).

The normalised weights ``r_j / sum r`` are ``softmax(S' - S)`` over the prompt's rows, computed
with a max-shift (log-sum-exp) so that sequence log-probs of hundreds of nats do not overflow.

Or the trainer posts ``entropy_before`` / ``entropy_after`` and the change is their difference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy.special import logsumexp

from sketch.sequences import StepSequences


@dataclass(frozen=True)
class Realized:
    """A realized entropy change.

    ``source`` is ``"logprob_after"`` (estimated from the sequences), ``"posted"`` (the
    trainer's entropy_before / entropy_after) or ``"given"`` (a number passed by the caller).
    ``entropy_before`` / ``entropy_after`` are the prompt-averaged sequence entropies in nats
    (``None`` when only the change is known); ``num_sequences`` / ``num_prompts`` count the
    rows used for the ``logprob_after`` estimate (0 otherwise).
    """

    delta_h: float
    source: str
    entropy_before: float | None = None
    entropy_after: float | None = None
    num_sequences: int = 0
    num_prompts: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "delta_h": float(self.delta_h),
            "source": self.source,
            "entropy_before": self.entropy_before,
            "entropy_after": self.entropy_after,
            "num_sequences": int(self.num_sequences),
            "num_prompts": int(self.num_prompts),
        }


def default_realized_mask(seqs: StepSequences) -> NDArray[np.bool_]:
    """The rows used by default: entropy-role rows with ``logprob_after`` if there are any,
    else update-role rows with it.

    Entropy-role rows were not used to build the step, so the importance-sampling estimate of
    ``H_after`` over them is free of the selection effect of the update (the step raised the
    probability of exactly the update samples with positive advantage).
    """
    known = seqs.has_logprob_after
    ent = known & seqs.entropy_mask
    if ent.any():
        return ent
    return known & seqs.update_mask


def realized_from_logprobs(
    seqs: StepSequences, mask: NDArray[Any] | None = None
) -> Realized | None:
    """``dH_realized`` from ``logprob_after`` over the rows in ``mask``.

    ``mask`` defaults to :func:`default_realized_mask`.  Rows in the mask whose
    ``logprob_after`` is unknown are dropped.  Returns ``None`` when no row is usable.
    """
    keep = default_realized_mask(seqs) if mask is None else np.asarray(mask, dtype=bool)
    keep = keep & seqs.has_logprob_after
    if not keep.any():
        return None
    codes, prompts = seqs.prompt_index(keep)
    before = np.empty(len(prompts))
    after = np.empty(len(prompts))
    for p in range(len(prompts)):
        rows = codes == p
        S = seqs.logprob[rows]
        S_after = seqs.logprob_after[rows]
        log_r = S_after - S
        weights = np.exp(log_r - logsumexp(log_r))
        before[p] = -float(S.mean())
        after[p] = -float(np.sum(weights * S_after))
    h_before = float(before.mean())
    h_after = float(after.mean())
    return Realized(
        delta_h=float(np.mean(after - before)),
        source="logprob_after",
        entropy_before=h_before,
        entropy_after=h_after,
        num_sequences=int(keep.sum()),
        num_prompts=len(prompts),
    )


def realized_from_entropies(entropy_before: float, entropy_after: float) -> Realized:
    """``dH_realized = entropy_after - entropy_before`` as posted by the trainer."""
    before = float(entropy_before)
    after = float(entropy_after)
    if not (np.isfinite(before) and np.isfinite(after)):
        raise ValueError("entropy_before and entropy_after must be finite")
    return Realized(
        delta_h=after - before, source="posted", entropy_before=before, entropy_after=after
    )
