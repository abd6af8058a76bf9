"""Leakage-free train / validation / test splits of time-sorted events."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dmp_dl.errors import ConfigError

TRAIN, VAL, TEST = 0, 1, 2
METHODS = ("global_temporal", "leave_last_n", "random_per_user")


@dataclass
class SplitOptions:
    """``data.split``.

    method:
      * ``global_temporal``: one cut in time; the last ``test_frac`` of events (by time) are test,
        the ``val_frac`` before them validation. No training event is later than any held-out one.
      * ``leave_last_n``: per user, the last ``n`` events are test and the ``n`` before them
        validation (a user keeps at least one training event).
      * ``random_per_user``: per user, a seeded random ``test_frac`` / ``val_frac`` of events
        (rounded down, so a user keeps at least one training event).
    """

    method: str = "global_temporal"
    val_frac: float = 0.1
    test_frac: float = 0.1
    n: int = 1
    seed: int = 42

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"data.split.method must be one of {METHODS}, got {self.method!r}")
        if not (0 <= self.val_frac < 1 and 0 <= self.test_frac < 1 and self.val_frac + self.test_frac < 1):
            raise ConfigError(
                f"data.split.val_frac and test_frac must be in [0, 1) with a sum below 1, got {self.val_frac}, {self.test_frac}"
            )
        if self.n < 1:
            raise ConfigError(f"data.split.n must be >= 1, got {self.n}")


def assign_split(user: np.ndarray, timestamp: np.ndarray, opts: SplitOptions) -> np.ndarray:
    """Split label per event: 0 train, 1 validation, 2 test.

    Parameters
    ----------
    user: (n,) int64 user index per event.
    timestamp: (n,) int64 epoch seconds; events must be sorted by time (ties in log order).

    Returns
    -------
    (n,) int8 labels.
    """
    n = len(user)
    labels = np.zeros(n, dtype=np.int8)
    if n == 0:
        return labels
    if opts.method == "global_temporal":
        q_val, q_test = 1.0 - opts.val_frac - opts.test_frac, 1.0 - opts.test_frac
        t_val = np.quantile(timestamp, q_val, method="lower") if opts.val_frac > 0 else None
        t_test = np.quantile(timestamp, q_test, method="lower") if opts.test_frac > 0 else None
        if t_val is not None:
            labels[timestamp > t_val] = VAL
        if t_test is not None:
            labels[timestamp > t_test] = TEST
        return labels
    # Per-user methods: position of each event within its user's events (time order kept).
    order = np.lexsort((np.arange(n), user))
    if opts.method == "random_per_user":
        rng = np.random.default_rng(opts.seed)
        order = np.lexsort((rng.random(n), user))
    u_sorted = user[order]
    starts = np.r_[0, np.flatnonzero(u_sorted[1:] != u_sorted[:-1]) + 1]
    counts = np.diff(np.r_[starts, n])
    count = np.repeat(counts, counts)
    pos = np.arange(n) - np.repeat(starts, counts)
    if opts.method == "leave_last_n":
        from_end = count - 1 - pos
        lab = np.where((from_end < opts.n) & (count > opts.n), TEST, TRAIN)
        lab = np.where((from_end >= opts.n) & (from_end < 2 * opts.n) & (count > 2 * opts.n), VAL, lab)
    else:
        n_test = np.floor(count * opts.test_frac).astype(np.int64)
        n_val = np.floor(count * opts.val_frac).astype(np.int64)
        n_val = np.minimum(n_val, np.maximum(count - n_test - 1, 0))
        lab = np.where(pos < n_test, TEST, np.where(pos < n_test + n_val, VAL, TRAIN))
    labels[order] = lab.astype(np.int8)
    return labels
