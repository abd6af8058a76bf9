"""Privacy: keyed pseudonyms, no raw id in any output, erasure from every artifact, the erasure list."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from fastapi.testclient import TestClient

from dmp_dl import Recommender
from dmp_dl.api.server import create_app
from dmp_dl.core.errors import BundleError, ConfigError, DataError, UnknownIdError
from dmp_dl.data.cleaning import CleaningOptions, clean_log
from dmp_dl.data.pseudonymize import parse_tag, pseudonymize_ids, pseudonymize_log
from dmp_dl.data.schema import EventLog
from dmp_dl.data.vocab import IdVocab
from dmp_dl.pipeline.run import load_data
from dmp_dl.privacy import PrivacyOptions, Pseudonymizer, load_secret
from dmp_dl.privacy.erasure import forget_users
from dmp_dl.privacy.redact import QueryStringRedactor
from dmp_dl.store import bundle as layout
from dmp_dl.store.bundle import Bundle, BundleWriter

from .conftest import QUIET_TRAINER, TINY_DATA

REPO = Path(__file__).resolve().parents[1]
SECRET = "test-secret-0123456789abcdef-not-for-production"
OTHER_SECRET = "another-secret-0123456789abcdef-xyz"
RAW_ID = re.compile(rb"u000[0-3][0-9]{2}")  # the 400 synthetic user ids, u000000 .. u000399
ERASED = ["u000042", "u000101"]


def key(secret: str = SECRET) -> Pseudonymizer:
    return Pseudonymizer(secret.encode())


# -- pseudonyms ------------------------------------------------------------------------------------
def test_pseudonyms_are_stable_and_keyed():
    ids = ["u1", "u2", "u1", "12345"]
    a, b = key().many(ids), key().many(ids)
    assert a.tolist() == b.tolist()  # stable across instances (and runs)
    assert a[0] == a[2] != a[1] and len(set(a.tolist())) == 3
    assert all(re.fullmatch(r"[0-9a-f]{32}", x) for x in a)
    other = key(OTHER_SECRET).many(ids)
    assert not set(other.tolist()) & set(a.tolist())  # another key: other pseudonyms
    assert key().fingerprint != key(OTHER_SECRET).fingerprint
    assert key().one("u1") == a[0]
    assert parse_tag(key().tag(a[0])) == (key().fingerprint, a[0])
    assert SECRET not in repr(key()) and SECRET not in json.dumps(key().manifest_entry())


def test_secret_comes_from_env_or_file_and_is_never_echoed(monkeypatch, tmp_path):
    monkeypatch.delenv("MY_KEY", raising=False)
    with pytest.raises(ConfigError, match=r"\$MY_KEY"):
        load_secret("MY_KEY")
    monkeypatch.setenv("MY_KEY", "short")
    with pytest.raises(ConfigError, match="at least 16 bytes") as err:
        load_secret("MY_KEY")
    assert "short" not in str(err.value)
    monkeypatch.setenv("MY_KEY", SECRET)
    assert load_secret("MY_KEY") == SECRET.encode()
    (tmp_path / "key").write_text(OTHER_SECRET + "\n")
    assert load_secret("MY_KEY", tmp_path / "key") == OTHER_SECRET.encode()  # the file wins
    with pytest.raises(ConfigError, match="privacy.secret_file"):
        load_secret("MY_KEY", tmp_path / "missing")


def test_pseudonymised_log_keeps_missing_ids_missing():
    raw = EventLog(pd.DataFrame({"user_id": ["u1", "", None, " 7 "], "item_id": ["a", "b", "c", "d"],
                                 "timestamp": [1.6e9] * 4}),
                   users=pd.DataFrame({"user_id": ["u1", "7"], "age": [30, 40]}),
                   meta={"user_segment": pd.Series([1, 2], index=["u1", "7"])})
    out = pseudonymize_log(raw, key())
    assert out.events["user_id"].tolist()[1:3] == ["", ""]
    assert out.events["user_id"].iloc[3] == key().one("7")  # normalised first
    floats = pseudonymize_ids(pd.Series([7.0, np.nan]), key())  # a numeric id column with a gap
    assert floats.tolist() == [key().one("7"), ""]
    assert out.users["user_id"].tolist() == key().many(["u1", "7"]).tolist()
    assert out.meta["user_segment"].index.tolist() == key().many(["u1", "7"]).tolist()
    cleaned, report = clean_log(out, CleaningOptions())
    assert report.events.dropped == {"missing_user_id": 2}
    assert raw.events["user_id"].iloc[0] == "u1"  # the input is not modified


# -- a pseudonymised training run ---------------------------------------------------------------------
@pytest.fixture(scope="session")
def pseudo_run(tmp_path_factory):
    """``python train.py`` (a real process: Hydra's train.log and .hydra/ included) with
    pseudonymised ids and the propensity model, on the tiny synthetic data."""
    root = tmp_path_factory.mktemp("pseudo")
    out = root / "run"
    cmd = [sys.executable, "train.py", *TINY_DATA, *QUIET_TRAINER, "model=two_tower", "trainer.max_epochs=1",
           "propensity.trainer.max_epochs=3",
           "privacy.pseudonymize=true", f"privacy.erasure_list={root}/erased.txt", f"privacy.audit_log={root}/audit.jsonl",
           f"paths.output_dir={out}"]
    env = {**os.environ, "DMP_PSEUDONYM_KEY": SECRET}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"root": root, "out": out, "bundle": out / "artifacts", "stdout": done.stdout + done.stderr}


def test_no_raw_user_id_or_secret_in_any_output_file(pseudo_run):
    files = [p for p in pseudo_run["out"].rglob("*") if p.is_file()]
    names = {p.relative_to(pseudo_run["out"]).as_posix() for p in files}
    # the whole output: log, config, reports, checkpoints, training curves, the bundle
    assert {"train.log", ".hydra/config.yaml", "metrics.json", "report.json", "report.html", "data_quality.json",
            "checkpoints/last.ckpt", "artifacts/users.json", "artifacts/network/weights.pt",
            "artifacts/propensity/known_scores.npy"} <= names
    assert any(n.startswith("logs/") and n.endswith("metrics.csv") for n in names)
    for p in files:
        data = p.read_bytes()
        assert not RAW_ID.search(data), f"raw user id in {p}"
        assert SECRET.encode() not in data, f"the secret in {p}"
    assert not RAW_ID.search(pseudo_run["stdout"].encode())
    # ... while the ids are there, as pseudonyms
    vocab = IdVocab.load(pseudo_run["bundle"] / "users.json")
    assert key().one("u000042") in vocab and "u000042" not in vocab
    manifest = json.loads((pseudo_run["bundle"] / "manifest.json").read_text())
    assert manifest["privacy"]["pseudonymized"] is True
    assert manifest["privacy"]["key_fingerprint"] == key().fingerprint
    assert json.loads((pseudo_run["out"] / "metrics.json").read_text())["train"]["privacy"]["pseudonymized"] is True


def test_recommender_takes_raw_ids_and_refuses_a_wrong_or_missing_key(pseudo_run, monkeypatch):
    monkeypatch.setenv("DMP_PSEUDONYM_KEY", SECRET)
    rec = Recommender.load(pseudo_run["bundle"])  # the key from the environment variable the run used
    assert rec.info()["pseudonymized_user_ids"] is True
    row = rec.user_vocab.get(key().one("u000042"))
    assert rec.recommend_rows(np.array([row]), 5)[0][0].tolist() == rec.item_vocab.index_of(
        [i for i, _ in rec.recommend("u000042", k=5)]).tolist()
    with pytest.raises(UnknownIdError, match="'nobody'"):
        rec.recommend("nobody")
    with pytest.raises(UnknownIdError):  # a pseudonym is not a raw id
        rec.recommend(key().one("u000042"))
    assert len(rec.propensity(["u000042", "u000101"])) == 2
    monkeypatch.setenv("DMP_PSEUDONYM_KEY", OTHER_SECRET)
    with pytest.raises(BundleError, match="fingerprint"):
        Recommender.load(pseudo_run["bundle"])
    monkeypatch.delenv("DMP_PSEUDONYM_KEY")
    with pytest.raises(BundleError, match="DMP_PSEUDONYM_KEY"):
        Recommender.load(pseudo_run["bundle"])


# -- erasure -------------------------------------------------------------------------------------------
def with_user_aligned_part(src: Path, dst: Path) -> dict:
    """A copy of bundle ``src`` plus an audience-like part: per-user profiles (.npy) and segments
    (.json), declared under ``user_aligned``. Row i of the profiles holds i everywhere."""
    b = Bundle.open(src)
    n = b.manifest["counts"]["users"]
    profiles = np.repeat(np.arange(n, dtype=np.float32)[:, None], 4, axis=1) + 0.5
    segments = [f"segment-{i % 3}" for i in range(n)]
    table = pd.DataFrame({"user_id": IdVocab.load(b.file("users.json")).ids.astype(str), "score": np.arange(n) / n})
    with BundleWriter(dst) as w:
        for name in b.manifest["files"]:
            shutil.copyfile(b.root / name, w.path(name))
        w.save_array("audience/profiles.npy", profiles)
        w.save_json("audience/segments.json", segments)
        table.to_parquet(w.path("audience/assignments.parquet"), index=False)
        content = {k: v for k, v in b.manifest.items() if k not in ("format", "format_version", "created_at", "packages", "files")}
        content["audience"] = {"files": ["audience/profiles.npy", "audience/segments.json", "audience/assignments.parquet"],
                               "user_aligned": ["audience/profiles.npy", "segments.json", "assignments.parquet"]}
        w.commit(content)
    return {"profiles": profiles, "segments": segments, "table": table}


@pytest.fixture(scope="session")
def erased(pseudo_run, tmp_path_factory):
    """The run's bundle with an extra user-aligned part, before and after forgetting ERASED + an unknown id."""
    root = tmp_path_factory.mktemp("erased")
    before = root / "before"
    part = with_user_aligned_part(pseudo_run["bundle"], before)
    after = Path(shutil.copytree(before, root / "after"))
    summary = forget_users(after, [*ERASED, "nobody"], pseudonymizer=key())
    return {"before": before, "after": after, "part": part, "summary": summary, **pseudo_run}


def test_forget_removes_the_users_from_every_file(erased):
    old, new = Bundle.open(erased["before"]), Bundle.open(erased["after"])  # checksums verified
    s = erased["summary"]
    assert (s["requested"], s["removed_from_bundle"], s["not_in_bundle"], s["added_to_erasure_list"]) == (3, 2, 1, 3)
    old_vocab, new_vocab = IdVocab.load(old.file("users.json")), IdVocab.load(new.file("users.json"))
    gone = old_vocab.require(key().many(ERASED))
    kept = np.setdiff1d(np.arange(len(old_vocab)), gone)
    assert new_vocab.ids.tolist() == old_vocab.ids[kept].tolist()  # re-indexed, order kept
    assert new.manifest["counts"]["users"] == len(kept)

    # neither the raw id nor the pseudonym is left in any file's bytes
    for p in erased["after"].rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            for pseudonym in key().many(ERASED):
                assert pseudonym.encode() not in data, f"{pseudonym} in {p}"
            assert not RAW_ID.search(data)

    # their rows are gone, not just their ids: search every per-user array for the old rows
    def rows_absent(old_rows: np.ndarray, new_array: np.ndarray) -> bool:
        return not any((new_array == r).all(axis=tuple(range(1, new_array.ndim))).any() for r in old_rows)

    old_vectors, new_vectors = old.array("user_vectors.npy"), new.array("user_vectors.npy")
    np.testing.assert_array_equal(new_vectors, old_vectors[kept])
    assert rows_absent(old_vectors[gone], new_vectors)
    index = new.index("user_index.faiss")
    assert index.ntotal == len(kept)
    assert rows_absent(old_vectors[gone], index.reconstruct_n(0, index.ntotal))

    old_state, new_state = old.torch_state(layout.NETWORK_WEIGHTS), new.torch_state(layout.NETWORK_WEIGHTS)
    emb_old, emb_new = old_state["user_id.weight"].numpy(), new_state["user_id.weight"].numpy()
    assert emb_new.shape[0] == len(kept) + 1
    np.testing.assert_array_equal(emb_new[-1], emb_old[-1])  # the unknown-user row stays
    assert rows_absent(emb_old[gone], emb_new)
    for name in ("user_attr.tokens", "user_attr.numeric"):
        np.testing.assert_array_equal(new_state[name].numpy(), old_state[name].numpy()[np.r_[kept, len(old_vocab)]])
    for name in set(old_state) - {"user_id.weight", "user_attr.tokens", "user_attr.numeric"}:
        torch.testing.assert_close(new_state[name], old_state[name])  # shared weights are untouched

    scores_old, scores_new = old.array("propensity/known_scores.npy"), new.array("propensity/known_scores.npy")
    np.testing.assert_array_equal(scores_new, scores_old[kept])
    p_old, p_new = old.torch_state("propensity/weights.pt"), new.torch_state("propensity/weights.pt")
    assert rows_absent(p_old["encoder.user_id.weight"].numpy()[gone], p_new["encoder.user_id.weight"].numpy())
    assert p_new["encoder.user_id.weight"].shape[0] == len(kept) + 1

    profiles = new.array("audience/profiles.npy")
    np.testing.assert_array_equal(profiles, erased["part"]["profiles"][kept])
    assert new.json("audience/segments.json") == [erased["part"]["segments"][i] for i in kept]
    table = pd.read_parquet(new.file("audience/assignments.parquet"))  # compressed: its bytes hide nothing
    pd.testing.assert_frame_equal(table, erased["part"]["table"].iloc[kept].reset_index(drop=True))
    assert not set(key().many(ERASED).tolist()) & set(table["user_id"])

    seen = lambda b, r: b.array("seen_items.npy")[b.array("seen_indptr.npy")[r]:b.array("seen_indptr.npy")[r + 1]].tolist()  # noqa: E731
    assert all(seen(new, i) == seen(old, r) for i, r in enumerate(kept[:50]))
    assert new.manifest["counts"]["seen_pairs"] == len(new.array("seen_items.npy"))
    assert new.manifest["privacy"]["erasures"][-1]["users_removed"] == 2


def test_erased_users_are_unknown_and_never_lookalikes(erased):
    before = Recommender.load(erased["before"], pseudonymizer=key())
    after = Recommender.load(erased["after"], pseudonymizer=key())
    for user in ERASED:
        with pytest.raises(UnknownIdError, match=user):
            after.recommend(user)
        with pytest.raises(UnknownIdError):
            after.propensity([user])
    pseudonyms = set(key().many(ERASED).tolist())
    assert pseudonyms & {u for u, _ in before.lookalike(["u000043"], k=before.n_users - 1)}  # they were there ...
    everyone = {u for u, _ in after.lookalike(["u000043"], k=after.n_users - 1)}
    assert everyone and not pseudonyms & everyone  # ... and are no more
    assert not pseudonyms & {u for u, _ in after.lookalike(["u000043", "u000044"], k=50, method="neighbours")}
    for user in ("u000043", "u000200"):  # the others are served exactly as before
        assert after.recommend(user, k=10) == before.recommend(user, k=10)
        assert after.propensity([user]) == before.propensity([user])


def test_audit_and_erasure_list_hold_keyed_hashes_only(erased):
    audit_lines = (erased["root"] / "audit.jsonl").read_text().splitlines()
    entries = [json.loads(line) for line in audit_lines]
    assert len(entries) == 3
    assert {e["user"] for e in entries} == {key().tag(p) for p in key().many([*ERASED, "nobody"])}
    assert [e["in_bundle"] for e in entries] == [True, True, False]
    removed = entries[0]["removed"]
    assert {"users.json", "user_vectors.npy", "user_index.faiss", "network/weights.pt", "propensity/known_scores.npy",
            "propensity/weights.pt", "audience/profiles.npy", "audience/segments.json",
            "audience/assignments.parquet"} <= set(removed)
    assert "next training run" in entries[0]["note"] and entries[0]["time"]
    for text in (*audit_lines, (erased["root"] / "erased.txt").read_text()):
        assert not RAW_ID.search(text.encode()) and "nobody" not in text


def test_a_later_run_excludes_erased_users(erased, tiny_cfg, monkeypatch):
    monkeypatch.setenv("DMP_PSEUDONYM_KEY", SECRET)
    erasure_list = erased["root"] / "erased.txt"
    # pseudonymised run: the list's hashes match the pseudonymised ids
    dm = load_data(tiny_cfg("privacy.pseudonymize=true", f"privacy.erasure_list={erasure_list}"))
    assert not set(key().many(ERASED).tolist()) & set(dm.user_vocab.ids.tolist())
    assert key().one("u000043") in dm.user_vocab
    dropped = dm.report.events.dropped["erased_user"]
    # a run without pseudonymisation hashes its raw ids to match the same list
    dm_raw = load_data(tiny_cfg(f"privacy.erasure_list={erasure_list}"))
    assert "u000043" in dm_raw.user_vocab and not set(ERASED) & set(dm_raw.user_vocab.ids.tolist())
    assert dm_raw.report.events.dropped["erased_user"] == dropped > 0
    assert dm_raw.report.users_table.dropped["erased_user"] == 2
    # the events dropped are exactly the erased users' events
    plain = load_data(tiny_cfg())
    assert plain.events["user_id"].isin(ERASED).sum() == dropped


def test_an_erasure_list_made_with_another_key_is_refused(erased, tiny_cfg, monkeypatch, tmp_path):
    monkeypatch.setenv("DMP_PSEUDONYM_KEY", OTHER_SECRET)
    with pytest.raises(ConfigError, match=r"erased\.txt, line 3: .*fingerprint"):
        load_data(tiny_cfg(f"privacy.erasure_list={erased['root'] / 'erased.txt'}"))
    monkeypatch.delenv("DMP_PSEUDONYM_KEY")
    with pytest.raises(ConfigError, match="secret"):
        load_data(tiny_cfg(f"privacy.erasure_list={erased['root'] / 'erased.txt'}"))
    bad = tmp_path / "bad.txt"
    bad.write_text("u000001\nhmac-sha256:zz\n")
    with pytest.raises(DataError, match=r"bad\.txt, line 2"):
        load_data(tiny_cfg(f"privacy.erasure_list={bad}"))


def test_a_hand_written_raw_id_list_still_works(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("DMP_PSEUDONYM_KEY", SECRET)
    listed = tmp_path / "raw.txt"
    listed.write_text("# hand-written\nu000007\n")
    dm = load_data(tiny_cfg(f"data.erasure_list={listed}", "privacy.pseudonymize=true"))
    assert key().one("u000007") not in dm.user_vocab and key().one("u000008") in dm.user_vocab
    with pytest.raises(DataError, match="erasure list not found"):
        load_data(tiny_cfg(f"data.erasure_list={tmp_path / 'missing.txt'}"))
    # the default list is optional until the first erasure
    assert load_data(tiny_cfg(f"privacy.erasure_list={tmp_path / 'not-yet.txt'}")).n_users == 400


def test_privacy_options_paths_are_absolute():
    options = PrivacyOptions(erasure_list="privacy_data/x.txt", audit_log="a.jsonl")
    assert Path(options.erasure_list).is_absolute() and Path(options.audit_log).is_absolute()


# -- the command line and the HTTP endpoint ---------------------------------------------------------------
def test_forget_command_line(erased, tmp_path):
    bundle = Path(shutil.copytree(erased["before"], tmp_path / "artifacts"))
    ids = tmp_path / "ids.txt"
    ids.write_text("u000300\n\nu000301\n")
    env = {**os.environ, "DMP_PSEUDONYM_KEY": SECRET, "PYTHONPATH": str(REPO)}  # this tree's package, run from tmp_path
    cmd = [sys.executable, "-m", "dmp_dl.privacy", "forget", f"artifacts={bundle}", f"user_ids={ids}",
           f"erasure_list={tmp_path}/list.txt", f"audit_log={tmp_path}/audit.jsonl"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    assert summary["removed_from_bundle"] == 2 and summary["users_after"] == Bundle.open(bundle).manifest["counts"]["users"]
    assert not RAW_ID.search((done.stdout + done.stderr).encode())
    assert len((tmp_path / "audit.jsonl").read_text().splitlines()) == 2
    assert f"erasure list: {tmp_path}/list.txt; later training runs apply it when given privacy.erasure_list=" in done.stderr
    done = subprocess.run([*cmd[:5], f"user_ids={tmp_path / 'none.txt'}"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2 and "none.txt" in done.stderr and "Traceback" not in done.stderr


def test_erase_endpoint_needs_a_token_and_then_forgets(erased, tmp_path):
    from dmp_dl.privacy.erasure import ErasureService

    bundle = Path(shutil.copytree(erased["before"], tmp_path / "artifacts"))
    settings = {"pseudonymizer": key(), "erasure_list": tmp_path / "list.txt", "audit_log": tmp_path / "audit.jsonl"}
    eraser = ErasureService(bundle, lambda path: Recommender.load(path, pseudonymizer=key()), **settings)
    rec = Recommender.load(bundle, pseudonymizer=key())
    open_app = TestClient(create_app(rec, eraser=eraser))
    r = open_app.post("/erase", json={"user_ids": ["u000042"]})
    assert r.status_code == 403 and "token" in r.json()["detail"]
    client = TestClient(create_app(rec, token="s3cret", eraser=eraser))
    assert client.post("/erase", json={"user_ids": ["u000042"]}).status_code == 401
    auth = {"Authorization": "Bearer s3cret"}
    assert client.get("/recommend", params={"user_id": "u000042"}, headers=auth).status_code == 200
    r = client.post("/erase", json={"user_ids": ["u000042"]}, headers=auth)
    assert r.status_code == 200 and r.json()["removed_from_bundle"] == 1
    assert "u000042" not in r.text
    r = client.get("/recommend", params={"user_id": "u000042"}, headers=auth)
    assert r.status_code == 404 and r.json()["error"] == "unknown_id"
    r = client.post("/lookalike", json={"seed_user_ids": ["u000043"], "k": 1000}, headers=auth)
    assert r.status_code == 200 and key().one("u000042") not in {u["user_id"] for u in r.json()["users"]}
    assert client.post("/propensity", json={"user_ids": ["u000042"]}, headers=auth).status_code == 404
    no_key = ErasureService(bundle, lambda path: rec, pseudonymizer=key(OTHER_SECRET), **{k: v for k, v in settings.items() if k != "pseudonymizer"})
    r = TestClient(create_app(rec, token="s3cret", eraser=no_key)).post("/erase", json={"user_ids": ["u000043"]}, headers=auth)
    assert r.status_code == 409 and "fingerprint" in r.json()["detail"]


def test_access_log_queries_are_redacted():
    record = logging.LogRecord("uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:1", "GET", "/recommend?user_id=u000042&k=5", "1.1", 200), None)
    assert QueryStringRedactor().filter(record)
    assert "u000042" not in record.getMessage() and "/recommend?<redacted>" in record.getMessage()


def test_forget_reads_an_ids_file_with_a_byte_order_mark_and_windows_line_ends(erased, tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir

    from dmp_dl.commands.privacy import forget

    from .conftest import CONF_DIR

    bundle = Path(shutil.copytree(erased["before"], tmp_path / "artifacts"))
    modes = {p.name: p.stat().st_mode for p in bundle.iterdir()}
    ids = tmp_path / "to_forget.csv"  # as a spreadsheet saves it; still one id per line, no header
    ids.write_bytes(b"\xef\xbb\xbfu000300\r\nu000301\r\n\r\n")
    monkeypatch.setenv("DMP_PSEUDONYM_KEY", SECRET)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("privacy_cli", overrides=[f"artifacts={bundle}", f"user_ids={ids}",
                                                f"erasure_list={tmp_path}/list.txt", f"audit_log={tmp_path}/audit.jsonl"])
    summary = forget(cfg)
    assert (summary["requested"], summary["removed_from_bundle"], summary["not_in_bundle"]) == (2, 2, 0)
    assert {p.name: p.stat().st_mode for p in bundle.iterdir()} == modes  # rewritten files keep their permissions
