"""Building the embedding model and the Lightning Trainer from the config, and fitting."""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint

from dmp_dl.data.datamodule import InteractionDataModule
from dmp_dl.errors import ConfigError
from dmp_dl.models.retrieval import RetrievalModule

log = logging.getLogger(__name__)


def build_module(cfg: DictConfig, dm: InteractionDataModule) -> RetrievalModule:
    """The network (``model.net``) sized from the data, wrapped in ``model.module``."""
    net = instantiate(cfg.model.net, _convert_="all")(**dm.net_kwargs())
    return instantiate(cfg.model.module, _convert_="all")(net=net, item_counts=dm.item_counts)


def _instantiate_all(group: DictConfig | None) -> list:
    if not group:
        return []
    return [instantiate(node, _convert_="all") for node in group.values() if isinstance(node, DictConfig) and "_target_" in node]


def build_trainer(cfg: DictConfig, has_validation: bool) -> pl.Trainer:
    """The Trainer with the configured callbacks and loggers.

    Without validation users (e.g. ``val_frac=0``) validation is switched off and the callbacks that
    monitor a validation metric keep only the last checkpoint.
    """
    callbacks = _instantiate_all(cfg.get("callbacks"))
    loggers = _instantiate_all(cfg.get("logger"))
    extra = {}
    if not has_validation:
        log.warning("no validation users: validation, early stopping and best-checkpoint selection are off")
        callbacks = [c for c in callbacks if not isinstance(c, EarlyStopping)]
        for c in callbacks:
            if isinstance(c, ModelCheckpoint):
                c.monitor = None
                c.save_top_k = 1
        extra["limit_val_batches"] = 0
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, _convert_="all", **extra)


def resolve_ckpt_path(ckpt_path: str | None, output_dir: Path) -> str | None:
    """``last`` -> this run's ``checkpoints/last.ckpt`` (None if absent: a fresh start)."""
    if ckpt_path in (None, "", "null"):
        return None
    if ckpt_path == "last":
        last = output_dir / "checkpoints" / "last.ckpt"
        if last.exists():
            return str(last)
        log.warning("ckpt_path=last but %s does not exist: starting from scratch", last)
        return None
    if not Path(ckpt_path).exists():
        raise ConfigError(f"ckpt_path: checkpoint not found: {ckpt_path}")
    return str(ckpt_path)


def load_best_weights(module: RetrievalModule, trainer: pl.Trainer) -> str | None:
    """Load the best checkpoint's weights into ``module`` (if checkpointing ran). Returns its path."""
    ckpt = trainer.checkpoint_callback
    path = getattr(ckpt, "best_model_path", "") or getattr(ckpt, "last_model_path", "") if ckpt else ""
    if not path or not Path(path).exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    module.load_state_dict(state)
    return path


def config_to_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
