"""Leakage-free train / validation / test splits of time-sorted events."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from dmp_dl.core.errors import ConfigError
from dmp_dl.data.grouping import group_bounds, stable_order
from dmp_dl.data.pairs import TEST, TRAIN, VAL, SplitPairs

METHODS = ("auto", "global_temporal", "leave_last_n", "random_per_user")
TIME_METHODS = ("global_temporal", "leave_last_n")  # need event times


@dataclass
class SplitOptions:
    """``data.split``.

    method:
      * ``auto`` (default): ``global_temporal`` when its cut leaves at least ``auto_min_users`` and
        ``auto_min_user_share`` of all users with a held-out item to rank in both validation and
        test, else ``leave_last_n`` when the log has event times, else ``random_per_user``
        (:func:`split_events` says which and why).
      * ``global_temporal``: one cut in time; the last ``test_frac`` of events (by time) are test,
        the ``val_frac`` before them validation. No training event is later than any held-out one.
      * ``leave_last_n``: per user, the last ``n`` events are test and the ``n`` before them
        validation (a user keeps at least one training event).
      * ``random_per_user``: per user, a seeded random ``test_frac`` / ``val_frac`` of events
        (rounded down, so a user keeps at least one training event).
    """

    method: str = "auto"
    val_frac: float = 0.1
    test_frac: float = 0.1
    n: int = 1
    seed: int = 42
    auto_min_users: int = 100
    auto_min_user_share: float = 0.1

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"data.split.method must be one of {METHODS}, got {self.method!r}")
        if not (0 <= self.val_frac < 1 and 0 <= self.test_frac < 1 and self.val_frac + self.test_frac < 1):
            raise ConfigError(
                f"data.split.val_frac and test_frac must be in [0, 1) with a sum below 1, got {self.val_frac}, {self.test_frac}"
            )
        if self.n < 1:
            raise ConfigError(f"data.split.n must be >= 1, got {self.n}")
        if isinstance(self.auto_min_users, bool) or not isinstance(self.auto_min_users, int) or self.auto_min_users < 0:
            raise ConfigError(f"data.split.auto_min_users must be an integer >= 0, got {self.auto_min_users!r}")
        if not 0 <= self.auto_min_user_share <= 1:
            raise ConfigError(f"data.split.auto_min_user_share must be in [0, 1], got {self.auto_min_user_share}")


def heldout_users(user: np.ndarray, item: np.ndarray, labels: np.ndarray) -> tuple[int, int]:
    """Users the validation and the test split can rank: users with a training event and a held-out
    item they did not already have (in training; for test, in training or validation). The
    datamodule's ``val_users`` / ``test_users`` are these users.

    user, item: (n,) int64 indices; labels: (n,) split labels. Returns (validation users, test users).
    """
    n_users, n_items = int(user.max(initial=-1)) + 1, int(item.max(initial=-1)) + 1
    return SplitPairs.build(user, item, labels, n_users, n_items).user_counts()


@dataclass
class Split:
    """The outcome of :func:`resolve_split`.

    labels: (n,) int8; method: the concrete method used; reason: why ``auto`` chose it (None for an
    explicit method); pairs: the :class:`SplitPairs` of ``labels`` when choosing needed them (else
    None), for the caller to reuse.
    """

    labels: np.ndarray
    method: str
    reason: str | None
    pairs: SplitPairs | None = None


def _distinct(values: np.ndarray) -> int:
    """Number of distinct values of non-negative integer indices (n,), in linear time."""
    if len(values) == 0:
        return 0
    return int(np.count_nonzero(np.bincount(values)))


def split_events(user: np.ndarray, item: np.ndarray, timestamp: np.ndarray, has_timestamps: bool,
                 opts: SplitOptions) -> tuple[np.ndarray, str, str | None]:
    """Split labels, the method used and, for ``auto``, why it was chosen.

    user, item: (n,) int64 indices; timestamp: (n,) epoch seconds, sorted (see :func:`assign_split`);
    has_timestamps: False for a log without event times (then only ``random_per_user`` applies).
    Returns ((n,) int8 labels, method, reason or None). Raises :class:`ConfigError` for a method
    that needs times on a log without them.
    """
    split = resolve_split(user, item, timestamp, has_timestamps, opts)
    return split.labels, split.method, split.reason


def resolve_split(user: np.ndarray, item: np.ndarray, timestamp: np.ndarray, has_timestamps: bool,
                  opts: SplitOptions, n_users: int | None = None, n_items: int | None = None) -> Split:
    """:func:`split_events` with the pairs it computed to choose (see :class:`Split`).

    n_users, n_items: index ranges of ``user`` / ``item`` (default: their maximum + 1).
    """
    if opts.method != "auto":
        if opts.method in TIME_METHODS and not has_timestamps:
            raise ConfigError(f"data.split.method={opts.method} needs event times and this log has none; "
                              "use data.split.method=auto or random_per_user")
        return Split(assign_split(user, timestamp, opts), opts.method, None)
    if not has_timestamps:
        chosen = replace(opts, method="random_per_user")
        return Split(assign_split(user, timestamp, chosen), chosen.method, "auto: the log has no event times")
    n_users = int(user.max(initial=-1)) + 1 if n_users is None else n_users
    n_items = int(item.max(initial=-1)) + 1 if n_items is None else n_items
    distinct_users = _distinct(user)
    need = max(int(opts.auto_min_users), int(np.ceil(opts.auto_min_user_share * distinct_users)))
    labels = assign_split(user, timestamp, replace(opts, method="global_temporal"))
    pairs = SplitPairs.build(user, item, labels, n_users, n_items)
    val_users, test_users = pairs.user_counts()
    found = (f"{val_users} validation and {test_users} test users of {distinct_users} with a held-out item to rank "
             f"(auto needs at least {need} each: data.split.auto_min_users={opts.auto_min_users}, "
             f"auto_min_user_share={opts.auto_min_user_share:g})")
    wanted_val, wanted_test = opts.val_frac > 0, opts.test_frac > 0
    if (val_users >= need or not wanted_val) and (test_users >= need or not wanted_test):
        return Split(labels, "global_temporal", f"auto: one cut in time leaves {found}", pairs)
    chosen = replace(opts, method="leave_last_n")
    return Split(assign_split(user, timestamp, chosen), chosen.method,
                 f"auto: one cut in time would leave {found}, so each user's last {opts.n} event(s) are held out instead")


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
    if opts.method not in METHODS[1:]:
        raise ValueError(f"assign_split needs a concrete method, got {opts.method!r} (split_events resolves auto)")
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
    if opts.method == "random_per_user":
        rng = np.random.default_rng(opts.seed)
        shuffled = np.argsort(rng.random(n), kind="stable")  # by user, then at random
        order = shuffled[stable_order(user[shuffled])]
    else:
        order = stable_order(user)
    starts, ends = group_bounds(user[order])
    counts = ends - starts
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
