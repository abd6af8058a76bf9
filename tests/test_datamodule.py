"""The DataModule: batches, histories and evaluation sets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dmp_dl.data.datamodule import InteractionDataModule, last_items
from dmp_dl.data.movielens import MovieLensSource
from dmp_dl.data.synthetic import SyntheticSource


@pytest.fixture(scope="module")
def dm():
    src = SyntheticSource(n_users=300, n_items=120, n_events=9000, seed=5)
    return InteractionDataModule(src, cleaning={"event_weights": {"view": 1, "click": 2, "add_to_cart": 3, "purchase": 5}},
                                 batch_size=256, history_len=5).prepare()


def test_training_batch_shapes_and_history(dm):
    loader = dm.train_dataloader()
    batch = next(iter(loader))
    assert batch["user"].shape == batch["item"].shape == batch["weight"].shape == (256,)
    assert batch["history"].shape == (256, 5)
    assert batch["user"].dtype == batch["item"].dtype == batch["history"].dtype == torch.int64
    assert batch["weight"].dtype == torch.float32
    assert set(batch["weight"].unique().tolist()) <= {1.0, 2.0, 3.0, 5.0}
    # the history of an example is the same user's previous training items, most recent first
    ds = dm.train_dataset()
    u, it = ds.user.numpy(), ds.item.numpy()
    for i in np.random.default_rng(0).choice(len(ds), 50, replace=False):
        ex = ds[int(i)]
        earlier = [it[j] for j in range(i - 1, -1, -1) if u[j] == u[i]][:5]
        expected = earlier + [dm.n_items] * (5 - len(earlier))
        assert ex["history"].tolist() == expected


def test_workers_give_the_same_examples(dm):
    dm.num_workers = 2
    try:
        seen = torch.cat([b["item"] for b in dm.train_dataloader()])
    finally:
        dm.num_workers = 0
    assert len(seen) == len(dm.train_idx)
    assert torch.equal(seen.sort().values, dm.train_dataset().item.sort().values)


def test_eval_sets_exclude_seen_and_unknown(dm):
    rep = dm.report.split
    assert rep["events"]["train"] + rep["events"]["val"] + rep["events"]["test"] == len(dm.events)
    seen = dm.train_seen.toarray() > 0
    rel = dm.val_relevant.toarray() > 0
    assert not (seen & rel).any()  # held-out items were not seen in training
    assert rel[dm.val_users].any(axis=1).all()
    batch = dm.eval_dataset("val").__getitems__([0, 1, 2])
    u = batch["user"].numpy()
    assert set(zip(batch["rel_rows"].tolist(), batch["rel_cols"].tolist())) == {
        (r, c) for r in range(3) for c in np.flatnonzero(rel[u[r]])
    }
    test_excl = dm.test_seen.toarray() > 0
    assert (test_excl >= seen).all()  # test also excludes what was seen in validation


def test_last_items():
    user = np.array([0, 1, 0, 0, 1])
    item = np.array([5, 6, 7, 8, 9])
    out = last_items(user, item, n_users=3, length=2, pad=-1)
    assert out.tolist() == [[8, 7], [9, 6], [-1, -1]]


def test_movielens_fixture_formats(tmp_path):
    d100 = tmp_path / "ml100"
    d100.mkdir()
    (d100 / "u.data").write_text("1\t10\t4\t881250949\n2\t10\t2\t881250950\n")
    genres = "|".join(["0"] * 19)
    (d100 / "u.item").write_bytes(f"10|Caf\xe9 (1995)|01-Jan-1995||http://x|{genres}\n".replace("|0|0", "|1|0", 1).encode("latin-1"))
    (d100 / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\n")
    d1m = tmp_path / "ml1m"
    d1m.mkdir()
    (d1m / "ratings.dat").write_text("1::10::5::978300760\n")
    (d1m / "movies.dat").write_text("10::Toy Story (1995)::Animation|Comedy\n")
    d20 = tmp_path / "ml20"
    d20.mkdir()
    (d20 / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,10,3.5,1112486027\n")
    (d20 / "movies.csv").write_text("movieId,title,genres\n10,Jumanji (1995),Adventure|Children\n")
    for d, n in ((d100, 2), (d1m, 1), (d20, 1)):
        log = MovieLensSource(str(d)).load()
        assert len(log.events) == n and log.items is not None
    assert MovieLensSource(str(d1m)).load().items.loc[0, "year"] == 1995.0


def test_movielens_100k_real(ml100k_path):
    dm = InteractionDataModule(MovieLensSource, path=str(ml100k_path), cleaning={"min_value": 4}).prepare()
    ev = dm.report.events
    assert ev.rows_in == 100_000
    assert ev.rows_out == 55_375 and ev.dropped == {"below_min_value": 44_625}
    assert dm.item_features.n_tokens > 19  # genres
    assert dm.user_features.numeric_columns == ["age"]


def test_under_data_parallel_training_a_step_of_all_processes_is_one_batch(dm):
    from types import SimpleNamespace

    try:
        dm.trainer = SimpleNamespace(world_size=2, lightning_module=None)
        assert dm.train_dataloader().batch_size == 128  # 256 shared out over 2 processes
        dm.trainer = SimpleNamespace(world_size=3, lightning_module=None)
        assert dm.train_dataloader().batch_size == 86  # rounded up: no example left out of a step
        windows = SimpleNamespace(train_examples=lambda d: (d.train_dataset(), 100))
        dm.trainer = SimpleNamespace(world_size=2, lightning_module=windows)
        assert dm.train_dataloader().batch_size == 50  # a module's own examples are shared out too
        dm.trainer = SimpleNamespace(world_size=1, lightning_module=None)
        assert dm.train_dataloader().batch_size == 256
    finally:
        dm.trainer = None
