"""Did the campaign work? Treatment against control, overall, per segment and per propensity decile.

``measure_campaign(assignments, outcomes, metric)`` compares the users who were contacted with the
held-out control group (:mod:`dmp_dl.campaign.control`) on both outcomes, the conversion rate and
the revenue per user (:mod:`dmp_dl.campaign.stats`); ``metric`` chooses the headline. Incremental
conversions (revenue) are the lift times the number of treated users: what the contacts added
over what the same users would have done anyway.

Every comparison (overall, and each segment and decile) uses the normal approximation from
``MIN_GROUP`` users per group on, and exact or resampling methods below it. It reports *not enough
data* instead of an interval and a p-value (``verdict``, with the ``reason``) when the outcome log
has no event in the window, when groups this small could not show a significant result whatever
happened, or, for revenue, when nobody's revenue differs from their group's. When the test cannot
tell the lift from zero, a warning gives the minimum detectable effect of groups this size (80 %
power).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd

from dmp_dl.campaign.control import CONTROL
from dmp_dl.campaign.outcomes import GROUP, UserOutcomes, iso_time
from dmp_dl.campaign.stats import (
    MIN_GROUP,
    POWER,
    difference_in_means,
    difference_in_proportions,
    exact_p_value,
    minimum_detectable_effect,
    minimum_detectable_lift,
    permutation_inference,
    smallest_p_value,
)
from dmp_dl.core.errors import ConfigError
from dmp_dl.core.rules import CONFIDENCE

log = logging.getLogger(__name__)

METRICS = ("conversion", "revenue")
SIGNIFICANT, NOT_SIGNIFICANT, NOT_ENOUGH_DATA = "significant", "not significant", "not enough data"
# per metric: the columns a comparison without enough data leaves empty
INFERENCE = ("ci_low", "ci_high", "p_value", "se", "mde", "p_value_method", "interval_method")


def percent(confidence: float) -> str:
    """``confidence`` as a percentage without rounding it to a familiar level: 95, 99.9, 99.99999999."""
    return np.format_float_positional(100 * float(confidence), precision=10, trim="-")


def p_text(p: float | None) -> str:
    """A p-value as the log, measure.md and measure.html write it: three significant digits, below
    1e-16 (where a double's rounding decides) as "< 1e-16", none as "–"."""
    if p is None or not math.isfinite(p):
        return "–"
    return "< 1e-16" if p < 1e-16 else f"{p:.3g}"


def _finite(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _plain(v):
    """A table cell as JSON: finite float, int, text or None."""
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, (float, np.floating)):
        return _finite(v)
    return int(v)


def _grouped(keys: np.ndarray, control: np.ndarray, converted: np.ndarray, revenue: np.ndarray) -> pd.DataFrame:
    """Per key: n, conversions, revenue sum and sum of squares, for each group (columns ``*_t``, ``*_c``)."""
    frame = pd.DataFrame({"key": keys, "c": control, "x": converted.astype(np.float64), "r": revenue,
                          "r2": revenue * revenue})
    agg = frame.groupby(["key", "c"]).agg(n=("x", "size"), x=("x", "sum"), r=("r", "sum"), r2=("r2", "sum")).unstack("c")
    agg = agg.reindex(columns=pd.MultiIndex.from_product([["n", "x", "r", "r2"], [False, True]]), fill_value=0).fillna(0)
    agg.columns = [f"{name}_{'c' if is_c else 't'}" for name, is_c in agg.columns]
    return agg


def _normal_approximation(agg: pd.DataFrame, confidence: float) -> pd.DataFrame:
    """Conversion (z-test, Newcombe) and revenue (Welch) comparisons and minimum detectable
    effects for every row of :func:`_grouped` (vectorised), plus each group's revenue spread."""
    n_t, n_c = agg["n_t"].to_numpy(), agg["n_c"].to_numpy()
    conv = difference_in_proportions(agg["x_t"], n_t, agg["x_c"], n_c, confidence)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_t, mean_c = agg["r_t"].to_numpy() / n_t, agg["r_c"].to_numpy() / n_c
        # n <= 1: no spread to estimate (0, not NaN, so that one user's group does not blank the other's)
        var_t = np.where(n_t > 1, (agg["r2_t"].to_numpy() - n_t * mean_t ** 2) / (n_t - 1), 0.0)
        var_c = np.where(n_c > 1, (agg["r2_c"].to_numpy() - n_c * mean_c ** 2) / (n_c - 1), 0.0)
    # sums of squares lose the last digits: a spread below that rounding is no spread
    var_t = np.where(var_t > 1e-12 * np.maximum(mean_t ** 2, 1e-300), var_t, 0.0)
    var_c = np.where(var_c > 1e-12 * np.maximum(mean_c ** 2, 1e-300), var_c, 0.0)
    rev = difference_in_means(mean_t, var_t, n_t, mean_c, var_c, n_c, confidence)
    out = pd.DataFrame({"treatment": n_t.astype(np.int64), "control": n_c.astype(np.int64),
                        "conversions_treatment": agg["x_t"].to_numpy().astype(np.int64),
                        "conversions_control": agg["x_c"].to_numpy().astype(np.int64)}, index=agg.index)
    for k in ("rate_treatment", "rate_control", "lift", "ci_low", "ci_high", "p_value", "se"):
        out[f"conversion_{k}"] = conv[k]
    for k in ("mean_treatment", "mean_control", "lift", "ci_low", "ci_high", "p_value", "se"):
        out[f"revenue_{k}"] = rev[k]
    out["revenue_sd_treatment"], out["revenue_sd_control"] = np.sqrt(var_t), np.sqrt(var_c)
    with np.errstate(invalid="ignore", divide="ignore"):
        pooled_sd = np.sqrt(((n_t - 1) * var_t + (n_c - 1) * var_c) / (n_t + n_c - 2))
    out["conversion_mde"] = minimum_detectable_lift(out["conversion_rate_control"].to_numpy(), n_t, n_c, confidence)
    out["revenue_mde"] = np.where(pooled_sd > 0, minimum_detectable_effect(pooled_sd, n_t, n_c, confidence), np.nan)
    out["conversion_p_value_method"], out["conversion_interval_method"] = "z_test", "newcombe"
    out["revenue_p_value_method"], out["revenue_interval_method"] = "welch_t", "welch_t"
    return out


def _too_few(n_t: np.ndarray, n_c: np.ndarray, confidence: float) -> np.ndarray:
    """(rows,) object: why groups of these sizes cannot show a result at ``confidence`` (None: they can)."""
    floor = smallest_p_value(n_t, n_c)
    reasons = np.full(len(n_t), None, dtype=object)
    for i in np.flatnonzero(floor >= 1 - confidence):
        if n_t[i] == 0 or n_c[i] == 0:
            reasons[i] = f"{'no treated' if n_t[i] == 0 else 'no control'} user here, so there is nothing to compare"
        else:
            reasons[i] = (f"with {n_t[i]} treated and {n_c[i]} control users no outcome could be significant at "
                          f"{percent(confidence)} % confidence (the smallest p-value groups this size can give is "
                          f"{floor[i]:.3g}); contact and hold out more users")
    return reasons


def _exact_methods(table: pd.DataFrame, keys: np.ndarray, control: np.ndarray, converted: np.ndarray,
                   revenue: np.ndarray, confidence: float) -> None:
    """Replace the normal approximation where it does not hold (in place): Fisher's exact test for
    rates when a group has fewer than ``MIN_GROUP`` users or an expected cell is below 5; a
    permutation test and the interval it does not reject for revenue when a group has fewer than
    ``MIN_GROUP`` users. One pass per such row (a segment or a decile, never a user)."""
    n_t, n_c = table["treatment"].to_numpy(), table["control"].to_numpy()
    x_t, x_c = table["conversions_treatment"].to_numpy(), table["conversions_control"].to_numpy()
    n, x = n_t + n_c, x_t + x_c
    with np.errstate(invalid="ignore", divide="ignore"):
        smallest_cell = np.minimum(np.minimum(n_t * x, n_t * (n - x)), np.minimum(n_c * x, n_c * (n - x))) / n
    small = np.minimum(n_t, n_c) < MIN_GROUP
    fisher = (small | (smallest_cell < 5)) & (n_t > 0) & (n_c > 0)
    for i in np.flatnonzero(fisher):
        table.iloc[i, table.columns.get_loc("conversion_p_value")] = exact_p_value(int(x_t[i]), int(n_t[i]), int(x_c[i]), int(n_c[i]))
        table.iloc[i, table.columns.get_loc("conversion_p_value_method")] = "fisher_exact"
    spread = (table["revenue_sd_treatment"].to_numpy() > 0) | (table["revenue_sd_control"].to_numpy() > 0)
    resample = np.flatnonzero(small & spread & (n_t > 0) & (n_c > 0))
    if not len(resample):
        return
    members = pd.Series(np.arange(len(keys))).groupby(keys).indices
    for i in resample:
        rows = members[table.index[i]]
        y_t, y_c = revenue[rows[~control[rows]]], revenue[rows[control[rows]]]
        p_value, low, high = permutation_inference(y_t, y_c, confidence)
        for column, value in (("revenue_p_value", p_value), ("revenue_ci_low", np.nan if low is None else low),
                              ("revenue_ci_high", np.nan if high is None else high),
                              ("revenue_p_value_method", "permutation"), ("revenue_interval_method", "permutation")):
            table.iloc[i, table.columns.get_loc(column)] = value


def compare_groups(keys: np.ndarray, control: np.ndarray, converted: np.ndarray, revenue: np.ndarray,
                   confidence: float, no_data: str | None = None) -> pd.DataFrame:
    """Treatment against control per value of ``keys`` (n,) on ``converted`` (n,) bool and
    ``revenue`` (n,) float; ``control`` (n,) bool. One row per key: group sizes, conversions, and
    per metric (``conversion_*``, ``revenue_*``) the rates or means, ``lift``, ``ci_low`` /
    ``ci_high``, ``p_value``, ``se``, ``mde`` (80 % power), the methods used and ``reason``: why
    the row has not enough data to say anything (its interval, p-value and mde then NaN / None),
    or None. ``no_data``: a reason that holds for every row (no event in the window)."""
    table = _normal_approximation(_grouped(keys, control, converted, revenue), confidence)
    _exact_methods(table, keys, control, converted, revenue, confidence)
    n_t, n_c = table["treatment"].to_numpy(), table["control"].to_numpy()
    too_few = _too_few(n_t, n_c, confidence)
    flat = (table["revenue_sd_treatment"].to_numpy() == 0) & (table["revenue_sd_control"].to_numpy() == 0)
    for metric in METRICS:
        reasons = too_few.copy()
        if metric == "revenue":
            for i in np.flatnonzero(flat & pd.isna(reasons)):
                reasons[i] = (f"every treated user's revenue is {table['revenue_mean_treatment'].iloc[i]:.4g} and every "
                              f"control user's {table['revenue_mean_control'].iloc[i]:.4g}: without any spread within "
                              "the groups there is no interval to give")
        if no_data is not None:
            reasons[:] = no_data
        table[f"{metric}_reason"] = reasons
        blank = ~pd.isna(reasons)
        for k in INFERENCE:
            column = f"{metric}_{k}"
            table[column] = table[column].astype(object if k.endswith("method") else np.float64)
            table.loc[blank, column] = None if k.endswith("method") else np.nan
    return table


def _headline(row: pd.Series, metric: str, confidence: float) -> dict:
    """The chosen metric's verdict, lift, relative lift, interval and p-value, plus incremental totals."""
    m = metric
    reason = row[f"{m}_reason"]
    base = row[f"{m}_rate_control" if m == "conversion" else f"{m}_mean_control"]
    lift = None if reason else _finite(row[f"{m}_lift"])
    p_value = _finite(row[f"{m}_p_value"])
    significant = p_value is not None and p_value < 1 - confidence
    out = {
        "verdict": NOT_ENOUGH_DATA if reason else (SIGNIFICANT if significant else NOT_SIGNIFICANT),
        "reason": reason,
        "lift": lift,
        "relative_lift": _finite(lift / base) if lift is not None and np.isfinite(base) and base != 0 else None,
        "ci_low": _finite(row[f"{m}_ci_low"]),
        "ci_high": _finite(row[f"{m}_ci_high"]),
        "p_value": p_value,
        "confidence": confidence,
        "significant": significant,
        "p_value_method": row[f"{m}_p_value_method"],
        "interval_method": row[f"{m}_interval_method"],
    }
    n_t = int(row["treatment"])
    for name, which in (("incremental_conversions", "conversion"), ("incremental_revenue", "revenue")):
        enough = row[f"{which}_reason"] is None
        out[name] = {k: _finite(row[f"{which}_{column}"] * n_t) if enough else None
                     for k, column in (("estimate", "lift"), ("ci_low", "ci_low"), ("ci_high", "ci_high"))}
    return out


def _rows(table: pd.DataFrame, key: str) -> list[dict]:
    out = []
    for k, row in table.iterrows():
        d = {key: int(k)} if isinstance(k, (int, np.integer)) else {key: k}
        d.update({c: _plain(v) for c, v in row.items()})
        out.append(d)
    return out


def _no_events(outcomes: UserOutcomes) -> str | None:
    """Why the window holds no data (None: it has events)."""
    counts = outcomes.counts
    if counts.get("events_in_window", 1) > 0:
        return None
    end = iso_time(outcomes.end) or "the end of the outcome log"
    return (f"the outcome log has no event in the window {iso_time(outcomes.start)} .. {end} "
            f"({counts.get('events_before_start', 0)} events before it, {counts.get('events_after_window', 0)} after it); "
            "set start and window_days to the campaign's period")


def measure_campaign(assignments: pd.DataFrame, outcomes: UserOutcomes, metric: str = "conversion",
                     confidence: float = 0.95) -> dict:
    """The measurement (JSON-safe): headline for ``metric`` (``verdict``: significant, not
    significant or not enough data, with its ``reason``; ``lift``, ``relative_lift``, ``ci_low``,
    ``ci_high``, ``p_value``, ``significant``, the methods, ``incremental_conversions`` and
    ``incremental_revenue`` with intervals), both outcomes in full under ``overall``, the same per
    ``segment`` and per ``decile`` when the assignments have them, the minimum detectable effect
    and the warnings (logged once each).

    assignments: :func:`~dmp_dl.campaign.outcomes.read_assignments`; outcomes: aligned with it.
    """
    if metric not in METRICS:
        raise ConfigError(f"metric must be one of {METRICS}, got {metric!r}")
    problem = CONFIDENCE.problem(confidence)
    if problem:
        raise ConfigError(f"confidence {problem}, e.g. 0.95, got {confidence!r}")
    confidence = float(confidence)
    control = (assignments[GROUP] == CONTROL).to_numpy()
    converted, revenue = outcomes.converted, outcomes.revenue
    no_data = _no_events(outcomes)
    overall = compare_groups(np.zeros(len(control), np.int64), control, converted, revenue, confidence, no_data).iloc[0]
    summary = {"task": "measure", "metric": metric, **_headline(overall, metric, confidence)}
    n_t, n_c = int(overall["treatment"]), int(overall["control"])
    summary["users"] = {"treatment": n_t, "control": n_c}
    summary["overall"] = {c: _plain(v) for c, v in overall.items()}
    mde = _finite(overall[f"{metric}_mde"])
    base = overall["conversion_rate_control" if metric == "conversion" else "revenue_mean_control"]
    summary["minimum_detectable_effect"] = {"lift": mde, "relative": _finite(mde / base) if mde and base else None,
                                            "power": POWER, "confidence": confidence}
    warnings = []
    if summary["reason"]:
        warnings.append(f"not enough data to measure the {metric} lift: {summary['reason']}")
    else:
        for group, size in (("treatment", n_t), ("control", n_c)):
            if size < MIN_GROUP:
                warnings.append(f"the {group} group has only {size} users (fewer than {MIN_GROUP}): the result comes from "
                                f"exact and resampling methods and only a large lift can be told from chance")
        low, high = summary["ci_low"], summary["ci_high"]
        if low is not None and high is not None and (low > 0 or high < 0) != summary["significant"]:
            warnings.append(f"the {summary['p_value_method']} test (p = {p_text(summary['p_value'])}) and the "
                            f"{summary['interval_method']} interval [{low:.4g}, {high:.4g}] disagree on whether the lift "
                            f"differs from 0 at {percent(confidence)} % confidence: the result is borderline")
        if not summary["significant"]:
            if mde is not None and summary["lift"] is not None:
                relative = f" ({100 * mde / base:.0f} % of the control's {base:.4g})" if base else ""
                warnings.append(f"the groups are too small to tell this lift from chance: with {n_t} treated and {n_c} "
                                f"control users the smallest {metric} lift detectable at 80 % power and "
                                f"{percent(confidence)} % confidence is {mde:.4g}{relative}; the observed lift is "
                                f"{summary['lift']:.4g}")
            else:
                warnings.append(f"the lift cannot be told from chance: no {metric} lift these groups could show "
                                f"would be detected at 80 % power")
    for name in ("segment", "decile"):
        if name in assignments.columns:
            keys = assignments[name].to_numpy(dtype=np.int64)
            summary[f"by_{name}"] = _rows(compare_groups(keys, control, converted, revenue, confidence, no_data), name)
    summary["warnings"] = warnings
    for w in warnings:
        log.warning("%s", w)
    return summary
