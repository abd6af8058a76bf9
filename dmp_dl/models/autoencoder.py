"""The user-level autoencoder: a user is their whole interaction set, not a sequence of events.

Mult-VAE / Mult-DAE style (Liang et al., WWW 2018): the encoder reads the user's weighted multi-hot
row over the catalogue (L2-normalised, items dropped at random while training), passes it through
dense layers with layer norm, and outputs a latent vector (the mean of a Gaussian posterior when
``variational``); the decoder is linear: one vector and one bias per item, so a user's score for
item j is ``z_u . w_j + b_j``. The bias is folded into the exported vectors (user ``[z_u, 1]``,
item ``[w_j, b_j]``), so the FAISS inner product of the two is exactly the model's logit, and any
new history is a cold-start user for free (one encoder pass).

Known users are encoded from rows the caller attaches with :meth:`UserAutoencoder.attach_rows`
(training rows while training and evaluating, every event for the exported vectors): the
``user_vectors(user, history)`` interface of the other networks is kept, ``history`` is ignored.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from dmp_dl.data.features import FeatureTable
from dmp_dl.models.registry import register_network
from dmp_dl.models.two_tower import AttributeEncoder

SPARSE_ABOVE_ITEMS = 10_000


def sparse_gradients_for(setting: bool | None, n_items: int, processes: int = 1) -> tuple[bool, str | None]:
    """Whether the encoder's item rows get sparse gradients: ``setting`` when given, else on
    catalogues above ``SPARSE_ABOVE_ITEMS`` items; never when ``processes`` > 1 train it
    data-parallel (DDP averages dense gradients only: gloo and NCCL cannot all-reduce sparse ones).
    Returns (sparse, the log line saying why sparse gradients were wanted and are not used, or None)."""
    wanted = n_items > SPARSE_ABOVE_ITEMS if setting is None else bool(setting)
    if wanted and processes > 1:
        why = "sparse_gradients=true" if setting is not None else f"{n_items} items > {SPARSE_ABOVE_ITEMS}"
        return False, (f"autoencoder: dense gradients for the encoder's item rows ({why} would train them sparse): "
                       f"data-parallel training over {processes} processes averages dense gradients only; "
                       "each step all-reduces the whole encoder")
    return wanted, None


def padded_to_rows(history: torch.Tensor, pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, L) item indices padded with ``pad`` -> CSR pieces (offsets (B,), items (nnz,), values (nnz,)).

    Each distinct item of a row counts once with value 1 (a cold-start history carries no event weights).
    """
    b = history.shape[0]
    keep = history != pad
    rows = torch.arange(b, device=history.device).unsqueeze(1).expand_as(history)[keep]
    items = history[keep]
    key = torch.unique(rows * (pad + 1) + items)  # distinct (row, item), sorted by row
    rows, items = key // (pad + 1), key % (pad + 1)
    offsets = torch.searchsorted(rows, torch.arange(b, device=history.device))
    return offsets, items, torch.ones(len(items), device=history.device)


@register_network(fitter="auto", encodes_users=True)
class UserAutoencoder(nn.Module):
    """Encoder over a user's item set, linear item decoder; see the module docstring.

    Parameters
    ----------
    n_users, n_items: vocabulary sizes (row ``n_items`` of the encoder is the padding item).
    dim: latent size; exported vectors have ``dim + 1`` entries (the item bias folded in).
    hidden: width of the encoder's dense layers; layers: how many of them (>= 1).
    dropout: share of a user's items hidden from the encoder at each training step (denoising).
    variational: Gaussian posterior with a KL term (Mult-VAE) instead of a plain denoising encoder.
    user_features: the user table's encoded attributes (CRM columns), added to the first layer, so
        a new user can be described by attributes as well as items; use_attributes=False ignores them.
    attribute_dropout: share of training users whose attributes are hidden at each step, so the
        code cannot lean on attributes that single a user out (a zip code) instead of their items.
    sparse_gradients: the encoder's item rows get sparse gradients (trained by SparseAdam, see
        :class:`~dmp_dl.models.autoencoder_module.AutoencoderModule`); None: on catalogues above
        10,000 items, where most rows are untouched by a step (below, dense Adam converges faster).
    """

    def __init__(self, n_users: int, n_items: int, dim: int = 200, hidden: int = 600, layers: int = 1,
                 dropout: float = 0.5, variational: bool = True, user_features: FeatureTable | None = None,
                 use_attributes: bool = True, attribute_dropout: float = 0.5, sparse_gradients: bool | None = None,
                 **_unused):
        super().__init__()
        if dim < 1 or hidden < 1 or layers < 1:
            raise ValueError(f"autoencoder: dim, hidden and layers must be >= 1, got {dim}, {hidden}, {layers}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"autoencoder: dropout must be in [0, 1), got {dropout}")
        self.n_users, self.n_items = n_users, n_items
        self.latent_dim, self.dim = dim, dim + 1
        self.dropout, self.variational, self.attribute_dropout = dropout, variational, attribute_dropout
        self.normalized = False
        # sparse gradients on large catalogues: a step updates the rows of the batch's items only
        sparse, _ = sparse_gradients_for(sparse_gradients, n_items)
        self.encoder = nn.EmbeddingBag(n_items + 1, hidden, mode="sum", padding_idx=n_items, sparse=sparse)
        self.encoder_bias = nn.Parameter(torch.zeros(hidden))
        self.user_attr = AttributeEncoder(user_features if use_attributes else None, n_users, hidden)
        self.norms = nn.ModuleList([nn.LayerNorm(hidden) for _ in range(layers)])
        self.hidden_layers = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(layers - 1)])
        self.latent = nn.Linear(hidden, 2 * dim if variational else dim)
        self.item_embedding = nn.Embedding(n_items + 1, dim, padding_idx=n_items)
        self.item_bias = nn.Parameter(torch.zeros(n_items + 1))
        nn.init.xavier_uniform_(self.encoder.weight)
        # attributes start as small as the item rows' contribution, or they drown it after the layer norm
        for p in self.user_attr.parameters():
            nn.init.normal_(p, std=0.01) if p.dim() > 1 else nn.init.zeros_(p)
        nn.init.normal_(self.item_embedding.weight, std=0.01)
        with torch.no_grad():
            self.encoder.weight[n_items].zero_()
            self.item_embedding.weight[n_items].zero_()
        empty = torch.zeros(0, dtype=torch.int64)
        self.register_buffer("row_indptr", torch.zeros(n_users + 1, dtype=torch.int64), persistent=False)
        self.register_buffer("row_items", empty, persistent=False)
        self.register_buffer("row_values", torch.zeros(0), persistent=False)

    # -- rows of known users ---------------------------------------------------------------------
    def attach_rows(self, rows: sp.csr_matrix) -> "UserAutoencoder":
        """Use ``rows`` ((n_users, n_items) CSR of interaction weights) to encode known users."""
        rows = sp.csr_matrix(rows)
        if rows.shape != (self.n_users, self.n_items):
            raise ValueError(f"rows of shape {rows.shape}, expected ({self.n_users}, {self.n_items})")
        device = self.item_bias.device
        self.row_indptr = torch.as_tensor(rows.indptr.astype(np.int64), device=device)
        self.row_items = torch.as_tensor(rows.indices.astype(np.int64), device=device)
        self.row_values = torch.as_tensor(rows.data.astype(np.float32), device=device)
        return self

    def gather_rows(self, user: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The attached rows of ``user`` (B,) as (offsets (B,), items (nnz,), values (nnz,))."""
        user = user.to(self.row_indptr.device)
        starts = self.row_indptr[user]
        counts = self.row_indptr[user + 1] - starts
        offsets = torch.cumsum(counts, 0) - counts
        total = int(counts.sum())
        flat = torch.repeat_interleave(starts - offsets, counts, output_size=total) + torch.arange(total, device=user.device)
        return offsets, self.row_items[flat], self.row_values[flat]

    # -- encoder ---------------------------------------------------------------------------------
    def encode(self, offsets: torch.Tensor, items: torch.Tensor, values: torch.Tensor,
               attributes: torch.Tensor | float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """CSR pieces of B users (and their encoded attributes (B, hidden), or 0) -> (mean (B, dim),
        log-variance (B, dim) or None).

        Each row is L2-normalised after dropping items (training only), so a user's number of
        items does not set the scale of their code.
        """
        b = offsets.shape[0]
        device = items.device
        bag = torch.bucketize(torch.arange(len(items), device=device), offsets, right=True) - 1
        if self.training and self.dropout > 0 and len(items):
            keep = torch.rand(len(items), device=device) >= self.dropout
            items, values, bag = items[keep], values[keep], bag[keep]
            offsets = torch.searchsorted(bag, torch.arange(b, device=device))
        norm = torch.zeros(b, device=device, dtype=values.dtype).index_add_(0, bag, values * values).sqrt()
        weights = values / norm.clamp(min=1e-12)[bag]
        h = self.encoder(items, offsets, per_sample_weights=weights) + self.encoder_bias + attributes
        h = F.silu(self.norms[0](h))
        for layer, norm_layer in zip(self.hidden_layers, self.norms[1:]):
            h = F.silu(norm_layer(layer(h)))
        out = self.latent(h)
        if self.variational:
            return out[:, : self.latent_dim], out[:, self.latent_dim :].clamp(-10.0, 10.0)
        return out, None

    def _vectors(self, mean: torch.Tensor) -> torch.Tensor:
        return torch.cat([mean, torch.ones(mean.shape[0], 1, device=mean.device, dtype=mean.dtype)], 1)

    # -- the network interface ---------------------------------------------------------------------
    def known_attributes(self, user: torch.Tensor) -> torch.Tensor | float:
        """Encoded attributes (B, hidden) of known users (0 when the model reads none); while
        training, a random ``attribute_dropout`` share of them is replaced by the unknown user's."""
        if not self.user_attr.active:
            return 0.0
        if self.training and self.attribute_dropout > 0:
            hide = torch.rand(user.shape, device=user.device) < self.attribute_dropout
            user = torch.where(hide, torch.full_like(user, self.n_users), user)
        return self.user_attr(rows=user)

    def user_vectors(self, user: torch.Tensor, history: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) known users -> (B, dim + 1), from their attached rows (``history`` is not read)."""
        mean, _ = self.encode(*self.gather_rows(user), self.known_attributes(user))
        return self._vectors(mean)

    def cold_user_vectors(self, history: torch.Tensor, tokens: torch.Tensor | None = None,
                          numeric: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) item indices of new users, padded with ``n_items``, and optional attribute
        ``tokens`` (B, T) / ``numeric`` (B, D) -> (B, dim + 1)."""
        return self.row_user_vectors(*padded_to_rows(history, self.n_items), tokens, numeric)

    def row_user_vectors(self, offsets: torch.Tensor, items: torch.Tensor, values: torch.Tensor,
                         tokens: torch.Tensor | None = None, numeric: torch.Tensor | None = None,
                         users: torch.Tensor | None = None) -> torch.Tensor:
        """Users given by their rows as CSR pieces (offsets (B,), items (nnz,), values (nnz,): the
        interaction strengths training attaches, :func:`dmp_dl.data.datamodule.weighted_rows`) and
        optional attribute ``tokens`` (B, T) / ``numeric`` (B, D), or ``users`` (B,): rows of the
        attribute table as training read them (``n_users``: the unknown user) -> (B, dim + 1): the
        encoding of :meth:`user_vectors`, for rows that were not attached (a user's row after
        real-time events)."""
        attributes: torch.Tensor | float = 0.0
        if self.user_attr.active:
            if users is not None:
                attributes = self.user_attr(rows=users)
            elif tokens is None and numeric is None:  # the unknown-user row: no attributes
                unknown = torch.full((offsets.shape[0],), self.n_users, dtype=torch.int64, device=offsets.device)
                attributes = self.user_attr(rows=unknown)
            else:
                attributes = self.user_attr(tokens=tokens, numeric=numeric)
        mean, _ = self.encode(offsets, items, values, attributes)
        return self._vectors(mean)

    def item_vectors(self, item: torch.Tensor) -> torch.Tensor:
        """(N,) item indices -> (N, dim + 1): decoder row and bias."""
        return torch.cat([self.item_embedding(item), self.item_bias[item].unsqueeze(1)], 1)

    def logits(self, latent: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        """(B, dim) codes -> (B, n_items) scores over the catalogue (or over ``items`` (M,))."""
        if items is None:
            return latent @ self.item_embedding.weight[: self.n_items].T + self.item_bias[: self.n_items]
        return latent @ self.item_embedding(items).T + self.item_bias[items]

    @classmethod
    def vocab_axes(cls) -> dict[str, tuple[str | None, ...]]:
        """State-dict keys whose axes follow a vocabulary (warm starts and erasure read this)."""
        return {"encoder.weight": ("item", None), "item_embedding.weight": ("item", None), "item_bias": ("item",),
                "user_attr.tokens": ("user", None), "user_attr.numeric": ("user", None)}
