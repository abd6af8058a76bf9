"""Holdout control groups: a random share of a campaign's selected users is never contacted.

The selected users are grouped into strata by segment and by propensity decile (deciles of the
selected users' scores, 1 = the highest tenth). Within each stratum a share ``fraction`` is held
out at random by systematic sampling: the users are ordered by (stratum, random key) and, from a
random start s in [0, 1), position i is a control when ``floor((i + 1) f + s) > floor(i f + s)``.
Every user is a control with probability exactly f, every stratum holds within one user of
f · its size, and the whole group within one of f · n: treatment and control have the same
segment and propensity mix by construction, not just on average.

The draw depends only on the seed and the set of users (they are ordered by vocabulary row before
the keys are drawn), so the same seed gives the same groups. A share that would leave nobody to
contact is refused; one that leaves fewer than ``MIN_GROUP`` users in a group is warned about (the
campaign could then only show a large lift).
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass

import numpy as np
import pandas as pd

from dmp_dl.campaign.stats import MIN_GROUP
from dmp_dl.core.errors import ConfigError

log = logging.getLogger(__name__)

TREATMENT, CONTROL = "treatment", "control"
N_DECILES = 10


def check_fraction(value, name: str = "control_frac") -> float:
    """``value`` as a holdout share in [0, 1) (0: no control group)."""
    try:
        if isinstance(value, bool):
            raise TypeError
        f = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number in [0, 1), e.g. {name}=0.1, got {value!r}") from None
    if not 0.0 <= f < 1.0:
        raise ConfigError(f"{name} must be in [0, 1) (the share of selected users held out), got {value!r}")
    return f


def fresh_seed() -> int:
    """A random seed for a new draw (recorded in the summary, so the draw can be repeated)."""
    return secrets.randbits(31)


def deciles(scores: np.ndarray, n: int = N_DECILES) -> np.ndarray:
    """(m,) int64 decile of each score among ``scores``: 1 = the highest tenth, ``n`` the lowest.
    Ties are broken by position, so the deciles have equal sizes (within one)."""
    scores = np.asarray(scores, dtype=np.float64)
    m = len(scores)
    order = np.lexsort((np.arange(m), -scores))
    rank = np.empty(m, dtype=np.int64)
    rank[order] = np.arange(m)
    return (rank * n // max(m, 1) + 1).astype(np.int64)


@dataclass
class Holdout:
    """The control group drawn among ``n`` selected users (arrays aligned with the input order).

    control: (n,) bool, True = held out, never contacted.
    segment: (n,) int64 segment (-1 when the bundle has none); decile: (n,) int64, 1 = top tenth.
    stratum: (n,) int64 stratum index (segment x decile).
    fraction, seed: what was drawn with.
    """

    control: np.ndarray
    segment: np.ndarray
    decile: np.ndarray
    stratum: np.ndarray
    fraction: float
    seed: int

    @property
    def groups(self) -> np.ndarray:
        """(n,) object array of ``"treatment"`` / ``"control"``."""
        return np.where(self.control, CONTROL, TREATMENT).astype(object)

    def summary(self, scores: np.ndarray) -> dict:
        """Sizes, seed, strata and balance: per group the mean score and the standardised mean
        difference; the largest gap, in users, between a stratum's control count and ``fraction``
        of its size."""
        c = self.control
        sizes = pd.crosstab(self.stratum, c)
        per_stratum = sizes.get(True, pd.Series(0, index=sizes.index))
        totals = sizes.sum(axis=1)
        s = np.asarray(scores, dtype=np.float64)
        mean_t = float(s[~c].mean()) if (~c).any() else None
        mean_c = float(s[c].mean()) if c.any() else None
        sd = float(s.std()) if len(s) > 1 else 0.0
        smd = None if mean_t is None or mean_c is None or sd == 0 else (mean_t - mean_c) / sd
        by_segment = {}
        if (self.segment >= 0).any():
            for seg in np.unique(self.segment):
                m = self.segment == seg
                by_segment[str(int(seg))] = {"treatment": int((m & ~c).sum()), "control": int((m & c).sum())}
        return {
            "fraction": self.fraction,
            "seed": int(self.seed),
            "treatment": int((~c).sum()),
            "control": int(c.sum()),
            "strata": {"by": (["segment"] if (self.segment >= 0).any() else []) + ["propensity_decile"],
                       "count": int(len(totals)),
                       # < 1 by construction: no stratum is more than one user off its share
                       "largest_gap_users": float(np.max(np.abs(per_stratum - self.fraction * totals))) if len(totals) else 0.0},
            "balance": {"mean_score": {TREATMENT: mean_t, CONTROL: mean_c}, "standardised_mean_difference": smd},
            "by_segment": by_segment,
        }


def draw_control(rows: np.ndarray, scores: np.ndarray, fraction: float, seed: int | None = None,
                 segments: np.ndarray | None = None) -> Holdout:
    """Hold out ``fraction`` of the users ``rows`` (n,) (vocabulary rows, distinct), stratified by
    ``segments`` (n,) (or none) and the decile of ``scores`` (n,) among them.

    seed: None draws a fresh one (recorded in the result).
    """
    fraction = check_fraction(fraction)
    rows = np.asarray(rows, dtype=np.int64)
    n = len(rows)
    seed = fresh_seed() if seed is None else int(seed)
    segment = np.full(n, -1, dtype=np.int64) if segments is None else np.asarray(segments, dtype=np.int64)
    decile = deciles(scores)
    stratum = (segment + 1) * (N_DECILES + 1) + decile
    rng = np.random.default_rng(seed)
    key = np.empty(n)
    key[np.argsort(rows, kind="stable")] = rng.random(n)  # keys follow the users, not the input order
    start = rng.random()
    order = np.lexsort((key, stratum))
    i = np.arange(n, dtype=np.float64)
    picked = np.floor((i + 1) * fraction + start) > np.floor(i * fraction + start)
    control = np.zeros(n, dtype=bool)
    control[order] = picked
    _check_sizes(int(control.sum()), n, fraction)
    return Holdout(control, segment, decile, stratum, fraction, seed)


def _check_sizes(n_control: int, n: int, fraction: float) -> None:
    """Refuse a holdout that leaves nobody to contact; warn when a group is too small to measure."""
    n_treated = n - n_control
    if n == 0 or fraction == 0:
        return
    if n_treated == 0:
        raise ConfigError(f"control_frac={fraction:g} holds out all {n} selected users, so nobody would be contacted; "
                          f"lower control_frac (e.g. 0.1) or raise the budget")
    if n_control == 0:
        log.warning("control_frac=%g holds out none of the %d selected users: there is no control group to measure the "
                    "campaign against; raise control_frac (to at least %.3g) or the budget", fraction, n, 1 / n)
        return
    small = [f"{size} {group}" for group, size in (("treated", n_treated), ("control", n_control)) if size < MIN_GROUP]
    if small:
        advice = ("raise the budget" if len(small) == 2 else
                  "lower control_frac" if n_treated < MIN_GROUP else "raise control_frac or the budget")
        log.warning("control_frac=%g splits the %d selected users into %d to contact and %d held out: with only %s "
                    "users (fewer than %d per group) the campaign's lift can only be measured with exact tests, and only "
                    "a large one shows; %s", fraction, n, n_treated, n_control, " and ".join(small), MIN_GROUP, advice)
