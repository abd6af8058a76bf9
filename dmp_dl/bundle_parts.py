"""The parts of a bundle behind one interface: save, load, verify, drop users' rows.

A bundle (:mod:`dmp_dl.bundle`) is a set of parts. Each part owns some files and manifest fields::

    vectors      users.json, items.json, user/item vectors, seen items, item popularity
                 (manifest: dim, metric, counts)
    indexes      item_index.faiss, user_index.faiss (indexes, index_options)
    network      network/weights.pt, network/network.json (network)
    propensity   propensity/ (propensity)                        dmp_dl.propensity.bundle
    profiles     profiles/ (profiles)                             dmp_dl.audience.bundle
    segments     segments/ (segments)                             dmp_dl.audience.bundle
    scoring      scoring/ (scoring)                               dmp_dl.models.scoring
    realtime     realtime/ (realtime)                             dmp_dl.bundle_contents
    uplift       uplift/ (uplift)                                 dmp_dl.bundle_contents

and is a :class:`BundlePart`:

* ``save(writer, value)`` writes the part's files with a :class:`~dmp_dl.bundle.BundleWriter` and
  returns its manifest fields. ``value`` is what the part stores (:class:`BundleVectors`, the index
  options, the network, the propensity result), or for parts a pipeline stage prepares (scoring,
  profiles, segments, realtime and any further entry) that stage's writer ``(writer) -> entry``.
* ``load(bundle, loaded, **options)`` returns the part's object (None when the bundle has none);
  ``loaded`` holds the parts loaded before it, by name (the vectors come first).
* ``verify(bundle, loaded)`` raises :class:`~dmp_dl.errors.BundleError` naming the file when the
  stored part does not fit the rest of the bundle (by default: it loads it).
* ``drop_users(bundle, erasure, writer)`` writes the part without the users of a
  :class:`UserErasure`. A part's manifest entry lists under ``user_aligned`` its files whose row i
  belongs to user i of ``users.json`` (``.npy`` arrays, JSON lists, Parquet tables); the default
  removes the users' rows of those, so a new per-user file is erased by being listed there.

:mod:`dmp_dl.bundle_contents` lists every part in order; export (:func:`dmp_dl.bundle.export_bundle`),
loading (:meth:`dmp_dl.recommender.Recommender.load`) and erasure
(:func:`dmp_dl.privacy.erasure.stage_erasure`) loop over that list.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from dmp_dl.bundle import (
    ITEM_INDEX, ITEM_POPULARITY, ITEM_VECTORS, ITEM_VOCAB, NETWORK_SPEC, NETWORK_WEIGHTS, SEEN_INDPTR, SEEN_ITEMS,
    USER_INDEX, USER_VECTORS, USER_VOCAB, Bundle, BundleWriter,
)
from dmp_dl.data.vocab import IdVocab
from dmp_dl.errors import BundleError, NonFiniteError
from dmp_dl.manifest import MANIFEST
from dmp_dl.models import registry

log = logging.getLogger(__name__)

PartWriter = Callable[[BundleWriter], Mapping[str, Any]]


@dataclass
class UserErasure:
    """The users an erasure removes, shared by the parts while they rewrite a bundle.

    rows: (r,) int64 vocabulary rows removed, distinct and sorted; n_users: users before.
    content: the new manifest's content (the parts update their fields in it).
    removed: bundle file -> what was removed from it (for the audit log), filled by the parts.
    seen_items: (r,) int64 seen items of each removed user (set by the vectors part).
    """

    rows: np.ndarray
    n_users: int
    content: dict
    removed: dict[str, str] = field(default_factory=dict)
    seen_items: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @cached_property
    def keep(self) -> np.ndarray:
        """(n_users - r,) int64 rows kept, in order."""
        return np.setdiff1d(np.arange(self.n_users, dtype=np.int64), self.rows)

    @property
    def users_after(self) -> int:
        return int(len(self.keep))

    def table_rows(self, size: int, where: Path, key: str) -> np.ndarray:
        """Rows to keep of a network table with ``size`` rows along its user axis: the kept users
        and the last row (the unknown user). The table must have ``n_users + 1`` rows."""
        if size != self.n_users + 1:
            raise BundleError(f"{where}: {key} has {size} rows, expected {self.n_users + 1} (users + unknown)")
        return np.r_[self.keep, self.n_users]


class BundlePart:
    """One part of a bundle (see the module docstring). The defaults fit a part that a pipeline
    stage prepares: ``save`` runs the stage's writer and stores its entry under :attr:`name`,
    ``load`` finds nothing, ``drop_users`` removes the rows of the entry's ``user_aligned`` files."""

    name: str = ""

    def __init__(self, name: str | None = None):
        if name is not None:
            self.name = name

    def present(self, bundle: Bundle) -> bool:
        return isinstance(bundle.manifest.get(self.name), dict)

    def save(self, writer: BundleWriter, value: Any) -> dict[str, Any]:
        return {self.name: dict(value(writer))}

    def load(self, bundle: Bundle, loaded: Mapping[str, Any], **options: Any) -> Any:
        return None

    def verify(self, bundle: Bundle, loaded: Mapping[str, Any]) -> None:
        self.load(bundle, loaded)

    def drop_users(self, bundle: Bundle, erasure: UserErasure, writer: BundleWriter) -> None:
        drop_user_aligned_rows(bundle, self.name, erasure, writer)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def spec_object(bundle: Bundle, name: str) -> dict:
    """The JSON object in bundle file ``name`` (:class:`BundleError` when it is not an object)."""
    spec = bundle.json(name)
    if not isinstance(spec, dict):
        raise BundleError(f"{bundle.root / name}: not a JSON object")
    return spec


def drop_table_rows(state: dict, tables: Mapping[str, int], erasure: UserErasure, where: Path,
                    prefix: str = "", n_users: int | None = None) -> list[str]:
    """Remove the erased users' rows from ``state`` (a state_dict, in place) along each table's
    user axis (``tables``: key -> axis, from the network registry; keys under ``prefix``). Tables
    the state does not have (optional ones) are skipped. ``n_users``: the users the tables were
    built for, when the spec records it (default: the bundle's). Returns the keys changed."""
    import torch

    count = erasure.n_users if n_users is None else n_users
    if count != erasure.n_users:
        raise BundleError(f"{where}: the network was built for {count} users, the bundle has {erasure.n_users}")
    done = []
    for key, axis in tables.items():
        key = prefix + key
        if key not in state:
            continue
        keep = erasure.table_rows(int(state[key].shape[axis]), where, key)
        state[key] = state[key].index_select(axis, torch.from_numpy(keep)).contiguous()
        done.append(key)
    return done


def drop_user_aligned_rows(bundle: Bundle, name: str, erasure: UserErasure, writer: BundleWriter) -> None:
    """Write the files part ``name``'s manifest entry lists under ``user_aligned`` (paths inside
    the bundle, or inside the part's folder) without the erased users' rows."""
    entry = bundle.manifest.get(name)
    files = bundle.manifest["files"]
    n, keep = erasure.n_users, erasure.keep
    for f in (entry.get("user_aligned") or []) if isinstance(entry, dict) else []:
        rel = f if f in files else f"{name}/{f}"
        if rel not in files:
            raise BundleError(f"{bundle.root / MANIFEST}: part {name!r} lists user_aligned file {f!r}, "
                              "which is not in the bundle")
        path = bundle.root / rel
        if rel.endswith(".npy"):
            array = bundle.array(rel)
            if array.shape[:1] != (n,):
                raise BundleError(f"{path}: part {name!r} declares it user-aligned but it has shape {array.shape} for {n} users")
            writer.save_array(rel, array[keep])
        elif rel.endswith(".json"):
            values = bundle.json(rel)
            if not isinstance(values, list) or len(values) != n:
                raise BundleError(f"{path}: part {name!r} declares it user-aligned but it is not a list of {n} entries")
            writer.save_json(rel, [values[i] for i in keep.tolist()])
        elif rel.endswith(".parquet"):
            import pandas as pd

            try:
                table = pd.read_parquet(bundle.file(rel))
            except (OSError, ValueError) as exc:
                first = str(exc).strip().splitlines()
                raise BundleError(f"{path}: not a readable Parquet table ({first[0] if first else type(exc).__name__})") from None
            if len(table) != n:
                raise BundleError(f"{path}: part {name!r} declares it user-aligned but it has {len(table)} rows for {n} users")
            table.iloc[keep].reset_index(drop=True).to_parquet(writer.path(rel), index=False)
        else:
            raise BundleError(f"{path}: cannot remove user rows from this file type (user-aligned files must be "
                              ".npy, a JSON list or .parquet, one row per user in vocabulary order)")
        erasure.removed[rel] = "row"


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
    interacted with, item_popularity (n_items,) training events per item (not read when loading)."""

    user_vocab: IdVocab
    item_vocab: IdVocab
    user_vectors: np.ndarray
    item_vectors: np.ndarray
    seen: sp.csr_matrix
    item_popularity: np.ndarray | None = None


class VectorsPart(BundlePart):
    name = "vectors"

    def present(self, bundle: Bundle) -> bool:
        return bundle.has(USER_VOCAB)

    def save(self, writer: BundleWriter, value: BundleVectors) -> dict[str, Any]:
        from dmp_dl.index import METRIC

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
        return {"dim": int(items.shape[1]), "metric": METRIC,
                "counts": {"users": n_users, "items": n_items, "seen_pairs": int(seen.nnz)}}

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
        return BundleVectors(user_vocab, item_vocab, users, items, seen)

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
        """value: :class:`dmp_dl.index.IndexOptions` (None: the defaults)."""
        from dmp_dl.index import IndexOptions, build_and_measure

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
        from dmp_dl.index import is_exact, set_search_params

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
        from dmp_dl.index import IndexOptions, build_and_measure

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

    from dmp_dl.data.features import FeatureTable

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
