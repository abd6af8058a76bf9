"""The propensity model's behavioural features, kept up to date event by event.

:func:`dmp_dl.propensity.features.behaviour_features` aggregates a user's whole event list. A
server does not keep that list, so each user is summarised by sufficient statistics from which the
same features follow at any later moment, and which a new event updates in O(1):

    overall:   events, active days, last active day, first time, last time, value sum,
               Σ 2^(-age/h) for each half-life h (as of a reference time ``ref``)
    per type:  count, last time, value sum, Σ 2^(-age/h) per half-life

Time-decayed sums move forward exactly: Σ 2^(-(T' - t)/h) = 2^(-(T' - T)/h) · Σ 2^(-(T - t)/h).
Distinct items come from the user's item history. Active days are counted exactly for events in
time order; an event on a day before the user's last active day is taken as falling on a day
already counted (its day is not kept).
"""

from __future__ import annotations

import numpy as np

from dmp_dl.core.arrays import distinct_pairs
from dmp_dl.core.row_blocks import blocks_of_rows
from dmp_dl.propensity.features import (
    BLOCK_EVENTS,
    SECONDS_PER_DAY,
    BehaviourSpec,
    behaviour_columns,
    event_type_codes,
)


class BehaviourStats:
    """The statistics layout for one :class:`BehaviourSpec` (its event types and half-lives).

    A user's statistics are a float64 row of :attr:`width` values (see the module docstring).
    """

    N, DAYS, LAST_DAY, FIRST, LAST, VALUE_SUM = range(6)

    def __init__(self, spec: BehaviourSpec):
        self.spec = spec
        self.h = np.asarray(spec.half_lives_days, dtype=np.float64)
        self.n_types = len(spec.event_types)
        self.decay0 = 6
        self.type0 = 6 + len(self.h)
        self.per_type = 3 + len(self.h)  # count, last time, value sum, decayed sums
        self.width = self.type0 + self.n_types * self.per_type

    def type_codes(self, types) -> np.ndarray:
        """(n,) int32 index of each event type in the spec, -1 for types it does not list (a
        categorical column is mapped through its categories)."""
        return event_type_codes(self.spec.event_types, types)

    def empty(self, n: int = 1) -> np.ndarray:
        """Statistics (n, width) of users without events."""
        s = np.zeros((n, self.width), dtype=np.float64)
        s[:, [self.LAST_DAY, self.LAST]] = -np.inf
        s[:, self.FIRST] = np.inf
        s[:, self.type0 + 1 :: self.per_type] = -np.inf  # last time of each type
        return s

    def from_events(self, user: np.ndarray, t: np.ndarray, code: np.ndarray, value: np.ndarray, n_users: int,
                    ref: float) -> np.ndarray:
        """Statistics (n_users, width) of every user from all their events (all at or before ``ref``).

        user: (n,) integer row of each event; t: (n,) epoch seconds; code: (n,) :meth:`type_codes`;
        value: (n,) float. The users are taken in blocks of about :data:`BLOCK_EVENTS` events
        (each block's events in log order), so temporaries are the size of a block, not of the log.
        """
        s = self.empty(n_users)
        for lo, hi, at in blocks_of_rows(np.asarray(user), n_users, BLOCK_EVENTS):
            s[lo:hi] = self._from_block(np.asarray(user)[at].astype(np.int64) - lo, np.asarray(t)[at].astype(np.float64),
                                        np.asarray(code)[at], np.asarray(value)[at].astype(np.float64), hi - lo, ref)
        return s

    def _from_block(self, user: np.ndarray, t: np.ndarray, code: np.ndarray, value: np.ndarray, n_users: int,
                    ref: float) -> np.ndarray:
        """:meth:`from_events` of the events of ``n_users`` users (rows ``user`` in ``0..n_users-1``)."""
        s = self.empty(n_users)
        age = np.maximum(ref - t, 0.0) / SECONDS_PER_DAY
        s[:, self.N] = np.bincount(user, minlength=n_users)
        day = np.floor(t / SECONDS_PER_DAY)
        s[:, self.DAYS] = np.bincount(distinct_pairs(user, day)[0], minlength=n_users)
        np.maximum.at(s[:, self.LAST_DAY], user, day)
        np.minimum.at(s[:, self.FIRST], user, t)
        np.maximum.at(s[:, self.LAST], user, t)
        s[:, self.VALUE_SUM] = np.bincount(user, weights=value, minlength=n_users)
        for j, h in enumerate(self.h):
            s[:, self.decay0 + j] = np.bincount(user, weights=0.5 ** (age / h), minlength=n_users)
        for k in range(self.n_types):
            m = code == k
            base = self.type0 + k * self.per_type
            s[:, base] = np.bincount(user[m], minlength=n_users)
            np.maximum.at(s[:, base + 1], user[m], t[m])
            s[:, base + 2] = np.bincount(user[m], weights=value[m], minlength=n_users)
            for j, h in enumerate(self.h):
                s[:, base + 3 + j] = np.bincount(user[m], weights=0.5 ** (age[m] / h), minlength=n_users)
        return s

    def update(self, stats: np.ndarray, ref: float, t: np.ndarray, code: np.ndarray, value: np.ndarray) -> tuple[np.ndarray, float]:
        """One user's statistics (width,) as of ``ref`` plus events (t, code, value) -> (new
        statistics, new reference time: the later of ``ref`` and the last event)."""
        s, r = self.update_many(stats[None], np.array([ref], dtype=np.float64), np.zeros(len(t), np.int64), t, code, value)
        return s[0], float(r[0])

    def update_many(self, stats: np.ndarray, ref: np.ndarray, user: np.ndarray, t: np.ndarray, code: np.ndarray,
                    value: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Statistics (U, width) of U users as of ``ref`` (U,) plus events of those users (``user``
        (n,) in 0..U-1, times, :meth:`type_codes`, values) -> (new statistics, new reference times:
        the later of each user's ``ref`` and their last event). Users without events move forward
        too when another's do not (their reference time stays)."""
        s = np.array(stats, dtype=np.float64, copy=True)
        n_users = len(s)
        t = np.asarray(t, dtype=np.float64)
        value = np.asarray(value, dtype=np.float64)
        last_t = np.full(n_users, -np.inf)
        np.maximum.at(last_t, user, t)
        new_ref = np.maximum(ref, last_t)
        with np.errstate(invalid="ignore", over="ignore"):
            gap = (new_ref - ref) / SECONDS_PER_DAY
            shift = np.where(np.isfinite(ref)[:, None], 0.5 ** (np.nan_to_num(gap, posinf=0.0)[:, None] / self.h[None, :]), 0.0)
        weights = 0.5 ** (((new_ref[user] - t) / SECONDS_PER_DAY)[:, None] / self.h[None, :])  # (n, H)
        s[:, self.N] += np.bincount(user, minlength=n_users)
        day = np.floor(t / SECONDS_PER_DAY)
        if len(t):
            pair_user, pair_day = distinct_pairs(user, day)
            fresh = pair_day > s[pair_user, self.LAST_DAY]  # days after the last active day are new
            s[:, self.DAYS] += np.bincount(pair_user[fresh], minlength=n_users)
        np.maximum.at(s[:, self.LAST_DAY], user, day)
        np.minimum.at(s[:, self.FIRST], user, t)
        np.maximum.at(s[:, self.LAST], user, t)
        s[:, self.VALUE_SUM] += np.bincount(user, weights=value, minlength=n_users)
        d = slice(self.decay0, self.decay0 + len(self.h))
        s[:, d] *= shift
        for j in range(len(self.h)):
            s[:, self.decay0 + j] += np.bincount(user, weights=weights[:, j], minlength=n_users)
        for k in range(self.n_types):
            base = self.type0 + k * self.per_type
            m = code == k
            s[:, base + 3 : base + 3 + len(self.h)] *= shift
            if not m.any():
                continue
            s[:, base] += np.bincount(user[m], minlength=n_users)
            np.maximum.at(s[:, base + 1], user[m], t[m])
            s[:, base + 2] += np.bincount(user[m], weights=value[m], minlength=n_users)
            for j in range(len(self.h)):
                s[:, base + 3 + j] += np.bincount(user[m], weights=weights[m, j], minlength=n_users)
        return s, new_ref

    def features(self, stats: np.ndarray, ref: np.ndarray, as_of: np.ndarray, distinct_items: np.ndarray) -> np.ndarray:
        """:func:`~dmp_dl.propensity.features.behaviour_features` of users (U,) from their statistics
        (U, width) kept as of ``ref`` (U,), at moments ``as_of`` (U,) >= ``ref``; ``distinct_items``
        (U,) the number of distinct items each user had. Returns (U, F) float32."""
        stats = np.atleast_2d(stats)
        as_of = np.asarray(as_of, dtype=np.float64)
        gap = np.maximum(as_of - np.asarray(ref, dtype=np.float64), 0.0) / SECONDS_PER_DAY
        shift = np.where(np.isfinite(gap)[:, None], 0.5 ** (np.nan_to_num(gap, posinf=0.0)[:, None] / self.h[None, :]), 0.0)
        n = stats[:, self.N]
        has = n > 0
        first = np.where(has, stats[:, self.FIRST], as_of)
        last = np.where(has, stats[:, self.LAST], as_of)
        d = slice(self.decay0, self.decay0 + len(self.h))
        per_type = []
        for k in range(self.n_types):
            base = self.type0 + k * self.per_type
            n_k = stats[:, base]
            per_type.append((n_k, np.where(n_k > 0, stats[:, base + 1], first), stats[:, base + 2],
                             list((stats[:, base + 3 : base + 3 + len(self.h)] * shift).T)))
        return behaviour_columns(as_of, n, stats[:, self.DAYS], np.asarray(distinct_items, dtype=np.float64), first, last,
                                 stats[:, self.VALUE_SUM], list((stats[:, d] * shift).T), per_type)
