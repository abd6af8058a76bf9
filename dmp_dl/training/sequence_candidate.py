"""The sequence candidate of the automatic choice (``sasrec`` in ``model.candidates``).

A SASRec network (:mod:`dmp_dl.models.sasrec`, settings under ``model.sequence``) is trained in the
Lightning loop on the same training split as the other candidates: next-item prediction over windows
of each user's training events in time order (:class:`~dmp_dl.models.sequence_module.SequenceModule`),
validated after each epoch on every validation user with the choice's ``selection_metric``, early
stopping after ``patience`` epochs without a better score, the best epoch's weights kept in memory
(no checkpoint files). A user is encoded from their latest items before the period ranked, so the
validation and test scores are those of the choice's other candidates, on the same users.

It is fitted only where it can learn an order and pays its way (:func:`skip_reason`): the log has
event times and the split is in time, one process (not data-parallel), no DP-SGD, and on the CPU a
softmax of at most ``model.sequence.cpu_max_scores`` scores an epoch. From its second epoch it stops
as soon as its validation score is below ``behind_stop`` x the best other candidate's
(:class:`BehindBest`): there it cannot win, and its epochs would only cost time.

Its blend with EASE, ``sasrec + w * ease``, is a candidate too (the autoencoder's blend grid). When
either wins, the bundle's network and vectors are the sequence model's, trained again on every event
for the epochs chosen (:func:`refit_sequence`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Callback, EarlyStopping

from dmp_dl.models.embeddings import item_vectors, user_vectors
from dmp_dl.training.fit import KeepBest, build_module, build_trainer, refit_embedding_model

log = logging.getLogger(__name__)

SEQUENCE = "sasrec"
TIME_SPLITS = ("global_temporal", "leave_last_n")


class BehindBest(Callback):
    """Stop training once, from epoch ``min_epochs`` on, the validation ``monitor`` is below
    ``share`` x ``bar`` (the best score of the other candidates): the network cannot win the choice."""

    def __init__(self, monitor: str, bar: float | None, share: float | None, min_epochs: int = 2):
        self.monitor, self.bar, self.share, self.min_epochs = monitor, bar, share, min_epochs
        self.fired: str | None = None

    def on_validation_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if self.bar is None or self.share is None or value is None or trainer.current_epoch + 1 < self.min_epochs:
            return
        if float(value) < self.share * self.bar:
            self.fired = (f"stopped after epoch {trainer.current_epoch + 1}: validation {self.monitor[4:]} "
                          f"{float(value):.4f} < {self.share:g} x the best other candidate's {self.bar:.4f}")
            log.info("sasrec candidate %s", self.fired)
            trainer.should_stop = True


def skip_reason(cfg: DictConfig, dm, device: torch.device, processes: int) -> str | None:
    """Why the sequence candidate is not fitted on this data and machine (None: it is)."""
    node = cfg.model.sequence
    if not dm.has_timestamps:
        return "the log has no event times: there is no order of events to learn from"
    method = getattr(dm, "split_method", None)
    if method is not None and method not in TIME_SPLITS:
        return f"the split ({method}) is not in time: the held-out items do not follow the training ones"
    if processes > 1:
        return "data-parallel training (trainer=ddp) covers the autoencoder; the sequence model trains in one process"
    if len(dm.val_users) == 0:
        return "no validation users: it could not be compared with the other candidates"
    limit = node.get("cpu_max_scores", None)
    width = min(dm.n_items, int(node.module.get("full_softmax_max_items", 50000)))
    scores = float(len(dm.train_idx)) * width
    if device.type != "cuda" and limit is not None and scores > float(limit):
        return (f"on the CPU its softmax would compute {scores:.3g} scores an epoch ({len(dm.train_idx):,} training "
                f"events x {width:,} items) > model.sequence.cpu_max_scores={float(limit):.3g}; it runs on a GPU, or "
                "raise the setting")
    return None


def sub_config(cfg: DictConfig, metric: str = "ndcg@20") -> DictConfig:
    """``cfg`` with ``model`` replaced by the sequence candidate's own model config (``model=sasrec``'s
    layout: ``fitter: lightning``, ``net``, ``module``) and no checkpoint or early-stopping callbacks
    (the candidate's fit keeps its best weights in memory and stops on its own settings)."""
    node = OmegaConf.to_container(cfg.model.sequence, resolve=True)
    base = OmegaConf.to_container(cfg, resolve=False)
    k = int(metric.split("@")[1])
    module = {**node["module"], "val_ks": sorted({*node["module"].get("val_ks", [10, 20]), k})}
    base["model"] = {"name": SEQUENCE, "fitter": "lightning", "dim": node["dim"], "max_epochs": node["max_epochs"],
                     "refit": True, "net": node["net"], "module": module}
    base["ckpt_path"], base["init_from"] = None, None
    callbacks = {k: v for k, v in (base.get("callbacks") or {}).items()
                 if not (isinstance(v, dict) and str(v.get("_target_", "")).endswith(("ModelCheckpoint", "EarlyStopping")))}
    base["callbacks"] = callbacks
    # one candidate among several: no checkpoint files, and no model summary table in the run's log
    base["trainer"] = {**base["trainer"], "enable_checkpointing": False, "enable_model_summary": False}
    return OmegaConf.create(base)


def fit_sequence(cfg: DictConfig, dm, metric: str, bar: float | None) -> tuple[torch.nn.Module, dict[str, Any], DictConfig]:
    """Train the candidate on ``dm``'s training split (see the module docstring). ``bar``: the best
    validation ``metric`` of the other candidates (None: no early stop for being behind).
    Returns (the network with its best epoch's weights, on the CPU in eval mode; facts for
    ``metrics.json``; the candidate's own config, for the refit and the bundle)."""
    sub = sub_config(cfg, metric)
    node = cfg.model.sequence
    monitor = f"val/{metric}"
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    module = build_module(sub, dm)
    keep = KeepBest(monitor)
    behind = BehindBest(monitor, bar, node.get("behind_stop", None))
    stopping = EarlyStopping(monitor=monitor, mode="max", patience=int(node.get("patience", 3)))
    trainer = build_trainer(sub, has_validation=True, extra_callbacks=[keep, behind, stopping])
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    seconds = time.perf_counter() - t0
    if keep.state is not None:
        module.load_state_dict(keep.state)
    epochs = int(trainer.current_epoch)
    if behind.fired:
        stopped = behind.fired
    elif stopping.stopped_epoch:
        stopped = f"early stopping: {stopping.wait_count} epochs without a better validation {metric}"
    else:
        stopped = f"the epoch limit ({trainer.max_epochs})"
    facts = {"epochs": epochs, "best_epoch": keep.best_epoch + 1, "fit_seconds": seconds, "stopped": stopped,
             "val_best": keep.best if keep.best_epoch >= 0 else None, "train_events": int(len(dm.train_idx)),
             "max_len": int(module.net.max_len), "dim": int(module.net.dim), "device": str(module.device.type)}
    return module.net.cpu().eval(), facts, sub


def sequence_vectors(net: torch.nn.Module, n_users: int, history: np.ndarray, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """(users (n_users, dim) encoded from ``history`` (n_users, L), most recent first; items (n_items, dim))."""
    users = user_vectors(net.to(device), np.arange(n_users), history, device=device)
    items = item_vectors(net, net.n_items, device=device)
    net.cpu()
    return users, items


def refit_sequence(sub: DictConfig, dm, epochs: int) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The winner trained again from scratch on every event for ``epochs`` epochs (as ``model=sasrec``'s
    final fit). Returns (network on the CPU in eval mode, facts)."""
    module, facts = refit_embedding_model(sub, dm, epochs)
    return module.net.cpu().eval(), facts
