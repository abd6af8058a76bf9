"""What the training pipeline asks of the ``privacy`` settings: the module to fit (DP-SGD or not),
the privacy summary of the run, and the bundle's ``privacy`` manifest entry."""

from __future__ import annotations

import logging
from typing import Any

from hydra.utils import instantiate

from dmp_dl.data.privacy_options import PrivacyOptions
from dmp_dl.privacy.dp import build_dp_training
from dmp_dl.privacy.dp_autoencoder import fit_private_autoencoder
from dmp_dl.training.fit import build_module

log = logging.getLogger(__name__)


class PrivacyHooks:
    """Built once per run from ``cfg.privacy`` (absent group: no pseudonymisation, no DP)."""

    def __init__(self, options: PrivacyOptions | None):
        self.options = options
        self.dp = None
        self.dp_report: dict | None = None

    @classmethod
    def from_config(cls, cfg) -> "PrivacyHooks":
        node = cfg.get("privacy")
        return cls(instantiate(node, _convert_="all") if node is not None else None)

    def build_module(self, cfg, dm) -> tuple[Any, dict[str, Any]]:
        """(the LightningModule, the data arguments of ``trainer.fit``): user-level DP-SGD with its
        Poisson user batches when ``privacy.dp.enabled``, else the usual module and datamodule."""
        if self.options is None or not self.options.dp_enabled:
            return build_module(cfg, dm), {"datamodule": dm}

        self.dp, module, batches = build_dp_training(cfg, dm, self.options.dp)
        _warn_propensity(cfg)
        return module, {"train_dataloaders": batches, "val_dataloaders": dm.val_dataloader()}

    def private_autoencoder_fit(self):
        """Under ``privacy.dp.enabled``: the fit the automatic model choice uses in place of its own
        (``(cfg, dm, rows, loggers, previous) -> (net, facts)``, user-level DP-SGD of the autoencoder alone,
        :mod:`dmp_dl.privacy.dp_autoencoder`); else None."""
        if self.options is None or not self.options.dp_enabled:
            return None

        def fit(cfg, dm, rows, loggers=None, previous=None):
            self.dp, net, facts = fit_private_autoencoder(cfg, dm, rows, self.options.dp, loggers, previous)
            _warn_propensity(cfg)
            return net, facts

        return fit

    def summary(self, steps: int) -> dict[str, Any]:
        """``metrics.json``'s ``train.privacy``: pseudonymisation and the DP guarantee (ε, δ)."""
        self.dp_report = self.dp.report(steps) if self.dp is not None else None
        if self.dp_report is not None:
            log.info("DP-SGD: (epsilon=%s, delta=%.2g) after %d steps", self.dp_report["epsilon"],
                     self.dp_report["delta"], steps)
        return {"pseudonymized": bool(self.options and self.options.pseudonymize), "dp": self.dp_report}

    def bundle_parts(self) -> dict[str, Any]:
        """The ``privacy`` manifest entry, as an :func:`~dmp_dl.training.export.export_bundle` part."""
        if self.options is None:
            return {}
        entry = self.options.manifest_entry(self.dp_report)
        return {"privacy": lambda writer: entry}


def _warn_propensity(cfg) -> None:
    if cfg.get("propensity") is not None and cfg.propensity.get("enabled", False):
        log.warning("privacy.dp covers the embedding model only: the propensity model trains without DP "
                    "(propensity.enabled=false leaves it out of the bundle)")
