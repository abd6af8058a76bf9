"""The parts of a bundle behind one interface: save, load, verify, drop users' rows.

A bundle (:mod:`dmp_dl.store.bundle`) is a set of parts. Each part owns some files and manifest fields::

    vectors      users.json, items.json, user/item vectors, seen items,  dmp_dl.models.parts
                 item popularity (manifest: dim, metric, counts)
    indexes      item_index.faiss, user_index.faiss (indexes,           dmp_dl.models.parts
                 index_options)
    network      network/weights.pt, network/network.json (network)     dmp_dl.models.parts
    user_table   user_table/ (user_table)                         dmp_dl.data.table_part
    propensity   propensity/ (propensity)                        dmp_dl.propensity.bundle
    profiles     profiles/ (profiles)                             dmp_dl.audience.bundle
    segments     segments/ (segments)                             dmp_dl.audience.bundle
    scoring      scoring/ (scoring)                               dmp_dl.models.scoring
    item_categories  item_categories/ (item_categories)           dmp_dl.serving.item_rules
    realtime     realtime/ (realtime)                             dmp_dl.realtime.part
    uplift       uplift/ (uplift)                                 dmp_dl.campaign.bundle

and is a :class:`BundlePart`:

* ``save(writer, value)`` writes the part's files with a :class:`~dmp_dl.store.bundle.BundleWriter` and
  returns its manifest fields. ``value`` is what the part stores (:class:`~dmp_dl.models.parts.BundleVectors`, the index
  options, the network, the propensity result), or for parts a pipeline stage prepares (scoring,
  profiles, segments, realtime and any further entry) that stage's writer ``(writer) -> entry``.
* ``load(bundle, loaded, **options)`` returns the part's object (None when the bundle has none);
  ``loaded`` holds the parts loaded before it, by name (the vectors come first).
* ``verify(bundle, loaded)`` raises :class:`~dmp_dl.core.errors.BundleError` naming the file when the
  stored part does not fit the rest of the bundle (by default: it loads it).
* ``drop_users(bundle, erasure, writer)`` writes the part without the users of a
  :class:`UserErasure`. A part's manifest entry lists under ``user_aligned`` its files whose row i
  belongs to user i of ``users.json`` (``.npy`` arrays, JSON lists, Parquet tables); the default
  removes the users' rows of those, so a new per-user file is erased by being listed there.

:mod:`dmp_dl.store.contents` lists every part in order (by the module that implements it, which
imports this one); export (:func:`dmp_dl.training.export.export_bundle`),
loading (:meth:`dmp_dl.serving.recommender.Recommender.load`) and erasure
(:func:`dmp_dl.privacy.erasure.stage_erasure`) loop over that list.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from dmp_dl.core.errors import BundleError
from dmp_dl.store.bundle import (
    Bundle,
    BundleWriter,
)
from dmp_dl.store.manifest import MANIFEST

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
