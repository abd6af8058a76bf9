"""Warm start: a new run's network initialised from a previous run's, row by row by id.

``init_from=PATH`` points a run at a previous run's bundle (``.../artifacts``) or at one of its
checkpoints (``.../checkpoints/*.ckpt``). Before training, every parameter of the new network is
filled from the previous one where both have it:

* along an axis that :meth:`vocab_axes` says is the user or item vocabulary, row ``i`` of the new
  run gets the previous run's row of the same external id; ids the previous run did not know keep
  their fresh initialisation, ids that left the data are dropped. Rows past the vocabulary (the
  unknown-user row, the padding item) are copied position for position;
* any other axis must have the same size on both sides. A vocabulary-aligned parameter whose other
  axes differ (another embedding width), or a network of another class, is refused with one line
  naming both networks; a parameter without a vocabulary axis whose shape changed (new attribute
  values, another hidden width) keeps its fresh initialisation and is listed.

Only parameters are copied: buffers (e.g. each user's attribute tokens) describe the new data and
come from it. The optimiser starts afresh. Everything here reads the axes a network declares in
the network registry (:mod:`dmp_dl.models.registry`, its ``vocab_axes``) alone, so any registered
network (user or item tables, item x item matrices) warm-starts the same way.

Checkpoints carry the vocabularies they were trained on (:class:`VocabularyRecord` adds them), so
that a checkpoint can be a warm start too, and resuming one (``ckpt_path``) on data whose
vocabularies changed is refused with a line that points here.
"""

from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from torch import nn

from dmp_dl.core.errors import BundleError, ConfigError
from dmp_dl.data.vocab import IdVocab
from dmp_dl.models import registry
from dmp_dl.store.bundle import ITEM_VOCAB, NETWORK_SPEC, NETWORK_WEIGHTS, USER_VOCAB, Bundle

log = logging.getLogger(__name__)

RECORD_KEY = "dmp_dl_vocabularies"  # the checkpoint entry VocabularyRecord writes
VOCABS = ("user", "item")


@dataclass
class PreviousNetwork:
    """A previous run's network: where it came from (``source``), its class name and width, its
    state_dict and the external ids of its vocabularies (``{"user": ids, "item": ids}``)."""

    source: str
    net_class: str
    dim: int | None
    state: dict[str, torch.Tensor]
    vocabs: dict[str, np.ndarray]

    def describe(self) -> str:
        return f"a {self.net_class}" + (f" with dim {self.dim}" if self.dim is not None else "")


def describe_net(net: nn.Module) -> str:
    dim = getattr(net, "dim", None)
    return f"a {type(net).__name__}" + (f" with dim {dim}" if dim is not None else "")


# -- what checkpoints record ------------------------------------------------------------------------
class VocabularyRecord(pl.Callback):
    """Adds the run's user and item ids and its network's class and width to every checkpoint
    (under :data:`RECORD_KEY`; plain lists and strings, readable with ``weights_only=True``)."""

    def __init__(self, user_ids, item_ids):
        self.user_ids = [str(x) for x in user_ids]
        self.item_ids = [str(x) for x in item_ids]

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        net = pl_module.net
        checkpoint[RECORD_KEY] = {"user": self.user_ids, "item": self.item_ids, "class": type(net).__name__,
                                  "dim": int(getattr(net, "dim", 0) or 0)}


# -- reading a previous run ------------------------------------------------------------------------
def check_init_from(path: str | None) -> None:
    """Refuse a missing or unusable ``init_from`` path before any data is read."""
    if path in (None, "", "null"):
        return
    p = Path(path)
    if p.is_dir():
        if not (p / "manifest.json").is_file():
            raise ConfigError(f"init_from: {p} is a folder but not a bundle (no manifest.json); point it at a previous "
                              "run's artifacts/ folder or one of its checkpoints/*.ckpt")
        return
    if not p.is_file():
        raise ConfigError(f"init_from: {p} not found; point it at a previous run's artifacts/ folder or one of its "
                          "checkpoints/*.ckpt")
    if not zipfile.is_zipfile(p):
        raise ConfigError(f"init_from: {p} is neither a bundle folder nor a complete checkpoint (truncated or corrupt?)")


def load_previous(path: str | Path) -> PreviousNetwork:
    """The network stored in a bundle folder or a checkpoint file (see :func:`check_init_from`)."""
    check_init_from(str(path))
    p = Path(path)
    return _from_bundle(p) if p.is_dir() else _from_checkpoint(p)


def _from_bundle(path: Path) -> PreviousNetwork:
    try:
        bundle = Bundle.open(path)
        spec = bundle.json(NETWORK_SPEC)
        state = bundle.torch_state(NETWORK_WEIGHTS)
        users, items = IdVocab.load(bundle.file(USER_VOCAB)), IdVocab.load(bundle.file(ITEM_VOCAB))
    except BundleError as exc:
        raise ConfigError(f"init_from: {exc}") from None
    kwargs = spec.get("kwargs") or {} if isinstance(spec, dict) else {}
    return PreviousNetwork(str(path), str(spec.get("class")), kwargs.get("dim"), dict(state),
                           {"user": users.ids, "item": items.ids})


def _from_checkpoint(path: Path) -> PreviousNetwork:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        state = {k[len("net."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    except Exception as exc:  # torch.load and a foreign layout raise many types
        raise ConfigError(f"init_from: {path} is not a training checkpoint of this project ({type(exc).__name__})") from None
    record = ckpt.get(RECORD_KEY)
    if not isinstance(record, dict) or not all(isinstance(record.get(v), list) for v in VOCABS):
        raise ConfigError(f"init_from: {path} does not record the user and item ids it was trained on (written by an "
                          "older dmp_dl); point init_from at that run's bundle (its artifacts/ folder) instead")
    return PreviousNetwork(str(path), str(record.get("class")), record.get("dim") or None, state,
                           {v: np.asarray(record[v], dtype=object) for v in VOCABS})


# -- copying rows by id ----------------------------------------------------------------------------
def _axis_rows(new_ids: np.ndarray, old_ids: np.ndarray, new_size: int, old_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(destination rows, source rows) along one vocabulary axis: known ids by id, then the rows
    past the vocabulary position for position."""
    n_new, n_old = len(new_ids), len(old_ids)
    src = pd.Index(old_ids).get_indexer(pd.Index(new_ids))
    dst = np.flatnonzero(src >= 0)
    extra = np.arange(min(new_size - n_new, old_size - n_old))
    return np.r_[dst, n_new + extra].astype(np.int64), np.r_[src[dst], n_old + extra].astype(np.int64)


def _index(rows: list[np.ndarray]) -> tuple[torch.Tensor, ...]:
    """The open mesh of per-axis row lists, for advanced indexing of every combination."""
    return tuple(torch.from_numpy(a) for a in np.ix_(*rows))


def warm_start(net: nn.Module, previous: PreviousNetwork, vocabs: dict[str, np.ndarray]) -> dict[str, Any]:
    """Fill ``net``'s parameters from ``previous`` (see the module docstring), in place.

    vocabs: the new run's external ids, ``{"user": (n_users,), "item": (n_items,)}``.
    Returns the summary for ``metrics.json["train"]["warm_start"]``. Raises :class:`ConfigError`
    naming both networks when they are incompatible.
    """
    entry = registry.registered(net)
    if entry is None:
        raise ConfigError(f"init_from: this run's network {type(net).__name__} is not a registered network, so which "
                          "of its axes are user or item rows is unknown (dmp_dl.models.registry) and it cannot be "
                          "warm-started; set init_from=null")

    def refuse(detail: str) -> ConfigError:
        return ConfigError(f"init_from: {previous.source} holds {previous.describe()} and this run builds "
                           f"{describe_net(net)} ({detail}); a network warm-starts only from one of the same class "
                           "and width: match the model settings or train from scratch (init_from=null)")

    if previous.net_class != type(net).__name__:
        raise refuse("another class")
    axes = entry.axes
    copied, fresh = [], []
    with torch.no_grad():
        for name, param in net.named_parameters():
            old = previous.state.get(name)
            names = tuple(axes.get(name, (None,) * param.dim()))
            if old is None or old.dim() != param.dim():
                if any(names):
                    raise refuse(f"{name} is missing there" if old is None else f"{name} has another shape")
                fresh.append(name)
                continue
            dst, src = [], []
            for axis, vocab in enumerate(names):
                if vocab is None:
                    if old.shape[axis] != param.shape[axis]:
                        break
                    dst.append(np.arange(param.shape[axis]))
                    src.append(dst[-1])
                else:
                    rows = _axis_rows(vocabs[vocab], previous.vocabs[vocab], param.shape[axis], old.shape[axis])
                    dst.append(rows[0])
                    src.append(rows[1])
            else:
                param[_index(dst)] = old.to(param.dtype)[_index(src)]
                copied.append(name)
                continue
            if any(names):
                raise refuse(f"{name} has shape {tuple(old.shape)} there and {tuple(param.shape)} here")
            fresh.append(name)
    summary: dict[str, Any] = {"from": previous.source, "parameters_copied": copied, "parameters_initialised": fresh}
    for vocab in VOCABS:
        known = int(pd.Index(vocabs[vocab]).isin(previous.vocabs[vocab]).sum())
        summary[f"{vocab}s"] = {"known": known, "new": int(len(vocabs[vocab]) - known),
                                "not_in_this_data": int(len(previous.vocabs[vocab]) - known)}
    u, i = summary["users"], summary["items"]
    log.info("warm start from %s: %d users and %d items copied by id, %d new users and %d new items initialised; "
             "%d of %d parameters copied%s", previous.source, u["known"], i["known"], u["new"], i["new"], len(copied),
             len(copied) + len(fresh), f" (fresh: {', '.join(fresh)})" if fresh else "")
    return summary


# -- resuming ----------------------------------------------------------------------------------------
def check_resumable(path: str | Path, net: nn.Module, vocabs: dict[str, np.ndarray]) -> None:
    """Refuse to resume checkpoint ``path`` into ``net`` when it was trained on other vocabularies
    or is another network, with one line (instead of a size-mismatch traceback from the load)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    record = ckpt.get(RECORD_KEY)
    state = {k[len("net."):]: v for k, v in ckpt.get("state_dict", {}).items() if k.startswith("net.")}
    here = net.state_dict()
    fix = (f"ckpt_path resumes an interrupted run on the same data only; to continue from this checkpoint on this "
           f"data, start a new run (a new paths.output_dir, or ckpt_path=null) with init_from={path}")
    if isinstance(record, dict) and all(isinstance(record.get(v), list) for v in VOCABS):
        if record.get("class") not in (None, type(net).__name__):
            raise ConfigError(f"ckpt_path: {path} holds a {record.get('class')} and this run builds {describe_net(net)}; "
                              "resume with the model settings it was trained with, or set ckpt_path=null")
        changed = [v for v in VOCABS if not np.array_equal(np.asarray(record[v], dtype=object),
                                                           np.asarray(vocabs[v], dtype=object))]
        if changed:
            counts = ", ".join(f"{len(record[v])} {v}s there and {len(vocabs[v])} here" for v in changed)
            raise ConfigError(f"ckpt_path: {path} was trained on other {' and '.join(v + 's' for v in changed)} than "
                              f"this data has ({counts}); {fix}")
    for name, tensor in here.items():
        if name not in state or state[name].shape != tensor.shape:
            where = "is missing there" if name not in state else f"has shape {tuple(state[name].shape)} there and {tuple(tensor.shape)} here"
            raise ConfigError(f"ckpt_path: {path} does not fit this run's {describe_net(net)} ({name} {where}); {fix}")
