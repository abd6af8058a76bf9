"""The propensity step of the training pipeline as one function: ``train_propensity(cfg, dm, net)``.

labels at a cutoff T -> features from events <= T -> user split (train / validation / test) ->
network (Lightning, early stopping on validation AUC) + logistic regression + gradient-boosted
trees on the same features -> calibration on validation users -> test metrics -> the scores of
every known user as of the end of the data.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split
from threadpoolctl import threadpool_limits

from dmp_dl.core.errors import ConfigError, InsufficientDataError
from dmp_dl.core.json_values import json_safe
from dmp_dl.data.schema import TIME, TYPE
from dmp_dl.metrics.classification import NEAR_CHANCE_ROC_AUC, binary_metrics, gains_table
from dmp_dl.propensity.baselines import baseline_logits, fit_baseline, fit_design, fit_sample
from dmp_dl.propensity.bundle import encoder_entry
from dmp_dl.propensity.calibration import Calibrator
from dmp_dl.propensity.features import BehaviourSpec, Snapshot, UserFeatures
from dmp_dl.propensity.labels import (
    SECONDS_PER_DAY,
    PropensityTask,
    crm_labels,
    resolve_cutoff,
    resolve_target,
    window_labels,
)
from dmp_dl.propensity.module import LabelledUsers, loader, snapshot_tensors
from dmp_dl.propensity.scorer import PropensityScorer
from dmp_dl.propensity.tabular import TabularModel
from dmp_dl.training.fitters import fitter_of

log = logging.getLogger(__name__)

EMBEDDING_MODES = ("off", "frozen", "finetune")
DEEP_MODEL = "mlp"
MIN_PER_CLASS = 10


@dataclass
class PropensityResult:
    """What the propensity step produced (``pipeline.run(cfg)["propensity"]``).

    metrics: model name -> test-split metrics of its calibrated probabilities. Models: ``mlp``
        (the network), ``logistic_regression``, ``gbm`` (as configured under
        ``propensity.baselines``). Each: ``roc_auc``, ``pr_auc``, ``log_loss``, ``brier``, ``ece``,
        ``lift@10``, ``ece_uncalibrated`` (before calibration), ``n``, ``base_rate``.
    test_labels: (n_test,) int8, 1 = converted, for the test users ``test_users`` (n_test,) int64
        (user vocabulary indices).
    test_predictions: model name -> (n_test,) float64 calibrated probabilities, aligned with
        ``test_labels``; same keys as ``metrics``.
    gains: model name -> the cumulative-gains table of the test split (rows of ``targeted``,
        ``users``, ``positives``, ``gain``, ``lift``; see :func:`~dmp_dl.metrics.classification.gains_table`).
    task: the labelled task (cutoff, horizon, target, eligible users and labels).
    split: ``{"train": n, "val": n, "test": n}`` users.
    scorer: the served model (the best on the validation users, ``served``);
        ``scorer.known_scores`` (n_users,) are the probabilities of every known user as of the end
        of the data.
    calibrators: model name -> the fitted :class:`Calibrator`.
    training: epochs, best validation AUC, pos_weight, embedding mode, seconds per stage.
    served: the name of the served model; selection: how it was chosen (validation ROC-AUC of
        each model, and the models that cannot be served).
    """

    metrics: dict[str, dict]
    test_labels: np.ndarray
    test_predictions: dict[str, np.ndarray]
    test_users: np.ndarray
    gains: dict[str, list[dict]]
    task: PropensityTask
    split: dict[str, int]
    scorer: PropensityScorer
    calibrators: dict[str, Calibrator] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    served: str = DEEP_MODEL
    selection: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict:
        """JSON-safe (NaN -> None) summary for ``metrics.json``: task, split, served model and how it
        was selected, metrics, gains, training."""
        return json_safe({
            "task": self.task.summary(),
            "split": self.split,
            "served": self.served,
            "selection": self.selection,
            "metrics": self.metrics,
            "gains": self.gains,
            "calibration": {k: c.method for k, c in self.calibrators.items()},
            "training": self.training,
        })


# -- the task -----------------------------------------------------------------------------------
def build_task(p: DictConfig, dm) -> PropensityTask:
    """Eligible users and labels as configured (event window or CRM column).

    Raises :class:`InsufficientDataError` when the data cannot give labels: no event times (for
    event-window labels), a time span no longer than the horizon, or fewer than ``MIN_PER_CLASS``
    positives or negatives.
    """
    events = dm.events
    if not p.get("label_column") and not getattr(dm, "has_timestamps", True):
        raise InsufficientDataError(
            "propensity: the log has no event times, so there is no period after a cutoff to take labels from; "
            "give 0/1 labels in a user-table column with propensity.label_column, or set propensity.enabled=false")
    ts = events[TIME].to_numpy()
    if p.get("label_column"):
        users, labels = crm_labels(dm.log_.users, str(p.label_column), dm.user_vocab)
        task = PropensityTask(users, labels, int(ts.max()), None, None, None, f"crm:{p.label_column}")
    else:
        target = resolve_target(p.get("target_event"), events[TYPE].unique())
        cutoff = resolve_cutoff(ts, float(p.horizon_days), p.get("cutoff"), p.get("cutoff_quantile"))
        users, labels = window_labels(events["user_idx"].to_numpy(), ts, events[TYPE], dm.n_users,
                                      cutoff, float(p.horizon_days), target)
        task = PropensityTask(users, labels, cutoff, float(p.horizon_days), p.get("target_event"), target, "events")
    pos = int(task.labels.sum())
    neg = len(task.labels) - pos
    if min(pos, neg) < MIN_PER_CLASS:
        s = task.summary()
        what = (f"column {p.label_column!r}" if p.get("label_column")
                else f"target {s['target_resolved']!r} in the {s['horizon_days']:g} days after {s['cutoff_iso']}")
        raise InsufficientDataError(
            f"propensity: {pos} of {len(task.labels)} eligible users are positive ({what}); at least "
            f"{MIN_PER_CLASS} positives and {MIN_PER_CLASS} negatives are needed. Change propensity.horizon_days, "
            "propensity.cutoff or propensity.target_event, or set propensity.enabled=false"
        )
    return task


def split_users(labels: np.ndarray, val_frac: float, test_frac: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positions (into ``labels``) of train / validation / test users, stratified by label."""
    if not (0 < val_frac < 1 and 0 < test_frac < 1 and val_frac + test_frac < 1):
        raise ConfigError(f"propensity.split.val_frac and test_frac must be in (0, 1) with a sum below 1, got {val_frac}, {test_frac}")
    pos = np.arange(len(labels))
    rest, test = train_test_split(pos, test_size=test_frac, stratify=labels, random_state=seed)
    train, val = train_test_split(rest, test_size=val_frac / (1 - test_frac), stratify=labels[rest], random_state=seed)
    return np.sort(train), np.sort(val), np.sort(test)


# -- the embedding feature -------------------------------------------------------------------------
def encoder_for(mode: str, cfg: DictConfig, net: torch.nn.Module | None,
                network_kwargs: dict | None = None) -> tuple[torch.nn.Module | None, dict | None]:
    """A CPU copy of the embedding network and how to rebuild it, or (None, None) when off.
    network_kwargs: the network's constructor settings when the model stage says which (the
    automatic choice serves the sequence candidate's network); default: the config's model."""
    if mode not in EMBEDDING_MODES:
        raise ConfigError(f"propensity.features.embedding must be one of {EMBEDDING_MODES}, got {mode!r}")
    if mode == "off":
        return None, None

    if net is None or encoder_entry(net) is None:
        log.warning("propensity: no exportable embedding network (%s): the embedding feature is off",
                    type(net).__name__ if net is not None else "none")
        return None, None
    kwargs = network_kwargs
    if kwargs is None:
        kwargs = fitter_of(cfg).network_kwargs(cfg) if cfg.get("model") is not None else {}
    spec = {"class": type(net).__name__, "kwargs": kwargs, "n_users": int(net.n_users), "n_items": int(net.n_items)}
    return copy.deepcopy(net).cpu().eval(), spec


# -- training -----------------------------------------------------------------------------------
def _resolve_pos_weight(value: Any, labels: np.ndarray) -> float:
    if value in (None, "none"):
        return 1.0
    if value == "auto":
        pos = max(int(labels.sum()), 1)
        return float((len(labels) - pos) / pos)
    try:
        w = float(value)
    except (TypeError, ValueError):
        w = float("nan")
    if not math.isfinite(w) or w <= 0:
        raise ConfigError(f"propensity.pos_weight must be auto, none or a positive number, got {value!r}")
    return w


@contextlib.contextmanager
def limited_threads(n: int | None):
    """Run with ``n`` torch and BLAS/OpenMP threads (None: unchanged). The propensity models are
    small: a second thread saves little and, on a busy machine, costs many times that in waiting."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(max(int(n), 1))
    try:
        with threadpool_limits(limits=max(int(n), 1)):
            yield
    finally:
        torch.set_num_threads(before)


FROZEN_VECTOR_ROWS = 8192  # users a forward pass: the encoder's activations of every user at once took
# over 4 GB at 1.1M training examples of a 2M-user log


@torch.no_grad()
def _frozen_vectors(net, snap: Snapshot, rows: int | None = None) -> np.ndarray | None:
    """(N, dim) float32 user vectors of the frozen encoder for ``snap``'s users, ``rows`` at a time
    (default :data:`FROZEN_VECTOR_ROWS`)."""
    if net.encoder is None:
        return None
    rows = int(rows or FROZEN_VECTOR_ROWS)
    t = snapshot_tensors(snap)

    def vectors(s: int) -> np.ndarray:
        return net.user_vectors(t["history"][s:s + rows], t["enc_tokens"][s:s + rows], t["enc_numeric"][s:s + rows]).numpy()

    first = vectors(0)  # (0, dim) for no users
    out = np.empty((len(snap), first.shape[1]), dtype=first.dtype)  # filled in place: no parts beside a concatenation
    out[: len(first)] = first
    for s in range(rows, len(snap), rows):
        out[s:s + rows] = vectors(s)
    return out


def train_propensity(cfg: DictConfig, dm, net: torch.nn.Module | None = None,
                     network_kwargs: dict | None = None) -> PropensityResult:
    """Train, calibrate and evaluate the propensity model configured under ``cfg.propensity``.

    dm: the prepared :class:`~dmp_dl.data.datamodule.InteractionDataModule`.
    net: the trained embedding network (for the user-embedding feature; copied, never changed).
    network_kwargs: its constructor settings (default: the config's model's).
    """
    with stage_threads(cfg.propensity, dm.n_users):
        return _train(cfg, dm, net, network_kwargs)


def stage_threads(p: DictConfig, n_users: int):
    """The thread limit ``propensity.num_threads`` sets for a log of ``n_users`` users (a context manager)."""
    return limited_threads(threads_for(p.get("num_threads", "auto"), n_users))


AUTO_STEPS_PER_EPOCH = 200  # batch_size auto: about this many steps per epoch on large logs
AUTO_BATCH_RANGE = (256, 4096)
AUTO_ONE_THREAD_BELOW_USERS = 20_000  # num_threads auto: one thread below this many users, all above


def batch_size_for(setting: Any, n_examples: int) -> int:
    """Training batch size: a number as given; ``auto`` = the power of two that makes about
    :data:`AUTO_STEPS_PER_EPOCH` steps per epoch, within :data:`AUTO_BATCH_RANGE` (256 on small logs,
    so a few thousand users train as before; larger logs take larger batches, not more steps)."""
    if setting != "auto":
        return int(setting)
    lo, hi = AUTO_BATCH_RANGE
    wanted = max(n_examples / AUTO_STEPS_PER_EPOCH, 1.0)
    return int(min(max(2 ** math.ceil(math.log2(wanted)), lo), hi))


def threads_for(setting: Any, n_users: int) -> int | None:
    """Torch/BLAS threads for the stage: a number as given, None unchanged; ``auto`` = 1 below
    :data:`AUTO_ONE_THREAD_BELOW_USERS` users (small models: a second thread saves little and costs
    waiting on a busy machine), unchanged above (large batches use every core)."""
    if setting != "auto":
        return None if setting is None else int(setting)
    return 1 if n_users < AUTO_ONE_THREAD_BELOW_USERS else None


def training_examples(p: DictConfig, dm, features: UserFeatures, task: PropensityTask, train_users: np.ndarray,
                      at_cutoff: Snapshot, labels: np.ndarray) -> tuple[Snapshot, np.ndarray, list[int]]:
    """The training users at T and, with ``propensity.train_snapshots = K > 1``, the same users at
    the earlier cutoffs T - H, ..., T - (K - 1) H (each with the users eligible then, features from
    events up to it and labels from its own window, which ends by T: nothing after T is read).
    An earlier cutoff is added only while the examples so far are fewer than
    ``propensity.enough_train_examples`` (null: no limit): the earlier windows make up for a small
    log's few positives, and on a large one they multiply the stage's time for no gain.

    Returns (snapshot, labels, cutoffs used).
    """
    parts, ys, cutoffs = [at_cutoff], [labels], [task.cutoff]
    if task.horizon_days is None:
        return at_cutoff, labels, cutoffs
    ev = dm.events
    horizon = task.horizon_days * SECONDS_PER_DAY
    enough = p.get("enough_train_examples")
    for k in range(1, int(p.get("train_snapshots", 1))):
        examples = sum(len(y) for y in ys)
        if enough is not None and examples >= int(enough):
            log.info("propensity: %d training examples from %d snapshot(s), at least propensity.enough_train_examples="
                     "%d: no earlier snapshot added", examples, len(ys), int(enough))
            break
        cutoff = int(task.cutoff - k * horizon)
        users, y = window_labels(ev["user_idx"].to_numpy(), ev[TIME].to_numpy(), ev[TYPE], dm.n_users,
                                 cutoff, task.horizon_days, task.target_resolved)
        keep = np.isin(users, train_users)
        if keep.sum() == 0 or len(np.unique(y[keep])) < 2:
            break
        parts.append(features.known(ev, users[keep], cutoff))
        ys.append(y[keep])
        cutoffs.append(cutoff)
    return Snapshot.concat(parts), np.concatenate(ys), cutoffs


def _train(cfg: DictConfig, dm, net: torch.nn.Module | None, network_kwargs: dict | None = None) -> PropensityResult:
    p = cfg.propensity
    seed = int(cfg.get("seed", 0))
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    events = dm.events
    mode = str(p.features.get("embedding", "frozen"))
    encoder, encoder_spec = encoder_for(mode, cfg, net, network_kwargs)
    frozen_encoder = copy.deepcopy(encoder) if mode == "finetune" and encoder is not None else None
    behaviour = BehaviourSpec(sorted(str(t) for t in events[TYPE].unique()),
                              [float(h) for h in p.features.decay_half_lives_days])
    features = UserFeatures.build(dm, behaviour, bool(p.features.attributes), encoder is not None, p.get("label_column"))
    task = build_task(p, dm)
    train_pos, val_pos, test_pos = split_users(task.labels, float(p.split.val_frac), float(p.split.test_frac),
                                               int(p.split.get("seed", seed)))
    snap = features.known(events, task.users, task.cutoff)
    y = task.labels
    sets = {"val": (snap.take(val_pos), y[val_pos]), "test": (snap.take(test_pos), y[test_pos])}
    train_snap, y_train, cutoffs = training_examples(p, dm, features, task, task.users[train_pos],
                                                     snap.take(train_pos), y[train_pos])
    sets["train"] = (train_snap, y_train)
    timings["features_seconds"] = time.perf_counter() - t0

    # The network.
    t1 = time.perf_counter()
    torch.manual_seed(seed)
    deep = instantiate(p.net, _convert_="all")(
        n_behaviour=snap.behaviour.shape[1], n_tokens=features.attributes.n_tokens,
        n_attr_numeric=snap.attr_numeric.shape[1], encoder=encoder, encoder_trainable=(mode == "finetune"),
    )
    vectors = {name: _frozen_vectors(deep, s) for name, (s, _) in sets.items()}
    deep.fit_normalization(torch.from_numpy(train_snap.behaviour),
                           None if vectors["train"] is None else torch.from_numpy(vectors["train"]))
    pos_weight = _resolve_pos_weight(p.get("pos_weight", "auto"), y_train)
    module = instantiate(p.module, _convert_="all")(net=deep, pos_weight=pos_weight)
    callbacks = [instantiate(p.early_stopping, _convert_="all")] if p.get("early_stopping") else []
    trainer = instantiate(p.trainer, callbacks=callbacks, _convert_="all")
    # a frozen encoder gives each user one vector: computed once above, not at every step of every epoch
    frozen = mode != "finetune"
    batch_size = batch_size_for(p.get("batch_size", "auto"), len(y_train))
    train_data = LabelledUsers(train_snap, y_train, vectors["train"] if frozen else None)
    val_data = LabelledUsers(*sets["val"], vectors["val"] if frozen else None)
    with warnings.catch_warnings():  # the embedding network stays in eval mode on purpose (PropensityNet.train)
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
        trainer.fit(module, loader(train_data, batch_size, shuffle=True), loader(val_data, len(val_data), shuffle=False))
    module.restore_best()
    timings["train_seconds"] = time.perf_counter() - t1

    # Raw scores of every model on validation and test users, then calibration on validation.
    t2 = time.perf_counter()
    method = str(p.get("calibration", "platt"))
    scorer = PropensityScorer(deep, Calibrator(method), features, np.zeros(0), int(events[TIME].max()),
                              dm.item_vocab if encoder is not None else None)
    logits: dict[str, dict[str, np.ndarray]] = {"val": {DEEP_MODEL: scorer.logits(sets["val"][0])},
                                                "test": {DEEP_MODEL: scorer.logits(sets["test"][0])}}
    y_val, y_test = sets["val"][1], sets["test"][1]
    n_tokens = features.attributes.n_tokens
    # the baselines fit on at most propensity.baseline_max_examples users (a seeded sample of a large
    # log: a dense design matrix of every example was the stage's peak) and score every user in blocks
    at_most = p.get("baseline_max_examples")
    fit_rows = {name: fit_sample(len(sets[name][1]), at_most, seed) for name in ("train", "val")}
    x_fit = {name: fit_design(sets[name][0], n_tokens, vectors[name], rows) for name, rows in fit_rows.items()}
    tabular: dict[str, TabularModel | None] = {}
    for name, node in (p.get("baselines") or {}).items():
        tb = time.perf_counter()
        model = fit_baseline(instantiate(node, _convert_="all"), x_fit["train"], y_train[fit_rows["train"]],
                             x_fit["val"], y_val[fit_rows["val"]])
        tabular[name] = TabularModel.from_sklearn(model)  # scored as the bundle would serve it
        for split in ("val", "test"):
            logits[split][name] = baseline_logits(model, tabular[name], sets[split][0], n_tokens, vectors[split])
        timings[f"{name}_seconds"] = time.perf_counter() - tb
    del x_fit
    calibrators = {name: Calibrator.fit(method, z, y_val) for name, z in logits["val"].items()}
    served, selection = select_served(logits["val"], y_val, tabular, str(p.get("serve", "best")))
    scorer.calibrator = calibrators[served]
    if served != DEEP_MODEL:
        scorer.tabular, scorer.served = tabular[served], served
        if frozen_encoder is not None:  # the fine-tuned encoder moved: the baselines read the original vectors
            scorer.net = instantiate(p.net, _convert_="all")(
                n_behaviour=snap.behaviour.shape[1], n_tokens=features.attributes.n_tokens,
                n_attr_numeric=snap.attr_numeric.shape[1], encoder=frozen_encoder, encoder_trainable=False).eval()
    ece_bins = int(p.get("ece_bins", 10))
    predictions, metrics, gains = {}, {}, {}
    for name, z in logits["test"].items():
        predictions[name] = calibrators[name](z)
        metrics[name] = binary_metrics(y_test, predictions[name], ece_bins)
        metrics[name]["ece_uncalibrated"] = binary_metrics(y_test, Calibrator("none")(z), ece_bins)["ece"]
        gains[name] = gains_table(y_test, predictions[name])
    timings["evaluate_seconds"] = time.perf_counter() - t2

    # Every known user as of the end of the data: the question serving answers.
    t3 = time.perf_counter()
    scorer.known_scores = scorer.score_snapshot(features.known(events, np.arange(dm.n_users), scorer.data_end))
    timings["score_known_seconds"] = time.perf_counter() - t3
    timings["total_seconds"] = time.perf_counter() - t0

    training = {
        "embedding": mode if encoder is not None else "off",
        "epochs": int(trainer.current_epoch),
        "best_epoch": module.best_epoch,
        "best_val_auc": module.best_auc,
        "pos_weight": pos_weight,
        "train_examples": int(len(y_train)),
        "baseline_train_examples": int(len(fit_rows["train"])),
        "batch_size": batch_size,
        "train_cutoffs": cutoffs,
        "n_features": {"behaviour": int(snap.behaviour.shape[1]), "attribute_tokens": features.attributes.n_tokens - 1,
                       "attribute_numeric": int(snap.attr_numeric.shape[1]),
                       "embedding": 0 if vectors["train"] is None else int(vectors["train"].shape[1])},
        **timings,
    }
    scorer.info = {"task": task.summary(), "encoder": encoder_spec, "training": json_safe(training)}
    result = PropensityResult(
        metrics=metrics, test_labels=y_test.astype(np.int8), test_predictions=predictions,
        test_users=task.users[test_pos], gains=gains, task=task,
        split={"train": len(train_pos), "val": len(val_pos), "test": len(test_pos)},
        scorer=scorer, calibrators=calibrators, training=training, served=served, selection=selection,
    )
    log.info("propensity (%s, %d test users, base rate %.3f), serving %s (best validation ROC-AUC):",
             task.summary()["target_resolved"] or task.label_source, len(test_pos), float(y_test.mean()), served)
    for name, m in metrics.items():
        log.info("  %-20s roc_auc=%.4f pr_auc=%.4f log_loss=%.4f brier=%.4f ece=%.4f lift@10=%.2f", name,
                 m["roc_auc"], m["pr_auc"], m["log_loss"], m["brier"], m["ece"], m["lift@10"])
    auc = metrics[served]["roc_auc"]
    if math.isfinite(auc) and auc < NEAR_CHANCE_ROC_AUC:
        log.warning("propensity: the served model (%s, the best trained) has test ROC-AUC %.3f < %g: barely better "
                    "than chance on this data", served, auc, NEAR_CHANCE_ROC_AUC)
    return result


def select_served(val_logits: dict[str, np.ndarray], y_val: np.ndarray, tabular: dict[str, TabularModel | None],
                  serve: str = "best") -> tuple[str, dict[str, Any]]:
    """The model to serve (``propensity.serve``): with ``best``, the highest validation ROC-AUC among
    the network and the baselines that can be stored as arrays (:class:`TabularModel`), a tie going
    to the one trained first (the network); else the model named. Returns (name, the selection
    record for metrics.json and the manifest)."""
    auc = {name: float(roc_auc_score(y_val, z)) if len(np.unique(y_val)) == 2 else float("nan")
           for name, z in val_logits.items()}
    servable = [name for name in val_logits if name == DEEP_MODEL or tabular.get(name) is not None]
    if serve == "best":
        ranked = sorted(servable, key=lambda n: -auc[n] if math.isfinite(auc[n]) else math.inf)
        served = ranked[0] if ranked else DEEP_MODEL
    elif serve in servable:
        served = serve
    else:
        raise ConfigError(f"propensity.serve must be best or one of the servable models {servable}, got {serve!r}")
    return served, {"metric": "validation roc_auc", "rule": serve, "val_roc_auc": auc, "served": served,
                    "not_servable": [n for n in val_logits if n not in servable]}
