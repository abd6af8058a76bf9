"""The statistics of a treatment / control comparison, vectorised over many comparisons at once.

* Conversion (a 0/1 outcome per user): the lift is the difference of rates p_t − p_c; its
  interval is Newcombe's hybrid score interval (the two groups' Wilson intervals combined), which
  keeps close to its nominal coverage at small rates and small groups where the Wald interval
  does not; the p-value is the pooled two-proportion z-test (Fisher's exact test, for a single
  comparison, when an expected cell count is below 5).
* Revenue (a number per user, mostly zeros): the difference of means with Welch's t interval and
  test (unequal variances, Welch–Satterthwaite degrees of freedom).
* The minimum detectable effect: the smallest true difference a two-sided test at the same
  confidence finds with 80 % power, (z_{1−α/2} + z_{0.8}) · SE.

Every function takes numbers or equally shaped arrays and returns arrays of the same shape.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import fisher_exact, norm
from scipy.stats import t as student_t

POWER = 0.8


def _z(confidence: float) -> float:
    return float(norm.ppf(0.5 + confidence / 2))


def wilson(x, n, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval (low, high) of a proportion with ``x`` successes in ``n`` trials."""
    x, n = np.asarray(x, np.float64), np.asarray(n, np.float64)
    z = _z(confidence)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = x / n
        denom = 1 + z * z / n
        centre = (p + z * z / (2 * n)) / denom
        half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return np.clip(centre - half, 0, 1), np.clip(centre + half, 0, 1)


def difference_in_proportions(x_t, n_t, x_c, n_c, confidence: float = 0.95) -> dict[str, np.ndarray]:
    """Lift p_t − p_c of ``x_t`` conversions among ``n_t`` treated users over ``x_c`` among ``n_c``
    controls: ``rate_treatment``, ``rate_control``, ``lift``, ``ci_low``, ``ci_high`` (Newcombe),
    ``p_value`` (pooled z-test), ``se`` (unpooled standard error). NaN where a group is empty."""
    x_t, n_t, x_c, n_c = (np.asarray(v, np.float64) for v in (x_t, n_t, x_c, n_c))
    with np.errstate(invalid="ignore", divide="ignore"):
        p_t, p_c = x_t / n_t, x_c / n_c
        lift = p_t - p_c
        l1, u1 = wilson(x_t, n_t, confidence)
        l2, u2 = wilson(x_c, n_c, confidence)
        low = lift - np.sqrt((p_t - l1) ** 2 + (u2 - p_c) ** 2)
        high = lift + np.sqrt((u1 - p_t) ** 2 + (p_c - l2) ** 2)
        pooled = (x_t + x_c) / (n_t + n_c)
        se0 = np.sqrt(pooled * (1 - pooled) * (1 / n_t + 1 / n_c))
        p_value = np.where(se0 > 0, 2 * norm.sf(np.abs(lift) / np.where(se0 > 0, se0, 1.0)), 1.0)
        p_value = np.where(np.isfinite(lift), p_value, np.nan)
        se = np.sqrt(p_t * (1 - p_t) / n_t + p_c * (1 - p_c) / n_c)
    return {"rate_treatment": p_t, "rate_control": p_c, "lift": lift, "ci_low": low, "ci_high": high,
            "p_value": p_value, "se": se}


def exact_p_value(x_t: int, n_t: int, x_c: int, n_c: int) -> float:
    """Fisher's exact two-sided p-value of a 2 x 2 table (for small counts)."""
    return float(fisher_exact([[x_t, n_t - x_t], [x_c, n_c - x_c]])[1])


def small_counts(x_t: int, n_t: int, x_c: int, n_c: int) -> bool:
    """Whether an expected cell of the 2 x 2 table is below 5 (the z-test's approximation is poor)."""
    n = n_t + n_c
    if n == 0:
        return True
    x = x_t + x_c
    return min(n_t * x, n_t * (n - x), n_c * x, n_c * (n - x)) / n < 5


def difference_in_means(mean_t, var_t, n_t, mean_c, var_c, n_c, confidence: float = 0.95) -> dict[str, np.ndarray]:
    """Welch's comparison of means (sample variances ``var_*`` with n − 1): ``mean_treatment``,
    ``mean_control``, ``lift``, ``ci_low``, ``ci_high``, ``p_value``, ``se``, ``df``."""
    mean_t, var_t, n_t, mean_c, var_c, n_c = (np.asarray(v, np.float64) for v in (mean_t, var_t, n_t, mean_c, var_c, n_c))
    with np.errstate(invalid="ignore", divide="ignore"):
        a, b = var_t / n_t, var_c / n_c
        se = np.sqrt(a + b)
        df = (a + b) ** 2 / (a * a / (n_t - 1) + b * b / (n_c - 1))
        df = np.where(np.isfinite(df) & (df > 0), df, np.maximum(n_t + n_c - 2, 1))
        lift = mean_t - mean_c
        q = student_t.ppf(0.5 + confidence / 2, df)
        p_value = np.where(se > 0, 2 * student_t.sf(np.abs(lift) / np.where(se > 0, se, 1.0), df),
                           np.where(lift == 0, 1.0, 0.0))
        p_value = np.where(np.isfinite(lift), p_value, np.nan)
    return {"mean_treatment": mean_t, "mean_control": mean_c, "lift": lift, "ci_low": lift - q * se,
            "ci_high": lift + q * se, "p_value": p_value, "se": se, "df": df}


def minimum_detectable_effect(sd, n_t, n_c, confidence: float = 0.95, power: float = POWER):
    """Smallest true difference of means detected with probability ``power`` by a two-sided test
    at ``confidence``, for outcomes with standard deviation ``sd`` in groups of ``n_t`` and ``n_c``
    (for a conversion rate p: sd = sqrt(p (1 − p)))."""
    sd, n_t, n_c = (np.asarray(v, np.float64) for v in (sd, n_t, n_c))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (_z(confidence) + norm.ppf(power)) * sd * np.sqrt(1 / n_t + 1 / n_c)
