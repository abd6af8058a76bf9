"""Real-time events: POST /events and LiveRecommender.ingest, the journal, replay, erasure, and the
next training run over the journal."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from dmp_dl.api.server import create_app
from dmp_dl.core.errors import ConfigError, UnknownIdError
from dmp_dl.data.datamodule import InteractionDataModule
from dmp_dl.data.journal import Journal, read_journal
from dmp_dl.data.synthetic import SyntheticSource
from dmp_dl.pipeline.run import run
from dmp_dl.realtime import LiveRecommender, RealtimeService
from dmp_dl.realtime.behaviour import BehaviourStats
from dmp_dl.serving.recommender import Recommender
from tests.conftest import AUTOENCODER_SERVED, QUIET_TRAINER, TINY_DATA, compose_cfg

KEY = "realtime-test-secret-0123456789abcdef"


_RUNS: dict[str, dict] = {}


def tiny_run(tmp_path_factory, *overrides: str) -> dict:
    """A tiny run with propensity, profiles and segments (what real-time updates touch), once per module."""
    if overrides not in _RUNS:
        out = tmp_path_factory.mktemp("rt") / "run"
        cfg = compose_cfg([*TINY_DATA, *QUIET_TRAINER, *AUTOENCODER_SERVED, "trainer.max_epochs=3", "logger=none", "evaluation.report=null",
                           f"privacy.erasure_list={out.parent / 'erased.txt'}",
                           f"privacy.audit_log={out.parent / 'audit.jsonl'}", *overrides], out)
        _RUNS[overrides] = run(cfg)
    return _RUNS[overrides]


@pytest.fixture(scope="module")
def rt_run(tmp_path_factory):
    """The default model (the automatic choice: on this data the autoencoder blended with EASE)."""
    yield tiny_run(tmp_path_factory)
    _RUNS.clear()


@pytest.fixture(scope="module", params=["auto", "two_tower"])
def any_run(request, rt_run, tmp_path_factory):
    """The default model's run and a two-tower run (a sequence encoder over the recent items)."""
    return rt_run if request.param == "auto" else tiny_run(tmp_path_factory, "model=two_tower")


def _copy(run_result, tmp_path):
    target = tmp_path / "artifacts"
    shutil.copytree(run_result["bundle_dir"], target)
    return target


@pytest.fixture
def bundle(rt_run, tmp_path):
    """A copy of the run's bundle of its own (its journal goes beside it)."""
    return _copy(rt_run, tmp_path)


@pytest.fixture
def live(bundle):
    with LiveRecommender.load(bundle) as rec:
        yield rec


@pytest.fixture
def any_live(any_run, tmp_path):
    """:func:`live` over the default model's bundle and over a two-tower bundle."""
    with LiveRecommender.load(_copy(any_run, tmp_path)) as rec:
        yield rec


def data_end(rec) -> int:
    return int(rec._part.data_end)


def category_of_items(rec) -> np.ndarray:
    """(n_items,) each item's main category (index into rec.profiles.categories)."""
    return np.asarray(rec._part.item_categories.argmax(axis=1)).ravel()


# -- the update of a known user ------------------------------------------------------------------
def test_a_burst_in_another_category_moves_recommendations_and_profile(any_live):
    live = any_live
    cat_of = category_of_items(live)
    # the category with the most interactions, which even a 3-epoch model has learned
    popularity = np.bincount(cat_of[live._seen_items], minlength=len(live.profiles.categories))
    target = int(np.argmax(popularity))
    name = live.profiles.categories[target]
    members = np.flatnonzero(cat_of == target)
    burst, rest = members[:8], set(live.item_vocab.ids[members[8:]].tolist())
    interest = np.where(live.profiles.top_categories == target, live.profiles.top_shares(), 0).sum(axis=1)
    users = live.user_vocab.ids[np.argsort(interest, kind="stable")[:5]]  # the least interested in it

    def mean_rank(user) -> float:
        ranked = [i for i, _ in live.recommend(user, live.n_items, exclude_seen=False)]
        return float(np.mean([r for r, i in enumerate(ranked) if i in rest]))

    def share(user) -> float:
        return next((x["share"] for x in live.profile(user)["interests"] if x["category"] == name), 0.0)

    in_top, in_top_before = 0, 0
    for user in users:
        before_rank, before_share = mean_rank(user), share(user)
        in_top_before += sum(i in rest for i, _ in live.recommend(user, 20))
        events = [{"user_id": user, "item_id": item, "event_type": "click", "timestamp": data_end(live) + 60 * (j + 1)}
                  for j, item in enumerate(live.item_vocab.ids[burst].tolist())]
        assert live.ingest(events) == {"accepted": 8, "rejected": {}}
        assert mean_rank(user) < before_rank - 5, "the category's other items should rank higher"
        assert share(user) > before_share + 0.2
        assert live.profile(user)["as_of"] == data_end(live) + 60 * 8
        in_top += sum(i in rest for i, _ in live.recommend(user, 20))
        assert not set(live.item_vocab.ids[burst]) & {i for i, _ in live.recommend(user, 50)}, "seen items are excluded"
    assert in_top > in_top_before


def test_live_user_updates_segment_propensity_and_vector(any_live):
    live = any_live
    user = live.user_vocab.ids[7]
    before = live.propensity([user])[0]
    stored_vector = live.user_vectors[live._user_rows[user]].copy()
    purchases = [{"user_id": user, "item_id": i, "event_type": "purchase", "value": 20.0,
                  "timestamp": data_end(live) + 3600 * (j + 1)} for j, i in enumerate(live.item_vocab.ids[10:16])]
    live.ingest(purchases)
    after = live.propensity([user])[0]
    assert 0 < after < 1 and after != before
    state = live.live_user(user)
    assert state.events == 6 and state.row == live._user_rows[user]
    row = live._user_rows[user]
    seen = live._seen_items[live._seen_indptr[row] : live._seen_indptr[row + 1]]
    assert set(state.items[:-6].tolist()) == set(seen.tolist()), "the whole known history, then the new items"
    assert live.item_vocab.ids[state.items[-6:]].tolist() == live.item_vocab.ids[10:16].tolist()
    assert not np.allclose(state.vector, stored_vector)
    if live.encodes_rows:
        # the default autoencoder: the vector encodes the user's whole row (every item of the history,
        # with its decayed event weights) as training encodes its users
        assert state.row_items.tolist() == sorted(set(state.items.tolist()))
        indptr, items, strength = live._rows_of([state])
        want_vector = live.row_user_vectors(indptr, items, strength, [state.attributes])[0]
        np.testing.assert_allclose(state.vector, want_vector, atol=1e-5)
    else:
        # the vector is the model's cold-start encoder on the whole history, as recommend_for_history scores it
        history = live.item_vocab.ids[state.items].tolist()
        want = live.recommend_for_history(history, k=10, attributes=state.attributes)
        assert live.recommend(user, 10) == want
    seg = live.segment(user)
    from dmp_dl.audience.segments import assign

    label, _ = assign(state.vector[None], live.stored_segments.centroids, True)
    assert seg["segment"] == int(label[0])
    assert sum(s["size"] for s in live.segments()) == live.n_users


def test_live_recommendations_are_the_bundles_served_score_of_the_live_history(live):
    """The default bundle scores deep + shallow (autoencoder dot product + weighted EASE item-item
    term); a live user, known or new, is scored by exactly that formula on their whole live history,
    with the autoencoder's vector re-encoded from it: their row of decayed event weights, what the
    EASE term reads too when the run chose a half-life (else their 0/1 items)."""
    from dmp_dl.data.recency import row_strength
    from dmp_dl.models.scoring import rows_matrix

    assert live.served is not None and live.served.uses_shallow, "the tiny default run serves the blend"
    assert type(live.network).__name__ == "UserAutoencoder"
    known = live.user_vocab.ids[3]
    row = live._user_rows[known]
    seen = live._seen_items[live._seen_indptr[row] : live._seen_indptr[row + 1]]
    fresh = [i for i in range(live.n_items) if i not in set(seen.tolist())][:4]
    t = data_end(live)
    events = [{"user_id": u, "item_id": live.item_vocab.ids[i], "event_type": "view", "timestamp": t + j + 1}
              for u in (known, "brand-new") for j, i in enumerate(fresh)]
    assert live.ingest(events)["accepted"] == 8
    for user in (known, "brand-new"):
        state = live.live_user(user)
        items = np.unique(state.items)
        expected_items = np.union1d(seen, fresh) if user == known else np.array(sorted(fresh))
        assert items.tolist() == expected_items.tolist(), "the whole live history: trained items and new ones"
        assert state.row_items.tolist() == items.tolist()
        indptr = np.array([0, len(items)])
        vector = live.row_user_vectors(indptr, items, row_strength(state.row_sums), [state.attributes])
        np.testing.assert_allclose(state.vector, vector[0], atol=1e-5)
        x = rows_matrix(indptr, items, live.n_items, row_strength(state.row_sums) if live.served.reads_rows else None)
        expected = live.served.scores(state.vector[None], live.item_vectors, x).numpy()[0]
        expected[items] = -np.inf
        top = np.argsort(-expected, kind="stable")[:10]
        got = live.recommend(user, 10)
        assert [i for i, _ in got] == live.item_vocab.ids[top].tolist()
        np.testing.assert_allclose([s for _, s in got], expected[top], rtol=1e-4, atol=1e-4)
    # a known user without real-time events is still the bundle's own answer
    other = live.user_vocab.ids[4]
    assert live.recommend(other, 10) == Recommender.recommend(live, other, 10)


def test_the_realtime_manifest_entry_is_checked(bundle):
    """The realtime entry passes the manifest schema, and a wrong type in it is refused in one line."""
    from dmp_dl.core.errors import BundleError
    from dmp_dl.store.manifest import check_manifest, manifest_text, seal

    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    entry = manifest["realtime"]
    assert isinstance(entry["data_end"], int) and entry["user_aligned"]
    check_manifest(manifest, path)
    entry["data_end"] = "yesterday"
    path.write_text(manifest_text(seal(manifest)))
    with pytest.raises(BundleError, match="realtime.data_end"):
        Recommender.load(bundle)


def test_stored_attributes_round_trip_to_the_same_vector(live):
    """A known user's cold vector from their stored attributes equals the network's own attribute row."""
    import torch

    if not live.reads_user_attributes:
        pytest.skip("this model reads no attributes")
    rows = np.arange(5)
    histories = [[live.item_vocab.ids[0]]] * 5
    records = [live._stored_attributes(int(r)) for r in rows]
    got, _, _ = live.cold_user_vectors(histories, records)
    net = live.network
    with torch.no_grad():
        hist = torch.full((5, live.history_len), live.n_items, dtype=torch.int64)
        hist[:, 0] = 0
        tokens = net.user_attr.tokens[torch.as_tensor(rows)]
        numeric = net.user_attr.numeric[torch.as_tensor(rows)]
        want = net.cold_user_vectors(hist, tokens, numeric).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_propensity_is_scored_when_read_and_kept_until_the_next_event(any_live, monkeypatch):
    """An event costs no propensity pass: the live score is computed when read, once per event,
    from the user's statistics as of their latest event, and equals a fresh score of that state."""
    live = any_live
    scorer = live._propensity
    calls = []
    real = scorer.score_snapshot
    monkeypatch.setattr(scorer, "score_snapshot", lambda snap: calls.append(len(snap.behaviour)) or real(snap))
    user = live.user_vocab.ids[9]
    t0 = data_end(live)
    for j, item in enumerate(live.item_vocab.ids[30:35]):
        live.ingest([{"user_id": user, "item_id": item, "event_type": "purchase", "value": 5.0, "timestamp": t0 + 60 * (j + 1)}])
    assert calls == [], "ingest scores nobody"
    first = live.propensity([user, user])
    assert calls == [1] and first[0] == first[1]
    assert live.propensity([user]) == [first[0]] and calls == [1], "read again: the kept score"
    fresh = float(real(live._snapshot([vars(live.live_user(user))]))[0])
    assert first[0] == pytest.approx(fresh, abs=1e-6)
    live.ingest([{"user_id": user, "item_id": live.item_vocab.ids[40], "event_type": "purchase", "value": 50.0,
                  "timestamp": t0 + 3600}])
    after = live.propensity([user])[0]
    assert calls == [1, 1] and after != first[0]
    assert after == pytest.approx(float(real(live._snapshot([vars(live.live_user(user))]))[0]), abs=1e-6)


# -- propensity statistics ------------------------------------------------------------------------
def test_behaviour_statistics_give_the_training_features(rt_run):
    """Features from the stored statistics (and from statistics updated event by event) are the
    features the propensity model computes from the whole event list."""
    dm, features = rt_run["datamodule"], rt_run["propensity"].scorer.features
    ev = dm.events
    end = int(ev["timestamp"].max())
    layout = BehaviourStats(features.behaviour)
    users = np.arange(40)
    stats = layout.from_events(ev["user_idx"].to_numpy(), ev["timestamp"].to_numpy(np.float64),
                               layout.type_codes(ev["event_type"].to_numpy()), ev["value"].to_numpy(np.float64),
                               dm.n_users, float(end))
    distinct = np.diff(dm.all_seen.indptr)[users]
    want = features.known(ev, users, end).behaviour
    got = layout.features(stats[users], np.full(len(users), end), np.full(len(users), end + 0.0), distinct)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # the same, from the first half of each user's events updated with the second half
    later = end + 86400 * 3.5
    for u in users[:10]:
        mine = ev.loc[ev["user_idx"] == u]
        half = len(mine) // 2
        first, second = mine.iloc[:half], mine.iloc[half:]
        s = layout.from_events(np.zeros(len(first), np.int64), first["timestamp"].to_numpy(np.float64),
                               layout.type_codes(first["event_type"].to_numpy()), first["value"].to_numpy(np.float64), 1,
                               float(first["timestamp"].max()) if len(first) else float(end))[0]
        ref = float(first["timestamp"].max()) if len(first) else -np.inf
        s, ref = layout.update(s, ref, second["timestamp"].to_numpy(np.float64),
                               layout.type_codes(second["event_type"].to_numpy()), second["value"].to_numpy(np.float64))
        got = layout.features(s[None], np.array([ref]), np.array([later]), np.array([mine["item_idx"].nunique()]))
        want = features.known(ev, np.array([u]), int(later)).behaviour
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_behaviour_statistics_of_users_in_blocks_are_those_of_one_pass(rt_run, monkeypatch):
    import dmp_dl.realtime.behaviour as behaviour_module

    dm, features = rt_run["datamodule"], rt_run["propensity"].scorer.features
    ev = dm.events
    layout = BehaviourStats(features.behaviour)
    plain_codes = layout.type_codes(ev["event_type"].astype(str).to_numpy())
    codes = layout.type_codes(ev["event_type"])  # the categorical column, through its categories
    np.testing.assert_array_equal(codes, plain_codes)
    assert (codes >= 0).all() and len(np.unique(codes)) > 1
    args = (ev["user_idx"].to_numpy(), ev["timestamp"].to_numpy(), codes, ev["value"].to_numpy(), dm.n_users,
            float(ev["timestamp"].max()))
    whole = layout.from_events(*args)
    monkeypatch.setattr(behaviour_module, "BLOCK_EVENTS", 50)  # blocks of a few users each
    assert len(ev) > 20 * 50
    np.testing.assert_array_equal(layout.from_events(*args), whole)


# -- new users over HTTP -----------------------------------------------------------------------
def test_a_new_user_is_served_by_every_endpoint(any_live):
    live = any_live
    client = TestClient(create_app(live, token="tok"))
    auth = {"Authorization": "Bearer tok"}
    items = live.item_vocab.ids[20:24].tolist()
    events = [{"user_id": name, "item_id": i, "event_type": "view", "timestamp": data_end(live) + 10 * j}
              for name in ("newbie", "twin") for j, i in enumerate(items)]
    assert client.post("/events", json={"events": events}).status_code == 401
    r = client.post("/events", json={"events": events}, headers=auth)
    assert r.status_code == 200 and r.json() == {"accepted": 8, "rejected": {}}
    r = client.get("/recommend", params={"user_id": "newbie", "k": 5}, headers=auth)
    assert r.status_code == 200 and len(r.json()["items"]) == 5
    assert not {x["item_id"] for x in r.json()["items"]} & set(items)
    assert [x["item_id"] for x in r.json()["items"]] == [i for i, _ in live.recommend_for_history(items, 5)]
    profile = client.get("/profile", params={"user_id": "newbie"}, headers=auth).json()
    assert profile["user_id"] == "newbie" and profile["interests"] and profile["segment"] is not None
    assert profile["event_types"]["view"] > 0 and set(profile) == set(live.profile(live.user_vocab.ids[0]))
    r = client.post("/propensity", json={"user_ids": ["newbie", live.user_vocab.ids[0]]}, headers=auth)
    assert r.status_code == 200 and 0 < r.json()["users"][0]["score"] < 1
    r = client.post("/lookalike", json={"seed_user_ids": ["newbie"], "k": 5}, headers=auth)
    assert r.status_code == 200 and len(r.json()["users"]) == 5
    assert "newbie" not in {u["user_id"] for u in r.json()["users"]}
    everyone = {"seed_user_ids": ["newbie"], "k": live.n_users + 1, "method": "contrast"}
    assert "twin" not in {u["user_id"] for u in client.post("/lookalike", json=everyone, headers=auth).json()["users"]}
    live.refresh_user_index()  # new users join the searched users within lookalike_refresh_seconds
    found = {u["user_id"]: u["score"] for u in client.post("/lookalike", json=everyone, headers=auth).json()["users"]}
    assert "twin" in found and "newbie" not in found
    # scored with its current vector, the seed's own (same history): v . (v - mean of the searched users)
    twin = live.live_user("twin").vector
    assert np.allclose(twin, live.live_user("newbie").vector)
    want = float(twin @ (twin - live._table.vectors.mean(axis=0)))
    assert found["twin"] == pytest.approx(want, rel=1e-4, abs=1e-4)
    if not live.served:  # unit-length two-tower vectors: the user with the same history is among the most alike
        assert "twin" in sorted(found, key=found.get, reverse=True)[:3]
    health = client.get("/health").json()
    assert health["users"] == live.n_users + 2 and health["realtime"]["new_users"] == 2
    assert "/events" in client.get("/openapi.json", headers=auth).json()["paths"]


def test_events_need_the_token_or_the_explicit_setting(live, bundle, monkeypatch):
    """Events enter the next training run: a server with a token takes them with the token only; a
    server without one refuses them (403, saying how to set a token) unless events_without_token."""
    item = live.item_vocab.ids[0]
    batch = {"events": [{"user_id": "stranger", "item_id": item, "event_type": "view", "timestamp": data_end(live) + 1}]}
    r = TestClient(create_app(live)).post("/events", json=batch)
    assert r.status_code == 403 and r.json()["error"] == "token_required", r.text
    assert "token=" in r.json()["detail"] and "events_without_token=true" in r.json()["detail"]
    assert len(read_journal(live._service.journal_dir)[0]) == 0, "nothing journaled"
    with pytest.raises(UnknownIdError):
        live.recommend("stranger", 3)
    guarded = TestClient(create_app(live, token="tok"))
    assert guarded.post("/events", json=batch).status_code == 401
    assert guarded.post("/events", json=batch, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert len(read_journal(live._service.journal_dir)[0]) == 0
    r = guarded.post("/events", json=batch, headers={"Authorization": "Bearer tok"})
    assert r.status_code == 200 and r.json()["accepted"] == 1
    r = TestClient(create_app(live, events_without_token=True)).post("/events", json={"events": [
        {**batch["events"][0], "user_id": "neighbour"}]})
    assert r.status_code == 200 and r.json()["accepted"] == 1
    assert len(read_journal(live._service.journal_dir)[0]) == 2
    # serve.py passes the setting through (uvicorn is not started here)
    import uvicorn
    from omegaconf import OmegaConf

    from dmp_dl.api.server import serve

    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: apps.append(app))
    monkeypatch.delenv("DMP_SERVE_TOKEN", raising=False)
    settings = Path(__file__).resolve().parents[1] / "conf" / "serve.yaml"
    assert OmegaConf.load(settings).events_without_token is False, "refused unless asked for"
    for allowed in (False, True):
        cfg = OmegaConf.load(settings)
        cfg.artifacts, cfg.realtime.enabled, cfg.events_without_token = str(bundle), False, allowed
        serve(cfg)
    statuses = [TestClient(app).post("/events", json=batch).json()["error"] for app in apps]
    assert statuses == ["token_required", "unavailable"], "the setting reached the app (realtime off: 409)"


def test_bad_events_are_counted_never_a_crash(live):
    client = TestClient(create_app(live, max_ids=40, max_body_bytes=8192, events_without_token=True))
    item = live.item_vocab.ids[0]
    user = live.user_vocab.ids[0]
    t = data_end(live)
    good = {"user_id": user, "item_id": item, "event_type": "view", "timestamp": t + 1}
    events = [
        5, "text", [1, 2], None,                                            # not objects
        {"user_id": {"a": 1}, "item_id": item},                             # nested value
        {"user_id": True, "item_id": item},                                 # a boolean is not an id
        {"user_id": "a\nb", "item_id": item},                               # a line break in an id
        {"item_id": item, "event_type": "view"},                            # missing_user_id
        {"user_id": user, "event_type": "view"},                            # missing_item_id
        {"user_id": user, "item_id": item, "timestamp": "yesterday", "event_type": "view"},   # bad_timestamp
        {"user_id": user, "item_id": item, "timestamp": "1970-01-02", "event_type": "view"},  # timestamp_out_of_range
        {"user_id": user, "item_id": item, "timestamp": t, "event_type": "teleport"},        # unknown_event_type
        {"user_id": user, "item_id": item, "timestamp": t, "event_type": "view", "value": "lots"},  # bad_value
        {"user_id": user, "item_id": "no-such-item", "timestamp": t, "event_type": "view"},    # unknown_item
        good, dict(good),                                                    # the second is a duplicate
        {**good, "timestamp": t + 2, "session": "s1"},                       # accepted, field ignored
    ]
    r = client.post("/events", json={"events": events})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["accepted"] == 2
    assert body["rejected"] == {"malformed_row": 7, "missing_user_id": 1, "missing_item_id": 1, "bad_timestamp": 1,
                                "timestamp_out_of_range": 1, "unknown_event_type": 1, "bad_value": 1, "duplicate": 1,
                                "unknown_item": 1}
    assert body["ignored_fields"] == ["session"]
    again = client.post("/events", json={"events": [good, {**good, "event_id": "e-1", "timestamp": t + 5},
                                                    {**good, "event_id": "e-1", "timestamp": t + 6}]}).json()
    assert again == {"accepted": 1, "rejected": {"duplicate": 2}}, "resent and repeated keys count once"
    assert client.post("/events", json={"events": [{**good, "event_id": "e-1", "timestamp": t + 7}]}).json()["rejected"] == {"duplicate": 1}
    for payload, status in (({"events": good}, 422), ({"events": [good] * 41}, 422), ({"evnts": []}, 422),
                            ({"events": [{**good, "user_id": "x" * 400}] * 30}, 413)):
        r = client.post("/events", json=payload)
        assert r.status_code == status, (payload, r.text)
        assert r.headers["content-type"].startswith("application/json") and "detail" in r.json()
    assert client.post("/events", json={"events": []}).json() == {"accepted": 0, "rejected": {}}
    for when in ("1970-01-02", int(time.time()) + 30 * 86400, "yesterday"):  # one event is checked like a log's rows
        answer = client.post("/events", json={"events": [{**good, "timestamp": when}]}).json()
        assert answer["accepted"] == 0 and set(answer["rejected"]) <= {"timestamp_out_of_range", "bad_timestamp"}
    rows = read_journal(live._service.journal_dir)[0]
    assert len(rows) == 3 and rows["event_id"].is_unique


def test_post_events_keeps_the_api_contract(live):
    """schemathesis against POST /events of a real-time server: valid batches answered 200 with the
    declared body, invalid ones refused with a declared 4xx and the shared error body."""
    pytest.importorskip("schemathesis")
    from tests.test_api_contract import _bench_contract

    bench = _bench_contract()
    app = create_app(live, token="tok", max_ids=20, max_body_bytes=1 << 16)
    spec = TestClient(app).get("/openapi.json", headers={"Authorization": "Bearer tok"}).json()
    op = spec["paths"]["/events"]["post"]
    assert {"400", "401", "403", "409", "413", "422"} <= set(op["responses"]) and op.get("security")
    assert spec["components"]["schemas"]["EventsRequest"]["properties"]["events"]["maxItems"] == 20
    result = bench.fuzz(bench.load_schema(app, "tok").include(path="/events"), examples=25)
    assert not result["failures"], "\n\n".join(result["failures"][:3])
    answers = result["statuses"]["POST /events"]
    assert answers["positive"].get("200", 0) >= 10 and "401" not in answers["positive"], answers


@pytest.mark.parametrize("options", [
    {"event_weights": {"view": 1.0, "purchase": 3.0}, "default_event_type": "view"},
    {"event_weights": None, "min_value": 1.0, "value_fill": 2.0, "timestamp_unit": "ms"},
    {"event_weights": {"view": 1.0, "click": 2.0}, "default_event_type": "view", "positive_event_types": ["click"],
     "max_timestamp": 2_000_000_000, "max_abs_value": 100.0},
    {"event_weights": None, "dedupe": False},
])
def test_small_batches_are_cleaned_like_a_training_log(options):
    """A batch of up to FEW_EVENTS events is cleaned in plain Python (no pandas fixed cost): it must
    give exactly what the training log's cleaning gives, for any mix of odd fields."""
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st

    from dmp_dl.data.cleaning import CleaningOptions
    from dmp_dl.realtime.intake import FIELDS, ErasedUsers, EventIntake

    intake = EventIntake(CleaningOptions(**options), {"i1": 0, "i2": 1, "7": 2}, None, ErasedUsers())
    some = st.sampled_from
    event = st.fixed_dictionaries({}, optional={
        "user_id": some(["u1", " u1 ", "U1", "", " ", "nan", "None", None, 3, 3.0, -0.0, float("nan"), "n/a"]),
        "item_id": some(["i1", "i2", " i2", "i3", 7, 7.0, "7", "", None, "NULL"]),
        "timestamp": some([None, 1_700_000_000, 1_700_000_000.9, 1_700_000_001, 1.7e12, 5, -3.5, 1e300, 2**62,
                           float("nan"), float("inf"), 1_999_999_999, 2_000_000_001]),
        "event_type": some([None, "view", " VIEW ", "click", "purchase", "bogus", "", 3, 1.5]),
        "value": some([None, 0, 1, 2.5, -1, 1e13, 150.0, float("inf"), float("nan"), 2**40]),
        "event_id": some([None, "e1", " e1", "e2", "", "nan", 5, 5.0, "5"]),
    })

    def columns(events):
        out = {f: [] for f in FIELDS}
        for ev in events:
            for f in FIELDS:
                out[f].append(ev.get(f))
        return out

    @hypothesis.settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(st.lists(event, max_size=6), st.lists(st.tuples(st.integers(0, 5), some([None, "e1", "e3"])), max_size=3))
    def check(events, copies):
        for i, event_id in copies:  # the same event again, under another key or none
            if events:
                events.append({**events[i % len(events)], "event_id": event_id})
        cols = columns(events)
        times = [1_700_000_100 if t is None else t for t in cols["timestamp"]]
        few = intake._clean_few(cols, times, None)
        full = intake._clean_frame(cols, times, None)
        assert few is not None
        assert few.rejected == full.rejected
        a, b = few.events, full.events
        for name in ("user", "item", "item_id", "timestamp", "event_type", "value", "weight"):
            assert getattr(a, name).tolist() == getattr(b, name).tolist(), name
        if intake.cleaning.dedupe:
            assert a.event_id.tolist() == b.event_id.tolist() and few.hashes.tolist() == full.hashes.tolist()

    check()
    text_times = columns([{"user_id": "u1", "item_id": "i1", "timestamp": "2026-01-01T00:00:00Z"}])
    assert intake._clean_few(text_times, text_times["timestamp"], None) is None, "text times take the full cleaning"


def test_a_server_without_real_time_answers_409(rec):
    r = TestClient(create_app(rec, token="tok")).post("/events", json={"events": [{"user_id": "u", "item_id": "i"}]},
                                                      headers={"Authorization": "Bearer tok"})
    assert r.status_code == 409 and "real-time events are off" in r.json()["detail"]


def test_random_events_never_crash(live):
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st

    scalar = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                       st.text(max_size=8), st.sampled_from([live.item_vocab.ids[0], live.user_vocab.ids[0], "view"]))
    value = st.one_of(scalar, st.lists(scalar, max_size=2), st.dictionaries(st.text(max_size=3), scalar, max_size=2))
    event = st.one_of(value, st.fixed_dictionaries({}, optional={k: value for k in
                                                                 ("user_id", "item_id", "timestamp", "event_type", "value", "event_id", "x")}))
    tried = 0

    @hypothesis.settings(max_examples=60, deadline=None, database=None,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(st.lists(event, max_size=6))
    def check(events):
        nonlocal tried
        tried += 1
        answer = live.ingest(events)
        assert answer["accepted"] + sum(answer["rejected"].values()) == len(events)

    check()
    assert tried >= 30


# -- durability, replay, restart ---------------------------------------------------------------
def test_restart_replays_the_journal_exactly_once(bundle):
    events = [{"user_id": u, "item_id": i, "event_type": "purchase", "value": 3.0, "timestamp": 1767225600 + k}
              for k, (u, i) in enumerate([("u000001", "i00003"), ("fresh", "i00004"), ("fresh", "i00005")])]
    with LiveRecommender.load(bundle) as first:
        assert first.ingest(events)["accepted"] == 3
        want = {u: (first.recommend(u, 5), first.profile(u), first.propensity([u])) for u in ("u000001", "fresh")}
    # a torn line of a batch that was being written when the process died (never acknowledged)
    segment = sorted((bundle.parent / "artifacts.journal").glob("events-*.csv"))[-1]
    with open(segment, "ab") as fh:
        fh.write(b"deadbeef,4,hxyz,fresh,i0000")
    for _ in range(2):  # replay is idempotent: every start gives the same state from the same journal
        with LiveRecommender.load(bundle) as again:
            assert again.info()["realtime"]["events_replayed"] == 3
            for u, (recs, profile, score) in want.items():
                assert again.recommend(u, 5) == recs and again.profile(u) == profile
                assert again.propensity([u]) == pytest.approx(score)
            assert again.ingest(events) == {"accepted": 0, "rejected": {"duplicate": 3}}
    rows = read_journal(segment.parent)[0]
    assert len(rows) == 3 and rows["journal_seq"].tolist() == ["1", "2", "3"]
    assert segment.read_bytes().endswith(b"\n")


def test_the_journal_is_refused_to_a_second_writer_and_to_another_id_space(tmp_path):
    j = Journal(tmp_path / "j")
    with pytest.raises(ConfigError, match="in use by another process"):
        Journal(tmp_path / "j")
    j.close()
    with pytest.raises(ConfigError, match="holds raw user ids but this bundle's user ids are pseudonyms"):
        Journal(tmp_path / "j", {"pseudonymized": True, "key_fingerprint": "abc"})


def test_journal_rotates_segments_and_erases_rows(tmp_path):
    j = Journal(tmp_path / "j", segment_bytes=4096)
    for b in range(30):
        _, token = j.append([(f"e{b}-{k}", f"user{k % 3}", "item", "2026-01-01T00:00:00Z", "view", "1.0") for k in range(5)])
        j.sync(token)
    rows = j.rows()
    assert len(rows) == 150 and len(list((tmp_path / "j").glob("events-*.csv"))) > 1
    assert j.forget(["user1"]) == 60
    _, token = j.append([("late", "user1", "item", "2026-01-01T00:00:01Z", "view", "1.0")])
    j.sync(token)
    rows = j.rows()
    assert len(rows) == 91 and (rows["user_id"] == "user1").sum() == 1
    assert rows["journal_seq"].astype(int).is_monotonic_increasing and rows["journal_seq"].iloc[-1] == "151"
    assert j.forget(["user1"]) == 1
    j.close()
    j = Journal(tmp_path / "j", segment_bytes=4096)  # numbering goes on after a restart, even past erased rows
    assert j.last_seq == 151 and j.append([("x", "u", "i", "2026-01-01T00:00:00Z", "view", "1.0")])[0] == 152
    j.close()


# -- erasure -------------------------------------------------------------------------------------
def test_erasure_removes_the_users_journal_rows(bundle, tmp_path):
    from dmp_dl.api.server import bundle_loader
    from dmp_dl.privacy.erasure import ErasureService
    from dmp_dl.realtime.service import RealtimeEraser, default_journal_dir

    lists = {"erasure_list": tmp_path / "erased.txt", "audit_log": tmp_path / "audit.jsonl"}
    service = RealtimeService(default_journal_dir(bundle), erasure_list=lists["erasure_list"])
    plain = bundle_loader(bundle)

    def load(at=None):  # as serve.py: erasure checks its new bundle with at=...
        return plain(at) if at is not None else service.attach(plain(), bundle)

    rec = load()
    eraser = RealtimeEraser(ErasureService(bundle, load, **lists), service, bundle)
    client = TestClient(create_app(rec, token="tok", eraser=eraser))
    auth = {"Authorization": "Bearer tok"}
    known = str(rec.user_vocab.ids[3])
    events = [{"user_id": u, "item_id": "i00001", "event_type": "view", "timestamp": 1767225600 + k}
              for k, u in enumerate([known, known, "walk-in", "stays"])]
    assert client.post("/events", json={"events": events}, headers=auth).json()["accepted"] == 4
    r = client.post("/erase", json={"user_ids": [known, "walk-in"]}, headers=auth)
    assert r.status_code == 200, r.text
    assert r.json()["journal_rows_removed"] == 3 and r.json()["removed_from_bundle"] == 1
    rows = read_journal(service.journal_dir)[0]
    assert rows["user_id"].tolist() == ["stays"]
    for user in (known, "walk-in"):
        assert client.get("/profile", params={"user_id": user}, headers=auth).status_code == 404
    assert client.get("/profile", params={"user_id": "stays"}, headers=auth).status_code == 200
    again = client.post("/events", json={"events": [{**events[0], "timestamp": 1767225700}]}, headers=auth).json()
    assert again == {"accepted": 0, "rejected": {"erased_user": 1}}, "an erased user's new events are refused"
    service.close()


# -- the next training run -----------------------------------------------------------------------
def test_training_over_the_log_and_the_journal_counts_each_event_once(rt_run, bundle, tmp_path):
    from dmp_dl.api.server import bundle_loader

    service = RealtimeService(tmp_path / "journal")
    plain = bundle_loader(bundle)

    def load():
        return service.attach(plain(), bundle)

    client = TestClient(create_app(load(), token="tok", reload=load))
    auth = {"Authorization": "Bearer tok"}
    live = service.current
    end = data_end(live)
    events = [{"user_id": "joiner", "item_id": i, "event_type": "purchase", "timestamp": end + 60 * k}
              for k, i in enumerate(live.item_vocab.ids[:6].tolist())]
    events += [{"user_id": "u000002", "item_id": "i00009", "event_type": "view", "timestamp": end + 500}]
    assert client.post("/events", json={"events": events}, headers=auth).json()["accepted"] == 7
    journal = service.journal_dir
    # a second copy of one journaled event in another file, as if delivered twice
    rows = read_journal(journal)[0]
    rows.iloc[:1].drop(columns=["journal_id", "journal_seq"]).to_csv(tmp_path / "resent.csv", index=False)
    out = tmp_path / "next"
    cfg = compose_cfg([*TINY_DATA, *QUIET_TRAINER, "trainer.max_epochs=1", "logger=none", "evaluation.report=null",
                       "propensity.enabled=false", "audience.enabled=false",
                       f"data.extra_paths=[{journal},{tmp_path / 'resent.csv'}]",
                       f"privacy.erasure_list={tmp_path / 'erased.txt'}"], out)
    result = run(cfg)
    quality = json.loads((out / "data_quality.json").read_text())
    sources = quality["events"]["sources"]
    segment = str(sorted(journal.glob("events-*.csv"))[0])
    assert sources[segment] == {"rows_in": 7, "rows_out": 7}
    assert sources[str(tmp_path / "resent.csv")] == {"rows_in": 1, "rows_out": 0}
    assert quality["events"]["dropped"].get("duplicate", 0) >= 1
    ev = result["datamodule"].events
    assert "joiner" in result["datamodule"].user_vocab and len(ev.loc[ev["user_id"] == "joiner"]) == 6
    manifest = json.loads((out / "artifacts" / "manifest.json").read_text())
    assert manifest["realtime"]["journals"] == {rows["journal_id"].iloc[0]: 7}
    # publish the new bundle where the server reads it and reload: nothing is applied twice
    shutil.rmtree(bundle)
    shutil.copytree(out / "artifacts", bundle)
    r = client.post("/reload", headers=auth)
    assert r.status_code == 200, r.text
    health = client.get("/health").json()["realtime"]
    assert health["events_replayed"] == 0 and health["live_users"] == 0 and health["new_users"] == 0
    assert client.get("/recommend", params={"user_id": "joiner"}, headers=auth).status_code == 200
    late = {"user_id": "joiner", "item_id": "i00010", "event_type": "view", "timestamp": end + 900}
    assert client.post("/events", json={"events": [late]}, headers=auth).json()["accepted"] == 1
    assert client.post("/reload", headers=auth).status_code == 200  # a later reload replays only what came after
    health = client.get("/health").json()["realtime"]
    assert health["events_replayed"] == 1 and health["journal_last_seq"] == 8
    assert service.current.live_user("joiner").events == 1
    service.close()


def test_a_journal_folder_is_an_event_log(tmp_path):
    j = Journal(tmp_path / "j")
    j.append([("e1", "u1", "i1", "2026-01-01T00:00:00Z", "view", "1.0"), ("e1", "u1", "i1", "2026-01-01T00:00:00Z", "view", "1.0"),
              ("e2", "u2", "i1", "2026-01-01T00:01:00Z", "click", "0.0")])
    j.close()
    from dmp_dl.data.event_files import EventFileSource

    dm = InteractionDataModule(EventFileSource, path=str(tmp_path / "j"), cleaning={"event_weights": {"view": 1, "click": 2}},
                               split={"method": "random_per_user", "val_frac": 0.0, "test_frac": 0.0}).prepare()
    assert dm.report.events.rows_out == 2 and dm.report.events.dropped == {"duplicate": 1}
    assert list(dm.journal_marks.values()) == [3]


def test_a_log_without_times_plus_a_journal_is_a_log_without_times(tmp_path):
    from dmp_dl.data.event_files import EventFileSource

    (tmp_path / "log.csv").write_text("user_id,item_id,event_type\n" + "".join(
        f"u{k % 5},i{k % 7},view\n" for k in range(40)))
    j = Journal(tmp_path / "j")
    j.append([(f"e{k}", f"u{k}", "i9", f"2026-01-01T00:0{k}:00Z", "view", "0.0") for k in range(3)])  # i9: not in the log
    j.close()
    dm = InteractionDataModule(EventFileSource, path=str(tmp_path / "log.csv"), extra_paths=[str(tmp_path / "j")],
                               cleaning={"event_weights": {"view": 1}}).prepare()
    segment = str(tmp_path / "j" / "events-000001.csv")
    assert dm.report.events.sources[segment] == {"rows_in": 3, "rows_out": 3}, "journal rows are not dropped for their times"
    assert not dm.has_timestamps


def test_a_pseudonymised_journal_needs_a_pseudonymising_run(tmp_path, monkeypatch):
    monkeypatch.setenv("DMP_PSEUDONYM_KEY", KEY)
    from dmp_dl.data.pseudonymize import Pseudonymizer
    from dmp_dl.privacy import PrivacyOptions

    key = Pseudonymizer(KEY.encode())
    j = Journal(tmp_path / "j", {"pseudonymized": True, "key_fingerprint": key.fingerprint})
    j.append([("e1", key.tag(key.one("u000001")), "i00001", "2026-01-01T00:00:00Z", "view", "0.0")])
    j.close()
    source = SyntheticSource(n_users=50, n_items=30, n_events=600, seed=0)
    common = {"source": source, "extra_paths": [str(tmp_path / "j")], "cleaning": {"event_weights": None},
              "split": {"method": "random_per_user", "val_frac": 0.0, "test_frac": 0.0}}
    with pytest.raises(ConfigError, match="holds pseudonymised user ids"):
        InteractionDataModule(**common).prepare()
    dm = InteractionDataModule(**common, privacy=PrivacyOptions(pseudonymize=True)).prepare()
    ev = dm.events
    assert not ev["user_id"].str.startswith("hmac").any() and not ev["user_id"].isin(["u000001"]).any()
    joined = ev.loc[ev["item_id"] == "i00001", "user_id"]
    assert key.one("u000001") in set(joined), "the journal's pseudonym is the log's pseudonym of the same user"
    other = Pseudonymizer(b"another-secret-0123456789")
    j2 = Journal(tmp_path / "k", {"pseudonymized": True, "key_fingerprint": other.fingerprint})
    j2.close()
    with pytest.raises(ConfigError, match="fingerprint"):
        InteractionDataModule(**{**common, "extra_paths": [str(tmp_path / "k")]}, privacy=PrivacyOptions(pseudonymize=True)).prepare()


def test_pseudonymised_bundles_journal_pseudonyms_only(tmp_path, monkeypatch, rt_run):
    monkeypatch.setenv("DMP_PSEUDONYM_KEY", KEY)
    out = tmp_path / "p"
    cfg = compose_cfg([*TINY_DATA, *QUIET_TRAINER, "trainer.max_epochs=1", "logger=none", "evaluation.report=null",
                       "propensity.enabled=false", "audience.enabled=false", "privacy.pseudonymize=true",
                       f"privacy.erasure_list={tmp_path / 'erased.txt'}", f"privacy.audit_log={tmp_path / 'audit.jsonl'}"], out)
    run(cfg)
    with LiveRecommender.load(out / "artifacts") as live:
        answer = live.ingest([{"user_id": "u000001", "item_id": "i00002", "event_type": "view", "timestamp": 1767225600},
                              {"user_id": "walk-in-42", "item_id": "i00003", "event_type": "view", "timestamp": 1767225601}])
        assert answer["accepted"] == 2
        assert live.recommend("walk-in-42", 3) and live.live_user("u000001").row >= 0
        text = b"".join(p.read_bytes() for p in live._service.journal_dir.iterdir() if p.is_file())
    assert b"walk-in-42" not in text and b"u000001" not in text
    rows = read_journal(out / "artifacts.journal")[0]
    assert rows["user_id"].str.startswith("hmac-sha256:").all() and len(rows) == 2
    # erasure by the command-line job: the next start removes the users' journal rows (by pseudonym)
    from dmp_dl.privacy.erasure import forget_users

    forget_users(out / "artifacts", ["walk-in-42"])
    with LiveRecommender.load(out / "artifacts") as live:
        assert live.live_user("walk-in-42") is None and live.live_user("u000001") is not None
        refused = live.ingest([{"user_id": "walk-in-42", "item_id": "i00004", "event_type": "view", "timestamp": 1767225609}])
        assert refused == {"accepted": 0, "rejected": {"erased_user": 1}}
    assert len(read_journal(out / "artifacts.journal")[0]) == 1


def test_unknown_user_queries_still_answer_404(live):
    with pytest.raises(UnknownIdError):
        live.recommend("nobody")
    with pytest.raises(UnknownIdError):
        live.lookalike(["nobody"])


# -- a real server killed right after it acknowledged a batch ---------------------------------
def _start_server(bundle, journal, port, cwd):
    import os
    import subprocess
    import sys
    import time

    import httpx

    from tests.test_server import REPO

    env = {**os.environ, "DMP_SERVE_TOKEN": "tok"}
    proc = subprocess.Popen([sys.executable, str(REPO / "serve.py"), f"artifacts={bundle}", f"port={port}",
                             f"journal={journal}", "log_level=warning"],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "serve.py did not come up"
        time.sleep(0.2)


@pytest.mark.slow  # two serve.py starts: ~60 s on a busy 2-core machine
def test_sigkill_right_after_an_acknowledged_batch_loses_nothing(bundle, tmp_path):
    import httpx

    from tests.test_server import free_port

    journal, port = tmp_path / "journal", free_port()
    base, auth = f"http://127.0.0.1:{port}", {"Authorization": "Bearer tok"}
    items = json.loads((bundle / "items.json").read_text())["ids"][:40]
    batches = [[{"user_id": f"visitor-{b}-{k % 7}", "item_id": items[(b * 13 + k) % 40], "event_type": "view",
                 "timestamp": 1767225600 + 10 * k} for k in range(25)] + [{"user_id": "u000004", "item_id": items[b],
                                                                            "event_type": "purchase", "value": 9.5,
                                                                            "timestamp": 1767226000 + b}]
               for b in range(3)]
    proc = _start_server(bundle, journal, port, tmp_path)
    try:
        for batch in batches:
            r = httpx.post(f"{base}/events", json={"events": batch}, headers=auth, timeout=30)
            assert r.status_code == 200 and r.json()["accepted"] == len(batch), r.text
        proc.kill()  # SIGKILL: no shutdown code runs
        proc.wait(timeout=30)
        proc = _start_server(bundle, journal, port, tmp_path)
        health = httpx.get(f"{base}/health").json()["realtime"]
        assert health["events_replayed"] == sum(map(len, batches)) and health["journal_last_seq"] == 78
        for b in range(3):
            for k in range(7):
                profile = httpx.get(f"{base}/profile", params={"user_id": f"visitor-{b}-{k}"}, headers=auth)
                assert profile.status_code == 200 and profile.json()["event_types"]["view"] > 0
        p = httpx.get(f"{base}/profile", params={"user_id": "u000004"}, headers=auth).json()
        assert p["event_types"]["purchase"] > 0 and p["as_of"] == 1767226002
        again = httpx.post(f"{base}/events", json={"events": batches[0]}, headers=auth).json()
        assert again == {"accepted": 0, "rejected": {"duplicate": 26}}
    finally:
        proc.kill()
        proc.wait(timeout=30)
    rows = read_journal(journal)[0]
    assert len(rows) == 78 and rows["event_id"].is_unique and rows["journal_seq"].astype(int).tolist() == list(range(1, 79))
