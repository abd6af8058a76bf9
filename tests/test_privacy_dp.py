"""User-level DP-SGD for the embedding models (two-tower / MF and the default autoencoder): per-user
gradients, clipping, decoupling, accounting."""

from __future__ import annotations

import json
import math
from functools import partial

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from dmp_dl.core.errors import ConfigError
from dmp_dl.data.features import FeatureTable
from dmp_dl.models.autoencoder import UserAutoencoder
from dmp_dl.models.autoencoder_module import AutoencoderModule
from dmp_dl.models.mf import MatrixFactorization
from dmp_dl.models.retrieval import RetrievalModule
from dmp_dl.models.two_tower import TwoTowerNet

pytest.importorskip("opacus", reason="the DP accountant needs the `dp` extra (pip install 'dmp_dl[dp]')")

from dmp_dl.pipeline.run import run  # noqa: E402
from dmp_dl.privacy.dp import DPSGD, DPOptions, _UserLoss, calibrate_noise, epsilon_spent  # noqa: E402
from dmp_dl.privacy.dp_autoencoder import AutoencoderDPSGD  # noqa: E402

N_USERS, N_ITEMS, E, L = 12, 9, 5, 3


def make_module(net, clip=1e3, sigma=0.0, loss="softmax", temperature=0.5):
    options = DPOptions(enabled=True, noise_multiplier=sigma, max_grad_norm=clip, batch_users=N_USERS,
                        num_negatives=64, chunk_users=4)
    engine = DPSGD(options, N_USERS, planned_steps=1)
    module = RetrievalModule(net, partial(torch.optim.SGD, lr=0.1), loss=loss, temperature=temperature,
                             num_negatives=3, dp=engine)
    return module, engine


def make_batch(users, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = len(users)
    weight = torch.ones(b, E)
    weight[:, -1] = 0.0  # a padding slot
    return {"user": torch.as_tensor(users, dtype=torch.int64),
            "item": torch.randint(N_ITEMS, (b, E), generator=g),
            "weight": weight,
            "history": torch.randint(N_ITEMS + 1, (b, E, L), generator=g)}


def two_tower():
    torch.manual_seed(0)
    return TwoTowerNet(N_USERS, N_ITEMS, dim=8, hidden=16, dropout=0.0, id_dropout=0.0, history_len=L).train()


def loop_gradient(module, batch, i):
    """User i's gradient by plain autograd (the reference for the vectorised per-user pass)."""
    h = module.hparams
    wrapper = _UserLoss(module.net, h.loss, h.temperature, 0.0)
    module.net.zero_grad()
    loss = wrapper(batch["user"][i], batch["item"][i], batch["weight"][i], batch["history"][i], torch.arange(N_ITEMS))
    loss.backward()
    return {n: p.grad.clone() for n, p in module.net.named_parameters()}


def test_per_user_gradients_match_autograd_when_nothing_is_clipped():
    module, engine = make_module(two_tower())
    batch = make_batch(range(6))
    grads, _ = engine.clipped_noisy_gradients(module, batch)
    refs = [loop_gradient(module, batch, i) for i in range(6)]
    expected = engine.sample_rate * engine.n_users
    for name, p in module.net.named_parameters():
        want = sum(r[name] for r in refs) / expected
        torch.testing.assert_close(grads["net." + name], want, rtol=1e-4, atol=1e-6)


def test_each_users_contribution_is_clipped_to_max_grad_norm():
    clip = 1e-3
    module, engine = make_module(two_tower(), clip=clip)
    expected = engine.sample_rate * engine.n_users
    for user in range(3):
        grads, _ = engine.clipped_noisy_gradients(module, make_batch([user], seed=user))
        norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values())) * expected
        unclipped = math.sqrt(sum(float(g.pow(2).sum()) for g in loop_gradient(module, make_batch([user], seed=user), 0).values()))
        assert unclipped > clip  # so the bound is the clipping at work
        assert norm == pytest.approx(clip, rel=1e-3)


def test_a_users_contribution_does_not_depend_on_who_else_is_in_the_batch():
    # The in-batch softmax would couple users; the DP loss must not (this is what makes clipping a bound).
    module, engine = make_module(two_tower())
    both = make_batch([0, 1])
    alone = {k: v[:1] for k, v in both.items()}
    other = {k: v[1:] for k, v in both.items()}
    g_both, _ = engine.clipped_noisy_gradients(module, both)
    g_alone, _ = engine.clipped_noisy_gradients(module, alone)
    g_other, _ = engine.clipped_noisy_gradients(module, other)
    for name in g_both:
        torch.testing.assert_close(g_both[name], g_alone[name] + g_other[name], rtol=1e-4, atol=1e-7)


def test_noise_has_the_configured_scale_and_covers_every_parameter():
    sigma, clip = 2.0, 0.5
    module, engine = make_module(MatrixFactorization(N_USERS, N_ITEMS, dim=16), clip=clip, sigma=sigma, loss="bpr")
    torch.manual_seed(1)
    grads, _ = engine.clipped_noisy_gradients(module, make_batch([]))  # an empty Poisson draw: noise only
    expected = engine.sample_rate * engine.n_users
    flat = torch.cat([g.reshape(-1) for g in grads.values()]) * expected
    assert flat.numel() == sum(p.numel() for p in module.net.parameters())
    assert (flat != 0).all()
    assert flat.std().item() == pytest.approx(sigma * clip, rel=0.1)


def test_accountant_calibration_and_monotonicity():
    q, delta = 0.05, 1e-5
    sigma = calibrate_noise(2.0, delta, q, steps=200)
    eps = epsilon_spent(sigma, q, 200, delta)
    assert 1.9 <= eps <= 2.0
    assert epsilon_spent(sigma, q, 400, delta) > eps  # more steps spend more
    assert epsilon_spent(sigma * 2, q, 200, delta) < eps  # more noise spends less
    assert epsilon_spent(0.0, q, 10, delta) == math.inf
    assert epsilon_spent(sigma, q, 0, delta) == 0.0


@pytest.mark.parametrize("bad, message", [
    ({"target_epsilon": None}, "target_epsilon"),
    ({"max_grad_norm": 0}, "max_grad_norm"),
    ({"delta": 2.0}, "delta"),
    ({"batch_users": 0}, "batch_users"),
])
def test_bad_dp_options_name_the_key(bad, message):
    with pytest.raises(ConfigError, match=message):
        DPOptions(enabled=True, **bad)


def test_dp_run_records_epsilon_in_metrics_report_and_manifest(tiny_cfg, tmp_path):
    cfg = tiny_cfg("model=two_tower", "trainer.max_epochs=2", "propensity.enabled=false", "privacy.dp.enabled=true",
                   "privacy.dp.target_epsilon=4", "privacy.dp.batch_users=100", "model.net.use_user_id=false",
                   f"privacy.erasure_list={tmp_path}/erased.txt")
    result = run(cfg)
    out = tmp_path / "run"
    metrics = json.loads((out / "metrics.json").read_text())
    dp = metrics["train"]["privacy"]["dp"]
    assert dp["unit"] == "user" and dp["delta"] == pytest.approx(1e-5)
    assert dp["steps"] == result["trainer"].global_step == 2 * 4  # q = 100 / 400: 4 steps an epoch
    assert 3.5 < dp["epsilon"] <= 4.0  # σ was calibrated for exactly the planned steps
    assert dp["epsilon"] == pytest.approx(epsilon_spent(dp["noise_multiplier"], dp["sample_rate"], dp["steps"], dp["delta"]))
    report = json.loads((out / "report.json").read_text())
    assert report["train"]["privacy"]["dp"]["epsilon"] == dp["epsilon"]
    manifest = json.loads((out / "artifacts" / "manifest.json").read_text())
    assert manifest["privacy"]["dp"]["epsilon"] == dp["epsilon"]
    # the model still learns something under DP: better than a random ranking of the catalogue
    assert metrics["ranking"]["two_tower"]["recall@20"] > 20 / 150


def test_dp_refuses_what_breaks_the_guarantee(tiny_cfg):
    with pytest.raises(ConfigError, match="scheduler"):
        run(tiny_cfg("model=two_tower", "privacy.dp.enabled=true",
                     "model.module.scheduler={_target_:torch.optim.lr_scheduler.StepLR,_partial_:true,step_size:1}"))


def test_dp_with_a_model_that_has_no_dp_training_is_one_line(tiny_cfg):
    with pytest.raises(ConfigError, match="model=ease has no DP training, use model=auto"):
        run(tiny_cfg("model=ease", "privacy.dp.enabled=true"))


# -- the default model's autoencoder ------------------------------------------------------------
AE_USERS, AE_ITEMS = 10, 30


def autoencoder_module(clip=1e3, sigma=0.0, full_softmax_max_items=50_000, variational=False, attributes=None):
    """A small autoencoder with rows attached (user u has 2 + u % 5 items) and its DP engine."""
    torch.manual_seed(0)
    g = np.random.default_rng(0)
    rows = np.zeros((AE_USERS, AE_ITEMS), np.float32)
    for u in range(AE_USERS):
        rows[u, g.choice(AE_ITEMS, 2 + u % 5, replace=False)] = g.uniform(1, 5, 2 + u % 5)
    net = UserAutoencoder(AE_USERS, AE_ITEMS, dim=6, hidden=12, layers=2, dropout=0.0, variational=variational,
                          user_features=attributes, attribute_dropout=0.0, sparse_gradients=False)
    net.attach_rows(sp.csr_matrix(rows)).train()
    options = DPOptions(enabled=True, noise_multiplier=sigma, max_grad_norm=clip, batch_users=AE_USERS,
                        num_negatives=8, chunk_users=3)
    engine = AutoencoderDPSGD(options, AE_USERS, planned_steps=1)
    module = AutoencoderModule(net, partial(torch.optim.SGD, lr=0.1), full_softmax_max_items=full_softmax_max_items,
                               num_negatives=8, dp=engine)
    return module, engine, rows


def batch_loss(module, users):
    """The non-private training loss of ``users`` (AutoencoderModule's, a mean over users), by autograd."""
    net = module.net
    offsets, items, values = net.gather_rows(users)
    mean, _ = net.encode(offsets, items, values, net.known_attributes(users))
    row = torch.bucketize(torch.arange(len(items)), offsets, right=True) - 1
    log_p = torch.log_softmax(net.logits(mean), dim=1)[row, items]
    return -(values * log_p).sum() / len(users)


def user_attributes():
    """Two token columns and one numeric column for AE_USERS users (row AE_USERS: the unknown user)."""
    g = np.random.default_rng(1)
    tokens = np.c_[g.integers(1, 4, AE_USERS + 1), g.integers(4, 6, AE_USERS + 1)]
    tokens[-1] = 0
    numeric = g.normal(size=(AE_USERS + 1, 1)).astype(np.float32)
    numeric[-1] = 0
    return FeatureTable(tokens, numeric, ["a", "b", "c", "x", "y"], ["t1", "t2"], ["n"], [0.0], [1.0])


@pytest.mark.parametrize("attributes", [False, True])
def test_autoencoder_per_user_gradients_are_the_models_own_gradient_when_nothing_is_clipped(attributes):
    module, engine, _ = autoencoder_module(attributes=user_attributes() if attributes else None)
    users = torch.arange(7)
    grads, loss = engine.clipped_noisy_gradients(module, {"user": users})
    module.net.zero_grad()
    reference = batch_loss(module, users)
    (reference * len(users)).backward()  # the sum of the users' gradients
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    expected = engine.sample_rate * engine.n_users
    for name, p in module.net.named_parameters():
        want = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(grads["net." + name] * expected, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("softmax", ["exact", "sampled"])
def test_autoencoder_each_users_gradient_is_clipped_to_max_grad_norm(softmax):
    clip = 1e-3
    module, engine, _ = autoencoder_module(clip=clip, variational=True,
                                           full_softmax_max_items=50_000 if softmax == "exact" else 10)
    expected = engine.sample_rate * engine.n_users
    for user in range(4):
        module.net.zero_grad()
        batch_loss(module, torch.tensor([user])).backward()
        unclipped = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in module.net.parameters() if p.grad is not None))
        assert unclipped > clip  # so the bound is the clipping at work
        grads, loss = engine.clipped_noisy_gradients(module, {"user": torch.tensor([user])})
        norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values())) * expected
        assert math.isfinite(loss.item())
        assert norm == pytest.approx(clip, rel=1e-3)


def test_autoencoder_users_contributions_add_up_independently():
    # one user's clipped gradient is the same whoever else is sampled: the loss couples no users
    module, engine, _ = autoencoder_module(clip=0.05)
    both, _ = engine.clipped_noisy_gradients(module, {"user": torch.tensor([2, 5, 8])})
    parts = [engine.clipped_noisy_gradients(module, {"user": torch.tensor(u)})[0] for u in ([2], [5, 8])]
    for name in both:
        torch.testing.assert_close(both[name], parts[0][name] + parts[1][name], rtol=1e-4, atol=1e-7)


def test_autoencoder_noise_covers_every_parameter_on_an_empty_draw():
    sigma, clip = 2.0, 0.5
    module, engine, _ = autoencoder_module(clip=clip, sigma=sigma)
    torch.manual_seed(1)
    grads, _ = engine.clipped_noisy_gradients(module, {"user": torch.zeros(0, dtype=torch.int64)})
    flat = torch.cat([g.reshape(-1) for g in grads.values()]) * (engine.sample_rate * engine.n_users)
    assert flat.numel() == sum(p.numel() for p in module.net.parameters())
    assert flat.std().item() == pytest.approx(sigma * clip, rel=0.1)


def test_the_default_model_trains_with_dp_and_reports_epsilon(tiny_cfg, tmp_path):
    cfg = tiny_cfg("privacy.dp.enabled=true", "privacy.dp.target_epsilon=4", "privacy.dp.batch_users=100",
                   "trainer.max_epochs=2", "model.dim=16", "model.vae.net.hidden=32", "propensity.enabled=false",
                   f"privacy.erasure_list={tmp_path}/erased.txt")
    run(cfg)
    out = tmp_path / "run"
    metrics = json.loads((out / "metrics.json").read_text())
    dp = metrics["train"]["privacy"]["dp"]
    assert dp["unit"] == "user" and dp["steps"] == 2 * 4  # q = 100 / 400: 4 steps an epoch
    assert 3.5 < dp["epsilon"] <= 4.0
    assert dp["epsilon"] == pytest.approx(epsilon_spent(dp["noise_multiplier"], dp["sample_rate"], dp["steps"], dp["delta"]))
    # the autoencoder alone: no EASE candidate or blend, no refit on every event
    assert metrics["model"]["selected"] == "vae" and list(metrics["model"]["candidates"]) == ["vae"]
    assert metrics["model"]["refit"] is False
    assert metrics["model"]["candidates"]["vae"]["details"]["dense_gradients"] is True
    manifest = json.loads((out / "artifacts" / "manifest.json").read_text())
    assert manifest["privacy"]["dp"]["epsilon"] == dp["epsilon"]
    assert "test" in metrics["model"]["candidates"]["vae"] and "auto" in metrics["ranking"]


def test_dp_plans_ten_epochs_when_max_epochs_is_unset_and_refuses_minus_one():
    from omegaconf import OmegaConf

    from dmp_dl.core.errors import ConfigError
    from dmp_dl.privacy.dp import DEFAULT_DP_EPOCHS, planned_epochs, planned_steps

    assert planned_epochs(OmegaConf.create({"max_epochs": None})) == DEFAULT_DP_EPOCHS == 10
    assert planned_steps(OmegaConf.create({"max_epochs": 3}), 0.25) == 12
    with pytest.raises(ConfigError, match="trainer.max_epochs=-1"):
        planned_epochs(OmegaConf.create({"max_epochs": -1}))
