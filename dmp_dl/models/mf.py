"""Matrix factorisation: one vector per user and per item, scored by dot product."""

from __future__ import annotations

import torch
from torch import nn

from dmp_dl.models.registry import register_network


@register_network(fitter="lightning", encodes_users=True)
class MatrixFactorization(nn.Module):
    """User and item embedding tables.

    Row ``n_users`` of the user table is unused (it stands for an unknown user); row ``n_items``
    of the item table is the all-zero padding item. A new user is folded in as the mean of the
    vectors of their recent items.
    """

    normalized = False

    def __init__(self, n_users: int, n_items: int, dim: int = 64, init_std: float = 0.1, **_unused):
        super().__init__()
        self.n_users, self.n_items, self.dim = n_users, n_items, dim
        self.user = nn.Embedding(n_users + 1, dim)
        self.item = nn.Embedding(n_items + 1, dim, padding_idx=n_items)
        nn.init.normal_(self.user.weight, std=init_std)
        nn.init.normal_(self.item.weight, std=init_std)
        with torch.no_grad():
            self.item.weight[n_items].zero_()

    @classmethod
    def vocab_axes(cls) -> dict[str, tuple[str | None, ...]]:
        """state_dict key -> the vocabulary of each axis (``user``, ``item`` or None)."""
        return {"user.weight": ("user", None), "item.weight": ("item", None)}

    def user_vectors(self, user: torch.Tensor, history: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) user indices -> (B, dim)."""
        return self.user(user)

    def item_vectors(self, item: torch.Tensor) -> torch.Tensor:
        """(N,) item indices -> (N, dim)."""
        return self.item(item)

    def cold_user_vectors(self, history: torch.Tensor, tokens=None, numeric=None) -> torch.Tensor:
        """(B, L) recent items (padded with ``n_items``) -> (B, dim): mean of their vectors."""
        mask = (history != self.n_items).unsqueeze(-1).float()
        return (self.item(history) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
