"""The statistics of a treatment / control comparison, vectorised over many comparisons at once.

* Conversion (a 0/1 outcome per user): the lift is the difference of rates p_t − p_c; its
  interval is Newcombe's hybrid score interval (the two groups' Wilson intervals combined), which
  keeps close to its nominal coverage at small rates and small groups where the Wald interval
  does not; the p-value is the pooled two-proportion z-test, or Fisher's exact test when a group
  has fewer than ``MIN_GROUP`` users or an expected cell count is below 5.
* Revenue (a number per user, mostly zeros): the difference of means with Welch's t interval and
  test (unequal variances, Welch–Satterthwaite degrees of freedom); with fewer than ``MIN_GROUP``
  users in a group, a permutation test and the interval of shifts it does not reject instead
  (:func:`permutation_inference`).
* Whether the groups can say anything: :func:`smallest_p_value` is the smallest p-value an exact
  test can give groups of these sizes whatever the outcomes; when it is not below 1 − confidence,
  no result could be significant and the comparison reports not enough data.
* The minimum detectable effect: the smallest true difference a two-sided test at the same
  confidence finds with 80 % power; for a rate, solved with the variances at the control's rate
  and at the raised one (:func:`minimum_detectable_lift`), so a control rate of 0 does not make it 0.

Every vectorised function takes numbers or equally shaped arrays and returns arrays of the same shape.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
from scipy.special import gammaln
from scipy.stats import fisher_exact, norm
from scipy.stats import t as student_t

POWER = 0.8
# Users per group from which the normal approximations (the z-test, Welch's t) are used; below it
# the exact and resampling methods, whose error does not depend on the sample being large.
MIN_GROUP = 30
RESAMPLES = 9999  # random relabellings of a permutation test: p-values resolve 1e-4, below the smallest 1 - confidence (0.001)
_RESAMPLE_CELLS = 1 << 22  # values drawn per batch of resamples (memory: 32 MiB)


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


def smallest_p_value(n_t, n_c) -> np.ndarray:
    """The smallest two-sided p-value Fisher's exact test (or a permutation test of the means) can
    give groups of ``n_t`` and ``n_c`` users, whatever their outcomes: that of a complete separation
    (every treated user converted, no control did), 1 / C(n_t + n_c, n_t), twice that when the
    groups are equal (the mirror table is as extreme). 1 where a group is empty."""
    n_t, n_c = np.asarray(n_t, np.float64), np.asarray(n_c, np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        log_ways = gammaln(n_t + n_c + 1) - gammaln(n_t + 1) - gammaln(n_c + 1)
        p = np.where(n_t == n_c, 2.0, 1.0) * np.exp(-log_ways)
    return np.where((n_t > 0) & (n_c > 0), np.minimum(p, 1.0), 1.0)


def minimum_detectable_lift(rate_control, n_t, n_c, confidence: float = 0.95, power: float = POWER) -> np.ndarray:
    """The smallest rise d of a conversion rate ``rate_control`` that the pooled two-proportion
    z-test at ``confidence`` finds with probability ``power`` in groups of ``n_t`` and ``n_c``: the
    root of d = z_{1−α/2} · SE_pooled(d) + z_power · SE(d), with the pooled standard error under no
    difference and the unpooled one at rates p_c + d and p_c (bisection on (0, 1 − p_c], 60 steps).
    At p_c = 0 it is the rise the treated group's own variance lets show (about 7.8 / n for two
    groups of n), not 0. NaN where no rise up to 1 − p_c reaches that power or a group is empty."""
    p_c, n_t, n_c = np.broadcast_arrays(*(np.asarray(v, np.float64) for v in (rate_control, n_t, n_c)))
    z_a, z_b = _z(confidence), float(norm.ppf(power))

    def gap(d):
        p_t = p_c + d
        pooled = (n_t * p_t + n_c * p_c) / (n_t + n_c)
        se0 = np.sqrt(np.maximum(pooled * (1 - pooled), 0) * (1 / n_t + 1 / n_c))
        se1 = np.sqrt(np.maximum(p_t * (1 - p_t), 0) / n_t + np.maximum(p_c * (1 - p_c), 0) / n_c)
        return d - z_a * se0 - z_b * se1

    with np.errstate(invalid="ignore", divide="ignore"):
        valid = (n_t > 0) & (n_c > 0) & (p_c >= 0) & (p_c < 1)
        lo, hi = np.zeros_like(p_c), np.where(valid, 1 - p_c, 0.0)
        reachable = valid & (gap(hi) >= 0)
        for _ in range(60):
            mid = (lo + hi) / 2
            short = gap(mid) < 0
            lo, hi = np.where(short, mid, lo), np.where(short, hi, mid)
    return np.where(reachable, hi, np.nan)


def _split_sums(y: np.ndarray, n_t: int, resamples: int, seed: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """For relabellings of the users ``y`` (n,) (the first ``n_t`` treated) into groups of the same
    sizes: the sum of ``y`` and the number of originally treated users in each new treatment group,
    and whether the relabellings are every possible one (when there are at most ``resamples``) or
    ``resamples`` random ones. The smaller group is drawn (:func:`_random_subsets`)."""
    n = len(y)
    n_c = n - n_t
    m = min(n_t, n_c)
    if math.comb(n, m) <= resamples:
        drawn = np.array(list(itertools.combinations(range(n), m)), dtype=np.int64).reshape(-1, m)
        parts = [drawn]
        exact = True
    else:
        parts = [_random_subsets(n, m, resamples, np.random.default_rng(seed))]
        exact = False
    sums, treated = [], []
    for drawn in parts:
        sums.append(y[drawn].sum(axis=1))
        treated.append((drawn < n_t).sum(axis=1))
    s, k = np.concatenate(sums), np.concatenate(treated).astype(np.float64)
    if m != n_t:  # the control group was drawn: the treatment group is the rest
        s, k = y.sum() - s, n_t - k
    return s, k, exact


def _random_subsets(n: int, m: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """(count, m) int64: ``count`` random subsets of m of the positions 0..n-1, each uniform.

    m is the smaller group (< MIN_GROUP users): when m² is small against n, m positions are drawn
    with replacement and the few rows with a repeat drawn again, O(count · m) whatever n; else
    (n < 2 m²) each row is a partial sort of n random keys.
    """
    if m * m < n / 2:
        drawn = rng.integers(n, size=(count, m))
        while True:
            ordered = np.sort(drawn, axis=1)
            repeat = np.flatnonzero((np.diff(ordered, axis=1) == 0).any(axis=1))
            if not len(repeat):
                return drawn
            drawn[repeat] = rng.integers(n, size=(len(repeat), m))
    batch = max(1, _RESAMPLE_CELLS // n)
    return np.concatenate([rng.random((min(batch, count - done), n)).argpartition(m - 1, axis=1)[:, :m]
                           for done in range(0, count, batch)])


def permutation_inference(y_t: np.ndarray, y_c: np.ndarray, confidence: float = 0.95, resamples: int = RESAMPLES,
                          seed: int = 0) -> tuple[float, float | None, float | None]:
    """(p-value, low, high) for the difference of means of ``y_t`` (n_t,) and ``y_c`` (n_c,)
    without a normal approximation: the two-sided permutation test (every relabelling of the users
    into groups of these sizes when there are at most ``resamples``, else ``resamples`` random
    ones) and the interval of the shifts d it does not reject at ``confidence`` (the treated
    values lowered by d), so the interval holds 0 exactly when the test is not significant.

    The relabellings are drawn once: under a shift d each one's difference of means is
    A − d · B (A, B from its sums), so every d is tested in O(resamples). A bound is None when no
    shift is rejected on that side. Cost O(resamples · min(n_t, n_c) + n_t + n_c) when the smaller
    group is small against the larger, O(resamples · (n_t + n_c)) otherwise.
    """
    y_t, y_c = np.asarray(y_t, np.float64), np.asarray(y_c, np.float64)
    n_t, n_c = len(y_t), len(y_c)
    y = np.concatenate([y_t, y_c])
    s, k, exact = _split_sums(y, n_t, resamples, seed)
    total = float(y.sum())
    a = s / n_t - (total - s) / n_c  # each relabelling's difference of means (no shift)
    b = k / n_t - (n_t - k) / n_c  # how a shift d moves it
    observed = float(y_t.mean() - y_c.mean())
    scale = float(np.abs(y).max()) or 1.0

    def p_at(d: float) -> float:
        gap = abs(observed - d)
        extreme = int((np.abs(a - d * b) >= gap - 1e-9 * (gap + scale)).sum())
        return extreme / len(a) if exact else (1 + extreme) / (1 + len(a))

    alpha = 1 - confidence
    width = float(y.max() - y.min()) or scale

    def bound(direction: float) -> float | None:
        inside, outside = observed, None
        for j in range(64):
            d = observed + direction * width * 2.0 ** j
            if p_at(d) < alpha:
                outside = d
                break
            inside = d
        if outside is None:
            return None
        for _ in range(60):
            mid = (inside + outside) / 2
            inside, outside = (mid, outside) if p_at(mid) >= alpha else (inside, mid)
        return inside

    return min(p_at(0.0), 1.0), bound(-1.0), bound(1.0)
