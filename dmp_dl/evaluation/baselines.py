"""Classic baselines scored with the same full-ranking protocol as the models."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch


class PopularityScorer:
    """Every user gets the items ranked by training popularity."""

    def __init__(self, item_counts: np.ndarray):
        self.scores = torch.as_tensor(np.log1p(item_counts.astype(np.float64)), dtype=torch.float32)

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.scores.expand(len(batch["user"]), -1).clone()


class EASEScorer:
    """EASE (Steck, WWW 2019): closed-form item-item model B = I - P / diag(P), P = (X'X + l2 I)^-1.

    Needs an (n_items, n_items) float64 matrix: use it for catalogues up to a few tens of thousands.
    """

    def __init__(self, interactions: sp.csr_matrix, l2: float = 500.0):
        self.x = interactions.astype(np.float32).tocsr()
        gram = (self.x.T @ self.x).toarray().astype(np.float64)
        gram[np.diag_indices_from(gram)] += l2
        p = np.linalg.inv(gram)
        b = -p / np.diag(p)
        b[np.diag_indices_from(b)] = 0.0
        self.b = torch.as_tensor(b, dtype=torch.float32)

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        rows = self.x[batch["user"].numpy()]
        return torch.as_tensor(rows @ self.b.numpy(), dtype=torch.float32)


class EmbeddingScorer:
    """Dot product of precomputed user vectors (by user index) with item vectors."""

    def __init__(self, user_vectors: np.ndarray, item_vectors: np.ndarray):
        self.users = torch.as_tensor(user_vectors)
        self.items = torch.as_tensor(item_vectors)

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.users[batch["user"]] @ self.items.T
