"""Recency in the default model: event weights decay with age, the same in training and in real
time, so that what a user did last changes what they are shown."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from fastapi.testclient import TestClient

import dmp_dl
from dmp_dl.api.server import create_app
from dmp_dl.core.errors import ConfigError
from dmp_dl.data import recency
from dmp_dl.data.datamodule import InteractionDataModule, last_items, pair_matrix
from dmp_dl.data.split import TEST
from dmp_dl.data.synthetic import SyntheticSource
from dmp_dl.evaluation.heldout import HeldOutSplit
from dmp_dl.pipeline.run import run
from dmp_dl.realtime import LiveRecommender
from dmp_dl.training.recency_choice import label
from tests.conftest import QUIET_TRAINER, compose_cfg

# eight categories of 40 items: 30 of one category can be viewed and 10 are left to recommend
SOURCE = {"n_users": 500, "n_items": 320, "n_events": 15000, "n_categories": 8, "n_segments": 4}
DATA = [f"data.source.{k}={v}" for k, v in SOURCE.items()]


@pytest.fixture(scope="module")
def recency_run(tmp_path_factory):
    """The default model (data.recency_half_life_days=auto) on a small synthetic log."""
    out = tmp_path_factory.mktemp("recency") / "run"
    cfg = compose_cfg([*DATA, *QUIET_TRAINER, "trainer.max_epochs=3", "logger=none", "evaluation.report=null",
                       "propensity.enabled=false", f"privacy.erasure_list={out.parent / 'erased.txt'}",
                       f"privacy.audit_log={out.parent / 'audit.jsonl'}"], out)
    return run(cfg)


@pytest.fixture
def bundle(recency_run, tmp_path):
    target = tmp_path / "artifacts"
    shutil.copytree(recency_run["bundle_dir"], target)
    return target


def category_shares(rec) -> np.ndarray:
    """(n_items, n_categories) each item's share of each category (items may have two)."""
    return rec._part.item_categories.toarray()


def focused_users(rec, shares: np.ndarray, n: int) -> list[tuple[int, int]]:
    """``n`` (user row, category) pairs: the users with the most items among those whose items are
    at least 80 % of one main category, each with the most interacted-with category they never
    touched (a burst in it is a real change of interest, on items the model knows well)."""
    main = shares.argmax(axis=1)
    owner = np.repeat(np.arange(rec.n_users), np.diff(rec._seen_indptr))
    counts = np.zeros((rec.n_users, shares.shape[1]), dtype=np.int64)
    np.add.at(counts, (owner, main[rec._seen_items]), 1)
    items = counts.sum(axis=1)
    focused = (counts.max(axis=1) >= 0.8 * np.maximum(items, 1)) & (counts == 0).any(axis=1)
    popularity = counts.sum(axis=0)
    rows = [r for r in np.argsort(-items, kind="stable") if focused[r]][:n]
    return [(int(r), int(np.flatnonzero(counts[r] == 0)[np.argmax(popularity[counts[r] == 0])])) for r in rows]


def test_auto_chooses_the_half_life_on_validation_and_records_it(recency_run):
    """``auto`` scores no decay and shares of the training events' time span on the validation
    users, keeps the best, and records every score; the bundle says which rows it serves."""
    metrics = json.loads((recency_run["bundle_dir"].parent / "metrics.json").read_text())
    record = metrics["model"]["recency"]
    dm = recency_run["datamodule"]
    train_times = dm.events["timestamp"].to_numpy()[dm.train_idx]
    assert record["setting"] == "auto" and record["chosen_by"] == "EASE on validation ndcg@20"
    grid = recency.half_life_grid(float(train_times.max() - train_times.min()))
    assert list(record["validation"]) == ["none"] + [label(h) for h in grid], record
    best = max(record["validation"], key=record["validation"].get)
    assert label(record["half_life_days"]) == best
    assert record["half_life_days"] is not None, "on this log (sessions stick to a category) decay wins validation"
    manifest = json.loads((recency_run["bundle_dir"] / "manifest.json").read_text())
    assert manifest["user_rows"]["half_life_days"] == record["half_life_days"]
    assert manifest["scoring"]["shallow_input"] == "rows"


def test_views_in_a_new_category_take_over_the_top_10_and_survive_a_restart(bundle, tmp_path):
    """Users with long histories in one category view 30 items of a category they never touched, 3
    times each, through POST /events: at least 6 of each one's top 10 are then of that category
    (before: at most 2), and the same 10 after a restart that replays the journal."""
    journal, auth = tmp_path / "journal", {"Authorization": "Bearer tok"}
    answers = {}
    with LiveRecommender.load(bundle, journal=journal) as live:
        shares = category_shares(live)
        client = TestClient(create_app(live, token="tok"))
        end = int(live._part.data_end)
        for row, target in focused_users(live, shares, 3):
            user = live.user_vocab.ids[row]
            members = np.flatnonzero(shares.argmax(axis=1) == target)
            viewed = live.item_vocab.ids[members[:30]].tolist()

            def in_target(items: list[str]) -> int:
                return int(sum(shares[live._item_rows[i], target] > 0 for i in items))

            assert in_target([i for i, _ in live.recommend(user, 10)]) <= 2
            events = [{"user_id": user, "item_id": item, "event_type": "view", "timestamp": end + 60 * (3 * j + r)}
                      for j, item in enumerate(viewed) for r in range(3)]
            r = client.post("/events", json={"events": events}, headers=auth)
            assert r.status_code == 200 and r.json() == {"accepted": 90, "rejected": {}}, r.text
            got = client.get("/recommend", params={"user_id": user, "k": 10}, headers=auth).json()
            after = [x["item_id"] for x in got["items"]]
            assert in_target(after) >= 6, f"{user}: {in_target(after)} of 10 from the category just viewed: {after}"
            assert not set(after) & set(viewed), "viewed items are excluded"
            answers[user] = after
    with LiveRecommender.load(bundle, journal=journal) as again:  # a restart: the journal replayed
        assert again.info()["realtime"]["events_replayed"] == 90 * len(answers)
        for user, after in answers.items():
            assert [i for i, _ in again.recommend(user, 10)] == after


def test_a_live_user_gets_exactly_the_row_and_vector_of_the_next_training_run(recency_run, bundle, tmp_path):
    """The same events give the same weights and the same vector: a known user's row after real-time
    events (in and out of time order, several types) equals the row the next training run builds
    from the log plus the journal, and the live vector equals the network's encoding of that row
    as training encodes its users; a new user's row too."""
    journal = tmp_path / "journal"
    dm = recency_run["datamodule"]
    h = dm.half_life_days
    assert h is not None
    with LiveRecommender.load(bundle, journal=journal) as live:
        user = live.user_vocab.ids[11]
        last = int(live._part.reference_times[11])
        items = live.item_vocab.ids[[3, 7, 7, 40, 3, 90]].tolist()
        times = [last + 86400 * 2, last - 86400 * 5, last + 3600, last + 86400 * 9, last + 86400 * 9, last - 60]
        kinds = ["view", "click", "purchase", "add_to_cart", "view", "view"]
        events = [{"user_id": user, "item_id": i, "timestamp": t, "event_type": k, "event_id": f"e{n}"}
                  for n, (i, t, k) in enumerate(zip(items, times, kinds))]
        events += [{"user_id": "newcomer", "item_id": i, "timestamp": last + 100 * n, "event_type": "click",
                    "event_id": f"n{n}"} for n, i in enumerate(items[:3])]
        assert live.ingest(events[:4])["accepted"] == 4  # two batches: the sums move forward in between
        assert live.ingest(events[4:])["accepted"] == 5
        states = {u: live.live_user(u) for u in (user, "newcomer")}
        network = live.network
    # the next training run: the same log plus the journal, the same cleaning and half-life
    nxt = InteractionDataModule(SyntheticSource(**SOURCE, seed=dm.source.seed), cleaning=dm.cleaning,
                                extra_paths=[str(journal)], recency_half_life_days=h).prepare()
    sums, ref = nxt.user_item_sums()
    rows = nxt.interaction_rows("all")
    for u, state in states.items():
        r = int(nxt.user_vocab.index_of([u])[0])
        lo, hi = sums.indptr[r], sums.indptr[r + 1]
        want_items = nxt.item_vocab.ids[sums.indices[lo:hi]]
        got_items = live.item_vocab.ids[state.row_items]
        order = np.argsort(want_items)
        assert got_items.tolist() == want_items[order].tolist()
        np.testing.assert_allclose(state.row_sums, sums.data[lo:hi][order], rtol=1e-9)
        assert state.row_ref == ref[r] == (max(times) if u == user else last + 200)
    # the known user's vector: the bundle's network encoding the next run's row as training does
    r = int(nxt.user_vocab.index_of([user])[0])
    row = rows[r]
    mapped = live.item_vocab.index_of(nxt.item_vocab.ids[row.indices].tolist())
    attached = np.zeros((live.n_users, live.n_items), dtype=np.float32)
    attached[11, mapped] = row.data
    network.attach_rows(sp.csr_matrix(attached))
    with torch.no_grad():
        want = network.eval().user_vectors(torch.tensor([11])).numpy()[0]
    np.testing.assert_allclose(states[user].vector, want, rtol=1e-5, atol=1e-5)


def test_test_users_are_scored_from_everything_before_the_test_period(recency_run):
    """Offline, as in real time: a test user's input is every event before the test period
    (training and validation, decayed to the latest of them), never a test event; the weights stay
    those fitted on the training period."""
    dm = recency_run["datamodule"]
    split = HeldOutSplit.from_datamodule(dm)
    history, seen, rows = split.inputs()
    ev = dm.events
    u, i, part = ev["user_idx"].to_numpy(), ev["item_idx"].to_numpy(), ev["split"].to_numpy()
    before = part != TEST
    assert (history == last_items(u[before], i[before], dm.n_users, dm.history_len, dm.n_items)).all()
    assert (seen != pair_matrix(dm.n_users, dm.n_items, u[before], i[before])).nnz == 0
    sums, _ = recency.decayed_sums(dm.n_users, dm.n_items, u[before], i[before], ev["weight"].to_numpy()[before],
                                   ev["timestamp"].to_numpy()[before], dm.half_life_days)
    np.testing.assert_allclose(rows.toarray(), np.log2(1 + sums.toarray()), rtol=1e-6)
    users = split.test.users
    assert (seen[users] != dm.train_seen[users]).nnz > 0, "validation events are part of the test users' input"
    assert (dm.test_relevant.multiply(seen) != 0).nnz == 0, "no test pair is part of the input"


def test_a_log_without_times_has_no_decay_and_says_so_once(caplog, tmp_path):
    rng = np.random.default_rng(0)
    events = pd.DataFrame({"user_id": rng.integers(0, 120, 3000).astype(str), "item_id": rng.integers(0, 60, 3000).astype(str)})
    with caplog.at_level(logging.INFO):
        rec = dmp_dl.fit(events, model="ease", **{"propensity.enabled": False, "audience.enabled": False,
                                                   "model.vae.max_epochs": 2, "evaluation.report": None,
                                                   "logger": "none", "trainer.accelerator": "cpu",
                                                   "privacy.erasure_list": str(tmp_path / "erased.txt"),
                                                   "privacy.audit_log": str(tmp_path / "audit.jsonl")})
    record = rec.metrics["model"]["recency"]
    assert record["half_life_days"] is None and record["chosen_by"] == "the log has no event times"
    said = [m for m in caplog.messages if "no event times, so event weights do not decay" in m]
    assert len(said) == 1, said


@pytest.mark.parametrize("value", [-1, 0, "soon", float("inf")])
def test_a_bad_half_life_is_one_line_naming_the_key(value):
    from omegaconf import OmegaConf

    from dmp_dl.core.rules import check_rules
    from dmp_dl.pipeline.checks import DATA_RULES

    with pytest.raises(ConfigError, match=r"data.recency_half_life_days must be auto or a finite number > 0 or null"):
        check_rules(OmegaConf.create({"data": {"recency_half_life_days": value}}), DATA_RULES)
    with pytest.raises(ConfigError, match="data.recency_half_life_days"):
        recency.check_half_life(value)


def test_the_rows_of_a_sample_of_users_are_their_rows_among_everyones(recency_run):
    dm = recency_run["datamodule"]
    users = np.array([3, 17, 42, 250, 499])
    others = np.setdiff1d(np.arange(dm.n_users), users)
    half_lives = [None, 0.5, 30.0]
    for h, rows in zip(half_lives, dm.rows_of_users(users, half_lives)):
        full = dm.interaction_rows("train", h)
        assert rows.shape == full.shape and rows[others].nnz == 0
        assert full[users].nnz > 0 and (rows[users] != full[users]).nnz == 0


def test_the_recency_choice_reads_the_sampled_users_rows_as_everyones_would_give_them(recency_run, monkeypatch):
    """Both ways of choosing the half-life score the validation sample on rows built for it alone
    (every user's rows for each half-life cost the whole log once per half-life, and were held at
    once): the scores are those of every user's rows."""
    from dmp_dl.evaluation.ranking import evaluate_scorers, sample_users
    from dmp_dl.models import ease as ease_lib
    from dmp_dl.models.embeddings import item_vectors, user_vectors
    from dmp_dl.training import recency_choice

    dm = recency_run["datamodule"]
    sample, ks, cpu = sample_users(dm.eval_dataset("val"), 80, 0), [10, 20], torch.device("cpu")
    options = dm.recency_candidates()
    assert len(options) > 2 and len(sample) == 80

    def reference(scores_of) -> dict[str, float]:
        results = evaluate_scorers(scores_of, sample, dm.n_items, ks, device=cpu, mrr=False)
        return {name: float(r["ndcg@20"]) for name, r in results.items()}

    shallow = ease_lib.EASESolver(dm.train_seen).served(40.0, 100)
    full = {label(h): (dm.interaction_rows("train", h) if h is not None else dm.train_seen) for h in options}
    expected = reference(lambda b: {n: shallow(x[b["user"].numpy()], weighted=n != "none") for n, x in full.items()})
    built = []
    whole_rows = dm.interaction_rows
    monkeypatch.setattr(dm, "interaction_rows", lambda *a, **k: built.append(a) or whole_rows(*a, **k))
    _, record = recency_choice.by_ease(None, dm, shallow, sample, "ndcg@20", ks, cpu)
    assert record["validation"] == expected and built == []

    net = recency_run["module"].net.cpu().eval()
    items = torch.as_tensor(item_vectors(net, dm.n_items, device=cpu))
    everyone = {}
    for h in options:
        net.attach_rows(dm.interaction_rows("train", h))
        everyone[label(h)] = torch.as_tensor(user_vectors(net, np.arange(dm.n_users), dm.train_history, device=cpu))
    expected = reference(lambda b: {n: v[b["user"]] @ items.T for n, v in everyone.items()})
    built.clear()
    _, record = recency_choice.by_autoencoder(net, dm, sample, "ndcg@20", ks, cpu)
    assert record["validation"] == pytest.approx(expected, abs=1e-6)
    assert built == [("train", None)]  # the undecayed rows it is left attached to, and no other
