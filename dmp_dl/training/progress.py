"""One log line per epoch of a Lightning run.

:class:`EpochLog`, a Lightning callback (``conf/callbacks/default.yaml``): one INFO line per epoch
with the training loss, every validation metric, examples per second, the time elapsed and an
estimate of the time left, for any LightningModule that logs ``train/loss`` and ``val/*``.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only


def _duration(seconds: float) -> str:
    """``1h02m``, ``4m19s`` or ``12s``."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def _batch_size(batch: Any) -> int | None:
    """Examples in ``batch``: the first dimension of its first tensor (in a tensor, dict, list or tuple)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else None
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for part in batch:
            n = _batch_size(part)
            if n is not None:
                return n
    return None


def _number(value: Any) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


class EpochLog(pl.Callback):
    """One log line per training epoch::

        epoch 3/10 | train/loss 5.8702 | val/recall@20 0.3130 ... | 1,234 examples/s | elapsed 7m32s | left ~17m40s

    ``train/loss`` is the epoch mean (``train/loss_epoch`` when logged with ``on_epoch=True``); every
    metric whose name starts with ``val/`` follows in name order. Examples per second count the
    first dimension of each training batch over the epoch's training time (validation excluded);
    the time left is the mean epoch time (validation included) times the epochs left to
    ``max_epochs`` (early stopping may end training sooner, hence ``~``/``at most``).
    """

    def __init__(self, logger_name: str = "dmp_dl.training"):
        self.logger = logging.getLogger(logger_name)
        self._fit_start = self._epoch_start = self._val_start = 0.0
        self._val_seconds = 0.0
        self._examples = 0
        self._first_epoch = 0

    @rank_zero_only
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_start = time.perf_counter()
        self._first_epoch = trainer.current_epoch
        batches = trainer.num_training_batches
        device = getattr(trainer.strategy, "root_device", None)
        stops = [f"early stopping on {c.monitor}" for c in trainer.callbacks if isinstance(c, pl.callbacks.EarlyStopping)]
        self.logger.info("training %s on %s: %s batches per epoch, %s%s", type(pl_module).__name__,
                      getattr(device, "type", "?"), batches if isinstance(batches, int) else "?",
                      f"at most {trainer.max_epochs} epochs" if self._max_epochs(trainer) else "no epoch limit",
                      f" ({stops[0]})" if stops else "")

    @staticmethod
    def _max_epochs(trainer: pl.Trainer) -> int | None:
        m = trainer.max_epochs
        return m if isinstance(m, int) and m > 0 else None

    @rank_zero_only
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = time.perf_counter()
        self._val_seconds = 0.0
        self._examples = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._examples += _batch_size(batch) or 0

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit":
            self._val_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit" and self._val_start:
            self._val_seconds += time.perf_counter() - self._val_start
            self._val_start = 0.0

    def line(self, trainer: pl.Trainer) -> str:
        """The line for the epoch that just ended."""
        now = time.perf_counter()
        metrics = {k: _number(v) for k, v in trainer.callback_metrics.items()}
        done = trainer.current_epoch + 1
        max_epochs = self._max_epochs(trainer)
        parts = [f"epoch {done}/{max_epochs}" if max_epochs else f"epoch {done}"]
        loss = metrics.get("train/loss_epoch", metrics.get("train/loss"))
        if loss is not None:
            parts.append(f"train/loss {loss:.4f}")
        parts += [f"{k} {v:.4f}" for k, v in sorted(metrics.items()) if k.startswith("val/") and v is not None]
        train_seconds = now - self._epoch_start - self._val_seconds
        if self._examples and train_seconds > 0:
            parts.append(f"{self._examples / train_seconds:,.0f} examples/s")
        elapsed = now - self._fit_start
        parts.append(f"elapsed {_duration(elapsed)}")
        epochs_here = done - self._first_epoch
        if max_epochs and epochs_here > 0 and not trainer.should_stop:
            left = (max_epochs - done) * elapsed / epochs_here
            if left > 0:
                early = any(isinstance(c, pl.callbacks.EarlyStopping) for c in trainer.callbacks)
                parts.append(f"left {'at most ' if early else '~'}{_duration(left)}")
        return " | ".join(parts)

    @rank_zero_only
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.logger.info("%s", self.line(trainer))
