"""The propensity network: an MLP over behaviour, attribute and user-embedding features -> a logit."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dmp_dl.models.dropout import Dropout


class PropensityNet(nn.Module):
    """One logit per user: ``P(convert) = sigmoid(logit)`` before calibration.

    Inputs (see :class:`~dmp_dl.propensity.features.Snapshot`): behaviour (B, F) raw aggregates,
    standardised inside with buffers set by :meth:`fit_normalization`; attribute tokens (B, T)
    embedded and mean-pooled; numeric attributes (B, D), already standardised; and, when
    ``encoder`` is given, the embedding network's history/attribute user vector
    ``encoder.cold_user_vectors(history (B, L), enc_tokens, enc_numeric)`` (B, dim), standardised.

    Parameters
    ----------
    n_behaviour, n_tokens (including padding 0), n_attr_numeric: input sizes.
    encoder: the trained embedding network, or None for no embedding feature.
    encoder_trainable: fine-tune the encoder with the MLP (else it is frozen). Either way it runs in
        eval mode (no id dropout) so the vector of a user is deterministic.
    hidden: MLP widths; dropout: after each hidden layer; token_dim: attribute embedding width.

    ``config`` holds the constructor arguments other than ``encoder`` (JSON-safe), to rebuild it.
    """

    def __init__(self, n_behaviour: int, n_tokens: int, n_attr_numeric: int, encoder: nn.Module | None = None,
                 encoder_trainable: bool = False, hidden: Sequence[int] = (128, 64), dropout: float = 0.2,
                 token_dim: int = 16):
        super().__init__()
        self.config = {"n_behaviour": int(n_behaviour), "n_tokens": int(n_tokens), "n_attr_numeric": int(n_attr_numeric),
                       "encoder_trainable": bool(encoder_trainable), "hidden": [int(h) for h in hidden],
                       "dropout": float(dropout), "token_dim": int(token_dim)}
        self.encoder = encoder
        self.encoder_trainable = bool(encoder_trainable) and encoder is not None
        if encoder is not None:
            for p in encoder.parameters():
                p.requires_grad_(self.encoder_trainable)
        emb_dim = int(encoder.dim) if encoder is not None else 0
        self.register_buffer("behaviour_mean", torch.zeros(n_behaviour))
        self.register_buffer("behaviour_std", torch.ones(n_behaviour))
        self.register_buffer("vector_mean", torch.zeros(emb_dim))
        self.register_buffer("vector_std", torch.ones(emb_dim))
        self.token_emb = nn.Embedding(n_tokens, token_dim, padding_idx=0) if n_tokens > 1 else None
        width = n_behaviour + n_attr_numeric + emb_dim + (token_dim if self.token_emb is not None else 0)
        layers: list[nn.Module] = []
        for h in hidden:
            layers += [nn.Linear(width, int(h)), nn.GELU(), Dropout(dropout)]
            width = int(h)
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def train(self, mode: bool = True) -> "PropensityNet":
        super().train(mode)
        if self.encoder is not None:
            self.encoder.eval()
        return self

    def user_vectors(self, history: torch.Tensor, enc_tokens: torch.Tensor | None = None,
                     enc_numeric: torch.Tensor | None = None) -> torch.Tensor:
        """The embedding network's user vectors (B, dim), before standardisation."""
        with torch.set_grad_enabled(self.encoder_trainable and torch.is_grad_enabled()):
            return self.encoder.cold_user_vectors(history, enc_tokens, enc_numeric).float()

    @torch.no_grad()
    def fit_normalization(self, behaviour: torch.Tensor, vectors: torch.Tensor | None = None) -> None:
        """Standardise with the training users' means and standard deviations: behaviour (N, F),
        vectors (N, dim)."""
        for x, mean, std in ((behaviour, self.behaviour_mean, self.behaviour_std), (vectors, self.vector_mean, self.vector_std)):
            if x is None or x.shape[1] == 0:
                continue
            mean.copy_(x.mean(0))
            std.copy_(x.std(0).nan_to_num(1.0).clamp(min=1e-6) if len(x) > 1 else torch.ones_like(std))

    def forward(self, behaviour: torch.Tensor, attr_tokens: torch.Tensor, attr_numeric: torch.Tensor,
                history: torch.Tensor | None = None, enc_tokens: torch.Tensor | None = None,
                enc_numeric: torch.Tensor | None = None, vectors: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B,). ``vectors``: the users' :meth:`user_vectors` (B, dim), computed once by a
        caller that trains with a frozen encoder, instead of encoding ``history`` at every step."""
        parts = [(behaviour - self.behaviour_mean) / self.behaviour_std, attr_numeric]
        if self.token_emb is not None:
            mask = (attr_tokens != 0).unsqueeze(-1).to(behaviour.dtype)
            parts.append((self.token_emb(attr_tokens) * mask).sum(1) / mask.sum(1).clamp(min=1.0))
        if self.encoder is not None:
            if vectors is None or self.encoder_trainable:
                vectors = self.user_vectors(history, enc_tokens, enc_numeric)
            parts.append((vectors - self.vector_mean) / self.vector_std)
        return self.mlp(torch.cat(parts, dim=-1)).squeeze(-1)
