"""The Recommender API over a bundle exported by a real (tiny) training run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dmp_dl import Recommender
from dmp_dl.core.errors import BundleError, UnknownIdError
from dmp_dl.data.vocab import IdVocab
from dmp_dl.index.ann import IndexOptions
from dmp_dl.serving.recommender import InvalidRequestError
from dmp_dl.store.bundle import Bundle, MissingPartError
from dmp_dl.training.export import export_bundle

from .conftest import trained_run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A two-tower bundle: its score is the plain dot product the FAISS index serves, its user tower
    reads recent items in order and CRM attributes (the default model's bundle: test_user_level_models)."""
    return trained_run(tmp_path_factory, "model=two_tower")


@pytest.fixture(scope="module")
def rec(trained) -> Recommender:
    return Recommender.load(trained["bundle_dir"])


def exact_top(rec: Recommender, query: np.ndarray, k: int, excluded=()) -> list[str]:
    scores = rec.item_vectors @ query
    scores[list(excluded)] = -np.inf
    order = np.lexsort((np.arange(len(scores)), -scores))[:k]
    return rec.item_vocab.lookup(order[np.isfinite(scores[order])])


def assert_same_rankings(got: list, want: list) -> None:
    """Same ids in the same order; scores equal up to float32 rounding (batched BLAS may differ)."""
    assert [[i for i, _ in r] for r in got] == [[i for i, _ in r] for r in want]
    np.testing.assert_allclose([s for r in got for _, s in r], [s for r in want for _, s in r], rtol=1e-5, atol=1e-6)


def seen_items(rec: Recommender, trained, user_id: str) -> set[int]:
    return set(trained["datamodule"].all_seen[rec.user_vocab.get(user_id)].indices.tolist())


# -- known users --------------------------------------------------------------------------


def test_recommend_returns_k_unseen_items_best_first(rec, trained):
    for user in rec.user_vocab.ids[:25]:
        got = rec.recommend(user, k=10)
        assert len(got) == 10
        items = [i for i, _ in got]
        seen = seen_items(rec, trained, user)
        assert not {rec.item_vocab.get(i) for i in items} & seen
        scores = np.array([s for _, s in got])
        assert np.all(np.diff(scores) <= 1e-6)
        u = rec.user_vectors[rec.user_vocab.get(user)]
        np.testing.assert_allclose(scores, rec.item_vectors[rec.item_vocab.index_of(items)] @ u, rtol=1e-5, atol=1e-6)
        assert items == exact_top(rec, u, 10, seen)  # the default small-catalogue index is exact


def test_exclude_seen_false_ranks_everything(rec, trained):
    user = rec.user_vocab.ids[3]
    got = [i for i, _ in rec.recommend(user, k=30, exclude_seen=False)]
    assert got == exact_top(rec, rec.user_vectors[rec.user_vocab.get(user)], 30)
    assert {rec.item_vocab.get(i) for i in got} & seen_items(rec, trained, user), "a heavy user's top 30 includes seen items"


def test_batch_equals_single_calls(rec):
    users = rec.user_vocab.ids[10:40].tolist()
    assert_same_rankings(rec.recommend_batch(users, k=7), [rec.recommend(u, k=7) for u in users])
    assert_same_rankings(rec.recommend_batch(users, k=7, chunk=4), rec.recommend_batch(users, k=7))
    items = rec.item_vocab.ids[:9].tolist()
    assert_same_rankings(rec.similar_items_batch(items, k=4), [rec.similar_items(i, k=4) for i in items])


def test_unknown_ids_raise_a_key_error_naming_the_id(rec):
    with pytest.raises(UnknownIdError, match="unknown user id: 'no-such-user'") as info:
        rec.recommend("no-such-user")
    assert isinstance(info.value, KeyError)
    with pytest.raises(KeyError, match="no-such-item"):
        rec.similar_items("no-such-item")
    with pytest.raises(KeyError, match="ghost"):
        rec.recommend_for_history([rec.item_vocab.ids[0], "ghost"])
    with pytest.raises(KeyError, match="nobody"):
        rec.lookalike([rec.user_vocab.ids[0], "nobody"])


@pytest.mark.parametrize("k", [0, -1, 1001, 2.5, "10", True, None])
def test_k_out_of_range_is_a_value_error(rec, k):
    with pytest.raises(ValueError, match="k must be an integer in 1..1000"):
        rec.recommend(rec.user_vocab.ids[0], k=k)
    with pytest.raises(InvalidRequestError):
        rec.lookalike(rec.user_vocab.ids[:2].tolist(), k=k)


def test_max_k_is_configurable_and_k_may_exceed_the_catalogue(trained):
    small = Recommender.load(trained["bundle_dir"], max_k=5)
    with pytest.raises(ValueError, match="1..5"):
        small.recommend(small.user_vocab.ids[0], k=6)
    big = Recommender.load(trained["bundle_dir"], max_k=100_000)
    user = big.user_vocab.ids[0]
    got = big.recommend(user, k=10_000)
    n_seen = len(trained["datamodule"].all_seen[big.user_vocab.get(user)].indices)
    assert len(got) == big.n_items - n_seen  # every unseen item once, no padding


# -- cold start ----------------------------------------------------------------------------


def test_recommend_for_history_uses_the_cold_start_tower(rec, trained):
    net = trained["module"].net.cpu().eval()
    dm = trained["datamodule"]
    history_rows = dm.full_history[7][dm.full_history[7] < dm.n_items]  # most recent first
    history_ids = rec.item_vocab.lookup(history_rows[::-1])  # the API takes oldest first
    with torch.no_grad():
        vec = net.cold_user_vectors(torch.as_tensor(dm.full_history[7:8])).numpy()[0]
    got = rec.recommend_for_history(history_ids, k=10)
    assert [i for i, _ in got] == exact_top(rec, vec, 10, set(history_rows.tolist()))
    assert not set(history_ids) & {i for i, _ in got}


def test_only_the_most_recent_history_len_items_count(rec):
    items = rec.item_vocab.ids.tolist()
    long_history = items[:60]  # oldest first
    latest = long_history[-rec.history_len:]
    assert_same_rankings([rec.recommend_for_history(long_history, k=5, exclude_seen=False)],
                         [rec.recommend_for_history(latest, k=5, exclude_seen=False)])
    assert rec.recommend_for_history(long_history, k=5, exclude_seen=False) != \
        rec.recommend_for_history(long_history[: rec.history_len], k=5, exclude_seen=False)


def test_attributes_change_a_new_users_vector(rec, trained):
    columns = rec.user_features.categorical_columns + rec.user_features.numeric_columns
    assert columns, "the synthetic users have attributes"
    history = rec.item_vocab.ids[:2].tolist()
    young, _, _ = rec.cold_user_vectors([history], [{"age": 18}])
    old, _, _ = rec.cold_user_vectors([history], [{"age": 80}])
    assert not np.allclose(young, old)
    attrs_only = rec.recommend_for_history([], k=5, attributes={"age": 30})
    assert len(attrs_only) == 5
    with pytest.raises(ValueError, match=r"unknown attribute\(s\) \['favourite_colour'\]"):
        rec.recommend_for_history(history, attributes={"favourite_colour": "red"})
    with pytest.raises(ValueError, match="history is empty"):
        rec.recommend_for_history([])
    batch = rec.recommend_for_histories([history, history[:1]], k=4, attributes=[{"age": 18}, None])
    assert_same_rankings(batch, [rec.recommend_for_history(history, k=4, attributes={"age": 18}),
                                 rec.recommend_for_history(history[:1], k=4)])


# -- items and audiences -------------------------------------------------------------------


def test_similar_items_share_the_planted_category(rec, trained):
    category = trained["datamodule"].raw_meta["item_category"].reindex(rec.item_vocab.ids).to_numpy()
    same = []
    for item in rec.item_vocab.ids:
        got = rec.similar_items(item, k=5)
        assert item not in [i for i, _ in got] and len(got) == 5
        same.append(np.mean(category[rec.item_vocab.index_of([i for i, _ in got])] == category[rec.item_vocab.get(item)]))
    base_rate = np.sum(np.bincount(category) ** 2) / len(category) ** 2  # two random items share a category
    assert np.mean(same) > 3 * base_rate, (np.mean(same), base_rate)


@pytest.mark.parametrize("method", ["centroid", "neighbours"])
def test_lookalike_expands_a_segment(rec, trained, method):
    segment = trained["datamodule"].raw_meta["user_segment"].reindex(rec.user_vocab.ids).to_numpy()
    target = np.bincount(segment).argmax()
    seeds = rec.user_vocab.ids[segment == target][:20].tolist()
    got = rec.lookalike(seeds, k=50, method=method)
    users = [u for u, _ in got]
    assert len(got) == 50 and not set(users) & set(seeds) and len(set(users)) == 50
    assert np.all(np.diff([s for _, s in got]) <= 1e-6)
    share = np.mean(segment[rec.user_vocab.index_of(users)] == target)
    assert share > 2 * np.mean(segment == target), share
    if method == "centroid":
        centroid = rec.user_vectors[rec.user_vocab.index_of(seeds)].mean(0)
        np.testing.assert_allclose([s for _, s in got], rec.user_vectors[rec.user_vocab.index_of(users)] @ centroid, rtol=1e-5)
    kept = rec.lookalike(seeds, k=50, method=method, exclude_seeds=False)
    assert set(seeds) & {u for u, _ in kept}


def test_lookalike_refuses_bad_requests(rec):
    with pytest.raises(ValueError, match="seed_user_ids is empty"):
        rec.lookalike([])
    with pytest.raises(ValueError, match="method must be one of"):
        rec.lookalike(rec.user_vocab.ids[:2].tolist(), method="magic")
    with pytest.raises(ValueError, match="must be a list of ids"):
        rec.lookalike(rec.user_vocab.ids[0])  # a bare string is not a list of ids


def test_propensity_without_a_model_is_a_clear_error(rec):
    if rec.has_propensity:
        pytest.skip("this bundle has a propensity model")
    with pytest.raises(MissingPartError, match="no propensity model") as info:
        rec.propensity([rec.user_vocab.ids[0]])
    assert isinstance(info.value, BundleError)


# -- approximate indexes -------------------------------------------------------------------


@pytest.mark.parametrize("index", [
    IndexOptions(factory="HNSW16", search_params="efSearch=64", eval_queries=200),
    IndexOptions(factory="IVF{nlist},Flat", search_params="nprobe=2", eval_queries=200),
])
def test_ann_bundle_agrees_with_exact_and_still_excludes_seen(rec, trained, tmp_path, index):
    b = Bundle.open(trained["bundle_dir"])
    seen = trained["datamodule"].all_seen
    export_bundle(tmp_path / "ann", user_vocab=rec.user_vocab, item_vocab=rec.item_vocab,
                  user_vectors=rec.user_vectors, item_vectors=rec.item_vectors, seen=seen,
                  item_popularity=b.array("item_popularity.npy"), index_options=index)
    ann = Recommender.load(tmp_path / "ann")
    info = ann.manifest["indexes"]["items"]
    assert not info["exact"] and 0.0 <= info["recall@10"] <= 1.0
    users = rec.user_vocab.ids[:100].tolist()
    overlap = []
    for got, want, user in zip(ann.recommend_batch(users, k=10), rec.recommend_batch(users, k=10), users):
        assert len(got) == 10
        assert not {ann.item_vocab.get(i) for i, _ in got} & set(seen[rec.user_vocab.get(user)].indices.tolist())
        overlap.append(len({i for i, _ in got} & {i for i, _ in want}) / 10)
    assert np.mean(overlap) >= 0.9, np.mean(overlap)
    assert ann.network is None and not ann.has_propensity  # parts not exported are absent, not broken
    with pytest.raises(MissingPartError, match="no cold-start network"):
        ann.recommend_for_history(rec.item_vocab.ids[:2].tolist())


def test_index_search_params_can_be_overridden_at_load(trained, tmp_path, rec):
    b = Bundle.open(trained["bundle_dir"])
    export_bundle(tmp_path / "hnsw", user_vocab=rec.user_vocab, item_vocab=rec.item_vocab,
                  user_vectors=rec.user_vectors, item_vectors=rec.item_vectors,
                  seen=trained["datamodule"].all_seen, item_popularity=b.array("item_popularity.npy"),
                  index_options=IndexOptions(factory="HNSW16", search_params="efSearch=40", eval_queries=50))
    assert Recommender.load(tmp_path / "hnsw").item_index.hnsw.efSearch == 40
    assert Recommender.load(tmp_path / "hnsw", search_params="efSearch=300").item_index.hnsw.efSearch == 300


def test_vocab_mismatch_is_refused(trained, tmp_path, rec):
    with pytest.raises(ValueError, match="do not match"):
        export_bundle(tmp_path / "bad", user_vocab=IdVocab(["a"], "user"), item_vocab=rec.item_vocab,
                      user_vectors=rec.user_vectors, item_vectors=rec.item_vectors,
                      seen=trained["datamodule"].all_seen, item_popularity=np.zeros(rec.n_items))
    assert not (tmp_path / "bad").exists()
