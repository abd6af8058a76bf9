"""Full-ranking top-K metrics, vectorised over a batch of users (torch, any device).

Protocol: every item of the catalogue is ranked; items the user has already interacted with in
the training period are excluded (their score is set to -inf before ranking); ties in score are
broken by the lower item index, so results are deterministic.

Definitions (:data:`DEFINITIONS`), for one user with relevant (held-out) set R and top-K list
(r_1 .. r_K):

* Recall@K   = |hits in top K| / min(K, |R|)
* NDCG@K     = sum_{i<=K, r_i in R} 1/log2(i+1)  /  sum_{i<=min(K,|R|)} 1/log2(i+1)   (binary gains)
* HitRate@K  = 1 if any of the top K is relevant
* MAP@K      = (1 / min(K, |R|)) * sum_{i<=K, r_i in R} Precision@i
* MRR        = 1 / rank of the best-ranked relevant item in the full ranking (0 if every relevant
  item is excluded)
* Precision@K = |hits in top K| / K

Users with an empty R have no defined value: they get NaN here and are left out of averages
(counted separately by :class:`RankingAccumulator`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

_INDEX_BITS = 31

# The definitions the numbers follow, quoted verbatim by the offline report.
DEFINITIONS: dict[str, str] = {
    "recall@K": "hits in the top K / min(K, |R|)",
    "precision@K": "hits in the top K / K",
    "ndcg@K": "DCG@K / ideal DCG@K with binary gains and discount 1/log2(rank + 1); the ideal list has min(K, |R|) hits",
    "hit_rate@K": "1 if at least one of the top K is relevant, else 0",
    "map@K": "(1 / min(K, |R|)) * sum over ranks i <= K holding a relevant item of precision@i",
    "mrr": "1 / rank of the best-ranked relevant item in the full ranking (not truncated at K); "
    "0 if every relevant item is excluded",
    "coverage@K": "distinct items in the evaluated users' top-K lists / catalogue size",
    "avg_popularity@K": "mean share of training events of the recommended items (top K of every evaluated user); "
    "lower means more novel recommendations",
}


def tie_broken_keys(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer sort keys: a larger key ranks higher; equal scores rank the lower column index first.

    The key packs an order-preserving integer image of the float32 score above the inverted
    column index, so one integer comparison orders by (score desc, index asc).

    Parameters
    ----------
    scores: (B, N) float; NaN counts as -inf. N must be below 2**31.

    Returns
    -------
    scores (B, N) float32 with NaN replaced by -inf, and keys (B, N) int64.
    """
    n = scores.shape[-1]
    if n >= 2**_INDEX_BITS:
        raise ValueError("catalogue too large for tie-broken ranking")
    s = scores.float()
    s = torch.where(torch.isnan(s), float("-inf"), s) + 0.0  # + 0.0 turns -0.0 into +0.0
    bits = s.view(torch.int32)
    # Flipping the magnitude bits of negative floats makes the int32 order equal the float order.
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    key = ordered.to(torch.int64)
    key.mul_(2**_INDEX_BITS)
    key.add_(torch.arange(2**_INDEX_BITS - 1, 2**_INDEX_BITS - 1 - n, -1, device=scores.device, dtype=torch.int64))
    return s, key


def _finite_or_minus_inf(scores: torch.Tensor) -> torch.Tensor:
    """``scores`` as float32 with NaN replaced by -inf (no copy when there is nothing to replace)."""
    s = scores.float()
    nan = torch.isnan(s)
    return torch.where(nan, float("-inf"), s) if bool(nan.any()) else s


def _top(s: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top ``k`` of float32 ``s`` (B, N), best first, ties broken by the lower column, NaN as -inf.

    Returns (values (B, k), columns (B, k), ``s`` with NaN replaced where the ranking needed it:
    a NaN left in it compares as -inf would, unequal to everything). One float
    top-k of ``k + 1`` over the matrix: a row whose (k+1)-th value is below its k-th has no tie at
    the cut-off and is done; only rows with a tie there (or a NaN) are redone exactly.
    """
    n = s.shape[1]
    probe = min(k + 1, n)
    if s.device.type == "cpu" and s.dtype == torch.float32 and s.numel() > 0 and n >= HEAP_MIN_RATIO * probe:
        values, idx, s = _heap_top(s, probe)
    else:
        values, idx = torch.topk(s, probe, dim=1, sorted=True)
        if bool(torch.isnan(values).any()):  # torch ranks NaN above everything: clean them and start again
            s = _finite_or_minus_inf(s)
            values, idx = torch.topk(s, probe, dim=1, sorted=True)
    if probe > k:
        tied = values[:, k] == values[:, k - 1]
        values, idx = values[:, :k].contiguous(), idx[:, :k].contiguous()
        if bool(tied.any()):
            rows = tied.nonzero().squeeze(1)
            sub, t = s[rows], values[rows, k - 1 :]
            above = sub > t
            need = k - above.sum(dim=1, keepdim=True)  # how many of the tied items fit, lowest columns first
            equal = sub == t
            take = above | (equal & (equal.cumsum(dim=1) <= need))
            chosen = take.nonzero()[:, 1].view(len(rows), k)  # row-major: each row's columns ascending
            idx[rows] = chosen
            values[rows] = sub.gather(1, chosen)
    order = idx.argsort(dim=1)  # (score desc, column asc): a stable sort by score of the column-sorted list
    idx, values = idx.gather(1, order), values.gather(1, order)
    order = values.argsort(dim=1, descending=True, stable=True)
    return values.gather(1, order), idx.gather(1, order), s


HEAP_MIN_RATIO = 32  # heaps beat torch.topk on the CPU from about 20 columns per value kept (0.66x at 6)


def _heap_top(s: torch.Tensor, probe: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top ``probe`` values and columns of float32 CPU ``s`` (B, N), best first, NaN as -inf, and
    ``s`` (with NaN replaced when a row done again had any).

    faiss's heaps (one per row, rows spread over its threads) read each score once: 1.9x
    ``torch.topk`` at (838, 20,000) for 51 values on 2 cores (``bench/cpu_steps.py``), but slower
    where few columns are ranked per value kept (:data:`HEAP_MIN_RATIO`). A heap keeps only values above the
    lowest float32, so a row with fewer such values than ``probe`` (-inf for excluded items) is
    done again by ``torch.topk``; NaN never enters a heap, as -inf would not."""
    import faiss

    b, _ = s.shape
    scores = s.detach().contiguous().numpy()
    values = torch.empty(b, probe, dtype=torch.float32)
    idx = torch.empty(b, probe, dtype=torch.int64)
    heaps = faiss.float_minheap_array_t()
    heaps.nh, heaps.k = b, probe
    heaps.val, heaps.ids = faiss.swig_ptr(values.numpy()), faiss.swig_ptr(idx.numpy())
    heaps.heapify()
    heaps.addn(s.shape[1], faiss.swig_ptr(scores))
    heaps.reorder()
    short = (idx[:, -1] < 0).nonzero().squeeze(1)
    if len(short):
        if bool(torch.isnan(s[short]).any()):  # its ties at -inf are broken on the cleaned scores
            s = _finite_or_minus_inf(s)
        values[short], idx[short] = torch.topk(s[short], probe, dim=1, sorted=True)
    return values, idx, s


def topk_with_ties(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``k`` per row, best first, ties broken by the lower column index.

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
    values, idx, _ = _top(scores.float(), k)
    return values, idx


CHUNK_ELEMENTS = 2**20  # a CPU compares this many scores at a time: their masks stay small and in cache


def _block_counts(part: torch.Tensor, threshold: torch.Tensor, first_col: torch.Tensor,
                  cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_counts_above_and_tied_before` of one block of rows."""
    above = (part > threshold[:, None]).sum(dim=1, dtype=torch.int32)
    equal = part == threshold[:, None]
    tied_before = torch.zeros_like(above)
    # only rows where another column shares the threshold count the columns before it
    tied = ((equal.sum(dim=1, dtype=torch.int32) > 1) & (threshold > float("-inf"))).nonzero().squeeze(1)
    if len(tied):
        tied_before[tied] = (equal[tied] & (cols[None, :] < first_col[tied, None])).sum(dim=1, dtype=torch.int32)
    return above, tied_before


def _counts_above_and_tied_before(s: torch.Tensor, threshold: torch.Tensor,
                                  first_col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) int32 counts of each row's entries of ``s`` (B, N) above ``threshold`` (B,), and of its
    entries equal to it in columns before ``first_col`` (B,) (those rank above it under the lower
    column first).

    On a CPU, blocks of rows of about :data:`CHUNK_ELEMENTS` scores at a time: the masks stay small
    and in cache (two (B, N) masks would each be a fresh allocation the size of the scores: 4x slower
    at 838 x 20,000), and the columns before a tie are counted on the block's equality mask while it
    is in cache, not by reading the row again."""
    b, n = s.shape
    cols = torch.arange(n, device=s.device)
    if s.device.type != "cpu" or b * n <= CHUNK_ELEMENTS:
        return _block_counts(s, threshold, first_col, cols)
    above = torch.empty(b, dtype=torch.int32)
    tied_before = torch.empty(b, dtype=torch.int32)
    rows = max(1, CHUNK_ELEMENTS // n)
    for start in range(0, b, rows):
        part = slice(start, start + rows)
        above[part], tied_before[part] = _block_counts(s[part], threshold[part], first_col[part], cols)
    return above, tied_before


def _ranks_of_best(s: torch.Tensor, rel_rows: torch.Tensor, rel_cols: torch.Tensor) -> torch.Tensor:
    """(B,) float64 full-ranking position (1 = first) of each row's best-ranked held-out item
    (pairs ``rel_rows``, ``rel_cols``; -inf scores are not rankable) under (score desc, column
    asc); +inf for rows without a rankable one."""
    b, n = s.shape
    rel_scores = s[rel_rows, rel_cols]
    rel_scores = torch.where(torch.isnan(rel_scores), float("-inf"), rel_scores)  # NaN ranks as -inf
    best = torch.full((b,), float("-inf"), device=s.device).scatter_reduce(0, rel_rows, rel_scores, "amax")
    rankable = best > float("-inf")
    # the lowest column among a row's held-out items with the best score ranks first of them
    at_best = (rel_scores == best[rel_rows]) & (rel_scores > float("-inf"))
    best_col = torch.full((b,), n, dtype=torch.int64, device=s.device).scatter_reduce(
        0, rel_rows[at_best], rel_cols[at_best], "amin")
    above, tied_before = _counts_above_and_tied_before(s, best, best_col)
    rank = (above + tied_before + 1).to(torch.float64)
    return torch.where(rankable, rank, torch.full_like(rank, float("inf")))


def dense_mask(rows: torch.Tensor, cols: torch.Tensor, shape: tuple[int, int], device=None) -> torch.Tensor:
    """(B, N) bool mask with True at the given (row, col) pairs."""
    mask = torch.zeros(shape, dtype=torch.bool, device=device)
    if rows.numel():
        mask[rows.to(device), cols.to(device)] = True
    return mask


def ranking_metrics(
    scores: torch.Tensor, relevant: torch.Tensor, ks: Sequence[int], mrr: bool = True
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-user metrics for a batch.

    Parameters
    ----------
    scores: (B, N) float, with excluded (seen) items already at -inf.
    relevant: (B, N) bool, the held-out items.
    ks: cut-offs (positive integers; a K above N ranks the whole catalogue).
    mrr: also the full-ranking ``mrr`` (two more passes over the scores; model selection needs
        only the metrics at K).

    Returns
    -------
    metrics: name (``recall@10``, ``ndcg@10``, ``hit_rate@10``, ``map@10``, ``precision@10``,
        ``mrr``) -> (B,) float64, NaN for users without relevant items.
    top: (B, max(ks)) int64 recommended item indices, best first; -1 where fewer than K items
        were rankable (all others excluded).
    """
    rows, cols = relevant.nonzero(as_tuple=True)
    return pair_metrics(scores, rows, cols, ks, mrr)


def pair_metrics(
    scores: torch.Tensor, rel_rows: torch.Tensor, rel_cols: torch.Tensor, ks: Sequence[int], mrr: bool = True
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """:func:`ranking_metrics` with the held-out items as distinct (row, column) pairs (int64 (R,)
    each), so no dense (B, N) mask is built: the cost is one top-k over ``scores`` (plus two passes
    for ``mrr``)."""
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"cut-offs must be positive integers, got {ks}")
    if scores.shape[1] >= 2**_INDEX_BITS:
        raise ValueError("catalogue too large for tie-broken ranking")
    device = scores.device
    b, n = scores.shape
    rel_rows, rel_cols = rel_rows.to(device), rel_cols.to(device)
    kmax = min(ks[-1], n)
    top_scores, top, s = _top(scores.float(), kmax)
    valid = top_scores > float("-inf")
    rel_keys = torch.sort(rel_rows * n + rel_cols).values
    top_keys = torch.arange(b, device=device)[:, None] * n + top
    at = torch.searchsorted(rel_keys, top_keys).clamp(max=max(len(rel_keys) - 1, 0))
    hits = (rel_keys[at] == top_keys) & valid if len(rel_keys) else torch.zeros_like(valid)  # (B, kmax)
    n_rel = torch.bincount(rel_rows, minlength=b).to(torch.float64)
    empty = n_rel == 0
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=device)
    ranks = torch.arange(1, kmax + 1, device=device, dtype=torch.float64)
    discounts = 1.0 / torch.log2(ranks + 1.0)
    ideal_dcg = torch.cumsum(discounts, 0)
    h = hits.to(torch.float64)
    precision_at_rank = h.cumsum(dim=1) / ranks
    out: dict[str, torch.Tensor] = {}
    for k in ks:
        kk = min(k, kmax)
        hk = h[:, :kk]
        denom = torch.clamp(torch.clamp(n_rel, max=float(k)), min=1.0)  # min(K, |R|), 1 for empty R
        n_hits = hk.sum(dim=1)
        ideal = ideal_dcg[torch.clamp(denom.to(torch.int64), max=kmax) - 1]
        dcg = (hk * discounts[:kk]).sum(dim=1)
        out[f"recall@{k}"] = torch.where(empty, nan, n_hits / denom)
        out[f"precision@{k}"] = torch.where(empty, nan, n_hits / k)
        out[f"ndcg@{k}"] = torch.where(empty, nan, dcg / ideal)
        out[f"hit_rate@{k}"] = torch.where(empty, nan, (n_hits > 0).to(torch.float64))
        out[f"map@{k}"] = torch.where(empty, nan, (precision_at_rank[:, :kk] * hk).sum(dim=1) / denom)
    if mrr:
        rank = _ranks_of_best(s, rel_rows, rel_cols)
        out["mrr"] = torch.where(empty, nan, torch.where(torch.isinf(rank), torch.zeros_like(rank), 1.0 / rank))
    top = torch.where(valid, top, torch.full_like(top, -1))
    return out, top


class RankingAccumulator:
    """Averages :func:`ranking_metrics` over batches, plus catalogue coverage and popularity.

    coverage@K: distinct items in anyone's top K / catalogue size.
    avg_popularity@K: mean training popularity (share of training events) of the items in the
    top-K lists; lower means more novel recommendations.

    ``result()`` also gives the standard error of each averaged metric (``stderr``), so two models
    can be told apart from noise.
    """

    def __init__(self, n_items: int, ks: Sequence[int], item_popularity: torch.Tensor | None = None):
        self.n_items = n_items
        self.ks = sorted({int(k) for k in ks})
        self.sums: dict[str, float] = {}
        self.sums_sq: dict[str, float] = {}
        self.n_users = 0
        self.n_users_no_relevant = 0
        self.popularity = None if item_popularity is None else torch.as_tensor(item_popularity).cpu()
        self._seen = {k: torch.zeros(n_items, dtype=torch.bool) for k in self.ks}
        self._pop_sum = {k: 0.0 for k in self.ks}
        self._pop_n = {k: 0 for k in self.ks}

    def update(self, metrics: dict[str, torch.Tensor], top: torch.Tensor) -> None:
        """Add a batch: ``metrics`` name -> (B,) (NaN for users without relevant items), ``top`` (B, K)."""
        first = next(iter(metrics.values()))
        ok = ~torch.isnan(first)
        self.n_users += int(ok.sum())
        self.n_users_no_relevant += int((~ok).sum())
        for name, vals in metrics.items():
            v = vals[ok]
            self.sums[name] = self.sums.get(name, 0.0) + float(v.sum())
            self.sums_sq[name] = self.sums_sq.get(name, 0.0) + float((v * v).sum())
        top = top[ok.to(top.device)].cpu()
        for k in self.ks:
            t = top[:, :k]
            t = t[t >= 0]
            self._seen[k][t] = True
            if self.popularity is not None and t.numel():
                self._pop_sum[k] += float(self.popularity[t].sum())
                self._pop_n[k] += int(t.numel())

    def result(self) -> dict:
        """Averages (``recall@10`` ...), ``coverage@K``, ``avg_popularity@K``, ``n_users``,
        ``n_users_no_relevant`` and ``stderr`` (metric -> standard error of its mean)."""
        n = self.n_users
        res: dict = {name: (s / n if n else float("nan")) for name, s in self.sums.items()}
        for k in self.ks:
            res[f"coverage@{k}"] = float(self._seen[k].sum()) / max(self.n_items, 1)
            if self.popularity is not None:
                res[f"avg_popularity@{k}"] = self._pop_sum[k] / self._pop_n[k] if self._pop_n[k] else float("nan")
        res["n_users"] = n
        res["n_users_no_relevant"] = self.n_users_no_relevant
        res["stderr"] = {name: _stderr(self.sums[name], self.sums_sq[name], n) for name in self.sums}
        return res


def _stderr(total: float, total_sq: float, n: int) -> float:
    """Standard error of a mean from the sum and the sum of squares of n values (sample variance)."""
    if n < 2:
        return float("nan")
    var = max(total_sq - total * total / n, 0.0) / (n - 1)
    return math.sqrt(var / n)


def batch_metrics(
    scores: torch.Tensor, batch: dict[str, torch.Tensor], ks: Sequence[int], mrr: bool = True
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """:func:`ranking_metrics` for an evaluation batch (see ``EvalUsers``).

    ``scores`` (B, N) is modified in place: the batch's seen items are set to -inf.
    """
    device = scores.device
    if batch["seen_rows"].numel():
        scores[batch["seen_rows"].to(device), batch["seen_cols"].to(device)] = float("-inf")
    return pair_metrics(scores, batch["rel_rows"], batch["rel_cols"], ks, mrr)
