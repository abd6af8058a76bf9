"""Training examples for sequence models: windows of each user's events, a next-item target at every position."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from dmp_dl.data.grouping import group_bounds, stable_order


class TrainSequences(Dataset):
    """Each user's training events in time order, cut into windows of ``length + 1`` items, batched
    by ``__getitems__`` without per-example Python.

    The windows of a user end at their latest event and step back ``length`` events at a time, so
    consecutive windows share one item and every event but the user's first is a target exactly
    once per epoch. A window shorter than ``length + 1`` (the user's oldest) is padded on the left,
    so the latest item of every window sits at the last position, as it does when a user is encoded
    from their history. A user with one event has nothing to predict and makes no window.

    A batch is a dict: ``sequence`` (B, length) int64, the window's items but the last,
    ``target`` (B, length) int64, the item that followed each position (``pad`` where none),
    ``weight`` (B, length) float32, the target event's type weight (0 where none).
    """

    def __init__(self, user: np.ndarray, item: np.ndarray, weight: np.ndarray, length: int, pad: int):
        if length < 1:
            raise ValueError(f"TrainSequences: length must be >= 1, got {length}")
        order = stable_order(user)
        user, item, weight = user[order], item[order].astype(np.int64), weight[order].astype(np.float32)
        starts, ends = group_bounds(user)
        windows = np.maximum((ends - starts - 1 + length - 1) // length, 0)  # ceil((events - 1) / length)
        owner = np.repeat(np.arange(len(starts)), windows)
        back = np.arange(len(owner)) - np.repeat(np.cumsum(windows) - windows, windows)  # 0: the latest window
        last = ends[owner] - 1 - back * length
        pos = last[:, None] - np.arange(length, -1, -1)  # (W, length + 1) positions, oldest first
        valid = pos >= starts[owner][:, None]
        has_input = np.concatenate([np.zeros((len(pos), 1), bool), valid[:, :-1]], axis=1)  # a target follows a real item
        items = np.where(valid, item[np.maximum(pos, 0)], pad)
        weights = np.where(valid, weight[np.maximum(pos, 0)], 0.0).astype(np.float32)
        self.sequence = torch.from_numpy(np.ascontiguousarray(items[:, :-1]))
        self.target = torch.from_numpy(np.ascontiguousarray(np.where(has_input, items, pad)[:, 1:]))
        self.weight = torch.from_numpy(np.ascontiguousarray(np.where(has_input, weights, 0.0)[:, 1:]))
        self.pad = pad

    def __len__(self) -> int:
        return len(self.sequence)

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return {"sequence": self.sequence[idx], "target": self.target[idx], "weight": self.weight[idx]}

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([i]).items()}
