"""Real-time events and erasure that can be trusted: what a server acknowledges is what it serves,
and what a restart replays; an erased user is never served again, whatever fails on the way.

* the journal's place (never inside the bundle folder);
* erasure with a live journal: users unservable in memory before any file is rewritten, a journal
  that cannot be rewritten, erasure lists that a reload must not forget;
* one id, however it is written (``7777``, ``7777.0``, ``"7777"``);
* exactly once: the event key is the only duplicate rule, live and on replay, under concurrent posts;
* a journal that recovers from failed writes and segments without a restart, and says so in ``/health``;
* corrupt journal rows skipped and counted; uplift for a user known from real-time events only.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from dmp_dl.api.server import bundle_loader, create_app
from dmp_dl.core.errors import ConfigError, UnknownIdError
from dmp_dl.data import journal as journal_module
from dmp_dl.data.cleaning import CleaningOptions, clean_events, plain_id
from dmp_dl.data.erasure_list import SaltedHash, read_erasure_list
from dmp_dl.data.event_files import read_events
from dmp_dl.data.journal import Journal, read_journal
from dmp_dl.data.schema import USER, canonical_id, normalize_ids
from dmp_dl.privacy import erasure
from dmp_dl.privacy.erasure import ErasureService, forget_users
from dmp_dl.realtime import LiveRecommender, RealtimeOptions, RealtimeService
from dmp_dl.realtime.service import RealtimeEraser, check_journal_place, default_journal_dir
from dmp_dl.store.bundle import MANIFEST, BundleWriter, write_manifest

REPO = Path(__file__).resolve().parents[1]
AUTH = {"Authorization": "Bearer tok"}


@pytest.fixture
def place(trained, tmp_path, monkeypatch) -> Path:
    """A copy of the trained bundle whose manifest records an erasure list and audit log of its own
    (under ``tmp_path/privacy``); its journal goes beside it. No secret in the environment."""
    monkeypatch.delenv("DMP_PSEUDONYM_KEY", raising=False)
    bundle = Path(shutil.copytree(trained["bundle_dir"], tmp_path / "artifacts"))
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["privacy"].update(erasure_list=str(tmp_path / "privacy" / "erased.txt"),
                               audit_log=str(tmp_path / "privacy" / "audit.jsonl"))
    write_manifest(bundle, manifest)
    return bundle


class Server:
    """A real-time server over ``bundle``, built as ``serve.py`` builds it, answering in process."""

    def __init__(self, bundle: Path, options: RealtimeOptions | None = None, **erasure_settings):
        self.bundle = bundle
        self.service = RealtimeService(default_journal_dir(bundle), options)
        plain = bundle_loader(bundle)

        def load(at=None):  # at: a bundle the erasure checks before publishing it (no replay)
            return plain(at) if at is not None else self.service.attach(plain(), bundle)

        self.eraser = RealtimeEraser(ErasureService(bundle, load, **erasure_settings), self.service, bundle)
        self.client = TestClient(create_app(load(), token="tok", eraser=self.eraser, reload=load))

    @property
    def live(self) -> LiveRecommender:
        return self.service.current

    def post(self, path: str, body: dict):
        return self.client.post(path, json=body, headers=AUTH)

    def events(self, events: list[dict]) -> dict:
        r = self.post("/events", {"events": events})
        assert r.status_code == 200, r.text
        return r.json()

    def status(self, user) -> int:
        """The status of GET /recommend for ``user``."""
        return self.client.get("/recommend", params={"user_id": user}, headers=AUTH).status_code

    def journal_users(self) -> list[str]:
        return read_journal(self.service.journal_dir)[0]["user_id"].tolist()

    def close(self) -> None:
        self.service.close()


@pytest.fixture
def server(place):
    srv = Server(place)
    yield srv
    srv.close()


def start(live) -> int:
    """A time after the bundle's data: events at start + k are in range and in order."""
    return int(live._part.data_end) + 60


def view(user, item, t, **more) -> dict:
    return {"user_id": user, "item_id": item, "event_type": "view", "timestamp": t, **more}


# -- where the journal may live ------------------------------------------------------------------
def test_a_journal_inside_the_bundle_folder_is_refused_at_start(place, tmp_path, capsys):
    from omegaconf import OmegaConf

    from dmp_dl.api.server import serve
    from dmp_dl.core.cli import report_errors

    link = tmp_path / "bundle-link"
    link.symlink_to(place, target_is_directory=True)
    for journal in (place / "journal", place, link / "journal"):  # a symlink is resolved
        with pytest.raises(ConfigError, match="is inside the bundle folder"):
            check_journal_place(journal, place)
    with pytest.raises(ConfigError, match="is inside the bundle folder"):
        check_journal_place(place / "journal", link)
    with pytest.raises(ConfigError, match="holds the bundle folder"):
        check_journal_place(tmp_path, place)
    check_journal_place(default_journal_dir(link), link)  # the default, beside the bundle, is fine
    with pytest.raises(ConfigError, match="is inside the bundle folder"):
        LiveRecommender.load(place, journal=link / "journal")
    cfg = OmegaConf.load(REPO / "conf" / "serve.yaml")
    cfg.artifacts, cfg.journal = str(place), str(link / "journal")
    with pytest.raises(SystemExit) as exit_info, report_errors():
        serve(cfg)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: journal={link / 'journal'} is inside the bundle folder {place}")
    assert not (place / "journal").exists() and not default_journal_dir(place).exists(), "nothing was created"


# -- erasure with a live journal -----------------------------------------------------------------
def test_erased_users_are_unservable_before_any_file_is_rewritten(server, monkeypatch):
    live = server.live
    t = start(live)
    known, items = str(live.user_vocab.ids[3]), live.item_vocab.ids[:6].tolist()
    assert server.events([view(u, items[k], t + k) for k, u in enumerate([known, "walk-in", "stays"])])["accepted"] == 3
    live.refresh_user_index()  # the walk-in is among the users lookalike searches
    everyone = {"seed_user_ids": ["stays"], "k": live.n_users + 5, "method": "centroid"}
    found = {u["user_id"] for u in server.post("/lookalike", everyone).json()["users"]}
    assert {known, "walk-in"} <= found
    seen_during = {}
    forget = server.eraser.inner.forget

    def observed(user_ids):  # the state the old view serves while the files are being rewritten
        view_ = server.service.current
        for user in (known, "walk-in"):
            with pytest.raises(UnknownIdError):
                view_.recommend(user)
            with pytest.raises(UnknownIdError):
                view_.profile(user)
        seen_during["audience"] = {u for u, _ in view_.lookalike(["stays"], live.n_users + 5, method="centroid")}
        seen_during["events"] = view_.ingest([view(known, items[4], t + 10), view("walk-in", items[5], t + 11)])
        with pytest.raises(UnknownIdError):
            view_.lookalike([known])
        return forget(user_ids)

    monkeypatch.setattr(server.eraser.inner, "forget", observed)
    r = server.post("/erase", {"user_ids": [known, "walk-in"]})
    assert r.status_code == 200, r.text
    assert not {known, "walk-in"} & seen_during["audience"] and "stays" not in seen_during["audience"]
    assert seen_during["events"] == {"accepted": 0, "rejected": {"erased_user": 2}}
    assert r.json()["journal_rows_removed"] == 2 and server.journal_users() == ["stays"]
    assert server.status(known) == 404 and server.status("walk-in") == 404 and server.status("stays") == 200


def test_an_erasure_that_did_not_happen_leaves_the_users_served(server):
    live = server.live
    user = str(live.user_vocab.ids[5])
    audit = Path(json.loads((server.bundle / MANIFEST).read_text())["privacy"]["audit_log"])
    audit.mkdir(parents=True)  # a folder where the audit log belongs: nothing can be written
    r = server.post("/erase", {"user_ids": [user, "walk-in"]})
    assert r.status_code == 409 and r.json()["error"] == "not_writable" and "nothing was changed" in r.json()["detail"]
    assert server.status(user) == 200, "not erased: served as the files say"
    assert server.events([view("walk-in", live.item_vocab.ids[0], start(live))]) == {"accepted": 1, "rejected": {}}


def test_a_journal_that_cannot_be_rewritten_never_brings_erased_users_back(server, monkeypatch):
    live = server.live
    t = start(live)
    known, items = str(live.user_vocab.ids[3]), live.item_vocab.ids[:6].tolist()
    events = [view(u, items[k], t + k) for k, u in enumerate([known, known, "walk-in", "walk-in", "stays"])]
    assert server.events(events)["accepted"] == 5

    def full_disk(self, user_ids):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Journal, "forget", full_disk)
    r = server.post("/erase", {"user_ids": [known, "walk-in"]})
    assert r.status_code == 409, r.text
    assert r.json()["error"] == "journal_not_rewritten" and "No space left on device" in r.json()["detail"]
    for user in (known, "walk-in"):
        assert server.status(user) == 404
        assert server.client.get("/profile", params={"user_id": user}, headers=AUTH).status_code == 404
        assert server.post("/lookalike", {"seed_user_ids": [user]}).status_code == 404
    assert server.events([view("walk-in", items[5], t + 9)]) == {"accepted": 0, "rejected": {"erased_user": 1}}
    health = server.client.get("/health").json()
    assert health["status"] == "degraded" and health["journal"] == {"writable": True, "error": None,
                                                                   "erased_rows_pending": True}
    assert server.journal_users().count("walk-in") == 2, "still on disk"
    assert server.live.info()["realtime"]["events_replayed"] == 1, "but never replayed"
    monkeypatch.undo()
    assert server.post("/reload", {}).status_code == 200  # the next attach removes the rows
    assert server.journal_users() == ["stays"]
    assert server.client.get("/health").json()["status"] == "ok"
    server.close()
    again = Server(server.bundle)  # and a restart serves only what is left
    try:
        assert again.status("walk-in") == 404 and again.status(known) == 404 and again.status("stays") == 200
        assert again.live.info()["realtime"]["events_replayed"] == 1
    finally:
        again.close()


def test_a_recorded_erasure_whose_swap_failed_keeps_the_live_view_without_the_users(server, monkeypatch):
    live = server.live
    t = start(live)
    known = str(live.user_vocab.ids[8])
    assert server.events([view(u, live.item_vocab.ids[k], t + k) for k, u in enumerate([known, "walk-in"])])["accepted"] == 2

    def broken(*args):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(BundleWriter, "publish", broken)
    monkeypatch.setattr(erasure, "_restore", broken)
    r = server.post("/erase", {"user_ids": [known, "walk-in"]})
    assert r.status_code == 409 and r.json()["error"] == "erasure_failed" and "run forget again" in r.json()["detail"]
    assert server.status(known) == 404 and server.status("walk-in") == 404
    assert server.events([view("someone", live.item_vocab.ids[3], t + 5)]) == {"accepted": 1, "rejected": {}}, \
        "the live view still takes events"
    assert "walk-in" not in server.journal_users()


def test_forget_into_another_erasure_list_survives_reload_and_restart(server, tmp_path):
    live = server.live
    t = start(live)
    known, items = str(live.user_vocab.ids[4]), live.item_vocab.ids[:5].tolist()
    assert server.events([view(u, items[k], t + k) for k, u in enumerate([known, "walk-in", "stays"])])["accepted"] == 3
    other = {"erasure_list": tmp_path / "elsewhere" / "erased.txt", "audit_log": tmp_path / "elsewhere" / "audit.jsonl"}
    # only in the journal: the bundle is published again, naming the list
    summary = forget_users(server.bundle, ["walk-in"], **other)
    assert summary["not_in_bundle"] == 1 and summary["erasure_list"] == str(other["erasure_list"])
    record = json.loads((server.bundle / MANIFEST).read_text())["privacy"]["erasures"][-1]
    assert record["erasure_list"] == str(other["erasure_list"]) and record["users_removed"] == 0
    assert server.post("/reload", {}).status_code == 200
    assert server.status("walk-in") == 404 and "walk-in" not in server.journal_users()
    forget_users(server.bundle, [known], **other)  # in the bundle too
    assert server.post("/reload", {}).status_code == 200
    assert server.status(known) == 404 and server.journal_users() == ["stays"]
    assert server.events([view("walk-in", items[3], t + 7)]) == {"accepted": 0, "rejected": {"erased_user": 1}}
    again = forget_users(server.bundle, ["walk-in"], **other)
    assert again["added_to_erasure_list"] == 0 and len(json.loads((server.bundle / MANIFEST).read_text())[
        "privacy"]["erasures"]) == 2, "a list the bundle names already needs no new record"
    server.close()
    restarted = Server(server.bundle)
    try:
        assert restarted.status("walk-in") == 404 and restarted.status(known) == 404
        assert restarted.live.info()["realtime"]["events_replayed"] == 1
    finally:
        restarted.close()


# -- one id, however it is written ---------------------------------------------------------------
def test_an_id_is_the_same_text_whatever_its_type():
    values = [7777.0, 7777, "7777", " 7777 ", np.float64(7777), np.int64(7777), np.float32(3.0), "7777.0", "007", 2.5,
              -0.0, 1e16, None, float("nan"), float("inf"), pd.NA, "a b", True]
    want = ["7777"] * 6 + ["3", "7777.0", "007", "2.5", "0", "1e+16", "", "", "", "", "a b", "True"]
    assert [canonical_id(v) for v in values] == want
    assert [plain_id(v) for v in values] == want
    assert normalize_ids(pd.Series(values, dtype=object)).tolist() == want
    floats = [7777.0, 2.5, float("nan"), 1e20, -3.0]
    assert normalize_ids(pd.Series(floats)).tolist() == [canonical_id(v) for v in floats] == ["7777", "2.5", "", "1e+20", "-3"]
    assert normalize_ids(pd.Series(["a ", None], dtype="string")).tolist() == ["a", ""]


def test_a_numeric_id_is_one_user_in_events_queries_and_erasure(server):
    live = server.live
    t = start(live)
    items = live.item_vocab.ids[:4].tolist()
    answer = server.events([view(7777.0, items[0], t), view(7777, items[1], t + 1), view(" 7777", items[2], t + 2),
                            view(7777.0, items[2], t + 2)])
    assert answer == {"accepted": 3, "rejected": {"duplicate": 1}}, "7777.0 and 7777 are one user: the last is a repeat"
    assert live.live_user("7777").events == 3 and live.live_user(7777.0) is live.live_user("7777")
    assert server.status("7777") == 200 and live.recommend(7777.0) == live.recommend("7777")
    assert set(server.journal_users()) == {"7777"}
    r = server.post("/erase", {"user_ids": [7777.0]})
    assert r.status_code == 200 and r.json()["not_in_bundle"] == 1 and r.json()["journal_rows_removed"] == 3
    assert server.status("7777") == 404 and server.journal_users() == []
    assert server.events([view(7777, items[3], t + 9)]) == {"accepted": 0, "rejected": {"erased_user": 1}}
    entries = read_erasure_list(r.json()["erasure_list"])
    salt, hashes = next(iter(entries.salted.items()))
    assert SaltedHash(bytes.fromhex(salt)).one("7777") in hashes
    for same in ("7777", 7777.0, np.int64(7777)):  # the Python API reads the id the same way
        assert forget_users(server.bundle, [same])["added_to_erasure_list"] == 0


# -- exactly once ---------------------------------------------------------------------------------
def test_events_with_different_ids_are_different_events_live_and_after_a_restart(place):
    with LiveRecommender.load(place) as live:
        base = view("twin-buyer", live.item_vocab.ids[0], start(live))
        assert live.ingest([{**base, "event_id": "a"}, {**base, "event_id": "b"}]) == {"accepted": 2, "rejected": {}}
        assert live.ingest([{**base, "event_id": "c"}, {**base, "event_id": "a"}]) == {"accepted": 1, "rejected": {"duplicate": 1}}
        assert live.ingest([base, dict(base)]) == {"accepted": 1, "rejected": {"duplicate": 1}}, "no id: the content is the key"
        assert live.live_user("twin-buyer").events == 4
    with LiveRecommender.load(place) as again:
        realtime = again.info()["realtime"]
        assert realtime["events_replayed"] == 4 and realtime["replay_dropped"] == {}
        assert again.live_user("twin-buyer").events == 4
    # the next training run reads the journal (data.extra_paths) by the same rule
    table = read_events(default_journal_dir(place), key="data.extra_paths[0]")
    clean, report = clean_events(table.frame, CleaningOptions(), constant_time_is_no_time=False)
    assert int((clean[USER] == "twin-buyer").sum()) == 4
    assert report.dropped.get("duplicate", 0) == 0


def test_a_resent_event_without_time_or_id_counts_once(place):
    with LiveRecommender.load(place) as live:
        event = {"user_id": "resender", "item_id": live.item_vocab.ids[1], "event_type": "click"}
        assert live.ingest([event]) == {"accepted": 1, "rejected": {}}
        second = int(time.time())
        while int(time.time()) == second:  # the receive time moves on
            time.sleep(0.05)
        assert live.ingest([event]) == {"accepted": 0, "rejected": {"duplicate": 1}}
        assert live.ingest([{**event, "value": 2.0}]) == {"accepted": 1, "rejected": {}}, "another value: another event"
        assert live.ingest([{**event, "timestamp": start(live)}]) == {"accepted": 1, "rejected": {}}, \
            "a time the client gives is part of the event"
        assert live.live_user("resender").events == 3


def test_what_is_acknowledged_under_concurrent_posts_is_exactly_what_a_restart_replays(place):
    """Threads post batches (one event to over FEW_EVENTS) mixing their own ids, ids shared between
    threads, events without id or time, and the same content under different ids. Every accepted
    event is applied once live and once on replay, in the same order: the same histories."""
    rng = np.random.default_rng(0)
    with LiveRecommender.load(place) as live:
        t = start(live)
        items = live.item_vocab.ids[:40].tolist()
        users = [str(u) for u in live.user_vocab.ids[:6]] + [f"walk-in-{i}" for i in range(6)]
        plans = []
        for thread in range(4):
            batches = []
            for b in range(12):
                size = int(rng.choice([1, 3, 20, 80]))
                batch = []
                for k in range(size):
                    event = {"user_id": users[rng.integers(len(users))], "item_id": items[rng.integers(len(items))],
                             "event_type": "view"}
                    kind = rng.integers(4)
                    if kind == 0:
                        event.update(event_id=f"{thread}-{b}-{k}", timestamp=t + int(rng.integers(500)))
                    elif kind == 1:  # an id any thread may send first
                        event.update(event_id=f"shared-{rng.integers(30)}", timestamp=t + int(rng.integers(500)))
                    elif kind == 2:  # the same content as other threads' events, no id and no time
                        event = {"user_id": users[k % 3], "item_id": items[k % 5], "event_type": "view"}
                    else:  # the same content under a new id
                        event.update(user_id=users[0], item_id=items[0], timestamp=t, event_id=f"{thread}-{b}-{k}")
                    batch.append(event)
                batches.append(batch)
            plans.append(batches)
        answers, failures = [], []

        def post(batches):
            try:
                for batch in batches:
                    answers.append(live.ingest(batch))
            except Exception as exc:  # noqa: BLE001 - reported below
                failures.append(exc)

        threads = [threading.Thread(target=post, args=(p,)) for p in plans]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert not failures, failures
        sent = sum(len(b) for p in plans for b in p)
        accepted = sum(a["accepted"] for a in answers)
        duplicates = sum(a["rejected"].get("duplicate", 0) for a in answers)
        assert accepted + duplicates == sent and duplicates > 0 and accepted > sent // 3
        assert live.info()["realtime"]["events_applied"] == accepted
        state = {k: (u.items.tolist(), u.events, u.last_event) for k, u in live._users.items()}
        recommended = {u: live.recommend(u, 5) for u in users}
    rows = read_journal(default_journal_dir(place))[0]
    assert len(rows) == accepted and rows["event_id"].is_unique
    with LiveRecommender.load(place) as again:
        realtime = again.info()["realtime"]
        assert realtime["events_replayed"] == accepted and realtime["replay_dropped"] == {}
        assert {k: (u.items.tolist(), u.events, u.last_event) for k, u in again._users.items()} == state
        assert {u: again.recommend(u, 5) for u in users} == recommended


# -- a journal that recovers without a restart ---------------------------------------------------
def _rows(n: int, tag: str) -> list[tuple]:
    return [(f"{tag}-{k}", f"user{k % 3}", "item", "2026-01-01T00:00:00Z", "view", "1.0") for k in range(n)]


def test_a_segment_that_cannot_be_started_loses_nothing_and_is_retried(tmp_path, monkeypatch):
    j = Journal(tmp_path / "j", segment_bytes=4096)
    real_open = os.open
    refusals = {"left": 2}

    def no_inodes(path, flags, mode=0o777, **kw):
        if "events-000002" in str(path) and refusals["left"]:
            refusals["left"] -= 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, flags, mode, **kw)

    monkeypatch.setattr(journal_module.os, "open", no_inodes)
    for b in range(40):
        _, token = j.append(_rows(5, f"b{b}"))
        j.sync(token)
    assert refusals["left"] == 0 and j.error is None
    segments = sorted((tmp_path / "j").glob("events-*.csv"))
    assert len(segments) >= 2 and not list((tmp_path / "j").glob(".*.tmp"))
    rows, _, parts = read_journal(tmp_path / "j")
    assert len(rows) == 200 and rows["journal_seq"].astype(int).tolist() == list(range(1, 201))
    assert all(malformed == 0 for _, _, malformed in parts)
    j.close()


def test_a_failed_write_is_refused_then_the_next_batch_is_taken(tmp_path, monkeypatch):
    j = Journal(tmp_path / "j")
    j.append(_rows(3, "before"))
    real_write, real_truncate = os.write, os.ftruncate
    state = {"writes": 1, "truncates": 1}

    def half_then_full(fd, data):  # half a batch reaches the disk, then it is full
        if state["writes"] and len(data) > 100:
            state["writes"] -= 1
            real_write(fd, bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    def no_truncate(fd, size):  # and the half line cannot even be cut off at once
        if state["truncates"]:
            state["truncates"] -= 1
            raise OSError(errno.EIO, "Input/output error")
        return real_truncate(fd, size)

    monkeypatch.setattr(journal_module.os, "write", half_then_full)
    monkeypatch.setattr(journal_module.os, "ftruncate", no_truncate)
    with pytest.raises(OSError):
        j.append(_rows(10, "lost"))
    assert j.error == "cannot append to the journal (No space left on device)"
    _, token = j.append(_rows(10, "after"))
    j.sync(token)
    assert j.error is None
    rows, _, parts = read_journal(tmp_path / "j")
    assert rows["event_id"].str.split("-").str[0].tolist() == ["before"] * 3 + ["after"] * 10
    assert rows["journal_seq"].astype(int).tolist() == list(range(1, 14)) and parts[0][2] == 0
    j.close()


def test_post_events_recovers_from_a_full_disk_and_health_says_so(place, monkeypatch):
    srv = Server(place, RealtimeOptions(segment_bytes=4096))
    try:
        live = srv.live
        t = start(live)
        items = live.item_vocab.ids[:20].tolist()
        health = srv.client.get("/health").json()
        assert health["status"] == "ok" and health["journal"]["writable"] is True
        real_open, real_write = os.open, os.write
        full = {"on": False}

        def no_new_files(path, flags, mode=0o777, **kw):  # no inodes: no segment can be started
            if "events-" in str(path) and not os.path.exists(path):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_open(path, flags, mode, **kw)

        def write(fd, data):
            if full["on"]:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_write(fd, data)

        monkeypatch.setattr(journal_module.os, "open", no_new_files)
        monkeypatch.setattr(journal_module.os, "write", write)
        accepted = 0
        for b in range(12):  # past segment_bytes: the batches stay in the current segment
            accepted += srv.events([view(f"v{b}", items[k], t + k) for k in range(8)])["accepted"]
        assert accepted == 96
        full["on"] = True
        r = srv.post("/events", {"events": [view("lost", items[0], t)]})
        assert r.status_code == 409 and r.json()["error"] == "journal_unavailable"
        health = srv.client.get("/health").json()
        assert health["status"] == "degraded" and health["journal"]["writable"] is False
        assert "No space left on device" in health["journal"]["error"] and str(place) not in json.dumps(health)
        full["on"] = False
        monkeypatch.setattr(journal_module.os, "open", real_open)
        assert srv.events([view("back", items[1], t + 1)]) == {"accepted": 1, "rejected": {}}, "no restart needed"
        assert srv.client.get("/health").json()["status"] == "ok"
        assert len(list(srv.service.journal_dir.glob("events-*.csv"))) == 2
        schema = srv.client.get("/openapi.json", headers=AUTH).json()["components"]["schemas"]
        assert schema["Health"]["properties"]["status"]["enum"] == ["ok", "degraded"]
        assert set(schema["JournalHealth"]["properties"]) == {"writable", "error", "erased_rows_pending"}
    finally:
        srv.close()
    with LiveRecommender.load(place) as again:
        assert again.info()["realtime"]["events_replayed"] == 97 and again.live_user("lost") is None


def test_corrupt_journal_rows_are_skipped_and_counted(place, caplog):
    with LiveRecommender.load(place) as live:
        t = start(live)
        assert live.ingest([view(f"r{k}", live.item_vocab.ids[k], t + k) for k in range(6)])["accepted"] == 6
    segment = sorted(default_journal_dir(place).glob("events-*.csv"))[0]
    lines = segment.read_bytes().split(b"\n")  # header, 6 rows, ""
    lines[2] = b"not,a,journal,row"
    lines[3] = lines[3].replace(b"r2", b"r\xff2")  # not UTF-8
    fields = lines[4].split(b",")
    lines[4] = b",".join([fields[0], b"x", *fields[2:]])  # no sequence number
    segment.write_bytes(b"\n".join(lines))
    with caplog.at_level(logging.WARNING, logger="dmp_dl.realtime.service"):
        with LiveRecommender.load(place) as again:
            realtime = again.info()["realtime"]
            assert realtime["replay_dropped"] == {"malformed_row": 3} and realtime["events_replayed"] == 3
            assert {u for u in ("r0", "r4", "r5") if again.live_user(u) is not None} == {"r0", "r4", "r5"}
    assert "skipped 3 corrupt rows" in caplog.text and segment.name in caplog.text


# -- uplift for a user known from real-time events only ------------------------------------------
class SameUplift:
    """An uplift model scoring every user alike: what matters here is who may be scored."""

    def score_rows(self, rec, rows):
        n = len(rows)
        return np.full(n, 0.1), np.full(n, 0.2), np.full(n, 0.3)


def test_uplift_answers_a_new_real_time_user_with_409_not_404(server):
    live = server.live
    live.uplift_model = SameUplift()
    known = str(live.user_vocab.ids[2])
    assert server.events([view("newcomer", live.item_vocab.ids[0], start(live)), view(known, live.item_vocab.ids[1],
                                                                                       start(live) + 1)])["accepted"] == 2
    assert server.status("newcomer") == 200
    r = server.post("/uplift", {"user_ids": [known, "newcomer"]})
    assert r.status_code == 409 and r.json()["error"] == "unavailable" and "new since this bundle was trained" in r.json()["detail"]
    r = server.post("/uplift", {"user_ids": [known]})
    assert r.status_code == 200 and r.json()["users"] == [{"user_id": known, "uplift": 0.1, "p_control": 0.2, "p_treated": 0.3}]
    assert server.post("/uplift", {"user_ids": ["nobody"]}).status_code == 404
