"""The feature two-tower network.

User tower: user-id embedding + attribute tokens + numeric attributes + a position-weighted mean of
the embeddings of the user's recent items -> MLP -> vector. Item tower: item-id embedding +
attribute tokens (category/genre, multi-valued) + numeric attributes -> MLP -> vector. Both towers
may L2-normalise their output; the model's score is the dot product either way, which is what the
FAISS inner-product index serves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dmp_dl.data.features import FeatureTable
from dmp_dl.models.dropout import Dropout
from dmp_dl.models.registry import register_network


def _mlp(d_in: int, hidden: int, d_out: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), Dropout(dropout), nn.Linear(hidden, d_out))


def _masked_mean(emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, d), (B, T) bool -> (B, d) mean over the True positions (0 if none)."""
    m = mask.unsqueeze(-1).to(emb.dtype)
    return (emb * m).sum(1) / m.sum(1).clamp(min=1.0)


class AttributeEncoder(nn.Module):
    """Token (categorical) and numeric attributes of a fixed table -> (B, dim)."""

    def __init__(self, table: FeatureTable | None, n_rows: int, dim: int):
        super().__init__()
        tokens = torch.zeros((n_rows + 1, 1), dtype=torch.int64)
        numeric = torch.zeros((n_rows + 1, 0))
        if table is not None:
            tokens = torch.as_tensor(table.tokens, dtype=torch.int64)
            numeric = torch.as_tensor(table.numeric, dtype=torch.float32)
        self.register_buffer("tokens", tokens)
        self.register_buffer("numeric", numeric)
        self.n_tokens = int(tokens.max()) + 1
        self.token_emb = nn.Embedding(max(self.n_tokens, 1), dim, padding_idx=0) if self.n_tokens > 1 else None
        self.numeric_proj = nn.Linear(numeric.shape[1], dim) if numeric.shape[1] else None

    @property
    def active(self) -> bool:
        return self.token_emb is not None or self.numeric_proj is not None

    def forward(self, rows: torch.Tensor | None = None, tokens: torch.Tensor | None = None,
                numeric: torch.Tensor | None = None) -> torch.Tensor:
        """Encode table ``rows`` (B,), or explicit ``tokens`` (B, T) / ``numeric`` (B, D)."""
        if rows is not None:
            tokens, numeric = self.tokens[rows], self.numeric[rows]
        out = 0.0
        if self.token_emb is not None and tokens is not None:
            out = out + _masked_mean(self.token_emb(tokens), tokens != 0)
        if self.numeric_proj is not None and numeric is not None:
            out = out + self.numeric_proj(numeric)
        return out  # type: ignore[return-value]


@register_network(fitter="lightning", encodes_users=True)
class TwoTowerNet(nn.Module):
    """User and item towers; see the module docstring.

    Parameters
    ----------
    n_users, n_items: vocabulary sizes. Row ``n_users`` is the unknown user (cold start);
        row ``n_items`` the padding item used in histories.
    user_features, item_features: encoded attribute tables (or None).
    dim: output dimension; hidden: MLP width.
    normalize: L2-normalise both towers' outputs.
    id_dropout: probability of replacing a training user's id by the unknown-user row, so the tower
        also learns to work from history and attributes alone (cold start).
    history_dropout: probability of hiding each history item during training (denoising: the tower
        must predict from partial histories, which regularises like a denoising autoencoder).
    use_user_id, use_history, use_attributes: switch the user-tower inputs.
    history_len: number of recent items the user tower reads.
    """

    def __init__(
        self,
        n_users: int,
        n_items: int,
        user_features: FeatureTable | None = None,
        item_features: FeatureTable | None = None,
        dim: int = 64,
        hidden: int = 256,
        dropout: float = 0.1,
        normalize: bool = True,
        id_dropout: float = 0.1,
        history_dropout: float = 0.0,
        use_user_id: bool = True,
        use_history: bool = True,
        use_attributes: bool = True,
        history_len: int = 20,
    ):
        super().__init__()
        self.n_users, self.n_items, self.dim = n_users, n_items, dim
        self.normalized = normalize
        self.id_dropout = id_dropout
        self.history_dropout = history_dropout
        self.use_user_id, self.use_history = use_user_id, use_history
        self.item_id = nn.Embedding(n_items + 1, dim, padding_idx=n_items)
        self.user_id = nn.Embedding(n_users + 1, dim) if use_user_id else None
        self.user_attr = AttributeEncoder(user_features if use_attributes else None, n_users, dim)
        self.item_attr = AttributeEncoder(item_features if use_attributes else None, n_items, dim)
        self.position_logits = nn.Parameter(torch.zeros(history_len)) if use_history else None
        for emb in (self.item_id, self.user_id):
            if emb is not None:
                nn.init.normal_(emb.weight, std=0.05)
        with torch.no_grad():
            self.item_id.weight[n_items].zero_()
        n_user_parts = int(use_user_id) + int(use_history) + int(self.user_attr.active)
        if n_user_parts == 0:
            raise ValueError("two_tower: enable at least one of use_user_id, use_history, use_attributes")
        self.user_mlp = _mlp(dim * n_user_parts, hidden, dim, dropout)
        self.item_mlp = _mlp(dim * (1 + int(self.item_attr.active)), hidden, dim, dropout)

    @classmethod
    def vocab_axes(cls) -> dict[str, tuple[str | None, ...]]:
        """state_dict key -> the vocabulary of each axis (``user``, ``item`` or None): the per-user and
        per-item tables (rows past the vocabulary: the unknown user, the padding item); the user-id
        table only when ``use_user_id``."""
        axes: dict[str, tuple[str | None, ...]] = {"item_id.weight": ("item", None), "user_id.weight": ("user", None)}
        for side in ("user", "item"):
            axes[f"{side}_attr.tokens"] = (side, None)
            axes[f"{side}_attr.numeric"] = (side, None)
        return axes

    def _out(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) if self.normalized else x

    def _history(self, history: torch.Tensor) -> torch.Tensor:
        """(B, L) recent items, most recent first -> (B, dim) position-weighted mean."""
        L = min(history.shape[1], self.position_logits.shape[0])
        history = history[:, :L]
        mask = history != self.n_items
        if self.training and self.history_dropout > 0:
            mask = mask & (torch.rand(history.shape, device=history.device) >= self.history_dropout)
        w = torch.softmax(self.position_logits[:L], 0).expand_as(history) * mask
        w = w / w.sum(1, keepdim=True).clamp(min=1e-12)
        return (self.item_id(history) * w.unsqueeze(-1)).sum(1)

    def _user(self, ids: torch.Tensor | None, history: torch.Tensor | None, attrs: torch.Tensor | float) -> torch.Tensor:
        parts = []
        if self.user_id is not None:
            parts.append(self.user_id(ids))
        if self.use_history:
            if history is None:
                raise ValueError("two_tower needs the user's history (B, L)")
            parts.append(self._history(history))
        if self.user_attr.active:
            parts.append(attrs)
        return self._out(self.user_mlp(torch.cat(parts, dim=-1)))

    def user_vectors(self, user: torch.Tensor, history: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) user indices and (B, L) histories -> (B, dim)."""
        ids = user
        if self.training and self.id_dropout > 0:
            drop = torch.rand(user.shape, device=user.device) < self.id_dropout
            ids = torch.where(drop, torch.full_like(user, self.n_users), user)
        attrs = self.user_attr(rows=user) if self.user_attr.active else 0.0
        return self._user(ids, history, attrs)

    def cold_user_vectors(self, history: torch.Tensor, tokens: torch.Tensor | None = None,
                          numeric: torch.Tensor | None = None) -> torch.Tensor:
        """A user unknown to the model: (B, L) recent items, optional attribute tokens/numerics."""
        b = history.shape[0]
        ids = torch.full((b,), self.n_users, dtype=torch.int64, device=history.device)
        attrs = 0.0
        if self.user_attr.active:
            if tokens is None and numeric is None:
                attrs = self.user_attr(rows=ids)
            else:
                attrs = self.user_attr(tokens=tokens, numeric=numeric)
                if not torch.is_tensor(attrs):
                    attrs = self.user_attr(rows=ids)
        return self._user(ids, history, attrs)

    def item_vectors(self, item: torch.Tensor) -> torch.Tensor:
        """(N,) item indices -> (N, dim)."""
        parts = [self.item_id(item)]
        if self.item_attr.active:
            parts.append(self.item_attr(rows=item))
        return self._out(self.item_mlp(torch.cat(parts, dim=-1)))
