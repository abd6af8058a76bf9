"""``dmp_dl.fit(events, items, users, **overrides)``: train.py from DataFrames, returning a Recommender."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import dmp_dl
from dmp_dl.core.errors import ConfigError, DataError
from dmp_dl.data.synthetic import SyntheticSource

REPO = Path(__file__).resolve().parents[1]
# Small and deterministic: a fixed number of autoencoder epochs and no time budget (a budget that
# fires depends on the machine's load), no optional stage but the evaluation.
SETTINGS = {
    "model": "ease",
    "model.vae.max_epochs": 2,
    "model.time_budget_s": None,
    "propensity.enabled": False,
    "audience.enabled": False,
    "evaluation.report": None,
    "logger": "none",
    "trainer.enable_progress_bar": False,
    "trainer.enable_model_summary": False,
    "trainer.accelerator": "cpu",
}
CLI = ["model=ease", "model.vae.max_epochs=2", "model.time_budget_s=null", "propensity.enabled=false",
       "audience.enabled=false", "evaluation.report=null", "logger=none", "trainer.enable_progress_bar=false",
       "trainer.enable_model_summary=false", "trainer.accelerator=cpu"]


@pytest.fixture(scope="module")
def tables():
    return SyntheticSource(n_users=200, n_items=80, n_events=4000, n_categories=5, n_segments=3, seed=3).load()


@pytest.mark.slow  # two trainings: a train.py process and fit
def test_fit_gives_train_pys_test_metrics_on_the_same_data(tables, tmp_path):
    for name, frame in (("events", tables.events), ("items", tables.items), ("users", tables.users)):
        frame.to_csv(tmp_path / f"{name}.csv", index=False)
    out = tmp_path / "cli"
    done = subprocess.run([sys.executable, "train.py", "data=events", f"data.path={tmp_path / 'events.csv'}",
                           f"data.items={tmp_path / 'items.csv'}", f"data.users={tmp_path / 'users.csv'}",
                           *CLI, f"paths.output_dir={out}"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    cli_metrics = json.loads((out / "metrics.json").read_text())

    rec = dmp_dl.fit(tables.events, items=tables.items, users=tables.users, **SETTINGS)

    assert isinstance(rec, dmp_dl.Recommender)
    assert rec.n_users == 200 and rec.item_categories is not None
    assert set(rec.metrics["ranking"]) == set(cli_metrics["ranking"]) >= {"ease", "popularity"}
    for model, metrics in cli_metrics["ranking"].items():
        for key in ("recall@20", "ndcg@20", "n_users"):
            assert rec.metrics["ranking"][model][key] == pytest.approx(metrics[key], rel=1e-6), (model, key)
    assert rec.metrics["stages"]["export"]["status"] == "ok"
    user = rec.user_vocab.ids[0]
    assert len(rec.recommend(user, 5, exclude_categories=["cat_0"])) == 5


@pytest.mark.slow
def test_fit_writes_the_run_where_asked(tables, tmp_path):
    rec = dmp_dl.fit(tables.events, items=tables.items, output_dir=tmp_path / "run", **SETTINGS)
    assert (tmp_path / "run" / "artifacts" / "manifest.json").exists()
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written["ranking"]["ease"]["ndcg@20"] == rec.metrics["ranking"]["ease"]["ndcg@20"]


@pytest.mark.parametrize("call, error, message", [
    (lambda t: dmp_dl.fit(t.events.drop(columns=["item_id"])), DataError, "events lacks required column 'item_id'"),
    (lambda t: dmp_dl.fit(t.events, items=t.items.rename(columns={"item_id": "sku"})), DataError,
     "items lacks required column 'item_id'"),
    (lambda t: dmp_dl.fit(t.events.to_dict("list")), DataError, "events must be a pandas DataFrame"),
    (lambda t: dmp_dl.fit(pd.concat([t.events, t.events[["value"]]], axis=1)), DataError,
     "duplicated column name(s) ['value']"),
    (lambda t: dmp_dl.fit(t.events, **{"model.no_such_key": 1}), ConfigError, "unknown setting 'model.no_such_key'"),
    (lambda t: dmp_dl.fit(t.events, model="no_such_model"), ConfigError, "no_such_model"),
    (lambda t: dmp_dl.fit(t.events, **{"data.path": "x.csv"}), ConfigError, "data.path cannot be set"),
    (lambda t: dmp_dl.fit(t.events, export=False), ConfigError, "export must stay true"),
    (lambda t: dmp_dl.fit(t.events, **{"model.dim": -1}), ConfigError, "model.dim"),
])
def test_bad_input_is_one_error_naming_it(tables, call, error, message):
    with pytest.raises(error) as raised:
        call(tables)
    assert message in str(raised.value)


def test_import_dmp_dl_stays_light():
    code = ("import sys, dmp_dl; heavy = [m for m in ('torch', 'hydra', 'faiss', 'pandas') if m in sys.modules]; "
            "assert not heavy, heavy; assert callable(dmp_dl.fit) and 'fit' in dmp_dl.__all__")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
