"""``Recommender``: the questions a marketer's system asks of a trained bundle.

* ``recommend(user_id)``: the items a known user should see (nearest items to the user's vector),
  optionally under business rules: categories or items left out, categories or items boosted
  (:mod:`dmp_dl.serving.item_rules`).
* ``recommend_for_history(item_ids)``: the same for a user the model has never seen, described by
  recent items (and optionally attributes): the network's cold-start user tower, run on CPU.
* ``similar_items(item_id)``: the items most like an item (item-item weights, or item vectors
  without their popularity part).
* ``lookalike(seed_user_ids)``: audience expansion, nearest users to a seed set.
* ``propensity(user_ids)``: how likely each user is to buy (needs a bundle with a propensity model).
* ``profile(user_id)`` / ``segment(user_id)`` / ``segments()``: interest profiles and segments
  (bundles exported with ``audience.enabled``; :mod:`dmp_dl.audience`).
* ``uplift(user_ids)``: how much a contact raises each user's chance to convert (bundles with an
  uplift model, added by ``python -m dmp_dl.audience task=uplift``; :mod:`dmp_dl.campaign`).

Every score is an inner product of vectors, served by the bundle's FAISS indexes. Each single-id
method has a batch form (``recommend_batch``, ``recommend_for_histories``, ``similar_items_batch``)
that answers many queries with one vectorised index search; nightly audience jobs use those.

Unknown ids raise :class:`~dmp_dl.core.errors.UnknownIdError` (a ``KeyError``) naming the id; a bad
parameter (``k`` outside 1..``max_k``, an empty seed set) raises :class:`InvalidRequestError`
(a ``ValueError``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from dmp_dl.core.arrays import unique_sorted
from dmp_dl.core.errors import BundleError, DmpError, UnknownIdError
from dmp_dl.core.parallel import sparse_product_dense
from dmp_dl.data.pseudonymize import bundle_pseudonymizer
from dmp_dl.data.recency import row_strength
from dmp_dl.data.schema import MAX_ABS_VALUE, canonical_id
from dmp_dl.data.vocab import IdVocab
from dmp_dl.index.ann import search_excluding
from dmp_dl.serving.item_rules import ItemRules
from dmp_dl.store.bundle import Bundle, MissingPartError
from dmp_dl.store.contents import SERVED, load_parts

log = logging.getLogger(__name__)

DEFAULT_MAX_K = 1000
EXACT_SCORES_PER_STEP = 1 << 24  # scores (users x items) held at once by exact scoring: 64 MiB of float32
LOOKALIKE_METHODS = ("centroid", "neighbours", "contrast")
Ranked = list[tuple[str, float]]


class InvalidRequestError(DmpError, ValueError):
    """A parameter of a query is out of range or malformed."""


def _ragged_gather(indptr: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The CSR rows ``rows`` of ``indptr``: their new indptr (len(rows) + 1,) and the positions (nnz',)
    of their entries in the old arrays, vectorised."""
    starts, counts = indptr[rows], indptr[rows + 1] - indptr[rows]
    new_indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(counts, out=new_indptr[1:])
    return new_indptr, np.repeat(starts - new_indptr[:-1], counts) + np.arange(new_indptr[-1], dtype=np.int64)


def _ragged_rows(indptr: np.ndarray, indices: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The CSR rows ``rows`` of (indptr, indices) as a new (indptr, indices) pair, vectorised."""
    new_indptr, gather = _ragged_gather(indptr, rows)
    return new_indptr, indices[gather].astype(np.int64)


def _distinct_rows(rows: np.ndarray, ids: np.ndarray, n_rows: int, n_ids: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, id) pairs -> CSR (indptr, ids) with each row's distinct ids."""
    keys = unique_sorted(rows.astype(np.int64) * n_ids + ids)
    counts = np.bincount(keys // n_ids, minlength=n_rows)
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    return indptr, keys % n_ids


def _top_k_rows(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` columns of each row of ``scores`` (B, n), best first, skipping -inf: (B, k) int64 ids padded with -1 and (B, k) float32 scores padded with -inf."""
    b, n = scores.shape
    kk = min(k, n)
    part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk] if kk < n else np.broadcast_to(np.arange(n), (b, n)).copy()
    top = np.take_along_axis(scores, part, axis=1)
    order = np.lexsort((part, -top), axis=1)
    ids, vals = np.take_along_axis(part, order, axis=1), np.take_along_axis(top, order, axis=1)
    out_ids = np.full((b, k), -1, np.int64)
    out_scores = np.full((b, k), -np.inf, np.float32)
    keep = np.isfinite(vals)
    out_ids[:, :kk] = np.where(keep, ids, -1)
    out_scores[:, :kk] = np.where(keep, vals, -np.inf)
    return out_ids, out_scores


def lookalike_search(user_index, user_vectors: np.ndarray, seed_vectors: np.ndarray, exclude_rows: np.ndarray | None,
                     k: int, method: str = "centroid") -> tuple[np.ndarray, np.ndarray]:
    """The users most like ``seed_vectors`` (s, dim) among ``user_vectors`` (n, dim), searched with
    ``user_index`` (built over ``user_vectors``; :meth:`Recommender.lookalike` explains the methods).

    exclude_rows: distinct user rows never returned (the seeds' own rows), or None.
    Returns user rows (m,) int64 and scores (m,) float64, best first (m < k only when fewer users are left).
    """
    n_users = len(user_vectors)
    k = min(int(k), n_users)  # a larger audience than there are users would only allocate padding
    rows = np.unique(np.asarray(exclude_rows, dtype=np.int64)) if exclude_rows is not None else np.zeros(0, np.int64)
    excluded = (np.array([0, len(rows)], np.int64), rows) if exclude_rows is not None else (None, None)
    if method in ("centroid", "contrast"):
        centroid = seed_vectors.mean(axis=0, keepdims=True)
        if method == "contrast":  # what sets the seeds apart from everybody (Rocchio)
            centroid = centroid - user_vectors.mean(axis=0, keepdims=True)
        ids, scores = search_excluding(user_index, user_vectors, centroid, k, *excluded)
        keep = ids[0] >= 0
        return ids[0][keep].astype(np.int64), scores[0][keep].astype(np.float64)
    per_seed = min(n_users, k + len(seed_vectors))
    ids, scores = search_excluding(user_index, user_vectors, seed_vectors, per_seed)
    found = ids >= 0
    votes = np.bincount(ids[found], weights=scores[found], minlength=n_users)
    candidate = np.zeros(n_users, dtype=bool)
    candidate[ids[found]] = True
    candidate[rows] = False
    cand = np.flatnonzero(candidate)
    top = cand[np.lexsort((cand, -votes[cand]))[:k]]
    return top.astype(np.int64), votes[top].astype(np.float64)


class Recommender:
    """Queries over one bundle, all in memory. Build with :meth:`load`.

    Parameters
    ----------
    user_vocab, item_vocab: id vocabularies; row i of each array is id i.
    user_vectors (n_users, dim), item_vectors (n_items, dim): float32.
    seen: (n_users, n_items) CSR, the items each user interacted with (``exclude_seen``).
    item_index, user_index: FAISS inner-product indexes over item_vectors / user_vectors.
    network: the cold-start network (or None); user_features: its user FeatureTable;
    history_len: recent items the network reads.
    user_table: the user table's (CRM) columns, encoded, a row per user and one for an unknown
        user (a :class:`~dmp_dl.data.features.FeatureTable`), whatever the network reads; or None.
    propensity: a propensity scorer with ``score_known(user_idx)`` (or None).
    manifest: the bundle manifest; max_k: the largest ``k`` any query accepts.
    pseudonymizer: when the bundle's user ids are keyed pseudonyms (``privacy.pseudonymize``), the
        :class:`~dmp_dl.privacy.Pseudonymizer` that maps the raw ids queries give to them; users
        returned (lookalike) are then pseudonyms.
    profiles, segments: the bundle's :class:`~dmp_dl.audience.profiles.Profiles` and
        :class:`~dmp_dl.audience.bundle.StoredSegments` (or None).
    item_categories: the bundle's :class:`~dmp_dl.serving.item_rules.ItemCategories` (or None), read
        by the category rules of :meth:`recommend`.
    seen_sums: (n_users, n_items) CSR with ``seen``'s pattern: each pair's summed event weights,
        decayed with ``half_life_days`` to the user's latest event (:mod:`dmp_dl.data.recency`), or
        None (bundles written before they were stored). A user's row, as the user-level models and
        a ``rows``-reading served score read it, is ``log2(1 + sums)``.

    ``metrics`` holds the training run's metrics when the Recommender comes from
    :func:`dmp_dl.fit` (None when loaded from a bundle).
    """

    def __init__(self, *, user_vocab: IdVocab, item_vocab: IdVocab, user_vectors: np.ndarray,
                 item_vectors: np.ndarray, seen: sp.csr_matrix, item_index, user_index,
                 network=None, user_features=None, history_len: int = 20, propensity=None,
                 manifest: Mapping[str, Any] | None = None, max_k: int = DEFAULT_MAX_K, pseudonymizer=None,
                 profiles=None, segments=None, served=None, item_categories=None, seen_sums=None,
                 half_life_days: float | None = None, user_table=None):
        if int(max_k) < 1:
            raise InvalidRequestError(f"max_k must be >= 1, got {max_k}")
        self.user_vocab, self.item_vocab = user_vocab, item_vocab
        # id -> row dicts: one lookup is ~0.1 µs, where pandas get_indexer costs ~250 µs per call
        self._user_rows = {u: i for i, u in enumerate(user_vocab.ids.tolist())}
        self._item_rows = {t: i for i, t in enumerate(item_vocab.ids.tolist())}
        self.user_vectors = np.ascontiguousarray(user_vectors, dtype=np.float32)
        self.item_vectors = np.ascontiguousarray(item_vectors, dtype=np.float32)
        seen = sp.csr_matrix(seen)
        self._seen_indptr, self._seen_items = seen.indptr.astype(np.int64), seen.indices.astype(np.int64)
        self._seen_sums = self._seen_strength = None
        if seen_sums is not None:
            sums = sp.csr_matrix(seen_sums)
            if sums.shape != seen.shape or not np.array_equal(sums.indptr, seen.indptr) or not np.array_equal(sums.indices, seen.indices):
                raise ValueError("seen_sums must have exactly the pattern of seen")
            self._seen_sums = np.asarray(sums.data, dtype=np.float64)
            self._seen_strength = row_strength(self._seen_sums)
        self.half_life_days = None if half_life_days is None else float(half_life_days)
        self.item_index, self.user_index = item_index, user_index
        self.network, self.user_features, self.history_len = network, user_features, int(history_len)
        self.user_table = user_table
        self._propensity = propensity
        self.manifest = dict(manifest or {})
        self.max_k = int(max_k)
        self.pseudonymizer = pseudonymizer
        self.profiles, self.stored_segments = profiles, segments
        self.uplift_model = None  # a campaign.bundle.UpliftScorer, when the bundle has one
        self.bundle_root = None  # the folder :meth:`load` read (parts not served are read from there)
        # How recommendations are scored: None or a plain dot product -> the FAISS item index;
        # with the item-item (EASE) term -> exact scores over the catalogue (dmp_dl.models.scoring)
        self.served = served if served is not None and served.uses_shallow else None
        if self.served is not None and self.served.reads_rows and self._seen_strength is None:
            raise BundleError("the served score reads each user's weighted row (scoring.shallow_input=rows), and the "
                              "bundle stores none (user_rows); export the bundle again")
        self.item_categories = item_categories
        self.metrics: dict | None = None

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike, max_k: int = DEFAULT_MAX_K, search_params: str | None = None,
             pseudonymizer=None) -> "Recommender":
        """Load and verify the bundle at ``path`` (manifest, format version, every checksum).

        search_params: optional ``ParameterSpace`` string (``efSearch=256``, ``nprobe=64``) that
        overrides the bundle's for its approximate indexes (exact ones are left alone).
        pseudonymizer: the key of a bundle with pseudonymised user ids; default: the secret from
        the environment variable / file its training run read (recorded in the manifest).
        Raises :class:`BundleError` naming the file when the bundle is missing, corrupt or from an
        incompatible version, and when its ids are pseudonymised and the secret is missing or wrong.
        """
        b = Bundle.open(path)
        pseudonymizer = bundle_pseudonymizer(b.manifest, b.root, pseudonymizer)
        rec = cls.from_parts(b, load_parts(b, SERVED, search_params=search_params), max_k=max_k,
                             pseudonymizer=pseudonymizer)
        # the uplift model reads the inputs above, so it is checked against them
        rec.uplift_model = load_parts(b, ("uplift",), {"recommender": rec})["uplift"]
        rec.bundle_root = b.root
        return rec

    @classmethod
    def from_parts(cls, bundle: Bundle, parts: Mapping[str, Any], max_k: int = DEFAULT_MAX_K,
                   pseudonymizer=None) -> "Recommender":
        """A Recommender over ``bundle``'s loaded parts (:func:`dmp_dl.store.contents.load_parts`
        of :data:`~dmp_dl.store.contents.SERVED`; parts the bundle lacks are None)."""
        vectors, indexes = parts["vectors"], parts["indexes"]
        network, user_features, history_len = parts.get("network") or (None, None, 20)
        return cls(user_vocab=vectors.user_vocab, item_vocab=vectors.item_vocab, user_vectors=vectors.user_vectors,
                   item_vectors=vectors.item_vectors, seen=vectors.seen, item_index=indexes["items"],
                   user_index=indexes["users"], network=network, user_features=user_features, history_len=history_len,
                   propensity=parts.get("propensity"), manifest=bundle.manifest, max_k=max_k, pseudonymizer=pseudonymizer,
                   profiles=parts.get("profiles"), segments=parts.get("segments"), served=parts.get("scoring"),
                   item_categories=parts.get("item_categories"), seen_sums=vectors.seen_sums,
                   half_life_days=vectors.half_life_days, user_table=parts.get("user_table"))

    # -- facts ---------------------------------------------------------------------------------
    @property
    def n_users(self) -> int:
        return len(self.user_vocab)

    @property
    def n_items(self) -> int:
        return len(self.item_vocab)

    @property
    def dim(self) -> int:
        return int(self.item_vectors.shape[1])

    @property
    def has_propensity(self) -> bool:
        return self._propensity is not None

    def info(self) -> dict:
        """A JSON-safe summary of the loaded bundle (for ``/health`` and logs)."""
        indexes = self.manifest.get("indexes", {})
        return {
            "created_at": self.manifest.get("created_at"),
            "format_version": self.manifest.get("format_version"),
            "users": self.n_users,
            "items": self.n_items,
            "dim": self.dim,
            "indexes": {k: {f: v.get(f) for f in ("factory", "search_params", "recall@10")} for k, v in indexes.items()},
            "cold_start": self.network is not None,
            "propensity": self.has_propensity,
            "pseudonymized_user_ids": self.pseudonymizer is not None,
            "profiles": self.profiles is not None,
            "segments": self.stored_segments.k if self.stored_segments is not None else None,
            "uplift": self.uplift_model is not None,
        }

    # -- checks --------------------------------------------------------------------------------
    def _check_k(self, k: object, name: str = "k") -> int:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= self.max_k:
            raise InvalidRequestError(f"{name} must be an integer in 1..{self.max_k}, got {k!r}")
        return int(k)

    @staticmethod
    def _check_ids(ids: object, what: str) -> list:
        if isinstance(ids, (str, bytes)) or not isinstance(ids, (Sequence, np.ndarray)):
            raise InvalidRequestError(f"{what} must be a list of ids, got {type(ids).__name__}")
        return list(ids)

    @staticmethod
    def _rows(table: dict[str, int], kind: str, ids: list) -> np.ndarray:
        """Rows (len(ids),) int64 of external ``ids``; :class:`UnknownIdError` names unknown ones."""
        rows = np.fromiter((table.get(canonical_id(x), -1) for x in ids), dtype=np.int64, count=len(ids))
        if (rows < 0).any():
            unknown = [str(ids[i]) for i in np.flatnonzero(rows < 0)[:5]]
            raise UnknownIdError(kind, unknown[0] if len(unknown) == 1 else unknown)
        return rows

    def _user_rows_of(self, ids: list) -> np.ndarray:
        """Rows (len(ids),) of external user ids (hashed first when the bundle holds pseudonyms);
        :class:`UnknownIdError` names the ids as given."""
        if self.pseudonymizer is None:
            return self._rows(self._user_rows, "user", ids)
        keys = [self.pseudonymizer.one(canonical_id(x)) for x in ids]
        rows = np.fromiter((self._user_rows.get(k, -1) for k in keys), dtype=np.int64, count=len(keys))
        if (rows < 0).any():
            unknown = [str(ids[i]) for i in np.flatnonzero(rows < 0)[:5]]
            raise UnknownIdError("user", unknown[0] if len(unknown) == 1 else unknown)
        return rows

    def user_rows(self, user_ids: Sequence[object], strict: bool = True) -> np.ndarray:
        """Vocabulary rows (n,) int64 of external user ids (raw ids when the bundle holds pseudonyms).
        Unknown ids raise :class:`UnknownIdError` when ``strict``, else get row -1."""
        ids = self._check_ids(user_ids, "user_ids")
        if strict:
            return self._user_rows_of(ids)
        keys = [canonical_id(x) for x in ids]
        if self.pseudonymizer is not None:
            keys = [self.pseudonymizer.one(k) for k in keys]
        return np.fromiter((self._user_rows.get(k, -1) for k in keys), dtype=np.int64, count=len(keys))

    def _ranked(self, ids: np.ndarray, scores: np.ndarray, vocab: IdVocab) -> list[Ranked]:
        """(B, k) ids padded with -1 -> B lists of (external id, score), best first."""
        keep = ids >= 0
        names = vocab.ids[np.where(keep, ids, 0)]
        return [list(zip(names[r][keep[r]].tolist(), scores[r][keep[r]].astype(float).tolist())) for r in range(len(ids))]

    # -- known users ---------------------------------------------------------------------------
    def recommend(self, user_id: object, k: int = 10, exclude_seen: bool = True, *,
                  exclude_categories: Sequence[str] | None = None, exclude_items: Sequence[object] | None = None,
                  include_items: Sequence[object] | None = None, boost: Mapping[str, float] | None = None,
                  boost_items: Mapping[object, float] | None = None) -> Ranked:
        """Top ``k`` (item id, score) for a known user, best first, skipping items the user
        interacted with when ``exclude_seen``.

        Business rules (:mod:`dmp_dl.serving.item_rules`), applied to every item's score before the
        top ``k`` are taken, so ``k`` items come back while enough are left:
        ``exclude_categories`` (category names of the bundle's item table) and ``exclude_items``
        (item ids) are never returned; with ``include_items`` only those items may be;
        ``boost={"New": 1.5}`` makes items of a category 1.5 times as likely under the model (its
        score, a logit, raised by ln 1.5; a factor below 1 lowers it, 0 leaves the items out),
        ``boost_items`` the same per item. Returned scores include the boosts. An unknown category
        or a factor that is not a finite number >= 0 raises :class:`~dmp_dl.serving.item_rules.RuleError` (a ``ValueError``)
        naming it; an unknown item id :class:`UnknownIdError`; category rules on a bundle without
        item categories :class:`MissingPartError`.
        """
        return self.recommend_batch([user_id], k, exclude_seen, exclude_categories=exclude_categories,
                                    exclude_items=exclude_items, include_items=include_items, boost=boost,
                                    boost_items=boost_items)[0]

    def recommend_batch(self, user_ids: Sequence[object], k: int = 10, exclude_seen: bool = True,
                        chunk: int = 4096, **rules: Any) -> list[Ranked]:
        """:meth:`recommend` for many users, ``chunk`` users per index search; ``rules``: the
        keyword rules of :meth:`recommend`, the same for every user."""
        k = self._check_k(k)
        rows = self._user_rows_of(self._check_ids(user_ids, "user_ids"))
        item_rules = self.item_rules(**rules)
        out: list[Ranked] = []
        for s in range(0, len(rows), chunk):
            ids, scores = self.recommend_rows(rows[s : s + chunk], k, exclude_seen, item_rules)
            out.extend(self._ranked(ids, scores, self.item_vocab))
        return out

    def item_rules(self, *, exclude_categories: Sequence[str] | None = None, exclude_items: Sequence[object] | None = None,
                   include_items: Sequence[object] | None = None, boost: Mapping[str, float] | None = None,
                   boost_items: Mapping[object, float] | None = None) -> ItemRules:
        """The rules of :meth:`recommend` as masks over this bundle's items (checked: unknown
        categories and item ids are refused naming them)."""
        return ItemRules.build(self.n_items, self.item_categories, lambda ids, key: self._rows(self._item_rows, "item", ids),
                               exclude_categories=exclude_categories, exclude_items=exclude_items,
                               include_items=include_items, boost=boost, boost_items=boost_items)

    def recommend_rows(self, rows: np.ndarray, k: int, exclude_seen: bool = True,
                       rules: ItemRules | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Array form for user rows (B,): item rows (B, k) padded with -1 and scores (B, k)."""
        rows = np.asarray(rows, dtype=np.int64)
        indptr, gather = _ragged_gather(self._seen_indptr, rows)
        seen = indptr, self._seen_items[gather]
        exclude = seen if exclude_seen else (None, None)
        strength = self._seen_strength[gather] if self._seen_strength is not None else None
        return self._top_items(self.user_vectors[rows], seen, k, exclude, rules, strength)

    def _top_items(self, vectors: np.ndarray, items_of: tuple[np.ndarray, np.ndarray], k: int,
                   exclude: tuple, rules: ItemRules | None = None,
                   strength: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` items for users given by their vectors (B, dim) and their items (CSR pieces;
        ``strength``: each entry's value in the user's row, None: 1 each): a FAISS search, or exact
        scores over the catalogue when the bundle's score has the item-item term
        (:mod:`dmp_dl.models.scoring`, reading the rows' values when it reads weighted rows) or
        ``rules`` leave items out or boost them (exact, so that no rule depends on what an
        approximate index fetched)."""
        if self.served is None and (rules is None or not rules.active):
            return search_excluding(self.item_index, self.item_vectors, vectors, k, *exclude)
        from dmp_dl.models.scoring import exact_top_k, rows_matrix  # torch, for exact scoring only

        if self.served is None:
            import torch

            def score(lo: int, hi: int):
                return torch.from_numpy(np.ascontiguousarray(vectors[lo:hi], dtype=np.float32) @ self.item_vectors.T)
        else:
            weighted = strength is not None and self.served.reads_rows

            def score(lo: int, hi: int):
                indptr, gather = _ragged_gather(items_of[0], np.arange(lo, hi, dtype=np.int64))
                x = rows_matrix(indptr, items_of[1][gather], self.n_items, strength[gather] if weighted else None)
                return self.served.scores(vectors[lo:hi], self.item_vectors, x)

        step = max(1, EXACT_SCORES_PER_STEP // max(self.n_items, 1))  # bounded (B, n_items) temporaries
        ids, scores = [], []
        for lo in range(0, len(vectors), step):
            hi = min(lo + step, len(vectors))
            block = score(lo, hi)
            if rules is not None and rules.active:
                block = rules.apply(block.float())
            part = _ragged_rows(*exclude, np.arange(lo, hi, dtype=np.int64)) if exclude[0] is not None else (None, None)
            top = exact_top_k(block, k, *part)
            ids.append(top[0])
            scores.append(top[1])
        if not ids:
            return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
        return np.concatenate(ids), np.concatenate(scores)

    # -- new users (cold start) ----------------------------------------------------------------
    def recommend_for_history(self, item_ids: Sequence[object], k: int = 10, exclude_seen: bool = True,
                              attributes: Mapping[str, object] | None = None, **rules: Any) -> Ranked:
        """Top ``k`` for a user the model has never seen, from ``item_ids`` (the items they
        interacted with, oldest first; the last ``history_len`` are read) and optional
        ``attributes`` (e.g. ``{"age": 34, "region": "north"}``, the user table's columns).

        ``exclude_seen`` skips the history's items. Unknown attribute values are ignored (as an
        unseen category); unknown attribute names are refused. ``rules``: the business rules of
        :meth:`recommend` (``exclude_categories``, ``boost``, ...).
        """
        return self.recommend_for_histories([item_ids], k, exclude_seen, None if attributes is None else [attributes],
                                            **rules)[0]

    def recommend_for_histories(self, histories: Sequence[Sequence[object]], k: int = 10, exclude_seen: bool = True,
                                attributes: Sequence[Mapping[str, object] | None] | None = None,
                                **rules: Any) -> list[Ranked]:
        """:meth:`recommend_for_history` for many new users at once (one network pass, one search)."""
        k = self._check_k(k)
        item_rules = self.item_rules(**rules)
        histories = [self._check_ids(h, "history") for h in self._check_ids(histories, "histories")]
        if attributes is not None and len(attributes) != len(histories):
            raise InvalidRequestError(f"attributes has {len(attributes)} entries for {len(histories)} histories")
        vectors, rows, items = self.cold_user_vectors(histories, attributes)
        distinct = _distinct_rows(rows, items, len(histories), self.n_items)
        ids, scores = self._top_items(vectors, distinct, k, distinct if exclude_seen else (None, None), item_rules)
        return self._ranked(ids, scores, self.item_vocab)

    @property
    def reads_user_attributes(self) -> bool:
        """Whether the cold-start network reads user attributes (``attributes=`` of the history methods)."""
        return self.user_features is not None and bool(getattr(getattr(self.network, "user_attr", None), "active", False))

    def cold_user_vectors(self, histories: list[list], attributes=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Vectors (B, dim) for new users; also the (row, item) pairs of their histories."""
        if self.network is None:
            raise MissingPartError("this bundle has no cold-start network (it was exported without one); "
                                   "recommend_for_history is unavailable")
        import torch

        lengths = np.fromiter((len(h) for h in histories), dtype=np.int64, count=len(histories))
        flat = [x for h in histories for x in h]
        items = self._rows(self._item_rows, "item", flat)
        b = len(histories)
        rows = np.repeat(np.arange(b, dtype=np.int64), lengths)
        starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
        recency = lengths[rows] - 1 - (np.arange(len(items)) - starts)  # 0 = most recent
        keep = recency < self.history_len
        history = np.full((b, self.history_len), self.n_items, dtype=np.int64)
        history[rows[keep], recency[keep]] = items[keep]

        tokens, numeric, has_attrs = self._attribute_inputs(attributes, b)
        empty = np.flatnonzero((lengths == 0) & ~has_attrs)
        if len(empty):
            which = "history" if b == 1 else f"histories[{int(empty[0])}]"
            raise InvalidRequestError(f"{which} is empty: give at least one item id (or attributes)")
        with torch.no_grad():
            vec = self.network.cold_user_vectors(torch.from_numpy(history), tokens, numeric)
        return self._finite_vectors(vec, b), rows, items

    @property
    def encodes_rows(self) -> bool:
        """Whether the network encodes a user from their weighted row (:meth:`row_user_vectors`), as
        the user-level models encode every user in training, rather than from a list of items."""
        return self.network is not None and hasattr(self.network, "row_user_vectors")

    def row_user_vectors(self, indptr: np.ndarray, items: np.ndarray, strength: np.ndarray,
                         attributes=None, user_rows: np.ndarray | None = None) -> np.ndarray:
        """Vectors (B, dim) of users given by their rows: CSR pieces indptr (B + 1,), item rows
        (nnz,) and each item's strength in the row (nnz,), ``log2(1 + decayed summed weights)``
        (:mod:`dmp_dl.data.recency`), plus optional attribute records (B), or ``user_rows`` (B,):
        the bundle's user rows (-1: a user it does not know), whose stored attributes are read as
        training read them. The same encoding the training run gave its users (:attr:`encodes_rows`
        networks only)."""
        import torch

        b = len(indptr) - 1
        extra: dict = {}
        if user_rows is not None:
            rows = np.asarray(user_rows, dtype=np.int64)
            extra["users"] = torch.as_tensor(np.where(rows >= 0, rows, len(self.user_vocab)))
        else:
            extra["tokens"], extra["numeric"], _ = self._attribute_inputs(attributes, b)
        with torch.no_grad():
            vec = self.network.row_user_vectors(torch.as_tensor(np.asarray(indptr[:-1], dtype=np.int64)),
                                                torch.as_tensor(np.asarray(items, dtype=np.int64)),
                                                torch.as_tensor(np.asarray(strength, dtype=np.float32)), **extra)
        return self._finite_vectors(vec, b)

    def _attribute_inputs(self, attributes, b: int):
        """Attribute records (B, or None) -> (tokens, numeric) tensors for the network (None, None
        when no record has a value) and (B,) bool: which users have attributes. Refuses (one
        :class:`InvalidRequestError`) a record that is not an object, unknown columns and numeric
        values out of range."""
        import torch

        tokens = numeric = None
        has_attrs = np.zeros(b, dtype=bool)
        for i, a in enumerate(attributes or []):
            if a is not None and not isinstance(a, Mapping):
                raise InvalidRequestError(f"attributes[{i}] must be an object of column: value, got {type(a).__name__}")
            has_attrs[i] = bool(a)
        if has_attrs.any():
            if not self.reads_user_attributes:
                raise InvalidRequestError("this model does not read user attributes; leave attributes out")
            known = set(self.user_features.categorical_columns) | set(self.user_features.numeric_columns)
            unknown = sorted({str(key) for a in attributes if a for key in a} - known)
            if unknown:
                raise InvalidRequestError(f"unknown attribute(s) {unknown}; this model reads {sorted(known)}")
            for i, a in enumerate(attributes):
                self._check_numeric_attributes(a or {}, "attributes" if b == 1 else f"attributes[{i}]")
            t, n = self.user_features.encode_records([dict(a or {}) for a in attributes])
            tokens, numeric = torch.from_numpy(t), torch.from_numpy(n)
        return tokens, numeric, has_attrs

    @staticmethod
    def _finite_vectors(vec, b: int) -> np.ndarray:
        """The network's output (B, dim) as float32, refused when a row overflowed."""
        vectors = np.ascontiguousarray(vec.float().numpy())
        broken = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
        if len(broken):  # e.g. {"age": 1e308}: the search would silently return nothing
            which = "attributes" if b == 1 else f"attributes[{int(broken[0])}]"
            raise InvalidRequestError(f"{which}: a numeric value is too far outside the range this model was "
                                      "trained on (the user vector overflows); send a realistic value or leave it out")
        return vectors

    def _check_numeric_attributes(self, attributes: Mapping[str, object], where: str) -> None:
        """:class:`InvalidRequestError` for a numeric attribute that is not a number (or numeric
        text) within ±``MAX_ABS_VALUE``: far outside, the user vector overflows or goes flat."""
        for col in self.user_features.numeric_columns:
            v = attributes.get(col)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float, str, np.integer, np.floating)):
                raise InvalidRequestError(f"{where}.{col} must be a number (or null), got {type(v).__name__}")
            if isinstance(v, (int, np.integer)):
                ok = abs(int(v)) <= MAX_ABS_VALUE
                shown = repr(v) if len(repr(v)) <= 30 else f"a {len(str(abs(int(v))))}-digit integer"
            else:
                try:
                    ok = bool(abs(float(v)) <= MAX_ABS_VALUE)  # NaN compares False
                except ValueError:
                    raise InvalidRequestError(f"{where}.{col} must be a number (or null), got {str(v)[:40]!r}") from None
                shown = repr(v)[:40]
            if not ok:
                raise InvalidRequestError(f"{where}.{col} is {shown}, outside ±{MAX_ABS_VALUE:g}: send a realistic "
                                          "value or leave it out")

    # -- items ---------------------------------------------------------------------------------
    def similar_items(self, item_id: object, k: int = 10) -> Ranked:
        """Top ``k`` (item id, score) nearest to ``item_id`` by inner product, itself excluded."""
        return self.similar_items_batch([item_id], k)[0]

    def similar_items_batch(self, item_ids: Sequence[object], k: int = 10) -> list[Ranked]:
        """:meth:`similar_items` for many items (:meth:`similar_item_rows`)."""
        k = self._check_k(k)
        rows = self._rows(self._item_rows, "item", self._check_ids(item_ids, "item_ids"))
        ids, scores = self.similar_item_rows(rows, k)
        return self._ranked(ids, scores, self.item_vocab)

    def similar_item_rows(self, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` items most like each item row (B,), itself excluded: item rows (B, k) padded with -1
        and scores (B, k) padded with -inf, best first.

        With the bundle's item-item (EASE) weights B, the score of j for item q is the cosine of rows
        q and j of B: two items are alike when having either predicts the same other items (a popular
        item predicts little beyond itself, so it does not come first for being popular; on MovieLens
        100K 7.3 of the 10 neighbours of the 300 most rated films share a genre with them, against 6.9
        for the raw weights B[q] and 6.9 for a co-occurrence cosine). Without them the
        score is the cosine of the item vectors without their item-prior part (:meth:`_item_taste_vectors`),
        exactly over the catalogue; a model whose vectors have no such part is served by its FAISS
        index (inner product) as before.
        """
        rows = np.asarray(rows, dtype=np.int64)
        self_excluded = np.arange(len(rows) + 1, dtype=np.int64), rows
        weights = self.served.shallow.weights if self.served is not None else None
        if weights is not None:
            scale, unit_t = self._unit_item_item_columns(weights)
            queries = sp.csr_matrix(sp.diags(scale[rows]) @ weights[rows], dtype=np.float32)  # (B, n) unit rows
            # items that predict nothing in common with the query score 0 and come after every
            # positive one (B is sparse), so k results come back whenever the catalogue has k others
            scores = sparse_product_dense(queries, unit_t)
        else:
            taste = self._item_taste_vectors()
            if taste is None:
                return search_excluding(self.item_index, self.item_vectors, self.item_vectors[rows], k, *self_excluded)
            scores = taste[rows] @ taste.T
        scores[np.arange(len(rows)), rows] = -np.inf
        return _top_k_rows(scores, k)

    def _unit_item_item_columns(self, weights: sp.csr_matrix) -> tuple[np.ndarray, sp.csr_matrix]:
        """``scale`` (n_items,) float32, the inverse L2 norms of the rows of the item-item weights (0 for
        a zero row), and ``unit_t`` (n_items, n_items) CSR, the transpose of the weights with their rows
        scaled to unit norm; computed once per weights. A query row times ``unit_t`` touches only the
        weight rows it names (a CSR x CSC product converted the whole matrix on every call: 0.35 s a
        request at 20,000 items against about 8 ms)."""
        cached = getattr(self, "_item_item_unit", None)
        if cached is None or cached[0] is not weights:
            norms = np.sqrt(np.asarray(weights.multiply(weights).sum(axis=1), dtype=np.float64).ravel())
            scale = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0).astype(np.float32)
            unit_t = sp.csr_matrix((sp.diags(scale) @ weights).T, dtype=np.float32)
            cached = (weights, scale, unit_t)
            self._item_item_unit = cached
        return cached[1], cached[2]

    def _item_taste_vectors(self) -> np.ndarray | None:
        """(n_items, d') L2-normalised item vectors without the dimensions on which every user has the
        same value, or None when there are none (or fewer than two users).

        A dimension constant over all users adds the same per-item offset to every user's score: an
        item prior (the autoencoder folds its per-item bias in this way, user ``[z_u, 1]``, item
        ``[w_j, b_j]``). Items that share a large prior are not alike in taste, so it is left out.
        """
        cached = getattr(self, "_item_taste", None)
        if cached is not None and cached[0] is self.item_vectors:
            return cached[1]
        users = self.user_vectors
        taste = None
        if len(users) >= 2:
            constant = (users == users[0]).all(axis=0)
            if constant.any() and not constant.all():
                taste = np.ascontiguousarray(self.item_vectors[:, ~constant], dtype=np.float32)
                norms = np.linalg.norm(taste, axis=1, keepdims=True)
                np.divide(taste, norms, out=taste, where=norms > 0)
        self._item_taste = (self.item_vectors, taste)
        return taste

    # -- audiences -----------------------------------------------------------------------------
    def lookalike(self, seed_user_ids: Sequence[object], k: int = 100, exclude_seeds: bool = True,
                  method: str = "contrast") -> Ranked:
        """The ``k`` users most like the seed set (audience expansion), best first.

        ``contrast`` (default): inner product with the seed mean minus the mean of all users, which
        ranks by what sets the seeds apart rather than by what every user shares — best on every
        genre audience of ``bench/audience.py``, with every model's vectors.
        ``centroid``: users ranked by inner product with the mean of the seed vectors, which for
        dot-product vectors is the mean similarity to the seeds; one index search.
        ``neighbours``: each seed's nearest users vote with their similarity and users are ranked
        by the summed votes, which favours users close to any part of a diverse seed set
        (e.g. best customers from several segments) over users near its average.
        The score is the centroid inner product or the summed similarity, respectively.
        """
        k = self._check_k(k)
        seeds = self._check_ids(seed_user_ids, "seed_user_ids")
        if not seeds:
            raise InvalidRequestError("seed_user_ids is empty: give at least one known user id")
        if method not in LOOKALIKE_METHODS:
            raise InvalidRequestError(f"method must be one of {LOOKALIKE_METHODS}, got {method!r}")
        top, scores = self.lookalike_rows(self._user_rows_of(seeds), k, exclude_seeds, method)
        return list(zip(self.user_vocab.lookup(top), scores.astype(float).tolist()))

    def lookalike_rows(self, seed_rows: np.ndarray, k: int, exclude_seeds: bool = True,
                       method: str = "contrast") -> tuple[np.ndarray, np.ndarray]:
        """Array form of :meth:`lookalike` for seed user rows (no ``max_k`` bound): user rows (m,)
        int64 and scores (m,) float64, best first (m < k only when fewer users are left)."""
        rows = np.unique(np.asarray(seed_rows, dtype=np.int64))
        k = min(int(k), self.n_users)  # a larger audience than there are users would only allocate padding
        return lookalike_search(self.user_index, self.user_vectors, self.user_vectors[rows],
                                rows if exclude_seeds else None, k, method)

    def user_activity(self) -> np.ndarray:
        """(n_users,) int64 distinct items each user interacted with."""
        return np.diff(self._seen_indptr)

    # -- propensity ----------------------------------------------------------------------------
    def missing_propensity(self) -> MissingPartError:
        """The error for a bundle without a propensity model, saying why it has none: the training
        run's propensity stage as the manifest records it (``stages.propensity``: switched off,
        skipped with the data's reason, or failed)."""
        stage = (self.manifest.get("stages") or {}).get("propensity") or {}
        status, reason = stage.get("status"), stage.get("reason")
        if status == "skipped" and reason == "propensity.enabled=false":
            return MissingPartError("this bundle has no propensity model: it was trained with propensity.enabled=false "
                                    "(train with propensity.enabled=true and export again)")
        if status in ("skipped", "failed") and reason:
            what = "skipped" if status == "skipped" else "failed"
            return MissingPartError(f"this bundle has no propensity model: propensity was enabled, but the training "
                                    f"run's propensity stage {what}: {reason}")
        return MissingPartError("this bundle has no propensity model (train with propensity enabled and export again)")

    def propensity(self, user_ids: Sequence[object]) -> list[float]:
        """Purchase propensity of known users, one float each (in the order given)."""
        if self._propensity is None:
            raise self.missing_propensity()
        rows = self._user_rows_of(self._check_ids(user_ids, "user_ids"))
        return self.propensity_rows(rows).astype(float).tolist()

    def propensity_rows(self, rows: np.ndarray) -> np.ndarray:
        """Array form of :meth:`propensity` for user rows (n,): (n,) float64 probabilities."""
        if self._propensity is None:
            raise self.missing_propensity()
        return np.asarray(self._propensity.score_known(np.asarray(rows, dtype=np.int64)), dtype=np.float64)

    # -- uplift --------------------------------------------------------------------------------
    def _uplift_part(self):
        if self.uplift_model is None:
            raise MissingPartError("this bundle has no uplift model (train one on a measured campaign: python -m "
                                   "dmp_dl.audience task=uplift artifacts=DIR assignments=target.csv outcomes=FILE)")
        return self.uplift_model

    def uplift(self, user_ids: Sequence[object]) -> list[dict]:
        """For known users (in the order given): ``uplift`` (how much a contact raises the chance to
        convert: ``p_treated - p_control``), ``p_control`` and ``p_treated`` (calibrated)."""
        model = self._uplift_part()
        rows = self._user_rows_of(self._check_ids(user_ids, "user_ids"))
        uplift, p_c, p_t = model.score_rows(self, rows)
        return [{"uplift": float(u), "p_control": float(c), "p_treated": float(t)} for u, c, t in zip(uplift, p_c, p_t)]

    def uplift_rows(self, rows: np.ndarray) -> np.ndarray:
        """Array form of :meth:`uplift` for user rows (n,): (n,) float64 uplifts in [-1, 1]."""
        return self._uplift_part().score_rows(self, np.asarray(rows, dtype=np.int64))[0]

    # -- profiles and segments -----------------------------------------------------------------
    def _audience_part(self, part, name: str):
        if part is None:
            raise MissingPartError(f"this bundle has no {name} (train with audience.enabled=true and export again)")
        return part

    def profile(self, user_id: object, top: int | None = None) -> dict:
        """A known user's interest profile: ``interests`` (up to ``top`` of the stored top-N
        categories, each with its time-decayed ``weight`` I(c, u) and ``share`` of the user's total
        interest), ``event_types`` (recency-weighted events per type), ``as_of`` and
        ``half_life_days``; plus ``segment`` when the bundle has segments."""
        profiles = self._audience_part(self.profiles, "interest profiles")
        row = int(self._user_rows_of([user_id])[0])
        n = profiles.top_categories.shape[1]
        top = n if top is None else self._check_k(top, "top")
        cats, weights = profiles.top_categories[row, :top], profiles.top_weights[row, :top]
        total = float(profiles.interest_total[row])
        keep = cats >= 0
        return {
            "user_id": str(self.user_vocab.ids[row]),
            "interests": [{"category": profiles.categories[c], "weight": float(w), "share": float(w) / total if total > 0 else 0.0}
                          for c, w in zip(cats[keep].tolist(), weights[keep].tolist())],
            "event_types": dict(zip(profiles.event_types, profiles.event_type_affinity[row].astype(float).tolist())),
            "as_of": int(profiles.as_of),
            "half_life_days": float(profiles.half_life_days),
            "segment": self._segment_of_row(row) if self.stored_segments is not None else None,
        }

    def _segment_of_row(self, row: int) -> dict:
        seg = self.stored_segments
        s = int(seg.assignments[row])
        agg = seg.meta["segments"][s]
        return {"segment": s, "distance": float(seg.distances[row]),
                "top_categories": [c["category"] for c in agg.get("top_categories", [])]}

    def segment(self, user_id: object) -> dict:
        """A known user's segment: ``segment``, squared ``distance`` to its centre, its ``top_categories``."""
        self._audience_part(self.stored_segments, "segments")
        return self._segment_of_row(int(self._user_rows_of([user_id])[0]))

    def segments(self, representatives: int = 5) -> list[dict]:
        """Every segment's description: size, share, top categories, mean propensity, attribute
        skew and the ``representatives`` users nearest its centre."""
        return self._audience_part(self.stored_segments, "segments").describe(self.user_vocab.ids, representatives)
