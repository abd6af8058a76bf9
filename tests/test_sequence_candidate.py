"""The sequence candidate of the default model (``sasrec`` in ``model.candidates``): it is served where
the order of events is what predicts the next item, says why in ``metrics.json`` and the report, and
is left out (with its reason) where it cannot learn an order or would cost too much."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from dmp_dl.core.errors import ConfigError
from dmp_dl.models.sasrec import SASRecNet
from dmp_dl.models.scoring import rows_matrix
from dmp_dl.pipeline.checks import check_train_config
from dmp_dl.pipeline.run import run
from dmp_dl.realtime import LiveRecommender
from dmp_dl.serving.recommender import Recommender
from dmp_dl.training.sequence_candidate import BehindBest, skip_reason

from .conftest import QUIET_TRAINER, TINY_DATA, compose_cfg


def _walks(n_users: int = 200, n_items: int = 60, seed: int = 0, times: bool = True) -> pd.DataFrame:
    """Each user walks the catalogue in one fixed random order, in three stretches from random items:
    what follows an item is always the same item, but only the latest stretch says where the user
    goes next (the items alone point at the ends of every stretch, both ways)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_items)
    rows = []
    for u in range(n_users):
        walk = [order[(start + j) % n_items] for start, length in rng.integers((0, 4), (n_items, 7), size=(3, 2))
                for j in range(length)]
        rows += [(f"u{u:04d}", f"i{item:03d}", 1_700_000_000 + 86_400 * u + 60 * j) for j, item in enumerate(walk)]
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    return frame if times else frame.drop(columns="timestamp")


def _cfg(folder, *extra: str):
    return compose_cfg([*QUIET_TRAINER, "data=events", f"data.path={folder / 'events.csv'}",
                        "data.split.method=leave_last_n", "data.history_len=12", "model.sequence.module.batch_sequences=32",
                        "model.sequence.module.optimizer.lr=0.005",
                        "model.sequence.net.dropout=0.1", "logger=none", "propensity.enabled=false", "audience.enabled=false",
                        f"privacy.erasure_list={folder / 'erased.txt'}", f"privacy.audit_log={folder / 'audit.jsonl'}",
                        *extra], folder / "run")


@pytest.fixture(scope="module")
def walks_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sequence_candidate")
    walks = _walks()
    walks.to_csv(folder / "events.csv", index=False)
    return run(_cfg(folder)), walks, folder / "run"


def test_the_sequence_model_is_served_where_the_order_predicts_the_next_item(walks_run):
    result, walks, output = walks_run
    metrics = json.loads((output / "metrics.json").read_text())
    model = metrics["model"]
    assert model["selected"] == "sasrec", model["why"]
    val = {n: c["val"]["ndcg@20"] for n, c in model["candidates"].items() if c.get("val")}
    assert val["sasrec"] == max(val.values()) and set(val) == {"vae", "ease", "vae+ease", "sasrec", "sasrec+ease"}
    assert model["why"].startswith("sasrec: the best validation ndcg@20") and f"{val['sasrec']:.4f}" in model["why"]
    assert metrics["ranking"]["auto"] == model["candidates"]["sasrec"]["test"]
    assert metrics["ranking"]["auto"]["ndcg@20"] > metrics["ranking"]["ease"]["ndcg@20"] + 0.2, metrics["ranking"]
    report = (output / "report.html").read_text()
    assert "sasrec (selected)" in report and model["why"].split(",")[0] in report

    rec = Recommender.load(result["bundle_dir"])
    assert isinstance(rec.network, SASRecNet)  # the bundle's network and vectors are the sequence model's
    assert rec.item_vectors.shape[1] == rec.network.dim
    hits = 0
    for user in ("u0003", "u0010", "u0020", "u0030", "u0040"):
        walk = walks[walks.user_id == user].item_id.tolist()
        (top, _), = rec.recommend_for_history(walk[:-1], k=1)
        hits += top == walk[-1]  # what follows the walk's latest item (unless a stretch ends there)
    assert hits >= 4


def test_a_log_without_times_leaves_the_sequence_model_out_and_says_why(tmp_path):
    _walks(n_users=60, times=False).to_csv(tmp_path / "events.csv", index=False)
    result = run(_cfg(tmp_path, "data.split.method=auto", "model.refit=false", "evaluation.report=null"))
    model = result["metrics"]["model"]
    assert model["candidates"]["sasrec"] == {"status": "skipped",
                                             "reason": "the log has no event times: there is no order of events to learn from"}
    assert model["selected"] in ("vae", "ease", "vae+ease")


def _dm(events: int, items: int, times: bool = True, method: str = "global_temporal", val_users: int = 10):
    return SimpleNamespace(has_timestamps=times, split_method=method, val_users=np.arange(val_users),
                           train_idx=np.arange(events), n_items=items)


def test_on_the_cpu_a_softmax_too_wide_for_it_is_skipped_and_on_cuda_it_runs():
    cfg = OmegaConf.create({"model": {"sequence": {"cpu_max_scores": 1e9, "module": {"full_softmax_max_items": 50000}}}})
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert skip_reason(cfg, _dm(100_000, 1_000), cpu, 1) is None
    reason = skip_reason(cfg, _dm(2_700_000, 20_000), cpu, 1)
    assert "5.4e+10 scores an epoch (2,700,000 training events x 20,000 items)" in reason
    assert "model.sequence.cpu_max_scores=1e+09" in reason
    assert skip_reason(cfg, _dm(2_700_000, 20_000), cuda, 1) is None
    assert "not in time" in skip_reason(cfg, _dm(1000, 100, method="random_per_user"), cpu, 1)
    assert "trainer=ddp" in skip_reason(cfg, _dm(1000, 100), cpu, 2)
    assert "no validation users" in skip_reason(cfg, _dm(1000, 100, val_users=0), cpu, 1)


@pytest.mark.parametrize("epoch, value, stops", [(0, 0.01, False), (1, 0.079, True), (1, 0.081, False), (5, 0.2, False)])
def test_it_stops_from_its_second_epoch_once_it_cannot_reach_the_others(epoch, value, stops):
    callback = BehindBest("val/ndcg@20", bar=0.1, share=0.8)
    trainer = SimpleNamespace(callback_metrics={"val/ndcg@20": torch.tensor(value)}, current_epoch=epoch, should_stop=False)
    callback.on_validation_end(trainer, None)
    assert trainer.should_stop is stops
    assert (callback.fired is not None) is stops


def test_its_settings_are_checked_before_the_data(tmp_path):
    cfg = compose_cfg([*TINY_DATA, *QUIET_TRAINER, "model.sequence.net.heads=3"], tmp_path / "run")
    with pytest.raises(ConfigError, match=r"model.sequence.net.heads=3 must divide model.sequence.dim=64"):
        check_train_config(cfg)
    cfg = compose_cfg([*TINY_DATA, *QUIET_TRAINER, "model.sequence.behind_stop=2"], tmp_path / "run")
    with pytest.raises(ConfigError, match=r"model.sequence.behind_stop"):
        check_train_config(cfg)


# -- the sequence model blended with EASE, served in real time ----------------------------------------
@pytest.fixture(scope="module")
def blend_run(tmp_path_factory):
    """The default model on a synthetic log where ``sasrec + w * ease`` wins on validation."""
    folder = tmp_path_factory.mktemp("sequence_blend")
    sizes = {"n_users": 800, "n_items": 150, "n_events": 30000, "n_categories": 8, "n_segments": 4}
    cfg = compose_cfg([*(f"data.source.{k}={v}" for k, v in sizes.items()), *QUIET_TRAINER, "logger=none",
                       "propensity.enabled=false", "audience.enabled=false", "evaluation.report=null",
                       f"privacy.erasure_list={folder / 'erased.txt'}", f"privacy.audit_log={folder / 'audit.jsonl'}"],
                      folder / "run")
    return run(cfg)


def test_a_live_user_of_the_blend_is_scored_from_their_latest_items_and_their_decayed_row(blend_run, tmp_path):
    model = blend_run["metrics"]["model"]
    assert model["selected"] == "sasrec+ease", model["why"]
    weight = model["candidates"]["sasrec+ease"]["details"]["weight"]
    assert model["served_score"].startswith(f"1 x embedding dot product + {weight:.4g} x EASE")
    bundle = tmp_path / "artifacts"
    shutil.copytree(blend_run["bundle_dir"], bundle)
    with LiveRecommender.load(bundle, journal=tmp_path / "journal") as live:
        assert isinstance(live.network, SASRecNet)
        row = 5
        user = live.user_vocab.ids[row]
        before = live._seen_sums[live._seen_indptr[row]:live._seen_indptr[row + 1]].sum()
        new_item = next(i for i in range(live.n_items) if i not in set(live._seen_items[
            live._seen_indptr[row]:live._seen_indptr[row + 1]].tolist()))
        answer = live.ingest([{"user_id": user, "item_id": live.item_vocab.ids[new_item], "event_type": "purchase",
                               "timestamp": int(live._part.reference_times[row]) + 60}])
        assert answer["accepted"] == 1
        state = live.live_user(user)
        # the vector: the transformer on the latest items, the new one last
        fresh, _, _ = live.cold_user_vectors([live.item_vocab.ids[state.items].tolist()])
        np.testing.assert_allclose(state.vector, fresh[0], rtol=1e-5, atol=1e-5)
        assert state.items[-1] == new_item
        # the row EASE reads: the stored decayed sums carried forward one minute, plus the purchase
        assert new_item in state.row_items.tolist() and state.row_sums.sum() > before
        indptr, items, strength = live._rows_of([state])
        want = live.served.scores(state.vector[None], live.item_vectors,
                                  rows_matrix(indptr, items, live.n_items, strength))[0].numpy()
        ranked = live.recommend(user, 10)
        got = dict(ranked)
        rows = live.item_vocab.index_of(list(got))
        np.testing.assert_allclose([got[i] for i in got], want[rows], rtol=1e-4, atol=1e-4)
        assert new_item not in rows.tolist()


def test_its_bundle_keeps_the_crm_columns_for_audience_rules(blend_run):
    """The sequence model reads no user attribute, yet its bundle answers rules on the user table
    as the training data holds it (a missing age matches no comparison)."""
    from dmp_dl.audience.rule_audience import rule_job

    rec = Recommender.load(blend_run["bundle_dir"])
    assert isinstance(rec.network, SASRecNet) and not rec.reads_user_attributes
    users = blend_run["datamodule"].log_.users.set_index("user_id").reindex(rec.user_vocab.ids)
    table, summary = rule_job(rec, "attr.region in ['east', 'west'] and age > 40")
    expected = users.index[users["region"].isin(["east", "west"]) & (users["age"] > 40)]
    assert 0 < len(expected) < rec.n_users
    assert table["user_id"].tolist() == expected.tolist() and summary["users"] == len(expected)
    np.testing.assert_array_equal(table["attr.age"], users.loc[expected, "age"].to_numpy(float))
