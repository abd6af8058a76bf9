"""Learning whom a contact changes from one measured campaign: ``train_uplift(rec, ids, treated, converted)``.

campaign users -> bundle inputs (:mod:`dmp_dl.campaign.features`) -> users split 60/20/20,
stratified by arm and outcome -> :class:`~dmp_dl.campaign.net.UpliftNet` (Lightning, early
stopping on the validation loss) -> Platt calibration of each arm's head on its validation users
-> on the held-out test users: Qini curves and coefficients of the uplift ranking against the
propensity ranking, random order and a two-model baseline (one logistic regression per arm on the
same inputs), and each arm's calibration (predicted against observed conversion rate).
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import pytorch_lightning as pl
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader

from dmp_dl.campaign.bundle import UpliftScorer
from dmp_dl.campaign.features import UpliftFeatures, uplift_inputs
from dmp_dl.campaign.module import UpliftModule
from dmp_dl.campaign.net import UpliftNet
from dmp_dl.campaign.qini import incremental_at, qini_coefficient, qini_curve
from dmp_dl.core.errors import ConfigError, DataError
from dmp_dl.propensity.calibration import METHODS, Calibrator
from dmp_dl.propensity.train import limited_threads

log = logging.getLogger(__name__)

MIN_PER_CELL = 5  # conversions and non-conversions needed in each arm
TOP_SHARE = 0.3   # depth at which the summary reports the extra conversions found


@dataclass
class UpliftOptions:
    """``uplift.*`` of ``conf/audience_cli.yaml``."""

    hidden: list[int] = field(default_factory=lambda: [64, 32])
    dropout: float = 0.1
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 256
    max_epochs: int = 100
    patience: int = 10
    val_frac: float = 0.2
    test_frac: float = 0.2
    calibration: str = "platt"
    seed: int = 0
    num_threads: int | None = 1

    def __post_init__(self) -> None:
        if not (0 < self.val_frac < 1 and 0 < self.test_frac < 1 and self.val_frac + self.test_frac < 1):
            raise ConfigError(f"uplift.val_frac and uplift.test_frac must be in (0, 1) with a sum below 1, got "
                              f"{self.val_frac}, {self.test_frac}")
        if self.calibration not in METHODS:
            raise ConfigError(f"uplift.calibration must be one of {METHODS}, got {self.calibration!r}")
        for key in ("batch_size", "max_epochs", "patience"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"uplift.{key} must be a whole number >= 1, got {value!r}")
        if not self.hidden or any(int(h) < 1 for h in self.hidden):
            raise ConfigError(f"uplift.hidden must be a list of layer widths >= 1, got {self.hidden!r}")


@dataclass
class UpliftResult:
    """The trained scorer, the held-out evaluation (``summary``) and the Qini curves of the test
    users (``curves``: ranking name -> (share targeted, Q))."""

    scorer: UpliftScorer
    summary: dict
    curves: dict[str, tuple[np.ndarray, np.ndarray]]
    deciles: list[dict]


def _split(treated: np.ndarray, converted: np.ndarray, o: UpliftOptions):
    """Positions of train / validation / test users, stratified by arm x outcome."""
    strata = treated.astype(np.int64) * 2 + converted.astype(np.int64)
    pos = np.arange(len(strata))
    rest, test = train_test_split(pos, test_size=o.test_frac, stratify=strata, random_state=o.seed)
    train, val = train_test_split(rest, test_size=o.val_frac / (1 - o.test_frac), stratify=strata[rest], random_state=o.seed)
    return np.sort(train), np.sort(val), np.sort(test)


def _loader(x, t, y, batch_size: int, shuffle: bool) -> DataLoader:
    data = [{"x": torch.from_numpy(x[i]), "treated": torch.tensor(int(t[i])), "y": torch.tensor(float(y[i]))}
            for i in range(len(y))]
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle)


def _calibration(p: np.ndarray, y: np.ndarray) -> dict:
    return {"users": int(len(y)), "predicted_rate": float(p.mean()) if len(p) else None,
            "observed_rate": float(y.mean()) if len(y) else None}


def uplift_by_decile(score: np.ndarray, treated: np.ndarray, converted: np.ndarray, bins: int = 10) -> list[dict]:
    """Observed conversion rates of treated and control users per score decile (1 = highest score)."""
    order = np.lexsort((np.arange(len(score)), -score))
    decile = np.empty(len(score), np.int64)
    decile[order] = np.arange(len(score)) * bins // max(len(score), 1) + 1
    out = []
    for d in range(1, bins + 1):
        m = decile == d
        t, c = m & treated, m & ~treated
        rt = float(converted[t].mean()) if t.any() else None
        rc = float(converted[c].mean()) if c.any() else None
        out.append({"decile": d, "users": int(m.sum()), "mean_score": float(score[m].mean()) if m.any() else None,
                    "rate_treatment": rt, "rate_control": rc,
                    "observed_uplift": None if rt is None or rc is None else rt - rc})
    return out


def train_uplift(rec, user_ids, treated: np.ndarray, converted: np.ndarray, options: UpliftOptions | None = None,
                 campaign: dict | None = None) -> UpliftResult:
    """Train and evaluate an uplift model of ``rec``'s users (see the module docstring).

    user_ids: (n,) the campaign's users (ids of ``rec``'s vocabulary); treated, converted: (n,) bool.
    campaign: JSON-safe facts stored with the model (files, window, conversion event).
    """
    o = options or UpliftOptions()
    with limited_threads(o.num_threads):
        return _train(rec, np.asarray(user_ids, dtype=object), np.asarray(treated, bool), np.asarray(converted, bool), o,
                      dict(campaign or {}))


def _train(rec, user_ids, treated, converted, o: UpliftOptions, campaign: dict) -> UpliftResult:
    t0 = time.perf_counter()
    rows = rec.user_rows(list(user_ids), strict=False)
    unknown = np.flatnonzero(rows < 0)
    if len(unknown):
        raise DataError(f"assignments: {len(unknown)} of {len(rows)} users are not in the bundle (first: "
                        f"{user_ids[unknown[0]]!r}); train the uplift model on the bundle the campaign was targeted from")
    cells = {(arm, y): int(((treated == (arm == "treatment")) & (converted == y)).sum())
             for arm in ("treatment", "control") for y in (True, False)}
    thin = {k: v for k, v in cells.items() if v < MIN_PER_CELL}
    if thin:
        (arm, y), n = next(iter(thin.items()))
        raise DataError(f"the {arm} group has {n} users who {'converted' if y else 'did not convert'}; an uplift model needs "
                        f"at least {MIN_PER_CELL} of each in both groups: measure a larger campaign (or hold out more users)")
    spec = UpliftFeatures.of(rec)
    x = uplift_inputs(rec, rows, spec)
    train, val, test = _split(treated, converted, o)

    torch.manual_seed(o.seed)
    net = UpliftNet(spec.width, o.hidden, o.dropout)
    net.fit_normalization(torch.from_numpy(x[train]))
    n_arm = np.bincount(treated[train].astype(np.int64), minlength=2).astype(np.float64)
    module = UpliftModule(net, o.lr, o.weight_decay, tuple(len(train) / (2 * np.maximum(n_arm, 1))))
    trainer = pl.Trainer(max_epochs=o.max_epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, deterministic=True,
                         callbacks=[pl.callbacks.EarlyStopping("val/loss", patience=o.patience, mode="min")])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
        trainer.fit(module, _loader(x[train], treated[train], converted[train], o.batch_size, True),
                    _loader(x[val], treated[val], converted[val], 4096, False))
    module.restore_best()
    scorer = UpliftScorer(net, Calibrator("none"), Calibrator("none"), spec)
    z_val = scorer.logits(x[val])
    tv, yv = treated[val], converted[val]
    scorer.control = Calibrator.fit(o.calibration, z_val[~tv, 0], yv[~tv])
    scorer.treated = Calibrator.fit(o.calibration, z_val[tv, 1], yv[tv])

    # held-out evaluation
    tt, yt = treated[test], converted[test]
    p_c, p_t = scorer.probabilities(x[test])
    rankings = {"uplift_model": p_t - p_c}
    two_model = []
    for arm in (False, True):
        idx = train[treated[train] == arm]
        lr = LogisticRegression(C=1.0, max_iter=2000).fit(_standardise(x[idx], x[train]), converted[idx])
        two_model.append(lr.predict_proba(_standardise(x[test], x[train]))[:, 1])
    rankings["two_model_logistic"] = two_model[1] - two_model[0]
    if rec.has_propensity:
        rankings["propensity"] = rec.propensity_rows(rows[test])
    rng = np.random.default_rng(o.seed)
    rankings["random"] = rng.random(len(test))
    curves = {name: qini_curve(s, tt, yt) for name, s in rankings.items()}
    overall = float(yt[tt].mean() - yt[~tt].mean())
    metrics = {
        name: {"qini": qini_coefficient(s, tt, yt), f"incremental_conversions@{int(TOP_SHARE * 100)}%": incremental_at(s, tt, yt, TOP_SHARE)}
        for name, s in rankings.items()
    }
    summary = {
        "users": {"train": len(train), "val": len(val), "test": len(test),
                  "treatment": int(treated.sum()), "control": int((~treated).sum())},
        "features": {"inputs": spec.to_dict(), "width": spec.width},
        "training": {"epochs": int(trainer.current_epoch), "best_epoch": module.best_epoch,
                     "best_val_loss": module.best_loss, "seconds": time.perf_counter() - t0},
        "test": {"observed_lift": overall, "incremental_conversions": overall * int(tt.sum()),
                 "qini": metrics, "top_share": TOP_SHARE,
                 "calibration": {"control": _calibration(p_c[~tt], yt[~tt]), "treatment": _calibration(p_t[tt], yt[tt])}},
    }
    deciles = uplift_by_decile(rankings["uplift_model"], tt, yt)
    scorer.info = {"campaign": campaign, "metrics": {k: v["qini"] for k, v in metrics.items()},
                   "trained_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                   "training": summary["training"]}
    log.info("uplift model: %d campaign users (%d treated, %d control); held-out Qini %.4f (propensity %s, random %.4f)",
             len(rows), int(treated.sum()), int((~treated).sum()), metrics["uplift_model"]["qini"],
             f"{metrics['propensity']['qini']:.4f}" if "propensity" in metrics else "n/a", metrics["random"]["qini"])
    return UpliftResult(scorer, summary, curves, deciles)


def _standardise(x: np.ndarray, reference: np.ndarray) -> np.ndarray:
    return (x - reference.mean(0)) / np.maximum(reference.std(0), 1e-6)

