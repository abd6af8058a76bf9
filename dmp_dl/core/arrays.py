"""Array helpers for the hot paths: distinct values by one sort, counts in blocks.

numpy 2.3+ answers ``np.unique(a)`` of a large integer array through a hash table that is 10-40x
slower than sorting it (3M int64: 10-15 s against 0.35 s on 2 cores), and ``np.unique(..., axis=0)``
sorts rows as structured records; these helpers sort plain int64 keys instead.

``np.bincount``, ``np.flatnonzero`` and ``np.add.reduceat(..., dtype=np.int64)`` each make an
int64 copy of their whole input (50M int8 split labels: a 400 MB temporary); the ``*_blocks``
helpers give the same answers ``block`` entries at a time.
"""

from __future__ import annotations

import numpy as np

_INT32_MAX = np.iinfo(np.int32).max


def index_dtype(bound: int) -> type:
    """The integer type for indices in ``[0, bound]``: int32 (half the memory of int64) while
    ``bound`` is below int32's maximum, else int64."""
    return np.int32 if bound < _INT32_MAX else np.int64


BLOCK = 1 << 22  # entries a block: int64 temporaries of 32 MB


def bincount_blocks(values: np.ndarray, minlength: int = 0, block: int = BLOCK) -> np.ndarray:
    """``np.bincount(values, minlength=minlength)`` ((m,) int64) of non-negative integers, counted
    ``block`` values at a time."""
    values = np.asarray(values)
    out = np.zeros(max(int(minlength), int(values.max()) + 1 if len(values) else 0), dtype=np.int64)
    for lo in range(0, len(values), block):
        part = np.bincount(values[lo:lo + block])
        out[:len(part)] += part
    return out


def flatnonzero_blocks(mask: np.ndarray, dtype: type = np.int64, block: int = BLOCK) -> np.ndarray:
    """``np.flatnonzero(mask)`` of a 1-d bool array as ``dtype`` (int32 halves it; the caller
    checks that ``len(mask)`` fits), without the int64 result in between."""
    out = np.empty(int(np.count_nonzero(mask)), dtype=dtype)
    at = 0
    for lo in range(0, len(mask), block):
        part = np.flatnonzero(mask[lo:lo + block])
        part += lo
        out[at:at + len(part)] = part
        at += len(part)
    return out


def count_per_segment(keep: np.ndarray, bounds: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """How many entries of ``keep`` ((n,) bool) hold in each segment ``bounds[k]:bounds[k+1]``
    (``bounds``: (g + 1,) non-decreasing, from 0 to n, e.g. a CSR matrix's ``indptr``): (g,) int64."""
    keep = np.asarray(keep, dtype=bool)
    bounds = np.asarray(bounds, dtype=np.int64)
    n_blocks = -(-len(keep) // block)
    totals = np.zeros(n_blocks + 1, dtype=np.int64)  # kept entries before each block
    for k in range(n_blocks):
        totals[k + 1] = totals[k] + np.count_nonzero(keep[k * block:(k + 1) * block])
    before = np.empty(len(bounds), dtype=np.int64)  # kept entries before each bound
    which = np.minimum(bounds // block, n_blocks)  # the block a bound falls in (n_blocks: the end)
    for k in np.unique(which):
        at = np.flatnonzero(which == k)
        lo = int(k) * block
        inside = np.concatenate(([0], np.cumsum(keep[lo:lo + block], dtype=np.int64)))
        before[at] = totals[k] + inside[bounds[at] - lo]
    return np.diff(before)


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
