"""python -m dmp_dl.evaluate: the offline report re-created from a bundle, leakage-free and reproducible."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from dmp_dl.commands.evaluate import data_config, evaluate_bundle
from dmp_dl.core.cli import report_errors
from dmp_dl.data.datamodule import InteractionDataModule
from dmp_dl.data.split import TRAIN
from dmp_dl.data.synthetic import SyntheticSource
from dmp_dl.data.vocab import IdVocab
from dmp_dl.evaluation.baselines import EmbeddingScorer
from dmp_dl.evaluation.heldout import HeldOutSplit, map_to_vocabularies
from dmp_dl.evaluation.ranking import evaluate_scorer
from dmp_dl.evaluation.render import SECTIONS
from dmp_dl.metrics.classification import gains_table
from dmp_dl.pipeline.run import run
from dmp_dl.store.bundle import ITEM_VECTORS, MANIFEST, NETWORK_WEIGHTS, USER_VECTORS, Bundle, write_manifest

from .conftest import CONF_DIR, QUIET_TRAINER, TINY_DATA, compose_cfg

ROOT = Path(__file__).resolve().parents[1]
# Non-default ranking settings at training: evaluate must take them from the bundle.
TRAIN_EVALUATION = ["evaluation.ks=[3,10,20]", "evaluation.ease_l2=50"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run with the propensity model (debug=fdr): its directory and metrics.json."""
    out = tmp_path_factory.mktemp("evaluate") / "run"
    cfg = compose_cfg([*TINY_DATA, *QUIET_TRAINER, "debug=fdr", "logger=none", "++propensity.enabled=true",
                       "model.refit=false", *TRAIN_EVALUATION], out)  # a refitted bundle saw the test period
    result = run(cfg)
    assert "propensity" in result, "the run trained no propensity model"
    return {"dir": out, "bundle": Path(result["bundle_dir"]), "metrics": json.loads((out / "metrics.json").read_text()),
            "datamodule": result["datamodule"]}


def evaluate_cfg(*overrides: str) -> DictConfig:
    """conf/evaluate.yaml with ``overrides``, as the command composes it."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("evaluate", overrides=list(overrides))


def evaluate(bundle: Path, output_dir: Path, *overrides: str) -> dict:
    return evaluate_bundle(evaluate_cfg(f"artifacts={bundle}", f"output_dir={output_dir}", *overrides))


def assert_same_ranking(ours: dict, recorded: dict, tol: float = 1e-9) -> None:
    assert set(ours) == set(recorded)
    for name in recorded:
        keys = set(recorded[name]) - {"eval_seconds"}
        assert keys <= set(ours[name]), f"{name}: missing {keys - set(ours[name])}"
        for key in keys:
            want, got = recorded[name][key], ours[name][key]
            if isinstance(want, dict):
                for sub, v in want.items():
                    assert got[sub] == pytest.approx(v, rel=tol, abs=tol), f"{name}.{key}.{sub}"
            elif want is None:
                assert got is None or not np.isfinite(got), f"{name}.{key}"
            else:
                assert got == pytest.approx(want, rel=tol, abs=tol), f"{name}.{key}"


def without_propensity(bundle: Path, target: Path) -> Path:
    """A valid copy of ``bundle`` without its propensity part."""
    copy = Path(shutil.copytree(bundle, target))
    shutil.rmtree(copy / "propensity")
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest.pop("propensity")
    manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith("propensity/")}
    write_manifest(copy, manifest)
    return copy


# -- reproduction ------------------------------------------------------------------------------


def test_reevaluating_a_bundle_on_its_data_reproduces_the_runs_metrics(trained, tmp_path):
    result = evaluate(trained["bundle"], tmp_path / "report")
    assert_same_ranking(result["ranking"], trained["metrics"]["ranking"])
    assert result["counts"]["same_vocabularies"] and result["counts"]["users_unknown"] == 0

    out = tmp_path / "report"
    assert {"report.json", "report.md", "report.html"} <= {p.name for p in out.iterdir()}
    data = json.loads((out / "report.json").read_text())
    assert data["cutoffs"] == [3, 10, 20]  # the bundle's training settings, not the evaluation group's defaults
    assert data["config"]["evaluation"]["ease_l2"] == 50
    assert_same_ranking(data["ranking"], trained["metrics"]["ranking"])
    assert data["data_quality"] == json.loads((trained["dir"] / "data_quality.json").read_text())
    assert "user_vectors.npy include the test period" in data["protocol"]["statements"]["bundle"]
    assert "vocabularies are the bundle's" in data["protocol"]["statements"]["data"]
    # every held-out pair is in the bundle's data, but its run's own split kept them out of the model
    overlap = data["train"]["heldout_overlap"]
    assert overlap == result["overlap"] and overlap["share"] == 1.0 and overlap["same_split"] is True
    assert overlap["warning"] is None and "leakage" not in data["protocol"]["statements"]
    md = (out / "report.md").read_text()
    for title in SECTIONS.values():
        assert f"## {title}" in md
    # the segment section is re-created from the bundle's stored assignments
    trained_sizes = {str(seg["segment"]): seg["size"] for seg in trained["metrics"]["audience"]["segments"]}
    assert data["segments"]["sizes"] == trained_sizes


def test_user_vectors_come_from_training_histories_not_the_bundles_full_history_vectors(trained, tmp_path):
    """Scoring the test split with the bundle's user_vectors.npy (which saw the test period) gives
    other numbers: the command must not use them, and reproducing metrics.json shows it does not."""
    bundle = Bundle.open(trained["bundle"])
    dm = trained["datamodule"]
    split = HeldOutSplit.from_datamodule(dm)
    popularity = torch.as_tensor(dm.item_counts / dm.item_counts.sum(), dtype=torch.float32)
    leaky = evaluate_scorer(EmbeddingScorer(bundle.array(USER_VECTORS), bundle.array(ITEM_VECTORS), device="cpu"),
                            split.test, split.n_items, [3, 10, 20], popularity, device="cpu")
    recorded = trained["metrics"]["ranking"]["auto"]
    gaps = [abs(leaky[k] - recorded[k]) for k in ("recall@10", "recall@20", "ndcg@20", "mrr")]
    assert max(gaps) > 1e-4, "full-history vectors score like training-history ones: this check cannot tell them apart"
    ours = evaluate(trained["bundle"], tmp_path / "report")["ranking"]["auto"]
    for k in ("recall@10", "recall@20", "ndcg@20", "mrr"):
        assert ours[k] == pytest.approx(recorded[k], abs=1e-9)


def test_propensity_section_is_re_derived_from_the_bundle(trained, tmp_path):
    result = evaluate(trained["bundle"], tmp_path / "report")
    recorded = trained["metrics"]["propensity"]
    inputs = result["propensity"]
    assert inputs is not None
    assert len(inputs.labels) == recorded["split"]["test"]
    served = recorded["served"]  # the best on the validation users: the bundle stores it alone
    assert set(inputs.predictions) == {served} and inputs.served == served
    for name, metrics in recorded["metrics"].items():
        for key in ("roc_auc", "pr_auc", "log_loss", "brier", "ece", "lift@10"):
            assert inputs.metrics[name][key] == pytest.approx(metrics[key], rel=1e-9, abs=1e-12), f"{name}.{key}"
    gains = gains_table(inputs.labels, inputs.predictions[served])  # per-user order, not only averages
    assert json.loads(json.dumps(gains)) == recorded["gains"][served]
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    assert data["propensity"]["n_test_users"] == recorded["split"]["test"]
    assert "re-derived from the bundle" in data["protocol"]["statements"]["propensity"]
    assert "propensity" not in data["sections_absent"]
    html = (tmp_path / "report" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 5  # ranking x2, propensity x2, segment map


def test_a_bundle_without_propensity_says_so(trained, tmp_path):
    bundle = without_propensity(trained["bundle"], tmp_path / "artifacts")
    result = evaluate(bundle, tmp_path / "report")
    assert result["propensity"] is None
    assert_same_ranking(result["ranking"], trained["metrics"]["ranking"])
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    assert data["propensity"] is None
    assert data["sections_absent"]["propensity"] == "the bundle has no propensity model (its run did not train one)"


def test_evaluation_settings_can_be_overridden_and_the_report_says_so(trained, tmp_path):
    result = evaluate(trained["bundle"], tmp_path / "report", "evaluation.ks=[5]", "evaluation.baselines=[popularity]")
    assert set(result["ranking"]) == {"auto", "popularity"}
    assert {k for k in result["ranking"]["auto"] if k.startswith("recall@")} == {"recall@5"}
    note = json.loads((tmp_path / "report" / "report.json").read_text())["protocol"]["statements"]["settings"]
    assert "ks: [5] instead of [3, 10, 20]" in note and "baselines: ['popularity'] instead of" in note


# -- other data --------------------------------------------------------------------------------


def test_other_data_are_mapped_by_id_and_unknown_ids_are_counted_not_scored(trained, tmp_path):
    bigger = ["data.source.n_users=600", "data.source.n_items=200", "data.source.n_events=15000"]
    result = evaluate(trained["bundle"], tmp_path / "report", "data=synthetic", *bigger)
    bundle_dm = trained["datamodule"]
    other = instantiate(evaluate_cfg("data=synthetic", *bigger, "seed=42").data, _convert_="all").prepare()
    known_users = set(bundle_dm.user_vocab.ids) & set(other.user_vocab.ids)
    known_items = set(bundle_dm.item_vocab.ids) & set(other.item_vocab.ids)
    counts = result["counts"]
    assert not counts["same_vocabularies"]
    assert counts["users_unknown"] == other.n_users - len(known_users) > 0
    assert counts["items_unknown"] == other.n_items - len(known_items) > 0
    rel = other.test_relevant.tocoo()
    pairs = {(other.user_vocab.ids[u], other.item_vocab.ids[i]) for u, i in zip(rel.row, rel.col)}
    kept = {(u, i) for u, i in pairs if u in known_users and i in known_items}
    assert counts["test_pairs"] == len(kept)
    assert result["ranking"]["auto"]["n_users"] == len({u for u, _ in kept}) == counts["test_users"]
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    assert data["data_quality"]["n_items"] == bundle_dm.n_items  # the catalogue ranked is the bundle's
    assert data["data_quality"]["bundle_mapping"]["data_items"] == other.n_items
    assert f"{counts['users_unknown']} users and {counts['items_unknown']} items the bundle does not know" in \
        data["protocol"]["statements"]["data"]
    assert "not the propensity model's training data" in data["sections_absent"]["propensity"]


# -- leakage -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def refitted(tmp_path_factory):
    """A tiny run of the default model, refitted on every event (test period included) before export."""
    out = tmp_path_factory.mktemp("evaluate_refit") / "run"
    result = run(compose_cfg([*TINY_DATA, *QUIET_TRAINER, "debug=fdr", "logger=none", "propensity.enabled=false",
                              "audience.enabled=false", "evaluation.report=null"], out))
    assert Bundle.open(result["bundle_dir"]).manifest["scoring"]["refit"], "the default model refits"
    return Path(result["bundle_dir"])


def leakage_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("leakage:")]


def test_a_bundle_evaluated_on_the_events_it_was_fitted_on_warns_once(refitted, tmp_path, caplog):
    result = evaluate(refitted, tmp_path / "report")
    overlap = result["overlap"]
    assert overlap["refit"] and overlap["share"] == 1.0 and overlap["in_bundle_training_data"] == overlap["heldout_pairs"] > 0
    lines = leakage_lines(caplog)
    assert lines == [overlap["warning"]], lines  # printed once
    assert lines[0].startswith(f"leakage: 100% of the evaluated held-out user-item pairs ({overlap['heldout_pairs']} of "
                               f"{overlap['heldout_pairs']}) are events of the bundle's training data and it was "
                               "refitted on every event")
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    assert data["train"]["heldout_overlap"]["warning"] == lines[0]
    assert "not held-out numbers" in data["protocol"]["statements"]["leakage"]
    assert "not held-out numbers" in (tmp_path / "report" / "report.md").read_text()


def test_the_training_data_split_anew_warn_and_other_data_do_not(trained, tmp_path, caplog):
    """A model that was not refitted: the same events split another way leak (the run trained on some
    of the new held-out pairs); the same events split as in training, or other events, do not."""
    resplit = evaluate(trained["bundle"], tmp_path / "resplit", "data=synthetic", *TINY_DATA,
                       "data.split.method=random_per_user")
    assert resplit["overlap"]["share"] == 1.0 and not resplit["overlap"]["same_split"]
    assert leakage_lines(caplog) == [resplit["overlap"]["warning"]] and "split anew" in resplit["overlap"]["warning"]
    caplog.clear()
    again = evaluate(trained["bundle"], tmp_path / "same", "data=synthetic", *TINY_DATA)
    assert again["overlap"]["same_split"] and again["overlap"]["warning"] is None
    assert_same_ranking(again["ranking"], trained["metrics"]["ranking"])
    other = evaluate(trained["bundle"], tmp_path / "other", "data=synthetic", *TINY_DATA, "data.source.seed=7")
    assert other["overlap"]["share"] < 0.1 and other["overlap"]["warning"] is None, other["overlap"]
    assert leakage_lines(caplog) == []


def test_mapping_onto_other_vocabularies_keeps_every_pair_by_id():
    dm = InteractionDataModule(SyntheticSource(n_users=120, n_items=60, n_events=3000, seed=3), history_len=4).prepare()
    rng = np.random.default_rng(0)
    # The bundle knows a subset of the users and items, plus ids the data do not have, in another order.
    users = IdVocab(list(rng.permutation([*rng.choice(dm.user_vocab.ids, 90, replace=False), "u_extra1", "u_extra2"])))
    items = IdVocab(list(rng.permutation([*rng.choice(dm.item_vocab.ids, 45, replace=False), "i_extra"])))
    split, counts = map_to_vocabularies(dm, users, items, history_len=4)

    def by_id(m, uv, iv):
        c = m.tocoo()
        return {(uv.ids[u], iv.ids[i]) for u, i in zip(c.row, c.col)}

    def known(pairs):
        return {(u, i) for u, i in pairs if u in users and i in items}

    assert by_id(split.test.relevant, users, items) == known(by_id(dm.test_relevant, dm.user_vocab, dm.item_vocab))
    assert by_id(split.test.seen, users, items) == known(by_id(dm.test_seen, dm.user_vocab, dm.item_vocab))
    assert by_id(split.train_seen, users, items) == known(by_id(dm.train_seen, dm.user_vocab, dm.item_vocab))
    assert sorted(users.ids[split.test.users]) == sorted({u for u, _ in by_id(split.test.relevant, users, items)})

    ev = dm.events
    train = ev[ev["split"].to_numpy() == TRAIN]
    train = train[train["user_id"].isin(users.ids) & train["item_id"].isin(items.ids)]
    counts_by_id = train["item_id"].astype(str).value_counts()
    assert {items.ids[i]: int(n) for i, n in enumerate(split.item_counts) if n} == counts_by_id.to_dict()
    for uid, events in train.groupby("user_id", sort=False):  # reference: the last 4 known items, newest first
        want = [items.get(i) for i in events["item_id"].tolist()[::-1][:4]]
        row = split.train_history[users.get(uid)]
        assert row[: len(want)].tolist() == want and (row[len(want):] == len(items)).all()
    assert counts["users_unknown"] == dm.n_users - 90 and counts["items_unknown"] == dm.n_items - 45


def test_mapping_onto_the_datas_own_vocabularies_is_the_identity():
    dm = InteractionDataModule(SyntheticSource(n_users=100, n_items=50, n_events=2500, seed=4), history_len=5).prepare()
    mapped, counts = map_to_vocabularies(dm, dm.user_vocab, dm.item_vocab, history_len=5)
    direct = HeldOutSplit.from_datamodule(dm)
    assert counts["same_vocabularies"] and counts["test_users_dropped"] == 0
    np.testing.assert_array_equal(mapped.train_history, direct.train_history)
    np.testing.assert_array_equal(mapped.item_counts, direct.item_counts)
    np.testing.assert_array_equal(mapped.test.users, direct.test.users)
    for a, b in ((mapped.train_seen, direct.train_seen), (mapped.test.seen, direct.test.seen),
                 (mapped.test.relevant, direct.test.relevant)):
        assert (a != b).nnz == 0


def test_data_keys_without_a_group_change_the_training_runs_data_config():
    run_cfg = OmegaConf.create({"seed": 7, "data": {"_target_": "x.DataModule", "name": "events", "path": "old.csv",
                                                    "split": {"method": "leave_last_n", "seed": 7}}})
    cfg = OmegaConf.create({"seed": None, "data": {"path": "new.csv"}})
    node, origin = data_config(cfg, run_cfg, Path("manifest.json"))
    assert origin == "training with overrides" and cfg.seed == 7
    assert node.path == "new.csv" and node.split.method == "leave_last_n" and node._target_ == "x.DataModule"
    node, origin = data_config(OmegaConf.create({"seed": None}), run_cfg, Path("manifest.json"))
    assert origin == "training" and node.path == "old.csv"


def test_other_data_get_the_training_runs_privacy_settings_unless_they_set_their_own():
    privacy = {"_target_": "x.PrivacyOptions", "pseudonymize": True}
    run_cfg = OmegaConf.create({"seed": 1, "data": {"_target_": "x.DataModule", "path": "a.csv", "privacy": privacy}})
    other = {"_target_": "x.DataModule", "path": "b.csv", "privacy": None}
    node, origin = data_config(OmegaConf.create({"seed": 3, "data": other}), run_cfg, Path("manifest.json"))
    assert origin == "override" and node.path == "b.csv" and node.privacy.pseudonymize is True
    own = {**other, "privacy": {"_target_": "x.PrivacyOptions", "pseudonymize": False}}
    node, _ = data_config(OmegaConf.create({"seed": 3, "data": own}), run_cfg, Path("manifest.json"))
    assert node.privacy.pseudonymize is False


def test_moved_training_data_are_found_with_a_data_key_and_reproduce_the_run(trained, tmp_path, capsys):
    """A bundle whose training config names an events file that has since moved: the command says how
    to point at it, and +data.path=NEW keeps the rest of the training data config."""
    events = trained["datamodule"].events[["user_id", "item_id", "timestamp", "event_type", "value"]]
    moved = tmp_path / "events.csv"
    events.to_csv(moved, index=False)
    bundle = Path(shutil.copytree(trained["bundle"], tmp_path / "artifacts"))
    manifest = json.loads((bundle / MANIFEST).read_text())
    data = manifest["config"]["data"]
    data.update(name="events", path=str(tmp_path / "old" / "events.csv"),
                source={"_target_": "dmp_dl.data.event_files.EventFileSource", "_partial_": True})
    write_manifest(bundle, manifest)

    line = _exit_line(capsys, lambda: evaluate(bundle, tmp_path / "report"))
    assert str(tmp_path / "old" / "events.csv") in line and "+data.path=" in line
    result = evaluate(bundle, tmp_path / "report", f"+data.path={moved}")
    assert_same_ranking(result["ranking"], trained["metrics"]["ranking"])
    statement = json.loads((tmp_path / "report" / "report.json").read_text())["protocol"]["statements"]["data"]
    assert "training config with the data overrides given" in statement


# -- errors ------------------------------------------------------------------------------------


def _exit_line(capsys, fn) -> str:
    with pytest.raises(SystemExit) as exit_info, report_errors():
        fn()
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ")
    return lines[0]


def test_a_corrupt_bundle_is_refused_naming_the_file(trained, tmp_path, capsys):
    bundle = Path(shutil.copytree(trained["bundle"], tmp_path / "artifacts"))
    with open(bundle / NETWORK_WEIGHTS, "r+b") as fh:
        fh.seek(100)
        byte = fh.read(1)
        fh.seek(100)
        fh.write(bytes([byte[0] ^ 0xFF]))
    line = _exit_line(capsys, lambda: evaluate(bundle, tmp_path / "report"))
    assert "weights.pt" in line and "checksum mismatch" in line
    assert not (tmp_path / "report" / "report.html").exists()


def test_a_data_path_that_does_not_exist_is_one_line(trained, tmp_path, capsys):
    missing = tmp_path / "nowhere.csv"
    line = _exit_line(capsys, lambda: evaluate(trained["bundle"], tmp_path / "report", "data=events",
                                               f"data.path={missing}"))
    assert str(missing) in line and "data.path" in line


def test_the_command_exits_2_with_one_line_for_a_missing_bundle(tmp_path):
    missing = tmp_path / "no_bundle"
    proc = subprocess.run([sys.executable, "-m", "dmp_dl.evaluate", f"artifacts={missing}",
                           f"output_dir={tmp_path / 'report'}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: bundle not found: {missing} is not a directory (set artifacts=DIR to an exported bundle)"]
    assert "Traceback" not in proc.stderr
