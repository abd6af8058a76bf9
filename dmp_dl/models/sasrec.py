"""The sequence network (SASRec, Kang & McAuley 2018): a causal transformer over a user's latest items.

The input is a user's last ``max_len`` items in time order, right-aligned (the latest item at the
last position, padding on the left): item embeddings (scaled by sqrt(dim)) plus learned position
embeddings, then ``n_layers`` pre-norm blocks of causal self-attention and a feed-forward layer, then
a layer norm. The output at a position reads that item and the items before it, never a later one;
the output at the last position is the user vector. Item vectors are the rows of the same item
embedding table, so the score of an item is the dot product, as the FAISS inner-product index
serves it, and one forward pass of at most ``max_len`` items encodes a user from their latest events.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dmp_dl.core.errors import ConfigError
from dmp_dl.models.dropout import Dropout, attention
from dmp_dl.models.registry import register_network


class _CausalBlock(nn.Module):
    """Pre-norm causal self-attention and feed-forward, each with a residual connection."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.attn_norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), Dropout(dropout), nn.Linear(4 * dim, dim))
        self.drop = Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """x (B, L, dim); allowed (B, 1, L, L) bool, True where a query position may read a key."""
        b, length, dim = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        att = attention(q, k, v, allowed, self.dropout, self.training)
        x = x + self.drop(self.out(att.transpose(1, 2).reshape(b, length, dim)))
        return x + self.drop(self.ffn(self.ffn_norm(x)))


@register_network(fitter="lightning", encodes_users=True)
class SASRecNet(nn.Module):
    """Causal transformer user encoder over the latest items; see the module docstring.

    Parameters
    ----------
    n_users, n_items: vocabulary sizes. Row ``n_items`` of the item table is the padding item of
        histories; the network has no per-user table (a user is their items).
    dim: embedding width (a multiple of ``heads``); heads: attention heads; n_layers: blocks.
    max_len: the latest items read (``data.history_len``: the histories training, evaluation,
        the bundle and real-time updates give it have that length).
    dropout: on embeddings, attention and feed-forward layers during training (on a CPU with byte
        masks, :mod:`dmp_dl.models.dropout`).
    user_features, item_features: accepted for the common constructor and unused.
    """

    def __init__(self, n_users: int, n_items: int, dim: int = 64, heads: int = 2, n_layers: int = 2,
                 max_len: int = 20, dropout: float = 0.2, user_features=None, item_features=None):
        super().__init__()
        for key, value, low in (("dim", dim, 1), ("heads", heads, 1), ("n_layers", n_layers, 1), ("max_len", max_len, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"model.net.{key} must be an integer >= {low}, got {value!r}")
        if dim % heads:
            raise ConfigError(f"model.net.heads={heads} must divide model.dim={dim} (each head reads dim / heads entries)")
        if not 0.0 <= float(dropout) < 1.0:
            raise ConfigError(f"model.net.dropout must be in [0, 1), got {dropout!r}")
        self.n_users, self.n_items, self.dim, self.max_len = n_users, n_items, dim, max_len
        self.item_emb = nn.Embedding(n_items + 1, dim, padding_idx=n_items)
        self.pos_emb = nn.Embedding(max_len, dim)
        self.emb_drop = Dropout(dropout)
        self.blocks = nn.ModuleList(_CausalBlock(dim, heads, float(dropout)) for _ in range(n_layers))
        self.final_norm = nn.LayerNorm(dim)
        nn.init.normal_(self.item_emb.weight, std=dim ** -0.5)
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        with torch.no_grad():
            self.item_emb.weight[n_items].zero_()

    @classmethod
    def vocab_axes(cls) -> dict[str, tuple[str | None, ...]]:
        """state_dict key -> the vocabulary of each axis: the item table (its last row: padding)."""
        return {"item_emb.weight": ("item", None)}

    def sequence_states(self, sequence: torch.Tensor) -> torch.Tensor:
        """(B, L) items in time order, right-aligned and padded on the left with ``n_items``
        (L <= ``max_len``) -> (B, L, dim): at each position, the encoding of that item and those
        before it, the vector that scores the next item."""
        b, length = sequence.shape
        if length > self.max_len:
            raise ValueError(f"SASRecNet reads at most {self.max_len} items, got sequences of {length}")
        real = sequence != self.n_items
        positions = torch.arange(self.max_len - length, self.max_len, device=sequence.device)
        x = self.item_emb(sequence) * math.sqrt(self.dim) + self.pos_emb(positions)
        x = self.emb_drop(x) * real.unsqueeze(-1)
        causal = torch.ones(length, length, dtype=torch.bool, device=sequence.device).tril()
        # a position reads itself and the real items before it; padding reads only itself (no empty row)
        allowed = (causal & real[:, None, :]) | torch.eye(length, dtype=torch.bool, device=sequence.device)
        allowed = allowed.unsqueeze(1)
        for block in self.blocks:
            x = block(x, allowed)
        return self.final_norm(x)

    def _latest(self, history: torch.Tensor) -> torch.Tensor:
        """(B, L) recent items, most recent first, padded at the end -> (B, dim) the last position's state."""
        sequence = history[:, : self.max_len].flip(1)  # time order, the latest item last
        return self.sequence_states(sequence)[:, -1]

    def user_vectors(self, user: torch.Tensor | None, history: torch.Tensor) -> torch.Tensor:
        """(B,) user indices (unused: a user is their items) and (B, L) recent items, most recent
        first, padded with ``n_items`` -> (B, dim)."""
        if history is None:
            raise ValueError("SASRecNet needs the user's history (B, L)")
        return self._latest(history)

    def cold_user_vectors(self, history: torch.Tensor, tokens: torch.Tensor | None = None,
                          numeric: torch.Tensor | None = None) -> torch.Tensor:
        """Any user, known or new, from their (B, L) recent items (most recent first): the same
        encoding as :meth:`user_vectors`; attributes are not read."""
        return self._latest(history)

    def item_vectors(self, item: torch.Tensor) -> torch.Tensor:
        """(N,) item indices -> (N, dim): rows of the shared item table."""
        return self.item_emb(item)
