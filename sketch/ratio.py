"""The ratio realized / predicted with a Fieller interval (math.md §6 "The ratio").

With ``X`` the realized change and ``Y`` the predicted ``dH1``, both estimates with variances
``v_X``, ``v_Y`` and covariance ``c`` (they are sums over the same entropy-role samples, so
their sampling errors are strongly correlated), the ratio ``R = E[X] / E[Y]`` satisfies
``(X - R Y) / sqrt(v_X - 2 R c + R^2 v_Y) ~ N(0, 1)`` approximately.  Fieller's interval
(Fieller 1954) is the set of ``R`` with

    (X - R Y)^2 <= z^2 (v_X - 2 R c + R^2 v_Y),

a quadratic inequality ``a R^2 + b R + e <= 0`` with ``a = Y^2 - z^2 v_Y``.  When ``a > 0``, i.e.
``|Y| > z sqrt(v_Y)``, it is the bounded interval between the roots; otherwise the set is
unbounded and the ratio is *not estimable*: the prediction is within ``z`` standard errors of
zero, and ``X / Y`` is noise.  Unlike the delta method, the interval is exact for normal
``(X, Y)`` and need not be symmetric around ``X / Y``.  Hand-written: scipy and statsmodels
have no Fieller interval, and it is a closed form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: Standard errors on each side: 2 (about 95% for a normal estimate).  The same ``z`` decides
#: "not estimable" (``|dH1| <= z se``) and the interval's width.
RATIO_Z = 2.0


@dataclass(frozen=True)
class RatioInterval:
    """``realized / predicted`` with its Fieller interval at ``z`` standard errors.

    ``value``: ``X / Y`` (``None`` when ``Y = 0``); ``low`` / ``high``: the interval (``None``
    when not estimable); ``estimable``: ``|Y| > z sqrt(v_Y)``; ``correlation``: the
    correlation of the two estimates' errors used (0 when unknown).
    """

    value: float | None
    low: float | None
    high: float | None
    estimable: bool
    z: float
    correlation: float


def fieller_interval(
    x: float,
    y: float,
    var_x: float,
    var_y: float,
    cov: float = 0.0,
    z: float = RATIO_Z,
) -> RatioInterval:
    """Fieller's interval for ``E[x] / E[y]`` (module docstring).

    ``var_x``, ``var_y`` >= 0; ``cov`` is clipped to the Cauchy-Schwarz bound so that the
    covariance matrix stays positive semi-definite.  Raises ``ValueError`` on non-finite input
    or negative variances.
    """
    values = (x, y, var_x, var_y, cov, z)
    if not all(math.isfinite(v) for v in values):
        raise ValueError("fieller_interval needs finite inputs")
    if var_x < 0 or var_y < 0 or z <= 0:
        raise ValueError("variances must be >= 0 and z > 0")
    bound = math.sqrt(var_x * var_y)
    cov = min(max(cov, -bound), bound)
    correlation = cov / bound if bound > 0 else 0.0
    value = x / y if y != 0.0 else None
    z2 = z * z
    a = y * y - z2 * var_y
    if a <= 0.0:
        return RatioInterval(value, None, None, False, z, correlation)
    b = -2.0 * (x * y - z2 * cov)
    e = x * x - z2 * var_x
    # a > 0 and the quadratic is <= 0 at R = x / y (where it equals -z^2 times a variance),
    # so the discriminant is >= 0 up to rounding.
    root = math.sqrt(max(b * b - 4.0 * a * e, 0.0))
    low, high = sorted(((-b - root) / (2.0 * a), (-b + root) / (2.0 * a)))
    return RatioInterval(value, low, high, True, z, correlation)
