"""Building the embedding model and the Lightning Trainer from the config, and fitting."""

from __future__ import annotations

import copy
import io
import logging
import sys
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Callback, EarlyStopping, ModelCheckpoint
from pytorch_lightning.plugins.io import TorchCheckpointIO

from dmp_dl.core.errors import ConfigError, DmpError, NonFiniteError
from dmp_dl.core.io import atomic_write_bytes
from dmp_dl.data.datamodule import InteractionDataModule
from dmp_dl.models.autoencoder import sparse_gradients_for
from dmp_dl.models.retrieval import RetrievalModule
from dmp_dl.training.fitters import fitter_of
from dmp_dl.training.warm_start import VocabularyRecord, check_resumable, load_previous, warm_start

log = logging.getLogger(__name__)


def new_autoencoder(cfg: DictConfig, dm, processes: int = 1) -> tuple[torch.nn.Module, str | None]:
    """The untrained autoencoder of ``cfg.model.vae`` sized from ``dm`` (any object with ``n_users``,
    ``n_items`` and ``user_features``), its encoder's item rows with sparse gradients unless
    ``processes`` > 1 train it data-parallel. Returns (net, the line saying why sparse gradients were
    wanted and are not used, or None)."""
    node = cfg.model.vae
    sparse, dense_why = sparse_gradients_for(node.net.get("sparse_gradients"), dm.n_items, processes)
    net = instantiate(node.net, _convert_="all")(n_users=dm.n_users, n_items=dm.n_items, user_features=dm.user_features,
                                                 sparse_gradients=sparse)
    return net, dense_why


def build_module(cfg: DictConfig, dm: InteractionDataModule) -> RetrievalModule:
    """The untrained network sized from the data, wrapped in its training module, where the config's
    fitter keeps them (``model.net`` and ``model.module``; ``model.vae`` for the automatic choice,
    with the training rows attached): :meth:`dmp_dl.training.fitters.Fitter.build_module`."""
    return fitter_of(cfg).build_module(cfg, dm)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written like every other file (:mod:`dmp_dl.core.io`): to a temporary file beside the
    target, fsynced, then renamed, so a kill mid-write leaves the previous ``last.ckpt`` whole.

    Lightning's own writer goes through the system temp folder and ``shutil.move``, which is a
    plain, interruptible copy when that folder is on another filesystem. Loading (resume) never
    unpickles arbitrary objects.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint takes no storage_options")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write_bytes(path, buffer.getbuffer())

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        """Resume without unpickling: tensors and plain containers only (``weights_only=True``)."""
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)


class FiniteLossGuard(Callback):
    """Stop training at the first step whose loss is NaN or infinite (a learning rate far too high,
    a temperature near 0, an overflowing feature), with one line naming the step, instead of
    training on and exporting NaN vectors. Runs before the checkpoint callbacks (Lightning calls
    them last), so no checkpoint holds the diverged weights."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if torch.is_tensor(loss) and not bool(torch.isfinite(loss.detach()).all()):
            raise NonFiniteError(
                f"training diverged: the loss is {float(loss.detach().float().mean())} at epoch {trainer.current_epoch}, "
                f"step {trainer.global_step}; nothing was exported. Lower the learning rate "
                "(model.module.optimizer.lr) or raise model.module.temperature, and check the data for extreme values")


class KeepBest(Callback):
    """Keeps the weights of the best validation epoch in memory (no checkpoint files)."""

    def __init__(self, monitor: str):
        self.monitor, self.best, self.best_epoch, self.state = monitor, -float("inf"), -1, None

    def on_validation_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if value is not None and float(value) > self.best:
            self.best, self.best_epoch = float(value), trainer.current_epoch
            self.state = copy.deepcopy(module.state_dict())

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint of the fit keeps (a Ray worker restarted from it resumes the search)."""
        return {"best": self.best, "best_epoch": self.best_epoch, "state": self.state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best, self.best_epoch, self.state = state_dict["best"], state_dict["best_epoch"], state_dict["state"]


def _instantiate_all(group: DictConfig | None) -> list:
    if not group:
        return []
    return [instantiate(node, _convert_="all") for node in group.values() if isinstance(node, DictConfig) and "_target_" in node]


def build_trainer(cfg: DictConfig, has_validation: bool, extra_callbacks: list | None = None,
                  placement: dict | None = None) -> pl.Trainer:
    """The Trainer with the configured callbacks (and ``extra_callbacks``) and loggers.

    Without validation users (e.g. ``val_frac=0``) validation is switched off and the callbacks that
    monitor a validation metric keep only the last checkpoint. Checkpoints are written atomically
    (:class:`AtomicCheckpointIO`). ``placement``: Trainer arguments that place the fit (a Ray Train
    worker's strategy and plugins: :func:`dmp_dl.training.data_parallel.data_parallel_placement`).
    """
    callbacks = [FiniteLossGuard(), *_instantiate_all(cfg.get("callbacks")), *(extra_callbacks or [])]
    loggers = _instantiate_all(cfg.get("logger"))
    extra = {}
    if cfg.trainer.get("enable_progress_bar") == "auto":  # a bar on a terminal, none in a piped or captured log
        extra["enable_progress_bar"] = sys.stdout.isatty()
    if not has_validation:
        log.warning("no validation users: validation, early stopping and best-checkpoint selection are off")
        callbacks = [c for c in callbacks if not isinstance(c, EarlyStopping)]
        for c in callbacks:
            if isinstance(c, ModelCheckpoint) and c.monitor is not None:
                c.monitor = None
                c.save_top_k = 1
        extra["limit_val_batches"] = 0
    placement = dict(placement or {})
    plugins = [*placement.pop("plugins", []), AtomicCheckpointIO()]
    return instantiate_trainer(cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=plugins,
                               **placement, **extra)


RAY_STRATEGY = "ray"  # trainer=ray: the model stage's network fits as Ray Train jobs (dmp_dl.training.ray_fit)
RAY_SETTINGS = ("num_workers", "use_gpu", "address", "max_failures", "storage_path", "cpus_per_worker",
                "checkpoint_every_s")


def instantiate_trainer(node: DictConfig, **kwargs: Any) -> pl.Trainer:
    """``node`` (a ``trainer`` config) built with ``kwargs``; a setting Lightning refuses (e.g.
    ``trainer.precision=banana``, ``trainer.devices=99``) is one ``trainer: ...`` ConfigError line.
    ``trainer=ray``'s own settings (:data:`RAY_SETTINGS`) are Ray Train's, not Lightning's: left out,
    with ``strategy: ray`` as Lightning's ``auto`` unless ``kwargs`` place the fit."""
    if node.get("strategy") == RAY_STRATEGY or any(key in node for key in RAY_SETTINGS):
        plain = OmegaConf.to_container(node, resolve=True)
        node = OmegaConf.create({k: v for k, v in plain.items() if k not in RAY_SETTINGS})
        if node.get("strategy") == RAY_STRATEGY:
            node.strategy = "auto"
    try:
        return instantiate(node, _convert_="all", **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__ or exc
        if isinstance(cause, DmpError):
            raise cause from None
        raise ConfigError(f"trainer: {type(cause).__name__}: {' '.join(str(cause).split())}") from None


def resolve_ckpt_path(ckpt_path: str | None, output_dir: Path) -> str | None:
    """``last`` -> this run's ``checkpoints/last.ckpt`` (None if absent: a fresh start).

    Raises :class:`ConfigError` for a missing file, or one that is not a complete checkpoint
    (torch checkpoints are zip archives; a truncated one has no central directory).
    """
    if ckpt_path in (None, "", "null"):
        return None
    if ckpt_path == "last":
        path = output_dir / "checkpoints" / "last.ckpt"
        if not path.exists():
            log.warning("ckpt_path=last but %s does not exist: starting from scratch", path)
            return None
    else:
        path = Path(ckpt_path)
        if not path.exists():
            raise ConfigError(f"ckpt_path: checkpoint not found: {ckpt_path}")
    if not path.is_file() or not zipfile.is_zipfile(path):
        raise ConfigError(f"ckpt_path: {path} is not a complete checkpoint (truncated or corrupt); delete it to "
                          f"start from scratch or set ckpt_path to another checkpoint in {path.parent}")
    position = checkpoint_position(path)
    log.info("resuming from %s: %d epochs completed, global step %d, %d batches into the next epoch", path,
             position["epochs_completed"], position["global_step"], position["batches_into_epoch"])
    return str(path)


def checkpoint_position(path: str | Path) -> dict[str, int]:
    """Where training stood when checkpoint ``path`` was written: ``epochs_completed``,
    ``global_step`` (optimizer steps so far) and ``batches_into_epoch`` (training batches of the
    unfinished epoch, 0 at an epoch boundary). Raises :class:`ConfigError` for a file that is not a
    Lightning checkpoint."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        progress = ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]
        at_boundary = bool(progress.get("is_last_batch"))  # written at the end of epoch ``ckpt["epoch"]``
        return {"epochs_completed": int(ckpt["epoch"]) + at_boundary, "global_step": int(ckpt["global_step"]),
                "batches_into_epoch": 0 if at_boundary else int(progress["current"]["processed"])}
    except Exception as exc:  # torch.load and a foreign layout raise many types
        raise ConfigError(f"ckpt_path: {path} is not a training checkpoint of this project ({type(exc).__name__}: "
                          f"{exc})") from None


def fit_embedding_model(cfg: DictConfig, dm: InteractionDataModule, privacy, *, placement: dict | None = None,
                        extra_callbacks: list | None = None, resume_from: str | None = None,
                        previous=None) -> tuple[RetrievalModule, dict[str, Any]]:
    """Build the configured embedding model for ``dm``, fit it and load the best checkpoint's weights.

    ``ckpt_path`` resumes an interrupted run on the same data; otherwise ``init_from`` (a previous
    run's bundle or checkpoint) warm-starts the network by id (:mod:`dmp_dl.training.warm_start`).
    privacy: the run's :class:`~dmp_dl.privacy.training.PrivacyHooks` (DP-SGD when configured; None:
    none, as in a Ray Train worker, whose run refuses DP before reading data).
    In a Ray Train worker (:mod:`dmp_dl.training.ray_fit`): ``placement`` (its strategy and
    plugins), ``extra_callbacks`` (its checkpoint reports), ``resume_from`` (the checkpoint Ray
    restarted it from, before ``ckpt_path``) and ``previous`` (``init_from`` as the driver read it).
    Returns (module, the training summary for ``metrics.json["train"]``); ``module.trainer`` is the
    Trainer. On DDP ranks other than 0 the summary is empty (the rest of the job runs on rank 0).
    The summary's ``refit_epochs`` is the epoch count of the weights kept (the best checkpoint's) and
    ``processes`` the number of processes that trained them.
    """
    module, fit_data = privacy.build_module(cfg, dm) if privacy is not None else (build_module(cfg, dm), {"datamodule": dm})
    vocabs = {"user": dm.user_vocab.ids, "item": dm.item_vocab.ids}
    ckpt_path = resume_from or resolve_ckpt_path(cfg.get("ckpt_path"), Path(cfg.paths.output_dir))
    warm = None
    if ckpt_path is not None:
        check_resumable(ckpt_path, module.net, vocabs)
    elif cfg.get("init_from"):
        warm = warm_start(module.net, previous if previous is not None else load_previous(cfg.init_from), vocabs)
        if privacy is not None and privacy.options is not None and privacy.options.dp_enabled:
            log.warning("privacy.dp: the (epsilon, delta) guarantee covers this run's training only, not the model "
                        "init_from starts it from")
    trainer = build_trainer(cfg, has_validation=len(dm.val_users) > 0,
                            extra_callbacks=[VocabularyRecord(dm.user_vocab.ids, dm.item_vocab.ids),
                                             *(extra_callbacks or [])], placement=placement)
    t0 = time.perf_counter()
    trainer.fit(module, **fit_data, ckpt_path=ckpt_path)
    fit_seconds = time.perf_counter() - t0
    if placement is None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # Lightning's DDP; a Ray worker's group is Ray's to end
    if trainer.global_rank != 0:
        return module, {}
    n_train = len(dm.train_idx)
    best, best_epochs = load_best_weights(module, trainer) or (None, int(trainer.current_epoch))
    return module, {
        "best_checkpoint": best,
        "epochs": trainer.current_epoch,
        "refit_epochs": best_epochs,
        "processes": int(trainer.world_size),
        "fit_seconds": fit_seconds,
        "train_events": n_train,
        "examples_per_second": n_train * max(trainer.current_epoch, 1) / fit_seconds if fit_seconds > 0 else None,
        "val": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")},
        "privacy": privacy.summary(trainer.global_step) if privacy is not None else None,
        "warm_start": warm,
    }


def refit_embedding_model(cfg: DictConfig, dm: InteractionDataModule, epochs: int) -> tuple[RetrievalModule, dict]:
    """The final fit of ``model=two_tower|mf``: a fresh network trained for ``epochs`` epochs on
    every event (:meth:`InteractionDataModule.everything_as_training`), no validation and no
    checkpoint files (the run's checkpoints stay those of the held-out fit). Returns (module, facts)."""
    view = dm.everything_as_training()
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    module = build_module(cfg, view)
    callbacks = [FiniteLossGuard(), *(c for c in _instantiate_all(cfg.get("callbacks"))
                                      if not isinstance(c, (ModelCheckpoint, EarlyStopping)))]
    extra = {"enable_progress_bar": sys.stdout.isatty()} if cfg.trainer.get("enable_progress_bar") == "auto" else {}
    trainer = instantiate_trainer(cfg.trainer, callbacks=callbacks, logger=_instantiate_all(cfg.get("logger")) or False,
                                  limit_val_batches=0, enable_checkpointing=False, max_epochs=max(int(epochs), 1),
                                  min_epochs=1, **extra)
    t0 = time.perf_counter()
    with warnings.catch_warnings():  # a final fit without validation users is intended, not a slip
        warnings.filterwarnings("ignore", message=".*validation_step.*no .val_dataloader.*")
        trainer.fit(module, datamodule=view)
    return module, {"epochs": max(int(epochs), 1), "seconds": time.perf_counter() - t0, "train_events": len(view.train_idx)}


def load_best_weights(module: RetrievalModule, trainer: pl.Trainer) -> tuple[str, int] | None:
    """Load the best checkpoint's weights into ``module`` (if checkpointing ran). Returns (its path,
    the epoch count of those weights), or None."""
    ckpt = trainer.checkpoint_callback
    path = getattr(ckpt, "best_model_path", "") or getattr(ckpt, "last_model_path", "") if ckpt else ""
    if not path or not Path(path).exists():
        return None
    saved = torch.load(path, map_location="cpu", weights_only=True)
    module.load_state_dict(saved["state_dict"])
    return path, int(saved["epoch"]) + 1


def config_to_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
