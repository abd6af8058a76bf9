"""Dropout with byte masks (dmp_dl.models.dropout): the share dropped, the expectation kept, the
gradient, the seed, and attention that equals the fused kernel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dmp_dl.models.dropout import Dropout, attention, dropout, dropped_bytes


@pytest.mark.parametrize("p", [0.1, 0.2, 0.5])
def test_the_dropped_share_is_p_to_a_256th_and_the_expectation_is_kept(p):
    torch.manual_seed(0)
    x = torch.ones(1_000_000)
    y = dropout(x, p)
    share = dropped_bytes(p) / 256
    assert abs(share - p) <= 1 / 512
    assert abs(float((y == 0).float().mean()) - share) < 0.003
    assert torch.allclose(y[y != 0], torch.tensor(1 / (1 - share)))
    assert abs(float(y.mean()) - 1.0) < 0.005  # each element's expectation is its value


def test_off_while_evaluating_or_at_zero_and_the_seed_fixes_the_mask():
    x = torch.randn(64, 33)
    assert dropout(x, 0.3, training=False) is x and dropout(x, 0.0) is x
    layer = Dropout(0.3).eval()
    assert layer(x) is x
    torch.manual_seed(7)
    first = dropout(x, 0.3)
    torch.manual_seed(7)
    assert torch.equal(dropout(x, 0.3), first)
    assert not torch.equal(dropout(x, 0.3), first)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        Dropout(1.0)


def test_the_gradient_is_the_mask_times_the_scale():
    torch.manual_seed(1)
    x = torch.randn(50, 40, dtype=torch.float64, requires_grad=True)
    y = dropout(x, 0.25)
    (grad,) = torch.autograd.grad(y.sum(), x)
    kept = y.detach() != 0
    assert torch.allclose(grad, kept.to(grad.dtype) * (256 / (256 - dropped_bytes(0.25))))


def test_attention_on_a_cpu_with_dropout_computes_what_the_fused_kernel_does():
    """With a rate below 1/512 no byte drops an element, so the CPU path that computes the weights
    itself must give the fused kernel's output, and so its gradients; with dropout on, dropped
    weights leave rows that no longer sum to one."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 6, 4, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    real = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6, [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    allowed = ((torch.ones(6, 6, dtype=torch.bool).tril() & real[:, None, :]) | torch.eye(6, dtype=torch.bool)).unsqueeze(1)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    got = attention(q, k, v, allowed, p=0.001, training=True)
    assert dropped_bytes(0.001) == 0
    assert torch.allclose(got, want)
    for g, e in zip(torch.autograd.grad(got.sum(), (q, k, v)), torch.autograd.grad(want.sum(), (q, k, v))):
        assert torch.allclose(g, e)
    assert torch.equal(attention(q, k, v, allowed, p=0.5, training=False), want)
    torch.manual_seed(0)
    ones = torch.ones(3, 2, 6, 1, dtype=torch.float64)
    row_sums = attention(q.detach(), k.detach(), ones, allowed, p=0.5, training=True)
    assert not torch.allclose(row_sums, torch.ones_like(row_sums))
