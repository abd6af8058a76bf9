"""The LightningModule that trains any retrieval network (``mf`` or ``two_tower``).

A network exposes ``user_vectors(user, history)``, ``item_vectors(item)`` and
``cold_user_vectors(history, ...)``; the score of (user, item) is the dot product of the two
vectors. This module holds only the training logic: the loss, negative sampling, optimisation,
and full-ranking validation (``val/recall@K``, ``val/ndcg@K``) that checkpointing and early
stopping monitor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics import MeanMetric

from dmp_dl.core.errors import ConfigError
from dmp_dl.metrics.ranking import batch_metrics
from dmp_dl.models.losses import bpr_loss, full_softmax_loss, sampled_softmax_loss
from dmp_dl.models.optim import build_optimizer

LOSSES = ("softmax", "bpr")


class RetrievalModule(pl.LightningModule):
    """Training logic for dot-product retrieval.

    Parameters
    ----------
    net: the network (``MatrixFactorization`` or ``TwoTowerNet``).
    optimizer: a partial optimiser (``dmp_dl.models.optim.LazyAdam`` with ``_partial_: true``).
    item_counts: (n_items,) training events per item, for the logQ correction.
    loss: ``softmax`` (in-batch sampled softmax) or ``bpr``.
    temperature: softmax temperature.
    logq_correction: subtract log item frequency from in-batch logits.
    num_negatives: extra uniform negatives per batch (softmax) or per example (bpr, at least 1).
    full_softmax_max_items: with ``loss=softmax``, catalogues up to this size use the exact softmax
        over every item (each step scores the whole catalogue) instead of in-batch sampling.
    l2: L2 penalty on the batch's user/item vectors (useful for un-normalised MF).
    val_ks: cut-offs logged during validation.
    scheduler: optional partial LR scheduler.
    dp: a :class:`dmp_dl.privacy.dp.DPSGD` engine: train with user-level DP-SGD (manual
        optimisation with clipped, noised per-user gradients; ``privacy.dp`` in the config).
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        item_counts: np.ndarray | torch.Tensor | None = None,
        loss: str = "softmax",
        temperature: float = 0.05,
        logq_correction: bool = True,
        num_negatives: int = 0,
        full_softmax_max_items: int = 0,
        l2: float = 0.0,
        val_ks: Sequence[int] = (10, 20),
        scheduler: Callable | None = None,
        dp: Any = None,
    ):
        super().__init__()
        if loss not in LOSSES:
            raise ConfigError(f"model.loss must be one of {LOSSES}, got {loss!r}")
        if temperature <= 0:
            raise ConfigError(f"model.temperature must be > 0, got {temperature}")
        self.save_hyperparameters(logger=False, ignore=["net", "optimizer", "scheduler", "item_counts", "dp"])
        self.net = net
        self.dp = dp
        self.automatic_optimization = dp is None
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        counts = torch.as_tensor(item_counts if item_counts is not None else np.ones(net.n_items), dtype=torch.float64)
        share = (counts + 1.0) / (counts.sum() + counts.numel())  # add-one smoothing for unseen items
        self.register_buffer("log_q", torch.log(share).float())
        self.val_ks = tuple(sorted({int(k) for k in val_ks}))
        self.val_metrics = nn.ModuleDict(
            {f"{m}_{k}": MeanMetric() for k in self.val_ks for m in ("recall", "ndcg")}
        )
        self._item_matrix: torch.Tensor | None = None

    # -- training --------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.dp is not None:
            return self.dp.training_step(self, batch)
        user = self.net.user_vectors(batch["user"], batch.get("history"))
        loss = self.loss_of(user, batch["item"], batch.get("weight"))
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=user.shape[0])
        return loss

    def loss_of(self, user: torch.Tensor, item: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The configured loss of (B, dim) user vectors against their (B,) positive items, with
        (B,) example weights or None."""
        h = self.hparams
        n_items = self.net.n_items
        if h.loss == "softmax" and n_items <= h.full_softmax_max_items:
            items = self.net.item_vectors(torch.arange(n_items, device=self.device))
            loss = full_softmax_loss(user, items, item, h.temperature, weight)
        elif h.loss == "softmax":
            pos = self.net.item_vectors(item)
            neg = neg_ids = None
            if h.num_negatives > 0:
                neg_ids = torch.randint(n_items, (h.num_negatives,), device=self.device)
                neg = self.net.item_vectors(neg_ids)
            loss = sampled_softmax_loss(
                user, pos, item, h.temperature, self.log_q if h.logq_correction else None,
                neg, neg_ids, n_items, weight,
            )
        else:
            pos = self.net.item_vectors(item)
            k = max(1, h.num_negatives)
            neg_ids = torch.randint(n_items, (user.shape[0], k), device=self.device)
            neg = self.net.item_vectors(neg_ids.reshape(-1)).reshape(user.shape[0], k, -1)
            loss = bpr_loss(user, pos, neg, weight)
            if h.l2 > 0:
                loss = loss + h.l2 * (user.pow(2).sum(-1).mean() + pos.pow(2).sum(-1).mean() + neg.pow(2).sum(-1).mean())
        return loss

    # -- validation: full ranking over the catalogue -----------------------------------------
    @torch.no_grad()
    def item_matrix(self, chunk: int = 65536) -> torch.Tensor:
        """All item vectors, (n_items, dim)."""
        ids = torch.arange(self.net.n_items, device=self.device)
        return torch.cat([self.net.item_vectors(ids[i : i + chunk]) for i in range(0, len(ids), chunk)])

    def on_validation_epoch_start(self) -> None:
        self._item_matrix = self.item_matrix()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        scores = self.net.user_vectors(batch["user"], batch.get("history")) @ self._item_matrix.T
        metrics, _ = batch_metrics(scores.float(), batch, self.val_ks, mrr=False)
        for k in self.val_ks:
            for m in ("recall", "ndcg"):
                self.val_metrics[f"{m}_{k}"].update(metrics[f"{m}@{k}"])

    def on_validation_epoch_end(self) -> None:
        for k in self.val_ks:
            for m in ("recall", "ndcg"):
                metric = self.val_metrics[f"{m}_{k}"]
                self.log(f"val/{m}@{k}", metric.compute(), prog_bar=(m == "recall"), sync_dist=False)
                metric.reset()
        self._item_matrix = None

    # -- optimisation ----------------------------------------------------------------------
    def configure_optimizers(self):
        optimizer = build_optimizer(self.optimizer_factory, self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer=optimizer)}}
