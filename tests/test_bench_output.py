"""The bench scripts check their optional packages before any work, and write their results where
the user says: the tracked bench/RESULTS.md only when asked."""

from __future__ import annotations

import importlib.util
import sys
from argparse import Namespace
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import output  # noqa: E402


def bench_module(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def without(monkeypatch):
    """Make the named packages look uninstalled to the checks."""
    real = importlib.util.find_spec

    def hide(*names: str) -> None:
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in names else real(name, *a))

    return hide


@pytest.fixture
def results_paths(monkeypatch, tmp_path):
    """Where write_section writes, restored after the test; bench/out/ moved into tmp_path."""
    monkeypatch.setattr(common, "RESULTS_MD", common.RESULTS_MD)
    monkeypatch.setattr(common, "RESULTS_DIR", common.RESULTS_DIR)
    monkeypatch.setattr(output, "QUICK_DIR", tmp_path / "out")
    return tmp_path


def test_run_all_stops_before_any_section_with_one_line_naming_the_package_and_extra(without, monkeypatch, capsys):
    run = bench_module("run")
    ran = []
    monkeypatch.setattr(run, "run_section", lambda name, *a: ran.append(name))
    without("implicit")
    with pytest.raises(SystemExit) as stopped:
        run.main(["all", "--quick"])
    assert stopped.value.code == 2 and ran == []
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: bench/run.py all needs implicit (quality: ")
    assert "pip install -e '.[bench]'" in err[0] and "Traceback" not in err[0]


def test_a_bench_names_every_missing_package_and_each_extra(without, capsys):
    without("implicit", "schemathesis")
    with pytest.raises(SystemExit) as stopped:
        output.require({"implicit": "the anchors", "schemathesis": "the requests", "numpy": "arrays"}, "bench/x.py")
    assert stopped.value.code == 2
    assert capsys.readouterr().err == ("error: bench/x.py needs implicit (the anchors), schemathesis (the requests), "
                                       "not installed; install with: pip install -e '.[bench,dev]'\n")


def test_quality_checks_only_the_anchors_it_is_asked_for(without, results_paths, capsys):
    quality = bench_module("quality")
    without("implicit", "cornac")
    with pytest.raises(SystemExit):
        quality.main(["--quick", "--anchors", "popularity", "vaecf"])
    err = capsys.readouterr().err
    assert "cornac (the vaecf anchor)" in err and "implicit" not in err and "--anchors popularity ease" in err


def test_results_go_to_the_named_file_and_never_to_the_tracked_one_unless_asked(results_paths, capsys):
    tracked = output.RECORDED_MD.read_bytes()
    assert output.results_file(Namespace()) == results_paths / "out" / "RESULTS.md"
    assert output.results_file(Namespace(results=None, write_results=True)) == output.RECORDED_MD
    mine = results_paths / "mine" / "bench.md"
    assert output.use(Namespace(results=mine, write_results=False)) == mine
    common.write_section("demo", "Demo", "a table", {"rows": [1]})
    assert "<!-- section:demo -->" in mine.read_text() and (mine.parent / "results" / "demo.json").exists()
    assert f"results: {mine}" in capsys.readouterr().out
    output.use(Namespace())
    common.write_section("demo", "Demo", "a table", {"rows": [1]})
    assert (results_paths / "out" / "RESULTS.md").exists()
    assert output.RECORDED_MD.read_bytes() == tracked


def test_quick_numbers_never_go_into_the_tracked_file(capsys):
    with pytest.raises(SystemExit) as stopped:
        output.results_file(Namespace(results=None, write_results=True), quick=True)
    assert stopped.value.code == 2 and capsys.readouterr().err.startswith("error: --quick measures tiny sizes")


def test_a_section_written_alone_refreshes_the_headline_of_its_results_file(results_paths):
    mine = results_paths / "mine" / "RESULTS.md"
    output.use(Namespace(results=mine, write_results=False))
    run = {"events": 50_000_000, "users": 2_000_000, "items": 50_000, "total": {"wall": 53.3}, "peak_rss_mib": 4669}
    common.write_section("data_large", "Data stage at scale", "a table", {"runs": [run], "slopes": {"wall": 1.13}})
    text = mine.read_text()
    head = text[text.index("<!-- headline -->"):text.index("<!-- /headline -->")]
    assert "50,000,000 events" in head and "**4,669 MiB**" in head and "time slope 1.13" in head
    common.write_section("demo", "Demo", "a table", {"rows": [1]})  # not a headline section: the headline stays
    assert mine.read_text().count("<!-- headline -->") == 1 and "4,669 MiB" in mine.read_text()


def test_quality_merge_keeps_the_anchors_a_rerun_leaves_out_only_on_the_same_split(capsys):
    quality = bench_module("quality")
    sizes = {"events": 10, "users": 2, "items": 3, "train_events_final": 8, "train_events_tuning": 7, "val_pairs": 1,
             "test_users": 2, "test_pairs": 2, "test_pairs_item_unseen_in_train": 0}

    def row(model: str, kind: str, ndcg: float) -> dict:
        return {"model": model, "kind": kind, "fit_seconds": 1.0, "setting": "-",
                "metrics": {"ndcg@20": ndcg, "recall@20": ndcg, "ndcg@10": ndcg, "coverage@20": 0.5, "stderr": {"ndcg@20": 0.01}}}

    base = {"title": "a log", "sizes": sizes, "ks": [20], "metric": "ndcg@20", "recommenders": False}
    before = {**base, "rows": [row("auto", "ours", 0.30), row("ease", "anchor", 0.28), row("als", "anchor", 0.31)],
              "run": {"command": "python bench/quality.py", "machine_line": "m"}}
    now = {**base, "rows": [row("auto", "ours", 0.32), row("ease", "anchor", 0.29)]}
    merged = quality.keep_unmeasured_rows(now, before)
    assert [(r["model"], r["metrics"]["ndcg@20"]) for r in merged["rows"]] == [("auto", 0.32), ("ease", 0.29), ("als", 0.31)]
    assert merged["rows"][-1]["measured_by"] == "python bench/quality.py" and "measured_by" not in merged["rows"][0]
    merged["headline"] = quality.headline(merged)
    assert merged["headline"]["best_anchor"]["model"] == "als"  # the kept anchor still counts
    assert "Rows als kept from an earlier run on the same split: `python bench/quality.py`." in quality.render(merged)
    other_split = {**now, "sizes": {**sizes, "test_pairs": 3}}
    assert quality.keep_unmeasured_rows(other_split, before) == other_split
    assert "the rows of als are dropped" in capsys.readouterr().out
