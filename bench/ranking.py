"""One evaluator for every compared model: the package's full-ranking evaluation on a held-out split.

:func:`evaluate` is ``dmp_dl.evaluation.ranking.evaluate_scorer`` (the code ``train.py`` reports
with): full ranking over the catalogue, the user's training items excluded, ties to the lower
item index, Recall@K = hits / min(K, |R|), NDCG@K with binary gains.

:func:`recommenders_metrics` reports the same top-K lists with the definitions of Microsoft
Recommenders' ``python_evaluation`` (the ones behind their published MovieLens table), computed
from the package's per-user metrics by changing only the denominators:

* Precision@K = hits / K (the package's ``precision@K``);
* Recall@K = hits / |R| (theirs divides by |R|, not min(K, |R|));
* nDCG@K: binary gains, ideal list of min(K, |R|) hits (identical to the package's);
* MAP = (1 / |R|) * sum of Precision@i over the ranks i <= K that hold a relevant item (their
  ``map``, named ``map_at_k`` when the published table was made).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dmp_dl.evaluation.baselines import EmbeddingScorer
from dmp_dl.evaluation.heldout import HeldOutSplit
from dmp_dl.evaluation.ranking import default_batch_size, evaluate_scorer
from dmp_dl.metrics.ranking import batch_metrics
from dmp_dl.models.embeddings import inference_device, item_vectors, user_vectors


def split_of(dm, stage: str = "test") -> HeldOutSplit:
    """The ``val`` or ``test`` users of a prepared DataModule, ranked against its training data."""
    return HeldOutSplit(dm.n_users, dm.n_items, dm.train_history, dm.train_seen, dm.item_counts, dm.eval_dataset(stage))


def network_scorer(net: torch.nn.Module, split: HeldOutSplit) -> EmbeddingScorer:
    """A trained network's dot-product scores, users represented by their training history only
    (what ``evaluate_model_and_baselines`` does)."""
    device = inference_device()
    net.to(device).eval()
    users = user_vectors(net, np.arange(split.n_users), split.train_history, device=device)
    items = item_vectors(net, split.n_items, device=device)
    net.cpu()
    return EmbeddingScorer(users, items)


def evaluate(scorer, split: HeldOutSplit, ks: list[int]) -> dict[str, Any]:
    """The package's metrics of ``scorer`` on ``split`` (see ``evaluate_scorer``)."""
    popularity = torch.as_tensor(split.item_counts / max(split.item_counts.sum(), 1), dtype=torch.float32)
    return evaluate_scorer(scorer, split.test, split.n_items, ks, popularity)


@torch.no_grad()
def recommenders_metrics(scorer, split: HeldOutSplit, k: int = 10) -> dict[str, float]:
    """Microsoft Recommenders' Precision@K, Recall@K, nDCG@K and MAP (module docstring), averaged
    over the evaluated users, from the package's per-user ranking metrics."""
    device = inference_device()
    data = split.test
    sums = {"precision": 0.0, "recall": 0.0, "ndcg": 0.0, "map": 0.0}
    n = 0
    bs = default_batch_size(split.n_items)
    for start in range(0, len(data), bs):
        batch = data.__getitems__(list(range(start, min(start + bs, len(data)))))
        scores = scorer(batch).to(device=device, dtype=torch.float32)
        m, _ = batch_metrics(scores, batch, [k])
        n_rel = torch.bincount(batch["rel_rows"], minlength=len(batch["user"])).to(device=device, dtype=torch.float64)
        ok = n_rel > 0
        hits = m[f"precision@{k}"] * k
        per_user = {
            "precision": m[f"precision@{k}"],
            "recall": hits / n_rel.clamp(min=1),
            "ndcg": m[f"ndcg@{k}"],
            "map": m[f"map@{k}"] * n_rel.clamp(max=k) / n_rel.clamp(min=1),
        }
        for name, v in per_user.items():
            sums[name] += float(v[ok].sum())
        n += int(ok.sum())
    return {f"{name}@{k}" if name != "map" else "map": s / max(n, 1) for name, s in sums.items()} | {"n_users": n}
