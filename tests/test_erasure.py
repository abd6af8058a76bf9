"""Erasure as a transaction: all or nothing, on any run (with or without pseudonyms or a secret),
through symlinks, and a server that never serves an erased user after answering."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from dmp_dl import Recommender
from dmp_dl.api.server import bundle_loader, create_app
from dmp_dl.data.erasure_list import read_erasure_list
from dmp_dl.data.vocab import IdVocab
from dmp_dl.pipeline.run import load_data, run
from dmp_dl.privacy import erasure
from dmp_dl.privacy.erasure import ErasureError, ErasureService, forget_users
from dmp_dl.store.bundle import MANIFEST, Bundle, BundleWriter, remove_stale_temporaries, write_manifest

from .conftest import QUIET_TRAINER, TINY_DATA, compose_cfg

REPO = Path(__file__).resolve().parents[1]
AUTH = {"Authorization": "Bearer s3cret"}
RAW_ID = re.compile(rb"u000[0-3][0-9]{2}")  # the synthetic user ids


@pytest.fixture(scope="module")
def pristine(trained, tmp_path_factory) -> Path:
    """A copy of the default trained bundle (raw ids, no secret), read only."""
    return Path(shutil.copytree(trained["bundle_dir"], tmp_path_factory.mktemp("erasure") / "artifacts"))


@pytest.fixture
def place(pristine, tmp_path, monkeypatch):
    """A deployment in ``tmp_path``: the bundle, and a manifest that records the erasure list and
    audit log under ``tmp_path/privacy_data`` (where a run with ``paths.root_dir=tmp_path`` keeps
    them). No secret in the environment."""
    monkeypatch.delenv("DMP_PSEUDONYM_KEY", raising=False)
    bundle = Path(shutil.copytree(pristine, tmp_path / "artifacts"))
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["privacy"].update(erasure_list=str(tmp_path / "privacy_data" / "erased_users.txt"),
                               audit_log=str(tmp_path / "privacy_data" / "erasure_audit.jsonl"))
    write_manifest(bundle, manifest)
    return {"root": tmp_path, "bundle": bundle, "list": tmp_path / "privacy_data" / "erased_users.txt",
            "audit": tmp_path / "privacy_data" / "erasure_audit.jsonl"}


def users_of(bundle: Path) -> list[str]:
    return IdVocab.load(bundle / "users.json").ids.tolist()


def snapshot(*paths: Path) -> dict:
    """Every file under ``paths`` -> its bytes (None for a missing path)."""
    out = {}
    for p in paths:
        if p.is_dir():
            out.update({q: q.read_bytes() for q in sorted(p.rglob("*")) if q.is_file()})
        else:
            out[p] = p.read_bytes() if p.exists() else None
    return out


def server(bundle: Path, **settings):
    load = bundle_loader(bundle)
    return TestClient(create_app(load(), token="s3cret", eraser=ErasureService(bundle, load, **settings), reload=load))


# -- on a default run: no pseudonyms, no secret ---------------------------------------------------
def test_forget_on_a_default_run_needs_no_secret_and_a_fresh_run_still_trains(place):
    users = users_of(place["bundle"])
    gone = [users[3], users[10]]
    table = Recommender.load(place["bundle"]).user_table  # the CRM columns, a row per user
    summary = forget_users(place["bundle"], gone)  # list and audit log: what the manifest records
    assert summary["removed_from_bundle"] == 2 and summary["erasure_list"] == str(place["list"])
    assert not set(gone) & set(users_of(place["bundle"]))
    after = Recommender.load(place["bundle"])
    assert after.n_users == len(users) - 2
    kept = [i for i, u in enumerate(users) if u not in gone] + [len(users)]  # and the unknown user's row
    np.testing.assert_array_equal(after.user_table.tokens, table.tokens[kept])
    np.testing.assert_array_equal(after.user_table.numeric, table.numeric[kept])
    # the list and the audit log hold salted hashes, never a raw id
    text = place["list"].read_text()
    assert len(re.findall(r"^salted-sha256:[0-9a-f]{32}:[0-9a-f]{32}$", text, re.M)) == 2
    for path in (place["list"], place["audit"]):
        assert not RAW_ID.search(path.read_bytes()), path
    assert {json.loads(line)["user"] for line in place["audit"].read_text().splitlines()} <= set(text.splitlines())

    # an unrelated run in the same folder, without a secret, reads the list, drops the users, and trains
    overrides = [*TINY_DATA, *QUIET_TRAINER, f"paths.root_dir={place['root']}", "debug=fdr", "logger=none",
                 "propensity.enabled=false", "audience.enabled=false"]
    cfg = compose_cfg(overrides, place["root"] / "runs" / "next")
    assert cfg.privacy.erasure_list == str(place["list"])
    dm = load_data(cfg)
    assert not set(gone) & set(dm.user_vocab.ids.tolist()) and dm.report.users_table.dropped["erased_user"] == 2
    assert dm.report.events.dropped["erased_user"] > 0
    result = run(compose_cfg(overrides, place["root"] / "runs" / "next"))
    assert not set(gone) & set(users_of(Path(result["bundle_dir"])))
    # a second forget reuses the list's salt, so a run hashes the log once per list
    forget_users(place["bundle"], [users[20]])
    entries = read_erasure_list(place["list"])
    assert len(entries.salted) == 1 and len(entries) == 3


def test_a_new_erasure_list_and_audit_log_are_their_owners_and_an_edited_list_keeps_its_mode(place):
    users = users_of(place["bundle"])
    forget_users(place["bundle"], [users[1]])
    for path in (place["list"], place["audit"]):
        assert oct(os.stat(path).st_mode & 0o777) == oct(0o600), path
    # an operator opened the list in an editor that saved it with a byte-order mark, and shared it
    entries = [line for line in place["list"].read_text().splitlines() if line and not line.startswith("#")]
    place["list"].write_bytes(b"\xef\xbb\xbf" + "\r\n".join(entries).encode() + b"\r\n")
    os.chmod(place["list"], 0o640)
    first = read_erasure_list(place["list"])
    assert len(first) == 1  # the first entry is not lost to the mark
    forget_users(place["bundle"], [users[2]])
    assert len(read_erasure_list(place["list"])) == 2
    assert oct(os.stat(place["list"]).st_mode & 0o777) == oct(0o640)


def test_forget_with_a_secret_given_writes_keyed_hashes(place, monkeypatch):
    monkeypatch.setenv("MY_KEY", "0123456789abcdef0123456789abcdef")
    users = users_of(place["bundle"])
    forget_users(place["bundle"], [users[0]], secret_env="MY_KEY")
    assert re.fullmatch(r"hmac-sha256:[0-9a-f]{16}:[0-9a-f]{32}", place["list"].read_text().splitlines()[-1])
    assert users[0] not in users_of(place["bundle"])


def test_errors_name_the_keys_the_command_accepts(place, tmp_path):
    (tmp_path / "ids.txt").write_text("u000001\n")
    cmd = [sys.executable, "-m", "dmp_dl.privacy", "forget", f"artifacts={place['bundle']}",
           f"user_ids={tmp_path / 'ids.txt'}", "secret_env=NOT_SET_ANYWHERE"]
    env = {k: v for k, v in os.environ.items() if k != "NOT_SET_ANYWHERE"}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert "$NOT_SET_ANYWHERE (secret_env)" in line and "secret_file=FILE" in line and "privacy." not in line
    assert not place["list"].exists()


# -- all or nothing --------------------------------------------------------------------------------
BAD_IDS = [["hmac-sha256:zz:yy"], ["hmac-sha256:0123456789abcdef"], ["  "], [],
           ["salted-sha256:00:11"], ["hmac-sha256:" + "a" * 16 + ":" + "b" * 32]]


@pytest.mark.parametrize("ids", BAD_IDS, ids=[repr(i)[:30] for i in BAD_IDS])
def test_bad_ids_change_nothing(place, ids, capsys):
    before = snapshot(place["root"])
    with pytest.raises(ErasureError) as err:
        forget_users(place["bundle"], ids)
    assert err.value.code in ("invalid_user_id", "no_secret") and "\n" not in str(err.value)
    assert snapshot(place["root"]) == before
    r = server(place["bundle"]).post("/erase", json={"user_ids": ids}, headers=AUTH)
    assert r.status_code == err.value.status and (not ids or r.json()["error"] == err.value.code)
    assert snapshot(place["root"]) == before


def test_malformed_hash_on_the_command_line_is_one_line(place, tmp_path):
    (tmp_path / "ids.txt").write_text("hmac-sha256:zz:yy\n")
    done = subprocess.run([sys.executable, "-m", "dmp_dl.privacy", "forget", f"artifacts={place['bundle']}",
                           f"user_ids={tmp_path / 'ids.txt'}"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: user id #1: malformed hmac-sha256 entry")


@pytest.mark.parametrize("which", ["audit", "list"])
def test_an_unwritable_audit_log_or_list_changes_nothing_and_the_server_stays_consistent(place, which):
    place[which].mkdir(parents=True)  # a folder where the file belongs: nothing can be written there
    before = snapshot(place["bundle"], place["list"] if which == "audit" else place["audit"])
    user = users_of(place["bundle"])[5]
    client = server(place["bundle"])
    r = client.post("/erase", json={"user_ids": [user]}, headers=AUTH)
    assert r.status_code == 409 and r.json()["error"] == "not_writable" and str(place[which]) in r.json()["detail"]
    assert "nothing was changed" in r.json()["detail"]
    assert snapshot(place["bundle"], place["list"] if which == "audit" else place["audit"]) == before
    assert user in users_of(place["bundle"])
    # not erased, so still served: the server answers from what is on disk
    assert client.get("/recommend", params={"user_id": user}, headers=AUTH).status_code == 200


def test_a_fifo_as_erasure_list_is_refused_without_hanging(place):
    place["list"].parent.mkdir(parents=True)
    os.mkfifo(place["list"])
    with pytest.raises(ErasureError, match="not a regular file") as err:
        forget_users(place["bundle"], [users_of(place["bundle"])[0]])
    assert err.value.code == "not_writable"


def test_a_malformed_erasure_list_is_refused(place):
    place["list"].parent.mkdir(parents=True)
    place["list"].write_text("u1\nsalted-sha256:xyz\n")
    before = snapshot(place["root"])
    with pytest.raises(ErasureError, match=r"erased_users.txt, line 2") as err:
        forget_users(place["bundle"], [users_of(place["bundle"])[0]])
    assert err.value.code == "bad_erasure_list" and snapshot(place["root"]) == before


def test_a_bundle_that_would_not_load_after_erasure_is_never_published(place):
    """A part that stops declaring its per-user files (what a flipped ``user_aligned`` key did): the
    new bundle would keep n segment rows for n-1 users and not load. It is checked before anything
    is written, so the erasure is refused and nothing changes."""
    manifest = json.loads((place["bundle"] / MANIFEST).read_text())
    manifest["segments"].pop("user_aligned")
    write_manifest(place["bundle"], manifest)
    before = snapshot(place["root"])
    with pytest.raises(ErasureError, match="does not load .*nothing was changed") as err:
        forget_users(place["bundle"], [users_of(place["bundle"])[0]])
    assert err.value.code == "bad_bundle" and snapshot(place["root"]) == before
    assert not list(place["root"].glob(".artifacts.*"))


def test_a_failed_swap_puts_the_list_and_log_back(place, monkeypatch):
    user = users_of(place["bundle"])[7]
    client = server(place["bundle"])
    before = snapshot(place["root"])

    def no_swap(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(BundleWriter, "publish", no_swap)
    r = client.post("/erase", json={"user_ids": [user]}, headers=AUTH)
    assert r.status_code == 409 and r.json()["error"] == "erasure_failed" and "put back" in r.json()["detail"]
    assert snapshot(place["root"]) == before  # list, log and bundle as they were; no temporary folder left
    assert client.get("/recommend", params={"user_id": user}, headers=AUTH).status_code == 200


def test_once_recorded_the_user_is_never_served_again_whatever_the_outcome(place, monkeypatch):
    """The swap fails and so does putting the list back (the disk gave out): the error says the list
    is ahead of the bundle, and the server stops serving the user all the same."""
    user = users_of(place["bundle"])[8]
    client = server(place["bundle"])
    assert client.get("/recommend", params={"user_id": user}, headers=AUTH).status_code == 200

    def no_swap(self):
        raise OSError(5, "Input/output error")

    def no_restore(path, before):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(BundleWriter, "publish", no_swap)
    monkeypatch.setattr(erasure, "_restore", no_restore)
    r = client.post("/erase", json={"user_ids": [user]}, headers=AUTH)
    assert r.status_code == 409 and "run forget again" in r.json()["detail"]
    assert client.get("/recommend", params={"user_id": user}, headers=AUTH).status_code == 404
    assert client.post("/propensity", json={"user_ids": [user]}, headers=AUTH).status_code in (404, 409)
    assert user in users_of(place["bundle"])  # the bundle on disk was not replaced ...
    monkeypatch.undo()
    summary = forget_users(place["bundle"], [user])  # ... and forget again finishes the job
    assert summary["removed_from_bundle"] == 1 and summary["added_to_erasure_list"] == 0
    assert user not in users_of(place["bundle"])


def test_the_server_never_serves_an_erased_user_it_had_loaded_from_an_older_bundle(place):
    """The server still holds a bundle with the user, while the bundle on disk (a newer export, not
    reloaded yet) no longer has them: after the erasure the server serves the one on disk."""
    users = users_of(place["bundle"])
    client = server(place["bundle"])
    erase_rows_on_disk = Bundle.open(place["bundle"])
    erasure.erase_rows(erase_rows_on_disk, np.array([2]))  # the "newer export" without users[2]
    assert client.get("/recommend", params={"user_id": users[2]}, headers=AUTH).status_code == 200
    r = client.post("/erase", json={"user_ids": [users[2]]}, headers=AUTH)
    assert r.status_code == 200 and r.json()["not_in_bundle"] == 1
    assert client.get("/recommend", params={"user_id": users[2]}, headers=AUTH).status_code == 404


# -- symlinked deployments and leftovers -------------------------------------------------------------
def test_forget_through_a_symlink_erases_the_real_bundle_and_keeps_the_link(place):
    real = place["root"] / "runs" / "r1" / "artifacts"
    real.parent.mkdir(parents=True)
    place["bundle"].rename(real)
    link = place["root"] / "bundle"
    link.symlink_to(real)
    user = users_of(real)[4]
    r = server(link).post("/erase", json={"user_ids": [user]}, headers=AUTH)
    assert r.status_code == 200 and r.json()["bundle"] == str(real.resolve())
    assert link.is_symlink() and link.resolve() == real
    assert user not in users_of(real) and Recommender.load(link).n_users == len(users_of(real))
    audit = json.loads(place["audit"].read_text().splitlines()[-1])
    assert audit["bundle"] == str(real.resolve()) and audit["bundle_link"] == str(link)
    assert not list(real.parent.glob(".artifacts.*")) and not list(place["root"].glob(".bundle.*"))


def test_leftover_temporary_folders_are_removed_by_the_next_forget_export_or_server_start(place):
    bundle = place["bundle"]
    for name in (".artifacts.tmp-killed", ".artifacts.old-killed"):
        (place["root"] / name).mkdir()
        (place["root"] / name / "users.json").write_text('["u000001"]')  # raw ids a killed job left
    forget_users(bundle, [users_of(bundle)[0]])
    assert not list(place["root"].glob(".artifacts.*"))
    (place["root"] / ".artifacts.tmp-killed2").mkdir()
    with BundleWriter(bundle) as live:  # the next export; a folder a live writer holds is kept
        assert not (place["root"] / ".artifacts.tmp-killed2").exists()
        assert remove_stale_temporaries(bundle) == []  # what serve.py calls at start
        assert live.root.exists()
    # a swap killed between its two renames: the previous bundle only under .old-*, put back
    old = place["root"] / ".artifacts.old-x"
    old.mkdir()
    bundle.rename(old / "bundle")
    with pytest.raises(Exception, match="interrupted export kept the previous bundle"):
        Bundle.open(bundle)
    assert remove_stale_temporaries(bundle) == [old]
    assert Bundle.open(bundle) and not old.exists()
