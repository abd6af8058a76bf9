"""Training logic of the user-level autoencoder (:class:`~dmp_dl.models.autoencoder.UserAutoencoder`).

A training example is a user: their whole training row goes in (with items dropped at random),
and the loss is the multinomial log-likelihood of the full row under a softmax over the catalogue
(Liang et al. 2018), plus, for the variational model, a KL term whose weight rises linearly from 0
to ``beta`` over the first ``anneal_epochs`` epochs or ``anneal_max_steps`` steps, whichever comes
first: on a large log an epoch holds many steps, and a model that trains long under a KL weight near
0 memorises the training rows (validation quality peaked after the first epoch and fell from there
on a 20,000-user log before the cap). Catalogues above ``full_softmax_max_items``
use a sampled softmax instead: the batch's items plus ``num_negatives`` uniform ones, each logit
corrected by the log of its expected count in that pool (logQ), as the two-tower model does.

Validation is the full-ranking ``val/recall@K`` / ``val/ndcg@K`` of
:class:`~dmp_dl.models.retrieval.RetrievalModule` (the user vectors come from the attached
training rows).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from dmp_dl.core.errors import ConfigError
from dmp_dl.models.losses import row_softmax_nll
from dmp_dl.models.optim import build_optimizer
from dmp_dl.models.retrieval import RetrievalModule


class UserBatches(Dataset):
    """Users with at least one training interaction, batched by ``__getitems__``: ``{"user": (B,)}``."""

    def __init__(self, users: np.ndarray):
        self.users = torch.as_tensor(np.asarray(users, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.users)

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return {"user": self.users[torch.as_tensor(indices, dtype=torch.int64)].sort().values}

    def __getitem__(self, i: int):
        return self.__getitems__([i])


def users_with_rows(rows) -> np.ndarray:
    """The users (row indices, ascending) with at least one entry in ``rows`` (CSR)."""
    return np.flatnonzero(np.diff(rows.indptr) > 0)


def user_loader(rows, batch_size: int, shuffle: bool = True) -> DataLoader:
    """A loader of the users that have a row in ``rows`` (CSR), ``batch_size`` at a time."""
    return DataLoader(UserBatches(users_with_rows(rows)), batch_size=batch_size, shuffle=shuffle, collate_fn=lambda b: b)


class AutoencoderModule(RetrievalModule):
    """See the module docstring.

    Parameters
    ----------
    net: a ``UserAutoencoder`` with the training rows attached.
    optimizer: a partial optimiser; item_counts: (n_items,) training interactions per item (logQ).
    beta: weight of the KL term once annealed (variational nets only).
    anneal_epochs: epochs over which the KL weight rises from 0 to ``beta``;
    anneal_max_steps: the most steps that rise takes (large logs reach ``beta`` within a few epochs).
    full_softmax_max_items: catalogues up to this size use the exact softmax.
    num_negatives: uniform negatives per step of the sampled softmax.
    steps_per_epoch: optimizer steps in one epoch (for the annealing schedule).
    dp: a :class:`dmp_dl.privacy.dp_autoencoder.AutoencoderDPSGD` engine: each step is its
        user-level DP-SGD step (clipped, noised per-user gradients) with one dense optimiser.

    The encoder's item rows train with ``torch.optim.SparseAdam`` (only the rows of a batch's items
    move: a step's cost follows the batch, not the catalogue); the other weights with ``optimizer``.
    """

    def __init__(self, net, optimizer: Callable[..., torch.optim.Optimizer], item_counts=None,
                 beta: float = 0.2, anneal_epochs: float = 10.0, anneal_max_steps: int | None = None,
                 full_softmax_max_items: int = 50_000,
                 num_negatives: int = 8192, steps_per_epoch: int = 1, val_ks: Sequence[int] = (10, 20),
                 scheduler: Callable | None = None, dp=None, **_unused):
        if beta < 0 or anneal_epochs < 0 or (anneal_max_steps is not None and anneal_max_steps < 0):
            raise ConfigError(f"model.module.beta, anneal_epochs and anneal_max_steps must be >= 0, got {beta}, "
                              f"{anneal_epochs}, {anneal_max_steps}")
        if num_negatives < 1:
            raise ConfigError(f"model.module.num_negatives must be >= 1, got {num_negatives}")
        super().__init__(net, optimizer, item_counts=item_counts, loss="softmax", temperature=1.0,
                         full_softmax_max_items=full_softmax_max_items, num_negatives=num_negatives,
                         val_ks=val_ks, scheduler=scheduler, dp=dp)
        steps = float(anneal_epochs) * max(int(steps_per_epoch), 1)
        if anneal_max_steps is not None:
            steps = min(steps, float(anneal_max_steps))
        self.beta, self.anneal_steps = float(beta), max(steps, 1.0)
        # two optimisers: the encoder's sparse gradients go to SparseAdam (only the rows of the
        # batch's items move), everything else to the configured (dense) optimiser
        self.automatic_optimization = False
        self._batches = 0

    def configure_optimizers(self):
        if self.dp is not None and self.net.encoder.sparse:
            raise ConfigError("privacy.dp clips each user's whole gradient: the autoencoder needs sparse_gradients=false")
        if not self.net.encoder.sparse:
            return [build_optimizer(self.optimizer_factory, self.net.parameters())]
        sparse = [p for n, p in self.net.named_parameters() if n == "encoder.weight"]
        dense = [p for n, p in self.net.named_parameters() if n != "encoder.weight"]
        lr = float(getattr(self.optimizer_factory, "keywords", {}).get("lr", 1e-3))
        return [torch.optim.SparseAdam(sparse, lr=lr), build_optimizer(self.optimizer_factory, dense)]

    @property
    def _data_parallel(self) -> bool:
        """Trained by more than one process: the logged training loss is their mean."""
        return self._trainer is not None and self.trainer.world_size > 1

    def kl_weight(self) -> float:
        # batches seen, not global_step: with two optimisers Lightning counts two steps a batch
        return self.beta * min(1.0, self._batches / self.anneal_steps)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.dp is not None:
            return self.dp.training_step(self, batch)
        net = self.net
        offsets, items, values = net.gather_rows(batch["user"])
        b = offsets.shape[0]
        mean, logvar = net.encode(offsets, items, values, net.known_attributes(batch["user"]))
        latent = mean
        if logvar is not None:
            latent = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar)
        row = torch.bucketize(torch.arange(len(items), device=items.device), offsets, right=True) - 1
        if net.n_items <= self.hparams.full_softmax_max_items:
            nll = row_softmax_nll(latent, net.item_embedding.weight[: net.n_items], net.item_bias[: net.n_items],
                                  row, items, values) / b
        else:
            negatives = torch.randint(net.n_items, (self.hparams.num_negatives,), device=items.device)
            pool, position = torch.unique(torch.cat([items, negatives]), return_inverse=True)
            expected = len(items) * torch.exp(self.log_q[pool]) + self.hparams.num_negatives / net.n_items
            logits = net.logits(latent, pool) - torch.log(expected)
            log_p = F.log_softmax(logits, dim=1)[row, position[: len(items)]]
            nll = -(values * log_p).sum() / b
        loss = nll
        if logvar is not None:
            kl = 0.5 * (torch.exp(logvar) + mean.pow(2) - 1.0 - logvar).sum(1).mean()
            loss = nll + self.kl_weight() * kl
            self.log("train/kl", kl, on_step=False, on_epoch=True, batch_size=b, sync_dist=self._data_parallel)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=b, sync_dist=self._data_parallel)
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        for opt in optimizers:
            opt.zero_grad()
        self.manual_backward(loss)
        for opt in optimizers:
            opt.step()
        self._batches += 1
        return loss
