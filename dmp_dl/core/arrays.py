"""Array helpers for the hot paths: distinct values by one sort.

numpy 2.3+ answers ``np.unique(a)`` of a large integer array through a hash table that is 10-40x
slower than sorting it (3M int64: 10-15 s against 0.35 s on 2 cores), and ``np.unique(..., axis=0)``
sorts rows as structured records; these helpers sort plain int64 keys instead.
"""

from __future__ import annotations

import numpy as np

_INT32_MAX = np.iinfo(np.int32).max


def index_dtype(bound: int) -> type:
    """The integer type for indices in ``[0, bound]``: int32 (half the memory of int64) while
    ``bound`` is below int32's maximum, else int64."""
    return np.int32 if bound < _INT32_MAX else np.int64


def unique_sorted(a: np.ndarray) -> np.ndarray:
    """The distinct values of the 1-d array ``a``, ascending (what ``np.unique(a)`` returns)."""
    s = np.sort(np.asarray(a).ravel())
    if len(s) == 0:
        return s
    keep = np.empty(len(s), dtype=bool)
    keep[0] = True
    np.not_equal(s[1:], s[:-1], out=keep[1:])
    return s[keep]


def distinct_pairs(rows: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct (row, code) pairs of two (n,) integer arrays (rows >= 0), sorted by row then
    code, as two (k,) int64 arrays. Codes may be negative (days before 1970)."""
    rows = np.asarray(rows, dtype=np.int64)
    codes = np.asarray(codes).astype(np.int64)
    if len(rows) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    low = int(codes.min())
    width = int(codes.max()) - low + 1
    keys = unique_sorted(rows * width + (codes - low))
    return keys // width, keys % width + low
