"""Grouping rows by integer keys in linear or near-linear time.

numpy's stable sort of int64 keys is a merge sort; sorting ``key * n + position`` (every value
distinct, so any sort is stable) uses its vectorised quicksort instead and is several times faster.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

_INT64_MAX = np.iinfo(np.int64).max


def stable_order(keys: np.ndarray) -> np.ndarray:
    """The permutation that sorts ``keys`` with ties in input order (``np.argsort(keys,
    kind="stable")``).

    keys: (n,) integers. Returns (n,) int64.
    """
    return sorted_order(keys)[0]


def sorted_order(keys: np.ndarray, dtype: type = np.int64, block: int = 1 << 22) -> tuple[np.ndarray, np.ndarray]:
    """(:func:`stable_order` of ``keys``, ``keys`` in that order), the second without a gather.

    keys: (n,) integers. dtype: of both results (int32 halves their memory; the caller checks that
    n and the keys fit). Returns ((n,) dtype, (n,) dtype). Beside the results it needs one (n,)
    int64 array: the composite key is built and taken apart ``block`` rows at a time.
    """
    keys = np.asarray(keys)
    n = len(keys)
    if n == 0:
        return np.zeros(0, dtype=dtype), np.zeros(0, dtype=dtype)
    low, high = int(keys.min()), int(keys.max())
    if (high - low + 1) > _INT64_MAX // max(n, 1) - 1:  # the composite key would overflow int64
        order = np.argsort(keys, kind="stable")
        return order.astype(dtype, copy=False), keys[order].astype(dtype, copy=False)
    composite = keys.astype(np.int64)
    for lo in range(0, n, block):
        part = composite[lo:lo + block]
        part -= low
        part *= n
        part += np.arange(lo, lo + len(part), dtype=np.int64)
    composite.sort()
    order, ordered = np.empty(n, dtype=dtype), np.empty(n, dtype=dtype)
    for lo in range(0, n, block):
        part = composite[lo:lo + block]
        order[lo:lo + len(part)] = part % n
        ordered[lo:lo + len(part)] = part // n + low
    return order, ordered


def group_bounds(sorted_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends): the first and one-past-last position of each run of equal values of
    ``sorted_keys`` ((n,), grouped). Each (g,) int64."""
    n = len(sorted_keys)
    if n == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    return starts, np.r_[starts[1:], n]


def _mix(columns: list[np.ndarray], block: int = 1 << 20) -> np.ndarray:
    """(n,) uint64 hash of each row of ``columns`` (each (n,) with 8-byte or smaller items; equal
    floats hash alike: -0.0 as 0.0, every NaN as one NaN), ``block`` rows at a time so that the
    temporaries stay small whatever n."""
    n = len(columns[0])
    out = np.empty(n, dtype=np.uint64)
    for lo in range(0, n, block):
        h = np.full(min(block, n - lo), 0x9E3779B97F4A7C15, dtype=np.uint64)
        for col in columns:
            part = col[lo:lo + block]
            if part.dtype.kind == "f":
                part = np.where(np.isnan(part), np.nan, part + 0.0).astype(np.float64, copy=False)
            h ^= part.view(np.uint64) if part.dtype.itemsize == 8 else part.astype(np.uint64)
            h *= np.uint64(0xBF58476D1CE4E5B9)
            h ^= h >> np.uint64(31)
        out[lo:lo + block] = h
    return out


def _repeated(values: np.ndarray) -> np.ndarray:
    """(n,) bool: the entries of ``values`` (n,) that occur more than once. By sorting: about a
    third of the memory of a hash table of n entries, and faster."""
    ordered = np.sort(values)
    repeats = ordered[1:][ordered[1:] == ordered[:-1]]
    del ordered
    if len(repeats) == 0:
        return np.zeros(len(values), dtype=bool)
    return np.isin(values, np.unique(repeats))


def duplicated_rows(columns: dict[str, np.ndarray]) -> np.ndarray:
    """(n,) bool: rows equal in every column to an earlier row (``DataFrame.duplicated(keep="first")``).

    columns: name -> (n,) integer or float array. Rows are first told apart by a 64-bit hash of the
    whole row (one hash-table pass); only rows whose hash repeats are compared exactly by pandas.
    """
    cols = list(columns.values())
    n = len(cols[0]) if cols else 0
    out = np.zeros(n, dtype=bool)
    if n == 0:
        return out
    maybe = np.flatnonzero(_repeated(_mix(cols)))
    if len(maybe):
        out[maybe] = pd.DataFrame({k: v[maybe] for k, v in columns.items()}).duplicated(keep="first").to_numpy()
    return out
