"""How the model stage trains the embedding model: the fitter that ``model.fitter`` names.

Every model config (``conf/model/*.yaml``) declares its fitter, and every registered network
(:mod:`dmp_dl.models.registry`) the fitter that trains it:

    lightning   ``model.net`` trained by ``model.module`` in the Lightning loop (``two_tower``,
                ``mf``): checkpoints and early stopping on the validation split, resume
                (``ckpt_path``), warm start (``init_from``), DP-SGD; then (``model.refit``) the
                held-out fit is scored on the test users and a fresh network trained on every event
    auto        the automatic model choice (``auto``, ``vae``, ``ease``;
                :mod:`dmp_dl.training.selection`): the autoencoder (``model.vae``) and EASE
                (``model.ease``) fitted, chosen on validation, refitted on every event

A fitter is a :class:`Fitter`; a new training regime is one more, added with
:func:`register_fitter`. This module imports nothing heavy (Lightning, torch) until a fitter
runs, so the settings checks can read it.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from dmp_dl.core.errors import ConfigError
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
    """The fitter ``cfg.model`` declares (:class:`~dmp_dl.core.errors.ConfigError` when it names none)."""
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


def _deferred(module: str, function: str) -> Callable[[DictConfig, dict], None]:
    """A fit that imports ``module`` (which imports Lightning and torch) only when it runs."""

    def fit(cfg: DictConfig, state: dict) -> None:
        return getattr(importlib.import_module(module), function)(cfg, state)

    fit.__qualname__ = f"{module}.{function}"
    return fit


# The fitters' model stages are in dmp_dl.training.stage, imported when a fitter runs.
register_fitter(Fitter("lightning", _deferred("dmp_dl.training.stage", "fit_with_lightning")))
register_fitter(Fitter("auto", _deferred("dmp_dl.training.stage", "fit_by_model_choice"), node="vae",
                       needs=("vae", "ease"), vector_extra=1, attach_train_rows=True))
