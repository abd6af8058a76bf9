"""The automatic model choice (``model=auto``, the default; also ``model=vae`` and ``model=ease``).

1. Fit each candidate that fits the data on the training split: EASE (:mod:`dmp_dl.models.ease`,
   l2 chosen on validation from a grid relative to the data), when its item x item matrix fits in
   memory; then the recency half-life of the users' rows (``data.recency_half_life_days=auto``:
   :mod:`dmp_dl.training.recency_choice`); then the user-level autoencoder on those rows
   (:mod:`dmp_dl.models.autoencoder`, epochs chosen by early stopping on validation NDCG, the best
   epoch kept, at most :func:`epoch_limit` of them). With a half-life, EASE's term reads the same
   decayed rows (``ServedScore.shallow_input="rows"``). No clock decides anything unless
   ``model.time_budget_s`` sets a cap (:func:`time_budget`): the same data, seed and settings give
   the same epochs and vectors on an idle or a busy machine.
2. Score them on the validation users, and the blend of both, ``vae + w * ease``, for a grid of w
   (:mod:`dmp_dl.models.scoring`); then, on logs with event times, the sequence model
   (:mod:`dmp_dl.training.sequence_candidate`) and its blend ``sasrec + w * ease``; the best
   validation ``selection_metric`` wins (``metrics.json["model"]["why"]`` says by how much).
3. Score every candidate and the baselines on the test users (these are the reported numbers),
   each user from everything they did before the test period (:func:`test_inputs`).
4. Refit the winner on every event (``model.refit``), so the bundle knows every user and item,
   also those seen only in the held-out period; the epochs and l2 are those chosen in 1.

The bundle holds the autoencoder's vectors (FAISS, lookalike, segments and propensity features
read them), or the sequence model's when it won; when the winner uses the EASE path,
recommendations are scored exactly with it (:class:`~dmp_dl.models.scoring.ServedScore`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytorch_lightning as pl
import scipy.sparse as sp
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.callbacks import Callback, EarlyStopping
from torch.utils.data import DataLoader

from dmp_dl.core.errors import ConfigError
from dmp_dl.core.io import signals_raise
from dmp_dl.evaluation.ranking import evaluate_scorers, sample_users
from dmp_dl.models import ease as ease_lib
from dmp_dl.models.autoencoder_module import user_loader, users_with_rows
from dmp_dl.models.embeddings import item_vectors, user_vectors
from dmp_dl.models.scoring import BINARY, ROWS, ServedScore
from dmp_dl.training import recency_choice, sequence_candidate
from dmp_dl.training.cpu_precision import autoencoder_precision, cpu_has_bf16
from dmp_dl.training.data_parallel import (
    ONE_PROCESS,
    Processes,
    ProcessSeed,
    check_processes,
    data_parallel_placement,
    leave_process_group,
    on_ray,
    per_process_batch,
    processes_of,
    sharded_user_loader,
    validation_share,
)
from dmp_dl.training.fit import FiniteLossGuard, KeepBest, _instantiate_all, instantiate_trainer, new_autoencoder
from dmp_dl.training.warm_start import load_previous, warm_start

log = logging.getLogger(__name__)

DEEP, SHALLOW, BLEND = "vae", "ease", "vae+ease"
SEQUENCE = sequence_candidate.SEQUENCE
SEQUENCE_BLEND = SEQUENCE + "+" + SHALLOW
SEQUENCE_NAMES = (SEQUENCE, SEQUENCE_BLEND)  # the candidates whose network is the sequence model
BASELINE = "baseline:"  # prefix of the baselines' names among the candidates' in one scoring pass
BLEND_FACTORS = tuple(2.0 ** e for e in range(-6, 4))  # 1/64 .. 8 x the ratio of the two score spreads
EVENTS_ASIDE_BYTES = 1 << 30  # a CPU EASE fit with dense matrices this large holds the clean events on disk (fit_ease)


@dataclass
class ModelChoice:
    """What the model stage hands on to evaluation, propensity, audiences and export.

    net: the network whose vectors are the bundle's: the autoencoder, rows of every event attached,
    or the sequence network when it won. served: how recommendations are scored. name: the winner
    (``vae``, ``ease``, ``vae+ease`` or ``sasrec``). record: ``metrics.json["model"]``; ranking:
    ``metrics.json["ranking"]`` (test metrics of the served model under the run's model name, and
    of the baselines); train: ``metrics.json["train"]``. network_config: the sequence candidate's
    own config when it won (its network settings go to the bundle), else None.
    """

    net: torch.nn.Module
    served: ServedScore
    name: str
    record: dict
    ranking: dict
    train: dict = field(default_factory=dict)
    network_config: DictConfig | None = None


def compute_seconds() -> float:
    """The CPU seconds this process has used, every thread counted (``time.process_time``). Time
    budgets count these on the CPU, not wall time, so that a machine busy with other work gives a
    fit the same epochs as an idle one (it takes longer on the clock instead)."""
    return time.process_time()


def budget_clock(device: torch.device):
    """The clock a time budget counts on ``device``: CPU seconds of the process on the CPU
    (:func:`compute_seconds`); seconds on the clock on CUDA, where the work is the device's and the
    process's CPU time says little about it."""
    return time.perf_counter if device.type == "cuda" else compute_seconds


class TimeBudget(Callback):
    """Stops a fit that would overrun ``seconds`` of compute (:func:`compute_seconds`): after an
    epoch when one more would not fit in what is left, and within an epoch once the time is spent
    (so an epoch longer than the budget ends early). Says so once in the log, with what that costs:
    the epochs, and so the vectors, then depend on the machine's speed and load. ``fired``: whether
    it stopped the fit."""

    def __init__(self, seconds: float, clock=compute_seconds):
        self.seconds, self.t0, self.fired, self.clock = float(seconds), 0.0, False, clock
        self.unit = "CPU seconds" if clock is compute_seconds else "seconds"

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.t0 = self.clock()

    @staticmethod
    def _agreed(trainer: pl.Trainer, over: bool) -> bool:
        """``over`` in any process (data-parallel: each reads its own clock, all stop at the same step)."""
        return bool(trainer.strategy.reduce_boolean_decision(over, all=False)) if trainer.world_size > 1 else over

    def _stop(self, trainer: pl.Trainer, why: str) -> None:
        if not self.fired:
            log.warning("time budget: %s after %.1f of %.1f %s (model.time_budget_s): the epochs, and so the "
                        "vectors, now depend on this machine's speed and load; model.time_budget_s=null trains "
                        "the same epochs on any machine", why, self.clock() - self.t0, self.seconds, self.unit)
        self.fired = True
        trainer.should_stop = True

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self._agreed(trainer, self.clock() - self.t0 > self.seconds):
            self._stop(trainer, f"epoch {trainer.current_epoch + 1} cut short")

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        elapsed = self.clock() - self.t0
        per_epoch = elapsed / (trainer.current_epoch + 1)
        if self._agreed(trainer, not self.fired and elapsed + per_epoch > self.seconds):
            self._stop(trainer, f"stopping after {trainer.current_epoch + 1} epoch(s), another would not fit")


@contextlib.contextmanager
def matmul_precision(device: torch.device, precision: str):
    """float32 matrix products with TF32 tensor cores (``high``) while the autoencoder trains in
    mixed precision on CUDA (``trainer=gpu``: bf16-mixed), where its products are already
    reduced-precision; ``highest`` (full float32) everywhere else — EASE's inverse, the scoring and
    the CPU keep it, so their numbers do not depend on the device's tensor cores."""
    previous = torch.get_float32_matmul_precision()
    mixed = device.type == "cuda" and ("16" in precision and "mixed" in precision)
    torch.set_float32_matmul_precision("high" if mixed else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def batch_users(setting: Any, n_users: int) -> int:
    """``auto``: 64 users a step on small logs, up to 1024 on large ones (about 64 steps an epoch)."""
    if setting in (None, "auto"):
        return int(min(1024, max(64, 2 ** round(math.log2(max(n_users, 1) / 64)))))
    return int(setting)  # checked with the other settings (dmp_dl.pipeline.checks)


UNLIMITED_EPOCHS = 1_000_000  # trainer.max_epochs=-1: until early stopping
# model.vae.max_epochs=auto: at most RULE_MAX_EPOCHS epochs and RULE_EVENTS_SEEN training events seen
# (epochs x events: the cost of a fit grows with both), but never fewer than RULE_MIN_EPOCHS
RULE_MAX_EPOCHS, RULE_MIN_EPOCHS, RULE_EVENTS_SEEN = 100, 20, 30_000_000


def epochs_for_data(n_events: int) -> int:
    """The autoencoder's epoch limit for ``n_events`` training events (the training rows' user-item
    pairs; ``model.vae.max_epochs=auto``): ``RULE_EVENTS_SEEN / n_events`` clipped to
    [``RULE_MIN_EPOCHS``, ``RULE_MAX_EPOCHS``]. A ceiling for early stopping, not a target: on the
    logs it was measured on, the best validation epoch came well before it."""
    by_events = math.ceil(RULE_EVENTS_SEEN / max(int(n_events), 1))
    return int(min(RULE_MAX_EPOCHS, max(RULE_MIN_EPOCHS, by_events)))




PATIENCE_EPOCHS, PATIENCE_EVENTS = 5, 5_000_000  # model.vae.patience=auto: see :func:`patience_for_data`
LARGE_LOG_EVENTS, LARGE_LOG_GAIN = 1_000_000, 0.01  # above: an epoch must beat the best by 1 % to count


def patience_for_data(n_events: int) -> tuple[int, float]:
    """Early stopping for ``n_events`` training events (the training rows' user-item pairs, as
    :func:`epochs_for_data` counts them; ``model.vae.patience=auto``): (patience,
    relative gain). Up to ``LARGE_LOG_EVENTS``: ``PATIENCE_EPOCHS`` epochs without a better
    validation score, any gain counting. Above: fewer epochs (``PATIENCE_EVENTS / n_events``,
    rounded, at least 1), and an epoch counts as better only when it beats the best by
    ``LARGE_LOG_GAIN`` of it: an epoch of a large log is many steps of large batches, its validation
    curve is smooth and creeps up by fractions of a per cent an epoch (measured on 100,000 users x
    3M events: +0.4 % every other epoch from the 4th on), and each epoch waited for costs as much
    as the log is large. The best epoch's weights are kept either way."""
    n = max(int(n_events), 1)
    if n <= LARGE_LOG_EVENTS:
        return PATIENCE_EPOCHS, 0.0
    return int(max(1, min(PATIENCE_EPOCHS, round(PATIENCE_EVENTS / n)))), LARGE_LOG_GAIN


def patience(cfg: DictConfig, n_events: int) -> tuple[int, float]:
    """``model.vae.patience``: a number (any gain counts), or ``auto`` (:func:`patience_for_data`)."""
    setting = cfg.model.vae.get("patience", "auto")
    return patience_for_data(n_events) if setting in (None, "auto") else (int(setting), 0.0)


class GainEarlyStopping(EarlyStopping):
    """:class:`EarlyStopping` (mode max) on which an epoch counts as better only when it beats the
    best score so far by ``gain`` times that score (0: any gain, the plain callback)."""

    def __init__(self, gain: float = 0.0, **kwargs):
        super().__init__(mode="max", **kwargs)
        self.gain = float(gain)

    def _evaluate_stopping_criteria(self, current: torch.Tensor):
        if self.gain > 0 and torch.isfinite(self.best_score):
            self.min_delta = float(self.gain * abs(float(self.best_score)))
        return super()._evaluate_stopping_criteria(current)


def epoch_limit(cfg: DictConfig, n_events: int) -> tuple[int, str]:
    """The most epochs the autoencoder trains (early stopping on validation usually ends it sooner)
    and the setting that set it: ``trainer.max_epochs`` when given (-1: until early stopping), a
    number in ``model.vae.max_epochs`` (the smaller of the two when both are), else the data-size
    rule of :func:`epochs_for_data` on ``n_events`` training events.
    Nothing here reads a clock: the same data and settings give the same limit on any machine."""
    given = []
    trainer_max = (cfg.get("trainer") or {}).get("max_epochs")
    if trainer_max is not None:
        given.append((UNLIMITED_EPOCHS if int(trainer_max) == -1 else int(trainer_max), "trainer.max_epochs"))
    vae_max = cfg.model.vae.get("max_epochs", "auto")
    if vae_max not in (None, "auto"):
        given.append((int(vae_max), "model.vae.max_epochs"))
    if given:
        return min(given)
    return epochs_for_data(n_events), "model.vae.max_epochs=auto: from the data's size"


# -- fitting ------------------------------------------------------------------------------------
def _trainer(cfg: DictConfig, callbacks: list, max_epochs: int, time_budget_s: float | None, validate: bool,
             loggers: list, clock=compute_seconds, processes: Processes = ONE_PROCESS,
             precision: Any = None) -> pl.Trainer:
    """``cfg.trainer`` for one autoencoder fit: one device, or with ``processes.count`` > 1 the
    configured devices data-parallel (the loaders shard the users themselves:
    :mod:`dmp_dl.training.data_parallel`); no checkpoint files (the best epoch is kept in memory),
    the configured callbacks other than checkpointing and early stopping (the per-epoch log line
    among them) plus ``callbacks``."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    configured = [c for c in _instantiate_all(cfg.get("callbacks")) if not isinstance(c, (ModelCheckpoint, EarlyStopping))]
    callbacks = [FiniteLossGuard(), *callbacks, *configured]
    placement: dict[str, Any] = {"devices": 1, "strategy": "auto"}
    if processes.count > 1 or processes.launcher != "lightning":
        placement = data_parallel_placement(processes)
    extra: dict[str, Any] = {"max_epochs": int(max_epochs), **placement, "min_epochs": 0,
                             "enable_model_summary": False,
                             "enable_checkpointing": False, "num_sanity_val_steps": 0}
    if cfg.trainer.get("enable_progress_bar") == "auto":  # a bar on a terminal, none in a piped or captured log
        extra["enable_progress_bar"] = sys.stdout.isatty()
    if time_budget_s:
        callbacks.append(TimeBudget(time_budget_s, clock))
    if not validate:
        extra["limit_val_batches"] = 0
    if precision is not None:
        extra["precision"] = precision
    return instantiate_trainer(cfg.trainer, callbacks=callbacks, logger=loggers or False, **extra)


def fit_autoencoder(cfg: DictConfig, dm, rows: sp.csr_matrix, *, validate: bool, max_epochs: int,
                    loggers: list | None = None, time_budget_s: float | None = None,
                    previous=None, val_users=None, processes: Processes = ONE_PROCESS,
                    continue_from: torch.nn.Module | None = None, ckpt_path: str | None = None,
                    callbacks: list | None = None) -> tuple[torch.nn.Module, dict]:
    """Train ``cfg.model.vae`` on ``rows`` ((n_users, n_items) interaction strengths).

    With ``validate``, early stopping on the validation users (``val_users``: an ``EvalUsers``,
    default :func:`validation_sample`) picks the epoch and the best epoch's weights are returned;
    else ``max_epochs`` epochs run. Training also stops after ``time_budget_s`` seconds (None: no
    limit; a cap that fires makes the result depend on the machine's load). ``previous``: a
    :class:`~dmp_dl.training.warm_start.PreviousNetwork` (``init_from``) the net starts from, row by row by
    id. ``processes``: with more than one, this process's part of a data-parallel fit
    (:mod:`dmp_dl.training.data_parallel`; every process calls this with the same arguments and
    gets the same net). ``continue_from``: a net of this run (same vocabularies) whose weights the
    fit continues, its KL weight already annealed (a warm refit). ``ckpt_path``: a Lightning
    checkpoint of this fit to resume (a Ray Train worker restarted after a failure); ``callbacks``:
    more Lightning callbacks (a Ray worker's checkpoint reports). Returns (net, facts).

    Under ``trainer=ray`` (in the process that runs the job, not in a Ray worker) the fit runs as a
    Ray Train job: :func:`dmp_dl.training.ray_fit.fit_autoencoder_on_ray`.
    """
    if on_ray(cfg) and processes.launcher != "ray":
        from dmp_dl.training.ray_fit import fit_autoencoder_on_ray

        if validate and val_users is None and len(dm.val_users) > 0:
            val_users = validation_sample(cfg, dm)
        return fit_autoencoder_on_ray(fit_autoencoder, cfg, dm, rows, validate=validate, max_epochs=max_epochs,
                                      time_budget_s=time_budget_s, previous=previous, val_users=val_users,
                                      continue_from=continue_from)
    node = cfg.model.vae
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    net, dense_why = new_autoencoder(cfg, dm, processes.count)
    if dense_why and processes.main:
        log.info("%s", dense_why)
    warm = None
    if continue_from is not None:
        warm = continue_fit(net, continue_from, dm.train_seen)
    net.attach_rows(rows)
    if previous is not None and continue_from is None:
        warm = warm_start(net, previous, {"user": dm.user_vocab.ids, "item": dm.item_vocab.ids})
    step_users = batch_users(node.get("batch_users"), dm.n_users)
    if processes.count > 1:
        loader = sharded_user_loader(rows, per_process_batch(step_users, processes), processes, int(cfg.seed))
    else:
        loader = user_loader(rows, step_users)
    counts = np.bincount(sp.csr_matrix(rows).indices, minlength=dm.n_items)
    module = instantiate(node.module, _convert_="all")(net=net, item_counts=counts, steps_per_epoch=len(loader))
    if continue_from is not None:
        module.anneal_steps = 1.0  # the KL weight was annealed in the fit continued: full from the first step
    metric = f"val/{cfg.model.get('selection_metric', 'ndcg@20')}"
    callbacks = [*(callbacks or []), *([ProcessSeed(int(cfg.seed))] if processes.count > 1 else [])]
    keep = None
    validate = validate and len(dm.val_users) > 0
    val_loader = None
    if validate:
        keep = KeepBest(metric)
        wait, gain = patience(cfg, int(rows.nnz))
        callbacks += [keep, GainEarlyStopping(gain, monitor=metric, patience=wait)]
        val_sample = val_users if val_users is not None else validation_sample(cfg, dm)
        val_loader = DataLoader(validation_share(val_sample, processes), batch_size=dm.eval_batch_size, shuffle=False,
                                collate_fn=lambda batch: batch)
    device = stage_device(cfg)
    precision, why = autoencoder_precision(cfg.trainer.get("precision", "32-true"), device.type, int(rows.nnz),
                                           node.get("cpu_bf16_above_pairs"), cpu_has_bf16())
    if why and processes.main:
        log.info("%s", why)
    trainer = _trainer(cfg, callbacks, max_epochs, time_budget_s, validate, loggers or [], budget_clock(device), processes,
                       precision)
    budget = next((c for c in trainer.callbacks if isinstance(c, TimeBudget)), None)
    t0 = time.perf_counter()
    with warnings.catch_warnings(), matmul_precision(device, str(precision)):
        warnings.filterwarnings("ignore", message=".*validation_step.*no .val_dataloader.*")  # a final fit without validation users is intended
        # data-parallel: the validation metrics are means over every process already (torchmetrics syncs them)
        warnings.filterwarnings("ignore", message=r".*self.log\('val/.*sync_dist=True.*")
        trainer.fit(module, train_dataloaders=loader, val_dataloaders=val_loader, ckpt_path=ckpt_path)
    seconds = time.perf_counter() - t0
    facts = {"fit_seconds": seconds, "epochs_run": int(trainer.current_epoch), "batch_users": loader.batch_size * processes.count,
             "steps": int(module._batches), "warm_start": warm, "time_budget_fired": bool(budget and budget.fired),
             "precision": str(trainer.precision)}
    if processes.count > 1:
        facts.update(processes=processes.count, batch_users_per_process=loader.batch_size,
                     sparse_gradients=bool(net.encoder.sparse))
    if keep is not None and keep.state is not None:
        module.load_state_dict(keep.state)
        facts.update(best_epoch=keep.best_epoch, epochs=keep.best_epoch + 1, val_best=keep.best)
    else:
        facts["epochs"] = max(int(trainer.current_epoch), 1)
    net.eval()
    return net, facts


def continue_fit(net: torch.nn.Module, fitted: torch.nn.Module, trained_rows: sp.csr_matrix) -> dict:
    """Load ``fitted``'s weights into ``net`` (a fresh net of the same run) to continue training it,
    except the rows of items without a training event (``trained_rows``: the rows the fit read):
    that fit only ever pushed them down as negatives, so they keep ``net``'s fresh initialisation
    and learn from their first events like any item of a fit from scratch. Item axes come from the
    network's ``vocab_axes``. Returns the record for ``metrics.json``."""
    fresh = net.state_dict()
    state = {k: v.clone() for k, v in fitted.state_dict().items()}
    unseen = torch.from_numpy(np.bincount(trained_rows.indices, minlength=trained_rows.shape[1]) == 0)
    axes = net.vocab_axes() if hasattr(net, "vocab_axes") else {}
    if bool(unseen.any()):
        for key, names in axes.items():
            if key in state and names and names[0] == "item":
                rows = torch.nonzero(unseen[: state[key].shape[0]]).ravel()
                state[key][rows] = fresh[key][rows]
    net.load_state_dict(state)
    return {"continued": "the autoencoder fitted on the training period", "items_reinitialised": int(unseen.sum())}


def stage_device(cfg: DictConfig) -> torch.device:
    """Where the model stage's heavy work runs (EASE, scoring, validation, test): CUDA when present
    and ``trainer.accelerator`` allows it, else the CPU (:func:`dmp_dl.models.ease.model_device`)."""
    trainer = cfg.get("trainer") or {}
    return ease_lib.model_device(trainer.get("accelerator", "auto"))


def validation_sample(cfg: DictConfig, dm):
    """The validation users that per-epoch validation and the grids score: a fixed random sample of
    at most ``model.val_users`` of them (null: all). The choice between the candidates reads every
    validation user once."""
    n = cfg.model.get("val_users", 10_000)
    return sample_users(dm.eval_dataset("val"), None if n is None else int(n), int(cfg.get("seed", 0)))


def ease_dropouts(cfg: DictConfig, n_items: int, l2_searched: bool) -> list[float]:
    """The EDLAE dropout values the item-item candidate may take (``model.ease.dropout``): a number
    is that value alone (0, the default: plain EASE); ``auto`` is 0 and ``dropout_grid`` when the l2
    is searched on validation and the catalogue is at most ``short_grid_above_items`` wide — above
    it ``auto`` factorises no more matrices than EASE alone."""
    node = cfg.model.ease
    setting = node.get("dropout", 0.0)
    if setting not in (None, "auto"):
        return [ease_lib.check_dropout(setting)]
    if not l2_searched or n_items > int(node.get("short_grid_above_items", 8000)):
        return [0.0]
    return [0.0, *sorted({ease_lib.check_dropout(p) for p in node.get("dropout_grid") or []} - {0.0})]


def ease_l2_scales(cfg: DictConfig, n_users: int, n_items: int) -> list[float]:
    """The l2 grid's scales (``model.ease.l2_scales``; :func:`~dmp_dl.models.ease.l2_grid`) when
    ``model.ease.l2`` is null: the middle one alone where the primal form is used on a catalogue
    wider than ``model.ease.short_grid_above_items`` (a Cholesky per value)."""
    node = cfg.model.ease
    scales = list(node.l2_scales)
    if not ease_lib.uses_dual(n_users, n_items) and n_items > int(node.get("short_grid_above_items", 8000)):
        return [scales[len(scales) // 2]]
    return scales


def ease_keeps_gram(cfg: DictConfig, n_users: int, n_items: int) -> bool:
    """Whether the item-item candidate's fit solves more than one (l2, dropout) from one Gram matrix
    (:func:`fit_ease` on validation), so the memory guard counts the Gram matrix kept beside the solve."""
    searched = cfg.model.ease.get("l2") is None and len(ease_l2_scales(cfg, n_users, n_items)) > 1
    return searched or len(ease_dropouts(cfg, n_items, searched)) > 1


def fit_ease(cfg: DictConfig, dm, x: sp.csr_matrix, l2: float | None = None, val_users=None,
             dropout: float | None = None) -> tuple[ease_lib.ItemItemScorer, dict, ease_lib.ItemItemScorer | None]:
    """The item-item candidate on the binary matrix ``x`` on the stage's device: EASE, or EDLAE with a
    dropout p > 0 (:mod:`dmp_dl.models.ease`). ``l2`` given: that l2 alone, else ``model.ease.l2`` or,
    when that is null, the best of the l2 grid on the validation users (``val_users``, default
    :func:`validation_sample`), the grid grown past its edge while the edge wins
    (:func:`extend_l2_grid`); ``dropout`` given: that p alone, else :func:`ease_dropouts`.

    Plain EASE (p = 0) is searched over the l2 grid first: it is the report's EASE baseline. Each
    p > 0 is then tried at plain EASE's l2 and at the grid's value below it: two factorisations a p.

    Returns the served (pruned) weights, facts (``l2``, ``dropout``, the grids' validation scores,
    ``l2_search``: how the l2 grid was grown and why it stopped,
    ``plain_ease``: plain EASE's l2 and validation score, fit seconds) and, when ``dropout`` is not
    given and the candidate is not plain EASE, plain EASE's served weights at its l2 (else None).

    A CPU fit whose dense matrices take at least ``EVENTS_ASIDE_BYTES`` runs with the clean events
    on disk (:meth:`~dmp_dl.data.datamodule.InteractionDataModule.events_on_disk`): it reads the
    binary matrix ``x``, not the events, and their memory goes to the matrices (at 50M events x 50k
    items: 1.8 GiB beside a 9.3 GiB Gram matrix), for about a second a GiB written and read back. So
    do the arrays the data stage prepared for later steps (the data module's ``prepared_arrays_on_disk``),
    as memory maps, ``x`` itself left in memory. Meanwhile SIGTERM (or SIGINT without Python's handler)
    ends the run through its ``finally`` blocks, which remove those files (a SIGKILL leaves them to the
    next run: :class:`~dmp_dl.core.scratch.ScratchFolder`)."""
    device = stage_device(cfg)
    large = device.type == "cpu" and ease_lib.dense_bytes(*x.shape, device, False) >= EVENTS_ASIDE_BYTES
    events_aside = getattr(dm, "events_on_disk", None) if large else None
    arrays_aside = getattr(dm, "prepared_arrays_on_disk", None) if large else None
    with contextlib.ExitStack() as aside:
        if large:
            aside.enter_context(signals_raise())
        if events_aside is not None:
            aside.enter_context(events_aside())
        if arrays_aside is not None:
            aside.enter_context(arrays_aside(keep=(x,)))
        return _fit_ease(cfg, dm, x, device, l2, val_users, dropout)


def _fit_ease(cfg: DictConfig, dm, x: sp.csr_matrix, device: torch.device, l2: float | None, val_users,
              dropout: float | None) -> tuple[ease_lib.ItemItemScorer, dict, ease_lib.ItemItemScorer | None]:
    node = cfg.model.ease
    keep = ease_lib.keep_per_item_for(dm.n_items, float(node.get("max_bundle_mb", ease_lib.DEFAULT_BUNDLE_MB)))
    t0, c0 = time.perf_counter(), compute_seconds()
    gram = None
    if on_ray(cfg):  # the Gram matrix as the sum of the Ray workers' parts, inverted once here
        from dmp_dl.training.ray_fit import gram_on_ray

        gram = gram_on_ray(cfg)
    if l2 is not None or node.get("l2") is not None:
        grid = [float(l2 if l2 is not None else node.l2)]
    else:
        grid = ease_lib.l2_grid(x, ease_l2_scales(cfg, x.shape[0], dm.n_items))
    dropouts = [ease_lib.check_dropout(dropout)] if dropout is not None else ease_dropouts(cfg, dm.n_items, len(grid) > 1)
    solver = ease_lib.EASESolver(x, device, gram, keep_gram=len(grid) * len(dropouts) > 1)
    metric = cfg.model.get("selection_metric", "ndcg@20")
    val = None

    def validate(points: list[tuple[float, float]]) -> dict[tuple[float, float], float]:
        nonlocal val
        if val is None:
            val = val_users if val_users is not None else validation_sample(cfg, dm)
        out = {}
        for value, p in points:
            scored = evaluate_scorers(lambda batch, v=value, p=p: {"ease": solver.scores(batch["user"].numpy(), v, p)},
                                      val, dm.n_items, _ks(cfg), device=device, mrr=False)
            out[(value, p)] = float(scored["ease"][metric]) if scored else float("nan")
        return out

    plain_results = validate([(v, 0.0) for v in grid]) if len(grid) > 1 else {}
    search = None
    if plain_results:  # the best at an edge of the grid: further values past it, each from the same solver
        scored, search = extend_l2_grid(lambda v: validate([(v, 0.0)])[(v, 0.0)],
                                        {v: plain_results[(v, 0.0)] for v in grid},
                                        float(node.get("l2_extend_factor", 4.0)), int(node.get("l2_extend_max", 4)))
        # the grid's values first, then those added: a tie keeps the earlier, as the search did
        plain_results = {(v, 0.0): scored[v] for v in [*search["grid"], *search["added"]]}
        grid = sorted(scored)
    plain_l2 = search["best"] if search else grid[0]
    results = dict(plain_results) if 0.0 in dropouts else {}
    emphasised = [p for p in dropouts if p > 0.0]
    plain = None
    if emphasised:
        l2s = [v for v in grid if v <= plain_l2][-2:]  # the penalty p adds moves the best l2 down, if at all
        if dropout is None:  # the baseline, before the other fits replace the cached factorisation
            plain = solver.served(plain_l2, keep)
        if len(dropouts) * len(l2s) > 1:
            results.update(validate([(v, p) for p in emphasised for v in l2s]))
    best_l2, best_p = max(results, key=results.get) if results else (plain_l2, dropouts[-1])
    if best_p == 0.0:
        shallow, plain = (plain if plain is not None else solver.served(best_l2, keep)), None
    else:
        shallow = solver.served(best_l2, keep, best_p)
    solver.release()
    facts = {"l2": best_l2, "dropout": best_p, "fit_seconds": time.perf_counter() - t0,
             "cpu_seconds": compute_seconds() - c0, "kept_per_item": keep, "form": "dual" if solver.dual else "primal",
             "device": device.type,
             "l2_grid": {f"{v:g}": score for (v, _), score in sorted(plain_results.items())}, "l2_search": search,
             "dropout_grid": {f"{p:g}": {f"{v:g}": score for (v, q), score in results.items() if q == p} for p in emphasised},
             "plain_ease": {"l2": plain_l2, "val": {metric: plain_results.get((plain_l2, 0.0))} if plain_results else None}}
    return shallow, facts, plain


def extend_l2_grid(score_l2, scores: dict[float, float], factor: float, most: int) -> tuple[dict[float, float], dict]:
    """The l2 grid's validation ``scores`` (l2 -> score), grown past its edge when the best l2 is
    the largest (or smallest) value: the next value is ``factor`` times (or 1 / ``factor`` times)
    the last one, scored by ``score_l2(l2)``, until a value scores no better than the best so far
    or ``most`` values were added (0: the grid alone). A search whose best is at the edge of its
    range stopped early: the penalty the data needs may lie outside the range set in advance.

    Returns (every l2 tried -> score, facts: ``best`` (the best l2; a tie keeps the grid's smaller
    value, and the grid's over one added), ``grid`` (the values given), ``extended`` (up | down |
    None), ``added`` (the values tried past the edge, in order), ``stopped`` (why the search
    ended: interior — the best is inside the grid; no_gain — the last value added scored no
    better; cap — ``most`` values added; off — ``most`` is 0; no_score — the grid has no finite score))."""
    scores = dict(scores)
    initial = sorted(scores)
    best = max(initial, key=lambda v: (scores[v] if math.isfinite(scores[v]) else -math.inf))
    step = factor if best == initial[-1] else 1.0 / factor if best == initial[0] else None
    facts = {"best": best, "grid": initial, "extended": None, "added": [], "stopped": "interior"}
    if not math.isfinite(scores[best]):
        facts["stopped"] = "no_score"
    elif step is not None and most <= 0:
        facts["stopped"] = "off"
    elif step is not None:
        facts.update(extended="up" if step > 1.0 else "down", stopped="cap")
        edge = best
        for _ in range(most):
            edge *= step
            scores[edge] = float(score_l2(edge))
            facts["added"].append(edge)
            if not scores[edge] > scores[best]:
                facts["stopped"] = "no_gain"
                break
            best = facts["best"] = edge
    return scores, facts


def time_budget(cfg: DictConfig) -> tuple[float | None, dict]:
    """The model stage's time cap (None: none, the default) and how it was set, in CPU seconds on
    the CPU (:func:`compute_seconds`) and seconds on the clock on CUDA (:func:`budget_clock`).

    Only a number given in ``model.time_budget_s`` caps the stage: a cap that fires makes the
    epochs, and so the vectors, depend on the machine's speed and load (the log says so when it
    does); without one the epochs depend on the data, the seed and the settings alone.
    """
    setting = cfg.model.get("time_budget_s")
    if setting is None:
        return None, {"time_budget_s": None}
    value = float(setting)  # a number > 0, checked with the other settings (dmp_dl.pipeline.checks)
    return value, {"time_budget_s": value, "clock": "seconds" if stage_device(cfg).type == "cuda" else "cpu_seconds"}


# -- validation ------------------------------------------------------------------------------------
def _ks(cfg: DictConfig) -> list[int]:
    metric = cfg.model.get("selection_metric", "ndcg@20")
    k = int(str(metric).split("@")[1])
    return sorted({10, 20, k})


class CandidateScores:
    """Every candidate's scores of a batch of users, on the stage's device: the autoencoder's dot
    products and EASE's item-item scores once per batch, the blends added from them.

    users (n_users, d), items (n_items, d): the autoencoder's vectors; rows: (n_users, n_items) CSR
    of the items each user's EASE score reads, read as 0/1 or (``shallow_input="rows"``) with
    their values; shallow: the served EASE weights, or None. binary_rows: the users' 0/1 items, what
    the EASE baseline reads (default: ``rows``).
    """

    def __init__(self, users: np.ndarray, items: np.ndarray, rows: sp.csr_matrix,
                 shallow: ease_lib.ItemItemScorer | None, device: torch.device, shallow_input: str = BINARY,
                 binary_rows: sp.csr_matrix | None = None):
        self.device = device
        self.users = torch.as_tensor(np.ascontiguousarray(users, dtype=np.float32), device=device)
        self.items_t = torch.as_tensor(np.ascontiguousarray(items, dtype=np.float32), device=device).T.contiguous()
        self.rows, self.shallow, self.shallow_input = sp.csr_matrix(rows), shallow, shallow_input
        self.binary_rows = self.rows if binary_rows is None else sp.csr_matrix(binary_rows)
        self.sequence_users = self.sequence_items_t = None  # with_sequence adds them
        self.sequence_weight = 0.0

    def with_sequence(self, users: np.ndarray, items: np.ndarray, weight: float = 0.0) -> "CandidateScores":
        """Add the sequence candidate's (n_users, d) user and (n_items, d) item vectors, and the
        weight of EASE's term in its blend (``sasrec + weight * ease``)."""
        self.sequence_weight = float(weight)
        self.sequence_users = torch.as_tensor(np.ascontiguousarray(users, dtype=np.float32), device=self.device)
        self.sequence_items_t = torch.as_tensor(np.ascontiguousarray(items, dtype=np.float32), device=self.device).T.contiguous()
        return self

    def sequence(self, user: torch.Tensor) -> torch.Tensor:
        return self.sequence_users[user.to(self.device)] @ self.sequence_items_t

    def deep(self, user: torch.Tensor) -> torch.Tensor:
        return self.users[user.to(self.device)] @ self.items_t

    def ease(self, user: torch.Tensor) -> torch.Tensor:
        return self.shallow(self.rows[user.cpu().numpy()], weighted=self.shallow_input == ROWS).to(self.device)

    def plain_ease(self, user: torch.Tensor) -> torch.Tensor:
        """EASE as a baseline reads users: their 0/1 items, no recency."""
        return self.shallow(self.binary_rows[user.cpu().numpy()]).to(self.device)


def blend_on_validation(cfg: DictConfig, dm, scores: CandidateScores, dataset, deep=None) -> dict[float, float]:
    """Validation ``selection_metric`` of ``vae + w * ease`` for a grid of w, in one pass over the
    users of ``dataset`` (an ``EvalUsers``); ``deep``: the network term's scores of a batch's users
    (default: the autoencoder's, ``scores.deep``; ``scores.sequence`` for the sequence model's blend).

    The grid is relative to the ratio of the two scores' spreads, so it fits any data. Returns
    w -> metric (w = 0: the network alone; w = inf: EASE alone).
    """
    metric = cfg.model.get("selection_metric", "ndcg@20")
    weights: list[float] = []
    deep_of = deep or scores.deep

    def batch_scores(batch: dict) -> Iterator[tuple[float, torch.Tensor]]:
        deep, shallow = deep_of(batch["user"]), scores.ease(batch["user"])
        if not weights:
            base = float(deep.std()) / (float(shallow.std()) or 1.0)
            weights.extend([0.0, *[base * f for f in BLEND_FACTORS], math.inf])
        for w in weights:  # one blend's (B, n_items) matrix at a time: ranking writes into it
            yield w, shallow.clone() if math.isinf(w) else deep + w * shallow

    results = evaluate_scorers(batch_scores, dataset, dm.n_items, _ks(cfg), device=scores.device, mrr=False)
    return {w: float(r[metric]) for w, r in results.items()}


# -- the whole choice ------------------------------------------------------------------------------
def _served(name: str, weight: float, shallow: ease_lib.ItemItemScorer | None, shallow_input: str = BINARY) -> ServedScore:
    if name in (DEEP, SEQUENCE) or shallow is None:
        return ServedScore(1.0, 0.0, None)
    if name == SHALLOW:
        return ServedScore(0.0, 1.0, shallow, shallow_input)
    return ServedScore(1.0, float(weight), shallow, shallow_input)


def _candidate_batches(scores: CandidateScores, names: list[str], blend_weight: float,
                       popularity: torch.Tensor | None = None):
    """``batch -> {name: scores}`` for :func:`evaluate_scorers`: each candidate of ``names`` (and the
    popularity baseline when given), the two model scores computed once per batch."""

    def batch_scores(batch: dict) -> Iterator[tuple[str, torch.Tensor]]:
        # each (B, n_items) matrix made when it is ranked, the shared terms first used by a blend; ranking writes
        # into a matrix, so a term's own entry comes after every blend that reads it
        deep = scores.deep(batch["user"]) if DEEP in names or BLEND in names else None
        shallow = scores.ease(batch["user"]) if {SHALLOW, BLEND, SEQUENCE_BLEND} & set(names) else None
        if BLEND in names:
            yield BLEND, deep + blend_weight * shallow
        if DEEP in names:
            yield DEEP, deep
        deep = None
        if SEQUENCE in names or SEQUENCE_BLEND in names:
            sequence = scores.sequence(batch["user"])
            if SEQUENCE_BLEND in names:
                yield SEQUENCE_BLEND, sequence + scores.sequence_weight * shallow
            if SEQUENCE in names:
                yield SEQUENCE, sequence
            sequence = None
        if SHALLOW in names:
            yield SHALLOW, shallow
        shallow = None
        if popularity is not None:
            yield BASELINE + "popularity", popularity.expand(len(batch["user"]), -1).clone()

    return batch_scores


def choose_model(cfg: DictConfig, dm, loggers: list | None = None, private_fit=None) -> ModelChoice | None:
    """Steps 1-4 of the module docstring on the prepared DataModule ``dm``.

    private_fit: ``(cfg, dm, rows, loggers, previous) -> (net, facts)``, the DP-SGD fit of the autoencoder
    (``privacy.dp``, :mod:`dmp_dl.privacy.dp_autoencoder`): it replaces the autoencoder's fit, which
    is then the only candidate (EASE and the blend read every user's data outside the mechanism)
    and is not refitted (a second fit would spend a second privacy budget).

    Under ``trainer=ddp`` (:func:`~dmp_dl.training.data_parallel.processes_of`) every process runs
    the autoencoder's fits data-parallel: the held-out fit, then at once its refit on every event
    (the epochs are known; EASE's refit waits for the choice). The other steps run in the main
    process alone; the others return None after the fits (their job ends there).
    """
    processes = processes_of(cfg)
    model = cfg.model
    wanted = [str(c) for c in model.get("candidates", [DEEP, SHALLOW])]  # settings checked by dmp_dl.pipeline.checks
    if private_fit is not None:
        wanted = [DEEP]
    metric = model.get("selection_metric", "ndcg@20")
    device = stage_device(cfg)
    has_val = len(dm.val_users) > 0
    val_sample = validation_sample(cfg, dm) if has_val else None
    x_train = dm.train_seen
    candidates: dict[str, dict] = {}
    # the training pairs, counted without building the rows now: they would be held through EASE's dense fit
    max_epochs, epochs_from = epoch_limit(cfg, int(x_train.nnz))
    log.info("autoencoder: at most %d epochs (%s)%s", max_epochs, epochs_from,
             ", early stopping on validation" if has_val else "")
    budget, budget_facts = time_budget(cfg)
    previous = None
    if cfg.get("init_from"):  # a previous run's bundle or checkpoint: the autoencoder starts from it

        previous = load_previous(cfg.init_from)

    shallow = plain_ease = None
    ease_skipped = None
    if SHALLOW in wanted and processes.main:  # data-parallel: the other processes fit the autoencoder only
        ease_skipped = ease_lib.check_memory(dm.n_users, dm.n_items, model.ease.get("max_memory_gb", "auto"), device,
                                             keep_gram=has_val and ease_keeps_gram(cfg, dm.n_users, dm.n_items))
        if ease_skipped is not None:
            if wanted == [SHALLOW]:
                raise ConfigError(ease_skipped)
            log.warning("EASE candidate skipped: %s", ease_skipped)
            candidates[SHALLOW] = {"status": "skipped", "reason": ease_skipped}
        else:
            shallow, ease_facts, plain_ease = (fit_ease(cfg, dm, x_train, val_users=val_sample) if has_val
                                               else fit_ease(cfg, dm, x_train, l2=_default_l2(cfg, x_train)))
            candidates[SHALLOW] = {"status": "ok", "reason": None, "fit_seconds": ease_facts["fit_seconds"], "details": ease_facts}
            shallow.to(device)

    # 1a'. the recency half-life of the users' rows (dmp_dl.training.recency_choice), before the
    # autoencoder trains on them
    choose_recency = len(dm.recency_candidates()) > 1
    if choose_recency and private_fit is not None:
        half_life, recency = recency_choice.fixed(dm, "privacy.dp: no choice on validation outside the mechanism, no decay")
        choose_recency = False
    elif choose_recency and not has_val:
        half_life, recency = recency_choice.fixed(dm, "no validation users to choose with: no decay")
        choose_recency = False
    elif choose_recency and shallow is not None and processes.count == 1:
        # data-parallel: only process 0 has EASE, so every process chooses alike with the autoencoder (below)
        half_life, recency = recency_choice.by_ease(cfg, dm, shallow, val_sample, metric, _ks(cfg), device)
        choose_recency = False
    else:  # nothing to choose, or the autoencoder chooses once fitted without decay
        half_life, recency = recency_choice.fixed(dm)
    dm.use_half_life(half_life)
    rows_train = dm.interaction_rows("train")
    if processes.count > 1:
        _announce_data_parallel(cfg, dm, rows_train, processes)

    # 1b. the autoencoder: always fitted, its vectors are the bundle's. Its share of a time cap: what
    # EASE left, halved (the final fit on every event repeats it), less one more EASE fit for that refit
    vae_budget = None
    if budget is not None:
        ease_details = candidates.get(SHALLOW, {}).get("details", {})
        ease_seconds = ease_details.get("fit_seconds" if device.type == "cuda" else "cpu_seconds", 0.0)
        vae_budget = max((budget - 1.5 * ease_seconds) / 2.0, 0.1 * budget)
    if private_fit is not None:
        net, vae_facts = private_fit(cfg, dm, rows_train, loggers, previous)
    else:
        net, vae_facts = fit_autoencoder(cfg, dm, rows_train, validate=has_val, max_epochs=max_epochs, loggers=loggers,
                                         time_budget_s=vae_budget, previous=previous, val_users=val_sample,
                                         processes=processes)
    if choose_recency:  # no EASE: the autoencoder fitted without decay reads each half-life's rows
        half_life, recency = recency_choice.by_autoencoder(net.to(device), dm, val_sample, metric, _ks(cfg), device)
        dm.use_half_life(half_life)
        rows_train = dm.interaction_rows("train")
        net.attach_rows(rows_train)
    held_out = len(dm.train_idx) < len(dm.events)
    refit_reason = _refit_reason(cfg, held_out, private_fit is not None)
    refitted = None
    if processes.count > 1:
        if refit_reason is None:  # every process takes part in the refit now, while they are all here
            epochs, held_out_fit, how = autoencoder_refit_plan(cfg, int(len(dm.train_idx)), int(vae_facts.get("epochs", 1)))
            refitted = fit_autoencoder(cfg, dm, dm.interaction_rows("all"), validate=False, max_epochs=epochs,
                                       loggers=loggers, time_budget_s=vae_budget, previous=previous, processes=processes,
                                       continue_from=net if held_out_fit else None)
            refitted[1]["refit_plan"] = how
        leave_process_group()
        if not processes.main:
            log.info("autoencoder: this process's part of the data-parallel fits is done; process 0 runs the rest "
                     "of the job and writes the bundle")
            return None
    users = user_vectors(net.to(device), np.arange(dm.n_users), dm.train_history, device=device)
    items = item_vectors(net, dm.n_items, device=device)
    net.cpu()
    candidates[DEEP] = {"status": "ok", "reason": None, "fit_seconds": vae_facts["fit_seconds"],
                        "details": {**vae_facts, "time_budget_s": vae_budget, "max_epochs": max_epochs,
                                    "max_epochs_from": epochs_from}}
    if DEEP not in wanted:
        candidates[DEEP]["status"] = "skipped"
        candidates[DEEP]["reason"] = "not in model.candidates: fitted for the vectors only"
    shallow_input = BINARY if dm.half_life_days is None else ROWS  # EASE reads what the autoencoder reads: decayed rows
    scores = CandidateScores(users, items, x_train if shallow_input == BINARY else rows_train, shallow, device,
                             shallow_input, x_train)

    # 2. validation: the blend's weight on the sample, then the candidates on every validation user
    val_scores: dict[str, float] = {}
    blend_weight = 0.0
    if shallow is not None and DEEP in wanted:
        candidates[BLEND] = {"status": "ok", "reason": None, "details": {}}
    if has_val and shallow is not None:
        grid = blend_on_validation(cfg, dm, scores, val_sample)
        blend_weight = max(((w, v) for w, v in grid.items() if 0 < w < math.inf), key=lambda wv: wv[1])[0]
        if BLEND in candidates:
            candidates[BLEND]["details"]["grid"] = {f"{w:.4g}": v for w, v in grid.items()}
        if len(val_sample) == len(dm.val_users):
            val_scores = {DEEP: grid[0.0], SHALLOW: grid[math.inf]}
            if BLEND in candidates:
                val_scores[BLEND] = grid[blend_weight]
        else:
            names = [DEEP, SHALLOW] + ([BLEND] if BLEND in candidates else [])
            full = evaluate_scorers(_candidate_batches(scores, names, blend_weight), dm.eval_dataset("val"),
                                    dm.n_items, _ks(cfg), device=device, mrr=False)
            val_scores = {n: float(full[n][metric]) for n in names}
    elif has_val:
        full = evaluate_scorers(_candidate_batches(scores, [DEEP], 0.0), dm.eval_dataset("val"), dm.n_items,
                                _ks(cfg), device=device, mrr=False)
        val_scores = {DEEP: float(full[DEEP][metric])}
    elif shallow is not None:  # no validation users: blend at the ratio of the two scores' spreads
        blend_weight = _spread_ratio(scores, dm.n_users)
    if BLEND in candidates:
        candidates[BLEND]["details"]["weight"] = blend_weight

    # 2b. the sequence candidate (dmp_dl.training.sequence_candidate): it stops early once it cannot
    # reach the others' best validation score
    sequence_net = sequence_cfg = None
    if SEQUENCE in wanted and private_fit is None:
        skipped = sequence_candidate.skip_reason(cfg, dm, device, processes.count)
        if skipped is not None:
            log.info("sasrec candidate skipped: %s", skipped)
            candidates[SEQUENCE] = {"status": "skipped", "reason": skipped}
        else:
            bar = max(val_scores.values()) if val_scores else None
            sequence_net, seq_facts, sequence_cfg = sequence_candidate.fit_sequence(cfg, dm, metric, bar)
            scores.with_sequence(*sequence_candidate.sequence_vectors(sequence_net, dm.n_users, dm.train_history, device))
            full = evaluate_scorers(_candidate_batches(scores, [SEQUENCE], 0.0), dm.eval_dataset("val"), dm.n_items,
                                    _ks(cfg), device=device, mrr=False)
            val_scores[SEQUENCE] = float(full[SEQUENCE][metric])
            candidates[SEQUENCE] = {"status": "ok", "reason": seq_facts["stopped"], "fit_seconds": seq_facts["fit_seconds"],
                                    "details": seq_facts}
            if shallow is not None:  # its blend with EASE, as for the autoencoder
                sequence_weight, val_scores[SEQUENCE_BLEND], grid = _sequence_blend(cfg, dm, scores, val_sample, metric)
                candidates[SEQUENCE_BLEND] = {"status": "ok", "reason": None, "details": {
                    "weight": sequence_weight, "grid": {f"{w:.4g}": v for w, v in grid.items()}}}
            log.info("sasrec candidate: %d epoch(s), best %d, validation %s %.4f (%s)", seq_facts["epochs"],
                     seq_facts["best_epoch"], metric, val_scores[SEQUENCE], seq_facts["stopped"])
    for name, value in val_scores.items():
        candidates[name]["val"] = {metric: value}
    eligible = [n for n in candidates if candidates[n]["status"] == "ok"]
    if val_scores:
        chosen = max((n for n in eligible if n in val_scores), key=lambda n: (val_scores[n], n == DEEP))
    else:  # nothing to choose with: the richest model that was fitted
        chosen = BLEND if BLEND in eligible else SHALLOW if SHALLOW in eligible else DEEP
        log.warning("no validation users: model chosen without validation (%s)", chosen)
    log.info("model choice: %s (validation %s: %s)", chosen, metric,
             ", ".join(f"{n}={v:.4f}" for n, v in val_scores.items()) or "n/a")
    why = _why(chosen, val_scores, metric)

    # 3. test metrics of every candidate and of the baselines (models fitted without the held-out
    # events), in one pass over the test users; EASE's baseline is the candidate's plain EASE (no refit)
    ranking: dict[str, dict] = {}
    if len(dm.test_users):
        tested = [n for n in (DEEP, SHALLOW, BLEND, *SEQUENCE_NAMES)
                  if n in candidates and (n == DEEP or candidates[n]["status"] == "ok")]
        sequence_weight = scores.sequence_weight
        scores = test_inputs(dm, net, items, shallow, device, shallow_input)
        if sequence_net is not None:
            scores.with_sequence(*sequence_candidate.sequence_vectors(sequence_net, dm.n_users, dm.test_input_history,
                                                                      device), sequence_weight)
        tests, baselines = _test_pass(cfg, dm, scores, tested, blend_weight, candidates, ease_skipped, plain_ease)
        for name in tested:
            candidates[name]["test"] = tests[name]
        ranking[str(model.get("name", "auto"))] = candidates[chosen]["test"]
        ranking.update(baselines)
    scores = None
    if shallow is not None:
        shallow.release()
    served = _served(chosen, candidates[chosen]["details"]["weight"] if chosen == SEQUENCE_BLEND else blend_weight,
                     shallow, shallow_input)
    if chosen not in SEQUENCE_NAMES:
        sequence_net = sequence_cfg = None  # the candidate's network is not served: let it go
    fit_seconds = sum(c.get("fit_seconds", 0.0) for c in candidates.values())
    record = {
        "selected": chosen,
        "why": why,
        "selection_metric": metric,
        "served_score": served.describe(),
        "fit_seconds": fit_seconds,
        "device": device.type,
        "budget": budget_facts,
        "validation_users": {"sample": len(val_sample) if val_sample is not None else 0, "all": int(len(dm.val_users))},
        "candidates": {n: dict(c) for n, c in candidates.items()},
        "best_baseline": _best_baseline(ranking, candidates),
        "recency": recency,
    }
    train = {"epochs": vae_facts.get("epochs"), "fit_seconds": fit_seconds, "selection_fit_seconds": fit_seconds,
             "train_events": int(len(dm.train_idx)), "val": {f"val/{metric}": val_scores.get(chosen)},
             "warm_start": vae_facts.get("warm_start"), "steps": vae_facts.get("steps")}
    if chosen in SEQUENCE_NAMES:
        details = candidates[SEQUENCE]["details"]
        train.update(epochs=details["best_epoch"], steps=None, warm_start=None)
    choice = ModelChoice(net=sequence_net if chosen in SEQUENCE_NAMES else net, served=served, name=chosen, record=record,
                         ranking=ranking, train=train, network_config=sequence_cfg)
    if refit_reason is None and chosen in SEQUENCE_NAMES:
        _refit_sequence(cfg, dm, choice)
        refit_reason = "model.refit=true: trained again from scratch on every event for the epochs chosen on validation"
    elif refit_reason is None:
        refit(cfg, dm, choice, dm.interaction_rows("all"), dm.all_seen, loggers, previous, autoencoder=refitted)
        refit_reason = ("model.refit=true: trained again on every event with the epochs and l2 chosen on validation"
                        + (f", data-parallel over {processes.count} processes like the held-out fit"
                           if processes.count > 1 else ""))
    else:
        choice.record["refit"] = False
        if chosen not in SEQUENCE_NAMES:
            net.attach_rows(dm.interaction_rows("all"))
    choice.train["refit"] = {"done": bool(choice.record["refit"]), "reason": refit_reason, "processes": processes.count}
    return choice


def _why(chosen: str, val_scores: dict[str, float], metric: str) -> str:
    """One sentence: why ``chosen`` is served (``metrics.json["model"]["why"]`` and the report)."""
    if chosen not in val_scores:
        return f"{chosen}: no validation users to choose with; the richest model fitted is served"
    others = sorted(((v, n) for n, v in val_scores.items() if n != chosen), reverse=True)
    if not others:
        return f"{chosen}: the only candidate (validation {metric} {val_scores[chosen]:.4f})"
    best_other, name = others[0]
    gain = f", {100 * (val_scores[chosen] / best_other - 1):+.1f} %" if best_other > 0 else ""
    return (f"{chosen}: the best validation {metric}, {val_scores[chosen]:.4f} against {name}'s {best_other:.4f}{gain} "
            f"(then {', '.join(f'{n} {v:.4f}' for v, n in others[1:]) or 'no other candidate'})")


def _refit_shallow(cfg: DictConfig, dm, choice: ModelChoice, seen: sp.csr_matrix, facts: dict) -> ServedScore:
    """The served score after EASE's refit on ``seen`` (when the winner uses it and
    :func:`ease_refit_skipped` allows); what happened goes into ``facts``."""
    served = choice.served
    if not served.uses_shallow:
        return served
    chosen = choice.record["candidates"][SHALLOW]["details"]
    kept = ease_refit_skipped(cfg, dm.n_items, chosen.get("form", "primal"), stage_device(cfg))
    facts["ease_refit"] = kept or "fitted again on every event with the l2 chosen on validation"
    if kept is not None:
        log.info("EASE: %s", kept)
        return served
    t1 = time.perf_counter()
    shallow, _, _ = fit_ease(cfg, dm, seen, l2=chosen["l2"], dropout=chosen.get("dropout", 0.0))
    facts["ease_seconds"] = time.perf_counter() - t1
    return ServedScore(served.deep_weight, served.shallow_weight, shallow, served.shallow_input)


def _refit_sequence(cfg: DictConfig, dm, choice: ModelChoice) -> None:
    """Step 4 for the sequence candidates: the network trained again on every event for its best
    epoch count, and EASE's term (``sasrec+ease``) as for the autoencoder's blend."""
    t0 = time.perf_counter()
    details = choice.record["candidates"][SEQUENCE]["details"]
    net, fitted = sequence_candidate.refit_sequence(choice.network_config, dm, int(details["best_epoch"]))
    facts: dict[str, Any] = {"sasrec_epochs": fitted["epochs"], "sasrec_seconds": fitted["seconds"]}
    choice.served = _refit_shallow(cfg, dm, choice, dm.all_seen, facts)
    facts["seconds"] = time.perf_counter() - t0
    choice.net = net
    choice.record.update(refit=True, refit_facts=facts)
    choice.train.update(refit_seconds=facts["seconds"], fit_seconds=choice.train["selection_fit_seconds"] + facts["seconds"])
    log.info("sasrec: trained again on every event, %d epoch(s), %.1f s", fitted["epochs"], fitted["seconds"])


def _sequence_blend(cfg: DictConfig, dm, scores: CandidateScores, val_sample, metric: str
                    ) -> tuple[float, float, dict[float, float]]:
    """The weight of EASE's term in ``sasrec + w * ease`` chosen on the validation sample (the
    autoencoder's blend grid, :func:`blend_on_validation`, on the sequence model's dot products; set
    as ``scores.sequence_weight``), and that blend's validation ``metric`` on every validation user.
    Returns (w, score, grid)."""
    grid = blend_on_validation(cfg, dm, scores, val_sample, deep=scores.sequence)
    weight = max(((w, v) for w, v in grid.items() if 0 < w < math.inf), key=lambda wv: wv[1])[0]
    scores.sequence_weight = weight
    if len(val_sample) == len(dm.val_users):
        return weight, grid[weight], grid
    full = evaluate_scorers(_candidate_batches(scores, [SEQUENCE_BLEND], 0.0), dm.eval_dataset("val"), dm.n_items,
                            _ks(cfg), device=scores.device, mrr=False)
    return weight, float(full[SEQUENCE_BLEND][metric]), grid


def _refit_reason(cfg: DictConfig, held_out: bool, private: bool) -> str | None:
    """Why the winner is not trained again on every event (None: it is)."""
    if not bool(cfg.model.get("refit", True)):
        return "model.refit=false"
    if not held_out:
        return "no held-out events: the models already saw every event"
    if private:
        return "privacy.dp: a second fit would spend a second privacy budget"
    return None


def _announce_data_parallel(cfg: DictConfig, dm, rows: sp.csr_matrix, processes: Processes) -> None:
    """One line on how the autoencoder trains data-parallel; refuses more processes than users
    (:func:`~dmp_dl.training.data_parallel.check_processes`)."""
    step = batch_users(cfg.model.vae.get("batch_users"), dm.n_users)
    each = per_process_batch(step, processes)
    warning = check_processes(len(users_with_rows(rows)), each, processes)
    if warning:
        log.warning("%s", warning)
    if processes.main:
        log.info("autoencoder: data-parallel over %d processes (trainer=ddp): each trains on its own share of the "
                 "users every epoch, %d users a step (%d a step in all) and scores its share of the validation users; "
                 "EASE, the choice, the test metrics and the export run in this process alone",
                 processes.count, each, each * processes.count)


def refit(cfg: DictConfig, dm, choice: ModelChoice, rows: sp.csr_matrix, seen: sp.csr_matrix,
          loggers: list | None = None, previous=None, autoencoder: tuple[torch.nn.Module, dict] | None = None) -> ModelChoice:
    """Step 4: train ``choice``'s winner again on ``rows`` (interaction strengths) and ``seen``
    (0/1, the EASE input), with the epochs and l2 chosen on validation; updates ``choice`` in place.
    ``autoencoder``: (net, facts) of the autoencoder's refit when it already ran (data-parallel:
    every process took part before the choice), else it is fitted here.

    The pipeline passes every event; a benchmark can pass the training and validation events only.
    """
    t0 = time.perf_counter()
    facts: dict[str, Any] = {}
    vae = choice.record["candidates"][DEEP]["details"]
    earlier = 0.0 if autoencoder is None else float(autoencoder[1]["fit_seconds"])  # seconds it took before t0
    if autoencoder is None:
        epochs, held_out_fit, how = autoencoder_refit_plan(cfg, int(choice.train["train_events"]), int(vae.get("epochs", 1)))
        autoencoder = fit_autoencoder(cfg, dm, rows, validate=False, max_epochs=epochs, loggers=loggers,
                                      time_budget_s=vae.get("time_budget_s"), previous=previous,
                                      continue_from=choice.net if held_out_fit else None)
        autoencoder[1]["refit_plan"] = how
    net, fitted = autoencoder
    facts["vae_refit"] = fitted.get("refit_plan")
    if fitted.get("warm_start") and "continued" in fitted["warm_start"]:
        facts["vae_continued"] = fitted["warm_start"]
    if fitted.get("ray"):
        facts["vae_ray"] = fitted["ray"]
    facts.update(vae_seconds=fitted["fit_seconds"], vae_epochs_run=fitted["epochs_run"],
                 vae_time_budget_fired=fitted["time_budget_fired"], processes=int(fitted.get("processes", 1)))
    served = _refit_shallow(cfg, dm, choice, seen, facts)
    facts["seconds"] = time.perf_counter() - t0 + earlier
    net.attach_rows(rows)
    choice.net, choice.served = net, served
    choice.record.update(refit=True, refit_facts=facts)
    choice.train.update(refit_seconds=facts["seconds"], fit_seconds=choice.train["selection_fit_seconds"] + facts["seconds"])
    return choice


def autoencoder_refit_plan(cfg: DictConfig, train_events: int, epochs: int) -> tuple[int, bool, str]:
    """How the autoencoder is trained again on every event: (epochs, whether it continues the fit
    of the training period, why). From scratch with the epochs chosen on validation, unless the
    training period held more than ``model.vae.refit_continue_above_events`` events (null: never):
    then the held-out fit continues for ``model.vae.refit_continue_epochs`` epochs over every
    event — on a large log that fit has already seen most of them many times, and a second fit
    from scratch would double the model stage."""
    node = cfg.model.vae
    above = node.get("refit_continue_above_events", None)
    if above is None or train_events <= int(above):
        return epochs, False, f"from scratch, {epochs} epochs (as chosen on validation)"
    more = int(node.get("refit_continue_epochs", 1))
    return more, True, (f"continued from the fit on the training period for {more} epoch(s) over every event "
                        f"({train_events:,} training events > model.vae.refit_continue_above_events={int(above):,})")


def ease_refit_skipped(cfg: DictConfig, n_items: int, form: str, device: torch.device) -> str | None:
    """Why the served item-item weights stay those fitted on the training period (None: EASE is
    fitted again on every event). ``model.ease.refit``: true, false, or ``auto`` — again unless,
    on the CPU, the catalogue is wider than ``model.ease.short_grid_above_items`` and the primal
    form is used: there one Cholesky of the items x items matrix is the run's largest cost (the
    reason the l2 grid is one value there), and the users' rows still read every event."""
    setting = cfg.model.ease.get("refit", "auto")
    if setting is True:
        return None
    if setting is False:
        return "model.ease.refit=false: the weights fitted on the training period are served"
    limit = int(cfg.model.ease.get("short_grid_above_items", 8000))
    if device.type != "cuda" and form == "primal" and n_items > limit:
        return (f"the weights fitted on the training period are served (model.ease.refit=auto: {n_items:,} items > "
                f"model.ease.short_grid_above_items={limit:,} on the CPU, where a second Cholesky would double the "
                "model stage; users' rows read every event)")
    return None


def test_inputs(dm, net, items: np.ndarray, shallow, device: torch.device, shallow_input: str) -> CandidateScores:
    """The candidates' scores of the test users from everything they did before the test period
    (training and validation events), as a server that takes events in real time ranks them: their
    rows re-encoded by the autoencoder fitted on the training period, EASE's term reading the same
    rows. Every weight stays as fitted on the training period. Leaves ``net`` attached to those rows."""
    rows = dm.interaction_rows("before_test")
    net.attach_rows(rows)
    users = user_vectors(net.to(device), np.arange(dm.n_users), dm.test_input_history, device=device)
    net.cpu()
    return CandidateScores(users, items, dm.test_seen if shallow_input == BINARY else rows, shallow, device,
                           shallow_input, dm.test_seen)


def _default_l2(cfg: DictConfig, x: sp.csr_matrix) -> float:
    node = cfg.model.ease
    if node.get("l2") is not None:
        return float(node.l2)
    grid = ease_lib.l2_grid(x, list(node.l2_scales))
    return grid[len(grid) // 2]


def _spread_ratio(scores: CandidateScores, n_users: int) -> float:
    u = torch.arange(min(n_users, 256))
    return float(scores.deep(u).std()) / (float(scores.ease(u).std()) or 1.0)


def _test_pass(cfg: DictConfig, dm, scores: CandidateScores, tested: list[str], blend_weight: float,
               candidates: dict, ease_skipped: str | None,
               plain_ease: ease_lib.ItemItemScorer | None = None) -> tuple[dict[str, dict], dict[str, dict]]:
    """Test metrics of the ``tested`` candidates and of the report's baselines, in one pass over the
    test users: popularity, and EASE — plain EASE (dropout 0) with the l2 the report asks for
    (``evaluation.ease_l2``, default: the one plain EASE chose on validation): the EASE candidate
    itself when it is that model, else plain EASE's weights fitted beside it (``plain_ease``), else a
    fit of its own in the same served (pruned) form, which ``python -m dmp_dl.evaluate`` scores too.
    Returns (candidate name -> metrics, baseline name -> metrics)."""
    evaluation = cfg.get("evaluation") or {}
    names = list(evaluation.get("baselines") if evaluation.get("baselines") is not None else ("popularity", "ease"))
    ks = list(evaluation.get("ks") or (5, 10, 20, 50))
    share = torch.as_tensor(dm.item_counts / max(dm.item_counts.sum(), 1), dtype=torch.float32)
    popularity = None
    if "popularity" in names:
        popularity = torch.as_tensor(np.log1p(np.asarray(dm.item_counts, dtype=np.float64)), dtype=torch.float32,
                                     device=scores.device)
    batches = _candidate_batches(scores, tested, blend_weight, popularity)
    details = candidates.get(SHALLOW, {}).get("details") or {}
    plain_l2 = (details.get("plain_ease") or {}).get("l2", details.get("l2"))
    wanted_l2 = evaluation.get("ease_l2")
    wanted = plain_l2 if wanted_l2 is None else float(wanted_l2)
    same = ("ease" in names and SHALLOW in tested and float(details.get("dropout", 0.0)) == 0.0
            and wanted == details.get("l2"))  # the candidate is the plain EASE the report asks for
    reuse = same and scores.shallow_input == BINARY
    plain = same and not reuse  # the candidate reads decayed rows: the baseline is its weights on 0/1 items
    own = None
    if "ease" in names and not same and plain_ease is not None and wanted == plain_l2:
        own = plain_ease.to(scores.device)
    elif "ease" in names and not same:
        reason = ease_skipped or ease_lib.check_memory(dm.n_users, dm.n_items, cfg.model.ease.get("max_memory_gb", "auto"),
                                                        scores.device, keep_gram=False)  # one l2
        if reason is None and dm.n_items <= int(evaluation.get("ease_max_items", 20000)):
            l2 = wanted if wanted is not None else _default_l2(cfg, dm.train_seen)
            own, _, _ = fit_ease(cfg, dm, dm.train_seen, l2=l2, dropout=0.0)
            own.to(scores.device)
        elif reason is not None:
            log.warning("EASE baseline skipped: %s", reason)
    scorer = batches
    if own is not None or plain:
        rows = scores.binary_rows

        def scorer(batch: dict) -> Iterator[tuple[str, torch.Tensor]]:
            yield from batches(batch)
            yield BASELINE + "ease", (own(rows[batch["user"].cpu().numpy()]).to(scores.device) if own is not None
                                      else scores.plain_ease(batch["user"]))

    results = evaluate_scorers(scorer, dm.eval_dataset("test"), dm.n_items, ks, share, device=scores.device)
    if own is not None:
        own.release()
    tests = {n: results[n] for n in tested}
    baselines = {n[len(BASELINE):]: r for n, r in results.items() if n.startswith(BASELINE)}
    if reuse:
        baselines["ease"] = tests[SHALLOW]
    return tests, {n: baselines[n] for n in names if n in baselines}


def _best_baseline(ranking: dict, candidates: dict) -> dict | None:
    base = {n: m for n, m in ranking.items() if n in ("popularity", "ease")}
    if not base:
        return None
    name = max(base, key=lambda n: base[n].get("ndcg@20", -1.0))
    shallow = candidates.get(SHALLOW, {})
    details = shallow.get("details") or {}
    val = None
    if name == "ease":  # plain EASE's validation score: the candidate's when it is plain EASE
        val = shallow.get("val") if float(details.get("dropout", 0.0)) == 0.0 else (details.get("plain_ease") or {}).get("val")
    return {"name": name, "test": {k: base[name].get(k) for k in ("ndcg@20", "recall@20")}, "val": val}
