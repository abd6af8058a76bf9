"""Time-decayed interest profiles: what each user cares about, as of the end of the data.

A user's interest in item category ``c`` is

    I(c, u) = Σ over u's events e of  w(type_e) · 2^(-age_e / half_life) · share_c(item_e)

where ``age_e`` is the time from the event to the last event of the log, ``w`` the weight of the
event type, and ``share_c(item)`` 1/m for each of an item's m categories (``cat_3|cat_7`` gives each
half) and 0 for the others. The affinity to event type ``t`` is Σ 2^(-age_e / half_life) over u's
events of type ``t`` (recency-weighted counts). Both are sparse matrix products over all events at
once: (users × items decayed weights) @ (items × categories shares).

The half-life is a number of days, or ``auto``: the larger of 30 days and the median time from a
user's latest event to the end of the log (:func:`auto_half_life_days`). A fixed 30 days on a log
spanning years leaves most users' weights at 1e-40 or exactly 0 (their latest event is hundreds of
half-lives old), so their profiles say nothing; with ``auto`` the typical user's latest event keeps at
least half its weight however long the log. Either way a warning names the share of users whose latest
event is more than :data:`NEAR_ZERO_HALF_LIVES` half-lives old when they are most users.

A bundle stores each user's top-N categories with their I(c, u), the total Σ_c I(c, u) (so shares
can be given) and the event-type affinities (see :mod:`dmp_dl.audience.bundle`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp

from dmp_dl.core.errors import ConfigError
from dmp_dl.core.row_blocks import BLOCK_ENTRIES, blocks_of_rows
from dmp_dl.data.schema import ITEM, MULTI_VALUE_SEP, TIME, TYPE, WEIGHT

log = logging.getLogger(__name__)

# Item-table columns read as the category when profiles.category_column is null, first found wins.
CATEGORY_COLUMNS = ("category", "categories", "genre", "genres")
SECONDS_PER_DAY = 86400.0
BLOCK_EVENTS = BLOCK_ENTRIES  # the events of a block of users whose profiles are computed together
AUTO = "auto"
# auto never picks a half-life shorter than this (a log where everyone was active on its last day)
MIN_AUTO_HALF_LIFE_DAYS = 30.0
# a user whose latest event is older than this many half-lives has all weights below 2^-10 ~ 0.001
NEAR_ZERO_HALF_LIVES = 10.0


@dataclass
class ProfileOptions:
    """``audience.profiles`` in the train config.

    half_life_days: an event's weight halves every ``half_life_days`` before the end of the data;
        ``auto`` derives it from the log (:func:`auto_half_life_days`).
    top_n: categories kept per user in the bundle.
    category_column: the item-table column holding categories (multi-valued with ``|``); null picks
        the first of :data:`CATEGORY_COLUMNS` the item table has.
    event_weights: event type -> w(type); null uses the events' loss weights
        (``data.cleaning.event_weights``, 1 for every type when that is null).
    """

    half_life_days: float | str = AUTO
    top_n: int = 10
    category_column: str | None = None
    event_weights: dict[str, float] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.half_life_days, str) and self.half_life_days.strip().lower() == AUTO:
            self.half_life_days = AUTO
        else:
            try:
                days = float(self.half_life_days)
            except (TypeError, ValueError):
                days = float("nan")
            if not np.isfinite(days) or days <= 0:
                raise ConfigError(f"audience.profiles.half_life_days must be > 0 or auto, got {self.half_life_days!r}")
            self.half_life_days = days
        if int(self.top_n) < 1:
            raise ConfigError(f"audience.profiles.top_n must be >= 1, got {self.top_n}")
        self.top_n = int(self.top_n)
        if self.event_weights is not None:
            weights = {str(k).strip().lower(): float(v) for k, v in dict(self.event_weights).items()}
            bad = {k: v for k, v in weights.items() if not np.isfinite(v) or v < 0}
            if bad:
                raise ConfigError(f"audience.profiles.event_weights must be finite and >= 0, got {bad}")
            self.event_weights = weights


@dataclass
class Profiles:
    """Interest profiles of the users of a vocabulary.

    categories: (C,) category names; event_types: (T,) event type names.
    top_categories: (n_users, N) int32 category indices, highest interest first, -1 as padding.
    top_weights: (n_users, N) float32 I(c, u) of those categories, 0 as padding.
    interest_total: (n_users,) float32 Σ_c I(c, u) over all categories (not only the top N).
    event_type_affinity: (n_users, T) float32 recency-weighted event counts per type.
    as_of: epoch seconds the ages are measured from (the last event); half_life_days as used (a number
    also when derived by ``auto``: real-time updates decay with it); half_life_rule: ``auto`` or ``fixed``.
    category_column: the item column the categories came from (None: the items had none).
    """

    categories: list[str]
    event_types: list[str]
    top_categories: np.ndarray
    top_weights: np.ndarray
    interest_total: np.ndarray
    event_type_affinity: np.ndarray
    as_of: int
    half_life_days: float
    category_column: str | None = None
    event_weights: dict[str, float] | None = field(default=None)
    half_life_rule: str = "fixed"

    @property
    def n_users(self) -> int:
        return len(self.interest_total)

    def top_shares(self) -> np.ndarray:
        """(n_users, N) float32: ``top_weights`` as shares of each user's total interest (0 where none)."""
        total = self.interest_total[:, None]
        return np.divide(self.top_weights, total, out=np.zeros_like(self.top_weights), where=total > 0)

    def share_matrix(self) -> sp.csr_matrix:
        """(n_users, C) CSR of the top-N shares (the stored part of each user's profile)."""
        keep = self.top_categories >= 0
        rows = np.broadcast_to(np.arange(self.n_users)[:, None], keep.shape)[keep]
        return sp.csr_matrix((self.top_shares()[keep], (rows, self.top_categories[keep])),
                             shape=(self.n_users, len(self.categories)))

    def meta(self) -> dict:
        """JSON-safe description (everything but the arrays)."""
        return {
            "categories": list(self.categories),
            "event_types": list(self.event_types),
            "as_of": int(self.as_of),
            "half_life_days": float(self.half_life_days),
            "half_life_rule": self.half_life_rule,
            "top_n": int(self.top_categories.shape[1]),
            "category_column": self.category_column,
            "event_weights": self.event_weights,
        }


def pick_category_column(items: pd.DataFrame | None, column: str | None) -> str | None:
    """The category column of ``items``: ``column`` when given (it must exist), else the first of
    :data:`CATEGORY_COLUMNS` present; None when the table has none (profiles then hold event types only)."""
    present = [] if items is None else [c for c in items.columns if c != ITEM]
    if column is not None:
        if column not in present:
            raise ConfigError(f"audience.profiles.category_column={column!r} is not a column of the item table "
                              f"(it has: {', '.join(present) or 'no item table'}); set it to one of those or null")
        return column
    found = next((c for c in CATEGORY_COLUMNS if c in present), None)
    if found is None:
        log.warning("interest profiles: the item table has no category column (looked for %s; set "
                    "audience.profiles.category_column), so profiles hold event-type affinities only",
                    ", ".join(CATEGORY_COLUMNS))
    return found


def item_category_shares(items: pd.DataFrame, column: str, item_rows: np.ndarray, n_items: int) -> tuple[sp.csr_matrix, list[str]]:
    """(n_items, C) CSR: 1/m in each of an item's m categories (a row of zeros for an item without).

    items: the item table; item_rows: (len(items),) vocabulary row of each table row (-1: unknown item).
    Returns the matrix and the sorted category names.
    """
    values = items[column].astype(object).where(items[column].notna(), None)
    parts = values.map(lambda v: [] if v is None else sorted({p.strip() for p in str(v).split(MULTI_VALUE_SEP) if p.strip()}))
    exploded = pd.Series(parts.to_numpy(), index=item_rows).explode().dropna()
    exploded = exploded[exploded.index.to_numpy() >= 0]
    categories = sorted(exploded.unique().tolist())
    rows = exploded.index.to_numpy(np.int64)
    cols = pd.Index(categories).get_indexer(exploded.to_numpy())
    per_item = np.bincount(rows, minlength=n_items)
    shares = 1.0 / per_item[rows]
    return sp.csr_matrix((shares, (rows, cols)), shape=(n_items, len(categories))), categories


def top_n_rows(matrix: sp.csr_matrix, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``n`` largest entries of a CSR matrix, vectorised (ties: lower column first).

    Returns (rows, n) int32 column indices padded with -1 and (rows, n) float32 values padded with 0.
    """
    m = sp.csr_matrix(matrix)
    m.eliminate_zeros()
    rows = np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))
    order = np.lexsort((m.indices, -m.data, rows))
    rank = np.arange(len(order)) - m.indptr[rows[order]]
    keep = rank < n
    cols = np.full((m.shape[0], n), -1, dtype=np.int32)
    vals = np.zeros((m.shape[0], n), dtype=np.float32)
    r, k = rows[order][keep], rank[keep]
    cols[r, k] = m.indices[order][keep]
    vals[r, k] = m.data[order][keep]
    return cols, vals


def last_event_ages_days(user: np.ndarray, t: np.ndarray, n_users: int, as_of: int) -> np.ndarray:
    """(users with events,) float64 days from each user's latest event to ``as_of``.

    user: (n,) user rows; t: (n,) epoch seconds of the events.
    """
    last = np.full(n_users, np.iinfo(np.int64).min, dtype=np.int64)
    np.maximum.at(last, user, t)
    active = last > np.iinfo(np.int64).min
    return (as_of - last[active]).astype(np.float64) / SECONDS_PER_DAY


def auto_half_life_days(ages_days: np.ndarray) -> float:
    """The ``auto`` half-life: max(:data:`MIN_AUTO_HALF_LIFE_DAYS`, median of ``ages_days``).

    ages_days: (users,) days from each user's latest event to the end of the log. With the median as
    half-life, half the users keep at least half the weight of a fresh event on their latest one, and a
    user twice as stale a quarter, on a log of a week as on one of twenty years.
    """
    median = float(np.median(ages_days)) if len(ages_days) else 0.0
    return max(MIN_AUTO_HALF_LIFE_DAYS, median)


def warn_if_near_zero(ages_days: np.ndarray, half_life_days: float, rule: str) -> float:
    """Log one warning when most users' latest event is over :data:`NEAR_ZERO_HALF_LIVES` half-lives
    old (all their weights below ~0.001 of a fresh event's, or 0 in float32). Returns that share."""
    if not len(ages_days):
        return 0.0
    stale = float(np.mean(ages_days > NEAR_ZERO_HALF_LIVES * half_life_days))
    if stale > 0.5:
        hint = (f"set audience.profiles.half_life_days=auto (here: {auto_half_life_days(ages_days):.0f} days) or a "
                "longer half-life" if rule != AUTO else "set a longer audience.profiles.half_life_days")
        log.warning("interest profiles: %.0f%% of users' latest event is more than %g half-lives (%.0f days) before the "
                    "end of the log, so their interest weights are near zero (below 0.001 of a fresh event's) and "
                    "segments and rules over them compare eras, not tastes; %s", 100 * stale, NEAR_ZERO_HALF_LIVES,
                    NEAR_ZERO_HALF_LIVES * half_life_days, hint)
    return stale


def sorted_type_codes(types: pd.Series) -> tuple[np.ndarray, list[str]]:
    """(n,) int64 code of each event's type (as text) in the sorted list of the types present, and
    that list: ``pd.factorize(types.astype(str), sort=True)``, but a categorical column (the clean
    log's) is coded through its categories instead of as one Python string an event."""
    if not isinstance(types.dtype, pd.CategoricalDtype):
        codes, uniques = pd.factorize(types.astype(str), sort=True)  # np.unique of strings: 20x slower
        return codes.astype(np.int64), [str(e) for e in uniques]
    codes = types.cat.codes.to_numpy().astype(np.int64)
    labels = np.array([*(str(c) for c in types.cat.categories), str(np.nan)], dtype=object)  # code -1: "nan"
    codes[codes < 0] = len(labels) - 1
    present = np.flatnonzero(np.bincount(codes, minlength=len(labels)))
    names = sorted(set(labels[present].tolist()))
    position = pd.Index(names).get_indexer(labels).astype(np.int64)  # categories absent from the events: unused
    return position[codes], names


def compute_profiles(events: pd.DataFrame, items: pd.DataFrame | None, item_vocab, n_users: int,
                     options: ProfileOptions | None = None) -> Profiles:
    """Interest profiles of ``n_users`` users from clean ``events``.

    events: clean events with ``user_idx``, ``item_idx``, ``timestamp``, ``event_type`` and
        ``weight`` (as held by the DataModule); items: the cleaned item table (or None);
        item_vocab: the item :class:`IdVocab` (rows of ``item_idx``).
    """
    opts = options or ProfileOptions()
    user, item = events["user_idx"].to_numpy(), events["item_idx"].to_numpy()
    t = events[TIME].to_numpy(np.int64)
    as_of = int(t.max()) if len(t) else 0
    ages = last_event_ages_days(user, t, n_users, as_of)
    rule = AUTO if opts.half_life_days == AUTO else "fixed"
    half_life_days = auto_half_life_days(ages) if rule == AUTO else float(opts.half_life_days)
    if rule == AUTO:
        log.info("interest profiles: half-life %.1f days (auto: the larger of %g days and the median age of users' "
                 "latest event)", half_life_days, MIN_AUTO_HALF_LIFE_DAYS)
    warn_if_near_zero(ages, half_life_days, rule)

    type_code, event_types = sorted_type_codes(events[TYPE])
    if opts.event_weights is None:
        weight = events[WEIGHT].to_numpy()
    else:
        missing = [e for e in event_types if e not in opts.event_weights]
        if missing:
            raise ConfigError(f"audience.profiles.event_weights has no weight for event type(s) {missing}; "
                              f"add them (0 ignores a type) or set it to null to use data.cleaning.event_weights")
        weight = None
        type_weight = np.array([opts.event_weights[e] for e in event_types], dtype=np.float64)

    n_items = len(item_vocab)
    column = pick_category_column(items, opts.category_column)
    if column is None:
        shares, categories = sp.csr_matrix((n_items, 0)), []
    else:
        shares, categories = item_category_shares(items, column, item_vocab.index_of(items[ITEM].tolist()), n_items)
        uncategorised = np.asarray(shares.sum(axis=1)).ravel() == 0
        if uncategorised.any():
            log.info("interest profiles: %d of %d items have no %r value; their events count towards event-type "
                     "affinities only", int(uncategorised.sum()), n_items, column)
    top = min(opts.top_n, max(len(categories), 1))
    affinity = np.zeros((n_users, len(event_types)), dtype=np.float32)
    top_categories = np.full((n_users, top), -1, dtype=np.int32)
    top_weights = np.zeros((n_users, top), dtype=np.float32)
    interest_total = np.zeros(n_users, dtype=np.float32)
    # every profile is the user's own: a block of users at a time keeps the temporaries (decays,
    # sparse matrices built from the events) the size of a block, not of the log
    for lo, hi, at in blocks_of_rows(user, n_users, BLOCK_EVENTS):
        rows, code = user[at].astype(np.int64) - lo, type_code[at]
        decay = np.exp2(-(as_of - t[at]) / (half_life_days * SECONDS_PER_DAY))
        affinity[lo:hi] = sp.csr_matrix((decay, (rows, code)), shape=(hi - lo, len(event_types))).toarray()
        w = weight[at].astype(np.float64) if weight is not None else type_weight[code]
        user_item = sp.csr_matrix((w * decay, (rows, item[at])), shape=(hi - lo, n_items))  # duplicates summed
        interest = (user_item @ shares).tocsr()
        top_categories[lo:hi], top_weights[lo:hi] = top_n_rows(interest, top)
        interest_total[lo:hi] = np.asarray(interest.sum(axis=1), dtype=np.float32).ravel()
    return Profiles(
        categories=categories,
        event_types=[str(e) for e in event_types],
        top_categories=top_categories,
        top_weights=top_weights,
        interest_total=interest_total,
        event_type_affinity=affinity,
        as_of=as_of,
        half_life_days=float(half_life_days),
        category_column=column,
        event_weights=opts.event_weights,
        half_life_rule=rule,
    )
