"""Propensity: labels, leakage, metrics, calibration, learning on planted data, the stored model."""

from __future__ import annotations

import copy
import json
import logging
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import open_dict
from scipy.special import logit
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, roc_auc_score
from torchmetrics.functional.classification import binary_calibration_error

from dmp_dl.core.errors import BundleError, ConfigError, DataError, InsufficientDataError, UnknownIdError
from dmp_dl.data.schema import TIME, TYPE, EventLog
from dmp_dl.metrics.classification import binary_metrics, gains_table, lift_at
from dmp_dl.pipeline.run import load_data
from dmp_dl.propensity import load_propensity, save_propensity, train_propensity
from dmp_dl.propensity.calibration import Calibrator
from dmp_dl.propensity.features import BehaviourSpec, UserFeatures, behaviour_features
from dmp_dl.propensity.labels import ANY_EVENT, resolve_cutoff, resolve_target, window_labels
from dmp_dl.propensity.net import PropensityNet
from dmp_dl.propensity.train import build_task, split_users, training_examples
from dmp_dl.training.fit import build_module

DAY = 86400


# -- labels ---------------------------------------------------------------------------------------
def test_window_labels_count_only_the_target_inside_the_window():
    T, H = 100 * DAY, 10
    user = np.array([0, 0, 1, 1, 2, 3, 3, 4])
    ts = np.array([T - 5, T + H * DAY, T, T + 1, T + 1, T - 1, T + H * DAY + 1, T - 9])
    kind = np.array(["view", "purchase", "purchase", "view", "purchase", "view", "purchase", "purchase"], dtype=object)
    users, labels = window_labels(user, ts, kind, 6, T, H, "purchase")
    # user 2 is first seen after T (not eligible); user 5 never; an event at exactly T is a feature
    assert users.tolist() == [0, 1, 3, 4]
    # 0: purchase at T + H (inside); 1: only a view after T; 3: purchase just after the window; 4: nothing after T
    assert labels.tolist() == [1, 0, 0, 0]
    _, any_labels = window_labels(user, ts, kind, 6, T, H, ANY_EVENT)
    assert any_labels.tolist() == [1, 1, 0, 0]
    # the events' type column as the data stage keeps it (categorical, a missing type among them)
    column = pd.Series(np.where(np.arange(len(kind)) == 3, None, kind)).astype("category")
    for given in (column, column.astype(object).to_numpy()):
        users_c, labels_c = window_labels(user, ts, given, 6, T, H, "purchase")
        assert users_c.tolist() == [0, 1, 3, 4] and labels_c.tolist() == [1, 0, 0, 0]
    assert window_labels(user, ts, column, 6, T, H, "refund")[1].tolist() == [0, 0, 0, 0]  # not a category


def test_missing_target_event_falls_back_to_any_event_and_says_so(caplog):
    with caplog.at_level(logging.WARNING):
        assert resolve_target("purchase", ["rating"]) == ANY_EVENT
    assert "purchase" in caplog.text and "rating" in caplog.text
    assert resolve_target("Purchase", ["view", "purchase"]) == "purchase"
    assert resolve_target(None, ["view"]) == ANY_EVENT


def test_cutoff_leaves_a_full_label_window():
    ts = np.arange(0, 101) * DAY  # 100 days of data, one event a day
    assert resolve_cutoff(ts, 10, quantile=0.5) == 50 * DAY
    assert resolve_cutoff(ts, 30, quantile=0.9) == 70 * DAY  # moved back: last event - horizon
    assert resolve_cutoff(ts, 10, cutoff="1970-01-21") == 20 * DAY
    with pytest.raises(ConfigError, match="propensity.cutoff"):
        resolve_cutoff(ts, 10, cutoff=95 * DAY)
    with pytest.raises(InsufficientDataError, match="horizon_days"):
        resolve_cutoff(ts, 100, quantile=0.5)
    with pytest.raises(ConfigError, match="cutoff_quantile"):
        resolve_cutoff(ts, 10, quantile=1.5)


# -- leakage --------------------------------------------------------------------------------------
def _with_events(dm, events: pd.DataFrame):
    """The same prepared data module with a different event table (vocabularies unchanged)."""
    other = copy.copy(dm)
    other.log_ = EventLog(events.sort_values(TIME, kind="stable").reset_index(drop=True), dm.log_.users,
                          dm.log_.items, dm.log_.source, dm.log_.meta)
    return other


def test_events_after_the_cutoff_change_labels_but_never_features(tiny_cfg):
    cfg = tiny_cfg("propensity.train_snapshots=3")
    dm = load_data(cfg)
    net = build_module(cfg, dm).net.eval()
    with open_dict(cfg):  # the default cutoff is a quantile of all event times: pin it
        cfg.propensity.cutoff = int(build_task(cfg.propensity, dm).cutoff)
    task = build_task(cfg.propensity, dm)
    ev = dm.events
    after = (ev[TIME] > task.cutoff).to_numpy()
    assert after.sum() > 100
    # Rewrite the future: every event after T becomes a purchase of another item by another user
    # at another time after T, and half of them disappear.
    rng = np.random.default_rng(0)
    future = ev.loc[after].copy()
    future[TYPE] = "purchase"
    future["user_idx"] = rng.permutation(future["user_idx"].to_numpy())
    future["item_idx"] = rng.integers(dm.n_items, size=len(future))
    future[TIME] = task.cutoff + 1 + rng.integers(0, 60 * DAY, size=len(future))
    changed = _with_events(dm, pd.concat([ev.loc[~after], future.iloc[: len(future) // 2]]))
    task2 = build_task(cfg.propensity, changed)
    np.testing.assert_array_equal(task.users, task2.users)  # eligibility only reads events <= T
    assert (task.labels != task2.labels).sum() > 10  # the labels did change

    spec = BehaviourSpec(sorted(ev[TYPE].unique()))
    features = UserFeatures.build(dm, spec)
    before = features.known(dm.events, task.users, task.cutoff)
    now = features.known(changed.events, task2.users, task2.cutoff)
    for name in ("behaviour", "attr_tokens", "attr_numeric", "history", "enc_tokens", "enc_numeric"):
        np.testing.assert_array_equal(getattr(before, name), getattr(now, name), err_msg=name)
    deep = PropensityNet(before.behaviour.shape[1], features.attributes.n_tokens, before.attr_numeric.shape[1], encoder=net)
    with torch.no_grad():
        v1 = deep.user_vectors(torch.from_numpy(before.history), torch.from_numpy(before.enc_tokens), torch.from_numpy(before.enc_numeric))
        v2 = deep.user_vectors(torch.from_numpy(now.history), torch.from_numpy(now.enc_tokens), torch.from_numpy(now.enc_numeric))
    torch.testing.assert_close(v1, v2, rtol=0, atol=0)

    # The extra training snapshots at T - H, T - 2H have labels that end by T: unchanged too.
    train_users = task.users[: len(task.users) // 2]
    x1, y1, c1 = training_examples(cfg.propensity, dm, features, task, train_users, before.take(np.arange(len(train_users))), task.labels[: len(train_users)])
    x2, y2, c2 = training_examples(cfg.propensity, changed, features, task2, train_users, now.take(np.arange(len(train_users))), task.labels[: len(train_users)])
    assert len(c1) == 3 and c1 == c2
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(x1.behaviour, x2.behaviour)
    np.testing.assert_array_equal(x1.history, x2.history)


def test_users_taken_in_blocks_get_the_features_of_one_pass(tiny_cfg, monkeypatch):
    import dmp_dl.propensity.features as features_module

    cfg = tiny_cfg()
    dm = load_data(cfg)
    task = build_task(cfg.propensity, dm)
    features = UserFeatures.build(dm, BehaviourSpec(sorted(dm.events[TYPE].unique())))
    users = np.random.default_rng(0).permutation(task.users)  # blocks of slots, not of user ids
    whole = features.known(dm.events, users, task.cutoff)
    before = dm.events[dm.events[TIME] <= task.cutoff]
    counts = before.groupby("user_idx").size().reindex(users, fill_value=0).to_numpy()
    np.testing.assert_allclose(whole.behaviour[:, 0], np.log1p(counts), rtol=1e-6)  # "events": the user's own
    monkeypatch.setattr(features_module, "BLOCK_EVENTS", 97)  # many blocks of a few users each
    blocks = features.known(dm.events, users, task.cutoff)
    assert len(dm.events) > 20 * 97
    for name in ("behaviour", "attr_tokens", "attr_numeric", "history", "enc_tokens", "enc_numeric"):
        np.testing.assert_array_equal(getattr(blocks, name), getattr(whole, name), err_msg=name)


def test_earlier_snapshots_are_added_only_until_the_examples_are_enough(tiny_cfg, caplog):
    caplog.set_level(logging.INFO, logger="dmp_dl.propensity.train")
    cfg = tiny_cfg("propensity.train_snapshots=3")
    dm = load_data(cfg)
    task = build_task(cfg.propensity, dm)
    features = UserFeatures.build(dm, BehaviourSpec(sorted(dm.events[TYPE].unique())))
    users, labels = task.users, task.labels
    at_cutoff = features.known(dm.events, users, task.cutoff)

    def cutoffs(enough):
        with open_dict(cfg):
            cfg.propensity.enough_train_examples = enough
        x, y, used = training_examples(cfg.propensity, dm, features, task, users, at_cutoff, labels)
        assert len(x) == len(y)
        return used, len(y)

    every, n_every = cutoffs(None)
    assert len(every) == 3 and n_every > len(users)
    assert cutoffs(len(users)) == ([task.cutoff], len(users))  # the first snapshot is already enough
    two, n_two = cutoffs(len(users) + 1)
    assert two == every[:2] and len(users) < n_two < n_every
    assert "enough_train_examples" in caplog.text
    assert cutoffs(10**9) == (every, n_every)  # the default on a small log: every snapshot


def test_behaviour_aggregates_by_hand():
    spec = BehaviourSpec(["purchase", "view"], [7.0])
    names = spec.names()
    row = np.array([0, 0, 0, 1])
    ts = np.array([0, 2, 9, 5]) * DAY
    code = np.array([1, 0, 1, 1])  # view, purchase, view, view
    value = np.array([0.0, 20.0, 0.0, 0.0])
    x = behaviour_features(row, ts, code, value, np.array([3, 4, 3, 3]), 2, 10 * DAY, spec)
    get = lambda r, n: float(x[r, names.index(n)])  # noqa: E731
    assert get(0, "events") == pytest.approx(np.log1p(3))
    assert get(0, "distinct_items") == pytest.approx(np.log1p(2))
    assert get(0, "tenure_days") == pytest.approx(np.log1p(10))
    assert get(0, "recency_days") == pytest.approx(np.log1p(1))
    assert get(0, "purchase.recency_days") == pytest.approx(np.log1p(8))
    assert get(0, "purchase.value_mean") == pytest.approx(20.0)
    assert get(0, "purchase.decayed_7d") == pytest.approx(np.log1p(0.5 ** (8 / 7)))
    assert get(1, "purchase.never") == 1.0 and get(1, "purchase.recency_days") == pytest.approx(np.log1p(5))


# -- metrics and calibration ----------------------------------------------------------------------
def test_metrics_agree_with_scikit_learn_and_lift_by_hand():
    rng = np.random.default_rng(0)
    y = (rng.random(1000) < 0.2).astype(int)
    p = np.clip(0.2 + 0.3 * (y - 0.2) + rng.normal(0, 0.15, 1000), 0.01, 0.99)
    m = binary_metrics(y, p)
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, p))
    assert m["pr_auc"] == pytest.approx(average_precision_score(y, p))
    assert m["brier"] == pytest.approx(np.mean((p - y) ** 2))
    # 10 users, 2 positives, both at the top: the top 10% (1 user) is all positive -> lift 5
    y10 = np.array([1, 1, 0, 0, 0, 0, 0, 0, 0, 0])
    s10 = np.linspace(1.0, 0.1, 10)
    assert lift_at(y10, s10, 0.1) == pytest.approx(5.0)
    table = gains_table(y10, s10, n_slices=5)
    assert [r["gain"] for r in table] == [1.0, 1.0, 1.0, 1.0, 1.0]
    assert table[0]["lift"] == pytest.approx(5.0) and table[-1]["users"] == 10
    # perfectly calibrated constant predictions: ECE = |0.2 - 0.2| = 0
    assert binary_metrics(y10, np.full(10, 0.2))["ece"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("method", ["platt", "isotonic"])
def test_calibration_makes_predicted_rates_match_observed(method):
    rng = np.random.default_rng(1)
    z_true = rng.normal(-1.5, 1.2, 20000)
    y = (rng.random(20000) < 1 / (1 + np.exp(-z_true))).astype(int)
    z_model = 2.0 * z_true + 1.5  # over-confident and shifted, as pos_weight makes a network
    val, test = slice(0, 10000), slice(10000, None)
    cal = Calibrator.fit(method, z_model[val], y[val])
    before = binary_metrics(y[test], Calibrator("none")(z_model[test]))["ece"]
    after = binary_metrics(y[test], cal(z_model[test]))["ece"]
    assert before > 0.08 and after < 0.02
    again = Calibrator.from_dict(json.loads(json.dumps(cal.to_dict())))
    np.testing.assert_allclose(again(z_model[:50]), cal(z_model[:50]))
    with pytest.raises(ConfigError):
        Calibrator("temperature-ish")


# -- learning on the planted synthetic signal -----------------------------------------------------
@pytest.fixture(scope="module")
def synthetic_default(tmp_path_factory):
    """The default synthetic data (3000 users, 100k events) and one propensity run on it, without
    the embedding feature (so no embedding model has to be trained here)."""
    from .conftest import QUIET_TRAINER, compose_cfg

    cfg = compose_cfg([*QUIET_TRAINER, "propensity.features.embedding=off"], tmp_path_factory.mktemp("syn"))
    dm = load_data(cfg)
    return cfg, dm, train_propensity(cfg, dm, None)


def test_synthetic_default_auc_well_above_chance_and_calibrated(synthetic_default):
    _, dm, result = synthetic_default
    m = result.metrics["mlp"]
    # Reference from the plant: the true purchase rate of each test user (EventLog.meta, never a
    # feature) ranks them with AUC ~0.79; the model also sees activity and churn and reaches
    # 0.81-0.83 over split seeds (sd 0.01). 0.75 leaves > 5 sd of room yet fails a model that
    # only half learns the signal (a constant scores 0.5).
    buy_rate = dm.raw_meta["user_buy_rate"].reindex(dm.user_vocab.lookup(result.test_users)).to_numpy()
    oracle = roc_auc_score(result.test_labels, buy_rate)
    assert oracle > 0.7
    assert m["roc_auc"] > 0.75 and m["roc_auc"] > oracle - 0.03, (m["roc_auc"], oracle)
    # Calibrated. With 600 test users, label noise alone gives a perfectly calibrated model an ECE
    # of a few hundredths: compare with that null distribution (labels drawn from the predictions)
    # plus 0.02 for fitting the calibration on 600 validation users. Before calibration the
    # pos_weight-trained network is off by ~0.2.
    p = result.test_predictions["mlp"]
    rng = np.random.default_rng(0)
    null = [float(binary_calibration_error(torch.from_numpy(p), torch.from_numpy((rng.random(len(p)) < p).astype(np.int64)),
                                           n_bins=10)) for _ in range(200)]
    assert m["ece"] < np.quantile(null, 0.99) + 0.02 and m["ece"] < m["ece_uncalibrated"] / 2, (m, np.quantile(null, 0.99))
    assert abs(p.mean() - result.test_labels.mean()) < 0.03  # predicted rate = observed rate
    slope = LogisticRegression(C=1e6).fit(logit(p)[:, None], result.test_labels).coef_[0, 0]
    assert 0.7 < slope < 1.4, slope  # neither over- nor under-confident
    # The same features and split for every model, all of them learning something.
    assert set(result.metrics) == {"mlp", "logistic_regression", "gbm"}
    for name, pred in result.test_predictions.items():
        assert pred.shape == result.test_labels.shape and ((pred >= 0) & (pred <= 1)).all()
        assert result.metrics[name]["roc_auc"] > 0.7, name
    assert result.gains["mlp"][-1]["gain"] == pytest.approx(1.0)
    assert result.metrics["mlp"]["lift@10"] > 2.0


def test_known_users_are_scored_as_of_the_end_of_the_data(synthetic_default):
    _, dm, result = synthetic_default
    scores = result.scorer.known_scores
    assert scores.shape == (dm.n_users,) and np.isfinite(scores).all()
    # Truth at the end of the data: the planted rate of users still active (not churned) then.
    last_seen = dm.events.groupby("user_idx")[TIME].max().reindex(range(dm.n_users)).to_numpy()
    active = last_seen > dm.events[TIME].max() - 14 * DAY
    buy_rate = dm.raw_meta["user_buy_rate"].reindex(dm.user_vocab.ids).to_numpy()
    assert roc_auc_score(active, scores) > 0.7  # churned users score low
    assert roc_auc_score(buy_rate[active] > np.median(buy_rate[active]), scores[active]) > 0.7


# -- the stored model -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A propensity model with the (untrained) two-tower network as frozen embedding feature,
    saved and loaded back."""
    from .conftest import QUIET_TRAINER, TINY_DATA, compose_cfg

    root = tmp_path_factory.mktemp("stored")
    cfg = compose_cfg([*TINY_DATA, *QUIET_TRAINER, "propensity.trainer.max_epochs=3"], root / "run")
    dm = load_data(cfg)
    net = build_module(cfg, dm).net
    result = train_propensity(cfg, dm, net)
    (root / "propensity").mkdir()
    entry = save_propensity(result, root / "propensity")
    return dm, result, entry, root / "propensity", load_propensity(root / "propensity")


def _event_dicts(dm, user: int) -> list[dict]:
    ev = dm.events.loc[dm.events["user_idx"] == user]
    return [{"item_id": i, "timestamp": int(t), "event_type": k, "value": float(v)}
            for i, t, k, v in zip(ev["item_id"], ev[TIME], ev[TYPE], ev["value"])]


def test_saved_model_reproduces_known_and_new_user_scores(stored):
    dm, result, entry, directory, scorer = stored
    assert json.loads(json.dumps(entry)) == entry
    assert entry["target_resolved"] == "purchase" and entry["horizon_days"] == 30
    assert set(entry["metrics"]) == {"mlp", "logistic_regression", "gbm"}
    # the bundle serves the model best on the validation users; a classic one is stored as arrays
    assert entry["model"] == result.served == scorer.served == result.selection["served"]
    val_auc = result.selection["val_roc_auc"]
    assert val_auc[result.served] == max(val_auc.values())
    tabular = ["tabular.npz"] if result.served != "mlp" else []
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        ["items.json", "known_scores.npy", "propensity.json", "weights.pt", *tabular])
    idx = np.array([[0, 5], [7, dm.n_users - 1]])
    out = scorer.score_known(idx)
    assert out.shape == (2, 2) and out.dtype == np.float64
    np.testing.assert_allclose(out, result.scorer.known_scores[idx])
    with pytest.raises(UnknownIdError):
        scorer.score_known(np.array([dm.n_users]))
    # A "new" user described by a known user's attributes and full event list scores like that
    # known user at the end of the data: serving computes the features exactly as training did.
    users = [3, 11, 42]
    table = dm.log_.users.set_index("user_id")
    attrs = [table.loc[dm.user_vocab.ids[u]].to_dict() for u in users]
    events = [_event_dicts(dm, u) for u in users]
    np.testing.assert_allclose(scorer.score_new(attrs, events), result.scorer.known_scores[users], rtol=1e-5, atol=1e-6)


def test_new_users_with_unknown_or_missing_attributes_are_scored(stored):
    dm, _, _, _, scorer = stored
    item = dm.item_vocab.ids[0]
    end = int(dm.events[TIME].max())
    scores = scorer.score_new(
        [None, {"region": "atlantis", "age": "n/a", "shoe_size": 44}, {}, {"gender": "F"}],
        [[], [{"item_id": "never-seen", "timestamp": end - 3600}],
         [{"item_id": item, "timestamp": "2025-12-30T10:00:00Z", "event_type": "PURCHASE", "value": "19.9"}],
         [{"item_id": item, "timestamp": end - DAY, "event_type": "teleport"}]],
    )
    assert scores.shape == (4,) and np.isfinite(scores).all() and ((scores > 0) & (scores < 1)).all()
    assert scorer.score_new([], []).shape == (0,)


@pytest.mark.parametrize("events, message", [
    ([[{"item_id": "x"}]], r"events\[0\]\[0\]: missing timestamp"),
    ([[{"item_id": "x", "timestamp": "yesterday"}]], r"events\[0\]\[0\].timestamp"),
    ([[{"item_id": "x", "timestamp": 1, "value": "lots"}]], r"events\[0\]\[0\].value"),
    ([["not a dict"]], r"events\[0\]\[0\]"),
    ([[], []], "one of each"),
])
def test_malformed_new_user_events_are_refused_by_position(stored, events, message):
    scorer = stored[-1]
    with pytest.raises(DataError, match=message):
        scorer.score_new([None], events)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the garbage weights file below
@pytest.mark.parametrize("damage, file", [
    (lambda d: (d / "weights.pt").unlink(), "weights.pt"),
    (lambda d: (d / "weights.pt").write_bytes(b"\x80\x04garbage"), "weights.pt"),
    (lambda d: (d / "propensity.json").write_text("{"), "propensity.json"),
    (lambda d: np.save(d / "known_scores.npy", np.array([0.5, 0.2])), "known_scores.npy"),
    (lambda d: np.save(d / "known_scores.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True), "known_scores.npy"),
    (lambda d: (d / "items.json").unlink(), "items.json"),
])
def test_a_damaged_directory_is_refused_naming_the_file(stored, tmp_path, damage, file):
    directory = tmp_path / "p"
    shutil.copytree(stored[3], directory)
    damage(directory)
    with pytest.raises(BundleError, match=file):
        load_propensity(directory)


def test_split_is_stratified_and_disjoint():
    labels = np.r_[np.ones(50, np.int8), np.zeros(450, np.int8)]
    train, val, test = split_users(labels, 0.2, 0.2, seed=0)
    assert len(set(train) | set(val) | set(test)) == 500 and len(train) + len(val) + len(test) == 500
    assert labels[test].sum() == 10 and labels[val].sum() == 10
    with pytest.raises(ConfigError):
        split_users(labels, 0.6, 0.5, seed=0)


def test_finetuned_embedding_changes_a_copy_and_round_trips(tiny_cfg, tmp_path):
    cfg = tiny_cfg("propensity.features.embedding=finetune", "propensity.trainer.max_epochs=3",
                   "propensity.early_stopping=null", "propensity.calibration=isotonic", "propensity.serve=mlp")
    dm = load_data(cfg)
    net = build_module(cfg, dm).net
    original = {k: v.clone() for k, v in net.state_dict().items()}
    result = train_propensity(cfg, dm, net)
    for k, v in net.state_dict().items():  # the embedding model itself is never touched
        torch.testing.assert_close(v, original[k], rtol=0, atol=0)
    tuned = result.scorer.net.encoder.state_dict()
    assert any(not torch.equal(tuned[k], original[k]) for k in tuned if k in original)  # but its copy was trained
    assert result.training["embedding"] == "finetune" and result.calibrators["mlp"].method == "isotonic"
    save_propensity(result, tmp_path)
    again = load_propensity(tmp_path)
    np.testing.assert_allclose(again.score_known(np.arange(dm.n_users)), result.scorer.known_scores)
    users = [0, 9]
    events = [_event_dicts(dm, u) for u in users]
    np.testing.assert_allclose(again.score_new([None, None], events), result.scorer.score_new([None, None], events))


# -- which model the bundle serves ----------------------------------------------------------------
def test_the_best_model_on_validation_users_is_served():
    from dmp_dl.propensity.tabular import TabularModel
    from dmp_dl.propensity.train import select_served

    y = np.array([0, 0, 0, 1, 1, 1])
    good, poor = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9]), np.array([0.9, 0.2, 0.3, 0.1, 0.8, 0.7])
    arrays = TabularModel("linear", {}, 0)
    assert select_served({"mlp": poor, "gbm": good}, y, {"gbm": arrays})[0] == "gbm"
    assert select_served({"mlp": good, "gbm": good}, y, {"gbm": arrays})[0] == "mlp"  # a tie: the network
    served, record = select_served({"mlp": poor, "custom": good}, y, {"custom": None})  # not storable: never served
    assert served == "mlp" and record["not_servable"] == ["custom"] and record["val_roc_auc"]["custom"] == 1.0
    assert select_served({"mlp": good, "gbm": poor}, y, {"gbm": arrays}, serve="gbm")[0] == "gbm"
    with pytest.raises(ConfigError, match="propensity.serve"):
        select_served({"mlp": good}, y, {}, serve="svm")


@pytest.mark.parametrize("serve, embedding", [("logistic_regression", "frozen"), ("gbm", "finetune")])
def test_a_served_classic_model_scores_exactly_as_it_was_evaluated(tiny_cfg, tmp_path, serve, embedding):
    cfg = tiny_cfg(f"propensity.serve={serve}", f"propensity.features.embedding={embedding}", "propensity.trainer.max_epochs=2")
    dm = load_data(cfg)
    net = build_module(cfg, dm).net
    result = train_propensity(cfg, dm, net)
    scorer = result.scorer
    assert result.served == scorer.served == serve and scorer.tabular.kind == {"logistic_regression": "linear", "gbm": "trees"}[serve]
    # the bundle's model gives the test users the very probabilities the metrics were computed from
    test_snapshot = scorer.features.known(dm.events, result.test_users, result.task.cutoff)
    np.testing.assert_allclose(scorer.score_snapshot(test_snapshot), result.test_predictions[serve], rtol=1e-12)
    # the baselines read the embedding network's original vectors, also when the network's copy was fine-tuned
    for k, v in scorer.net.encoder.state_dict().items():
        torch.testing.assert_close(v, net.state_dict()[k], rtol=0, atol=0)
    entry = save_propensity(result, tmp_path)
    assert entry["model"] == serve and "tabular.npz" in entry["files"]
    again = load_propensity(tmp_path)
    assert again.served == serve
    np.testing.assert_allclose(again.score_known(np.arange(dm.n_users)), scorer.known_scores)
    events = [_event_dicts(dm, u) for u in (2, 5)]
    np.testing.assert_allclose(again.score_new([None, None], events), scorer.score_new([None, None], events))


def test_a_frozen_embedding_encodes_each_user_once_however_many_epochs(tiny_cfg, monkeypatch):
    """The frozen encoder's vectors are computed once per user set, not at every training step: the
    users it encodes do not grow with the epochs (a 3M-event log spent most of its propensity stage
    re-encoding the same histories)."""
    dm = None
    encoded = []
    for epochs in (1, 4):
        cfg = tiny_cfg(f"propensity.trainer.max_epochs={epochs}", "propensity.early_stopping=null")
        dm = load_data(cfg)
        net = build_module(cfg, dm).net
        original = type(net).cold_user_vectors
        rows = [0]

        def counted(self, history, *args, _rows=rows, _original=original, **kwargs):
            _rows[0] += len(history)
            return _original(self, history, *args, **kwargs)

        monkeypatch.setattr(type(net), "cold_user_vectors", counted)
        result = train_propensity(cfg, dm, net)
        monkeypatch.undo()
        assert result.training["embedding"] == "frozen"
        encoded.append(rows[0])
    assert encoded[0] > 0 and encoded[1] == encoded[0], encoded


def test_the_frozen_vectors_of_a_large_training_set_are_computed_in_bounded_batches(tiny_cfg, monkeypatch):
    """The frozen encoder's vectors of the training examples come a bounded number of users at a
    time (every user at once held over 4 GB of activations at 1.1M examples), with the same result."""
    from dmp_dl.propensity import train as propensity_train

    cfg = tiny_cfg("propensity.trainer.max_epochs=1", "propensity.early_stopping=null")
    dm = load_data(cfg)
    net = build_module(cfg, dm).net
    whole = train_propensity(cfg, dm, net)
    original, frozen = type(net).cold_user_vectors, propensity_train._frozen_vectors
    calls, inside = [], [False]

    def counted(self, history, *args, **kwargs):
        if inside[0]:
            calls.append(len(history))
        return original(self, history, *args, **kwargs)

    def watched(*args, **kwargs):  # the frozen vectors of a user set, not the served scorer's batches
        inside[0] = True
        try:
            return frozen(*args, **kwargs)
        finally:
            inside[0] = False

    monkeypatch.setattr(propensity_train, "FROZEN_VECTOR_ROWS", 50)
    monkeypatch.setattr(propensity_train, "_frozen_vectors", watched)
    monkeypatch.setattr(type(net), "cold_user_vectors", counted)
    batched = train_propensity(cfg, dm, net)
    assert calls and max(calls) <= 50 < sum(calls)
    assert batched.training["embedding"] == "frozen"
    np.testing.assert_allclose(batched.scorer.known_scores, whole.scorer.known_scores, rtol=1e-5, atol=1e-6)


def test_auto_batch_size_keeps_small_logs_at_256_and_bounds_the_steps_of_large_ones():
    from dmp_dl.propensity.train import batch_size_for, threads_for

    assert batch_size_for("auto", 7_200) == 256  # the default synthetic log: as before
    big = batch_size_for("auto", 240_000)  # 100k users x 4 snapshots x 60 % training users
    assert 256 < big <= 4096 and 240_000 / big <= 200
    assert batch_size_for("auto", 10**9) == 4096
    assert batch_size_for(512, 10**9) == 512
    assert threads_for("auto", 3_000) == 1 and threads_for("auto", 100_000) is None
    assert threads_for(3, 100_000) == 3 and threads_for(None, 10) is None


def test_the_baselines_of_a_large_log_fit_on_a_bounded_sample_and_score_every_user_in_blocks(tiny_cfg, monkeypatch):
    """``propensity.baseline_max_examples`` bounds the rows each baseline is fitted on (a dense design
    matrix of 1.1M examples was the stage's peak at 50M events); every validation and test user is
    still scored, a block at a time, as the bundle would score them."""
    from sklearn.linear_model import LogisticRegression as Fitted

    from dmp_dl.propensity import baselines

    fitted_rows, scored_rows = [], []
    original_fit, original_design = Fitted.fit, baselines.design_matrix

    def fit(self, x, y, *args, **kwargs):
        if np.shape(x)[1] > 1:  # not a one-column Platt calibration
            fitted_rows.append(len(x))
        return original_fit(self, x, y, *args, **kwargs)

    def design(snap, *args, **kwargs):
        scored_rows.append(len(snap))
        return original_design(snap, *args, **kwargs)

    monkeypatch.setattr(Fitted, "fit", fit)
    monkeypatch.setattr(baselines, "design_matrix", design)
    monkeypatch.setattr(baselines, "SCORE_ROWS", 16)
    base = ["propensity.trainer.max_epochs=1", "propensity.early_stopping=null", "propensity.serve=logistic_regression"]
    cfg = tiny_cfg(*base, "propensity.baseline_max_examples=40")
    dm = load_data(cfg)
    result = train_propensity(cfg, dm, build_module(cfg, dm).net)
    n_train = result.training["train_examples"]
    assert n_train > 40 and fitted_rows == [40] and result.training["baseline_train_examples"] == 40
    assert max(scored_rows) <= 40 and len(result.test_predictions["logistic_regression"]) == result.split["test"]
    # the scores of the served baseline are the ones it was evaluated with, block by block
    test_snapshot = result.scorer.features.known(dm.events, result.test_users, result.task.cutoff)
    np.testing.assert_allclose(result.scorer.score_snapshot(test_snapshot), result.test_predictions["logistic_regression"],
                               rtol=1e-6, atol=1e-9)
    fitted_rows.clear()
    whole = train_propensity(tiny_cfg(*base), dm, build_module(cfg, dm).net)  # the default: every example of a small log
    assert fitted_rows == [n_train] and whole.training["baseline_train_examples"] == n_train
