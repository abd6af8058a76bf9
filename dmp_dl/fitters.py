"""How the model stage trains the embedding model: the fitter that ``model.fitter`` names.

Every model config (``conf/model/*.yaml``) declares its fitter, and every registered network
(:mod:`dmp_dl.models.registry`) the fitter that trains it:

    lightning   ``model.net`` trained by ``model.module`` in the Lightning loop (``two_tower``,
                ``mf``): checkpoints and early stopping on the validation split, resume
                (``ckpt_path``), warm start (``init_from``), DP-SGD; then (``model.refit``) the
                held-out fit is scored on the test users and a fresh network trained on every event
    auto        the automatic model choice (``auto``, ``vae``, ``ease``;
                :mod:`dmp_dl.model_selection`): the autoencoder (``model.vae``) and EASE
                (``model.ease``) fitted, chosen on validation, refitted on every event

A fitter is a :class:`Fitter`; a new training regime is one more, added with
:func:`register_fitter`. This module imports nothing heavy (Lightning, torch) until a fitter
runs, so the settings checks can read it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from dmp_dl.errors import ConfigError
from dmp_dl.models import registry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fitter:
    """One way to train the embedding model.

    name: the value of ``model.fitter``.
    fit: the model stage, ``fit(cfg, state)``: reads ``state["datamodule"]`` and
        ``state["privacy"]``; sets ``state["module"]`` (its ``.net`` is the network the later stages
        and the bundle use), ``state["trainer"]`` and ``state["metrics"]["train"]``; may add
        ``bundle_parts``, ``network_kwargs`` (the network's constructor settings, for the bundle)
        and ``history_len``.
    node: where the config holds the network (``net``) and its training module (``module``):
        ``""`` for ``model`` itself, else a key under it (``vae``).
    needs: the ``model.*`` keys the fitter reads (a config without one is refused before any
        data are read).
    vector_extra: entries the exported vectors have beyond ``model.dim`` (the autoencoder folds
        the item bias into its vectors: 1).
    attach_train_rows: the network reads each user's training rows (``attach_rows``) rather than ids.
    """

    name: str
    fit: Callable[[DictConfig, dict], None]
    node: str = ""
    needs: tuple[str, ...] = ("net", "module")
    vector_extra: int = 0
    attach_train_rows: bool = False

    def model_node(self, cfg: DictConfig) -> DictConfig:
        """The config node holding ``net`` and ``module``."""
        return cfg.model if not self.node else OmegaConf.select(cfg.model, self.node)

    def network_config(self, cfg: DictConfig) -> DictConfig:
        """The network's config (``_target_`` and constructor settings)."""
        return self.model_node(cfg).net

    def network_kwargs(self, cfg: DictConfig) -> dict[str, Any]:
        """The network's constructor settings as stored in the bundle (no ``_target_``/``_partial_``)."""
        node = OmegaConf.to_container(self.network_config(cfg), resolve=True)
        return {k: v for k, v in node.items() if not k.startswith("_")}

    def build_module(self, cfg: DictConfig, dm):
        """The untrained network sized from ``dm``, wrapped in its training module."""
        node = self.model_node(cfg)
        net = instantiate(node.net, _convert_="all")(**dm.net_kwargs())
        if self.attach_train_rows:
            net.attach_rows(dm.interaction_rows("train"))
        return instantiate(node.module, _convert_="all")(net=net, item_counts=dm.item_counts)


FITTERS: dict[str, Fitter] = {}


def register_fitter(fitter: Fitter) -> Fitter:
    """Make ``fitter`` available as ``model.fitter=<fitter.name>``."""
    FITTERS[fitter.name] = fitter
    return fitter


def fitter_of(cfg: DictConfig) -> Fitter:
    """The fitter ``cfg.model`` declares (:class:`~dmp_dl.errors.ConfigError` when it names none)."""
    name = cfg.model.get("fitter") if cfg.get("model") is not None else None
    if not isinstance(name, str) or name not in FITTERS:
        raise ConfigError(f"model.fitter must be one of {' | '.join(FITTERS)} (each conf/model/*.yaml declares "
                          f"its own), got {name!r}")
    return FITTERS[name]


def check_network(cfg: DictConfig) -> None:
    """Refuse, before any data are read, a network that its registry entry says another fitter trains."""
    fitter = fitter_of(cfg)
    target = OmegaConf.select(fitter.network_config(cfg), "_target_")
    key = f"model.{fitter.node + '.' if fitter.node else ''}net._target_"
    try:
        cls = get_class(str(target))
    except Exception as exc:  # hydra wraps the import error in several types
        raise ConfigError(f"{key}={target!r} cannot be imported ({type(exc).__name__})") from None
    entry = registry.registered(cls)
    if entry is not None and entry.fitter != fitter.name:
        raise ConfigError(f"{key}={target} is trained by model.fitter={entry.fitter}, and this config declares "
                          f"model.fitter={fitter.name}; use the network's own model config (conf/model/)")


# -- lightning -------------------------------------------------------------------------------------
def fit_with_lightning(cfg: DictConfig, state: dict) -> None:
    """The Lightning loop (:func:`dmp_dl.training.fit_embedding_model`), then the final fit."""
    from dmp_dl.training import fit_embedding_model

    module, train = fit_embedding_model(cfg, state["datamodule"], state["privacy"])
    state.update(module=module, trainer=module.trainer)
    if module.trainer.global_rank != 0:  # DDP: evaluation, propensity and export run on rank 0 alone
        state["halt"] = True
        return
    state["metrics"]["train"] = train
    _final_fit(cfg, state, state["privacy"])


def _final_fit(cfg: DictConfig, state: dict, privacy) -> None:
    """``model.refit``: score the held-out fit on the test users first (the evaluation stage
    reports that), then train the exported network on every event for the epochs early stopping
    chose."""
    import torch

    from dmp_dl.evaluation.heldout import HeldOutSplit, evaluate_model_and_baselines
    from dmp_dl.training import refit_embedding_model

    dm, module, train = state["datamodule"], state["module"], state["metrics"]["train"]
    reason = None
    if not bool(cfg.model.get("refit", True)):
        reason = "model.refit=false"
    elif len(dm.train_idx) == len(dm.events):
        reason = "no held-out events: the model already saw every event"
    elif privacy.options is not None and privacy.options.dp_enabled:
        reason = "privacy.dp: a second fit would spend a second privacy budget"
    elif module.trainer.world_size > 1:
        reason = "data-parallel training (trainer.devices > 1)"
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
    best = train.get("best_checkpoint")
    epochs = int(torch.load(best, map_location="cpu", weights_only=True)["epoch"]) + 1 if best else module.trainer.current_epoch
    refitted, facts = refit_embedding_model(cfg, dm, epochs)
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
    (:func:`dmp_dl.model_selection.choose_model`); the bundle gets the ``scoring`` part."""
    from dmp_dl.model_selection import choose_model
    from dmp_dl.models.scoring import SCORING_DIR, scoring_part
    from dmp_dl.training import _instantiate_all

    privacy, dm = state["privacy"], state["datamodule"]
    if privacy.options is not None and privacy.options.dp_enabled:
        raise ConfigError("privacy.dp.enabled trains with DP-SGD, which model=two_tower and model=mf support; "
                          f"set model=two_tower (model={cfg.model.get('name')} has no DP training)")
    if cfg.get("ckpt_path") not in (None, "", "null"):
        log.warning("ckpt_path is ignored by model=%s: it has no resumable epochs (its fits are bounded by "
                    "model.time_budget_s and start afresh); resuming applies to model=two_tower and model=mf",
                    cfg.model.get("name"))
    choice = choose_model(cfg, dm, loggers=_instantiate_all(cfg.get("logger")))
    ease_l2 = (choice.record["candidates"].get("ease", {}).get("details") or {}).get("l2")
    state.update(module=_Fitted(choice.net), trainer=None, choice=choice,
                 network_kwargs=FITTERS["auto"].network_kwargs(cfg),
                 history_len=max(dm.history_len, int(cfg.model.get("history_len", 2048))))
    state["bundle_parts"] = {**state.get("bundle_parts", {}),
                             SCORING_DIR: scoring_part(choice.served, choice.name, choice.record.get("refit", False), ease_l2)}
    state["metrics"].update(train={**choice.train, "privacy": privacy.summary(0)}, model=choice.record)


register_fitter(Fitter("lightning", fit_with_lightning))
register_fitter(Fitter("auto", fit_by_model_choice, node="vae", needs=("vae", "ease"), vector_extra=1,
                       attach_train_rows=True))
