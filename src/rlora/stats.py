"""Means with 95% confidence intervals over seeds (Student's t), and paired differences between methods."""

from __future__ import annotations

import math
from collections.abc import Sequence

# two-sided 95% quantiles t_{0.975, dof} for dof = 1..30
_T975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)  # fmt: skip


def t_quantile_975(dof: int) -> float:
    """t_{0.975} for `dof` degrees of freedom (table up to 30, then the Cornish-Fisher expansion)."""
    if dof < 1:
        raise ValueError(f"dof: expected >= 1, got {dof}")
    if dof <= len(_T975):
        return _T975[dof - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * dof) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * dof**2)


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% confidence interval); the half-width is NaN with fewer than 2 values."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_ci: no values")
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, t_quantile_975(n - 1) * sd / math.sqrt(n)


def paired_difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Mean and 95% CI half-width of a - b, paired by position (the same seed). The sign is the metric's: for a
    lower-is-better metric (`metrics.LOWER_IS_BETTER`: the loss) a negative difference means a is better."""
    if len(a) != len(b):
        raise ValueError(f"paired_difference: {len(a)} values against {len(b)}")
    return mean_ci([x - y for x, y in zip(a, b, strict=True)])


def format_ci(mean: float, half: float | None, scale: float = 100.0, digits: int = 1) -> str:
    """ "mean ± half" times `scale` (100: accuracies in %; 1: the loss) with `digits` decimals; the mean alone
    without a half-width."""
    if half is None or math.isnan(half):
        return f"{scale * mean:.{digits}f}"
    return f"{scale * mean:.{digits}f} ± {scale * half:.{digits}f}"
