"""``model=sasrec``: the causal transformer over a user's latest items, its training windows, the
whole training run on a planted sequential pattern, real-time updates of its users and its settings."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from dmp_dl.core.errors import ConfigError
from dmp_dl.data.sequences import TrainSequences
from dmp_dl.models.sasrec import SASRecNet
from dmp_dl.models.sequence_module import SequenceModule
from dmp_dl.pipeline.checks import check_train_config
from dmp_dl.pipeline.run import run
from dmp_dl.realtime import LiveRecommender
from dmp_dl.serving.recommender import Recommender

from .conftest import QUIET_TRAINER, TINY_DATA, compose_cfg


# -- the network ------------------------------------------------------------------------------------
def test_the_output_at_a_position_does_not_depend_on_later_items():
    torch.manual_seed(0)
    net = SASRecNet(n_users=5, n_items=30, dim=16, heads=2, n_layers=2, max_len=12).eval()
    sequence = torch.randint(0, 30, (4, 12))
    sequence[1, :5] = 30  # a short user: padding on the left
    changed = sequence.clone()
    changed[:, 7:] = torch.randint(0, 30, (4, 5))
    with torch.no_grad():
        before, after = net.sequence_states(sequence), net.sequence_states(changed)
    torch.testing.assert_close(before[:, :7], after[:, :7])
    assert not torch.allclose(before[:, 7:], after[:, 7:]), "later positions read the changed items"


def test_padding_is_not_read_and_the_user_vector_is_the_latest_position():
    torch.manual_seed(0)
    net = SASRecNet(n_users=5, n_items=30, dim=16, heads=4, n_layers=1, max_len=10).eval()
    history = torch.tensor([[3, 7, 9, 30, 30, 30, 30, 30, 30, 30]])  # most recent first, padded at the end
    with torch.no_grad():
        vector = net.user_vectors(torch.tensor([0]), history)
        short = net.sequence_states(torch.tensor([[9, 7, 3]]))  # the same items, time order, no padding
        cold = net.cold_user_vectors(history)
    torch.testing.assert_close(vector, short[:, -1])
    torch.testing.assert_close(vector, cold)


@pytest.mark.filterwarnings("ignore:You are trying to .self.log")  # a step outside a Trainer logs nowhere
def test_a_step_in_bf16_mixed_precision_gives_a_finite_loss():
    """``trainer=gpu`` trains in bf16-mixed; CPU autocast runs the same operations in bfloat16."""
    torch.manual_seed(0)
    net = SASRecNet(n_users=5, n_items=30, dim=16, heads=2, n_layers=2, max_len=8)
    module = SequenceModule(net, optimizer=torch.optim.Adam, full_softmax_max_items=10)  # sampled softmax with logQ
    batch = {"sequence": torch.randint(0, 31, (6, 8)), "target": torch.randint(0, 31, (6, 8)), "weight": torch.ones(6, 8)}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(net.item_emb.weight.grad).all()


def test_training_windows_make_every_event_but_the_first_a_target_once():
    user = np.array([0, 1, 0, 0, 1, 0, 0, 0, 0, 2])  # user 0: 7 events, user 1: 2, user 2: 1 (nothing to predict)
    item = np.array([10, 20, 11, 12, 21, 13, 14, 15, 16, 30])
    weight = np.arange(10, dtype=np.float32)
    windows = TrainSequences(user, item, weight, length=3, pad=99)
    batch = windows.__getitems__(list(range(len(windows))))
    targets = batch["target"][batch["target"] != 99].tolist()
    assert sorted(targets) == [11, 12, 13, 14, 15, 16, 21]
    # each target follows its real predecessor; a window's latest item is at its last position
    seq, tgt = batch["sequence"], batch["target"]
    follows = {(int(a), int(b)) for a, b in zip(seq.reshape(-1), tgt.reshape(-1)) if b != 99}
    assert follows == {(10, 11), (11, 12), (12, 13), (13, 14), (14, 15), (15, 16), (20, 21)}
    assert set(tgt[:, -1].tolist()) == {16, 13, 21}
    assert batch["weight"][tgt == 21].tolist() == [4.0]


# -- training on a planted sequential pattern ------------------------------------------------------
def _sessions(n_users: int = 150, n_items: int = 40, seed: int = 0) -> pd.DataFrame:
    """Each user walks the catalogue in order from a random item: item i is always followed by i + 1."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        start, length = int(rng.integers(n_items)), int(rng.integers(10, 16))
        for j in range(length):
            rows.append((f"u{u:04d}", f"i{(start + j) % n_items:03d}", 1_700_000_000 + 86_400 * u + 60 * j))
    return pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sasrec_planted")
    _sessions().to_csv(folder / "events.csv", index=False)
    cfg = compose_cfg([*QUIET_TRAINER, "data=events", f"data.path={folder / 'events.csv'}", "model=sasrec",
                       "data.split.method=leave_last_n", "data.history_len=12", "model.module.batch_sequences=32",
                       "trainer.max_epochs=15", "callbacks.early_stopping.patience=15", "model.module.optimizer.lr=0.005", "model.net.dropout=0.1", "model.refit=false", "logger=none",
                       "propensity.enabled=false", "audience.enabled=false", "evaluation.report=null",
                       f"privacy.erasure_list={folder / 'erased.txt'}", f"privacy.audit_log={folder / 'audit.jsonl'}"],
                      folder / "run")
    return run(cfg)


def test_sasrec_learns_what_comes_next_and_beats_popularity(planted_run):
    ranking = planted_run["metrics"]["ranking"]
    assert ranking["sasrec"]["ndcg@20"] > 0.6, ranking["sasrec"]
    assert ranking["sasrec"]["ndcg@20"] > ranking["popularity"]["ndcg@20"] + 0.4, ranking
    rec = Recommender.load(planted_run["bundle_dir"])
    (top, _), = rec.recommend_for_history([f"i{i:03d}" for i in range(10, 22)], k=1)  # a walk as long as the users'
    assert top == "i022"


# -- real time ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sasrec_bundle(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sasrec_live")
    cfg = compose_cfg([*TINY_DATA, *QUIET_TRAINER, "model=sasrec", "trainer.max_epochs=2", "logger=none",
                       "propensity.enabled=false", "evaluation.report=null",
                       f"privacy.erasure_list={folder / 'erased.txt'}", f"privacy.audit_log={folder / 'audit.jsonl'}"],
                      folder / "run")
    return run(cfg)


def test_one_event_moves_the_user_vector_to_a_fresh_encode_of_the_sequence(sasrec_bundle, tmp_path):
    bundle = tmp_path / "artifacts"
    shutil.copytree(sasrec_bundle["bundle_dir"], bundle)
    with LiveRecommender.load(bundle) as live:
        user = live.user_vocab.ids[3]
        row = live._user_rows[user]
        recent = live._part.recent_items[row]
        recent = live.item_vocab.ids[recent[recent >= 0][::-1]].tolist()  # the latest items, oldest first
        stored = live.user_vectors[row].copy()
        trained, _, _ = live.cold_user_vectors([recent])
        np.testing.assert_allclose(stored, trained[0], rtol=1e-5, atol=1e-5)  # the bundle's vector is the encoder's

        new_item = next(i for i in live.item_vocab.ids.tolist() if i != recent[-1])
        answer = live.ingest([{"user_id": user, "item_id": new_item, "event_type": "click",
                               "timestamp": int(live._part.data_end) + 60}])
        assert answer["accepted"] == 1
        vector = live.live_user(user).vector
        fresh, _, _ = live.cold_user_vectors([[*recent, new_item]])  # the same sequence, encoded afresh
        np.testing.assert_allclose(vector, fresh[0], rtol=1e-5, atol=1e-5)
        assert not np.allclose(vector, stored, atol=1e-4), "the event changed the user vector"

        ranked = live.recommend(user, 5)
        scores = live.item_vectors[[live._item_rows[i] for i, _ in ranked]] @ vector
        np.testing.assert_allclose([s for _, s in ranked], scores, rtol=1e-4, atol=1e-4)
        assert new_item not in [i for i, _ in ranked]


# -- settings -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("model.net.heads=3", r"model.net.heads=3 must divide model.dim=64"),
    ("model.net.n_layers=0", r"model.net.n_layers"),
    ("data.history_len=0", r"data.history_len must be an integer >= 1 for model=sasrec"),
    ("model.module.batch_sequences=0", r"model.module.batch_sequences"),
])
def test_bad_settings_are_refused_with_one_line_before_the_data(tmp_path, override, message):
    cfg = compose_cfg([*TINY_DATA, *QUIET_TRAINER, "model=sasrec", override], tmp_path / "run")
    with pytest.raises(ConfigError, match=message) as caught:
        check_train_config(cfg)
    assert "\n" not in str(caught.value)


def test_sasrec_has_no_private_training(tiny_cfg):
    cfg = tiny_cfg("model=sasrec", "privacy.dp.enabled=true", "trainer.max_epochs=1")
    with pytest.raises(ConfigError, match="model=sasrec has no DP-SGD training"):
        run(cfg)
