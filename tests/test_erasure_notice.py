"""An erasure list changes every later run that applies it: the forget command says where it is and
which runs apply it, and each training run that applies one says so in one line."""

from __future__ import annotations

import logging
from pathlib import Path

from dmp_dl.commands.privacy import erasure_list_notice
from dmp_dl.pipeline.run import load_data


def test_forget_names_the_folder_whose_runs_apply_the_default_list(tmp_path):
    notice = erasure_list_notice(tmp_path / "privacy_data" / "erased_users.txt")
    assert notice.startswith(f"erasure list: {tmp_path}/privacy_data/erased_users.txt; ")
    assert f"every later training run started in {tmp_path} applies it" in notice
    assert f"privacy.erasure_list={tmp_path}/privacy_data/erased_users.txt" in notice


def test_a_run_that_applies_an_erasure_list_says_so_in_one_line(tiny_cfg, tmp_path, caplog):
    listed = tmp_path / "privacy_data" / "erased_users.txt"
    listed.parent.mkdir()
    listed.write_text("# erased\nu000007\nu000008\nnot-a-user-of-this-log\n")
    with caplog.at_level(logging.INFO, logger="dmp_dl"):
        dm = load_data(tiny_cfg(f"privacy.erasure_list={listed}"))
    lines = [r.getMessage() for r in caplog.records if "erasure list" in r.getMessage()]
    assert lines == [f"erasure list applied: {listed} (3 entries, privacy.erasure_list); 2 of the log's users erased"]
    assert "u000007" not in dm.user_vocab and "u000009" in dm.user_vocab


def test_a_run_without_an_erasure_list_says_nothing_of_one(tiny_cfg, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="dmp_dl"):
        load_data(tiny_cfg(f"privacy.erasure_list={Path(tmp_path) / 'privacy_data' / 'erased_users.txt'}"))
    assert not [r for r in caplog.records if "erasure list" in r.getMessage()]
