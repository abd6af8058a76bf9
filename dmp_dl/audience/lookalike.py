"""Lookalike audiences: expand a seed list to the users most like it, and measure how well that works.

:func:`expand` answers "who else looks like these customers" with
:meth:`Recommender.lookalike <dmp_dl.serving.recommender.Recommender.lookalike>` (``centroid``, ``contrast`` or
``neighbours``). :func:`holdout_quality` measures an expansion offline: hide part of a known
audience (a segment, the buyers of a category, the seed list itself), expand from the rest, and
count how many hidden members come back, against two baselines that use no similarity at all:

* ``random``: users drawn uniformly from the candidates (everyone but the seeds); its precision
  and recall are given as their expectation, |hidden| / |candidates| and size / |candidates|;
* ``popularity``: the most active candidates (most distinct items), what a marketer gets by
  targeting heavy users.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from dmp_dl.core.errors import ConfigError
from dmp_dl.serving.recommender import LOOKALIKE_METHODS

log = logging.getLogger(__name__)

BASELINES = ("random", "popularity")


def expand(rec, seed_rows: np.ndarray, size: int, method: str = "contrast", exclude_seeds: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The ``size`` users most like the users at ``seed_rows``: rows (m,) int64 and scores (m,)
    float64, best first (m < size only when fewer candidates exist)."""
    if int(size) < 1:
        raise ConfigError(f"size must be >= 1, got {size}")
    if method not in LOOKALIKE_METHODS:
        raise ConfigError(f"method must be one of {LOOKALIKE_METHODS}, got {method!r}")
    if len(seed_rows) == 0:
        raise ConfigError("the seed list is empty: give at least one known user id")
    return rec.lookalike_rows(np.asarray(seed_rows, dtype=np.int64), int(size), exclude_seeds=exclude_seeds, method=method)


def split_audience(audience_rows: np.ndarray, hide_frac: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split of an audience into (seed rows, hidden rows); both non-empty."""
    rows = np.unique(np.asarray(audience_rows, dtype=np.int64))
    if not 0 < hide_frac < 1:
        raise ConfigError(f"the hidden fraction must be in (0, 1), got {hide_frac}")
    if len(rows) < 2:
        raise ConfigError(f"an audience of {len(rows)} user(s) cannot be split into seeds and hidden members")
    n_hidden = int(np.clip(round(hide_frac * len(rows)), 1, len(rows) - 1))
    perm = rng.permutation(rows)
    return np.sort(perm[n_hidden:]), np.sort(perm[:n_hidden])


def _hits(found: np.ndarray, hidden: np.ndarray, n_hidden: int) -> dict:
    hits = int(np.isin(found, hidden).sum())
    return {"found": int(len(found)), "hits": hits, "precision": hits / max(len(found), 1), "recall": hits / n_hidden}


def holdout_quality(rec, audience_rows: np.ndarray, hide_frac: float = 0.5, sizes: Sequence[int] | None = None,
                    methods: Sequence[str] = LOOKALIKE_METHODS, seed: int = 0,
                    activity: np.ndarray | None = None) -> list[dict]:
    """Hide ``hide_frac`` of the audience, expand from the rest, and score each method.

    sizes: expansion sizes (default: 1× and 3× the hidden count); activity: (n_users,) activity of
    each user for the popularity baseline (default: the number of distinct items, from the bundle).
    Returns one row per (method, size): ``method``, ``size``, ``seeds``, ``hidden``, ``found``,
    ``hits``, ``precision`` (hits / found), ``recall`` (hits / hidden); ``random`` rows hold the
    expectation (``hits`` is then fractional).
    """
    rng = np.random.default_rng(seed)
    seeds, hidden = split_audience(audience_rows, hide_frac, rng)
    n_users = rec.n_users
    candidates = n_users - len(seeds)
    sizes = [len(hidden), 3 * len(hidden)] if sizes is None else [int(s) for s in sizes]
    sizes = sorted({min(s, candidates) for s in sizes if s > 0})
    activity = rec.user_activity() if activity is None else np.asarray(activity)
    not_seed = np.ones(n_users, dtype=bool)
    not_seed[seeds] = False
    pool = np.flatnonzero(not_seed)
    by_activity = pool[np.lexsort((pool, -activity[pool]))]
    rows = []
    base = {"seeds": int(len(seeds)), "hidden": int(len(hidden))}
    for method in methods:
        found, _ = expand(rec, seeds, max(sizes), method)
        for size in sizes:
            rows.append({"method": method, "size": size, **base, **_hits(found[:size], hidden, len(hidden))})
    for size in sizes:
        rows.append({"method": "popularity", "size": size, **base, **_hits(by_activity[:size], hidden, len(hidden))})
        expected_hits = size * len(hidden) / candidates
        rows.append({"method": "random", "size": size, **base, "found": size, "hits": expected_hits,
                     "precision": expected_hits / size, "recall": expected_hits / len(hidden)})
    return rows
