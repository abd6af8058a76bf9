"""The whole training job as one plain function: ``run(cfg)``.

events -> clean + vocab + split (InteractionDataModule) -> embedding model (Lightning) ->
full-ranking evaluation against baselines -> exported vectors.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from dmp_dl.data.datamodule import InteractionDataModule
from dmp_dl.evaluation.heldout import HeldOutSplit, evaluate_model_and_baselines
from dmp_dl.io import atomic_write_text
from dmp_dl.privacy.training import PrivacyHooks
from dmp_dl.training import build_trainer, config_to_dict, load_best_weights, resolve_ckpt_path

log = logging.getLogger(__name__)


def load_data(cfg: DictConfig) -> InteractionDataModule:
    """The prepared DataModule for ``cfg.data``."""
    return instantiate(cfg.data, _convert_="all").prepare()


def evaluate_ranking(cfg: DictConfig, dm: InteractionDataModule, net: torch.nn.Module, model_name: str) -> dict[str, dict]:
    """Test-split metrics of the trained model and the configured baselines, same protocol."""
    return evaluate_model_and_baselines(net, model_name, HeldOutSplit.from_datamodule(dm), cfg.get("evaluation", {}))


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train, evaluate and export as configured. Returns metrics and the objects built.

    Everything is written under ``cfg.paths.output_dir``.
    """
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(cfg.seed, workers=True)

    t0 = time.perf_counter()
    dm = load_data(cfg)
    dm.report.write_json(out / "data_quality.json")
    log.info(dm.report.summary())

    privacy = PrivacyHooks.from_config(cfg)
    module, fit_data = privacy.build_module(cfg, dm)  # user-level DP-SGD when privacy.dp.enabled
    trainer = build_trainer(cfg, has_validation=len(dm.val_users) > 0)
    t_fit = time.perf_counter()
    trainer.fit(module, **fit_data, ckpt_path=resolve_ckpt_path(cfg.get("ckpt_path"), out))
    fit_seconds = time.perf_counter() - t_fit
    result: dict[str, Any] = {"datamodule": dm, "module": module, "trainer": trainer}
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # DDP: the rest of the job (evaluation, propensity, export) runs on rank 0 alone.
        torch.distributed.destroy_process_group()
    if trainer.global_rank != 0:
        return result
    best = load_best_weights(module, trainer)
    n_train = len(dm.train_idx)
    epochs = max(trainer.current_epoch, 1)
    metrics: dict[str, Any] = {
        "train": {
            "best_checkpoint": best,
            "epochs": trainer.current_epoch,
            "fit_seconds": fit_seconds,
            "train_events": n_train,
            "examples_per_second": n_train * epochs / fit_seconds if fit_seconds > 0 else None,
            "val": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")},
            "privacy": privacy.summary(trainer.global_step),
        },
        "ranking": evaluate_ranking(cfg, dm, module.net, cfg.model.get("name", "model")),
    }
    if cfg.get("propensity") is not None and cfg.propensity.get("enabled", False):
        from dmp_dl.propensity import train_propensity

        result["propensity"] = train_propensity(cfg, dm, module.net)
        metrics["propensity"] = result["propensity"].summary()
    if cfg.get("audience") is not None and cfg.audience.get("enabled", False):
        from dmp_dl.audience.build import build_audience

        result["audience"] = build_audience(cfg.audience, dm, module.net, result.get("propensity"))
        metrics["audience"] = result["audience"].summary()
        result["bundle_parts"] = {**result.get("bundle_parts", {}), **result["audience"].bundle_parts()}
    metrics["total_seconds"] = time.perf_counter() - t0
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2, default=str))
    for name, m in metrics["ranking"].items():
        log.info("test %-12s recall@20=%.4f ndcg@20=%.4f", name, m.get("recall@20", float("nan")), m.get("ndcg@20", float("nan")))
    result["metrics"] = metrics
    if cfg.get("export", True):
        from dmp_dl.bundle import export_run

        result["bundle_parts"] = {**result.get("bundle_parts", {}), **privacy.bundle_parts()}
        result["bundle_dir"] = export_run(cfg, result, out / "artifacts")
        log.info("bundle written to %s", result["bundle_dir"])
    report = cfg.get("evaluation", {}).get("report")
    if report is not None:  # report.json / .md / .html from what the run produced
        result["report"] = instantiate(report)(
            out, config=config_to_dict(cfg), data_quality=dm.report.to_dict(), ranking=metrics["ranking"],
            model_name=cfg.model.get("name", "model"), train=metrics["train"], propensity=result.get("propensity"),
            segments=result["audience"].segment_inputs() if "audience" in result else None,
        )
    return result
