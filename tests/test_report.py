"""The offline report: contents, optional sections, self-contained HTML, and the pipeline writing it."""

from __future__ import annotations

import base64
import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dmp_dl.data.datamodule import InteractionDataModule
from dmp_dl.data.synthetic import SyntheticSource
from dmp_dl.evaluation.baselines import EASEScorer, EmbeddingScorer, PopularityScorer
from dmp_dl.evaluation.diagnostics import cumulative_gains, gains_table, pca_2d, segment_sizes
from dmp_dl.evaluation.ranking import evaluate_scorer
from dmp_dl.evaluation.render import SECTIONS
from dmp_dl.evaluation.report import PropensityInputs, SegmentInputs, build_report, compare, write_report
from dmp_dl.metrics.ranking import DEFINITIONS
from dmp_dl.pipeline.run import run
from dmp_dl.training.fit import config_to_dict

from .conftest import compose_cfg

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_inputs(tmp_path_factory):
    """Plain report inputs from a real (small) data module and real evaluations."""
    dm = InteractionDataModule(SyntheticSource(n_users=300, n_items=120, n_events=9000, seed=5), history_len=5).prepare()
    rng = np.random.default_rng(0)
    users = rng.standard_normal((dm.n_users, 8)).astype(np.float32)
    items = rng.standard_normal((dm.n_items, 8)).astype(np.float32)
    pop = torch.as_tensor(dm.item_counts / dm.item_counts.sum())
    ds = dm.eval_dataset("test")
    ks = [5, 10, 20]
    ranking = {
        "two_tower": evaluate_scorer(EmbeddingScorer(users, items, device="cpu"), ds, dm.n_items, ks, pop, device="cpu"),
        "popularity": evaluate_scorer(PopularityScorer(dm.item_counts, device="cpu"), ds, dm.n_items, ks, pop, device="cpu"),
        "ease": evaluate_scorer(EASEScorer(dm.train_seen, 50.0, device="cpu"), ds, dm.n_items, ks, pop, device="cpu"),
    }
    config = config_to_dict(compose_cfg(["model=two_tower", "evaluation.ks=[5,10,20]"], tmp_path_factory.mktemp("cfg")))
    return {"config": config, "data_quality": dm.report.to_dict(), "ranking": ranking, "model_name": "two_tower",
            "train": {"epochs": 3, "fit_seconds": 1.5, "val": {"val/recall@20": 0.2}}}


def propensity_inputs(n: int = 400, seed: int = 0) -> SimpleNamespace:
    """An object shaped like the propensity step's result (metrics, test_labels, test_predictions)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.2).astype(np.int8)
    z = rng.standard_normal(n) + 1.5 * y
    preds = {name: 1 / (1 + np.exp(-(a * z - 1.5))) for name, a in (("mlp", 1.2), ("logistic_regression", 1.0), ("gbm", 0.8))}
    metrics = {name: {"roc_auc": 0.8 - i / 100, "pr_auc": 0.5, "log_loss": 0.4, "brier": 0.12, "ece": 0.02, "lift@10": 2.5}
               for i, name in enumerate(preds)}
    return SimpleNamespace(metrics=metrics, test_labels=y, test_predictions=preds)


def segment_inputs(n: int = 600, seed: int = 0) -> SegmentInputs:
    rng = np.random.default_rng(seed)
    seg = rng.integers(0, 4, n)
    centres = rng.standard_normal((4, 16)) * 3
    return SegmentInputs(seg, centres[seg] + rng.standard_normal((n, 16)))


def _images(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


def _read(paths):
    return (json.loads(paths["json"].read_text()), paths["md"].read_text(), paths["html"].read_text())


def test_report_without_optional_inputs_has_every_section_and_says_what_is_absent(tmp_path, run_inputs):
    paths = write_report(tmp_path, **run_inputs)
    assert {p.name for p in tmp_path.iterdir()} == {"report.json", "report.md", "report.html"}
    data, md, html = _read(paths)
    for title in SECTIONS.values():
        assert f"## {title}" in md and f">{title}</h2>" in html
    assert data["sections_absent"] == {"propensity": "no propensity model was trained in this run",
                                       "segments": "no user segments were built in this run"}
    assert md.count("Not available:") == 2 and html.count("Not available:") == 2
    assert data["propensity"] is None and data["segments"] is None
    # all numbers, as given: the ranking metrics, the data-quality counts, the config
    r = run_inputs["ranking"]["ease"]
    assert data["ranking"]["ease"]["recall@10"] == pytest.approx(r["recall@10"])
    assert data["ranking"]["ease"]["stderr"]["ndcg@20"] == pytest.approx(r["stderr"]["ndcg@20"])
    assert data["data_quality"]["split"]["test_users"] == run_inputs["data_quality"]["split"]["test_users"]
    assert data["config"]["evaluation"]["ks"] == [5, 10, 20]
    assert f"{r['recall@20']:.4f}" in md and f"{r['recall@20']:.4f}" in html
    # two ranking figures, embedded as real PNGs
    images = _images(html)
    assert len(images) == 2 and all(img.startswith(PNG_SIGNATURE) for img in images)


def test_protocol_is_stated_with_the_runs_counts(tmp_path, run_inputs):
    data, md, html = _read(write_report(tmp_path, **run_inputs))
    p = data["protocol"]
    split = run_inputs["data_quality"]["split"]
    assert p["counts"]["test_users"] == split["test_users"]
    assert p["counts"]["evaluated_users"] == {n: m["n_users"] for n, m in run_inputs["ranking"].items()}
    text = " ".join(p["statements"].values())
    phrases = ("full ranking, no sampled negatives", "excluded", "lower item index", "global_temporal", "empty",
               "val/recall@20")
    for phrase in phrases:
        assert phrase in text, phrase
    assert f"{split['test_users']} users with at least one relevant item" in text
    assert f"({split['test_pairs_already_seen']} such user-item pairs removed)" in text
    assert p["definitions"]["map@K"] == DEFINITIONS["map@K"]
    assert DEFINITIONS["map@K"].replace("|", "\\|") in md  # pipes escaped inside a Markdown table
    assert "(1 / min(K, |R|)) * sum over ranks i &lt;= K" in html
    assert set(p["baselines"]) == {"popularity", "ease"}


def test_protocol_describes_the_configured_split(tmp_path, run_inputs):
    config = json.loads(json.dumps(run_inputs["config"]))
    config["data"]["split"].update(method="leave_last_n", n=2)
    quality = json.loads(json.dumps(run_inputs["data_quality"]))
    quality["split"]["method"] = "leave_last_n"
    data = build_report(**{**run_inputs, "config": config, "data_quality": quality}).data
    assert data["protocol"]["statements"]["split"].startswith("leave_last_n: per user, the last 2 event(s) are test")


def test_a_configured_baseline_that_did_not_run_is_explained(run_inputs):
    ranking = {k: v for k, v in run_inputs["ranking"].items() if k != "ease"}
    data = build_report(**{**run_inputs, "ranking": ranking}).data
    assert "configured but not run" in data["protocol"]["baselines"]["ease"]
    assert data["summary"][0]["best_baseline"] == "popularity"


@pytest.fixture(scope="module")
def full_report(tmp_path_factory, run_inputs):
    """The report with every optional input: (json data, markdown, html, the propensity inputs)."""
    prop = propensity_inputs()
    paths = write_report(tmp_path_factory.mktemp("full"), **run_inputs, propensity=prop, segments=segment_inputs())
    return (*_read(paths), prop)


def test_full_report_with_propensity_and_segments(full_report):
    data, md, html, prop = full_report
    assert data["sections_absent"] == {}
    assert "Not available" not in md and "Not available" not in html
    p = data["propensity"]
    assert p["model"] == "mlp" and p["n_test_users"] == 400 and p["n_positive"] == int(prop.test_labels.sum())
    assert "warning" not in p and "barely better than chance" not in md  # served ROC-AUC 0.8
    assert p["metrics"]["gbm"]["roc_auc"] == pytest.approx(0.78)
    assert p["comparison"] == {"model": "mlp", "roc_auc": 0.8, "best_baseline": "logistic_regression", "baseline_roc_auc": 0.79}
    assert p["gains"]["mlp"] == gains_table(prop.test_labels, prop.test_predictions["mlp"])
    assert set(p["gains"]) == {"mlp", "logistic_regression", "gbm"}
    s = data["segments"]
    assert s["n_users"] == 600 and sum(s["sizes"].values()) == 600 and s["n_segments"] == 4
    assert "Cumulative gains" in md and "| segment | users | share |" in md
    images = _images(html)
    assert len(images) == 5 and all(img.startswith(PNG_SIGNATURE) for img in images)  # ranking 2, propensity 2, segments 1
    for title in ("ROC and precision-recall curves", "Calibration, cumulative gains and lift", "Segment sizes and user map"):
        assert title in html


def test_html_is_self_contained(full_report):
    html = full_report[2]
    refs = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert refs and all(r.startswith(("data:", "#")) for r in refs)
    assert "<script" not in html and "@import" not in html and "url(" not in html


def test_propensity_with_one_class_renders_a_note_instead_of_curves(run_inputs):
    prop = propensity_inputs()
    prop.test_labels = np.zeros_like(prop.test_labels)
    report = build_report(**run_inputs, propensity=prop)
    assert "all of one class" in report.data["propensity"]["note"]
    assert report.figures["propensity"] == []


def test_mismatched_propensity_arrays_are_refused_naming_the_model():
    prop = propensity_inputs()
    prop.test_predictions["gbm"] = prop.test_predictions["gbm"][:-1]
    with pytest.raises(ValueError, match=r"predictions\['gbm'\] has 399 values for 400 labels"):
        PropensityInputs.coerce(prop)
    with pytest.raises(ValueError, match="user_vectors"):
        SegmentInputs(np.zeros(5), np.zeros((4, 3)))


def test_no_evaluated_users_gives_a_report_that_says_so(tmp_path, run_inputs):
    data, md, _ = _read(write_report(tmp_path, **{**run_inputs, "ranking": {}}))
    assert "ranking" in data["sections_absent"] and data["summary"] == []
    assert "Not available: no test user had a held-out item" in md


def test_compare_names_the_winner_only_beyond_noise():
    def ranking(ours, theirs, se):
        return {"m": {"recall@10": ours, "stderr": {"recall@10": se}},
                "pop": {"recall@10": 0.01, "stderr": {"recall@10": se}},
                "ease": {"recall@10": theirs, "stderr": {"recall@10": se}}}

    c = compare(ranking(0.30, 0.20, 0.01), "m", "recall@10")
    assert c["best_baseline"] == "ease" and c["relative_change"] == pytest.approx(0.5)
    assert c["z"] == pytest.approx(0.1 / np.sqrt(2e-4))
    assert c["verdict"] == "m beats the best baseline (ease)"
    assert compare(ranking(0.20, 0.30, 0.01), "m", "recall@10")["verdict"] == "the ease baseline beats m"
    assert compare(ranking(0.21, 0.20, 0.01), "m", "recall@10")["verdict"].startswith("no clear difference")


def test_cumulative_gains_and_gains_table_by_hand():
    y = np.array([1, 0, 1, 0, 0, 0, 0, 0, 0, 1])
    s = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05])
    share, gains = cumulative_gains(y, s)
    assert share.tolist() == pytest.approx([i / 10 for i in range(11)])
    assert gains.tolist() == pytest.approx([0, 1 / 3, 1 / 3, 2 / 3, 2 / 3, 2 / 3, 2 / 3, 2 / 3, 2 / 3, 2 / 3, 1])
    rows = gains_table(y, s, fractions=(0.1, 0.3, 1.0))
    assert [r["users"] for r in rows] == [1, 3, 10]
    assert [r["gain"] for r in rows] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert [r["lift"] for r in rows] == pytest.approx([10 / 3, 20 / 9, 1.0])


def test_segment_sizes_and_pca_map():
    assert segment_sizes(np.array([2, 0, 2, 2, 5])) == {0: 1, 2: 3, 5: 1}
    rng = np.random.default_rng(0)
    direction = np.zeros(10)
    direction[3] = 1.0
    x = rng.standard_normal((2000, 10)) * 0.1 + rng.standard_normal((2000, 1)) * 5 * direction
    rows, coords, explained = pca_2d(x, sample=500, seed=1)
    assert len(rows) == 500 and np.all(np.diff(rows) > 0) and coords.shape == (500, 2)
    assert explained[0] > 0.95 and explained[0] + explained[1] <= 1.0 + 1e-9
    centred = x[rows] - x[rows].mean(axis=0)
    assert abs(np.corrcoef(coords[:, 0], centred[:, 3])[0, 1]) > 0.999  # PC 1 is the planted direction


def test_train_writes_the_report_and_it_can_be_switched_off(tiny_cfg):
    result = run(tiny_cfg("model=mf", "debug=fdr", "export=false"))
    out = result["report"]["html"].parent
    data = json.loads((out / "report.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(data["ranking"]) == set(metrics["ranking"]) == {"mf", "popularity", "ease"}
    assert data["ranking"]["mf"]["recall@20"] == pytest.approx(metrics["ranking"]["mf"]["recall@20"])
    assert data["model"] == "mf" and data["config"]["model"]["name"] == "mf"
    assert data["data_quality"] == json.loads((out / "data_quality.json").read_text())
    trained_propensity = "propensity" in result  # the propensity step runs when propensity.enabled
    assert (data["propensity"] is not None) == trained_propensity
    built_segments = data["segments"] is not None  # the audience step segments users when audience.enabled
    assert built_segments == ("audience" in result)
    curves = data["train_curves"] is not None  # from logs/version_N/metrics.csv when the CSV logger wrote one
    expected_images = 2 + 2 * trained_propensity + built_segments + curves  # ranking 2, propensity 2, segment map 1, curves 1
    assert len(_images((out / "report.html").read_text())) == expected_images

    for name in ("report.json", "report.md", "report.html"):
        (out / name).unlink()
    result = run(tiny_cfg("model=mf", "debug=fdr", "export=false", "++propensity.enabled=false", "evaluation.report=null"))
    assert "report" not in result
    assert not (out / "report.html").exists() and (out / "metrics.json").exists()


def test_undefined_numbers_are_null_in_json_and_never_win(tmp_path, run_inputs):
    ranking = json.loads(json.dumps(run_inputs["ranking"]))
    ranking["ease"]["recall@20"] = float("nan")
    prop = propensity_inputs()
    prop.metrics["gbm"]["roc_auc"] = float("nan")
    data, md, _ = _read(write_report(tmp_path, **{**run_inputs, "ranking": ranking}, propensity=prop))
    assert data["ranking"]["ease"]["recall@20"] is None
    assert data["summary"][0]["metric"] == "recall@20" and data["summary"][0]["best_baseline"] == "popularity"
    assert data["propensity"]["metrics"]["gbm"]["roc_auc"] is None
    assert data["propensity"]["comparison"]["best_baseline"] == "logistic_regression"


# -- the first section: what the bundle serves, whether it beats every baseline, what to do -----------
def _with_model_winning(ranking: dict, model: str = "two_tower") -> dict:
    ranking = json.loads(json.dumps(ranking))
    for key in list(ranking[model]):
        if key.startswith(("recall@", "ndcg@")):
            ranking[model][key] = 0.99
    for se in ranking[model].get("stderr", {}):
        ranking[model]["stderr"][se] = 0.001
    return ranking


def test_overview_comes_first_and_warns_when_a_baseline_wins(tmp_path, run_inputs):
    data, md, html = _read(write_report(tmp_path, **run_inputs))  # random vectors: EASE wins
    o = data["overview"]
    assert o["beats_every_baseline"] is False
    assert "does not beat every baseline" in o["verdict"] and "ease" in o["verdict"]
    assert any(w.startswith("two_tower is below its baseline: ease") for w in o["warnings"])
    assert any(a.startswith("Deploy the stronger option: serve ease") for a in o["advice"])
    assert md.index("## What this bundle serves, and what to do") < md.index("## Summary")
    assert html.index('id="overview"') < html.index('id="summary"') and 'class="warn"' in html
    assert "Training ran all" not in md  # 3 epochs of a 10-epoch budget: not a max_epochs warning

    data, md, html = _read(write_report(tmp_path, **{**run_inputs, "ranking": _with_model_winning(run_inputs["ranking"])}))
    o = data["overview"]
    assert o["beats_every_baseline"] is True and o["warnings"] == [] and o["advice"] == []
    assert o["verdict"].startswith("two_tower beats every baseline on recall@20 and ndcg@20 by more than the noise")
    assert 'class="verdict"' in html and "Warning." not in md


def test_a_propensity_model_at_chance_or_below_its_baseline_is_flagged(tmp_path, run_inputs):
    prop = propensity_inputs()
    prop.metrics["mlp"]["roc_auc"] = 0.44
    data, md, html = _read(write_report(tmp_path, **run_inputs, propensity=prop))
    warnings = data["overview"]["warnings"]
    chance = [w for w in warnings if "at or below chance" in w]
    assert len(chance) == 1 and "ROC-AUC 0.440" in chance[0]
    assert any("below its baseline: logistic_regression reaches ROC-AUC 0.790" in w for w in warnings)
    assert f"> **Warning.** {chance[0]}" in md and "at or below chance" in html
    assert any("propensity.target_event" in a for a in data["overview"]["advice"])

    prop.metrics["mlp"]["roc_auc"] = 0.80  # better than every baseline: no propensity warning
    data, _, _ = _read(write_report(tmp_path, **run_inputs, propensity=prop))
    assert not [w for w in data["overview"]["warnings"] if "propensity" in w]
    assert any("Propensity scores (probability" in line for line in data["overview"]["serves"])


def test_training_run_to_max_epochs_is_advised_to_train_longer(tmp_path, run_inputs):
    train = {**run_inputs["train"], "epochs": 10}  # the config's trainer.max_epochs
    data, _, _ = _read(write_report(tmp_path, **{**run_inputs, "train": train}))
    assert any(a.startswith("Training ran all 10 epochs") and "trainer.max_epochs=20" in a for a in data["overview"]["advice"])


def test_segment_table_has_labels_categories_lift_propensity_and_attributes(tmp_path, run_inputs):
    seg = segment_inputs()
    seg.descriptions = [{"segment": s, "size": int((seg.assignments == s).sum()), "share": 0.25,
                         "top_categories": [{"category": f"cat_{s}", "share": 0.4, "lift": 2.0 + s}],
                         "mean_propensity": 0.1 * (s + 1),
                         "attributes": {"numeric": {}, "over_represented": [{"value": f"region=r{s}", "share": 0.5,
                                                                             "overall": 0.25, "lift": 2.0}]}}
                        for s in range(4)]
    data, md, html = _read(write_report(tmp_path, **run_inputs, segments=seg))
    table = data["segments"]["table"]
    assert [r["label"] for r in table] == [f"cat_{s}, region=r{s}" for s in range(4)]
    assert "| 2 | cat_2, region=r2 |" in md and "cat_2 (×4.0)" in md and "region=r2 (×2.0)" in md
    assert "30.0\u00a0%" in md  # segment 2's mean propensity
    assert "4 user segments with their descriptions" in " ".join(data["overview"]["serves"])


def test_training_curves_come_from_the_latest_csv_log(tmp_path, run_inputs):
    for version, loss in ((0, 9.0), (1, 5.0)):
        log = tmp_path / "logs" / f"version_{version}"
        log.mkdir(parents=True)
        (log / "metrics.csv").write_text(
            "epoch,step,train/loss_epoch,train/loss_step,val/recall@20\n"
            f"0,9,,{loss + 1},\n0,9,,,0.10\n0,9,{loss},,\n1,19,,{loss},\n1,19,,,0.20\n1,19,{loss - 1},,\n")
    data, md, html = _read(write_report(tmp_path, **run_inputs))
    curves = data["train_curves"]
    assert curves["epoch"] == [1, 2] and curves["train/loss"] == [5.0, 4.0] and curves["val/recall@20"] == [0.1, 0.2]
    assert curves["source"].endswith("version_1/metrics.csv")
    assert "Training curves" in html and len(_images(html)) == 3


def test_selection_record_and_stage_statuses_are_read_from_metrics_json_defensively(tmp_path, run_inputs):
    record = {"selected": "ease", "refit": True,
              "candidates": {"two_tower": {"status": "ok", "val": {"ndcg@20": 0.11, "recall@20": 0.2}, "test": {},
                                           "fit_seconds": 12.5},
                             "ease": {"status": "ok", "val": {"ndcg@20": 0.13, "recall@20": 0.25}, "fit_seconds": 0.4},
                             "multvae": {"status": "skipped", "reason": "catalogue too large"}},
              "best_baseline": {"name": "popularity", "val": {"recall@20": 0.1}}}
    stages = {"data": {"status": "ok", "seconds": 1.0}, "propensity": {"status": "skipped", "reason": "no purchase events"},
              "audience": {"status": "failed", "reason": "ValueError: boom"}}
    (tmp_path / "metrics.json").write_text(json.dumps({"model": record, "stages": stages}))
    data, md, html = _read(write_report(tmp_path, **run_inputs))
    o = data["overview"]
    assert "Model selection chose ease among two_tower (ok), ease (ok), multvae (skipped), refitted" in " ".join(o["serves"])
    assert "Stage propensity skipped: no purchase events." in o["warnings"]
    assert "Stage audience failed: ValueError: boom." in o["warnings"] and not [w for w in o["warnings"] if "data" in w]
    assert any(a.startswith("Serve ease, the model the selection step chose") for a in o["advice"])
    assert "ease (selected)" in md and "popularity (best baseline)" in md and "catalogue too large" in md
    for odd in ({"model": "two_tower", "stages": ["data"]}, {"model": {"candidates": None}, "stages": {"x": "ok"}}, []):
        (tmp_path / "metrics.json").write_text(json.dumps(odd))  # older or foreign shapes: ignored, never an error
        data, _, _ = _read(write_report(tmp_path, **run_inputs))
        assert data["overview"]["verdict"]

def test_stages_and_the_served_propensity_model_are_shown(tmp_path, run_inputs):
    weak = propensity_inputs()
    weak.metrics["gbm"]["roc_auc"] = 0.55
    weak.served = "gbm"
    stages = {"data": {"status": "ok", "reason": None, "seconds": 0.5},
              "propensity": {"status": "skipped", "reason": "propensity: 5 of 511 eligible users are positive", "seconds": 0.1},
              "audience": {"status": "failed", "reason": "RuntimeError: disk on fire", "seconds": 0.2}}
    data, md, html = _read(write_report(tmp_path, **run_inputs, propensity=weak, stages=stages))
    assert data["stages"] == stages
    assert "## Run stages" in md and ">Run stages</h2>" in html
    assert "| propensity | skipped | propensity: 5 of 511 eligible users are positive |" in md
    assert "RuntimeError: disk on fire" in html
    assert data["propensity"]["model"] == "gbm" and "The bundle serves gbm" in md
    assert "barely better than chance (ROC-AUC 0.550 < 0.6)" in data["propensity"]["warning"]
    assert md.count("barely better than chance") == 1  # in the propensity section (the overview warns on its own)
