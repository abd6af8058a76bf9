"""Classic baselines on exactly the propensity network's features and split.

The network reads attribute tokens through an embedding table; the baselines read the same tokens
as multi-hot columns, and the embedding network's user vector as plain numeric columns (the frozen
vector: a fine-tuned network changes it during training, the baselines keep the initial one).
"""

from __future__ import annotations

import inspect

import numpy as np

from dmp_dl.propensity.calibration import to_logit
from dmp_dl.propensity.features import Snapshot

SCORE_ROWS = 1 << 16  # users a block when a baseline scores a set: its design matrix is never built whole


def design_matrix(snap: Snapshot, n_tokens: int, vectors: np.ndarray | None = None) -> np.ndarray:
    """Dense features of ``snap``'s N users.

    Returns (N, F + D + n_tokens - 1 + dim) float32: behaviour (raw), numeric attributes,
    multi-hot attribute tokens (token t in column t - 1; padding dropped), user vectors.
    """
    n = len(snap)
    multi_hot = np.zeros((n, max(n_tokens, 1)), dtype=np.float32)
    multi_hot[np.repeat(np.arange(n), snap.attr_tokens.shape[1]), snap.attr_tokens.reshape(-1)] = 1.0
    parts = [snap.behaviour, snap.attr_numeric, multi_hot[:, 1:]]
    if vectors is not None:
        parts.append(vectors)
    return np.ascontiguousarray(np.concatenate(parts, axis=1), dtype=np.float32)


def fit_sample(n: int, at_most: int | None, seed: int) -> np.ndarray:
    """Sorted positions of the examples a baseline is fitted on: all ``n``, or a seeded sample of
    ``at_most`` (``propensity.baseline_max_examples``) when there are more."""
    if at_most is None or n <= at_most:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, int(at_most), replace=False))


def fit_design(snap: Snapshot, n_tokens: int, vectors: np.ndarray | None, rows: np.ndarray) -> np.ndarray:
    """:func:`design_matrix` of ``snap``'s users at ``rows`` (a :func:`fit_sample`)."""
    return design_matrix(snap.take(rows), n_tokens, None if vectors is None else vectors[rows])


def baseline_logits(model, tabular, snap: Snapshot, n_tokens: int, vectors: np.ndarray | None,
                    rows: int | None = None) -> np.ndarray:
    """Raw scores (N,) float of a fitted baseline for ``snap``'s N users, ``rows`` users at a time:
    through ``tabular`` (its :class:`~dmp_dl.propensity.tabular.TabularModel`, scored as the bundle
    serves it) when it has one, else the logit of the classifier's probability (``rows``: default
    :data:`SCORE_ROWS`)."""
    rows, out = int(rows or SCORE_ROWS), []
    for s in range(0, len(snap), rows):
        part = np.arange(s, min(s + rows, len(snap)))
        x = fit_design(snap, n_tokens, vectors, part)
        out.append(tabular.logits(x) if tabular is not None else to_logit(positive_probability(model, x)))
    return np.concatenate(out) if out else np.zeros(0)


def fit_baseline(model, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray):
    """Fit a scikit-learn classifier; one whose ``fit`` takes ``X_val``/``y_val`` (gradient-boosted
    trees) early-stops on the same validation users as the network. Returns the fitted model."""
    if getattr(model, "early_stopping", False) is True and "X_val" in inspect.signature(model.fit).parameters:
        return model.fit(x_train, y_train, X_val=x_val, y_val=y_val)
    return model.fit(x_train, y_train)


def positive_probability(model, x: np.ndarray) -> np.ndarray:
    """P(y = 1) (n,) float64 from a fitted classifier."""
    classes = list(model.classes_)
    return model.predict_proba(x)[:, classes.index(1)].astype(np.float64)
