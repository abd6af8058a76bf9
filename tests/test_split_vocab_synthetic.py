"""Splits never leak the future, vocabularies are stable, the generator is deterministic."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dmp_dl.core.errors import ConfigError, UnknownIdError
from dmp_dl.data.cleaning import CleaningOptions, clean_events
from dmp_dl.data.split import TEST, TRAIN, VAL, SplitOptions, assign_split
from dmp_dl.data.synthetic import SyntheticSource
from dmp_dl.data.vocab import IdVocab


@pytest.fixture(scope="module")
def events():
    log = SyntheticSource(n_users=300, n_items=100, n_events=9000, seed=3).load()
    ev, _ = clean_events(log.events, CleaningOptions())
    vocab = IdVocab.from_values(ev.user_id)
    return vocab.index_of(ev.user_id), ev.timestamp.to_numpy()


def test_global_temporal_holds_out_the_future(events):
    user, ts = events
    lab = assign_split(user, ts, SplitOptions("global_temporal", val_frac=0.1, test_frac=0.2))
    assert ts[lab == TRAIN].max() < ts[lab == VAL].min()
    assert ts[lab == VAL].max() < ts[lab == TEST].min()
    assert abs((lab == TEST).mean() - 0.2) < 0.01 and abs((lab == VAL).mean() - 0.1) < 0.01


def test_leave_last_n_is_per_user_temporal(events):
    user, ts = events
    lab = assign_split(user, ts, SplitOptions("leave_last_n", n=2))
    df = pd.DataFrame({"u": user, "t": ts, "s": lab})
    for _, g in df.groupby("u"):
        if (g.s == TEST).any():
            assert g[g.s == TEST].t.min() >= g[g.s != TEST].t.max()
            assert (g.s == TEST).sum() == 2
        if (g.s == VAL).any():
            assert g[g.s == VAL].t.min() >= g[g.s == TRAIN].t.max()
        assert (g.s == TRAIN).sum() >= 1  # every user keeps a training event


def test_random_per_user_is_seeded_and_keeps_train(events):
    user, ts = events
    opts = SplitOptions("random_per_user", val_frac=0.1, test_frac=0.25, seed=7)
    a, b = assign_split(user, ts, opts), assign_split(user, ts, opts)
    c = assign_split(user, ts, SplitOptions("random_per_user", val_frac=0.1, test_frac=0.25, seed=8))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    per_user_train = np.bincount(user[a == TRAIN], minlength=user.max() + 1)
    assert (per_user_train[np.unique(user)] >= 1).all()
    assert 0.2 < (a == TEST).mean() < 0.25


def test_split_options_are_validated():
    with pytest.raises(ConfigError, match="data.split.method"):
        SplitOptions("by_magic")
    with pytest.raises(ConfigError, match="val_frac"):
        SplitOptions(val_frac=0.6, test_frac=0.5)


def test_vocab_is_stable_across_row_order(tmp_path):
    ids = ["b", "10", "a", "2", "b"]
    v1 = IdVocab.from_values(ids, "user")
    v2 = IdVocab.from_values(list(reversed(ids)), "user")
    assert v1 == v2 and len(v1) == 4
    assert v1.index_of(["a", 10, "zz"]).tolist() == [v1.get("a"), v1.get("10"), -1]
    v1.save(tmp_path / "v.json")
    assert IdVocab.load(tmp_path / "v.json") == v1
    with pytest.raises(UnknownIdError, match="unknown user id: 'zz'"):
        v1.get("zz")
    with pytest.raises(KeyError):  # UnknownIdError is a KeyError
        v1.require(["a", "zz"])


def test_synthetic_is_deterministic_and_sized():
    a = SyntheticSource(n_users=200, n_items=80, n_events=5000, seed=1).load()
    b = SyntheticSource(n_users=200, n_items=80, n_events=5000, seed=1).load()
    c = SyntheticSource(n_users=200, n_items=80, n_events=5000, seed=2).load()
    pd.testing.assert_frame_equal(a.events, b.events)
    pd.testing.assert_frame_equal(a.users, b.users)
    pd.testing.assert_frame_equal(a.items, b.items)
    assert not a.events.equals(c.events)
    assert len(a.events) == 5000 and a.events.user_id.nunique() == 200
    assert set(a.events.event_type) == {"view", "click", "add_to_cart", "purchase"}


def test_synthetic_plants_segment_structure():
    log = SyntheticSource(n_users=1500, n_items=300, n_events=60000, seed=0).load()
    ev = log.events
    seg = log.meta["user_segment"]
    # purchase rate depends on the latent segment (what propensity models must find) ...
    rate = ev.assign(buy=ev.event_type == "purchase", s=seg.loc[ev.user_id].to_numpy()).groupby("s").buy.mean()
    assert rate.max() > 3 * rate.min()
    # ... and so do category preferences (what embeddings and segmentation must find)
    cat = log.meta["item_category"].loc[ev.item_id].to_numpy()
    share = pd.crosstab(seg.loc[ev.user_id].to_numpy(), cat, normalize="index")
    assert (share.max(axis=1) > 2.0 / share.shape[1]).all()


def test_synthetic_million_events_in_seconds():
    import time

    t0 = time.perf_counter()
    log = SyntheticSource(n_users=30000, n_items=10000, n_events=1_000_000).load()
    assert len(log.events) == 1_000_000
    assert time.perf_counter() - t0 < 30  # generous bound: ~1.5 s on 2 cores
