"""Training the propensity network with Lightning: weighted BCE, validation AUC, best weights."""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchmetrics.classification import BinaryAUROC

from dmp_dl.models.optim import build_optimizer
from dmp_dl.propensity.features import Snapshot
from dmp_dl.propensity.net import PropensityNet

INPUTS = ("behaviour", "attr_tokens", "attr_numeric", "history", "enc_tokens", "enc_numeric")
ENCODER_INPUTS = ("history", "enc_tokens", "enc_numeric")  # what a frozen encoder's precomputed vectors replace


def snapshot_tensors(snap: Snapshot) -> dict[str, torch.Tensor]:
    """The network's keyword inputs for every user of ``snap`` (CPU tensors)."""
    return {name: torch.from_numpy(np.ascontiguousarray(getattr(snap, name))) for name in INPUTS}


class LabelledUsers(Dataset):
    """Users with their inputs and labels, batched by ``__getitems__`` (one gather per batch).

    A batch is the network's inputs (see :data:`INPUTS`) plus ``label`` (B,) float32.
    """

    def __init__(self, snap: Snapshot, labels: np.ndarray, vectors: np.ndarray | None = None):
        """vectors: (N, dim) the users' vectors from a frozen encoder, given in place of the
        encoder's inputs (history, enc_tokens, enc_numeric), which are then left out of the batches."""
        tensors = snapshot_tensors(snap)
        if vectors is not None:
            for name in ENCODER_INPUTS:
                del tensors[name]
            tensors["vectors"] = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
        self.tensors = {**tensors, "label": torch.as_tensor(labels, dtype=torch.float32)}

    def __len__(self) -> int:
        return len(self.tensors["label"])

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return {k: v[idx] for k, v in self.tensors.items()}

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([i]).items()}


def _keep(batch):
    return batch


def loader(dataset: LabelledUsers, batch_size: int, shuffle: bool) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=_keep)


class PropensityModule(pl.LightningModule):
    """Binary cross-entropy with ``pos_weight`` for the rarer positives; logs ``val/auc`` and
    ``val/loss`` every epoch (what early stopping monitors) and keeps the weights of the epoch with
    the best validation AUC in memory (:meth:`restore_best`), so no checkpoint files are written.

    Parameters
    ----------
    net: the :class:`PropensityNet`.
    optimizer: a partial optimiser (``torch.optim.AdamW`` with ``_partial_: true``).
    pos_weight: weight of positive examples in the loss (``n_negative / n_positive`` balances them).
    encoder_lr_scale: learning-rate multiplier of a fine-tuned encoder.
    """

    def __init__(self, net: PropensityNet, optimizer: Callable[..., torch.optim.Optimizer], pos_weight: float = 1.0,
                 encoder_lr_scale: float = 0.1):
        super().__init__()
        self.net = net
        self.optimizer_factory = optimizer
        self.encoder_lr_scale = float(encoder_lr_scale)
        self.register_buffer("pos_weight", torch.tensor(float(pos_weight)))
        self.val_auc = BinaryAUROC()
        self._val_loss: list[torch.Tensor] = []
        self.best_auc = float("-inf")
        self.best_epoch = -1
        self._best_state: dict[str, torch.Tensor] | None = None

    def _loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.net(**{k: batch[k] for k in (*INPUTS, "vectors") if k in batch})
        return logits, F.binary_cross_entropy_with_logits(logits, batch["label"], pos_weight=self.pos_weight)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        _, loss = self._loss(batch)
        self.log("train/loss", loss, on_step=False, on_epoch=True, batch_size=len(batch["label"]))
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits, loss = self._loss(batch)
        self.val_auc.update(logits, batch["label"].long())
        self._val_loss.append(torch.stack([loss.detach() * len(batch["label"]), loss.new_tensor(float(len(batch["label"])))]))

    def on_validation_epoch_end(self) -> None:
        auc = self.val_auc.compute()
        loss_sum, n = torch.stack(self._val_loss).sum(0)
        self.log("val/auc", auc, prog_bar=True)
        self.log("val/loss", loss_sum / n.clamp(min=1.0))
        self.val_auc.reset()
        self._val_loss.clear()
        if float(auc) > self.best_auc:
            self.best_auc, self.best_epoch = float(auc), int(self.current_epoch)
            self._best_state = copy.deepcopy(self.net.state_dict())

    def restore_best(self) -> None:
        """Load the weights of the best validation epoch (no-op if validation never ran)."""
        if self._best_state is not None:
            self.net.load_state_dict(self._best_state)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        encoder = [p for n, p in self.net.named_parameters() if n.startswith("encoder.") and p.requires_grad]
        rest = [p for n, p in self.net.named_parameters() if not n.startswith("encoder.")]
        groups = [{"params": rest}]
        if encoder:
            probe = self.optimizer_factory(params=[torch.zeros(1, requires_grad=True)])
            groups.append({"params": encoder, "lr": probe.defaults["lr"] * self.encoder_lr_scale})
        return build_optimizer(self.optimizer_factory, groups)
