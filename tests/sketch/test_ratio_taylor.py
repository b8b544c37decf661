"""The ratio's Fieller interval (sketch/ratio.py) and the Taylor-regime flag (sketch/taylor.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sketch.ratio import RATIO_Z, fieller_interval
from sketch.taylor import (
    H2_RATIO_FIRST_ORDER,
    KL_FIRST_ORDER,
    KL_SECOND_ORDER,
    Regime,
    taylor_check,
)


def test_fieller_with_an_exact_denominator_is_the_plain_interval() -> None:
    out = fieller_interval(3.0, 2.0, var_x=0.25, var_y=0.0)
    assert out.estimable and out.value == 1.5
    assert out.low == pytest.approx((3.0 - RATIO_Z * 0.5) / 2.0)
    assert out.high == pytest.approx((3.0 + RATIO_Z * 0.5) / 2.0)


def test_fieller_is_not_estimable_when_the_denominator_is_within_z_se_of_zero() -> None:
    out = fieller_interval(1.0, 0.19, var_x=0.01, var_y=0.01)  # |y| = 1.9 se
    assert not out.estimable and out.low is None and out.high is None
    assert out.value == pytest.approx(1.0 / 0.19)
    assert fieller_interval(1.0, 0.21, var_x=0.01, var_y=0.01).estimable
    assert fieller_interval(1.0, 0.0, 0.01, 0.01).value is None


def test_fieller_bounds_solve_the_defining_equality() -> None:
    x, y, vx, vy, c = 0.8, 1.1, 0.04, 0.03, 0.025
    out = fieller_interval(x, y, vx, vy, c)
    assert out.low is not None and out.high is not None
    for r in (out.low, out.high):
        assert (x - r * y) ** 2 == pytest.approx(RATIO_Z**2 * (vx - 2 * r * c + r * r * vy))
    assert out.low < x / y < out.high
    assert out.correlation == pytest.approx(c / math.sqrt(vx * vy))
    # a covariance beyond Cauchy-Schwarz is clipped to it
    assert fieller_interval(x, y, vx, vy, 10.0).correlation == 1.0
    with pytest.raises(ValueError):
        fieller_interval(x, y, -1.0, vy)
    with pytest.raises(ValueError):
        fieller_interval(float("nan"), y, vx, vy)


@pytest.mark.parametrize("rho", [0.0, 0.9])
def test_fieller_covers_at_its_nominal_level_for_normal_estimates(rho: float) -> None:
    """20,000 bivariate normal draws with E[Y] / sd(Y) = 6: the interval covers the true ratio
    in 95.45% of draws (z = 2) up to Monte Carlo error (3 SE); a positively correlated pair
    gives a narrower interval than an independent one."""
    rng = np.random.default_rng(7)
    mx, my, sx, sy = 1.3, 1.0, 0.25, 1.0 / 6.0
    cov = np.array([[sx**2, rho * sx * sy], [rho * sx * sy, sy**2]])
    draws = rng.multivariate_normal([mx, my], cov, size=20_000)
    hits, widths = 0, []
    for x, y in draws:
        out = fieller_interval(float(x), float(y), sx**2, sy**2, rho * sx * sy)
        assert out.estimable and out.low is not None and out.high is not None
        hits += out.low <= mx / my <= out.high
        widths.append(out.high - out.low)
    nominal = math.erf(RATIO_Z / math.sqrt(2))
    se = math.sqrt(nominal * (1 - nominal) / len(draws))
    assert abs(hits / len(draws) - nominal) <= 3 * se, hits / len(draws)
    if rho > 0:
        independent = fieller_interval(mx, my, sx**2, sy**2, 0.0)
        assert independent.low is not None and independent.high is not None
        assert float(np.median(widths)) < independent.high - independent.low


def test_taylor_regimes_follow_the_documented_thresholds() -> None:
    small = taylor_check(0.5 * KL_FIRST_ORDER, 0.001, 1.0, 0.1, 0.05)
    assert small.regime is Regime.FIRST_ORDER and small.reasons == []
    assert small.h2_ratio == pytest.approx(0.05)
    by_kl = taylor_check(2 * KL_FIRST_ORDER, 0.001, 1.0, 0.1, 0.0)
    assert by_kl.regime is Regime.SECOND_ORDER and "KL" in by_kl.reasons[0]
    by_h2 = taylor_check(0.001, 0.001, 1.0, 0.1, 2 * H2_RATIO_FIRST_ORDER)
    assert by_h2.regime is Regime.SECOND_ORDER and "dH2" in by_h2.reasons[0]
    big = taylor_check(2 * KL_SECOND_ORDER, 0.01, 1.0, 0.1, 0.1)
    assert big.regime is Regime.OUTSIDE
    # a large second-order term at a small KL calls for second order, not for "outside"
    curved = taylor_check(0.001, 0.001, 1.0, 0.1, -1.5)
    assert curved.regime is Regime.SECOND_ORDER and curved.h2_ratio == pytest.approx(1.5)
    # a prediction near zero is measured against its noise floor z se, not against itself
    near_zero = taylor_check(0.001, 0.001, 0.001, 0.1, 0.01)
    assert near_zero.h2_ratio == pytest.approx(0.01 / (2 * 0.1))
    assert near_zero.regime is Regime.FIRST_ORDER
    assert taylor_check(0.001, 0.001, 0.0, 0.0, 0.01).regime is Regime.SECOND_ORDER
    unknown = taylor_check(None, None, 1.0, 0.1, None)
    assert unknown.regime is Regime.UNKNOWN and unknown.kl is None
