"""Classic baselines scored with the same full-ranking protocol as the models.

Each scorer maps an evaluation batch (``user`` (B,) ...) to scores (B, n_items) on its device
(default: CUDA when present, else CPU).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from dmp_dl.models import ease as ease_lib
from dmp_dl.models.ease import rows_times
from dmp_dl.models.embeddings import inference_device


def _device(device: str | torch.device | None) -> torch.device:
    return torch.device(device) if device is not None else inference_device()


class PopularityScorer:
    """Every user gets the items ranked by training popularity."""

    def __init__(self, item_counts: np.ndarray, device: str | torch.device | None = None):
        scores = np.log1p(np.asarray(item_counts, dtype=np.float64))
        self.scores = torch.as_tensor(scores, dtype=torch.float32, device=_device(device))

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.scores.expand(len(batch["user"]), -1).clone()


class EASEScorer:
    """EASE (Steck, WWW 2019): closed-form item-item model B = I - P / diag(P), P = (X'X + l2 I)^-1.

    Needs (n_items, n_items) matrices: the memory guard of :mod:`dmp_dl.models.ease` tells how far
    that goes on a device. ``precise=True`` (the textbook form): the float64 inverse of X'X + l2 I,
    on the device; ``precise=False``: the served form of the model choice's EASE candidate —
    :class:`dmp_dl.models.ease.EASESolver` in float32 (primal or dual, whichever is cheaper), each
    item's ``keep_per_item`` largest weights kept (default: what ``model.ease.max_bundle_mb`` =
    256 keeps) — so a run's report and ``python -m dmp_dl.evaluate`` score the same weights.
    Scoring multiplies the users' rows of X by B on the device (a sparse x dense product); ``rows``:
    other 0/1 rows to score users from (e.g. their items up to the test period), default X's.
    """

    def __init__(self, interactions: sp.csr_matrix, l2: float = 500.0, device: str | torch.device | None = None,
                 precise: bool = True, keep_per_item: int | None = None, rows: sp.csr_matrix | None = None):
        self.device = _device(device)
        self.x = sp.csr_matrix(interactions, dtype=np.float32)
        self.rows = self.x if rows is None else sp.csr_matrix(rows, dtype=np.float32)
        self.served = None
        if precise:
            gram = ease_lib.gram_matrix(ease_lib.binary(self.x), self.device).double()
            gram.diagonal().add_(l2)
            p = ease_lib.cholesky_inverse(torch.linalg.cholesky(gram))  # gram is symmetric positive definite
            del gram
            b = p / (-p.diagonal())
            b.diagonal().zero_()
            self.b = b.float()
        else:
            keep = keep_per_item or ease_lib.keep_per_item_for(self.x.shape[1], ease_lib.DEFAULT_BUNDLE_MB)
            solver = ease_lib.EASESolver(self.x, self.device)
            self.served = solver.served(float(l2), keep).to(self.device)
            solver.release()

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        rows = self.rows[batch["user"].cpu().numpy()]
        if self.served is not None:
            return self.served(rows)

        return rows_times(rows, self.b)


class EmbeddingScorer:
    """Dot product of precomputed user vectors (by user index) with item vectors."""

    def __init__(self, user_vectors: np.ndarray, item_vectors: np.ndarray, device: str | torch.device | None = None):
        device = _device(device)
        self.users = torch.as_tensor(user_vectors, device=device)
        self.items = torch.as_tensor(item_vectors, device=device)

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.users[batch["user"].to(self.users.device)] @ self.items.T
