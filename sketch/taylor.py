"""Whether a step is small enough for a Taylor prediction to hold (math.md §6 "Step size").

The step's size is ``KL(pi || pi')`` per prompt, averaged over prompts (nats of sequence
log-probability, estimated from ``logprob_after`` in :mod:`sketch.realized`).  For small
steps ``KL ~ var_pi(S' - S) / 2``, so ``KL = 0.03`` is a log-prob change of about 0.25 nats
(r.m.s.) per sequence and ``KL = 0.3`` about 0.8 nats, where ``exp(S' - S)`` is no longer close
to its quadratic.

The thresholds come from a scan on the exact-enumeration policy (``bench/taylor_regime.py``,
docs/validation.md "Taylor regime"): 320 steps over 40 update directions and 8 step sizes, with
exact realized changes, exact first- and second-order terms and exact KL.  Below ``KL = 0.03``
the first-order term missed the realized change by a median 2.0% (90th percentile 7.1%); from
0.03 to 0.3 the second-order sum missed it by a median 6.0% (90th percentile 12.6%); from 0.3 to
1 by a median 34% (90th percentile 85%), and beyond 1 by several times the change itself.
Among the steps with ``KL <= 0.3``, those with ``|dH2| / |dH1| > 0.1`` had first order miss by a
median 17-50% while second order stayed within a median 8%: the ratio tells first from second
order, the KL tells when neither holds.  The ratio is measured against ``max(|dH1|, z se)`` so
that a prediction near zero does not raise the flag by itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class Regime(str, Enum):
    """What kind of prediction a step's size allows."""

    FIRST_ORDER = "first_order"  # dH1 alone should match the realized change
    SECOND_ORDER = "second_order"  # compare dH1 + dH2 with the realized change
    OUTSIDE = "outside"  # neither can be trusted: the step is too large for a Taylor series
    UNKNOWN = "unknown"  # no logprob_after: the step's size is not known


#: ``KL(pi || pi')`` (nats) up to which the first-order prediction is expected to hold.
KL_FIRST_ORDER = 0.03
#: ``KL(pi || pi')`` (nats) up to which the second-order prediction is expected to hold.
KL_SECOND_ORDER = 0.3
#: ``|dH2| / max(|dH1|, z se)`` above which first order alone is flagged.
H2_RATIO_FIRST_ORDER = 0.1


@dataclass(frozen=True)
class TaylorCheck:
    """The step's size and what it allows (module docstring).

    ``kl`` / ``kl_se``: ``KL(pi || pi')`` and its standard error (``None`` without
    ``logprob_after``); ``h2_ratio``: ``|dH2| / max(|dH1|, z se_dH1)`` (``None`` without
    ``dH2``); ``reasons``: one sentence per threshold passed.
    """

    regime: Regime
    kl: float | None
    kl_se: float | None
    h2_ratio: float | None
    reasons: list[str] = field(default_factory=list)


def taylor_check(
    kl: float | None,
    kl_se: float | None,
    delta_h1: float,
    se_delta_h1: float,
    delta_h2: float | None,
    z: float = 2.0,
) -> TaylorCheck:
    """Classify a step (module docstring): ``outside`` when ``KL > KL_SECOND_ORDER``; else
    ``second_order`` when ``KL > KL_FIRST_ORDER`` or ``h2_ratio > H2_RATIO_FIRST_ORDER``; else
    ``first_order``; ``unknown`` without ``kl`` and ``delta_h2``."""
    floor = max(abs(delta_h1), z * se_delta_h1)
    h2_ratio = None
    if delta_h2 is not None:
        h2_ratio = abs(delta_h2) / floor if floor > 0 else (0.0 if delta_h2 == 0 else None)
    if kl is None and h2_ratio is None:
        return TaylorCheck(Regime.UNKNOWN, None, kl_se, None, ["no logprob_after"])
    outside: list[str] = []
    second: list[str] = []
    if kl is not None:
        if kl > KL_SECOND_ORDER:
            outside.append(f"KL(pi||pi') = {kl:.3g} > {KL_SECOND_ORDER} nats")
        elif kl > KL_FIRST_ORDER:
            second.append(f"KL(pi||pi') = {kl:.3g} > {KL_FIRST_ORDER} nats")
    if h2_ratio is None and delta_h2 is not None:
        second.append("dH2 != 0 while dH1 and its s.e. are 0")
    elif h2_ratio is not None and h2_ratio > H2_RATIO_FIRST_ORDER:
        second.append(f"|dH2| / |dH1| = {h2_ratio:.3g} > {H2_RATIO_FIRST_ORDER}")
    if outside:
        return TaylorCheck(Regime.OUTSIDE, kl, kl_se, h2_ratio, outside + second)
    if second:
        return TaylorCheck(Regime.SECOND_ORDER, kl, kl_se, h2_ratio, second)
    return TaylorCheck(Regime.FIRST_ORDER, kl, kl_se, h2_ratio, [])
