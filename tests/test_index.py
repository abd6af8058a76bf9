"""FAISS indexes: the auto choice, search parameters, ANN quality vs exact, exact exclusion."""

from __future__ import annotations

import numpy as np
import pytest

from dmp_dl.core.errors import ConfigError
from dmp_dl.index.ann import (
    IndexOptions,
    build_and_measure,
    build_index,
    default_nlist,
    exact_top_k,
    recall_at_k,
    search_excluding,
)


def clustered(n: int, dim: int = 32, clusters: int = 50, seed: int = 0) -> np.ndarray:
    """Unit vectors scattered around fixed random centres, like trained embeddings (n, dim) float32.

    The centres do not depend on ``seed``, so draws with different seeds (items, user queries)
    share the structure, as user and item vectors of one model do.
    """
    centres = np.random.default_rng(12345).standard_normal((clusters, dim))
    rng = np.random.default_rng(seed)
    x = centres[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def brute_force(db: np.ndarray, q: np.ndarray, k: int, excluded: list[set[int]]) -> list[list[int]]:
    out = []
    for row, ex in zip(q @ db.T, excluded):
        order = [i for i in np.lexsort((np.arange(len(row)), -row)) if i not in ex]
        out.append(order[:k])
    return out


def test_auto_picks_exact_below_the_threshold():
    opts = IndexOptions(factory="auto", exact_below=1000, approximate="HNSW32", search_params="efSearch=64")
    assert opts.resolve(999) == ("Flat", "")
    assert opts.resolve(1000) == ("HNSW32", "efSearch=64")
    ivf = IndexOptions(factory="IVF{nlist},Flat", search_params="nprobe=8")
    assert ivf.resolve(1_000_000) == ("IVF4000,Flat", "nprobe=8")
    assert IndexOptions(factory="IVF{nlist},Flat", nlist=64).resolve(10_000)[0] == "IVF64,Flat"
    assert default_nlist(100) == 2 and default_nlist(10) == 1  # >= 39 training points per list


def test_search_params_go_through_parameter_space():
    x = clustered(2000)
    hnsw = build_index(x, "HNSW16", "efSearch=77")
    assert hnsw.hnsw.efSearch == 77
    ivf = build_index(x, "IVF16,Flat", "nprobe=5")
    assert ivf.nprobe == 5
    with pytest.raises(ConfigError, match="efSearch=3.*does not apply"):
        build_index(x, "IVF16,Flat", "efSearch=3")
    with pytest.raises(ConfigError, match="'Nonsense12' is not a valid faiss index_factory"):
        build_index(x, "Nonsense12")


def test_recall_at_k_counts_overlap():
    exact = np.array([[1, 2, 3], [4, 5, 6]])
    found = np.array([[3, 2, 9], [-1, -1, -1]])
    assert recall_at_k(found, exact) == pytest.approx(2 / 6)


@pytest.mark.parametrize("factory, params", [("HNSW32", "efSearch=128"), ("IVF{nlist},Flat", "nprobe=16")])
def test_ann_agrees_with_exact_search(factory, params):
    items, users = clustered(20_000), clustered(500, seed=1)
    opts = IndexOptions(factory=factory, search_params=params, eval_queries=500)
    index, info = build_and_measure(items, users, opts, "items")
    assert info["recall@10"] >= 0.95, info
    assert info["exact"] is False and info["ntotal"] == 20_000
    # the same number recomputed independently
    found = index.search(users, 10)[1]
    assert recall_at_k(found, exact_top_k(items, users, 10)) == pytest.approx(info["recall@10"])


def test_exact_index_reports_perfect_recall():
    items = clustered(3000)
    _, info = build_and_measure(items, clustered(100, seed=2), IndexOptions(factory="auto"), "items")
    assert info["factory"] == "Flat" and info["recall@10"] == 1.0


def test_exclusion_is_exact_with_flat_search():
    db, q = clustered(500), clustered(6, seed=3)
    rng = np.random.default_rng(0)
    excluded = [set(rng.choice(500, size=s, replace=False).tolist()) for s in (0, 3, 40, 200, 490, 500)]
    indptr = np.r_[0, np.cumsum([len(e) for e in excluded])]
    ids_flat = np.concatenate([sorted(e) for e in excluded]).astype(np.int64)
    ids, scores = search_excluding(build_index(db, "Flat"), db, q, 20, indptr, ids_flat)
    expected = brute_force(db, q, 20, excluded)
    for row, exp in enumerate(expected):
        got = ids[row][ids[row] >= 0].tolist()
        assert got == exp
        assert np.all(np.diff(scores[row][: len(got)]) <= 1e-6)  # best first
    assert (ids[-1] == -1).all() and np.isneginf(scores[-1]).all()  # everything excluded


def test_exclusion_is_exact_even_when_ann_comes_back_short():
    db, q = clustered(4000), clustered(8, seed=4)
    index = build_index(db, "IVF64,Flat", "nprobe=1")  # one list: few candidates, often fewer than asked
    rng = np.random.default_rng(1)
    exact = exact_top_k(db, q, 200)
    excluded = [set(exact[r, :190].tolist()) | set(rng.choice(4000, 300, replace=False).tolist()) for r in range(len(q))]
    indptr = np.r_[0, np.cumsum([len(e) for e in excluded])]
    ids_flat = np.concatenate([sorted(e) for e in excluded]).astype(np.int64)
    raw = index.search(q, 10 + int(np.diff(indptr).max()))[1]
    short = [r for r in range(len(q)) if len(set(raw[r][raw[r] >= 0].tolist()) - excluded[r]) < 10]
    assert short, "the ANN answer must come back short for some queries here"
    ids, _ = search_excluding(index, db, q, 10, indptr, ids_flat)
    for row in range(len(q)):
        assert (ids[row] >= 0).all(), "k results although the catalogue has plenty left"
        assert not set(ids[row].tolist()) & excluded[row]
    # the short answers were completed by exact search
    expected = brute_force(db, q, 10, excluded)
    assert [ids[r].tolist() for r in short] == [expected[r] for r in short]


def test_an_index_over_a_vector_file_is_filled_and_checked_a_block_at_a_time(tmp_path, monkeypatch):
    """A bundle's vector file (memory-mapped) is read a block of rows at a time when its index is
    built and its exact neighbours are found: the same index and neighbours as from memory, the
    file's pages handed back after each block (at 2M users the whole file stayed mapped beside the
    index's own copy and a second exact copy)."""
    from dmp_dl.index import ann

    db = clustered(1000, dim=16)
    db[500] = db[10]  # a tie: the lower id first
    np.save(tmp_path / "v.npy", db)
    mapped = np.load(tmp_path / "v.npy", mmap_mode="r", allow_pickle=False)
    q = np.concatenate([db[[10, 3]], clustered(5, dim=16, seed=9)])
    released, added = [], []
    original_release = ann.release_mapped_pages
    monkeypatch.setattr(ann, "BLOCK_ROWS", 64)
    monkeypatch.setattr(ann, "release_mapped_pages", lambda v: (released.append(v), original_release(v)))
    for k in (10, 1500):
        expected = brute_force(db, q, k, [set()] * len(q))
        got = ann.exact_top_k(mapped, q, k)
        assert [row[row >= 0].tolist() for row in got] == expected and (got[:, 1000:] == -1).all()
    assert len(released) == 2 * 16 and all(v is mapped for v in released)
    index = ann.build_index(mapped, "Flat")
    assert index.ntotal == 1000
    np.testing.assert_array_equal(index.search(q, 10)[1], ann.build_index(db, "Flat").search(q, 10)[1])
    import faiss

    original_add = faiss.IndexIVFFlat.add
    monkeypatch.setattr(faiss.IndexIVFFlat, "add", lambda self, x: (added.append(len(x)), original_add(self, x)))
    assert ann.build_index(mapped, "IVF8,Flat").ntotal == 1000
    assert added and max(added) <= 64 and sum(added) == 1000
