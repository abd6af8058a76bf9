"""The uplift network: one shared trunk, one conversion head per arm (control, treated)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dmp_dl.models.dropout import Dropout


class UpliftNet(nn.Module):
    """Logits (B, 2) of converting without contact (column 0) and with contact (column 1).

    The two heads share a trunk (an MLP over the standardised inputs), so the control head, which
    learns from the smaller holdout, borrows the representation the treated users train, and the
    difference of the heads is the treatment effect (Shalit et al. 2017, "TARNet"). The uplift is
    the difference of the two calibrated probabilities.

    Parameters
    ----------
    n_features: input width (:class:`~dmp_dl.campaign.features.UpliftFeatures.width`).
    hidden: trunk widths; dropout: after each hidden layer.
    ``config`` holds the constructor arguments (JSON-safe), to rebuild it.
    """

    def __init__(self, n_features: int, hidden: Sequence[int] = (64, 32), dropout: float = 0.1):
        super().__init__()
        self.config = {"n_features": int(n_features), "hidden": [int(h) for h in hidden], "dropout": float(dropout)}
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))
        layers: list[nn.Module] = []
        width = int(n_features)
        for h in hidden:
            layers += [nn.Linear(width, int(h)), nn.GELU(), Dropout(dropout)]
            width = int(h)
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.Linear(width, 2)

    @torch.no_grad()
    def fit_normalization(self, x: torch.Tensor) -> None:
        """Standardise with the training users' means and standard deviations, x (N, F)."""
        self.mean.copy_(x.mean(0))
        self.std.copy_(x.std(0).nan_to_num(1.0).clamp(min=1e-6) if len(x) > 1 else torch.ones_like(self.std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, F) float32 -> logits (B, 2): [without contact, with contact]."""
        return self.heads(self.trunk((x - self.mean) / self.std))
