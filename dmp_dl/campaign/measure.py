"""Did the campaign work? Treatment against control, overall, per segment and per propensity decile.

``measure_campaign(assignments, outcomes, metric)`` compares the users who were contacted with the
held-out control group (:mod:`dmp_dl.campaign.control`) on both outcomes, the conversion rate and
the revenue per user (:mod:`dmp_dl.campaign.stats`); ``metric`` chooses the headline. Incremental
conversions (revenue) are the lift times the number of treated users: what the contacts added
over what the same users would have done anyway. When the test cannot tell the lift from zero, a
warning gives the minimum detectable effect of groups this size (80 % power).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd

from dmp_dl.campaign.control import CONTROL
from dmp_dl.campaign.outcomes import GROUP, UserOutcomes
from dmp_dl.campaign.stats import (
    difference_in_means, difference_in_proportions, exact_p_value, minimum_detectable_effect, small_counts,
)
from dmp_dl.errors import ConfigError

log = logging.getLogger(__name__)

METRICS = ("conversion", "revenue")
MIN_CONTROL = 30  # below this a control group's rate is too noisy to report without a warning


def _finite(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _grouped(keys: np.ndarray, control: np.ndarray, converted: np.ndarray, revenue: np.ndarray) -> pd.DataFrame:
    """Per key: n, conversions, revenue sum and sum of squares, for each group (columns ``*_t``, ``*_c``)."""
    frame = pd.DataFrame({"key": keys, "c": control, "x": converted.astype(np.float64), "r": revenue,
                          "r2": revenue * revenue})
    agg = frame.groupby(["key", "c"]).agg(n=("x", "size"), x=("x", "sum"), r=("r", "sum"), r2=("r2", "sum")).unstack("c")
    agg = agg.reindex(columns=pd.MultiIndex.from_product([["n", "x", "r", "r2"], [False, True]]), fill_value=0).fillna(0)
    agg.columns = [f"{name}_{'c' if is_c else 't'}" for name, is_c in agg.columns]
    return agg


def _compare(agg: pd.DataFrame, confidence: float) -> pd.DataFrame:
    """Conversion and revenue comparisons for every row of :func:`_grouped` (vectorised)."""
    n_t, n_c = agg["n_t"].to_numpy(), agg["n_c"].to_numpy()
    conv = difference_in_proportions(agg["x_t"], n_t, agg["x_c"], n_c, confidence)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_t, mean_c = agg["r_t"] / n_t, agg["r_c"] / n_c
        var_t = (agg["r2_t"] - n_t * mean_t ** 2) / (n_t - 1)
        var_c = (agg["r2_c"] - n_c * mean_c ** 2) / (n_c - 1)
    rev = difference_in_means(mean_t, np.maximum(var_t, 0), n_t, mean_c, np.maximum(var_c, 0), n_c, confidence)
    out = pd.DataFrame({"treatment": n_t.astype(np.int64), "control": n_c.astype(np.int64),
                        "conversions_treatment": agg["x_t"].to_numpy().astype(np.int64),
                        "conversions_control": agg["x_c"].to_numpy().astype(np.int64)}, index=agg.index)
    for k in ("rate_treatment", "rate_control", "lift", "ci_low", "ci_high", "p_value", "se"):
        out[f"conversion_{k}"] = conv[k]
    for k in ("mean_treatment", "mean_control", "lift", "ci_low", "ci_high", "p_value", "se"):
        out[f"revenue_{k}"] = rev[k]
    with np.errstate(invalid="ignore", divide="ignore"):
        pooled_sd = np.sqrt(((n_t - 1) * np.maximum(var_t, 0) + (n_c - 1) * np.maximum(var_c, 0)) / (n_t + n_c - 2))
        base = out["conversion_rate_control"].to_numpy()
    out["conversion_mde"] = minimum_detectable_effect(np.sqrt(base * (1 - base)), n_t, n_c, confidence)
    out["revenue_mde"] = minimum_detectable_effect(pooled_sd, n_t, n_c, confidence)
    return out


def _headline(row: pd.Series, metric: str, confidence: float) -> dict:
    """The chosen metric's lift, relative lift, interval and p-value, plus incremental totals."""
    m = metric
    base = row[f"{m}_rate_control" if m == "conversion" else f"{m}_mean_control"]
    lift = row[f"{m}_lift"]
    n_t = int(row["treatment"])
    out = {
        "lift": _finite(lift),
        "relative_lift": _finite(lift / base) if base and np.isfinite(base) and base != 0 else None,
        "ci_low": _finite(row[f"{m}_ci_low"]),
        "ci_high": _finite(row[f"{m}_ci_high"]),
        "p_value": _finite(row[f"{m}_p_value"]),
        "confidence": confidence,
    }
    out["significant"] = out["p_value"] is not None and out["p_value"] < 1 - confidence
    scale = {"incremental_conversions": "conversion", "incremental_revenue": "revenue"}
    for name, which in scale.items():
        out[name] = {"estimate": _finite(row[f"{which}_lift"] * n_t), "ci_low": _finite(row[f"{which}_ci_low"] * n_t),
                     "ci_high": _finite(row[f"{which}_ci_high"] * n_t)}
    return out


def _rows(table: pd.DataFrame, key: str) -> list[dict]:
    out = []
    for k, row in table.iterrows():
        d = {key: int(k)} if isinstance(k, (int, np.integer)) else {key: k}
        d.update({c: (_finite(v) if isinstance(v, (float, np.floating)) else int(v)) for c, v in row.items()})
        out.append(d)
    return out


def measure_campaign(assignments: pd.DataFrame, outcomes: UserOutcomes, metric: str = "conversion",
                     confidence: float = 0.95) -> dict:
    """The measurement (JSON-safe): headline for ``metric`` (``lift``, ``relative_lift``,
    ``ci_low``, ``ci_high``, ``p_value``, ``significant``, ``incremental_conversions`` and
    ``incremental_revenue`` with intervals), both outcomes in full under ``overall``, the same per
    ``segment`` and per ``decile`` when the assignments have them, the minimum detectable effect
    and the warnings.

    assignments: :func:`~dmp_dl.campaign.outcomes.read_assignments`; outcomes: aligned with it.
    """
    if metric not in METRICS:
        raise ConfigError(f"metric must be one of {METRICS}, got {metric!r}")
    if not 0.5 <= float(confidence) < 1:
        raise ConfigError(f"confidence must be in [0.5, 1), e.g. 0.95, got {confidence!r}")
    control = (assignments[GROUP] == CONTROL).to_numpy()
    converted, revenue = outcomes.converted, outcomes.revenue
    overall = _compare(_grouped(np.zeros(len(control), np.int64), control, converted, revenue), confidence).iloc[0]
    summary = {"task": "measure", "metric": metric, **_headline(overall, metric, confidence)}
    n_t, n_c = int(overall["treatment"]), int(overall["control"])
    summary["users"] = {"treatment": n_t, "control": n_c}
    summary["overall"] = {c: (_finite(v) if isinstance(v, (float, np.floating)) else int(v)) for c, v in overall.items()}
    if metric == "conversion" and small_counts(int(overall["conversions_treatment"]), n_t,
                                               int(overall["conversions_control"]), n_c):
        summary["p_value"] = exact_p_value(int(overall["conversions_treatment"]), n_t,
                                           int(overall["conversions_control"]), n_c)
        summary["p_value_method"] = "fisher_exact"
        summary["significant"] = summary["p_value"] < 1 - confidence
    else:
        summary["p_value_method"] = "z_test" if metric == "conversion" else "welch_t"
    mde = _finite(overall[f"{metric}_mde"])
    base = overall["conversion_rate_control" if metric == "conversion" else "revenue_mean_control"]
    summary["minimum_detectable_effect"] = {"lift": mde, "relative": _finite(mde / base) if mde and base else None,
                                            "power": 0.8}
    warnings = []
    if n_c < MIN_CONTROL:
        warnings.append(f"the control group has only {n_c} users; its rate is too noisy to trust (hold out more users)")
    if not summary["significant"]:
        if mde is not None and summary["lift"] is not None:
            relative = f" ({100 * mde / base:.0f} % of the control's {base:.4g})" if base else ""
            warnings.append(f"the groups are too small to tell this lift from chance: with {n_t} treated and {n_c} "
                            f"control users the smallest {metric} lift detectable at 80 % power is {mde:.4g}{relative}; "
                            f"the observed lift is {summary['lift']:.4g}")
        else:
            warnings.append("the lift cannot be told from chance (a group has no variation)")
    for name in ("segment", "decile"):
        if name in assignments.columns:
            keys = assignments[name].to_numpy(dtype=np.int64)
            table = _compare(_grouped(keys, control, converted, revenue), confidence)
            summary[f"by_{name}"] = _rows(table, name)
    summary["warnings"] = warnings
    for w in warnings:
        log.warning("%s", w)
    return summary
