"""Optimisers: torch's fused Adam where a config leaves the kernel open, and an Adam whose cost
follows the rows a batch touches, not the size of the embedding tables."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

FUSED_DEVICES = ("cpu", "cuda")  # where torch has fused Adam / AdamW kernels


def build_optimizer(factory: Callable[..., torch.optim.Optimizer], params: Iterable) -> torch.optim.Optimizer:
    """``factory(params=params)``; for ``torch.optim.Adam`` / ``AdamW`` whose settings name neither
    ``fused`` nor ``foreach``, with ``fused=True`` when every parameter is a dense floating tensor on
    a device that has the kernel: one kernel for all parameters instead of a loop of elementwise
    ops per tensor (a step of the default autoencoder on a 3,600-item catalogue: 9.5 ms -> 1.6 ms on
    2 CPU cores). The same update rule; the last bits of a result may differ from the looped form.
    ``params``: tensors or parameter groups (dicts with ``params``)."""
    params = list(params)
    target = getattr(factory, "func", factory)
    named = set(getattr(factory, "keywords", None) or {})
    if target not in (torch.optim.Adam, torch.optim.AdamW) or named & {"fused", "foreach"}:
        return factory(params=params)
    if any(isinstance(p, dict) for p in params):
        params = [{**p, "params": list(p["params"])} if isinstance(p, dict) else p for p in params]
    tensors = [t for p in params for t in (p["params"] if isinstance(p, dict) else [p])]
    fusable = bool(tensors) and all(t.device.type in FUSED_DEVICES and t.is_floating_point() and t.layout == torch.strided
                                    for t in tensors)
    return factory(params=params, fused=True) if fusable else factory(params=params)


class LazyAdam(torch.optim.Optimizer):
    """Adam that, for a parameter whose gradient is zero on most rows (an embedding table a batch
    touched a few rows of), updates only the rows with a non-zero gradient.

    ``torch.optim.Adam`` rewrites every row of every table on every step, so a step on 600k user
    rows costs ~300 ms on 2 CPU cores whatever the batch size, and epoch time grows with the square
    of the data. Here the untouched rows keep their parameters and moments (the "lazy" Adam of
    TensorFlow Addons and ``torch.optim.SparseAdam``, with dense gradients, so nothing else — DDP,
    gradient clipping, DP-SGD — has to handle sparse tensors). A parameter with more than
    ``dense_fraction`` of its rows touched, or with fewer than 2 dimensions, gets the ordinary
    Adam update.

    Parameters: as ``torch.optim.Adam`` (``weight_decay`` is the L2 penalty added to the gradient,
    applied to touched rows only).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, dense_fraction: float = 0.5):
        if lr <= 0 or eps <= 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1) or weight_decay < 0:
            raise ValueError(f"LazyAdam: invalid lr={lr}, betas={betas}, eps={eps} or weight_decay={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                                  "dense_fraction": dense_fraction})

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LazyAdam takes dense gradients (use torch.optim.SparseAdam for sparse ones)")
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float64)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = float(state["step"])
                step_size = group["lr"] / (1 - beta1**t)
                bias2_sqrt = math.sqrt(1 - beta2**t)
                rows = self._touched_rows(p.grad, group["dense_fraction"])
                if rows is None:  # ordinary Adam on the whole tensor
                    grad, m, v, target = p.grad, state["exp_avg"], state["exp_avg_sq"], p
                else:
                    grad, m, v, target = p.grad[rows], state["exp_avg"][rows], state["exp_avg_sq"][rows], p[rows]
                if group["weight_decay"]:
                    grad = grad.add(target, alpha=group["weight_decay"])
                m.mul_(beta1).add_(grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                update = m / (v.sqrt() / bias2_sqrt).add_(group["eps"])
                if rows is None:
                    p.add_(update, alpha=-step_size)
                else:
                    state["exp_avg"][rows] = m
                    state["exp_avg_sq"][rows] = v
                    p.index_add_(0, rows, update, alpha=-step_size)
        return loss

    @staticmethod
    def _touched_rows(grad: torch.Tensor, dense_fraction: float) -> torch.Tensor | None:
        """(R,) indices of the rows of ``grad`` with a non-zero entry, or None for a dense update."""
        if grad.dim() < 2:
            return None
        # A row norm is one fast reduction; rows under ~1e-19 underflow to 0 and are skipped (harmless).
        rows = (torch.linalg.vector_norm(grad.flatten(1), dim=1) > 0).nonzero().squeeze(1)
        return None if rows.numel() > dense_fraction * grad.shape[0] else rows
