"""The bundle parts of the embedding model: its vectors, their FAISS indexes and the network.

Each is a :class:`~dmp_dl.store.parts.BundlePart` (listed in :mod:`dmp_dl.store.contents`).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from dmp_dl.core.errors import BundleError, NonFiniteError
from dmp_dl.data.features import FeatureTable
from dmp_dl.data.vocab import IdVocab
from dmp_dl.index.ann import METRIC, IndexOptions, build_and_measure, is_exact, set_search_params
from dmp_dl.models import registry
from dmp_dl.store.bundle import (
    ITEM_INDEX,
    ITEM_POPULARITY,
    ITEM_VECTORS,
    ITEM_VOCAB,
    NETWORK_SPEC,
    NETWORK_WEIGHTS,
    SEEN_INDPTR,
    SEEN_ITEMS,
    SEEN_SUMS,
    USER_INDEX,
    USER_VECTORS,
    USER_VOCAB,
    Bundle,
    BundleWriter,
)
from dmp_dl.store.parts import BundlePart, UserErasure, drop_table_rows, spec_object

log = logging.getLogger(__name__)


# -- vectors ---------------------------------------------------------------------------------------
def nonfinite_rows(vectors: np.ndarray) -> int:
    """Rows of ``vectors`` (n, dim) with a NaN or infinite entry."""
    return int((~np.isfinite(vectors).all(axis=1)).sum()) if vectors.size else 0


def check_finite_vectors(vectors: np.ndarray, what: str) -> None:
    """:class:`NonFiniteError` when any row of ``vectors`` is not finite (nothing is exported)."""
    bad = nonfinite_rows(vectors)
    if bad:
        raise NonFiniteError(f"{what}: {bad} of {len(vectors)} rows are NaN or infinite (training diverged); nothing "
                             "was exported. Lower model.module.optimizer.lr and check the data for extreme values")


@dataclass
class BundleVectors:
    """The vectors part: vocabularies (row i of every array is id i), user_vectors (n_users, dim)
    and item_vectors (n_items, dim) float32, seen (n_users, n_items) CSR of the items each user
    interacted with, item_popularity (n_items,) training events per item (not read when loading).

    seen_sums: optional (n_users, n_items) float64 CSR, each user's summed event weights per item
    decayed to the user's latest event with ``half_life_days`` (None: no decay), the rows the
    user-level models read being ``log2(1 + sums)`` (:mod:`dmp_dl.data.recency`); stored for the
    pairs of ``seen`` (loaded with exactly its pattern). Real-time updates continue from them.
    """

    user_vocab: IdVocab
    item_vocab: IdVocab
    user_vectors: np.ndarray
    item_vectors: np.ndarray
    seen: sp.csr_matrix
    item_popularity: np.ndarray | None = None
    seen_sums: sp.csr_matrix | None = None
    half_life_days: float | None = None


def aligned_values(pattern: sp.csr_matrix, values: sp.csr_matrix) -> np.ndarray:
    """The entries of ``values`` at each stored entry of ``pattern`` (same shape, sorted indices), in
    ``pattern``'s order: (pattern.nnz,) float64, 0 where ``values`` has none."""
    values = sp.csr_matrix(values, dtype=np.float64)
    values.sum_duplicates()
    n_cols = pattern.shape[1]
    want = np.repeat(np.arange(pattern.shape[0], dtype=np.int64), np.diff(pattern.indptr)) * n_cols + pattern.indices
    have = np.repeat(np.arange(values.shape[0], dtype=np.int64), np.diff(values.indptr)) * n_cols + values.indices
    at = np.searchsorted(have, want).clip(max=max(len(have) - 1, 0))
    found = (have[at] == want) if len(have) else np.zeros(len(want), dtype=bool)
    return np.where(found, values.data[at] if len(have) else 0.0, 0.0)


class VectorsPart(BundlePart):
    name = "vectors"

    def present(self, bundle: Bundle) -> bool:
        return bundle.has(USER_VOCAB)

    def save(self, writer: BundleWriter, value: BundleVectors) -> dict[str, Any]:
        users = np.ascontiguousarray(value.user_vectors, dtype=np.float32)
        items = np.ascontiguousarray(value.item_vectors, dtype=np.float32)
        n_users, n_items = len(value.user_vocab), len(value.item_vocab)
        if users.shape[0] != n_users or items.shape[0] != n_items or users.shape[1] != items.shape[1]:
            raise ValueError(f"vector shapes {users.shape}, {items.shape} do not match {n_users} users, {n_items} items")
        seen = sp.csr_matrix(value.seen)
        if seen.shape != (n_users, n_items):
            raise ValueError(f"seen matrix shape {seen.shape} != ({n_users}, {n_items})")
        seen.sort_indices()
        check_finite_vectors(users, "user vectors")
        check_finite_vectors(items, "item vectors")
        value.user_vocab.save(writer.path(USER_VOCAB))
        value.item_vocab.save(writer.path(ITEM_VOCAB))
        writer.save_array(USER_VECTORS, users)
        writer.save_array(ITEM_VECTORS, items)
        writer.save_array(SEEN_INDPTR, seen.indptr.astype(np.int64))
        writer.save_array(SEEN_ITEMS, seen.indices.astype(np.int32))
        writer.save_array(ITEM_POPULARITY, np.asarray(value.item_popularity, dtype=np.int64))
        entry: dict[str, Any] = {"dim": int(items.shape[1]), "metric": METRIC,
                                 "counts": {"users": n_users, "items": n_items, "seen_pairs": int(seen.nnz)}}
        if value.seen_sums is not None:
            if value.seen_sums.shape != seen.shape:
                raise ValueError(f"seen sums of shape {value.seen_sums.shape} != {seen.shape}")
            writer.save_array(SEEN_SUMS, aligned_values(seen, value.seen_sums))
            entry["user_rows"] = {"file": SEEN_SUMS, "half_life_days": value.half_life_days,
                                  "reference": "each user's latest event"}
        return entry

    def load(self, bundle: Bundle, loaded: Mapping[str, Any], **options: Any) -> BundleVectors:
        user_vocab = IdVocab.load(bundle.file(USER_VOCAB))
        item_vocab = IdVocab.load(bundle.file(ITEM_VOCAB))
        users, items = bundle.array(USER_VECTORS), bundle.array(ITEM_VECTORS)
        indptr, seen_items = bundle.array(SEEN_INDPTR), bundle.array(SEEN_ITEMS)
        n_users, n_items = len(user_vocab), len(item_vocab)
        if users.shape[0] != n_users or items.shape[0] != n_items or users.ndim != 2 or items.shape[1:] != users.shape[1:]:
            raise BundleError(f"{bundle.root}: vectors {users.shape}, {items.shape} do not match {n_users} users, {n_items} items")
        for name, vectors in ((USER_VECTORS, users), (ITEM_VECTORS, items)):
            bad = nonfinite_rows(vectors)
            if bad:  # served as they are, every score would be NaN and every answer empty
                raise BundleError(f"{bundle.root / name}: {bad} of {len(vectors)} vectors are NaN or infinite; the bundle "
                                  "cannot serve (train and export again)")
        if indptr.shape != (n_users + 1,) or indptr[-1] != len(seen_items) or (len(seen_items) and seen_items.max() >= n_items):
            raise BundleError(f"{bundle.root / SEEN_INDPTR}: seen-items rows do not match the vocabularies")
        seen = sp.csr_matrix((np.ones(len(seen_items), np.float32), seen_items, indptr), shape=(n_users, n_items))
        sums, half_life = None, None
        rows_entry = bundle.manifest.get("user_rows")
        if isinstance(rows_entry, dict) and bundle.has(SEEN_SUMS):
            values = bundle.array(SEEN_SUMS)
            if values.shape != (len(seen_items),) or not np.isfinite(values).all() or (values < 0).any():
                raise BundleError(f"{bundle.root / SEEN_SUMS}: {values.shape[0] if values.ndim else 0} summed weights "
                                  f"for {len(seen_items)} seen pairs, or not all finite and >= 0 (export the bundle again)")
            sums = sp.csr_matrix((values.astype(np.float64), seen_items, indptr), shape=(n_users, n_items))
            half_life = rows_entry.get("half_life_days")
        return BundleVectors(user_vocab, item_vocab, users, items, seen, seen_sums=sums, half_life_days=half_life)

    def drop_users(self, bundle: Bundle, erasure: UserErasure, writer: BundleWriter) -> None:
        vocab = IdVocab.load(bundle.file(USER_VOCAB))
        n, rows, keep = erasure.n_users, erasure.rows, erasure.keep
        indptr, seen_items = bundle.array(SEEN_INDPTR), bundle.array(SEEN_ITEMS)
        if indptr.shape != (n + 1,):
            raise BundleError(f"{bundle.root / SEEN_INDPTR}: {indptr.shape[0]} offsets for {n} users")
        erasure.seen_items = (indptr[rows + 1] - indptr[rows]).astype(np.int64)
        IdVocab(vocab.ids[keep], vocab.kind).save(writer.path(USER_VOCAB))
        erasure.removed[USER_VOCAB] = "id"
        writer.save_array(USER_VECTORS, np.ascontiguousarray(bundle.array(USER_VECTORS)[keep]))
        erasure.removed[USER_VECTORS] = "vector row"
        n_items = len(IdVocab.load(bundle.file(ITEM_VOCAB)))
        seen = sp.csr_matrix((np.ones(len(seen_items), np.float32), seen_items, indptr), shape=(n, n_items))[keep]
        writer.save_array(SEEN_INDPTR, seen.indptr.astype(np.int64))
        writer.save_array(SEEN_ITEMS, seen.indices.astype(np.int32))
        erasure.removed[SEEN_INDPTR] = "seen-items row"
        erasure.removed[SEEN_ITEMS] = "seen items"
        if bundle.has(SEEN_SUMS):
            sums = bundle.array(SEEN_SUMS)
            if sums.shape != seen_items.shape:
                raise BundleError(f"{bundle.root / SEEN_SUMS}: {sums.shape[0]} summed weights for {len(seen_items)} seen pairs")
            kept = sp.csr_matrix((sums.astype(np.float64), seen_items, indptr), shape=(n, n_items))[keep]
            writer.save_array(SEEN_SUMS, kept.data.astype(np.float64))
            erasure.removed[SEEN_SUMS] = "summed event weights"
        content = erasure.content
        content["counts"] = {**(content.get("counts") or {}), "users": erasure.users_after, "seen_pairs": int(seen.nnz)}


# -- indexes ---------------------------------------------------------------------------------------
class IndexesPart(BundlePart):
    """The FAISS inner-product indexes over the vectors (row i = user / item i). They are built from
    the vectors already written with the same writer, so the vectors part comes first."""

    name = "indexes"

    def present(self, bundle: Bundle) -> bool:
        return bundle.has(ITEM_INDEX) and bundle.has(USER_INDEX)

    def save(self, writer: BundleWriter, value: Any) -> dict[str, Any]:
        """value: :class:`dmp_dl.index.ann.IndexOptions` (None: the defaults)."""
        options = value if value is not None else IndexOptions()
        users = np.load(writer.path(USER_VECTORS), allow_pickle=False, mmap_mode="r")
        items = np.load(writer.path(ITEM_VECTORS), allow_pickle=False, mmap_mode="r")
        item_index, item_info = build_and_measure(items, users, options, "item")
        writer.save_index(ITEM_INDEX, item_index)
        del item_index
        user_index, user_info = build_and_measure(users, users, options, "user")
        writer.save_index(USER_INDEX, user_index)
        del user_index
        return {"indexes": {"items": {"file": ITEM_INDEX, **item_info}, "users": {"file": USER_INDEX, **user_info}},
                "index_options": dict(vars(options))}

    def load(self, bundle: Bundle, loaded: Mapping[str, Any], search_params: str | None = None,
             **options: Any) -> dict[str, Any]:
        """{"items": index, "users": index}, checked against the loaded vectors. ``search_params``
        overrides the bundle's search settings of approximate indexes (exact ones are left alone)."""
        vectors: BundleVectors = loaded["vectors"]
        dim = vectors.user_vectors.shape[1]
        indexes = {}
        for name, file, n in (("items", ITEM_INDEX, len(vectors.item_vocab)), ("users", USER_INDEX, len(vectors.user_vocab))):
            index = bundle.index(file)
            if index.ntotal != n or index.d != dim:
                raise BundleError(f"{bundle.root / file}: index holds {index.ntotal} vectors of dim {index.d}, expected {n} of {dim}")
            info = bundle.manifest.get("indexes", {}).get(name, {})
            exact = is_exact(info.get("factory", "Flat"))
            params = info.get("search_params", "") if search_params is None or exact else search_params
            set_search_params(index, params)
            indexes[name] = index
        return indexes

    def drop_users(self, bundle: Bundle, erasure: UserErasure, writer: BundleWriter) -> None:
        """The user index rebuilt over the user vectors the vectors part wrote (item index unchanged)."""
        users = np.load(writer.path(USER_VECTORS), allow_pickle=False)
        options = IndexOptions(**(bundle.manifest.get("index_options") or {}))
        user_index, user_info = build_and_measure(users, users, options, "user")
        writer.save_index(USER_INDEX, user_index)
        erasure.removed[USER_INDEX] = "vector (index rebuilt)"
        indexes = dict(erasure.content.get("indexes") or {})
        indexes["users"] = {"file": USER_INDEX, **user_info}
        erasure.content["indexes"] = indexes


# -- the network -----------------------------------------------------------------------------------
class NetworkPart(BundlePart):
    """The network's weights and how to rebuild it (cold start, warm starts). Its class must be
    registered (:mod:`dmp_dl.models.registry`), which says which of its tables are per user."""

    name = "network"

    def present(self, bundle: Bundle) -> bool:
        return bundle.has(NETWORK_SPEC) or bundle.has(NETWORK_WEIGHTS)

    def save(self, writer: BundleWriter, value: Mapping[str, Any]) -> dict[str, Any]:
        """value: ``{"net", "kwargs", "user_features", "item_features", "history_len"}``. A network
        whose class is not registered is left out of the bundle (no cold start), with a warning."""
        entry = save_network(writer, **value)
        return {} if entry is None else {"network": entry}

    def load(self, bundle: Bundle, loaded: Mapping[str, Any], **options: Any):
        """(net, user FeatureTable or None, history_len), or None when the bundle has no network."""
        return load_network(bundle) if bundle.has(NETWORK_SPEC) else None

    def drop_users(self, bundle: Bundle, erasure: UserErasure, writer: BundleWriter) -> None:
        if not bundle.has(NETWORK_WEIGHTS):
            return
        spec = spec_object(bundle, NETWORK_SPEC)
        entry = registered_or_refuse(spec.get("class"), bundle.root / NETWORK_SPEC)
        state = bundle.torch_state(NETWORK_WEIGHTS)
        keys = drop_table_rows(state, entry.tables("user"), erasure, bundle.root / NETWORK_WEIGHTS)
        spec["n_users"] = erasure.users_after
        writer.save_torch(NETWORK_WEIGHTS, state)
        writer.save_json(NETWORK_SPEC, spec)
        erasure.removed[NETWORK_WEIGHTS] = "rows of " + ", ".join(keys) if keys else "no per-user rows"


def registered_or_refuse(name: Any, where: Path) -> registry.RegisteredNetwork:
    """The registry entry of the network class a bundle file names; a class that is not registered
    is refused (its per-user tables are unknown, so no user's rows could be removed from it)."""
    entry = registry.registered(name) if isinstance(name, str) else None
    if entry is None:
        raise BundleError(f"{where}: network class {name!r} is not registered (known: {registry.names()}), so "
                          "its per-user rows are unknown; import the module that registers it, or export the "
                          "bundle again")
    return entry


def save_network(writer: BundleWriter, net, kwargs: Mapping[str, Any], user_features, item_features,
                 history_len: int) -> dict | None:
    """Store ``net``'s weights and how to rebuild it. Returns the manifest entry (None if its class
    is not registered, in which case cold start is unavailable)."""
    name = type(net).__name__
    if registry.registered(net) is None:
        log.warning("network %s is not exportable (known: %s): the bundle has no cold-start model",
                    name, registry.names())
        return None
    drop = {"n_users", "n_items", "user_features", "item_features"}
    spec = {
        "class": name,
        "kwargs": {k: v for k, v in kwargs.items() if k not in drop and not k.startswith("_")},
        "n_users": int(net.n_users),
        "n_items": int(net.n_items),
        "history_len": int(history_len),
        "user_features": user_features.spec() if user_features is not None else None,
        "item_features": item_features.spec() if item_features is not None else None,
    }
    writer.save_torch(NETWORK_WEIGHTS, net.state_dict())
    writer.save_json(NETWORK_SPEC, spec)
    return {"class": name, "history_len": int(history_len)}


def load_network(bundle: Bundle):
    """Rebuild the network in eval mode on CPU. Returns (net, user FeatureTable or None, history_len)."""
    import torch


    spec = bundle.json(NETWORK_SPEC)
    where = bundle.root / NETWORK_SPEC
    entry = registry.registered(spec.get("class")) if isinstance(spec, dict) and isinstance(spec.get("class"), str) else None
    if entry is None:
        raise BundleError(f"{where}: unknown network class {spec.get('class') if isinstance(spec, dict) else spec!r} "
                          f"(known: {registry.names()})")
    cls = entry.cls
    state = bundle.torch_state(NETWORK_WEIGHTS)
    tables = {}
    for side in ("user", "item"):
        fspec, key = spec.get(f"{side}_features"), f"{side}_attr"
        if fspec is not None and f"{key}.tokens" in state:
            tables[f"{side}_features"] = FeatureTable.from_spec(
                fspec, state[f"{key}.tokens"].numpy(), state[f"{key}.numeric"].numpy())
    accepted = inspect.signature(cls).parameters
    kwargs = {**spec["kwargs"], **{k: v for k, v in tables.items() if k in accepted}}
    broken = sorted(k for k, v in state.items()
                    if torch.is_tensor(v) and v.is_floating_point() and not bool(v.isfinite().all()))
    if broken:
        raise BundleError(f"{bundle.root / NETWORK_WEIGHTS}: weights {broken[:3]} hold NaN or infinite values; "
                          "the bundle cannot serve (train and export again)")
    try:
        net = cls(n_users=spec["n_users"], n_items=spec["n_items"], **kwargs)
        net.load_state_dict(state, strict=True)
    except (TypeError, RuntimeError, KeyError) as exc:
        raise BundleError(f"{where}: the network cannot be rebuilt from its weights ({str(exc).splitlines()[0]})") from None
    return net.eval(), tables.get("user_features"), int(spec.get("history_len", 20))
