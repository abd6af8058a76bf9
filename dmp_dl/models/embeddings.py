"""Computing user and item vectors from a trained retrieval network."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def inference_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def user_vectors(net: nn.Module, users: np.ndarray, history: np.ndarray, batch_size: int = 8192,
                 device: torch.device | None = None) -> np.ndarray:
    """Vectors of ``users`` (N,) given their recent items ``history`` (N, L). Returns (N, dim) float32."""
    device = device or next(net.parameters()).device
    out = []
    for s in range(0, len(users), batch_size):
        u = torch.as_tensor(users[s : s + batch_size], device=device)
        h = torch.as_tensor(history[s : s + batch_size], device=device)
        out.append(net.user_vectors(u, h).float().cpu())
    return np.ascontiguousarray(torch.cat(out).numpy() if out else np.zeros((0, net.dim), np.float32), dtype=np.float32)


@torch.no_grad()
def item_vectors(net: nn.Module, n_items: int, batch_size: int = 65536, device: torch.device | None = None) -> np.ndarray:
    """Vectors of all items, (n_items, dim) float32."""
    device = device or next(net.parameters()).device
    ids = torch.arange(n_items, device=device)
    out = [net.item_vectors(ids[s : s + batch_size]).float().cpu() for s in range(0, n_items, batch_size)]
    return np.ascontiguousarray(torch.cat(out).numpy(), dtype=np.float32)


def export_embeddings(net: nn.Module, history: np.ndarray, device: torch.device | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(user vectors (n_users, dim), item vectors (n_items, dim)) in eval mode.

    ``history`` (n_users, L) is each user's most recent items, so the user vectors reflect
    everything known about the user (models that ignore history ignore it).
    """
    device = device or inference_device()
    was_training = net.training
    net.to(device).eval()
    try:
        users = user_vectors(net, np.arange(history.shape[0]), history, device=device)
        items = item_vectors(net, net.n_items, device=device)
    finally:
        net.train(was_training)
    return users, items
