"""Probability calibration fitted on validation users, so predicted rates match observed rates.

The network is trained with ``pos_weight`` (and the baselines may be anything), so its raw
sigmoid over-states the positive rate; a calibrator maps a model's logit to a probability:

* ``platt``: ``sigmoid(a * logit + b)``, a one-feature logistic regression (two parameters: robust
  on a few hundred validation users; the default).
* ``isotonic``: a monotone step function of the logit (scikit-learn ``IsotonicRegression``),
  applied by linear interpolation between its thresholds; needs more validation data.
* ``none``: ``sigmoid(logit)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from scipy.special import expit, logit
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression

from dmp_dl.core.errors import ConfigError

METHODS = ("platt", "isotonic", "none")
_EPS = 1e-6


def to_logit(probabilities: np.ndarray) -> np.ndarray:
    """Logits of probabilities clipped to [1e-6, 1 - 1e-6] (for models that output probabilities)."""
    return logit(np.clip(np.asarray(probabilities, dtype=np.float64), _EPS, 1 - _EPS))


@dataclass
class Calibrator:
    """A fitted logit -> probability map; see the module docstring.

    a, b: Platt slope and intercept; thresholds_x, thresholds_y: isotonic knots (logit -> probability).
    """

    method: str = "none"
    a: float = 1.0
    b: float = 0.0
    thresholds_x: list[float] = field(default_factory=list)
    thresholds_y: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"propensity.calibration must be one of {METHODS}, got {self.method!r}")

    @classmethod
    def fit(cls, method: str, logits: np.ndarray, labels: np.ndarray) -> "Calibrator":
        """Fit on validation logits (n,) and 0/1 labels (n,)."""
        cal = cls(method)
        z = np.asarray(logits, dtype=np.float64)
        y = np.asarray(labels).astype(np.int64)
        if method == "none" or len(np.unique(y)) < 2:
            return cal
        if method == "platt":
            lr = LogisticRegression(C=1e6, max_iter=1000).fit(z[:, None], y)
            cal.a, cal.b = float(lr.coef_[0, 0]), float(lr.intercept_[0])
        else:
            iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(z, y)
            cal.thresholds_x = iso.X_thresholds_.astype(float).tolist()
            cal.thresholds_y = iso.y_thresholds_.astype(float).tolist()
        return cal

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated probabilities (n,) float64 of logits (n,)."""
        z = np.asarray(logits, dtype=np.float64)
        if self.method == "platt":
            return expit(self.a * z + self.b)
        if self.method == "isotonic" and self.thresholds_x:
            return np.interp(z, self.thresholds_x, self.thresholds_y)
        return expit(z)

    def to_dict(self) -> dict:
        return {"method": self.method, "a": self.a, "b": self.b,
                "thresholds_x": self.thresholds_x, "thresholds_y": self.thresholds_y}

    @classmethod
    def from_dict(cls, d: Mapping) -> "Calibrator":
        x, y = [float(v) for v in d.get("thresholds_x", [])], [float(v) for v in d.get("thresholds_y", [])]
        if len(x) != len(y) or any(b < a for a, b in zip(x, x[1:])):
            raise ValueError("isotonic thresholds must be two lists of equal length, x ascending")
        return cls(str(d["method"]), float(d.get("a", 1.0)), float(d.get("b", 0.0)), x, y)
