"""The package's own models (``mf``, ``two_tower``) trained for the benchmarks through its pipeline.

Every fit is ``dmp_dl.pipeline.run.run(cfg)`` on the project's real Hydra config (``conf/``), exactly
what ``python train.py`` does, with the steps a benchmark does not need switched off (propensity,
audience, export, report, loggers) and an :class:`EpochClock` callback added through the config,
so each epoch's pure training time and validation metrics are known. Hyperparameters come from
``conf/model/<name>.yaml`` and the overrides given; nothing is hard-coded here.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import common
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, open_dict

# What a benchmark fit leaves out of a normal run; the model, data and trainer settings stay.
QUIET = [
    "propensity.enabled=false",
    "audience.enabled=false",
    "export=false",
    "logger=none",
    "evaluation.report=null",
    "evaluation.baselines=[]",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "+callbacks.epoch_clock._target_=ours.EpochClock",
]


def compose_train_cfg(overrides: list[str], output_dir: Path) -> DictConfig:
    """``conf/train.yaml`` with :data:`QUIET` and ``overrides`` (later ones win), writing under ``output_dir``."""
    return common.compose_train_cfg([*QUIET, *overrides], output_dir)


class EpochClock(pl.Callback):
    """Per epoch: seconds spent training (validation excluded) and the validation metrics.

    ``epochs``: one dict per finished training epoch: ``epoch`` (1-based), ``train_seconds`` (that
    epoch), ``cumulative_train_seconds`` and the ``val/...`` metrics of the validation after it.
    Lightning validates inside the training epoch (after its last batch), so that time is timed
    separately and subtracted; the metrics are read at ``on_validation_end``, after the module has
    logged them.

    warmup_steps: when set, each row also has ``steady_steps`` and ``steady_seconds``: the batches
        after the first ``warmup_steps`` of the epoch and their time (no first-step allocations,
        lazy initialisation or, on CUDA, kernel selection; validation excluded too).
    """

    def __init__(self, warmup_steps: int = 0) -> None:
        self.epochs: list[dict[str, Any]] = []
        self.warmup_steps = warmup_steps
        self._t0 = self._v0 = self._val_seconds = 0.0
        self._t_warm: float | None = None
        self._val_at_warm = 0.0
        self._batches = 0
        self._val: dict[str, float] = {}

    @staticmethod
    def _now(trainer: pl.Trainer) -> float:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._val_seconds, self._val, self._batches, self._t_warm = 0.0, {}, 0, None
        self._t0 = self._now(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._batches += 1
        if self.warmup_steps and self._batches == self.warmup_steps:
            self._t_warm, self._val_at_warm = self._now(trainer), self._val_seconds

    def on_validation_start(self, trainer, pl_module) -> None:
        self._v0 = self._now(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        self._val_seconds += self._now(trainer) - self._v0
        self._val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        seconds = self._now(trainer) - self._t0 - self._val_seconds
        total = seconds + (self.epochs[-1]["cumulative_train_seconds"] if self.epochs else 0.0)
        row = {"epoch": trainer.current_epoch + 1, "train_seconds": seconds, "cumulative_train_seconds": total}
        if self._t_warm is not None and self._batches > self.warmup_steps:
            end = self._t0 + seconds + self._val_seconds
            row["steady_steps"] = self._batches - self.warmup_steps
            row["steady_seconds"] = end - self._t_warm - (self._val_seconds - self._val_at_warm)
        self.epochs.append({**row, **self._val})


def fit(cfg: DictConfig) -> dict[str, Any]:
    """Train and evaluate one model with ``dmp_dl.pipeline.run.run(cfg)``.

    Returns ``net`` (the best weights, eval mode, CPU), ``datamodule``, ``ranking`` (the pipeline's
    test metrics of the model), ``train`` (the pipeline's training summary), ``epochs``
    (:class:`EpochClock` rows), ``best_epoch`` (1-based epoch of the loaded weights),
    ``train_seconds`` (pure training time), ``examples_per_second`` (training events x epochs /
    pure training time) and ``wall_seconds``.
    """
    from dmp_dl.pipeline.run import run

    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    result = run(cfg)
    wall = time.perf_counter() - t0
    trainer = result["trainer"]
    clock = next(c for c in trainer.callbacks if type(c).__name__ == "EpochClock")
    metrics = result["metrics"]
    best = metrics["train"].get("best_checkpoint")
    best_epoch = len(clock.epochs)
    if best and Path(best).exists():
        best_epoch = int(torch.load(best, map_location="cpu", weights_only=True)["epoch"]) + 1
    train_seconds = clock.epochs[-1]["cumulative_train_seconds"] if clock.epochs else float("nan")
    n_train = metrics["train"]["train_events"]
    module = result["module"]
    return {
        "net": module.net.cpu().eval(),
        "datamodule": result["datamodule"],
        "ranking": next(iter(metrics["ranking"].values()), {}),
        "train": metrics["train"],
        "epochs": clock.epochs,
        "best_epoch": best_epoch,
        "train_seconds": train_seconds,
        "examples_per_second": n_train * len(clock.epochs) / train_seconds if clock.epochs else float("nan"),
        "wall_seconds": wall,
    }


def train_steps(cfg: DictConfig, dm, max_steps: int | None, warmup_steps: int = 5) -> dict[str, Any]:
    """Time ``max_steps`` training batches (a whole epoch when None) of ``cfg``'s model on the
    prepared DataModule ``dm``, no validation, with the package's ``build_module``/``build_trainer``
    and ``cfg.trainer`` (accelerator, precision).

    Returns ``steps``, ``steps_per_epoch``, ``batch_size``, ``seconds`` (the whole loop),
    ``warmup_steps``, and ``seconds_per_step`` / ``examples_per_second`` over the batches after the
    first ``warmup_steps`` (at most half the steps; all of them when there are too few)."""
    from dmp_dl.training.fit import build_module, build_trainer

    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("dmp_dl.training").setLevel(logging.ERROR)  # "no validation users" is intended here
    with open_dict(cfg):
        cfg.trainer.max_epochs = 1
        cfg.trainer.min_epochs = 1
        cfg.trainer.limit_train_batches = max_steps if max_steps else 1.0
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    module = build_module(cfg, dm)
    trainer = build_trainer(cfg, has_validation=False)
    clock = next(c for c in trainer.callbacks if type(c).__name__ == "EpochClock")
    steps_per_epoch = -(-len(dm.train_idx) // dm.batch_size)
    steps = min(max_steps or steps_per_epoch, steps_per_epoch)
    clock.warmup_steps = min(warmup_steps, steps // 2)
    trainer.fit(module, datamodule=dm)
    row = clock.epochs[-1]
    out = {"steps": steps, "steps_per_epoch": steps_per_epoch, "batch_size": dm.batch_size,
           "seconds": row["train_seconds"], "warmup_steps": clock.warmup_steps}
    if "steady_steps" in row:  # full batches after the warm-up
        out["seconds_per_step"] = row["steady_seconds"] / row["steady_steps"]
        examples = min(steps * dm.batch_size, len(dm.train_idx)) - clock.warmup_steps * dm.batch_size  # last batch may be short
        out["examples_per_second"] = examples / row["steady_seconds"]
    else:
        out["seconds_per_step"] = row["train_seconds"] / steps
        out["examples_per_second"] = min(steps * dm.batch_size, len(dm.train_idx)) / row["train_seconds"]
    return out
