"""Training the uplift network with Lightning: each user's outcome trains their own arm's head."""

from __future__ import annotations

import copy

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from dmp_dl.campaign.net import UpliftNet


class UpliftModule(pl.LightningModule):
    """Binary cross-entropy of the head of the user's arm (batch: ``x`` (B, F), ``treated`` (B,)
    int64 0/1, ``y`` (B,) float32 0/1), each arm weighted so that both count equally in the shared
    trunk however small the holdout. Logs ``val/loss`` every epoch (what early stopping monitors)
    and keeps the weights of the best validation epoch in memory (:meth:`restore_best`).

    arm_weights: (control, treated) loss weights, e.g. n / (2 n_arm).
    """

    def __init__(self, net: UpliftNet, lr: float = 1e-3, weight_decay: float = 1e-4,
                 arm_weights: tuple[float, float] = (1.0, 1.0)):
        super().__init__()
        self.net = net
        self.lr, self.weight_decay = float(lr), float(weight_decay)
        self.register_buffer("arm_weights", torch.tensor([float(w) for w in arm_weights]))
        self.best_loss = float("inf")
        self.best_epoch = -1
        self._best_state: dict[str, torch.Tensor] | None = None
        self._val: list[torch.Tensor] = []

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self.net(batch["x"]).gather(1, batch["treated"][:, None]).squeeze(1)
        weight = self.arm_weights[batch["treated"]]
        return (F.binary_cross_entropy_with_logits(logits, batch["y"], reduction="none") * weight).sum() / weight.sum()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss, on_step=False, on_epoch=True, batch_size=len(batch["y"]))
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._val.append(torch.stack([self._loss(batch).detach() * len(batch["y"]), torch.tensor(float(len(batch["y"])))]))

    def on_validation_epoch_end(self) -> None:
        total, n = torch.stack(self._val).sum(0)
        self._val.clear()
        loss = float(total / n.clamp(min=1.0))
        self.log("val/loss", loss, prog_bar=True)
        if loss < self.best_loss:
            self.best_loss, self.best_epoch = loss, int(self.current_epoch)
            self._best_state = copy.deepcopy(self.net.state_dict())

    def restore_best(self) -> None:
        """Load the weights of the best validation epoch (no-op if validation never ran)."""
        if self._best_state is not None:
            self.net.load_state_dict(self._best_state)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
