"""EASE (Steck, WWW 2019): the closed-form item-item model, as a model of its own and as the
shallow path beside a deep one.

``B = I - P / diag(P)`` with ``P = (X'X + l2 I)^-1`` over the binary user-item matrix X; a user's
scores are ``x_u B`` (zero diagonal: an item never recommends itself). Two exact ways to get P:

* primal, ``(X'X + l2 I)^-1``: one Cholesky of an (items x items) matrix — O(items^3);
* dual, through the Woodbury identity ``P = (I - X' (XX' + l2 I)^-1 X) / l2``: one Cholesky of a
  (users x users) matrix plus a product — O(users^2 items + users^3), far cheaper when a catalogue
  is wider than its user base (few users, many items).

B is dense (items x items), so the catalogue size is bounded by memory:
:func:`check_memory` refuses one line before anything is allocated. The served form is sparse:
each item keeps its ``keep_per_item`` largest weights (:func:`prune_rows`), which bounds the
bundle and makes scoring ``x_u B`` a sparse product.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import scipy.sparse as sp
import torch

from dmp_dl.errors import ConfigError

log = logging.getLogger(__name__)

BYTES_F32 = 4


def dense_bytes(n_users: int, n_items: int) -> int:
    """Peak memory of a fit: B plus the Gram matrix it is built from (float32)."""
    side = min(n_users, n_items)
    return BYTES_F32 * (2 * n_items * n_items + 2 * side * side)


def check_memory(n_users: int, n_items: int, max_memory_gb: float) -> str | None:
    """None when EASE fits in ``max_memory_gb``, else the one-line reason it does not."""
    need = dense_bytes(n_users, n_items)
    if need > max_memory_gb * 2**30:
        return (f"EASE needs a dense {n_items:,} x {n_items:,} matrix ({need / 2**30:.1f} GiB) "
                f"> model.ease.max_memory_gb={max_memory_gb:g}; raise it or use a model without the item-item path")
    return None


def binary(x: sp.spmatrix) -> sp.csr_matrix:
    out = sp.csr_matrix(x, dtype=np.float32, copy=True)
    out.data[:] = 1.0
    out.eliminate_zeros()
    return out


def ease_weights(x: sp.csr_matrix, l2: float, device: str | torch.device = "cpu") -> torch.Tensor:
    """The dense (n_items, n_items) float32 EASE weights of the binary matrix ``x`` (n_users, n_items).

    Uses the primal or the dual form, whichever is cheaper (module docstring); both are exact.
    """
    if not math.isfinite(l2) or l2 <= 0:
        raise ConfigError(f"model.ease.l2 must be a finite number > 0, got {l2}")
    x = binary(x)
    n_users, n_items = x.shape
    device = torch.device(device)
    if n_items <= n_users:
        gram = torch.as_tensor((x.T @ x).toarray(), dtype=torch.float32, device=device)
        gram.diagonal().add_(l2)
        p = torch.cholesky_inverse(torch.linalg.cholesky(gram))
        del gram
    else:
        dense = torch.as_tensor(x.toarray(), dtype=torch.float32, device=device)  # (n_users, n_items)
        kernel = dense @ dense.T
        kernel.diagonal().add_(l2)
        solved = torch.cholesky_solve(dense, torch.linalg.cholesky(kernel))  # K^-1 X, (n_users, n_items)
        del kernel
        p = dense.T @ solved  # X' K^-1 X
        del dense, solved
        p.neg_().diagonal().add_(1.0)
        p.div_(l2)
    b = p.div_(-p.diagonal())  # in place: B = -P / diag(P), then the zero diagonal
    b.diagonal().zero_()
    return b


def prune_rows(b: torch.Tensor, keep_per_item: int) -> sp.csr_matrix:
    """Each row of dense ``b`` (rows, n_cols) reduced to its ``keep_per_item`` largest-magnitude
    weights, as a CSR matrix of the same shape."""
    n_rows, n = b.shape
    keep = min(int(keep_per_item), n)
    if keep >= n:
        out = sp.csr_matrix(b.cpu().numpy())
        out.eliminate_zeros()
        return out
    rows, cols, vals = [], [], []
    for s in range(0, n_rows, 4096):  # bounded temporaries
        block = b[s : s + 4096]
        idx = torch.topk(block.abs(), keep, dim=1).indices
        rows.append(np.repeat(np.arange(s, s + block.shape[0]), keep))
        cols.append(idx.cpu().numpy().ravel())
        vals.append(torch.gather(block, 1, idx).cpu().numpy().ravel())
    out = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n_rows, n))
    out.eliminate_zeros()
    return out


def keep_per_item_for(n_items: int, max_bundle_mb: float) -> int:
    """Weights kept per item so the sparse B (8 bytes a weight: value + column) fits ``max_bundle_mb``."""
    return max(1, min(n_items, int(max_bundle_mb * 2**20 / (8 * max(n_items, 1)))))


class ItemItemScorer:
    """Scores ``x_u B`` of users given as binary rows, with a sparse B (served form of EASE).

    weights: (n_items, n_items) CSR. ``__call__(rows)`` takes a (B, n_items) sparse matrix of the
    users' items and returns (B, n_items) float32 scores as a torch tensor.
    """

    def __init__(self, weights: sp.csr_matrix):
        self.weights = sp.csr_matrix(weights, dtype=np.float32)
        self.n_items = self.weights.shape[0]

    def __call__(self, rows: sp.spmatrix) -> torch.Tensor:
        out = binary(rows) @ self.weights
        return torch.from_numpy(np.asarray(out.toarray() if sp.issparse(out) else out, dtype=np.float32))


class EASESolver:
    """EASE on one binary matrix for several l2 values: validation scores per l2, then the served weights.

    Dual form (more items than users): one eigendecomposition of XX' = V diag(s) V' serves every
    l2: with Z = V'X, ``diag(P) = (1 - sum_k Z_kj^2 / (s_k + l2)) / l2`` and a user's scores on the
    items they do not have are ``-(V_u diag(1 / (s + l2)) Z)_j / diag(P)_j`` (Woodbury), so trying
    an l2 costs a product for the validation users, not a new solve. Primal form: one Cholesky
    per l2 (the best dense B so far is kept).
    """

    def __init__(self, x: sp.csr_matrix):
        self.x = binary(x)
        self.n_users, self.n_items = self.x.shape
        self.dual = self.n_items >= 2 * self.n_users  # an eigendecomposition of XX' beats Choleskys of X'X
        self._dense: tuple[float, torch.Tensor] | None = None
        if self.dual:
            dense = torch.as_tensor(self.x.toarray(), dtype=torch.float64)
            evals, self.v = torch.linalg.eigh(dense @ dense.T)
            self.evals = evals.clamp(min=0.0)
            self.z = (self.v.T @ dense).float()  # (n_users, n_items)
            self.v = self.v.float()

    def _dual_parts(self, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
        inv = (1.0 / (self.evals + l2)).float()
        diag = (1.0 - (self.z.pow(2) * inv[:, None]).sum(0)) / l2
        return inv, diag.clamp(min=1e-12)

    def scores(self, users: np.ndarray, l2: float) -> torch.Tensor:
        """(B, n_items) scores of training users ``users`` (their own rows of x) under l2."""
        if self.dual:
            inv, diag = self._dual_parts(l2)
            solved = (self.v[torch.as_tensor(users)] * inv) @ self.z  # rows of K^-1 X
            return torch.as_tensor(self.x[users].toarray()) - solved / diag
        return torch.as_tensor(np.asarray(self.x[users] @ self.dense(l2).numpy()))

    def dense(self, l2: float) -> torch.Tensor:
        """The dense (n_items, n_items) B for ``l2`` (primal form; the last one is cached)."""
        if self._dense is None or self._dense[0] != l2:
            self._dense = None
            self._dense = (l2, ease_weights(self.x, l2))
        return self._dense[1]

    def served(self, l2: float, keep_per_item: int, chunk: int = 2048) -> "ItemItemScorer":
        """The pruned weights for ``l2`` (:func:`prune_rows`); the dual form builds B ``chunk`` rows at a time."""
        if not self.dual:
            return ItemItemScorer(prune_rows(self.dense(l2), keep_per_item))
        inv, diag = self._dual_parts(l2)
        scaled = self.z * inv[:, None]
        blocks = []
        for s in range(0, self.n_items, chunk):
            cols = slice(s, min(s + chunk, self.n_items))
            p = -(self.z[:, cols].T @ scaled) / l2  # P rows (identity part added below)
            p[torch.arange(p.shape[0]), torch.arange(s, s + p.shape[0])] += 1.0 / l2
            b = p / -diag[None, :]
            b[torch.arange(p.shape[0]), torch.arange(s, s + p.shape[0])] = 0.0
            blocks.append(prune_rows(b, keep_per_item))
        return ItemItemScorer(sp.vstack(blocks).tocsr())


def l2_grid(x: sp.csr_matrix, scales: list[float]) -> list[float]:
    """Candidate l2 values relative to the mean item frequency (the diagonal of X'X), so one grid
    fits logs of any size: the best l2 on MovieLens-sized logs sits near 5 x that mean."""
    base = max(float(binary(x).nnz) / max(x.shape[1], 1), 1.0)
    return sorted({float(round(base * s, 3)) for s in scales})
