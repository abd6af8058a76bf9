"""Binary-classification metrics of propensity scores (scikit-learn and torchmetrics).

* roc_auc, pr_auc (average precision), log_loss, brier: scikit-learn.
* ece: expected calibration error, ``sum_b (n_b / n) |mean(p) - mean(y)|`` over equal-width
  probability bins (torchmetrics ``binary_calibration_error``, L1 norm).
* lift@10: the positive rate among the 10% highest-scored users divided by the overall rate.
* gains: the cumulative-gains table (users sorted by score, best first, cut into equal slices):
  per slice the share of users targeted, the positives found so far, the share of all positives
  they are (``gain``) and ``lift = gain / share targeted``.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from sklearn.metrics import average_precision_score, brier_score_loss, log_loss, roc_auc_score
from torchmetrics.functional.classification import binary_calibration_error

log = logging.getLogger(__name__)

NEAR_CHANCE_ROC_AUC = 0.6  # a served model below this test ROC-AUC is reported as barely better than chance


def _ranked_labels(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Labels sorted by score, best first (ties: original order)."""
    return np.asarray(labels)[np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")]


def lift_at(labels: np.ndarray, scores: np.ndarray, fraction: float = 0.1) -> float:
    """Positive rate of the top ``fraction`` of users by score over the overall positive rate."""
    y = np.asarray(labels, dtype=np.float64)
    if len(y) == 0 or y.mean() == 0:
        return float("nan")
    k = max(1, int(np.ceil(fraction * len(y))))
    return float(_ranked_labels(y, scores)[:k].mean() / y.mean())


def gains_table(labels: np.ndarray, scores: np.ndarray, n_slices: int = 10) -> list[dict[str, float]]:
    """The cumulative-gains table, one row per slice (see the module docstring)."""
    y = _ranked_labels(np.asarray(labels, dtype=np.float64), scores)
    n, total = len(y), float(np.sum(y))
    rows = []
    for s in range(1, n_slices + 1):
        k = int(round(s * n / n_slices))
        found = float(y[:k].sum())
        share = k / n if n else 0.0
        gain = found / total if total else float("nan")
        rows.append({
            "targeted": share,
            "users": k,
            "positives": int(found),
            "gain": gain,
            "lift": gain / share if share else float("nan"),
        })
    return rows


def binary_metrics(labels: np.ndarray, probabilities: np.ndarray, ece_bins: int = 10) -> dict[str, float]:
    """roc_auc, pr_auc, log_loss, brier, ece, lift@10, plus n and base_rate.

    labels: (n,) 0/1; probabilities: (n,) in [0, 1]. Ranking metrics are NaN (with a warning) when
    ``labels`` has only one class.
    """
    y = np.asarray(labels).astype(np.int64)
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 0.0, 1.0)
    out = {"n": int(len(y)), "base_rate": float(y.mean()) if len(y) else float("nan")}
    two_classes = len(np.unique(y)) == 2
    if not two_classes:
        log.warning("propensity metrics: the evaluated users are all of one class; AUCs are undefined")
    out["roc_auc"] = float(roc_auc_score(y, p)) if two_classes else float("nan")
    out["pr_auc"] = float(average_precision_score(y, p)) if two_classes else float("nan")
    out["log_loss"] = float(log_loss(y, p, labels=[0, 1])) if len(y) else float("nan")
    out["brier"] = float(brier_score_loss(y, p, labels=[0, 1])) if len(y) else float("nan")
    out["ece"] = float(binary_calibration_error(torch.as_tensor(p), torch.as_tensor(y), n_bins=ece_bins, norm="l1")) if len(y) else float("nan")
    out["lift@10"] = lift_at(y, p, 0.1)
    return out
