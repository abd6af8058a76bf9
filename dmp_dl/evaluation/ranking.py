"""Evaluating any scorer (a model or a baseline) with full ranking on an evaluation set."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from dmp_dl.core.errors import ConfigError
from dmp_dl.metrics.ranking import RankingAccumulator, batch_metrics
from dmp_dl.models.embeddings import inference_device

ScoreFn = Callable[[dict[str, torch.Tensor]], torch.Tensor]


def default_batch_size(n_items: int, budget: int = 2**24) -> int:
    """Users per batch so that a (B, n_items) score matrix stays near ``budget`` elements."""
    return max(1, min(4096, budget // max(n_items, 1)))


def check_cutoffs(ks: Sequence[int]) -> list[int]:
    """``evaluation.ks`` as sorted distinct positive ints, or a :class:`ConfigError`."""
    try:
        out = sorted({int(k) for k in ks})
    except (TypeError, ValueError):
        out = []
    if not out or out[0] < 1 or any(float(k) != int(k) for k in ks):
        raise ConfigError(f"evaluation.ks must be a non-empty list of positive integers, got {list(ks)}")
    return out


@torch.no_grad()
def evaluate_scorer(
    score_fn: ScoreFn,
    dataset,
    n_items: int,
    ks: Sequence[int],
    item_popularity: torch.Tensor | None = None,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    mrr: bool = True,
) -> dict:
    """Average full-ranking metrics of ``score_fn`` over the users of ``dataset``.

    Parameters
    ----------
    score_fn: batch dict (``user`` (B,), ``history`` (B, L), ...) -> scores (B, n_items).
    dataset: an ``EvalUsers`` (users with held-out items, their seen items and histories).
    item_popularity: (n_items,) share of training events per item, for ``avg_popularity@K``.
    batch_size: users per batch (default: keeps the score matrix near 16M elements).
    device: where ranking runs (default: CUDA when present, else CPU).
    mrr: also the full-ranking ``mrr`` (model selection needs only the metrics at K).

    Returns :meth:`RankingAccumulator.result`. Memory is O(batch_size * n_items), independent of
    the number of users.
    """
    out = evaluate_scorers(lambda batch: {"_": score_fn(batch)}, dataset, n_items, ks, item_popularity,
                           batch_size, device, mrr)
    return out["_"] if "_" in out else RankingAccumulator(n_items, check_cutoffs(ks), item_popularity).result()


@torch.no_grad()
def evaluate_scorers(
    scores_fn: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    dataset,
    n_items: int,
    ks: Sequence[int],
    item_popularity: torch.Tensor | None = None,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    mrr: bool = True,
) -> dict[str, dict]:
    """:func:`evaluate_scorer` of several scorers in one pass over the users: ``scores_fn`` maps a
    batch to ``{name: (B, n_items) scores}`` (so work the scorers share, such as one model's scores
    that several blends add to, is done once per batch), or to an iterator of ``(name, scores)``
    pairs, each matrix then made when it is ranked and freed after (a blend grid of ten weights
    holds two (B, n_items) matrices at a time, not ten). Returns ``{name: result}``."""
    ks = check_cutoffs(ks)
    device = torch.device(device) if device is not None else inference_device()
    accs: dict[str, RankingAccumulator] = {}
    bs = batch_size or default_batch_size(n_items)
    for start in range(0, len(dataset), bs):
        batch = dataset.__getitems__(list(range(start, min(start + bs, len(dataset)))))
        scored = scores_fn(batch)
        for name, scores in scored.items() if isinstance(scored, dict) else scored:
            if name not in accs:
                accs[name] = RankingAccumulator(n_items, ks, item_popularity)
            metrics, top = batch_metrics(scores.to(device=device, dtype=torch.float32), batch, ks, mrr)
            del scores  # a lazy scorer's matrix goes before the next is made
            accs[name].update(metrics, top)
    return {name: acc.result() for name, acc in accs.items()}


def sample_users(dataset, n: int | None, seed: int = 0):
    """``dataset`` (an ``EvalUsers``) limited to a fixed random sample of at most ``n`` users
    (all of them when ``n`` is None or not smaller), in user order."""
    if n is None or len(dataset) <= int(n):
        return dataset
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(len(dataset), size=int(n), replace=False))
    return type(dataset)(dataset.users[keep], dataset.history, dataset.seen, dataset.relevant)
