"""Writing a bundle: from arrays (:func:`export_bundle`) or from a finished training run (:func:`export_run`).

The bundle's layout, writer and reader are in :mod:`dmp_dl.store.bundle`; the parts written, in
order, in :mod:`dmp_dl.store.contents`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
from hydra.utils import instantiate

from dmp_dl.index.ann import IndexOptions
from dmp_dl.models.parts import BundleVectors
from dmp_dl.store.bundle import BundleWriter
from dmp_dl.store.contents import parts_for
from dmp_dl.training.fit import config_to_dict
from dmp_dl.training.fitters import fitter_of


def export_bundle(
    target: str | os.PathLike,
    *,
    user_vocab,
    item_vocab,
    user_vectors: np.ndarray,
    item_vectors: np.ndarray,
    seen: sp.csr_matrix,
    item_popularity: np.ndarray,
    index_options=None,
    network: Mapping[str, Any] | None = None,
    propensity: Any = None,
    parts: Mapping[str, Callable[[BundleWriter], Mapping[str, Any]]] | None = None,
    config: Mapping[str, Any] | None = None,
    seen_sums: sp.csr_matrix | None = None,
    half_life_days: float | None = None,
) -> Path:
    """Write a complete bundle to ``target`` (atomically, :class:`~dmp_dl.store.bundle.BundleWriter`): every part
    given, in the order of :data:`dmp_dl.store.contents.PART_CLASSES` (:mod:`dmp_dl.store.parts`).

    Parameters
    ----------
    user_vocab, item_vocab: :class:`IdVocab`; row i of every array is id i.
    user_vectors: (n_users, dim) float32; item_vectors: (n_items, dim) float32.
    seen: (n_users, n_items) CSR of the items each user interacted with.
    item_popularity: (n_items,) training events per item.
    index_options: :class:`dmp_dl.index.ann.IndexOptions` (default: ``auto``).
    network: optional ``{"net", "kwargs", "user_features", "item_features", "history_len"}`` for
        cold start; propensity: an optional propensity result object (``dmp_dl.propensity``).
    parts: further parts, name -> the writer that writes its files and returns its manifest entry
        (stored under ``name``): scoring, profiles, segments, realtime, or any other. An entry's
        ``user_aligned`` list names the part's files whose first axis is the user vocabulary, so
        that jobs which remove users (erasure) can find every per-user row.
    config: the resolved run configuration, stored in the manifest.
    seen_sums, half_life_days: each user's summed event weights per item, decayed with
        ``half_life_days`` to the user's latest event (:meth:`InteractionDataModule.user_item_sums
        <dmp_dl.data.datamodule.InteractionDataModule.user_item_sums>`), stored for the pairs of
        ``seen``: what real-time updates continue from.
    """
    values: dict[str, Any] = {
        "vectors": BundleVectors(user_vocab, item_vocab, user_vectors, item_vectors, seen, item_popularity,
                                 seen_sums, half_life_days),
        "indexes": index_options, "network": network, "propensity": propensity, **(parts or {}),
    }
    values = {name: value for name, value in values.items() if value is not None or name == "indexes"}
    with BundleWriter(target) as w:
        content: dict[str, Any] = {}
        for part in parts_for(values):
            content.update(part.save(w, values[part.name]))
        content["config"] = dict(config or {})
        return w.commit(content)


def export_run(cfg, result: Mapping[str, Any], target: str | os.PathLike) -> Path:
    """Export the bundle of a finished ``pipeline.run`` (its ``datamodule``, ``module``, ``embeddings``:
    the network's (user, item) vectors of every user's full history, and, when present,
    ``propensity`` and ``bundle_parts``, further parts for :func:`export_bundle`) to ``target``."""
    dm, net = result["datamodule"], result["module"].net
    options = instantiate(cfg.index, _convert_="all") if cfg.get("index") is not None else IndexOptions()
    users, items = result["embeddings"]
    sums, _ = dm.user_item_sums()
    net_kwargs = result.get("network_kwargs")
    if net_kwargs is None:
        net_kwargs = fitter_of(cfg).network_kwargs(cfg) if cfg.get("model") is not None else {}
    return export_bundle(
        target,
        user_vocab=dm.user_vocab, item_vocab=dm.item_vocab,
        user_vectors=users, item_vectors=items,
        seen=dm.all_seen, item_popularity=dm.item_counts,
        index_options=options,
        network={"net": net, "kwargs": net_kwargs, "user_features": dm.user_features,
                 "item_features": dm.item_features, "history_len": result.get("history_len", dm.history_len)},
        propensity=result.get("propensity"),
        parts={"user_table": dm.user_features, **(result.get("bundle_parts") or {})},
        config=config_to_dict(cfg),
        seen_sums=sums, half_life_days=dm.half_life_days,
    )
