"""Full-ranking top-K metrics, vectorised over a batch of users (torch, any device).

Protocol: every item of the catalogue is ranked; items the user has already interacted with in
the training period are excluded (their score is set to -inf before ranking); ties in score are
broken by the lower item index, so results are deterministic.

Definitions, for one user with relevant (held-out) set R and top-K list (r_1 .. r_K):

* Recall@K   = |hits in top K| / min(K, |R|)
* NDCG@K     = sum_{i<=K, r_i in R} 1/log2(i+1)  /  sum_{i<=min(K,|R|)} 1/log2(i+1)   (binary gains)
* HitRate@K  = 1 if any of the top K is relevant
* MAP@K      = (1 / min(K, |R|)) * sum_{i<=K, r_i in R} Precision@i
* MRR        = 1 / rank of the first relevant item within the top max(K) (0 if none there)
* Precision@K = |hits in top K| / K

Users with an empty R have no defined value: they get NaN here and are left out of averages
(counted separately by :class:`RankingAccumulator`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_INDEX_BITS = 31


def topk_with_ties(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``k`` per row, best first, ties broken by the lower column index.

    Implemented as one ``torch.topk`` over an int64 key that packs an order-preserving integer
    image of the float32 score above the (inverted) column index.

    Parameters
    ----------
    scores: (B, N) float; NaN counts as -inf. N must be below 2**31.
    k: 1 <= k <= N.

    Returns
    -------
    values (B, k) float32 and indices (B, k) int64.
    """
    n = scores.shape[-1]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..{n}, got {k}")
    if n >= 2**_INDEX_BITS:
        raise ValueError("catalogue too large for tie-broken top-k")
    s = scores.float()
    s = torch.where(torch.isnan(s), float("-inf"), s) + 0.0  # + 0.0 turns -0.0 into +0.0
    bits = s.view(torch.int32).to(torch.int64)
    ordered = torch.where(bits >= 0, bits + 2**31, -1 - bits)  # monotone in the float value
    col = torch.arange(n, device=scores.device, dtype=torch.int64)
    key = ordered * 2**_INDEX_BITS + (2**_INDEX_BITS - 1 - col)
    _, idx = torch.topk(key, k, dim=-1, sorted=True)
    return s.gather(-1, idx), idx


def dense_mask(rows: torch.Tensor, cols: torch.Tensor, shape: tuple[int, int], device=None) -> torch.Tensor:
    """(B, N) bool mask with True at the given (row, col) pairs."""
    mask = torch.zeros(shape, dtype=torch.bool, device=device)
    if rows.numel():
        mask[rows.to(device), cols.to(device)] = True
    return mask


def ranking_metrics(
    scores: torch.Tensor, relevant: torch.Tensor, ks: Sequence[int]
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-user metrics for a batch.

    Parameters
    ----------
    scores: (B, N) float, with excluded (seen) items already at -inf.
    relevant: (B, N) bool, the held-out items.
    ks: cut-offs.

    Returns
    -------
    metrics: name (``recall@10``, ``ndcg@10``, ``hit_rate@10``, ``map@10``, ``precision@10``,
        ``mrr``) -> (B,) float64, NaN for users without relevant items.
    top: (B, max(ks)) int64 recommended item indices, best first; -1 where fewer than K items
        were rankable (all others excluded).
    """
    ks = sorted({int(k) for k in ks})
    kmax = min(ks[-1], scores.shape[1])
    values, top = topk_with_ties(scores, kmax)
    valid = torch.isfinite(values)
    hits = relevant.gather(1, top) & valid  # (B, kmax)
    n_rel = relevant.sum(dim=1).to(torch.float64)
    empty = n_rel == 0
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=scores.device)
    ranks = torch.arange(1, kmax + 1, device=scores.device, dtype=torch.float64)
    discounts = 1.0 / torch.log2(ranks + 1.0)
    h = hits.to(torch.float64)
    cum_hits = h.cumsum(dim=1)
    out: dict[str, torch.Tensor] = {}
    for k in ks:
        kk = min(k, kmax)
        hk = h[:, :kk]
        denom = torch.clamp(torch.minimum(n_rel, torch.tensor(float(k), dtype=torch.float64, device=scores.device)), min=1.0)
        n_hits = hk.sum(dim=1)
        ideal_len = denom.to(torch.int64)
        ideal = torch.cumsum(discounts, 0)[torch.clamp(ideal_len, max=kmax) - 1]
        dcg = (hk * discounts[:kk]).sum(dim=1)
        prec_at_i = cum_hits[:, :kk] / ranks[:kk]
        out[f"recall@{k}"] = torch.where(empty, nan, n_hits / denom)
        out[f"precision@{k}"] = torch.where(empty, nan, n_hits / k)
        out[f"ndcg@{k}"] = torch.where(empty, nan, dcg / ideal)
        out[f"hit_rate@{k}"] = torch.where(empty, nan, (n_hits > 0).to(torch.float64))
        out[f"map@{k}"] = torch.where(empty, nan, (prec_at_i * hk).sum(dim=1) / denom)
    first = torch.where(hits.any(dim=1), hits.to(torch.int64).argmax(dim=1).to(torch.float64) + 1.0, torch.inf)
    out["mrr"] = torch.where(empty, nan, 1.0 / first)
    top = torch.where(valid, top, torch.full_like(top, -1))
    return out, top


class RankingAccumulator:
    """Averages :func:`ranking_metrics` over batches, plus catalogue coverage and popularity.

    coverage@K: distinct items in anyone's top K / catalogue size.
    avg_popularity@K: mean training popularity (share of training events) of the items in the
    top-K lists; lower means more novel recommendations.
    """

    def __init__(self, n_items: int, ks: Sequence[int], item_popularity: torch.Tensor | None = None):
        self.n_items = n_items
        self.ks = sorted({int(k) for k in ks})
        self.sums: dict[str, float] = {}
        self.n_users = 0
        self.n_users_no_relevant = 0
        self.popularity = item_popularity
        self._seen = {k: torch.zeros(n_items, dtype=torch.bool) for k in self.ks}
        self._pop_sum = {k: 0.0 for k in self.ks}
        self._pop_n = {k: 0 for k in self.ks}

    def update(self, metrics: dict[str, torch.Tensor], top: torch.Tensor) -> None:
        first = next(iter(metrics.values()))
        ok = ~torch.isnan(first)
        self.n_users += int(ok.sum())
        self.n_users_no_relevant += int((~ok).sum())
        for name, vals in metrics.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(vals[ok].sum())
        top = top[ok.to(top.device)].cpu()
        for k in self.ks:
            t = top[:, :k]
            t = t[t >= 0]
            self._seen[k][t] = True
            if self.popularity is not None and t.numel():
                self._pop_sum[k] += float(self.popularity[t].sum())
                self._pop_n[k] += int(t.numel())

    def result(self) -> dict[str, float]:
        res = {name: (s / self.n_users if self.n_users else float("nan")) for name, s in self.sums.items()}
        for k in self.ks:
            res[f"coverage@{k}"] = float(self._seen[k].sum()) / max(self.n_items, 1)
            if self.popularity is not None:
                res[f"avg_popularity@{k}"] = self._pop_sum[k] / self._pop_n[k] if self._pop_n[k] else float("nan")
        res["n_users"] = self.n_users
        res["n_users_no_relevant"] = self.n_users_no_relevant
        return res


def batch_metrics(
    scores: torch.Tensor, batch: dict[str, torch.Tensor], ks: Sequence[int]
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """:func:`ranking_metrics` for an evaluation batch (see ``EvalUsers``).

    ``scores`` (B, N) is modified in place: the batch's seen items are set to -inf.
    """
    device = scores.device
    if batch["seen_rows"].numel():
        scores[batch["seen_rows"].to(device), batch["seen_cols"].to(device)] = float("-inf")
    relevant = dense_mask(batch["rel_rows"], batch["rel_cols"], tuple(scores.shape), device)
    return ranking_metrics(scores, relevant, ks)
