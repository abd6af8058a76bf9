"""The classic propensity models as plain arrays, so that a bundle can serve one without pickle.

The training step compares the network with scikit-learn's logistic regression and gradient-boosted
trees on the same features; when one of those is best on the validation users, the bundle serves
it. scikit-learn models are only stored by pickling them, which a bundle never does (and never
loads), so the fitted model is read into arrays here and evaluated with numpy:

Training scores the validation and test users of a convertible model with these arrays too, so the
recorded metrics are those of exactly what the bundle serves (scikit-learn itself computes in the
input's float32 and differs in the 6th digit).

* ``linear``: ``StandardScaler`` (optional) + binary ``LogisticRegression`` -> means, scales,
  coefficients and intercept; the decision is ``((x - mean) / scale) @ coef + intercept``.
* ``trees``: binary ``HistGradientBoostingClassifier`` on numeric features -> every tree's nodes
  (split feature, threshold, where missing values go, children, leaf values) and the baseline; the
  decision is the baseline plus each tree's leaf value, found by walking all trees at once.

:meth:`TabularModel.logits` returns exactly what training calibrated (the logit of the clipped
predicted probability), so the stored calibrator applies unchanged. Other estimators are not
convertible (:meth:`TabularModel.from_sklearn` returns None) and are then never served.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from scipy.special import expit

from dmp_dl.propensity.calibration import to_logit

KINDS = ("linear", "trees")
_ARRAYS = {"linear": ("mean", "scale", "coef", "intercept"),
           "trees": ("baseline", "roots", "feature", "threshold", "missing_left", "left", "right", "is_leaf", "value")}


@dataclass
class TabularModel:
    """A fitted classic model as arrays (see the module docstring). ``n_features``: input width."""

    kind: str
    arrays: dict[str, np.ndarray]
    n_features: int

    # -- from scikit-learn ------------------------------------------------------------------------
    @classmethod
    def from_sklearn(cls, model) -> "TabularModel | None":
        """The arrays of a fitted ``model``, or None when it is not one of the supported kinds."""
        from sklearn.ensemble import HistGradientBoostingClassifier
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import Pipeline
        from sklearn.preprocessing import StandardScaler

        steps = [s for _, s in model.steps] if isinstance(model, Pipeline) else [model]
        final, scalers = steps[-1], steps[:-1]
        if not hasattr(final, "classes_") or list(final.classes_) != [0, 1]:
            return None
        if isinstance(final, LogisticRegression) and all(isinstance(s, StandardScaler) for s in scalers):
            n = int(final.coef_.shape[1])
            mean, scale = np.zeros(n), np.ones(n)
            for s in scalers:  # (x - m) / s applied in turn
                m = s.mean_ if s.with_mean else np.zeros(n)
                sc = s.scale_ if s.with_std else np.ones(n)
                mean, scale = mean + m * scale, scale * sc
            return cls("linear", {"mean": mean.astype(np.float64), "scale": scale.astype(np.float64),
                                  "coef": final.coef_[0].astype(np.float64),
                                  "intercept": np.asarray(final.intercept_, dtype=np.float64)[:1]}, n)
        if isinstance(final, HistGradientBoostingClassifier) and not scalers and final.n_trees_per_iteration_ == 1:
            trees = [p.nodes for it in final._predictors for p in it]
            if not trees or any(t["is_categorical"].any() for t in trees):
                return None
            sizes = np.array([len(t) for t in trees])
            offsets = np.r_[0, np.cumsum(sizes)[:-1]].astype(np.int64)
            nodes = np.concatenate(trees)
            shift = np.repeat(offsets, sizes)
            return cls("trees", {
                "baseline": np.asarray(final._baseline_prediction, dtype=np.float64).reshape(-1)[:1],
                "roots": offsets,
                "feature": nodes["feature_idx"].astype(np.int64),
                "threshold": nodes["num_threshold"].astype(np.float64),
                "missing_left": nodes["missing_go_to_left"].astype(bool),
                "left": nodes["left"].astype(np.int64) + shift,
                "right": nodes["right"].astype(np.int64) + shift,
                "is_leaf": nodes["is_leaf"].astype(bool),
                "value": nodes["value"].astype(np.float64),
            }, int(final.n_features_in_))
        return None

    # -- scoring ----------------------------------------------------------------------------------
    def decision(self, x: np.ndarray, batch_size: int = 4096) -> np.ndarray:
        """The model's raw decision function (N,) float64 for features ``x`` (N, n_features)."""
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ValueError(f"expected (N, {self.n_features}) features, got {x.shape}")
        a = self.arrays
        if self.kind == "linear":
            return ((x.astype(np.float64) - a["mean"]) / a["scale"]) @ a["coef"] + a["intercept"][0]
        out = np.empty(len(x), dtype=np.float64)
        for s in range(0, len(x), batch_size):
            out[s:s + batch_size] = self._trees(x[s:s + batch_size].astype(np.float64))
        return out

    def _trees(self, x: np.ndarray) -> np.ndarray:
        a = self.arrays
        node = np.broadcast_to(a["roots"], (len(x), len(a["roots"]))).copy()  # (N, trees)
        rows = np.arange(len(x))[:, None]
        for _ in range(len(a["feature"])):  # a path visits each node at most once
            inner = ~a["is_leaf"][node]
            if not inner.any():
                break
            v = x[rows, a["feature"][node]]
            left = np.where(np.isnan(v), a["missing_left"][node], v <= a["threshold"][node])
            node = np.where(inner, np.where(left, a["left"][node], a["right"][node]), node)
        return a["baseline"][0] + a["value"][node].sum(axis=1)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Logits (N,) as training calibrated them: ``logit(clip(P(y = 1)))``."""
        return to_logit(expit(self.decision(x)))

    # -- storage ----------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """An ``.npz`` file's content (plain arrays; loads with ``allow_pickle=False``)."""
        buf = io.BytesIO()
        np.savez(buf, kind=np.array(self.kind), n_features=np.array(self.n_features), **self.arrays)
        return buf.getvalue()

    @classmethod
    def from_file(cls, path) -> "TabularModel":
        """Read :meth:`to_bytes`'s file; ValueError when it is not one."""
        with np.load(path, allow_pickle=False) as z:
            kind = str(z["kind"])
            if kind not in KINDS:
                raise ValueError(f"unknown model kind {kind!r}")
            missing = [k for k in _ARRAYS[kind] if k not in z.files]
            if missing:
                raise ValueError(f"missing arrays {missing}")
            model = cls(kind, {k: z[k] for k in _ARRAYS[kind]}, int(z["n_features"]))
        a = model.arrays
        if kind == "linear" and not (a["mean"].shape == a["scale"].shape == a["coef"].shape == (model.n_features,)):
            raise ValueError("inconsistent linear model arrays")
        if kind == "trees":
            n = len(a["feature"])
            inner = ~a["is_leaf"]
            if not all(len(a[k]) == n for k in ("threshold", "missing_left", "left", "right", "is_leaf", "value")) or (
                    inner.any() and (a["left"][inner].max() >= n or a["right"][inner].max() >= n
                                     or a["left"][inner].min() < 0 or a["feature"][inner].max() >= model.n_features)):
                raise ValueError("inconsistent tree arrays")
            if len(a["roots"]) and (a["roots"].min() < 0 or a["roots"].max() >= n):
                raise ValueError("inconsistent tree roots")
        return model
