"""The default model trains the same epochs and writes the same vectors on an idle or a busy machine;
its epoch limit comes from the settings or the data's size, never from a clock."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from dmp_dl import Recommender
from dmp_dl.core.errors import ConfigError
from dmp_dl.pipeline.run import run
from dmp_dl.training.selection import UNLIMITED_EPOCHS, epoch_limit, epochs_for_data

from .conftest import AUTOENCODER_SERVED, QUIET_TRAINER, TINY_DATA, compose_cfg

# the default model as a user runs it (epoch limit from the data, no time cap), on the tiny log;
# the stages that do not touch the vectors are off to keep the test short
DEFAULT_MODEL = [*TINY_DATA, *QUIET_TRAINER, "model.vae.max_epochs=auto", "logger=none", "propensity.enabled=false",
                 "audience.enabled=false", "evaluation.report=null"]


def _train(out, *overrides: str) -> tuple[dict, Recommender]:
    run(compose_cfg([*DEFAULT_MODEL, *overrides], out))
    return json.loads((out / "metrics.json").read_text()), Recommender.load(out / "artifacts")


def _busy_neighbours() -> list[subprocess.Popen]:
    """One busy-loop process per core: every core the training process could use is contended."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)]


def test_an_idle_and_a_busy_machine_write_the_same_bundle(tmp_path, monkeypatch):
    idle_metrics, idle = _train(tmp_path / "idle")
    neighbours = _busy_neighbours()
    real_cpu_clock = time.process_time
    # the CPU clock also runs 1000x fast: a fit that read it (a time budget) would stop at another epoch
    monkeypatch.setattr(time, "process_time", lambda: 1000.0 * real_cpu_clock())
    try:
        busy_metrics, busy = _train(tmp_path / "busy")
    finally:
        for p in neighbours:
            p.kill()
            p.wait()
    vae_idle = idle_metrics["model"]["candidates"]["vae"]["details"]
    vae_busy = busy_metrics["model"]["candidates"]["vae"]["details"]
    for key in ("epochs_run", "epochs", "best_epoch", "steps", "max_epochs"):
        assert vae_idle[key] == vae_busy[key], key
    assert vae_idle["time_budget_fired"] is False and vae_busy["time_budget_fired"] is False
    assert idle_metrics["model"]["refit_facts"]["vae_epochs_run"] == busy_metrics["model"]["refit_facts"]["vae_epochs_run"]
    assert idle_metrics["model"]["selected"] == busy_metrics["model"]["selected"]
    np.testing.assert_array_equal(idle.item_vectors, busy.item_vectors)
    np.testing.assert_array_equal(idle.user_vectors, busy.user_vectors)
    assert idle_metrics["ranking"] == busy_metrics["ranking"]


def test_trainer_max_epochs_limits_the_default_models_autoencoder(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="dmp_dl.training.selection")
    metrics, _ = _train(tmp_path / "run", "trainer.max_epochs=2", "model.vae.patience=100", *AUTOENCODER_SERVED)
    vae = metrics["model"]["candidates"]["vae"]["details"]
    assert vae["max_epochs"] == 2 and vae["max_epochs_from"] == "trainer.max_epochs"
    assert vae["epochs_run"] == 2 and vae["epochs"] <= 2
    assert metrics["model"]["refit_facts"]["vae_epochs_run"] == vae["epochs"]
    assert any("at most 2 epochs (trainer.max_epochs)" in r.getMessage() for r in caplog.records)


def test_a_time_cap_that_fires_says_the_result_depends_on_the_machine(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="dmp_dl.training.selection")
    metrics, _ = _train(tmp_path / "run", "model.time_budget_s=0.01", "model.vae.patience=100")
    vae = metrics["model"]["candidates"]["vae"]["details"]
    assert vae["time_budget_fired"] is True and vae["epochs_run"] < vae["max_epochs"]
    fired = [r.getMessage() for r in caplog.records if "time budget" in r.getMessage()]
    assert fired and "depend on this machine's speed and load" in fired[0]


def _limit_cfg(tmp_path, *overrides: str):
    return compose_cfg([*TINY_DATA, *overrides], tmp_path)


def test_the_epoch_limit_follows_the_settings_then_the_data(tmp_path):
    assert epoch_limit(_limit_cfg(tmp_path), 100_000) == (
        epochs_for_data(100_000), "model.vae.max_epochs=auto: from the data's size")
    assert epoch_limit(_limit_cfg(tmp_path, "trainer.max_epochs=7"), 100_000) == (7, "trainer.max_epochs")
    assert epoch_limit(_limit_cfg(tmp_path, "model.vae.max_epochs=9"), 100_000) == (9, "model.vae.max_epochs")
    both = _limit_cfg(tmp_path, "trainer.max_epochs=12", "model.vae.max_epochs=9")
    assert epoch_limit(both, 100_000) == (9, "model.vae.max_epochs")
    assert epoch_limit(_limit_cfg(tmp_path, "trainer.max_epochs=-1"), 100_000) == (UNLIMITED_EPOCHS, "trainer.max_epochs")


def test_the_data_size_rule_trains_small_logs_long_and_large_ones_at_least_20_epochs():
    # the README's rule: at most 100 epochs and 30 million training events seen, never under 20
    assert epochs_for_data(1_000) == epochs_for_data(80_000) == 100
    assert epochs_for_data(600_000) == 50
    assert epochs_for_data(3_000_000) == epochs_for_data(300_000_000) == 20


def test_other_models_keep_their_default_epochs(tmp_path):
    assert compose_cfg(["model=two_tower"], tmp_path).trainer.max_epochs == 10
    assert compose_cfg(["model=mf", "trainer.max_epochs=3"], tmp_path).trainer.max_epochs == 3
    assert compose_cfg([], tmp_path).trainer.max_epochs is None  # model=auto: from the data unless given


@pytest.mark.parametrize("value", ["auto", "fast"])
def test_a_time_budget_that_is_not_a_number_is_one_line(tmp_path, value):
    with pytest.raises(ConfigError, match=r"model.time_budget_s must be .*null"):
        run(compose_cfg([*DEFAULT_MODEL, f"model.time_budget_s={value}"], tmp_path / "run"))
