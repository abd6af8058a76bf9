"""Profiles, segment labels and similar items that mean something on small synthetic data: the
half-life follows the log (a 20-year log keeps its profiles), a warning when most profiles are near
zero, segment labels by lift and unique, similar items from the item-item weights not led by the most
popular item."""

from __future__ import annotations

import logging

import faiss
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from omegaconf import OmegaConf

from dmp_dl.audience.profiles import (
    MIN_AUTO_HALF_LIFE_DAYS,
    SECONDS_PER_DAY,
    ProfileOptions,
    Profiles,
    compute_profiles,
)
from dmp_dl.audience.segments import Segmentation, describe_segments, label_segments, segment_label
from dmp_dl.core.errors import ConfigError
from dmp_dl.core.rules import check_rules
from dmp_dl.data.vocab import IdVocab
from dmp_dl.models.ease import ItemItemScorer, ease_weights
from dmp_dl.models.scoring import ServedScore
from dmp_dl.pipeline.checks import AUDIENCE_RULES
from dmp_dl.serving.recommender import Recommender

YEAR = 365.0 * SECONDS_PER_DAY


def long_log(n_users: int = 200, years: float = 20.0, seed: int = 0):
    """A log over ``years``: each user active for a few weeks at a random point, so ~95 % of users were
    last active more than a year before its end. Items 0..9 are "A", 10..19 "B"; user u likes A when
    u is even. Returns events, items and the item vocabulary."""
    rng = np.random.default_rng(seed)
    end = int(years * YEAR)
    start = rng.uniform(0, end - 30 * SECONDS_PER_DAY, n_users).astype(np.int64)
    start[0] = end - 10 * SECONDS_PER_DAY  # the user whose events end the log
    rows = []
    for u in range(n_users):
        base = 0 if u % 2 == 0 else 10
        for _ in range(8):
            rows.append((u, base + int(rng.integers(0, 10)), int(start[u] + rng.uniform(0, 10) * SECONDS_PER_DAY)))
    events = pd.DataFrame(rows, columns=["user_idx", "item_idx", "timestamp"])
    events["event_type"], events["weight"] = "view", 1.0
    vocab = IdVocab([str(i) for i in range(20)])
    items = pd.DataFrame({"item_id": [str(i) for i in range(20)], "category": ["A"] * 10 + ["B"] * 10})
    return events, items, vocab, n_users


def test_auto_half_life_keeps_profiles_of_a_long_log_meaningful():
    events, items, vocab, n = long_log()
    fixed = compute_profiles(events, items, vocab, n, ProfileOptions(half_life_days=30))
    auto = compute_profiles(events, items, vocab, n, ProfileOptions(half_life_days="auto"))
    # 30 days on 20 years: nearly every profile is (numerically) nothing
    assert np.mean(fixed.interest_total < 1e-3) > 0.9
    last = events.groupby("user_idx")["timestamp"].max()
    median_age_days = float(np.median((events["timestamp"].max() - last) / SECONDS_PER_DAY))
    assert auto.half_life_rule == "auto" and auto.half_life_days == pytest.approx(median_age_days)
    # every user keeps a real weight, the typical one at least half a fresh event's per latest event
    assert (auto.interest_total > 1e-3).all()
    assert np.median(auto.interest_total) > 0.5
    # and taste is read the same for old and recent users: the even users' top category is A
    top = np.array(auto.categories)[auto.top_categories[:, 0]]
    assert (top[::2] == "A").all() and (top[1::2] == "B").all()
    # the stored half-life is the number used (real-time updates decay with it)
    assert auto.meta()["half_life_days"] == pytest.approx(median_age_days) and auto.meta()["half_life_rule"] == "auto"


def test_auto_half_life_has_a_floor_on_a_short_log():
    events, items, vocab, n = long_log(years=0.2)
    events["timestamp"] = events["timestamp"].max()  # everyone active on the last day
    auto = compute_profiles(events, items, vocab, n, ProfileOptions())
    assert auto.half_life_days == MIN_AUTO_HALF_LIFE_DAYS and auto.half_life_rule == "auto"


def test_a_warning_says_when_most_profiles_are_near_zero(caplog):
    events, items, vocab, n = long_log()
    with caplog.at_level(logging.WARNING, logger="dmp_dl.audience.profiles"):
        compute_profiles(events, items, vocab, n, ProfileOptions(half_life_days=30))
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1
    assert "near zero" in warned[0] and "half_life_days=auto" in warned[0] and "% of users" in warned[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dmp_dl.audience.profiles"):
        compute_profiles(events, items, vocab, n, ProfileOptions(half_life_days="auto"))
        short = events.assign(timestamp=events["timestamp"].max())  # a fixed half-life that suits its log
        compute_profiles(short, items, vocab, n, ProfileOptions(half_life_days=30))
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_half_life_setting_is_a_positive_number_or_auto():
    assert ProfileOptions(half_life_days="Auto").half_life_days == "auto"
    assert ProfileOptions(half_life_days=7).half_life_days == 7.0
    for bad in ("soon", 0, -1, float("nan")):
        with pytest.raises(ConfigError, match="half_life_days must be > 0 or auto"):
            ProfileOptions(half_life_days=bad)
    # the train command's settings check (before any data is read)
    check_rules(OmegaConf.create({"audience": {"profiles": {"half_life_days": "auto"}}}), AUDIENCE_RULES)
    with pytest.raises(ConfigError, match="audience.profiles.half_life_days"):
        check_rules(OmegaConf.create({"audience": {"profiles": {"half_life_days": "soon"}}}), AUDIENCE_RULES)


# -- segment labels ------------------------------------------------------------------------------

CATEGORIES = ["Comedy", "Drama", "Horror", "Kids", "SciFi", "Western"]


def planted_segments(n_per: int = 50):
    """Four segments whose largest shares are all Drama and Comedy; segments 0-2 each over-represent
    another niche (Horror, Kids, SciFi), and segment 3 over-represents Horror like segment 0 does,
    plus Western. Returns (Profiles, Segmentation)."""
    niche = [["Horror"], ["Kids"], ["SciFi"], ["Horror", "Western"]]
    rows = []
    for s, extra in enumerate(niche):
        for _ in range(n_per):
            shares = {"Drama": 0.4, "Comedy": 0.35}
            for c in extra:
                shares[c] = 0.25 / len(extra)
            rows.append(shares)
    n = len(rows)
    k = len(niche)
    weights = np.zeros((n, len(CATEGORIES)), np.float32)
    for u, shares in enumerate(rows):
        for c, v in shares.items():
            weights[u, CATEGORIES.index(c)] = v
    order = np.argsort(-weights, axis=1, kind="stable")[:, :4].astype(np.int32)
    top_w = np.take_along_axis(weights, order, axis=1)
    order[top_w == 0] = -1
    profiles = Profiles(categories=CATEGORIES, event_types=["view"], top_categories=order, top_weights=top_w,
                        interest_total=weights.sum(axis=1), event_type_affinity=np.ones((n, 1), np.float32),
                        as_of=0, half_life_days=30.0)
    assignments = np.repeat(np.arange(k), n_per).astype(np.int32)
    seg = Segmentation(assignments, np.eye(k, 3, dtype=np.float32), np.zeros(n, np.float32), {}, 0, True)
    return profiles, seg


def test_segment_labels_name_over_represented_categories_and_never_repeat():
    profiles, seg = planted_segments()
    described = describe_segments(seg, np.array([f"u{i}" for i in range(seg.assignments.size)]), profiles)
    labels = [segment_label(d) for d in described]
    assert len(set(labels)) == len(labels)
    firsts = [d["label_categories"][0] for d in described]
    assert firsts[:3] == ["Horror", "Kids", "SciFi"]
    # the fourth shares Horror with the first: its label differs by what else it over-represents
    assert set(described[3]["label_categories"]) != {"Horror"} and "Western" in described[3]["label_categories"]
    for d in described:
        lifts = {c["category"]: c["lift"] for c in d["top_categories"]}
        assert lifts[d["label_categories"][0]] > 1.2
        # Drama and Comedy are every segment's largest shares, yet none of them is over-represented
        assert d["top_categories"][0]["category"] not in ("Drama", "Comedy")


def test_label_segments_makes_equal_candidates_distinct():
    got = label_segments([["Horror", "Thriller"], ["Thriller", "Horror"], ["Horror", "Thriller"]],
                         [["gender=M"], [], ["gender=M"]], np.array([10, 30, 20]))
    labels = [label for label, _ in got]
    assert len(set(labels)) == 3
    # the largest segment chooses first and keeps its best pair
    assert set(got[1][1]) == {"Thriller", "Horror"}
    assert all(label for label in labels)


# -- similar items ---------------------------------------------------------------------------------


def two_genre_recommender(n_users: int = 400, seed: int = 0) -> tuple[Recommender, int]:
    """Items 0..9 genre X, 10..19 genre Y, item 20 seen by 90 % of all users. Users read one genre
    (their items drawn from it) and most read item 20. Bundle vectors are item popularity plus noise
    (a popularity-led embedding). Returns the recommender (EASE item-item weights) and item 20's row."""
    rng = np.random.default_rng(seed)
    rows, cols = [], []
    for u in range(n_users):
        base = 0 if u % 2 == 0 else 10
        for i in rng.choice(10, size=4, replace=False):
            rows.append(u)
            cols.append(base + int(i))
        if rng.random() < 0.9:
            rows.append(u)
            cols.append(20)
    n_items = 21
    x = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n_users, n_items))
    b = sp.csr_matrix(ease_weights(x, l2=10.0).cpu().numpy())
    popularity = np.asarray(x.sum(axis=0), dtype=np.float32).ravel()
    item_vectors = np.stack([popularity / popularity.max(), rng.normal(0, 0.01, n_items)], 1).astype(np.float32)
    user_vectors = np.ones((n_users, 2), np.float32)
    item_index = faiss.IndexFlatIP(2)
    item_index.add(item_vectors)
    user_index = faiss.IndexFlatIP(2)
    user_index.add(user_vectors)
    rec = Recommender(user_vocab=IdVocab([f"u{u}" for u in range(n_users)]), item_vocab=IdVocab([str(i) for i in range(n_items)]),
                      user_vectors=user_vectors, item_vectors=item_vectors, seen=x, item_index=item_index,
                      user_index=user_index, served=ServedScore(0.0, 1.0, ItemItemScorer(b)))
    return rec, 20


def test_similar_items_from_item_item_weights_are_not_led_by_the_most_popular_item():
    rec, popular = two_genre_recommender()
    for query in ("3", "14"):
        similar = rec.similar_items(query, k=5)
        ids = [i for i, _ in similar]
        genre = int(query) // 10
        assert query not in ids and str(popular) not in ids
        assert all(int(i) // 10 == genre for i in ids)
        assert [s for _, s in similar] == sorted((s for _, s in similar), reverse=True)
    # the batch form answers the same
    assert rec.similar_items_batch(["3", "14"], k=5) == [rec.similar_items("3", k=5), rec.similar_items("14", k=5)]
    # each score is the cosine of the query's and the item's rows of the weights
    dense = rec.served.shallow.weights.toarray().astype(np.float64)
    unit = dense / np.maximum(np.linalg.norm(dense, axis=1, keepdims=True), 1e-300)
    for item, score in rec.similar_items("3", k=5):
        assert score == pytest.approx(unit[3] @ unit[int(item)], rel=1e-5, abs=1e-6)
    # the embedding alone (its index) puts the popular item first: what the weights avoid
    rec.served = None
    assert rec.similar_items("3", k=1)[0][0] == str(popular)


def test_similar_items_without_weights_leave_out_the_item_prior():
    """Autoencoder-like vectors, user [z, 1] and item [w, b]: the constant user entry makes b a
    per-item prior; similar items compare w only."""
    w = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], np.float32)
    prior = np.array([0.0, 0.0, 5.0, 5.0], np.float32)  # items 2, 3: the popular ones
    item_vectors = np.hstack([w, prior[:, None]])
    rng = np.random.default_rng(0)
    user_vectors = np.hstack([rng.normal(size=(10, 2)), np.ones((10, 1))]).astype(np.float32)
    item_index = faiss.IndexFlatIP(3)
    item_index.add(item_vectors)
    user_index = faiss.IndexFlatIP(3)
    user_index.add(user_vectors)
    rec = Recommender(user_vocab=IdVocab([f"u{u}" for u in range(10)]), item_vocab=IdVocab(["0", "1", "2", "3"]),
                      user_vectors=user_vectors, item_vectors=item_vectors, seen=sp.csr_matrix((10, 4)),
                      item_index=item_index, user_index=user_index)
    assert rec.similar_items("0", k=1)[0][0] == "1"
    assert rec.similar_items("3", k=1)[0][0] == "2"


def test_profiles_of_users_in_blocks_are_those_of_one_pass(monkeypatch):
    import dmp_dl.audience.profiles as profiles_module

    events, items, vocab, n = long_log(n_users=300, seed=3)
    events["event_type"] = pd.Categorical(np.where(np.arange(len(events)) % 3 == 0, "purchase", "view"))
    events["weight"] = np.where(events["event_type"] == "purchase", 3.0, 1.0).astype(np.float32)
    options = ProfileOptions(half_life_days="auto", top_n=2)
    whole = compute_profiles(events, items, vocab, n, options)
    assert whole.event_types == ["purchase", "view"] and whole.event_type_affinity.shape == (n, 2)
    decay = np.exp2(-(whole.as_of - events["timestamp"]) / (whole.half_life_days * SECONDS_PER_DAY))
    expected = decay.groupby([events["user_idx"], events["event_type"].astype(str)]).sum().unstack(fill_value=0.0)
    np.testing.assert_allclose(whole.event_type_affinity, expected[["purchase", "view"]].to_numpy(), rtol=1e-6)
    monkeypatch.setattr(profiles_module, "BLOCK_EVENTS", 40)  # blocks of about 5 users
    blocks = compute_profiles(events, items, vocab, n, options)
    for name in ("top_categories", "top_weights", "interest_total", "event_type_affinity"):
        np.testing.assert_array_equal(getattr(blocks, name), getattr(whole, name), err_msg=name)
    plain = events.assign(event_type=events["event_type"].astype(str))  # the same types as plain strings
    np.testing.assert_array_equal(compute_profiles(plain, items, vocab, n, options).event_type_affinity,
                                  whole.event_type_affinity)
