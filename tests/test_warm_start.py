"""Warm-starting a network from a previous run's, row by row by id (init_from), and refusing what does not fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dmp_dl.core.errors import ConfigError
from dmp_dl.models import registry
from dmp_dl.models.mf import MatrixFactorization
from dmp_dl.models.two_tower import TwoTowerNet
from dmp_dl.training.warm_start import PreviousNetwork, check_resumable, warm_start


def ids(*names: str) -> np.ndarray:
    return np.asarray(names, dtype=object)


def previous(net: nn.Module, users: np.ndarray, items: np.ndarray) -> PreviousNetwork:
    return PreviousNetwork("day1", type(net).__name__, getattr(net, "dim", None),
                           {k: v.clone() for k, v in net.state_dict().items()}, {"user": users, "item": items})


def test_two_tower_rows_are_copied_by_id_and_new_rows_keep_their_initialisation():
    torch.manual_seed(0)
    old_users, old_items = ids("a", "b", "c"), ids("x", "y")
    new_users, new_items = ids("b", "c", "d", "e"), ids("w", "x", "y")
    old = TwoTowerNet(len(old_users), len(old_items), dim=8, hidden=16, history_len=4)
    new = TwoTowerNet(len(new_users), len(new_items), dim=8, hidden=16, history_len=4)
    fresh = {k: v.clone() for k, v in new.state_dict().items()}
    summary = warm_start(new, previous(old, old_users, old_items), {"user": new_users, "item": new_items})
    ou, nu = old.user_id.weight.detach(), new.user_id.weight.detach()
    torch.testing.assert_close(nu[[0, 1]], ou[[1, 2]])          # b, c by id
    torch.testing.assert_close(nu[[2, 3]], fresh["user_id.weight"][[2, 3]])  # d, e are new
    torch.testing.assert_close(nu[4], ou[3])                     # the unknown-user row
    oi, ni = old.item_id.weight.detach(), new.item_id.weight.detach()
    torch.testing.assert_close(ni[[1, 2]], oi[[0, 1]])           # x, y by id
    torch.testing.assert_close(ni[0], fresh["item_id.weight"][0])  # w is new
    torch.testing.assert_close(ni[3], oi[2])                     # padding row
    torch.testing.assert_close(new.user_mlp[0].weight, old.user_mlp[0].weight)  # no vocabulary axis: same shape, copied
    assert summary["users"] == {"known": 2, "new": 2, "not_in_this_data": 1}
    assert summary["items"] == {"known": 2, "new": 1, "not_in_this_data": 0}
    assert summary["parameters_initialised"] == []


def test_vocab_axes_name_every_user_and_item_table():
    net = TwoTowerNet(5, 7, dim=4, hidden=8)
    axes = net.vocab_axes()
    state = net.state_dict()
    assert axes["user_id.weight"] == ("user", None) and axes["item_id.weight"] == ("item", None)
    for key, names in axes.items():  # every axis named matches a vocabulary (plus the extra rows)
        assert len(names) == state[key].dim()
        for axis, vocab in enumerate(names):
            if vocab is not None:
                assert state[key].shape[axis] == {"user": 5, "item": 7}[vocab] + 1
    assert MatrixFactorization(5, 7, dim=4).vocab_axes() == {"user.weight": ("user", None), "item.weight": ("item", None)}
    # the declaration is the class's: a table a network is built without (no user ids) is simply not there
    without_ids = TwoTowerNet(5, 7, dim=4, use_user_id=False)
    assert "user_id.weight" in TwoTowerNet.vocab_axes() and "user_id.weight" not in without_ids.state_dict()


class ItemItem(nn.Module):
    """A network with an item x item matrix, as closed-form item models have."""

    def __init__(self, n_users: int, n_items: int, dim: int = 0):
        super().__init__()
        self.n_users, self.n_items = n_users, n_items
        self.weights = nn.Parameter(torch.randn(n_items, n_items))

    @classmethod
    def vocab_axes(cls):
        return {"weights": ("item", "item")}


@pytest.fixture
def item_item_registered():
    registry.register_network(fitter="lightning", encodes_users=False)(ItemItem)
    yield
    registry.unregister_network(ItemItem)


def test_an_unregistered_network_is_not_warm_started():
    with pytest.raises(ConfigError, match="ItemItem is not a registered network"):
        warm_start(ItemItem(0, 3), previous(ItemItem(0, 3), ids(), ids("p", "q", "r")),
                   {"user": ids(), "item": ids("p", "q", "r")})


def test_an_item_by_item_matrix_is_remapped_on_both_axes(item_item_registered):
    old_items, new_items = ids("p", "q", "r"), ids("q", "r", "s", "p")
    old, new = ItemItem(0, 3), ItemItem(0, 4)
    before = new.weights.detach().clone()
    warm_start(new, previous(old, ids(), old_items), {"user": ids(), "item": new_items})
    w, o = new.weights.detach(), old.weights.detach()
    pos = {name: i for i, name in enumerate(old_items)}
    for i, a in enumerate(new_items):
        for j, b in enumerate(new_items):
            expected = o[pos[a], pos[b]] if a in pos and b in pos else before[i, j]
            assert w[i, j] == expected, (a, b)


def test_mf_warm_starts_and_other_networks_are_refused_naming_both():
    users, items = ids("a", "b"), ids("x", "y", "z")
    mf = MatrixFactorization(2, 3, dim=8)
    again = MatrixFactorization(3, 3, dim=8)
    warm_start(again, previous(mf, users, items), {"user": ids("b", "c", "a"), "item": items})
    torch.testing.assert_close(again.user.weight.detach()[[0, 2]], mf.user.weight.detach()[[1, 0]])
    with pytest.raises(ConfigError, match=r"init_from: day1 holds a MatrixFactorization with dim 8 and this run builds "
                                          r"a TwoTowerNet with dim 8 \(another class\)"):
        warm_start(TwoTowerNet(2, 3, dim=8), previous(mf, users, items), {"user": users, "item": items})
    with pytest.raises(ConfigError, match=r"holds a MatrixFactorization with dim 8 and this run builds a "
                                          r"MatrixFactorization with dim 16 \(user.weight has shape \(3, 8\) there"):
        warm_start(MatrixFactorization(2, 3, dim=16), previous(mf, users, items), {"user": users, "item": items})


def test_a_changed_attribute_table_starts_its_encoder_fresh():
    from dmp_dl.data.features import FeatureTable

    def table(n_rows: int, n_tokens: int) -> FeatureTable:
        tokens = np.zeros((n_rows + 1, 1), np.int64)
        tokens[:n_rows, 0] = np.arange(n_rows) % (n_tokens - 1) + 1
        return FeatureTable(tokens, np.zeros((n_rows + 1, 0), np.float32), [], [], [], [], [])

    old = TwoTowerNet(3, 2, user_features=table(3, 3), dim=8, hidden=16)
    new = TwoTowerNet(3, 2, user_features=table(3, 4), dim=8, hidden=16)  # one more attribute value
    summary = warm_start(new, previous(old, ids("a", "b", "c"), ids("x", "y")), {"user": ids("a", "b", "c"), "item": ids("x", "y")})
    assert summary["parameters_initialised"] == ["user_attr.token_emb.weight"]
    torch.testing.assert_close(new.user_id.weight, old.user_id.weight)


def test_resuming_a_checkpoint_of_other_vocabularies_points_to_init_from(tmp_path):
    from dmp_dl.training.warm_start import RECORD_KEY

    net = MatrixFactorization(2, 3, dim=4)
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
                RECORD_KEY: {"user": ["a", "b"], "item": ["x", "y", "z"], "class": "MatrixFactorization", "dim": 4}}, path)
    check_resumable(path, net, {"user": ids("a", "b"), "item": ids("x", "y", "z")})  # the same data: fine
    bigger = MatrixFactorization(3, 3, dim=4)
    with pytest.raises(ConfigError, match=rf"ckpt_path: {path} was trained on other users than this data has "
                                          rf"\(2 users there and 3 here\).*init_from={path}"):
        check_resumable(path, bigger, {"user": ids("a", "b", "c"), "item": ids("x", "y", "z")})
    with pytest.raises(ConfigError, match="holds a MatrixFactorization and this run builds a TwoTowerNet"):
        check_resumable(path, TwoTowerNet(2, 3, dim=4), {"user": ids("a", "b"), "item": ids("x", "y", "z")})


# -- retraining end to end: day 1, then day 2 with new users and items ------------------------------
def _days(tmp_path):
    """Day 2's log is day 1's plus 80 users and 40 items day 1 never saw, and a week more of events."""
    import pandas as pd

    from dmp_dl.data.synthetic import SyntheticSource

    events = SyntheticSource(n_users=380, n_items=200, n_events=6000, n_categories=8, n_segments=4, seed=11).load().events
    late = events["timestamp"] > events["timestamp"].max() - 7 * 86400
    new = events["user_id"].isin([f"u{i:06d}" for i in range(300, 380)]) | events["item_id"].isin(
        [f"i{i:05d}" for i in range(160, 200)])
    day1, day2 = tmp_path / "day1.csv", tmp_path / "day2.csv"
    events.loc[~new & ~late].to_csv(day1, index=False)
    events.to_csv(day2, index=False)
    return day1, day2, sorted(set(events.loc[new & ~events["user_id"].isin(pd.unique(events.loc[~new & ~late, "user_id"])), "user_id"]))


def test_day_two_warm_starts_from_day_one_and_serves_its_new_users(tmp_path):
    from dmp_dl import Recommender
    from dmp_dl.pipeline.run import run
    from dmp_dl.training.warm_start import load_previous

    from .conftest import QUIET_TRAINER, compose_cfg

    day1, day2, day2_only = _days(tmp_path)
    assert len(day2_only) > 50
    base = [*QUIET_TRAINER, "data=events", "model=two_tower", "trainer.max_epochs=1", "+trainer.limit_train_batches=3",
            "logger=none", "propensity.enabled=false", "audience.enabled=false", "evaluation.report=null"]
    first = run(compose_cfg([*base, f"data.path={day1}"], tmp_path / "day1"))
    # The nightly command: the day's log, warm-started from yesterday's bundle; ckpt_path=last only
    # matters when this same command is run again after a crash.
    second = run(compose_cfg([*base, f"data.path={day2}", f"init_from={tmp_path / 'day1' / 'artifacts'}",
                              "ckpt_path=last"], tmp_path / "day2"))
    warm = second["metrics"]["train"]["warm_start"]
    n1, n2 = first["datamodule"].n_users, second["datamodule"].n_users
    assert warm["users"] == {"known": n1, "new": n2 - n1, "not_in_this_data": 0} and n2 - n1 == len(day2_only)
    i1, i2 = first["datamodule"].n_items, second["datamodule"].n_items
    assert warm["items"] == {"known": i1, "new": i2 - i1, "not_in_this_data": 0} and i2 - i1 >= 40
    assert "user_id.weight" in warm["parameters_copied"] and "item_id.weight" in warm["parameters_copied"]
    rec = Recommender.load(second["bundle_dir"])
    assert all(len(rec.recommend(u, k=5)) == 5 for u in day2_only[:5])  # day-2-only users are served
    # A checkpoint records its ids, so it warm-starts too.
    ckpt = load_previous(tmp_path / "day1" / "checkpoints" / "last.ckpt")
    assert list(ckpt.vocabs["user"]) == list(first["datamodule"].user_vocab.ids)
    # Resuming day 1's run on day 2's log (the old nightly recipe) is one line that points to init_from.
    with pytest.raises(ConfigError, match=r"ckpt_path: .*last.ckpt was trained on other users and items than this "
                                          r"data has .*init_from="):
        run(compose_cfg([*base, f"data.path={day2}", "ckpt_path=last"], tmp_path / "day1"))


def test_an_incompatible_previous_model_is_one_line_and_exit_2(tmp_path, capsys):
    from dmp_dl.core.cli import report_errors
    from dmp_dl.pipeline.run import run

    from .conftest import compose_cfg

    net = MatrixFactorization(2, 2, dim=8)
    path = tmp_path / "old.ckpt"
    from dmp_dl.training.warm_start import RECORD_KEY

    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
                RECORD_KEY: {"user": ["u1", "u2"], "item": ["i1", "i2"], "class": "MatrixFactorization", "dim": 8}}, path)
    log = tmp_path / "day.csv"
    log.write_text("user_id,item_id,timestamp\n" + "".join(f"u{i % 7},i{i % 5},{1700000000 + i}\n" for i in range(60)))
    cfg = compose_cfg(["data=events", "model=two_tower", f"data.path={log}", f"init_from={path}", "trainer.accelerator=cpu",
                       "logger=none"], tmp_path / "run")
    with pytest.raises(SystemExit) as exited, report_errors():  # what train.py does with an error
        run(cfg)
    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: init_from: {path} holds a MatrixFactorization with dim 8 and this run builds a TwoTowerNet with dim 64 "
        "(another class); a network warm-starts only from one of the same class and width: match the model settings "
        "or train from scratch (init_from=null)"]


def test_the_default_model_warm_starts_by_id_and_serves_day_two_users(tmp_path):
    """The nightly recipe with the default model: the autoencoder's item rows are copied by id from
    yesterday's bundle, today's new items start fresh, today's new users are served."""
    from dmp_dl import Recommender
    from dmp_dl.pipeline.run import run

    from .conftest import QUIET_TRAINER, compose_cfg

    day1, day2, day2_only = _days(tmp_path)
    base = [*QUIET_TRAINER, "data=events", "model.vae.max_epochs=2", "logger=none", "propensity.enabled=false",
            "audience.enabled=false", "evaluation.report=null"]
    first = run(compose_cfg([*base, f"data.path={day1}"], tmp_path / "day1"))
    second = run(compose_cfg([*base, f"data.path={day2}", f"init_from={tmp_path / 'day1' / 'artifacts'}"], tmp_path / "day2"))
    warm = second["metrics"]["train"]["warm_start"]
    i1, i2 = first["datamodule"].n_items, second["datamodule"].n_items
    assert warm["items"] == {"known": i1, "new": i2 - i1, "not_in_this_data": 0}
    assert {"encoder.weight", "item_embedding.weight", "item_bias"} <= set(warm["parameters_copied"])
    rec = Recommender.load(second["bundle_dir"])
    assert all(len(rec.recommend(u, k=5)) == 5 for u in day2_only[:5])
