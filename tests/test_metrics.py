"""Ranking metrics: hand-computed cases and agreement with a plain reference loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dmp_dl.evaluation.metrics import RankingAccumulator, batch_metrics, ranking_metrics, topk_with_ties


def test_topk_breaks_ties_by_lower_index():
    s = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0], [-0.0, 0.0, -1.0, float("nan"), float("-inf")]])
    vals, idx = topk_with_ties(s, 3)
    assert idx.tolist() == [[1, 2, 4], [0, 1, 2]]
    assert vals[0].tolist() == [3.0, 3.0, 3.0]


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
    assert m["map@5"].item() == pytest.approx((1 / 2 + 2 / 5) / 2)
    assert m["hit_rate@1"].item() == 0.0 and m["hit_rate@3"].item() == 1.0
    assert m["mrr"].item() == pytest.approx(0.5)
    assert m["precision@5"].item() == pytest.approx(2 / 5)


def test_fewer_relevant_than_k_and_empty_relevant():
    scores = torch.tensor([[3.0, 2.0, 1.0, 0.0], [3.0, 2.0, 1.0, 0.0]])
    rel = torch.tensor([[True, False, False, False], [False] * 4])
    m, _ = ranking_metrics(scores, rel, [3])
    assert m["recall@3"][0].item() == 1.0  # hits / min(3, 1)
    assert m["ndcg@3"][0].item() == 1.0
    assert all(math.isnan(v[1].item()) for v in m.values())  # explicitly undefined
    acc = RankingAccumulator(4, [3])
    acc.update(m, _)
    res = acc.result()
    assert res["n_users"] == 1 and res["n_users_no_relevant"] == 1 and res["recall@3"] == 1.0


def test_seen_items_are_excluded_and_never_recommended():
    scores = torch.tensor([[9.0, 8.0, 1.0, 0.5]])
    batch = {
        "seen_rows": torch.tensor([0, 0]), "seen_cols": torch.tensor([0, 1]),
        "rel_rows": torch.tensor([0]), "rel_cols": torch.tensor([2]),
    }
    m, top = batch_metrics(scores, batch, [3])
    assert top[0].tolist() == [2, 3, -1]  # only 2 rankable items left
    assert m["recall@3"].item() == 1.0 and m["mrr"].item() == 1.0


def reference(scores: np.ndarray, rel: np.ndarray, k: int) -> dict[str, float]:
    """A plain loop over users, written from the definitions."""
    out = {"recall": [], "ndcg": [], "map": [], "hit": [], "mrr": []}
    for s, r in zip(scores, rel):
        relevant = set(np.flatnonzero(r))
        if not relevant:
            continue
        order = sorted(range(len(s)), key=lambda i: (-s[i], i))[:k]
        hits = [i in relevant for i in order]
        denom = min(k, len(relevant))
        out["recall"].append(sum(hits) / denom)
        dcg = sum(1 / math.log2(p + 2) for p, h in enumerate(hits) if h)
        out["ndcg"].append(dcg / sum(1 / math.log2(p + 2) for p in range(denom)))
        precs = [sum(hits[: p + 1]) / (p + 1) for p, h in enumerate(hits) if h]
        out["map"].append(sum(precs) / denom)
        out["hit"].append(float(any(hits)))
        out["mrr"].append(1 / (hits.index(True) + 1) if any(hits) else 0.0)
    return {k2: float(np.mean(v)) for k2, v in out.items()}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_reference_loop(seed):
    rng = np.random.default_rng(seed)
    n_users, n_items, k = 60, 40, 10
    scores = rng.integers(0, 8, size=(n_users, n_items)).astype(np.float32)  # many ties
    rel = rng.random((n_users, n_items)) < 0.08
    m, top = ranking_metrics(torch.from_numpy(scores), torch.from_numpy(rel), [k])
    acc = RankingAccumulator(n_items, [k])
    acc.update(m, top)
    got = acc.result()
    ref = reference(scores, rel, k)
    for ours, theirs in (("recall@10", "recall"), ("ndcg@10", "ndcg"), ("map@10", "map"), ("hit_rate@10", "hit"), ("mrr", "mrr")):
        assert got[ours] == pytest.approx(ref[theirs], abs=1e-6)
