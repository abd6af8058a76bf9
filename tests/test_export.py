"""Activation exports (``python -m dmp_dl.export``): recommendations, propensity scores, segment
membership and lookalike audiences for every user, as CSV or Parquet, written atomically."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hydra import compose, initialize_config_dir

from dmp_dl import Recommender
from dmp_dl.commands.export import run_export
from dmp_dl.core.errors import ConfigError, DataError, UnknownIdError
from dmp_dl.export import jobs
from dmp_dl.export.tables import TableWriter
from dmp_dl.pipeline.run import run
from dmp_dl.privacy import Pseudonymizer

from .conftest import CONF_DIR, QUIET_TRAINER, TINY_DATA, compose_cfg

REPO = Path(__file__).resolve().parents[1]
SECRET = "export-test-secret-0123456789abcdef"


def export_cfg(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("export", overrides=list(overrides))


def read(path: Path) -> pd.DataFrame:
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    return pd.read_csv(path, dtype={"user_id": str, "item_id": str, "label": str}, keep_default_na=False)


@pytest.fixture(scope="module")
def pseudo_fdr(tmp_path_factory):
    """A one-batch run (debug=fdr) with pseudonymised ids, the propensity model and segments."""
    out = tmp_path_factory.mktemp("export_pseudo") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DMP_PSEUDONYM_KEY", SECRET)
        root = out.parent
        cfg = compose_cfg([*TINY_DATA, *QUIET_TRAINER, "debug=fdr", "logger=none", "privacy.pseudonymize=true",
                           f"privacy.erasure_list={root}/erased.txt", f"privacy.audit_log={root}/audit.jsonl",
                           "audience.segments.k=3"], out)
        result = run(cfg)
        yield {"bundle": result["bundle_dir"], "rec": Recommender.load(result["bundle_dir"])}


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_recommendations_every_user_exactly_k_unseen_items_once_per_rank(trained, rec, tmp_path, fmt):
    k = 20
    summary = run_export(export_cfg("task=recommendations", f"artifacts={trained['bundle_dir']}", f"k={k}",
                                    f"format={fmt}", f"output_dir={tmp_path}", "chunk_users=97"))
    path = tmp_path / f"recommendations.{fmt}"
    table = read(path)
    assert list(table.columns) == ["user_id", "rank", "item_id", "score"]
    assert len(table) == rec.n_users * k == summary["rows"]
    assert summary["users"] == rec.n_users and summary["users_short"] == 0
    # every user once per rank 1..k, users in vocabulary order
    assert not table.duplicated(["user_id", "rank"]).any()
    assert (table.groupby("user_id")["rank"].apply(sorted) == pd.Series([list(range(1, k + 1))] * rec.n_users,
                                                                         index=sorted(rec.user_vocab.ids))).all()
    assert table["user_id"].iloc[::k].tolist() == rec.user_vocab.ids.tolist()
    # no item the user has seen, no item twice for a user, scores best first
    users = rec.user_vocab.index_of(table["user_id"])
    items = rec.item_vocab.index_of(table["item_id"])
    assert (items >= 0).all()
    seen = {(u, i) for u in range(rec.n_users) for i in rec._seen_items[rec._seen_indptr[u]:rec._seen_indptr[u + 1]]}
    assert not any((u, i) in seen for u, i in zip(users.tolist(), items.tolist()))
    assert not table.duplicated(["user_id", "item_id"]).any()
    assert (np.diff(table["score"].to_numpy().reshape(-1, k), axis=1) <= 1e-6).all()
    # the same answer as the API
    for u in ("u000042", rec.user_vocab.ids[-1]):
        mine = table[table["user_id"] == u]
        assert mine["item_id"].tolist() == [i for i, _ in rec.recommend(u, k)]
    assert json.loads(Path(summary["summary_file"]).read_text())["columns"]["rank"].startswith("1 = best")
    assert not list(tmp_path.glob(".*.tmp"))


def test_recommendations_for_a_user_file_in_its_order_each_once(trained, rec, tmp_path):
    ids = ["u000101", "u000007", "u000101", "u000399"]
    users = tmp_path / "users.txt"
    users.write_text("\n".join(ids) + "\n")
    summary = run_export(export_cfg("task=recommendations", f"artifacts={trained['bundle_dir']}", "k=5",
                                    f"users={users}", f"output={tmp_path}/out.csv"))
    table = read(tmp_path / "out.csv")
    assert table["user_id"].iloc[::5].tolist() == ["u000101", "u000007", "u000399"]
    assert len(table) == 15 and summary["selection"] == {"given": 4, "duplicates": 1, "unknown_skipped": 0}


def test_unknown_users_stop_the_export_unless_skipped(trained, tmp_path):
    users = tmp_path / "users.csv"
    pd.DataFrame({"user_id": ["u000001", "nobody", "u000002"]}).to_csv(users, index=False)
    args = ["task=recommendations", f"artifacts={trained['bundle_dir']}", "k=3", f"users={users}", f"output_dir={tmp_path}"]
    with pytest.raises(UnknownIdError, match=r"users\.csv: 1 of 3 user ids are not in the bundle .*'nobody'.*skip_unknown=true"):
        run_export(export_cfg(*args))
    assert not (tmp_path / "recommendations.csv").exists()
    summary = run_export(export_cfg(*args, "skip_unknown=true"))
    assert summary["rows"] == 6 and summary["selection"]["unknown_skipped"] == 1


def test_k_and_task_and_format_are_checked_before_anything_is_written(trained, rec, tmp_path):
    base = [f"artifacts={trained['bundle_dir']}", f"output_dir={tmp_path}"]
    with pytest.raises(ConfigError, match=rf"k must be a whole number in 1\.\.{rec.n_items}"):
        run_export(export_cfg("task=recommendations", *base, f"k={rec.n_items + 1}"))
    with pytest.raises(ConfigError, match="task must be one of recommendations, scores, segments, lookalike"):
        run_export(export_cfg("task=emails", *base))
    with pytest.raises(ConfigError, match=r"format must be one of csv \| parquet"):
        run_export(export_cfg("task=scores", *base, "format=xlsx"))
    with pytest.raises(ConfigError, match="seeds=FILE or seed_ids"):
        run_export(export_cfg("task=lookalike", *base))
    with pytest.raises(DataError, match="users: .*missing.txt not found"):
        run_export(export_cfg("task=recommendations", *base, f"users={tmp_path}/missing.txt"))
    assert list(tmp_path.iterdir()) == []


def test_users_short_of_k_unseen_items_get_fewer_rows_and_are_counted(rec):
    k = rec.n_items - int(np.diff(rec._seen_indptr).max()) + 1  # the heaviest user has k - 1 unseen items
    export = jobs.recommendations(rec, np.arange(rec.n_users), k, chunk=128)
    tables = [t for _, t in export.chunks]
    rows = sum(t.num_rows for t in tables)
    unseen = rec.n_items - np.diff(rec._seen_indptr)
    assert rows == int(np.minimum(unseen, k).sum())
    assert export.stats["users_short"] == int((unseen < k).sum()) >= 1


def test_a_failed_export_leaves_the_previous_file_whole(tmp_path):
    path = tmp_path / "out.csv"
    path.write_text("previous\n")
    schema = pa.schema([("user_id", pa.string())])
    with pytest.raises(RuntimeError):
        with TableWriter(path, "csv", schema) as w:
            w.write(pa.table({"user_id": ["a", "b"]}))
            raise RuntimeError("killed half-way")
    assert path.read_text() == "previous\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]
    with TableWriter(path, "csv", schema) as w:
        w.write(pa.table({"user_id": ["a", "b"]}))
    assert path.read_text().splitlines() == ['"user_id"', '"a"', '"b"']


def test_scores_segments_and_lookalike_of_a_pseudonymised_bundle_carry_pseudonyms(pseudo_fdr, tmp_path, monkeypatch):
    monkeypatch.setenv("DMP_PSEUDONYM_KEY", SECRET)
    rec, bundle = pseudo_fdr["rec"], pseudo_fdr["bundle"]
    key = Pseudonymizer(SECRET.encode())

    run_export(export_cfg("task=scores", f"artifacts={bundle}", f"output_dir={tmp_path}", "format=parquet"))
    scores = read(tmp_path / "scores.parquet")
    assert list(scores.columns) == ["user_id", "probability", "rank", "decile", "segment", "segment_label", "top_interest"]
    assert scores["user_id"].tolist() == rec.user_vocab.ids.tolist()  # pseudonyms, every user once
    assert key.one("u000042") in set(scores["user_id"]) and "u000042" not in set(scores["user_id"])
    np.testing.assert_allclose(scores["probability"], rec.propensity_rows(np.arange(rec.n_users)))
    assert sorted(scores["rank"]) == list(range(1, rec.n_users + 1))
    top = scores.sort_values("rank")
    assert top["probability"].is_monotonic_decreasing and top["decile"].is_monotonic_increasing
    assert set(scores["decile"]) == set(range(1, 11))
    assert_user_details(rec, scores)

    run_export(export_cfg("task=segments", f"artifacts={bundle}", f"output_dir={tmp_path}"))
    seg = read(tmp_path / "segments.csv")
    assert list(seg.columns) == ["user_id", "segment", "label", "distance", "top_interest", "probability"]
    assert seg["user_id"].tolist() == rec.user_vocab.ids.tolist()
    assert_user_details(rec, seg)
    np.testing.assert_array_equal(seg["segment"], rec.stored_segments.assignments)
    labels = {d["segment"]: d["label"] for d in jobs.segment_descriptions(rec)}
    assert (seg["label"] == seg["segment"].map(labels)).all() and seg["label"].str.len().min() > 0

    users = tmp_path / "raw_ids.txt"
    users.write_text("u000042\nu000101\n")  # raw ids in, pseudonyms out
    run_export(export_cfg("task=recommendations", f"artifacts={bundle}", "k=4", f"users={users}", f"output_dir={tmp_path}"))
    recs = read(tmp_path / "recommendations.csv")
    assert recs["user_id"].iloc[::4].tolist() == [key.one("u000042"), key.one("u000101")]

    summary = run_export(export_cfg("task=lookalike", f"artifacts={bundle}", "seed_ids=[u000042,u000101]", "size=25",
                                    f"output_dir={tmp_path}"))
    look = read(tmp_path / "lookalike.csv")
    assert len(look) == 25 == summary["rows"] and look["rank"].tolist() == list(range(1, 26))
    expected = rec.lookalike(["u000042", "u000101"], k=25)
    assert look["user_id"].tolist() == [u for u, _ in expected]
    assert list(look.columns) == ["user_id", "rank", "score", "segment", "segment_label", "top_interest", "probability"]
    assert_user_details(rec, look)
    assert not {key.one("u000042"), key.one("u000101")} & set(look["user_id"])
    assert summary["user_ids"] == "pseudonyms"


def assert_user_details(rec, table: pd.DataFrame) -> None:
    """The user columns of an export are the bundle's answers for each row's user."""
    rows = rec.user_vocab.index_of(table["user_id"].tolist())
    labels = {d["segment"]: d["label"] for d in jobs.segment_descriptions(rec)}
    if "segment_label" in table:
        np.testing.assert_array_equal(table["segment"], rec.stored_segments.assignments[rows])
        assert table["segment_label"].tolist() == [labels[s] for s in table["segment"]]
    if "probability" in table:
        np.testing.assert_allclose(table["probability"], rec.propensity_rows(rows))
    every = max(1, len(table) // 20)
    for row, user, interest in zip(rows[::every], table["user_id"].iloc[::every], table["top_interest"].iloc[::every]):
        if rec.pseudonymizer is None:  # the API's profile, by id
            interests = [i["category"] for i in rec.profile(user)["interests"]]
        else:  # ids are pseudonyms, which the API would hash again: the stored profile of the row
            interests = [rec.profiles.categories[c] for c in rec.profiles.top_categories[row] if c >= 0]
        assert (interest if isinstance(interest, str) else "") == (interests[0] if interests else ""), user


def test_users_are_exported_in_the_natural_order_of_their_ids():
    numbers = np.array(sorted(["1", "10", "100", "2", "20", "3", "007", "7"]), dtype=object)  # a vocabulary: text order
    assert numbers[jobs.id_order(numbers)].tolist() == ["1", "2", "3", "007", "7", "10", "20", "100"]
    huge = np.array(sorted(["18446744073709551616", "9"]), dtype=object)  # past 64 bits
    assert huge[jobs.id_order(huge)].tolist() == ["9", "18446744073709551616"]
    mixed = np.array(sorted(["u10", "u2", "7"]), dtype=object)
    assert jobs.id_order(mixed).tolist() == [0, 1, 2], "not every id a number: the bundle's order"
    assert jobs.id_order(np.array([], dtype=object)).tolist() == []


@pytest.fixture(scope="module")
def numeric_ids(tmp_path_factory):
    """A one-batch run on a log whose user ids are plain numbers ("42", not "u000042")."""
    from dmp_dl.data.synthetic import SyntheticSource

    root = tmp_path_factory.mktemp("export_numeric")
    events = SyntheticSource(n_users=300, n_items=120, n_events=9000, seed=3).load().events
    events["user_id"] = events["user_id"].str.lstrip("u").str.lstrip("0").replace("", "0")
    events.to_csv(root / "events.csv", index=False)
    result = run(compose_cfg(["data=events", f"data.path={root / 'events.csv'}", *QUIET_TRAINER, "debug=fdr",
                              "logger=none", "propensity.enabled=false", "evaluation.report=null"], root / "run"))
    return result["bundle_dir"]


def test_every_user_export_lists_numeric_ids_by_value(numeric_ids, tmp_path):
    rec = Recommender.load(numeric_ids)
    assert rec.user_vocab.ids[:3].tolist() == ["0", "1", "10"], "the vocabulary holds them in text order"
    by_value = sorted(rec.user_vocab.ids.tolist(), key=int)
    run_export(export_cfg("task=recommendations", f"artifacts={numeric_ids}", "k=3", f"output_dir={tmp_path}"))
    recs = read(tmp_path / "recommendations.csv")
    assert recs["user_id"].iloc[::3].tolist() == by_value
    assert recs["rank"].tolist() == [1, 2, 3] * len(by_value)
    run_export(export_cfg("task=segments", f"artifacts={numeric_ids}", f"output_dir={tmp_path}", "format=parquet"))
    seg = read(tmp_path / "segments.parquet")
    assert seg["user_id"].tolist() == by_value and list(seg.columns) == ["user_id", "segment", "label", "distance", "top_interest"]
    assert_user_details(rec, seg)


def test_segments_of_a_bundle_without_segments_is_one_line(trained, tmp_path):
    from dmp_dl.store.bundle import MissingPartError

    rec = Recommender.load(trained["bundle_dir"])
    rec.stored_segments = None
    with pytest.raises(MissingPartError, match="no segments"):
        jobs.segments(rec, np.arange(3))


def test_command_line_on_a_pipe_prints_the_summary_and_no_progress_bar(trained, tmp_path):
    cmd = [sys.executable, "-m", "dmp_dl.export", "task=recommendations", f"artifacts={trained['bundle_dir']}", "k=3",
           f"output_dir={tmp_path}"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stdout + done.stderr and "users/s" not in done.stderr  # no bar on a pipe
    assert json.loads(done.stdout[done.stdout.index("{"):])["rows"] == 3 * len(trained["datamodule"].user_vocab)
    bad = subprocess.run([*cmd[:3], "task=nope", f"artifacts={trained['bundle_dir']}"], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == ["error: task must be one of recommendations, scores, segments, lookalike, got 'nope'"]


# -- what a careless operator can give: id files, empty lists, output paths, permissions -----------
@pytest.fixture
def no_bundle_load(monkeypatch):
    """Fail the test if the export loads the bundle (the checks must come first)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the bundle was loaded before the settings and the output were checked")

    monkeypatch.setattr(Recommender, "load", refuse)


def test_a_users_file_with_a_byte_order_mark_and_windows_line_ends_exports_every_user(trained, tmp_path):
    users = tmp_path / "crm_ids.txt"
    users.write_bytes(b"\xef\xbb\xbfu000101\r\nu000007\r\n\r\nu000399\r\n")
    summary = run_export(export_cfg("task=recommendations", f"artifacts={trained['bundle_dir']}", "k=2",
                                    f"users={users}", f"output={tmp_path}/out.csv"))
    assert read(tmp_path / "out.csv")["user_id"].iloc[::2].tolist() == ["u000101", "u000007", "u000399"]
    assert summary["selection"] == {"given": 3, "duplicates": 0, "unknown_skipped": 0}


def test_an_empty_seed_list_is_one_line_before_the_bundle_is_loaded(trained, tmp_path, no_bundle_load):
    with pytest.raises(ConfigError, match=r"^seed_ids is empty; give at least one user id"):
        run_export(export_cfg("task=lookalike", f"artifacts={trained['bundle_dir']}", "seed_ids=[]",
                              f"output_dir={tmp_path}"))
    empty = tmp_path / "seeds.txt"
    empty.write_bytes(b"\xef\xbb\xbf\r\n# none yet\r\n")
    with pytest.raises(DataError, match=r"^seeds: .*seeds.txt holds no user ids"):
        run_export(export_cfg("task=lookalike", f"artifacts={trained['bundle_dir']}", f"seeds={empty}",
                              f"output_dir={tmp_path}"))
    assert [p.name for p in tmp_path.iterdir()] == ["seeds.txt"]


def test_a_bad_output_is_refused_before_the_bundle_is_loaded(trained, tmp_path, monkeypatch, no_bundle_load):
    import errno
    import types

    import dmp_dl.pipeline.checks as checks

    bundle = Path(trained["bundle_dir"]).resolve()
    files_before = {p: p.read_bytes() for p in bundle.rglob("*") if p.is_file()}
    folder = tmp_path / "push"
    folder.mkdir()
    link = tmp_path / "current"
    link.symlink_to(bundle, target_is_directory=True)
    cases = {
        str(folder): rf"^output: {folder} is a folder; give the file to write",
        str(bundle / "seen_items.npy"): rf"^output: .*seen_items.npy is inside the bundle {bundle} ",
        str(link / "users.json"): rf"^output: .*users.json is inside the bundle {bundle} ",  # through a symlink
        str(bundle / "segments" / "segments.csv"): rf"inside the bundle {bundle} ",  # one of its part folders
        str(bundle / "exports" / "recs.csv"): rf"inside the bundle {bundle} ",  # a new folder in it
    }
    for output, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            run_export(export_cfg("task=recommendations", f"artifacts={bundle}", f"output={output}"))
    assert {p: p.read_bytes() for p in bundle.rglob("*") if p.is_file()} == files_before
    assert not (bundle / "exports").exists()

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(checks, "tempfile", types.SimpleNamespace(mkstemp=read_only))  # the write probe
    with pytest.raises(ConfigError, match=rf"^output: cannot write in {folder} \(the file system is read-only\); "
                                          r"choose another place with output=FILE"):
        run_export(export_cfg("task=recommendations", f"artifacts={bundle}", f"output={folder}/recs.csv"))
    with pytest.raises(ConfigError, match=r"^output_dir: cannot write in .*read-only.*output_dir=DIR"):
        run_export(export_cfg("task=scores", f"artifacts={bundle}", f"output_dir={folder}/nightly"))


def test_exports_get_the_permissions_of_a_plain_write_unless_a_mode_is_set(trained, tmp_path):
    path = tmp_path / "recs.csv"
    summary_file = tmp_path / "recs.csv.summary.json"
    args = ["task=recommendations", f"artifacts={trained['bundle_dir']}", "k=2", f"output={path}", "progress=false"]
    saved = os.umask(0o022)
    try:
        run_export(export_cfg(*args))
        assert oct(path.stat().st_mode & 0o777) == oct(summary_file.stat().st_mode & 0o777) == "0o644"
        path.chmod(0o640)  # an operator's choice for the file it replaces is kept
        run_export(export_cfg(*args))
        assert oct(path.stat().st_mode & 0o777) == "0o640"
        run_export(export_cfg(*args, "mode=0600"))
        assert oct(path.stat().st_mode & 0o777) == oct(summary_file.stat().st_mode & 0o777) == "0o600"
    finally:
        os.umask(saved)
    with pytest.raises(ConfigError, match=r"mode must be file permissions in octal, e.g. 0600 .*got 600"):
        run_export(export_cfg(*args, "mode=600"))  # read as the number 600, not as 0600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recs.csv", "recs.csv.summary.json"]


def test_command_line_empty_seed_list_is_one_line(trained, tmp_path):
    done = subprocess.run([sys.executable, "-m", "dmp_dl.export", "task=lookalike", f"artifacts={trained['bundle_dir']}",
                           "seed_ids=[]", f"output_dir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: seed_ids is empty; give at least one user id, e.g. seed_ids=[u000042,u000101]"]
