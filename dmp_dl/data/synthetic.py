"""A seeded synthetic DMP event log with planted structure.

What is planted (and what later stages are expected to recover):

* ``n_segments`` latent user segments. Each segment prefers a few of ``n_categories`` item
  categories; each user's preferences scatter around their segment's. Demographics (age, gender,
  region) are skewed by segment. -> embeddings beat popularity; k-means recovers the segments.
* Sessions: consecutive events of a user stay in the same category with probability
  ``session_stickiness``. -> recent history predicts the next item.
* Purchase propensity: a segment multiplier times a persistent per-user factor decides how often
  an event is an add-to-cart or a purchase; some users churn (stop being active). -> past
  purchases, recency and segment predict future purchases.

* With ``campaign_response=true``, how each user responds to a marketing contact (the log itself is
  unchanged: the responses are drawn from a separate random stream). *Sure things* (the most
  active buyers) convert whether contacted or not; *persuadables* (active users of a few planted
  segments) convert far more often when contacted; *lost causes* (everyone else) rarely convert
  either way. -> propensity finds the sure things, only an uplift model finds the persuadables.
  :func:`campaign_outcomes` draws a campaign's outcome log from them.

The truth is kept in ``EventLog.meta`` (``user_segment``, ``user_buy_rate``, ``item_category``;
with ``campaign_response`` also ``user_response``, ``p_control``, ``p_treated``) and never in the
tables, so no model can read it as a feature.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from dmp_dl.core.errors import ConfigError
from dmp_dl.data.distinct import Coded
from dmp_dl.data.schema import ITEM, TIME, TYPE, USER, VALUE, EventLog

EVENT_TYPES = ("view", "click", "add_to_cart", "purchase")
REGIONS = ("north", "south", "east", "west", "central")
# Campaign response types and their conversion probabilities in a campaign's window:
# (without contact, with contact).
RESPONSES = {"sure_thing": (0.40, 0.40), "persuadable": (0.03, 0.25), "lost_cause": (0.01, 0.01)}
SURE_THING_SHARE = 0.2     # the most active buyers (by planted buy rate) among active users
PERSUADABLE_SEGMENTS = 2   # planted segments whose active users are persuadable


@dataclass
class SyntheticSource:
    """Generator settings (``data=synthetic``); ``load()`` returns a raw :class:`EventLog`."""

    n_users: int = 3000
    n_items: int = 1000
    n_events: int = 100_000
    n_segments: int = 6
    n_categories: int = 12
    days: int = 180
    end: str = "2026-01-01"
    session_stickiness: float = 0.6
    churn_rate: float = 0.35
    seed: int = 0
    campaign_response: bool = False

    def __post_init__(self) -> None:
        for name in ("n_users", "n_items", "n_segments", "n_categories", "days"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"data.source.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_events < 3 * self.n_users:
            raise ConfigError(
                f"data.source.n_events must be >= 3 * n_users (= {3 * self.n_users}), got {self.n_events}"
            )
        if self.n_items < self.n_categories:
            raise ConfigError("data.source.n_items must be >= n_categories")

    def load(self) -> EventLog:
        rng = np.random.default_rng(self.seed)
        S, C, U, I = self.n_segments, self.n_categories, self.n_users, self.n_items

        # Users: segment, category preferences, demographics, activity and purchase propensity.
        user_seg = rng.choice(S, size=U, p=rng.dirichlet(np.full(S, 8.0)))
        seg_pref = rng.dirichlet(np.full(C, 0.3), size=S)
        user_pref = rng.gamma(20.0 * seg_pref[user_seg] + 0.05)
        user_pref /= user_pref.sum(axis=1, keepdims=True)
        seg_age = rng.uniform(22, 62, size=S)
        age = np.clip(np.round(rng.normal(seg_age[user_seg], 6.0)), 18, 85)
        gender = np.where(rng.random(U) < rng.uniform(0.15, 0.85, size=S)[user_seg], "F", "M")
        region_cum = np.cumsum(rng.dirichlet(np.full(len(REGIONS), 0.7), size=S), axis=1)
        region_idx = (rng.random(U)[:, None] > region_cum[user_seg]).sum(axis=1).clip(max=len(REGIONS) - 1)
        region = np.asarray(REGIONS, dtype=object)[region_idx]
        seg_buy = rng.permutation(np.geomspace(0.25, 4.0, S))
        user_buy = seg_buy[user_seg] * rng.lognormal(0.0, 0.5, size=U)

        # Items: primary category (every category non-empty), optional second one, popularity, price.
        item_cat = rng.permutation(np.arange(I) % C)
        second = rng.integers(C, size=I)
        has_second = (rng.random(I) < 0.3) & (second != item_cat)
        popularity = rng.lognormal(0.0, 1.0, size=I)
        price = np.round(rng.lognormal(rng.uniform(2.0, 4.5, size=C)[item_cat], 0.4), 2)
        brand = np.char.add(np.char.add("brand_", item_cat.astype(str)), np.char.add("_", rng.integers(4, size=I).astype(str)))

        # Events per user: at least 3, the rest proportional to a lognormal activity.
        activity = rng.lognormal(0.0, 0.8, size=U)
        counts = 3 + rng.multinomial(self.n_events - 3 * U, activity / activity.sum())
        ev_user = np.repeat(np.arange(U), counts)
        n = len(ev_user)

        # Times: each user is active in [start, stop]; churned users stop early.
        t_end = pd.Timestamp(self.end, tz="UTC").timestamp()
        span = self.days * 86400.0
        start = t_end - span + rng.uniform(0.0, 0.7, size=U) * span
        churned = rng.random(U) < self.churn_rate
        stop = np.where(churned, start + rng.uniform(0.05, 1.0, size=U) * (t_end - start), t_end)
        # by user, then time: start + draw * span grows with the draw, so sorting each user's draws sorts its times
        draws = _sorted_per_group(ev_user, rng.random(n))
        ts = start[ev_user] + draws * (stop - start)[ev_user]
        first = np.r_[True, ev_user[1:] != ev_user[:-1]]

        # Categories: fresh draws from the user's preferences, otherwise stick to the session's.
        cum_pref = np.cumsum(user_pref, axis=1)
        draw = rng.random(n)
        drawn = np.zeros(n, dtype=np.int64)
        for c in range(C):  # how many of the user's cumulative preferences the draw exceeds, without an (n, C) array
            drawn += draw > cum_pref[:, c][ev_user]
        drawn = drawn.clip(max=C - 1)
        fresh = first | (rng.random(n) >= self.session_stickiness)
        source = np.maximum.accumulate(np.where(fresh, np.arange(n), 0))
        ev_cat = drawn[source]

        # Items within the category by popularity: one searchsorted over per-category CDFs laid end
        # to end (category c occupies [c, c + 1)).
        by_cat = np.lexsort((np.arange(I), item_cat))
        w = popularity[by_cat]
        cat_sorted = item_cat[by_cat]
        totals = np.bincount(cat_sorted, weights=w, minlength=C)
        within = np.cumsum(w) - np.r_[0.0, np.cumsum(totals)[:-1]][cat_sorted]
        keys = cat_sorted + within / totals[cat_sorted]
        pos = np.searchsorted(keys, ev_cat + rng.random(n) * (1 - 1e-12), side="right")
        ev_item = by_cat[np.minimum(pos, I - 1)]

        # Event types: the purchase funnel scales with the user's propensity.
        buy = user_buy[ev_user]
        p_purchase = np.clip(0.03 * buy, 0.0, 0.4)
        p_cart = np.clip(0.06 * np.sqrt(buy), 0.0, 0.3)
        u = rng.random(n)
        type_idx = np.select([u < p_purchase, u < p_purchase + p_cart, u < p_purchase + p_cart + 0.25], [3, 2, 1], 0)
        value = np.where(type_idx == 3, price[ev_item], 0.0)

        uid = np.char.add("u", np.char.zfill(np.arange(U).astype(str), 6)).astype(object)
        iid = np.char.add("i", np.char.zfill(np.arange(I).astype(str), 5)).astype(object)
        events = pd.DataFrame(
            {
                USER: Coded(ev_user, uid).text_column(),
                ITEM: Coded(ev_item, iid).text_column(),
                TIME: np.floor(ts).astype(np.int64),
                TYPE: Coded(type_idx, np.asarray(EVENT_TYPES, dtype=object)).text_column(),
                VALUE: value,
            }
        )
        age_col = age.astype(np.float64)
        age_col[rng.random(U) < 0.02] = np.nan  # CRM tables have gaps
        region = region.copy()
        region[rng.random(U) < 0.02] = None
        users = pd.DataFrame({USER: uid, "age": age_col, "gender": gender.astype(object), "region": region})
        cats = np.char.add("cat_", item_cat.astype(str)).astype(object)
        cats[has_second] = cats[has_second] + "|cat_" + second[has_second].astype(str)
        items = pd.DataFrame({ITEM: iid, "category": cats, "brand": brand.astype(object), "price": price})
        meta = {
            "user_segment": pd.Series(user_seg, index=uid, name="segment"),
            "user_buy_rate": pd.Series(user_buy, index=uid, name="buy_rate"),
            "item_category": pd.Series(item_cat, index=iid, name="category"),
        }
        if self.campaign_response:
            meta.update(self._responses(uid, user_seg, user_buy, churned))
        return EventLog(events, users, items, source=f"synthetic(seed={self.seed})", meta=meta)

    def _responses(self, uid, user_seg, user_buy, churned) -> dict[str, pd.Series]:
        """Planted campaign responses (see the module docstring), from their own random stream."""
        rng = np.random.default_rng([self.seed, 1])
        active = ~churned
        cut = np.quantile(user_buy[active], 1 - SURE_THING_SHARE) if active.any() else np.inf
        persuadable_segs = rng.choice(self.n_segments, size=min(PERSUADABLE_SEGMENTS, self.n_segments), replace=False)
        kind = np.full(len(uid), "lost_cause", dtype=object)
        kind[active & np.isin(user_seg, persuadable_segs)] = "persuadable"
        kind[active & (user_buy >= cut)] = "sure_thing"
        base = np.array([RESPONSES[k] for k in kind])
        # each user's rates scatter around their type's (the ratio of the two stays the type's)
        scale = rng.lognormal(0.0, 0.25, size=len(uid))
        p = np.clip(base * scale[:, None], 0.0, 0.95)
        return {"user_response": pd.Series(kind, index=uid, name="response"),
                "p_control": pd.Series(p[:, 0], index=uid, name="p_control"),
                "p_treated": pd.Series(p[:, 1], index=uid, name="p_treated")}


def _sorted_per_group(group: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """``draws`` sorted within each run of ``group`` (sorted non-negative ints, (n,)); draws are
    ``Generator.random`` output, multiples of 2**-53 in [0, 1).

    Sorts (group, draw) as one int64 (53 bits of draw, 10 of group) over blocks of 1023 groups:
    cache-sized sorts instead of one argsort of the whole log. Returns (n,) float64."""
    steps = draws * 2.0**53
    whole = steps.astype(np.int64)
    if not np.array_equal(whole, steps):  # not Generator.random output: sort the plain way
        return draws[np.lexsort((draws, group))]
    out = np.empty_like(draws)
    block = 1023
    bounds = np.searchsorted(group, np.arange(0, int(group.max(initial=0)) + block + 1, block))
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if hi > lo:
            key = ((group[lo:hi] - group[lo]) << 53) | whole[lo:hi]
            key.sort()
            out[lo:hi] = (key & ((1 << 53) - 1)) / 2.0**53
    return out


def campaign_outcomes(log: EventLog, treated_ids, start: float | None = None, days: float = 14.0, seed: int = 0,
                      views_per_user: float = 2.0) -> pd.DataFrame:
    """A campaign's outcome log drawn from the planted responses of ``log`` (generated with
    ``campaign_response=true``): every user of the log converts in ``[start, start + days]`` with
    their ``p_treated`` when in ``treated_ids`` and their ``p_control`` otherwise (a purchase with a
    price as ``value``), and browses meanwhile (``views_per_user`` views on average).

    start: epoch seconds, default one day after the log's last event. Returns the events
    (``user_id``, ``item_id``, ``timestamp``, ``event_type``, ``value``), sorted by time.
    """
    if "p_treated" not in log.meta:
        raise ConfigError("campaign_outcomes needs a log generated with campaign_response=true")
    rng = np.random.default_rng([seed, 2])
    users = log.meta["p_treated"].index.to_numpy()
    treated = np.isin(users, np.asarray(list(treated_ids), dtype=object))
    p = np.where(treated, log.meta["p_treated"].to_numpy(), log.meta["p_control"].to_numpy())
    t0 = float(log.events[TIME].max()) + 86400.0 if start is None else float(start)
    span = float(days) * 86400.0
    buyers = users[rng.random(len(users)) < p]
    n_views = rng.poisson(views_per_user, size=len(users))
    viewers = np.repeat(users, n_views)
    items = log.items[ITEM].to_numpy() if log.items is not None else np.array(["i0"], dtype=object)
    prices = log.items["price"].to_numpy(np.float64) if log.items is not None and "price" in log.items else np.ones(len(items))
    bought = rng.integers(len(items), size=len(buyers))
    events = pd.DataFrame({
        USER: np.r_[buyers, viewers],
        ITEM: np.r_[items[bought], items[rng.integers(len(items), size=len(viewers))]],
        TIME: np.floor(t0 + rng.random(len(buyers) + len(viewers)) * span).astype(np.int64),
        TYPE: np.r_[np.full(len(buyers), "purchase", dtype=object), np.full(len(viewers), "view", dtype=object)],
        VALUE: np.r_[prices[bought], np.zeros(len(viewers))],
    })
    return events.sort_values(TIME, kind="stable").reset_index(drop=True)
