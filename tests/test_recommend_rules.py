"""Business rules of a recommendation: categories and items left out, categories and items boosted,
in the Python API and over HTTP, with the default model's exact scorer and a FAISS-served model."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
from fastapi.testclient import TestClient

from dmp_dl import Recommender
from dmp_dl.api.server import create_app
from dmp_dl.serving.item_rules import RuleError
from dmp_dl.store.bundle import MissingPartError

from .conftest import trained_run


@pytest.fixture(scope="module")
def faiss_rec(tmp_path_factory) -> Recommender:
    """A two-tower bundle: scored by its FAISS item index (no item-item term)."""
    rec = Recommender.load(trained_run(tmp_path_factory, "model=two_tower")["bundle_dir"])
    assert rec.served is None
    return rec


@pytest.fixture(params=["default", "faiss"])
def any_rec(request, rec, faiss_rec) -> Recommender:
    """The default model's bundle (exact scores with the item-item term) and a FAISS one."""
    if request.param == "default":
        assert rec.served is not None
        return rec
    return faiss_rec


def categories_of(rec: Recommender, item_id: str) -> set[str]:
    members = rec.item_categories.members
    row = rec.item_vocab.index_of([item_id])[0]
    return {rec.item_categories.names[c] for c in members.indices[members.indptr[row]:members.indptr[row + 1]]}


def test_the_bundle_holds_the_item_tables_categories(any_rec):
    cats = any_rec.item_categories
    assert cats is not None and cats.column == "category"
    assert cats.names == sorted(cats.names) and len(cats.names) == 8  # the synthetic catalogue's categories
    assert cats.members.shape == (any_rec.n_items, len(cats.names))
    assert (np.diff(cats.members.indptr) >= 1).all()  # every synthetic item has a category


def test_excluded_categories_never_appear_and_k_items_still_come_back(any_rec):
    k = 10
    for user in any_rec.user_vocab.ids[:20].tolist():
        plain = any_rec.recommend(user, k)
        top_categories = sorted(categories_of(any_rec, plain[0][0]) | categories_of(any_rec, plain[1][0]))
        got = any_rec.recommend(user, k, exclude_categories=top_categories)
        assert len(got) == k
        assert all(not categories_of(any_rec, i) & set(top_categories) for i, _ in got)
        scores = [s for _, s in got]
        assert scores == sorted(scores, reverse=True)
        # what the rule leaves is the plain ranking without the excluded items
        full = any_rec.recommend(user, any_rec.n_items)
        kept = [i for i, _ in full if not categories_of(any_rec, i) & set(top_categories)]
        assert [i for i, _ in got] == kept[:k]


def test_exclude_and_include_item_lists(any_rec):
    user = any_rec.user_vocab.ids[3]
    plain = [i for i, _ in any_rec.recommend(user, 10)]
    got = [i for i, _ in any_rec.recommend(user, 10, exclude_items=plain[:3])]
    assert not set(got) & set(plain[:3]) and got[:7] == plain[3:10] and len(got) == 10
    allowed = plain[5:8] + [any_rec.item_vocab.ids[-1]]
    only = [i for i, _ in any_rec.recommend(user, 10, include_items=allowed, exclude_seen=False)]
    assert set(only) == set(allowed)


def test_boost_moves_the_boosted_category_up_by_ln_factor(any_rec):
    user = any_rec.user_vocab.ids[7]
    full = any_rec.recommend(user, any_rec.n_items)
    rank = {i: r for r, (i, _) in enumerate(full)}
    score = dict(full)
    # the category whose best item is furthest from the top
    category = max(any_rec.item_categories.names,
                   key=lambda c: min((rank[i] for i in rank if c in categories_of(any_rec, i)), default=-1))
    best = min((i for i in rank if category in categories_of(any_rec, i)), key=rank.get)
    assert rank[best] >= 2
    factor = math.exp(score[full[0][0]] - score[best] + 1.0)  # enough to lift it above the top item
    boosted = any_rec.recommend(user, any_rec.n_items, boost={category: factor})
    new_rank = {i: r for r, (i, _) in enumerate(boosted)}
    assert new_rank[best] == 0
    assert dict(boosted)[best] == pytest.approx(score[best] + math.log(factor), rel=1e-5, abs=1e-4)
    # an item in no boosted category keeps its score
    other = next(i for i in rank if category not in categories_of(any_rec, i))
    assert dict(boosted)[other] == pytest.approx(score[other], rel=1e-5, abs=1e-4)
    # a factor below 1 lowers; boost_items works per item
    low = any_rec.recommend(user, any_rec.n_items, boost_items={full[0][0]: math.exp(score[full[1][0]] - score[full[0][0]] - 1.0)})
    assert low[0][0] == full[1][0]
    lift = {full[9][0]: math.exp(score[full[0][0]] - score[full[9][0]] + 1.0)}
    assert any_rec.recommend(user, 3, boost_items=lift)[0][0] == full[9][0]
    # a factor of 0 leaves the items out, as an exclusion does
    assert any_rec.recommend(user, 10, boost={category: 0}) == any_rec.recommend(user, 10, exclude_categories=[category])


def test_rules_apply_to_batches_and_new_users(any_rec):
    users = any_rec.user_vocab.ids[:6].tolist()
    excluded = any_rec.item_categories.names[:3]
    batch = any_rec.recommend_batch(users, 5, exclude_categories=excluded)
    single = [any_rec.recommend(u, 5, exclude_categories=excluded) for u in users]
    assert [[i for i, _ in r] for r in batch] == [[i for i, _ in r] for r in single]
    assert np.allclose([[s for _, s in r] for r in batch], [[s for _, s in r] for r in single], rtol=1e-5)
    history = any_rec.item_vocab.ids[:4].tolist()
    new = any_rec.recommend_for_history(history, 5, exclude_categories=excluded)
    assert len(new) == 5 and all(not categories_of(any_rec, i) & set(excluded) for i, _ in new)


def test_bad_rules_are_one_clear_error(any_rec):
    user = any_rec.user_vocab.ids[0]
    with pytest.raises(RuleError, match="unknown category 'Nope'") as err:
        any_rec.recommend(user, 5, exclude_categories=["Nope"])
    assert isinstance(err.value, ValueError)
    with pytest.raises(RuleError, match="unknown category 'Nope'"):
        any_rec.recommend(user, 5, boost={"Nope": 2.0})
    for factor in (-1.5, float("nan"), float("inf"), "2", True):
        with pytest.raises(RuleError, match="must be a finite number >= 0"):
            any_rec.recommend(user, 5, boost={"cat_1": factor})
    with pytest.raises(RuleError, match="exclude_categories must be a list"):
        any_rec.recommend(user, 5, exclude_categories="cat_1")
    with pytest.raises(RuleError, match="include_items is empty"):
        any_rec.recommend(user, 5, include_items=[])
    with pytest.raises(KeyError, match="no_such_item"):
        any_rec.recommend(user, 5, exclude_items=["no_such_item"])
    without = copy.copy(any_rec)
    without.item_categories = None
    with pytest.raises(MissingPartError, match="no item categories"):
        without.recommend(user, 5, exclude_categories=["cat_1"])
    assert without.recommend(user, 5, exclude_items=[any_rec.item_vocab.ids[0]])  # item rules need no categories


def test_http_rules_on_get_and_post_recommend(any_rec):
    client = TestClient(create_app(any_rec))
    user = any_rec.user_vocab.ids[2]
    excluded = any_rec.item_categories.names[:2]
    r = client.get("/recommend", params={"user_id": user, "k": 8, "exclude_categories": excluded,
                                         "boost": ["cat_5:3.5"], "exclude_items": [any_rec.item_vocab.ids[1]]})
    assert r.status_code == 200
    want = any_rec.recommend(user, 8, exclude_categories=excluded, boost={"cat_5": 3.5},
                             exclude_items=[any_rec.item_vocab.ids[1]])
    assert [(x["item_id"], x["score"]) for x in r.json()["items"]] == want and len(want) == 8
    history = any_rec.item_vocab.ids[:3].tolist()
    r = client.post("/recommend", json={"history": history, "k": 4, "exclude_categories": excluded,
                                        "boost": {"cat_5": 2}, "boost_items": {any_rec.item_vocab.ids[9]: 1.5}})
    assert r.status_code == 200
    want = any_rec.recommend_for_history(history, 4, exclude_categories=excluded, boost={"cat_5": 2},
                                         boost_items={any_rec.item_vocab.ids[9]: 1.5})
    assert [x["item_id"] for x in r.json()["items"]] == [i for i, _ in want]


@pytest.mark.parametrize("request_", [
    ("get", {"exclude_categories": ["Horror"]}, "unknown category 'Horror'"),
    ("get", {"boost": ["Horror:2"]}, "unknown category 'Horror'"),
    ("get", {"boost": ["cat_1"]}, "write NAME:FACTOR"),
    ("get", {"boost": ["cat_1:-1"]}, "must be a finite number >= 0"),
    ("post", {"exclude_categories": ["Horror"]}, "unknown category 'Horror'"),
    ("post", {"boost": {"cat_1": -2}}, "must be a finite number >= 0"),
])
def test_http_bad_rules_are_422_with_detail_and_code(rec, request_):
    method, rules, message = request_
    client = TestClient(create_app(rec))
    if method == "get":
        r = client.get("/recommend", params={"user_id": rec.user_vocab.ids[0], **rules})
    else:
        r = client.post("/recommend", json={"history": rec.item_vocab.ids[:2].tolist(), **rules})
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "invalid_request" and message in r.json()["detail"]


def test_http_category_rules_without_categories_are_409(rec):
    without = copy.copy(rec)
    without.item_categories = None
    r = TestClient(create_app(without)).get("/recommend", params={"user_id": rec.user_vocab.ids[0],
                                                                   "exclude_categories": ["cat_1"]})
    assert r.status_code == 409 and r.json()["error"] == "unavailable" and "no item categories" in r.json()["detail"]


def test_openapi_declares_the_rules(rec):
    spec = TestClient(create_app(rec)).get("/openapi.json").json()
    get = spec["paths"]["/recommend"]["get"]
    names = {p["name"] for p in get["parameters"]}
    assert {"exclude_categories", "exclude_items", "include_items", "boost", "boost_items"} <= names
    params = {p["name"]: p["schema"] for p in get["parameters"]}
    listed = params["exclude_categories"]["items"]["enum"]
    assert listed == rec.item_categories.names  # the bundle's categories, for clients and the contract fuzzer
    assert {"409", "422"} <= set(get["responses"])
    post = spec["paths"]["/recommend"]["post"]
    body = post["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
    props = spec["components"]["schemas"][body]["properties"]
    assert {"exclude_categories", "exclude_items", "include_items", "boost", "boost_items"} <= set(props)
    assert "ln" in get["description"] and {"409", "422"} <= set(post["responses"])


def test_rules_reach_live_users_of_a_real_time_server(trained, tmp_path):
    """A real-time server answers a live user from their current history: the rules apply there too."""
    import shutil

    from dmp_dl.realtime import LiveRecommender

    bundle = tmp_path / "artifacts"
    shutil.copytree(trained["bundle_dir"], bundle)
    with LiveRecommender.load(bundle) as live:
        end = int(live._part.data_end)
        events = [{"user_id": "brand-new", "item_id": live.item_vocab.ids[i], "event_type": "view", "timestamp": end + i + 1}
                  for i in range(3)]
        assert live.ingest(events)["accepted"] == 3
        excluded = live.item_categories.names[:3]
        for user in ("brand-new", live.user_vocab.ids[0]):
            got = live.recommend(user, 6, exclude_categories=excluded)
            assert len(got) == 6 and all(not categories_of(live, i) & set(excluded) for i, _ in got)
        client = TestClient(create_app(live))
        r = client.get("/recommend", params={"user_id": "brand-new", "k": 6, "exclude_categories": excluded})
        assert r.status_code == 200 and [x["item_id"] for x in r.json()["items"]] == \
            [i for i, _ in live.recommend("brand-new", 6, exclude_categories=excluded)]
        with pytest.raises(RuleError, match="unknown category"):
            live.recommend("brand-new", 6, exclude_categories=["Nope"])
