"""How the served score of a (user, item) pair is computed, for every model the bundle can hold.

``score(u, j) = deep_weight * (user_vector_u . item_vector_j) + shallow_weight * (x_u B)_j``

The first term is the embedding model's dot product (what FAISS serves alone); the second is the
shallow item-item path (EASE, :mod:`dmp_dl.models.ease`), with B the sparse item-item weights and
x_u the user's items: a 0/1 row (``shallow_input="binary"``), or the user's row as the user-level
models read it, each item's event weights decayed with their age (``"rows"``, when the run chose a
recency half-life: :mod:`dmp_dl.data.recency`). ``deep_weight=1, shallow_weight=0`` is a plain embedding
model; ``0, 1`` is EASE alone; both > 0 is the blend the automatic model choice may pick. When
the shallow term is in use, recommendations are scored exactly over the whole catalogue (a dense
(B, n_items) product and a sparse one per batch of users) instead of by an index search, so the
served score is the model's score with no recall lost to candidate generation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from dmp_dl.core.errors import BundleError
from dmp_dl.models.ease import ItemItemScorer
from dmp_dl.store.parts import BundlePart

BINARY, ROWS = "binary", "rows"  # what the shallow term reads of a user (ServedScore.shallow_input)


@dataclass
class ServedScore:
    """The weights of the two terms, the shallow path's weights (None: no shallow term) and what it
    reads of a user: ``binary`` (which items) or ``rows`` (their weighted, recency-decayed row)."""

    deep_weight: float = 1.0
    shallow_weight: float = 0.0
    shallow: ItemItemScorer | None = None
    shallow_input: str = BINARY

    @property
    def uses_shallow(self) -> bool:
        return self.shallow is not None and self.shallow_weight != 0.0

    @property
    def reads_rows(self) -> bool:
        """Whether the shallow term reads each user's weighted row rather than their 0/1 items."""
        return self.uses_shallow and self.shallow_input == ROWS

    def describe(self) -> str:
        if not self.uses_shallow:
            return "embedding dot product"
        rows = " of the recency-weighted rows" if self.shallow_input == ROWS else ""
        if self.deep_weight == 0:
            return f"EASE item-item scores{rows}"
        return f"{self.deep_weight:g} x embedding dot product + {self.shallow_weight:.4g} x EASE item-item scores{rows}"

    def scores(self, user_vectors: torch.Tensor | np.ndarray, item_vectors: torch.Tensor | np.ndarray,
               rows: sp.spmatrix | None) -> torch.Tensor:
        """(B, n_items) float32 scores of B users.

        user_vectors: (B, d); item_vectors: (n_items, d); rows: (B, n_items) sparse, the users'
        items (read only when the shallow term is in use; with their values when :attr:`reads_rows`).
        """
        users = torch.as_tensor(np.asarray(user_vectors, dtype=np.float32)) if isinstance(user_vectors, np.ndarray) else user_vectors
        items = torch.as_tensor(np.asarray(item_vectors, dtype=np.float32)) if isinstance(item_vectors, np.ndarray) else item_vectors
        out = None
        if self.deep_weight != 0.0:
            out = (users.float() @ items.float().T) * self.deep_weight
        if self.uses_shallow:
            if rows is None:
                raise ValueError("the shallow term needs the users' items")
            shallow = self.shallow(rows, weighted=self.shallow_input == ROWS).to(items.device) * self.shallow_weight
            out = shallow if out is None else out + shallow
        if out is None:
            out = torch.zeros(users.shape[0], items.shape[0])
        return out


class BlendScorer:
    """An evaluation scorer (``batch -> (B, n_items)``) for :class:`ServedScore` on known users.

    user_vectors (n_users, d), item_vectors (n_items, d); rows: (n_users, n_items) CSR of the items
    each user's score may read (their training items; their weighted rows when ``served.reads_rows``).
    """

    def __init__(self, served: ServedScore, user_vectors: np.ndarray, item_vectors: np.ndarray, rows: sp.csr_matrix):
        self.served, self.rows = served, sp.csr_matrix(rows)
        self.users = torch.as_tensor(np.ascontiguousarray(user_vectors, dtype=np.float32))
        self.items = torch.as_tensor(np.ascontiguousarray(item_vectors, dtype=np.float32))

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        u = batch["user"].cpu().numpy()
        return self.served.scores(self.users[u], self.items, self.rows[u] if self.served.uses_shallow else None)


def exact_top_k(scores: torch.Tensor, k: int, exclude_indptr: np.ndarray | None = None,
                exclude_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` columns of ``scores`` (B, n) per row, best first, skipping each row's excluded ids.

    Same contract as :func:`dmp_dl.index.ann.search_excluding`: ids (B, k) int64 padded with -1,
    scores (B, k) float32 padded with -inf. Ties go to the lower column.
    """
    scores = scores.float().clone()
    b, n = scores.shape
    if exclude_indptr is not None and len(exclude_ids):
        rows = np.repeat(np.arange(b, dtype=np.int64), np.diff(exclude_indptr))
        scores[torch.from_numpy(rows), torch.from_numpy(np.asarray(exclude_ids, dtype=np.int64))] = float("-inf")
    take = min(k, n)
    top = torch.topk(scores, take, dim=1, sorted=True)
    ids = np.full((b, k), -1, np.int64)
    out = np.full((b, k), -np.inf, np.float32)
    ids[:, :take], out[:, :take] = top.indices.numpy(), top.values.numpy()
    ids[~np.isfinite(out)] = -1
    return ids, out


def rows_matrix(indptr: np.ndarray, ids: np.ndarray, n_cols: int, values: np.ndarray | None = None) -> sp.csr_matrix:
    """A CSR matrix from ragged rows (indptr (B + 1,), ids (nnz,)): 0/1, or ``values`` (nnz,) when given."""
    data = np.ones(len(ids), np.float32) if values is None else np.asarray(values, dtype=np.float32)
    return sp.csr_matrix((data, np.asarray(ids, dtype=np.int64), np.asarray(indptr, dtype=np.int64)),
                         shape=(len(indptr) - 1, n_cols))


# -- the bundle part ------------------------------------------------------------------------------
SCORING_DIR = "scoring"


def scoring_part(served: ServedScore, name: str, refit: bool = False, ease_l2: float | None = None,
                 shallow_fit: dict | None = None):
    """The writer of the ``scoring`` part (:class:`ScoringPart`) storing ``served`` (the sparse item-item weights
    as CSR arrays and the two weights); its manifest entry says how scores are computed, whether
    the model was refitted on every event (``refit``), the l2 of the report's plain EASE baseline
    (``ease_l2``, which ``python -m dmp_dl.evaluate`` fits again) and the served item-item weights'
    ``l2`` and EDLAE ``dropout`` (``shallow_fit``; 0: EASE)."""

    def write(writer) -> dict:
        entry = {"model": name, "refit": bool(refit), "ease_l2": ease_l2, "deep_weight": float(served.deep_weight),
                 "shallow_weight": float(served.shallow_weight), "score": served.describe(), "shallow": None,
                 "shallow_input": served.shallow_input}
        if served.uses_shallow:
            w = served.shallow.weights
            writer.save_array(f"{SCORING_DIR}/item_item_indptr.npy", w.indptr.astype(np.int64))
            writer.save_array(f"{SCORING_DIR}/item_item_indices.npy", w.indices.astype(np.int32))
            writer.save_array(f"{SCORING_DIR}/item_item_weights.npy", w.data.astype(np.float32))
            entry["shallow"] = {"kind": "ease", "items": int(w.shape[0]), "nnz": int(w.nnz),
                                **{k: float(v) for k, v in (shallow_fit or {}).items()}}
        return entry

    return write


def load_scoring(bundle, n_items: int) -> ServedScore | None:
    """The bundle's :class:`ServedScore` (None when it has no ``scoring`` entry: a plain embedding bundle)."""
    entry = bundle.manifest.get(SCORING_DIR)
    if entry is None:
        return None
    where = bundle.root / "manifest.json"
    if not isinstance(entry, dict):
        raise BundleError(f"{where}: 'scoring' must be an object")
    try:
        deep, shallow_w = float(entry["deep_weight"]), float(entry["shallow_weight"])
    except (KeyError, TypeError, ValueError):
        raise BundleError(f"{where}: 'scoring' needs numeric deep_weight and shallow_weight") from None
    if not (np.isfinite(deep) and np.isfinite(shallow_w)):
        raise BundleError(f"{where}: 'scoring' weights must be finite")
    shallow_input = entry.get("shallow_input", BINARY)  # bundles written before it existed read 0/1 items
    if shallow_input not in (BINARY, ROWS):
        raise BundleError(f"{where}: 'scoring.shallow_input' must be {BINARY!r} or {ROWS!r}, got {shallow_input!r}")
    if entry.get("shallow") is None:
        return ServedScore(deep, 0.0, None, shallow_input)
    indptr = bundle.array(f"{SCORING_DIR}/item_item_indptr.npy")
    indices = bundle.array(f"{SCORING_DIR}/item_item_indices.npy")
    weights = bundle.array(f"{SCORING_DIR}/item_item_weights.npy")
    if (indptr.shape != (n_items + 1,) or indptr[-1] != len(indices) or len(indices) != len(weights)
            or (len(indices) and (indices.min() < 0 or indices.max() >= n_items)) or not np.isfinite(weights).all()):
        raise BundleError(f"{bundle.root / SCORING_DIR}: item-item weights do not match the {n_items} items")
    matrix = sp.csr_matrix((weights, indices, indptr), shape=(n_items, n_items))
    return ServedScore(deep, shallow_w, ItemItemScorer(matrix), shallow_input)


class ScoringPart(BundlePart):
    """How recommendations are scored (saved from :func:`scoring_part`'s writer; nothing per user)."""

    name = SCORING_DIR

    def present(self, bundle) -> bool:
        return SCORING_DIR in bundle.manifest

    def load(self, bundle, loaded: Mapping[str, Any], **options: Any) -> ServedScore | None:
        return load_scoring(bundle, len(loaded["vectors"].item_vocab))
