"""Ranking metrics: hand-computed cases, seen-item exclusion, baselines, agreement with a plain reference loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from dmp_dl.core.errors import ConfigError
from dmp_dl.data.datamodule import EvalUsers
from dmp_dl.evaluation.baselines import EASEScorer, EmbeddingScorer, PopularityScorer
from dmp_dl.evaluation.ranking import evaluate_scorer
from dmp_dl.metrics.ranking import (
    RankingAccumulator,
    batch_metrics,
    ranking_metrics,
    tie_broken_keys,
    topk_with_ties,
)


def test_topk_breaks_ties_by_lower_index():
    s = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0], [-0.0, 0.0, -1.0, float("nan"), float("-inf")]])
    vals, idx = topk_with_ties(s, 3)
    assert idx.tolist() == [[1, 2, 4], [0, 1, 2]]
    assert vals[0].tolist() == [3.0, 3.0, 3.0]


def test_sort_keys_order_like_a_stable_descending_sort():
    rng = np.random.default_rng(0)
    pool = np.array([-np.inf, np.inf, -1e30, 1e30, -1.0, 1.0, -1e-30, 1e-30, 0.0, -0.0, 2.5, -2.5], dtype=np.float32)
    s = rng.choice(pool, size=(4, 300))
    _, key = tie_broken_keys(torch.from_numpy(s))
    for row, k in zip(s, key.numpy()):
        expected = np.lexsort((np.arange(len(row)), -row.astype(np.float64)))  # score desc, index asc
        assert (np.argsort(-k, kind="stable") == expected).all()


def _reference_order(row: np.ndarray) -> np.ndarray:
    """Columns by (score desc, column asc), NaN as -inf: the ranking the metrics promise."""
    clean = np.where(np.isnan(row), -np.inf, row).astype(np.float64)
    return np.lexsort((np.arange(len(row)), -clean))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("chunk", [2**20, 37], ids=["one-block", "blocks-of-rows"])
def test_top_k_and_mrr_match_a_plain_sort_with_ties_infinities_and_nan(seed, chunk, monkeypatch):
    import dmp_dl.metrics.ranking as ranking

    monkeypatch.setattr(ranking, "CHUNK_ELEMENTS", chunk)  # 37: the CPU's blocks of rows, down to one row a block
    rng = np.random.default_rng(seed)
    n_items = int(rng.integers(5, 400))
    pool = np.array([-np.inf, np.nan, 0.0, -0.0, 1.0, 2.0, -3.5, 7.25], dtype=np.float32)
    tied = rng.choice(pool, size=(16, n_items))  # many ties, also at the cut-off
    smooth = rng.standard_normal((16, n_items)).astype(np.float32)  # no ties: the one-pass path
    smooth[:, : n_items // 3] = -np.inf  # excluded items
    spotted = smooth.copy()  # a few NaN among enough finite scores: NaN must rank as -inf there too
    spotted[rng.random(spotted.shape) < 0.05] = np.nan
    whole = sorted({1, int(rng.integers(1, n_items + 1)), n_items})  # down to the whole catalogue
    short = sorted({1, int(rng.integers(1, n_items // 2 + 1))})  # a cut-off within the finite scores
    heap = [1, 2]  # ranked by faiss's heaps on the CPU from 3 x HEAP_MIN_RATIO items
    for s, ks in ((tied, whole), (tied, heap), (smooth, whole), (smooth, short), (smooth, heap), (spotted, short),
                  (spotted, heap)):
        rel = rng.random((16, n_items)) < 0.05
        rel[0] = False  # a user without held-out items
        m, top = ranking_metrics(torch.from_numpy(s.copy()), torch.from_numpy(rel), ks)
        for i, (row, r) in enumerate(zip(s, rel)):
            order = _reference_order(row)
            finite = ~np.isneginf(np.where(np.isnan(row), -np.inf, row))
            expected = [c if finite[c] else -1 for c in order[: ks[-1]]]
            assert top[i].tolist() == expected
            rankable = np.flatnonzero(r & finite)
            if not r.any():
                assert math.isnan(m["mrr"][i].item())
            elif not len(rankable):
                assert m["mrr"][i].item() == 0.0
            else:
                best = np.flatnonzero(np.isin(order, rankable))[0] + 1
                assert m["mrr"][i].item() == pytest.approx(1.0 / best)
        _, plain = topk_with_ties(torch.from_numpy(s.copy()), ks[-1])
        assert (plain == torch.from_numpy(np.stack([_reference_order(row)[: ks[-1]] for row in s]))).all()


def test_metrics_at_k_alone_skip_the_full_ranking():
    scores = torch.tensor([[3.0, 2.0, 1.0]])
    rel = torch.tensor([[False, True, False]])
    m, _ = ranking_metrics(scores, rel, [2], mrr=False)
    assert "mrr" not in m and m["recall@2"].item() == 1.0


def test_hand_computed_case():
    # 6 items; the user's ranking is items 0..5 in order; relevant = {1, 4}
    scores = torch.tensor([[6.0, 5.0, 4.0, 3.0, 2.0, 1.0]])
    rel = torch.zeros(1, 6, dtype=torch.bool)
    rel[0, [1, 4]] = True
    m, top = ranking_metrics(scores, rel, [1, 3, 5])
    assert top[0].tolist() == [0, 1, 2, 3, 4]
    assert m["recall@1"].item() == 0.0  # min(K, |R|) = 1, no hit
    assert m["recall@3"].item() == pytest.approx(0.5)
    assert m["recall@5"].item() == pytest.approx(1.0)
    idcg2 = 1 + 1 / math.log2(3)
    assert m["ndcg@3"].item() == pytest.approx((1 / math.log2(3)) / idcg2)
    assert m["ndcg@5"].item() == pytest.approx((1 / math.log2(3) + 1 / math.log2(6)) / idcg2)
    assert m["map@3"].item() == pytest.approx((1 / 2) / 2)
    assert m["map@5"].item() == pytest.approx((1 / 2 + 2 / 5) / 2)
    assert m["hit_rate@1"].item() == 0.0 and m["hit_rate@3"].item() == 1.0
    assert m["mrr"].item() == pytest.approx(0.5)
    assert m["precision@5"].item() == pytest.approx(2 / 5)


def test_ties_are_ranked_by_lower_item_index():
    # items 0..3 all tie; relevant item 2 ranks third, so it is outside the top 2
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    rel = torch.tensor([[False, False, True, False]])
    m, top = ranking_metrics(scores, rel, [2, 3])
    assert top[0].tolist() == [0, 1, 2]
    assert m["recall@2"].item() == 0.0 and m["recall@3"].item() == 1.0
    assert m["ndcg@3"].item() == pytest.approx(1 / math.log2(4))
    assert m["map@3"].item() == pytest.approx(1 / 3)
    assert m["mrr"].item() == pytest.approx(1 / 3)


def test_mrr_uses_the_full_ranking_not_the_cutoff():
    scores = torch.arange(10, 0, -1, dtype=torch.float32)[None]  # item i at rank i + 1
    rel = torch.zeros(1, 10, dtype=torch.bool)
    rel[0, [6, 8]] = True
    m, _ = ranking_metrics(scores, rel, [5])
    assert m["recall@5"].item() == 0.0
    assert m["mrr"].item() == pytest.approx(1 / 7)


def test_fewer_relevant_than_k_and_empty_relevant():
    scores = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    rel = torch.tensor([[True, False, False, False], [False] * 4])
    m, top = ranking_metrics(scores, rel, [3])
    assert m["recall@3"][0].item() == 1.0  # hits / min(3, 1)
    assert m["ndcg@3"][0].item() == 1.0
    assert m["map@3"][0].item() == 1.0
    assert m["precision@3"][0].item() == pytest.approx(1 / 3)
    assert all(math.isnan(v[1].item()) for v in m.values())  # explicitly undefined
    acc = RankingAccumulator(4, [3])
    acc.update(m, top)
    res = acc.result()
    assert res["n_users"] == 1 and res["n_users_no_relevant"] == 1 and res["recall@3"] == 1.0
    assert res["coverage@3"] == 0.75  # items 0-2; the unevaluated user's item 3 does not count


def test_cutoff_above_the_catalogue_ranks_everything():
    scores = torch.tensor([[0.1, 0.3, 0.2]])
    rel = torch.tensor([[True, False, False]])
    m, top = ranking_metrics(scores, rel, [2, 10])
    assert top.shape == (1, 3) and top[0].tolist() == [1, 2, 0]
    assert m["recall@10"].item() == 1.0 and m["recall@2"].item() == 0.0
    assert m["precision@10"].item() == pytest.approx(0.1)
    assert m["ndcg@10"].item() == pytest.approx(1 / math.log2(4))


def test_infinite_scores_are_rankable_but_excluded_items_are_not():
    scores = torch.tensor([[float("inf"), 1.0, float("-inf"), float("nan")]])
    rel = torch.tensor([[True, False, True, False]])
    m, top = ranking_metrics(scores, rel, [3])
    assert top[0].tolist() == [0, 1, -1]
    assert m["recall@3"].item() == 0.5 and m["mrr"].item() == 1.0


def test_all_relevant_items_excluded_counts_as_a_miss():
    scores = torch.tensor([[float("-inf"), 2.0, 1.0]])
    rel = torch.tensor([[True, False, False]])
    m, _ = ranking_metrics(scores, rel, [2])
    assert m["recall@2"].item() == 0.0 and m["mrr"].item() == 0.0 and m["ndcg@2"].item() == 0.0


@pytest.mark.parametrize("ks", [[], [0, 5], [2.5]])
def test_bad_cutoffs_are_a_config_error(ks):
    ds = _eval_users(np.array([[1, 0]]), np.array([[0, 1]]))
    with pytest.raises(ConfigError, match="evaluation.ks"):
        evaluate_scorer(PopularityScorer(np.array([1, 2])), ds, 2, ks)


def test_seen_items_are_excluded_and_never_recommended():
    scores = torch.tensor([[9.0, 8.0, 1.0, 0.5]])
    batch = {
        "seen_rows": torch.tensor([0, 0]), "seen_cols": torch.tensor([0, 1]),
        "rel_rows": torch.tensor([0]), "rel_cols": torch.tensor([2]),
    }
    m, top = batch_metrics(scores, batch, [3])
    assert top[0].tolist() == [2, 3, -1]  # only 2 rankable items left
    assert m["recall@3"].item() == 1.0 and m["mrr"].item() == 1.0


def _eval_users(seen: np.ndarray, relevant: np.ndarray) -> EvalUsers:
    n_users = seen.shape[0]
    return EvalUsers(
        np.flatnonzero(relevant.any(axis=1)), np.zeros((n_users, 1), dtype=np.int64),
        sp.csr_matrix(seen.astype(np.float32)), sp.csr_matrix(relevant.astype(np.float32)),
    )


def test_evaluate_scorer_excludes_each_users_own_seen_items():
    # Every user's seen items score highest; the held-out item comes right after them.
    rng = np.random.default_rng(3)
    n_users, n_items = 50, 30
    seen = np.zeros((n_users, n_items), dtype=bool)
    relevant = np.zeros_like(seen)
    scores = rng.random((n_users, n_items)).astype(np.float32)
    for u in range(n_users):
        items = rng.choice(n_items, 6, replace=False)
        seen[u, items[:5]] = True
        relevant[u, items[5]] = True
        scores[u, items[:5]] = 10.0
        scores[u, items[5]] = 5.0
    table = torch.from_numpy(scores)
    res = evaluate_scorer(lambda b: table[b["user"]].clone(), _eval_users(seen, relevant), n_items, [1], batch_size=7)
    assert res["n_users"] == n_users
    assert res["recall@1"] == 1.0 and res["mrr"] == 1.0
    # without exclusion the same scores would put a seen item first for everyone
    m, _ = ranking_metrics(table, torch.from_numpy(relevant), [1])
    assert m["recall@1"].sum().item() == 0.0


def reference(scores: np.ndarray, rel: np.ndarray, k: int, popularity: np.ndarray) -> dict[str, float]:
    """A plain loop over users, written from the definitions."""
    out = {"recall": [], "precision": [], "ndcg": [], "map": [], "hit": [], "mrr": []}
    recommended = []
    for s, r in zip(scores, rel):
        relevant = set(np.flatnonzero(r))
        if not relevant:
            continue
        full = sorted(range(len(s)), key=lambda i: (-s[i], i))
        order = full[:k]
        recommended.extend(order)
        hits = [i in relevant for i in order]
        denom = min(k, len(relevant))
        out["recall"].append(sum(hits) / denom)
        out["precision"].append(sum(hits) / k)
        dcg = sum(1 / math.log2(p + 2) for p, h in enumerate(hits) if h)
        out["ndcg"].append(dcg / sum(1 / math.log2(p + 2) for p in range(denom)))
        precs = [sum(hits[: p + 1]) / (p + 1) for p, h in enumerate(hits) if h]
        out["map"].append(sum(precs) / denom)
        out["hit"].append(float(any(hits)))
        out["mrr"].append(1 / (next(p for p, i in enumerate(full) if i in relevant) + 1))
    res = {k2: float(np.mean(v)) for k2, v in out.items()}
    res["recall_std"] = float(np.std(out["recall"], ddof=1))
    res["n"] = len(out["recall"])
    res["coverage"] = len(set(recommended)) / scores.shape[1]
    res["avg_popularity"] = float(np.mean(popularity[recommended]))
    return res


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_reference_loop(seed):
    rng = np.random.default_rng(seed)
    n_users, n_items, k = 80, 40, 10
    scores = rng.integers(0, 8, size=(n_users, n_items)).astype(np.float32)  # many ties
    rel = rng.random((n_users, n_items)) < 0.08
    rel[:3] = False  # a few users without held-out items
    popularity = rng.random(n_items)
    popularity /= popularity.sum()
    acc = RankingAccumulator(n_items, [k], torch.from_numpy(popularity))
    for rows in np.array_split(np.arange(n_users), 3):  # in batches
        m, top = ranking_metrics(torch.from_numpy(scores[rows]), torch.from_numpy(rel[rows]), [k])
        acc.update(m, top)
    got = acc.result()
    ref = reference(scores, rel, k, popularity)
    pairs = {"recall@10": "recall", "precision@10": "precision", "ndcg@10": "ndcg", "map@10": "map",
             "hit_rate@10": "hit", "mrr": "mrr", "coverage@10": "coverage", "avg_popularity@10": "avg_popularity"}
    for ours, theirs in pairs.items():
        assert got[ours] == pytest.approx(ref[theirs], abs=1e-6), ours
    assert got["n_users"] == ref["n"] and got["n_users_no_relevant"] == n_users - ref["n"]
    assert got["stderr"]["recall@10"] == pytest.approx(ref["recall_std"] / math.sqrt(ref["n"]), abs=1e-9)


def test_results_do_not_depend_on_the_batch_size():
    rng = np.random.default_rng(7)
    n_users, n_items = 90, 25
    seen = rng.random((n_users, n_items)) < 0.2
    relevant = (rng.random((n_users, n_items)) < 0.1) & ~seen
    table = torch.from_numpy(rng.standard_normal((n_users, n_items)).astype(np.float32))
    ds = _eval_users(seen, relevant)
    pop = torch.from_numpy(rng.random(n_items))
    runs = [evaluate_scorer(lambda b: table[b["user"]].clone(), ds, n_items, [3, 10], pop, batch_size=bs) for bs in (1, 16, 1000)]
    for other in runs[1:]:
        for key, value in runs[0].items():
            if key != "stderr":
                assert other[key] == pytest.approx(value, abs=1e-12), key


def test_ease_matches_the_closed_form_and_both_scoring_paths_agree():
    rng = np.random.default_rng(0)
    x = sp.csr_matrix((rng.random((120, 30)) < 0.15).astype(np.float32))
    l2 = 5.0
    ease = EASEScorer(x, l2, device="cpu")
    dense = x.toarray().astype(np.float64)
    p = np.linalg.inv(dense.T @ dense + l2 * np.eye(30))
    b = -p / np.diag(p)
    np.fill_diagonal(b, 0.0)
    assert np.abs(ease.b.numpy() - b).max() < 1e-5
    users = torch.tensor([3, 0, 77])
    got = ease({"user": users}).numpy()
    assert np.abs(got - dense[[3, 0, 77]] @ b).max() < 1e-4
    from dmp_dl.models.ease import sparse_rows

    on_device = torch.sparse.mm(sparse_rows(x[[3, 0, 77]]), ease.b)  # the product rows_times uses off the CPU
    assert np.abs(on_device.numpy() - got).max() < 1e-5


def test_sparse_rows_times_a_dense_matrix_match_the_exact_product_with_weights_and_empty_rows():
    from dmp_dl.models.ease import rows_times

    rng = np.random.default_rng(1)
    x = sp.random(50, 40, density=0.1, format="lil", random_state=2, dtype=np.float32)
    x[7, :] = 0.0  # a user without items scores 0 everywhere
    x = x.tocsr()
    x.eliminate_zeros()
    dense = rng.standard_normal((40, 25)).astype(np.float32)
    got = rows_times(x, torch.from_numpy(dense)).numpy()
    assert got.shape == (50, 25) and not got[7].any()
    assert np.abs(got - x.toarray().astype(np.float64) @ dense).max() < 1e-5
    assert rows_times(sp.csr_matrix((3, 40), dtype=np.float32), torch.from_numpy(dense)).shape == (3, 25)


def test_popularity_and_embedding_scorers():
    pop = PopularityScorer(np.array([5, 0, 9, 5]), device="cpu")
    out = pop({"user": torch.tensor([0, 1])})
    assert out.shape == (2, 4)
    _, top = topk_with_ties(out, 4)
    assert top[0].tolist() == [2, 0, 3, 1]  # the 5-5 tie goes to the lower index
    users, items = np.eye(3, 2, dtype=np.float32), np.array([[1, 0], [0, 2]], dtype=np.float32)
    emb = EmbeddingScorer(users, items, device="cpu")
    assert emb({"user": torch.tensor([1, 0])}).tolist() == [[0.0, 2.0], [1.0, 0.0]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gives_the_cpu_numbers():
    rng = np.random.default_rng(1)
    n_users, n_items = 64, 50
    seen = rng.random((n_users, n_items)) < 0.2
    relevant = (rng.random((n_users, n_items)) < 0.1) & ~seen
    ds = _eval_users(seen, relevant)
    x = sp.csr_matrix(seen.astype(np.float32))
    cpu = evaluate_scorer(EASEScorer(x, 5.0, device="cpu"), ds, n_items, [5, 10], device="cpu")
    gpu = evaluate_scorer(EASEScorer(x, 5.0, device="cuda"), ds, n_items, [5, 10], device="cuda")
    for key, value in cpu.items():
        if key != "stderr":
            assert gpu[key] == pytest.approx(value, abs=1e-6), key
