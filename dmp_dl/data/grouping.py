"""Grouping events by a small integer key (a user index) in time order, without a stable sort.

numpy's stable sort of int64 keys is a merge sort; sorting ``key * n + position`` (every value
distinct, so any sort is stable) uses its vectorised quicksort instead and is several times faster.
"""

from __future__ import annotations

import numpy as np

_INT64_MAX = np.iinfo(np.int64).max


def stable_order(keys: np.ndarray) -> np.ndarray:
    """The permutation that sorts ``keys`` with ties in input order (``np.argsort(keys,
    kind="stable")``).

    keys: (n,) integers. Returns (n,) int64.
    """
    keys = np.asarray(keys)
    n = len(keys)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    low, high = int(keys.min()), int(keys.max())
    if (high - low + 1) > _INT64_MAX // max(n, 1) - 1:  # the composite key would overflow int64
        return np.argsort(keys, kind="stable").astype(np.int64, copy=False)
    composite = keys.astype(np.int64) - low
    composite *= n
    composite += np.arange(n, dtype=np.int64)
    composite.sort()
    composite %= n
    return composite


def group_bounds(sorted_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends): the first and one-past-last position of each run of equal values of
    ``sorted_keys`` ((n,), grouped). Each (g,) int64."""
    n = len(sorted_keys)
    if n == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    return starts, np.r_[starts[1:], n]
