"""The model stage of each fitter (:mod:`dmp_dl.training.fitters`): the Lightning loop and the
automatic model choice, each followed by its final fit on every event."""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from dmp_dl.core.errors import ConfigError
from dmp_dl.evaluation.heldout import HeldOutSplit, evaluate_model_and_baselines
from dmp_dl.models.scoring import SCORING_DIR, scoring_part
from dmp_dl.training.data_parallel import on_ray
from dmp_dl.training.fit import _instantiate_all, fit_embedding_model, refit_embedding_model
from dmp_dl.training.fitters import FITTERS
from dmp_dl.training.selection import choose_model

log = logging.getLogger(__name__)


# -- lightning -------------------------------------------------------------------------------------
def fit_with_lightning(cfg: DictConfig, state: dict) -> None:
    """The Lightning loop (:func:`dmp_dl.training.fit.fit_embedding_model`), then the final fit."""
    if on_ray(cfg):  # trainer=ray: the fit as a Ray Train job (its Trainers live in the workers), the rest here
        from dmp_dl.training.ray_fit import fit_embedding_model_on_ray

        module, train = fit_embedding_model_on_ray(cfg, state["datamodule"], state["privacy"])
        state.update(module=module, trainer=None)
    else:
        module, train = fit_embedding_model(cfg, state["datamodule"], state["privacy"])
        state.update(module=module, trainer=module.trainer)
    if not train:  # DDP: a process other than rank 0; evaluation, propensity and export run on rank 0 alone
        state["halt"] = True
        return
    state["metrics"]["train"] = train
    _final_fit(cfg, state, state["privacy"])


def _final_fit(cfg: DictConfig, state: dict, privacy) -> None:
    """``model.refit``: score the held-out fit on the test users first (the evaluation stage
    reports that), then train the exported network on every event for the epochs early stopping
    chose."""
    dm, module, train = state["datamodule"], state["module"], state["metrics"]["train"]
    reason = None
    if not bool(cfg.model.get("refit", True)):
        reason = "model.refit=false"
    elif len(dm.train_idx) == len(dm.events):
        reason = "no held-out events: the model already saw every event"
    elif privacy.options is not None and privacy.options.dp_enabled:
        reason = "privacy.dp: a second fit would spend a second privacy budget"
    elif int(train.get("processes", 1)) > 1:
        reason = f"data-parallel training ({train['processes']} processes)"
    if reason is not None:
        train["refit"] = {"done": False, "reason": reason}
        return
    split = HeldOutSplit.from_datamodule(dm)
    try:
        if len(split.test):
            state["held_out_ranking"] = evaluate_model_and_baselines(module.net, cfg.model.get("name", "model"), split,
                                                                     cfg.get("evaluation", {}))
    except Exception as exc:  # the evaluation stage reports it; the final fit goes on
        state["held_out_error"] = exc
    refitted, facts = refit_embedding_model(cfg, dm, int(train["refit_epochs"]))
    state["module"] = refitted
    train["refit"] = {"done": True, **facts}
    log.info("final fit on every event: %d epoch(s), %d events, %.1f s", facts["epochs"], facts["train_events"], facts["seconds"])


# -- the automatic model choice ----------------------------------------------------------------------
class _Fitted:
    """The trained network where later stages expect a LightningModule (they read ``.net``)."""

    def __init__(self, net):
        self.net = net
        self.trainer = None


def fit_by_model_choice(cfg: DictConfig, state: dict) -> None:
    """Candidates, choice on validation, test metrics of the held-out fits, refit
    (:func:`dmp_dl.training.selection.choose_model`); the bundle gets the ``scoring`` part."""
    privacy, dm = state["privacy"], state["datamodule"]
    private_fit = privacy.private_autoencoder_fit()  # privacy.dp: the autoencoder alone, with DP-SGD
    if private_fit is not None and "vae" not in [str(c) for c in cfg.model.get("candidates", ["vae"])]:
        raise ConfigError("privacy.dp.enabled trains the autoencoder with DP-SGD; EASE has no DP form (its item-item "
                          f"weights are a closed-form fit on every user's data): model={cfg.model.get('name')} has no DP "
                          "training, use model=auto (or model=vae, model=two_tower)")
    if cfg.get("ckpt_path") not in (None, "", "null"):
        log.warning("ckpt_path is ignored by model=%s: it has no resumable epochs (its fits are bounded by "
                    "the data and settings and start afresh); resuming applies to model=two_tower and model=mf",
                    cfg.model.get("name"))
    choice = choose_model(cfg, dm, loggers=_instantiate_all(cfg.get("logger")), private_fit=private_fit)
    if choice is None:  # trainer=ddp, a process other than the main one: its part of the fits is done
        state["halt"] = True
        return
    ease = choice.record["candidates"].get("ease", {}).get("details") or {}
    ease_l2 = (ease.get("plain_ease") or {}).get("l2", ease.get("l2"))  # the report's EASE baseline's l2
    if choice.network_config is not None:  # the sequence candidate won: its network is the bundle's
        network_kwargs, history_len = FITTERS["lightning"].network_kwargs(choice.network_config), dm.history_len
    else:
        network_kwargs = FITTERS["auto"].network_kwargs(cfg)
        history_len = max(dm.history_len, int(cfg.model.get("history_len", 2048)))
    state.update(module=_Fitted(choice.net), trainer=None, choice=choice, network_kwargs=network_kwargs,
                 history_len=history_len)
    state["bundle_parts"] = {**state.get("bundle_parts", {}),
                             SCORING_DIR: scoring_part(choice.served, choice.name, choice.record.get("refit", False), ease_l2,
                                                       {k: ease[k] for k in ("l2", "dropout") if k in ease})}
    state["metrics"].update(train={**choice.train, "privacy": privacy.summary(choice.train.get("steps", 0))}, model=choice.record)
