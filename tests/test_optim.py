"""LazyAdam (ordinary Adam on dense gradients, SparseAdam's row-wise update on embedding gradients), and
build_optimizer: torch's fused Adam where a config leaves the kernel open."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from dmp_dl.models.optim import LazyAdam, build_optimizer


def test_matches_adam_when_every_row_has_a_gradient():
    torch.manual_seed(0)
    reference = torch.nn.Parameter(torch.randn(40, 8))
    lazy = torch.nn.Parameter(reference.detach().clone())
    bias_ref = torch.nn.Parameter(torch.randn(8))
    bias_lazy = torch.nn.Parameter(bias_ref.detach().clone())
    adam = torch.optim.Adam([reference, bias_ref], lr=0.01, weight_decay=0.1)
    mine = LazyAdam([lazy, bias_lazy], lr=0.01, weight_decay=0.1)
    for _ in range(6):
        grad, grad_bias = torch.randn(40, 8), torch.randn(8)
        reference.grad, lazy.grad = grad.clone(), grad.clone()
        bias_ref.grad, bias_lazy.grad = grad_bias.clone(), grad_bias.clone()
        adam.step()
        mine.step()
    torch.testing.assert_close(lazy, reference)
    torch.testing.assert_close(bias_lazy, bias_ref)


def test_updates_only_touched_rows_like_sparse_adam():
    torch.manual_seed(1)
    reference = torch.nn.Parameter(torch.randn(500, 4))
    lazy = torch.nn.Parameter(reference.detach().clone())
    sparse_adam = torch.optim.SparseAdam([reference], lr=0.05)
    mine = LazyAdam([lazy], lr=0.05)
    never_touched = torch.arange(450, 500)
    before = lazy.detach()[never_touched].clone()
    for _ in range(5):
        rows = torch.randperm(450)[:20]
        values = torch.randn(20, 4)
        reference.grad = torch.sparse_coo_tensor(rows[None], values, (500, 4))
        dense = torch.zeros(500, 4)
        dense[rows] = values
        lazy.grad = dense
        sparse_adam.step()
        mine.step()
    torch.testing.assert_close(lazy, reference, rtol=1e-5, atol=1e-6)
    assert torch.equal(lazy.detach()[never_touched], before)  # and their moments stay zero
    assert torch.count_nonzero(mine.state[lazy]["exp_avg"][never_touched]) == 0


def test_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    param = torch.nn.Parameter(torch.randn(30, 3))
    opt = LazyAdam([param], lr=0.01)
    param.grad = torch.randn(30, 3)
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    restored = LazyAdam([torch.nn.Parameter(param.detach().clone())], lr=0.01)
    restored.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    assert float(restored.state_dict()["state"][0]["step"]) == 1.0


@pytest.mark.parametrize("kwargs", [{"lr": 0.0}, {"betas": (1.0, 0.9)}, {"eps": -1.0}, {"weight_decay": -0.1}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError, match="LazyAdam"):
        LazyAdam([torch.nn.Parameter(torch.zeros(2, 2))], **kwargs)


def test_adam_left_open_gets_the_fused_kernel_and_the_same_steps():
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(30, 4)), torch.nn.Parameter(torch.randn(4))]
    looped = [torch.nn.Parameter(w.detach().clone()) for w in weights]
    fused = build_optimizer(partial(torch.optim.Adam, lr=0.01), weights)
    reference = torch.optim.Adam(looped, lr=0.01)
    assert fused.defaults["fused"] is True and not reference.defaults["fused"]
    for _ in range(5):
        grads = [torch.randn_like(w) for w in weights]
        for w, l, g in zip(weights, looped, grads):
            w.grad, l.grad = g.clone(), g.clone()
        fused.step()
        reference.step()
    for w, l in zip(weights, looped):
        torch.testing.assert_close(w, l)
    # a kernel the settings name, another optimiser, parameter groups
    assert not build_optimizer(partial(torch.optim.Adam, lr=0.01, foreach=False), weights).defaults["fused"]
    assert isinstance(build_optimizer(partial(torch.optim.SGD, lr=0.1), weights), torch.optim.SGD)
    grouped = build_optimizer(partial(torch.optim.AdamW, lr=0.01),
                              [{"params": iter(weights[:1])}, {"params": weights[1:], "lr": 0.5}])
    assert grouped.defaults["fused"] is True
    assert [len(g["params"]) for g in grouped.param_groups] == [1, 1] and grouped.param_groups[1]["lr"] == 0.5
