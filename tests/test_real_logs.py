"""Logs nobody tuned for train with the default command: stages that cannot run are skipped with
their reason, and the run still writes a loadable bundle, metrics.json and report.html."""

from __future__ import annotations

import json
from html import escape as html_escape
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dmp_dl import Recommender
from dmp_dl.core.errors import InsufficientDataError
from dmp_dl.data.synthetic import SyntheticSource
from dmp_dl.pipeline.run import run
from dmp_dl.store.bundle import Bundle, MissingPartError

from .conftest import QUIET_TRAINER, compose_cfg

DAY = 86400
START = pd.Timestamp("2023-01-01", tz="UTC").timestamp()
# The default command plus what keeps it fast: one batch of everything (debug=fdr), no CSV logger.
FAST = [*QUIET_TRAINER, "debug=fdr", "logger=none"]


def click_log_7_days(path: Path) -> Path:
    """300 users, 20k events (views, clicks, carts, purchases) over one week."""
    log = SyntheticSource(n_users=300, n_items=200, n_events=20000, days=7, seed=1).load()
    log.events.to_csv(path, index=False)
    return path


def ratings_log_with_a_quiet_last_month(path: Path) -> Path:
    """Three years of ratings: 400 users who each rate a burst of movies at some moment, and five
    heavy raters who are the only ones active in the last month (no event_type column)."""
    rng = np.random.default_rng(2)
    counts = rng.integers(8, 30, 400)
    user = np.repeat(np.arange(400), counts)
    t = START + rng.uniform(0, 1000, 400)[user] * DAY + rng.exponential(2 * DAY, len(user))
    heavy = np.repeat(np.arange(400, 405), 700)  # 100 ratings in the first years, 600 in the last month
    t_heavy = START + np.concatenate([rng.uniform(0, 1000, (5, 100)), rng.uniform(1100, 1130, (5, 600))], axis=1).reshape(-1) * DAY
    users = np.r_[user, heavy]
    ratings = pd.DataFrame({"user_id": users, "item_id": rng.zipf(1.4, len(users)) % 500,
                            "timestamp": np.r_[t, t_heavy].astype(np.int64), "value": rng.integers(1, 6, len(users))})
    ratings.to_csv(path, index=False)
    return path


def play_counts_without_times(path: Path) -> Path:
    """user, artist, play count: no time column at all."""
    rng = np.random.default_rng(3)
    n = 8000
    plays = pd.DataFrame({"user_id": rng.integers(0, 400, n), "item_id": rng.zipf(1.3, n) % 600,
                          "value": rng.integers(1, 300, n)}).drop_duplicates(["user_id", "item_id"])
    plays.to_csv(path, index=False)
    return path


def purchase_ledger(path: Path) -> Path:
    """Customers, dates and amounts of purchases of one product, over eight months."""
    rng = np.random.default_rng(4)
    rate = rng.lognormal(-3.3, 0.9, 600)
    counts = rng.poisson(rate * 240)
    user = np.repeat(np.arange(600), counts)
    ledger = pd.DataFrame({"user_id": user, "item_id": "ANY", "timestamp": (START + rng.random(len(user)) * 240 * DAY).astype(np.int64),
                           "value": np.round(rng.lognormal(3, 0.5, len(user)), 2)})
    ledger.to_csv(path, index=False)
    return path


def train(tmp_path: Path, data: Path, *overrides: str) -> tuple[dict, dict]:
    """The default command on ``data``: returns (run result, metrics.json)."""
    cfg = compose_cfg(["data=events", f"data.path={data}", *FAST, *overrides], tmp_path / "run")
    result = run(cfg)
    out = Path(cfg.paths.output_dir)
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["stages"]) == ["data", "model", "evaluation", "propensity", "audience", "export", "report"]
    for name, stage in metrics["stages"].items():
        assert stage["status"] in ("ok", "skipped"), (name, stage)
        assert (stage["reason"] is not None) == (stage["status"] == "skipped") or name == "audience", (name, stage)
        assert stage["seconds"] >= 0
    rec = Recommender.load(out / "artifacts")  # a loadable bundle that serves its users
    assert rec.recommend(rec.user_vocab.ids[0], k=1, exclude_seen=False)
    manifest = Bundle.open(out / "artifacts").manifest
    assert manifest["stages"] == {k: v for k, v in metrics["stages"].items() if k in manifest["stages"]}
    html = (out / "report.html").read_text()
    for name, stage in metrics["stages"].items():
        if stage["status"] == "skipped":
            assert html_escape(stage["reason"][:60]) in html, name
    return result, metrics


def test_a_seven_day_click_log(tmp_path):
    result, metrics = train(tmp_path, click_log_7_days(tmp_path / "clicks.csv"))
    stage = metrics["stages"]["propensity"]
    assert stage["status"] == "skipped" and "horizon_days=30 is not shorter than the data's time range" in stage["reason"]
    assert "propensity" not in metrics and "propensity" not in Bundle.open(result["bundle_dir"]).manifest
    with pytest.raises(MissingPartError, match="enabled, but the training run's propensity stage skipped: .*horizon_days=30 is not shorter"):
        Recommender.load(result["bundle_dir"]).propensity(["u000001"])  # the API answers 409 with this
    assert metrics["stages"]["evaluation"]["status"] == "ok" and metrics["ranking"]


def test_a_ratings_log_with_few_positives_in_its_last_month(tmp_path):
    result, metrics = train(tmp_path, ratings_log_with_a_quiet_last_month(tmp_path / "ratings.csv"))
    stage = metrics["stages"]["propensity"]
    assert stage["status"] == "skipped" and "eligible users are positive" in stage["reason"]
    # the API's 409 says the stage was enabled and skipped, and why (not "train with propensity enabled")
    from fastapi.testclient import TestClient

    from dmp_dl.api.server import create_app

    rec = Recommender.load(result["bundle_dir"])
    r = TestClient(create_app(rec, token="t")).post("/propensity", json={"user_ids": [rec.user_vocab.ids[0]]},
                                                    headers={"Authorization": "Bearer t"})
    assert r.status_code == 409 and r.json()["error"] == "unavailable", r.text
    assert r.json()["detail"] == ("this bundle has no propensity model: propensity was enabled, but the training run's "
                                  f"propensity stage skipped: {stage['reason']}")
    quality = json.loads((tmp_path / "run" / "data_quality.json").read_text())
    assert quality["split"]["method"] == "leave_last_n" and quality["split"]["method_requested"] == "auto"
    assert "one cut in time would leave" in quality["split"]["method_reason"]


def test_a_play_count_log_without_times(tmp_path):
    result, metrics = train(tmp_path, play_counts_without_times(tmp_path / "plays.csv"))
    quality = json.loads((tmp_path / "run" / "data_quality.json").read_text())
    assert quality["has_timestamps"] is False and quality["split"]["method"] == "random_per_user"
    stage = metrics["stages"]["propensity"]
    assert stage["status"] == "skipped" and "no event times" in stage["reason"]
    assert metrics["stages"]["audience"]["status"] == "ok"  # profiles need no times (no decay without them)
    assert metrics["ranking"] and metrics["stages"]["evaluation"]["status"] == "ok"


def test_a_purchase_ledger_of_one_product(tmp_path):
    result, metrics = train(tmp_path, purchase_ledger(tmp_path / "ledger.csv"))
    stage = metrics["stages"]["evaluation"]
    assert stage["status"] == "skipped" and "no test user has a held-out item" in stage["reason"]
    assert metrics["ranking"] == {}
    assert metrics["stages"]["propensity"]["status"] == "ok"
    served = metrics["propensity"]["served"]
    assert Bundle.open(result["bundle_dir"]).manifest["propensity"]["model"] == served
    rec = Recommender.load(result["bundle_dir"])
    assert 0 < rec.propensity([rec.user_vocab.ids[0]])[0] < 1


def test_a_required_stage_that_cannot_run_stops_the_run(tmp_path):
    with pytest.raises(InsufficientDataError, match="horizon_days=30 is not shorter"):
        train(tmp_path, click_log_7_days(tmp_path / "clicks.csv"), "propensity.required=true")


def test_an_optional_stage_that_breaks_is_failed_and_the_run_goes_on(tiny_cfg, monkeypatch, caplog):
    import dmp_dl.audience.build

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr(dmp_dl.audience.build, "build_audience", broken)
    cfg = tiny_cfg("debug=fdr", "logger=none", "propensity.enabled=false")
    result = run(cfg)
    stages = result["metrics"]["stages"]
    assert stages["audience"] == {"status": "failed", "reason": "RuntimeError: disk on fire", "seconds": stages["audience"]["seconds"],
                                  "peak_rss_gib": stages["audience"]["peak_rss_gib"]}
    assert stages["audience"]["peak_rss_gib"] > 0  # a failed stage's memory is recorded too
    assert stages["propensity"]["status"] == "skipped" and stages["propensity"]["reason"] == "propensity.enabled=false"
    bundle = Recommender.load(result["bundle_dir"])
    with pytest.raises(MissingPartError, match="it was trained with propensity.enabled=false"):
        bundle.propensity(bundle.user_vocab.ids[:1].tolist())
    assert stages["export"]["status"] == stages["report"]["status"] == "ok"
    assert [r.levelname for r in caplog.records if "audience failed" in r.getMessage()] == ["ERROR"]  # logged once
    assert "profiles" not in Bundle.open(result["bundle_dir"]).manifest
