"""Retrieval losses over a batch of (user vector, positive item vector) pairs."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _weighted_mean(loss: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    if weight is None:
        return loss.mean()
    return (loss * weight).sum() / weight.sum().clamp(min=1e-12)


def sampled_softmax_loss(
    user: torch.Tensor,
    pos: torch.Tensor,
    pos_ids: torch.Tensor,
    temperature: float = 1.0,
    log_q: torch.Tensor | None = None,
    neg: torch.Tensor | None = None,
    neg_ids: torch.Tensor | None = None,
    n_items: int | None = None,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """In-batch sampled softmax with logQ correction (Yi et al., RecSys 2019).

    Each user's positive competes against the other positives in the batch (and optional extra
    uniformly drawn negatives). Sampled items are over-represented in proportion to their
    popularity, so each candidate's logit is lowered by log of its expected count in the pool,
    ``log(B * q_j + M / n_items)`` for a batch of B with M uniform negatives (mixed negative
    sampling); the same item appearing as another row's positive (an accidental hit) is masked.

    Parameters
    ----------
    user: (B, d) user vectors; pos: (B, d) positive item vectors; pos_ids: (B,) their indices.
    temperature: logits are divided by it.
    log_q: (n_items,) log of each item's share of training events, or None (no correction).
    neg, neg_ids: (M, d) and (M,) uniform negatives, or None.
    n_items: catalogue size (needed with negatives and log_q).
    weight: (B,) per-example weights (event-type weights), or None.
    """
    b = user.shape[0]
    cand, cand_ids = pos, pos_ids
    if neg is not None:
        cand, cand_ids = torch.cat([pos, neg]), torch.cat([pos_ids, neg_ids])
    logits = (user / temperature) @ cand.T  # (B, B + M); scaling the (B, d) side is cheaper
    if log_q is not None:
        m = 0 if neg is None else neg.shape[0]
        expected = b * torch.exp(log_q[cand_ids])
        if m:
            expected = expected + m / float(n_items)
        logits = logits - torch.log(expected)
    accidental = pos_ids[:, None] == cand_ids[None, :]
    accidental[:, :b].fill_diagonal_(False)
    logits = logits.masked_fill(accidental, float("-inf"))
    target = torch.arange(b, device=user.device)
    return _weighted_mean(F.cross_entropy(logits.float(), target, reduction="none"), weight)


def full_softmax_loss(
    user: torch.Tensor, items: torch.Tensor, pos_ids: torch.Tensor, temperature: float = 1.0,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact softmax over the whole catalogue: no sampling, so no sampling bias to correct.

    user: (B, d); items: (n_items, d) all item vectors; pos_ids: (B,) the positives' indices.
    """
    logits = (user / temperature) @ items.T
    return _weighted_mean(F.cross_entropy(logits.float(), pos_ids, reduction="none"), weight)


def bpr_loss(
    user: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Bayesian personalised ranking: -log sigmoid(s(u, i+) - s(u, i-)).

    user, pos: (B, d); neg: (B, K, d) negatives per example (averaged over K).
    """
    s_pos = (user * pos).sum(-1, keepdim=True)  # (B, 1)
    s_neg = torch.einsum("bd,bkd->bk", user, neg)
    return _weighted_mean(-F.logsigmoid(s_pos - s_neg).mean(dim=1), weight)
