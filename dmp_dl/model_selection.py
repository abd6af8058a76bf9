"""The automatic model choice (``model=auto``, the default; also ``model=vae`` and ``model=ease``).

1. Fit each candidate that fits the data on the training split: EASE (:mod:`dmp_dl.models.ease`,
   l2 chosen on validation from a grid relative to the data), when its item x item matrix fits in
   memory, and the user-level autoencoder (:mod:`dmp_dl.models.autoencoder`, epochs chosen by early
   stopping on validation NDCG), within what is left of the stage's time budget
   (``model.time_budget_s``: by default about one dense EASE fit's time, see :func:`time_budget`).
2. Score them on the validation users, and the blend of both, ``vae + w * ease``, for a grid of w
   (:mod:`dmp_dl.models.scoring`); the best validation ``selection_metric`` wins.
3. Score every candidate and the baselines on the test users (these are the reported numbers).
4. Refit the winner on every event (``model.refit``), so the bundle knows every user and item,
   also those seen only in the held-out period; the epochs and l2 are those chosen in 1.

The bundle always holds the autoencoder's vectors (FAISS, lookalike, segments and propensity
features read them); when the winner uses the EASE path, recommendations are scored exactly with
it (:class:`~dmp_dl.models.scoring.ServedScore`).
"""

from __future__ import annotations

import copy
import logging
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytorch_lightning as pl
import scipy.sparse as sp
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.callbacks import Callback, EarlyStopping

from dmp_dl.embeddings import item_vectors, user_vectors
from dmp_dl.errors import ConfigError
from dmp_dl.evaluation.baselines import PopularityScorer
from dmp_dl.evaluation.metrics import RankingAccumulator, batch_metrics
from dmp_dl.evaluation.ranking import default_batch_size, evaluate_scorer
from dmp_dl.models import ease as ease_lib
from dmp_dl.models.autoencoder_module import user_loader
from dmp_dl.models.scoring import BlendScorer, ServedScore

log = logging.getLogger(__name__)

DEEP, SHALLOW, BLEND = "vae", "ease", "vae+ease"
BLEND_FACTORS = tuple(2.0 ** e for e in range(-6, 4))  # 1/64 .. 8 x the ratio of the two score spreads


@dataclass
class ModelChoice:
    """What the model stage hands on to evaluation, propensity, audiences and export.

    net: the autoencoder, rows of every event attached (its vectors are the bundle's).
    served: how recommendations are scored. name: the winner (``vae``, ``ease`` or ``vae+ease``).
    record: ``metrics.json["model"]``; ranking: ``metrics.json["ranking"]`` (test metrics of the
    served model under the run's model name, and of the baselines); train: ``metrics.json["train"]``.
    """

    net: torch.nn.Module
    served: ServedScore
    name: str
    record: dict
    ranking: dict
    train: dict = field(default_factory=dict)


class KeepBest(Callback):
    """Keeps the weights of the best validation epoch in memory (no checkpoint files)."""

    def __init__(self, monitor: str):
        self.monitor, self.best, self.best_epoch, self.state = monitor, -math.inf, -1, None

    def on_validation_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if value is not None and float(value) > self.best:
            self.best, self.best_epoch = float(value), trainer.current_epoch
            self.state = copy.deepcopy(module.state_dict())


def compute_seconds() -> float:
    """The CPU seconds this process has used, every thread counted (``time.process_time``). Time
    budgets count these, not wall time, so that a machine busy with other work gives a fit the same
    epochs as an idle one (it takes longer on the clock instead)."""
    return time.process_time()


class TimeBudget(Callback):
    """Stops a fit that would overrun ``seconds`` of compute (:func:`compute_seconds`): after an
    epoch when one more would not fit in what is left, and within an epoch once the time is spent
    (so an epoch longer than the budget ends early). Says so once in the log."""

    def __init__(self, seconds: float):
        self.seconds, self.t0, self.stopped = float(seconds), 0.0, False

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.t0 = compute_seconds()

    def _stop(self, trainer: pl.Trainer, why: str) -> None:
        if not self.stopped:
            log.info("time budget: %s after %.1f of %.1f CPU seconds (model.time_budget_s)", why,
                     compute_seconds() - self.t0, self.seconds)
        self.stopped = True
        trainer.should_stop = True

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if compute_seconds() - self.t0 > self.seconds:
            self._stop(trainer, f"epoch {trainer.current_epoch + 1} cut short")

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        elapsed = compute_seconds() - self.t0
        per_epoch = elapsed / (trainer.current_epoch + 1)
        if not self.stopped and elapsed + per_epoch > self.seconds:
            self._stop(trainer, f"stopping after {trainer.current_epoch + 1} epoch(s), another would not fit")


def batch_users(setting: Any, n_users: int) -> int:
    """``auto``: 64 users a step on small logs, up to 1024 on large ones (about 64 steps an epoch)."""
    if setting in (None, "auto"):
        return int(min(1024, max(64, 2 ** round(math.log2(max(n_users, 1) / 64)))))
    return int(setting)  # checked with the other settings (dmp_dl.checks)


# -- fitting ------------------------------------------------------------------------------------
def _trainer(cfg: DictConfig, callbacks: list, max_epochs: int, time_budget_s: float | None, validate: bool,
             loggers: list) -> pl.Trainer:
    """``cfg.trainer`` for one autoencoder fit: one device, no checkpoint files (the best epoch is
    kept in memory), the configured callbacks other than checkpointing and early stopping (the
    per-epoch log line among them) plus ``callbacks``."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    from dmp_dl.training import FiniteLossGuard, _instantiate_all, instantiate_trainer

    configured = [c for c in _instantiate_all(cfg.get("callbacks")) if not isinstance(c, (ModelCheckpoint, EarlyStopping))]
    callbacks = [FiniteLossGuard(), *callbacks, *configured]
    extra: dict[str, Any] = {"max_epochs": int(max_epochs), "devices": 1, "strategy": "auto", "min_epochs": 0,
                             "enable_model_summary": False,
                             "enable_checkpointing": False, "num_sanity_val_steps": 0}
    if cfg.trainer.get("enable_progress_bar") == "auto":  # a bar on a terminal, none in a piped or captured log
        extra["enable_progress_bar"] = sys.stdout.isatty()
    if time_budget_s:
        callbacks.append(TimeBudget(time_budget_s))
    if not validate:
        extra["limit_val_batches"] = 0
    return instantiate_trainer(cfg.trainer, callbacks=callbacks, logger=loggers or False, **extra)


def fit_autoencoder(cfg: DictConfig, dm, rows: sp.csr_matrix, *, validate: bool, max_epochs: int,
                    loggers: list | None = None, time_budget_s: float | None = None,
                    previous=None) -> tuple[torch.nn.Module, dict]:
    """Train ``cfg.model.vae`` on ``rows`` ((n_users, n_items) interaction strengths).

    With ``validate``, early stopping on the validation users picks the epoch and the best epoch's
    weights are returned; else ``max_epochs`` epochs run. Training also stops after
    ``time_budget_s`` seconds (None: no limit). ``previous``: a
    :class:`~dmp_dl.warm_start.PreviousNetwork` (``init_from``) the net starts from, row by row by
    id. Returns (net, facts).
    """
    node = cfg.model.vae
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    net = instantiate(node.net, _convert_="all")(n_users=dm.n_users, n_items=dm.n_items, user_features=dm.user_features)
    net.attach_rows(rows)
    warm = None
    if previous is not None:
        from dmp_dl.warm_start import warm_start

        warm = warm_start(net, previous, {"user": dm.user_vocab.ids, "item": dm.item_vocab.ids})
    loader = user_loader(rows, batch_users(node.get("batch_users"), dm.n_users))
    counts = np.bincount(sp.csr_matrix(rows).indices, minlength=dm.n_items)
    module = instantiate(node.module, _convert_="all")(net=net, item_counts=counts, steps_per_epoch=len(loader))
    metric = f"val/{cfg.model.get('selection_metric', 'ndcg@20')}"
    callbacks: list = []
    keep = None
    validate = validate and len(dm.val_users) > 0
    if validate:
        keep = KeepBest(metric)
        callbacks = [keep, EarlyStopping(monitor=metric, mode="max", patience=int(node.get("patience", 5)))]
    trainer = _trainer(cfg, callbacks, max_epochs, time_budget_s, validate, loggers or [])
    t0 = time.perf_counter()
    with warnings.catch_warnings():  # a final fit without validation users is intended, not a slip
        warnings.filterwarnings("ignore", message=".*validation_step.*no .val_dataloader.*")
        trainer.fit(module, train_dataloaders=loader, val_dataloaders=dm.val_dataloader() if validate else None)
    seconds = time.perf_counter() - t0
    facts = {"fit_seconds": seconds, "epochs_run": int(trainer.current_epoch), "batch_users": loader.batch_size,
             "steps": int(module._batches), "warm_start": warm}
    if keep is not None and keep.state is not None:
        module.load_state_dict(keep.state)
        facts.update(best_epoch=keep.best_epoch, epochs=keep.best_epoch + 1, val_best=keep.best)
    else:
        facts["epochs"] = max(int(trainer.current_epoch), 1)
    net.eval()
    return net, facts


def fit_ease(cfg: DictConfig, dm, x: sp.csr_matrix, l2: float | None = None) -> tuple[ease_lib.ItemItemScorer, dict]:
    """EASE on the binary matrix ``x``: with ``l2`` given, one fit; else the l2 of ``model.ease.l2``
    or, when that is null, the best of the grid on the validation users. Returns the served
    (pruned) weights and facts (l2, grid results, fit seconds)."""
    node = cfg.model.ease
    keep = ease_lib.keep_per_item_for(dm.n_items, float(node.get("max_bundle_mb", 256)))
    t0, c0 = time.perf_counter(), compute_seconds()
    solver = ease_lib.EASESolver(x)
    if l2 is not None or node.get("l2") is not None:
        grid = [float(l2 if l2 is not None else node.l2)]
    else:
        scales = list(node.l2_scales)
        if not solver.dual and dm.n_items > int(node.get("short_grid_above_items", 8000)):
            scales = [scales[len(scales) // 2]]  # a Cholesky per value: the middle one alone on large catalogues
        grid = ease_lib.l2_grid(x, scales)
    results: dict[float, float] = {}
    if len(grid) > 1:
        for value in grid:
            results[value] = _validation_metric(cfg, dm, lambda batch, v=value: solver.scores(batch["user"].cpu().numpy(), v))
    best = max(results, key=results.get) if results else grid[0]
    shallow = solver.served(best, keep)
    facts = {"l2": best, "fit_seconds": time.perf_counter() - t0, "cpu_seconds": compute_seconds() - c0, "kept_per_item": keep, "form": "dual" if solver.dual else "primal",
             "l2_grid": {f"{k:g}": v for k, v in results.items()}}
    return shallow, facts


_FLOPS: dict[str, float] = {}


def float64_flops() -> float:
    """This process's float64 matrix-multiply rate in flops per CPU second (:func:`compute_seconds`,
    every thread counted), measured once per process (~0.1 s)."""
    if "f64" not in _FLOPS:
        a = torch.randn(1024, 1024, dtype=torch.float64)
        a @ a  # warm-up
        t0 = compute_seconds()
        for _ in range(3):
            a @ a
        _FLOPS["f64"] = 3 * 2 * 1024**3 / max(compute_seconds() - t0, 1e-3)
    return _FLOPS["f64"]


def time_budget(cfg: DictConfig, dm) -> tuple[float | None, dict]:
    """The model stage's time budget in CPU seconds (:func:`compute_seconds`; None: none) and how
    it was set.

    ``auto``: below what one dense EASE fit on this data costs on this machine — half of the
    ``items^3`` flops of an (items x items) float64 Cholesky inverse at the measured
    matrix-multiply rate (LAPACK runs slower than a multiply, so a real fit costs more still) —
    but at least ``min_time_budget_s``, so small logs still train the autoencoder properly. The autoencoder
    gets what EASE leaves, halved (the final fit repeats it), and never less than half the floor.
    """
    setting = cfg.model.get("time_budget_s")
    if setting is None:
        return None, {"time_budget_s": None}
    if setting != "auto":  # a number > 0, checked with the other settings (dmp_dl.checks)
        value = float(setting)
        return value, {"time_budget_s": value}
    reference = 0.5 * float(dm.n_items) ** 3 / float64_flops()
    floor = float(cfg.model.get("min_time_budget_s", 40.0))
    return max(reference, floor), {"time_budget_s": max(reference, floor), "ease_reference_seconds": reference,
                                   "min_time_budget_s": floor}


# -- validation ------------------------------------------------------------------------------------
def _ks(cfg: DictConfig) -> list[int]:
    metric = cfg.model.get("selection_metric", "ndcg@20")
    k = int(str(metric).split("@")[1])
    return sorted({10, 20, k})


def _validation_metric(cfg: DictConfig, dm, scorer) -> float:
    metric = cfg.model.get("selection_metric", "ndcg@20")
    return float(evaluate_scorer(scorer, dm.eval_dataset("val"), dm.n_items, _ks(cfg), device="cpu")[metric])


def blend_on_validation(cfg: DictConfig, dm, users: np.ndarray, items: np.ndarray, x: sp.csr_matrix,
                        shallow: ease_lib.ItemItemScorer) -> dict[float, float]:
    """Validation ``selection_metric`` of ``vae + w * ease`` for a grid of w, in one pass over the users.

    The grid is relative to the ratio of the two scores' spreads, so it fits any data. Returns
    w -> metric (w = 0: the autoencoder alone; w = inf: EASE alone).
    """
    metric = cfg.model.get("selection_metric", "ndcg@20")
    ks = _ks(cfg)
    dataset = dm.eval_dataset("val")
    u_vec, i_vec = torch.as_tensor(users), torch.as_tensor(items)
    weights: list[float] | None = None
    accs: dict[float, RankingAccumulator] = {}
    bs = default_batch_size(dm.n_items)
    for start in range(0, len(dataset), bs):
        batch = dataset.__getitems__(list(range(start, min(start + bs, len(dataset)))))
        u = batch["user"].numpy()
        deep = u_vec[u] @ i_vec.T
        shallow_scores = shallow(x[u])
        if weights is None:
            spread = float(shallow_scores.std()) or 1.0
            base = float(deep.std()) / spread
            weights = [0.0, *[base * f for f in BLEND_FACTORS], math.inf]
            accs = {w: RankingAccumulator(dm.n_items, ks) for w in weights}
        for w in weights:
            scores = shallow_scores.clone() if math.isinf(w) else deep + w * shallow_scores
            m, top = batch_metrics(scores, batch, ks)
            accs[w].update(m, top)
    return {w: float(acc.result()[metric]) for w, acc in accs.items()}


# -- the whole choice ------------------------------------------------------------------------------
def _served(name: str, weight: float, shallow: ease_lib.ItemItemScorer | None) -> ServedScore:
    if name == DEEP or shallow is None:
        return ServedScore(1.0, 0.0, None)
    if name == SHALLOW:
        return ServedScore(0.0, 1.0, shallow)
    return ServedScore(1.0, float(weight), shallow)


def _test_metrics(cfg: DictConfig, dm, served: ServedScore, users: np.ndarray, items: np.ndarray) -> dict:
    ks = list(cfg.get("evaluation", {}).get("ks") or (5, 10, 20, 50))
    popularity = torch.as_tensor(dm.item_counts / max(dm.item_counts.sum(), 1), dtype=torch.float32)
    scorer = BlendScorer(served, users, items, dm.train_seen)
    t0 = time.perf_counter()
    out = evaluate_scorer(scorer, dm.eval_dataset("test"), dm.n_items, ks, popularity)
    out["eval_seconds"] = time.perf_counter() - t0
    return out


def choose_model(cfg: DictConfig, dm, loggers: list | None = None) -> ModelChoice:
    """Steps 1-4 of the module docstring on the prepared DataModule ``dm``."""
    model = cfg.model
    wanted = [str(c) for c in model.get("candidates", [DEEP, SHALLOW])]  # settings checked by dmp_dl.checks
    metric = model.get("selection_metric", "ndcg@20")
    has_val = len(dm.val_users) > 0
    x_train = dm.train_seen
    rows_train = dm.interaction_rows("train")
    candidates: dict[str, dict] = {}
    max_epochs = int(model.vae.get("max_epochs", 100))
    budget, budget_facts = time_budget(cfg, dm)
    previous = None
    if cfg.get("init_from"):  # a previous run's bundle or checkpoint: the autoencoder starts from it
        from dmp_dl.warm_start import load_previous

        previous = load_previous(cfg.init_from)

    shallow = None
    if SHALLOW in wanted:
        reason = ease_lib.check_memory(dm.n_users, dm.n_items, float(model.ease.get("max_memory_gb", 4)))
        if reason is not None:
            if wanted == [SHALLOW]:
                raise ConfigError(reason)
            log.warning("EASE candidate skipped: %s", reason)
            candidates[SHALLOW] = {"status": "skipped", "reason": reason}
        else:
            shallow, ease_facts = fit_ease(cfg, dm, x_train) if has_val else fit_ease(cfg, dm, x_train, l2=_default_l2(cfg, x_train))
            candidates[SHALLOW] = {"status": "ok", "reason": None, "fit_seconds": ease_facts["fit_seconds"], "details": ease_facts}

    # 1b. the autoencoder: always fitted, its vectors are the bundle's. Its share of the budget: what
    # EASE left, halved (the final fit on every event repeats it), less one more EASE fit for that refit
    vae_budget = None
    if budget is not None:
        ease_seconds = candidates.get(SHALLOW, {}).get("details", {}).get("cpu_seconds", 0.0)
        floor = float(budget_facts.get("min_time_budget_s", 0.0))  # auto only: a number given is kept
        vae_budget = max((budget - 1.5 * ease_seconds) / 2.0, floor / 2.0, 0.1 * budget)
    net, vae_facts = fit_autoencoder(cfg, dm, rows_train, validate=has_val, max_epochs=max_epochs, loggers=loggers,
                                     time_budget_s=vae_budget, previous=previous)
    users = user_vectors(net, np.arange(dm.n_users), dm.train_history, device=torch.device("cpu"))
    items = item_vectors(net, dm.n_items, device=torch.device("cpu"))
    candidates[DEEP] = {"status": "ok", "reason": None, "fit_seconds": vae_facts["fit_seconds"],
                        "details": {**vae_facts, "time_budget_s": vae_budget}}
    if DEEP not in wanted:
        candidates[DEEP]["status"] = "skipped"
        candidates[DEEP]["reason"] = "not in model.candidates: fitted for the vectors only"

    # 2. validation: the candidates and the blend
    val_scores: dict[str, float] = {}
    blend_weight = 0.0
    if shallow is not None and DEEP in wanted:
        candidates[BLEND] = {"status": "ok", "reason": None, "details": {}}
    if has_val and shallow is not None:
        grid = blend_on_validation(cfg, dm, users, items, x_train, shallow)
        val_scores = {DEEP: grid[0.0], SHALLOW: grid[math.inf]}
        if BLEND in candidates:
            finite = {w: v for w, v in grid.items() if 0 < w < math.inf}
            blend_weight = max(finite, key=finite.get)
            val_scores[BLEND] = finite[blend_weight]
            candidates[BLEND]["details"]["grid"] = {f"{w:.4g}": v for w, v in grid.items()}
    elif has_val:
        val_scores = {DEEP: _validation_metric(cfg, dm, BlendScorer(ServedScore(), users, items, x_train))}
    elif shallow is not None:  # no validation users: blend at the ratio of the two scores' spreads
        blend_weight = _spread_ratio(users, items, x_train, shallow)
    if BLEND in candidates:
        candidates[BLEND]["details"]["weight"] = blend_weight
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

    # 3. test metrics of every candidate and of the baselines (models fitted without the held-out events)
    ranking: dict[str, dict] = {}
    if len(dm.test_users):
        for name in (n for n in (DEEP, SHALLOW, BLEND) if n in candidates and (n == DEEP or candidates[n]["status"] == "ok")):
            candidates[name]["test"] = _test_metrics(cfg, dm, _served(name, blend_weight, shallow), users, items)
        ranking[str(model.get("name", "auto"))] = candidates[chosen]["test"]
        ranking.update(_baselines(cfg, dm, candidates))
    served = _served(chosen, blend_weight, shallow)
    fit_seconds = sum(c.get("fit_seconds", 0.0) for c in candidates.values())
    record = {
        "selected": chosen,
        "selection_metric": metric,
        "served_score": served.describe(),
        "fit_seconds": fit_seconds,
        "budget": budget_facts,
        "candidates": {n: dict(c) for n, c in candidates.items()},
        "best_baseline": _best_baseline(ranking, candidates),
    }
    train = {"epochs": vae_facts.get("epochs"), "fit_seconds": fit_seconds, "selection_fit_seconds": fit_seconds,
             "train_events": int(len(dm.train_idx)), "val": {f"val/{metric}": val_scores.get(chosen)},
             "warm_start": vae_facts.get("warm_start")}
    choice = ModelChoice(net=net, served=served, name=chosen, record=record, ranking=ranking, train=train)
    held_out = len(dm.train_idx) < len(dm.events)
    if bool(model.get("refit", True)) and held_out:
        refit(cfg, dm, choice, dm.interaction_rows("all"), dm.all_seen, loggers, previous)
    else:
        choice.record["refit"] = False
        net.attach_rows(dm.interaction_rows("all"))
    return choice


def refit(cfg: DictConfig, dm, choice: ModelChoice, rows: sp.csr_matrix, seen: sp.csr_matrix,
          loggers: list | None = None, previous=None) -> ModelChoice:
    """Step 4: train ``choice``'s winner again on ``rows`` (interaction strengths) and ``seen``
    (0/1, the EASE input), with the epochs and l2 chosen on validation; updates ``choice`` in place.

    The pipeline passes every event; a benchmark can pass the training and validation events only.
    """
    t0 = time.perf_counter()
    facts: dict[str, Any] = {}
    vae = choice.record["candidates"][DEEP]["details"]
    net, fitted = fit_autoencoder(cfg, dm, rows, validate=False, max_epochs=int(vae.get("epochs", 1)), loggers=loggers,
                                  time_budget_s=vae.get("time_budget_s"), previous=previous)
    facts["vae_seconds"] = fitted["fit_seconds"]
    served = choice.served
    if served.uses_shallow:
        t1 = time.perf_counter()
        shallow, _ = fit_ease(cfg, dm, seen, l2=choice.record["candidates"][SHALLOW]["details"]["l2"])
        facts["ease_seconds"] = time.perf_counter() - t1
        served = ServedScore(served.deep_weight, served.shallow_weight, shallow)
    facts["seconds"] = time.perf_counter() - t0
    net.attach_rows(rows)
    choice.net, choice.served = net, served
    choice.record.update(refit=True, refit_facts=facts)
    choice.train.update(refit_seconds=facts["seconds"], fit_seconds=choice.train["selection_fit_seconds"] + facts["seconds"])
    return choice


def _default_l2(cfg: DictConfig, x: sp.csr_matrix) -> float:
    node = cfg.model.ease
    if node.get("l2") is not None:
        return float(node.l2)
    grid = ease_lib.l2_grid(x, list(node.l2_scales))
    return grid[len(grid) // 2]


def _spread_ratio(users, items, x, shallow) -> float:
    u = np.arange(min(len(users), 256))
    deep = torch.as_tensor(users[u]) @ torch.as_tensor(items).T
    return float(deep.std()) / (float(shallow(x[u]).std()) or 1.0)


def _baselines(cfg: DictConfig, dm, candidates: dict) -> dict[str, dict]:
    """Test metrics of the report's baselines: popularity, and EASE with the l2 chosen above (or
    ``evaluation.ease_l2`` when set)."""
    out: dict[str, dict] = {}
    evaluation = cfg.get("evaluation") or {}
    names = list(evaluation.get("baselines") if evaluation.get("baselines") is not None else ("popularity", "ease"))
    ks = list(evaluation.get("ks") or (5, 10, 20, 50))
    popularity = torch.as_tensor(dm.item_counts / max(dm.item_counts.sum(), 1), dtype=torch.float32)
    if "popularity" in names:
        out["popularity"] = evaluate_scorer(PopularityScorer(dm.item_counts, device="cpu"), dm.eval_dataset("test"),
                                            dm.n_items, ks, popularity)
    l2 = evaluation.get("ease_l2")
    if l2 is None:
        l2 = (candidates.get(SHALLOW, {}).get("details") or {}).get("l2", 500.0)
    if "ease" in names and dm.n_items <= int(evaluation.get("ease_max_items", 20000)):
        from dmp_dl.evaluation.baselines import EASEScorer

        # the same scorer python -m dmp_dl.evaluate uses, so a bundle's report reproduces this one
        out["ease"] = evaluate_scorer(EASEScorer(dm.train_seen, float(l2), device="cpu", precise=False),
                                      dm.eval_dataset("test"), dm.n_items, ks, popularity)
    return out


def _best_baseline(ranking: dict, candidates: dict) -> dict | None:
    base = {n: m for n, m in ranking.items() if n in ("popularity", "ease")}
    if not base:
        return None
    name = max(base, key=lambda n: base[n].get("ndcg@20", -1.0))
    val = candidates.get(SHALLOW, {}).get("val") if name == "ease" else None
    return {"name": name, "test": {k: base[name].get(k) for k in ("ndcg@20", "recall@20")}, "val": val}
