"""Numbers behind the propensity and segment sections of the report (numpy, vectorised)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def cumulative_gains(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative-gains curve: contact users by descending score (ties: lower index first).

    Parameters
    ----------
    labels: (n,) 0/1.
    scores: (n,) predicted probabilities.

    Returns
    -------
    share (n + 1,): fraction of users contacted, 0 .. 1; gains (n + 1,): fraction of all positives
    among them (NaN throughout if there is no positive).
    """
    y = np.asarray(labels, dtype=np.float64)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    hits = np.r_[0.0, np.cumsum(y[order])]
    total = hits[-1]
    share = np.arange(len(y) + 1) / max(len(y), 1)
    gains = hits / total if total > 0 else np.full_like(hits, np.nan)
    return share, gains


def gains_table(labels: np.ndarray, scores: np.ndarray,
                fractions: Sequence[float] = (0.01, 0.05, 0.1, 0.2, 0.3, 0.5)) -> list[dict]:
    """Positives reached and lift when contacting the top ``fraction`` of users by score.

    Returns one dict per fraction: ``top_fraction``, ``users`` (how many contacted, rounded up),
    ``gain`` (share of all positives reached) and ``lift`` (their positive rate / the base rate).
    """
    share, gains = cumulative_gains(labels, scores)
    n = len(share) - 1
    rows = []
    for f in fractions:
        m = min(n, max(1, int(np.ceil(f * n))))
        gain = float(gains[m])
        rows.append({"top_fraction": float(f), "users": m, "gain": gain, "lift": gain / (m / n) if n else float("nan")})
    return rows


def segment_sizes(assignments: np.ndarray) -> dict[int, int]:
    """Users per segment id, ascending by id."""
    ids, counts = np.unique(np.asarray(assignments), return_counts=True)
    return {int(i): int(c) for i, c in zip(ids, counts)}


def pca_2d(vectors: np.ndarray, sample: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Project a seeded sample of rows onto their first two principal components.

    The components come from the (d, d) covariance (``numpy.linalg.eigh``), which is cheaper than
    an SVD of the (m, d) sample and gives the same axes.

    Parameters
    ----------
    vectors: (n, d) float.
    sample: at most this many rows are used.

    Returns
    -------
    rows (m,) int64 indices of the sampled rows (ascending), coords (m, 2) float64 and the share of
    variance each of the two components explains (2,) (zeros past the data's rank).
    """
    x = np.asarray(vectors, dtype=np.float64)
    n = len(x)
    rows = np.arange(n) if n <= sample else np.sort(np.random.default_rng(seed).choice(n, sample, replace=False))
    x = x[rows] - x[rows].mean(axis=0)
    var, axes = np.linalg.eigh(x.T @ x)  # ascending
    var, axes = np.clip(var[::-1], 0.0, None), axes[:, ::-1]
    k = min(2, x.shape[1])
    coords = np.zeros((len(rows), 2))
    coords[:, :k] = x @ axes[:, :k]
    explained = np.zeros(2)
    if var.sum() > 0:
        explained[:k] = var[:k] / var.sum()
    return rows, coords, explained
