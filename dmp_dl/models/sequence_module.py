"""The LightningModule that trains a sequence network (``model=sasrec``): next-item prediction at every position.

Training reads windows of each user's events in time order (:class:`dmp_dl.data.sequences.TrainSequences`,
built by the data module through :meth:`SequenceModule.train_examples`) rather than one example per
event; each position's output is scored against the item that followed it, with the loss of
:class:`~dmp_dl.models.retrieval.RetrievalModule` (the exact softmax over the catalogue up to
``full_softmax_max_items`` items, the in-batch sampled softmax with logQ correction beyond).
Validation, optimisation, checkpoints and early stopping are the retrieval module's.
"""

from __future__ import annotations

from typing import Any

import torch

from dmp_dl.core.errors import ConfigError
from dmp_dl.models.retrieval import RetrievalModule


class SequenceModule(RetrievalModule):
    """:class:`RetrievalModule` for networks with ``sequence_states(sequence) -> (B, L, dim)`` and
    ``max_len``.

    Parameters (beyond the retrieval module's)
    ------------------------------------------
    batch_sequences: windows per training step (each up to ``max_len`` next-item targets).
    """

    def __init__(self, net, optimizer, item_counts=None, batch_sequences: int = 128, dp: Any = None, **kwargs: Any):
        if dp is not None:
            raise ConfigError("privacy.dp.enabled=true: model=sasrec has no DP-SGD training (its examples are whole "
                              "windows of a user's events); use model=auto, vae or two_tower, or privacy.dp.enabled=false")
        if isinstance(batch_sequences, bool) or not isinstance(batch_sequences, int) or batch_sequences < 1:
            raise ConfigError(f"model.module.batch_sequences must be an integer >= 1, got {batch_sequences!r}")
        if not callable(getattr(net, "sequence_states", None)):
            raise ConfigError(f"model.module: SequenceModule trains networks with sequence_states(); "
                              f"{type(net).__name__} has none (use dmp_dl.models.retrieval.RetrievalModule)")
        super().__init__(net, optimizer, item_counts, **kwargs)
        self.batch_sequences = batch_sequences

    def train_examples(self, dm) -> tuple[Any, int]:
        """(the training windows of ``dm``, windows per step): what the data module's train loader serves."""
        return dm.train_sequences(self.net.max_len), self.batch_sequences

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        target = batch["target"]
        states = self.net.sequence_states(batch["sequence"])  # (B, L, dim)
        has_next = target != self.net.n_items
        loss = self.loss_of(states[has_next], target[has_next], batch["weight"][has_next])
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=int(has_next.sum()))
        return loss
