"""Classic baselines scored with the same full-ranking protocol as the models.

Each scorer maps an evaluation batch (``user`` (B,) ...) to scores (B, n_items) on its device
(default: CUDA when present, else CPU).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from dmp_dl.embeddings import inference_device


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

    Needs an (n_items, n_items) matrix: use it for catalogues up to a few tens of thousands.
    ``precise=True`` (the textbook form): the float64 inverse of X'X + l2 I, on the device;
    ``precise=False``: :func:`dmp_dl.models.ease.ease_weights` in float32, through the primal or the
    dual (Woodbury) form, whichever is cheaper — what the report's baseline uses. Scoring multiplies
    the users' training rows of X by B, as a sparse product on CPU and a dense one on CUDA.
    """

    def __init__(self, interactions: sp.csr_matrix, l2: float = 500.0, device: str | torch.device | None = None,
                 precise: bool = True):
        self.device = _device(device)
        self.x = sp.csr_matrix(interactions, dtype=np.float32)
        if precise:
            gram = torch.as_tensor((self.x.T @ self.x).toarray(), dtype=torch.float64, device=self.device)
            gram.diagonal().add_(l2)
            p = torch.cholesky_inverse(torch.linalg.cholesky(gram))  # gram is symmetric positive definite
            b = p / (-p.diagonal())
            b.diagonal().zero_()
        else:
            from dmp_dl.models.ease import ease_weights

            b = ease_weights(self.x, l2, self.device)
        self.b = b.float()
        self._b_numpy = self.b.numpy() if self.device.type == "cpu" else None

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        rows = self.x[batch["user"].cpu().numpy()]
        if self._b_numpy is not None:
            return torch.from_numpy(np.asarray(rows @ self._b_numpy, dtype=np.float32))
        return rows_times_dense(rows, self.b)


def rows_times_dense(rows: sp.csr_matrix, dense: torch.Tensor) -> torch.Tensor:
    """(B, n) sparse rows times (n, m) ``dense``, on ``dense``'s device via a dense (B, n) copy."""
    coo = rows.tocoo()
    x = torch.zeros(rows.shape, dtype=dense.dtype, device=dense.device)
    x[torch.from_numpy(coo.row).to(dense.device), torch.from_numpy(coo.col).to(dense.device)] = torch.from_numpy(
        coo.data
    ).to(device=dense.device, dtype=dense.dtype)
    return x @ dense


class EmbeddingScorer:
    """Dot product of precomputed user vectors (by user index) with item vectors."""

    def __init__(self, user_vectors: np.ndarray, item_vectors: np.ndarray, device: str | torch.device | None = None):
        device = _device(device)
        self.users = torch.as_tensor(user_vectors, device=device)
        self.items = torch.as_tensor(item_vectors, device=device)

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.users[batch["user"].to(self.users.device)] @ self.items.T
