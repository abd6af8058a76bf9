"""Qini curves: how many extra conversions a ranking finds when the campaign reaches its top users.

For users ranked by a score, after the top k: Q(k) = Y_t(k) − Y_c(k) · N_t(k) / N_c(k), where
N_t, N_c count the treated and control users among them and Y_t, Y_c their conversions — the
conversions the treated ones made beyond what the same number of untreated users made (Radcliffe
2007). Random order draws the straight line from (0, 0) to (N, Q(N)). The Qini coefficient here is
the area between a ranking's curve and that line, over the share targeted in [0, 1], divided by N:
extra conversions per user, averaged over every depth of targeting (0 for random order, negative
for a ranking worse than random).
"""

from __future__ import annotations

import numpy as np


def qini_curve(score: np.ndarray, treated: np.ndarray, converted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(share targeted (N + 1,), Q (N + 1,)) for users ranked by decreasing ``score`` (ties: by
    position), starting at (0, 0). treated, converted: (N,) bool."""
    score = np.asarray(score, dtype=np.float64)
    order = np.lexsort((np.arange(len(score)), -score))
    t = np.asarray(treated, dtype=bool)[order]
    y = np.asarray(converted, dtype=bool)[order]
    n_t, n_c = np.cumsum(t), np.cumsum(~t)
    y_t, y_c = np.cumsum(y & t), np.cumsum(y & ~t)
    with np.errstate(invalid="ignore", divide="ignore"):
        q = np.where(n_c > 0, y_t - y_c * n_t / np.maximum(n_c, 1), y_t)
    n = len(score)
    return np.arange(n + 1) / max(n, 1), np.r_[0.0, q]


def qini_coefficient(score: np.ndarray, treated: np.ndarray, converted: np.ndarray) -> float:
    """Area between the Qini curve of ``score`` and random order's line, per user (see the module docstring)."""
    x, q = qini_curve(score, treated, converted)
    n = len(x) - 1
    if n == 0:
        return 0.0
    return float(np.trapezoid(q - x * q[-1], x) / n)


def incremental_at(score: np.ndarray, treated: np.ndarray, converted: np.ndarray, share: float) -> float:
    """Q after the top ``share`` of the users by ``score``: the extra conversions found there."""
    x, q = qini_curve(score, treated, converted)
    return float(q[int(round(share * (len(x) - 1)))])
