"""Recency: how much an event counts in a user's row, by its type and its age.

An event of type weight ``w`` (``data.cleaning.event_weights``) that is ``age_days`` old counts

    w * 0.5 ** (age_days / half_life_days)

with its age measured to the **user's reference time: their latest event**. Measured to the user's
own latest event rather than to the log's last timestamp, a user's row depends on that user's
events alone: the next training run gives a user the row that their events gave them in real time,
whatever other users did meanwhile, and a user's row changes only when they act. A ``half_life_days``
of None means no decay (the type weight alone).

Decayed sums move forward exactly, so a server keeps each user's summed weights per item and their
reference time, and an event updates them in O(items of the user):
``S(T') = 0.5 ** ((T' - T) / h) * S(T) + sum over new events of w * 0.5 ** ((T' - t) / h)`` — the
same :func:`decayed` on both sides (the sums taken as events of time T). A user's row (what the
user-level models read) is ``log2(1 + S)`` per item (:func:`row_strength`).

Both training (:func:`dmp_dl.data.datamodule.weighted_rows`) and the real-time path
(:mod:`dmp_dl.realtime.live`) compute weights with the functions of this module, and nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

from dmp_dl.core.arrays import BLOCK
from dmp_dl.core.errors import ConfigError

SECONDS_PER_DAY = 86400.0
AUTO = "auto"
# data.recency_half_life_days=auto tries these shares of the log's time span, and no decay: from half
# the span down to minutes (on a 180-day log: 90 and 11 days, 34 and 4 hours, 32 and 4 minutes), as
# logs differ in how fast interest moves (a rating session on MovieLens, a browsing week in a shop)
SPAN_SHARES = (1 / 2, 1 / 16, 1 / 128, 1 / 1024, 1 / 8192, 1 / 65536)


def check_half_life(value: object, key: str = "data.recency_half_life_days") -> float | str | None:
    """The setting as ``auto``, None (no decay) or a float > 0; :class:`ConfigError` naming ``key`` otherwise."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("null", "none")):
        return None
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    if isinstance(value, bool):
        raise ConfigError(f"{key} must be auto, null or a number of days > 0, got {value!r}")
    try:
        days = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be auto, null or a number of days > 0, got {value!r}") from None
    if not math.isfinite(days) or days <= 0:
        raise ConfigError(f"{key} must be auto, null or a number of days > 0, got {value!r}")
    return days


def decayed(weight: np.ndarray | float, t: np.ndarray | float, ref: np.ndarray | float,
            half_life_days: float | None) -> np.ndarray:
    """``weight * 0.5 ** ((ref - t) / 86400 / half_life_days)`` elementwise, float64; ``weight``
    unchanged (as float64) when ``half_life_days`` is None. ``t`` and ``ref``: epoch seconds
    (broadcast together); ``ref >= t`` for every event of a user (their latest event)."""
    weight = np.asarray(weight, dtype=np.float64)
    if half_life_days is None:
        return weight.copy() if weight.ndim else weight
    age_days = (np.asarray(ref, dtype=np.float64) - np.asarray(t, dtype=np.float64)) / SECONDS_PER_DAY
    return weight * np.exp2(-age_days / float(half_life_days))


def reference_times(user: np.ndarray, t: np.ndarray, n_users: int) -> np.ndarray:
    """(n_users,) float64: each user's latest event time (``-inf`` for users without events)."""
    ref = np.full(n_users, -np.inf)
    for start in range(0, len(user), BLOCK):  # int64 / float64 copies of a block at a time
        np.maximum.at(ref, np.asarray(user[start:start + BLOCK], dtype=np.int64),
                      np.asarray(t[start:start + BLOCK], dtype=np.float64))
    return ref


def decayed_sums(n_users: int, n_items: int, user: np.ndarray, item: np.ndarray, weight: np.ndarray,
                 t: np.ndarray | None, half_life_days: float | None) -> tuple[sp.csr_matrix, np.ndarray]:
    """Each user's summed event weights per item, decayed to the user's latest event.

    user, item: (n,) rows; weight: (n,) type weights; t: (n,) epoch seconds (None: no times, no decay).
    Returns ((n_users, n_items) float64 CSR with sorted indices, every pair with an event kept even
    when its sum is 0; (n_users,) float64 reference times, ``-inf`` for users without events).
    """
    user = np.asarray(user, dtype=np.int64)
    if t is None or half_life_days is None:
        values = np.asarray(weight, dtype=np.float64)
        ref = reference_times(user, t, n_users) if t is not None else np.full(n_users, -np.inf)
    else:
        ref = reference_times(user, t, n_users)
        values = decayed(weight, t, ref[user], half_life_days)
    sums = sp.csr_matrix((values, (user, np.asarray(item, dtype=np.int64))), shape=(n_users, n_items), dtype=np.float64)
    sums.sum_duplicates()
    return sums, ref


def row_strength(sums: np.ndarray) -> np.ndarray:
    """The value a user-level model reads for an item: ``log2(1 + summed weight)`` (float32): one
    event of weight 1 gives 1; repeated or heavier events count more, with diminishing returns."""
    return np.log2(1.0 + np.maximum(np.asarray(sums, dtype=np.float64), 0.0)).astype(np.float32)


def half_life_grid(span_seconds: float) -> list[float]:
    """The half-lives ``auto`` tries besides no decay: :data:`SPAN_SHARES` of the log's time span, in days."""
    span_days = max(float(span_seconds), 0.0) / SECONDS_PER_DAY
    if span_days <= 0:
        return []
    return [span_days * s for s in SPAN_SHARES]


def describe(half_life_days: float | None) -> str:
    return "no decay" if half_life_days is None else f"half-life {half_life_days:.4g} days"


def candidates(setting: float | str | None, span_seconds: float | None, has_timestamps: bool) -> Sequence[float | None]:
    """The half-lives a run considers: ``[None]`` (no decay) for null or a log without event times,
    ``[days]`` for a number, and None plus :func:`half_life_grid` of the span for ``auto``."""
    if setting is None or not has_timestamps:
        return [None]
    if setting == AUTO:
        return [None, *half_life_grid(span_seconds or 0.0)]
    return [float(setting)]
