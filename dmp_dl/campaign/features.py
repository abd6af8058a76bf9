"""What the uplift model knows about a user: what the bundle knows, as of the end of its data.

A campaign is targeted from a bundle, so the uplift model reads the same bundle, for the users it
was trained on and for the users it ranks:

* the user vector (``user_vectors.npy``, from the user's whole history: taste and activity);
* the propensity model's score, as a logit (it sums up the behaviour and attribute features:
  counts, recency, tenure, values, time-decayed activity, CRM attributes), when the bundle has one;
* the interest profile's recency-weighted event counts per type (log1p), when it has profiles;
* the user's segment, one-hot, when it has segments.

Every input is aligned with the user vocabulary, so erasure removes a user's inputs with their rows
and the model stores nothing per user.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from dmp_dl.core.errors import BundleError

EPS = 1e-6


@dataclass
class UpliftFeatures:
    """Which bundle inputs the model reads (and their sizes, to refuse a bundle that differs).

    vector_dim: width of the user vectors; propensity: whether the propensity logit is read;
    event_types: the profile event types read, in order; segments: K (0: no segment one-hot).
    """

    vector_dim: int
    propensity: bool
    event_types: list[str]
    segments: int

    @classmethod
    def of(cls, rec) -> "UpliftFeatures":
        """Every input ``rec`` (a :class:`~dmp_dl.serving.recommender.Recommender`) has."""
        profiles, segments = rec.profiles, rec.stored_segments
        return cls(rec.dim, rec.has_propensity, list(profiles.event_types) if profiles is not None else [],
                   segments.k if segments is not None else 0)

    @property
    def width(self) -> int:
        return self.vector_dim + int(self.propensity) + len(self.event_types) + self.segments

    def names(self) -> list[str]:
        return ([f"vector_{i}" for i in range(self.vector_dim)] + (["propensity_logit"] if self.propensity else [])
                + [f"events.{t}" for t in self.event_types] + [f"segment={s}" for s in range(self.segments)])

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "UpliftFeatures":
        return cls(int(d["vector_dim"]), bool(d["propensity"]), [str(t) for t in d["event_types"]], int(d["segments"]))

    def check(self, rec, where: str) -> None:
        """Raise :class:`BundleError` naming ``where`` when ``rec`` lacks an input the model reads."""
        problems = []
        if rec.dim != self.vector_dim:
            problems.append(f"user vectors of width {self.vector_dim}, the bundle's are {rec.dim}")
        if self.propensity and not rec.has_propensity:
            problems.append("a propensity model, the bundle has none")
        have = list(rec.profiles.event_types) if rec.profiles is not None else []
        missing = [t for t in self.event_types if t not in have]
        if missing:
            problems.append(f"profile event types {missing}, the bundle's profiles have {have}")
        k = rec.stored_segments.k if rec.stored_segments is not None else 0
        if self.segments and k != self.segments:
            problems.append(f"{self.segments} segments, the bundle has {k}")
        if problems:
            raise BundleError(f"{where}: the uplift model was trained on {'; '.join(problems)}; train it again on this "
                              "bundle (python -m dmp_dl.audience task=uplift ...)")


def uplift_inputs(rec, rows: np.ndarray, spec: UpliftFeatures) -> np.ndarray:
    """(n, spec.width) float32 inputs of the users at vocabulary ``rows`` (n,)."""
    rows = np.asarray(rows, dtype=np.int64)
    parts = [np.asarray(rec.user_vectors[rows], dtype=np.float32)]
    if spec.propensity:
        p = np.clip(rec.propensity_rows(rows), EPS, 1 - EPS)
        parts.append(np.log(p / (1 - p))[:, None])
    if spec.event_types:
        column = [list(rec.profiles.event_types).index(t) for t in spec.event_types]
        parts.append(np.log1p(np.maximum(rec.profiles.event_type_affinity[rows][:, column], 0)))
    if spec.segments:
        parts.append(np.eye(spec.segments, dtype=np.float32)[rec.stored_segments.assignments[rows]])
    return np.ascontiguousarray(np.concatenate([np.asarray(x, dtype=np.float32) for x in parts], axis=1))
