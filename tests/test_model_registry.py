"""The network registry: what every registered network promises, and a new network that joins
through the registry alone (defined here, not in the package) and then trains, exports, serves,
erases and warm-starts like the built-in ones."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from torch import nn

from dmp_dl import Recommender
from dmp_dl.core.errors import BundleError, ConfigError
from dmp_dl.data.vocab import IdVocab
from dmp_dl.models import registry
from dmp_dl.pipeline.run import run
from dmp_dl.privacy.erasure import erase_rows
from dmp_dl.store.bundle import NETWORK_SPEC, NETWORK_WEIGHTS, Bundle
from dmp_dl.training.fitters import FITTERS, fitter_of
from dmp_dl.training.warm_start import load_previous, warm_start

from .conftest import CONF_DIR, QUIET_TRAINER, TINY_DATA, compose_cfg

N_USERS, N_ITEMS = 11, 7  # sizes that no other axis of the built-in networks has by default


# -- what every registered network promises ---------------------------------------------------------
@pytest.mark.parametrize("name", sorted(registry.networks()))
def test_every_per_user_table_is_declared(name):
    """Erasure removes the rows the registry names and nothing else: a per-user table left out of
    the declaration would keep erased users' rows. Every tensor with a row per user (plus the
    unknown user) must be declared user-aligned, and every declared axis must have that size."""
    entry = registry.networks()[name]
    net = entry.cls(n_users=N_USERS, n_items=N_ITEMS)
    state = net.state_dict()
    users, items = entry.tables("user"), entry.tables("item")
    for key, tensor in state.items():
        if tensor.ndim and tensor.shape[0] == N_USERS + 1:
            assert key in users, f"{name}.{key} has a row per user but is not declared user-aligned"
    for key, axis in users.items():
        if key in state:
            assert state[key].shape[axis] == N_USERS + 1, key
    for key, axis in items.items():
        if key in state:
            assert state[key].shape[axis] == N_ITEMS + 1, key
    assert entry.fitter in FITTERS


@pytest.mark.parametrize("model", sorted(p.stem for p in Path(CONF_DIR, "model").glob("*.yaml")))
def test_every_model_config_declares_the_fitter_of_its_network(model):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"model={model}"])
    fitter = fitter_of(cfg)
    target = fitter.network_config(cfg)["_target_"]
    entry = registry.registered(target.rsplit(".", 1)[1])
    assert entry is not None and f"{entry.cls.__module__}.{entry.cls.__name__}" == target
    assert entry.fitter == fitter.name == cfg.model.fitter


def test_a_model_config_without_a_known_fitter_is_refused_before_the_data(tiny_cfg):
    cfg = tiny_cfg("model=mf")
    with open_dict(cfg):
        cfg.model.fitter = "gradient_free"
    with pytest.raises(ConfigError, match=r"model.fitter must be one of lightning \| auto"):
        run(cfg)
    cfg = tiny_cfg("model=mf", "model.fitter=auto")  # mf's YAML has no model.ease for the automatic choice
    with pytest.raises(ConfigError, match=r"model.fitter=auto reads model.ease, which this model config does not have"):
        run(cfg)
    cfg = tiny_cfg("model=vae", "model.fitter=lightning", "+model.net=${model.vae.net}", "+model.module=${model.vae.module}")
    with pytest.raises(ConfigError, match="UserAutoencoder is trained by model.fitter=auto"):
        run(cfg)
    assert not (Path(cfg.paths.output_dir) / "data_quality.json").exists()


def test_registration_checks_the_declaration():
    class NoAxes(nn.Module):
        def vocab_axes(self):  # an instance method: the registry cannot read it without building one
            return {}

    with pytest.raises(TypeError, match="vocab_axes"):
        registry.register_network(fitter="lightning", encodes_users=False)(NoAxes)

    class TwoTowerNet(nn.Module):  # another class under a registered name
        @classmethod
        def vocab_axes(cls):
            return {}

    with pytest.raises(ValueError, match="already registered"):
        registry.register_network(fitter="lightning", encodes_users=False)(TwoTowerNet)
    assert registry.registered("TwoTowerNet").cls is not TwoTowerNet


# -- a network that joins through the registry alone ----------------------------------------------
class ToyNet(nn.Module):
    """Matrix factorisation whose user table is stored transposed, (dim, n_users + 1): its user
    axis is the second one, which only the declaration says."""

    normalized = False

    def __init__(self, n_users: int, n_items: int, dim: int = 8, **_unused):
        super().__init__()
        self.n_users, self.n_items, self.dim = n_users, n_items, dim
        self.user_t = nn.Parameter(0.1 * torch.randn(dim, n_users + 1))
        self.item = nn.Embedding(n_items + 1, dim, padding_idx=n_items)
        nn.init.normal_(self.item.weight, std=0.1)

    @classmethod
    def vocab_axes(cls) -> dict[str, tuple[str | None, ...]]:
        return {"user_t": (None, "user"), "item.weight": ("item", None)}

    def user_vectors(self, user: torch.Tensor, history: torch.Tensor | None = None) -> torch.Tensor:
        return self.user_t[:, user].T

    def item_vectors(self, item: torch.Tensor) -> torch.Tensor:
        return self.item(item)

    def cold_user_vectors(self, history: torch.Tensor, tokens=None, numeric=None) -> torch.Tensor:
        mask = (history != self.n_items).unsqueeze(-1).float()
        return (self.item(history) * mask).sum(1) / mask.sum(1).clamp(min=1.0)


TOY = [f"model.net._target_={ToyNet.__module__}.ToyNet", "model.name=toy", "model.dim=8"]


@pytest.fixture(scope="module")
def toy_registered():
    registry.register_network(fitter="lightning", encodes_users=True)(ToyNet)
    yield
    registry.unregister_network(ToyNet)


@pytest.fixture(scope="module")
def toy_run(toy_registered, tmp_path_factory) -> dict:
    """The toy network trained by the default pipeline with the mf settings (propensity, audience)."""
    out = tmp_path_factory.mktemp("toy") / "run"
    cfg = compose_cfg([*TINY_DATA, *QUIET_TRAINER, "model=mf", *TOY, "trainer.max_epochs=4", "logger=none",
                       "evaluation.report=null", "propensity.trainer.max_epochs=2", "~propensity.baselines"], out)
    return run(cfg)


def test_a_registered_network_trains_and_exports(toy_run):
    metrics = toy_run["metrics"]
    assert metrics["train"]["refit"]["done"] and metrics["train"]["epochs"] >= 1
    assert metrics["ranking"]["toy"]["recall@20"] > 20 / 150  # better than a random ranking of the 150 items
    bundle = Bundle.open(toy_run["bundle_dir"])
    assert bundle.manifest["network"]["class"] == "ToyNet"
    rec = Recommender.load(toy_run["bundle_dir"])
    assert isinstance(rec.network, ToyNet)
    trained = toy_run["module"].net.state_dict()
    for key, value in rec.network.state_dict().items():
        torch.testing.assert_close(value, trained[key].cpu())
    np.testing.assert_allclose(rec.user_vectors, rec.network.user_t.detach().T[:-1].numpy(), rtol=1e-6)
    assert len(rec.recommend_for_history(rec.item_vocab.ids[:3].tolist(), k=5)) == 5
    assert bundle.manifest["propensity"]["embedding"] == "frozen"  # encodes users: the propensity feature
    assert bundle.json("propensity/propensity.json")["encoder"]["class"] == "ToyNet"


def test_erasure_removes_exactly_the_declared_rows(toy_run, tmp_path):
    copy = Path(shutil.copytree(toy_run["bundle_dir"], tmp_path / "b"))
    before = Bundle.open(copy)
    net_before, prop_before = before.torch_state(NETWORK_WEIGHTS), before.torch_state("propensity/weights.pt")
    n = len(IdVocab.load(copy / "users.json"))
    rows = np.array([0, 5, n - 1])
    keep = np.r_[np.setdiff1d(np.arange(n), rows), n]  # the kept users and the unknown-user column
    result = erase_rows(before, rows)
    after = Bundle.open(copy)
    net_after, prop_after = after.torch_state(NETWORK_WEIGHTS), after.torch_state("propensity/weights.pt")
    torch.testing.assert_close(net_after["user_t"], net_before["user_t"][:, keep])
    assert set(net_after) == set(net_before)
    for key in set(net_before) - {"user_t"}:  # nothing else of the network changes
        assert torch.equal(net_after[key], net_before[key]), key
    torch.testing.assert_close(prop_after["encoder.user_t"], prop_before["encoder.user_t"][:, keep])
    for key in set(prop_before) - {"encoder.user_t"}:
        assert torch.equal(prop_after[key], prop_before[key]), key
    assert result["removed"][NETWORK_WEIGHTS] == "rows of user_t"
    assert result["removed"]["propensity/weights.pt"] == "rows of encoder.user_t"
    assert after.json(NETWORK_SPEC)["n_users"] == n - 3
    assert Recommender.load(copy).n_users == n - 3


def test_erasure_refuses_a_network_class_that_is_not_registered(toy_run, tmp_path):
    copy = Path(shutil.copytree(toy_run["bundle_dir"], tmp_path / "b"))
    files = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    registry.unregister_network(ToyNet)
    try:
        with pytest.raises(BundleError, match=r"network class 'ToyNet' is not registered .*per-user rows are unknown"):
            erase_rows(Bundle.open(copy), np.array([1]))
    finally:
        registry.register_network(fitter="lightning", encodes_users=True)(ToyNet)
    assert {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()} == files  # nothing was changed
    assert not list(tmp_path.glob(".b.*"))


def test_a_registered_network_warm_starts_by_id(toy_run, tmp_path):
    previous = load_previous(toy_run["bundle_dir"])
    old_users = list(previous.vocabs["user"])
    # a new run whose users are the old ones in another order, less two, plus three new ones
    new_users = np.asarray([*old_users[2:][::-1], "new1", "new2", "new3"], dtype=object)
    items = previous.vocabs["item"]
    net = ToyNet(len(new_users), len(items), dim=8)
    fresh = net.user_t.detach().clone()
    summary = warm_start(net, previous, {"user": new_users, "item": items})
    assert summary["parameters_copied"] == ["user_t", "item.weight"]
    assert summary["users"] == {"known": len(old_users) - 2, "new": 3, "not_in_this_data": 2}
    position = {u: i for i, u in enumerate(old_users)}
    old = previous.state["user_t"]
    for i, user in enumerate(new_users):
        expected = old[:, position[user]] if user in position else fresh[:, i]
        torch.testing.assert_close(net.user_t.detach()[:, i], expected)
    torch.testing.assert_close(net.item.weight.detach(), previous.state["item.weight"])

    cfg = compose_cfg([*TINY_DATA, *QUIET_TRAINER, "model=mf", *TOY, "trainer.max_epochs=1", "logger=none",
                       "evaluation.report=null", "propensity.enabled=false", "audience.enabled=false",
                       "model.refit=false", f"init_from={toy_run['bundle_dir']}"], tmp_path / "day2")
    warm = run(cfg)["metrics"]["train"]["warm_start"]
    assert warm["parameters_copied"] == ["user_t", "item.weight"] and warm["users"]["new"] == 0
